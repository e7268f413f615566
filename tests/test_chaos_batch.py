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
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from sqlalchemy import func, select

from app import embedded_redis
from app.cli.processes import sweeper_argv, worker_argv
from app.extensions import db, redis_store
from app.models import Batch, Job
from app.policy import Route
from app.queueing import BATCH_QUEUE, send_task
from app.services import batch_lifecycle, batches, sweeper
from app.services.heartbeat import live_workers
from tests.fake_upstream import FakeUpstream
from tests.helpers import batch_results, submit_documents, tenant_of
from tests.stack import Stack, TcpProxy

pytestmark = pytest.mark.chaos

NODE = "batch-chaos"  # every restart reuses it, as `-n batch@%h` does after a crash
MARKER = "CHAOSWRITE"
SWEEP_SECONDS = 1.0
LEASE_SECONDS = 3.0
# 5,000 documents take ~90 s on a loaded 2-core machine with SQLite (~60 items/s end to end);
# 1,500 keep the suite near its budget and still leave hundreds of claims to kill.
DOCUMENTS = 1500
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

    def start_worker(self, concurrency: int = 64, **env: str) -> None:
        procs = self.procs if not env else Stack({**self.procs.env, **env}, self.procs.home)
        procs._spawn("worker", worker_argv("batch", concurrency, name=NODE))
        self.procs.procs["worker"] = procs.procs["worker"]
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


@pytest.fixture(autouse=True)
def worker_up(chaos: Chaos, app: Flask) -> None:
    """Each test starts with the module's worker running (one that failed may have left
    it killed, which would fail every later test of the module too)."""
    if "worker" not in chaos.procs.procs:
        with app.app_context():
            chaos.start_worker()


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
    while True:  # a third through, with claims in flight (between chunks none may be)
        counts = client.get(f"/v1/document-batches/{batch_id}").json()["counts"]
        if counts["succeeded"] >= n // 3 and counts["running"] > 0:
            break
        assert time.monotonic() < deadline, counts
        time.sleep(0.02)
    chaos.kill_worker()
    killed = time.monotonic()
    assert counts["succeeded"] < n, counts  # killed mid-claims
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


@pytest.mark.timeout(180)
def test_postgresql_cut_for_10s_mid_batch_then_every_document_once(
    chaos: Chaos, client: httpx.Client, upstream: FakeUpstream, test_env: dict[str, str]
) -> None:
    if not test_env["DATABASE_URL"].startswith("postgres"):
        pytest.skip("the database cut runs on PostgreSQL (SQLite is a local file)")
    upstream.add_scenario("chaos-pg", delay_ms=100, echo=True)
    proxy = TcpProxy(test_env["DATABASE_URL"])
    chaos.kill_worker(signal.SIGTERM)
    # the worker reaches the database only through the proxy; web and beat directly
    chaos.start_worker(DATABASE_URL=proxy.url, SLUICE_PROVIDER_CONCURRENCY="16")
    try:
        n = 1000
        docs = [{"id": f"p{i}", "text": f"pg cut {i}"} for i in range(n)]
        batch_id = submit_documents(client, docs, model="openai/chaos-pg").json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/document-batches/{batch_id}").json()["counts"]["succeeded"] < 300:
            assert time.monotonic() < deadline, "the batch never got going"
            time.sleep(0.05)
        proxy.cut()
        time.sleep(10)
        cut = client.get(f"/v1/document-batches/{batch_id}").json()["counts"]
        assert cut["succeeded"] < n, cut  # the cut landed mid-batch
        proxy.restore()
        final = wait_terminal(client, batch_id, 120)
    finally:
        chaos.kill_worker(signal.SIGKILL)
        proxy.cut()
        chaos.start_worker()
    assert final["status"] == "completed" and final["counts"]["succeeded"] == n, final
    lines = batch_results(client, batch_id)
    assert [line["document_id"] for line in lines] == [d["id"] for d in docs]
    assert all(line["output"] == d["text"] for line, d in zip(lines, docs, strict=True))
    assert final["usage"]["prompt_tokens"] == sum(li["usage"]["prompt_tokens"] for li in lines)


@pytest.mark.timeout(240)
def test_redis_restarted_mid_batch_with_aof_then_every_document_once(
    chaos: Chaos, upstream: FakeUpstream, api_key: str, tmp_path: Path
) -> None:
    """A Redis of this test's own (broker, leases, stop flags) restarted under a batch."""
    upstream.add_scenario("chaos-redis", delay_ms=50, echo=True)
    chaos.procs.kill("beat", signal.SIGTERM)  # one sweeper per database: this test's own
    chaos.kill_worker(signal.SIGTERM)
    url, redis_proc = embedded_redis.start(tmp_path / "redis")
    port = embedded_redis.port_of(url)
    own = Stack(env={**chaos.procs.env, "REDIS_URL": url}, home=tmp_path)
    own.start_web()
    own._spawn("worker", worker_argv("batch", 64, name=NODE))
    own._spawn("beat", [*sweeper_argv("WARNING"), "-s", str(tmp_path / "beat-schedule")])
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=own.url, headers=headers, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the web never came up"
                time.sleep(0.2)
            n = 600
            docs = [{"id": f"r{i}", "text": f"redis restart {i}"} for i in range(n)]
            response = submit_documents(client, docs, model="openai/chaos-redis")
            assert response.status_code == 202, response.text
            batch_id = response.json()["id"]
            deadline = time.monotonic() + 90
            while (
                client.get(f"/v1/document-batches/{batch_id}").json()["counts"]["succeeded"]
                < n // 3
            ):
                assert time.monotonic() < deadline, "the batch never got going"
                time.sleep(0.1)
            redis_proc.terminate()  # AOF on: queued tasks survive the restart
            redis_proc.wait(10)
            time.sleep(5)
            _, redis_proc = embedded_redis.start(tmp_path / "redis", port)
            final = wait_terminal(client, batch_id, 150)
            assert final["status"] == "completed", final
            assert final["counts"]["succeeded"] == n, final
            lines = batch_results(client, batch_id)
    finally:
        own.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
        chaos.start_worker()
        chaos.start_beat()
    assert [line["document_id"] for line in lines] == [d["id"] for d in docs]
    assert all(line["output"] == d["text"] for line, d in zip(lines, docs, strict=True))
    assert final["usage"]["prompt_tokens"] == sum(li["usage"]["prompt_tokens"] for li in lines)
