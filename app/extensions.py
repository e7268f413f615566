"""Unbound extensions, bound to an app in create_app()."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from flask import current_app, has_app_context
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event

from app.models.base import Base

if TYPE_CHECKING:
    from flask import Flask
    from limits.storage import Storage
    from limits.strategies import RateLimiter

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")
REDIS_URL_MISSING = (
    "REDIS_URL is not set: `sluice dev` runs an embedded Redis on one machine;"
    " anywhere else set REDIS_URL=redis://host:6379/0"
)

db = SQLAlchemy(model_class=Base)
migrate = Migrate(directory=MIGRATIONS_DIR, render_as_batch=True, compare_type=True)


def current_flask_app() -> Flask:
    """The app behind the `current_app` proxy, to hand to threads and greenlets."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]  # untyped proxy
    return app


# libpq: a dead server or a cut link fails the call within about a minute instead of the
# kernel's ~15 min of retransmits, while the process's lease renewer keeps its claims live
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms an unacknowledged send may wait
}


def init_db(app: Flask) -> None:
    """Bind the database (a pool of DB_POOL_SIZE + DB_MAX_OVERFLOW connections per process);
    each SQLite engine gets WAL and a busy timeout on connect."""
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    options: dict[str, Any] = {
        "pool_size": app.config["DB_POOL_SIZE"],
        "max_overflow": app.config["DB_MAX_OVERFLOW"],
        "pool_timeout": app.config["DB_POOL_TIMEOUT"],
    }
    if uri.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    else:
        options |= {"pool_pre_ping": True, "pool_recycle": 1800}
        if uri.startswith("postgresql"):
            options["connect_args"] = POSTGRES_CONNECT_ARGS
    app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", options)
    db.init_app(app)
    with app.app_context():
        for engine in db.engines.values():
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", sqlite_pragmas)
    migrate.init_app(app, db)


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL and a busy timeout, so web and workers share one SQLite file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class RedisNotConfigured(RuntimeError):
    """Something needs Redis and REDIS_URL is not set."""


def redis_client(
    url: str,
    *,
    max_connections: int,
    pool_timeout: float,
    socket_timeout: float,
    connect_timeout: float,
) -> redis.Redis:
    """A client whose sockets time out and whose pool makes a burst wait (bounded) for a
    connection instead of failing with "Too many connections"."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=30,
        **keepalive(url),
    )
    return redis.Redis(connection_pool=pool)


def keepalive(redis_url: str) -> dict[str, bool]:
    """TCP keepalive for a Redis connection's options (a Unix socket takes none)."""
    return {} if redis_url.startswith("unix://") else {"socket_keepalive": True}


def app_redis_client(config: Any, max_connections: int | None = None) -> redis.Redis:
    """redis_client() with the app's settings."""
    if not config["REDIS_URL"]:
        raise RedisNotConfigured(REDIS_URL_MISSING)
    return redis_client(
        config["REDIS_URL"],
        max_connections=max_connections or config["REDIS_MAX_CONNECTIONS"],
        pool_timeout=config["REDIS_POOL_TIMEOUT"],
        socket_timeout=config["REDIS_SOCKET_TIMEOUT"],
        connect_timeout=config["REDIS_CONNECT_TIMEOUT"],
    )


class RedisHolder:
    """Each app's one Redis client (one pool), shared by everything that talks to Redis."""

    def __init__(self) -> None:
        self._first: redis.Redis | None = None

    def init_app(self, app: Flask) -> None:
        client = app_redis_client(app.config) if app.config["REDIS_URL"] else None
        app.extensions["redis"] = client
        if self._first is None:
            self._first = client

    def for_app(self, app: Flask) -> redis.Redis:
        client: redis.Redis | None = app.extensions.get("redis")
        if client is None:
            raise RedisNotConfigured(REDIS_URL_MISSING)
        return client

    @property
    def client(self) -> redis.Redis:
        """The current app's client; outside an app context, the process's first one."""
        if has_app_context():
            return self.for_app(current_app)
        if self._first is None:
            raise RedisNotConfigured(REDIS_URL_MISSING)
        return self._first


redis_store = RedisHolder()


class AppLimiter(Limiter):
    """flask-limiter's Limiter on each app's own Redis pool (`REDIS_URL`).

    The stock Limiter keeps the storage of the last init_app for every app of the process;
    this one keeps each app's strategy (and storage) in app.extensions. An app without
    REDIS_URL gets no limiter hooks, and a limit checked there raises RedisNotConfigured.
    """

    def init_app(self, app: Flask) -> None:
        if not app.config["REDIS_URL"]:
            return
        pool = redis_store.for_app(app).connection_pool
        url = app.config["REDIS_URL"]  # limits spells a Unix socket `redis+unix://`
        app.config.setdefault("RATELIMIT_STORAGE_URI", url.replace("unix://", "redis+unix://", 1))
        app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {"connection_pool": pool})
        super().init_app(app)
        app.extensions["rate_limit_strategy"] = self._limiter

    @property
    def limiter(self) -> RateLimiter:
        """The current app's strategy (fixed window), over its storage."""
        app = current_app if has_app_context() else None
        strategy: RateLimiter | None = app.extensions.get("rate_limit_strategy") if app else None
        if strategy is None:
            raise RedisNotConfigured(REDIS_URL_MISSING)
        return strategy

    @property
    def storage(self) -> Storage:
        return self.limiter.storage


# Limits are declared (and checked) in app.rate_limits; every other request is exempt.
limiter = AppLimiter(get_remote_address, strategy="fixed-window", key_prefix="sluice")
