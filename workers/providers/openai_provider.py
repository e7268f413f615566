"""OpenAI and OpenAI-compatible chat completions via the official `openai` SDK."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import openai

from workers.providers.base import (
    ChatRequest,
    Completion,
    ProviderError,
    Usage,
    error_from_status,
    estimate_tokens,
)
from workers.providers.errors import map_transport_error, upstream_message
from workers.providers.streaming import SDKStream

_FINISH_REASONS = {"function_call": "tool_calls"}


def map_openai_error(exc: BaseException, provider: str = "openai") -> ProviderError | None:
    """Translate an openai SDK (or transport) exception into a ProviderError."""
    if isinstance(exc, openai.APIStatusError):
        message = upstream_message(exc.body, exc.message)
        return error_from_status(exc.status_code, f"{provider}: {message}", exc.response.headers)
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(
            f"{provider}: request timed out", retryable=True, code="upstream_timeout"
        )
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(
            f"{provider}: connection error: {exc.__cause__ or exc.message}",
            retryable=True,
            code="upstream_connection_error",
        )
    if isinstance(exc, openai.APIError):
        message = upstream_message(exc.body, exc.message)
        return ProviderError(
            f"{provider}: stream error: {message}", retryable=True, code="upstream_stream_error"
        )
    if isinstance(exc, openai.OpenAIError):
        return ProviderError(f"{provider}: {exc}", retryable=False)
    return map_transport_error(exc, provider)


def _finish_reason(value: str | None) -> str:
    """Normalise an OpenAI finish reason."""
    return _FINISH_REASONS.get(value or "stop", value or "stop")


class OpenAIStream(SDKStream):
    """A streamed chat completion."""

    def _handle(self, event: Any) -> str | None:
        """Take usage from the usage chunk and text from content deltas."""
        if getattr(event, "usage", None) is not None:
            self.usage = Usage(event.usage.prompt_tokens or 0, event.usage.completion_tokens or 0)
        text: list[str] = []
        for choice in event.choices or []:
            if choice.index not in (0, None):
                continue
            if choice.delta is not None and choice.delta.content:
                text.append(choice.delta.content)
            if choice.finish_reason:
                self.finish_reason = _finish_reason(choice.finish_reason)
        return "".join(text)


class OpenAIProvider:
    """Chat completions against api.openai.com or any OpenAI-compatible server."""

    def __init__(
        self,
        name: str = "openai",
        *,
        api_key: str | Callable[[], str | None] | None,
        base_url: str | None = None,
        timeout: float = 600.0,
        key_hint: str = "OPENAI_API_KEY",
    ) -> None:
        self.name = name
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._key_hint = key_hint
        self._client: openai.OpenAI | None = None
        self._lock = threading.Lock()

    def _get_client(self) -> openai.OpenAI:
        """The provider's SDK client, made on first use and then reused."""
        if self._client is not None:
            return self._client
        api_key = self._api_key() if callable(self._api_key) else self._api_key
        if not api_key:
            raise ProviderError(
                f"{self._key_hint} is not set; cannot call provider '{self.name}'",
                retryable=False,
                code="provider_not_configured",
            )
        with self._lock:
            if self._client is None:
                self._client = openai.OpenAI(
                    api_key=api_key,
                    base_url=self._base_url,
                    timeout=self._timeout,
                    max_retries=0,
                )
        return self._client

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        """SDK keyword arguments for a request."""
        params: dict[str, Any] = {"model": request.model, "messages": request.messages}
        optional = {
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop or None,
            "user": request.user,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    def _map(self, exc: BaseException) -> ProviderError | None:
        """Map an exception raised by this provider's SDK calls."""
        return map_openai_error(exc, self.name)

    def stream(self, request: ChatRequest) -> OpenAIStream:
        """Start a streamed completion; HTTP errors raise here, later ones during iteration."""
        client = self._get_client()
        try:
            sdk_stream = client.chat.completions.create(
                **self._params(request), stream=True, stream_options={"include_usage": True}
            )
        except Exception as exc:
            mapped = self._map(exc)
            if mapped is None:
                raise
            raise mapped from exc
        stream = OpenAIStream(sdk_stream, request, self._map)
        stream.provider_name = self.name
        return stream

    def complete(self, request: ChatRequest) -> Completion:
        """Run a non-streaming completion."""
        client = self._get_client()
        try:
            response = client.chat.completions.create(**self._params(request))
        except Exception as exc:
            mapped = self._map(exc)
            if mapped is None:
                raise
            raise mapped from exc
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice and choice.message else None) or ""
        if response.usage is not None:
            usage = Usage(response.usage.prompt_tokens or 0, response.usage.completion_tokens or 0)
        else:
            usage = Usage(estimate_tokens(request.messages), len(text.split()))
        return Completion(text, _finish_reason(choice.finish_reason if choice else None), usage)
