"""A shared provider capacity on the real stack: a running batch yields to streams, then completes.

The session's workers are swapped for a web and workers of this module's own, whose
sluice.toml gives a mock provider a capacity of 4 (restored afterwards).
"""

from __future__ import annotations

import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flask import Flask

from app import leases
from app.extensions import redis_store
from app.services import capacity
from tests.helpers import batch_results, read_sse, submit_documents, wait_batch
from tests.stack import Stack
from tests.test_dashboard import _browser, login_link

CAPACITY = 4
PROVIDER = f"quota{secrets.token_hex(3)}"
ITEM = f"{PROVIDER}/item?length=4&tps=100&ttft_ms=60"  # about 0.1 s a batch call
STREAM = f"{PROVIDER}/chat?length=60&tps=20&ttft_ms=20"  # about 3 s a stream


@pytest.fixture(scope="module")
def shared(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Web, stream and batch workers reading a sluice.toml with the provider's capacity."""
    home = tmp_path_factory.mktemp("capacity")
    path = home / "sluice.toml"
    path.write_text(f'[providers.{PROVIDER}]\nkind = "mock"\ncapacity = {CAPACITY}\n')
    for name in ("stream", "batch"):
        stack.kill(name, signal.SIGTERM)
    own = Stack(env=stack.env | {"SLUICE_CONFIG": str(path)}, home=Path(home))
    try:
        own.start_web()
        own.start_worker("stream")
        own.start_worker("batch", concurrency=20)
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


def open_stream(http: httpx.Client) -> httpx.Response:
    body = {"model": STREAM, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)


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
            browser.close()
    finally:
        leases.release(redis_store.client, capacity.stream_key(PROVIDER), job)
    assert errors == []
