"""Worker side of the batch channel: claim items, call providers, write results once.

- Claim: `UPDATE jobs SET status='running', attempts=attempts+1 ... WHERE status='queued'
  RETURNING ...`; only rows this statement moved are ours.
- Result: `UPDATE jobs ... WHERE id=:id AND status='running' AND attempts=:attempt`, so a
  redelivered, duplicated or re-queued task can never write a result twice.
- Provider calls run concurrently within a chunk (a bounded gevent pool) and hold a slot of
  the per-provider semaphore shared by all batch workers (`batch_semaphore`).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import bindparam, update

from app.extensions import db
from app.models import Batch, Job, utcnow
from app.providers import ChatRequest, ProviderError, UnknownModel, providers
from app.services import events
from app.services.batch_lifecycle import maybe_finalize
from app.services.batch_semaphore import semaphore
from app.services.batches import batches_t, jobs_t, stop_error, stop_reason

log = logging.getLogger(__name__)

FLUSH_ITEMS = 50
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
    if retry_after is not None:
        return min(float(retry_after), config["BATCH_RETRY_AFTER_MAX"])
    ceiling = min(config["BATCH_BACKOFF_MAX"], config["BATCH_BACKOFF_BASE"] * 2 ** (attempt - 1))
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
        except Exception as exc:
            retryable = isinstance(exc, ProviderError) and exc.retryable
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


def write_results(batch_id: str | None, outcomes: list[ItemResult]) -> int:
    """Write outcomes whose claim is still ours, in one short transaction; returns how many."""
    if not outcomes:
        return 0
    now = utcnow()
    written = prompt = completion = 0
    with db.engine.begin() as conn:
        for o in outcomes:
            params = {
                "b_id": o.job_id,
                "b_attempt": o.attempt,
                "b_status": o.status,
                "b_output": o.output,
                "b_choices": o.choices,
                "b_finish": o.finish_reason,
                "b_usage": o.usage,
                "b_error": o.error,
                "b_finished": now,
            }
            if conn.execute(_WRITE, params).rowcount:
                written += 1
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
    return written


def claim_range(batch_id: str, first: int, last: int, worker: str) -> list[Any]:
    """Move the queued items first..last of a batch to running; the rows we got."""
    stmt = (
        update(jobs_t)
        .where(
            jobs_t.c.batch_id == batch_id,
            jobs_t.c.item_index.between(first, last),
            jobs_t.c.status == "queued",
        )
        .values(
            status="running", attempts=jobs_t.c.attempts + 1, worker=worker, started_at=utcnow()
        )
        .returning(jobs_t.c.id, jobs_t.c.attempts, jobs_t.c.model, jobs_t.c.request)
    )
    with db.engine.begin() as conn:
        return list(conn.execute(stmt).all())


def _stop_checker(batch_id: str) -> Any:
    """A cheap `should this batch stop?` that asks Redis at most every half second.

    Returns "cancelled" or "expired" once the batch was told to stop, else None.
    """
    state: dict[str, Any] = {"at": 0.0, "value": None}

    def stopped() -> str | None:
        if state["value"]:
            return state["value"]
        now = time.monotonic()
        if now - state["at"] > 0.5:
            state["at"] = now
            state["value"] = stop_reason(batch_id)
        return state["value"]

    return stopped


def run_chunk(batch_id: str, first: int, last: int, worker: str) -> int:
    """Run a batch's items first..last (those still queued); returns how many were written."""
    rows = claim_range(batch_id, first, last, worker)
    if not rows:
        maybe_finalize(batch_id)
        return 0
    written = _run_rows(batch_id, rows, _stop_checker(batch_id))
    maybe_finalize(batch_id)
    return written


def _run_rows(batch_id: str | None, rows: list[Any], cancelled: Any) -> int:
    """Run rows concurrently (bounded), flushing results in small batched commits."""
    from gevent.pool import Pool

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    size = max(1, min(len(rows), app.config["BATCH_ITEM_CONCURRENCY"]))

    def work(row: Any) -> ItemResult:
        with app.app_context():
            try:
                return run_item(row, cancelled)
            except Exception as exc:  # never lose an item to a bug: record it
                log.exception("batch item %s crashed", row.id)
                return ItemResult(row.id, row.attempts, "failed", error=_failure(exc, 0))

    buffer: list[ItemResult] = []
    written = 0
    last_flush = time.monotonic()
    for outcome in Pool(size).imap_unordered(work, rows):
        buffer.append(outcome)
        if len(buffer) >= FLUSH_ITEMS or time.monotonic() - last_flush > FLUSH_SECONDS:
            written += _flush(batch_id, buffer)
            buffer = []
            last_flush = time.monotonic()
    written += _flush(batch_id, buffer)
    return written


def _flush(batch_id: str | None, outcomes: list[ItemResult]) -> int:
    written = write_results(batch_id, outcomes)
    if batch_id and outcomes:
        events.batch_changed(Batch(id=batch_id, status="in_progress"))
    return written


def run_job(job_id: str, worker: str) -> bool:
    """Run one standalone background job (no batch); True if its result was written here."""
    stmt = (
        update(jobs_t)
        .where(jobs_t.c.id == job_id, jobs_t.c.status == "queued")
        .values(
            status="running", attempts=jobs_t.c.attempts + 1, worker=worker, started_at=utcnow()
        )
        .returning(jobs_t.c.id, jobs_t.c.attempts, jobs_t.c.model, jobs_t.c.request)
    )
    with db.engine.begin() as conn:
        rows = list(conn.execute(stmt).all())
    if not rows:
        return False
    job = db.session.get(Job, job_id)
    if job is not None:
        events.job_changed(job)
    written = _run_rows(None, rows, lambda: None)
    job = db.session.get(Job, job_id, populate_existing=True)
    if job is not None:
        events.job_changed(job)
    return bool(written)
