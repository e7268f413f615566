"""Stream failure semantics: retries before the first token, errors after it, cancel, crashes."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest
import redis
from flask import Flask
from sqlalchemy import select

from app.extensions import db, redis_store
from app.models import Job, utcnow
from app.queueing import STREAM_QUEUE
from app.services import jobs, stream_runner
from app.streams.keys import lease_key, log_key
from tests.fake_upstream import FakeUpstream
from tests.helpers import SSE, app_client, follow, read_sse, stream_chat, tenant_of
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


def _until(lines: Iterator[str], deadline: float) -> Iterator[str]:
    """An SSE body's lines until the deadline (the relay's pings keep them coming)."""
    for line in lines:
        yield line
        if time.monotonic() > deadline:
            return


def test_a_stream_whose_task_was_lost_still_streams(
    stack: Stack, client: httpx.Client, upstream: FakeUpstream, app: Flask
) -> None:
    """The task is lost before a worker took the job (its worker died with it prefetched):
    the sweep sends it again, and the client waiting on the stream gets it within ~30 s."""
    upstream.add_scenario("lost-task", deltas=["found ", "again"])
    body = {"model": "openai/lost-task", "messages": [{"role": "user", "content": "x"}]}
    stack.kill("stream", signal.SIGTERM)  # the queue keeps the task meanwhile
    started = time.monotonic()
    got: dict[str, Any] = {}

    def consume() -> None:
        with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            got["sse"] = read_sse(r, lines=_until(r.iter_lines(), started + 40))
            got["at"] = time.monotonic()

    reader = threading.Thread(target=consume, daemon=True)
    try:
        with app.app_context():
            reader.start()
            queue = redis_store.client
            while not queue.llen(STREAM_QUEUE):
                assert time.monotonic() < started + 10, "the task was never sent"
                time.sleep(0.05)
            queue.delete(STREAM_QUEUE)  # lost
            stack.start_worker("stream")
            stack.wait_ready()
            while reader.is_alive():  # as beat's sweeper does, every second here
                stream_runner.sweep_streams()
                reader.join(1)
    finally:
        if "stream" not in stack.procs:
            stack.start_worker("stream")
            stack.wait_ready()
    sse: SSE = got["sse"]
    assert sse.done and sse.error is None and sse.text == "found again", sse
    assert got["at"] - started < 30, f"streamed after {got['at'] - started:.1f}s"


def test_a_failed_send_ends_the_job_before_the_client_is_told_to_retry(
    stack: Stack, app: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 asks for a retry, so the job it was about must never run (as a second copy)."""

    def refused(*_: Any, **__: Any) -> None:
        raise redis.ConnectionError("Error 111 connecting to redis. Connection refused.")

    http = app_client(app, api_key)
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with app.app_context():
        for also_the_log in (False, True):
            monkeypatch.setattr(jobs, "push_task", refused)
            if also_the_log:  # Redis refuses the log's error entry too: the row alone ends
                monkeypatch.setattr(stream_runner, "write_terminal", refused)
            answer = http.post("/v1/chat/completions", json=body)
            monkeypatch.undo()
            assert answer.status_code == 503, answer.get_data(as_text=True)
            db.session.remove()
            rows = db.session.scalars(
                select(Job).where(Job.tenant_id == tenant_of(api_key)).order_by(Job.created_at)
            ).all()
            assert len(rows) == 1 + also_the_log
            assert rows[-1].status == "failed" and rows[-1].error["code"] == "not_started"
