"""Rate limits per key and per tenant (requests and tokens per minute), and open event
streams per tenant: 429 with Retry-After and OpenAI's x-ratelimit-* headers."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import rate_limits
from app.auth import create_key
from tests.helpers import tuned

CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
ASYNC = {"Prefer": "respond-async"}  # 202 at once: no worker needed


@pytest.fixture
def fresh_window() -> None:
    """Start well inside a one-minute window, so a test's requests share it."""
    into = time.time() % rate_limits.WINDOW_SECONDS
    if into > rate_limits.WINDOW_SECONDS - 5:
        time.sleep(rate_limits.WINDOW_SECONDS - into + 0.05)


def tenant_keys(app: Flask, count: int) -> tuple[str, list[FlaskClient]]:
    """A new tenant's name and `count` clients, each with a key of that tenant."""
    name = f"tenant-rl-{secrets.token_hex(4)}"
    clients = []
    with app.app_context():
        for _ in range(count):
            client = app.test_client()
            client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_key(name)[1]}"
            clients.append(client)
    return name, clients


def submit(client: FlaskClient, **body: Any) -> Any:
    return client.post("/v1/jobs", json={**CHAT, **body}, headers=ASYNC)


def refused(response: Any, kind: str) -> dict[str, Any]:
    assert response.status_code == 429, response.get_data(as_text=True)[:300]
    error: dict[str, Any] = response.get_json()["error"]
    assert error["type"] == kind and error["code"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert int(response.headers[f"x-ratelimit-remaining-{kind}"]) < int(
        response.headers[f"x-ratelimit-limit-{kind}"]
    )
    return error


@pytest.mark.usefixtures("fresh_window")
def test_requests_per_minute_per_key(app: Flask) -> None:
    _, (first, second) = tenant_keys(app, 2)
    with tuned(app, KEY_REQUESTS_PER_MINUTE=2):
        answers = [submit(first) for _ in range(2)]
        assert [a.status_code for a in answers] == [202, 202]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0"]
        assert submit(first).headers["x-ratelimit-remaining-requests"] == "0"
        assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
        error = refused(submit(first), "requests")
        assert "Limit 2, Used 2, Requested 1" in error["message"]
        assert "SLUICE_KEY_REQUESTS_PER_MINUTE" in error["message"]
        assert submit(second).status_code == 202  # another key of the tenant has its own


@pytest.mark.usefixtures("fresh_window")
def test_requests_per_minute_per_tenant(app: Flask) -> None:
    _, (first, second) = tenant_keys(app, 2)
    _, (stranger,) = tenant_keys(app, 1)
    with tuned(app, TENANT_REQUESTS_PER_MINUTE=2):
        assert submit(first).status_code == 202
        assert submit(second).status_code == 202
        error = refused(submit(first), "requests")
        assert "this tenant" in error["message"]
        refused(submit(second), "requests")
        assert submit(stranger).status_code == 202


@pytest.mark.usefixtures("fresh_window")
def test_tokens_per_minute(app: Flask) -> None:
    _, (client,) = tenant_keys(app, 1)
    long = [{"role": "user", "content": "word " * 200}]  # ~250 tokens by the estimate
    with tuned(app, KEY_TOKENS_PER_MINUTE=300, TENANT_TOKENS_PER_MINUTE=1000):
        small = submit(client)
        assert small.status_code == 202
        assert small.headers["x-ratelimit-limit-tokens"] == "300"  # the tighter of the two
        left = int(small.headers["x-ratelimit-remaining-tokens"])
        assert 0 < left < 300
        assert submit(client, messages=long).status_code == 202
        over = submit(client, messages=long)
        error = refused(over, "tokens")
        assert int(over.headers["x-ratelimit-remaining-tokens"]) < 250
        assert "(TPM) of this API key" in error["message"]
        assert "x-ratelimit-limit-requests" not in small.headers  # no request limit is set


@pytest.mark.usefixtures("fresh_window")
def test_a_tenant_of_its_own_in_sluice_toml(app: Flask) -> None:
    name, (limited,) = tenant_keys(app, 1)
    _, (other,) = tenant_keys(app, 1)
    with tuned(app, RATE_LIMITS={name: {"key_requests_per_minute": 1}}):
        assert submit(limited).status_code == 202
        refused(submit(limited), "requests")
        for _ in range(3):
            answer = submit(other)
            assert answer.status_code == 202 and "x-ratelimit-limit-requests" not in answer.headers


@pytest.mark.usefixtures("fresh_window")
def test_every_front_door_is_counted(app: Flask) -> None:
    _, (client,) = tenant_keys(app, 1)
    docs = {"model": "mock/echo", "instructions": "x", "documents": [{"id": "1", "text": "a"}]}
    with tuned(app, KEY_REQUESTS_PER_MINUTE=2):
        assert client.post("/v1/document-batches", json=docs).status_code == 202
        assert client.post("/v1/chat/completions", json=CHAT, headers=ASYNC).status_code == 202
        refused(client.post("/v1/chat/completions", json=CHAT, headers=ASYNC), "requests")
        refused(client.post("/v1/document-batches", json=docs), "requests")
        assert client.get("/v1/jobs").status_code == 200  # reads are not job requests


def test_off_by_default(app: Flask) -> None:
    _, (client,) = tenant_keys(app, 1)
    answers = [submit(client) for _ in range(5)]
    assert all(a.status_code == 202 for a in answers)
    assert not any(name.lower().startswith("x-ratelimit") for name, _ in answers[0].headers)


def test_open_event_streams_per_tenant(app: Flask) -> None:
    name, (client,) = tenant_keys(app, 1)
    docs = {"model": "mock/echo", "instructions": "x", "documents": [{"id": "1", "text": "a"}]}
    batch_id = client.post("/v1/document-batches", json=docs).get_json()["id"]
    job_id = submit(client).get_json()["id"]
    path = f"/v1/document-batches/{batch_id}/events"
    with tuned(app, TENANT_MAX_EVENT_STREAMS=1):
        first = client.get(path, buffered=False)
        assert first.status_code == 200
        second = client.get(path, buffered=False)
        assert second.status_code == 429
        error = second.get_json()["error"]
        assert error["code"] == "too_many_event_streams"
        assert "SLUICE_TENANT_MAX_EVENT_STREAMS" in error["message"]
        assert client.get(f"/v1/jobs/{job_id}/events").status_code in (204, 429)
        first.close()  # the connection ends: its slot is free again
        again = client.get(path, buffered=False)
        assert again.status_code == 200
        again.close()
    with tuned(
        app, TENANT_MAX_EVENT_STREAMS=1, RATE_LIMITS={name: {"tenant_max_event_streams": 0}}
    ):
        unlimited = [client.get(path, buffered=False) for _ in range(3)]
        assert all(r.status_code == 200 for r in unlimited)
        for response in unlimited:
            response.close()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("seconds", "text"), [(1, "1s"), (17.25, "17.25s"), (0.0004, "0.001s"), (360, "6m0s")]
)
def test_reset_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert rate_limits._duration(seconds) == text
