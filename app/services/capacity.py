"""One capacity per provider, shared by both channels, chat first.

`capacity = N` in a `[providers.NAME]` table is the provider's concurrent calls for
Sluice as a whole. Stream jobs count in it from admission to their end: each holds a
member of the provider's stream lease set (`stream_key`), one more set in the same atomic
acquire as its admission slots, renewed and released with them, so the stream hot path
pays no extra Redis call. Batch calls count in the batch semaphore's set (`batch_key`).

Streams come first: a stream is refused only when streams alone fill the capacity (the
batch calls it finds are load it displaces); batch calls start only within what streams
leave, `min(limit, capacity - streams)`, checked atomically on every take from Redis, and
batch workers hand a slot between their own calls for at most YIELD_SECONDS, so new batch
calls stop within that much of a stream's arrival (calls in flight finish) and resume as
soon as streams end. The pure rules are below; the Lua in `app.leases` mirrors them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from app import leases

STREAM_PREFIX = "sluice:capacity:stream"
BATCH_PREFIX = "sluice:provider-sem"  # the batch semaphore's lease sets
YIELD_SECONDS = 0.5  # longest a batch slot passes between calls before Redis re-checks it


def stream_key(provider: str) -> str:
    """The lease set of the provider's stream jobs (job ids, admission's records)."""
    return f"{STREAM_PREFIX}:{provider}"


def batch_key(provider: str) -> str:
    """The lease set of the provider's batch calls in flight (the batch semaphore)."""
    return f"{BATCH_PREFIX}:{provider}"


def provider_of(model: str) -> str:
    """`openai/gpt-4o` -> `openai` (the registry's split: on the first `/`)."""
    return model.partition("/")[0] if isinstance(model, str) else ""


def check(name: str, table: Mapping[str, Any]) -> int:
    """A `[providers.NAME]` table's capacity (0: none); ValueError naming a bad one."""
    value = table.get("capacity")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"providers.{name}.capacity must be a whole number of concurrent calls >= 1, "
            f"got {value!r}"
        )
    return value


def of(config: Mapping[str, Any], provider: str) -> int:
    """Provider's capacity in this app's config (0: none; validated at start)."""
    table = (config.get("PROVIDERS") or {}).get(provider)
    return int(table.get("capacity") or 0) if isinstance(table, Mapping) else 0


def capacities(config: Mapping[str, Any]) -> dict[str, int]:
    """Every provider that declares a capacity, with it."""
    tables = config.get("PROVIDERS") or {}
    return {name: n for name in tables if (n := of(config, name))}


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def split(provider: str, capacity: int, limit: int, streams: int, batch: int) -> Split:
    """The split of one provider's capacity, from live counts."""
    return Split(
        provider=provider,
        capacity=capacity or None,
        stream=streams,
        batch=batch,
        batch_share=batch_share(limit, capacity, streams),
        displaced=displaced(capacity, streams, batch),
        free=max(0, capacity - streams - batch) if capacity else None,
    )


def snapshot(client: redis.Redis, config: Mapping[str, Any], names: Iterable[str]) -> list[Split]:
    """Each provider's split (the named ones and any with a capacity); two Redis calls."""
    providers = list(dict.fromkeys([*names, *capacities(config)]))
    now = leases.now_ms(client)
    pipe = client.pipeline(transaction=False)
    for name in providers:
        pipe.zcount(stream_key(name), f"({now}", "+inf")
        pipe.zcount(batch_key(name), f"({now}", "+inf")
    counts = pipe.execute()
    limit = int(config.get("PROVIDER_CONCURRENCY") or 0)
    return [
        split(name, of(config, name), limit, int(counts[2 * i]), int(counts[2 * i + 1]))
        for i, name in enumerate(providers)
    ]


def current(names: Iterable[str]) -> list[Split]:
    """The splits of these providers (the registry's names) and of any with a capacity, now."""
    from flask import current_app

    from app.extensions import redis_store

    return snapshot(redis_store.client, current_app.config, names)
