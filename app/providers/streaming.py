"""A ProviderStream over an SDK raw streaming response: a lean SSE parser, no per-chunk models.

The SDK still builds and sends the request (auth, headers, timeouts, HTTP error mapping);
the body is read here as bytes and each `data:` line is decoded with json.loads. Subclasses
digest one decoded event at a time.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from app.providers.base import ChatRequest, ChoiceDelta, ProviderError, Usage
from app.providers.messages import estimate_tokens

ErrorMapper = Callable[[BaseException], ProviderError | None]


class RawSSEStream:
    """Wraps an SDK streaming response: yields choice deltas, records finish reason and usage."""

    provider_name = "provider"

    def __init__(self, response: Any, request: ChatRequest, map_error: ErrorMapper) -> None:
        self._http = response  # the SDK's underlying httpx response, not yet read
        self._request = request
        self._map_error = map_error
        self._closed = threading.Event()
        self._started = False
        self._deltas = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.pace: Callable[[], None] | None = None  # called after each read of the body

    # -- subclass hooks ----------------------------------------------------------------------

    def _handle(self, event: str | None, data: Any) -> list[ChoiceDelta] | None:
        """Digest one decoded SSE event; return its choice deltas, if any."""
        raise NotImplementedError

    def _complete(self) -> bool:
        """Whether the upstream signalled a proper end of the generation."""
        return self.finish_reason is not None

    def _stream_error(self, message: str) -> ProviderError:
        return ProviderError(
            f"{self.provider_name}: stream error: {message}",
            retryable=True,
            code="upstream_stream_error",
        )

    # -- parsing -----------------------------------------------------------------------------

    def _events(self) -> Iterator[tuple[str | None, str]]:
        """(event name, data) per SSE event, from the raw byte stream."""
        buffer = b""
        event: str | None = None
        data: list[bytes] = []
        for chunk in self._http.iter_bytes():
            buffer = buffer + chunk if buffer else chunk
            start = 0
            while (end := buffer.find(b"\n", start)) >= 0:
                line = buffer[start:end]
                start = end + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line:
                    if data:
                        yield event, b"\n".join(data).decode()
                    event, data = None, []
                elif line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode()
            buffer = buffer[start:]
            if self.pace is not None:
                self.pace()  # may wait, so that the next read takes what arrived meanwhile
        if data:  # a last event without its blank line
            yield event, b"\n".join(data).decode()

    def __iter__(self) -> Iterator[ChoiceDelta]:
        if self._started:
            raise RuntimeError("a provider stream can be iterated only once")
        self._started = True
        closed = self._closed.is_set
        done = False
        try:
            for event, raw in self._events():
                if closed():
                    return
                if done:
                    continue  # drain to the end so the connection can be reused
                if raw.startswith("[DONE]"):
                    done = True
                    continue
                try:
                    data = json.loads(raw)
                except ValueError:
                    raise self._stream_error(f"undecodable event {raw[:200]!r}") from None
                for choice in self._handle(event, data) or ():
                    if choice.get("delta"):
                        self._deltas += 1
                    yield choice
                    if closed():
                        return
                if closed():
                    return
        except ProviderError:
            raise
        except Exception as exc:
            if closed():
                return
            mapped = self._map_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            self._close_response()
            self._fill_usage()
        if not self._complete():
            raise ProviderError(
                f"{self.provider_name} stream ended before the generation finished",
                retryable=True,
                code="upstream_stream_error",
            )

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Abort the upstream HTTP stream; safe to call twice or from another thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._shutdown_socket()
        self._close_response()
        self._fill_usage()

    def _shutdown_socket(self) -> None:
        """Shut the connection's socket down, waking a read blocked in another thread."""
        try:
            stream = self._http.extensions["network_stream"]
            sock = stream.get_extra_info("socket")
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except Exception:  # no socket to reach (HTTP/2, a test double, already closed)
            pass

    def _close_response(self) -> None:
        """Close the response, ignoring errors from an already-broken connection."""
        try:
            self._http.close()
        except Exception:
            pass

    def _fill_usage(self) -> None:
        """Estimate usage when the upstream did not report it (cut short, or no usage chunk)."""
        if self.usage is None:
            self.usage = Usage(estimate_tokens(self._request.messages), self._deltas)


def open_streaming(call: Callable[..., Any], map_error: ErrorMapper, **params: Any) -> Any:
    """Send a request through an SDK `with_streaming_response` method; return the httpx response.

    HTTP error statuses are raised (mapped) here by the SDK, before any body is read.
    """
    try:
        return call(**params).__enter__().http_response
    except Exception as exc:
        mapped = map_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


def read_json(call: Callable[..., Any], map_error: ErrorMapper, **params: Any) -> Any:
    """A non-streaming call through `with_streaming_response`: the body, json-decoded."""
    try:
        with call(**params) as response:
            body = response.read()
    except Exception as exc:
        mapped = map_error(exc)
        if mapped is None:
            raise
        raise mapped from exc
    try:
        return json.loads(body)
    except ValueError:
        raise ProviderError(
            f"undecodable response body {body[:200]!r}", retryable=True, code="upstream_error"
        ) from None
