"""GET /v1/models and /v1/models/{id} with the official openai SDK as client."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator

import httpx
import httpx2
import openai
import pytest
from flask import Flask

from app.auth import create_key
from app.providers.mock import MODELS
from tests.fake_upstream import FakeUpstream
from tests.stack import Stack


def test_sdk_lists_and_retrieves_the_models(openai_client: openai.OpenAI) -> None:
    listed = openai_client.models.list()
    ids = [model.id for model in listed]
    assert ids[: len(MODELS)] == [f"mock/{name}" for name in MODELS]
    assert all(model.object == "model" and model.created > 0 for model in listed)
    assert {model.owned_by for model in listed} >= {"mock"}
    echo = openai_client.models.retrieve("mock/echo")
    assert echo.id == "mock/echo" and echo.owned_by == "mock"
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.models.retrieve("mock/nonesuch")
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"


def test_models_need_a_key(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/v1/models").status_code == 401


@pytest.fixture
def configured(
    app: Flask, make_app: Callable[..., Flask], upstream: FakeUpstream
) -> Iterator[tuple[Flask, openai.OpenAI]]:
    """An in-process app whose sluice.toml declares models and fetches one provider's list."""
    down = FakeUpstream().start()
    down_url = down.openai_base_url
    down.stop()  # a provider whose /models cannot be reached
    providers = {
        "local": {
            "kind": "openai",
            "base_url": upstream.openai_base_url,
            "models": ["llama-3-8b", "gpt-fake"],
            "fetch_models": True,
        },
        "gone": {"kind": "openai", "base_url": down_url, "fetch_models": True},
        "anthropic": {"models": ["claude-sonnet-4"]},
    }
    local = make_app({"PROVIDERS": providers})
    with local.app_context():
        key = create_key(f"tenant-{secrets.token_hex(4)}")[1]
    transport = httpx2.WSGITransport(app=local)
    http = httpx2.Client(transport=transport, base_url="http://sluice.local")
    client = openai.OpenAI(
        base_url="http://sluice.local/v1", api_key=key, http_client=http, max_retries=0
    )
    yield local, client
    http.close()


def test_declared_and_fetched_models(
    configured: tuple[Flask, openai.OpenAI], upstream: FakeUpstream
) -> None:
    _, client = configured
    first = [m.id for m in client.models.list()]  # never waits for an upstream
    assert "local/llama-3-8b" in first and "anthropic/claude-sonnet-4" in first
    assert first.index("local/llama-3-8b") < first.index("local/gpt-fake")
    deadline = time.monotonic() + 10
    while True:
        ids = [m.id for m in client.models.list()]
        if "local/gpt-fake-mini" in ids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "local/gpt-fake-mini" in ids  # fetched from the upstream's own /models
    assert ids.count("local/gpt-fake") == 1  # declared and fetched: listed once
    assert not [i for i in ids if i.startswith("gone/")]  # its fetch failed; listing did not
    requests = upstream.model_list_requests
    for _ in range(5):
        client.models.list()
    assert upstream.model_list_requests == requests  # cached
    assert client.models.retrieve("local/gpt-fake-mini").owned_by == "local"


def test_bad_models_table_fails_at_startup(make_app: Callable[..., Flask]) -> None:
    with pytest.raises(ValueError, match="models must be a list"):
        make_app({"PROVIDERS": {"local": {"base_url": "http://x", "models": "llama"}}})
    with pytest.raises(ValueError, match="fetch_models needs an OpenAI-compatible"):
        make_app({"PROVIDERS": {"anthropic": {"fetch_models": True}}})
