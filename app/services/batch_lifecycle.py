"""A batch's life after creation: cancel, expire, and finalize exactly once.

Every move is a conditional UPDATE, so racing workers and sweepers never double-apply.
The kind-specific work at finalization is looked up by the batch's kind in FINALIZERS.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, select, update

from app import telemetry
from app.errors import APIError
from app.extensions import db, redis_store
from app.models import Batch, utcnow
from app.models.batch import batches_t
from app.models.job import ACTIVE, jobs_t
from app.services import events
from app.services.batch_claims import claim_lease, lapsed_holders
from app.services.batches import has_active_items, in_transaction, set_stop, stop_error, stop_reason
from app.services.openai_batch_files import write_result_files
from app.services.provider_batches.rows import cancel_remote

log = logging.getLogger(__name__)

# Called exactly once per batch, while it is `finalizing`, before its final status; the
# engine commits what it changed. A kind with no entry needs nothing at the end.
FINALIZERS: dict[str, Callable[[Batch], None]] = {"openai": write_result_files}


def cancel_batch(batch: Batch) -> Batch:
    """Stop a batch: queued items never run, running ones finish or stop, then cancelled."""
    if batch.status == "cancelling" and batch.executor == "provider":
        cancel_remote(batch.id)  # again: a provider that refused the first is told again
        return batch
    if batch.status in ("cancelling", "cancelled"):
        return batch
    if batch.status != "in_progress":
        raise APIError(
            409,
            f"batch {batch.id} is {batch.status}; only an in-progress batch can be cancelled",
            code="batch_not_cancellable",
        )
    now = utcnow()

    def cancel(conn: Connection) -> tuple[int, Sequence[Any]]:
        moved = conn.execute(
            update(batches_t)
            .where(batches_t.c.id == batch.id, batches_t.c.status == "in_progress")
            .values(status="cancelling", cancelling_at=now)
        ).rowcount
        if not moved:
            return 0, ()
        return moved, conn.execute(
            update(jobs_t)
            .where(
                jobs_t.c.batch_id == batch.id,
                jobs_t.c.status == "queued",
                jobs_t.c.provider_batch_id.is_(None),  # #13: their provider batch ends them
            )
            .values(status="cancelled", finished_at=now, error=stop_error("batch_cancelled"))
            .returning(*telemetry.ENDED_COLUMNS)
        ).all()

    moved, ended = in_transaction(cancel)
    telemetry.batch_rows_written(ended)  # the items this cancel ended count as ended
    set_stop(batch.id, "cancelled")
    if moved and batch.executor == "provider":  # #13: cancel the provider batches too
        cancel_remote(batch.id)
    maybe_finalize(batch.id)
    db.session.refresh(batch)
    events.batch_changed(batch)
    return batch


def maybe_finalize(batch_id: str, *, take_over: bool = False) -> bool:
    """Finalize the batch once no item is queued or running; True if this call did it.

    Exactly once: only the caller whose conditional UPDATE moves the batch into
    `finalizing` runs the finalizer, holding a claim lease named in `batches.finalizer`.
    With take_over, a batch left `finalizing` by a holder whose lease lapsed (its process
    died) is taken over. A finalizer cut short (GreenletExit when the broker connection
    drops, an outage) gives the batch back for the next caller.
    """
    if has_active_items(batch_id):
        return False
    with db.engine.connect() as conn:
        row = conn.execute(
            select(
                batches_t.c.status,
                batches_t.c.expired_at,
                batches_t.c.finalizing_at,
                batches_t.c.finalizer,
            ).where(batches_t.c.id == batch_id)
        ).first()
    if row is None:
        return False
    prior = row.status
    final = "cancelled" if prior == "cancelling" else "expired" if row.expired_at else "completed"
    if prior == "finalizing":
        if not take_over or not lapsed_holders(redis_store.client, [row.finalizer]):
            return False
        final = "cancelled" if stop_reason(batch_id) == "cancelled" else final
    elif prior not in ("in_progress", "cancelling"):
        return False
    held_by = batches_t.c.finalizer.is_not_distinct_from
    with claim_lease(socket.gethostname()) as holder:
        with db.engine.begin() as conn:
            if not conn.execute(
                update(batches_t)
                .where(
                    batches_t.c.id == batch_id,
                    batches_t.c.status == prior,
                    held_by(row.finalizer),
                )
                .values(status="finalizing", finalizing_at=utcnow(), finalizer=holder)
            ).rowcount:
                return False
        try:
            _run_finalizer(batch_id, final, holder)
        except BaseException:
            db.session.rollback()  # what the finalizer wrote goes; it held SQLite's lock
            back = {"status": prior, "finalizing_at": row.finalizing_at, "finalizer": None}
            if prior == "finalizing":  # taken over: left for the next sweep to take again
                back = {"finalizer": None}
            with db.engine.begin() as conn:
                conn.execute(
                    update(batches_t)
                    .where(batches_t.c.id == batch_id, held_by(holder))
                    .values(**back)
                )
            raise
    return True


def _run_finalizer(batch_id: str, final: str, holder: str) -> None:
    """Run the kind's finalizer, then move finalizing -> the final status, if still ours.

    What the finalizer wrote (its file rows) commits with the final status, in one
    transaction: a finalizer cut short or taken over leaves no rows behind.
    """
    batch = db.session.get(Batch, batch_id, populate_existing=True)
    assert batch is not None
    values: dict[str, Any] = {"status": final, f"{final}_at": utcnow()}
    if final == "expired" and batch.expired_at is not None:
        values["expired_at"] = batch.expired_at
    try:
        finalizer = FINALIZERS.get(batch.kind)
        if finalizer is not None:
            finalizer(batch)
        db.session.flush()
    except Exception as exc:
        log.exception("finalizer for batch %s failed", batch_id)
        db.session.rollback()
        error = {"code": "finalize_failed", "message": f"{type(exc).__name__}: {exc}"}
        values = {"status": "failed", "failed_at": utcnow(), "errors": [error]}
    ours = (
        batches_t.c.id == batch_id,
        batches_t.c.status == "finalizing",
        batches_t.c.finalizer == holder,
    )
    moved = db.session.execute(update(batches_t).where(*ours).values(**values, finalizer=None))
    if not moved.rowcount:  # type: ignore[attr-defined]
        db.session.rollback()  # taken over: the new holder writes its own
        log.warning("batch %s was taken over from finalizer %s", batch_id, holder)
        return
    db.session.commit()
    log.info("batch %s %s", batch_id, values["status"])  # a batch's end: one line
    db.session.expire_all()
    batch = db.session.get(Batch, batch_id)
    if batch is not None:
        events.batch_changed(batch)
    db.session.commit()  # the read's transaction ends: its caller may go on to wait


def expire_batch(batch_id: str) -> None:
    """Past its window: unfinished items (queued or running) become `expired`; finished kept.

    A running item's late result is refused by its conditional write, so the batch ends
    now, not when (or if) its last worker answers.
    """
    now = utcnow()

    def expire(conn: Connection) -> tuple[int, Sequence[Any]]:
        moved = conn.execute(
            update(batches_t)
            .where(
                batches_t.c.id == batch_id,
                batches_t.c.status == "in_progress",
                batches_t.c.expired_at.is_(None),
            )
            .values(expired_at=now)
        ).rowcount
        if not moved:
            return 0, ()
        return moved, conn.execute(
            update(jobs_t)
            .where(jobs_t.c.batch_id == batch_id, jobs_t.c.status.in_(ACTIVE))
            .values(status="expired", finished_at=now, error=stop_error("batch_expired"))
            .returning(*telemetry.ENDED_COLUMNS)
        ).all()

    moved, ended = in_transaction(expire)
    telemetry.batch_rows_written(ended)
    if moved:
        set_stop(batch_id, "expired")
    maybe_finalize(batch_id)
