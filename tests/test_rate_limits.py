"""Rate limits per key and per tenant (requests and tokens per minute, flask-limiter), and
open event streams per tenant: 429 with Retry-After and OpenAI's x-ratelimit-* headers,
in process and live (a web process with its own sluice.toml, the openai SDK as client)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import rate_limits
from app.auth import create_key
from tests.helpers import tuned, web_with_config
from tests.stack import Stack

CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
ASYNC = {"Prefer": "respond-async"}  # 202 at once: no worker needed


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


def test_requests_per_minute_per_key(app: Flask) -> None:
    _, (first, second) = tenant_keys(app, 2)
    unlimited = [submit(first) for _ in range(3)]  # off by default: not counted, no headers
    assert all(a.status_code == 202 for a in unlimited)
    assert not any(name.lower().startswith("x-ratelimit") for name, _ in unlimited[0].headers)
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


def test_tokens_per_minute(app: Flask) -> None:
    _, (client,) = tenant_keys(app, 1)
    long = [{"role": "user", "content": "word " * 200}]  # ~250 tokens by the estimate
    with tuned(app, KEY_TOKENS_PER_MINUTE=300, TENANT_TOKENS_PER_MINUTE=1000):
        small = submit(client)
        assert small.status_code == 202
        assert small.headers["x-ratelimit-limit-tokens"] == "300"  # the tighter of the two
        left = int(small.headers["x-ratelimit-remaining-tokens"])
        assert 0 < left < 300
        second = submit(client, messages=long)
        assert second.status_code == 202
        after = int(second.headers["x-ratelimit-remaining-tokens"])
        over = submit(client, messages=long)
        error = refused(over, "tokens")
        assert int(over.headers["x-ratelimit-remaining-tokens"]) < 250
        assert "(TPM) of this API key" in error["message"]
        assert "x-ratelimit-limit-requests" not in small.headers  # no request limit is set
        # the refused request was given back: what is left still takes a small one
        again = submit(client)
        assert again.status_code == 202
        assert int(again.headers["x-ratelimit-remaining-tokens"]) == after - (300 - left)


def test_a_tenant_of_its_own_in_sluice_toml(app: Flask) -> None:
    name, (limited,) = tenant_keys(app, 1)
    _, (other,) = tenant_keys(app, 1)
    with tuned(app, RATE_LIMITS={name: {"key_requests_per_minute": 1}}):
        assert submit(limited).status_code == 202
        refused(submit(limited), "requests")
        for _ in range(3):
            answer = submit(other)
            assert answer.status_code == 202 and "x-ratelimit-limit-requests" not in answer.headers


def test_every_front_door_is_counted(app: Flask) -> None:
    _, (client,) = tenant_keys(app, 1)
    docs = {"model": "mock/echo", "instructions": "x", "documents": [{"id": "1", "text": "a"}]}
    with tuned(app, KEY_REQUESTS_PER_MINUTE=2):
        assert client.post("/v1/document-batches", json=docs).status_code == 202
        assert client.post("/v1/chat/completions", json=CHAT, headers=ASYNC).status_code == 202
        refused(client.post("/v1/chat/completions", json=CHAT, headers=ASYNC), "requests")
        refused(client.post("/v1/document-batches", json=docs), "requests")
        assert client.get("/v1/jobs").status_code == 200  # reads are not job requests


def test_each_app_counts_on_its_own_redis(app: Flask, make_app: Callable[..., Flask]) -> None:
    """One Limiter serves every app of a process: a later app on a dead Redis (as the
    outage tests make) must not become the storage of the first."""
    _, (client,) = tenant_keys(app, 1)
    dead = make_app({"REDIS_URL": "redis://127.0.0.1:1/0", "KEY_REQUESTS_PER_MINUTE": 1})
    dead_client = dead.test_client()
    dead_client.environ_base.update(client.environ_base)
    assert submit(dead_client).status_code == 503  # its own Redis is down
    with tuned(app, KEY_REQUESTS_PER_MINUTE=1):
        assert submit(client).headers["x-ratelimit-remaining-requests"] == "0"
        refused(submit(client), "requests")


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


# Live: a web process of its own reading a sluice.toml with rate limits (same DB, Redis
# and workers as the session's stack), the official SDK as the client.
LIVE_TOML = """
[sluice]
key_requests_per_minute = 2
tenant_tokens_per_minute = 100000

[rate_limits.tenants.{big}]
key_requests_per_minute = 4
tenant_tokens_per_minute = 300
"""
RESET = re.compile(r"^(\d+m)?\d+(\.\d+)?s$")  # OpenAI's "17.25s", "6m0s"


@pytest.fixture(scope="module")
def limited_web(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(its URL, the tenant name with limits of its own in its sluice.toml)."""
    big = f"tenant-rl-big-{secrets.token_hex(4)}"
    home = tmp_path_factory.mktemp("limited-web")
    with web_with_config(stack, home, LIVE_TOML.format(big=big)) as (url, _):
        yield url, big


def sdk(app: Flask, url: str, tenant: str | None = None) -> openai.OpenAI:
    """The official SDK (no retries) with a new key of `tenant` (a new tenant if None)."""
    with app.app_context():
        key = create_key(tenant or f"tenant-rl-{secrets.token_hex(4)}")[1]
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def chat(client: openai.OpenAI, content: str = "hi") -> Any:
    return client.chat.completions.with_raw_response.create(
        model="mock/echo", messages=[{"role": "user", "content": content}]
    )


def test_the_sdk_sees_rate_limit_error_with_openai_headers(
    app: Flask, limited_web: tuple[str, str]
) -> None:
    client = sdk(app, limited_web[0])
    answers = [chat(client) for _ in range(2)]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[0].headers["x-ratelimit-limit-tokens"] == "100000"
    assert RESET.match(answers[0].headers["x-ratelimit-reset-requests"])
    assert answers[1].parse().choices[0].message.content  # a real completion, by a worker
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)
    error = refused.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert "Limit 2, Used 2, Requested 1. Please try again in" in error.message
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert RESET.match(headers["x-ratelimit-reset-requests"])


def test_a_tenant_of_its_own_in_the_live_sluice_toml(
    app: Flask, limited_web: tuple[str, str]
) -> None:
    url, big = limited_web
    client = sdk(app, url, big)
    first = chat(client)
    assert first.headers["x-ratelimit-limit-requests"] == "4"
    assert first.headers["x-ratelimit-limit-tokens"] == "300"
    long = "word " * 200  # ~250 tokens by the estimate: one fits in 300, two do not
    assert chat(client, long).headers["x-ratelimit-remaining-requests"] == "2"
    with pytest.raises(openai.RateLimitError) as over:
        chat(client, long)
    assert over.value.type == "tokens"
    assert "(TPM) of this tenant: Limit 300" in over.value.message
    remaining = [chat(client).headers["x-ratelimit-remaining-requests"] for _ in range(2)]
    assert remaining == ["1", "0"]  # the refused request was not counted
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)
    assert refused.value.type == "requests"
    other_key = sdk(app, url, big)  # the same tenant, a key with 4 requests of its own
    assert chat(other_key).headers["x-ratelimit-remaining-requests"] == "3"


def test_a_burst_admits_exactly_the_limit(app: Flask, limited_web: tuple[str, str]) -> None:
    with app.app_context():
        key = create_key(f"tenant-rl-{secrets.token_hex(4)}")[1]
    headers = {"Authorization": f"Bearer {key}", **ASYNC}

    def post(_: int) -> int:
        with httpx.Client(base_url=limited_web[0], headers=headers, timeout=30) as http:
            return http.post("/v1/jobs", json=CHAT).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = sorted(pool.map(post, range(12)))
    assert codes == [202] * 2 + [429] * 10
