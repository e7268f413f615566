"""A shared provider capacity on the real stack: a running batch yields to streams, then completes.

The session's workers are swapped for a web and workers of this module's own (two batch
workers), whose sluice.toml gives a mock provider a capacity of 4, two more mock providers
10 requests and 2,000 tokens a minute, and an OpenAI-compatible one on the fake upstream
(restored afterwards). Windows are fixed minutes, so the per-minute tests first wait, if
need be, for a window with enough time left.
"""

from __future__ import annotations

import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask

from app import leases, windows
from app.extensions import redis_store
from app.services import capacity
from tests.fake_upstream import FakeUpstream
from tests.helpers import batch_results, read_sse, submit_documents, wait_batch
from tests.stack import Stack
from tests.test_dashboard import _browser, login_link

CAPACITY = 4
PROVIDER = f"quota{secrets.token_hex(3)}"
ITEM = f"{PROVIDER}/item?length=4&tps=100&ttft_ms=60"  # about 0.1 s a batch call
STREAM = f"{PROVIDER}/chat?length=60&tps=20&ttft_ms=20"  # about 3 s a stream
RPM = 10
RATED = f"rated{secrets.token_hex(3)}"  # requests_per_minute = RPM
TPM = 2000
TOKENS = f"tokens{secrets.token_hex(3)}"  # tokens_per_minute = TPM
PAUSED = f"paused{secrets.token_hex(3)}"  # the fake upstream, OpenAI-compatible


@pytest.fixture(scope="module")
def shared(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[Stack]:
    """Web, stream and batch workers reading a sluice.toml with the providers' capacities."""
    home = tmp_path_factory.mktemp("capacity")
    path = home / "sluice.toml"
    path.write_text(
        f'[providers.{PROVIDER}]\nkind = "mock"\ncapacity = {CAPACITY}\n'
        f'[providers.{RATED}]\nkind = "mock"\nrequests_per_minute = {RPM}\n'
        f'[providers.{TOKENS}]\nkind = "mock"\ntokens_per_minute = {TPM}\n'
        f'[providers.{PAUSED}]\nkind = "openai"\nbase_url = "{upstream.openai_base_url}"\n'
    )
    for name in ("stream", "batch"):
        stack.kill(name, signal.SIGTERM)
    own = Stack(env=stack.env | {"SLUICE_CONFIG": str(path)}, home=Path(home))
    try:
        own.start_web()
        own.start_worker("stream")
        own.start_worker("batch", concurrency=20)
        own.start_worker("batch", name="batch-2", concurrency=20)
        own.wait_ready()
        yield own
    finally:
        own.stop()
        stack.start_worker("stream")
        stack.start_worker("batch")
        stack.wait_ready()


@pytest.fixture
def http(shared: Stack, api_key: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=shared.url, headers=headers, timeout=30) as client:
        yield client


def batch_in_flight() -> int:
    return leases.live_count(redis_store.client, capacity.batch_key(PROVIDER))


def peak(seconds: float) -> int:
    """The most batch calls in flight seen over the next `seconds`."""
    deadline = time.monotonic() + seconds
    most = 0
    while time.monotonic() < deadline:
        most = max(most, batch_in_flight())
        time.sleep(0.01)
    return most


def wait_for(check: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def open_stream(http: httpx.Client, model: str = STREAM, **fields: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    request = http.build_request("POST", "/v1/chat/completions", json=body | fields)
    return http.send(request, stream=True)


def window_left() -> float:
    """Seconds until the next per-minute window (Redis runs on this host's clock)."""
    return windows.left_ms(leases.now_ms(redis_store.client)) / 1000


def room_in_window(seconds: float) -> None:
    """Wait, if need be, for a window with `seconds` left."""
    if (left := window_left()) < seconds:
        time.sleep(left + 0.2)


def provider_split(http: httpx.Client, admin_key: str, provider: str) -> dict[str, Any]:
    stats = http.get("/v1/admin/stats", headers={"Authorization": f"Bearer {admin_key}"})
    (split,) = [s for s in stats.json()["provider_capacity"] if s["provider"] == provider]
    return split  # type: ignore[no-any-return]


def succeeded(http: httpx.Client, batch_id: str) -> int:
    return int(http.get(f"/v1/document-batches/{batch_id}").json()["counts"]["succeeded"])


@pytest.mark.timeout(240)  # a web and two workers of its own start and stop
def test_a_running_batch_yields_to_streams_and_still_completes(
    http: httpx.Client, app_ctx: Flask, admin_key: str
) -> None:
    documents = [{"id": str(i), "text": f"document {i}"} for i in range(240)]
    batch = submit_documents(http, documents, model=ITEM).json()
    wait_for(lambda: batch_in_flight() >= CAPACITY)
    assert peak(0.5) == CAPACITY  # batch alone uses the whole capacity, no more

    streams = [open_stream(http) for _ in range(3)]
    arrived = time.monotonic()
    assert [s.status_code for s in streams] == [200, 200, 200]
    results: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s: results.append(read_sse(s).text)) for s in streams
    ]
    for reader in readers:
        reader.start()
    time.sleep(max(0.0, arrived + 1.0 - time.monotonic()))  # within one second ...
    assert peak(1.0) <= CAPACITY - 3  # ... batch is down to what the streams leave

    fourth = open_stream(http)  # the batch calls left are displaced: a stream is admitted
    assert fourth.status_code == 200
    refused = open_stream(http)  # streams alone fill the capacity: refused
    assert refused.status_code == 429
    error = refused.read() and refused.json()["error"]
    assert error["scope"] == "provider" and error["capacity"] == CAPACITY
    admin = {"Authorization": f"Bearer {admin_key}"}
    stats = http.get("/v1/admin/stats", headers=admin).json()
    (split,) = [s for s in stats["provider_capacity"] if s["provider"] == PROVIDER]
    assert split["capacity"] == CAPACITY and split["stream"] == CAPACITY
    assert split["batch_share"] == 0

    results.append(read_sse(fourth).text)
    for reader in readers:
        reader.join(30)
    assert len(results) == 4 and all(results)
    wait_for(lambda: peak(0.3) == CAPACITY, timeout=10)  # streams ended: batch resumed

    done = wait_batch(http, batch["id"], timeout=120)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == len(documents)
    assert len(batch_results(http, batch["id"], status="succeeded")) == len(documents)
    assert batch_in_flight() == 0


def test_the_dashboard_card_shows_each_providers_split(
    shared: Stack, admin_key: str, app_ctx: Flask
) -> None:
    """Headless Chromium: the capacity card lists the provider, its streams and capacity."""
    sync_api, chromium = _browser()
    job = f"job_{secrets.token_hex(6)}"
    leases.acquire(redis_store.client, [capacity.stream_key(PROVIDER)], job, 30_000)
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(shared.url + login_link(shared, admin_key))
            row = page.locator("#capacity-card tr", has_text=PROVIDER)
            row.wait_for(timeout=20_000)
            cells = row.locator("td").all_inner_texts()
            assert cells[:4] == [PROVIDER, "1", "0", str(CAPACITY)]
            assert "1 stream, 0 batch of 4" in (row.locator(".bar").get_attribute("title") or "")
            # a per-minute limit: a row of this minute's use by mode against the limit
            rated = page.locator(f'#capacity-card tr.window-row[data-provider="{RATED}"]')
            rated.wait_for(timeout=20_000)
            cells = rated.locator("td").all_inner_texts()
            assert cells[0] == "↳ requests / min" and cells[3] == str(RPM)
            title = rated.locator(".bar").get_attribute("title") or ""
            assert f"batch requests of {RPM} this minute" in title
            browser.close()
    finally:
        leases.release(redis_store.client, capacity.stream_key(PROVIDER), job)
    assert errors == []


@pytest.mark.timeout(150)  # up to a minute waiting for the next window
def test_a_batch_waits_for_the_window_while_streams_are_admitted(
    http: httpx.Client, app_ctx: Flask, admin_key: str
) -> None:
    room_in_window(12)
    model = f"{RATED}/chat?length=40&tps=20&ttft_ms=20"  # about 2 s a stream
    streams = [open_stream(http, model) for _ in range(2)]
    assert [s.status_code for s in streams] == [200, 200]
    documents = [{"id": str(i), "text": f"document {i}"} for i in range(15)]
    batch = submit_documents(http, documents, model=f"{RATED}/item?length=4").json()
    wait_for(lambda: succeeded(http, batch["id"]) == RPM - 2, timeout=8)  # what streams leave
    time.sleep(1.0)
    assert succeeded(http, batch["id"]) == RPM - 2  # the window is used: batch waits ...
    third = open_stream(http, model)  # ... and a stream is still admitted: streams first
    assert third.status_code == 200
    streams.append(third)
    split = provider_split(http, admin_key, RATED)
    assert split["requests_per_minute"] == {
        "limit": RPM, "stream": 3, "batch": RPM - 2, "reserve": 0, "free": 0
    }  # fmt: skip
    assert all(read_sse(s).text for s in streams)
    # the next window: batch resumes, leaving streams their last window's 3 requests
    done = wait_batch(http, batch["id"], timeout=window_left() + 30)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == len(documents)
    assert provider_split(http, admin_key, RATED)["requests_per_minute"]["batch"] <= RPM - 3


def test_a_stream_is_refused_naming_the_limit_when_streams_alone_used_the_window(
    http: httpx.Client, app_ctx: Flask, admin_key: str
) -> None:
    room_in_window(10)
    model = f"{TOKENS}/chat?length=40&tps=20&ttft_ms=20"  # about 2 s, some 45 tokens
    first = open_stream(http, model, max_tokens=1500)  # about 1,505 tokens estimated
    assert first.status_code == 200
    refused = open_stream(http, model, max_tokens=1500)  # 3,010 of 2,000: refused
    assert refused.status_code == 429
    error = refused.read() and refused.json()["error"]
    assert error["code"] == "stream_capacity_exceeded" and error["scope"] == "provider"
    assert error["limit"] == "tokens_per_minute" and error["tokens_per_minute"] == TPM
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert read_sse(first).text
    # the worker corrected the window to the stream's usage: room again for the second
    wait_for(lambda: provider_split(http, admin_key, TOKENS)["tokens_per_minute"]["stream"] < 200)
    again = open_stream(http, model, max_tokens=1500)
    assert again.status_code == 200 and read_sse(again).text


@pytest.mark.timeout(120)
def test_an_upstream_429_pauses_every_batch_call_of_the_provider(
    http: httpx.Client, app_ctx: Flask, admin_key: str, upstream: FakeUpstream
) -> None:
    limited, after = f"limited{secrets.token_hex(3)}", f"after{secrets.token_hex(3)}"
    upstream.add_scenario(limited, status=429, retry_after="3", fail_times=1, echo=True)
    upstream.add_scenario(after, echo=True)
    first = submit_documents(http, [{"id": "a", "text": "x"}], model=f"{PAUSED}/{limited}")
    wait_for(lambda: provider_split(http, admin_key, PAUSED)["batch_paused_for"] > 0)
    paused = time.monotonic()
    documents = [{"id": str(i), "text": f"d{i}"} for i in range(30)]  # chunks on both workers
    second = submit_documents(http, documents, model=f"{PAUSED}/{after}").json()
    wait_for(lambda: upstream.requests(after) > 0, timeout=30)
    assert time.monotonic() - paused >= 2.0  # held back by the pause (3 s, less our polling)
    for batch in (first.json(), second):
        done = wait_batch(http, batch["id"], timeout=60)
        assert done["status"] == "completed" and done["counts"]["failed"] == 0
    assert upstream.requests(limited) == 2  # the 429, then the retry after it
