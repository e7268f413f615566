"""Provider batch rows and the item rows they fill: read items, write results exactly once.

Shared by the engine (submit, poll, apply) and the batch engine's cancel (`cancel_remote`),
with no import of the batch lifecycle, which calls in here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

import redis
from flask import current_app
from sqlalchemy import Table, select, update

from app import leases, telemetry
from app.extensions import db, redis_store
from app.models import ProviderBatch, utcnow
from app.models.batch import batches_t
from app.models.job import jobs_t
from app.pricing import job_cost
from app.providers import ChatRequest, UnknownModel, providers
from app.services import costs
from app.services.batches import stop_error
from app.services.provider_batches.apis import Outcome, Remote, batch_api, item_error
from app.services.stream_runner import db_text

log = logging.getLogger(__name__)

pbatches_t = cast(Table, ProviderBatch.__table__)
OPEN = ("submitting", "sending", "in_progress")


def aware(at: datetime) -> datetime:
    """A stored time as UTC-aware (SQLite gives them back naive)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def items(pb_id: str) -> list[Any]:
    with db.engine.connect() as conn:
        return list(
            conn.execute(
                select(jobs_t.c.id, jobs_t.c.model, jobs_t.c.request).where(
                    jobs_t.c.provider_batch_id == pb_id, jobs_t.c.status == "queued"
                )
            ).all()
        )


def all_item_ids(pb_id: str) -> list[str]:
    """Every item ever assigned to this provider batch, whatever its status now."""
    with db.engine.connect() as conn:
        return list(conn.scalars(select(jobs_t.c.id).where(jobs_t.c.provider_batch_id == pb_id)))


def known_remote_ids(provider: str) -> set[str]:
    """The provider batch ids already recorded for this provider (none to adopt twice)."""
    with db.engine.connect() as conn:
        return set(
            conn.scalars(
                select(pbatches_t.c.remote_id).where(
                    pbatches_t.c.provider == provider, pbatches_t.c.remote_id.is_not(None)
                )
            )
        )


def unassign(pb_id: str, job_ids: list[str]) -> int:
    """Items still queued go back to waiting for a provider batch (the next submit sends them)."""
    with db.engine.begin() as conn:
        return int(
            conn.execute(
                update(jobs_t)
                .where(
                    jobs_t.c.id.in_(job_ids),
                    jobs_t.c.provider_batch_id == pb_id,
                    jobs_t.c.status == "queued",
                )
                .values(provider_batch_id=None)
            ).rowcount
        )


def bound(rows: Iterable[Any]) -> tuple[dict[str, ChatRequest], list[tuple[str, dict[str, Any]]]]:
    """Each row's request bound to its provider (model = the provider's name); refusals."""
    registry = providers()
    bound: dict[str, ChatRequest] = {}
    refused: list[tuple[str, dict[str, Any]]] = []
    for row in rows:
        try:
            _, request = registry.bind(
                ChatRequest.from_record({**(row.request or {}), "model": row.model})
            )
            bound[row.id] = request
        except (UnknownModel, TypeError, ValueError) as exc:
            refused.append((row.id, item_error("invalid_request", str(exc), "sluice")))
    return bound, refused


def write(pb: Any, outcomes: list[tuple[str, Outcome]]) -> int:
    """Write outcomes into items still queued in this provider batch (exactly once), their
    cost charged first (`costs.charge`; unpriced if Redis failed, for the sweeper's settle)."""
    if not outcomes:
        return 0
    config = current_app.config
    now = utcnow()
    written = prompt = completion = 0
    holder = f"provider:{pb.provider}/{pb.remote_id or pb.id}"
    usages = {j: o.completion.usage.as_dict() if o.completion is not None else None
              for j, o in outcomes}  # fmt: skip
    usd = {j: job_cost(pb.model, usage, "provider", config) for j, usage in usages.items()}
    with db.engine.connect() as conn:
        waiting = conn.execute(
            select(jobs_t.c.id, jobs_t.c.tenant_id, jobs_t.c.mode).where(
                jobs_t.c.id.in_(list(usd)),
                jobs_t.c.status == "queued",
                jobs_t.c.provider_batch_id == pb.id,
            )
        ).all()
    charged = costs.charge(
        (row.id, row.tenant_id, row.mode, "provider", usd[row.id]) for row in waiting
    )
    ids: list[str] = []
    with db.engine.begin() as conn:
        for job_id, o in outcomes:
            c = o.completion
            usage = usages[job_id]
            values: dict[str, Any] = {
                "status": o.status,
                "output": db_text(c.text) if c is not None else None,
                "choices": c.choices if c is not None and c.more_than_text else None,
                "finish_reason": c.finish_reason if c is not None else None,
                "usage": usage,
                "error": o.error,
                "cost_usd": usd[job_id] if charged else None,
                "attempts": jobs_t.c.attempts + 1,
                "worker": holder[:200],
                "started_at": pb.submitted_at or now,
                "finished_at": now,
            }
            moved = conn.execute(
                update(jobs_t)
                .where(
                    jobs_t.c.id == job_id,
                    jobs_t.c.status == "queued",
                    jobs_t.c.provider_batch_id == pb.id,
                )
                .values(**values)
            ).rowcount
            if moved:
                written += 1
                ids.append(job_id)
                if usage:
                    prompt += usage["prompt_tokens"]
                    completion += usage["completion_tokens"]
        if pb.batch_id and (prompt or completion):
            conn.execute(
                update(batches_t)
                .where(batches_t.c.id == pb.batch_id)
                .values(
                    prompt_tokens=batches_t.c.prompt_tokens + prompt,
                    completion_tokens=batches_t.c.completion_tokens + completion,
                )
            )
    telemetry.batch_results_written(ids, now)
    return written


def end_row(pb: Any, status: str, now: Any, *, error: dict[str, Any] | None = None,
           remote: Remote | None = None) -> None:  # fmt: skip
    """End a provider batch row (its Sluice batch is finalized by the caller)."""
    values: dict[str, Any] = {"status": status, "ended_at": now, "next_poll_at": None}
    if error is not None:
        values["error"] = error
    if remote is not None:
        values.update(remote_status=remote.status, remote_counts=remote.counts)
    with db.engine.begin() as conn:
        conn.execute(
            update(pbatches_t)
            .where(pbatches_t.c.id == pb.id, pbatches_t.c.status.in_(OPEN))
            .values(**values)
        )


def row(pb_id: str) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(select(pbatches_t).where(pbatches_t.c.id == pb_id)).first()


def set_where(pb_id: str, current: str, **values: Any) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            update(pbatches_t)
            .where(pbatches_t.c.id == pb_id, pbatches_t.c.status == current)
            .values(**values)
        )


def cancel_remote(batch_id: str) -> None:
    """A cancelled batch's provider batches: ask each provider to cancel (results follow).

    Called by the batch engine's cancel once its unsubmitted items are cancelled. Items a
    provider finished before the cancel keep their results; the rest end `cancelled`.
    """
    with db.engine.connect() as conn:
        ids = conn.scalars(
            select(pbatches_t.c.id).where(
                pbatches_t.c.batch_id == batch_id, pbatches_t.c.status.in_(OPEN)
            )
        ).all()
    for pb_id in ids:
        cancel_one(pb_id)


def cancel_job_remote(pb_id: str) -> None:
    """A standalone job was cancelled: cancel its provider batch once no item of it waits.

    Standalone jobs of one provider and model share a provider batch; the others' requests
    run on, and the cancelled job's result, if it comes, is not written (it is not queued).
    """
    if not items(pb_id):
        cancel_one(pb_id)


def cancel_one(pb_id: str) -> None:
    """Cancel one provider batch, whichever state it is in.

    `submitting` (never sent): ended here, its items cancelled. `sending` (a sender is
    calling the provider): marked, and the sender cancels what it created as soon as it
    has the id. `in_progress`: the provider is told (`tell_cancel`); the next poll applies
    its end, or tells it again if it refused (`engine.poll`).
    """
    now = utcnow()
    for _ in range(3):  # the row may move on under us (sent, stored): act on where it is
        pb = row(pb_id)
        if pb is None or pb.status not in OPEN:
            return
        if pb.status == "in_progress":
            if pb.remote_id and pb.cancel_requested_at is None:  # not accepted yet
                tell_cancel(pb)
                set_where(pb_id, "in_progress", next_poll_at=now)
            return
        with db.engine.begin() as conn:
            marked = conn.execute(
                update(pbatches_t)
                .where(pbatches_t.c.id == pb_id, pbatches_t.c.status == pb.status)
                .values(
                    cancel_requested_at=now,
                    **(
                        {"status": "applied", "ended_at": now, "next_poll_at": None}
                        if pb.status == "submitting"
                        else {}
                    ),
                )
            ).rowcount
        if not marked:
            continue
        if pb.status == "submitting":
            cancelled = Outcome("cancelled", error=stop_error("cancelled"))
            write(pb, [(j.id, cancelled) for j in items(pb_id)])
        return


def tell_cancel(pb: Any, remote_id: str | None = None) -> bool:
    """Ask the provider to cancel a provider batch (the row's, or remote_id); idempotent.

    True once it accepted, which alone records the row's `cancel_requested_at`. A refusal
    is only logged: the poll tells it again while the batch is `unwanted`.
    """
    remote_id = remote_id or pb.remote_id
    gate = TELLING_KEY.format(pb.id)
    if not _set_gate(gate):
        return False  # another process is telling it (or just did): one cancel, not two
    try:
        batch_api(pb.provider).cancel(remote_id)
    except Exception as exc:
        log.warning("cancelling %s (%s) at %s failed: %s", pb.id, remote_id, pb.provider, exc)
        _drop_gate(gate)  # the next poll may tell it again at once
        return False
    with db.engine.begin() as conn:
        conn.execute(
            update(pbatches_t)
            .where(
                pbatches_t.c.id == pb.id,
                pbatches_t.c.remote_id == remote_id,
                pbatches_t.c.status == "in_progress",
                pbatches_t.c.cancel_requested_at.is_(None),
            )
            .values(cancel_requested_at=utcnow())
        )
    return True


TELLING_KEY = "sluice:provider-batch:telling-cancel:{}"  # + row id: a cancel under way
TELLING_SECONDS = 60  # how long a told cancel keeps others from telling it again


def _set_gate(gate: str) -> bool:
    """Take the one-teller gate; True without Redis too (a second cancel is harmless)."""
    try:
        return leases.first_in(redis_store.client, gate, TELLING_SECONDS)
    except redis.RedisError:
        return True


def _drop_gate(gate: str) -> None:
    try:
        redis_store.client.delete(gate)
    except redis.RedisError:
        log.debug("could not drop %s; it lapses", gate)


STOPPED = ("cancelling", "cancelled", "expired", "completed", "failed")


def unwanted(pb: Any) -> bool:
    """Whether nobody waits for this provider batch's results any more: its Sluice batch
    is cancelling or ended, or none of its items is still queued (standalone jobs
    cancelled, a batch expired), so nothing it returns would be written."""
    with db.engine.connect() as conn:
        if pb.batch_id is not None:
            status = conn.scalar(select(batches_t.c.status).where(batches_t.c.id == pb.batch_id))
            if status in STOPPED:
                return True
        waiting = conn.scalar(
            select(jobs_t.c.id)
            .where(jobs_t.c.provider_batch_id == pb.id, jobs_t.c.status == "queued")
            .limit(1)
        )
    return waiting is None
