"""gevent_compat: redis-py's zero-timeout readiness probe never parks the caller on the hub."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.select
import pytest
import redis._parsers.hiredis as hiredis_parser

from app.providers import gevent_compat


@pytest.fixture
def cooperative_poll(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The parser's `select` as gevent's monkey-patching leaves it (gevent's poll)."""
    patched = SimpleNamespace(poll=gevent.select.poll, POLLIN=select.POLLIN)
    monkeypatch.setattr(hiredis_parser, "select", patched)
    probe = hiredis_parser._socket_can_read
    monkeypatch.setattr(hiredis_parser, "_socket_can_read", getattr(probe, "__wrapped__", probe))
    yield


def _yields(check: Any) -> bool:
    """Whether `check()` let another greenlet run (it went through the hub)."""
    ran: list[bool] = []
    other = gevent.spawn(ran.append, True)
    check()
    yielded = bool(ran)
    other.join()
    return yielded


@pytest.mark.unit
def test_the_zero_timeout_probe_answers_without_yielding(cooperative_poll: None) -> None:
    left, right = socket.socketpair()
    try:
        assert _yields(lambda: hiredis_parser._socket_can_read(left, 0))  # as it was
        gevent_compat._patch_redis(gevent_compat._make_probe(select.poll))
        probe = hiredis_parser._socket_can_read
        assert not _yields(lambda: probe(left, 0))
        assert probe(left, 0) is False
        right.sendall(b"+OK\r\n")
        assert probe(left, 0) is True
        # idempotent: not wrapped twice
        gevent_compat._patch_redis(gevent_compat._make_probe(select.poll))
        assert hiredis_parser._socket_can_read is probe
    finally:
        left.close()
        right.close()


@pytest.mark.unit
def test_a_probe_with_a_timeout_still_waits_cooperatively(cooperative_poll: None) -> None:
    gevent_compat._patch_redis(gevent_compat._make_probe(select.poll))
    left, right = socket.socketpair()
    try:
        assert _yields(lambda: hiredis_parser._socket_can_read(left, 0.01))
        assert hiredis_parser._socket_can_read(left, 0.01) is False
    finally:
        left.close()
        right.close()
