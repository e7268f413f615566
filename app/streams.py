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


class DeltaLog:
    """Append-only writer of one job's log (the worker is its only writer while running)."""

    def __init__(self, client: redis.Redis, job_id: str, *, running_ttl: int, final_ttl: int):
        self.client = client
        self.job_id = job_id
        self.key = log_key(job_id)
        self.cancel_key = cancel_key(job_id)
        self.running_ttl = max(1, int(running_ttl))
        self.final_ttl = max(1, int(final_ttl))
        self._expiry_set = False
        self.entries = 0

    def append(self, text: str) -> bool:
        """Add one delta entry and notify relays; return whether a cancel was requested."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.key, {"t": "delta", "d": text})
        if not self._expiry_set:
            pipe.expire(self.key, self.running_ttl)
        pipe.publish(NOTIFY_CHANNEL, self.job_id)
        pipe.exists(self.cancel_key)
        result = pipe.execute()
        self._expiry_set = True
        self.entries += 1
        return bool(result[-1])

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


class StreamHub:
    """Per-process fan-in of worker notices: one pub/sub connection, one listener thread."""

    def __init__(self, url: str, pool_size: int = 32) -> None:
        self.url = url
        self.pid = os.getpid()
        pool = redis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=pool_size, timeout=30
        )
        self.client = redis.Redis(connection_pool=pool)
        self._waiters: dict[str, set[threading.Event]] = {}
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
                        self._wake(message["data"])
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

    def _wake(self, job_id: str) -> None:
        waiters = self._waiters.get(job_id)
        if waiters:
            for event in tuple(waiters):
                event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = [e for waiters in self._waiters.values() for e in waiters]
        for event in events:
            event.set()

    def subscribe(self, job_id: str) -> threading.Event:
        """An event set whenever the job's log may have grown (register BEFORE reading)."""
        if not self._started:
            self._start()
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(event)
        return event

    def unsubscribe(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    @property
    def subscribers(self) -> int:
        return sum(len(w) for w in self._waiters.values())


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
        event = self.hub.subscribe(self.job_id)
        wake_every = max(0.05, min(self.ping_seconds, self.lease_seconds / 2))
        last_ping = time.monotonic()
        last_db_check = time.monotonic()
        try:
            check_lease = False
            while True:
                event.clear()
                if check_lease:
                    pipe = client.pipeline(transaction=False)
                    pipe.xread({key: self.after}, count=1000)
                    pipe.exists(lease_key(self.job_id))
                    found, leased = pipe.execute()
                else:
                    found, leased = client.xread({key: self.after}, count=1000), None
                check_lease = False
                entries = found[0][1] if found else []
                for entry_id, fields in entries:
                    self.after = entry_id
                    self.running = True
                    yield entry_id, fields
                    if is_terminal(fields):
                        return
                if len(entries) >= 1000:
                    continue
                if entries:
                    last_ping = time.monotonic()
                    continue
                if leased is False or leased == 0:
                    now = time.monotonic()
                    due = self.running or now - last_db_check > 5 * self.lease_seconds
                    if due and self.check_lost is not None:
                        last_db_check = now
                        if self.check_lost(self.job_id):
                            continue  # its terminal entry is in the log now
                elif leased:
                    self.running = True
                if event.wait(wake_every):
                    continue
                check_lease = True
                now = time.monotonic()
                if now - last_ping >= self.ping_seconds:
                    last_ping = now
                    yield None
        finally:
            self.hub.unsubscribe(self.job_id, event)


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
