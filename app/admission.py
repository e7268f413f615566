"""Admission control for the stream channel: concurrent-stream slots held as Redis leases.

Each scope (all streams, one tenant's streams) is a sorted set of job ids scored by lease
expiry (Redis server time, ms). Taking a slot is one Lua script that first drops expired
members, so a holder that dies stops counting once its lease runs out. The holder (the
worker) renews while it runs and releases when the job ends.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace

from flask import current_app

from app.errors import APIError
from app.extensions import redis_store
from app.policy import Route, current_policy

log = logging.getLogger(__name__)

PREFIX = "sluice:slots"
GLOBAL_KEY = f"{PREFIX}:all"
JOB_KEY_GRACE_MS = 60_000  # the job -> tenant record outlives the lease, for late renews

# KEYS: global, tenant, job. ARGV: ttl_ms, global_max, tenant_max, job_id, tenant_id, grace_ms
# Returns {1, global_count, tenant_count} when held, {0, ...} global full, {-1, ...} tenant full.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local gmax, tmax = tonumber(ARGV[2]), tonumber(ARGV[3])
local job, tenant = ARGV[4], ARGV[5]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], job)
local g = redis.call('ZCARD', KEYS[1])
local n = redis.call('ZCARD', KEYS[2])
if not held then
  if gmax > 0 and g >= gmax then return {0, g, n} end
  if tmax > 0 and n >= tmax then return {-1, g, n} end
  g, n = g + 1, n + 1
end
redis.call('ZADD', KEYS[1], now + ttl, job)
redis.call('ZADD', KEYS[2], now + ttl, job)
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
redis.call('SET', KEYS[3], tenant, 'PX', ttl + tonumber(ARGV[6]))
return {1, g, n}
"""

# KEYS: global, job. ARGV: ttl_ms, job_id, grace_ms, tenant_prefix. Renews only a live holder.
_RENEW = """
local tenant = redis.call('GET', KEYS[2])
if not tenant then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local tkey = ARGV[4] .. tenant
for _, key in ipairs({KEYS[1], tkey}) do
  redis.call('ZADD', key, now + ttl, ARGV[2])
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
redis.call('PEXPIRE', KEYS[2], ttl + tonumber(ARGV[3]))
return 1
"""

# KEYS: global, job. ARGV: job_id, tenant_prefix.
_RELEASE = """
local tenant = redis.call('GET', KEYS[2])
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if tenant then redis.call('ZREM', ARGV[2] .. tenant, ARGV[1]) end
redis.call('DEL', KEYS[2])
return removed
"""


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


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def try_acquire(tenant_id: str, job_id: str, limits: Limits) -> tuple[int, int, int]:
    """One atomic attempt: (1 held | 0 global full | -1 tenant full, global count, tenant count)."""
    ttl = _ms(current_app.config["STREAM_SLOT_QUEUED_SECONDS"])
    result = redis_store.client.eval(
        _ACQUIRE,
        3,
        GLOBAL_KEY,
        tenant_key(tenant_id),
        job_key(job_id),
        ttl,
        limits.global_max,
        limits.tenant_max,
        job_id,
        tenant_id,
        JOB_KEY_GRACE_MS,
    )
    return int(result[0]), int(result[1]), int(result[2])


def _full_error(code: int, counts: tuple[int, int], limits: Limits, waited: float) -> APIError:
    if code == 0:
        message = f"All {limits.global_max} stream slots are busy"
    else:
        message = f"This tenant already has {limits.tenant_max} concurrent streams (its limit)"
    message += f"; waited {waited:g}s. Retry shortly" if waited else ". Retry shortly"
    message += ", or send `Prefer: respond-async` to run it in the background."
    return APIError(
        429,
        message,
        code="stream_capacity_exceeded",
        headers={"Retry-After": "1"},
        extra={"scope": "global" if code == 0 else "tenant"},
    )


def acquire_stream_slot(route: Route, tenant_id: str, job_id: str) -> str:
    """Take a slot for job_id or decide the overflow; returns "stream" or "batch".

    Raises APIError(429, with Retry-After) when the route's overflow is reject (or queue,
    after waiting) and no slot is free. A route whose mode is not stream needs no slot.
    """
    if route.mode != "stream":
        return route.mode
    limits = limits_for(route)
    code, g, n = try_acquire(tenant_id, job_id, limits)
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
            code, g, n = try_acquire(tenant_id, job_id, limits)
            if code == 1:
                return "stream"
            pause = min(pause * 1.5, 0.25)
        waited = round(time.monotonic() - start, 1)
    raise _full_error(code, (g, n), limits, waited)


def overflow_route(route: Route) -> Route:
    """The route to record when a stream request overflowed to batch."""
    reason = f"{route.reason}; no stream slot free, client allows async"
    return replace(route, mode="batch", reason=reason[:500])


def release_stream_slot(job_id: str) -> None:
    """Give back job_id's slot (idempotent); called by the worker when the job ends."""
    redis_store.client.eval(_RELEASE, 2, GLOBAL_KEY, job_key(job_id), job_id, f"{PREFIX}:tenant:")


def renew_stream_slot(job_id: str) -> None:
    """Extend job_id's slot lease; called by the worker while the job runs.

    A no-op once the slot was released (or its record expired), so a late renew can
    never resurrect a finished job's slot.
    """
    ttl = _ms(current_app.config["STREAM_LEASE_SECONDS"])
    redis_store.client.eval(
        _RENEW, 2, GLOBAL_KEY, job_key(job_id), ttl, job_id, JOB_KEY_GRACE_MS, f"{PREFIX}:tenant:"
    )


def usage(tenant_id: str | None = None) -> dict[str, int]:
    """Live slot counts (expired leases excluded), for the dashboard and tests."""
    client = redis_store.client
    now_s, now_us = client.time()
    now = now_s * 1000 + now_us // 1000
    out = {"global": int(client.zcount(GLOBAL_KEY, f"({now}", "+inf"))}
    if tenant_id is not None:
        out["tenant"] = int(client.zcount(tenant_key(tenant_id), f"({now}", "+inf"))
    return out
