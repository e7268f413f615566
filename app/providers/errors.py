"""Error helpers shared by the SDK-backed providers."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from app.providers.base import ProviderError

try:  # the SDKs' own HTTP stack, when they use it
    import httpx2
except ImportError:  # pragma: no cover - older SDKs are built on httpx
    httpx2 = httpx  # type: ignore[assignment]

RawResponse = httpx2.Response  # what the SDK's HTTP stack returns, for `cast_to`

_TIMEOUTS: tuple[type[BaseException], ...] = (
    httpx2.TimeoutException,
    httpx.TimeoutException,
    TimeoutError,
)
_TRANSPORT: tuple[type[BaseException], ...] = (httpx2.HTTPError, httpx.HTTPError, OSError)


def upstream_message(body: object, fallback: str) -> str:
    """The human message from an error body (`{"message"}` or `{"error": {"message"}}`)."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
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
