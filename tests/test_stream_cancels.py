"""A cancel reaches a run that waits on a silent upstream at once, with no polling of the flag
while the worker's cancel listener hears; without it the run polls as before."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from flask import Flask

from app.extensions import db, redis_store
from app.models import Job
from app.services import stream_runner
from app.streams import cancels
from app.streams.cancels import CancelListener, cancel_listener
from app.streams.keys import cancel_key
from app.streams.writer import read_all, request_cancel
from tests.fake_upstream import FakeUpstream
from tests.helpers import insert_job, tenant_of, tuned, wait_row

LONG_LEASE = {"STREAM_LEASE_SECONDS": 600.0}  # no lease refresh (which reads the flag) in a test


def _silent_run(
    app: Flask, api_key: str, upstream: FakeUpstream
) -> tuple[str, dict[str, object], threading.Thread]:
    """A run, in a thread of its own, whose upstream says nothing for 30 s."""
    upstream.add_scenario("silent", tokens=5, ttft_ms=30_000)
    request = {"model": "openai/silent", "messages": [{"role": "user", "content": "x"}]}
    job_id = insert_job(tenant_of(api_key), "stream", "queued", request=request).id
    outcome: dict[str, object] = {}

    def run() -> None:
        with app.app_context(), tuned(app, **LONG_LEASE):
            outcome["status"] = stream_runner.run_stream_job(job_id, request, "cancel-worker")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return job_id, outcome, thread


@pytest.mark.timeout(60)
def test_a_run_waiting_on_a_silent_upstream_hears_a_cancel_at_once_without_polling(
    app_ctx: Flask, api_key: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With polling pushed out to a minute, only the listener can end the run in time."""
    monkeypatch.setattr(cancels, "POLL_SECONDS", 60.0)
    job_id, outcome, thread = _silent_run(app_ctx, api_key, upstream)
    wait_row(Job, job_id, "running")
    assert cancel_listener().hearing.wait(5), "the listener never heard its channel"
    asked = time.monotonic()
    request_cancel(redis_store.client, job_id)
    thread.join(20)
    assert outcome["status"] == "cancelled"
    assert time.monotonic() - asked < 2.0
    db.session.expire_all()
    job = db.session.get(Job, job_id)
    assert job is not None and job.status == "cancelled"
    assert read_all(redis_store.client, job_id)[-1][1]["t"] == "error"


@pytest.mark.timeout(60)
def test_while_no_listener_hears_a_run_polls_the_flag(
    app_ctx: Flask, api_key: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flag raised without its notice (as while the listener reconnects) is still seen,
    by polling, once the listener does not hear."""
    deaf = CancelListener(app_ctx.config["REDIS_URL"])
    deaf.close()  # never connects: never hears
    monkeypatch.setattr(stream_runner, "cancel_listener", lambda: deaf)
    monkeypatch.setattr(cancels, "POLL_SECONDS", 0.2)
    job_id, outcome, thread = _silent_run(app_ctx, api_key, upstream)
    wait_row(Job, job_id, "running")
    asked = time.monotonic()
    redis_store.client.set(cancel_key(job_id), "1", ex=60)  # the flag, and no notice
    thread.join(20)
    assert outcome["status"] == "cancelled"
    assert time.monotonic() - asked < 2.0


@pytest.mark.timeout(30)
def test_the_listener_wakes_only_the_cancelled_jobs_runs_and_all_of_them_after_a_reconnect(
    app_ctx: Flask,
) -> None:
    listener = CancelListener(app_ctx.config["REDIS_URL"])
    woken: list[str] = []
    heard = threading.Event()

    def wake_a() -> None:
        woken.append("a")
        heard.set()

    def wake_b() -> None:
        woken.append("b")
        heard.set()

    def cancelled(job_id: str) -> list[str]:
        woken.clear()
        heard.clear()
        request_cancel(redis_store.client, job_id)
        heard.wait(2)
        time.sleep(0.1)
        return list(woken)

    try:
        listener.watch("job_a", wake_a)
        listener.watch("job_b", wake_b)
        assert listener.hearing.wait(5)
        assert listener.poll_seconds() is None
        time.sleep(0.1)  # (the wake-up of every run once it hears)
        assert cancelled("job_b") == ["b"]
        listener.unwatch("job_b", wake_b)
        assert cancelled("job_b") == []
        listener.watch("job_b", wake_b)
        woken.clear()
        # its connection cut: every run is woken (back to polling), and again once it hears
        _kill_connection_of(listener)
        deadline = time.monotonic() + 5
        while woken.count("a") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert woken.count("a") >= 2 and woken.count("b") >= 2, woken
        assert listener.hearing.wait(5)
        assert listener.poll_seconds() is None
    finally:
        listener.close()


@pytest.mark.timeout(30)
def test_the_listener_keeps_its_connection_through_a_long_silence(app_ctx: Flask) -> None:
    """Longer than its connection's connect-and-subscribe timeout (5 s) with nothing to hear."""
    listener = CancelListener(app_ctx.config["REDIS_URL"])
    woken: list[int] = []
    try:
        listener.watch("job_quiet", lambda: woken.append(1))
        assert listener.hearing.wait(5)
        before = _client_ids(listener)
        time.sleep(6)
        assert listener.hearing.is_set()
        assert _client_ids(listener) == before and len(before) == 1
        assert woken == [1]  # only the look once it heard: no loss, no reconnect
    finally:
        listener.close()


def _client_ids(listener: CancelListener) -> list[int]:
    client = redis.Redis.from_url(listener.url)
    return [c["id"] for c in client.client_list() if c.get("name") == listener.client_name]


def _kill_connection_of(listener: CancelListener) -> None:
    """CLIENT KILL the listener's pub/sub connection (found by its client name)."""
    ours = _client_ids(listener)
    assert len(ours) == 1, ours
    redis.Redis.from_url(listener.url).client_kill_filter(_id=ours[0])
