"""Outages: Redis or the database unreachable answers 503 with Retry-After, never 500."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask import Flask

from app.extensions import redis_store
from app.streams.hub import current_hub
from tests.stack import Stack, TcpProxy

CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hello"}]}
DOCUMENTS = {
    "model": "mock/echo",
    "instructions": "Repeat.",
    "documents": [{"id": "a", "text": "alpha"}],
}


def _submits(file_id: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Every submit path and a /v1 read, as (method, path, request kwargs)."""
    return {
        "chat stream": ("POST", "/v1/chat/completions", {"json": {**CHAT, "stream": True}}),
        "chat": ("POST", "/v1/chat/completions", {"json": CHAT}),
        "jobs": ("POST", "/v1/jobs", {"json": CHAT}),
        "jobs async": (
            "POST",
            "/v1/jobs",
            {"json": CHAT, "headers": {"Prefer": "respond-async"}},
        ),
        "document batch": ("POST", "/v1/document-batches", {"json": DOCUMENTS}),
        "openai batch": (
            "POST",
            "/v1/batches",
            {
                "json": {
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                }
            },
        ),
        "me": ("GET", "/v1/me", {}),
    }


# Background work needs Redis only to send its task, after its commit: in a Redis outage it
# is accepted (a 503 would have its client create it twice) and the sweeper sends it later.
ACCEPTED = {"jobs async": 202, "document batch": 202, "openai batch": 200}


def _assert_503(response: httpx.Response, what: str) -> None:
    assert response.status_code == 503, (what, response.status_code, response.text[:300])
    assert int(response.headers["Retry-After"]) > 0
    error = response.json()["error"]
    assert error["type"] == "service_unavailable_error"
    assert error["code"] in ("redis_unavailable", "database_unavailable")


def test_dead_redis_or_database_is_503_in_process(
    make_app: Callable[..., Flask], api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    no_redis = make_app({"REDIS_URL": "redis://127.0.0.1:1/0"}).test_client()
    for name, (method, path, kwargs) in _submits("file_x").items():
        if path == "/v1/batches":
            continue  # needs an uploaded file: the real-stack test covers it
        caplog.clear()
        answer = no_redis.open(
            path, method=method, headers=auth | kwargs.pop("headers", {}), **kwargs
        )
        if path == "/v1/me" or name in ACCEPTED:
            assert answer.status_code == ACCEPTED.get(name, 200), name  # the database only
            continue
        assert answer.status_code == 503, (path, answer.get_data(as_text=True))
        assert answer.headers["Retry-After"] == "5"
        assert answer.json["error"]["code"] == "redis_unavailable"
        outage_lines = [r for r in caplog.records if "answered 503" in r.getMessage()]
        assert len(outage_lines) == 1  # logged once, without a traceback
        assert outage_lines[0].exc_info is None

    dead_db = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    no_db = make_app({"SQLALCHEMY_DATABASE_URI": dead_db}).test_client()
    answer = no_db.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert answer.status_code == 503
    assert answer.json["error"]["code"] == "database_unavailable"
    assert answer.headers["Retry-After"] == "5"


@pytest.fixture
def outage_stack(
    stack: Stack, test_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[Stack, TcpProxy, TcpProxy | None]]:
    """A second web node reaching Redis (and PostgreSQL) only through proxies it can cut."""
    redis_proxy = TcpProxy(test_env["REDIS_URL"])
    env = test_env | {
        "REDIS_URL": redis_proxy.url,
        "SLUICE_REDIS_SOCKET_TIMEOUT": "2",
        "SLUICE_REDIS_CONNECT_TIMEOUT": "1",
        "SLUICE_REDIS_POOL_TIMEOUT": "2",
    }
    db_proxy = None
    if test_env["DATABASE_URL"].startswith("postgres"):
        db_proxy = TcpProxy(test_env["DATABASE_URL"])
        env["DATABASE_URL"] = db_proxy.url
    web = Stack(env=env, home=tmp_path)
    web.start_web()
    try:
        _wait_for(lambda: httpx.get(web.url + "/healthz", timeout=2).status_code == 200)
        yield web, redis_proxy, db_proxy
    finally:
        web.stop()
        redis_proxy.cut()
        if db_proxy is not None:
            db_proxy.cut()


def _wait_for(ok: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)


def test_redis_and_database_cut_answer_503_then_recover(
    outage_stack: tuple[Stack, TcpProxy, TcpProxy | None], api_key: str, tmp_path: Path
) -> None:
    web, redis_proxy, db_proxy = outage_stack
    auth = {"Authorization": f"Bearer {api_key}"}
    seen_503: list[str] = []

    def count(response: httpx.Response) -> None:
        if response.status_code == 503:
            seen_503.append(response.request.url.path)

    hooks = {"response": [count]}
    with httpx.Client(base_url=web.url, headers=auth, timeout=30, event_hooks=hooks) as client:
        upload = client.post(
            "/v1/files",
            files={"file": ("in.jsonl", io.BytesIO(_batch_line()), "application/jsonl")},
            data={"purpose": "batch"},
        )
        assert upload.status_code == 200, upload.text
        submits = _submits(upload.json()["id"])
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200

        cuts = [("redis", redis_proxy)] + ([("database", db_proxy)] if db_proxy else [])
        for what, proxy in cuts:
            assert proxy is not None
            proxy.cut()
            for name, (method, path, kwargs) in submits.items():
                if what == "redis" and name == "me":
                    continue  # needs the database only
                started = time.monotonic()
                answer = client.request(method, path, **kwargs)
                assert time.monotonic() - started < 15  # bounded by the socket timeouts
                if what == "redis" and name in ACCEPTED:
                    assert answer.status_code == ACCEPTED[name], (name, answer.text[:300])
                    continue
                _assert_503(answer, f"{what} cut: {name}")
                assert answer.json()["error"]["code"] == f"{what}_unavailable"
            proxy.restore()
            _wait_for(lambda: client.post("/v1/chat/completions", json=CHAT).status_code == 200)
            assert client.get("/v1/me").status_code == 200

    log = (tmp_path / "web.log").read_text()
    logged = re.findall(r"unavailable: \S+ (/v1/\S+) answered 503", log)
    assert sorted(logged) == sorted(seen_503)  # each 503 logged once
    assert "answered 500" not in log and "Traceback" not in log


def _batch_line() -> bytes:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
    return (json.dumps(line) + "\n").encode()


def test_burst_beyond_the_pool_waits_instead_of_failing(
    make_app: Callable[..., Flask],
) -> None:
    """More concurrent commands than pooled connections: each waits for one (bounded)."""
    app = make_app({"REDIS_MAX_CONNECTIONS": 2, "REDIS_POOL_TIMEOUT": 10.0})
    errors: list[Exception] = []

    def hold() -> None:
        try:
            with app.app_context():
                redis_store.client.blpop(["sluice:test:never"], timeout=0.2)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hold) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []

    bounded = make_app({"REDIS_MAX_CONNECTIONS": 1, "REDIS_POOL_TIMEOUT": 0.3})
    holder = threading.Thread(target=_blpop, args=(bounded, 3.0))
    holder.start()
    time.sleep(0.3)
    started = time.monotonic()
    with bounded.app_context(), pytest.raises(redis.ConnectionError):
        redis_store.client.get("sluice:test:x")
    assert time.monotonic() - started < 2.5  # the wait is bounded by REDIS_POOL_TIMEOUT
    holder.join(10)


def _blpop(app: Flask, seconds: float) -> None:
    with app.app_context():
        redis_store.client.blpop(["sluice:test:never"], timeout=seconds)


@pytest.mark.parametrize("client", ["app", "stream hub"])
def test_a_silent_redis_times_out(client: str, make_app: Callable[..., Flask]) -> None:
    """A server that accepts and never answers: a command fails within the socket timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    app = make_app({"REDIS_URL": url, "REDIS_SOCKET_TIMEOUT": 0.5})
    outcome: list[BaseException] = []

    def ping() -> None:
        try:
            with app.app_context():
                (redis_store.client if client == "app" else current_hub().client).ping()
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=ping, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(30)
    elapsed = time.monotonic() - started
    silent.close()
    assert not worker.is_alive(), "a Redis command waited forever on a silent server"
    assert outcome and isinstance(outcome[0], redis.TimeoutError)
    assert elapsed < 3  # REDIS_SOCKET_TIMEOUT (0.5 s) applies, not a library default
