"""Liveness and readiness probes."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from app.extensions import db, redis_store
from app.services import sweeper
from app.services.heartbeat import live_workers

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    checks: dict[str, str] = {}
    try:
        db.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        redis_store.client.ping()
        checks["redis"] = "ok"
        max_age = current_app.config["WORKER_HEARTBEAT_SECONDS"] * 3
        modes = {mode for w in live_workers(redis_store.client, max_age) for mode in w["modes"]}
        for mode in ("stream", "batch"):
            checks[f"{mode}_worker"] = "ok" if mode in modes else "missing: no live worker"
    except Exception as exc:
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    missing = sorted(name for name, state in checks.items() if state != "ok")
    status = 200 if not missing else 503
    try:  # shown, not gating: the web serves without a sweeper
        sweep = sweeper.state()
    except Exception as exc:
        sweep = f"unknown: {type(exc).__name__}"
    return jsonify(
        status="ready" if not missing else "not ready",
        checks=checks,
        missing=missing,
        sweeper=sweep,
    ), status
