"""The batch channel's sweep steps: recover lost items, re-send orphaned chunks, expire, finalize.

Each step is independent (the sweeper runs them one by one) and safe to run concurrently
with workers and with another sweep: every move is a conditional UPDATE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from flask import current_app
from sqlalchemy import and_, func, select, update

from app.extensions import db, redis_store
from app.models import utcnow
from app.queueing import BATCH_QUEUE, send_task
from app.services.batch_lifecycle import expire_batch, maybe_finalize
from app.services.batches import JOB_TASK, batches_t, enqueue_chunks, jobs_t
from app.services.heartbeat import live_workers

log = logging.getLogger(__name__)


def requeue_lost_items() -> int:
    """Items `running` on a worker with no recent heartbeat go back to the queue."""
    config = current_app.config
    client = redis_store.client
    live = {w["hostname"] for w in live_workers(client, config["WORKER_HEARTBEAT_SECONDS"] * 3)}
    with db.engine.connect() as conn:
        workers = conn.scalars(
            select(jobs_t.c.worker)
            .where(jobs_t.c.status == "running", jobs_t.c.mode == "batch")
            .group_by(jobs_t.c.worker)
        ).all()
    lost = [w for w in workers if w and w not in live]
    if not lost:
        return 0
    max_attempts = max(1, config["BATCH_MAX_ATTEMPTS"])
    requeued = 0
    for worker in lost:
        with db.engine.connect() as conn:
            rows = conn.execute(
                select(
                    jobs_t.c.id, jobs_t.c.attempts, jobs_t.c.batch_id, jobs_t.c.item_index
                ).where(jobs_t.c.status == "running", jobs_t.c.worker == worker)
            ).all()
        ranges: set[tuple[str, int]] = set()
        singles: list[str] = []
        now = utcnow()
        with db.engine.begin() as conn:
            for row in rows:
                cond = and_(
                    jobs_t.c.id == row.id,
                    jobs_t.c.status == "running",
                    jobs_t.c.attempts == row.attempts,
                )
                if row.attempts >= max_attempts:
                    error = {
                        "message": f"the worker running this item vanished {row.attempts} times",
                        "type": "server_error",
                        "code": "worker_lost",
                        "param": None,
                    }
                    conn.execute(
                        update(jobs_t)
                        .where(cond)
                        .values(status="failed", error=error, finished_at=now)
                    )
                    continue
                if conn.execute(
                    update(jobs_t).where(cond).values(status="queued", worker=None)
                ).rowcount:
                    requeued += 1
                    if row.batch_id:
                        ranges.add((row.batch_id, row.item_index))
                    else:
                        singles.append(row.id)
        _resend(ranges, singles)
        log.warning("re-queued %d items of vanished worker %s", len(rows), worker)
    return requeued


def _resend(indexes: set[tuple[str, int]], singles: list[str]) -> None:
    by_batch: dict[str, list[int]] = {}
    for batch_id, index in indexes:
        by_batch.setdefault(batch_id, []).append(index)
    for batch_id, items in by_batch.items():
        for lo, hi in _runs(sorted(items)):
            enqueue_chunks(batch_id, lo, hi)
    for job_id in singles:
        send_task(JOB_TASK, args=[job_id], queue=BATCH_QUEUE)


def _runs(indexes: list[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs of sorted indexes as (first, last)."""
    start = prev = indexes[0]
    for i in indexes[1:]:
        if i != prev + 1:
            yield start, prev
            start = i
        prev = i
    yield start, prev


def resend_orphaned_chunks() -> int:
    """Queued items of a batch with nothing running while the queue is empty: re-send them.

    Covers a task message lost with its worker before it claimed anything (Redis only
    redelivers it after the visibility timeout). Duplicates are harmless: claims are
    conditional.
    """
    client = redis_store.client
    if client.llen(BATCH_QUEUE):
        return 0
    with db.engine.connect() as conn:
        batch_ids = conn.scalars(
            select(batches_t.c.id).where(batches_t.c.status == "in_progress")
        ).all()
    sent = 0
    for batch_id in batch_ids:
        with db.engine.connect() as conn:
            counts = dict(
                conn.execute(
                    select(jobs_t.c.status, func.count())
                    .where(
                        jobs_t.c.batch_id == batch_id, jobs_t.c.status.in_(("queued", "running"))
                    )
                    .group_by(jobs_t.c.status)
                ).all()
            )
            if counts.get("running") or not counts.get("queued"):
                continue
            indexes = conn.scalars(
                select(jobs_t.c.item_index).where(
                    jobs_t.c.batch_id == batch_id, jobs_t.c.status == "queued"
                )
            ).all()
        if client.llen(BATCH_QUEUE):
            return sent
        for lo, hi in _runs(sorted(indexes)):
            sent += enqueue_chunks(batch_id, lo, hi)
    return sent


def expire_due_batches() -> int:
    now = utcnow()
    with db.engine.connect() as conn:
        due = conn.scalars(
            select(batches_t.c.id).where(
                batches_t.c.status == "in_progress",
                batches_t.c.expires_at < now,
                batches_t.c.expired_at.is_(None),
            )
        ).all()
    for batch_id in due:
        expire_batch(batch_id)
    return len(due)


def finalize_stragglers(stale_after: float = 600.0) -> int:
    """Finalize batches whose last item ended without finalizing (e.g. the worker died)."""
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(batches_t.c.id, batches_t.c.status, batches_t.c.finalizing_at).where(
                batches_t.c.status.in_(("in_progress", "cancelling", "finalizing"))
            )
        ).all()
    done = 0
    now = utcnow()
    for row in rows:
        if row.status == "finalizing":
            at = row.finalizing_at
            if at is None or (now - at).total_seconds() > stale_after:
                done += maybe_finalize(row.id, stale_finalizing=True)
        else:
            done += maybe_finalize(row.id)
    return done
