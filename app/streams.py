"""The delta log: a Redis Stream per job, appended by the worker and relayed to SSE by the web.

Worker side: `DeltaLog.append()` is one pipelined round trip (XADD + PUBLISH of a tiny
"job X has new entries" notice + EXISTS of the cancel flag); the terminal `done`/`error`
entry sets the log's expiry. Web side: one `StreamHub` per process holds ONE pub/sub
connection on NOTIFY_CHANNEL and wakes the relays waiting on a job; relays then read
their new entries with a non-blocking XREAD over a small bounded pool. No relay opens a
connection of its own and none polls: 10,000 idle relays cost two or three connections.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "sluice:stream-notify"
TERMINAL_KINDS = ("done", "error")


def log_key(job_id: str) -> str:
    return f"sluice:stream:{job_id}"


def lease_key(job_id: str) -> str:
    return f"sluice:lease:job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"sluice:cancel:{job_id}"


Entry = tuple[str, dict[str, str]]


# ------------------------------------------------------------------------------ worker side


# KEYS: log, cancel flag. ARGV: job id, previous entry id, text, expiry (0: leave), channel.
# Adds the delta, publishes "job\nprev\nid\ntext" (so relays that hold `prev` need no read),
# and answers {new id, cancel requested}.
_APPEND = """
local id = redis.call('XADD', KEYS[1], '*', 't', 'delta', 'd', ARGV[3])
if ARGV[4] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
redis.call('PUBLISH', ARGV[5], ARGV[1] .. '\\n' .. ARGV[2] .. '\\n' .. id .. '\\n' .. ARGV[3])
return {id, redis.call('EXISTS', KEYS[2])}
"""


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
    """Sends the delta appends of every job running in a process through shared pipelines.

    One sender thread (a greenlet under gevent) takes whatever appends are waiting and sends
    them in one pipelined round trip; appends made while that trip is in flight go in the
    next. An append made while the sender is idle goes out at once, so nothing is delayed;
    under load many jobs' appends share one write and one read (per-job order is kept: a
    job waits for its append's answer before making the next).
    """

    MAX_BATCH = 256

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._script = client.register_script(_APPEND)
        self._pending: deque[_Append] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def append(self, keys: list[str], args: list[Any]) -> Any:
        """Run the append script for one job; returns its answer (raises its error)."""
        item = _Append(keys, args)
        self._pending.append(item)
        self._ensure_sender()
        self._wake.set()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

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
            while pending:
                batch = [pending.popleft() for _ in range(min(len(pending), self.MAX_BATCH))]
                self._send(batch)

    def _send(self, batch: list[_Append]) -> None:
        try:
            if len(batch) == 1:
                item = batch[0]
                item.result = self._script(keys=item.keys, args=item.args)
            else:
                pipe = self.client.pipeline(transaction=False)
                for item in batch:
                    self._script(keys=item.keys, args=item.args, client=pipe)
                for item, answer in zip(batch, pipe.execute(raise_on_error=False), strict=True):
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


_batchers: dict[int, AppendBatcher] = {}


def append_batcher(client: redis.Redis) -> AppendBatcher:
    """The process's shared append sender for this Redis client."""
    batcher = _batchers.get(id(client))
    if batcher is None or batcher.client is not client:
        batcher = _batchers[id(client)] = AppendBatcher(client)
    return batcher


class DeltaLog:
    """Append-only writer of one job's log (the worker is its only writer while running)."""

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        *,
        running_ttl: int,
        final_ttl: int,
        batcher: AppendBatcher | None = None,
    ):
        self.client = client
        self.batcher = batcher
        self.job_id = job_id
        self.key = log_key(job_id)
        self.cancel_key = cancel_key(job_id)
        self.running_ttl = max(1, int(running_ttl))
        self.final_ttl = max(1, int(final_ttl))
        self._expiry_set = False
        self._script = client.register_script(_APPEND)
        self.last_id = "0-0"
        self.entries = 0

    def append(self, text: str) -> bool:
        """Add one delta entry and notify relays (one round trip); return whether cancelled."""
        expiry = 0 if self._expiry_set else self.running_ttl
        keys = [self.key, self.cancel_key]
        args = [self.job_id, self.last_id, text, expiry, NOTIFY_CHANNEL]
        if self.batcher is not None:
            entry_id, cancelled = self.batcher.append(keys, args)
        else:
            entry_id, cancelled = self._script(keys=keys, args=args)
        self.last_id = entry_id
        self._expiry_set = True
        self.entries += 1
        return bool(cancelled)

    def refresh(self, lease: str, lease_seconds: float) -> bool:
        """Renew the lease and the running expiry; return whether a cancel was requested."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(lease_key(self.job_id), lease, px=max(1, int(lease_seconds * 1000)))
        if self._expiry_set:
            pipe.expire(self.key, self.running_ttl)
        pipe.exists(self.cancel_key)
        return bool(pipe.execute()[-1])

    def finish(self, finish_reason: str | None, usage: dict[str, Any] | None) -> None:
        """The terminal `done` entry."""
        fields = {"t": "done", "finish_reason": finish_reason or "stop"}
        fields["usage"] = json.dumps(usage or {})
        write_terminal(self.client, self.job_id, fields, self.final_ttl)

    def fail(self, error: dict[str, Any]) -> None:
        """The terminal `error` entry, with an OpenAI-style error object."""
        write_terminal(
            self.client, self.job_id, {"t": "error", "error": json.dumps(error)}, self.final_ttl
        )


def write_terminal(client: redis.Redis, job_id: str, fields: dict[str, str], ttl: int) -> None:
    """Add a terminal entry, start the log's expiry clock, notify, drop lease and cancel flag."""
    pipe = client.pipeline(transaction=False)
    pipe.xadd(log_key(job_id), fields)
    pipe.expire(log_key(job_id), max(1, int(ttl)))
    pipe.publish(NOTIFY_CHANNEL, job_id)
    pipe.delete(cancel_key(job_id))
    pipe.execute()


def error_entry(error: dict[str, Any]) -> dict[str, str]:
    return {"t": "error", "error": json.dumps(error)}


def request_cancel(client: redis.Redis, job_id: str, ttl: int = 3600) -> None:
    """Raise the cancel flag the worker checks between deltas, and wake it."""
    client.set(cancel_key(job_id), "1", ex=ttl)


def read_entries(
    client: redis.Redis, job_id: str, after: str = "0-0", count: int = 1000
) -> list[Entry]:
    """Entries strictly after `after` (at most `count`)."""
    found = client.xread({log_key(job_id): after}, count=count)
    return list(found[0][1]) if found else []


def read_all(client: redis.Redis, job_id: str) -> list[Entry]:
    """Every entry of a job's log (empty if it never existed or expired)."""
    return list(client.xrange(log_key(job_id)))


def text_of(entries: list[Entry]) -> str:
    return "".join(f.get("d", "") for _, f in entries if f.get("t") == "delta")


def is_terminal(fields: dict[str, str]) -> bool:
    return fields.get("t") in TERMINAL_KINDS


# ------------------------------------------------------------------------------- web side


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Subscription:
    """One relay's place in one job's log, fed directly by the hub when it can be."""

    __slots__ = ("event", "job_id", "last", "pending")

    def __init__(self, job_id: str, last: str) -> None:
        self.job_id = job_id
        self.last = last  # the newest entry this relay has or will have
        self.pending: deque[Entry] = deque()
        self.event = threading.Event()


class StreamHub:
    """Per-process fan-in of worker notices: one pub/sub connection, one listener thread.

    A delta notice carries the entry and the id of the entry before it; a relay whose last
    entry is that one gets the new entry handed over with no Redis read at all. Any other
    relay (behind, or after a reconnect of the hub) is only woken and reads with XREAD.
    """

    def __init__(self, url: str, pool_size: int = 32) -> None:
        self.url = url
        self.pid = os.getpid()
        pool = redis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=pool_size, timeout=30
        )
        self.client = redis.Redis(connection_pool=pool)
        self._subs: dict[str, set[Subscription]] = {}
        self._lock = threading.Lock()
        self._started = False
        self.connected = threading.Event()

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._listen_forever, daemon=True, name="stream-hub").start()
        self.connected.wait(5)

    def _listen_forever(self) -> None:
        backoff = 0.05
        while True:
            conn = redis.Redis.from_url(self.url, decode_responses=True)
            pubsub = conn.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(NOTIFY_CHANNEL)
                self.connected.set()
                self._wake_all()  # anything published while we were away
                backoff = 0.05
                for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._dispatch(message["data"])
            except Exception as exc:
                log.warning("stream hub lost its pub/sub connection: %r", exc)
            finally:
                self.connected.clear()
                try:
                    pubsub.close()
                    conn.close()
                except Exception:
                    pass
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _dispatch(self, data: str) -> None:
        job_id, sep, rest = data.partition("\n")
        subs = self._subs.get(job_id)
        if not subs:
            return
        if not sep:  # a bare notice: everyone reads
            for sub in tuple(subs):
                sub.event.set()
            return
        prev, _, rest = rest.partition("\n")
        entry_id, _, text = rest.partition("\n")
        entry = (entry_id, {"t": "delta", "d": text})
        for sub in tuple(subs):
            if sub.last == prev:
                sub.pending.append(entry)
                sub.last = entry_id
            sub.event.set()

    def _wake_all(self) -> None:
        with self._lock:
            subs = [sub for group in self._subs.values() for sub in group]
        for sub in subs:
            sub.event.set()

    def subscribe(self, job_id: str, last: str) -> Subscription:
        """Register BEFORE reading the log, so no notice can fall between read and wait."""
        if not self._started:
            self._start()
        sub = Subscription(job_id, last)
        with self._lock:
            self._subs.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            group = self._subs.get(sub.job_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._subs[sub.job_id]

    @property
    def subscribers(self) -> int:
        return sum(len(group) for group in self._subs.values())


_hubs: dict[str, StreamHub] = {}
_hubs_lock = threading.Lock()


def hub_for(url: str, pool_size: int = 32) -> StreamHub:
    """This process's hub for a Redis URL (a forked child gets its own)."""
    hub = _hubs.get(url)
    if hub is None or hub.pid != os.getpid():
        with _hubs_lock:
            hub = _hubs.get(url)
            if hub is None or hub.pid != os.getpid():
                hub = _hubs[url] = StreamHub(url, pool_size)
    return hub


@dataclass
class Tail:
    """What a relay needs to follow one job's log."""

    hub: StreamHub
    job_id: str
    after: str = "0-0"
    lease_seconds: float = 10.0
    ping_seconds: float = 15.0
    running: bool = False  # the job was (or has been seen) running
    check_lost: Callable[[str], bool] | None = None  # fail a job whose worker is gone

    def follow(self) -> Iterator[Entry | None]:
        """Yield entries up to and including the terminal one; None means "send a ping"."""
        client = self.hub.client
        key = log_key(self.job_id)
        sub = self.hub.subscribe(self.job_id, self.after)
        event, pending = sub.event, sub.pending
        after = entry_key(self.after)
        wake_every = max(0.05, min(self.ping_seconds, self.lease_seconds / 2))
        last_ping = time.monotonic()
        last_db_check = time.monotonic()
        check_lease = False
        need_read = True
        try:
            while True:
                event.clear()
                leased = None
                if pending:
                    entries: list[Entry] = list(pending)
                    pending.clear()
                elif need_read or check_lease:
                    if check_lease:
                        pipe = client.pipeline(transaction=False)
                        pipe.xread({key: self.after}, count=1000)
                        pipe.exists(lease_key(self.job_id))
                        found, leased = pipe.execute()
                    else:
                        found = client.xread({key: self.after}, count=1000)
                    entries = found[0][1] if found else []
                    need_read = len(entries) >= 1000
                else:
                    entries = []
                check_lease = False
                for entry_id, fields in entries:
                    ident = entry_key(entry_id)
                    if ident <= after:
                        continue  # handed over and also read: already sent
                    after = ident
                    self.after = entry_id
                    if entry_key(sub.last) < ident:
                        sub.last = entry_id
                    self.running = True
                    yield entry_id, fields
                    if is_terminal(fields):
                        return
                if entries:
                    last_ping = time.monotonic()
                    continue
                if leased == 0:
                    now = time.monotonic()
                    due = self.running or now - last_db_check > 5 * self.lease_seconds
                    if due and self.check_lost is not None:
                        last_db_check = now
                        if self.check_lost(self.job_id):
                            need_read = True
                            continue  # its terminal entry is in the log now
                elif leased:
                    self.running = True
                if event.wait(wake_every):
                    need_read = not pending  # a bare notice, or a notice for a later entry
                    continue
                check_lease = True
                now = time.monotonic()
                if now - last_ping >= self.ping_seconds:
                    last_ping = now
                    yield None
        finally:
            self.hub.unsubscribe(sub)


# ----------------------------------------------------------------------- SSE rendering


class ChunkRenderer:
    """Log entries -> OpenAI `chat.completion.chunk` SSE frames, for one job."""

    def __init__(self, job_id: str, model: str, created: int, include_usage: bool) -> None:
        self.include_usage = include_usage
        head = {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk"}
        head |= {"created": created, "model": model, "system_fingerprint": None}
        base = json.dumps(head)[:-1]
        tail = ',"usage":null}' if include_usage else "}"
        self._base = base
        self._tail = tail
        self._delta_pre = base + ',"choices":[{"index":0,"delta":{"content":'
        self._role_pre = base + ',"choices":[{"index":0,"delta":{"role":"assistant","content":'
        self._delta_post = '},"logprobs":null,"finish_reason":null}]' + tail
        self.started = False

    def _choice(self, delta: str, finish: str | None) -> str:
        finish_json = json.dumps(finish)
        return (
            f'{self._base},"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
            f'"finish_reason":{finish_json}}}]{self._tail}'
        )

    def render(self, entry_id: str, fields: dict[str, str]) -> str:
        """The SSE text for one entry; a terminal entry also carries `data: [DONE]`."""
        kind = fields.get("t")
        if kind == "delta":
            pre = self._delta_pre if self.started else self._role_pre
            self.started = True
            text = json.dumps(fields.get("d", ""))  # ASCII: no U+2028 for splitlines()
            return f"id: {entry_id}\ndata: {pre}{text}{self._delta_post}\n\n"
        frames: list[str] = []
        if kind == "done":
            if not self.started:
                frames.append(self._choice('{"role":"assistant","content":""}', None))
                self.started = True
            frames.append(self._choice("{}", fields.get("finish_reason") or "stop"))
            if self.include_usage:
                usage = fields.get("usage") or "{}"
                frames.append(f'{self._base},"choices":[],"usage":{usage}}}')
        else:
            error = fields.get("error") or "{}"
            frames.append(f'{{"error":{error}}}')
        out = "".join(f"data: {frame}\n\n" for frame in frames)
        ident = f"id: {entry_id}\n" if entry_id else ""
        return f"{out}{ident}data: [DONE]\n\n"


def sse_stream(
    tail: Tail, renderer: ChunkRenderer, retry_ms: int, on_close: Callable[[bool], None]
) -> Iterator[str]:
    """The SSE body: `retry:`, one event per entry, `: ping` lines while idle, then [DONE].

    on_close(finished) runs when the body ends or the client goes away.
    """
    finished = False
    try:
        # No blank line after `retry:` or a ping: a blank line would dispatch an event
        # without data, which the openai SDK tries (and fails) to parse as JSON.
        yield f"retry: {retry_ms}\n"
        for item in tail.follow():
            if item is None:
                yield ": ping\n"
                continue
            entry_id, fields = item
            text = renderer.render(entry_id, fields)
            if is_terminal(fields):
                finished = True
            yield text
    finally:
        on_close(finished)


@dataclass
class Outcome:
    """A finished job as read from its log (for stream:false)."""

    text: str
    finish_reason: str | None
    usage: dict[str, Any] | None
    error: dict[str, Any] | None


def collect(tail: Tail) -> Outcome:
    """Wait for the terminal entry and return the whole generation."""
    parts: list[str] = []
    for item in tail.follow():
        if item is None:
            continue
        _, fields = item
        kind = fields.get("t")
        if kind == "delta":
            parts.append(fields.get("d", ""))
        elif kind == "done":
            usage = json.loads(fields.get("usage") or "{}") or None
            return Outcome("".join(parts), fields.get("finish_reason"), usage, None)
        else:
            return Outcome("".join(parts), None, None, json.loads(fields.get("error") or "{}"))
    return Outcome("".join(parts), None, None, {"message": "stream ended", "type": "server_error"})
