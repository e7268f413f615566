"""OpenAI chat messages: their text, a rough token count, and data URLs in content parts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

KNOWN_PARTS = ("text", "image_url", "input_audio", "file", "refusal")  # Chat Completions parts
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(;[^;,]*)*?;base64,(?P<data>.*)", re.S)


def content_text(content: Any) -> str:
    """Flatten OpenAI message content (str or list of parts) to plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """A rough prompt token count: about four characters a token plus per-message overhead."""
    chars = sum(len(content_text(m.get("content"))) for m in messages)
    return (chars + 3) // 4 + 4 * len(messages)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message, or "" if there is none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:TYPE;base64,DATA` URL, or None if it is not one."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        return None
    return match.group("type") or "application/octet-stream", match.group("data")


def is_image_url(url: str) -> bool:
    """Whether an `image_url.url` is one Sluice forwards: http(s), or a base64 data URL."""
    return url.startswith(("http://", "https://")) or parse_data_url(url) is not None
