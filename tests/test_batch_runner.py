"""Batch workers under failure: retries, a SIGKILLed worker, the provider cap, expiry.

These tests stop the session's batch worker and run workers of their own with small
backoff, timeout and concurrency settings; the session's worker is restored at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask
from sqlalchemy import func, select

from app.extensions import db, redis_store
from app.models import Job
from app.services import batch_sweep, sweeper
from app.services.batch_semaphore import ProviderSemaphore
from tests.fake_upstream import FakeUpstream
from tests.helpers import batch_results, submit_documents, tuned_batch_worker, wait_batch
from tests.stack import Stack

TUNED = {
    "SLUICE_BATCH_BACKOFF_BASE": "0.05",
    "SLUICE_BATCH_BACKOFF_MAX": "0.2",
    "SLUICE_BATCH_MAX_ATTEMPTS": "3",
    "SLUICE_PROVIDER_TIMEOUT": "1.0",
    "SLUICE_PROVIDER_CONCURRENCY": "6",
    "SLUICE_PROVIDER_LEASE_SECONDS": "3",
    "SLUICE_BATCH_LEASE_SECONDS": "3",
}


@pytest.fixture(scope="module")
def workers(stack: Stack) -> Iterator[Stack]:
    """The session's batch worker swapped for a tuned one (restored afterwards)."""
    with tuned_batch_worker(stack, TUNED, "batch-tuned") as own:
        yield own


def test_429_with_retry_after_then_success(
    workers: Stack, client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.add_scenario("r429", status=429, retry_after="0.3", fail_times=2, echo=True)
    started = time.monotonic()
    batch = submit_documents(
        client, [{"id": "only", "text": "after two 429s"}], model="openai/r429"
    ).json()
    done = wait_batch(client, batch["id"])
    elapsed = time.monotonic() - started
    assert done["counts"]["succeeded"] == 1
    assert upstream.requests("r429") == 3
    assert elapsed >= 0.6  # waited Retry-After twice, not the 0.05 s backoff
    assert batch_results(client, batch["id"])[0]["output"] == "after two 429s"


def test_500s_and_timeouts_retried_then_failed_with_a_reason(
    workers: Stack, client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.add_scenario("r500", status=500, message="upstream exploded")
    upstream.add_scenario("rslow", delay_ms=3000)
    upstream.add_scenario("r503once", status=503, fail_times=1, echo=True)
    failing = submit_documents(client, [{"id": "a", "text": "x"}], model="openai/r500").json()
    slow = submit_documents(client, [{"id": "b", "text": "y"}], model="openai/rslow").json()
    flaky = submit_documents(client, [{"id": "c", "text": "z"}], model="openai/r503once").json()

    line = batch_results(client, wait_batch(client, failing["id"])["id"])[0]
    assert line["status"] == "failed"
    assert "upstream exploded" in line["error"]["message"]
    assert line["error"]["attempts"] == 3 and line["error"]["status_code"] == 500
    assert upstream.requests("r500") == 3

    line = batch_results(client, wait_batch(client, slow["id"])["id"])[0]
    assert line["status"] == "failed"
    assert line["error"]["code"] == "upstream_timeout" and line["error"]["attempts"] == 3

    line = batch_results(client, wait_batch(client, flaky["id"])["id"])[0]
    assert line["status"] == "succeeded" and line["output"] == "z"


def test_provider_concurrency_is_capped_across_the_worker(
    workers: Stack, client: httpx.Client, upstream: FakeUpstream, app_ctx: Flask
) -> None:
    upstream.add_scenario("capped", delay_ms=150)
    batch = submit_documents(
        client, [{"id": str(i), "text": "t"} for i in range(60)], model="openai/capped"
    )
    sem = ProviderSemaphore(redis_store.client, 6)
    seen = 0
    while client.get(f"/v1/document-batches/{batch.json()['id']}").json()["status"] != "completed":
        seen = max(seen, sem.in_use("openai"))
        time.sleep(0.02)
    assert 1 <= seen <= 6


def test_semaphore_leases_cannot_leak(app_ctx: Flask) -> None:
    sem = ProviderSemaphore(redis_store.client, 2, lease=1.0)
    provider = f"test-{time.time_ns()}"
    first, second = sem.try_acquire(provider), sem.try_acquire(provider)
    assert first and second and sem.try_acquire(provider) is None
    sem.release(first)
    third = sem.try_acquire(provider)
    assert third is not None
    # A holder that dies never releases and never renews: its slot lapses with the lease.
    sem.renewer.forget_all()
    time.sleep(1.1)
    assert sem.try_acquire(provider) is not None


def test_sigkill_mid_batch_every_document_exactly_once(
    workers: Stack, client: httpx.Client, upstream: FakeUpstream, app_ctx: Flask
) -> None:
    upstream.add_scenario("crash", delay_ms=100, echo=True)
    workers.kill("batch-tuned")  # run on a victim of our own
    victim = workers.start_worker("batch", "batch-victim", concurrency=20)
    n = 150
    docs = [{"id": f"k{i}", "text": f"kill test {i}"} for i in range(n)]
    batch_id = submit_documents(client, docs, model="openai/crash").json()["id"]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = client.get(f"/v1/document-batches/{batch_id}").json()["counts"]
        if counts["succeeded"] >= 20:
            break
        time.sleep(0.05)
    workers.kill(victim)  # SIGKILL the whole worker mid-batch
    running = client.get(f"/v1/document-batches/{batch_id}").json()["counts"]
    assert running["succeeded"] < n, "the victim finished before it was killed"
    workers.start_worker("batch", "batch-tuned", concurrency=20)

    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        sweeper.sweep()  # what celery beat runs every few seconds
        db.session.remove()
        status = client.get(f"/v1/document-batches/{batch_id}").json()
        if status["status"] == "completed":
            break
        time.sleep(0.5)
    assert status and status["status"] == "completed", status
    assert status["counts"]["succeeded"] == n
    lines = batch_results(client, batch_id)
    assert [line["document_id"] for line in lines] == [d["id"] for d in docs]
    assert all(line["output"] == doc["text"] for line, doc in zip(lines, docs, strict=True))
    rows = db.session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id))
    assert rows == n
    assert upstream.requests("crash") >= n
    reruns = db.session.scalar(
        select(func.count()).select_from(Job).where(Job.batch_id == batch_id, Job.attempts > 1)
    )
    assert reruns >= 1  # the killed worker's claimed items really ran again


def test_expired_batch_keeps_finished_items(
    workers: Stack, client: httpx.Client, upstream: FakeUpstream, app_ctx: Flask
) -> None:
    upstream.add_scenario("expiring", delay_ms=300, echo=True)
    docs: list[dict[str, Any]] = [{"id": f"e{i}", "text": f"e {i}"} for i in range(400)]
    batch_id = submit_documents(
        client, docs, model="openai/expiring", completion_window="1s"
    ).json()["id"]
    time.sleep(1.2)
    batch_sweep.expire_due_batches()
    done = wait_batch(client, batch_id)
    assert done["status"] == "expired" and done["expired_at"]
    counts = done["counts"]
    assert counts["expired"] > 0 and counts["succeeded"] > 0
    assert counts["succeeded"] + counts["expired"] + counts["failed"] == 400
    expired = batch_results(client, batch_id, status="expired")
    assert expired[0]["error"]["code"] == "batch_expired"
