"""One capacity per provider, shared by both channels, chat first.

A `[providers.NAME]` table may give the provider's capacity for Sluice as a whole in
concurrent calls (`capacity = N`), requests per minute (`requests_per_minute = R`) and
tokens per minute (`tokens_per_minute = T`); each is optional (0 or absent: none).

Concurrent calls: stream jobs count from admission to their end: each holds a member of
the provider's stream lease set (`stream_key`), one more set in the same atomic acquire as
its admission slots, renewed and released with them, so the stream hot path pays no extra
Redis call. Batch calls count in the batch semaphore's set (`batch_key`).

Per minute: fixed windows of Redis time (`app.windows`, one hash per provider,
`window_key`) count each mode's requests and tokens. A stream counts one request and its
estimated tokens (`estimate`: input estimate + its max_tokens, else
DEFAULT_OUTPUT_TOKENS, times `n`) in its admission call; a batch call counts them in the
semaphore's take. Each is corrected to the completion's usage when it ends (one command on
a call the caller makes anyway).

Streams come first: a stream is refused only when streams alone fill the capacity or the
window (the batch calls it finds are load it displaces); batch calls start only within
what streams leave, checked atomically on every take from Redis: `min(limit, capacity -
streams)` calls in flight, and per minute what remains of the window after the batch's own
use and the streams' reserve, the larger of their use in this window and in the last one.
Batch workers hand a slot between their own calls for at most YIELD_SECONDS (with a
per-minute limit not at all: every call is counted and checked in Redis), so new batch
calls stop within that much of a stream's arrival (calls in flight finish) and resume as
soon as streams end. An upstream 429 with Retry-After seen by a batch call pauses every
batch call of that provider for that long (`pause_key`, checked in the same take). The pure
rules are below; the Lua in `app.leases` mirrors them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis

from app import leases, windows

if TYPE_CHECKING:
    from app.providers.base import ChatRequest

STREAM_PREFIX = "sluice:capacity:stream"
WINDOW_PREFIX = "sluice:capacity:window"  # per-minute counts by mode (app.windows)
PAUSE_PREFIX = "sluice:capacity:pause"  # batch calls held back after an upstream 429
DEFAULT_OUTPUT_TOKENS = 1024  # a request's output estimate without max_tokens
BATCH_PREFIX = "sluice:provider-sem"  # the batch semaphore's lease sets
YIELD_SECONDS = 0.5  # longest a batch slot passes between calls before Redis re-checks it


def stream_key(provider: str) -> str:
    """The lease set of the provider's stream jobs (job ids, admission's records)."""
    return f"{STREAM_PREFIX}:{provider}"


def batch_key(provider: str) -> str:
    """The lease set of the provider's batch calls in flight (the batch semaphore)."""
    return f"{BATCH_PREFIX}:{provider}"


def window_key(provider: str) -> str:
    """The hash of the provider's per-minute request and token counts, by mode."""
    return f"{WINDOW_PREFIX}:{provider}"


def pause_key(provider: str) -> str:
    """While this key lives, no batch call of the provider starts (an upstream 429)."""
    return f"{PAUSE_PREFIX}:{provider}"


def provider_of(model: str) -> str:
    """`openai/gpt-4o` -> `openai` (the registry's split: on the first `/`)."""
    return model.partition("/")[0] if isinstance(model, str) else ""


@dataclass(frozen=True)
class Quota:
    """A provider's shared capacity; 0: no such limit."""

    capacity: int = 0  # concurrent calls
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def metered(self) -> bool:
        """Whether calls count in the per-minute window."""
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def meter(self, provider: str, tokens: int) -> leases.Meter | None:
        """A call's place in the window (None without a per-minute limit)."""
        if not self.metered:
            return None
        return leases.Meter(
            window_key(provider), self.requests_per_minute, self.tokens_per_minute, tokens
        )

    def __bool__(self) -> bool:
        return bool(self.capacity or self.metered)


KEYS = {
    "capacity": ("concurrent calls", 1),
    "requests_per_minute": ("requests per minute", 0),
    "tokens_per_minute": ("tokens per minute", 0),
}


def check(name: str, table: Mapping[str, Any]) -> Quota:
    """A `[providers.NAME]` table's quota; ValueError naming a bad key."""
    values: dict[str, int] = {}
    for key, (unit, least) in KEYS.items():
        value = table.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(
                f"providers.{name}.{key} must be a whole number of {unit} >= {least}"
                f"{' (0: none)' if least == 0 else ''}, got {value!r}"
            )
        values[key] = value
    return Quota(**values)


def quota(config: Mapping[str, Any], provider: str) -> Quota:
    """Provider's quota in this app's config (validated at start)."""
    table = (config.get("PROVIDERS") or {}).get(provider)
    if not isinstance(table, Mapping):
        return Quota()
    return Quota(**{key: int(table.get(key) or 0) for key in KEYS})


def of(config: Mapping[str, Any], provider: str) -> int:
    """Provider's capacity in concurrent calls in this app's config (0: none)."""
    return quota(config, provider).capacity


def quotas(config: Mapping[str, Any]) -> dict[str, Quota]:
    """Every provider that declares any limit, with its quota."""
    tables = config.get("PROVIDERS") or {}
    return {name: q for name in tables if (q := quota(config, name))}


def capacities(config: Mapping[str, Any]) -> dict[str, int]:
    """Every provider that declares a capacity in concurrent calls, with it."""
    return {name: q.capacity for name, q in quotas(config).items() if q.capacity}


def estimate(request: ChatRequest) -> int:
    """A call's tokens before it runs: input estimate + output limit (or the default), n times."""
    output = request.limit or DEFAULT_OUTPUT_TOKENS
    return request.input_tokens() + output * request.choices


# ---------------------------------------------------------------- the rules (pure)


def batch_share(limit: int, capacity: int, streams: int) -> int:
    """How many batch calls may be in flight: the batch limit, within what streams leave."""
    if capacity <= 0:
        return max(0, limit)
    return max(0, min(limit, capacity - streams))


def batch_room(limit: int, capacity: int, streams: int, batch: int) -> int:
    """How many more batch calls may start now."""
    return max(0, batch_share(limit, capacity, streams) - batch)


def stream_admits(capacity: int, streams: int) -> bool:
    """Whether one more stream fits: batch load never refuses a stream, it is displaced."""
    return capacity <= 0 or streams < capacity


def displaced(capacity: int, streams: int, batch: int) -> int:
    """Batch calls in flight beyond batch's share (finishing; none start until it is met)."""
    if capacity <= 0:
        return 0
    return max(0, batch - max(0, capacity - streams))


def stream_fits(limit: int, streams_used: int, cost: int) -> bool:
    """Whether a stream's cost fits the window: streams alone count (0: no limit).

    A cost above the whole limit fits an empty window (it could never fit otherwise).
    """
    return limit <= 0 or streams_used + min(cost, limit) <= limit


def batch_window_room(
    limit: int, batch_used: int, streams_used: int, streams_before: int, cost: int
) -> int | None:
    """How many more batch calls of `cost` the window leaves (None: no limit).

    Batch takes what remains after its own use and the streams' reserve: the larger of
    the streams' use in this window and in the one before.
    """
    if limit <= 0:
        return None
    each = max(1, min(cost, limit))
    return max(0, (limit - batch_used - max(streams_used, streams_before)) // each)


@dataclass(frozen=True)
class WindowUse:
    """One per-minute limit's current window, split by mode."""

    limit: int
    stream: int
    batch: int
    reserve: int  # what batch leaves streams beyond their use: last window's use, minus this one's
    free: int  # what batch may still take


def window_use(limit: int, counts: Mapping[str, int], kind: str) -> WindowUse | None:
    """The window's usage of one limit ('r' requests, 't' tokens) from app.windows.counts."""
    if limit <= 0:
        return None
    stream, batch, before = counts[f"s{kind}"], counts[f"b{kind}"], counts[f"ps{kind}"]
    free = max(0, limit - batch - max(stream, before))
    return WindowUse(limit, stream, batch, max(0, before - stream), free)


@dataclass(frozen=True)
class Split:
    """One provider's capacity split by mode, now."""

    provider: str
    capacity: int | None  # None: no shared capacity (batch alone is capped, by its limit)
    stream: int  # stream jobs holding capacity (admitted, not ended)
    batch: int  # batch calls in flight
    batch_share: int  # how many batch calls may be in flight while these streams hold
    displaced: int  # batch calls in flight beyond that share, finishing
    free: int | None  # capacity neither mode holds
    requests_per_minute: WindowUse | None = None  # this window's requests, by mode
    tokens_per_minute: WindowUse | None = None  # this window's tokens, by mode
    window_resets_in: float | None = None  # seconds until the next window (metered only)
    batch_paused_for: float = 0.0  # seconds batch calls stay held back (an upstream 429)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def split(
    provider: str,
    capacity: int,
    limit: int,
    streams: int,
    batch: int,
    *,
    quota: Quota | None = None,
    counts: Mapping[str, int] | None = None,
    resets_in: float | None = None,
    paused_for: float = 0.0,
) -> Split:
    """The split of one provider's capacity, from live counts (and its window's counts)."""
    rates = quota if quota is not None and quota.metered else None
    window = counts or dict.fromkeys(windows.FIELDS[1:], 0)
    return Split(
        provider=provider,
        capacity=capacity or None,
        stream=streams,
        batch=batch,
        batch_share=batch_share(limit, capacity, streams),
        displaced=displaced(capacity, streams, batch),
        free=max(0, capacity - streams - batch) if capacity else None,
        requests_per_minute=window_use(rates.requests_per_minute, window, "r") if rates else None,
        tokens_per_minute=window_use(rates.tokens_per_minute, window, "t") if rates else None,
        window_resets_in=resets_in if rates else None,
        batch_paused_for=paused_for,
    )


def snapshot(client: redis.Redis, config: Mapping[str, Any], names: Iterable[str]) -> list[Split]:
    """Each provider's split (the named ones and any with a quota); two Redis calls."""
    providers = list(dict.fromkeys([*names, *quotas(config)]))
    now = leases.now_ms(client)
    pipe = client.pipeline(transaction=False)
    for name in providers:
        pipe.zcount(stream_key(name), f"({now}", "+inf")
        pipe.zcount(batch_key(name), f"({now}", "+inf")
        pipe.hmget(window_key(name), list(windows.FIELDS))
        pipe.pttl(pause_key(name))
    answers = pipe.execute()
    limit = int(config.get("PROVIDER_CONCURRENCY") or 0)
    out = []
    for i, name in enumerate(providers):
        streams, batch, window, paused = answers[4 * i : 4 * i + 4]
        q = quota(config, name)
        out.append(
            split(
                name,
                q.capacity,
                limit,
                int(streams),
                int(batch),
                quota=q,
                counts=windows.counts(window, now),
                resets_in=windows.left_ms(now) / 1000,
                paused_for=max(0, int(paused)) / 1000,
            )
        )
    return out


def current(names: Iterable[str]) -> list[Split]:
    """The splits of these providers (the registry's names) and of any with a quota, now."""
    from flask import current_app

    from app.extensions import redis_store

    return snapshot(redis_store.client, current_app.config, names)
