"""Anthropic Messages API via the official `anthropic` SDK, mapped to the OpenAI shapes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic

from app.providers.anthropic_request import Translated, translate
from app.providers.base import (
    ChatRequest,
    ChoiceDelta,
    Completion,
    ProviderError,
    Unsupported,
    Usage,
    text_delta,
)
from app.providers.errors import refused, upstream_message
from app.providers.sdk import SDKProvider
from app.providers.streaming import RawSSEStream, open_streaming, read_json
from app.providers.transport import lean_client

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class AnthropicStream(RawSSEStream):
    """A streamed Anthropic message, parsed from the raw SSE body into OpenAI choice deltas."""

    def __init__(self, *args: Any, format_tool: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._input_tokens = 0
        self._stopped = False
        self._tool_index: dict[int, int] = {}  # content block index -> OpenAI tool call index
        self._format_tool = format_tool  # the forced tool whose input is the JSON answer
        self._format_blocks: set[int] = set()

    def _handle(self, event: str | None, data: Any) -> list[ChoiceDelta] | None:
        """Translate one raw Messages stream event (text, tool use, thinking, stop, usage)."""
        if event is None or not isinstance(data, dict):
            return None
        if event == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use" and block.get("name") == self._format_tool:
                self._format_blocks.add(int(data.get("index") or 0))
            elif block.get("type") == "tool_use":
                position = self._tool_index[int(data.get("index") or 0)] = len(self._tool_index)
                call = {
                    "index": position,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [{"index": 0, "delta": {"tool_calls": [call]}}]
            if block.get("type") == "text" and block.get("text"):
                return [text_delta(block["text"])]
        elif event == "content_block_delta":
            delta = data.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta" and delta.get("text"):
                return [text_delta(delta["text"])]
            if kind == "input_json_delta" and delta.get("partial_json"):
                if int(data.get("index") or 0) in self._format_blocks:
                    return [text_delta(delta["partial_json"])]
                position = self._tool_index.get(int(data.get("index") or 0), 0)
                fragment = {"index": position, "function": {"arguments": delta["partial_json"]}}
                return [{"index": 0, "delta": {"tool_calls": [fragment]}}]
            if kind == "thinking_delta" and delta.get("thinking"):
                return [{"index": 0, "delta": {"reasoning_content": delta["thinking"]}}]
        elif event == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            self._input_tokens = int(usage.get("input_tokens") or 0)
        elif event == "message_delta":
            reason = (data.get("delta") or {}).get("stop_reason") or "end_turn"
            if reason == "tool_use" and self._format_blocks and not self._tool_index:
                reason = "end_turn"  # the forced answer tool was the answer
            self.finish_reason = STOP_REASONS.get(reason, "stop")
            usage = data.get("usage") or {}
            prompt = int(usage.get("input_tokens") or 0) or self._input_tokens
            self.usage = Usage(prompt, int(usage.get("output_tokens") or 0))
            return [{"index": 0, "delta": {}, "finish_reason": self.finish_reason}]
        elif event == "message_stop":
            self._stopped = True
        elif event == "error":
            error = data.get("error")
            kind = (error.get("type") if isinstance(error, dict) else None) or "error"
            message = upstream_message(data, f"{data}")
            raise ProviderError(
                f"{self.provider_name}: stream error ({kind}): {message}",
                retryable=True,
                code="upstream_stream_error",
            )
        return None

    def _complete(self) -> bool:
        """Complete once `message_stop` (or at least a stop reason) arrived."""
        return self._stopped or self.finish_reason is not None


class AnthropicProvider(SDKProvider):
    """Claude models through the Messages API."""

    sdk = anthropic

    def __init__(
        self,
        name: str = "anthropic",
        *,
        api_key: str | Callable[[], str | None] | None,
        base_url: str | None = None,
        timeout: float = 600.0,
        default_max_tokens: int = 1024,
        key_hint: str = "ANTHROPIC_API_KEY",
    ) -> None:
        super().__init__(
            name, api_key=api_key, base_url=base_url, timeout=timeout, key_hint=key_hint
        )
        self._default_max_tokens = default_max_tokens

    def _make_client(self, api_key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key=api_key,
            base_url=self._base_url,
            timeout=self._timeout,
            max_retries=0,
            http_client=lean_client(self._timeout),
        )

    def _translate(self, request: ChatRequest) -> Translated:
        """The Messages API call for a request; a refused parameter is a non-retryable 400."""
        try:
            return translate(request, self.name, self._default_max_tokens)
        except Unsupported as exc:
            raise refused(self.name, exc) from None

    def check(self, request: ChatRequest) -> None:
        """Raise Unsupported for a parameter the Messages API has no match for."""
        translate(request, self.name, self._default_max_tokens)

    def stream(self, request: ChatRequest) -> AnthropicStream:
        """Start a streamed message; HTTP errors raise here, later ones during iteration."""
        call = self._translate(request)
        client = self._get_client()
        response = open_streaming(
            client.messages.with_streaming_response.create, self._map, **call.params, stream=True
        )
        stream = AnthropicStream(response, request, self._map, format_tool=call.format_tool)
        stream.provider_name = self.name
        return stream

    def complete(self, request: ChatRequest) -> Completion:
        """Run a non-streaming message (raw SDK response, decoded without models)."""
        call = self._translate(request)
        client = self._get_client()
        body = read_json(client.messages.with_streaming_response.create, self._map, **call.params)
        return completion_from_message(body, call.format_tool)


def completion_from_message(body: Any, format_tool: str | None = None) -> Completion:
    """A Completion from an Anthropic `message` JSON body (text, tool use, thinking).

    A `tool_use` of the forced answer tool (`format_tool`) is the JSON content of the answer.
    """
    body = body if isinstance(body, dict) else {}
    blocks = [b for b in body.get("content") or [] if isinstance(b, dict)]
    answers = [b for b in blocks if b.get("type") == "tool_use" and b.get("name") == format_tool]
    blocks = [b for b in blocks if b not in answers]
    text = "".join(b.get("text") or "" for b in blocks if b.get("type") == "text")
    text += "".join(json.dumps(b.get("input") or {}, ensure_ascii=False) for b in answers)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [
        {
            "id": b.get("id"),
            "type": "function",
            "function": {
                "name": b.get("name"),
                "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False),
            },
        }
        for b in blocks
        if b.get("type") == "tool_use"
    ]
    if calls:
        message["tool_calls"] = calls
        message["content"] = text or None
    thinking = "".join(b.get("thinking") or "" for b in blocks if b.get("type") == "thinking")
    if thinking:
        message["reasoning_content"] = thinking
    usage = body.get("usage") or {}
    stop = body.get("stop_reason") or "end_turn"
    if stop == "tool_use" and answers and not calls:
        stop = "end_turn"
    reason = STOP_REASONS.get(stop, "stop")
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    return Completion(
        [choice], Usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))
    )
