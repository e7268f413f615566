"""Stream admission: Redis-lease slots under real concurrency, each overflow mode, expiry."""

from __future__ import annotations

import secrets
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask

from app import admission
from app.auth import lookup_key
from app.errors import APIError
from app.extensions import redis_store
from app.models import new_id
from app.policy import Route
from app.services import stream_runner
from tests.fake_upstream import FakeUpstream
from tests.helpers import insert_job, web_with_config
from tests.stack import Stack


@pytest.fixture
def slots(app_ctx: Flask, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """A private global scope (so the live stack's streams don't count) and small limits."""
    monkeypatch.setattr(admission, "GLOBAL_KEY", f"sluice:slots:test:{secrets.token_hex(4)}")
    for name, value in {
        "STREAM_MAX_CONCURRENT": 4,
        "STREAM_MAX_PER_TENANT": 0,
        "STREAM_SLOT_QUEUED_SECONDS": 30.0,
        "STREAM_LEASE_SECONDS": 30.0,
    }.items():
        monkeypatch.setitem(app_ctx.config, name, value)
    yield app_ctx
    redis_store.client.delete(admission.GLOBAL_KEY)


def stream_route(**kw: Any) -> Route:
    return Route("stream", "test", "test", **kw)


def tenant() -> str:
    return new_id("ten_")


def race(app: Flask, n: int, fn: Any) -> list[Any]:
    """Run fn(i) on n real threads at once, each in an app context; exceptions are results."""

    def run(i: int) -> Any:
        with app.app_context():
            try:
                return fn(i)
            except APIError as exc:
                return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_more_streams_than_slots_reject_overflow(slots: Flask) -> None:
    t = tenant()
    jobs = [new_id("job_") for _ in range(20)]
    results = race(slots, 20, lambda i: admission.acquire_stream_slot(stream_route(), t, jobs[i]))
    held = [jobs[i] for i, r in enumerate(results) if r == "stream"]
    rejected = [r for r in results if isinstance(r, APIError)]
    assert len(held) == 4 and len(rejected) == 16
    assert all(r.status == 429 and r.headers["Retry-After"] == "1" for r in rejected)
    assert "All 4 stream slots are busy" in rejected[0].message
    assert admission.usage(t) == {"global": 4, "tenant": 4}
    # finishing gives the slot back; release is idempotent
    admission.release_stream_slot(held[0])
    admission.release_stream_slot(held[0])
    assert admission.usage(t)["global"] == 3
    assert admission.acquire_stream_slot(stream_route(), t, new_id("job_")) == "stream"
    for job in held[1:]:
        admission.release_stream_slot(job)


def test_per_tenant_limit_and_policy_override(slots: Flask) -> None:
    slots.config["STREAM_MAX_PER_TENANT"] = 2
    a, b = tenant(), tenant()
    got = race(slots, 6, lambda i: admission.acquire_stream_slot(stream_route(), a, new_id("job_")))
    assert got.count("stream") == 2
    err = next(r for r in got if isinstance(r, APIError))
    assert "This tenant already has 2 concurrent streams" in err.message
    assert err.body()["error"]["scope"] == "tenant"
    # another tenant still gets the remaining global slots
    assert admission.acquire_stream_slot(stream_route(), b, new_id("job_")) == "stream"
    # a per-tenant override from the policy (carried on the route) raises the limit
    assert admission.acquire_stream_slot(stream_route(tenant_max_streams=3), a, "j3") == "stream"
    with pytest.raises(APIError):
        admission.acquire_stream_slot(stream_route(tenant_max_streams=3), a, "j4")


def test_queue_overflow_waits_for_a_release(slots: Flask) -> None:
    t = tenant()
    holders = [new_id("job_") for _ in range(4)]
    for job in holders:
        assert admission.acquire_stream_slot(stream_route(), t, job) == "stream"
    route = stream_route(overflow="queue", queue_timeout=1.5)

    def waiter(i: int) -> Any:
        if i < 2:  # two threads release after a moment; the other three queue for slots
            time.sleep(0.3)
            admission.release_stream_slot(holders[i])
            return "released"
        start = time.monotonic()
        got = admission.acquire_stream_slot(route, t, f"waiter-{t}-{i}")
        return got, time.monotonic() - start

    results = race(slots, 5, waiter)
    waited = [r for r in results[2:] if isinstance(r, tuple)]
    timed_out = [r for r in results[2:] if isinstance(r, APIError)]
    assert len(waited) == 2 and len(timed_out) == 1  # two slots freed, three waiters
    assert all(got == "stream" and 0.2 < secs < 1.5 for got, secs in waited)
    assert timed_out[0].status == 429 and "waited 1." in timed_out[0].message


def test_queue_overflow_times_out(slots: Flask) -> None:
    slots.config["STREAM_MAX_CONCURRENT"] = 1
    t = tenant()
    assert admission.acquire_stream_slot(stream_route(), t, "holder") == "stream"
    start = time.monotonic()
    with pytest.raises(APIError) as err:
        admission.acquire_stream_slot(stream_route(overflow="queue", queue_timeout=0.5), t, "w")
    assert 0.45 < time.monotonic() - start < 3
    assert err.value.status == 429 and err.value.headers["Retry-After"]


def test_batch_overflow_and_non_stream_routes(slots: Flask) -> None:
    slots.config["STREAM_MAX_CONCURRENT"] = 1
    t = tenant()
    assert admission.acquire_stream_slot(stream_route(), t, "a") == "stream"
    spill = stream_route(overflow="batch", prefer_async=True)
    assert admission.acquire_stream_slot(spill, t, "b") == "batch"
    assert admission.usage()["global"] == 1  # the overflowed job holds no slot
    assert admission.acquire_stream_slot(Route("batch", "r", "x"), t, "c") == "batch"
    routed = admission.overflow_route(spill)
    assert routed.mode == "batch" and "no stream slot free" in routed.reason


def test_lease_expires_when_the_holder_dies(slots: Flask) -> None:
    """A holder that never renews (a killed worker) stops counting after its lease."""
    slots.config["STREAM_MAX_CONCURRENT"] = 2
    slots.config["STREAM_SLOT_QUEUED_SECONDS"] = 0.4
    slots.config["STREAM_LEASE_SECONDS"] = 0.4
    t = tenant()
    assert admission.acquire_stream_slot(stream_route(), t, "dead") == "stream"
    assert admission.acquire_stream_slot(stream_route(), t, "alive") == "stream"
    with pytest.raises(APIError):
        admission.acquire_stream_slot(stream_route(), t, "new")
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # "alive" renews, "dead" does not
        admission.renew_stream_slot("alive")
        time.sleep(0.1)
    assert admission.usage(t) == {"global": 1, "tenant": 1}
    assert admission.acquire_stream_slot(stream_route(), t, "new") == "stream"
    # a renew after release never resurrects the slot
    admission.release_stream_slot("alive")
    admission.renew_stream_slot("alive")
    assert admission.usage(t) == {"global": 1, "tenant": 1}


def test_acquire_is_idempotent_per_job(slots: Flask) -> None:
    slots.config["STREAM_MAX_CONCURRENT"] = 1
    t = tenant()
    assert admission.acquire_stream_slot(stream_route(), t, "same") == "stream"
    assert admission.acquire_stream_slot(stream_route(), t, "same") == "stream"
    assert admission.usage(t)["global"] == 1


# ---------------------------------------------------------------- through the live stack

LIVE_POLICY = """
[policy.limits]
max_streams_per_tenant = 2

[[policy.rules]]
name = "queue"
when = { metadata_keys = ["queue"] }
route = "stream"
overflow = "queue"
queue_timeout = 8

[[policy.rules]]
name = "spill"
when = { metadata_keys = ["spill"] }
route = "stream"
overflow = "batch"

[[policy.rules]]
name = "hangup"
when = { metadata_keys = ["hangup"] }
route = "stream"
on_disconnect = "cancel"

[[policy.rules]]
name = "interactive"
route = "stream"
"""

SLOW = "mock/slow?length=30&tps=20&ttft_ms=10"  # about 1.5 s a stream
QUICK = "mock/quick?length=3"


@pytest.fixture(scope="module")
def policy_web(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A second web process (same DB, Redis, workers) reading its own policy file."""
    with web_with_config(stack, tmp_path_factory.mktemp("policy-web"), LIVE_POLICY) as web:
        yield web


@pytest.fixture
def live(policy_web: tuple[str, Path], api_key: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=policy_web[0], headers=headers, timeout=30) as http:
        yield http


def tenant_of(app: Flask, api_key: str) -> str:
    with app.app_context():
        found = lookup_key(api_key)
        assert found is not None
        return found.tenant_id


def body(model: str = SLOW, **metadata: str) -> dict[str, Any]:
    return {"model": model, "document": "hello", "metadata": metadata}


def open_stream(http: httpx.Client, payload: dict[str, Any], **headers: str) -> httpx.Response:
    """POST /v1/jobs and return the open streamed response (headers read, body not)."""
    request = http.build_request("POST", "/v1/jobs", json=payload, headers=headers)
    return http.send(request, stream=True)


def job_id_of(response: httpx.Response) -> str:
    return response.headers["Location"].rsplit("/", 1)[1]


def slots_in_use(app: Flask, tenant_id: str) -> int:
    with app.app_context():
        return admission.usage(tenant_id)["tenant"]


def wait_until(check: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_live_reject_overflow_and_release_on_finish(
    live: httpx.Client, app: Flask, api_key: str
) -> None:
    tid = tenant_of(app, api_key)
    held = [open_stream(live, body()) for _ in range(2)]
    try:
        assert [r.status_code for r in held] == [200, 200]
        assert slots_in_use(app, tid) == 2
        over = live.post("/v1/jobs", json=body())
        assert over.status_code == 429, over.text
        assert over.headers["Retry-After"] == "1"
        assert over.headers["X-Sluice-Route"] == "stream; rule=interactive"
        assert over.json()["error"]["code"] == "stream_capacity_exceeded"
        for response in held:  # read each stream to its end: the worker releases the slot
            response.read()
    finally:
        for response in held:
            response.close()
    wait_until(lambda: slots_in_use(app, tid) == 0)
    with closing(open_stream(live, body(QUICK))) as again:
        assert again.status_code == 200


def test_live_queue_overflow_waits_for_a_slot(live: httpx.Client, app: Flask) -> None:
    held = [open_stream(live, body()) for _ in range(2)]
    try:
        start = time.monotonic()
        with closing(open_stream(live, body(QUICK, queue="1"))) as queued:
            waited = time.monotonic() - start
            assert queued.status_code == 200
            assert queued.headers["X-Sluice-Route"] == "stream; rule=queue"
            queued.read()
        assert 0.5 < waited < 8  # it waited for one of the slow streams to finish
    finally:
        for response in held:
            response.close()


def test_live_batch_overflow_needs_respond_async(live: httpx.Client) -> None:
    held = [open_stream(live, body()) for _ in range(2)]
    try:
        spilled = live.post(
            "/v1/jobs", json=body(QUICK, spill="1"), headers={"Prefer": "respond-async"}
        )
        assert spilled.status_code == 202, spilled.text
        assert spilled.headers["Preference-Applied"] == "respond-async"
        assert spilled.headers["X-Sluice-Route"] == "batch; rule=spill"
        job = spilled.json()
        assert job["mode"] == "batch" and "no stream slot free" in job["route"]["reason"]
        refused = live.post("/v1/jobs", json=body(QUICK, spill="1"))
        assert refused.status_code == 429  # without Prefer: respond-async it cannot spill
    finally:
        for response in held:
            response.close()


def test_live_cancel_and_disconnect_cancel_release_slots(
    live: httpx.Client, app: Flask, api_key: str
) -> None:
    tid = tenant_of(app, api_key)
    kept = open_stream(live, body())
    hangup = open_stream(live, body(hangup="1"))
    try:
        assert slots_in_use(app, tid) == 2
        cancelled = live.post(f"/v1/jobs/{job_id_of(kept)}/cancel").json()
        wait_until(lambda: slots_in_use(app, tid) == 1)
        assert cancelled["status"] in ("cancelled", "running")
        hangup_id = job_id_of(hangup)
        next(hangup.iter_lines())  # the stream is live; now the client goes away
        hangup.close()
        wait_until(lambda: slots_in_use(app, tid) == 0)
        job = live.get(f"/v1/jobs/{hangup_id}").json()
        wait_until(lambda: live.get(f"/v1/jobs/{hangup_id}").json()["status"] == "cancelled")
        assert job["route"]["rule"] == "hangup"
        assert job["route"]["on_disconnect"] == "cancel"
    finally:
        kept.close()
        hangup.close()


def test_live_resumed_relay_honours_disconnect_cancel(live: httpx.Client) -> None:
    """The rule's on_disconnect is kept on the job, so a resumed relay's hang-up cancels too."""
    original = open_stream(live, body(hangup="1"))
    job_id = job_id_of(original)
    try:
        with live.stream("GET", f"/v1/jobs/{job_id}/events") as resumed:
            next(resumed.iter_lines())  # live; now this second client goes away
        wait_until(lambda: live.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled")
    finally:
        original.close()


def test_live_killed_worker_slot_expires(
    stack: Stack, live: httpx.Client, app: Flask, api_key: str
) -> None:
    """A stream worker killed mid-job stops renewing; its slot lapses with the lease."""
    tid = tenant_of(app, api_key)
    stack.kill("stream", signal.SIGTERM)  # the session's worker would take most of the jobs
    name = stack.start_worker("stream", "adm-kill")
    try:
        stack.wait_ready()
        deadline = time.monotonic() + 20
        victim: str | None = None
        while victim is None:  # until a job lands on our own worker
            assert time.monotonic() < deadline, "no job reached the adm-kill worker"
            response = open_stream(live, body("mock/slow?length=200&tps=20&ttft_ms=10"))
            job_id = job_id_of(response)
            response.close()
            wait_until(lambda j=job_id: live.get(f"/v1/jobs/{j}").json()["worker"], 10)
            worker = live.get(f"/v1/jobs/{job_id}").json()["worker"] or ""
            if worker.startswith("adm-kill"):
                victim = job_id
            else:
                live.post(f"/v1/jobs/{job_id}/cancel")
                wait_until(lambda: slots_in_use(app, tid) == 0)
        assert slots_in_use(app, tid) == 1
        lease = float(stack.env["SLUICE_STREAM_LEASE_SECONDS"])
        time.sleep(lease / 3 + 0.5)  # the worker has renewed: the slot now lives by its lease
    finally:
        stack.kill(name)
    start = time.monotonic()
    try:
        wait_until(lambda: slots_in_use(app, tid) == 0, timeout=lease + 10)
        assert time.monotonic() - start < lease + 10
    finally:
        stack.start_worker("stream")
        stack.wait_ready()


BLOCKING_RULE = """
[[policy.rules]]
name = "blocked"
when = { metadata_keys = ["blocked"] }
route = "reject"
status = 403
message = "blocked by {rule}"
"""

BROKEN_RULE = """
[[policy.rules]]
name = "broken"
route = "stream"
overflow = "sideways"
"""


def test_live_policy_reloads_when_the_file_changes(
    policy_web: tuple[str, Path], live: httpx.Client
) -> None:
    """The web process picks up an edited file; an invalid edit keeps the last good policy."""
    _, path = policy_web
    payload = body(QUICK, blocked="1")
    try:
        # rules are an array: appending a table puts it at the end, so put it first instead
        path.write_text(
            LIVE_POLICY.replace("[[policy.rules]]", BLOCKING_RULE + "\n[[policy.rules]]", 1)
        )
        wait_until(
            lambda: live.post("/v1/jobs", json=payload | {"mode": "batch"}).status_code == 403, 10
        )
        refused = live.post("/v1/jobs", json=payload)
        assert refused.json()["error"]["message"] == "blocked by blocked"
        assert refused.headers["X-Sluice-Route"] == "reject; rule=blocked"

        path.write_text(BROKEN_RULE + path.read_text())
        time.sleep(2.5)  # past the reload check: the broken file was read and refused
        still = live.post("/v1/jobs", json=payload | {"mode": "batch"})
        assert still.status_code == 403  # the last good policy is still in force
        log = (path.parent / "web.log").read_text()
        assert "policy reload failed, keeping the last good policy" in log
        assert "policy rule 'broken': overflow must be one of" in log
    finally:
        path.write_text(LIVE_POLICY)
    # back to the original rules: the catch-all streams it
    wait_until(lambda: live.post("/v1/jobs", json=payload).status_code == 200, 10)


@pytest.mark.timeout(60)
def test_a_running_stream_keeps_its_slot_past_its_lease_and_gives_it_back_at_the_end(
    slots: Flask, api_key: str, upstream: FakeUpstream
) -> None:
    """The run renews its slot with its lease (in the same round trip): a stream that lasts
    two leases keeps its slot to its end, then gives it back."""
    slots.config["STREAM_LEASE_SECONDS"] = 0.6
    slots.config["STREAM_SLOT_QUEUED_SECONDS"] = 0.6
    upstream.add_scenario("outlives-lease", tokens=6, tps=2.5, ttft_ms=10)  # 2 s
    request = {"model": "openai/outlives-lease", "messages": [{"role": "user", "content": "x"}]}
    owner = tenant_of(slots, api_key)
    job_id = insert_job(owner, "stream", "queued", request=request).id
    assert admission.acquire_stream_slot(stream_route(), owner, job_id) == "stream"
    outcome: list[str] = []

    def run() -> None:
        with slots.app_context():
            outcome.append(stream_runner.run_stream_job(job_id, request, "slot-worker"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(1.3)  # two leases in, still streaming
    assert not outcome
    assert admission.usage(owner)["global"] == 1
    thread.join(20)
    assert outcome == ["succeeded"]
    assert admission.usage(owner)["global"] == 0
