"""Unbound extensions, bound to an app in create_app()."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import redis
from celery import Celery
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

from app.models.base import Base

if TYPE_CHECKING:
    from flask import Flask

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")

db = SQLAlchemy(model_class=Base)
migrate = Migrate(directory=MIGRATIONS_DIR, render_as_batch=True, compare_type=True)


class RedisHolder:
    """One connection pool per process, shared by everything that talks to Redis."""

    def __init__(self) -> None:
        self._client: redis.Redis | None = None

    def init_app(self, app: Flask) -> None:
        url = app.config["REDIS_URL"]
        self._client = (
            redis.Redis.from_url(
                url, decode_responses=True, health_check_interval=30, max_connections=200
            )
            if url
            else None
        )
        app.extensions["redis"] = self

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            raise RuntimeError("Redis is not configured for this app")
        return self._client


redis_store = RedisHolder()
celery = Celery("sluice")
