"""The provider executor end to end (#13): Sluice's batches run on the providers' own batch
APIs (the fake upstream's OpenAI Batches and Anthropic Message Batches, driven by the
official SDKs), polled by the real sweeper, results written once into the item rows.

This module runs its own web process with a sluice.toml (executor defaults, prices, a
policy) and sweeps in-process with an app on the same file, or in a beat process.
"""

from __future__ import annotations

import io
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from flask import Flask
from sqlalchemy import select

from app.cli.processes import sweeper_argv
from app.extensions import db
from app.models import Job, ProviderBatch
from app.pricing import price_for, prices_of
from app.services import sweeper
from tests.fake_upstream import BatchAPIs, FakeUpstream
from tests.helpers import BATCH_TERMINAL, tenant_of
from tests.stack import Stack

CONFIG = """
[sluice]
provider_batch_poll_seconds = 0.1
provider_batch_poll_max_seconds = 0.3
mock_batch_seconds = 0.2

[providers.openai]
batch_executor = "provider"
batch_max_requests = 3          # the fake refuses more: a 7-item batch must be split

[providers.anthropic]
batch_executor = "provider"

[providers.mock]
batch_executor = "provider"

[prices."openai/*"]
input = 2.0
output = 8.0

[prices."anthropic/*"]
input = 3.0
output = 15.0

[prices."openai/pricey"]
input = 100000000.0             # $100 a token: one job spends the day's budget
output = 100000000.0

[budgets]
default = 100.0

[[policy.rules]]
name = "over-budget"
when = { budget_left_below = 1.0 }
route = "reject"
status = 429
message = "The daily budget is spent."

[[policy.rules]]
name = "deadline"
when = { metadata_keys = ["deadline"] }
route = "batch"
executor = "auto"

[[policy.rules]]
name = "batches"
when = { endpoint = ["/v1/document-batches", "/v1/batches"] }
route = "batch"

[[policy.rules]]
name = "jobs-batch"
when = { mode = "batch" }
route = "batch"

[[policy.rules]]
name = "interactive"
route = "stream"
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("provider-batches") / "sluice.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def papp(app: Flask, make_app: Callable[..., Flask], config_file: Path) -> Flask:
    """An in-process app on this module's sluice.toml (the schema is the session's)."""
    return make_app(SLUICE_CONFIG=str(config_file))


@pytest.fixture(scope="module")
def pweb(app: Flask, test_env: dict[str, str], home: Path, config_file: Path) -> Iterator[Stack]:
    """A web process of its own on this module's sluice.toml."""
    web = Stack(env={**test_env, "SLUICE_CONFIG": str(config_file)}, home=home)
    web.start_web()
    try:
        web.wait_healthy()
        yield web
    finally:
        web.stop()


@pytest.fixture
def http(pweb: Stack, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=pweb.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(autouse=True)
def fresh_batch_apis(upstream: FakeUpstream) -> Iterator[BatchAPIs]:
    upstream.batches = BatchAPIs()
    upstream.batches.max_requests["openai"] = 3
    upstream.add_scenario("bad", status=400, message="nope")
    yield upstream.batches


def sweep_until(papp: Flask, done: Callable[[], bool], timeout: float = 30) -> None:
    """Run the sweeper's pass (as beat does) until done() holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with papp.app_context():
            sweeper.sweep()
        if done():
            return
        time.sleep(0.1)
    raise AssertionError("the sweeper did not get there in time")


def doc_batch(http: httpx.Client, model: str, n: int, **fields: Any) -> dict[str, Any]:
    body = {
        "model": model,
        "instructions": "Repeat the document.",
        "documents": [{"id": f"doc-{i}", "text": f"document number {i}"} for i in range(n)],
        **fields,
    }
    response = http.post("/v1/document-batches", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def status_of(http: httpx.Client, batch_id: str) -> Callable[[], bool]:
    def done() -> bool:
        return http.get(f"/v1/document-batches/{batch_id}").json()["status"] in BATCH_TERMINAL

    return done


def item_rows(papp: Flask, batch_id: str) -> list[Job]:
    with papp.app_context():
        rows = db.session.scalars(select(Job).where(Job.batch_id == batch_id)).all()
        db.session.expunge_all()
        return list(rows)


def batch_price(papp: Flask, model: str, usage: dict[str, int]) -> float:
    price = price_for(model, prices_of(papp.config))
    assert price is not None
    rate_in, rate_out, _ = price.rates("provider")
    assert rate_in == price.input / 2 and rate_out == price.output / 2
    return (usage["prompt_tokens"] * rate_in + usage["completion_tokens"] * rate_out) / 1e6


def sent_custom_ids(upstream: FakeUpstream, kind: str) -> Counter[str]:
    return Counter(c for b in upstream.batches.of_kind(kind) for c in b.custom_ids)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_document_batch_runs_on_the_providers_batch_api(
    provider: str, http: httpx.Client, papp: Flask, upstream: FakeUpstream
) -> None:
    created = doc_batch(http, f"{provider}/echo", 7)
    assert created["route"]["executor"] == "provider"
    assert "executor provider: provider batch API at 50 %" in created["route"]["reason"]
    sweep_until(papp, status_of(http, created["id"]))
    batch = http.get(f"/v1/document-batches/{created['id']}").json()
    assert batch["status"] == "completed" and batch["counts"]["succeeded"] == 7
    results = [json.loads(x) for x in http.get(batch["results_url"]).text.splitlines()]
    assert {r["document_id"]: r["output"] for r in results} == {
        f"doc-{i}": f"document number {i}" for i in range(7)
    }  # every item, matched by id though the provider answered out of order
    rows = item_rows(papp, created["id"])
    sent = sent_custom_ids(upstream, provider)
    assert sent == Counter({row.id: 1 for row in rows})  # each item sent once, no worker ran it
    assert all(row.attempts == 1 and row.executor == "provider" for row in rows)
    expected = 0.0
    for row in rows:
        assert row.usage and row.cost_usd == pytest.approx(batch_price(papp, row.model, row.usage))
        expected += row.cost_usd
    assert batch["cost_usd"] == pytest.approx(expected)
    assert batch["usage"]["prompt_tokens"] == sum(r.usage["prompt_tokens"] for r in rows if r.usage)
    if provider == "openai":  # three requests per provider batch at most: 3 + 3 + 1
        assert sorted(len(b.custom_ids) for b in upstream.batches.of_kind("openai")) == [1, 3, 3]
    job = http.get(f"/v1/jobs/{rows[0].id}").json()
    assert job["route"]["executor"] == "provider" and job["cost_usd"] == pytest.approx(
        rows[0].cost_usd
    )


def _upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    raw = "".join(json.dumps(x) + "\n" for x in lines)
    return client.files.create(file=("in.jsonl", io.BytesIO(raw.encode())), purpose="batch").id


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_openai_compatible_batch_on_the_provider_executor(
    provider: str, pweb: Stack, api_key: str, papp: Flask, upstream: FakeUpstream
) -> None:
    client = openai.OpenAI(base_url=pweb.url + "/v1", api_key=api_key, max_retries=0)
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": f"{provider}/{'bad' if i % 3 == 0 else 'echo'}",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": f"question {i}"}],
            },
        }
        for i in range(6)
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )

    def done() -> bool:
        return client.batches.retrieve(batch.id).status in BATCH_TERMINAL

    sweep_until(papp, done)
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.request_counts and (
        batch.request_counts.completed,
        batch.request_counts.failed,
    ) == (4, 2)
    assert batch.output_file_id and batch.error_file_id
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert {
        o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in out
    } == {f"req-{i}": f"question {i}" for i in (1, 2, 4, 5)}
    assert sorted(e["custom_id"] for e in err) == ["req-0", "req-3"]
    for e in err:  # the provider's own per-request error, with its status
        assert "nope" in e["error"]["message"] and e["response"]["status_code"] == 400
    with papp.app_context():
        rows = db.session.scalars(select(Job).where(Job.batch_id == batch.id)).all()
        assert all(r.attempts == 1 for r in rows)
        assert sent_custom_ids(upstream, provider) == Counter({r.id: 1 for r in rows})
        if provider == "openai":  # one model per OpenAI batch: echo and bad go apart
            assert {b.model for b in upstream.batches.of_kind("openai")} == {"echo", "bad"}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_cancel_maps_onto_the_providers_cancel(
    provider: str,
    http: httpx.Client,
    papp: Flask,
    upstream: FakeUpstream,
    fresh_batch_apis: BatchAPIs,
) -> None:
    fresh_batch_apis.configure(processing_s=3.0)
    created = doc_batch(http, f"{provider}/echo", 3)
    sweep_until(papp, lambda: fresh_batch_apis.creates[provider] >= 1)
    time.sleep(1.2)  # about one of three requests finishes before the cancel
    cancelled = http.post(f"/v1/document-batches/{created['id']}/cancel").json()
    assert cancelled["status"] == "cancelling"
    assert sum(fresh_batch_apis.cancels.values()) >= 1  # the provider was told
    sweep_until(papp, status_of(http, created["id"]))
    batch = http.get(f"/v1/document-batches/{created['id']}").json()
    assert batch["status"] == "cancelled"
    counts = batch["counts"]
    assert counts["succeeded"] + counts["cancelled"] == 3 and counts["cancelled"] >= 1
    for row in item_rows(papp, created["id"]):
        if row.status == "cancelled":
            assert row.error and row.error["code"] == "batch_cancelled"
        else:
            assert row.status == "succeeded" and row.output  # finished before the cancel: kept


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_provider_expiry_is_reported_per_item(
    provider: str, http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    fresh_batch_apis.configure(processing_s=30.0, expire_after_s=0.3)
    created = doc_batch(http, f"{provider}/echo", 2)
    sweep_until(papp, status_of(http, created["id"]))
    batch = http.get(f"/v1/document-batches/{created['id']}").json()
    assert batch["status"] == "expired" and batch["counts"]["expired"] == 2
    for row in item_rows(papp, created["id"]):
        assert row.status == "expired" and row.error
        assert row.error["code"] == "batch_expired" and row.error["provider"] == provider
        assert row.cost_usd == 0.0


def test_a_killed_poller_resumes_from_the_stored_provider_batch_id(
    http: httpx.Client,
    papp: Flask,
    test_env: dict[str, str],
    home: Path,
    config_file: Path,
    tmp_path: Path,
    fresh_batch_apis: BatchAPIs,
) -> None:
    fresh_batch_apis.configure(processing_s=2.5)
    env = {**test_env, "SLUICE_CONFIG": str(config_file), "SLUICE_SWEEP_INTERVAL_SECONDS": "0.2"}
    beat = Stack(env=env, home=home)
    beat._spawn("beat", [*sweeper_argv("WARNING"), "-s", str(tmp_path / "schedule")])
    created = doc_batch(http, "anthropic/echo", 4)

    def submitted() -> ProviderBatch | None:
        with papp.app_context():
            found = db.session.scalar(
                select(ProviderBatch).where(ProviderBatch.batch_id == created["id"])
            )
            db.session.expunge_all()
            return found if found is not None and found.remote_id else None

    deadline = time.monotonic() + 30
    while submitted() is None or (submitted() or ProviderBatch()).polls < 1:
        assert time.monotonic() < deadline, "beat never submitted and polled the batch"
        time.sleep(0.1)
    beat.kill("beat", signal.SIGKILL)  # mid-way: submitted, polled, not ended
    row = submitted()
    assert row is not None and row.status == "in_progress"
    assert http.get(f"/v1/document-batches/{created['id']}").json()["status"] == "in_progress"
    again = Stack(env=env, home=home)  # a new sweeper process picks up the stored id
    again._spawn("beat", [*sweeper_argv("WARNING"), "-s", str(tmp_path / "schedule2")])
    try:
        deadline = time.monotonic() + 30
        while not status_of(http, created["id"])():
            assert time.monotonic() < deadline, "the resumed poller never finished the batch"
            time.sleep(0.2)
    finally:
        again.stop()
    assert fresh_batch_apis.creates["anthropic"] == 1  # resumed, never resubmitted
    batch = http.get(f"/v1/document-batches/{created['id']}").json()
    assert batch["status"] == "completed" and batch["counts"]["succeeded"] == 4
    assert all(r.attempts == 1 for r in item_rows(papp, created["id"]))


def test_mock_provider_has_a_batch_api_too(http: httpx.Client, papp: Flask) -> None:
    created = doc_batch(http, "mock/echo", 3)
    assert created["route"]["executor"] == "provider"
    sweep_until(papp, status_of(http, created["id"]))
    batch = http.get(f"/v1/document-batches/{created['id']}").json()
    assert batch["status"] == "completed" and batch["counts"]["succeeded"] == 3
    assert batch["cost_usd"] > 0


def test_auto_executor_follows_the_deadline(http: httpx.Client, papp: Flask) -> None:
    body = {
        "model": "openai/echo",
        "mode": "batch",
        "messages": [{"role": "user", "content": "hi"}],
    }
    late = http.post("/v1/jobs", json={**body, "metadata": {"deadline": "48h"}}).json()
    soon = http.post("/v1/jobs", json={**body, "metadata": {"deadline": "1h"}}).json()
    assert late["route"]["executor"] == "provider"
    assert "deadline 48h allows provider batch at 50 %" in late["route"]["reason"]
    assert soon["route"]["executor"] == "workers"
    assert "deadline 1h is shorter than the provider batch window 24h" in soon["route"]["reason"]
    sweep_until(papp, lambda: http.get(f"/v1/jobs/{late['id']}").json()["status"] == "succeeded")
    done = http.get(f"/v1/jobs/{late['id']}").json()
    assert done["output"] == "hi" and done["cost_usd"] > 0


def test_budget_routes_and_cost_reaches_metrics(
    http: httpx.Client, papp: Flask, api_key: str
) -> None:
    body = {
        "model": "openai/pricey",
        "mode": "batch",
        "messages": [{"role": "user", "content": "hi"}],
    }
    job = http.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    sweep_until(papp, lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded")
    spent = http.get(f"/v1/jobs/{job_id}").json()["cost_usd"]
    assert spent > 100.0  # over the day's budget
    refused = http.post("/v1/jobs", json=body)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["rule"] == "over-budget"
    metrics = http.get("/metrics").text
    with papp.app_context():
        from app.models import Tenant

        name = db.session.get(Tenant, tenant_of(api_key)).name  # type: ignore[union-attr]
    line = next(
        x for x in metrics.splitlines()
        if x.startswith("sluice_cost_usd_total{") and f'tenant="{name}"' in x
    )  # fmt: skip
    assert 'mode="batch"' in line and 'executor="provider"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(spent)


def test_a_refused_submit_fails_the_items_with_the_providers_error(
    http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    fresh_batch_apis.fail_creates = [400]
    created = doc_batch(http, "anthropic/echo", 2)
    sweep_until(papp, status_of(http, created["id"]))
    batch = http.get(f"/v1/document-batches/{created['id']}").json()
    assert batch["status"] == "completed" and batch["counts"]["failed"] == 2
    for row in item_rows(papp, created["id"]):
        assert row.error and "scripted batch create failure 400" in row.error["message"]
        assert row.error["status_code"] == 400


def test_a_retryable_submit_error_is_retried_with_backoff(
    http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    fresh_batch_apis.fail_creates = [429, 529]
    created = doc_batch(http, "anthropic/echo", 2)
    sweep_until(papp, status_of(http, created["id"]))
    batch = http.get(f"/v1/document-batches/{created['id']}").json()
    assert batch["status"] == "completed" and batch["counts"]["succeeded"] == 2
    assert fresh_batch_apis.creates["anthropic"] == 1 and not fresh_batch_apis.fail_creates


def test_spend_endpoint_shows_today_and_the_budget(http: httpx.Client, papp: Flask) -> None:
    fresh = http.get("/v1/spend").json()
    assert fresh["object"] == "spend" and fresh["spent_usd"] == 0.0
    assert fresh["budget_usd"] == 100.0 and fresh["budget_left_usd"] == 100.0
    created = doc_batch(http, "anthropic/echo", 2)
    sweep_until(papp, status_of(http, created["id"]))
    cost = http.get(f"/v1/document-batches/{created['id']}").json()["cost_usd"]
    spent = http.get("/v1/spend").json()
    assert cost > 0 and spent["spent_usd"] == pytest.approx(cost)
    assert spent["budget_left_usd"] == pytest.approx(100.0 - cost)


def test_results_applied_twice_are_written_once(
    http: httpx.Client, papp: Flask, upstream: FakeUpstream
) -> None:
    """A second apply of the same provider batch (two sweepers, a crash after the writes
    but before the row was closed) changes nothing."""
    from app.services.provider_batches import engine

    created = doc_batch(http, "openai/echo", 2)
    sweep_until(papp, status_of(http, created["id"]))
    before = {
        r.id: (r.status, r.finished_at, r.attempts, r.cost_usd)
        for r in item_rows(papp, created["id"])
    }
    tokens = http.get(f"/v1/document-batches/{created['id']}").json()["usage"]
    with papp.app_context():
        pb = db.session.scalar(select(ProviderBatch).where(ProviderBatch.batch_id == created["id"]))
        assert pb is not None and pb.status == "applied"
        pb.status = "in_progress"  # as if the process died before closing the row
        db.session.commit()
        assert engine.poll(pb.id) == 1
    after = {
        r.id: (r.status, r.finished_at, r.attempts, r.cost_usd)
        for r in item_rows(papp, created["id"])
    }
    assert after == before
    assert http.get(f"/v1/document-batches/{created['id']}").json()["usage"] == tokens
