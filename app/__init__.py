"""The Flask application factory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app import embedded_redis, providers
from app.config import load_config
from app.errors import register_error_handlers
from app.extensions import db, migrate, redis_store
from app.queueing import celery_init_app


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app from the environment, sluice.toml and any overrides."""
    app = Flask(__name__)
    app.config.update(load_config())
    app.config.update(overrides or {})
    Path(app.config["SLUICE_HOME"]).mkdir(parents=True, exist_ok=True)
    register_logging(app)
    register_redis_url(app)
    register_extensions(app)
    providers.init_app(app)
    register_blueprints(app)
    register_error_handlers(app)
    return app


def register_logging(app: Flask) -> None:
    logging.basicConfig(
        level=app.config["LOG_LEVEL"], format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def register_redis_url(app: Flask) -> None:
    """Without REDIS_URL, reuse or start the embedded Redis under SLUICE_HOME."""
    if not app.config["REDIS_URL"] and app.config.get("EMBEDDED_REDIS", True):
        app.config["REDIS_URL"] = embedded_redis.ensure(Path(app.config["SLUICE_HOME"]))


def register_extensions(app: Flask) -> None:
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite"):
        app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {"timeout": 30}})
    else:
        app.config.setdefault(
            "SQLALCHEMY_ENGINE_OPTIONS",
            {"pool_size": 10, "max_overflow": 40, "pool_pre_ping": True, "pool_recycle": 1800},
        )
    db.init_app(app)
    migrate.init_app(app, db)
    redis_store.init_app(app)
    celery_init_app(app)


def register_blueprints(app: Flask) -> None:
    from app.api import bp as api_bp
    from app.dashboard import bp as dashboard_bp
    from app.health import bp as health_bp
    from app.metrics import bp as metrics_bp

    app.register_blueprint(health_bp)
    app.register_blueprint(api_bp)
    app.register_blueprint(dashboard_bp)
    app.register_blueprint(metrics_bp)


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL and a busy timeout, so web and workers share one SQLite file."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
