"""Fixtures: a real database (schema from migrations), a real Redis, real web and workers."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flask_migrate
import httpx
import openai
import pytest
import redis
from flask import Flask

from app import create_app, embedded_redis
from app.auth import create_key
from tests.fake_upstream import FakeUpstream
from tests.stack import Stack, drop_postgres_database, fresh_postgres_database

CLAIM_KEY = "sluice:test-session"
TEST_SETTINGS = {
    "SLUICE_MOCK_TTFT_MS": "5",
    "SLUICE_MOCK_TOKENS_PER_SECOND": "2000",
    "SLUICE_STREAM_LEASE_SECONDS": "3",
    "SLUICE_STREAM_PING_SECONDS": "1",
    "SLUICE_WORKER_HEARTBEAT_SECONDS": "1",
    "SLUICE_BATCH_CHUNK_SIZE": "10",
    "SLUICE_LOG_LEVEL": "WARNING",
}


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sluice-home")


@pytest.fixture(scope="session")
def database_url(home: Path) -> Iterator[str]:
    """DATABASE_URL's server with a fresh database, or SQLite under the test home."""
    server = os.environ.get("DATABASE_URL")
    if server and server.startswith(("postgres://", "postgresql")):
        url, name = fresh_postgres_database(server)
        yield url
        drop_postgres_database(server, name)
    else:
        yield f"sqlite:///{home / 'test.db'}"


def _claim_redis_db(server: str) -> tuple[str, redis.Redis]:
    """Claim a Redis database no concurrent test session uses (broker queues are per db)."""
    base = server.rsplit("/", 1)[0] if server.count("/") > 2 else server.rstrip("/")
    first = int(server.rsplit("/", 1)[1] or 0) if server.count("/") > 2 else 0
    for index in [first, *range(15, 0, -1)]:
        client = redis.Redis.from_url(f"{base}/{index}")
        if client.set(CLAIM_KEY, os.getpid(), nx=True, ex=3600):
            client.flushdb()
            client.set(CLAIM_KEY, os.getpid(), ex=3600)
            return f"{base}/{index}", client
    raise RuntimeError(f"every database of {base} is claimed by another test session")


@pytest.fixture(scope="session")
def redis_url(home: Path) -> Iterator[str]:
    """A database of REDIS_URL's server claimed for this session, or an embedded Redis."""
    server = os.environ.get("REDIS_URL")
    if server:
        url, claimed = _claim_redis_db(server)
        yield url
        claimed.flushdb()
        return
    url, proc = embedded_redis.start(home / "redis")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


# what the stack's processes must not inherit from the shell that runs the tests
AMBIENT = ("DATABASE_URL", "REDIS_URL", "OPENAI_", "ANTHROPIC_", "SLUICE_")


@pytest.fixture(scope="session")
def test_env(
    home: Path, database_url: str, redis_url: str, upstream: FakeUpstream
) -> dict[str, str]:
    """The environment of every process of the stack; this process's os.environ is untouched."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(AMBIENT)}
    return inherited | {
        "SLUICE_HOME": str(home),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "OPENAI_API_KEY": "sk-test-upstream",
        "OPENAI_BASE_URL": upstream.openai_base_url,
        "ANTHROPIC_API_KEY": "sk-ant-test-upstream",
        "ANTHROPIC_BASE_URL": upstream.anthropic_base_url,
        **TEST_SETTINGS,
    }


@pytest.fixture(scope="session")
def make_app(test_env: dict[str, str]) -> Callable[..., Flask]:
    """create_app() with the test configuration (test_env), plus any overrides."""

    def make(overrides: dict[str, Any] | None = None, **env: str) -> Flask:
        return create_app(overrides, environ=test_env | env)

    return make


@pytest.fixture(scope="session")
def app(make_app: Callable[..., Flask]) -> Flask:
    """An in-process app on the test database, its schema built by the migrations."""
    flask_app = make_app()
    with flask_app.app_context():
        flask_migrate.upgrade()
    return flask_app


@pytest.fixture
def app_ctx(app: Flask) -> Iterator[Flask]:
    with app.app_context():
        yield app


@pytest.fixture(scope="session")
def stack(app: Flask, test_env: dict[str, str], home: Path) -> Iterator[Stack]:
    """gunicorn (gevent) web, one stream worker and one batch worker, ready."""
    running = Stack(env=test_env, home=home)
    running.start_all()
    try:
        yield running
    finally:
        running.stop()


def _new_key(app: Flask, *, admin: bool = False) -> str:
    with app.app_context():
        return create_key(f"tenant-{secrets.token_hex(4)}", admin=admin)[1]


@pytest.fixture
def api_key(app: Flask) -> str:
    """A key for a tenant of this test's own, so tests never see each other's data."""
    return _new_key(app)


@pytest.fixture
def other_key(app: Flask) -> str:
    """A key for a second tenant, for isolation tests."""
    return _new_key(app)


@pytest.fixture
def admin_key(app: Flask) -> str:
    return _new_key(app, admin=True)


@pytest.fixture
def client(stack: Stack, api_key: str) -> Iterator[httpx.Client]:
    """An HTTP client on the live web server, authenticated as this test's tenant."""
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as http:
        yield http


@pytest.fixture
def openai_client(stack: Stack, api_key: str) -> openai.OpenAI:
    """The official SDK pointed at Sluice."""
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=api_key, max_retries=0, timeout=30)


STACK_FIXTURES = frozenset({"app", "stack", "redis_url", "database_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test that needs no database, Redis or processes `unit` (`make test-fast`)."""
    for item in items:
        if STACK_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.unit)
