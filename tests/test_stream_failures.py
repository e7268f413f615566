"""Stream failure semantics: retries before the first token, errors after it, cancel, crashes."""

from __future__ import annotations

import signal
import time
from datetime import timedelta

import httpx
import openai
import pytest
from flask import Flask

from app.extensions import db, redis_store
from app.models import Job, utcnow
from app.streams.keys import lease_key, log_key
from tests.fake_upstream import FakeUpstream
from tests.helpers import follow, read_sse, stream_chat
from tests.stack import Stack


def _job(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def test_retry_before_first_token(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("flaky", deltas=["ok ", "then"], status=503, fail_times=2)
    job_id = stream_chat(client, "openai/flaky")
    sse = follow(client, job_id)
    assert sse.done and sse.error is None and sse.text == "ok then"
    assert upstream.requests("flaky") == 3
    job = _job(client, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1


def test_retry_honours_retry_after(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("limited", deltas=["fine"], status=429, retry_after="1", fail_times=1)
    started = time.monotonic()
    job_id = stream_chat(client, "openai/limited")
    sse = follow(client, job_id)
    assert sse.text == "fine" and time.monotonic() - started >= 0.9


def test_non_retryable_error_before_first_token(
    client: httpx.Client, openai_client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    """Before the first token an upstream 400 is the answer's own status (stream or not)."""
    upstream.add_scenario("refuses", status=400, message="bad things")
    body = {"model": "openai/refuses", "messages": [{"role": "user", "content": "x"}]}
    streamed = client.post("/v1/chat/completions", json=body | {"stream": True})
    assert streamed.status_code == 400 and "bad things" in streamed.json()["error"]["message"]
    assert upstream.requests("refuses") == 1
    job = _job(client, streamed.headers["x-sluice-job-id"])
    assert job["status"] == "failed" and job["error"] == streamed.json()["error"]
    with pytest.raises(openai.BadRequestError, match="bad things"):
        list(
            openai_client.chat.completions.create(
                model="openai/refuses", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "bad things" in response.json()["error"]["message"]


def test_error_after_first_token_is_not_retried(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.add_scenario(
        "breaks", deltas=["one ", "two ", "three ", "four"], error_after=2, tps=100
    )
    job_id = stream_chat(client, "openai/breaks")
    sse = follow(client, job_id)
    assert sse.text == "one two " and sse.error is not None
    assert sse.events[-1]["data"] == "[DONE]" and sse.events[-1]["id"]
    assert upstream.requests("breaks") == 1
    job = _job(client, job_id)
    assert job["status"] == "failed" and job["output"] == "one two "
    assert job["error"]["type"] == "upstream_error"


def test_dropped_upstream_after_first_token(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("drops", deltas=["a", "b", "c"], drop_after=1, tps=100)
    job_id = stream_chat(client, "openai/drops")
    sse = follow(client, job_id)
    assert sse.text == "a" and sse.error is not None
    assert _job(client, job_id)["status"] == "failed"
    assert upstream.requests("drops") == 1


def test_cancel_a_running_stream(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("long", tokens=400, tps=40)
    body = {"model": "openai/long", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        job_id = response.headers["x-sluice-job-id"]
        lines = response.iter_lines()
        first = read_sse(response, max_events=2, lines=lines)
        started = time.monotonic()
        cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert time.monotonic() - started < 2.5
        rest = read_sse(response, lines=lines)
    assert rest.done and rest.error is not None and rest.error["code"] == "job_cancelled"
    job = _job(client, job_id)
    assert job["status"] == "cancelled"
    assert job["output"] and job["output"].startswith(first.text)
    assert job["output"] == first.text + rest.text
    deadline = time.monotonic() + 3
    while upstream.disconnects("long") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.disconnects("long") == 1, "the upstream stream was not closed"
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def _insert(app: Flask, tenant_key: str, **values: object) -> str:
    """A stream job row written directly (no task), for the queued and sweeper paths."""
    from app.auth import lookup_key

    with app.app_context():
        tenant_id = lookup_key(tenant_key).tenant_id
        job = Job(
            tenant_id=tenant_id,
            mode="stream",
            provider="mock",
            model="mock/echo",
            request={"model": "mock/echo", "messages": [{"role": "user", "content": "x"}]},
            **values,
        )
        db.session.add(job)
        db.session.commit()
        return job.id


def test_cancel_a_queued_job(client: httpx.Client, app: Flask, api_key: str) -> None:
    job_id = _insert(app, api_key)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    sse = follow(client, job_id)
    assert sse.done and sse.error["code"] == "job_cancelled"


def test_sweeper_fails_lost_and_stale_jobs(app: Flask, api_key: str, client: httpx.Client) -> None:
    from app.services.stream_runner import sweep_streams

    long_ago = utcnow() - timedelta(minutes=10)
    lost = _insert(app, api_key, status="running", started_at=long_ago, created_at=long_ago)
    stale = _insert(app, api_key, created_at=long_ago)
    fresh = _insert(app, api_key)
    with app.app_context():
        redis_store.client.xadd(log_key(lost), {"t": "delta", "d": "partial"})
        counts = sweep_streams(queued_timeout=60)
    assert counts["lost"] >= 1 and counts["unstarted"] >= 1
    job = _job(client, lost)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert job["output"] == "partial"
    assert _job(client, stale)["status"] == "failed"
    assert _job(client, stale)["error"]["code"] == "not_started"
    assert _job(client, fresh)["status"] == "queued"
    sse = follow(client, lost)
    assert sse.text == "partial" and sse.error["code"] == "worker_lost"


def test_killed_stream_worker(
    stack: Stack, client: httpx.Client, upstream: FakeUpstream, app: Flask
) -> None:
    upstream.add_scenario("victim", tokens=500, tps=20)
    stack.kill("stream", signal.SIGTERM)
    mine = stack.start_worker("stream", name="stream-victim", concurrency=5)
    try:
        stack.wait_ready()
        body = {
            "model": "openai/victim",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            job_id = response.headers["x-sluice-job-id"]
            lines = response.iter_lines()
            first = read_sse(response, max_events=3, lines=lines)
            assert len(first.events) == 3
            stack.kill(mine)
            killed_at = time.monotonic()
            rest = read_sse(response, lines=lines)
        waited = time.monotonic() - killed_at
        assert rest.done and rest.error is not None and rest.error["code"] == "worker_lost"
        assert waited < 3 * 2 + 2  # lease (3 s in tests) plus a relay wake-up or two
        job = _job(client, job_id)
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
        assert job["output"].startswith(first.text)
        with app.app_context():
            assert not redis_store.client.exists(lease_key(job_id))
    finally:
        if mine in stack.procs:
            stack.kill(mine)
        stack.start_worker("stream")
        stack.wait_ready()
