"""Worker side of the batch channel: claim items, call providers, write results once.

- Claim: `UPDATE jobs SET status='running', attempts=attempts+1 ... WHERE status='queued'
  RETURNING ...`; only rows this statement moved are ours.
- Result: `UPDATE jobs ... WHERE id=:id AND status='running' AND attempts=:attempt`, so a
  redelivered, duplicated or re-queued task can never write a result twice.
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
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import redis
from flask import current_app
from sqlalchemy import and_, bindparam, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from app import leases, telemetry
from app.extensions import current_flask_app, db, redis_store
from app.models import Batch, Job, utcnow
from app.providers import ChatRequest, ProviderError, UnknownModel, providers
from app.services import events
from app.services.batch_lifecycle import maybe_finalize
from app.services.batch_semaphore import semaphore
from app.services.batches import (
    CLAIMS_KEY,
    batches_t,
    jobs_t,
    requeue_items,
    stop_error,
    stop_reason,
)
from app.services.stream_runner import db_text

log = logging.getLogger(__name__)

FLUSH_ITEMS = 50
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
FLUSH_SECONDS = 0.25


@dataclass
class ItemResult:
    """What one item produced, to be written with a conditional UPDATE."""

    job_id: str
    attempt: int
    status: str  # succeeded | failed | cancelled | expired
    output: str | None = None
    choices: list[dict[str, Any]] | None = None  # set when the answer is more than text
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


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


def run_item(row: Any, cancelled: Any) -> ItemResult:
    """Call the provider for one claimed item, retrying retryable failures."""
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
            with sem.slot(provider.name):
                if stop := cancelled():  # the wait for a slot may have been long
                    return ItemResult(row.id, row.attempts, stop, error=stop_error(stop))
                completion = provider.complete(request)
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


_WRITE = (
    update(jobs_t)
    .where(
        jobs_t.c.id == bindparam("b_id"),
        jobs_t.c.status == "running",
        jobs_t.c.attempts == bindparam("b_attempt"),
    )
    .values(
        status=bindparam("b_status"),
        output=bindparam("b_output"),
        choices=bindparam("b_choices", type_=jobs_t.c.choices.type),
        finish_reason=bindparam("b_finish"),
        usage=bindparam("b_usage", type_=jobs_t.c.usage.type),
        error=bindparam("b_error", type_=jobs_t.c.error.type),
        finished_at=bindparam("b_finished"),
    )
)


class Ended(NamedTuple):
    """A result as written, in the shape telemetry counts (its _COLUMNS)."""

    id: str
    mode: str
    provider: str | None
    status: str
    created_at: datetime | None
    first_token_at: datetime | None
    finished_at: datetime
    usage: dict[str, Any] | None
    error: dict[str, Any] | None


def write_results(
    batch_id: str | None, outcomes: list[ItemResult], claimed: Mapping[str, Any] | None = None
) -> int:
    """Write outcomes whose claim is still ours, in one short transaction; returns how many.

    One executemany for all of them; only if it moved fewer rows than it was given (a
    redelivered or expired item) is the transaction rolled back and each written alone, to
    learn which ones were ours. `claimed` (job id -> claimed row) feeds the counters.
    """
    if not outcomes:
        return 0
    if marker := current_app.config["BATCH_FAULT_WRITE_MARKER"]:
        _injected_fault(marker, outcomes)
    now = utcnow()
    params = [
        {
            "b_id": o.job_id,
            "b_attempt": o.attempt,
            "b_status": o.status,
            "b_output": db_text(o.output) if o.output is not None else None,
            "b_choices": o.choices,
            "b_finish": o.finish_reason,
            "b_usage": o.usage,
            "b_error": o.error,
            "b_finished": now,
        }
        for o in outcomes
    ]
    written: list[ItemResult] = []
    with db.engine.connect() as conn:
        if len(params) > 1 and conn.dialect.supports_sane_multi_rowcount:
            with conn.begin() as tx:
                if conn.execute(_WRITE, params).rowcount == len(params):
                    written = outcomes
                    _add_tokens(conn, batch_id, written)
                else:
                    tx.rollback()
        if not written:
            with conn.begin():
                for o, one in zip(outcomes, params, strict=True):
                    if conn.execute(_WRITE, one).rowcount:
                        written.append(o)
                _add_tokens(conn, batch_id, written)
    telemetry.batch_rows_written([_ended(o, now, claimed) for o in written])
    return len(written)


def _add_tokens(conn: Any, batch_id: str | None, written: list[ItemResult]) -> None:
    """Add the written results' usage to their batch's token totals."""
    prompt = completion = 0
    for o in written:
        if o.usage:
            prompt += int(o.usage.get("prompt_tokens") or 0)
            completion += int(o.usage.get("completion_tokens") or 0)
    if batch_id and (prompt or completion):
        conn.execute(
            update(batches_t)
            .where(batches_t.c.id == batch_id)
            .values(
                prompt_tokens=batches_t.c.prompt_tokens + prompt,
                completion_tokens=batches_t.c.completion_tokens + completion,
            )
        )


def _ended(o: ItemResult, finished: datetime, claimed: Mapping[str, Any] | None) -> Ended:
    row = (claimed or {}).get(o.job_id)
    return Ended(
        id=o.job_id,
        mode="batch",
        provider=getattr(row, "provider", None),
        status=o.status,
        created_at=getattr(row, "created_at", None),
        first_token_at=None,
        finished_at=finished,
        usage=o.usage,
        error=o.error,
    )


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


def _injected_fault(marker: str, outcomes: list[ItemResult]) -> None:
    """Tests only: an output containing `<marker><n>` fails its write on attempts 1..n."""
    for o in outcomes:
        found = re.search(re.escape(marker) + r"(\d+)", o.output or "")
        if found and o.attempt <= int(found.group(1)):
            raise OperationalError("UPDATE jobs", None, RuntimeError(f"injected fault {marker}"))


def claims() -> leases.Renewer:
    """This process's claim leases (one per running chunk or job), renewed in the background."""
    app = current_flask_app()
    renewer: leases.Renewer | None = app.extensions.get("sluice_batch_claims")
    if renewer is None:
        renewer = app.extensions["sluice_batch_claims"] = leases.Renewer(
            redis_store.client, app.config["BATCH_LEASE_SECONDS"], live_only=False
        )
    return renewer


@contextmanager
def claim_lease(worker: str) -> Iterator[str]:
    """A lease for one claim, held (and renewed) while the block runs; yields its holder name.

    Taken before the claim, so every claimed row names a lease that was live. The sweeper
    re-queues running items whose holder's lease lapsed, whoever held it.
    """
    renewer = claims()
    token = uuid.uuid4().hex
    leases.acquire(renewer.client, [CLAIMS_KEY], token, leases.ms(renewer.seconds))
    renewer.hold(CLAIMS_KEY, token)
    try:
        yield f"{worker}/{token}"
    finally:
        renewer.drop(token)
        try:
            leases.release(renewer.client, CLAIMS_KEY, token)
        except Exception:
            log.warning("could not release claim lease %s; it lapses on its own", token)


def holder_token(holder: str | None) -> str:
    """The lease token in a job's `worker` column ("" for none)."""
    return holder.rpartition("/")[2] if holder and "/" in holder else ""


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


def run_chunk(batch_id: str, first: int, last: int, worker: str) -> int:
    """Run a batch's items first..last (those still queued); returns how many were written."""
    written = 0
    with claim_lease(worker) as holder:
        in_range = and_(jobs_t.c.batch_id == batch_id, jobs_t.c.item_index.between(first, last))
        rows = _claim(in_range, holder)
        if rows:
            written = _run_claimed(batch_id, rows, _stop_checker(batch_id))
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
    """Run rows concurrently (bounded), flushing results in small batched commits."""
    from gevent.pool import Pool

    app = current_flask_app()
    size = max(1, min(len(rows), app.config["BATCH_ITEM_CONCURRENCY"]))

    def work(row: Any) -> ItemResult:
        with app.app_context():
            try:
                return run_item(row, cancelled)
            except INFRASTRUCTURE:
                raise
            except Exception as exc:  # never lose an item to a bug: record it
                log.exception("batch item %s crashed", row.id)
                return ItemResult(row.id, row.attempts, "failed", error=_failure(exc, 0))

    claimed = {row.id: row for row in rows}
    buffer: list[ItemResult] = []
    written = 0
    unwritten: list[ItemResult] = []
    error: Exception | None = None
    last_flush = time.monotonic()
    pool = Pool(size)
    try:
        for outcome in pool.imap_unordered(work, rows):
            buffer.append(outcome)
            if len(buffer) >= FLUSH_ITEMS or time.monotonic() - last_flush > FLUSH_SECONDS:
                n, failed, error = _flush(batch_id, buffer, error, claimed)
                written, buffer, last_flush = written + n, [], time.monotonic()
                unwritten += failed
        n, failed, error = _flush(batch_id, buffer, error, claimed)
        written += n
        unwritten += failed
    finally:
        pool.kill(block=False)  # a failed run leaves no provider calls behind
    if unwritten:
        raise ResultWriteError(len(unwritten), error)
    return written


class ResultWriteError(RuntimeError):
    """Some results of a run could not be written; the run gives those items back."""

    def __init__(self, count: int, cause: Exception | None) -> None:
        super().__init__(f"{count} result(s) could not be written: {type(cause).__name__}: {cause}")


def _flush(
    batch_id: str | None,
    outcomes: list[ItemResult],
    error: Exception | None,
    claimed: Mapping[str, Any],
) -> tuple[int, list[ItemResult], Exception | None]:
    """Write outcomes; (written, those that could not be, the last write error).

    A failed batched write is retried one result at a time, so one bad result (a value the
    database refuses) does not take its neighbours with it; if the first two of those fail
    too, the database is taken to be down and the rest are not tried.
    """
    if not outcomes:
        return 0, [], error
    try:
        written = write_results(batch_id, outcomes, claimed)
        failed: list[ItemResult] = []
    except Exception as exc:
        log.warning("writing %d result(s) failed (%r); trying one by one", len(outcomes), exc)
        error, written, failed = exc, 0, []
        for i, outcome in enumerate(outcomes):
            try:
                written += write_results(batch_id, [outcome], claimed)
            except Exception as one:
                error = one
                failed.append(outcome)
                if i == 1 and len(failed) == 2:  # the first two failed: the database is down
                    failed += outcomes[2:]
                    break
    if batch_id:
        events.batch_changed(Batch(id=batch_id, status="in_progress"))
    return written, failed, error


def run_job(job_id: str, worker: str) -> bool:
    """Run one standalone background job (no batch); True if its result was written here."""
    with claim_lease(worker) as holder:
        rows = _claim(jobs_t.c.id == job_id, holder)
        if not rows:
            return False
        job = db.session.get(Job, job_id)
        if job is not None:
            events.job_changed(job)
        written = _run_claimed(None, rows, lambda: None)
    job = db.session.get(Job, job_id, populate_existing=True)
    if job is not None:
        events.job_changed(job)
    return bool(written)
