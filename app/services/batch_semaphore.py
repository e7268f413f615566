"""The per-provider semaphore of batch workers: a lease set per provider in Redis.

At most `limit` provider calls in flight per provider across every batch worker sharing
this Redis. Each slot is a lease (`app.leases`); a background thread renews this process's
slots, and a holder that dies stops renewing, so its slots come back on their own.

Within one process the slots are shared without a Redis round trip per call: a call that
ends hands its slot straight to a call of this process waiting for one, for up to TURN
seconds after the slot was taken from Redis; after that (or with nobody waiting) the slot
goes back to Redis, where every process competes for it again. Only one waiter per
provider and process asks Redis, for as many slots as there are waiters, in one call.

A provider with a shared capacity (`capacity` in its `[providers.NAME]` table) yields to
its streams (`app.services.capacity`): each take from Redis leaves room for the streams
holding capacity, and its slots pass between calls for at most capacity.YIELD_SECONDS,
and not at all once streams need them (`_displaced`, read every CHECK_SECONDS), so batch
backs off within a call's length of a stream's arrival and resumes when it ends.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import redis

from app import leases
from app.extensions import current_flask_app, redis_store
from app.services import capacity

log = logging.getLogger(__name__)

TURN = 5.0  # seconds a slot may pass between this process's calls before it goes back
MAX_TAKE = 100  # slots asked of Redis in one call
POLL_MAX = 0.05  # seconds between two asks while every slot is taken
CHECK_SECONDS = 0.02  # how stale the stream count may be when a slot passes between calls
QUIET_LOGGERS = ("httpx", "httpx2", "openai", "anthropic")  # one INFO line per call otherwise


class _Slots:
    """One provider's slots in this process: free ones (token, taken at), its waiters.

    One waiter at a time (the asker) asks Redis; the others wait on `cond` for a slot
    handed over by a call that ended. Both conditions share one lock.
    """

    def __init__(self) -> None:
        lock = threading.Lock()
        self.cond = threading.Condition(lock)  # plain waiters: a slot was handed over
        self.ask_cond = threading.Condition(lock)  # the asker: a slot, or ask again now
        self.free: list[tuple[str, float]] = []
        self.waiting = 0
        self.asking = False
        self.held = 0  # slots this process took from Redis and has not given back

    def surplus(self) -> list[str]:
        """Free slots beyond the waiters (to go back to Redis); call holding the lock."""
        extra = len(self.free) - self.waiting
        if extra <= 0:
            return []
        gone, self.free = self.free[:extra], self.free[extra:]
        self.held -= extra
        return [token for token, _ in gone]


class ProviderSemaphore:
    """At most `limit` holders per provider across every process sharing this Redis."""

    def __init__(
        self,
        client: redis.Redis,
        limit: int,
        lease: float = 30.0,
        capacities: Mapping[str, int] | None = None,
    ) -> None:
        self.client = client
        self.limit = max(1, limit)
        self.lease = max(1.0, lease)
        self.capacities = dict(capacities or {})  # provider -> capacity shared with streams
        self._slots: dict[str, _Slots] = {}
        self._lock = threading.Lock()
        self.renewer = leases.Renewer(client, self.lease, live_only=True)
        self.round_trips = 0  # Redis calls to take or give back slots (renewals aside)
        self._checked: dict[str, tuple[float, bool]] = {}  # provider -> (when, displaced)

    @staticmethod
    def key(provider: str) -> str:
        return capacity.batch_key(provider)

    def _turn(self, provider: str) -> float:
        """How long a slot may pass between this process's calls before Redis re-checks."""
        return capacity.YIELD_SECONDS if self.capacities.get(provider) else TURN

    def try_acquire(self, provider: str) -> str | None:
        """A slot token, or None when all slots are taken."""
        taken = self._ask(provider, 1)
        return taken[0] if taken else None

    def _ask(self, provider: str, count: int) -> list[str]:
        """Up to `count` fresh slot tokens from Redis (fewer when the slots run out)."""
        key = self.key(provider)
        tokens = [uuid.uuid4().hex for _ in range(count)]
        self.round_trips += 1
        shared = self.capacities.get(provider, 0)
        within = (capacity.stream_key(provider), shared) if shared else None
        taken = leases.acquire_some(
            self.client, key, tokens, leases.ms(self.lease), self.limit, within=within
        )
        for token in taken:
            self.renewer.hold(key, token)
        return taken

    def release(self, *tokens: str) -> None:
        """Give slots back to Redis."""
        by_key: dict[str, list[str]] = {}
        for token in tokens:
            if key := self.renewer.drop(token):
                by_key.setdefault(key, []).append(token)
        for key, held in by_key.items():
            self.round_trips += 1
            leases.release(self.client, key, *held)

    def in_use(self, provider: str) -> int:
        """Live slots (expired leases excluded)."""
        return leases.live_count(self.client, self.key(provider))

    @contextmanager
    def slot(self, provider: str) -> Iterator[None]:
        """Hold one slot for `provider` while the block runs; waits for one."""
        token, since = self._take(provider)
        try:
            yield
        finally:
            self._give(provider, token, since)

    def _local(self, provider: str) -> _Slots:
        with self._lock:
            slots = self._slots.get(provider)
            if slots is None:
                slots = self._slots[provider] = _Slots()
            return slots

    def _take(self, provider: str) -> tuple[str, float]:
        """A slot: a free one of this process, else one asked of Redis (waiting if none)."""
        slots = self._local(provider)
        with slots.cond:
            slots.waiting += 1
        try:
            with slots.cond:
                while not slots.free and slots.asking:
                    slots.cond.wait()
                if slots.free:
                    return slots.free.pop()
                slots.asking = True
            return self._ask_until_taken(provider, slots)
        finally:
            with slots.cond:
                slots.waiting -= 1
                surplus = slots.surplus()
                if not slots.asking and slots.waiting > len(slots.free):
                    slots.cond.notify()  # someone has to ask Redis now
            if surplus:
                self._release_quietly(surplus)

    def _ask_until_taken(self, provider: str, slots: _Slots) -> tuple[str, float]:
        """As the asker: ask Redis for the waiters' slots until one is ours.

        While this process holds every slot, asking is pointless: the asker waits for a
        slot handed over, or for one of this process's slots to go back to Redis (and then
        asks on the same schedule as other processes' askers, so they get their share).
        """
        delay = 0.005
        try:
            while True:
                with slots.cond:
                    while not slots.free and slots.held >= self.limit:
                        slots.ask_cond.wait(POLL_MAX)  # until a slot of ours went back
                    if slots.free:
                        return slots.free.pop()
                    want = min(max(1, slots.waiting - len(slots.free)), MAX_TAKE, self.limit)
                taken = self._ask(provider, want)
                with slots.cond:
                    now = time.monotonic()
                    slots.held += len(taken)
                    if taken:
                        slots.free.extend((token, now) for token in taken[1:])
                        slots.cond.notify(len(taken) - 1)
                        return taken[0], now
                    deadline = now + delay * (0.5 + random.random())
                    while not slots.free and now < deadline:
                        slots.ask_cond.wait(deadline - now)
                        now = time.monotonic()
                    if slots.free:
                        return slots.free.pop()
                    delay = min(delay * 2, POLL_MAX)
        finally:
            with slots.cond:
                slots.asking = False

    def _give(self, provider: str, token: str, since: float) -> None:
        """Hand the slot to a waiter of this process, or give it back to Redis."""
        slots = self._local(provider)
        displaced = self._displaced(provider)
        with slots.cond:
            waiters = slots.waiting > len(slots.free)
            if waiters and not displaced and time.monotonic() - since < self._turn(provider):
                slots.free.append((token, since))
                slots.cond.notify()
                slots.ask_cond.notify()
                return
            slots.held -= 1
        self.release(token)  # every process's asker competes for it on its next ask

    def _displaced(self, provider: str) -> bool:
        """Whether streams need this provider's batch slots now: batch calls in flight beyond
        what the streams leave of a shared capacity. One Redis call per CHECK_SECONDS and
        provider, so a slot stops passing between calls within that much of a stream's
        arrival, not capacity.YIELD_SECONDS later. Liveness by this host's clock."""
        shared = self.capacities.get(provider)
        if not shared:
            return False
        now = time.monotonic()
        at, verdict = self._checked.get(provider, (0.0, False))
        if now - at < CHECK_SECONDS:
            return verdict
        self._checked[provider] = (now, verdict)  # meanwhile the others use the last verdict
        live = f"({int(time.time() * 1000)}"
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zcount(capacity.stream_key(provider), live, "+inf")
            pipe.zcount(self.key(provider), live, "+inf")
            streams, batch = pipe.execute()
            verdict = capacity.displaced(shared, int(streams), int(batch)) > 0
        except redis.RedisError:
            verdict = True  # cannot tell: the slot goes back, Redis checks it on the next take
        self._checked[provider] = (now, verdict)
        return verdict

    def _release_quietly(self, tokens: list[str]) -> None:
        try:
            self.release(*tokens)
        except Exception:
            log.warning("could not give back %d provider slot(s); they lapse", len(tokens))


def semaphore() -> ProviderSemaphore:
    """This app's semaphore (one per process and app), made on first use."""
    app = current_flask_app()
    sem = app.extensions.get("sluice_provider_semaphore")
    if sem is None:
        for name in QUIET_LOGGERS:  # per-request INFO lines cost more than the request here
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        sem = app.extensions["sluice_provider_semaphore"] = ProviderSemaphore(
            redis_store.client,
            app.config["PROVIDER_CONCURRENCY"],
            app.config["PROVIDER_LEASE_SECONDS"],
            capacity.capacities(app.config),
        )
    return sem
