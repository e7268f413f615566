"""The worker side of a stream job: provider stream -> delta log, with retries, cancel, lease.

One job run costs two database writes (running, then the final state with output, usage
and timings) and one pipelined Redis round trip per coalesced delta. The `running` write
happens while the provider works on its first token, so it adds nothing to TTFT.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from flask import current_app
from sqlalchemy import bindparam, or_, select, update

from app import admission, leases, telemetry
from app.extensions import db, redis_store
from app.models import Job, utcnow
from app.models.job import TERMINAL, jobs_t
from app.providers import (
    ChatRequest,
    ProviderError,
    ProviderRegistry,
    UnknownModel,
    Usage,
    delta_text,
    estimate_tokens,
    providers,
)
from app.providers.streaming import RawSSEStream
from app.queueing import STREAM_QUEUE, push_task
from app.services.events import publish
from app.streams.cancels import CancelListener, cancel_listener
from app.streams.entries import (
    Entry,
    Generation,
    coalesce,
    done_fields,
    error_fields,
    is_terminal,
)
from app.streams.keys import cancel_key, lease_key, log_key
from app.streams.pacing import LOAD, Window
from app.streams.writer import (
    DeltaLog,
    LostLease,
    append_batcher,
    read_all,
    release_lease,
    write_terminal,
)

log = logging.getLogger(__name__)

MARK_RUNNING_WAIT = 0.02  # longest the `running` write waits for the upstream's headers
CANCEL_HEARD = ("cancel", None)  # a reader queue item: the cancel listener heard of a cancel
CANCELLED_ERROR = {
    "message": "The job was cancelled.",
    "type": "cancelled",
    "code": "job_cancelled",
    "param": None,
}


def _note(job_id: str, pipe: Any = None, **fields: Any) -> None:
    """Tell the dashboard about a state change (queued on `pipe` when given)."""
    publish("job", {"id": job_id, "mode": "stream", **fields}, pipe)


def _end_job(
    job_id: str,
    status: str,
    *,
    from_status: tuple[str, ...] = ("running",),
    pipe: Any = None,
    **values: Any,
) -> bool:
    """Conditionally move a job to a terminal state; True if this call did it.

    Every path that ends a stream job comes here, so this is where the end is counted
    (from the row as written: no read back), on `pipe` when the caller executes one.
    """
    if isinstance(values.get("output"), str):
        values["output"] = db_text(values["output"])
    params = {f"v_{k}": v for k, v in values.items()}
    params |= {"b_id": job_id, "v_status": status, "v_finished_at": utcnow()}
    ended = _write(_end_statement(from_status, tuple(values)), params)
    telemetry.stream_rows_ended(ended, pipe)
    return bool(ended)


_END_STATEMENTS: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}


def _end_statement(from_status: tuple[str, ...], keys: tuple[str, ...]) -> Any:
    """The terminal UPDATE for these columns, built once (Core, bound parameters).

    Built per call, an ORM UPDATE cost ~0.7 ms of CPU (statement, cache key, ORM
    synchronisation); a prebuilt Core statement run on its own connection ~0.15 ms.
    """
    stmt = _END_STATEMENTS.get((from_status, keys))
    if stmt is None:
        columns = jobs_t.c
        names = ("status", "finished_at", *keys)
        stmt = _END_STATEMENTS[(from_status, keys)] = (
            update(jobs_t)
            .where(columns.id == bindparam("b_id"), status_is(*from_status))
            .values({columns[k]: bindparam(f"v_{k}", type_=columns[k].type) for k in names})
            .returning(*(columns[attr.key] for attr in telemetry.ENDED_COLUMNS))
        )
    return stmt


def status_is(*statuses: str) -> Any:
    """`status = a OR status = b`: unlike IN (an "expanding" parameter, rendered into the
    SQL at every execution, ~30 us), compiled once with the prebuilt statement."""
    return or_(*(jobs_t.c.status == status for status in statuses))


def _write(stmt: Any, params: dict[str, Any]) -> list[Any]:
    """Run one prebuilt UPDATE ... RETURNING in a transaction of its own; its rows."""
    with db.engine.begin() as conn:
        return list(conn.execute(stmt, params))


def db_text(text: str) -> str:
    """Text a database column can hold: NUL (refused by PostgreSQL) becomes U+FFFD.

    The delta log keeps the exact text; only the row's copy is touched.
    """
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _ttl(config: Mapping[str, Any]) -> int:
    return int(config["STREAM_LOG_TTL_SECONDS"])


def _lost_error(config: Mapping[str, Any]) -> dict[str, Any]:
    lease = config["STREAM_LEASE_SECONDS"]
    return {
        "message": f"The stream worker stopped (no lease renewal for {lease:g}s); "
        "the generation was lost.",
        "type": "server_error",
        "code": "worker_lost",
        "param": None,
    }


def _row_terminal(row: Any) -> dict[str, str]:
    """The terminal entry a finished row stands for."""
    if row.status == "succeeded":
        return done_fields(row.finish_reason, row.usage)
    error = row.error or {"message": f"The job {row.status}.", "type": "server_error"}
    return error_fields(error)


def _settle_row(job_id: str, entries: list[Entry]) -> bool:
    """Move a queued or running row to the end its log records; True if this call did it."""
    generation = Generation.of(entries)
    status = generation.status
    if status is None:
        return False
    output = generation.text if generation.choices else None
    values: dict[str, Any] = {"output": output, "error": generation.error}
    if status == "succeeded":
        values |= {"finish_reason": generation.finish_reason, "usage": generation.usage}
        values["choices"] = generation.stored_choices()
    if not _end_job(job_id, status, from_status=("queued", "running"), **values):
        return False
    _release(job_id)
    _note(job_id, status=status)
    return True


def fail_lost_job(job_id: str, *, check_lease: bool = True, token: str = "") -> bool:
    """Make the row and the log of a job no worker holds end the same way; True if it acted.

    - running, log not ended: the worker is lost: an error entry, then the row fails;
    - queued or running, log ended: the worker died between its two terminal writes: the
      row takes the log's end (the database holds what the log held);
    - finished row, log not ended (its terminal write failed): the log gets the row's end,
      so no relay waits for it.
    `token` is the caller's lease, when a worker settles a job it holds.
    """
    client = redis_store.client
    config = current_app.config
    if check_lease and client.exists(lease_key(job_id)):
        return False
    row = db.session.execute(
        select(Job.status, Job.finish_reason, Job.usage, Job.error).where(Job.id == job_id)
    ).first()
    db.session.commit()
    if row is None:
        return False
    entries = read_all(client, job_id)
    ended = bool(entries) and is_terminal(entries[-1][1])
    lease_ms = int(config["STREAM_LEASE_SECONDS"] * 1000)
    if row.status in TERMINAL:
        if ended:
            return False
        return write_terminal(client, job_id, _row_terminal(row), _ttl(config), token, lease_ms)
    if not ended:
        if row.status != "running":
            return False  # queued: not started yet
        fields = error_fields(_lost_error(config))
        if not write_terminal(client, job_id, fields, _ttl(config), token, lease_ms):
            return False  # a worker holds it again (or just ended it): nothing is lost
        entries.append(("", fields))
    return _settle_row(job_id, entries)


def fail_unstarted_job(job_id: str, waited: float) -> bool:
    """Fail a stream job that stayed queued too long; True if it did."""
    error = {
        "message": f"No stream worker started the job within {waited:g}s.",
        "type": "server_error",
        "code": "not_started",
        "param": None,
    }
    return _end_queued(job_id, "failed", error)


def cancel_queued_job(job_id: str, token: str = "") -> bool:
    """Cancel a job no worker has started; True if it was still queued."""
    return _end_queued(job_id, "cancelled", CANCELLED_ERROR, token)


def _end_queued(job_id: str, status: str, error: dict[str, Any], token: str = "") -> bool:
    """End a queued job: the log's error entry first (refused if a worker holds the job),
    then the row; a crash between the two is settled by fail_lost_job."""
    config = current_app.config
    status_now = db.session.scalar(select(Job.status).where(Job.id == job_id))
    db.session.commit()
    if status_now != "queued":
        return False
    lease_ms = int(config["STREAM_LEASE_SECONDS"] * 1000)
    client = redis_store.client
    if not write_terminal(client, job_id, error_fields(error), _ttl(config), token, lease_ms):
        return False
    if not _end_job(job_id, status, from_status=("queued",), error=error):
        return False
    _release(job_id)
    _note(job_id, status=status)
    return True


def _release(job_id: str) -> None:
    try:
        admission.release_stream_slot(job_id)
    except Exception:
        log.exception("could not release the stream slot of %s", job_id)


STREAM_TASK = "sluice.stream.run"  # run_stream_job's task (workers/stream_tasks.py)
RESEND_AFTER = 15.0  # seconds a stream job may stay queued, unleased, before its task is re-sent
RESENT_KEY = "sluice:stream:resent:{}"  # + job id: its last re-send, for RESEND_AFTER seconds
UNSENT_ERROR = {
    "message": "The job's task could not be sent (Redis was unreachable); nothing ran.",
    "type": "server_error",
    "code": "not_started",
    "param": None,
}


def end_unsent_job(job_id: str) -> bool:
    """End a queued job whose task could not be sent; False if a worker took it all the same.

    Its client is answered an error, so the job must never run later (the sweep would
    re-send it): when Redis refuses the log's error entry too, the row alone ends (a relay
    or the sweep copies that end into the log, fail_lost_job).
    """
    try:
        return _end_queued(job_id, "failed", UNSENT_ERROR)
    except Exception as exc:
        log.warning("job %s: ending it in the log failed (%r); the row alone ends", job_id, exc)
        return _end_job(job_id, "failed", from_status=("queued",), error=UNSENT_ERROR)


def sweep_streams(*, queued_timeout: float | None = None) -> dict[str, int]:
    """Sweeper step: fail running stream jobs whose lease lapsed, and long-queued ones;
    re-send the task of a job queued for RESEND_AFTER seconds with no lease and no log."""
    config = current_app.config
    client = redis_store.client
    lease = config["STREAM_LEASE_SECONDS"]
    if queued_timeout is None:
        queued_timeout = config["STREAM_QUEUED_TIMEOUT_SECONDS"]
    now = utcnow()
    running = db.session.scalars(
        select(Job.id).where(
            Job.status == "running",
            Job.mode == "stream",
            Job.started_at < now - timedelta(seconds=lease),
        )
    ).all()
    queued = db.session.execute(
        select(Job.id, Job.created_at).where(
            Job.status == "queued",
            Job.mode == "stream",
            Job.created_at < now - timedelta(seconds=min(RESEND_AFTER, queued_timeout)),
        )
    ).all()
    db.session.commit()
    counts = {"lost": 0, "unstarted": 0, "resent": 0}
    if running:
        pipe = client.pipeline(transaction=False)
        for job_id in running:
            pipe.exists(lease_key(job_id))
        for job_id, leased in zip(running, pipe.execute(), strict=True):
            if not leased and _safely(fail_lost_job, job_id):
                counts["lost"] += 1
    stale = now - timedelta(seconds=queued_timeout)
    for job_id, created_at in queued:
        if client.exists(lease_key(job_id)):
            continue
        if created_at >= stale:
            if _safely(_resend, client, job_id):
                counts["resent"] += 1
            continue
        # a log that ended (a cancel cut short before its row write) settles the row first
        if _safely(fail_lost_job, job_id) or _safely(fail_unstarted_job, job_id, queued_timeout):
            counts["unstarted"] += 1
    return counts


def _resend(client: redis.Redis, job_id: str) -> bool:
    """Send a queued job's task again (a lost or unsent message) unless it has a log or was
    re-sent lately; a duplicate is harmless (the lease is taken NX, a log is never rerun)."""
    if client.exists(log_key(job_id)):
        return False
    if not leases.first_in(client, RESENT_KEY.format(job_id), RESEND_AFTER):
        return False
    push_task(client, STREAM_TASK, [job_id], STREAM_QUEUE)
    log.warning("job %s: still queued, no worker holds it; its task was sent again", job_id)
    return True


def _safely(step: Any, *args: Any) -> bool:
    """One job's sweep; a failure is logged and never stops the others."""
    try:
        return bool(step(*args))
    except Exception:
        db.session.rollback()
        log.exception("stream sweep of %s failed", args[0])
        return False


# ------------------------------------------------------------------------------ running


class _Reader:
    """Runs the provider stream in its own thread (a greenlet under gevent) into a queue.

    Under load (a coalescing window wider than its low-load width), while tokens come
    faster than the window, it reads the upstream at most once a window: what arrives
    meanwhile waits in the socket and comes in one read, one wake-up and one append
    instead of one each.
    """

    def __init__(self, registry: ProviderRegistry, request: ChatRequest, window: Window) -> None:
        self.queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.stream: Any = None
        self.deltas = 0
        self.sent = threading.Event()  # the upstream answered (headers) or the call failed
        self.ended = threading.Event()  # the upstream stream ended or failed: nothing to wait for
        self._closed = False
        self._registry = registry
        self._request = request
        self._window = window
        self._out = False  # a delta was handed over
        self._read_at = 0.0  # when the last read of the upstream was, or the last wait ended
        self.thread = threading.Thread(target=self._run, daemon=True, name="provider-stream")
        self.thread.start()

    def _run(self) -> None:
        put = self.queue.put
        try:
            provider, request = self._registry.bind(self._request)
            try:
                stream = provider.stream(request)
            finally:
                self.sent.set()
            self.stream = stream
            if self._closed:
                stream.close()
                return
            if isinstance(stream, RawSSEStream) and self._window.widens:
                stream.pace = self._pace
            for choice in stream:
                if delta_text(choice, int(choice.get("index") or 0)):
                    self.deltas += 1
                put(("d", choice))
                self._out = True
            put(("end", stream))
        except BaseException as exc:
            self.sent.set()
            put(("err", exc))
        finally:
            self.ended.set()

    def _pace(self) -> None:
        """After a read of the upstream: under load, while tokens come closer together than
        the window, wait it out before the next read (never before the first delta is out,
        nor once the upstream's finish came)."""
        now = time.monotonic()
        since, self._read_at = now - self._read_at, now
        if not self._out or self.stream.finish_reason is not None:
            return
        if (pause := self._window.pause(LOAD.running, since)) > 0:
            time.sleep(pause)
            self._read_at = time.monotonic()

    def close(self) -> None:
        """Close the upstream stream (ProviderStream.close()) and let the thread end."""
        self._closed = True
        stream = self.stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                log.debug("provider stream close failed", exc_info=True)
        self.thread.join(2)


@dataclass
class _Run:
    """The state of one job run."""

    job_id: str
    request: ChatRequest
    dlog: DeltaLog
    lease_value: str
    lease_seconds: float
    window: Window
    cancels: CancelListener  # this process's: wakes the run on a cancel
    generation: Generation = field(default_factory=Generation)  # what was appended
    finishes: dict[int, str] = field(default_factory=dict)  # each choice's finish reason
    appended: int = 0  # log entries written: once any is, the run is never retried
    first_token_at: datetime | None = None
    tenant_id: str | None = None
    next_refresh: float = 0.0
    tail: Any = None  # the pipeline run_stream_job executes last (telemetry, note, release)
    reader: _Reader | None = None  # the current attempt's

    def cancel_heard(self) -> None:
        """From the cancel listener: wake the run's loop, which reads the flag."""
        if self.reader is not None:
            self.reader.queue.put(CANCEL_HEARD)

    @property
    def text(self) -> str:
        return self.generation.text

    def refresh(self) -> bool:
        """Renew lease, log expiry and stream slot; return whether a cancel was requested."""
        self.next_refresh = time.monotonic() + self.lease_seconds / 3
        return self.dlog.refresh(also=self._renew_slot)

    def _renew_slot(self, pipe: Any) -> None:
        admission.renew_stream_slot(self.job_id, client=pipe)


class _Stop(Exception):
    """End the consume loop with a status."""

    def __init__(self, status: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.error = error


def run_stream_job(job_id: str, payload: Mapping[str, Any] | None = None, worker: str = "") -> str:
    """Run one stream job end to end (idempotent); return what happened."""
    config = current_app.config
    client = redis_store.client
    lease_seconds = config["STREAM_LEASE_SECONDS"]
    lease_value = f"{worker or 'worker'}:{uuid.uuid4().hex[:8]}"
    pipe = client.pipeline(transaction=False)
    pipe.set(lease_key(job_id), lease_value, nx=True, px=max(1, int(lease_seconds * 1000)))
    pipe.exists(cancel_key(job_id))
    pipe.exists(log_key(job_id))
    # from here on the slot lapses with this worker (harmless if another holds the job: it
    # renews the same slot; a no-op once the slot was released)
    admission.renew_stream_slot(job_id, client=pipe)
    got_lease, cancelled, has_log, _ = pipe.execute()
    if not got_lease:
        return "busy"  # another worker holds this job
    # the run's last Redis round trip: its telemetry and dashboard note, then the release
    tail = client.pipeline(transaction=False)
    try:
        if has_log:  # a redelivery after a crash: the client has seen text; never rerun
            fail_lost_job(job_id, check_lease=False, token=lease_value)
            return "lost"
        if cancelled:
            cancel_queued_job(job_id, token=lease_value)
            return "cancelled"
        if payload is None:
            payload = db.session.scalar(select(Job.request).where(Job.id == job_id))
            db.session.commit()
            if payload is None:
                return "missing"
        return _run(job_id, payload, worker, lease_value, lease_seconds, tail)
    finally:
        release_lease(tail, job_id, lease_value)  # only if still ours
        admission.release_stream_slot(job_id, client=tail)
        try:
            tail.execute()
        except redis.RedisError as exc:  # both lapse by themselves
            log.warning("job %s: lease or slot not released: %r", job_id, exc)


_MARK_RUNNING = (
    update(jobs_t)
    .where(jobs_t.c.id == bindparam("b_id"), status_is("queued", "running"))
    .values(
        status="running",
        started_at=bindparam("v_started_at", type_=jobs_t.c.started_at.type),
        worker=bindparam("v_worker", type_=jobs_t.c.worker.type),
        attempts=jobs_t.c.attempts + 1,
    )
    .returning(jobs_t.c.tenant_id, jobs_t.c.model)
)


def _mark_running(job_id: str, worker: str) -> tuple[str, Any] | None:
    """queued -> running (also a running job with no log: its worker died before any text)."""
    params = {"b_id": job_id, "v_started_at": utcnow(), "v_worker": worker[:200]}
    rows = _write(_MARK_RUNNING, params)
    return (rows[0][0], rows[0][1]) if rows else None


def _run(
    job_id: str,
    payload: Mapping[str, Any],
    worker: str,
    lease_value: str,
    lease_seconds: float,
    tail: Any = None,
) -> str:
    config = current_app.config
    request = ChatRequest.from_record(payload)
    dlog = DeltaLog(
        redis_store.client,
        job_id,
        running_ttl=config["STREAM_LOG_TTL_SECONDS"] + int(config["PROVIDER_TIMEOUT"]),
        final_ttl=config["STREAM_LOG_TTL_SECONDS"],
        token=lease_value,
        lease_seconds=lease_seconds,
        batcher=append_batcher(redis_store.client),
    )
    run = _Run(
        job_id,
        request,
        dlog,
        lease_value,
        lease_seconds,
        window=Window.from_config(config),
        cancels=cancel_listener(),
        tail=tail,
    )
    registry = providers()
    max_retries = config["STREAM_MAX_RETRIES"]
    retry_after_max = config["STREAM_RETRY_AFTER_MAX"]
    reader = run.reader = _Reader(registry, request, run.window)  # the call starts now ...
    run.cancels.watch(job_id, run.cancel_heard)
    try:
        # ... and the row is marked while the provider works on its first token. The SDK yields
        # before it sends (its pool probes idle connections), so wait for the response headers
        # (or a short cap) rather than let the blocking DB write hold the request back.
        reader.sent.wait(MARK_RUNNING_WAIT)
        marked = _mark_running(job_id, worker)
        if marked is None:
            reader.close()
            return "not-queued"
        run.tenant_id = marked[0]
        _note(job_id, status="running", tenant_id=run.tenant_id, worker=worker)
        run.next_refresh = time.monotonic() + lease_seconds / 3
        attempt = 0
        while True:
            try:
                _consume(run, reader)
                return _finish(run, reader)
            except _Stop as stop:
                reader.close()
                return _end(run, reader, stop.status, stop.error)
            except LostLease:
                reader.close()
                log.warning("job %s: lease lost; the job is no longer this worker's", job_id)
                return "lost"
            except ProviderError as exc:
                if not run.appended and _retries(exc, max_retries - attempt, retry_after_max):
                    attempt += 1
                    delay = exc.retry_after if exc.retry_after is not None else 0.25 * 2**attempt
                    log.info("job %s: retry %d after %s: %s", job_id, attempt, delay, exc.message)
                    try:
                        _wait(run, max(delay, 0.0))
                    except _Stop as stop:
                        return _end(run, reader, stop.status, stop.error)
                    except LostLease:
                        return "lost"
                    reader = run.reader = _Reader(registry, request, run.window)
                    continue
                return _end(run, reader, "failed", _provider_error(exc))
            except UnknownModel as exc:
                error = {
                    "message": str(exc),
                    "type": "invalid_request_error",
                    "code": "model_not_found",
                }
                return _end(run, reader, "failed", error | {"param": "model"})
            except redis.RedisError as exc:  # the log is unreachable: the row keeps what was sent
                log.warning("job %s: delta log unreachable: %r", job_id, exc)
                reader.close()
                unreachable = {
                    "message": "The job's stream log became unreachable (Redis); the generation "
                    "stopped. Its output holds what was streamed.",
                    "type": "service_unavailable",
                    "code": "stream_unavailable",
                    "param": None,
                }
                return _end(run, reader, "failed", unreachable)
            except Exception as exc:
                log.exception("job %s: stream failed", job_id)
                reader.close()
                internal: dict[str, Any] = {
                    "message": f"Internal error while streaming: {type(exc).__name__}",
                    "type": "server_error",
                    "code": "internal_error",
                    "param": None,
                }
                return _end(run, reader, "failed", internal)
    except BaseException:  # cut (GreenletExit on a broker connection loss): stop upstream too
        reader.close()
        raise
    finally:
        run.cancels.unwatch(job_id, run.cancel_heard)


def _retries(exc: ProviderError, left: int, retry_after_max: float) -> bool:
    """Whether a failure before the first token is tried again: a retryable one, while
    attempts are left, unless the upstream asks for a longer wait than a client should
    sit through (the job fails at once, and its client hears the wait)."""
    too_long = exc.retry_after is not None and exc.retry_after > retry_after_max
    return exc.retryable and left > 0 and not too_long


def _provider_error(exc: ProviderError) -> dict[str, Any]:
    """The job's error for a provider failure; an upstream's wait rides along as
    `retry_after`, which the web answers as the Retry-After header."""
    error = exc.to_openai_error()
    if exc.retry_after is not None:
        error["retry_after"] = exc.retry_after
    return error


def _wait(run: _Run, seconds: float) -> None:
    """Sleep between attempts, renewing the lease and watching for a cancel."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, max(0.05, run.next_refresh - time.monotonic())))
        if time.monotonic() >= run.next_refresh and run.refresh():
            raise _Stop("cancelled", CANCELLED_ERROR)


def _consume(run: _Run, reader: _Reader) -> None:
    """Move deltas from the provider to the log until the stream ends (or raise)."""
    with LOAD.counted():  # the coalescing window follows the process's running streams
        _move_deltas(run, reader)


def _move_deltas(run: _Run, reader: _Reader) -> None:
    get = reader.queue.get
    get_nowait = reader.queue.get_nowait
    dlog = run.dlog
    window = run.window
    last_flush = time.monotonic() - window.widest  # the first delta goes out at once
    while True:
        # while the listener hears cancels, a silent upstream costs no reads of the flag
        poll = run.cancels.poll_seconds()
        due = run.next_refresh if poll is None else min(run.next_refresh, last_flush + poll)
        try:
            kind, value = get(timeout=max(0.0, due - time.monotonic()))
        except queue.Empty:
            if time.monotonic() >= run.next_refresh:
                cancelled = run.refresh()
            else:
                cancelled = bool(dlog.client.exists(dlog.cancel_key))
            if cancelled:
                raise _Stop("cancelled", CANCELLED_ERROR) from None
            last_flush = max(last_flush, time.monotonic() - window.widest)
            continue
        if kind == "cancel":  # heard (or the listener's state changed): the flag says
            if dlog.client.exists(dlog.cancel_key):
                raise _Stop("cancelled", CANCELLED_ERROR)
            continue
        if kind != "d":
            _settle(kind, value)
            return
        buffer = [value]
        pending: tuple[str, Any] | None = None
        heard = False  # a cancel heard meanwhile: the append's answer (or a read) says
        ending = bool(value.get("finish_reason"))  # the end comes next: no reason to wait
        width = window.seconds(LOAD.running)
        if width > 0 and not ending and (wait := last_flush + width - time.monotonic()) > 0:
            reader.ended.wait(wait)  # coalesce what arrives meanwhile (the end cuts it short)
        while True:
            try:
                kind, value = get_nowait()
            except queue.Empty:
                break
            if kind == "d":
                buffer.append(value)
            elif kind == "cancel":
                heard = True
            else:
                pending = (kind, value)
                break
        choices, finishes = coalesce(buffer)
        run.finishes.update(finishes)
        if not choices:  # only finish reasons
            cancelled = heard and bool(dlog.client.exists(dlog.cancel_key))
        else:
            if run.first_token_at is None:
                run.first_token_at = utcnow()
            cancelled = dlog.append(choices)
            run.appended += 1
            run.generation.add_choices(choices)
        last_flush = time.monotonic()
        if cancelled:
            raise _Stop("cancelled", CANCELLED_ERROR)
        if last_flush >= run.next_refresh and run.refresh():
            raise _Stop("cancelled", CANCELLED_ERROR)
        if pending is not None:
            _settle(*pending)
            return


def _settle(kind: str, value: Any) -> None:
    """An end-of-stream queue item: return on success, raise the provider's error."""
    if kind == "err":
        raise value


def _usage(run: _Run, reader: _Reader) -> dict[str, int]:
    stream = reader.stream
    usage = getattr(stream, "usage", None) if stream is not None else None
    if not isinstance(usage, Usage):
        usage = Usage(estimate_tokens(run.request.messages), reader.deltas)
    return usage.as_dict()


def _finish(run: _Run, reader: _Reader) -> str:
    stream = reader.stream
    finish_reason = getattr(stream, "finish_reason", None) or run.finishes.get(0) or "stop"
    usage = _usage(run, reader)
    fields = done_fields(finish_reason, usage, run.finishes)
    run.generation.finish_reason, run.generation.finishes = finish_reason, run.finishes
    choices = run.generation.stored_choices()
    values = {"finish_reason": finish_reason, "usage": usage, "choices": choices}
    return _close(run, "succeeded", fields, **values)


def _end(run: _Run, reader: _Reader, status: str, error: dict[str, Any] | None) -> str:
    """End as failed or cancelled, keeping the partial output."""
    values = {"usage": _usage(run, reader), "error": error}
    return _close(run, status, error_fields(error or {}), **values)


def _close(run: _Run, status: str, fields: dict[str, str], **values: Any) -> str:
    """End the run: the log's terminal entry first, then the row.

    Relays end on the log, so it is written first; if the worker dies before the row is
    written, fail_lost_job moves the row to the log's end. If Redis refuses the entry
    (down), the row is still written and relays write the log's end from it.
    """
    values |= {"output": run.text, "first_token_at": run.first_token_at}
    fault = current_app.config.get("TEST_STREAM_FAULT")
    if fault == "exit_before_terminal":  # tests: the row committed, the log never ended
        _end_job(run.job_id, status, **values)
        os._exit(1)
    try:
        if not run.dlog.end(fields):
            return "superseded"  # the job is no longer ours: whoever took it ends it
    except redis.RedisError as exc:
        log.warning("job %s: terminal entry not written (%r); the row has it", run.job_id, exc)
    if fault == "exit_after_terminal":  # tests: the log ended, the row never did
        os._exit(1)
    if not _end_job(run.job_id, status, pipe=run.tail, **values):
        return "superseded"
    admission.settle_stream_tokens(run.job_id, run.request.provider, values["usage"], run.tail)
    _note(run.job_id, run.tail, status=status, tenant_id=run.tenant_id)
    return status
