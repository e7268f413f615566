"""Errors of the SDK-backed providers: one mapper for both SDKs, and the transport errors."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import httpx

from app.providers.base import ProviderError, Unsupported, error_from_status

sdk_http: ModuleType  # the SDKs' own HTTP stack: httpx2 in current SDKs, httpx in older ones
try:
    import httpx2

    sdk_http = httpx2
except ImportError:  # pragma: no cover - older SDKs are built on httpx
    sdk_http = httpx

RawResponse: type[Any] = sdk_http.Response  # what the SDK's HTTP stack returns, for `cast_to`

_TIMEOUTS: tuple[type[BaseException], ...] = (
    sdk_http.TimeoutException,
    httpx.TimeoutException,
    TimeoutError,
)
_TRANSPORT: tuple[type[BaseException], ...] = (sdk_http.HTTPError, httpx.HTTPError, OSError)


def upstream_message(body: object, fallback: str) -> str:
    """The human message from an error body (`{"message"}` or `{"error": {"message"}}`)."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, Mapping) else body.get("message")
        if isinstance(message, str):
            return message
    return fallback


def map_transport_error(exc: BaseException, provider: str) -> ProviderError | None:
    """Map a raw httpx / socket error (e.g. a dropped stream) to a retryable ProviderError."""
    if isinstance(exc, _TIMEOUTS):
        return ProviderError(
            f"{provider}: request timed out", retryable=True, code="upstream_timeout"
        )
    if isinstance(exc, _TRANSPORT):
        return ProviderError(
            f"{provider}: connection error: {exc!r}",
            retryable=True,
            code="upstream_connection_error",
        )
    return None


def map_sdk_error(exc: BaseException, provider: str, sdk: ModuleType) -> ProviderError | None:
    """Translate an `openai` / `anthropic` SDK (or transport) exception into a ProviderError.

    Both SDKs share one exception hierarchy (APIStatusError, APITimeoutError, ...).
    """
    if isinstance(exc, sdk.APIStatusError):
        message = upstream_message(exc.body, exc.message)
        if exc.status_code < 400:  # an `error` event inside a 200 stream
            kind = getattr(exc, "type", None) or "error"
            return ProviderError(
                f"{provider}: stream error ({kind}): {message}",
                retryable=True,
                code="upstream_stream_error",
            )
        return error_from_status(exc.status_code, f"{provider}: {message}", exc.response.headers)
    if isinstance(exc, sdk.APITimeoutError):
        return ProviderError(
            f"{provider}: request timed out", retryable=True, code="upstream_timeout"
        )
    if isinstance(exc, sdk.APIConnectionError):
        return ProviderError(
            f"{provider}: connection error: {exc.__cause__ or exc.message}",
            retryable=True,
            code="upstream_connection_error",
        )
    if isinstance(exc, sdk.APIError):
        message = upstream_message(exc.body, exc.message)
        return ProviderError(
            f"{provider}: stream error: {message}", retryable=True, code="upstream_stream_error"
        )
    if isinstance(exc, _base_error(sdk)):
        return ProviderError(f"{provider}: {exc}", retryable=False)
    return map_transport_error(exc, provider)


def _base_error(sdk: ModuleType) -> type[BaseException]:
    """The root of an SDK's exceptions: `openai.OpenAIError` or `anthropic.AnthropicError`."""
    base: type[BaseException] = getattr(sdk, "OpenAIError", None) or sdk.AnthropicError
    return base


def refused(provider: str, exc: Unsupported) -> ProviderError:
    """The error a worker records for a parameter the provider cannot honour."""
    return ProviderError(
        f"{provider}: {exc.message}",
        retryable=False,
        status_code=400,
        code="unsupported_parameter",
    )
