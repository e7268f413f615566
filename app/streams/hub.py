"""The web's side: one pub/sub connection per process (the hub) and the relays' tails.

One `StreamHub` per process holds ONE pub/sub connection and wakes the relays waiting on a
job; relays then read their new entries with a non-blocking XREAD over a small bounded
pool. No relay opens a connection of its own and none polls: 10,000 idle relays cost two or
three connections. Each job has its own notice channel, which the hub subscribes to while it
relays the job, so a delta wakes only the processes that relay it. The same connection
carries the broadcast channel of job and batch changes, fanned out to the dashboard's live
feed and batch-progress streams, subscribed only while such a feed is open here (so a
process without one is not woken by every job's changes).

The listener's connection is a `Wire` (app/streams/wire.py): replies read straight off
its socket, without redis-py's pub/sub layers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis
from flask import current_app

from app.extensions import redis_client
from app.streams.entries import Entry, entry_key, error_fields, is_terminal, parse_notice
from app.streams.keys import (
    NOTIFY_PREFIX,
    broadcast_channel,
    db_of,
    keys_channel,
    lease_key,
    log_key,
    notify_channel,
)
from app.streams.wire import Wire

log = logging.getLogger(__name__)

LEASE_SHARE_SECONDS = 1.0  # how old a lease check the relays of one job may share
ARM_SECONDS = 5.0  # the longest a relay waits for the hub to hear its job's channel
STALE_MAX = 64  # channels of ended relays kept until the next SUBSCRIBE carries their UNSUBSCRIBE


class Subscription:
    """One relay's place in one job's log, fed by the hub.

    The hub either hands a new entry over (`pending`, when the relay holds the entry
    before it) or counts a notice the relay must read the log for (`notices`); then it
    sets `event`. The relay clears `event` BEFORE it looks at both, so a notice that comes
    while it looks or while it writes a frame is never lost: it is either seen by that
    look or sets the event again for the next wait. Only the hub writes `notices`.
    `armed` is set once the hub hears the job's channel: from then on no notice is missed.
    """

    __slots__ = ("armed", "event", "job_id", "last", "notices", "pending")

    def __init__(self, job_id: str, last: str) -> None:
        self.job_id = job_id
        self.last = last  # the newest entry this relay has or will have
        self.pending: deque[Entry] = deque()
        self.notices = 0
        self.event = threading.Event()
        self.armed = threading.Event()

    def handed(self) -> list[Entry]:
        """The entries handed over since the last call."""
        pending = self.pending
        out: list[Entry] = []
        while pending:
            out.append(pending.popleft())
        return out

    def notify(self) -> None:
        """(Hub) say "read the log"."""
        self.notices += 1
        self.event.set()


class Feed:
    """One listener of the broadcast channel: the messages heard since it last looked."""

    __slots__ = ("event", "messages")

    def __init__(self) -> None:
        self.messages: deque[str] = deque(maxlen=10_000)
        self.event = threading.Event()

    def wait(self, timeout: float) -> list[str]:
        """The messages heard so far, waiting up to `timeout` for the first one."""
        self.event.clear()
        if not self.messages:
            self.event.wait(timeout)
        out: list[str] = []
        while self.messages:
            out.append(self.messages.popleft())
        return out


def _gevent_defer() -> Callable[[Callable[[], None]], None] | None:
    """Run a function in a new greenlet once the caller yields, when threads are gevent's
    (None otherwise: the hub then writes at once)."""
    try:
        from gevent import monkey, spawn_raw
    except ImportError:  # pragma: no cover (gevent is a dependency)
        return None
    if not monkey.is_module_patched("threading"):
        return None
    # a greenlet of its own: the write may block, the loop's callbacks may not
    return cast(Callable[[Callable[[], None]], None], spawn_raw)


class StreamHub:
    """Per-process fan-in of worker notices: one pub/sub connection, one listener thread.

    A notice carries the entry (a delta or the terminal one) and the id of the entry before
    it; a relay whose last entry is that one gets the new entry handed over with no Redis
    read at all. Any other relay (behind, or after a reconnect of the hub) is only woken and
    reads with XREAD.

    The hub hears a job's channel from its first relay's subscribe to its last one's
    unsubscribe. SUBSCRIBE and UNSUBSCRIBE are sent from the relay's side on the listener's
    connection; their confirmations come back in order, and each confirmation arms the
    relays that registered before it was asked for (`_arming`: per job, one batch of
    subscriptions per SUBSCRIBE in flight). The UNSUBSCRIBE of a job whose last relay ended
    waits (`_stale`) to go out with the next SUBSCRIBE, one write and one wake-up for both;
    a relay of a stale job that comes meanwhile is armed at once (its channel is still heard).
    Under gevent the SUBSCRIBEs asked for until the asking greenlet yields go out as one
    command (`_asked`, written by `_flush` in a greenlet of its own).
    """

    def __init__(
        self,
        url: str,
        pool_size: int = 32,
        socket_timeout: float = 10.0,
        defer: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.url = url
        self.pid = os.getpid()
        self.client = redis_client(
            url,
            max_connections=pool_size,
            pool_timeout=30,
            socket_timeout=socket_timeout,
            connect_timeout=5,
        )
        self.broadcast_channel = broadcast_channel(db_of(self.client))
        self.keys_channel = keys_channel(db_of(self.client))
        self._subs: dict[str, set[Subscription]] = {}
        self._arming: dict[str, deque[list[Subscription]]] = {}
        self._stale: set[str] = set()  # jobs still heard whose UNSUBSCRIBE waits
        self._asked: list[str] = []  # job channels whose SUBSCRIBE waits for the flush
        self._flush_due = False
        self._defer = defer if defer is not None else _gevent_defer()
        self._wire: Wire | None = None  # the listener's connection, for (un)subscribes
        self.heard = 0  # job notices heard (all of them for jobs this process relays)
        self._feeds: set[Feed] = set()
        self._broadcast_asked = 0  # SUBSCRIBEs of the broadcast channel sent on this wire
        self._broadcast_confirmed = 0  # ... and confirmed: heard once both match
        self._broadcast_heard = threading.Event()
        self._revocations: list[Callable[[str | None], None]] = []
        self._leases: dict[str, tuple[float, bool]] = {}  # job -> (when seen, leased)
        self._lock = threading.Lock()
        self._started = False
        self._closed = threading.Event()
        self.connected = threading.Event()

    def _start(self, *, wait: bool = True) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            threading.Thread(target=self._listen_forever, daemon=True, name="stream-hub").start()
        if wait:
            self.connected.wait(5)

    def _listen_forever(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            wire: Wire | None = None
            try:
                wire = Wire(self.url)  # connects, unlocked
                wire.settimeout(5.0)
                with self._lock:  # the jobs relayed now; later ones subscribe on this wire
                    self._stale.clear()
                    self._asked = []
                    self._arming = {job: deque([list(g)]) for job, g in self._subs.items()}
                    channels = [self.keys_channel, *(notify_channel(job) for job in self._subs)]
                    self._broadcast_asked = self._broadcast_confirmed = 0
                    if self._feeds:
                        channels.append(self.broadcast_channel)
                        self._broadcast_asked = 1
                    wire.send(("SUBSCRIBE", *channels))
                    self._wire = wire
                unconfirmed = len(channels)
                while unconfirmed > 0:  # from here on, nothing published is missed
                    for reply in wire.replies():
                        unconfirmed -= self._handle(reply)
                wire.settimeout(None)
                self._revoked(None)  # anything revoked while we were away
                self.connected.set()
                self._wake_all()  # anything published while we were away
                backoff = 0.05
                while True:
                    for reply in wire.replies():
                        self._handle(reply)
            except Exception as exc:
                log.warning("stream hub lost its pub/sub connection: %r", exc)
            finally:
                with self._lock:
                    self._wire = None
                    self._broadcast_heard.clear()
                self.connected.clear()
                self._revoked(None)
                if wire is not None:
                    wire.close()
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _handle(self, reply: Any) -> int:
        """Act on one reply of the listener's connection; 1 if it confirmed a SUBSCRIBE."""
        if isinstance(reply, Exception):  # an error reply: start again on a new connection
            raise reply
        kind = reply[0]
        if kind == "message":
            channel, data = reply[1], reply[2]
            if channel.startswith(NOTIFY_PREFIX):
                self._dispatch(data)
            elif channel == self.broadcast_channel:
                self._broadcast(data)
            elif channel == self.keys_channel:
                self._revoked(data)
            return 0
        if kind == "subscribe":
            self._confirmed(reply[1])
            return 1
        return 0  # unsubscribe confirmations

    def close(self) -> None:
        """Stop reconnecting (for a hub made outside `hub_for`, as in tests)."""
        self._closed.set()

    def _confirmed(self, channel: str) -> None:
        """Arm the relays (or feeds) a SUBSCRIBE confirmation covers."""
        if channel.startswith(NOTIFY_PREFIX):
            job_id = channel[len(NOTIFY_PREFIX) :]
            with self._lock:
                batches = self._arming.get(job_id)
                batch = batches.popleft() if batches else []
                if batches is not None and not batches:
                    del self._arming[job_id]
            for sub in batch:
                sub.armed.set()
        elif channel == self.broadcast_channel:
            with self._lock:
                self._broadcast_confirmed += 1
                if self._broadcast_confirmed == self._broadcast_asked and self._feeds:
                    self._broadcast_heard.set()

    def _send(self, *commands: tuple[str, ...]) -> bool:
        """(Under the lock) write commands on the listener's connection; False without one
        (the next connection then subscribes whatever is relayed or fed)."""
        wire = self._wire
        if wire is None:
            return False
        try:  # a write beside the listener's read
            wire.send(*commands)
        except Exception as exc:  # the listener sees the connection fail and reconnects
            log.warning("stream hub could not send %s: %r", commands[0][0], exc)
            return False
        return True

    def _subscribe_job(self, job_id: str) -> None:
        """(Under the lock) SUBSCRIBE a job's channel, with the UNSUBSCRIBE of stale ones:
        under gevent, once the caller yields, in one command with the other SUBSCRIBEs
        asked for meanwhile (the relays of requests that came together: one write)."""
        self._asked.append(notify_channel(job_id))
        self._flush_soon()

    def _flush_soon(self) -> None:
        """(Under the lock) write what waits now, or (under gevent) once the caller yields."""
        if self._defer is None:
            self._write_asked()
        elif not self._flush_due:
            self._flush_due = True
            self._defer(self._flush)

    def _flush(self) -> None:
        with self._lock:
            self._flush_due = False
            self._write_asked()

    def _write_asked(self) -> None:
        """(Under the lock) SUBSCRIBE the asked channels, then UNSUBSCRIBE the stale ones
        (after: a job whose relays all ended before its SUBSCRIBE went out is stale too)."""
        commands: list[tuple[str, ...]] = []
        if self._asked:
            commands.append(("SUBSCRIBE", *self._asked))
            self._asked = []
        if self._stale and (commands or len(self._stale) >= STALE_MAX):
            commands.append(("UNSUBSCRIBE", *(notify_channel(j) for j in self._stale)))
            self._stale.clear()
        if commands:
            self._send(*commands)

    def _dispatch(self, data: str) -> None:
        self.heard += 1
        job_id, prev, entry = parse_notice(data)
        subs = self._subs.get(job_id)
        if not subs:
            return
        for sub in tuple(subs):
            if entry is not None and sub.last == prev:
                sub.pending.append(entry)
                sub.last = entry[0]
                sub.event.set()
            else:  # a bare notice, or a relay that is behind: it reads
                sub.notify()

    def _revoked(self, data: str | None) -> None:
        """Tell the listeners; then acknowledge on the message's ack list (see revoke_key)."""
        key_hash, _, ack = data.partition(" ") if data is not None else (None, "", "")
        for listener in tuple(self._revocations):
            try:
                listener(key_hash)
            except Exception:
                log.exception("a key revocation listener failed")
        if ack:
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    pipe.rpush(ack, self.pid)
                    pipe.expire(ack, 60)
                    pipe.execute()
            except Exception as exc:
                log.warning("key revocation not acknowledged: %r", exc)

    def on_revocation(self, listener: Callable[[str | None], None]) -> None:
        """Call listener(key hash) for each key revocation heard, and listener(None) when
        revocations may have been missed (the connection was lost); starts the hub without
        waiting for it. While `connected` is not set, nothing is heard."""
        with self._lock:
            if listener not in self._revocations:
                self._revocations.append(listener)
        if not self._started:
            self._start(wait=False)

    def _broadcast(self, data: str) -> None:
        for feed in tuple(self._feeds):
            feed.messages.append(data)
            feed.event.set()

    def _wake_all(self) -> None:
        with self._lock:
            subs = [sub for group in self._subs.values() for sub in group]
        for sub in subs:
            sub.notify()

    def subscribe(self, job_id: str, last: str) -> Subscription:
        """Register BEFORE reading the log, so no notice can fall between read and wait.

        The read must also wait for `sub.armed`, unless it was set before the job's task
        was sent (then no read is needed): see `Tail.sending`.
        """
        if not self._started:
            self._start()
        sub = Subscription(job_id, last)
        with self._lock:
            group = self._subs.get(job_id)
            if group is None:  # the first relay of the job here: hear its channel
                group = self._subs[job_id] = set()
                if job_id in self._stale:  # still heard: its UNSUBSCRIBE was never sent
                    self._stale.discard(job_id)
                    if batches := self._arming.get(job_id):
                        batches[-1].append(sub)
                    else:
                        sub.armed.set()
                else:
                    self._arming.setdefault(job_id, deque()).append([sub])
                    self._subscribe_job(job_id)
            elif batches := self._arming.get(job_id):
                batches[-1].append(sub)  # its SUBSCRIBE is in flight
            else:
                sub.armed.set()
            group.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            group = self._subs.get(sub.job_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._subs[sub.job_id]
                    self._leases.pop(sub.job_id, None)
                    self._stale.add(sub.job_id)  # unsubscribed with the next SUBSCRIBE
                    if len(self._stale) >= STALE_MAX:
                        self._flush_soon()  # (after any SUBSCRIBE still waiting)

    def leased(self, job_id: str) -> bool:
        """Whether a worker holds the job's lease, as seen at most LEASE_SHARE_SECONDS ago.

        Every relay of the job in this process shares the one answer, so 10,000 idle relays
        on a few jobs cost a few EXISTS a second, not thousands (which ran the bounded read
        pool dry). Raises redis.RedisError as the read would.
        """
        now = time.monotonic()
        seen = self._leases.get(job_id)
        if seen is not None and now - seen[0] < LEASE_SHARE_SECONDS:
            return seen[1]
        if seen is not None:
            self._leases[job_id] = (now, seen[1])  # the others use it while this one asks
        try:
            alive = bool(self.client.exists(lease_key(job_id)))
        except redis.RedisError:
            self._leases.pop(job_id, None)
            raise
        if job_id in self._subs:
            self._leases[job_id] = (time.monotonic(), alive)
        return alive

    def feed(self) -> Feed:
        """Start hearing the broadcast channel (end with `unfeed`).

        The first feed of the process subscribes the channel; this returns once it is heard
        (or after ARM_SECONDS without a connection), so a read made after it misses nothing.
        """
        if not self._started:
            self._start()
        feed = Feed()
        with self._lock:
            first = not self._feeds
            self._feeds.add(feed)
            if first and self._send(("SUBSCRIBE", self.broadcast_channel)):
                self._broadcast_asked += 1
        self._broadcast_heard.wait(ARM_SECONDS)
        return feed

    def unfeed(self, feed: Feed) -> None:
        with self._lock:
            if feed not in self._feeds:
                return
            self._feeds.discard(feed)
            if not self._feeds:  # the last one: stop hearing every job's changes
                self._broadcast_heard.clear()
                self._send(("UNSUBSCRIBE", self.broadcast_channel))


_hubs: dict[str, StreamHub] = {}
_hubs_lock = threading.Lock()


def hub_for(url: str, pool_size: int = 32, socket_timeout: float = 10.0) -> StreamHub:
    """This process's hub for a Redis URL (a forked child gets its own)."""
    hub = _hubs.get(url)
    if hub is None or hub.pid != os.getpid():
        with _hubs_lock:
            hub = _hubs.get(url)
            if hub is None or hub.pid != os.getpid():
                hub = _hubs[url] = StreamHub(url, pool_size, socket_timeout)
    return hub


def current_hub() -> StreamHub:
    """The hub of this process for the current app's Redis (a bounded read pool)."""
    config = current_app.config
    pool_size = config["STREAM_RELAY_REDIS_CONNECTIONS"]
    return hub_for(config["REDIS_URL"], pool_size, config["REDIS_SOCKET_TIMEOUT"])


@dataclass
class Tail:
    """What a relay needs to follow one job's log."""

    hub: StreamHub
    job_id: str
    after: str = "0-0"
    lease_seconds: float = 10.0
    ping_seconds: float = 15.0
    running: bool = False  # the job was (or has been seen) running
    check_lost: Callable[[str], bool] | None = None  # settle a job whose worker is gone
    outage_seconds: float = 30.0  # how long Redis may be unreachable before the relay ends
    _sub: Subscription | None = None  # registered ahead by register() or sending()
    _armed_ahead: bool = False  # ... and the hub heard the job's channel before the send

    def register(self) -> None:
        """Register with the hub now (no wait): its SUBSCRIBE goes out while the caller
        does other work (admission, the job's insert); then sending() before the job's
        task is sent."""
        if self._sub is None:
            self._sub = self.hub.subscribe(self.job_id, self.after)

    def sending(self) -> None:
        """Right before the job's task is sent, without waiting: if the hub hears the job's
        channel already, the log cannot hold an entry the hub did not announce to this relay
        (or, if it reconnects meanwhile, wake it for), so follow() skips its first read; if
        not yet, follow() reads the log once it does. End with close() if follow() never runs.

        Under load the hub's confirmation can trail the insert by tens of milliseconds
        (its listener waits its turn behind the relays): the task does not wait for it.
        """
        self.register()
        assert self._sub is not None
        self._armed_ahead = self._sub.armed.is_set()

    def close(self) -> None:
        """Drop a subscription made by register() (idempotent; follow() does it too)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            self.hub.unsubscribe(sub)

    def _unavailable(self) -> Entry:
        """The terminal error a relay ends with when Redis stays unreachable."""
        error = {
            "message": f"The job's stream is unreachable (Redis did not answer for "
            f"{self.outage_seconds:g}s); read its result with GET /v1/jobs/{self.job_id}.",
            "type": "service_unavailable",
            "code": "stream_unavailable",
            "param": None,
        }
        return "", error_fields(error)

    def follow(
        self, ping_seconds: float | None = None, *, first_ping: float | None = None
    ) -> Iterator[Entry | None]:
        """Yield entries up to and including the terminal one; None means "send a ping"
        (every `ping_seconds` of silence, the tail's own interval unless given).

        `first_ping`: the first ping comes after this much silence instead (a caller that
        waits a bounded time for the first entry, then goes on with the same tail).
        """
        regular = self.ping_seconds if ping_seconds is None else ping_seconds
        ping_every = regular if first_ping is None else first_ping
        client = self.hub.client
        key = log_key(self.job_id)
        sub = self._sub
        # the hub's notice count this relay has read the log for; -1: read now
        seen = 0 if sub is not None and self._armed_ahead else -1
        if sub is None:
            sub = self._sub = self.hub.subscribe(self.job_id, self.after)
        if seen == -1:  # read once the hub hears the channel (or, if it never does in
            sub.armed.wait(ARM_SECONDS)  # time, at once: its reconnect wakes us again)
        after = entry_key(self.after)
        wake_every = max(0.05, min(ping_every, self.lease_seconds / 2))
        last_ping = last_db_check = time.monotonic()
        check_lease = more = False
        outage_since: float | None = None
        try:
            while True:
                sub.event.clear()  # before looking: anything from now on sets it again
                entries = sub.handed()
                leased = None
                notices = sub.notices
                if notices != seen or more or check_lease:
                    try:
                        if check_lease:  # idle: is the worker still there? (no read: the
                            leased = self.hub.leased(self.job_id)  # hub wakes us for news)
                        found: Any = None
                        if notices != seen or more:
                            found = client.xread({key: self.after}, count=1000)
                    except redis.RedisError as exc:  # keep pinging; give up after a while
                        now = time.monotonic()
                        if outage_since is None:
                            outage_since = now
                            log.warning("relay of %s lost Redis: %r", self.job_id, exc)
                        if now - outage_since >= self.outage_seconds:
                            yield self._unavailable()
                            return
                        if now - last_ping >= ping_every:
                            last_ping = now
                            yield None
                        sub.event.wait(min(1.0, ping_every))
                        continue  # `seen` unchanged: read again
                    outage_since = None
                    if found is not None:
                        seen = notices  # what those notices announced is in the log by now
                        entries = found[0][1] if found else []  # the handed ones too, in order
                        more = len(entries) >= 1000
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
                    due = self.running or now - last_db_check >= self.lease_seconds
                    if due and self.check_lost is not None:
                        last_db_check = now
                        if self.check_lost(self.job_id):
                            seen = -1
                            continue  # its terminal entry is in the log now
                elif leased:
                    self.running = True
                if sub.event.wait(wake_every):
                    continue
                check_lease = True  # idle for a while: is the worker still there?
                now = time.monotonic()
                if now - last_ping >= ping_every:
                    last_ping = now
                    if ping_every != regular:  # the first ping: from now on the regular ones
                        ping_every = regular
                        wake_every = max(0.05, min(ping_every, self.lease_seconds / 2))
                        check_lease = False  # (as a fresh follow() would)
                    yield None
        finally:
            self.close()
