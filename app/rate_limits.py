"""Rate limits per key and per tenant, and open event streams per tenant.

Requests and (estimated input) tokens per minute, per API key and per tenant, counted in
fixed one-minute windows in Redis. Every job-creating request (the front doors' one
`front_door.route`) is checked with one Lua call that tests all four counters and counts
the request only if none is over, so a refused request costs nothing and the check is one
round trip; with every limit 0 (the default) there is none. A refusal is OpenAI's 429
(`type` "requests" or "tokens", code `rate_limit_exceeded`, `Retry-After`), and answers of
a checked request carry OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
headers for the tightest limit of each kind.

Open SSE connections of a tenant (job resumes and batch event streams) hold a lease each
(`app.leases`), at most TENANT_MAX_EVENT_STREAMS at once (0, the default: no limit and no
lease), released when the connection ends.

Defaults are the [sluice] settings; `[rate_limits.tenants.NAME]` overrides any of them
for one tenant (by name).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from flask import Response, current_app, g, has_request_context
from sqlalchemy import select

from app import leases
from app.config import RATE_LIMIT_SETTINGS
from app.errors import APIError
from app.extensions import current_flask_app, db, redis_store
from app.models import Tenant
from app.policy import RouteRequest

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
PREFIX = "sluice:ratelimit:"
EVENT_STREAMS = "sluice:event-streams:"
EVENT_STREAM_LEASE_SECONDS = 30.0

# KEYS: counters. ARGV: limit_1, cost_1, ... A counter over its limit with this cost refuses
# the request: {i, used_i}. Otherwise every cost is added: {0, used_1..used_n}.
CHECK = f"""
local used = {{}}
for i = 1, #KEYS do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used[i] + tonumber(ARGV[2 * i]) > tonumber(ARGV[2 * i - 1]) then
    return {{i, used[i]}}
  end
end
for i = 1, #KEYS do
  local cost = tonumber(ARGV[2 * i])
  if cost > 0 then
    used[i] = redis.call('INCRBY', KEYS[i], cost)
    if used[i] == cost then redis.call('EXPIRE', KEYS[i], {WINDOW_SECONDS + 5}) end
  end
end
return {{0, unpack(used)}}
"""


def limits_for(tenant_name: str | None) -> dict[str, int]:
    """The rate-limit settings (lower-case names) in force for a tenant."""
    config = current_app.config
    values = {name: int(config[name.upper()]) for name in RATE_LIMIT_SETTINGS}
    overrides: dict[str, dict[str, int]] = config.get("RATE_LIMITS") or {}
    if overrides and tenant_name is not None:
        values.update(overrides.get(tenant_name, {}))
    return values


@dataclass(frozen=True)
class Counter:
    kind: str  # "requests" | "tokens"
    scope: str  # "key" | "tenant"
    limit: int
    cost: int
    key: str


def _counters(req: RouteRequest, key_id: str, window: int) -> list[Counter]:
    limits = limits_for(req.tenant_name)
    tokens = max(0, req.input_tokens)
    found = []
    for kind, cost in (("requests", 1), ("tokens", tokens)):
        for scope, owner in (("key", key_id), ("tenant", req.tenant_id)):
            limit = limits[f"{scope}_{kind}_per_minute"]
            if limit > 0:
                found.append(Counter(kind, scope, limit, cost, f"{PREFIX}{kind}:{owner}:{window}"))
    return found


def check(req: RouteRequest) -> None:
    """Count a job-creating request against its key's and tenant's limits, or answer 429."""
    api_key = g.get("api_key") if has_request_context() else None
    if api_key is None:
        return
    now = time.time()
    counters = _counters(req, api_key.id, int(now // WINDOW_SECONDS))
    if not counters:
        return
    args: list[int] = []
    for counter in counters:
        args += [counter.limit, counter.cost]
    result = redis_store.client.eval(CHECK, len(counters), *(c.key for c in counters), *args)
    reset = WINDOW_SECONDS - now % WINDOW_SECONDS
    if int(result[0]):
        counter = counters[int(result[0]) - 1]
        raise _refusal(counter, int(result[1]), reset)
    used = [int(n) for n in result[1:]]
    g.rate_limit_headers = _headers(counters, used, reset)


def _refusal(counter: Counter, used: int, reset: float) -> APIError:
    unit = "RPM" if counter.kind == "requests" else "TPM"
    what = "this API key" if counter.scope == "key" else "this tenant"
    setting = f"{counter.scope}_{counter.kind}_per_minute"
    headers = _headers([counter], [used], reset)
    headers["Retry-After"] = str(max(1, math.ceil(reset)))
    return APIError(
        429,
        f"Rate limit reached for {counter.kind} per min ({unit}) of {what}: Limit "
        f"{counter.limit}, Used {used}, Requested {counter.cost}. Please try again in "
        f"{_duration(reset)}. (SLUICE_{setting.upper()}, or {setting} in "
        "[rate_limits.tenants.NAME])",
        code="rate_limit_exceeded",
        type=counter.kind,
        headers=headers,
    )


def _headers(counters: list[Counter], used: list[int], reset: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers: for each kind, the limit with the least left."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        pairs = [(c.limit - u, c) for c, u in zip(counters, used, strict=True) if c.kind == kind]
        if not pairs:
            continue
        remaining, counter = min(pairs, key=lambda pair: pair[0])
        headers[f"x-ratelimit-limit-{kind}"] = str(counter.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
        headers[f"x-ratelimit-reset-{kind}"] = _duration(reset)
    return headers


def _duration(seconds: float) -> str:
    """As OpenAI writes a reset: "1s", "17.25s", "6m0s"."""
    seconds = math.ceil(seconds * 1000) / 1000
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def add_headers(response: Response) -> Response:
    """after_request of /v1: the x-ratelimit-* headers of a checked request."""
    for name, value in (g.get("rate_limit_headers") or {}).items():
        response.headers.setdefault(name, value)
    return response


def _renewer() -> leases.Renewer:
    app = current_flask_app()
    renewer: leases.Renewer | None = app.extensions.get("sluice_event_streams")
    if renewer is None:
        renewer = app.extensions["sluice_event_streams"] = leases.Renewer(
            redis_store.client, EVENT_STREAM_LEASE_SECONDS, live_only=True
        )
    return renewer


def event_stream(build: Callable[[], Response]) -> Response:
    """The SSE response `build` makes, holding one of the tenant's event-stream slots
    until the connection ends; 429 naming the limit when the tenant has none free."""
    tenant_id: str = g.tenant_id
    limit = limits_for(_tenant_name(tenant_id))["tenant_max_event_streams"]
    if limit <= 0:
        return build()
    renewer = _renewer()
    key, member = EVENT_STREAMS + tenant_id, uuid.uuid4().hex
    full, counts = leases.acquire(
        renewer.client, [key], member, leases.ms(renewer.seconds), [limit]
    )
    if full:
        raise APIError(
            429,
            f"Too many open event streams for this tenant: {counts[0]} of at most {limit} "
            "(SLUICE_TENANT_MAX_EVENT_STREAMS, or tenant_max_event_streams in "
            "[rate_limits.tenants.NAME]). Close one, or poll.",
            code="too_many_event_streams",
            type="requests",
            headers={"Retry-After": "1"},
        )
    renewer.hold(key, member)

    def release() -> None:
        renewer.drop(member)
        try:
            leases.release(renewer.client, key, member)
        except Exception:
            log.warning("could not release event stream slot %s; it lapses on its own", member)

    try:
        response = build()
    except BaseException:
        release()
        raise
    response.call_on_close(release)
    return response


def _tenant_name(tenant_id: str) -> str | None:
    """The tenant's name, read (on a short connection of its own: the SSE views have let
    their session go) only when some tenant has limits of its own."""
    if not current_app.config.get("RATE_LIMITS"):
        return None
    with db.engine.connect() as conn:
        name = conn.execute(select(Tenant.name).where(Tenant.id == tenant_id)).scalar()
    return str(name) if name is not None else None
