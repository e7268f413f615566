"""A lean HTTP/1.1 transport for the SDKs' httpx client (keep-alive pool, TLS, timeouts).

The official SDK still builds the request (URL, auth, headers, body, timeout), sends it
through its httpx client and turns the response into its own errors; only the bottom of
that stack changes. httpx's default transport is httpcore over h11, which costs about
half of a stream worker's CPU per delta and most of a batch call's (its connection pool,
its per-connection state machine, one event object per header block and body chunk, two
sends per request). This one writes a request with one `sendall` and reads the response
with plain `recv` calls and byte searches, for what the providers need:

- HTTP/1.1 with keep-alive: idle connections are reused (newest first) until they are
  `KEEPALIVE_SECONDS` old, and dropped if the server closed them (a non-blocking poll);
- bodies framed by Content-Length, chunked, or the end of the connection (both ways: a
  streamed request body without a length is sent chunked);
- TLS with httpx's own default context (the same verification as the SDK's default
  client: system trust store, `SSL_CERT_FILE` / `SSL_CERT_DIR`);
- the request's connect / read / write timeouts, raised as httpx's timeout errors (and
  every other failure as httpx's transport errors), so the SDK maps them as before;
- a response's socket in `extensions["network_stream"]` while the response owns it, so a
  stream can be shut down from another greenlet (`RawSSEStream.close`).

Proxies are not spoken here: `lean_client()` returns None when the environment configures
one, and the SDK then builds its default client (httpx reads the proxy variables itself).
HTTP/2, Unix sockets and client certificates are not used by Sluice's providers.
"""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from app.providers import gevent_compat

if TYPE_CHECKING:  # current SDKs are built on httpx2 (older ones on httpx)
    import httpx2 as sdk_http
else:
    from app.providers.errors import sdk_http

KEEPALIVE_SECONDS = 5.0  # httpcore's default expiry of an idle connection
MAX_IDLE_PER_HOST = 100  # the SDKs' default max_keepalive_connections
MAX_HEAD_BYTES = 64 * 1024  # status line + headers of one response
RECV_BYTES = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_SIZE, _DATA, _CRLF, _TRAILERS = range(4)  # the chunked decoder's states

Key = tuple[bytes, bytes, int]  # scheme, host, port


class _Connection:
    """One pooled socket and the bytes read past the end of the last response."""

    __slots__ = ("buffer", "idle_since", "key", "sock")

    def __init__(self, sock: socket.socket, key: Key) -> None:
        self.sock = sock
        self.key = key
        self.buffer = b""
        self.idle_since = 0.0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover - closing never matters here
            pass


class _NetworkStream:
    """`extensions["network_stream"]`: the response's socket, only while it owns it."""

    def __init__(self, body: _Body) -> None:
        self._body = body

    def get_extra_info(self, info: str) -> Any:
        conn = self._body.conn
        if info == "socket":
            return None if conn is None else conn.sock
        if info == "ssl_object" and conn is not None and isinstance(conn.sock, ssl.SSLSocket):
            return getattr(conn.sock, "_sslobj", None)  # as httpcore reports it
        return None


class _Body(sdk_http.SyncByteStream):
    """A response body read from its connection; the connection goes back to the pool at its end.

    `length` is the Content-Length, -1 for chunked, None for "until the connection closes".
    """

    def __init__(
        self,
        transport: LeanTransport,
        conn: _Connection,
        length: int | None,
        keep_alive: bool,
        read_timeout: float | None,
    ) -> None:
        self.transport = transport
        self.conn: _Connection | None = conn
        self.length = length
        self.keep_alive = keep_alive and length is not None
        self.read_timeout = read_timeout
        self._iterated = False

    def __iter__(self) -> Iterator[bytes]:
        if self._iterated:
            raise sdk_http.StreamConsumed()
        self._iterated = True
        if self.conn is None:  # an empty body, already released
            return
        try:
            if self.length is None:
                yield from self._until_close()
            elif self.length >= 0:
                yield from self._sized(self.length)
            else:
                yield from self._chunked()
        except TimeoutError as exc:
            self._discard()
            raise sdk_http.ReadTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            self._discard()
            raise sdk_http.ReadError(str(exc) or repr(exc)) from exc
        except BaseException:
            self._discard()
            raise
        self._finished()

    def _recv(self) -> bytes:
        assert self.conn is not None
        data = self.conn.sock.recv(RECV_BYTES)
        if not data:
            self._discard()
            raise sdk_http.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        return data

    def _until_close(self) -> Iterator[bytes]:
        assert self.conn is not None
        data, self.conn.buffer = self.conn.buffer, b""
        while True:
            if data:
                yield data
            assert self.conn is not None
            data = self.conn.sock.recv(RECV_BYTES)
            if not data:
                return

    def _sized(self, left: int) -> Iterator[bytes]:
        assert self.conn is not None
        data, self.conn.buffer = self.conn.buffer, b""
        while True:
            if len(data) > left:  # bytes past the body: not a response we asked for
                self.keep_alive = False
                data = data[:left]
            if data:
                left -= len(data)
                yield data
            if not left:
                return
            data = self._recv()

    def _chunked(self) -> Iterator[bytes]:
        """Decode a chunked body; yields what each read completed (one piece per read)."""
        assert self.conn is not None
        buf, self.conn.buffer = self.conn.buffer, b""
        pos = 0
        state = _SIZE
        left = 0  # data bytes of the current chunk still to come
        while True:
            out: list[bytes] = []
            while True:
                if state == _DATA:
                    take = min(left, len(buf) - pos)
                    if take <= 0:
                        break
                    out.append(buf[pos : pos + take])
                    pos += take
                    left -= take
                    if left:
                        break
                    state = _CRLF
                if state == _CRLF:
                    if len(buf) - pos < 2:
                        break
                    if buf[pos : pos + 2] != b"\r\n":
                        raise sdk_http.RemoteProtocolError("malformed chunked body")
                    pos += 2
                    state = _SIZE
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > 4096:
                        raise sdk_http.RemoteProtocolError("malformed chunked body")
                    break
                line = buf[pos:end]
                pos = end + 2
                if state == _TRAILERS:  # up to an empty line
                    if not line:
                        if out:
                            yield b"".join(out)
                        if pos < len(buf):  # bytes past the body: not a response we asked for
                            self.keep_alive = False
                        return
                    continue
                try:
                    left = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise sdk_http.RemoteProtocolError("malformed chunk size") from None
                if left < 0:
                    raise sdk_http.RemoteProtocolError("malformed chunk size")
                state = _DATA if left else _TRAILERS
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
            buf = buf[pos:] + self._recv() if pos < len(buf) else self._recv()
            pos = 0

    def _finished(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.keep_alive:
            self.transport._release(conn)
        else:
            conn.close()

    def _discard(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close early: a connection whose body was not read to its end is not reused."""
        self._discard()


class LeanTransport(sdk_http.BaseTransport):
    """HTTP/1.1 over a keep-alive pool of plain or TLS sockets; see the module docstring."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._idle: dict[Key, list[_Connection]] = {}
        self._readable = gevent_compat.readable_probe()

    # -- pool ------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            context = sdk_http.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    def _pooled(self, key: Key) -> _Connection | None:
        """The newest idle connection to key that is still usable (older ones are closed)."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < KEEPALIVE_SECONDS and not self._readable(conn.sock):
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_HOST:
            idle.pop(0).close()
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _connect(self, key: Key, timeout: float | None) -> _Connection:
        scheme, host, port = key
        name = host.decode("ascii")
        try:
            sock = socket.create_connection((name, port), timeout=timeout)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if scheme == b"https":
                    sock = self._ssl().wrap_socket(sock, server_hostname=name)
            except BaseException:
                sock.close()
                raise
        except TimeoutError as exc:
            raise sdk_http.ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise sdk_http.ConnectError(str(exc) or repr(exc)) from exc
        return _Connection(sock, key)

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # -- one request -----------------------------------------------------------------------

    def handle_request(self, request: Any) -> Any:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in _DEFAULT_PORTS:
            raise sdk_http.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        key: Key = (scheme, url.raw_host, url.port or _DEFAULT_PORTS[scheme])
        timeouts = request.extensions.get("timeout") or {}
        head = _head(request)
        conn = self._pooled(key) or self._connect(key, timeouts.get("connect"))
        try:
            self._send(conn, request, head, timeouts.get("write"))
            return self._response(conn, request, timeouts.get("read"))
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _send(conn: _Connection, request: Any, head: bytes, timeout: float | None) -> None:
        sock = conn.sock
        try:
            sock.settimeout(timeout)
            try:
                body: bytes | None = request.content
            except sdk_http.RequestNotRead:
                body = None
            if body is not None:
                if len(body) <= RECV_BYTES:
                    sock.sendall(head + body)
                else:
                    sock.sendall(head)
                    sock.sendall(body)
                return
            sock.sendall(head)
            chunked = b"chunked" in request.headers.get("transfer-encoding", "").encode()
            for piece in request.stream:
                if piece:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except TimeoutError as exc:
            raise sdk_http.WriteTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise sdk_http.WriteError(str(exc) or repr(exc)) from exc

    def _response(self, conn: _Connection, request: Any, timeout: float | None) -> Any:
        sock = conn.sock
        try:
            sock.settimeout(timeout)
            while True:  # interim 1xx responses are skipped
                version, status, reason, headers = _read_head(conn)
                if status >= 200 or status == 101:
                    break
        except TimeoutError as exc:
            raise sdk_http.ReadTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise sdk_http.ReadError(str(exc) or repr(exc)) from exc
        length, keep_alive = _framing(request.method, version, status, headers)
        body = _Body(self, conn, length, keep_alive, timeout)
        extensions = {
            "http_version": version,
            "reason_phrase": reason,
            "network_stream": _NetworkStream(body),
        }
        if length == 0:
            body._finished()
        return sdk_http.Response(status, headers=headers, stream=body, extensions=extensions)


def _head(request: Any) -> bytes:
    """The request line and headers, as sent."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
            raise sdk_http.LocalProtocolError(f"illegal header {name!r}")
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def _read_head(conn: _Connection) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    """Read one response's status line and headers; the rest stays in conn.buffer."""
    buf = conn.buffer
    start = 0
    while (end := buf.find(b"\r\n\r\n", start)) < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise sdk_http.RemoteProtocolError("response head too large")
        start = max(0, len(buf) - 3)
        data = conn.sock.recv(RECV_BYTES)
        if not data:
            raise sdk_http.RemoteProtocolError(
                "Server disconnected without sending a response."
                if not buf
                else "peer closed connection in the middle of the response head"
            )
        buf += data
    conn.buffer = buf[end + 4 :]
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    try:
        version, status = parts[0], int(parts[1])
    except (IndexError, ValueError):
        raise sdk_http.RemoteProtocolError(f"malformed status line {lines[0][:100]!r}") from None
    if not version.startswith(b"HTTP/1.") or not 100 <= status <= 999:
        raise sdk_http.RemoteProtocolError(f"malformed status line {lines[0][:100]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip())
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise sdk_http.RemoteProtocolError(f"malformed header line {line[:100]!r}")
        headers.append((name, value.strip()))
    return version, status, parts[2] if len(parts) > 2 else b"", headers


def _framing(
    method: str, version: bytes, status: int, headers: list[tuple[bytes, bytes]]
) -> tuple[int | None, bool]:
    """(body length: bytes, -1 chunked, None until close; whether the connection is reusable)."""
    length: int | None = None
    chunked = False
    keep_alive = version == b"HTTP/1.1"
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            try:
                size = int(value)
            except ValueError:
                raise sdk_http.RemoteProtocolError("malformed Content-Length") from None
            if size < 0 or (length is not None and length != size):
                raise sdk_http.RemoteProtocolError("malformed Content-Length")
            length = size
        elif lower == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
        elif lower == b"connection":
            tokens = value.lower()
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                keep_alive = True
    if method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
        return 0, keep_alive
    if chunked:
        return -1, keep_alive
    return length, keep_alive


def lean_client(timeout: float) -> Any:
    """An httpx client over LeanTransport for an SDK, or None if a proxy is configured."""
    if any(scheme != "no" for scheme in urllib.request.getproxies()):  # NO_PROXY alone: none
        return None  # the SDK's default client, which honours the proxy variables
    return sdk_http.Client(transport=LeanTransport(), timeout=timeout, follow_redirects=True)
