"""The provider semaphore against a real Redis: the cap holds, slots are shared in bulk.

Threads stand in for a worker's greenlets; two ProviderSemaphore objects on one Redis
stand in for two worker processes.
"""

from __future__ import annotations

import threading
import time

import pytest
from flask import Flask

from app.extensions import redis_store
from app.services.batch_semaphore import ProviderSemaphore


def _hammer(
    sems: list[ProviderSemaphore], provider: str, calls: int, threads: int, hold: float
) -> tuple[int, list[int]]:
    """`calls` slot holds per semaphore from `threads` threads each; (peak, calls per sem)."""
    lock = threading.Lock()
    inside = [0]
    peak = [0]
    done = [0] * len(sems)
    errors: list[BaseException] = []

    left = [calls] * len(sems)  # each semaphore's threads share its calls

    def run(i: int, sem: ProviderSemaphore) -> None:
        try:
            while True:
                with lock:
                    if not left[i]:
                        return
                    left[i] -= 1
                with sem.slot(provider):
                    with lock:
                        inside[0] += 1
                        peak[0] = max(peak[0], inside[0])
                    time.sleep(hold)
                    with lock:
                        inside[0] -= 1
                        done[i] += 1
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    workers = [
        threading.Thread(target=run, args=(i, sem))
        for i, sem in enumerate(sems)
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors, errors
    return peak[0], done


def test_the_cap_holds_and_slots_pass_between_calls_without_redis(app_ctx: Flask) -> None:
    sem = ProviderSemaphore(redis_store.client, 4, lease=5.0)
    provider = f"sem-{time.time_ns()}"
    peak, done = _hammer([sem], provider, calls=400, threads=20, hold=0.002)
    assert done == [400]
    assert 1 <= peak <= 4
    # Slots pass from call to call: a few asks and give-backs, not two per call (800).
    assert sem.round_trips < 80
    assert sem.in_use(provider) == 0  # every slot given back


def test_two_processes_share_the_cap_and_both_progress(app_ctx: Flask) -> None:
    first = ProviderSemaphore(redis_store.client, 3, lease=5.0)
    second = ProviderSemaphore(redis_store.client, 3, lease=5.0)
    provider = f"sem-{time.time_ns()}"
    peak, done = _hammer([first, second], provider, calls=240, threads=12, hold=0.003)
    assert done == [240, 240]
    assert 1 <= peak <= 3
    assert first.in_use(provider) == 0


@pytest.mark.parametrize("held", [1, 3])
def test_a_waiter_gets_a_slot_freed_by_another_process(app_ctx: Flask, held: int) -> None:
    """Slots held elsewhere: the local waiters wait, then run once those come back."""
    other = ProviderSemaphore(redis_store.client, held, lease=5.0)
    sem = ProviderSemaphore(redis_store.client, held, lease=5.0)
    provider = f"sem-{time.time_ns()}"
    tokens = [other.try_acquire(provider) for _ in range(held)]
    assert all(tokens) and other.try_acquire(provider) is None
    finished: list[float] = []

    def call() -> None:
        with sem.slot(provider):
            finished.append(time.monotonic())

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    assert finished == []  # every slot is the other process's
    released = time.monotonic()
    other.release(*[t for t in tokens if t])
    for thread in threads:
        thread.join(10)
    assert len(finished) == 5
    assert max(finished) - released < 2.0
    assert sem.in_use(provider) == 0


def test_a_process_holding_every_slot_leaves_another_its_share(app_ctx: Flask) -> None:
    """One process's calls hold every slot, back to back; a second process that asks gets
    its share within a few calls, not once the first one's slots end their TURN (5 s)."""
    first = ProviderSemaphore(redis_store.client, 4, lease=5.0)
    second = ProviderSemaphore(redis_store.client, 4, lease=5.0)
    provider = f"sem-{time.time_ns()}"
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            with first.slot(provider):
                time.sleep(0.01)

    busy_threads = [threading.Thread(target=busy) for _ in range(8)]
    for thread in busy_threads:
        thread.start()
    got: list[float] = []

    def call() -> None:
        with second.slot(provider):
            got.append(time.monotonic())
            time.sleep(0.1)

    try:
        time.sleep(0.3)  # the first process holds every slot
        asked = time.monotonic()
        calls = [threading.Thread(target=call) for _ in range(4)]
        for thread in calls:
            thread.start()
        for thread in calls:
            thread.join(10)
    finally:
        stop.set()
        for thread in busy_threads:
            thread.join(10)
    assert len(got) == 4
    assert max(got) - asked < 2.0, [round(t - asked, 2) for t in got]
    assert first.in_use(provider) == 0


def test_a_process_whose_waiters_are_served_leaves_every_slot_to_the_others(
    app_ctx: Flask,
) -> None:
    """A process that said its waiters go short takes it back once nobody of it waits (its
    slot goes back to Redis unwanted), so another process may use every slot at once, not
    only its share until the mark lapses (ASKER_TTL): the end of a run, one process done."""
    from app.services import batch_semaphore

    done = ProviderSemaphore(redis_store.client, 4, lease=5.0)
    left = ProviderSemaphore(redis_store.client, 4, lease=5.0)
    provider = f"sem-{time.time_ns()}"
    tokens = [left.try_acquire(provider) for _ in range(4)]
    assert all(tokens)

    def call() -> None:
        with done.slot(provider):
            time.sleep(0.01)

    waiter = threading.Thread(target=call)
    waiter.start()
    deadline = time.monotonic() + 2
    while left._share(provider) == 4 and time.monotonic() < deadline:
        time.sleep(batch_semaphore.SHARE_SECONDS / 4)
    assert left._share(provider) == 2  # `done` goes short: `left` keeps half
    left.release(*[t for t in tokens if t])
    waiter.join(10)
    assert not waiter.is_alive()
    time.sleep(batch_semaphore.SHARE_SECONDS * 1.5)
    assert left._share(provider) == 4  # at once, not after ASKER_TTL
    assert batch_semaphore.ASKER_TTL > 0.2
    assert done.in_use(provider) == 0
