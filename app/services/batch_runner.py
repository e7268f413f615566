"""Worker side of the batch channel: claim items, call providers, write results once.

- Claim: `UPDATE jobs SET status='running', attempts=attempts+1 ... WHERE status='queued'
  RETURNING ...`; only rows this statement moved are ours.
- Result: `UPDATE jobs ... WHERE id=:id AND status='running' AND attempts=:attempt`, so a
  redelivered, duplicated or re-queued task can never write a result twice.
- Provider calls run concurrently within a chunk (a bounded gevent pool) and hold a slot of a
  per-provider Redis semaphore shared by all batch workers (leases, so a dead worker's slots
  come back on their own).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from flask import current_app
from sqlalchemy import and_, bindparam, func, select, update

from app.extensions import celery, db, redis_store
from app.models import Batch, Job, utcnow
from app.providers import ChatRequest, ProviderError, UnknownModel, providers
from app.queueing import BATCH_QUEUE
from app.services import events
from app.services.batches import (
    JOB_TASK,
    batches_t,
    enqueue_chunks,
    expire_batch,
    jobs_t,
    maybe_finalize,
    stop_error,
    stop_reason,
)
from app.services.heartbeat import live_workers

log = logging.getLogger(__name__)

FLUSH_ITEMS = 50
FLUSH_SECONDS = 0.25
LOCAL_GATE_MAX = 128  # provider calls in flight per process (the Redis pool holds 200)
QUIET_LOGGERS = ("httpx", "httpx2", "openai", "anthropic")  # one INFO line per call otherwise


# -- the provider semaphore -------------------------------------------------------------------

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 60)
  return 1
end
return 0
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #ARGV - 1 do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[#ARGV]), ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[#ARGV])) + 60)
return 1
"""


class ProviderSemaphore:
    """At most `limit` holders per provider across every process sharing this Redis.

    Each slot is a member of a sorted set scored by its lease expiry (Redis server time). A
    background thread renews this process's slots; a holder that dies stops renewing and
    its slot lapses after `lease` seconds, so slots cannot leak.
    """

    def __init__(self, client: redis.Redis, limit: int, lease: float = 30.0) -> None:
        self.client = client
        self.limit = max(1, limit)
        self.lease = max(1.0, lease)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, str] = {}  # token -> key
        self._local: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    @staticmethod
    def key(provider: str) -> str:
        return f"sluice:provider-sem:{provider}"

    def try_acquire(self, provider: str) -> str | None:
        """A slot token, or None when all slots are taken."""
        token = uuid.uuid4().hex
        key = self.key(provider)
        if self._acquire(keys=[key], args=[token, self.limit, self.lease]):
            with self._lock:
                self._held[token] = key
            self._ensure_renewer()
            return token
        return None

    def release(self, token: str) -> None:
        with self._lock:
            key = self._held.pop(token, None)
        if key:
            self.client.zrem(key, token)

    def in_use(self, provider: str) -> int:
        """Live slots (expired leases excluded)."""
        key = self.key(provider)
        now = self.client.time()
        return int(self.client.zcount(key, now[0] + now[1] / 1e6, "+inf"))

    @contextmanager
    def slot(self, provider: str) -> Iterator[None]:
        """Hold one slot for `provider` while the block runs; waits (polling) for one."""
        local = self._local_gate(provider)
        with local:
            delay = 0.005
            token = self.try_acquire(provider)
            while token is None:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)
                token = self.try_acquire(provider)
            try:
                yield
            finally:
                self.release(token)

    def _local_gate(self, provider: str) -> threading.BoundedSemaphore:
        """A per-process gate, so at most `limit` local waiters poll Redis."""
        with self._lock:
            gate = self._local.get(provider)
            if gate is None:
                size = min(self.limit, LOCAL_GATE_MAX)
                gate = self._local[provider] = threading.BoundedSemaphore(size)
            return gate

    def _ensure_renewer(self) -> None:
        if self._renewer is not None and self._renewer.is_alive():
            return
        with self._lock:
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew_forever, daemon=True, name="provider-sem-renew"
                )
                self._renewer.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.lease / 3)
            self.renew_once()

    def renew_once(self) -> None:
        with self._lock:
            by_key: dict[str, list[str]] = {}
            for token, key in self._held.items():
                by_key.setdefault(key, []).append(token)
        for key, tokens in by_key.items():
            try:
                self._renew(keys=[key], args=[*tokens, self.lease])
            except Exception:
                log.warning("could not renew provider slots on %s", key)


_semaphores: dict[int, ProviderSemaphore] = {}


def semaphore() -> ProviderSemaphore:
    """This process's semaphore for the current app's settings."""
    config = current_app.config
    ident = id(current_app._get_current_object())  # type: ignore[attr-defined]
    sem = _semaphores.get(ident)
    if sem is None:
        for name in QUIET_LOGGERS:  # per-request INFO lines cost more than the request here
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        sem = _semaphores[ident] = ProviderSemaphore(
            redis_store.client, config["PROVIDER_CONCURRENCY"], config["PROVIDER_LEASE_SECONDS"]
        )
    return sem


# -- running items ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one item produced, to be written with a conditional UPDATE."""

    job_id: str
    attempt: int
    status: str  # succeeded | failed | cancelled | expired
    output: str | None = None
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


def run_item(row: Any, cancelled: Any) -> Outcome:
    """Call the provider for one claimed item, retrying retryable failures."""
    max_tries = max(1, int(current_app.config["BATCH_MAX_ATTEMPTS"]))
    try:
        record = {"model": row.model, **(row.request or {})}
        provider, request = providers().bind(ChatRequest.from_record(record))
    except (UnknownModel, TypeError, ValueError) as exc:
        error = ProviderError(str(exc), retryable=False, code="invalid_request")
        return Outcome(row.id, row.attempts, "failed", error=_failure(error, 0))
    sem = semaphore()
    for tries in range(1, max_tries + 1):
        if stop := cancelled():
            return Outcome(row.id, row.attempts, stop, error=stop_error(stop))
        try:
            with sem.slot(provider.name):
                if stop := cancelled():  # the wait for a slot may have been long
                    return Outcome(row.id, row.attempts, stop, error=stop_error(stop))
                completion = provider.complete(request)
        except Exception as exc:
            retryable = isinstance(exc, ProviderError) and exc.retryable
            if not retryable or tries == max_tries:
                return Outcome(row.id, row.attempts, "failed", error=_failure(exc, tries))
            retry_after = exc.retry_after if isinstance(exc, ProviderError) else None
            time.sleep(backoff_seconds(tries, retry_after))
            continue
        return Outcome(
            row.id,
            row.attempts,
            "succeeded",
            output=completion.text,
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
        finish_reason=bindparam("b_finish"),
        usage=bindparam("b_usage", type_=jobs_t.c.usage.type),
        error=bindparam("b_error", type_=jobs_t.c.error.type),
        finished_at=bindparam("b_finished"),
    )
)


def write_results(batch_id: str | None, outcomes: list[Outcome]) -> int:
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
    size = max(1, min(len(rows), int(app.config["BATCH_ITEM_CONCURRENCY"])))

    def work(row: Any) -> Outcome:
        with app.app_context():
            try:
                return run_item(row, cancelled)
            except Exception as exc:  # never lose an item to a bug: record it
                log.exception("batch item %s crashed", row.id)
                return Outcome(row.id, row.attempts, "failed", error=_failure(exc, 0))

    buffer: list[Outcome] = []
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


def _flush(batch_id: str | None, outcomes: list[Outcome]) -> int:
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


# -- the sweeper step -------------------------------------------------------------------------


def sweep_batches() -> None:
    """Re-queue items whose worker vanished, expire old batches, finalize stragglers."""
    requeue_lost_items()
    resend_orphaned_chunks()
    expire_due_batches()
    finalize_stragglers()


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
    max_attempts = max(1, int(config["BATCH_MAX_ATTEMPTS"]))
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
        celery.send_task(JOB_TASK, args=[job_id], queue=BATCH_QUEUE)


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
