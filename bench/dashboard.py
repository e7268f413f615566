"""`python -m bench dashboard`: the dashboard's and /metrics' reads at 10 million jobs.

Seeds a fresh database (SQLite under a temporary SLUICE_HOME unless DATABASE_URL; one
INSERT ... SELECT, so PostgreSQL's generate_series or SQLite's recursive CTE does the work)
with `--rows` jobs, almost all ended and a few hundred queued or running, and a day of
per-minute rollup whose counts add up to the same number of jobs; then times each read the
dashboard, /v1/admin/stats and /metrics make (median of `--repeat`), next to the
`GROUP BY` over every job that the counts used to be.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from app import telemetry
from app.dashboard import charts, queries
from app.extensions import db, redis_store
from app.metrics import REGISTRY
from app.models import Job, utcnow

ACTIVE_ROWS = 300

_PG = """
INSERT INTO jobs (id, tenant_id, mode, status, endpoint, provider, model, priority,
                  on_disconnect, request, attempts, created_at, started_at, first_token_at,
                  finished_at, usage)
SELECT 'job_' || lpad(g::text, 26, '0'), :tenant,
       CASE WHEN g % 3 = 0 THEN 'stream' ELSE 'batch' END,
       CASE WHEN g > :n - :active THEN (CASE WHEN g % 2 = 0 THEN 'queued' ELSE 'running' END)
            WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END,
       '/v1/chat/completions', 'mock', 'mock/demo', 0, 'detach', '{}', 1,
       now() - make_interval(secs => (:n - g) * 0.01), now(), now(), now(),
       '{"prompt_tokens": 10, "completion_tokens": 40}'
FROM generate_series(1, :n) AS g
"""
_SQLITE = """
WITH RECURSIVE seq(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM seq WHERE g < :n)
INSERT INTO jobs (id, tenant_id, mode, status, endpoint, provider, model, priority,
                  on_disconnect, request, attempts, created_at, started_at, first_token_at,
                  finished_at, usage)
SELECT 'job_' || printf('%026d', g), :tenant,
       CASE WHEN g % 3 = 0 THEN 'stream' ELSE 'batch' END,
       CASE WHEN g > :n - :active THEN (CASE WHEN g % 2 = 0 THEN 'queued' ELSE 'running' END)
            WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END,
       '/v1/chat/completions', 'mock', 'mock/demo', 0, 'detach', '{}', 1,
       strftime('%Y-%m-%d %H:%M:%f', 'now', printf('-%d seconds', (:n - g) / 100)) || '000',
       NULL, NULL, NULL, '{"prompt_tokens": 10, "completion_tokens": 40}'
FROM seq
"""


def seed_jobs(rows: int) -> float:
    from app.auth import create_key

    key, _ = create_key("bench")
    started = time.perf_counter()
    sql = _PG if db.engine.dialect.name == "postgresql" else _SQLITE
    db.session.execute(text(sql), {"n": rows, "tenant": key.tenant_id, "active": ACTIVE_ROWS})
    db.session.commit()
    if db.engine.dialect.name == "postgresql":
        db.session.execute(text("ANALYZE jobs"))
    else:
        db.session.execute(text("ANALYZE"))
    db.session.commit()
    return time.perf_counter() - started


def seed_rollup(rows: int) -> float:
    """A day of minutes whose job counts add up to `rows`, with realistic bucket spreads."""
    started = time.perf_counter()
    client = redis_store.client
    now = time.time()
    per_minute = max(1, rows // 1440)
    with client.pipeline(transaction=False) as pipe:
        for i in range(1440):
            key = telemetry.MINUTE_PREFIX + str(telemetry.minute_of(now - i * 60))
            fields: dict[str, float] = {}
            for mode, share in (("stream", 1 / 3), ("batch", 2 / 3)):
                n = int(per_minute * share)
                fields[f"n|{mode}|succeeded"] = n - n // 50
                fields[f"n|{mode}|failed"] = n // 50
                fields[f"tok|{mode}|input"] = n * 10
                fields[f"tok|{mode}|output"] = n * 40
                for b in range(3, 9):
                    fields[f"dur|{mode}|{b}"] = n // 6
                    if mode == "stream":
                        fields[f"ttft|{mode}|{b - 2}"] = n // 6
            fields["qd|interactive"] = i % 7
            fields["qd|batch"] = (i * 37) % 5000
            pipe.hset(key, mapping=fields)
            pipe.expire(key, telemetry.ROLLUP_KEEP_SECONDS)
        pipe.execute()
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        db.session.rollback()
    return statistics.median(times) * 1000


def _group_by_all_jobs() -> Any:
    return db.session.execute(
        select(Job.mode, Job.status, func.count()).group_by(Job.mode, Job.status)
    ).all()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench dashboard")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--home", type=Path, default=None, help="keep the data here; a second run reuses it"
    )
    args = parser.parse_args(argv)
    home = args.home or Path(tempfile.mkdtemp(prefix="sluice-bench-dash-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["SLUICE_HOME"] = str(home)
    os.environ.setdefault("SLUICE_LOG_LEVEL", "WARNING")
    if not os.environ.get("REDIS_URL"):
        from app import embedded_redis

        os.environ["REDIS_URL"], _ = embedded_redis.start(home)
    import flask_migrate

    from app import create_app
    from app.api.admin import stats

    app = create_app()
    with app.app_context():
        flask_migrate.upgrade()
        dialect = db.engine.dialect.name
        count = db.session.scalar(select(func.count()).select_from(Job)) or 0
        if count < args.rows:
            print(f"seeding {args.rows:,} jobs ({dialect}) ...", flush=True)
            seed_seconds = seed_jobs(args.rows - count)
            count = db.session.scalar(select(func.count()).select_from(Job)) or 0
            print(f"seeded {count:,} rows in {seed_seconds:.0f} s", flush=True)
        rollup_seconds = seed_rollup(args.rows)
        print(f"{count:,} job rows; a day of rollup seeded in {rollup_seconds:.2f} s\n")
        reads: list[tuple[str, Callable[[], Any]]] = [
            ("in-flight counts (status index)", queries.job_counts),
            ("oldest queued job per mode", lambda: queries.oldest_queued_age(utcnow())),
            ("batches not ended, by status", queries.batch_status_counts),
            ("newest 50 jobs (all tenants)", lambda: queries.recent_jobs(50)),
            ("newest 50 stream jobs", lambda: queries.recent_jobs(50, mode="stream")),
            ("charts, 15 min", lambda: charts.series("15m")),
            ("charts, 1 h", lambda: charts.series("1h")),
            ("charts, 24 h", lambda: charts.series("24h")),
            ("/v1/admin/stats?window=24h", lambda: stats(86400)),
            ("/metrics (whole registry)", lambda: _scrape(app)),
            ("before: GROUP BY over every job", _group_by_all_jobs),
        ]
        print(f"| read ({args.rows:,} jobs, {dialect}) | median ms (of {args.repeat}) |")
        print("|---|---:|")
        for name, fn in reads:
            print(f"| {name} | {timed(fn, args.repeat):.1f} |", flush=True)


def _scrape(app: Any) -> bytes:
    from prometheus_client import generate_latest

    with app.test_request_context("/metrics"):
        return generate_latest(REGISTRY)
