"""The operators' dashboard: admin access, JSON views, the live feed and the page in a browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from flask import Flask
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.models import Batch, Job, utcnow
from app.services import events, sweeper
from tests.helpers import insert_batch, insert_job, tenant_of
from tests.stack import Stack


def login_link(stack: Stack, admin_key: str) -> str:
    """A one-time sign-in link (path and query) for a browser."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    response = httpx.post(f"{stack.url}/dashboard/login-link", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    url: str = response.json()["url"]
    return url


@pytest.fixture
def dash(stack: Stack, admin_key: str) -> Iterator[httpx.Client]:
    """An HTTP client signed in to the dashboard through the form."""
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        response = http.post("/dashboard/login", data={"key": admin_key})
        assert response.status_code == 302
        assert response.headers["location"] == "/dashboard/"
        yield http


def test_dashboard_needs_an_admin_key(stack: Stack, api_key: str) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        page = http.get("/dashboard/")
        assert page.status_code == 302
        assert page.headers["location"].startswith("/dashboard/login")
        for path in ("/dashboard/api/summary", "/dashboard/api/jobs", "/dashboard/stream"):
            response = http.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "unauthorized"
        login = http.get("/dashboard/login")
        assert login.status_code == 200 and "Admin API key" in login.text

        # A tenant's ordinary key is not enough, by form or by ?key=, and is never echoed.
        refused = http.post("/dashboard/login", data={"key": api_key})
        assert refused.status_code == 401
        assert api_key not in refused.text and "not a live admin key" in refused.text
        by_query = http.get("/dashboard/", params={"key": api_key})
        assert by_query.status_code == 400 and api_key not in by_query.text
        assert http.get("/dashboard/api/summary").status_code == 401


def test_login_form_and_logout(stack: Stack, admin_key: str) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        signed_in = http.post(
            "/dashboard/login", data={"key": admin_key, "next": "/dashboard/?x=1"}
        )
        assert signed_in.status_code == 302 and signed_in.headers["location"] == "/dashboard/?x=1"
        cookie = signed_in.headers["set-cookie"]
        assert admin_key not in cookie and "HttpOnly" in cookie
        assert http.get("/dashboard/api/summary").status_code == 200
        page = http.get("/dashboard/")
        assert page.status_code == 200 and admin_key not in page.text
        assert http.post("/dashboard/logout").status_code == 302
        assert http.get("/dashboard/api/summary").status_code == 401

        # An open redirect through `next` is refused.
        bounced = http.post("/dashboard/login", data={"key": admin_key, "next": "//evil.test/"})
        assert bounced.headers["location"] == "/dashboard/"


def test_a_key_in_the_url_neither_signs_in_nor_out(
    dash: httpx.Client, stack: Stack, admin_key: str, api_key: str
) -> None:
    """`?key=` would leave the key in proxy logs, and a link could sign the admin out."""
    with httpx.Client(base_url=stack.url, timeout=10) as fresh:
        refused = fresh.get("/dashboard/", params={"key": admin_key})
        assert refused.status_code == 400 and "form" in refused.text
        assert admin_key not in refused.text and "set-cookie" not in refused.headers
        assert fresh.get("/dashboard/api/summary").status_code == 401
    bad = dash.get("/dashboard/", params={"key": api_key, "x": "1"})
    assert bad.status_code == 302 and bad.headers["location"] == "/dashboard/?x=1"
    assert dash.get("/dashboard/login", params={"token": "forged"}).status_code == 401
    assert dash.get("/dashboard/api/summary").status_code == 200  # still signed in


def test_one_time_login_link(stack: Stack, admin_key: str, api_key: str) -> None:
    link = login_link(stack, admin_key)
    assert admin_key not in link
    with httpx.Client(base_url=stack.url, timeout=10) as browser:
        assert browser.get(link).status_code == 302
        assert browser.get("/dashboard/api/summary").status_code == 200
    with httpx.Client(base_url=stack.url, timeout=10) as again:
        assert again.get(link).status_code == 401  # used up
        assert again.get("/dashboard/api/summary").status_code == 401
    tenant = httpx.post(
        f"{stack.url}/dashboard/login-link", headers={"Authorization": f"Bearer {api_key}"}
    )
    assert tenant.status_code == 401


def test_session_cookie_is_secure_over_https(stack: Stack, admin_key: str) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        plain = http.post("/dashboard/login", data={"key": admin_key})
        assert "secure" not in plain.headers["set-cookie"].lower()
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        behind_tls = http.post(
            "/dashboard/login", data={"key": admin_key}, headers={"X-Forwarded-Proto": "https"}
        )
        assert "; secure" in behind_tls.headers["set-cookie"].lower()


def test_revoked_key_loses_the_session(stack: Stack, app: Flask) -> None:
    from app.auth import create_key, revoke_key

    with app.app_context():
        key, plaintext = create_key("ops-revoked", admin=True)
        key_id = key.id
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        http.post("/dashboard/login", data={"key": plaintext})
        assert http.get("/dashboard/api/summary").status_code == 200
        with app.app_context():
            revoke_key(key_id)
        assert http.get("/dashboard/api/summary").status_code == 401


def test_summary_lists_workers_queues_and_counts(
    dash: httpx.Client, app_ctx: Flask, api_key: str
) -> None:
    before = dash.get("/dashboard/api/summary").json()
    insert_job(tenant_of(api_key), "stream", "running")
    deadline = time.monotonic() + 5  # liveness is a heartbeat: allow a beat or two
    while True:
        summary = dash.get("/dashboard/api/summary").json()
        modes = {mode for worker in summary["workers"] for mode in worker["modes"]}
        if {"stream", "batch"} <= modes or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"stream", "batch"} <= modes
    worker = summary["workers"][0]
    assert worker["hostname"] and worker["queues"] and worker["age_seconds"] < 10
    assert summary["workers_by_mode"]["stream"] >= 1 and summary["workers_by_mode"]["batch"] >= 1
    assert set(summary["queues"]) == {"interactive", "batch"}
    assert all(isinstance(n, int) for n in summary["queues"].values())
    assert summary["jobs"]["stream"]["running"] >= before["jobs"]["stream"]["running"] + 1
    assert summary["streams_in_flight"] >= before["streams_in_flight"] + 1
    assert set(summary["batches"]) >= {"in_progress", "completed"}


def test_summary_shows_the_sweepers_last_complete_pass(dash: httpx.Client, app_ctx: Flask) -> None:
    sweeper.sweep()  # one pass, as beat's process runs it
    swept = dash.get("/dashboard/api/summary").json()["sweeper"]
    assert swept["state"] == "ok"
    assert abs(time.time() - swept["last_pass_at"]) < 60


def test_recent_jobs_show_every_tenant_with_mode_route_and_timings(
    dash: httpx.Client, app_ctx: Flask, api_key: str, other_key: str
) -> None:
    mine = insert_job(tenant_of(api_key), "stream", "succeeded")
    theirs = insert_job(tenant_of(other_key), "batch", "failed")
    jobs = {job["id"]: job for job in dash.get("/dashboard/api/jobs").json()["data"]}

    stream, batch = jobs[mine.id], jobs[theirs.id]
    assert stream["mode"] == "stream" and batch["mode"] == "batch"
    assert stream["tenant"].startswith("tenant-") and stream["tenant"] != batch["tenant"]
    assert stream["route_rule"] == "interactive" and stream["route_reason"] == "stream=true"
    assert stream["model"] == "mock/demo" and stream["tokens"] == 42
    assert 200 <= stream["ttft_ms"] <= 300 and 1900 <= stream["duration_ms"] <= 2100
    assert batch["status"] == "failed" and batch["error"] == "upstream said no"
    assert list(jobs) == sorted(jobs, reverse=True), "newest first"

    only_batch = dash.get("/dashboard/api/jobs", params={"mode": "batch"}).json()["data"]
    assert only_batch and {job["mode"] for job in only_batch} == {"batch"}
    older = dash.get("/dashboard/api/jobs", params={"before": theirs.id, "limit": 5}).json()
    assert theirs.id not in {job["id"] for job in older["data"]} and len(older["data"]) <= 5

    page = dash.get("/dashboard/")
    assert page.status_code == 200 and "Recent jobs" in page.text
    assert mine.id in page.text and theirs.id in page.text  # in the embedded initial data


def test_batches_show_progress(dash: httpx.Client, app_ctx: Flask, api_key: str) -> None:
    batch = insert_batch(tenant_of(api_key), ["succeeded", "succeeded", "failed", "queued"])
    found = {b["id"]: b for b in dash.get("/dashboard/api/batches").json()["data"]}[batch.id]
    assert (found["total"], found["done"], found["succeeded"], found["failed"]) == (4, 3, 2, 1)
    assert found["queued"] == 1 and found["status"] == "in_progress"


def test_real_mock_job_appears_with_its_mode(
    dash: httpx.Client, stack: Stack, app: Flask, api_key: str
) -> None:
    if "/v1/chat/completions" not in {rule.rule for rule in app.url_map.iter_rules()}:
        pytest.skip("POST /v1/chat/completions has not landed yet")
    body = {"model": "mock/demo", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as http:
        answer = http.post("/v1/chat/completions", json=body | {"stream": False})
        assert answer.status_code == 200, answer.text
    with app.app_context():
        tenant = tenant_of(api_key)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        recent = dash.get("/dashboard/api/jobs").json()["data"]
        jobs = [job for job in recent if job["tenant_id"] == tenant]
        if jobs and jobs[0]["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert jobs and jobs[0]["mode"] in ("stream", "batch") and jobs[0]["status"] == "succeeded"


def test_job_changes_are_published_in_flask_sse_format(
    app_ctx: Flask, api_key: str, redis_url: str
) -> None:
    listener = redis.Redis.from_url(redis_url, decode_responses=True).pubsub()
    listener.subscribe(events.DASHBOARD_CHANNEL)
    assert listener.get_message(timeout=2)["type"] == "subscribe"

    job = insert_job(tenant_of(api_key), "stream", "queued")
    events.job_changed(job)  # expired after commit: must not touch the database
    job.status = "running"
    events.job_changed(job)
    batch = insert_batch(tenant_of(api_key), [])
    events.batch_changed(batch)

    received = []
    while len(received) < 3:
        message = listener.get_message(timeout=5)
        assert message is not None, f"only {received} arrived"
        if message["type"] == "message":
            event = json.loads(message["data"])
            if event["data"].get("id") in (job.id, batch.id):  # the channel is shared
                received.append(event)
    listener.close()
    assert received[0] == {"data": {"id": job.id}, "type": "job"}
    assert received[1]["data"]["status"] == "running" and received[1]["data"]["id"] == job.id
    assert received[2]["type"] == "batch" and received[2]["data"]["id"] == batch.id


def test_transient_objects_publish_their_set_fields(app_ctx: Flask, redis_url: str) -> None:
    listener = redis.Redis.from_url(redis_url, decode_responses=True).pubsub()
    listener.subscribe(events.DASHBOARD_CHANNEL)
    listener.get_message(timeout=2)
    finished = utcnow()
    events.job_changed(Job(id="job_x", mode="stream", status="succeeded", finished_at=finished))
    message = None
    while message is None or message["type"] != "message":
        message = listener.get_message(timeout=5)
        assert message is not None
    listener.close()
    data = json.loads(message["data"])["data"]
    assert data == {"id": "job_x", "mode": "stream", "status": "succeeded"}


def test_secret_key_is_created_once_and_kept(tmp_path: Path) -> None:
    from app.dashboard.access import load_or_create_secret, secret_key_for

    path = tmp_path / "home" / "secret-key"
    first = load_or_create_secret(path)
    assert len(first) >= 40 and load_or_create_secret(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    app = Flask("t")
    app.config.update(SECRET_KEY="", SLUICE_HOME=str(tmp_path / "home"))
    assert secret_key_for(app) == first
    app.config["SECRET_KEY"] = "from-the-environment"
    assert secret_key_for(app) == "from-the-environment"


def test_publishing_never_raises(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = insert_job(tenant_of(api_key), "batch", "queued")
    dead = redis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    monkeypatch.setitem(app_ctx.extensions, "redis", dead)
    events.job_changed(job)
    events.batch_changed(Batch(tenant_id="x", kind="documents"))
    monkeypatch.setitem(app_ctx.extensions, "redis", None)
    events.job_changed(job)


def test_live_feed_relays_events_over_sse(dash: httpx.Client, app_ctx: Flask, api_key: str) -> None:
    job = insert_job(tenant_of(api_key), "stream", "queued")
    job_id = job.id
    lines: list[str] = []
    connected = threading.Event()

    def read() -> None:
        with dash.stream("GET", "/dashboard/stream", timeout=10) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                lines.append(line)
                connected.set()
                if line.startswith("data:") and job_id in line:
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert connected.wait(10)
    deadline = time.monotonic() + 10
    while reader.is_alive() and time.monotonic() < deadline:
        events.job_changed(job)  # pub/sub: repeat until the relay's subscription is live
        reader.join(0.2)
    assert not reader.is_alive(), lines
    assert "event:job" in lines
    data = next(line for line in lines if line.startswith("data:") and job_id in line)
    assert json.loads(data.removeprefix("data:"))["id"] == job_id


def test_browser_renders_the_job_table_with_modes(
    stack: Stack, app_ctx: Flask, admin_key: str, api_key: str, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    tenant = tenant_of(api_key)
    stream_job = insert_job(tenant, "stream", "succeeded")
    batch_job = insert_job(tenant, "batch", "running")
    insert_batch(tenant, ["succeeded", "failed", "running", "queued"])

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1440,1200", *extra,
            stack.url + login_link(stack, admin_key),
        ]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    dom = run("--dump-dom").stdout
    assert 'id="jobs"' in dom, dom[:2000]
    assert f'data-job-id="{stream_job.id}" data-mode="stream"' in dom
    assert f'data-job-id="{batch_job.id}" data-mode="batch"' in dom
    assert '<span class="mode-badge stream">stream</span>' in dom
    assert '<span class="mode-badge batch">batch</span>' in dom
    assert 'class="bar"' in dom and "Sign in" not in dom
    assert admin_key not in dom

    shot = tmp_path / "dashboard.png"
    run(f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 20_000
