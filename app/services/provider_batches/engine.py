"""Submit batch items to provider batch APIs, poll them, and write their results once.

Runs in the sweeper (`sweep`, one of its steps); every move is a conditional UPDATE, so
two sweepers, or a sweeper killed and restarted, never double-apply:

- submit: queued items of the provider executor without a provider batch are grouped by
  (batch, provider, model), split by the provider's limits, assigned to a new
  `provider_batches` row, then sent; the provider's batch id is stored at once.
- poll: each open provider batch is retrieved when due, with backoff doubling from
  PROVIDER_BATCH_POLL_SECONDS up to PROVIDER_BATCH_POLL_MAX_SECONDS.
- apply: an ended provider batch's results (any order, matched by custom_id = job id) are
  written into item rows still `queued` (so each exactly once), with usage and cost at the
  batch price; items without a result end by how the provider batch ended.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from flask import current_app
from sqlalchemy import and_, insert, select, update

from app.extensions import db
from app.models import new_id, utcnow
from app.providers import ProviderError
from app.services import events
from app.services.batch_lifecycle import expire_batch, maybe_finalize
from app.services.batches import batches_t, jobs_t, stop_error
from app.services.provider_batches import rows
from app.services.provider_batches.apis import Outcome, Remote, batch_api, item_error

log = logging.getLogger(__name__)

pbatches_t = rows.pbatches_t
WRITE_EVERY = 200  # results per write transaction
GROUPS_PER_SWEEP = 50
POLLS_PER_SWEEP = 100
LINE_OVERHEAD = 200  # bytes of a batch input line around its body


def sweep() -> None:
    """The sweeper step: submit what waits, re-send dead submits, poll, expire overdue.

    Submits and polls start only within about one sweep interval, so a large backlog
    never holds the sweeper's other steps for long (the rest waits for the next pass).
    """
    until = time.monotonic() + max(1.0, _config("SWEEP_INTERVAL_SECONDS"))
    submit_pending(until)
    resubmit_stalled()
    poll_due(until)
    expire_overdue()


def _config(name: str) -> float:
    return float(current_app.config[name])


def _backoff(polls: int) -> timedelta:
    base = _config("PROVIDER_BATCH_POLL_SECONDS")
    top = _config("PROVIDER_BATCH_POLL_MAX_SECONDS")
    return timedelta(seconds=min(top, base * 2 ** min(polls, 20)))


# ---------------------------------------------------------------- submit

_WAITING = and_(
    jobs_t.c.executor == "provider",
    jobs_t.c.status == "queued",
    jobs_t.c.provider_batch_id.is_(None),
)


def submit_pending(until: float = float("inf")) -> int:
    """Give every waiting item a provider batch; returns how many provider batches were sent."""
    with db.engine.connect() as conn:
        groups = conn.execute(
            select(jobs_t.c.batch_id, jobs_t.c.provider, jobs_t.c.model)
            .where(_WAITING)
            .group_by(jobs_t.c.batch_id, jobs_t.c.provider, jobs_t.c.model)
            .limit(GROUPS_PER_SWEEP)
        ).all()
    sent = 0
    for group in groups:
        if time.monotonic() > until:
            break
        try:
            sent += _submit_group(group.batch_id, group.provider, group.model)
        except Exception:
            log.exception("submitting %s items of %s failed", group.model, group.batch_id)
    return sent


def _submit_group(batch_id: str | None, provider: str, model: str) -> int:
    api = batch_api(provider)
    same = and_(
        _WAITING,
        jobs_t.c.batch_id.is_(None) if batch_id is None else jobs_t.c.batch_id == batch_id,
        jobs_t.c.provider == provider,
        jobs_t.c.model == model,
    )
    sent = 0
    while True:
        with db.engine.connect() as conn:
            found = conn.execute(
                select(jobs_t.c.id, jobs_t.c.request)
                .where(same)
                .order_by(jobs_t.c.item_index, jobs_t.c.id)
                .limit(max(1, api.max_requests))
            ).all()
        if not found:
            return sent
        ids: list[str] = []
        size = 0
        for row in found:  # split by bytes too (the provider's input-size limit)
            n = len(str(row.request)) + LINE_OVERHEAD
            if ids and size + n > api.max_bytes:
                break
            ids.append(row.id)
            size += n
        pb_id = new_id("pbatch_")
        now = utcnow()
        resubmit = timedelta(seconds=_config("PROVIDER_BATCH_RESUBMIT_SECONDS"))
        with db.engine.begin() as conn:
            conn.execute(
                insert(pbatches_t).values(
                    id=pb_id,
                    batch_id=batch_id,
                    provider=provider,
                    model=model,
                    status="submitting",
                    total=len(ids),
                    polls=0,
                    created_at=now,
                    next_poll_at=now + resubmit,
                )
            )
            moved = conn.execute(
                update(jobs_t).where(same, jobs_t.c.id.in_(ids)).values(provider_batch_id=pb_id)
            ).rowcount
            conn.execute(update(pbatches_t).where(pbatches_t.c.id == pb_id).values(total=moved))
        _send(pb_id)
        sent += 1


def resubmit_stalled() -> int:
    """Provider batches whose submit died (no provider id after a while): send them again."""
    now = utcnow()
    with db.engine.connect() as conn:
        found = conn.execute(
            select(pbatches_t.c.id, pbatches_t.c.next_poll_at).where(
                pbatches_t.c.status == "submitting", pbatches_t.c.next_poll_at <= now
            )
        ).all()
    done = 0
    for row in found:
        if _claim(row.id, row.next_poll_at, "submitting"):
            _send(row.id)
            done += 1
    return done


def _send(pb_id: str) -> None:
    """Create the provider batch for a `submitting` row's items; store its id at once."""
    pb = rows.row(pb_id)
    if pb is None or pb.status != "submitting":
        return
    api = batch_api(pb.provider)
    requests, refused = rows.bound(rows.items(pb_id))
    bodies: dict[str, dict[str, Any]] = {}
    for job_id, request in requests.items():
        try:
            bodies[job_id] = api.prepare(request)
        except (ProviderError, ValueError) as exc:
            refused.append((job_id, _error_of(exc)))
    rows.write(pb, [(j, Outcome("failed", error=e)) for j, e in refused])
    now = utcnow()
    if not bodies:
        _close(pb, "applied", now)
        return
    try:
        remote_id = api.submit(bodies, pb_id)
    except ProviderError as exc:
        if exc.retryable:
            log.warning("provider batch %s not sent (%s); retrying later", pb_id, exc)
            rows.set_where(
                pb_id,
                "submitting",
                error=_error_of(exc),
                next_poll_at=now + _backoff(pb.polls + 1),
                polls=pb.polls + 1,
            )
            return
        log.warning("provider %s refused batch %s: %s", pb.provider, pb_id, exc)
        rows.write(pb, [(j, Outcome("failed", error=_error_of(exc))) for j in bodies])
        _close(pb, "failed", now, error=_error_of(exc))
        return
    rows.set_where(
        pb_id,
        "submitting",
        status="in_progress",
        remote_id=remote_id,
        submitted_at=now,
        next_poll_at=now + _backoff(0),
        polls=0,
        error=None,
    )
    log.info(
        "provider batch %s sent to %s as %s (%d items)", pb_id, pb.provider, remote_id, len(bodies)
    )


def _error_of(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ProviderError):
        return exc.to_openai_error() | {"status_code": exc.status_code}
    return {
        "message": str(exc),
        "type": "invalid_request_error",
        "code": "invalid_request",
        "param": getattr(exc, "param", None),
    }


# ---------------------------------------------------------------- poll and apply


def poll_due(until: float = float("inf")) -> int:
    """Retrieve every open provider batch that is due; apply those that ended."""
    now = utcnow()
    with db.engine.connect() as conn:
        found = conn.execute(
            select(pbatches_t.c.id, pbatches_t.c.next_poll_at)
            .where(pbatches_t.c.status == "in_progress", pbatches_t.c.next_poll_at <= now)
            .order_by(pbatches_t.c.next_poll_at)
            .limit(POLLS_PER_SWEEP)
        ).all()
    applied = 0
    for row in found:
        if time.monotonic() > until:
            break
        if not _claim(row.id, row.next_poll_at, "in_progress"):
            continue
        try:
            applied += poll(row.id)
        except Exception:
            log.exception("polling provider batch %s failed; next poll later", row.id)
    return applied


def _claim(pb_id: str, due: Any, status: str) -> bool:
    """Take a due row for this sweep (another sweeper skips it until the lease passes)."""
    lease = timedelta(seconds=max(60.0, _config("PROVIDER_BATCH_POLL_MAX_SECONDS")))
    with db.engine.begin() as conn:
        return bool(
            conn.execute(
                update(pbatches_t)
                .where(
                    pbatches_t.c.id == pb_id,
                    pbatches_t.c.status == status,
                    pbatches_t.c.next_poll_at == due,
                )
                .values(next_poll_at=utcnow() + lease)
            ).rowcount
        )


def poll(pb_id: str) -> int:
    """Retrieve one provider batch (by its stored id); apply its results if it ended (1)."""
    pb = rows.row(pb_id)
    if pb is None or pb.status != "in_progress" or not pb.remote_id:
        return 0
    api = batch_api(pb.provider)
    try:
        remote = api.retrieve(pb.remote_id)
    except ProviderError as exc:
        log.warning("retrieving %s (%s) failed: %s", pb_id, pb.remote_id, exc)
        rows.set_where(
            pb_id, "in_progress", next_poll_at=utcnow() + _backoff(pb.polls + 1), polls=pb.polls + 1
        )
        return 0
    if not remote.ended:
        rows.set_where(
            pb_id,
            "in_progress",
            remote_status=remote.status,
            remote_counts=remote.counts,
            polls=pb.polls + 1,
            next_poll_at=utcnow() + _backoff(pb.polls + 1),
        )
        return 0
    _apply(pb, api, remote)
    return 1


def _apply(pb: Any, api: Any, remote: Remote) -> None:
    requests, _ = rows.bound(rows.items(pb.id))
    buffer: list[tuple[str, Outcome]] = []
    seen: set[str] = set()
    for job_id, outcome in api.results(pb.remote_id, remote, requests):
        if job_id in seen:
            continue
        seen.add(job_id)
        buffer.append((job_id, outcome))
        if len(buffer) >= WRITE_EVERY:
            rows.write(pb, buffer)
            buffer = []
    rows.write(pb, buffer)
    leftover = [row.id for row in rows.items(pb.id)]
    final = (
        "cancelled"
        if pb.cancel_requested_at is not None and remote.final != "expired"
        else remote.final
    )
    rows.write(pb, [(j, _missing(final, pb.provider, remote)) for j in leftover])
    now = utcnow()
    expired = final == "expired" or bool(remote.counts.get("expired"))
    if expired and pb.batch_id:
        with db.engine.begin() as conn:
            conn.execute(
                update(batches_t)
                .where(
                    batches_t.c.id == pb.batch_id,
                    batches_t.c.status == "in_progress",
                    batches_t.c.expired_at.is_(None),
                )
                .values(expired_at=now)
            )
    _close(pb, "applied", now, remote=remote)


def _missing(final: str, provider: str, remote: Remote) -> Outcome:
    """What an item without a result line ended as: the provider batch's own end."""
    if final == "cancelled":
        return Outcome("cancelled", error=stop_error("cancelled"))
    if final == "expired":
        message = f"{provider}: the provider's batch expired before this request ran"
        return Outcome("expired", error=item_error("batch_expired", message, provider))
    if remote.error:
        return Outcome("failed", error=remote.error)
    message = f"{provider}: the provider batch ended without a result for this request"
    return Outcome("failed", error=item_error("missing_result", message, provider))


def _close(
    pb: Any,
    status: str,
    now: Any,
    *,
    error: dict[str, Any] | None = None,
    remote: Remote | None = None,
) -> None:
    """End a provider batch row, then finalize its Sluice batch (or announce its jobs)."""
    rows.end_row(pb, status, now, error=error, remote=remote)
    _announce(pb)


def _announce(pb: Any) -> None:
    if pb.batch_id:
        maybe_finalize(pb.batch_id)
        from app.models import Batch

        batch = db.session.get(Batch, pb.batch_id, populate_existing=True)
        if batch is not None:
            events.batch_changed(batch)
        return
    from app.models import Job

    for job in db.session.scalars(select(Job).where(Job.provider_batch_id == pb.id)):
        events.job_changed(job)


# ---------------------------------------------------------------- cancel and expire


def expire_overdue() -> int:
    """Provider-executor batches past their window plus the grace: expire them here.

    The provider's own expiry (reported per item) normally comes first; this covers a
    provider that never answers.
    """
    grace = timedelta(seconds=_config("PROVIDER_BATCH_EXPIRY_GRACE_SECONDS"))
    with db.engine.connect() as conn:
        due = conn.scalars(
            select(batches_t.c.id).where(
                batches_t.c.executor == "provider",
                batches_t.c.status == "in_progress",
                batches_t.c.expires_at < utcnow() - grace,
            )
        ).all()
    for batch_id in due:
        rows.cancel_remote(batch_id)
        expire_batch(batch_id)
    return len(due)
