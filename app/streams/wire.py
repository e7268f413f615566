"""A pub/sub connection read straight off its socket (the web's hub, the workers' cancels).

redis-py makes the connection (address, TLS, AUTH, handshake); replies are then read by a
hiredis Reader and commands written as hiredis packs them: redis-py's pub/sub layers cost
~15 us a message under load, this ~3 us.
"""

from __future__ import annotations

from typing import Any, cast

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.extensions import keepalive


class Wire:
    """A pub/sub listener's connection, without redis-py's per-reply layers.

    redis-py connects it (URL, TLS, AUTH, handshake); then replies are read off its socket
    by a hiredis Reader and commands are written as hiredis packs them. Reads belong to the
    listener; writes may come from any greenlet, one at a time (the caller's lock).
    """

    def __init__(self, url: str, name: str | None = None) -> None:
        """`name`: the connection's CLIENT SETNAME, so that CLIENT LIST says whose it is."""
        pool = redis.ConnectionPool.from_url(
            url,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),
            client_name=name,
            **keepalive(url),
        )
        self.connection: Any = cast(Any, pool.make_connection())  # (its socket is used)
        self.connection.connect()
        self._sock: Any = self.connection._sock
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")

    def send(self, *commands: tuple[str, ...]) -> None:
        self._sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))  # type: ignore[arg-type]

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def replies(self) -> list[Any]:
        """Every reply one read brings (at least one); raises when the connection is lost."""
        reader = self._reader
        while (reply := reader.gets()) is False:
            data = self._sock.recv(65536)
            if not data:
                raise redis.ConnectionError("Redis closed the pub/sub connection")
            reader.feed(data)
        out = [reply]
        while (reply := reader.gets()) is not False:
            out.append(reply)
        return out

    def close(self) -> None:
        """Close the connection; never raises (it may be broken already)."""
        try:
            self.connection.disconnect()
        except Exception:
            pass
