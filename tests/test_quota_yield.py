"""A shared capacity, against a real Redis: batch's calls in flight drop to what streams
leave within about one call's length of their arrival, not a slot's whole turn later.

Threads stand in for a batch worker's greenlets; stream jobs are members of the provider's
stream lease set, as admission adds them.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
from flask import Flask

from app import leases
from app.extensions import redis_store
from app.services import capacity
from app.services.batch_semaphore import ProviderSemaphore

CAPACITY = 4
STREAMS = 2
CALL = 0.05  # seconds a batch call holds its slot
BOUND = 0.2  # a call, the 20 ms check, and room for a loaded box (a turn is 0.5 s)


def _until(check: object, timeout: float) -> float:
    """Seconds until check() holds, sampled every 5 ms (fails after timeout)."""
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture
def busy(app_ctx: Flask) -> Iterator[tuple[ProviderSemaphore, str]]:
    """A semaphore whose 12 threads call the provider back to back until the test ends."""
    provider = f"yield-{time.time_ns()}"
    quotas = {provider: capacity.Quota(CAPACITY)}
    sem = ProviderSemaphore(redis_store.client, 16, lease=5.0, quotas=quotas)
    stop = threading.Event()
    errors: list[BaseException] = []

    def calls() -> None:
        try:
            while not stop.is_set():
                with sem.slot(provider):
                    time.sleep(CALL)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=calls, daemon=True) for _ in range(12)]
    for thread in threads:
        thread.start()
    try:
        yield sem, provider
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not errors, errors
    assert sem.in_use(provider) == 0


def test_batch_drops_to_what_streams_leave_within_a_call(
    busy: tuple[ProviderSemaphore, str],
) -> None:
    sem, provider = busy
    client = redis_store.client
    key = capacity.stream_key(provider)
    _until(lambda: sem.in_use(provider) == CAPACITY, timeout=10)  # batch alone: all of it
    downs = []
    for round_ in range(6):
        time.sleep(random.uniform(0.05, 0.5))  # anywhere in the slots' turn
        jobs = [f"job-{round_}-{i}" for i in range(STREAMS)]
        for job in jobs:
            assert leases.acquire(client, [key], job, 5_000)[0] == 0
        downs.append(_until(lambda: sem.in_use(provider) <= CAPACITY - STREAMS, timeout=5))
        leases.release(client, key, *jobs)
        _until(lambda: sem.in_use(provider) == CAPACITY, timeout=2)  # and resumes after
    assert max(downs) < BOUND, downs
