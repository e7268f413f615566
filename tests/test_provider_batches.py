"""The provider executor end to end (#13): Sluice's batches run on the providers' own batch
APIs (the fake upstream's OpenAI Batches and Anthropic Message Batches, driven by the
official SDKs), submitted and polled by batch workers that the real sweeper enqueues,
results written once into the item rows.

This module runs its own web process and batch worker with a sluice.toml (executor
defaults, prices, a policy) on a Redis of its own (so the session's batch worker, on
another configuration, never takes its tasks), and sweeps in-process with an app on the
same file, or in a beat process.
"""

from __future__ import annotations

import io
import json
import signal
import threading
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

from app import embedded_redis
from app.cli.processes import sweeper_argv
from app.extensions import db
from app.models import Job, ProviderBatch
from app.pricing import price_for, prices_of
from app.services import sweeper
from tests.fake_upstream import BatchAPIs, FakeUpstream
from tests.helpers import BATCH_TERMINAL, tenant_of, tuned
from tests.stack import Stack

CONFIG = """
[sluice]
provider_batch_poll_seconds = 0.1
provider_batch_poll_max_seconds = 0.3
provider_batch_resubmit_seconds = 2   # a task lost with its worker is re-sent after this
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
def predis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of this module's own: broker, spend counters, mock batches."""
    url, proc = embedded_redis.start(tmp_path_factory.mktemp("provider-redis"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def penv(test_env: dict[str, str], config_file: Path, predis: str) -> dict[str, str]:
    return {**test_env, "SLUICE_CONFIG": str(config_file), "REDIS_URL": predis}


@pytest.fixture(scope="module")
def papp(app: Flask, make_app: Callable[..., Flask], penv: dict[str, str]) -> Flask:
    """An in-process app on this module's sluice.toml (the schema is the session's)."""
    return make_app(SLUICE_CONFIG=penv["SLUICE_CONFIG"], REDIS_URL=penv["REDIS_URL"])


@pytest.fixture(scope="module")
def pweb(app: Flask, penv: dict[str, str], home: Path) -> Iterator[Stack]:
    """A web process and a batch worker of its own on this module's sluice.toml."""
    web = Stack(env=penv, home=home)
    web.start_web()
    web.start_worker("batch", "pbatch", concurrency=20)
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


def sweep_until(papp: Flask, done: Callable[[], bool], timeout: float = 60) -> None:
    """Run the sweeper's pass (as beat does; the module's batch worker runs what it
    enqueues) until done() holds."""
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


def completed(http: httpx.Client, batch_id: str, succeeded: int) -> dict[str, Any]:
    """The document batch, which must have completed with this many items succeeded."""
    batch = http.get(f"/v1/document-batches/{batch_id}").json()
    assert batch["status"] == "completed" and batch["counts"]["succeeded"] == succeeded, batch
    return batch


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_document_batch_runs_on_the_providers_batch_api(
    provider: str, http: httpx.Client, papp: Flask, upstream: FakeUpstream
) -> None:
    created = doc_batch(http, f"{provider}/echo", 7)
    assert created["route"]["executor"] == "provider"
    assert "executor provider: provider batch API at 50 %" in created["route"]["reason"]
    sweep_until(papp, status_of(http, created["id"]))
    batch = completed(http, created["id"], 7)
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


def pbatch_of(papp: Flask, batch_id: str | None = None, job_id: str | None = None) -> Any:
    """The (first) provider batch row of a batch, or of a standalone job; None before one."""
    with papp.app_context():
        if job_id is not None:
            job = db.session.get(Job, job_id)
            pb_id = job.provider_batch_id if job is not None else None
            found = db.session.get(ProviderBatch, pb_id) if pb_id else None
        else:
            found = db.session.scalar(
                select(ProviderBatch).where(ProviderBatch.batch_id == batch_id)
            )
        db.session.expunge_all()
        return found


def test_a_worker_killed_while_polling_loses_nothing(
    http: httpx.Client,
    papp: Flask,
    pweb: Stack,
    penv: dict[str, str],
    home: Path,
    tmp_path: Path,
    fresh_batch_apis: BatchAPIs,
) -> None:
    fresh_batch_apis.configure(processing_s=2.5, retrieve_delay_s=1.0)
    env = {**penv, "SLUICE_SWEEP_INTERVAL_SECONDS": "0.2"}
    beat = Stack(env=env, home=home)
    beat._spawn("beat", [*sweeper_argv("WARNING"), "-s", str(tmp_path / "schedule")])
    try:
        created = doc_batch(http, "anthropic/echo", 4)
        deadline = time.monotonic() + 60
        while True:  # submitted, and the worker is in the middle of a retrieve
            row = pbatch_of(papp, created["id"])
            if row is not None and row.remote_id and fresh_batch_apis.retrieving > 0:
                break
            assert time.monotonic() < deadline, "no worker ever polled the batch"
            time.sleep(0.02)
        pweb.kill("pbatch", signal.SIGKILL)  # mid-poll
        row = pbatch_of(papp, created["id"])
        assert row is not None and row.status == "in_progress"
        assert http.get(f"/v1/document-batches/{created['id']}").json()["status"] == "in_progress"
        pweb.start_worker("batch", "pbatch", concurrency=20)  # resumes from the stored id
        deadline = time.monotonic() + 60
        while not status_of(http, created["id"])():
            assert time.monotonic() < deadline, "the resumed poller never finished the batch"
            time.sleep(0.2)
    finally:
        beat.stop()
    assert fresh_batch_apis.creates["anthropic"] == 1  # resumed, never resubmitted
    completed(http, created["id"], 4)
    assert all(r.attempts == 1 for r in item_rows(papp, created["id"]))


def test_the_sweeper_only_enqueues_and_the_batch_workers_call_the_provider(
    http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    """A slow provider holds a batch worker, never the sweeper's pass."""
    fresh_batch_apis.configure(create_delay_s=3.0, retrieve_delay_s=3.0)
    created = doc_batch(http, "openai/echo", 2)
    slowest = 0.0
    deadline = time.monotonic() + 60
    while not status_of(http, created["id"])():
        assert time.monotonic() < deadline, "the batch never ended"
        started = time.monotonic()
        with papp.app_context():
            sweeper.sweep()
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.1)
    assert slowest < 2.0, f"a sweep pass waited on the provider ({slowest:.1f}s)"
    assert fresh_batch_apis.creates["openai"] == 1
    assert http.get(f"/v1/document-batches/{created['id']}").json()["counts"]["succeeded"] == 2


def test_two_concurrent_submitters_create_one_provider_batch(
    http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    """Two senders of one provider batch row at once (two sweeps' tasks, a task delivered
    twice): one claims it, the other stands back; the provider sees one create."""
    from app.services.provider_batches import engine

    fresh_batch_apis.configure(create_delay_s=1.0)
    created = doc_batch(http, "anthropic/echo", 3)
    with papp.app_context():
        pb_id = engine.assign(created["id"], "anthropic", "anthropic/echo")
    assert pb_id is not None
    barrier = threading.Barrier(2)
    sent: list[int] = []

    def submitter() -> None:
        with papp.app_context():
            barrier.wait()
            sent.append(engine.send(pb_id))

    threads = [threading.Thread(target=submitter) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(sent) == [0, 1]
    assert fresh_batch_apis.creates["anthropic"] == 1
    sweep_until(papp, status_of(http, created["id"]))
    assert fresh_batch_apis.creates["anthropic"] == 1
    completed(http, created["id"], 3)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_provider_batch_created_but_not_recorded_is_found_not_created_again(
    provider: str, http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    """The create reached the provider but its answer was lost (as if the sender died
    before storing the id): the next send finds it by its marker and adopts it."""
    fresh_batch_apis.configure(lose_create_answers=1)
    created = doc_batch(http, f"{provider}/echo", 3)
    sweep_until(papp, status_of(http, created["id"]))
    assert fresh_batch_apis.creates[provider] == 1 and fresh_batch_apis.lists[provider] >= 1
    completed(http, created["id"], 3)
    rows = item_rows(papp, created["id"])
    sent = Counter(c for b in fresh_batch_apis.of_kind(provider) for c in b.custom_ids)
    assert sent == Counter({r.id: 1 for r in rows})
    assert all(r.attempts == 1 and r.output for r in rows)


def test_mock_provider_has_a_batch_api_too(http: httpx.Client, papp: Flask) -> None:
    created = doc_batch(http, "mock/echo", 3)
    assert created["route"]["executor"] == "provider"
    sweep_until(papp, status_of(http, created["id"]))
    batch = completed(http, created["id"], 3)
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
    completed(http, created["id"], 2)
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

    def applied() -> bool:  # the batch can end (all items written) before its row closes
        with papp.app_context():
            pb = db.session.scalar(
                select(ProviderBatch).where(ProviderBatch.batch_id == created["id"])
            )
            return pb is not None and pb.status == "applied"

    sweep_until(papp, lambda: status_of(http, created["id"])() and applied())
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
        assert not db.session().in_transaction()  # the poll goes on to other calls: no read held
    after = {
        r.id: (r.status, r.finished_at, r.attempts, r.cost_usd)
        for r in item_rows(papp, created["id"])
    }
    assert after == before
    assert http.get(f"/v1/document-batches/{created['id']}").json()["usage"] == tokens


def test_cancelling_a_standalone_provider_job_cancels_its_provider_batch(
    http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    fresh_batch_apis.configure(processing_s=5.0)
    body = {"model": "openai/echo", "mode": "batch", "messages": [{"role": "user", "content": "x"}]}
    job = http.post("/v1/jobs", json=body).json()
    assert job["route"]["executor"] == "provider"

    def sent() -> bool:
        row = pbatch_of(papp, job_id=job["id"])
        return row is not None and bool(row.remote_id)

    sweep_until(papp, sent)
    remote_id = pbatch_of(papp, job_id=job["id"]).remote_id
    cancelled = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert fresh_batch_apis.cancels[remote_id] == 1  # the provider was told
    sweep_until(papp, lambda: pbatch_of(papp, job_id=job["id"]).status == "applied")
    done = http.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "cancelled" and done["output"] is None and done["cost_usd"] == 0.0


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_jobs_api_batch_job_on_the_provider_executor(
    provider: str, http: httpx.Client, papp: Flask, upstream: FakeUpstream
) -> None:
    from app.services.provider_batches import engine

    body = {
        "model": f"{provider}/echo",
        "mode": "batch",
        "messages": [{"role": "user", "content": "one job"}],
    }
    job = http.post("/v1/jobs", json=body).json()
    assert job["route"]["executor"] == "provider"
    sweep_until(papp, lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded")
    done = http.get(f"/v1/jobs/{job['id']}").json()
    assert done["output"] == "one job" and done["attempts"] == 1
    with papp.app_context():  # announcing its end leaves no read transaction (and connection)
        engine._announce(pbatch_of(papp, job_id=job["id"]))
        assert not db.session().in_transaction()
    assert done["cost_usd"] == pytest.approx(batch_price(papp, done["model"], done["usage"]))
    assert sent_custom_ids(upstream, provider) == Counter({job["id"]: 1})


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_openai_compatible_batch_cost_cancel_and_expiry(
    provider: str,
    pweb: Stack,
    api_key: str,
    papp: Flask,
    upstream: FakeUpstream,
    fresh_batch_apis: BatchAPIs,
) -> None:
    """/v1/batches on the provider executor: cost at the batch price; cancel and the
    provider's expiry map onto the batch and onto each request's error line."""
    client = openai.OpenAI(base_url=pweb.url + "/v1", api_key=api_key, max_retries=0)

    def create(n: int) -> Any:
        lines = [
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": f"{provider}/echo", "messages": [{"role": "user",
                                                                 "content": f"q {i}"}]}}
            for i in range(n)
        ]  # fmt: skip
        return client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )

    def ended(batch_id: str) -> Callable[[], bool]:
        return lambda: client.batches.retrieve(batch_id).status in BATCH_TERMINAL

    done = create(2)
    sweep_until(papp, ended(done.id))
    for row in item_rows(papp, done.id):
        assert row.usage and row.cost_usd == pytest.approx(batch_price(papp, row.model, row.usage))
    fresh_batch_apis.configure(processing_s=30.0)
    cancelled = create(2)
    sweep_until(papp, lambda: fresh_batch_apis.creates[provider] >= 2)
    assert client.batches.cancel(cancelled.id).status == "cancelling"
    assert sum(fresh_batch_apis.cancels.values()) == 1
    sweep_until(papp, ended(cancelled.id))
    got = client.batches.retrieve(cancelled.id)
    assert got.status == "cancelled" and got.error_file_id
    errors = [json.loads(x) for x in client.files.content(got.error_file_id).text.splitlines()]
    assert sorted(e["custom_id"] for e in errors) == ["r0", "r1"]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    fresh_batch_apis.configure(expire_after_s=0.3)
    expired = create(2)
    sweep_until(papp, ended(expired.id))
    got = client.batches.retrieve(expired.id)
    assert got.status == "expired" and got.error_file_id
    errors = [json.loads(x) for x in client.files.content(got.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(provider in e["error"]["message"] for e in errors)  # the provider's own end


def test_a_provider_batch_past_the_byte_limit_is_split(
    http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    from app.services.provider_batches import engine

    docs = [{"id": f"d{i}", "text": f"{i} " + "x" * 500} for i in range(5)]
    body = {"model": "anthropic/echo", "instructions": "Repeat.", "documents": docs}
    created = http.post("/v1/document-batches", json=body).json()
    tables = dict(papp.config["PROVIDERS"])
    small = {**tables, "anthropic": {**tables.get("anthropic", {}), "batch_max_bytes": 2000}}
    with papp.app_context(), tuned(papp, PROVIDERS=small):
        assert engine.submit_group(created["id"], "anthropic", "anthropic/echo") >= 3
    sizes = sorted(len(b.custom_ids) for b in fresh_batch_apis.of_kind("anthropic"))
    assert sum(sizes) == 5 and max(sizes) <= 2
    sweep_until(papp, status_of(http, created["id"]))
    completed(http, created["id"], 5)
    assert all(r.attempts == 1 for r in item_rows(papp, created["id"]))


def test_a_window_shorter_than_the_providers_expires_on_time(
    http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    """completion_window 3s on the provider executor (whose window is 24h): the batch
    expires at its own window, and the provider batch is cancelled."""
    fresh_batch_apis.configure(processing_s=60.0)
    created = doc_batch(http, "openai/echo", 2, completion_window="3s")
    assert created["route"]["executor"] == "provider"
    sweep_until(papp, status_of(http, created["id"]), timeout=30)
    batch = http.get(f"/v1/document-batches/{created['id']}").json()
    assert batch["status"] == "expired" and batch["counts"]["expired"] == 2
    assert sum(fresh_batch_apis.cancels.values()) == 1  # the provider was told
    for row in item_rows(papp, created["id"]):
        assert row.status == "expired" and row.error and row.error["code"] == "batch_expired"


def test_a_window_longer_than_the_providers_resends_what_the_provider_expired(
    http: httpx.Client, papp: Flask, fresh_batch_apis: BatchAPIs
) -> None:
    """completion_window 48h: the provider's 24 h expiry (here, early) is not the batch's;
    the requests it expired go to a new provider batch, each answered once."""
    fresh_batch_apis.configure(processing_s=30.0, expire_after_s=0.3)
    created = doc_batch(http, "anthropic/echo", 2, completion_window="48h")
    sweep_until(papp, lambda: fresh_batch_apis.creates["anthropic"] >= 1)
    fresh_batch_apis.configure(processing_s=0.3, expire_after_s=None)  # the next one runs
    sweep_until(papp, status_of(http, created["id"]))
    completed(http, created["id"], 2)
    assert fresh_batch_apis.creates["anthropic"] == 2
    rows = item_rows(papp, created["id"])
    sent = Counter(c for b in fresh_batch_apis.of_kind("anthropic") for c in b.custom_ids)
    assert sent == Counter({r.id: 2 for r in rows})  # once per provider batch
    assert all(r.attempts == 1 and r.output for r in rows)


@pytest.mark.parametrize("how", ["refused", "cut", "expiry-refused", "job-refused"])
def test_a_cancel_the_provider_never_took_is_sent_again(
    how: str,
    http: httpx.Client,
    papp: Flask,
    fresh_batch_apis: BatchAPIs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The provider refused the cancel (a 500), or never got it (the process was cut after
    the commit): the polls tell it again, and everything ends cancelled within a few sweeps,
    not when the provider batch would have finished (60 s) or expired (24 h)."""
    from app.models import Batch
    from app.providers import ProviderError
    from app.services import batch_lifecycle, jobs
    from app.services.provider_batches import apis
    from app.services.stream_runner import CANCELLED_ERROR

    def refuse(self: Any, remote_id: str) -> None:
        raise ProviderError("openai: 500 on cancel", retryable=True, status_code=500)

    fresh_batch_apis.configure(processing_s=60.0)
    if how == "job-refused":
        body = {
            "model": "openai/echo",
            "mode": "batch",
            "messages": [{"role": "user", "content": "x"}],
        }
        job = http.post("/v1/jobs", json=body).json()
        batch_id, job_id = None, job["id"]
    else:
        window = {"completion_window": "3s"} if how == "expiry-refused" else {}
        batch_id, job_id = doc_batch(http, "openai/echo", 2, **window)["id"], None
    sweep_until(papp, lambda: bool(getattr(pbatch_of(papp, batch_id, job_id), "remote_id", None)))
    remote_id = pbatch_of(papp, batch_id, job_id).remote_id
    # in this process only: the batch workers that poll call the provider as it is
    monkeypatch.setattr(apis.OpenAIBatchAPI, "cancel", refuse)
    if how == "cut":
        monkeypatch.setattr(batch_lifecycle, "cancel_remote", lambda batch_id: None)
    with papp.app_context():
        if how == "job-refused":
            assert jobs.cancel_background_job(job_id, CANCELLED_ERROR)
        elif how != "expiry-refused":
            batch = db.session.get(Batch, batch_id)
            assert batch is not None and batch_lifecycle.cancel_batch(batch).status == "cancelling"
    # (not asserted here that it was not delivered: a worker's poll may already have told it)
    sweep_until(papp, lambda: pbatch_of(papp, batch_id, job_id).status == "applied", timeout=20)
    assert fresh_batch_apis.cancels[remote_id] >= 1
    assert fresh_batch_apis.items[remote_id].cancel_at is not None
    assert pbatch_of(papp, batch_id, job_id).remote_status == "cancelled"
    if batch_id is not None:
        sweep_until(papp, status_of(http, batch_id), timeout=10)
        batch = http.get(f"/v1/document-batches/{batch_id}").json()
        ended = "expired" if how == "expiry-refused" else "cancelled"
        assert batch["status"] == ended and batch["counts"][ended] == 2, batch
    else:
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
