"""GET /metrics: gauges of work in flight, and the workers' maintained counters and histograms."""

from __future__ import annotations

import time

import httpx
import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from app import telemetry
from tests.fake_upstream import FakeUpstream
from tests.helpers import insert_batch, insert_job, submit_documents, tenant_of, wait_batch
from tests.stack import Stack

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(stack: Stack) -> Samples:
    response = httpx.get(stack.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; a labelled series not seen yet counts as 0."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_families_and_live_values(stack: Stack) -> None:
    response = httpx.get(stack.url + "/metrics", timeout=10)
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    expected = {
        "sluice_jobs": "gauge",
        "sluice_batches": "gauge",
        "sluice_workers_live": "gauge",
        "sluice_queue_depth": "gauge",
        "sluice_streams_in_flight": "gauge",
        "sluice_oldest_queued_job_age_seconds": "gauge",
        "sluice_scrape_source_up": "gauge",
        "sluice_jobs_ended": "counter",
        "sluice_tokens": "counter",
        "sluice_provider_errors": "counter",
        "sluice_ttft_seconds": "histogram",
        "sluice_job_duration_seconds": "histogram",
        "sluice_http_requests": "counter",
        "sluice_http_request_duration_seconds": "histogram",
        "process_resident_memory_bytes": "gauge",
    }
    assert ("sluice_jobs", (("mode", "stream"), ("status", "running"))) in scrape(stack)
    for name, kind in expected.items():
        assert name in families, name
        assert families[name].type == kind, name

    deadline = time.monotonic() + 5  # liveness is a heartbeat: allow a beat or two
    samples = scrape(stack)
    while time.monotonic() < deadline and not all(
        value(samples, "sluice_workers_live", mode=mode) for mode in ("stream", "batch")
    ):
        time.sleep(0.2)
        samples = scrape(stack)
    for mode in ("stream", "batch"):
        assert value(samples, "sluice_workers_live", mode=mode) >= 1
        for status in ("queued", "running"):
            assert (("sluice_jobs", (("mode", mode), ("status", status)))) in samples
    for queue in ("interactive", "batch"):
        assert value(samples, "sluice_queue_depth", queue=queue) >= 0
    assert value(samples, "sluice_scrape_source_up", source="database") == 1
    assert value(samples, "sluice_scrape_source_up", source="redis") == 1


def test_metrics_change_with_jobs_batches_and_requests(
    stack: Stack, app_ctx: Flask, api_key: str
) -> None:
    before = scrape(stack)
    tenant = tenant_of(api_key)
    insert_job(tenant, "stream", "running")
    insert_job(tenant, "batch", "failed")
    insert_job(tenant, "stream", "queued")
    insert_batch(tenant, ["succeeded"])
    for _ in range(3):
        httpx.get(stack.url + "/healthz", timeout=10)
    time.sleep(0.05)
    after = scrape(stack)

    def grew(name: str, by: float, **labels: str) -> bool:
        return value(after, name, **labels) >= value(before, name, **labels) + by

    assert grew("sluice_jobs", 1, mode="stream", status="running")
    assert grew("sluice_jobs", 1, mode="stream", status="queued")
    # ended jobs are not counted from the table: the workers count them where they end
    assert ("sluice_jobs", (("mode", "batch"), ("status", "failed"))) not in after
    assert grew("sluice_batches", 1, status="in_progress")
    assert grew("sluice_streams_in_flight", 2)
    assert value(after, "sluice_oldest_queued_job_age_seconds", mode="stream") >= 0
    labels = {"method": "GET", "route": "/healthz", "code": "200"}
    # Process-local: one gunicorn worker in the test stack, so every request lands here.
    assert grew("sluice_http_requests_total", 3, **labels)
    assert grew("sluice_http_request_duration_seconds_count", 3, route="/healthz")


def test_metrics_count_real_jobs_in_counters_and_histograms(
    stack: Stack, upstream: FakeUpstream, client: httpx.Client
) -> None:
    """A real stream and a real batch item are counted by the workers; /metrics parses."""
    before = scrape(stack)
    body = {"model": "mock/demo", "messages": [{"role": "user", "content": "hi"}]}
    answer = client.post("/v1/chat/completions", json=body | {"stream": True})
    assert answer.status_code == 200 and "[DONE]" in answer.text
    batch = submit_documents(client, [{"id": "a", "text": "x"}], model="mock/echo").json()
    assert wait_batch(client, batch["id"])["status"] == "completed"
    upstream.add_scenario("metrics-refuses", status=400, message="bad things")
    failing = {"model": "openai/metrics-refuses", "messages": [{"role": "user", "content": "x"}]}
    client.post("/v1/chat/completions", json=failing | {"stream": True})

    def grew(after: Samples, name: str, by: float = 1, **labels: str) -> bool:
        return value(after, name, **labels) >= value(before, name, **labels) + by

    stream_ttft = {"mode": "stream", "provider": "mock"}
    checks = [
        ("sluice_jobs_ended_total", {"mode": "stream", "status": "succeeded"}),
        ("sluice_jobs_ended_total", {"mode": "batch", "status": "succeeded"}),
        ("sluice_ttft_seconds_count", stream_ttft),
        ("sluice_ttft_seconds_bucket", stream_ttft | {"le": "+Inf"}),
        ("sluice_job_duration_seconds_count", {"mode": "stream"}),
        ("sluice_job_duration_seconds_count", {"mode": "batch"}),
        ("sluice_tokens_total", {"mode": "stream", "direction": "output"}),
        ("sluice_tokens_total", {"mode": "batch", "direction": "input"}),
    ]
    deadline = time.monotonic() + 15
    after = scrape(stack)
    while not all(grew(after, n, **labels) for n, labels in checks):
        assert time.monotonic() < deadline, [n for n, lb in checks if not grew(after, n, **lb)]
        time.sleep(0.2)
        after = scrape(stack)
    assert value(after, "sluice_ttft_seconds_sum", **stream_ttft) > 0
    # buckets are cumulative and end at +Inf == count
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "sluice_ttft_seconds_bucket"
        and dict(labels).get("provider") == "mock"
        and dict(labels)["mode"] == "stream"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == value(after, "sluice_ttft_seconds_count", **stream_ttft)
    provider_errors = {
        dict(labels)["kind"]: v
        for (name, labels), v in after.items()
        if name == "sluice_provider_errors_total" and dict(labels)["provider"] == "openai"
    }
    deadline = time.monotonic() + 15
    while not provider_errors and time.monotonic() < deadline:
        time.sleep(0.2)
        provider_errors = {
            dict(labels)["kind"]: v
            for (name, labels), v in scrape(stack).items()
            if name == "sluice_provider_errors_total" and dict(labels)["provider"] == "openai"
        }
    assert provider_errors, "a provider's 401 is counted by provider and kind"


def test_quantile_interpolates_within_buckets_like_prometheus() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert telemetry.quantile(0.5, [0, 0, 0, 0], bounds) is None
    assert telemetry.quantile(0.5, [0, 10, 0, 0], bounds) == 1.5
    assert telemetry.quantile(0.95, [10, 0, 10, 0], bounds) == pytest.approx(3.8)
    assert telemetry.quantile(0.99, [0, 0, 0, 5], bounds) == 4.0  # +Inf: the top bound
    assert telemetry.bucket_index(0.5, bounds) == 0
    assert telemetry.bucket_index(2.0, bounds) == 1
    assert telemetry.bucket_index(9.0, bounds) == 3


def test_error_kind_counts_providers_errors_only() -> None:
    assert telemetry.error_kind({"code": "rate_limit_exceeded"}) == "rate_limit_exceeded"
    assert telemetry.error_kind({"type": "invalid_request_error"}) == "invalid_request_error"
    assert telemetry.error_kind({"code": "worker_lost"}) is None
    assert telemetry.error_kind(None) is None


def test_stream_jobs_ended_without_their_worker_are_counted(app: Flask, api_key: str) -> None:
    """A queued job cancelled and a lost worker's job settled by the sweeper count as ended."""
    from app.extensions import redis_store
    from app.services.stream_runner import cancel_queued_job, fail_lost_job

    with app.app_context():
        before = telemetry.totals(redis_store.client)
        queued = insert_job(tenant_of(api_key), "stream", "queued")
        assert cancel_queued_job(queued.id)
        running = insert_job(tenant_of(api_key), "stream", "running")
        assert fail_lost_job(running.id)
        after = telemetry.totals(redis_store.client)
    grown = _grown(before, after)
    assert grown.get("jobs|stream|cancelled", 0) >= 1, grown  # >=: other tests' jobs may end
    assert grown.get("jobs|stream|failed", 0) >= 1, grown


def test_batch_items_a_cancel_or_an_expiry_ends_are_counted(app: Flask, api_key: str) -> None:
    """Items that never ran still end: a cancel's and an expiry's are counted as ended."""
    from app.extensions import redis_store
    from app.services.batch_lifecycle import cancel_batch, expire_batch

    with app.app_context():
        before = telemetry.totals(redis_store.client)
        cancel_batch(insert_batch(tenant_of(api_key), ["queued", "queued", "succeeded"]))
        expire_batch(insert_batch(tenant_of(api_key), ["queued", "running"]).id)
        after = telemetry.totals(redis_store.client)
    grown = _grown(before, after)
    assert grown.get("jobs|batch|cancelled", 0) >= 2, grown  # >=: other tests' jobs may end
    assert grown.get("jobs|batch|expired", 0) >= 2, grown


def test_batch_items_out_of_attempts_are_counted_as_failed(app: Flask, api_key: str) -> None:
    """The sweeper fails an item claimed BATCH_MAX_ATTEMPTS times: that end is counted too."""
    from sqlalchemy import select

    from app.extensions import db, redis_store
    from app.models import Job
    from app.services.batches import requeue_items

    with app.app_context():
        batch = insert_batch(tenant_of(api_key), ["running"])
        attempts = app.config["BATCH_MAX_ATTEMPTS"]
        db.session.execute(
            Job.__table__.update().where(Job.batch_id == batch.id).values(attempts=attempts)
        )
        db.session.commit()
        rows = db.session.execute(
            select(Job.id, Job.attempts, Job.batch_id, Job.item_index).where(
                Job.batch_id == batch.id
            )
        ).all()
        before = telemetry.totals(redis_store.client)
        requeue_items(rows, {"message": "lost", "code": "worker_lost"})
        after = telemetry.totals(redis_store.client)
    grown = _grown(before, after)
    assert grown.get("jobs|batch|failed", 0) >= 1, grown  # >=: other tests' jobs may end


def _grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The telemetry totals that changed between two reads, by how much."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
