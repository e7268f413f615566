"""GET /metrics: Prometheus text computed from the database and Redis at scrape time."""

from __future__ import annotations

import time

import httpx
import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import insert_batch, insert_job, tenant_of
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
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            assert value(samples, "sluice_jobs", mode=mode, status=status) >= 0
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
    assert grew("sluice_jobs", 1, mode="batch", status="failed")
    assert grew("sluice_jobs", 1, mode="batch", status="succeeded")
    assert grew("sluice_batches", 1, status="in_progress")
    assert grew("sluice_streams_in_flight", 2)
    assert value(after, "sluice_oldest_queued_job_age_seconds", mode="stream") >= 0
    labels = {"method": "GET", "route": "/healthz", "code": "200"}
    # Process-local: one gunicorn worker in the test stack, so every request lands here.
    assert grew("sluice_http_requests_total", 3, **labels)
    assert grew("sluice_http_request_duration_seconds_count", 3, route="/healthz")


def test_metrics_count_a_real_mock_job(
    stack: Stack, app: Flask, api_key: str, client: httpx.Client
) -> None:
    if "/v1/chat/completions" not in {rule.rule for rule in app.url_map.iter_rules()}:
        pytest.skip("POST /v1/chat/completions has not landed yet")
    before = scrape(stack)
    body = {"model": "mock/demo", "messages": [{"role": "user", "content": "hi"}]}
    answer = client.post("/v1/chat/completions", json=body | {"stream": True})
    assert answer.status_code == 200 and "[DONE]" in answer.text
    deadline = time.monotonic() + 15
    grown = False
    while not grown and time.monotonic() < deadline:
        after = scrape(stack)
        grown = sum(
            value(after, "sluice_jobs", mode=m, status="succeeded") for m in ("stream", "batch")
        ) >= 1 + sum(
            value(before, "sluice_jobs", mode=m, status="succeeded") for m in ("stream", "batch")
        )
        time.sleep(0.1)
    assert grown
