"""Submit batch items to provider batch APIs, poll them, and write their results once.

The sweeper only enqueues (`sweep`, one of its steps); the provider calls run in Celery
tasks on the batch queue (workers/batch_tasks.py), over these functions. Every move is a
conditional UPDATE, so two sweepers, two deliveries of one task, or a worker killed and
its task re-sent, never double-apply:

- submit (`submit_group`): queued items of the provider executor without a provider batch
  are grouped by (batch, provider, model), split by the provider's limits and assigned to
  new `provider_batches` rows (`submitting`), each then sent.
- send (`send`): the row is claimed `submitting` -> `sending` (one winner) before the
  provider is called; the provider's batch id is stored at once (`in_progress`). A row
  left `sending` (its sender died, or the answer was lost) is reconciled before anything
  is created again: the provider's batch list is searched for the row's marker (OpenAI:
  metadata `sluice_provider_batch`; Anthropic: a batch whose custom_ids are its items),
  so a batch created but not recorded is found, not created twice.
- poll (`poll`): each open provider batch is retrieved when due from its stored id, with
  backoff doubling from PROVIDER_BATCH_POLL_SECONDS up to PROVIDER_BATCH_POLL_MAX_SECONDS.
  One nobody waits for any more (its batch cancelling or ended, its jobs cancelled) and
  that the provider is not cancelling is told to cancel again at each poll: a cancel the
  provider refused, or never sent because the process was cut, is delivered all the same.
- apply: an ended provider batch's results (any order, matched by custom_id = job id) are
  written into item rows still `queued` (so each exactly once), with usage and cost at the
  batch price; items without a result end by how the provider batch ended.

A task lost with its worker holds its row for PROVIDER_BATCH_RESUBMIT_SECONDS (the lease);
then the sweeper enqueues it again, and the poll resumes from the stored id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from flask import current_app
from sqlalchemy import and_, delete, insert, select, update

from app import leases
from app.extensions import db, redis_store
from app.models import new_id, utcnow
from app.models.batch import batches_t
from app.models.job import jobs_t
from app.providers import ProviderError
from app.queueing import BATCH_QUEUE, send_task
from app.services import events
from app.services.batch_lifecycle import expire_batch, maybe_finalize
from app.services.batches import stop_error
from app.services.provider_batches import choice, rows
from app.services.provider_batches.apis import (
    Outcome,
    Pending,
    Remote,
    batch_api,
    item_error,
)

log = logging.getLogger(__name__)

pbatches_t = rows.pbatches_t
WRITE_EVERY = 200  # results per write transaction
GROUPS_PER_SWEEP = 50
SENDS_PER_SWEEP = 100
POLLS_PER_SWEEP = 100
LINE_OVERHEAD = 200  # bytes of a batch input line around its body
PROVIDER_WINDOW = timedelta(seconds=choice.PROVIDER_WINDOW)
RECONCILE_SLACK = timedelta(minutes=5)  # clock skew allowed when searching the provider's list
WINDOW_MARGIN = 60.0  # seconds of a batch's window left worth a new provider batch
SUBMIT_TASK = "sluice.batch.provider_submit"
SEND_TASK = "sluice.batch.provider_send"
POLL_TASK = "sluice.batch.provider_poll"
QUEUED_KEY = "sluice:pbatch:queued:{}"  # a submit/send task is on the queue (expires: lease)


def sweep() -> dict[str, int]:
    """The sweeper step: enqueue submits, sends and polls that are due; expire overdue.

    Nothing here calls a provider for submit or poll: the batch workers do, so a slow
    provider never holds the sweeper's other steps.
    """
    return {
        "submits": enqueue_submits(),
        "sends": enqueue_sends(),
        "polls": enqueue_polls(),
        "expired": expire_overdue(),
    }


def _config(name: str) -> float:
    return float(current_app.config[name])


def _lease() -> timedelta:
    """How long a task holds its row; a task lost with its worker is re-sent after it."""
    return timedelta(seconds=max(0.5, _config("PROVIDER_BATCH_RESUBMIT_SECONDS")))


def _backoff(polls: int) -> timedelta:
    base = _config("PROVIDER_BATCH_POLL_SECONDS")
    top = _config("PROVIDER_BATCH_POLL_MAX_SECONDS")
    return timedelta(seconds=min(top, base * 2 ** min(polls, 20)))


def _once(key: str) -> bool:
    """Whether to enqueue the task named by key (not if one is already queued, within a lease)."""
    return leases.first_in(redis_store.client, QUEUED_KEY.format(key), _lease().total_seconds())


# ---------------------------------------------------------------- submit

_WAITING = and_(
    jobs_t.c.executor == "provider",
    jobs_t.c.status == "queued",
    jobs_t.c.provider_batch_id.is_(None),
)


def enqueue_submits() -> int:
    """A submit task for every (batch, provider, model) whose items wait for a provider batch."""
    with db.engine.connect() as conn:
        groups = conn.execute(
            select(jobs_t.c.batch_id, jobs_t.c.provider, jobs_t.c.model)
            .where(_WAITING)
            .group_by(jobs_t.c.batch_id, jobs_t.c.provider, jobs_t.c.model)
            .limit(GROUPS_PER_SWEEP)
        ).all()
    sent = 0
    for g in groups:
        if _once(f"submit:{g.batch_id}:{g.provider}:{g.model}"):
            send_task(SUBMIT_TASK, [g.batch_id, g.provider, g.model], queue=BATCH_QUEUE)
            sent += 1
    return sent


def submit_group(batch_id: str | None, provider: str, model: str) -> int:
    """Give every waiting item of the group a provider batch and send each; how many sent."""
    redis_store.client.delete(QUEUED_KEY.format(f"submit:{batch_id}:{provider}:{model}"))
    sent = 0
    while (pb_id := assign(batch_id, provider, model)) is not None:
        sent += send(pb_id)
    return sent


def assign(batch_id: str | None, provider: str, model: str) -> str | None:
    """Assign the next waiting items of the group (within the provider's limits) to a new
    `submitting` row; its id, or None when nothing waits."""
    api = batch_api(provider)
    same = and_(
        _WAITING,
        jobs_t.c.batch_id.is_(None) if batch_id is None else jobs_t.c.batch_id == batch_id,
        jobs_t.c.provider == provider,
        jobs_t.c.model == model,
    )
    while True:
        with db.engine.connect() as conn:
            found = conn.execute(
                select(jobs_t.c.id, jobs_t.c.request)
                .where(same)
                .order_by(jobs_t.c.item_index, jobs_t.c.id)
                .limit(max(1, api.max_requests))
            ).all()
        if not found:
            return None
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
                    next_poll_at=now,
                )
            )
            moved = conn.execute(
                update(jobs_t).where(same, jobs_t.c.id.in_(ids)).values(provider_batch_id=pb_id)
            ).rowcount
            if not moved:  # another submitter took these items first
                conn.execute(delete(pbatches_t).where(pbatches_t.c.id == pb_id))
                continue
            conn.execute(update(pbatches_t).where(pbatches_t.c.id == pb_id).values(total=moved))
        return pb_id


def enqueue_sends() -> int:
    """A send task for every row due to be sent: new, retried, or whose sender's lease lapsed."""
    with db.engine.connect() as conn:
        due = conn.scalars(
            select(pbatches_t.c.id)
            .where(
                pbatches_t.c.status.in_(("submitting", "sending")),
                pbatches_t.c.next_poll_at <= utcnow(),
            )
            .order_by(pbatches_t.c.next_poll_at)
            .limit(SENDS_PER_SWEEP)
        ).all()
    sent = 0
    for pb_id in due:
        if _once(f"send:{pb_id}"):
            send_task(SEND_TASK, [pb_id], queue=BATCH_QUEUE)
            sent += 1
    return sent


def _claim_send(pb: Any) -> bool:
    """Take a due row for sending: one claimant wins (its `polls` generation moves on)."""
    with db.engine.begin() as conn:
        return bool(
            conn.execute(
                update(pbatches_t)
                .where(
                    pbatches_t.c.id == pb.id,
                    pbatches_t.c.status.in_(("submitting", "sending")),
                    pbatches_t.c.polls == pb.polls,
                    pbatches_t.c.next_poll_at <= utcnow(),
                )
                .values(status="sending", polls=pb.polls + 1, next_poll_at=utcnow() + _lease())
            ).rowcount
        )


@contextmanager
def _holding(pb_id: str, generation: int) -> Iterator[None]:
    """Keep renewing this sender's lease while it waits on the provider (an upload may take
    longer than a lease); a sender that dies stops renewing, and its row is reconciled."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    every = max(0.2, _lease().total_seconds() / 3)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(every):
            try:
                with app.app_context(), db.engine.begin() as conn:
                    conn.execute(
                        update(pbatches_t)
                        .where(
                            pbatches_t.c.id == pb_id,
                            pbatches_t.c.status == "sending",
                            pbatches_t.c.polls == generation,
                        )
                        .values(next_poll_at=utcnow() + _lease())
                    )
            except Exception as exc:
                log.warning("could not renew the send lease of %s: %r", pb_id, exc)

    renewer = threading.Thread(target=renew, daemon=True, name=f"lease-{pb_id}")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(5)


def send(pb_id: str) -> int:
    """Create the provider batch for a due row's items, once; store its id at once (1 if sent).

    A row already `sending` may have a provider batch its sender created but never
    recorded: the provider is searched for it first (`_reconcile`).
    """
    redis_store.client.delete(QUEUED_KEY.format(f"send:{pb_id}"))
    pb = rows.row(pb_id)
    if pb is None or pb.status not in ("submitting", "sending"):
        return 0
    reconcile = pb.status == "sending"
    if not _claim_send(pb):
        return 0
    generation = pb.polls + 1
    api = batch_api(pb.provider)
    if reconcile:
        try:
            since = rows.aware(pb.created_at) - RECONCILE_SLACK
            ours = set(rows.all_item_ids(pb_id))
            with _holding(pb_id, generation):
                found = api.find(pb_id, ours, since, rows.known_remote_ids(pb.provider))
        except (Pending, ProviderError) as exc:
            log.warning("provider batch %s: created or not? not known yet (%s)", pb_id, exc)
            rows.set_where(
                pb_id, "sending", polls=generation, next_poll_at=utcnow() + _backoff(generation)
            )
            return 0
        if found is not None:
            log.warning("provider batch %s found unrecorded as %s: adopted", pb_id, found)
            _store(pb, generation, found)
            return 1
    if pb.cancel_requested_at is not None or rows.unwanted(pb):  # cancelled before sent
        cancelled = Outcome("cancelled", error=stop_error("cancelled"))
        rows.write(pb, [(j.id, cancelled) for j in rows.items(pb_id)])
        _close(pb, "applied", utcnow())
        return 0
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
        return 0
    try:
        with _holding(pb_id, generation):
            remote_id = api.submit(bodies, pb_id)
    except ProviderError as exc:
        if exc.retryable:  # created or not? the next send reconciles before creating again
            log.warning("provider batch %s not known sent (%s); retrying later", pb_id, exc)
            rows.set_where(
                pb_id,
                "sending",
                polls=generation,
                error=_error_of(exc),
                next_poll_at=now + _backoff(generation),
            )
            return 0
        log.warning("provider %s refused batch %s: %s", pb.provider, pb_id, exc)
        rows.write(pb, [(j, Outcome("failed", error=_error_of(exc))) for j in bodies])
        _close(pb, "failed", now, error=_error_of(exc))
        return 0
    _store(pb, generation, remote_id)
    log.info(
        "provider batch %s sent to %s as %s (%d items)", pb_id, pb.provider, remote_id, len(bodies)
    )
    return 1


def _store(pb: Any, generation: int, remote_id: str) -> None:
    """Record the provider's batch id, if this sender still holds the row.

    A sender whose lease lapsed (another took the row over) cancels what it created,
    unless the other adopted it; a cancel asked for meanwhile is passed on at once.
    """
    now = utcnow()
    with db.engine.begin() as conn:
        stored = conn.execute(
            update(pbatches_t)
            .where(
                pbatches_t.c.id == pb.id,
                pbatches_t.c.status == "sending",
                pbatches_t.c.polls == generation,
            )
            .values(
                status="in_progress",
                remote_id=remote_id,
                submitted_at=now,
                next_poll_at=now + _backoff(0),
                polls=0,
                error=None,
            )
        ).rowcount
    current = rows.row(pb.id)
    if not stored:
        if current is None or current.remote_id != remote_id:
            log.warning("provider batch %s: lost its row; cancelling %s", pb.id, remote_id)
            rows.tell_cancel(pb, remote_id)
        return
    asked = current is not None and current.cancel_requested_at is not None
    if asked and not rows.tell_cancel(current):  # refused: unmarked, the next poll retells
        rows.set_where(pb.id, "in_progress", cancel_requested_at=None, next_poll_at=now)


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


def enqueue_polls() -> int:
    """A poll task for every open provider batch that is due (claimed for one lease first)."""
    now = utcnow()
    with db.engine.connect() as conn:
        found = conn.execute(
            select(pbatches_t.c.id, pbatches_t.c.next_poll_at)
            .where(pbatches_t.c.status == "in_progress", pbatches_t.c.next_poll_at <= now)
            .order_by(pbatches_t.c.next_poll_at)
            .limit(POLLS_PER_SWEEP)
        ).all()
    sent = 0
    for row in found:
        if _claim(row.id, row.next_poll_at, "in_progress"):
            send_task(POLL_TASK, [row.id], queue=BATCH_QUEUE)
            sent += 1
    return sent


def _claim(pb_id: str, due: Any, status: str) -> bool:
    """Take a due row for one poll task (the next sweep skips it until the lease passes)."""
    with db.engine.begin() as conn:
        return bool(
            conn.execute(
                update(pbatches_t)
                .where(
                    pbatches_t.c.id == pb_id,
                    pbatches_t.c.status == status,
                    pbatches_t.c.next_poll_at == due,
                )
                .values(next_poll_at=utcnow() + _lease())
            ).rowcount
        )


def _renew(pb_id: str) -> None:
    """Hold an in-progress row for another lease (a long apply is not polled twice)."""
    rows.set_where(pb_id, "in_progress", next_poll_at=utcnow() + _lease())


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
        told = not remote.cancelling and _retell(pb)
        rows.set_where(
            pb_id,
            "in_progress",
            remote_status=remote.status,
            remote_counts=remote.counts,
            polls=pb.polls + 1,
            next_poll_at=utcnow() + _backoff(0 if told else pb.polls + 1),
        )
        return 0
    _apply(pb, api, remote)
    return 1


def _retell(pb: Any) -> bool:
    """Tell the provider again to cancel a provider batch nobody waits for (its cancel was
    refused, or never sent); True if it accepted. One accepted within the last
    PROVIDER_BATCH_POLL_MAX_SECONDS is left alone (this poll's retrieve may predate it)."""
    fresh = rows.row(pb.id)
    asked = fresh.cancel_requested_at if fresh is not None else None
    recent = timedelta(seconds=_config("PROVIDER_BATCH_POLL_MAX_SECONDS"))
    if asked is not None and utcnow() - rows.aware(asked) < recent:
        return False
    return rows.unwanted(pb) and rows.tell_cancel(pb)


def _apply(pb: Any, api: Any, remote: Remote) -> None:
    final = (
        "cancelled"
        if pb.cancel_requested_at is not None and remote.final != "expired"
        else remote.final
    )
    # a batch window longer than the provider's 24 h, with time left: what the provider
    # expired goes to a new provider batch instead of ending `expired`
    again = pb.batch_id is not None and _window_left(pb.batch_id) > WINDOW_MARGIN
    expired = final == "expired" or bool(remote.counts.get("expired"))
    if expired and pb.batch_id and not again:  # before any item is written: a finalize
        with db.engine.begin() as conn:  # meanwhile (the stragglers step) sees it expired
            conn.execute(
                update(batches_t)
                .where(
                    batches_t.c.id == pb.batch_id,
                    batches_t.c.status == "in_progress",
                    batches_t.c.expired_at.is_(None),
                )
                .values(expired_at=utcnow())
            )
    requests, _ = rows.bound(rows.items(pb.id))
    buffer: list[tuple[str, Outcome]] = []
    retry: list[str] = []
    seen: set[str] = set()
    for job_id, outcome in api.results(pb.remote_id, remote, requests):
        if job_id in seen:
            continue
        seen.add(job_id)
        if again and outcome.status == "expired":
            retry.append(job_id)
            continue
        buffer.append((job_id, outcome))
        if len(buffer) >= WRITE_EVERY:
            rows.write(pb, buffer)
            buffer = []
            _renew(pb.id)
    rows.write(pb, buffer)
    leftover = [row.id for row in rows.items(pb.id) if row.id not in retry]
    if again and final == "expired":
        retry += leftover
        leftover = []
    rows.write(pb, [(j, _missing(final, pb.provider, remote)) for j in leftover])
    if retry:
        log.info("provider batch %s expired %d item(s) inside the batch's window: resent",
                 pb.id, len(retry))  # fmt: skip
        rows.unassign(pb.id, retry)
    _close(pb, "applied", utcnow(), remote=remote)


def _window_left(batch_id: str) -> float:
    """Seconds left of a batch's completion window when it is longer than the provider's
    (24 h); 0 otherwise (the provider's expiry is then the batch's)."""
    with db.engine.connect() as conn:
        row = conn.execute(
            select(batches_t.c.created_at, batches_t.c.expires_at).where(batches_t.c.id == batch_id)
        ).first()
    if row is None or row.expires_at is None or row.created_at is None:
        return 0.0
    end = rows.aware(row.expires_at)
    if end - rows.aware(row.created_at) <= PROVIDER_WINDOW:
        return 0.0
    return max(0.0, (end - utcnow()).total_seconds())


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
    else:
        from app.models import Job

        for job in db.session.scalars(select(Job).where(Job.provider_batch_id == pb.id)):
            events.job_changed(job)
    db.session.commit()  # the poll goes on to other provider calls: hold no connection


# ---------------------------------------------------------------- cancel and expire


def expire_overdue() -> int:
    """Provider-executor batches past their window: expire them here (their unfinished
    items end `expired`), then cancel their provider batches.

    A window shorter than the provider's 24 hours is Sluice's promise: it expires on time
    (items the provider finished first keep their results). A longer one normally ends by
    the provider's own expiry (reported per item); PROVIDER_BATCH_EXPIRY_GRACE_SECONDS past
    it covers a provider that never answers.
    """
    now = utcnow()
    grace = timedelta(seconds=_config("PROVIDER_BATCH_EXPIRY_GRACE_SECONDS"))
    with db.engine.connect() as conn:
        found = conn.execute(
            select(batches_t.c.id, batches_t.c.created_at, batches_t.c.expires_at).where(
                batches_t.c.executor == "provider",
                batches_t.c.status == "in_progress",
                batches_t.c.expires_at < now,
            )
        ).all()
    due = [
        row.id
        for row in found
        if rows.aware(row.expires_at) - rows.aware(row.created_at) < PROVIDER_WINDOW
        or rows.aware(row.expires_at) < now - grace
    ]
    for batch_id in due:
        expire_batch(batch_id)  # first: its waiting items end expired, not cancelled
        rows.cancel_remote(batch_id)
    return len(due)
