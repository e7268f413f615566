"""The dashboard's time series, from the workers' per-minute rollup (`app.telemetry`).

One pipelined read of the window's minute hashes (at most 1,440) serves every chart,
whatever the number of jobs in the database: nothing here touches the jobs table.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import redis

from app import telemetry
from app.models import job as job_model

WINDOWS = {"15m": (900, 60), "1h": (3600, 60), "24h": (86400, 600)}  # seconds, step
DEFAULT_WINDOW = "1h"


def _ended(h: Mapping[str, float], mode: str) -> tuple[float, float]:
    """(jobs ended, of which failed) in one step."""
    ended = sum(h.get(f"n|{mode}|{s}", 0.0) for s in job_model.TERMINAL)
    return ended, h.get(f"n|{mode}|failed", 0.0)


def series(
    window: str = DEFAULT_WINDOW, client: redis.Redis | None = None, now: float | None = None
) -> dict[str, Any]:
    """{"t": step starts, "series": {name: values}} for every chart; None where no data."""
    seconds, step = WINDOWS.get(window, WINDOWS[DEFAULT_WINDOW])
    minutes = telemetry.minutes(seconds, client, now=now)
    per_step = step // 60
    steps = [minutes[i : i + per_step] for i in range(0, len(minutes), per_step)]
    out: dict[str, list[float | None]] = {}

    def put(name: str, value: float | None) -> None:
        out.setdefault(name, []).append(None if value is None else round(value, 4))

    t: list[int] = []
    for group in steps:
        t.append(group[0][0])
        h = telemetry.merge([m for _, m in group])
        span = 60.0 * len(group)
        for mode in job_model.MODES:
            for name, bounds in (
                ("ttft", telemetry.TTFT_BUCKETS),
                ("dur", telemetry.DURATION_BUCKETS),
            ):
                counts = telemetry.bucket_counts([h], f"{name}|{mode}", len(bounds))
                put(f"{name}_p50_{mode}", telemetry.quantile(0.5, counts, bounds))
                put(f"{name}_p95_{mode}", telemetry.quantile(0.95, counts, bounds))
            ended, failed = _ended(h, mode)
            put(f"jobs_per_min_{mode}", ended * 60.0 / span)
            put(f"tokens_per_s_{mode}", h.get(f"tok|{mode}|output", 0.0) / span)
            put(f"error_rate_{mode}", failed / ended if ended else None)
        for queue in telemetry.QUEUES:
            put(f"queue_{queue}", h.get(f"qd|{queue}"))
        put("batch_items_per_s", _ended(h, "batch")[0] / span)
    return {
        "window": window if window in WINDOWS else DEFAULT_WINDOW,
        "step_seconds": step,
        "generated_at": int(time.time() if now is None else now),
        "t": t,
        "series": out,
    }
