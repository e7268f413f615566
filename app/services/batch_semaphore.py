"""The per-provider semaphore of batch workers: a lease set per provider in Redis.

At most `limit` provider calls in flight per provider across every batch worker sharing
this Redis. Each slot is a lease (`app.leases`); a background thread renews this process's
slots, and a holder that dies stops renewing, so its slots come back on their own.

Within one process the slots are shared without a Redis round trip per call: a call that
ends hands its slot straight to a call of this process waiting for one, for up to TURN
seconds after the slot was taken from Redis; after that (or with nobody waiting) the slot
goes back to Redis, where every process competes for it again. Only one waiter per
provider and process asks Redis, for as many slots as there are waiters, in one call.

A process holds no more than its share of the slots while another process wants more:
a process whose waiters go short says so in Redis (`<key>:askers`, a member per process
living ASKER_TTL seconds), and while another process says so, a process holding more than
limit / (processes asking) gives its slots back as its calls end, and asks for no more.
Otherwise the slots would stay with whichever process asked first for up to TURN, one
process doing every call (its CPU the limit) and the other's items waiting for the tail.

A provider with a shared capacity (`capacity` in its `[providers.NAME]` table) yields to
its streams (`app.services.capacity`): each take from Redis leaves room for the streams
holding capacity, and its slots pass between calls for at most capacity.YIELD_SECONDS,
and not at all once streams need them (`_displaced`, read every CHECK_SECONDS), so batch
backs off within a call's length of a stream's arrival and resumes when it ends.

With `requests_per_minute` or `tokens_per_minute` as well, every call is counted in the
provider's window as it is taken (one request, its estimated tokens), so its slot never
passes between calls: each call takes its own slot from Redis, charged with its own
estimate (the asker asks for itself alone), and gives back with the correction to its
actual tokens, in one call each. A full window holds takes back until it has room
(re-checked at least every MAX_WAIT seconds).
An upstream 429 with Retry-After pauses the provider's takes in every process for that
long (a shared key, capacity.pause_key); this process stops handing slots over at once.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from app import leases, windows
from app.extensions import current_flask_app, redis_store
from app.providers.base import ProviderError
from app.services import capacity

log = logging.getLogger(__name__)

TURN = 5.0  # seconds a slot may pass between this process's calls before it goes back
MAX_TAKE = 100  # slots asked of Redis in one call
POLL_MAX = 0.05  # seconds between two asks while every slot is taken
MAX_WAIT = 1.0  # longest wait on a full window or a pause before asking again
CHECK_SECONDS = 0.02  # how stale the stream count may be when a slot passes between calls
SHARE_SECONDS = 0.1  # how stale the other processes' "we go short" may be (one Redis read)
ASKER_TTL = 0.5  # seconds a process's "my waiters go short" lasts in Redis unless repeated
NO_QUOTA = capacity.Quota()
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
        self.paused_until = 0.0  # monotonic: no slot passes between calls before then
        self.said_short_at = 0.0  # monotonic: when this process last said it goes short
        self.short_until = 0.0  # monotonic: until when that mark lives in Redis

    def surplus(self) -> list[str]:
        """Free slots beyond the waiters (to go back to Redis); call holding the lock."""
        extra = len(self.free) - self.waiting
        if extra <= 0:
            return []
        gone, self.free = self.free[:extra], self.free[extra:]
        self.held -= extra
        return [token for token, _ in gone]


@dataclass
class Call:
    """One call holding a slot: set `tokens` to its usage, to correct the window's count."""

    tokens: int | None = None


class ProviderSemaphore:
    """At most `limit` holders per provider across every process sharing this Redis."""

    def __init__(
        self,
        client: redis.Redis,
        limit: int,
        lease: float = 30.0,
        quotas: Mapping[str, capacity.Quota] | None = None,
        retry_after_max: float = 300.0,
    ) -> None:
        self.client = client
        self.limit = max(1, limit)
        self.lease = max(1.0, lease)
        self.quotas = dict(quotas or {})  # provider -> its capacity shared with streams
        self.retry_after_max = retry_after_max
        self._slots: dict[str, _Slots] = {}
        self._lock = threading.Lock()
        self.renewer = leases.Renewer(client, self.lease, live_only=True)
        self.round_trips = 0  # Redis calls to take or give back slots (renewals aside)
        self._charged: dict[str, tuple[str, int, int]] = {}  # token -> provider, window, tokens
        self._checked: dict[str, tuple[float, bool]] = {}  # provider -> (when, displaced)
        self.name = uuid.uuid4().hex  # this process's member in the askers' sets
        self._shares: dict[str, tuple[float, int]] = {}  # provider -> (when, share)

    @staticmethod
    def key(provider: str) -> str:
        return capacity.batch_key(provider)

    @classmethod
    def askers_key(cls, provider: str) -> str:
        """The processes whose waiters for this provider go short (member -> until, ms)."""
        return f"{cls.key(provider)}:askers"

    def _quota(self, provider: str) -> capacity.Quota:
        return self.quotas.get(provider, NO_QUOTA)

    def _turn(self, provider: str) -> float:
        """How long a slot may pass between this process's calls before Redis re-checks."""
        quota = self._quota(provider)
        if quota.metered:
            return 0.0  # every call is counted in the window as it is taken
        return capacity.YIELD_SECONDS if quota.capacity else TURN

    def try_acquire(self, provider: str, tokens: int = 0) -> str | None:
        """A slot token, or None when all slots are taken."""
        taken = self._ask(provider, 1, tokens)
        return taken.members[0] if taken.members else None

    def _ask(self, provider: str, count: int, tokens: int = 0) -> leases.Taken:
        """Up to `count` fresh slot tokens from Redis (fewer when the slots run out)."""
        key = self.key(provider)
        members = [uuid.uuid4().hex for _ in range(count)]
        self.round_trips += 1
        quota = self._quota(provider)
        within = (capacity.stream_key(provider), quota.capacity) if quota.capacity else None
        taken = leases.acquire_some(
            self.client,
            key,
            members,
            leases.ms(self.lease),
            self.limit,
            within=within,
            meter=quota.meter(provider, tokens),
            pause=capacity.pause_key(provider),
        )
        for token in taken.members:
            self.renewer.hold(key, token)
            if quota.metered:
                self._charged[token] = (provider, taken.window, tokens)
        return taken

    def release(self, *tokens: str, used: int | None = None, refund: bool = False) -> None:
        """Give slots back to Redis, correcting a metered call's count in its window.

        `used`: the one call's actual tokens; `refund`: the slots never ran a call, so their
        requests and tokens come off the window; neither: the estimate stands.
        """
        by_key: dict[str, list[str]] = {}
        for token in tokens:
            if key := self.renewer.drop(token):
                by_key.setdefault(key, []).append(token)
        for key, held in by_key.items():
            self.round_trips += 1
            charges = [c for t in held if (c := self._charged.pop(t, None))]
            if not charges or not (refund or used is not None):
                leases.release(self.client, key, *held)
                continue
            provider, window, charged = charges[0]
            if refund:
                requests, tokens_delta = -len(charges), -sum(c[2] for c in charges)
            else:
                requests, tokens_delta = 0, (used or 0) - charged
            window_key = capacity.window_key(provider)
            windows.release(self.client, key, window_key, window, requests, tokens_delta, *held)

    def pause(self, provider: str, seconds: float) -> None:
        """Hold the provider's batch calls back for `seconds`, in every process (a 429)."""
        seconds = min(max(0.0, seconds), self.retry_after_max)
        if seconds <= 0:
            return
        slots = self._local(provider)
        with slots.cond:
            slots.paused_until = max(slots.paused_until, time.monotonic() + seconds)
        windows.pause(self.client, capacity.pause_key(provider), seconds)

    def in_use(self, provider: str) -> int:
        """Live slots (expired leases excluded)."""
        return leases.live_count(self.client, self.key(provider))

    @contextmanager
    def slot(self, provider: str, tokens: Callable[[], int] | None = None) -> Iterator[Call]:
        """Hold one slot for `provider` while the block runs; waits for one.

        `tokens` estimates the call's tokens (asked only under a tokens-per-minute limit);
        set the yielded Call's `tokens` to its usage. An upstream 429 with Retry-After
        raised in the block pauses the provider's batch calls (`pause`).
        """
        cost = tokens() if tokens is not None and self._quota(provider).tokens_per_minute else 0
        token, since = self._take(provider, cost)
        call = Call()
        try:
            yield call
        except ProviderError as exc:
            if exc.status_code == 429 and exc.retry_after:
                self._pause_quietly(provider, exc.retry_after)
            raise
        finally:
            self._give(provider, token, since, call.tokens)

    def _local(self, provider: str) -> _Slots:
        with self._lock:
            slots = self._slots.get(provider)
            if slots is None:
                slots = self._slots[provider] = _Slots()
            return slots

    def _take(self, provider: str, cost: int = 0) -> tuple[str, float]:
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
            return self._ask_until_taken(provider, slots, cost)
        finally:
            with slots.cond:
                slots.waiting -= 1
                surplus = slots.surplus()
                if not slots.asking and slots.waiting > len(slots.free):
                    slots.cond.notify()  # someone has to ask Redis now
            if surplus:
                self._release_quietly(surplus)

    def _ask_until_taken(self, provider: str, slots: _Slots, cost: int) -> tuple[str, float]:
        """As the asker: ask Redis for the waiters' slots until one is ours.

        While this process holds every slot, asking is pointless: the asker waits for a
        slot handed over, or for one of this process's slots to go back to Redis (and then
        asks on the same schedule as other processes' askers, so they get their share).
        A full window or a pause (Redis says how long) is waited out, MAX_WAIT at most.
        """
        delay = 0.005
        one_each = self._quota(provider).metered  # each call charged its own estimate
        try:
            while True:
                share = self._share(provider)
                with slots.cond:
                    if slots.free:
                        return slots.free.pop()
                    capped = slots.held >= share
                    want = min(
                        max(1, slots.waiting - len(slots.free)), MAX_TAKE, share - slots.held
                    )
                    if one_each:
                        want = 1
                if capped:  # our share (or every slot) is ours: wait for one to pass or go back
                    self._say_short(provider, slots)
                    with slots.cond:
                        if not slots.free:
                            slots.ask_cond.wait(POLL_MAX)
                        if slots.free:
                            return slots.free.pop()
                    continue
                taken = self._ask(provider, want, cost)
                got = taken.members
                if len(got) < want or slots.waiting - len(slots.free) > len(got):
                    self._say_short(provider, slots)
                with slots.cond:
                    now = time.monotonic()
                    slots.held += len(got)
                    if got:
                        slots.free.extend((token, now) for token in got[1:])
                        slots.cond.notify(len(got) - 1)
                        return got[0], now
                    pause = delay * (0.5 + random.random())
                    if taken.wait_ms:
                        pause = min(taken.wait_ms / 1000, MAX_WAIT) * (1 + random.random() / 10)
                    deadline = now + pause
                    while not slots.free and now < deadline:
                        slots.ask_cond.wait(deadline - now)
                        now = time.monotonic()
                    if slots.free:
                        return slots.free.pop()
                    delay = min(delay * 2, POLL_MAX)
        finally:
            with slots.cond:
                slots.asking = False

    def _give(self, provider: str, token: str, since: float, used: int | None = None) -> None:
        """Hand the slot to a waiter of this process, or give it back to Redis."""
        slots = self._local(provider)
        displaced = self._displaced(provider)
        # The share matters only to hand the slot over; without waiters the last one read.
        wanted = slots.waiting > len(slots.free)
        share = self._share(provider) if wanted else self._last_share(provider)
        with slots.cond:
            waiters = slots.waiting > len(slots.free)
            now = time.monotonic()
            fair = slots.held <= share
            handing = waiters and fair and not displaced and now >= slots.paused_until
            if handing and now - since < self._turn(provider):
                slots.free.append((token, since))
                slots.cond.notify()
                slots.ask_cond.notify()
                return
            slots.held -= 1
            idle = not slots.waiting and now < slots.short_until
            if idle:
                slots.short_until = slots.said_short_at = 0.0
        self.release(token, used=used)  # every process's asker competes for it on its next ask
        if waiters:
            with slots.cond:
                slots.ask_cond.notify()  # ours asks now (within its share), not a poll later
        elif idle:
            self._withdraw(provider)

    def _displaced(self, provider: str) -> bool:
        """Whether streams need this provider's batch slots now: batch calls in flight beyond
        what the streams leave of a shared capacity. One Redis call per CHECK_SECONDS and
        provider, so a slot stops passing between calls within that much of a stream's
        arrival, not capacity.YIELD_SECONDS later. Liveness by this host's clock."""
        shared = self._quota(provider).capacity
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

    def _share(self, provider: str) -> int:
        """The most slots this process keeps: all of them, or limit / (processes asking)
        while another process's waiters go short. One Redis call per SHARE_SECONDS."""
        now = time.monotonic()
        at, share = self._shares.get(provider, (0.0, self.limit))
        if now - at < SHARE_SECONDS:
            return share
        self._shares[provider] = (now, share)  # meanwhile the others use the last answer
        try:
            live = self.client.zrangebyscore(
                self.askers_key(provider), int(time.time() * 1000), "+inf"
            )
            others = sum(
                1 for m in live if (m.decode() if isinstance(m, bytes) else m) != self.name
            )
            share = math.ceil(self.limit / (1 + others))
        except redis.RedisError:
            share = self.limit  # cannot tell: the cap in Redis still holds
        self._shares[provider] = (now, share)
        return share

    def _last_share(self, provider: str) -> int:
        """The share as last read (no Redis call)."""
        return self._shares.get(provider, (0.0, self.limit))[1]

    def _say_short(self, provider: str, slots: _Slots) -> None:
        """Tell the other processes this one's waiters go short (at most 4 times a TTL)."""
        now = time.monotonic()
        if now - slots.said_short_at < ASKER_TTL / 4:
            return
        slots.said_short_at = now
        slots.short_until = now + ASKER_TTL
        key, until = self.askers_key(provider), int((time.time() + ASKER_TTL) * 1000)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(key, {self.name: until})
            pipe.zremrangebyscore(key, "-inf", int(time.time() * 1000) - 60_000)
            pipe.pexpire(key, 60_000)
            pipe.execute()
        except redis.RedisError:
            log.warning("could not tell other processes %s's batch calls go short", provider)

    def _withdraw(self, provider: str) -> None:
        """Take back this process's "my waiters go short": nobody of it waits now, so the
        others may use every slot at once, not only once the mark lapses (ASKER_TTL). At
        the end of a run the process with items left would otherwise stay at its share
        while the other one's slots sit idle."""
        try:
            self.client.zrem(self.askers_key(provider), self.name)
        except redis.RedisError:
            log.warning(
                "could not tell other processes %s's batch calls no longer go short", provider
            )

    def _release_quietly(self, tokens: list[str]) -> None:
        try:
            self.release(*tokens, refund=True)
        except Exception:
            log.warning("could not give back %d provider slot(s); they lapse", len(tokens))

    def _pause_quietly(self, provider: str, seconds: float) -> None:
        try:
            self.pause(provider, seconds)
        except Exception:
            log.warning("could not pause %s's batch calls for %gs", provider, seconds)


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
            capacity.quotas(app.config),
            app.config["BATCH_RETRY_AFTER_MAX"],
        )
    return sem
