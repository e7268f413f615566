"""The sweeper runs on time behind any queue backlog, and records each step's last success."""

from __future__ import annotations

import base64
import itertools
import json
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from flask import Flask
from sqlalchemy import update

from app.cli.processes import sweeper_argv
from app.extensions import db, redis_store
from app.models import Batch, utcnow
from app.queueing import BATCH_QUEUE, send_task
from app.services import batch_sweep, sweeper
from app.services.batches import CHUNK_TASK
from tests.helpers import insert_batch, tenant_of, wait_batch
from tests.stack import Stack

INTERVAL = 0.5


@pytest.fixture
def no_batch_worker(stack: Stack, app: Flask) -> Iterator[Stack]:
    """No batch worker consumes while the test runs (the session's comes back after)."""
    stack.kill("batch", signal.SIGTERM)
    try:
        yield stack
    finally:
        with app.app_context():
            redis_store.client.delete(BATCH_QUEUE)  # the flood, never to be run
        stack.start_worker("batch")
        stack.wait_ready()


def test_sweeps_run_on_time_behind_a_flooded_batch_queue(
    no_batch_worker: Stack, app_ctx: Flask, api_key: str
) -> None:
    for i in range(1000):
        send_task(CHUNK_TASK, [f"batch_flood{i}", 0, 9], queue=BATCH_QUEUE)
    assert redis_store.client.llen(BATCH_QUEUE) >= 1000
    batch_id = insert_batch(tenant_of(api_key), ["queued"] * 3).id
    db.session.execute(
        update(Batch).where(Batch.id == batch_id).values(expires_at=utcnow() - timedelta(1))
    )
    db.session.commit()
    env = {**no_batch_worker.env, "SLUICE_SWEEP_INTERVAL_SECONDS": str(INTERVAL)}
    beat = Stack(env=env, home=no_batch_worker.home, port=no_batch_worker.port)
    before = sweeper.last_runs().get(sweeper.PASS, 0.0)
    beat._spawn("beat", [*sweeper_argv("WARNING"), "-s", str(beat.home / "beat-schedule-test")])
    try:
        seen: list[float] = []
        deadline = time.monotonic() + 30
        while len(seen) < 5 and time.monotonic() < deadline:
            stamp = sweeper.last_runs().get(sweeper.PASS, 0.0)
            if stamp > before and (not seen or stamp > seen[-1]):
                seen.append(stamp)
            time.sleep(0.05)
    finally:
        beat.stop()
    assert len(seen) == 5, f"sweeps recorded: {seen}"
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(gaps) < INTERVAL * 6, gaps  # on time, not behind 1,000 queued chunk tasks
    runs = sweeper.last_runs()
    assert all(runs[name] >= seen[0] for name, _ in sweeper.steps())  # every step succeeded
    assert redis_store.client.llen(BATCH_QUEUE) >= 1000  # nothing went through the queue
    assert sweeper.state() == "ok"
    assert httpx.get(no_batch_worker.url + "/readyz").json()["sweeper"] == "ok"
    db.session.remove()
    batch = db.session.get(Batch, batch_id)
    assert batch is not None and batch.status == "expired"  # the sweep really did its work


def queued_chunks(batch_id: str) -> list[list[Any]]:
    """The args of this batch's chunk tasks waiting in the batch queue."""
    found = []
    for raw in redis_store.client.lrange(BATCH_QUEUE, 0, -1):
        args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        if args and args[0] == batch_id:
            found.append(args)
    return found


def test_a_lost_chunk_is_resent_behind_another_tenants_backlog(
    stack: Stack, app_ctx: Flask, api_key: str, client: httpx.Client
) -> None:
    """A batch whose chunk send was lost (a broker error after its commit, a killed worker's
    prefetch) while the queue holds other work: the sweep re-sends it all the same."""
    stack.kill("batch", signal.SIGTERM)  # the queue keeps what is sent meanwhile
    try:
        send_task(CHUNK_TASK, ["batch_backlog", 0, 9], queue=BATCH_QUEUE)  # someone's backlog
        lost = insert_batch(tenant_of(api_key), ["queued"] * 3).id
        waiting = insert_batch(tenant_of(api_key), ["queued"] * 2).id  # its send just went
        long_ago = utcnow() - timedelta(minutes=2)
        db.session.execute(update(Batch).where(Batch.id == lost).values(created_at=long_ago))
        db.session.commit()
        batch_sweep.resend_orphaned_chunks()
        assert queued_chunks(lost) == [[lost, 0, 2]]
        assert queued_chunks(waiting) == []  # not standing still for STRANDED_AFTER yet
        batch_sweep.resend_orphaned_chunks()
        assert queued_chunks(lost) == [[lost, 0, 2]]  # once per period, not every pass
    finally:
        stack.start_worker("batch")
        stack.wait_ready()
    done = wait_batch(client, lost)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 3, done


def test_a_deadlock_victim_is_run_again_and_other_errors_are_not(app: Flask) -> None:
    """PostgreSQL's deadlock victim (SQLSTATE 40P01) repeats; any other error propagates."""
    from sqlalchemy.exc import OperationalError

    from app.services.batches import in_transaction

    class Refused(Exception):
        def __init__(self, sqlstate: str) -> None:
            self.sqlstate = sqlstate

    calls: list[str] = []

    def work(sqlstate: str) -> Callable[[Any], str]:
        def run(conn: Any) -> str:
            calls.append(sqlstate)
            if len(calls) == 1:
                raise OperationalError("UPDATE jobs", None, Refused(sqlstate))
            return "done"

        return run

    with app.app_context():
        assert in_transaction(work("40P01")) == "done" and calls == ["40P01", "40P01"]
        calls.clear()
        with pytest.raises(OperationalError):
            in_transaction(work("08006"))  # a lost connection is not a deadlock
        assert calls == ["08006"]
