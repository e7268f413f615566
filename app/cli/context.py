"""Building the app for a CLI command, with config errors as clean exits."""

from __future__ import annotations

from typing import Any

import click
from flask import Flask

from app.config import ConfigError


def make_app(*, redis: bool = False, **overrides: Any) -> Flask:
    """create_app() for a command; Redis is only started when the command needs it."""
    from app import create_app

    try:
        return create_app({"EMBEDDED_REDIS": redis, **overrides})
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
