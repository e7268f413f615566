"""Stream admission: Redis-lease slots under real concurrency, each overflow mode, expiry."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask

from app import admission
from app.errors import APIError
from app.extensions import redis_store
from app.models import new_id
from app.policy import Route


@pytest.fixture
def slots(app_ctx: Flask, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """A private global scope (so the live stack's streams don't count) and small limits."""
    monkeypatch.setattr(admission, "GLOBAL_KEY", f"sluice:slots:test:{secrets.token_hex(4)}")
    for name, value in {
        "STREAM_MAX_CONCURRENT": 4,
        "STREAM_MAX_PER_TENANT": 0,
        "STREAM_SLOT_QUEUED_SECONDS": 30.0,
        "STREAM_LEASE_SECONDS": 30.0,
    }.items():
        monkeypatch.setitem(app_ctx.config, name, value)
    yield app_ctx
    redis_store.client.delete(admission.GLOBAL_KEY)


def stream_route(**kw: Any) -> Route:
    return Route("stream", "test", "test", **kw)


def tenant() -> str:
    return new_id("ten_")


def race(app: Flask, n: int, fn: Any) -> list[Any]:
    """Run fn(i) on n real threads at once, each in an app context; exceptions are results."""

    def run(i: int) -> Any:
        with app.app_context():
            try:
                return fn(i)
            except APIError as exc:
                return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_more_streams_than_slots_reject_overflow(slots: Flask) -> None:
    t = tenant()
    jobs = [new_id("job_") for _ in range(20)]
    results = race(slots, 20, lambda i: admission.acquire_stream_slot(stream_route(), t, jobs[i]))
    held = [jobs[i] for i, r in enumerate(results) if r == "stream"]
    rejected = [r for r in results if isinstance(r, APIError)]
    assert len(held) == 4 and len(rejected) == 16
    assert all(r.status == 429 and r.headers["Retry-After"] == "1" for r in rejected)
    assert "All 4 stream slots are busy" in rejected[0].message
    assert admission.usage(t) == {"global": 4, "tenant": 4}
    # finishing gives the slot back; release is idempotent
    admission.release_stream_slot(held[0])
    admission.release_stream_slot(held[0])
    assert admission.usage(t)["global"] == 3
    assert admission.acquire_stream_slot(stream_route(), t, new_id("job_")) == "stream"
    for job in held[1:]:
        admission.release_stream_slot(job)


def test_per_tenant_limit_and_policy_override(slots: Flask) -> None:
    slots.config["STREAM_MAX_PER_TENANT"] = 2
    a, b = tenant(), tenant()
    got = race(slots, 6, lambda i: admission.acquire_stream_slot(stream_route(), a, new_id("job_")))
    assert got.count("stream") == 2
    err = next(r for r in got if isinstance(r, APIError))
    assert "This tenant already has 2 concurrent streams" in err.message
    assert err.body()["error"]["scope"] == "tenant"
    # another tenant still gets the remaining global slots
    assert admission.acquire_stream_slot(stream_route(), b, new_id("job_")) == "stream"
    # a per-tenant override from the policy (carried on the route) raises the limit
    assert admission.acquire_stream_slot(stream_route(tenant_max_streams=3), a, "j3") == "stream"
    with pytest.raises(APIError):
        admission.acquire_stream_slot(stream_route(tenant_max_streams=3), a, "j4")


def test_queue_overflow_waits_for_a_release(slots: Flask) -> None:
    t = tenant()
    holders = [new_id("job_") for _ in range(4)]
    for job in holders:
        assert admission.acquire_stream_slot(stream_route(), t, job) == "stream"
    route = stream_route(overflow="queue", queue_timeout=1.5)

    def waiter(i: int) -> Any:
        if i < 2:  # two threads release after a moment; the other three queue for slots
            time.sleep(0.3)
            admission.release_stream_slot(holders[i])
            return "released"
        start = time.monotonic()
        got = admission.acquire_stream_slot(route, t, f"waiter-{t}-{i}")
        return got, time.monotonic() - start

    results = race(slots, 5, waiter)
    waited = [r for r in results[2:] if isinstance(r, tuple)]
    timed_out = [r for r in results[2:] if isinstance(r, APIError)]
    assert len(waited) == 2 and len(timed_out) == 1  # two slots freed, three waiters
    assert all(got == "stream" and 0.2 < secs < 1.5 for got, secs in waited)
    assert timed_out[0].status == 429 and "waited 1." in timed_out[0].message


def test_queue_overflow_times_out(slots: Flask) -> None:
    slots.config["STREAM_MAX_CONCURRENT"] = 1
    t = tenant()
    assert admission.acquire_stream_slot(stream_route(), t, "holder") == "stream"
    start = time.monotonic()
    with pytest.raises(APIError) as err:
        admission.acquire_stream_slot(stream_route(overflow="queue", queue_timeout=0.5), t, "w")
    assert 0.45 < time.monotonic() - start < 3
    assert err.value.status == 429 and err.value.headers["Retry-After"]


def test_batch_overflow_and_non_stream_routes(slots: Flask) -> None:
    slots.config["STREAM_MAX_CONCURRENT"] = 1
    t = tenant()
    assert admission.acquire_stream_slot(stream_route(), t, "a") == "stream"
    spill = stream_route(overflow="batch", prefer_async=True)
    assert admission.acquire_stream_slot(spill, t, "b") == "batch"
    assert admission.usage()["global"] == 1  # the overflowed job holds no slot
    assert admission.acquire_stream_slot(Route("batch", "r", "x"), t, "c") == "batch"
    routed = admission.overflow_route(spill)
    assert routed.mode == "batch" and "no stream slot free" in routed.reason


def test_lease_expires_when_the_holder_dies(slots: Flask) -> None:
    """A holder that never renews (a killed worker) stops counting after its lease."""
    slots.config["STREAM_MAX_CONCURRENT"] = 2
    slots.config["STREAM_SLOT_QUEUED_SECONDS"] = 0.4
    slots.config["STREAM_LEASE_SECONDS"] = 0.4
    t = tenant()
    assert admission.acquire_stream_slot(stream_route(), t, "dead") == "stream"
    assert admission.acquire_stream_slot(stream_route(), t, "alive") == "stream"
    with pytest.raises(APIError):
        admission.acquire_stream_slot(stream_route(), t, "new")
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # "alive" renews, "dead" does not
        admission.renew_stream_slot("alive")
        time.sleep(0.1)
    assert admission.usage(t) == {"global": 1, "tenant": 1}
    assert admission.acquire_stream_slot(stream_route(), t, "new") == "stream"
    # a renew after release never resurrects the slot
    admission.release_stream_slot("alive")
    admission.renew_stream_slot("alive")
    assert admission.usage(t) == {"global": 1, "tenant": 1}


def test_acquire_is_idempotent_per_job(slots: Flask) -> None:
    slots.config["STREAM_MAX_CONCURRENT"] = 1
    t = tenant()
    assert admission.acquire_stream_slot(stream_route(), t, "same") == "stream"
    assert admission.acquire_stream_slot(stream_route(), t, "same") == "stream"
    assert admission.usage(t)["global"] == 1
