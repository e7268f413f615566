"""Maintained counters and histograms in Redis, observed once per job where the work ends.

Whatever ends a job calls `stream_rows_ended(rows)` (the stream runner's one terminal
UPDATE), `batch_rows_written(rows)` (the batch runner, cancel, expiry, the sweeper) or
`batch_results_written(ids, at)` (provider batches) once per job or result flush, never per
delta. Rows are the ended columns as written (RETURNING); the last reads them back by
primary key. All add them, in one pipelined round trip, to:

- `sluice:tm:totals`, a hash of counters since Redis began keeping them, which every web
  node's `/metrics` exposes as Prometheus counters and histograms (so any node answers for
  the whole deployment, with no per-process files);
- `sluice:tm:m:<unix minute>`, one hash per minute kept for `ROLLUP_KEEP_SECONDS`, which the
  dashboard's charts and `/v1/admin/stats` aggregate over a window (at most 1,440 small
  hashes for 24 hours, however many jobs ran).

Histogram buckets are stored as per-bucket counts (field `...|<bucket index>`) and made
cumulative when read; `quantile` interpolates within a bucket the way Prometheus's
`histogram_quantile` does.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import select

from app.extensions import db, redis_store
from app.models import Job
from app.queueing import BATCH_QUEUE, STREAM_QUEUE

log = logging.getLogger(__name__)

QUEUES = (STREAM_QUEUE, BATCH_QUEUE)
TOTALS_KEY = "sluice:tm:totals"
MINUTE_PREFIX = "sluice:tm:m:"
ROLLUP_KEEP_SECONDS = 25 * 3600
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0,
)  # fmt: skip
# error codes that are Sluice's own verdicts, not a provider's
OWN_ERRORS = frozenset(
    {
        "job_cancelled", "worker_lost", "stream_unavailable", "internal_error", "worker_error",
        "model_not_found", "invalid_request", "batch_cancelled", "batch_expired", "expired",
        "cancelled", "queue_timeout",
    }
)  # fmt: skip
ENDED_COLUMNS = (  # what counting an ended job reads (RETURNING these saves a read)
    Job.id, Job.mode, Job.provider, Job.status, Job.created_at, Job.first_token_at,
    Job.finished_at, Job.usage, Job.error,
)  # fmt: skip


def bucket_index(value: float, bounds: Sequence[float]) -> int:
    """The first bucket whose upper bound holds value (len(bounds) is +Inf)."""
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)


def minute_of(at: float) -> int:
    return int(at // 60) * 60


def error_kind(error: Mapping[str, Any] | None) -> str | None:
    """The provider's error kind (code, else type), or None when the error is Sluice's own."""
    if not error:
        return None
    kind = str(error.get("code") or error.get("type") or "unknown")[:60]
    return None if kind in OWN_ERRORS else kind


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def _tokens(usage: Mapping[str, Any] | None, name: str) -> int:
    value = (usage or {}).get(name)
    return value if isinstance(value, int) and value > 0 else 0


def fields_of(row: Any) -> tuple[Counter[str], Counter[str], dict[str, float]]:
    """(totals increments, minute increments, float sums) for one ended job row."""
    totals: Counter[str] = Counter()
    minute: Counter[str] = Counter()
    sums: dict[str, float] = {}
    mode, provider, status = row.mode, row.provider or "unknown", row.status
    totals[f"jobs|{mode}|{status}"] += 1
    minute[f"n|{mode}|{status}"] += 1
    for direction, name in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        count = _tokens(row.usage, name)
        if count:
            totals[f"tok|{mode}|{direction}"] += count
            minute[f"tok|{mode}|{direction}"] += count
    ttft = _seconds(row.created_at, row.first_token_at)
    if ttft is not None:
        i = bucket_index(ttft, TTFT_BUCKETS)
        totals[f"ttft|{mode}|{provider}|{i}"] += 1
        minute[f"ttft|{mode}|{i}"] += 1
        sums[f"ttft_sum|{mode}|{provider}"] = ttft
    duration = _seconds(row.created_at, row.finished_at)
    if duration is not None and status == "succeeded":
        i = bucket_index(duration, DURATION_BUCKETS)
        totals[f"dur|{mode}|{i}"] += 1
        minute[f"dur|{mode}|{i}"] += 1
        sums[f"dur_sum|{mode}"] = duration
    if status == "failed" and (kind := error_kind(row.error)):
        totals[f"perr|{provider}|{kind}"] += 1
    return totals, minute, sums


def record(rows: Iterable[Any], at: float | None = None, client: redis.Redis | None = None) -> int:
    """Add ended rows to the totals and their minute, in one round trip; how many were added."""
    with (client or redis_store.client).pipeline(transaction=False) as pipe:
        count = add(pipe, rows, at)
        if count:
            pipe.execute()
    return count


def add(pipe: Any, rows: Iterable[Any], at: float | None = None) -> int:
    """Queue the commands that count these ended rows on `pipe` (not executed); how many."""
    totals: Counter[str] = Counter()
    minute: Counter[str] = Counter()
    sums: dict[str, float] = {}
    count = 0
    for row in rows:
        t, m, s = fields_of(row)
        totals.update(t)
        minute.update(m)
        for key, value in s.items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
    if not count:
        return 0
    key = MINUTE_PREFIX + str(minute_of(time.time() if at is None else at))
    for field, n in totals.items():
        pipe.hincrby(TOTALS_KEY, field, n)
    for field, total in sums.items():
        pipe.hincrbyfloat(TOTALS_KEY, field, total)
    for field, n in minute.items():
        pipe.hincrby(key, field, n)
    pipe.expire(key, ROLLUP_KEEP_SECONDS)
    return count


def _ended_rows(where: Any) -> list[Any]:
    """The rows' timings on a connection of its own (the caller's session is left alone)."""
    with db.engine.connect() as conn:
        return list(conn.execute(select(*ENDED_COLUMNS).where(where)))


def _describe(row: Any) -> str:
    duration = _seconds(row.created_at, row.finished_at)
    ttft = _seconds(row.created_at, row.first_token_at)
    parts = [f"{duration:.2f}s" if duration is not None else "?"]
    if ttft is not None:
        parts.append(f"ttft {ttft:.2f}s")
    tokens = _tokens(row.usage, "completion_tokens")
    if tokens:
        parts.append(f"{tokens} tokens")
    return ", ".join(parts)


def log_ended(rows: Sequence[Any]) -> None:
    """One line per ended job: INFO when it failed or was cancelled, DEBUG when it succeeded."""
    for row in rows:
        if row.status == "succeeded":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("job %s (%s) succeeded: %s", row.id, row.mode, _describe(row))
            continue
        error = row.error or {}
        reason = error.get("code") or error.get("type") or ""
        message = str(error.get("message") or "")[:200]
        log.info(
            "job %s (%s, %s) %s after %s: %s %s",
            row.id, row.mode, row.provider, row.status, _describe(row), reason, message,
        )  # fmt: skip


def stream_rows_ended(rows: Sequence[Any], pipe: Any = None) -> None:
    """These stream job rows (ENDED_COLUMNS, as written) just ended: count and log them.

    With `pipe` (a Redis pipeline the caller executes soon, e.g. with its lease release)
    the counts ride on the caller's round trip instead of one of their own. Never raises.
    """
    if not rows:
        return
    try:
        if pipe is None:
            record(rows)
        else:
            add(pipe, rows)
        log_ended(rows)
    except Exception as exc:
        log.warning("telemetry: %d job(s) not counted: %r", len(rows), exc)


def batch_results_written(job_ids: Sequence[str], finished_at: datetime) -> None:
    """These results were written at finished_at: read their rows back, count and log them.

    Rows whose finish time is another were written by someone else (a redelivery) and are
    not counted twice. Never raises. A writer that has the rows uses batch_rows_written.
    """
    if not job_ids:
        return
    try:
        rows = [r for r in _ended_rows(Job.id.in_(list(job_ids))) if r.finished_at == finished_at]
    except Exception as exc:
        log.warning("telemetry: %d result(s) not counted: %r", len(job_ids), exc)
        return
    batch_rows_written(rows)


def batch_rows_written(rows: Sequence[Any]) -> None:
    """A batch worker wrote these results: count and log them. Never raises.

    `rows` are the rows as written (the attributes of ENDED_COLUMNS), built by the writer from
    what it wrote (the batch runner), so nothing is read back.
    """
    if not rows:
        return
    try:
        record(rows)
        failed = Counter(r.status for r in rows if r.status != "succeeded")
        if failed:  # one line per flush, not per item: a batch can fail by the thousand
            kinds = Counter(str((r.error or {}).get("code") or "?") for r in rows if r.error)
            log.info(
                "batch items ended unsucceeded: %s (of %d written; %s)",
                dict(failed), len(rows), ", ".join(f"{k} x{n}" for k, n in kinds.most_common(3)),
            )  # fmt: skip
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%d batch result(s) written", len(rows))
    except Exception as exc:
        log.warning("telemetry: %d result(s) not counted: %r", len(rows), exc)


def queue_depths(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each Celery queue (the broker's Redis lists)."""
    with client.pipeline(transaction=False) as pipe:
        for queue in QUEUES:
            pipe.llen(queue)
        return dict(zip(QUEUES, pipe.execute(), strict=True))


def sample_queues(depths: Mapping[str, int], client: redis.Redis | None = None) -> None:
    """Keep the deepest queue seen in the current minute (the sweeper samples every pass)."""
    key = MINUTE_PREFIX + str(minute_of(time.time()))
    client = client or redis_store.client
    with client.pipeline(transaction=False) as pipe:
        for queue, depth in depths.items():
            pipe.eval(_MAX_SCRIPT, 1, key, f"qd|{queue}", int(depth))
        pipe.expire(key, ROLLUP_KEEP_SECONDS)
        pipe.execute()


_MAX_SCRIPT = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


# ------------------------------------------------------------------------------ reading


def totals(client: redis.Redis | None = None) -> dict[str, float]:
    raw = (client or redis_store.client).hgetall(TOTALS_KEY)
    return {str(k): float(v) for k, v in raw.items()}


def minutes(
    seconds: float, client: redis.Redis | None = None, now: float | None = None
) -> list[tuple[int, dict[str, float]]]:
    """The per-minute hashes of the last `seconds`, oldest first, every minute present."""
    end = minute_of(time.time() if now is None else now)
    starts = list(range(end - int(seconds // 60 - 1) * 60, end + 60, 60))
    with (client or redis_store.client).pipeline(transaction=False) as pipe:
        for start in starts:
            pipe.hgetall(MINUTE_PREFIX + str(start))
        hashes = pipe.execute()
    return [
        (start, {str(k): float(v) for k, v in h.items()})
        for start, h in zip(starts, hashes, strict=True)
    ]


def merge(hashes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Minute hashes summed into one (sampled queue depths: the deepest)."""
    merged: dict[str, float] = {}
    for h in hashes:
        for field, n in h.items():
            if field.startswith("qd|"):  # a sampled gauge: the deepest in the step
                merged[field] = max(merged.get(field, 0.0), n)
            else:
                merged[field] = merged.get(field, 0.0) + n
    return merged


def bucket_counts(hashes: Iterable[Mapping[str, float]], prefix: str, size: int) -> list[float]:
    """Per-bucket counts (not cumulative) of one histogram, summed over hashes."""
    counts = [0.0] * (size + 1)
    for h in hashes:
        for i in range(size + 1):
            counts[i] += h.get(f"{prefix}|{i}", 0.0)
    return counts


def quantile(q: float, counts: Sequence[float], bounds: Sequence[float]) -> float | None:
    """Prometheus's histogram_quantile over per-bucket counts; None when empty."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(counts):
        if seen + n >= rank and n > 0:
            if i == len(bounds):  # +Inf: the highest finite bound, as Prometheus does
                return bounds[-1]
            lower = 0.0 if i == 0 else bounds[i - 1]
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1]


def percentiles(
    hashes: Sequence[Mapping[str, float]], name: str, mode: str
) -> dict[str, float | None]:
    """{"p50": seconds, "p95": seconds} of `ttft` or `dur` for a mode over these hashes."""
    bounds = TTFT_BUCKETS if name == "ttft" else DURATION_BUCKETS
    counts = bucket_counts(hashes, f"{name}|{mode}", len(bounds))
    return {
        "p50": _round(quantile(0.5, counts, bounds)),
        "p95": _round(quantile(0.95, counts, bounds)),
        "count": int(sum(counts)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 4)
