"""Operators' JSON for automation: workers and system stats (admin keys only, all tenants)."""

from __future__ import annotations

import re
import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from app import telemetry
from app.auth import admin_required
from app.dashboard import queries
from app.errors import APIError
from app.extensions import redis_store
from app.models import job as job_model
from app.models.job import ACTIVE
from app.providers import providers
from app.services import capacity
from app.services.heartbeat import known_workers

bp = Blueprint("admin", __name__)

DIRECTIONS = ("input", "output")
WINDOW_RE = re.compile(r"^([1-9][0-9]{0,4})([smh])$")
WINDOW_MAX = 86400


def window_seconds(raw: str | None, default: str = "1h") -> int:
    """`15m`, `1h`, `24h`, or any `<n>s|m|h` from 1 minute to 24 hours; 400 naming `window`."""
    value = (raw or default).strip()
    match = WINDOW_RE.match(value)
    if match:
        seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]
        if 60 <= seconds <= WINDOW_MAX:
            return seconds
    raise APIError(
        400,
        f"'window' must be a duration from 1m to 24h such as 15m, 1h or 24h, got {value[:40]!r}.",
        param="window",
        code="invalid_value",
    )


def worker_object(worker: dict[str, Any]) -> dict[str, Any]:
    modes = worker.get("modes") or []
    return {
        "object": "sluice.worker",
        "name": worker.get("hostname"),
        "mode": modes[0] if len(modes) == 1 else ("both" if modes else None),
        "modes": modes,
        "queues": worker.get("queues") or [],
        "pool": worker.get("pool"),
        "concurrency": worker.get("concurrency"),
        "active_jobs": worker.get("active"),
        "pid": worker.get("pid"),
        "last_heartbeat": round(float(worker["last_seen"]), 3),
        "online": bool(worker.get("online")),
    }


@bp.get("/admin/workers")
@admin_required
def workers() -> ResponseReturnValue:
    """Workers that beat within the last hour, online ones first, by name."""
    max_age = current_app.config["WORKER_HEARTBEAT_SECONDS"] * 3
    found = known_workers(redis_store.client, max_age)
    found.sort(key=lambda w: (not w["online"], str(w.get("hostname"))))
    return jsonify(object="list", data=[worker_object(w) for w in found])


def stats(window: int) -> dict[str, Any]:
    """Counts, queue depths, latency percentiles and each provider's capacity split by mode."""
    client = redis_store.client
    in_flight = queries.job_counts()
    hashes = [telemetry.merge([h for _, h in telemetry.minutes(window, client)])]
    totals = telemetry.totals(client)
    ended = queries.ended_counts(hashes)
    counts = {mode: in_flight.get(mode, {}) | ended.get(mode, {}) for mode in job_model.MODES}
    tokens = {
        mode: {d: int(sum(h.get(f"tok|{mode}|{d}", 0) for h in hashes)) for d in DIRECTIONS}
        for mode in job_model.MODES
    }
    since = {
        mode: {s: int(totals.get(f"jobs|{mode}|{s}", 0)) for s in job_model.TERMINAL}
        for mode in job_model.MODES
    }
    return {
        "object": "sluice.stats",
        "generated_at": int(time.time()),
        "window_seconds": window,
        "jobs": counts,
        "jobs_ended_total": since,
        "queues": queries.queue_depths(client),
        "streams_in_flight": sum(in_flight.get("stream", {}).get(s, 0) for s in ACTIVE),
        "ttft_seconds": {m: telemetry.percentiles(hashes, "ttft", m) for m in job_model.MODES},
        "duration_seconds": {m: telemetry.percentiles(hashes, "dur", m) for m in job_model.MODES},
        "tokens": tokens,
        "provider_capacity": [split.as_dict() for split in capacity.current(providers().names())],
    }


@bp.get("/admin/stats")
@admin_required
def admin_stats() -> ResponseReturnValue:
    """`jobs`: in flight now, plus those that ended within `window` (default 1h)."""
    return jsonify(stats(window_seconds(request.args.get("window"))))
