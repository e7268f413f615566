"""A ProviderStream over an SDK event stream, with error mapping and prompt close()."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from workers.providers.base import ChatRequest, ProviderError, Usage, estimate_tokens

ErrorMapper = Callable[[BaseException], ProviderError | None]


class SDKStream:
    """Wraps an SDK stream: yields text deltas, records finish reason and usage."""

    provider_name = "provider"

    def __init__(self, sdk_stream: Any, request: ChatRequest, map_error: ErrorMapper) -> None:
        self._sdk = sdk_stream
        self._request = request
        self._map_error = map_error
        self._closed = threading.Event()
        self._started = False
        self._deltas = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def _handle(self, event: Any) -> str | None:
        """Digest one SDK event; return its text delta, if any."""
        raise NotImplementedError

    def _complete(self) -> bool:
        """Whether the upstream signalled a proper end of the generation."""
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a provider stream can be iterated only once")
        self._started = True
        try:
            for event in self._sdk:
                if self._closed.is_set():
                    return
                delta = self._handle(event)
                if delta:
                    self._deltas += 1
                    yield delta
                if self._closed.is_set():
                    return
        except ProviderError:
            raise
        except Exception as exc:
            if self._closed.is_set():
                return
            mapped = self._map_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            self._close_sdk()
            self._fill_usage()
        if not self._complete():
            raise ProviderError(
                f"{self.provider_name} stream ended before the generation finished",
                retryable=True,
                code="upstream_stream_error",
            )

    def close(self) -> None:
        """Abort the upstream HTTP stream; safe to call twice or from another thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._shutdown_socket()
        self._close_sdk()
        self._fill_usage()

    def _shutdown_socket(self) -> None:
        """Shut the connection's socket down, waking a read blocked in another thread."""
        try:
            extensions = self._sdk.response.extensions
            sock = extensions["network_stream"].get_extra_info("socket")
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except Exception:  # no socket to reach (HTTP/2, a test double, already closed)
            pass

    def _close_sdk(self) -> None:
        """Close the SDK stream, ignoring errors from an already-broken connection."""
        try:
            self._sdk.close()
        except Exception:
            pass

    def _fill_usage(self) -> None:
        """Estimate usage when the upstream did not report it (cut short, or no usage chunk)."""
        if self.usage is None:
            self.usage = Usage(estimate_tokens(self._request.messages), self._deltas)
