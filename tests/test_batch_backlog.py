"""The batch worker's Backlog: chunks claim once the process's unstarted items run low."""

from __future__ import annotations

import threading
import time

from app.services.batch_runner import Backlog


def test_a_chunk_claims_at_once_while_few_items_wait_for_a_slot() -> None:
    ready = Backlog(ahead=150)
    started = time.monotonic()
    ready.wait_turn(100)  # nothing waits: at once
    ready.wait_turn(100)  # 100 wait, fewer than 150: at once
    assert time.monotonic() - started < 0.1
    assert ready.unstarted == 200


def test_a_chunk_waits_until_items_take_slots_then_claims() -> None:
    ready = Backlog(ahead=150)
    ready.wait_turn(100)
    ready.wait_turn(100)
    claimed: list[float] = []

    def chunk() -> None:
        ready.wait_turn(100)
        claimed.append(time.monotonic())

    waiters = [threading.Thread(target=chunk) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.2)
    assert claimed == []  # 200 items wait for a slot: no chunk claims more
    freed = time.monotonic()
    ready.started(51)  # 149 left: one chunk's turn, then the other waits again
    time.sleep(0.2)
    assert len(claimed) == 1 and claimed[0] - freed < 0.1
    ready.started(100)
    for waiter in waiters:
        waiter.join(5)
    assert len(claimed) == 2
    assert ready.unstarted == 249


def test_the_wait_is_bounded_and_counts_never_go_negative() -> None:
    ready = Backlog(ahead=1)
    ready.wait_turn(5)
    started = time.monotonic()
    ready.wait_turn(5, timeout=0.2)  # items that cannot get a slot do not hold claims for long
    assert 0.15 < time.monotonic() - started < 1.0
    ready.started(100)
    assert ready.unstarted == 0
