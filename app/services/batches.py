"""The batch engine: create, count, cancel and finalize batches of background jobs.

Both front doors (document batches and the OpenAI Batches API) feed items here. Rows are
bulk-inserted with Core statements inside one transaction; work is sent to the `batch`
queue as chunk tasks `(batch_id, first_index, last_index)`; every state change is a
conditional UPDATE so redelivered tasks and racing sweepers never double-apply.
"""

from __future__ import annotations

import logging
import pickle
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any, TypeVar, cast

from flask import current_app
from sqlalchemy import Connection, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from app import telemetry
from app.errors import APIError
from app.extensions import db, redis_store
from app.models import Batch, Job, new_id, utcnow
from app.models.batch import batches_t
from app.models.job import ACTIVE, STATUSES, jobs_t
from app.policy import Route
from app.providers import UnknownModel, providers
from app.queueing import BATCH_QUEUE, send_task
from app.services import events
from app.services.provider_batches import choice as executors

log = logging.getLogger(__name__)

CHUNK_TASK = "sluice.batch.run_chunk"
JOB_TASK = "sluice.batch.run_job"
INSERT_CHUNK = 1000
STAGE_MEMORY = 32 * 1024 * 1024  # staged rows beyond this spill to a temporary file
STOP_KEY = "sluice:batch:stop:{}"  # value: "cancelled" or "expired"
CLAIMS_KEY = "sluice:batch:claims"  # the lease set of running claims (chunks and jobs)
MAX_ITEM_ID = 512

T = TypeVar("T")
DEADLOCK_ATTEMPTS = 5


def in_transaction(work: Callable[[Connection], T]) -> T:
    """Run work in one transaction, again when PostgreSQL picks it as a deadlock's victim.

    A bulk UPDATE of a batch's items (cancel, expiry) and a worker's result flush lock the
    same rows in different orders; one of them is rolled back (SQLSTATE 40P01) and is safe
    to repeat, since every such write is conditional on the rows' status.
    """
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            with db.engine.begin() as conn:
                return work(conn)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "40P01" or attempt == DEADLOCK_ATTEMPTS:
                raise
            log.warning("deadlock (attempt %d of %d); trying again", attempt, DEADLOCK_ATTEMPTS)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class BatchItem:
    """One unit of work: the caller's id and a chat-completions body."""

    item_id: str  # document id, or OpenAI custom_id
    body: dict[str, Any]  # {"model", "messages", optional "max_tokens", "temperature", ...}
    metadata: dict[str, Any] | None = None


def window_seconds(window: str) -> float:
    """Seconds in a completion window such as "24h", "30m", "90s" or "2d"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(window or ""))
    if not match or float(match.group(1)) <= 0:
        raise APIError(
            400,
            f"completion_window must look like '24h' (s, m, h or d), got {window!r}",
            param="completion_window",
            code="invalid_completion_window",
        )
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


def find_by_idempotency_key(tenant_id: str, key: str) -> Batch | None:
    """The tenant's batch created with this Idempotency-Key, if any."""
    return db.session.scalar(
        select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == key)
    )


class _Models:
    """Resolves "provider/model" names once per distinct name."""

    def __init__(self) -> None:
        self._registry = providers()
        self._seen: dict[str, str] = {}

    def provider(self, model: Any, where: str) -> str:
        if isinstance(model, str) and model in self._seen:
            return self._seen[model]
        try:
            provider, _ = self._registry.resolve(model)
        except UnknownModel as exc:
            raise APIError(400, f"{where}: {exc}", param="model", code="model_not_found") from None
        self._seen[model] = provider.name
        return provider.name


def create_batch(
    *,
    tenant_id: str,
    kind: str,
    items: Iterable[BatchItem],
    route: Route | Callable[[], Route],
    model: str | Callable[[], str | None] | None = None,
    endpoint: str = "/v1/chat/completions",
    completion_window: str = "24h",
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    input_file_id: str | None = None,
    instructions: str | None = None,
    prompt_template: str | None = None,
    params: dict[str, Any] | None = None,
    input_hash: Callable[[], str] | None = None,  # asked once the items were read
) -> Batch:
    """Stage and validate every item, insert the batch and its jobs in one short transaction,
    then enqueue chunks.

    The items are read (from the client's body, an upload, a file) and validated before any
    transaction opens, so a slow upload or extraction never holds the database's write
    lock; an exception from the iterable (e.g. a validation error raised once the whole
    input has been read) leaves nothing behind. Staged rows spill to disk past STAGE_MEMORY.
    `route` and `model` (the batch's, the items' default) may be callables, asked once
    every item was staged (what they are may depend on what reading the items found).
    """
    window = window_seconds(completion_window)
    models = _Models()
    if model and not callable(model):
        models.provider(model, "model")
    with tempfile.SpooledTemporaryFile(STAGE_MEMORY) as staged:
        total = _stage(items, models, None if callable(model) else model, staged)
        if callable(route):
            route = route()
        if callable(model):
            model = model()
        # executor (#13): workers, or the provider's own batch API (the sweeper submits)
        route = executors.resolve(
            route, models._seen.values(), models._seen.keys(), window, metadata
        )
        now = utcnow()
        batch_id = new_id("batch_")
        common = {
            "tenant_id": tenant_id,
            "mode": "batch",
            "status": "queued",
            "endpoint": endpoint,
            "route_rule": route.rule,
            "route_reason": route.reason,
            "priority": 0,
            "attempts": 0,
            "batch_id": batch_id,
            "created_at": now,
            "executor": route.executor,
        }
        try:
            with db.engine.begin() as conn:
                conn.execute(
                    insert(batches_t).values(
                        id=batch_id,
                        tenant_id=tenant_id,
                        kind=kind,
                        status="in_progress",
                        endpoint=endpoint,
                        model=model,
                        instructions=instructions,
                        prompt_template=prompt_template,
                        params=params,
                        metadata=metadata,
                        idempotency_key=idempotency_key,
                        input_hash=input_hash() if input_hash else None,
                        completion_window=completion_window,
                        input_file_id=input_file_id,
                        route_rule=route.rule,
                        route_reason=route.reason,
                        executor=route.executor,
                        total=total,
                        prompt_tokens=0,
                        completion_tokens=0,
                        created_at=now,
                        in_progress_at=now,
                        expires_at=now + timedelta(seconds=window),
                    )
                )
                staged.seek(0)
                rows: list[dict[str, Any]] = []
                for index in range(total):
                    columns = pickle.load(staged)  # our own staged rows
                    rows.append({**common, **columns, "id": new_id("job_"), "item_index": index})
                    if len(rows) >= INSERT_CHUNK:
                        conn.execute(insert(jobs_t), rows)
                        rows = []
                if rows:
                    conn.execute(insert(jobs_t), rows)
        except IntegrityError:
            if idempotency_key:
                db.session.rollback()
                existing = find_by_idempotency_key(tenant_id, idempotency_key)
                if existing is not None:
                    return existing
            raise
    if route.executor != "provider":  # the provider executor's sweep step submits them
        send_committed(f"the chunks of {batch_id}", lambda: enqueue_chunks(batch_id, 0, total - 1))
    batch = db.session.get(Batch, batch_id)
    assert batch is not None
    events.batch_changed(batch)
    return batch


def _stage(items: Iterable[BatchItem], models: _Models, model: str | None, out: IO[bytes]) -> int:
    """Validate every item and write its job columns (pickled: our own temporary file, read
    back once; a JSON round trip cost ~1 s per 100,000 items); returns how many."""
    limit = current_app.config["BATCH_MAX_DOCUMENTS"]
    total = 0
    for item in items:
        if total >= limit:
            raise APIError(
                413,
                f"a batch may hold at most {limit} items (BATCH_MAX_DOCUMENTS)",
                param="documents",
                code="too_many_items",
            )
        item_model = item.body.get("model") or model
        where = f"item {total} ({item.item_id})"
        if len(item.item_id) > MAX_ITEM_ID:
            raise APIError(400, f"{where}: id longer than {MAX_ITEM_ID} characters", param="id")
        columns = {
            "item_id": item.item_id,
            "provider": models.provider(item_model, where),
            "model": item_model,
            "request": item.body,
            "metadata": item.metadata,
        }
        out.write(pickle.dumps(columns, pickle.HIGHEST_PROTOCOL))
        total += 1
    if total == 0:
        raise APIError(400, "a batch needs at least one item", code="empty_batch")
    return total


def enqueue_chunks(batch_id: str, first: int, last: int) -> int:
    """Send chunk tasks covering item indexes first..last; returns how many were sent."""
    size = max(1, current_app.config["BATCH_CHUNK_SIZE"])
    sent = 0
    for lo in range(first, last + 1, size):
        send_task(CHUNK_TASK, args=[batch_id, lo, min(lo + size, last + 1) - 1], queue=BATCH_QUEUE)
        sent += 1
    return sent


def requeue_items(rows: Iterable[Any], error: dict[str, Any]) -> int:
    """Running items back to the queue, their tasks re-sent; returns how many moved.

    Only rows still in the claim we know (same attempts) move; an item claimed
    BATCH_MAX_ATTEMPTS times fails with `error` instead. `rows` carry id, attempts,
    batch_id and item_index. A failed re-send is left to the sweeper's resend steps.
    """
    max_attempts = max(1, current_app.config["BATCH_MAX_ATTEMPTS"])
    ranges: set[tuple[str, int]] = set()
    singles: list[str] = []
    now = utcnow()
    ended: list[Any] = []
    with db.engine.begin() as conn:
        for row in rows:
            cond = [
                jobs_t.c.id == row.id,
                jobs_t.c.status == "running",
                jobs_t.c.attempts == row.attempts,
            ]
            if row.attempts >= max_attempts:
                failed = {**error, "attempts": row.attempts}
                ended += conn.execute(
                    update(jobs_t)
                    .where(*cond)
                    .values(status="failed", error=failed, finished_at=now)
                    .returning(*telemetry.ENDED_COLUMNS)
                ).all()
                continue
            if conn.execute(
                update(jobs_t).where(*cond).values(status="queued", worker=None)
            ).rowcount:
                if row.batch_id:
                    ranges.add((row.batch_id, row.item_index))
                else:
                    singles.append(row.id)
    telemetry.batch_rows_written(ended)  # items out of attempts end here, not on a worker
    send_committed(f"{len(ranges) + len(singles)} item(s)", lambda: resend(ranges, singles))
    return len(ranges) + len(singles)


def send_committed(what: str, send: Callable[[], object]) -> None:
    """Send the tasks of committed work; a failure (a broker outage) is logged, not raised.

    The work exists: an error answer would have its client create it again. The sweeper
    re-sends what stays queued (batch_sweep: stranded jobs, orphaned chunks).
    """
    try:
        send()
    except Exception as exc:
        log.warning("could not send %s (%r); the sweeper will", what, exc)


def resend(indexes: set[tuple[str, int]], singles: Iterable[str]) -> int:
    """Send tasks for batch items (batch_id, index), in contiguous runs, and single jobs."""
    by_batch: dict[str, list[int]] = {}
    for batch_id, index in indexes:
        by_batch.setdefault(batch_id, []).append(index)
    sent = 0
    for batch_id, items in by_batch.items():
        for lo, hi in runs(sorted(items)):
            sent += enqueue_chunks(batch_id, lo, hi)
    for job_id in singles:
        send_task(JOB_TASK, args=[job_id], queue=BATCH_QUEUE)
        sent += 1
    return sent


def runs(indexes: list[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs of sorted indexes as (first, last)."""
    if not indexes:
        return
    start = prev = indexes[0]
    for i in indexes[1:]:
        if i != prev + 1:
            yield start, prev
            start = i
        prev = i
    yield start, prev


def submit_batch_job(
    tenant_id: str,
    body: dict[str, Any],
    route: Route,
    metadata: dict[str, Any] | None = None,
    *,
    endpoint: str = "/v1/chat/completions",
    priority: int = 0,
    previous_response_id: str | None = None,
) -> Job:
    """A single background job without a batch, for POST /v1/jobs routed to batch."""
    model = body.get("model")
    provider = _Models().provider(model, "model")
    window = current_app.config["BATCH_COMPLETION_WINDOW_HOURS"] * 3600
    route = executors.resolve(route, [provider], [str(model)], window, metadata)
    job = Job(
        tenant_id=tenant_id,
        mode="batch",
        status="queued",
        endpoint=endpoint,
        priority=priority,
        route_rule=route.rule,
        route_reason=route.reason,
        provider=provider,
        model=model,
        request=body,
        metadata_=metadata,
        executor=route.executor,
        previous_response_id=previous_response_id,
    )
    db.session.add(job)
    db.session.commit()
    if route.executor != "provider":  # the provider executor's sweep step submits it
        send_committed(job.id, lambda: send_task(JOB_TASK, args=[job.id], queue=BATCH_QUEUE))
    events.job_changed(job)
    return job


def get_batch(tenant_id: str, batch_id: str) -> Batch | None:
    """The tenant's batch, or None (another tenant's batch is None too)."""
    return db.session.scalar(
        select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    )


def item_counts(batch: Batch) -> dict[str, int]:
    """total, then the batch's item count for every job status."""
    rows = db.session.execute(
        select(jobs_t.c.status, func.count())
        .where(jobs_t.c.batch_id == batch.id)
        .group_by(jobs_t.c.status)
    ).all()
    counts = dict.fromkeys(STATUSES, 0)
    for status, n in rows:
        counts[status] = counts.get(status, 0) + n
    return {"total": batch.total, **counts}


def set_stop(batch_id: str, reason: str) -> None:
    """Tell workers holding claimed items of this batch not to start them."""
    try:
        redis_store.client.set(STOP_KEY.format(batch_id), reason, ex=7 * 86400)
    except Exception:
        log.warning("stop flag for %s not set in Redis", batch_id)


def stop_reason(batch_id: str) -> str | None:
    """Why the batch was told to stop ("cancelled" or "expired"), or None."""
    try:
        return cast(str | None, redis_store.client.get(STOP_KEY.format(batch_id)))
    except Exception:
        return None


def stop_error(reason: str) -> dict[str, Any]:
    """The error stored on an item that never ran: reason is "cancelled" or "expired"."""
    reason = reason.removeprefix("batch_")
    message = {
        "cancelled": "The batch was cancelled before this item ran.",
        "expired": "The batch expired before this item could run.",
    }[reason]
    return {"message": message, "type": "batch_error", "code": f"batch_{reason}", "param": None}


def batch_jobs(batch: Batch, *statuses: str) -> Iterator[Job]:
    """The batch's jobs in item order (only those in `statuses`, if given), streamed."""
    query = select(Job).where(Job.batch_id == batch.id).order_by(Job.item_index)
    if statuses:
        query = query.where(Job.status.in_(statuses))
    yield from db.session.scalars(query.execution_options(yield_per=1000))


def has_active_items(batch_id: str) -> bool:
    with db.engine.connect() as conn:
        return bool(
            conn.scalar(
                select(exists().where(jobs_t.c.batch_id == batch_id, jobs_t.c.status.in_(ACTIVE)))
            )
        )
