"""The one path behind every front door (chat, jobs, document batches, OpenAI batches).

Routing (the policy, then admission for a stream slot), the `Idempotency-Key` (scoped by
batch kind), `Prefer` (RFC 7240) and turning a policy reject into an error each live here
once; the views parse their own bodies and shape their own answers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flask import current_app, g, has_request_context, request
from pydantic import BaseModel
from werkzeug.exceptions import RequestEntityTooLarge

from app import limits, rate_limits, validation
from app.admission import acquire_stream_slot, overflow_route, release_stream_slot
from app.errors import APIError
from app.extensions import db
from app.models import Batch, Job, new_id
from app.models.job import TERMINAL
from app.policy import Preferences, Route, RouteRequest, decide, parse_prefer
from app.providers import ChatRequest
from app.services.batches import find_by_idempotency_key, submit_batch_job
from app.services.capacity import provider_of
from app.services.costs import with_budget
from app.services.jobs import start_stream_job

M = TypeVar("M", bound=BaseModel)
MAX_IDEMPOTENCY_KEY = 255
MAX_WAIT_SECONDS = 300.0  # the longest `Prefer: wait=N` honoured
MAX_ID_CHARS = 200  # ids in URLs (jobs, batches, files, keys) are 40 characters
FORM_OVERHEAD = 1024 * 1024  # multipart boundaries and small fields around uploaded files
# endpoint -> (the setting that bounds its body, bytes allowed on top of it)
BODY_LIMITS = {
    "v1.document_batches.create": ("BATCH_MAX_REQUEST_BYTES", 0),
    "v1.files.upload_file": ("FILES_MAX_BYTES", FORM_OVERHEAD),
}


def json_body() -> dict[str, Any]:
    """The request's JSON object (under validation.loads' limits), or a 400/413 saying why."""
    if not request.is_json:
        raise APIError(
            400,
            "We could not parse the JSON body of your request: send Content-Type: "
            "application/json.",
            code="invalid_json",
        )
    try:
        data = request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise body_too_large() from None
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        raise body_too_large()  # a chunked body read up to the limit: Werkzeug stops there
    try:
        body = validation.loads(data)
    except validation.InvalidJSON as exc:
        code = exc.code or ("invalid_value" if exc.param else "invalid_json")
        raise APIError(400, exc.message, param=exc.param, code=code) from None
    except ValueError:
        raise APIError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def parse_body(model: type[M]) -> M:
    """The request's JSON object validated into its request model (a 400 naming the field)."""
    return validation.parse(model, json_body())


def body_limit(endpoint: str | None) -> int:
    """The most bytes a request body may have on this route (MAX_CONTENT_LENGTH elsewhere)."""
    if (configured := limits.configured_body_limit()) is not None:
        return configured  # [limits.body_bytes] of sluice.toml
    config = current_app.config
    setting = BODY_LIMITS.get(endpoint or "")
    limit: int = config[setting[0]] + setting[1] if setting else config["MAX_CONTENT_LENGTH"]
    return limit


def body_too_large() -> APIError:
    limit = request.max_content_length
    return APIError(
        413,
        f"The request body is larger than the {limit}-byte limit of {request.path}.",
        code="request_too_large",
    )


def bound_request() -> None:
    """Before a /v1 view: bound the body by its route's limit; refuse a NUL or overlong id."""
    # Werkzeug enforces the limit while reading, so a chunked body is bounded too
    request.max_content_length = body_limit(request.endpoint)
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and (len(value) > MAX_ID_CHARS or "\x00" in value):
            raise APIError(404, f"No object found with id {value[:64]!r}.", param=name)
    for name, value in request.args.items(multi=True):
        if "\x00" in value:
            raise APIError(400, f"'{name}' contains a NUL character.", param=name[:200])


def preferences() -> Preferences:
    """The request's `Prefer` header (RFC 7240)."""
    return parse_prefer(request.headers.get("Prefer"))


def route_request(endpoint: str, **fields: Any) -> RouteRequest:
    """A RouteRequest for the calling tenant."""
    return RouteRequest(
        endpoint=endpoint, tenant_id=g.tenant_id, tenant_name=g.api_key.tenant.name, **fields
    )


def rejection(route: Route) -> APIError:
    """The one error a policy reject answers with."""
    return APIError(
        route.status,
        route.message or route.reason,
        code="rejected_by_policy",
        headers={"X-Sluice-Route": route.header},
        extra={"rule": route.rule, "reason": route.reason},
    )


def remember(route: Route) -> Route:
    """Record the route for the `X-Sluice-Route` header of whatever answer follows."""
    if has_request_context():
        g.sluice_route = route
    return route


def route(req: RouteRequest) -> Route:
    """The policy's route for req; a reject is raised here as `rejection(route)`."""
    rate_limits.check(req)  # per key and tenant; no Redis call while no limit is set
    decided = remember(decide(with_budget(req)))  # #13: budget_left for budget_left_below
    if decided.mode == "reject":
        raise rejection(decided)
    return decided


def idempotency_key(kind: str, header: str | None) -> str | None:
    """What a batch stores for a caller's `Idempotency-Key`: scoped to its kind, fixed size.

    The same key sent to /v1/document-batches and /v1/batches names two different batches.
    """
    if not header:
        return None
    if len(header) > MAX_IDEMPOTENCY_KEY:
        raise APIError(
            400,
            f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters",
            param="Idempotency-Key",
        )
    return f"{kind}:{hashlib.sha256(header.encode('utf-8', 'surrogatepass')).hexdigest()}"


def replay(tenant_id: str, key: str | None) -> Batch | None:
    """The tenant's batch already created with this (scoped) key, if any."""
    return find_by_idempotency_key(tenant_id, key) if key else None


def check_same(batch: Batch, same: Callable[[Batch], bool]) -> None:
    """A 422 naming `Idempotency-Key` when `same(batch)` says the key's batch was created
    from other parameters (as Stripe and OpenAI do): a replay, or a concurrent create with
    the key that won the race and whose batch is the one returned."""
    if batch.idempotency_key and not same(batch):
        raise APIError(
            422,
            "Keys for idempotent requests can only be used with the same parameters they "
            "were first used with: this Idempotency-Key was used with different parameters "
            f"(batch {batch.id}). Send a new key for a different request.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )


def start_chat_job(
    tenant_id: str,
    body: ChatRequest,
    route: Route,
    *,
    endpoint: str,
    priority: int = 0,
    job_id: str | None = None,
    before_send: Callable[[], object] | None = None,
    previous_response_id: str | None = None,
) -> tuple[Job, Route]:
    """Admit and start a routed chat job: a stream job holding a slot, or a background job.

    A stream route with no free slot overflows to batch when its rule allows it (the
    route returned says so) or raises admission's 429. `job_id` names a stream job ahead
    (its relay registered before); a stream job's task is sent after `before_send()`.
    """
    job_id = job_id or new_id("job_")
    provider = provider_of(body.model)  # the job counts in its share of the provider's capacity
    if (
        route.mode == "stream"
        and acquire_stream_slot(route, tenant_id, job_id, provider, body) == "batch"
    ):
        route = remember(overflow_route(route))
    if route.mode == "batch":
        record = body.to_record()
        record.pop("stream", None)
        record.pop("stream_options", None)
        job = submit_batch_job(
            tenant_id,
            record,
            route,
            metadata=body.metadata,
            endpoint=endpoint,
            priority=priority,
            previous_response_id=previous_response_id,
        )
        return job, route
    try:
        job = start_stream_job(
            tenant_id,
            body,
            route,
            job_id=job_id,
            endpoint=endpoint,
            priority=priority,
            before_send=before_send,
            previous_response_id=previous_response_id,
        )
    except BaseException:
        release_stream_slot(job_id)
        raise
    return job, route


def wait_for_job(job_id: str, seconds: float) -> Job | None:
    """Re-read the job until it ends or `seconds` pass (gevent-friendly polling)."""
    deadline = time.monotonic() + min(max(seconds, 0.0), MAX_WAIT_SECONDS)
    pause = 0.02
    while True:
        job = db.session.get(Job, job_id, populate_existing=True)
        left = deadline - time.monotonic()
        if job is None or job.status in TERMINAL or left <= 0:
            return job
        db.session.commit()  # end the read transaction, so the next read sees new commits
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, 0.2)
