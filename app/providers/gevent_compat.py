"""Keep connection pools from yielding to the gevent hub when they probe idle connections.

Before reusing a pooled keep-alive connection, httpcore checks that the socket has nothing
to read with a zero-timeout `select.poll()`. Under gevent's monkey-patching that poll is
gevent's, which parks the calling greenlet on the hub even with a zero timeout: every
request yields once per idle connection in the pool before it is sent. With hundreds of
greenlets and connections that made calls wait on each other (batch throughput fell to a
sixth) and let other work run between building a request and sending it. A zero-timeout
poll never blocks, so the original, unpatched `select.poll` is used instead.

redis-py's pool makes the same probe (hiredis parser's `can_read`) on every command it
hands a connection out for: one extra trip through the hub per Redis command, about 40 us
of CPU. Its zero-timeout probes take the unpatched poll too; a probe with a timeout (a
pub/sub `get_message(timeout=...)`) still waits cooperatively.
"""

from __future__ import annotations

import importlib
import select
import socket
import sys
from collections.abc import Callable
from typing import Any

_done = False


def _native_poll() -> Any:
    """The unpatched select.poll (gevent's replacement when monkey-patching is active)."""
    if "gevent" in sys.modules:
        try:
            from gevent import monkey

            return monkey.get_original("select", "poll")
        except Exception:  # pragma: no cover - gevent without get_original
            pass
    return getattr(select, "poll", None)


def _make_probe(poll: Any) -> Any:
    readable = select.POLLIN

    def is_socket_readable(sock: socket.socket | None) -> bool:
        """Whether a pooled socket has data (or EOF) waiting; never blocks, never yields."""
        fd = None if sock is None else sock.fileno()
        if fd is None or fd < 0:
            return True
        probe = poll()
        probe.register(fd, readable)
        return bool(probe.poll(0))

    return is_socket_readable


def readable_probe() -> Callable[[socket.socket | None], bool]:
    """`is_socket_readable(sock)` over the unpatched poll, for a pool probing its idle sockets."""
    poll = _native_poll()
    if poll is None:  # pragma: no cover - platforms without poll
        return lambda sock: sock is None
    probe: Callable[[socket.socket | None], bool] = _make_probe(poll)
    return probe


def install() -> None:
    """Patch httpcore2 / httpcore's sync backends (idempotent; a no-op if they are absent)."""
    global _done
    if _done:
        return
    _done = True
    poll = _native_poll()
    if poll is None:  # pragma: no cover - platforms without poll keep the library's probe
        return
    probe = _make_probe(poll)
    for name in ("httpcore2._backends.sync", "httpcore._backends.sync"):
        try:
            module: Any = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "is_socket_readable"):
            module.is_socket_readable = probe
    _patch_redis(probe)


def _patch_redis(probe: Callable[[socket.socket | None], bool]) -> None:
    """redis-py's hiredis parser: zero-timeout readiness checks over the unpatched poll."""
    try:
        module: Any = importlib.import_module("redis._parsers.hiredis")
    except ImportError:  # pragma: no cover - redis-py without the hiredis parser
        return
    cooperative = getattr(module, "_socket_can_read", None)
    if cooperative is None or hasattr(cooperative, "__wrapped__"):
        return  # not this redis-py's layout, or patched already

    def socket_can_read(sock: Any, timeout: float | None) -> bool:
        """Whether `sock` has data (or EOF); a zero timeout never yields to the hub."""
        if timeout != 0:
            return bool(cooperative(sock, timeout))
        if hasattr(sock, "pending") and sock.pending():  # decrypted TLS bytes
            return True
        return probe(sock)

    socket_can_read.__wrapped__ = cooperative  # type: ignore[attr-defined]
    module._socket_can_read = socket_can_read
