"""Rate limits per key and per tenant, and open event streams per tenant.

Requests and (estimated input) tokens per minute, per API key and per tenant: four
flask-limiter shared limits (`app.extensions.limiter`, fixed one-minute windows in Redis
that start at a counter's first hit), their values read per request from the tenant's
settings, the tokens limits costing the request's estimated input tokens. Every
job-creating request (the front doors' one `front_door.route`) calls `check`, which
lets flask-limiter count it against each limit in force (one Redis call a limit) and
reads the windows back for the headers (one more, pipelined); with every limit 0 (the
default) there is no Redis call. A refusal gives back what the request was counted and
answers OpenAI's 429 (`type` "requests" or "tokens", code `rate_limit_exceeded`,
`Retry-After`); answers of a checked request carry OpenAI's
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers for the tightest limit of
each kind.

Open SSE connections of a tenant (job resumes and batch event streams) hold a lease each
(`app.leases`: flask-limiter counts hits in windows, not connections held open), at most
TENANT_MAX_EVENT_STREAMS at once (0, the default: no limit and no lease), released when
the connection ends.

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
from typing import cast

import redis
from flask import Response, current_app, g, has_request_context
from flask_limiter import RateLimitExceeded, RequestLimit, RouteLimit
from limits.storage import RedisStorage
from sqlalchemy import select

from app import leases
from app.config import RATE_LIMIT_SETTINGS
from app.errors import APIError
from app.extensions import current_flask_app, db, limiter, redis_store
from app.models import Tenant
from app.policy import RouteRequest

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
EVENT_STREAMS = "sluice:event-streams:"
EVENT_STREAM_LEASE_SECONDS = 30.0
COUNTED = tuple(name for name in RATE_LIMIT_SETTINGS if name.endswith("_per_minute"))


def limits_for(tenant_name: str | None) -> dict[str, int]:
    """The rate-limit settings (lower-case names) in force for a tenant."""
    config = current_app.config
    values = {name: int(config[name.upper()]) for name in RATE_LIMIT_SETTINGS}
    overrides: dict[str, dict[str, int]] = config.get("RATE_LIMITS") or {}
    if overrides and tenant_name is not None:
        values.update(overrides.get(tenant_name, {}))
    return values


@dataclass(frozen=True)
class Checked:
    """The request being checked (g.rate_limit): what the limits below read."""

    limits: dict[str, int]
    tokens: int
    key_id: str
    tenant_id: str


def _checked() -> Checked | None:
    return g.get("rate_limit") if has_request_context() else None


def _per_minute(setting: str) -> Callable[[], str]:
    """The limit string of one setting for the request being checked ("" when none)."""

    def value() -> str:
        checked = _checked()
        amount = checked.limits[setting] if checked else 0
        return f"{amount}/minute" if amount > 0 else ""

    return value


def _key_id() -> str:
    checked = _checked()
    return checked.key_id if checked else ""


def _tenant_id() -> str:
    checked = _checked()
    return checked.tenant_id if checked else ""


def _tokens() -> int:
    checked = _checked()
    return checked.tokens if checked else 0


@limiter.request_filter
def _not_checked() -> bool:
    """Only `check` is rate limited: flask-limiter's own before_request pass is exempt."""
    return _checked() is None


def _shared(setting: str) -> RouteLimit:
    """The limit of one setting ("key_requests_per_minute"), its counters shared by every
    front door, named by their scope ("requests:key")."""
    owner, kind = setting.split("_")[:2]
    return limiter.shared_limit(
        _per_minute(setting),
        f"{kind}:{owner}",
        key_func=_key_id if owner == "key" else _tenant_id,
        cost=_tokens if kind == "tokens" else 1,
    )


@_shared("tenant_tokens_per_minute")  # checked last
@_shared("key_tokens_per_minute")
@_shared("tenant_requests_per_minute")
@_shared("key_requests_per_minute")  # checked first
def _count() -> None:
    """Nothing: flask-limiter counts the request against the limits above as it calls this."""


def check(req: RouteRequest) -> None:
    """Count a job-creating request against its key's and tenant's limits, or answer 429."""
    api_key = g.get("api_key") if has_request_context() else None
    if api_key is None:
        return
    limits = limits_for(req.tenant_name)
    if not any(limits[name] > 0 for name in COUNTED):
        return
    g.rate_limit = Checked(limits, max(0, req.input_tokens), str(api_key.id), req.tenant_id)
    try:
        _count()
    except RateLimitExceeded:
        raise _refusal(limiter.current_limit, limiter.current_limits) from None
    finally:
        g.pop("rate_limit", None)
    counted = limiter.current_limits
    g.rate_limit_headers = _headers(counted, _windows(counted))


def _kind(limit: RequestLimit) -> tuple[str, str]:
    """("requests" | "tokens", "key" | "tenant") of one of the four limits."""
    kind, scope = limit.request_args[-1].split(":")
    return kind, scope


def _cost(limit: RequestLimit, tokens: int) -> int:
    return 1 if _kind(limit)[0] == "requests" else tokens


def _windows(limits: list[RequestLimit]) -> list[tuple[int, float]]:
    """(used, seconds to the reset) of each limit, all in one round trip: flask-limiter's
    RequestLimit.window takes two per limit, in whole seconds."""
    storage = limiter.storage
    if not isinstance(storage, RedisStorage):
        return [(lim.limit.amount - lim.remaining, lim.reset_at - time.time()) for lim in limits]
    pipe = cast(redis.Redis, storage.get_connection()).pipeline(transaction=False)
    for lim in limits:
        key = storage.prefixed_key(lim.key)
        pipe.get(key)
        pipe.pttl(key)
    replies = pipe.execute()
    found = []
    for used, ttl_ms in zip(replies[::2], replies[1::2], strict=True):
        reset = ttl_ms / 1000 if ttl_ms > 0 else float(WINDOW_SECONDS)
        found.append((int(used or 0), reset))
    return found


def _refusal(breached: RequestLimit | None, counted: list[RequestLimit]) -> APIError:
    """The 429 of the limit over, once every counter this request was added to gave it back."""
    assert breached is not None  # flask-limiter names the breached limit of a refusal
    tokens = _tokens()
    storage = limiter.storage
    for lim in counted:  # the breached one last (flask-limiter stops at the first breach)
        if storage.incr(lim.key, lim.limit.get_expiry(), amount=-_cost(lim, tokens)) < 0:
            storage.clear(lim.key)  # its window ended meanwhile: no credit for the next one
    ((used, reset),) = _windows([breached])
    kind, scope = _kind(breached)
    unit = "RPM" if kind == "requests" else "TPM"
    what = "this API key" if scope == "key" else "this tenant"
    setting = f"{scope}_{kind}_per_minute"
    headers = _headers([breached], [(used, reset)])
    headers["Retry-After"] = str(max(1, math.ceil(reset)))
    return APIError(
        429,
        f"Rate limit reached for {kind} per min ({unit}) of {what}: Limit "
        f"{breached.limit.amount}, Used {used}, Requested {_cost(breached, tokens)}. Please "
        f"try again in {_duration(reset)}. (SLUICE_{setting.upper()}, or {setting} in "
        "[rate_limits.tenants.NAME])",
        code="rate_limit_exceeded",
        type=kind,
        headers=headers,
    )


def _headers(limits: list[RequestLimit], windows: list[tuple[int, float]]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers: for each kind, the limit with the least left."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        pairs = [
            (lim.limit.amount - used, lim.limit.amount, reset)
            for lim, (used, reset) in zip(limits, windows, strict=True)
            if _kind(lim)[0] == kind
        ]
        if not pairs:
            continue
        remaining, amount, reset = min(pairs)
        headers[f"x-ratelimit-limit-{kind}"] = str(amount)
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
