"""Batch items never stranded: claim leases, failed runs, expiry of running items, stranded jobs.

These tests swap the session's batch worker for one of their own with short leases and a
fault hook (restored afterwards), and drive the sweeper's steps themselves.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.event
import httpx
import kombu.exceptions
import pytest
from flask import Flask
from sqlalchemy import func, select, update

from app import telemetry
from app.cli.processes import worker_argv
from app.extensions import db, redis_store
from app.models import Batch, File, Job, utcnow
from app.providers import Completion, Usage
from app.services import (
    batch_claims,
    batch_lifecycle,
    batch_runner,
    batch_sweep,
    batch_writes,
    batches,
    files,
    sweeper,
)
from app.services.heartbeat import live_workers
from tests.fake_upstream import FakeUpstream
from tests.helpers import (
    app_client,
    batch_results,
    insert_batch,
    insert_job,
    submit_documents,
    tenant_of,
    tuned_batch_worker,
    wait_row,
)
from tests.stack import Stack

MARKER = "FAULTWRITE"
CHAT_RECORD = {"messages": [{"role": "user", "content": "hi"}]}
TUNED = {
    "SLUICE_BATCH_LEASE_SECONDS": "5",
    "SLUICE_BATCH_MAX_ATTEMPTS": "3",
    "SLUICE_BATCH_BACKOFF_BASE": "0.05",
    "SLUICE_BATCH_BACKOFF_MAX": "0.2",
    "SLUICE_BATCH_FAULT_WRITE_MARKER": MARKER,
}


@pytest.fixture(scope="module")
def workers(stack: Stack) -> Iterator[Stack]:
    """The session's batch worker swapped for a tuned one (restored afterwards)."""
    with tuned_batch_worker(stack, TUNED, "batch-recovery") as own:
        yield own


def sweep_until_done(client: httpx.Client, batch_id: str, timeout: float = 60) -> dict[str, Any]:
    """Run the sweeper's pass (as beat does) until the batch is terminal."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        sweeper.sweep()
        status = client.get(f"/v1/document-batches/{batch_id}").json()
        if status["status"] in ("completed", "failed", "cancelled", "expired"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} not done: {status}")


def attempts(batch_id: str) -> dict[str, int]:
    db.session.remove()
    rows = db.session.execute(
        select(Job.item_id, Job.item_index, Job.attempts).where(Job.batch_id == batch_id)
    )
    return {item_id or str(index): n for item_id, index, n in rows}


def test_worker_restarted_under_the_same_node_name_strands_nothing(
    workers: Stack, client: httpx.Client, upstream: FakeUpstream, app_ctx: Flask
) -> None:
    upstream.add_scenario("same-name", delay_ms=300, echo=True)
    node = "batch-samename"
    workers.kill("batch-recovery", signal.SIGTERM)  # the victim is the only batch worker
    try:  # the module's worker comes back whatever fails: the later tests need it
        workers._spawn("victim", worker_argv("batch", 20, name=node))
        n = 120
        docs = [{"id": f"s{i}", "text": f"same name {i}"} for i in range(n)]
        batch_id = submit_documents(client, docs, model="openai/same-name").json()["id"]
        deadline = time.monotonic() + 30
        while True:  # some done, some in flight: SIGKILL mid-batch
            counts = client.get(f"/v1/document-batches/{batch_id}").json()["counts"]
            if counts["succeeded"] >= 20 and counts["running"] > 0:
                break
            assert time.monotonic() < deadline, f"the victim never got going: {counts}"
            time.sleep(0.05)
        workers.kill("victim")  # then the same node name comes back at once
        assert client.get(f"/v1/document-batches/{batch_id}").json()["counts"]["running"] > 0
        workers._spawn("victim", worker_argv("batch", 20, name=node))
        new_pid = workers.procs["victim"].pid
        deadline = time.monotonic() + 30
        while not any(  # the same name beats again: a hostname check cannot tell the two apart
            w["hostname"].startswith(node) and w.get("pid") == new_pid
            for w in live_workers(redis_store.client, 2)
        ):
            assert time.monotonic() < deadline, "the restarted worker never came up"
            time.sleep(0.1)
        done = sweep_until_done(client, batch_id)
    finally:
        if "victim" in workers.procs:
            workers.kill("victim")
        workers.start_worker("batch", "batch-recovery", concurrency=20)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == n, done
    lines = batch_results(client, batch_id)
    assert [line["document_id"] for line in lines] == [d["id"] for d in docs]
    assert all(line["output"] == d["text"] for line, d in zip(lines, docs, strict=True))
    assert max(attempts(batch_id).values()) >= 2  # the killed claims really ran again


def test_failed_result_write_reruns_its_items_or_fails_them_with_the_error(
    workers: Stack, client: httpx.Client, app_ctx: Flask
) -> None:
    docs = [{"id": f"w{i}", "text": f"plain {i}"} for i in range(30)]
    docs[3]["text"] = f"fails once {MARKER}1"  # the write fails on attempt 1, then works
    docs[17]["text"] = f"always fails {MARKER}9"  # fails on every attempt (max 3)
    batch_id = submit_documents(client, docs).json()["id"]
    done = sweep_until_done(client, batch_id)
    assert done["status"] == "completed", done
    assert done["counts"]["succeeded"] == 29 and done["counts"]["failed"] == 1
    lines = {line["document_id"]: line for line in batch_results(client, batch_id)}
    assert lines["w3"]["status"] == "succeeded" and lines["w3"]["output"] == docs[3]["text"]
    failed = lines["w17"]
    assert failed["status"] == "failed" and "injected fault" in failed["error"]["message"]
    assert failed["error"]["attempts"] == 3
    tries = attempts(batch_id)
    assert tries["w3"] >= 2 and tries["w17"] == 3
    assert sum(1 for n in tries.values() if n == 1) >= 15  # most neighbours were not re-run


def test_nul_in_an_output_is_stored_not_a_stuck_item(
    workers: Stack, client: httpx.Client, upstream: FakeUpstream, app_ctx: Flask
) -> None:
    upstream.add_scenario("nul", deltas=["before", "\x00", "after"])
    batch_id = submit_documents(client, [{"id": "n", "text": "x"}], model="openai/nul").json()["id"]
    done = sweep_until_done(client, batch_id, timeout=30)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 1, done
    assert batch_results(client, batch_id)[0]["output"] == "before\ufffdafter"


def quiet_batch(api_key: str, n: int) -> str:
    """A batch of n queued items whose chunk tasks were never sent."""
    return insert_batch(tenant_of(api_key), ["queued"] * n).id


def test_expiry_ends_running_items_held_by_a_live_but_stuck_claim(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = quiet_batch(api_key, 5)
    with batch_claims.claim_lease("stuck-worker") as holder:  # live lease, never finishes
        in_batch = Job.batch_id == batch_id
        claimed = batch_runner._claim(in_batch & (Job.item_index < 3), holder)
        assert len(claimed) == 3
        db.session.execute(
            update(Batch).where(Batch.id == batch_id).values(expires_at=utcnow() - timedelta(1))
        )
        db.session.commit()
        batch_sweep.requeue_lost_items()  # the claim is live: nothing moves
        assert sorted(attempts(batch_id).values()) == [0, 0, 1, 1, 1]
        batch_sweep.expire_due_batches()
        db.session.remove()
        batch = db.session.get(Batch, batch_id)
        assert batch is not None and batch.status == "expired"
        statuses = set(db.session.scalars(select(Job.status).where(in_batch)))
        assert statuses == {"expired"}
        # the stuck holder's late result is refused
        late = batch_writes.ItemResult(claimed[0].id, claimed[0].attempts, "succeeded", "late")
        assert batch_writes.write_results(batch_id, [late]) == 0


def test_one_stale_claim_in_a_flush_writes_the_others_once_and_counts_only_them(
    app_ctx: Flask, api_key: str
) -> None:
    """The flush's one bulk write moves fewer rows than given: it is redone row by row."""
    batch_id = quiet_batch(api_key, 4)
    with batch_claims.claim_lease("bulk-writer") as holder:
        claimed = batch_runner._claim(Job.batch_id == batch_id, holder)
    assert len(claimed) == 4
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    outcomes = [
        batch_writes.ItemResult(row.id, row.attempts, "succeeded", f"out {i}", usage=usage)
        for i, row in enumerate(claimed)
    ]
    outcomes[2].attempt += 1  # not our claim (as if re-queued and claimed again elsewhere)
    by_id = {row.id: row for row in claimed}
    counted = telemetry.totals().get("jobs|batch|succeeded", 0)
    assert batch_writes.write_results(batch_id, outcomes, by_id) == 3
    db.session.remove()
    rows = {j.id: j for j in db.session.scalars(select(Job).where(Job.batch_id == batch_id))}
    assert [rows[row.id].status for row in claimed] == [
        "succeeded",
        "succeeded",
        "running",
        "succeeded",
    ]
    assert rows[claimed[0].id].output == "out 0"
    batch = db.session.get(Batch, batch_id)
    assert batch is not None and (batch.prompt_tokens, batch.completion_tokens) == (30, 15)
    assert telemetry.totals().get("jobs|batch|succeeded", 0) == counted + 3
    # written again (a redelivered flush): nothing moves, nothing is counted twice
    assert batch_writes.write_results(batch_id, [o for i, o in enumerate(outcomes) if i != 2]) == 0
    assert telemetry.totals().get("jobs|batch|succeeded", 0) == counted + 3


@pytest.mark.parametrize("cut_while", ["running", "writing"])
def test_a_run_cut_mid_chunk_gives_its_items_back(
    stack: Stack, app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch, cut_while: str
) -> None:
    """As when the worker loses the broker: Celery kills the task's greenlet (GreenletExit),
    while its items run or while it waits for the process's writer to write their results."""
    batch_id = quiet_batch(api_key, 4)
    reached = gevent.event.Event()

    def stuck(*_: Any) -> Any:
        reached.set()
        gevent.sleep(60)
        raise AssertionError("not cut")

    if cut_while == "running":
        monkeypatch.setattr(batch_runner, "run_item", stuck)
    else:
        monkeypatch.setattr(batch_writes, "flush", stuck)

    def run() -> None:
        with app_ctx.app_context():
            batch_runner.run_chunk(batch_id, 0, 3, "cut-worker")

    task = gevent.spawn(run)
    assert reached.wait(20)
    task.kill(gevent.GreenletExit)
    assert isinstance(task.value, gevent.GreenletExit)
    writer = batch_writes.result_writer()
    if writer.greenlet is not None:
        writer.greenlet.kill()  # the stuck writer (its waiting results were given up)
    monkeypatch.undo()
    db.session.remove()
    holders = db.session.scalars(select(Job.worker).where(Job.batch_id == batch_id)).all()
    assert not any((h or "").startswith("cut-worker") for h in holders)  # all given back
    # the re-sent chunk runs on the session's worker: every item once more, then done
    wait_row(Batch, batch_id, "completed", timeout=30)
    assert set(attempts(batch_id).values()) == {2}


def finalizer_state(batch_id: str) -> tuple[str, str | None]:
    db.session.remove()
    batch = db.session.get(Batch, batch_id)
    assert batch is not None
    return batch.status, batch.finalizer


def test_a_finalizer_cut_gives_the_batch_back_and_the_next_sweep_ends_it(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when Redis restarts under a worker: Celery kills the finalizing task's greenlet."""
    batch_id = insert_batch(tenant_of(api_key), ["succeeded"] * 3).id
    reached = gevent.event.Event()

    def stuck(_: Batch) -> None:
        reached.set()
        gevent.sleep(60)

    monkeypatch.setitem(batch_lifecycle.FINALIZERS, "documents", stuck)

    def run() -> None:
        with app_ctx.app_context():
            batch_lifecycle.maybe_finalize(batch_id)

    task = gevent.spawn(run)
    assert reached.wait(20)
    status, holder = finalizer_state(batch_id)
    assert status == "finalizing" and holder and holder.startswith(socket.gethostname())
    task.kill(gevent.GreenletExit)
    assert isinstance(task.value, gevent.GreenletExit)
    assert finalizer_state(batch_id) == ("in_progress", None)  # given back, not stuck
    monkeypatch.undo()
    assert batch_sweep.finalize_stragglers() == 1
    assert finalizer_state(batch_id) == ("completed", None)


@pytest.mark.parametrize("holder", ["dead-host/0badc0de", None])
def test_a_batch_left_finalizing_by_a_dead_finalizer_is_taken_over_at_once(
    app_ctx: Flask, api_key: str, holder: str | None
) -> None:
    """Its holder's claim lease lapsed (or it has none): the next sweep finalizes it."""
    batch_id = insert_batch(tenant_of(api_key), ["succeeded"] * 2).id
    with batch_claims.claim_lease("live-host") as live:
        db.session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(status="finalizing", finalizing_at=utcnow(), finalizer=live)
        )
        db.session.commit()
        batch_sweep.finalize_stragglers()  # its finalizer lives: left alone
        assert finalizer_state(batch_id) == ("finalizing", live)
    db.session.execute(update(Batch).where(Batch.id == batch_id).values(finalizer=holder))
    db.session.commit()
    assert batch_sweep.finalize_stragglers() == 1
    assert finalizer_state(batch_id) == ("completed", None)
    # the dead finalizer's late end is refused: the batch is no longer its own
    batch_lifecycle._run_finalizer(batch_id, "expired", holder or "dead-host/0badc0de")
    assert finalizer_state(batch_id) == ("completed", None)


def test_a_finalizer_taken_over_midway_leaves_no_file_rows(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its files commit with the final status, or not at all: none orphaned in /v1/files."""
    tenant_id = tenant_of(api_key)
    batch_id = insert_batch(tenant_id, ["succeeded"]).id
    name = f"{batch_id}_output.jsonl"

    def overtaken(batch: Batch) -> None:
        with db.engine.begin() as conn:  # as a sweep that judged this finalizer dead
            conn.execute(update(Batch).where(Batch.id == batch.id).values(finalizer="other/1"))
        files.create_generated_file(tenant_id, name, "batch_output", [b"{}\n"], key=name)

    monkeypatch.setitem(batch_lifecycle.FINALIZERS, "documents", overtaken)
    assert batch_lifecycle.maybe_finalize(batch_id)
    assert finalizer_state(batch_id) == ("finalizing", "other/1")  # the new holder's now
    assert not db.session.scalars(select(File).where(File.filename == name)).all()


def test_stranded_standalone_job_is_sent_again(
    stack: Stack, app_ctx: Flask, api_key: str, client: httpx.Client
) -> None:
    """A background job committed but whose task was never sent (web crash, broker error)."""
    job = insert_job(
        tenant_of(api_key), "batch", "queued", created_at=utcnow() - timedelta(minutes=2)
    )
    job_id = job.id
    assert batch_sweep.resend_stranded_jobs() >= 1
    assert batch_sweep.resend_stranded_jobs() == 0  # at most once per RESEND_EVERY
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{job_id}").json()
        if body["status"] == "succeeded":
            break
        time.sleep(0.2)
    assert body["status"] == "succeeded", body
    db.session.remove()
    count = db.session.scalar(select(func.count()).select_from(Job).where(Job.id == job_id))
    assert count == 1


CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hello"}]}


@pytest.mark.parametrize("submit", ["document batch", "background job", "openai batch"])
def test_a_broker_error_after_the_commit_answers_success_and_the_sweeper_runs_it(
    stack: Stack,
    app_ctx: Flask,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
    submit: str,
) -> None:
    """The work exists once committed: a 503 would have its client create it a second time."""
    http = app_client(app_ctx, api_key)
    if submit == "openai batch":
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
        upload = {"purpose": "batch", "file": (io.BytesIO(json.dumps(line).encode()), "in.jsonl")}
        file_id = http.post("/v1/files", data=upload, content_type="multipart/form-data").json["id"]

    def refused(*_: Any, **__: Any) -> None:
        raise kombu.exceptions.OperationalError("Error 111 connecting to redis. Refused.")

    monkeypatch.setattr(batches, "send_task", refused)
    if submit == "document batch":
        docs = [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}]
        body = {"model": "mock/echo", "instructions": "Repeat.", "documents": docs}
        answer = http.post("/v1/document-batches", json=body)
    elif submit == "background job":
        answer = http.post("/v1/jobs", json=CHAT | {"mode": "batch"})
    else:
        window = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
        answer = http.post("/v1/batches", json={"input_file_id": file_id, **window})
    monkeypatch.undo()
    assert answer.status_code == (200 if submit == "openai batch" else 202), answer.json
    tenant = tenant_of(api_key)
    db.session.remove()
    made = db.session.scalars(select(Batch.id).where(Batch.tenant_id == tenant)).all()
    assert len(made) == (0 if submit == "background job" else 1)
    jobs = db.session.scalars(select(Job).where(Job.tenant_id == tenant)).all()
    assert len(jobs) == (2 if submit == "document batch" else 1)
    assert {job.status for job in jobs} == {"queued"}  # nothing was sent
    long_ago = utcnow() - timedelta(minutes=2)  # the sweeper's wait, elapsed
    db.session.execute(update(Job).where(Job.tenant_id == tenant).values(created_at=long_ago))
    db.session.execute(update(Batch).where(Batch.tenant_id == tenant).values(created_at=long_ago))
    db.session.commit()
    sweeper.sweep()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        db.session.remove()
        statuses = set(db.session.scalars(select(Job.status).where(Job.tenant_id == tenant)))
        if statuses == {"succeeded"}:
            break
        time.sleep(0.2)
    assert statuses == {"succeeded"}
    assert len(db.session.scalars(select(Job.id).where(Job.tenant_id == tenant)).all()) == len(jobs)


def test_a_worker_side_error_is_retried_not_the_items_failure(
    app_ctx: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that is not the provider's verdict (a bug, a lock) gets the item's retries."""
    raised: list[int] = []

    class Flaky:
        name = "mock"

        def complete(self, request: Any) -> Completion:
            if not raised:
                raised.append(1)
                raise RuntimeError("Semaphore released too many times")
            return Completion.of_text("ok", "stop", Usage(1, 1))

    class Registry:
        def bind(self, request: Any) -> tuple[Flaky, Any]:
            return Flaky(), request

    monkeypatch.setattr(batch_runner, "providers", lambda: Registry())
    monkeypatch.setitem(app_ctx.config, "BATCH_BACKOFF_BASE", 0.01)
    row = SimpleNamespace(id="job_retry", attempts=1, model="mock/echo", request=CHAT_RECORD)
    result = batch_runner.run_item(row, lambda: None)
    assert raised == [1]
    assert result.status == "succeeded" and result.output == "ok", result
