"""Worker side of the batch channel: claim items, call providers, write results once.

- Claim: `UPDATE jobs SET status='running', attempts=attempts+1 ... WHERE status='queued'
  RETURNING ...`; only rows this statement moved are ours.
- Result: `UPDATE jobs ... WHERE id=:id AND status='running' AND attempts=:attempt`, so a
  redelivered, duplicated or re-queued task can never write a result twice; the process's
  writer (`batch_writes`) writes the results of all its chunks together.
- Lease: every claim holds a lease (`app.leases`) renewed while it runs and named in the
  rows' `worker` column; a claim whose lease lapsed (its worker died, stalled or restarted,
  under any name) is re-queued by the sweeper. A run that fails gives its unfinished items
  back itself (re-queued, or failed with the error after BATCH_MAX_ATTEMPTS claims).
- Provider calls run concurrently within a chunk (a bounded gevent pool) and hold a slot of
  the per-provider semaphore shared by all batch workers (`batch_semaphore`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import current_app
from sqlalchemy import and_, update
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import current_flask_app, db
from app.models import Job, utcnow
from app.models.job import jobs_t
from app.providers import ChatRequest, ProviderError, UnknownModel, providers
from app.services import capacity, events
from app.services.batch_claims import claim_lease
from app.services.batch_lifecycle import maybe_finalize
from app.services.batch_semaphore import semaphore
from app.services.batch_writes import ItemResult, Ticket, result_writer
from app.services.batches import requeue_items, stop_error, stop_reason

log = logging.getLogger(__name__)

INFRASTRUCTURE = (redis.RedisError, SQLAlchemyError)  # outages: never an item's own failure
CLAIMED = (
    jobs_t.c.id,
    jobs_t.c.attempts,
    jobs_t.c.model,
    jobs_t.c.request,
    jobs_t.c.batch_id,
    jobs_t.c.item_index,
    jobs_t.c.provider,
    jobs_t.c.created_at,
)


def backoff_seconds(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; Retry-After (capped) wins when given."""
    config = current_app.config
    cap: float = config["BATCH_RETRY_AFTER_MAX"]
    if retry_after is not None:
        return min(retry_after, cap)
    top: float = config["BATCH_BACKOFF_MAX"]
    base: float = config["BATCH_BACKOFF_BASE"]
    ceiling: float = min(top, base * 2 ** (attempt - 1))
    return ceiling / 2 + random.random() * ceiling / 2


def _failure(exc: BaseException, tries: int) -> dict[str, Any]:
    if isinstance(exc, ProviderError):
        error = exc.to_openai_error()
        error["status_code"] = exc.status_code
    else:
        error = {
            "message": f"{type(exc).__name__}: {exc}",
            "type": "server_error",
            "code": "worker_error",
            "param": None,
        }
    error["attempts"] = tries
    return error


def run_item(row: Any, cancelled: Any, on_slot: Callable[[], None] = lambda: None) -> ItemResult:
    """Call the provider for one claimed item, retrying retryable failures.

    `on_slot` is called each time the item holds a provider slot (before its call).
    """
    max_tries = max(1, current_app.config["BATCH_MAX_ATTEMPTS"])
    try:
        record = {"model": row.model, **(row.request or {})}
        provider, request = providers().bind(ChatRequest.from_record(record))
    except (UnknownModel, TypeError, ValueError) as exc:
        error = ProviderError(str(exc), retryable=False, code="invalid_request")
        return ItemResult(row.id, row.attempts, "failed", error=_failure(error, 0))
    sem = semaphore()
    for tries in range(1, max_tries + 1):
        if stop := cancelled():
            return ItemResult(row.id, row.attempts, stop, error=stop_error(stop))
        try:
            with sem.slot(provider.name, lambda: capacity.estimate(request)) as call:
                on_slot()
                if stop := cancelled():  # the wait for a slot may have been long
                    return ItemResult(row.id, row.attempts, stop, error=stop_error(stop))
                completion = provider.complete(request)
                call.tokens = completion.usage.total_tokens  # the provider's window, corrected
        except INFRASTRUCTURE:
            raise  # Redis or the database, not this item: the run gives its items back
        except Exception as exc:  # a provider's own verdict, else (a worker-side error) retry
            retryable = exc.retryable if isinstance(exc, ProviderError) else True
            if not retryable or tries == max_tries:
                return ItemResult(row.id, row.attempts, "failed", error=_failure(exc, tries))
            retry_after = exc.retry_after if isinstance(exc, ProviderError) else None
            time.sleep(backoff_seconds(tries, retry_after))
            continue
        return ItemResult(
            row.id,
            row.attempts,
            "succeeded",
            output=completion.text,
            choices=completion.choices if completion.more_than_text else None,
            finish_reason=completion.finish_reason,
            usage=completion.usage.as_dict(),
        )
    raise AssertionError("unreachable")


def _claim(where: Any, holder: str) -> list[Any]:
    """Move the queued jobs matching `where` to running under holder; the rows we got."""
    stmt = (
        update(jobs_t)
        .where(where, jobs_t.c.status == "queued")
        .values(
            status="running", attempts=jobs_t.c.attempts + 1, worker=holder, started_at=utcnow()
        )
        .returning(*CLAIMED)
    )
    with db.engine.begin() as conn:
        return list(conn.execute(stmt).all())


STOP_CHECK_SECONDS = 0.5


def _stop_checker(batch_id: str) -> Callable[[], str | None]:
    """A cheap `should this batch stop?`: Redis is asked at most every half second per batch
    and process, however many of the batch's chunks the process runs.

    Returns "cancelled" or "expired" once the batch was told to stop, else None.
    """
    app = current_flask_app()
    seen: dict[str, tuple[float, str | None]] = app.extensions.setdefault("sluice_batch_stops", {})

    def stopped() -> str | None:
        checked_at, reason = seen.get(batch_id, (0.0, None))
        now = time.monotonic()
        if reason or now - checked_at <= STOP_CHECK_SECONDS:
            return reason
        seen[batch_id] = (now, None)  # the other chunks wait for this answer, not ask too
        reason = stop_reason(batch_id)
        seen[batch_id] = (now, reason)
        if len(seen) > 1000:  # forget batches not asked about for a minute
            for key in [k for k, (at, _) in seen.items() if now - at > 60]:
                seen.pop(key, None)
        return reason

    return stopped


CLAIM_WAIT_MAX = 2.0  # the longest a chunk waits for its turn to claim (see Backlog)
CLAIM_AHEAD = 2  # claimed items waiting for a slot, in provider limits, before a chunk waits


class Backlog:
    """This process's claimed items that hold no provider slot yet, and chunks waiting to claim.

    A chunk claims its items once fewer than `ahead` (CLAIM_AHEAD provider limits: a slot
    that ends always finds a prepared item to pass to) wait for a slot, or after
    CLAIM_WAIT_MAX. Without it a worker that
    receives 16 chunk tasks at once claims 1,600 items before its first provider calls
    start: 16 claims, 1,600 greenlets and the collections of their garbage on the hub
    while the slots it holds sit idle (bench, 200 ms upstream: 0.47-0.67 s from the first
    claim to 120 of 128 calls in flight; 0.15-0.19 s with this). The wait is
    bounded, so items of a provider that cannot get slots (a pause) never keep another
    provider's chunks from claiming for longer.
    """

    def __init__(self, ahead: int) -> None:
        self.ahead = max(1, ahead)
        self.unstarted = 0
        self.turn = threading.Condition()

    def wait_turn(self, count: int, timeout: float = CLAIM_WAIT_MAX) -> None:
        """Wait until fewer than `ahead` claimed items wait for a slot (or timeout), then
        count `count` items more (the chunk about to claim them; `started` the rest)."""
        deadline = time.monotonic() + timeout
        with self.turn:
            while self.unstarted >= self.ahead:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.turn.wait(left)
            self.unstarted += count

    def add(self, count: int) -> None:
        with self.turn:
            self.unstarted += count

    def started(self, count: int = 1) -> None:
        """`count` items hold a slot (or ended, or were given back): the next chunk may claim."""
        with self.turn:
            was = self.unstarted
            self.unstarted = max(0, was - count)
            if was >= self.ahead > self.unstarted:
                self.turn.notify_all()  # the first to claim counts its items; the rest wait on


def backlog() -> Backlog:
    """This process's Backlog (one per app), made on first use."""
    app = current_flask_app()
    found: Backlog | None = app.extensions.get("sluice_batch_backlog")
    if found is None:
        found = app.extensions["sluice_batch_backlog"] = Backlog(CLAIM_AHEAD * semaphore().limit)
    return found


def run_chunk(batch_id: str, first: int, last: int, worker: str) -> int:
    """Run a batch's items first..last (those still queued); returns how many were written."""
    written = 0
    ready = backlog()
    counted = last - first + 1
    ready.wait_turn(counted)
    try:
        with claim_lease(worker) as holder:
            in_range = and_(jobs_t.c.batch_id == batch_id, jobs_t.c.item_index.between(first, last))
            rows = _claim(in_range, holder)
            ready.started(counted - len(rows))  # the run counts its rows off itself
            counted = 0
            if rows:
                written = _run_claimed(batch_id, rows, _stop_checker(batch_id))
    finally:
        ready.started(counted)
    maybe_finalize(batch_id)
    return written


def _run_claimed(batch_id: str | None, rows: list[Any], cancelled: Any) -> int:
    """Run claimed rows; if the run dies (a DB error, the task cut), give back what is unfinished.

    Unfinished items go back to the queue, or fail with the error after BATCH_MAX_ATTEMPTS
    claims. If even that fails (the database is down), the sweeper re-queues them once the
    released (or lapsed) lease shows the claim is gone.
    """
    try:
        return _run_rows(batch_id, rows, cancelled)
    except BaseException as exc:  # GreenletExit too: a task cut by a broker connection loss
        log.warning("batch run of %d item(s) failed (%r); giving them back", len(rows), exc)
        try:
            requeue_items(rows, _failure(exc, 0))
            if batch_id:
                maybe_finalize(batch_id)
        except Exception:
            log.exception("could not give back %d item(s); the sweeper will", len(rows))
        raise


def _run_rows(batch_id: str | None, rows: list[Any], cancelled: Any) -> int:
    """Run rows concurrently (bounded); the process's writer writes their results.

    The rows are counted in the process's Backlog (by the caller); each is counted off as
    it takes a slot, and those left when the run ends (or fails) at its end.
    """
    ready = backlog()
    unstarted = [len(rows)]
    try:
        return _run_counted(batch_id, rows, cancelled, ready, unstarted)
    finally:
        ready.started(unstarted[0])  # items of a failed run that never started
        unstarted[0] = 0


def _run_counted(
    batch_id: str | None, rows: list[Any], cancelled: Any, ready: Backlog, unstarted: list[int]
) -> int:
    from gevent.pool import Pool

    app = current_flask_app()
    size = max(1, min(len(rows), app.config["BATCH_ITEM_CONCURRENCY"]))

    def work(row: Any) -> ItemResult:
        gate = gates(row.provider)
        gate.acquire()
        waiting = [True]

        def holds_slot() -> None:
            if waiting[0]:
                waiting[0] = False
                gate.release()
                if unstarted[0] > 0:  # not yet counted off by the run's end
                    unstarted[0] -= 1
                    ready.started()

        try:
            with app.app_context():
                return run_item(row, cancelled, holds_slot)
        except INFRASTRUCTURE:
            raise
        except Exception as exc:  # never lose an item to a bug: record it
            log.exception("batch item %s crashed", row.id)
            return ItemResult(row.id, row.attempts, "failed", error=_failure(exc, 0))
        finally:
            holds_slot()

    gates = _waiting_gates()
    claimed = {row.id: row for row in rows}
    writer = result_writer()
    ticket = Ticket()
    pool = Pool(size)
    try:
        for outcome in pool.imap_unordered(work, rows):
            writer.put(batch_id, outcome, claimed[outcome.job_id], ticket)
        writer.wait(ticket)
    finally:
        pool.kill(block=False)  # a failed run leaves no provider calls behind
    if ticket.failed:
        raise ResultWriteError(len(ticket.failed), ticket.error)
    return ticket.written


def _waiting_gates() -> Callable[[str | None], Any]:
    """This process's gate for items of a provider that do not hold a slot yet.

    As many may wait as the provider has slots (no process can use more): the rest of
    every chunk's items wait here, before their app context and request are built, so a
    process that claims 16 chunks of 100 does not first prepare 1,600 items while the
    slots it already holds sit idle (the first ~0.3 s of a run, measured), and a call
    that ends hands its slot to an item that is ready.
    """
    from gevent.lock import Semaphore

    app = current_flask_app()
    gates: dict[str, Any] = app.extensions.setdefault("sluice_batch_gates", {})
    size = max(1, semaphore().limit)

    def gate(provider: str | None) -> Any:
        found = gates.get(provider or "")
        if found is None:
            found = gates[provider or ""] = Semaphore(size)
        return found

    return gate


class ResultWriteError(RuntimeError):
    """Some results of a run could not be written; the run gives those items back."""

    def __init__(self, count: int, cause: BaseException | None) -> None:
        super().__init__(f"{count} result(s) could not be written: {type(cause).__name__}: {cause}")


def run_job(job_id: str, worker: str) -> bool:
    """Run one standalone background job (no batch); True if its result was written here."""
    with claim_lease(worker) as holder:
        rows = _claim(jobs_t.c.id == job_id, holder)
        if not rows:
            return False
        _announce(job_id)
        backlog().add(len(rows))  # counted off by the run
        written = _run_claimed(None, rows, lambda: None)
    _announce(job_id)
    return bool(written)


def _announce(job_id: str) -> None:
    """Tell dashboards the job changed; the read's transaction ends here, so no database
    connection is held through the provider call that follows (a pool of 15 ran out with
    16 background jobs in flight, and the 16th waited 30 s, then failed)."""
    job = db.session.get(Job, job_id, populate_existing=True)
    if job is not None:
        events.job_changed(job)
    db.session.commit()
