"""Building the app for a CLI command, with config errors as clean exits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from flask import Flask

from app.config import ConfigError


def make_app(**overrides: Any) -> Flask:
    """create_app() for a command, with configuration errors as one clean line."""
    from app import create_app

    try:
        return create_app(overrides)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


DEFAULT_URL = "http://127.0.0.1:8000"


def resolve_key(key: str | None) -> str:
    """--key, else SLUICE_API_KEY, else $SLUICE_HOME/dev-admin-key (what `sluice dev` writes)."""
    if key:
        return key
    if os.environ.get("SLUICE_API_KEY"):
        return os.environ["SLUICE_API_KEY"]
    path = Path(os.environ.get("SLUICE_HOME") or "var") / "dev-admin-key"
    if path.is_file():
        return path.read_text().strip()
    raise click.ClickException(
        f"no API key: pass --key, set SLUICE_API_KEY, or run `sluice dev` to create {path}"
    )
