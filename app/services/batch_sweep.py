"""The batch channel's sweep steps: recover lost items, re-send orphaned chunks, expire, finalize.

Each step is independent (the sweeper runs them one by one) and safe to run concurrently
with workers and with another sweep: every move is a conditional UPDATE.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import Connection, Exists, exists, func, select

from app import leases
from app.extensions import db, redis_store
from app.models import utcnow
from app.models.batch import batches_t
from app.models.job import jobs_t
from app.queueing import BATCH_QUEUE
from app.services.batch_claims import lapsed_holders
from app.services.batch_lifecycle import expire_batch, maybe_finalize
from app.services.batches import enqueue_chunks, requeue_items, resend, runs

log = logging.getLogger(__name__)

STRANDED_AFTER = 30.0  # seconds a standalone job (a batch: its items) may stand still queued
RESEND_EVERY = 300  # seconds between two re-sends of one stranded job (the most, of a batch)
RESENT_KEY = "sluice:batch:resent:{}"  # + job or batch id: its last re-send, while it counts
LOST = {
    "message": "the worker running this item vanished (its claim lease lapsed)",
    "type": "server_error",
    "code": "worker_lost",
    "param": None,
}


def requeue_lost_items() -> int:
    """Running items whose claim lease lapsed go back to the queue, whoever held them.

    Hostnames play no part: a worker restarted under the same name has new leases, so the
    old process's claims lapse all the same.
    """
    client = redis_store.client
    with db.engine.connect() as conn:
        holders = conn.scalars(
            select(jobs_t.c.worker)
            .where(jobs_t.c.status == "running", jobs_t.c.mode == "batch")
            .group_by(jobs_t.c.worker)
        ).all()
    requeued = 0
    for holder in lapsed_holders(client, holders):
        where = jobs_t.c.worker.is_(None) if holder is None else jobs_t.c.worker == holder
        with db.engine.connect() as conn:
            rows = conn.execute(
                select(
                    jobs_t.c.id, jobs_t.c.attempts, jobs_t.c.batch_id, jobs_t.c.item_index
                ).where(jobs_t.c.status == "running", jobs_t.c.mode == "batch", where)
            ).all()
        requeued += requeue_items(rows, LOST)
        log.warning("re-queued %d items of lapsed claim %s", len(rows), holder)
    return requeued


def resend_orphaned_chunks() -> int:
    """Queued items of a batch with nothing running and standing still: re-send them.

    Covers chunk sends that failed after their commit (create_batch, a give-back) and
    messages lost with a worker before it claimed anything (Redis only redelivers them after
    the visibility timeout), behind any backlog of the queue: a batch is due once none of
    its items started or ended for STRANDED_AFTER seconds (at once while the queue is
    empty), and again after as long as it has stood still (at most RESEND_EVERY).
    Duplicates are harmless: claims are conditional.
    """
    client = redis_store.client
    drained = not client.llen(BATCH_QUEUE)
    with db.engine.connect() as conn:
        batches = conn.execute(
            select(batches_t.c.id, batches_t.c.created_at).where(
                batches_t.c.status == "in_progress",
                batches_t.c.executor.is_distinct_from("provider"),  # #13: not on workers
            )
        ).all()
    sent = 0
    for batch_id, created_at in batches:
        gate = RESENT_KEY.format(batch_id)
        with db.engine.connect() as conn:
            if not _orphaned(conn, batch_id) or client.exists(gate):
                continue
            idle = _idle_seconds(conn, batch_id, created_at)
            if idle < STRANDED_AFTER and not drained:
                continue
            again_after = int(min(RESEND_EVERY, max(STRANDED_AFTER, idle)))
            if not leases.first_in(client, gate, again_after):
                continue
            indexes = conn.scalars(
                select(jobs_t.c.item_index).where(
                    jobs_t.c.batch_id == batch_id, jobs_t.c.status == "queued"
                )
            ).all()
        for lo, hi in runs(sorted(indexes)):
            sent += enqueue_chunks(batch_id, lo, hi)
        log.warning("re-sent %d queued item(s) of %s (idle %.0fs)", len(indexes), batch_id, idle)
    return sent


def _orphaned(conn: Connection, batch_id: str) -> bool:
    """Whether the batch has queued items and none running (two index lookups, no count)."""

    def has(status: str) -> Exists:
        return exists().where(jobs_t.c.batch_id == batch_id, jobs_t.c.status == status)

    return bool(conn.scalar(select(has("queued") & ~has("running"))))


def _idle_seconds(conn: Connection, batch_id: str, created_at: datetime) -> float:
    """Seconds since the batch was created or one of its items last started or ended."""
    started, finished = conn.execute(
        select(func.max(jobs_t.c.started_at), func.max(jobs_t.c.finished_at)).where(
            jobs_t.c.batch_id == batch_id
        )
    ).one()
    last = max(t for t in (created_at, started, finished) if t is not None)
    return (utcnow() - last).total_seconds()


def resend_stranded_jobs() -> int:
    """Standalone background jobs queued for long (their task was never sent): send again.

    A web crash or broker error between the commit and the send leaves such a job. Each is
    re-sent at most once per RESEND_EVERY seconds; duplicates are harmless (claims are
    conditional).
    """
    client = redis_store.client
    cutoff = utcnow() - timedelta(seconds=STRANDED_AFTER)
    with db.engine.connect() as conn:
        job_ids = conn.scalars(
            select(jobs_t.c.id)
            .where(
                jobs_t.c.mode == "batch",
                jobs_t.c.batch_id.is_(None),
                jobs_t.c.status == "queued",
                jobs_t.c.created_at < cutoff,
                jobs_t.c.executor.is_distinct_from("provider"),  # #13: not on workers
            )
            .limit(1000)
        ).all()
    due = [j for j in job_ids if leases.first_in(client, RESENT_KEY.format(j), RESEND_EVERY)]
    resend(set(), due)
    if due:
        log.warning("re-sent %d stranded background job(s)", len(due))
    return len(due)


def expire_due_batches() -> int:
    now = utcnow()
    with db.engine.connect() as conn:
        due = conn.scalars(
            select(batches_t.c.id).where(
                batches_t.c.status == "in_progress",
                batches_t.c.expires_at < now,
                batches_t.c.expired_at.is_(None),
                batches_t.c.executor.is_distinct_from("provider"),  # #13: the provider's expiry
            )
        ).all()
    for batch_id in due:
        expire_batch(batch_id)
    return len(due)


def finalize_stragglers() -> int:
    """Finalize batches whose last item ended without finalizing, or whose finalizer died."""
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(batches_t.c.id, batches_t.c.status).where(
                batches_t.c.status.in_(("in_progress", "cancelling", "finalizing"))
            )
        ).all()
    return sum(maybe_finalize(row.id, take_over=row.status == "finalizing") for row in rows)
