"""The worker's side of the delta log: appends (batched per process) and terminal entries.

`DeltaLog.append()` is one round trip (the append script: XADD + PUBLISH of the notice +
EXISTS of the cancel flag); the terminal `done`/`error` entry sets the log's expiry.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

import redis

from app.redis_scripts import run_script, run_script_calls
from app.streams.entries import (
    APPEND_SCRIPT,
    LEASE_SCRIPT,
    TERMINAL_SCRIPT,
    ChoiceDelta,
    done_fields,
    encode_delta,
    error_fields,
)
from app.streams.keys import (
    cancel_channel,
    cancel_key,
    db_of,
    lease_key,
    log_key,
    notify_channel,
)

log = logging.getLogger(__name__)


class _Append:
    """One queued append and, once sent, its answer."""

    __slots__ = ("args", "done", "error", "keys", "result")

    def __init__(self, keys: list[str], args: list[Any]) -> None:
        self.keys = keys
        self.args = args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class AppendBatcher:
    """Sends the delta appends of every job running in a process through shared round trips.

    An append made while no round trip is in flight is sent at once by its own caller (no
    hand-off, no extra wake-up: the one-stream case). Appends made while one is in flight
    queue up; when it returns, the sender greenlet (started on first need) takes over and
    sends whatever waits in one pipelined round trip after another until nothing does,
    then goes idle, and callers send their own again. Per-job order is kept: a job waits
    for its append's answer before making the next.

    One round trip is in flight at a time, so they all go over one connection the batcher
    holds (taken from the client's pool once per process): EVALSHA written and read
    straight on it, as a pipeline does, without the client's per-command path (pool
    check-out and its readiness probe, command dispatch), which cost more CPU than the
    round trip itself. Connection errors are retried as the client retries them.
    """

    MAX_BATCH = 256

    def __init__(self, client: redis.Redis, script: str = APPEND_SCRIPT) -> None:
        self.client = client
        self.script = script
        self._pending: deque[_Append] = deque()
        self._lock = threading.Lock()
        self._busy = False  # a round trip is in flight, or the sender is draining
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._conn: Any = None
        self._conn_pid = 0

    def append(self, keys: list[str], args: list[Any]) -> Any:
        """Run the script (the append script) for one job; returns its answer (raises its error)."""
        item = _Append(keys, args)
        with self._lock:
            lead = not self._busy
            self._busy = True
            if not lead:
                self._pending.append(item)
        if lead:
            try:
                self._send([item])
            finally:
                self._hand_over()
        else:
            item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def _hand_over(self) -> None:
        """After a caller's own round trip: the sender drains what queued meanwhile."""
        with self._lock:
            if not self._pending:
                self._busy = False
                return
        self._ensure_sender()
        self._wake.set()

    def _ensure_sender(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="delta-log-appender"
                )
                self._thread.start()

    def _run(self) -> None:
        pending = self._pending
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if not pending:
                        self._busy = False
                        break
                    batch = [pending.popleft() for _ in range(min(len(pending), self.MAX_BATCH))]
                self._send(batch)

    def _send(self, batch: list[_Append]) -> None:
        try:
            answers = self._round_trip([(item.keys, item.args) for item in batch])
            for item, answer in zip(batch, answers, strict=True):
                if isinstance(answer, BaseException):
                    item.error = answer
                else:
                    item.result = answer
        except BaseException as exc:  # the round trip failed: every append in it did
            for item in batch:
                if item.result is None:
                    item.error = exc
        finally:
            for item in batch:
                item.done.set()

    def _round_trip(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """The script for each call, in one round trip on the batcher's connection."""
        return run_script_calls(self.client, self.script, calls, self._connection())

    def _connection(self) -> Any:
        """The batcher's own connection (a new one in a forked child)."""
        if self._conn is None or self._conn_pid != os.getpid():
            self._conn = self.client.connection_pool.get_connection()
            self._conn_pid = os.getpid()
        return self._conn


_batchers: dict[int, AppendBatcher] = {}


def append_batcher(client: redis.Redis) -> AppendBatcher:
    """The process's shared append sender for this Redis client."""
    batcher = _batchers.get(id(client))
    if batcher is None or batcher.client is not client:
        batcher = _batchers[id(client)] = AppendBatcher(client)
    return batcher


class LostLease(Exception):
    """The job is no longer this worker's: another holds it, or it was declared lost."""


class DeltaLog:
    """Append-only writer of one job's log, for the worker holding the job's lease.

    Every write is refused once the worker no longer holds the job (compare-and-set on its
    lease token, see entries.py): a worker declared lost cannot append after the error
    entry, renew or release another holder's lease.
    """

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        *,
        running_ttl: int,
        final_ttl: int,
        token: str = "",
        lease_seconds: float = 10.0,
        batcher: AppendBatcher | None = None,
    ):
        self.client = client
        self.batcher = batcher
        self.job_id = job_id
        self.key = log_key(job_id)
        self.cancel_key = cancel_key(job_id)
        self.lease_key = lease_key(job_id)
        self.token = token
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.running_ttl = max(1, int(running_ttl))
        self.final_ttl = max(1, int(final_ttl))
        self._expiry_set = False
        self.last_id = "0-0"

    def append(self, choices: list[ChoiceDelta]) -> bool:
        """Add one entry of coalesced choice deltas and notify relays (one round trip).

        Returns whether a cancel was requested; raises LostLease if the job is not ours.
        """
        expiry = 0 if self._expiry_set else self.running_ttl
        name, value = encode_delta(choices)
        keys = [self.key, self.cancel_key, self.lease_key]
        channel = notify_channel(self.job_id)
        args: list[Any] = [self.job_id, self.last_id, value, expiry, channel, name]
        args += [self.token, self.lease_ms]
        if self.batcher is not None:
            entry_id, cancelled = self.batcher.append(keys, args)
        else:
            entry_id, cancelled = run_script(self.client, APPEND_SCRIPT, len(keys), *keys, *args)
        if not entry_id:
            raise LostLease(self.job_id)
        self.last_id = entry_id
        self._expiry_set = True
        return bool(cancelled)

    def refresh(self, also: Callable[[Any], object] | None = None) -> bool:
        """Renew the lease and the running expiry; return whether a cancel was requested.

        `also(pipe)` queues more commands in the same round trip (the run's slot renewal);
        their failures are logged, not raised.
        """
        pipe = self.client.pipeline(transaction=False)
        # EVAL on the pipeline: a registered script there costs a SCRIPT EXISTS round trip
        run_script(pipe, LEASE_SCRIPT, 2, self.lease_key, self.key, self.token, self.lease_ms)
        pipe.exists(self.cancel_key)
        if self._expiry_set:
            pipe.expire(self.key, self.running_ttl)
        if also is not None:
            also(pipe)
        held, cancelled, *rest = pipe.execute(raise_on_error=False)
        for answer in (held, cancelled):
            if isinstance(answer, Exception):
                raise answer
        if not held:
            raise LostLease(self.job_id)
        for answer in rest:
            if isinstance(answer, Exception):
                log.warning("job %s: a renewal failed: %r", self.job_id, answer)
        return bool(cancelled)

    def end(self, fields: dict[str, str]) -> bool:
        """Add the terminal entry (once, and only while the job is ours); True if written."""
        return write_terminal(
            self.client, self.job_id, fields, self.final_ttl, self.token, self.lease_ms
        )

    def finish(
        self,
        finish_reason: str | None,
        usage: dict[str, Any] | None,
        finishes: Mapping[int, str] | None = None,
    ) -> bool:
        """The terminal `done` entry."""
        return self.end(done_fields(finish_reason, usage, finishes))

    def fail(self, error: dict[str, Any]) -> bool:
        """The terminal `error` entry, with an OpenAI-style error object."""
        return self.end(error_fields(error))


def write_terminal(
    client: redis.Redis,
    job_id: str,
    fields: dict[str, str],
    ttl: int,
    token: str = "",
    lease_ms: int = 1,
) -> bool:
    """Add a terminal entry unless the log has ended or another holds the job; True if added.

    It starts the log's expiry clock, wakes the relays and drops the cancel flag. An empty
    token (a repair, a cancel of a queued job) writes only while nobody holds the lease.
    """
    args: list[Any] = [job_id, notify_channel(job_id), max(1, int(ttl)), token, lease_ms]
    for name, value in fields.items():
        args += [name, value]
    keys = [log_key(job_id), cancel_key(job_id), lease_key(job_id)]
    return bool(run_script(client, TERMINAL_SCRIPT, len(keys), *keys, *args))


def release_lease(client: redis.Redis, job_id: str, token: str) -> bool:
    """Drop a job's lease if `token` still holds it; True if it did.

    `client` may be a pipeline (the answer is then the pipeline's).
    """
    result = run_script(client, LEASE_SCRIPT, 2, lease_key(job_id), log_key(job_id), token, 0)
    return not isinstance(client, redis.client.Pipeline) and bool(result)


def request_cancel(client: redis.Redis, job_id: str, ttl: int = 3600) -> None:
    """Raise the cancel flag the worker checks between deltas, and tell the stream workers
    (a run waiting on a silent upstream hears it at once: app/streams/cancels.py)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(cancel_key(job_id), "1", ex=ttl)
        pipe.publish(cancel_channel(db_of(client)), job_id)
        pipe.execute()


def read_all(client: redis.Redis, job_id: str) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a job's log (empty if it never existed or expired)."""
    found = client.xrange(log_key(job_id))
    return list(cast("list[tuple[str, dict[str, str]]]", found))  # decode_responses: str
