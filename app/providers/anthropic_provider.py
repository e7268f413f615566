"""Anthropic Messages API via the official `anthropic` SDK, mapped to the OpenAI shapes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic

from app.providers.base import (
    ChatRequest,
    ChoiceDelta,
    Completion,
    ProviderError,
    Usage,
    content_text,
    error_from_status,
    text_delta,
)
from app.providers.errors import map_transport_error, upstream_message
from app.providers.sdk import SDKProvider
from app.providers.streaming import RawSSEStream, open_streaming, read_json

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def map_anthropic_error(exc: BaseException, provider: str = "anthropic") -> ProviderError | None:
    """Translate an anthropic SDK (or transport) exception into a ProviderError."""
    if isinstance(exc, anthropic.APIStatusError):
        message = upstream_message(exc.body, exc.message)
        if exc.status_code < 400:  # an `error` event inside a 200 stream
            kind = getattr(exc, "type", None) or "error"
            return ProviderError(
                f"{provider}: stream error ({kind}): {message}",
                retryable=True,
                code="upstream_stream_error",
            )
        return error_from_status(exc.status_code, f"{provider}: {message}", exc.response.headers)
    if isinstance(exc, anthropic.APITimeoutError):
        return ProviderError(
            f"{provider}: request timed out", retryable=True, code="upstream_timeout"
        )
    if isinstance(exc, anthropic.APIConnectionError):
        return ProviderError(
            f"{provider}: connection error: {exc.__cause__ or exc.message}",
            retryable=True,
            code="upstream_connection_error",
        )
    if isinstance(exc, anthropic.APIError):
        message = upstream_message(exc.body, exc.message)
        return ProviderError(f"{provider}: {message}", retryable=True, code="upstream_stream_error")
    if isinstance(exc, anthropic.AnthropicError):
        return ProviderError(f"{provider}: {exc}", retryable=False)
    return map_transport_error(exc, provider)


def to_anthropic_messages(
    messages: list[dict[str, Any]],
) -> tuple[str | None, list[dict[str, Any]]]:
    """Split OpenAI messages into Anthropic's `system` and alternating text `messages`."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        text = content_text(message.get("content"))
        if role in ("system", "developer"):
            if text:
                system.append(text)
            continue
        role = "assistant" if role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    return ("\n\n".join(system) or None), turns


class AnthropicStream(RawSSEStream):
    """A streamed Anthropic message, parsed from the raw SSE body into OpenAI choice deltas."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._input_tokens = 0
        self._stopped = False
        self._tool_index: dict[int, int] = {}  # content block index -> OpenAI tool call index

    def _handle(self, event: str | None, data: Any) -> list[ChoiceDelta] | None:
        """Translate one raw Messages stream event (text, tool use, thinking, stop, usage)."""
        if event is None or not isinstance(data, dict):
            return None
        if event == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
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
            api_key=api_key, base_url=self._base_url, timeout=self._timeout, max_retries=0
        )

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        """SDK keyword arguments for a request."""
        system, messages = to_anthropic_messages(request.messages)
        params: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens or self._default_max_tokens,
        }
        if system:
            params["system"] = system
        if request.stop:
            params["stop_sequences"] = request.stop
        if request.user:
            params["metadata"] = {"user_id": request.user}
        sampling = {"temperature": request.temperature, "top_p": request.top_p}
        extra = {k: v for k, v in sampling.items() if v is not None}
        if extra:
            params["extra_body"] = extra
        return params

    def _map(self, exc: BaseException) -> ProviderError | None:
        """Map an exception raised by this provider's SDK calls."""
        return map_anthropic_error(exc, self.name)

    def stream(self, request: ChatRequest) -> AnthropicStream:
        """Start a streamed message; HTTP errors raise here, later ones during iteration."""
        client = self._get_client()
        response = open_streaming(
            client.messages.with_streaming_response.create,
            self._map,
            **self._params(request),
            stream=True,
        )
        stream = AnthropicStream(response, request, self._map)
        stream.provider_name = self.name
        return stream

    def complete(self, request: ChatRequest) -> Completion:
        """Run a non-streaming message (raw SDK response, decoded without models)."""
        client = self._get_client()
        body = read_json(
            client.messages.with_streaming_response.create, self._map, **self._params(request)
        )
        return completion_from_message(body)


def completion_from_message(body: Any) -> Completion:
    """A Completion from an Anthropic `message` JSON body (text, tool use, thinking)."""
    body = body if isinstance(body, dict) else {}
    blocks = [b for b in body.get("content") or [] if isinstance(b, dict)]
    text = "".join(b.get("text") or "" for b in blocks if b.get("type") == "text")
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
    reason = STOP_REASONS.get(body.get("stop_reason") or "end_turn", "stop")
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    return Completion(
        [choice], Usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))
    )
