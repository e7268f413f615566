"""Chaos, batch channel: killed workers, failing result writes, a flooded queue.

Real processes, started separately so each can be killed alone: the session's web, a batch
worker of this module's own (short claim leases, a result-write fault hook) and beat, which
runs the sweeper itself every second. No test drives the sweeper by hand: recovery is what
the processes do on their own.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask
from sqlalchemy import func, select

from app.cli.processes import sweeper_argv, worker_argv
from app.extensions import db, redis_store
from app.models import Batch, Job
from app.policy import Route
from app.queueing import BATCH_QUEUE, send_task
from app.services import batch_lifecycle, batches, sweeper
from app.services.heartbeat import live_workers
from tests.fake_upstream import FakeUpstream
from tests.helpers import batch_results, submit_documents, tenant_of
from tests.stack import Stack

pytestmark = pytest.mark.chaos

NODE = "batch-chaos"  # every restart reuses it, as `-n batch@%h` does after a crash
MARKER = "CHAOSWRITE"
SWEEP_SECONDS = 1.0
LEASE_SECONDS = 3.0
# 5,000 documents take ~90 s on a loaded 2-core machine with SQLite (~60 items/s end to end);
# 2,000 keep the suite near its budget and still leave hundreds of claims to kill.
DOCUMENTS = 2000
ENV = {
    "SLUICE_BATCH_LEASE_SECONDS": str(LEASE_SECONDS),
    "SLUICE_SWEEP_INTERVAL_SECONDS": str(SWEEP_SECONDS),
    "SLUICE_BATCH_MAX_ATTEMPTS": "3",
    "SLUICE_BATCH_BACKOFF_BASE": "0.05",
    "SLUICE_BATCH_BACKOFF_MAX": "0.2",
    "SLUICE_BATCH_CHUNK_SIZE": "50",
    "SLUICE_BATCH_FAULT_WRITE_MARKER": MARKER,
}


class Chaos:
    """This module's batch worker and beat, each startable and killable alone."""

    def __init__(self, stack: Stack) -> None:
        self.procs = Stack(env={**stack.env, **ENV}, home=stack.home, port=stack.port)

    def start_worker(self, concurrency: int = 64) -> None:
        self.procs._spawn("worker", worker_argv("batch", concurrency, name=NODE))
        pid = self.procs.procs["worker"].pid
        deadline = time.monotonic() + 60
        while not any(
            w["hostname"].startswith(NODE) and w.get("pid") == pid
            for w in live_workers(redis_store.client, 3)
        ):
            assert time.monotonic() < deadline, "the batch worker never came up"
            time.sleep(0.1)

    def kill_worker(self, sig: int = signal.SIGKILL) -> None:
        self.procs.kill("worker", sig)

    def start_beat(self) -> None:
        schedule = str(self.procs.home / "chaos-beat-schedule")
        self.procs._spawn("beat", [*sweeper_argv("WARNING"), "-s", schedule])


@pytest.fixture(scope="module")
def chaos(stack: Stack, app: Flask) -> Iterator[Chaos]:
    """The session's batch worker swapped for this module's, plus beat (restored after)."""
    stack.kill("batch", signal.SIGTERM)
    own = Chaos(stack)
    with app.app_context():
        own.start_worker()
    own.start_beat()
    try:
        yield own
    finally:
        own.procs.stop()
        stack.start_worker("batch")
        stack.wait_ready()


def wait_terminal(client: httpx.Client, batch_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get(f"/v1/document-batches/{batch_id}").json()
        if status["status"] in ("completed", "failed", "cancelled", "expired"):
            return status
        time.sleep(0.25)
    raise AssertionError(f"batch {batch_id} not done in {timeout}s: {status}")


@pytest.mark.timeout(240)
def test_worker_sigkilled_a_third_through_restarts_under_its_own_name(
    chaos: Chaos, client: httpx.Client, app_ctx: Flask
) -> None:
    n = DOCUMENTS
    docs = [{"id": f"c{i}", "text": f"chaos document {i}"} for i in range(n)]
    response = submit_documents(client, docs)  # openai/echo: the instant fake upstream
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    deadline = time.monotonic() + 90
    while (done := client.get(f"/v1/document-batches/{batch_id}").json())["counts"][
        "succeeded"
    ] < n // 3:
        assert time.monotonic() < deadline, done
        time.sleep(0.05)
    chaos.kill_worker()
    killed = time.monotonic()
    counts = client.get(f"/v1/document-batches/{batch_id}").json()["counts"]
    assert counts["succeeded"] < n and counts["running"] > 0, counts  # killed mid-claims
    chaos.start_worker()  # the same node name, at once
    final = wait_terminal(client, batch_id, 120)
    recovered = time.monotonic() - killed
    assert final["status"] == "completed", final
    assert final["counts"]["succeeded"] == n, final
    lines = batch_results(client, batch_id)
    assert [line["document_id"] for line in lines] == [d["id"] for d in docs]  # once each
    assert all(line["output"] == d["text"] for line, d in zip(lines, docs, strict=True))
    db.session.remove()
    rows = db.session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id))
    assert rows == n
    reruns = db.session.scalar(
        select(func.count()).select_from(Job).where(Job.batch_id == batch_id, Job.attempts > 1)
    )
    assert reruns >= 1  # the killed claims really ran again
    prompt = sum(line["usage"]["prompt_tokens"] for line in lines)
    assert final["usage"]["prompt_tokens"] == prompt  # tokens counted once per result
    print(f"\n{n} documents, SIGKILL at {counts['succeeded']}: done {recovered:.1f}s later")


def test_failing_result_write_reruns_or_fails_its_items_and_the_batch_completes(
    chaos: Chaos, client: httpx.Client
) -> None:
    docs = [{"id": f"f{i}", "text": f"fault document {i}"} for i in range(300)]
    docs[40]["text"] = f"fails once {MARKER}1"
    docs[250]["text"] = f"never writes {MARKER}9"
    batch_id = submit_documents(client, docs).json()["id"]
    final = wait_terminal(client, batch_id, 60)
    assert final["status"] == "completed", final
    assert final["counts"]["succeeded"] == 299 and final["counts"]["failed"] == 1, final
    lines = {line["document_id"]: line for line in batch_results(client, batch_id)}
    assert lines["f40"]["status"] == "succeeded" and lines["f40"]["output"] == docs[40]["text"]
    assert lines["f250"]["status"] == "failed"
    assert "injected fault" in lines["f250"]["error"]["message"]


def test_sweeps_run_on_time_with_1000_chunk_tasks_queued(
    chaos: Chaos,
    upstream: FakeUpstream,
    app_ctx: Flask,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream.add_scenario("chaos-slow", delay_ms=4000, echo=True)  # the flood drains slowly
    items = [
        batches.BatchItem(
            f"s{i}", {"model": "openai/chaos-slow", "messages": [{"role": "user", "content": "s"}]}
        )
        for i in range(1000)
    ]
    with monkeypatch.context() as patch:  # the chunk tasks are the flood, sent below
        patch.setattr(batches, "enqueue_chunks", lambda *a: 0)
        batch = batches.create_batch(
            tenant_id=tenant_of(api_key),
            kind="documents",
            items=items,
            route=Route("batch", "chaos", "chaos"),
        )
    for i in range(1000):  # the flood: one chunk task per item
        send_task(batches.CHUNK_TASK, [batch.id, i, i], queue=BATCH_QUEUE)
    try:
        start = time.time()
        seen: list[float] = []
        backlog: list[int] = []
        while time.time() - start < 8 * SWEEP_SECONDS:
            stamp = sweeper.last_runs().get(sweeper.PASS, 0.0)
            if stamp > start and (not seen or stamp > seen[-1]):
                seen.append(stamp)
                backlog.append(redis_store.client.llen(BATCH_QUEUE))
            time.sleep(0.05)
        slow = upstream.requests("chaos-slow")
        assert min(backlog, default=0) > 500, (backlog, slow)  # the flood stood throughout
        assert len(seen) >= 4, seen
        gaps = [b - a for a, b in itertools.pairwise([start, *seen])]
        assert max(gaps) < 3 * SWEEP_SECONDS + 1, gaps
    finally:
        redis_store.client.delete(BATCH_QUEUE)
        batch_lifecycle.cancel_batch(db.session.get(Batch, batch.id))  # type: ignore[arg-type]
