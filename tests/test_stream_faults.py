"""Faults on the stream channel: terminal writes cut in two, leases taken over, Redis gone."""

from __future__ import annotations

import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask import Flask
from sqlalchemy import select

from app import embedded_redis
from app.extensions import db, redis_store
from app.models import Job
from app.providers.base import text_delta
from app.services.stream_runner import sweep_streams
from app.streams.cancels import CancelListener
from app.streams.entries import done_fields, error_fields
from app.streams.hub import StreamHub, Tail
from app.streams.keys import cancel_key, lease_key
from app.streams.relay import sse_body
from app.streams.render import ChunkRenderer
from app.streams.writer import DeltaLog, LostLease, release_lease, write_terminal
from tests.fake_upstream import FakeUpstream
from tests.helpers import hub_hears, read_sse
from tests.stack import Stack

LEASE = 3.0  # SLUICE_STREAM_LEASE_SECONDS in the test settings


def _content(text: str) -> list[dict]:
    return [{"index": 0, "delta": {"content": text}}]


def test_a_refresh_raises_for_its_lease_not_for_what_it_also_renews(app_ctx: Flask) -> None:
    """The run's slot renewal rides the lease refresh's round trip; its failure is logged."""
    client = redis_store.client
    job = f"job_also_{secrets.token_hex(4)}"
    mine = DeltaLog(client, job, running_ttl=60, final_ttl=60, token="A", lease_seconds=5)
    client.set(lease_key(job), "A", px=5000)
    queued: list[str] = []

    def also(pipe: Any) -> None:
        queued.append("renewal")
        pipe.lpush(lease_key(job), "x")  # WRONGTYPE: a failing renewal

    assert mine.refresh(also=also) is False and queued == ["renewal"]
    client.set(cancel_key(job), "1", ex=60)
    assert mine.refresh(also=also) is True
    client.set(lease_key(job), "B", px=5000)
    with pytest.raises(LostLease):
        mine.refresh(also=also)


def test_lease_is_compare_and_set(app_ctx: Flask) -> None:
    client = redis_store.client
    job = f"job_cas_{secrets.token_hex(4)}"
    mine = DeltaLog(client, job, running_ttl=60, final_ttl=60, token="A", lease_seconds=5)
    client.set(lease_key(job), "A", px=5000)
    assert mine.append(_content("one")) is False
    assert mine.refresh() is False
    client.set(lease_key(job), "B", px=5000)  # the job was declared lost and taken by B
    with pytest.raises(LostLease):
        mine.refresh()
    with pytest.raises(LostLease):
        mine.append(_content("two"))
    assert not mine.end(done_fields("stop", None))
    assert not release_lease(client, job, "A")
    assert client.get(lease_key(job)) == "B", "A renewed or released B's lease"
    assert release_lease(client, job, "B") and not client.exists(lease_key(job))

    # declared lost: no lease, and a repair ended the log; the stalled holder comes back
    assert write_terminal(client, job, error_fields({"code": "worker_lost"}), 60)
    with pytest.raises(LostLease):
        mine.append(_content("late"))
    with pytest.raises(LostLease):
        mine.refresh()
    assert not client.exists(lease_key(job)), "a lost holder re-created its lease"
    assert not write_terminal(client, job, error_fields({"code": "again"}), 60), "two ends"

    # a lease that merely lapsed (nobody took the job, the log goes on): the holder goes on
    other = f"job_cas_{secrets.token_hex(4)}"
    lapsed = DeltaLog(client, other, running_ttl=60, final_ttl=60, token="C", lease_seconds=5)
    assert lapsed.append(_content("x")) is False
    assert client.get(lease_key(other)) == "C"
    client.delete(lease_key(other))
    assert lapsed.refresh() is False and client.get(lease_key(other)) == "C"
    # a repair may end a job only while nobody holds it
    assert not write_terminal(client, other, error_fields({"code": "worker_lost"}), 60)
    assert lapsed.end(done_fields("stop", None))


@pytest.fixture
def faulty_worker(stack: Stack) -> Iterator[Callable[[str], str]]:
    """Replace the stream worker by one that dies at a given point of a job's end."""
    started: list[str] = []

    def start(mode: str) -> str:
        stack.kill("stream", signal.SIGTERM)
        saved = stack.env
        stack.env = {**saved, "SLUICE_TEST_STREAM_FAULT": mode}
        try:
            name = stack.start_worker("stream", name=f"stream-{mode}", concurrency=5)
        finally:
            stack.env = saved
        started.append(name)
        stack.wait_ready()
        return name

    yield start
    for name in started:
        if name in stack.procs:
            stack.kill(name)
    stack.start_worker("stream")
    stack.wait_ready()


def _stream(client: httpx.Client, model: str) -> tuple[str, object, float]:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=25) as response:
        job_id = response.headers["x-sluice-job-id"]
        lines = response.iter_lines()
        first = read_sse(response, max_events=1, lines=lines)
        started = time.monotonic()
        rest = read_sse(response, lines=lines)
    return job_id, (first, rest), time.monotonic() - started


def test_worker_killed_between_row_commit_and_log_end(
    faulty_worker: Callable[[str], str], client: httpx.Client, upstream: FakeUpstream
) -> None:
    """The row is finished, the log never got its end: the relay writes it from the row."""
    upstream.add_scenario("fault-before", deltas=["one ", "two ", "three"], tps=50)
    faulty_worker("exit_before_terminal")
    job_id, (first, rest), waited = _stream(client, "openai/fault-before")
    assert rest.done and rest.error is None
    assert first.text + rest.text == "one two three"
    assert waited < LEASE + 4, f"the relay waited {waited:.1f}s for the end"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["output"] == "one two three"


def test_worker_killed_between_log_end_and_row_commit(
    faulty_worker: Callable[[str], str], client: httpx.Client, upstream: FakeUpstream, app: Flask
) -> None:
    """The log ended, the row did not: clients are done, and the row takes the log's end."""
    upstream.add_scenario("fault-after", deltas=["un ", "deux ", "trois"], tps=50)
    faulty_worker("exit_after_terminal")
    job_id, (first, rest), waited = _stream(client, "openai/fault-after")
    assert rest.done and rest.error is None and first.text + rest.text == "un deux trois"
    assert waited < 2
    shown = client.get(f"/v1/jobs/{job_id}").json()
    assert shown["status"] == "succeeded" and shown["output"] == "un deux trois"
    assert shown["finish_reason"] == "stop" and shown["error"] is None
    seen = {"Last-Event-ID": rest.last_id}  # the client saw [DONE]: nothing to wait for
    assert client.get(f"/v1/jobs/{job_id}/events", headers=seen, timeout=10).status_code == 204
    timings = shown["timings"]  # the row is still `running`: the times are the log's
    assert 0 <= timings["queued_ms"] <= timings["ttft_ms"] <= timings["duration_ms"]
    deadline = time.monotonic() + 3 * LEASE + 5
    row = None
    with app.app_context():
        while time.monotonic() < deadline:
            sweep_streams()
            row = db.session.execute(
                select(Job.status, Job.output, Job.finish_reason).where(Job.id == job_id)
            ).first()
            db.session.commit()
            if row is not None and row.status != "running":
                break
            time.sleep(0.5)
    assert row is not None and tuple(row) == ("succeeded", "un deux trois", "stop")


def test_relay_that_loses_redis_ends_in_band(tmp_path: Path) -> None:
    """Redis goes away under an open relay: pings, then an error event and [DONE]."""
    url, proc = embedded_redis.start(tmp_path / "redis")
    hub = StreamHub(url)
    try:
        client = redis.Redis.from_url(url, decode_responses=True)
        job = "job_outage"
        client.set(lease_key(job), "T", px=60_000)
        dlog = DeltaLog(client, job, running_ttl=60, final_ttl=60, token="T", lease_seconds=60)
        dlog.append(_content("hello "))
        tail = Tail(hub, job, lease_seconds=60, ping_seconds=0.2, running=True)
        tail.outage_seconds = 1.5
        body = iter(sse_body(tail, ChunkRenderer(job, "m", 0, False), 1000, lambda _: None))
        assert next(body).startswith("retry:")
        assert '"content":"hello "' in next(body)
        proc.kill()
        proc.wait(10)
        started = time.monotonic()
        rest = "".join(body)
        assert time.monotonic() - started < 10
        assert ": ping" in rest
        assert '"code": "stream_unavailable"' in rest
        assert rest.endswith("data: [DONE]\n\n")
    finally:
        hub.close()
        if proc.poll() is None:
            proc.kill()


def test_relay_resumes_when_redis_comes_back(tmp_path: Path) -> None:
    """Redis restarts within the relay's patience: pings meanwhile, then the rest, no error."""
    home = tmp_path / "redis"
    url, proc = embedded_redis.start(home)
    port = embedded_redis.port_of(url)
    hub = StreamHub(url)
    try:
        client = redis.Redis.from_url(url, decode_responses=True)
        job = "job_restart"
        client.set(lease_key(job), "T", px=60_000)
        dlog = DeltaLog(client, job, running_ttl=60, final_ttl=60, token="T", lease_seconds=60)
        dlog.append(_content("hello "))
        tail = Tail(hub, job, lease_seconds=60, ping_seconds=0.2, running=True)
        tail.outage_seconds = 30
        body = iter(sse_body(tail, ChunkRenderer(job, "m", 0, False), 1000, lambda _: None))
        assert next(body).startswith("retry:")
        assert '"content":"hello "' in next(body)
        proc.terminate()  # AOF on: the log survives the restart
        proc.wait(10)
        assert next(body).startswith(": ping")
        proc = embedded_redis.start(home, port)[1]
        dlog.append(_content("world"))
        dlog.finish("stop", None)
        rest = "".join(body)
        assert '"content":"world"' in rest and "error" not in rest
        assert rest.endswith("data: [DONE]\n\n")
    finally:
        hub.close()
        if proc.poll() is None:
            proc.kill()


def test_lost_redis_keeps_the_streamed_text_in_the_row(app_ctx: Flask, api_key: str) -> None:
    """The log's end cannot be written (Redis gone): the row still ends, with what was sent."""
    from app.providers.base import ChatRequest
    from app.services import stream_runner
    from tests.helpers import insert_job, tenant_of

    job = insert_job(tenant_of(api_key), "stream", "running")
    job_id = job.id
    # a port bound here and never listened on refuses connections, and no other process
    # (another session's Redis on a shared box) can take it meanwhile
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = redis.Redis(host="127.0.0.1", port=closed.getsockname()[1], decode_responses=True)
        dlog = DeltaLog(dead, job_id, running_ttl=60, final_ttl=60, token="T")
        request = ChatRequest("mock/echo", [{"role": "user", "content": "x"}])
        listener = CancelListener(app_ctx.config["REDIS_URL"])  # (never started)
        run = stream_runner._Run(job_id, request, dlog, "T", 60.0, window=0.0, cancels=listener)
        run.generation.add_choices([text_delta("sent "), text_delta("to the client")])
        error = {"message": "x", "type": "service_unavailable", "code": "stream_unavailable"}
        fields = error_fields(error)
        assert stream_runner._close(run, "failed", fields, usage=None, error=error) == "failed"
    row = db.session.execute(select(Job.status, Job.output).where(Job.id == job_id)).first()
    db.session.commit()
    assert row is not None and tuple(row) == ("failed", "sent to the client")


def test_a_delta_wakes_only_the_hubs_that_relay_its_job(app_ctx: Flask) -> None:
    """Each web process's hub hears the notices of the jobs it relays, not every job's: a
    busy job's deltas never reach a hub relaying another job, nor an idle one."""
    url = app_ctx.config["REDIS_URL"]
    client = redis_store.client
    relaying, other, idle = StreamHub(url), StreamHub(url), StreamHub(url)
    jobs = [f"job_fan_{secrets.token_hex(4)}" for _ in range(2)]
    try:
        tails = [
            Tail(hub, job, lease_seconds=60, ping_seconds=5)
            for hub, job in zip((relaying, other), jobs, strict=True)
        ]
        for tail in tails:
            assert hub_hears(tail)
        idle.feed()
        assert idle.connected.wait(5)
        client.set(lease_key(jobs[0]), "T", px=60_000)
        dlog = DeltaLog(client, jobs[0], running_ttl=60, final_ttl=60, token="T", lease_seconds=60)
        for word in ("un ", "deux ", "trois"):
            dlog.append(_content(word))
        dlog.finish("stop", None)
        texts = [fields.get("d") for _, fields in tails[0].follow() if fields]  # type: ignore[misc]
        assert texts == ["un ", "deux ", "trois", None]
        assert relaying.heard == 4
        assert other.heard == 0 and idle.heard == 0
        tails[1].close()
    finally:
        for hub in (relaying, other, idle):
            hub.close()


def test_a_hub_that_reconnects_hears_its_jobs_again(app_ctx: Flask) -> None:
    """The hub's pub/sub connection is killed under an open relay: it subscribes again to
    the job's channel, wakes the relay for what it missed, and hears the later deltas."""
    url = app_ctx.config["REDIS_URL"]
    client = redis_store.client
    hub = StreamHub(url)
    job = f"job_resub_{secrets.token_hex(4)}"
    try:
        tail = Tail(hub, job, lease_seconds=60, ping_seconds=0.2, running=True)
        assert hub_hears(tail)
        client.set(lease_key(job), "T", px=60_000)
        dlog = DeltaLog(client, job, running_ttl=60, final_ttl=60, token="T", lease_seconds=60)
        dlog.append(_content("before "))
        entries = tail.follow()
        assert next(entries)[1]["d"] == "before "  # type: ignore[index]
        hub.connected.clear()
        host, port = hub._wire.connection._sock.getsockname()[:2]  # type: ignore[union-attr]
        assert client.client_kill(f"{host}:{port}")  # this hub's connection only
        dlog.append(_content("missed "))  # published while the hub may be away
        deadline = time.monotonic() + 10
        while not hub.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.connected.is_set()
        heard = hub.heard
        dlog.append(_content("after"))
        dlog.finish("stop", None)
        texts = [item[1].get("d") for item in entries if item is not None]
        assert texts == ["missed ", "after", None]
        assert hub.heard > heard  # heard on its new connection, not only read after a wake
    finally:
        hub.close()
