"""The operators' dashboard: admin access, JSON views, the live feed and the page in a browser."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask import Flask
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.dashboard import queries
from app.extensions import db
from app.models import Batch, Job, Tenant, utcnow
from app.services import costs, events, sweeper
from app.streams.keys import broadcast_channel, db_of, keys_channel
from tests.helpers import (
    insert_batch,
    insert_job,
    stream_chat,
    submit_documents,
    tenant_of,
    wait_batch,
)
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
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    listener = conn.pubsub()
    listener.subscribe(broadcast_channel(db_of(conn)))
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
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    listener = conn.pubsub()
    listener.subscribe(broadcast_channel(db_of(conn)))
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


ARTIFACTS = Path(__file__).resolve().parent.parent / "var" / "test-artifacts"
SLOW = "mock/chat?length=160&tps=40&ttft_ms=200"  # about 4 s of text


def _browser() -> Any:
    """Playwright's Chromium: Debian's binary (no browser download), else skip."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api, chromium


def _grew(page: Any, selector: str, timeout: float = 20) -> list[int]:
    """Lengths of an element's text, sampled until it has grown at least twice."""
    lengths: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(page.locator(selector).inner_text())
        if not lengths or n != lengths[-1]:
            lengths.append(n)
        if len([x for x in lengths if x > 0]) >= 3:
            return lengths
        page.wait_for_timeout(100)
    raise AssertionError(f"{selector} did not grow: {lengths}")


def test_browser_dashboard_job_page_and_playground(
    stack: Stack, admin_key: str, client: httpx.Client, app: Flask, api_key: str
) -> None:
    """Headless Chromium through Playwright, as an operator would use the three pages."""
    sync_api, chromium = _browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            # sign in with a one-time link; the key never reaches the page
            page.goto(stack.url + login_link(stack, admin_key))
            page.wait_for_selector("#jobs")
            assert admin_key not in page.content()
            page.wait_for_selector('#charts .chart[data-chart="jobs"][data-total]')
            total = float(page.get_attribute('#charts .chart[data-chart="jobs"]', "data-total"))

            # a stream and a batch appear with their modes, the bar advances, no reload
            stream_id = stream_chat(client, SLOW)
            docs = [{"id": str(i), "text": f"document {i}"} for i in range(6)]
            batch = submit_documents(client, docs, model="mock/chat?ttft_ms=1500&length=5")
            batch_id = batch.json()["id"]
            page.wait_for_selector(f'tr[data-job-id="{stream_id}"][data-mode="stream"]')
            page.wait_for_selector('tr[data-mode="batch"]')
            labels = set()
            deadline = time.monotonic() + 30
            while "6 / 6" not in labels and time.monotonic() < deadline:
                labels |= set(page.locator(".bar-label").all_inner_texts())
                page.wait_for_timeout(150)
            assert "6 / 6" in labels and any(
                label.endswith("/ 6") and label != "6 / 6" for label in labels
            ), labels
            page.wait_for_function(
                "n => +document.querySelector('#charts .chart[data-chart=\"jobs\"]')"
                ".dataset.total > n",  # the throughput chart's newest point rises
                arg=total,
                timeout=20_000,
            )
            # the cost cards (#13): today's spend rises by what this test's jobs cost, by
            # mode, on the workers executor, and this tenant has a row of its own
            before = float(page.get_attribute("#cost-today", "data-usd") or 0)
            assert wait_batch(client, batch_id)["status"] == "completed"
            with app.app_context():
                costs.settle()
                name = db.session.get(Tenant, tenant_of(api_key)).name  # type: ignore[union-attr]
            page.wait_for_function(
                "n => +document.getElementById('cost-today').dataset.usd > n",
                arg=before,
                timeout=20_000,
            )
            with app.app_context():  # the card lists the top 10 (a full suite has more)
                assert costs.spend_today().get(name, 0) > 0
                top = [row["tenant"] for row in queries.cost_today()["by_tenant"]]
            if name in top:
                page.wait_for_selector(f'#cost-tenants tr[data-tenant="{name}"]')
                assert page.locator(f'#cost-tenants tr[data-tenant="{name}"] td.num').inner_text()
            else:
                page.wait_for_function(
                    "() => document.getElementById('cost-tenants-note').textContent"
                    ".startsWith('top ')"
                )
            for cost in ("#cost-mode-batch", "#cost-executor-workers"):
                assert float(page.get_attribute(cost, "data-usd") or 0) > 0, cost
                assert not page.locator(cost).inner_text().startswith("$0.00 "), cost
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # the job page of a running stream: its text grows, then it ends succeeded
            running = stream_chat(client, SLOW)
            page.goto(f"{stack.url}/dashboard/jobs/{running}")
            _grew(page, "#output")
            page.screenshot(path=str(ARTIFACTS / "job.png"), full_page=True)
            page.wait_for_selector('#job[data-status="succeeded"]', timeout=30_000)
            final = client.get(f"/v1/jobs/{running}").json()
            page.wait_for_function(
                "n => document.getElementById('output').textContent.length === n",
                arg=len(final["output"]),
            )
            assert page.locator("#output").inner_text() == final["output"]
            assert page.locator("#route-rule").inner_text() == final["route"]["rule"]

            # the playground: progressive text, a dropped connection resumed exactly
            page.goto(f"{stack.url}/dashboard/playground")
            page.wait_for_selector("#model option[value='mock/chat']", state="attached")
            page.evaluate(
                "m => { const o = document.createElement('option'); o.value = o.textContent = m;"
                " document.getElementById('model').appendChild(o); }",
                SLOW,
            )
            page.select_option("#model", SLOW)
            page.select_option("#mode", "stream")
            page.fill("#prompt", "Tell me about rivers.")
            page.click("#send")
            _grew(page, "#answer")
            page.evaluate("window.sluicePlayground.drop()")  # the connection, cut mid-answer
            page.wait_for_selector("#answer[data-status]", timeout=30_000)
            state = page.evaluate("window.sluicePlayground.state()")
            assert state["resumes"] >= 1
            job = client.get(f"/v1/jobs/{state['jobId']}")
            assert job.status_code == 404  # the playground runs as the admin's own tenant
            with httpx.Client(
                base_url=stack.url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
            ) as admin:
                job = admin.get(f"/v1/jobs/{state['jobId']}").json()
            assert job["status"] == "succeeded"
            assert page.locator("#answer").inner_text() == job["output"]  # nothing lost or twice
            assert page.locator("#ttft").inner_text().endswith("ms")
            assert float(page.locator("#tps").inner_text()) > 0
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

            # Stop cancels the job and keeps its partial text
            page.click("#send")
            _grew(page, "#answer")
            page.click("#stop")
            page.wait_for_selector('#answer[data-status="cancelled"]', timeout=30_000)
        finally:
            browser.close()
    assert errors == [], errors
    assert wait_batch(client, batch_id)["status"] == "completed"


def _session_cookie(app: Flask, values: dict[str, Any], age_seconds: float) -> str:
    """A dashboard session cookie as Flask signs it, made `age_seconds` ago."""
    from itsdangerous import TimestampSigner, URLSafeTimedSerializer

    class Aged(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - age_seconds)

    interface = app.session_interface
    serializer = URLSafeTimedSerializer(
        app.secret_key,
        salt=interface.salt,  # type: ignore[attr-defined]
        serializer=interface.serializer,  # type: ignore[attr-defined]
        signer=Aged,
        signer_kwargs={
            "key_derivation": interface.key_derivation,  # type: ignore[attr-defined]
            "digest_method": interface.digest_method,  # type: ignore[attr-defined]
        },
    )
    return serializer.dumps(values)


def test_a_wrong_key_and_an_expired_cookie_are_refused(
    stack: Stack, app: Flask, admin_key: str
) -> None:
    from app.auth import lookup_key
    from app.dashboard.access import SESSION_KEY

    with httpx.Client(base_url=stack.url, timeout=10) as http:
        wrong = http.post("/dashboard/login", data={"key": "sk-sluice-not-a-key"})
        assert wrong.status_code == 401 and "not a live admin key" in wrong.text
        assert http.get("/dashboard/api/summary").status_code == 401
    with app.app_context():
        key = lookup_key(admin_key)
        assert key is not None
        values = {SESSION_KEY: key.id, "_permanent": True}
    lifetime = app.permanent_session_lifetime.total_seconds()
    for age, status in ((60, 200), (lifetime + 60, 401)):
        cookie = _session_cookie(app, values, age)
        with httpx.Client(base_url=stack.url, timeout=10, cookies={"session": cookie}) as http:
            assert http.get("/dashboard/api/summary").status_code == status, age
            page = http.get("/dashboard/jobs/job_x")
            assert page.status_code == (404 if status == 200 else 302), age


def test_a_redis_database_hears_only_its_own_broadcasts_and_revocations(
    app_ctx: Flask, redis_url: str
) -> None:
    """Pub/sub is server-wide: a deployment on another database of the same Redis server
    must not reach this one's dashboards or key caches."""
    from app.streams.hub import StreamHub

    mine = redis.Redis.from_url(redis_url, decode_responses=True)
    other_db = (db_of(mine) + 1) % 16
    other = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{other_db}")
    hub = StreamHub(redis_url)
    revoked: list[str | None] = []
    try:
        feed = hub.feed()
        hub.on_revocation(revoked.append)
        assert hub.connected.wait(5)
        revoked.clear()
        events.publish("job", {"id": "job_elsewhere"}, client=other)
        other.publish(keys_channel(other_db), "hash-elsewhere")
        events.publish("job", {"id": "job_here"}, client=mine)
        mine.publish(keys_channel(db_of(mine)), "hash-here")
        heard: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (heard and revoked):
            heard += feed.wait(0.2)
        assert [json.loads(m)["data"]["id"] for m in heard] == ["job_here"]
        assert revoked == ["hash-here"]
    finally:
        hub.close()
