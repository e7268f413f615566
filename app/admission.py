"""Admission control for the stream channel: concurrent-stream slots held as Redis leases.

Each scope (all streams, one tenant's streams, the streams of one provider) is a lease set
(`app.leases`) of job ids; the job's record names them all, so the worker renews and
releases by job id alone. The provider's set is its share of the provider's capacity
(`app.services.capacity`): full only when streams alone fill it, batch calls yield. With
per-minute limits on the provider, the same call counts the job's request and estimated
tokens in the provider's window (refused only when streams alone used it up), and the
worker corrects the tokens to the job's usage at its end (`settle_stream_tokens`, on the
release pipeline). Taking a slot first drops expired members, so a holder that dies stops
counting once its lease runs out. The holder (the worker) renews while it runs and releases
when the job ends.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import redis
from flask import current_app

from app import leases, windows
from app.errors import APIError
from app.extensions import redis_store
from app.policy import Route, current_policy
from app.providers.base import ChatRequest
from app.services import capacity

log = logging.getLogger(__name__)

PREFIX = "sluice:slots"
GLOBAL_KEY = f"{PREFIX}:all"
JOB_KEY_GRACE_MS = 60_000  # the job's record (its sets) outlives the lease, for late renews


def tenant_key(tenant_id: str) -> str:
    return f"{PREFIX}:tenant:{tenant_id}"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


@dataclass(frozen=True)
class Limits:
    """Stream-slot limits for one request; 0 means unlimited."""

    global_max: int
    tenant_max: int


def limits_for(route: Route) -> Limits:
    """The policy's limits (or the STREAM_MAX_* settings) for this route's tenant."""
    policy = current_policy()
    config = current_app.config
    global_max = policy.max_streams
    if global_max is None:
        global_max = config["STREAM_MAX_CONCURRENT"]
    tenant_max = route.tenant_max_streams
    if tenant_max is None:
        tenant_max = policy.max_streams_per_tenant
    if tenant_max is None:
        tenant_max = config["STREAM_MAX_PER_TENANT"]
    return Limits(global_max, tenant_max)


def try_acquire(
    tenant_id: str, job_id: str, limits: Limits, provider: str = "", tokens: int = 0
) -> int:
    """One atomic attempt: 1 held | 0 global full | -1 tenant full | -2 provider full, or
    -3 / -4: streams used the provider's requests / tokens of this minute.

    With `provider`, the job also counts in that provider's stream set, limited by its
    capacity, and (with per-minute limits) as one request and `tokens` in its window: streams
    alone count (the batch calls there yield to it).
    """
    sets = [GLOBAL_KEY, tenant_key(tenant_id)]
    caps = [limits.global_max, limits.tenant_max]
    meter = None
    if provider:
        shared = capacity.quota(current_app.config, provider)
        sets.append(capacity.stream_key(provider))
        caps.append(shared.capacity)
        meter = shared.meter(provider, tokens)
    ttl = leases.ms(current_app.config["STREAM_SLOT_QUEUED_SECONDS"])
    full, _ = leases.acquire(
        redis_store.client,
        sets,
        job_id,
        ttl,
        caps,
        record=job_key(job_id),
        record_grace_ms=JOB_KEY_GRACE_MS,
        meter=meter,
    )
    return {0: 1, 1: 0, 2: -1, 3: -2, 4: -3, 5: -4}[full]


SCOPES = {0: "global", -1: "tenant", -2: "provider", -3: "provider", -4: "provider"}
PER_MINUTE = {-3: ("requests_per_minute", "requests"), -4: ("tokens_per_minute", "tokens")}


def _full_error(code: int, limits: Limits, waited: float, provider: str) -> APIError:
    extra: dict[str, object] = {"scope": SCOPES[code]}
    retry_after = 1
    if code == 0:
        message = f"All {limits.global_max} stream slots are busy"
    elif code == -1:
        message = f"This tenant already has {limits.tenant_max} concurrent streams (its limit)"
    elif code == -2:
        shared = capacity.of(current_app.config, provider)
        message = f"Streams fill the capacity of provider '{provider}' ({shared} calls)"
        extra |= {"provider": provider, "capacity": shared}
    else:
        key, unit = PER_MINUTE[code]
        limit = getattr(capacity.quota(current_app.config, provider), key)
        message = f"Streams used the {limit} {unit} per minute of provider '{provider}'"
        extra |= {"provider": provider, "limit": key, key: limit}
        retry_after = math.ceil(windows.left_ms(int(time.time() * 1000)) / 1000)
    message += f"; waited {waited:g}s. Retry" if waited else ". Retry"
    message += " shortly" if retry_after == 1 else f" in {retry_after}s"
    message += ", or send `Prefer: respond-async` to run it in the background."
    return APIError(
        429,
        message,
        code="stream_capacity_exceeded",
        headers={"Retry-After": str(retry_after)},
        extra=extra,
    )


def acquire_stream_slot(
    route: Route,
    tenant_id: str,
    job_id: str,
    provider: str = "",
    request: ChatRequest | None = None,
) -> str:
    """Take a slot for job_id or decide the overflow; returns "stream" or "batch".

    Raises APIError(429, with Retry-After) when the route's overflow is reject (or queue,
    after waiting) and no slot is free. A route whose mode is not stream needs no slot.
    `provider` (the model's) counts the job in that provider's share of its capacity, and
    `request` (its estimated tokens, capacity.estimate) in the provider's tokens per minute.
    """
    if route.mode != "stream":
        return route.mode
    limits = limits_for(route)
    tokens = 0
    if request is not None and capacity.quota(current_app.config, provider).tokens_per_minute:
        tokens = capacity.estimate(request)
    code = try_acquire(tenant_id, job_id, limits, provider, tokens)
    if code == 1:
        return "stream"
    if route.overflow == "batch":  # decide() only leaves "batch" when the client allows async
        return "batch"
    waited = 0.0
    if route.overflow == "queue" and route.queue_timeout > 0:
        start = time.monotonic()
        deadline = start + route.queue_timeout
        pause = 0.02
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, pause * random.uniform(0.5, 1.5)))  # gevent-cooperative
            code = try_acquire(tenant_id, job_id, limits, provider, tokens)
            if code == 1:
                return "stream"
            pause = min(pause * 1.5, 0.25)
        waited = round(time.monotonic() - start, 1)
    raise _full_error(code, limits, waited, provider)


def overflow_route(route: Route) -> Route:
    """The route to record when a stream request overflowed to batch."""
    reason = f"{route.reason}; no stream slot free, client allows async"
    return replace(route, mode="batch", reason=reason[:500])


def release_stream_slot(job_id: str, client: redis.Redis | None = None) -> None:
    """Give back job_id's slot (idempotent); called by the worker when the job ends.

    `client` may be a pipeline, to send the release with the caller's other commands.
    """
    leases.release_recorded(client or redis_store.client, job_key(job_id), job_id)


def settle_stream_tokens(
    job_id: str, provider: str, usage: Mapping[str, Any] | None, client: redis.Redis | None = None
) -> None:
    """Correct the job's count in its provider's tokens per minute to its usage (best effort).

    A no-op without a tokens-per-minute limit (or usage); `client` may be a pipeline.
    """
    total = (usage or {}).get("total_tokens")
    limited = capacity.quota(current_app.config, provider).tokens_per_minute
    if not limited or not isinstance(total, int):
        return
    windows.settle_recorded(client or redis_store.client, job_key(job_id), total)


def renew_stream_slot(job_id: str, client: redis.Redis | None = None) -> None:
    """Extend job_id's slot lease; called by the worker while the job runs.

    A no-op once the slot was released (or its record expired), so a late renew can
    never resurrect a finished job's slot. `client` may be a pipeline.
    """
    ttl = leases.ms(current_app.config["STREAM_LEASE_SECONDS"])
    record = job_key(job_id)
    leases.renew_recorded(client or redis_store.client, record, job_id, ttl, JOB_KEY_GRACE_MS)


def usage(tenant_id: str | None = None) -> dict[str, int]:
    """Live slot counts (expired leases excluded), for the dashboard and tests."""
    client = redis_store.client
    out = {"global": leases.live_count(client, GLOBAL_KEY)}
    if tenant_id is not None:
        out["tenant"] = leases.live_count(client, tenant_key(tenant_id))
    return out
