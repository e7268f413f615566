"""Validation of an OpenAI chat-completions body into a typed ChatBody (no Flask request needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.errors import APIError
from app.providers import ChatRequest, build_registry
from app.providers.base import estimate_tokens
from app.validation import check_metadata, check_model_name

ROLES = ("system", "developer", "user", "assistant", "tool")
# Parameters Sluice cannot honour: rejected unless given their neutral value.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


@dataclass(frozen=True)
class ChatBody:
    """A validated chat-completions request."""

    model: str  # "provider/model" as the client sent it
    provider: str
    provider_model: str  # the model name the provider sees
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_provider_request(self) -> ChatRequest:
        """The provider request; its `model` is the provider's own name (after "provider/")."""
        return ChatRequest(
            model=self.provider_model,
            messages=self.messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            user=self.user,
        )

    def input_tokens(self) -> int:
        """A rough prompt-size estimate, for routing."""
        return estimate_tokens(self.messages)

    def to_record(self) -> dict[str, Any]:
        """What the Job row keeps as `request` (the validated, normalised body)."""
        record: dict[str, Any] = {"model": self.model, "messages": self.messages}
        record["stream"] = self.stream
        if self.include_usage:
            record["stream_options"] = {"include_usage": True}
        for name in ("max_tokens", "temperature", "top_p", "stop", "user"):
            value = getattr(self, name)
            if value is not None:
                record[name] = value
        return record


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


_names_cache: dict[int, tuple[Mapping[str, Any], frozenset[str]]] = {}


def provider_names(config: Mapping[str, Any]) -> frozenset[str]:
    """The configured provider names (cached per config object)."""
    cached = _names_cache.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1]
    names = frozenset(build_registry(config).names())
    _names_cache[id(config)] = (config, names)
    return names


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number, got {value!r}.", name, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low:g} and {high:g}, got {value!r}.", name)
    return float(value)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(f"'{name}' must be an integer, got {value!r}.", name, "invalid_type")
        if value < 1:
            raise _bad(f"'{name}' must be at least 1, got {value}.", name)
        return value
    return None


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad("'messages' must be an array of message objects.", "messages", "invalid_type")
    if not value:
        raise _bad("'messages' must contain at least one message.", "messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object.", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(
                f"'{where}.role' must be one of {', '.join(ROLES)}; got {role!r}.", f"{where}.role"
            )
        content = message.get("content")
        if content is None and role != "assistant":
            raise _bad(f"'{where}.content' is required.", f"{where}.content", "missing_required")
        if content is not None and not isinstance(content, str | list):
            raise _bad(
                f"'{where}.content' must be a string or an array of content parts.",
                f"{where}.content",
                "invalid_type",
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise _bad(
                        f"'{where}.content[{j}]' must be a text part; only text is supported.",
                        f"{where}.content[{j}]",
                    )
                if not isinstance(part.get("text"), str):
                    raise _bad(
                        f"'{where}.content[{j}].text' must be a string.",
                        f"{where}.content[{j}].text",
                        "invalid_type",
                    )
        out.append(message)
    return out


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return list(value) or None
    raise _bad("'stop' must be a string or an array of up to 4 strings.", "stop", "invalid_type")


def _model(value: Any, config: Mapping[str, Any]) -> tuple[str, str, str]:
    if not isinstance(value, str) or not value.strip():
        raise _bad("'model' is required: a string like 'mock/echo'.", "model", "missing_required")
    check_model_name(value)
    provider, _, name = value.partition("/")
    if not provider or not name.strip():
        raise _bad(
            f"'model' must look like provider/model (e.g. mock/echo), got {value!r}.",
            "model",
            "model_not_found",
        )
    known = provider_names(config)
    if provider not in known:
        raise _bad(
            f"The model '{value}' does not exist: unknown provider '{provider}' "
            f"(known: {', '.join(sorted(known))}).",
            "model",
            "model_not_found",
        )
    return value, provider, name


def parse_chat_body(body: Any, config: Mapping[str, Any]) -> ChatBody:
    """Validate a chat-completions body; raise APIError(400, param=...) naming the bad field."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None, "invalid_json")
    model, provider, provider_model = _model(body.get("model"), config)
    messages = _messages(body.get("messages"))
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad(f"'n' must be 1 (only one choice is supported), got {n!r}.", "n", "unsupported")
    for name, neutral in _UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise _bad(f"'{name}' is not supported by Sluice.", name, "unsupported_parameter")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean.", "stream", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
        usage_flag = options.get("include_usage", False)
        if not isinstance(usage_flag, bool):
            raise _bad(
                "'stream_options.include_usage' must be a boolean.",
                "stream_options.include_usage",
                "invalid_type",
            )
        include_usage = usage_flag
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string.", "user", "invalid_type")
    return ChatBody(
        model=model,
        provider=provider,
        provider_model=provider_model,
        messages=messages,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1),
        stop=_stop(body.get("stop")),
        user=user,
        metadata=check_metadata(body.get("metadata")),
        raw=body,
    )
