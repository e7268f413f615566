"""What the real clients ran into (second round): each test fails without its fix.

The official openai SDK with its default retries against the live stack (real web,
workers, Redis, the fake upstream for `openai/` models).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Generator
from typing import Any, cast

import httpx
import openai
import pytest
from flask import Flask

from app.extensions import redis_store
from app.streams.hub import StreamHub, Tail
from app.streams.keys import lease_key
from tests.fake_upstream import FakeUpstream
from tests.stack import Stack

HELLO = [{"role": "user", "content": "hi"}]


def retrying_sdk(stack: Stack, api_key: str) -> openai.OpenAI:
    """The SDK as a user runs it: its default retries (2) on 408/409/429/5xx."""
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=api_key, timeout=30)


CLIENT_ERRORS = [
    (400, openai.BadRequestError, "invalid_request_error"),
    (404, openai.NotFoundError, "not_found_error"),
    (422, openai.UnprocessableEntityError, "unprocessable_entity_error"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("status", "error_class", "kind"), CLIENT_ERRORS)
def test_an_upstream_client_error_keeps_its_status_and_is_not_retried(
    stack: Stack,
    api_key: str,
    upstream: FakeUpstream,
    status: int,
    error_class: type[openai.APIStatusError],
    kind: str,
    stream: bool,
) -> None:
    name = f"client-error-{status}-{stream}"
    upstream.add_scenario(name, status=status, message=f"upstream says {status}")
    sdk = retrying_sdk(stack, api_key)
    with pytest.raises(error_class) as info:
        answer: Any = sdk.chat.completions.create(
            model=f"openai/{name}", messages=HELLO, stream=stream
        )
        list(answer) if stream else None
    assert info.value.status_code == status  # before the first token: an HTTP error too
    body: Any = info.value.body
    assert body["type"] == kind and f"upstream says {status}" in body["message"]
    assert upstream.requests(name) == 1  # neither the SDK nor the worker tried again


def test_upstream_failures_stay_gateway_errors(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.add_scenario("forbidden", status=403, message="bad key")  # Sluice's credential
    upstream.add_scenario("broken", status=500, message="boom", retry_after="0")
    for model, message in (("openai/forbidden", "bad key"), ("openai/broken", "boom")):
        response = client.post("/v1/chat/completions", json={"model": model, "messages": HELLO})
        assert response.status_code == 502, response.text
        error = response.json()["error"]
        assert error["type"] == "upstream_error" and message in error["message"]
    upstream.add_scenario("limited-always", status=429, message="slow down", retry_after="0")
    limited = {"model": "openai/limited-always", "messages": HELLO}
    response = client.post("/v1/chat/completions", json=limited)
    assert response.status_code == 429 and response.headers["Retry-After"] == "1", response.text
    assert response.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("stream", [False, True])
def test_a_long_upstream_retry_after_reaches_the_client(
    client: httpx.Client, upstream: FakeUpstream, stream: bool
) -> None:
    """A wait longer than SLUICE_STREAM_RETRY_AFTER_MAX is not sat out by the worker: the
    client hears the upstream's own Retry-After at once, the error body stays OpenAI's."""
    name = f"limited-long-{stream}"
    upstream.add_scenario(name, status=429, message="slow down", retry_after="7.2")
    body = {"model": f"openai/{name}", "messages": HELLO, "stream": stream}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 429 and response.headers["Retry-After"] == "8", response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert upstream.requests(name) == 1


def test_an_error_after_the_first_token_stays_in_band(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.add_scenario("late-error", deltas=["one ", "two ", "three"], error_after=1, tps=100)
    body = {"model": "openai/late-error", "messages": HELLO, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        text = "".join(response.iter_text())
    assert response.status_code == 200 and '"error"' in text and "one " in text


def test_the_sdk_hears_bad_stream_options_and_tool_names_named(
    openai_client: openai.OpenAI,
) -> None:
    bad_bodies: list[tuple[dict[str, Any], str]] = [
        ({"stream": True, "stream_options": {"bogus": True}}, "stream_options.bogus"),
        (
            {"tools": [{"type": "function", "function": {"name": "no spaces please"}}]},
            "tools[0].function.name",
        ),
    ]
    for extra, param in bad_bodies:
        with pytest.raises(openai.BadRequestError) as info:
            openai_client.chat.completions.create(model="mock/echo", messages=HELLO, **extra)
        body: Any = info.value.body
        assert body["param"] == param, body


def test_a_stream_mode_job_takes_stream_options_alone(client: httpx.Client) -> None:
    body = {"model": "mock/echo", "messages": HELLO, "mode": "stream"}
    body |= {"stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/jobs", json=body) as response:
        text = "".join(response.iter_text())
    assert response.status_code == 200, text
    assert '"usage"' in text and "[DONE]" in text
    refused = client.post("/v1/jobs", json=body | {"mode": "batch"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_options"


def test_the_sdk_pages_with_a_known_cursor_only(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.batches.list(after="bogus")
    body: Any = info.value.body
    assert body["param"] == "after"


def test_a_silent_job_holds_the_stream_headers_back_only_for_the_bound(app_ctx: Flask) -> None:
    """Waiting to answer an early error with its status is bounded by its own setting, not
    the (15 s) ping interval: a job that has logged nothing yet gets its SSE answer."""
    from app.api.chat import early_error

    hub = StreamHub(app_ctx.config["REDIS_URL"])
    try:
        tail = Tail(hub, f"job_silent_{secrets.token_hex(4)}", lease_seconds=60, ping_seconds=15)
        redis_store.client.set(lease_key(tail.job_id), "T", px=60_000)  # a live worker
        started = time.monotonic()
        items, error = early_error(tail, 0.3)
        assert error is None and items is not None  # the relay goes on with the same follow()
        assert time.monotonic() - started < 5.0  # the bound plus slack, well under 15 s
        assert (tail.after, tail.ping_seconds) == ("0-0", 15)
        cast(Generator[Any], items).close()  # unsubscribes
        assert tail._sub is None
    finally:
        hub.close()
