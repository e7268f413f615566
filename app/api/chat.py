"""/v1/chat/completions: OpenAI-compatible chat, run as a stream job and relayed over SSE."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue

from app.admission import acquire_stream_slot, overflow_route, release_stream_slot
from app.errors import APIError
from app.extensions import db
from app.models import Job, new_id
from app.policy import Route, RouteRequest, decide, prefers_async
from app.providers import ChatRequest
from app.services.batches import submit_batch_job
from app.services.chat_request import parse_chat_request
from app.services.jobs import completion_object, job_object, start_stream_job
from app.streams import (
    ChunkRenderer,
    StreamHub,
    Tail,
    collect,
    hub_for,
    request_cancel,
    sse_stream,
)

bp = Blueprint("chat", __name__)
log = logging.getLogger(__name__)

_ERROR_STATUS = {
    "invalid_request_error": 400,
    "rate_limit_error": 429,
    "cancelled": 409,
    "upstream_error": 502,
}


def hub() -> StreamHub:
    """This process's stream hub (one pub/sub connection, a bounded read pool)."""
    config = current_app.config
    return hub_for(config["REDIS_URL"], int(config["STREAM_RELAY_REDIS_CONNECTIONS"]))


def lost_checker(app: Flask) -> Callable[[str], bool]:
    """For a relay: fail a job whose worker lease lapsed (runs outside the request)."""

    def check(job_id: str) -> bool:
        from app.services.stream_runner import fail_lost_job

        with app.app_context():
            try:
                return fail_lost_job(job_id)
            except Exception:
                log.exception("could not check the lease of job %s", job_id)
                return False

    return check


def make_tail(job_id: str, *, after: str = "0-0", running: bool = False) -> Tail:
    config = current_app.config
    return Tail(
        hub(),
        job_id,
        after=after,
        lease_seconds=float(config["STREAM_LEASE_SECONDS"]),
        ping_seconds=float(config["STREAM_PING_SECONDS"]),
        running=running,
        check_lost=lost_checker(current_app._get_current_object()),  # type: ignore[attr-defined]
    )


def sse_response(
    tail: Tail, renderer: ChunkRenderer, headers: dict[str, str], on_close: Callable[[bool], None]
) -> Response:
    """The SSE response for a job's log, with the anti-buffering headers."""
    body = sse_stream(tail, renderer, int(current_app.config["STREAM_RETRY_MS"]), on_close)
    response = Response(body, content_type="text/event-stream; charset=utf-8")
    response.headers.update(headers)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _ignore(_finished: bool) -> None:
    """A client that goes away detaches; the job runs on."""


def on_disconnect(action: str, tail: Tail) -> Callable[[bool], None]:
    """What the relay does when its client goes before the end: detach, or cancel the job."""
    if action != "cancel":
        return _ignore
    client = tail.hub.client

    def cancel(finished: bool) -> None:
        if not finished:
            request_cancel(client, tail.job_id)

    return cancel


@bp.post("/chat/completions")
def chat_completions() -> ResponseReturnValue:
    raw = request.get_json(silent=True)
    if raw is None:
        raise APIError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        )
    body = parse_chat_request(raw)
    tenant_id: str = g.tenant_id
    route = decide(
        RouteRequest(
            endpoint="/v1/chat/completions",
            tenant_id=tenant_id,
            tenant_name=g.api_key.tenant.name,
            model=body.model,
            stream=body.stream,
            prefer_async=prefers_async(request.headers.get("Prefer")),
            input_tokens=body.input_tokens(),
            metadata=dict(body.metadata or {}),
        )
    )
    g.sluice_route = route
    return run_routed(tenant_id, body, route, endpoint="/v1/chat/completions")


def accepted_response(job: Job, route: Route) -> Response:
    """202 for a job routed to the batch channel: the job object and where to poll it."""
    response = jsonify(job_object(job))
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["X-Sluice-Route"] = route.header
    response.headers["X-Sluice-Job-Id"] = job.id
    if route.prefer_async:
        response.headers["Preference-Applied"] = "respond-async"
    return response


def run_routed(
    tenant_id: str, body: ChatRequest, route: Route, *, endpoint: str, priority: int = 0
) -> Response:
    """Run a routed chat body: SSE (or one completion) for stream, 202 for batch."""
    if route.mode == "reject":
        raise APIError(
            route.status,
            route.message or route.reason,
            code="rejected_by_policy",
            headers={"X-Sluice-Route": route.header},
            extra={"rule": route.rule, "reason": route.reason},
        )
    job_id = new_id("job_")
    if route.mode == "stream" and acquire_stream_slot(route, tenant_id, job_id) == "batch":
        route = g.sluice_route = overflow_route(route)
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
        )
        return accepted_response(job, route)
    try:
        job = start_stream_job(
            tenant_id, body, route, job_id=job_id, endpoint=endpoint, priority=priority
        )
    except BaseException:
        release_stream_slot(job_id)
        raise
    db.session.remove()  # never hold a session across the relay
    headers = {
        "X-Sluice-Route": route.header,
        "X-Sluice-Job-Id": job.id,
        "Location": f"/v1/jobs/{job.id}",
    }
    created = int(job.created_at.timestamp())
    tail = make_tail(job.id)
    if body.stream:
        renderer = ChunkRenderer(job.id, body.model, created, body.include_usage)
        return sse_response(tail, renderer, headers, on_disconnect(route.on_disconnect, tail))
    outcome = collect(tail)
    if outcome.error is not None:
        status = _ERROR_STATUS.get(str(outcome.error.get("type")), 500)
        response = jsonify({"error": outcome.error})
        response.status_code = status
        response.headers.update(headers)
        return response
    payload = completion_object(
        job.id, body.model, created, outcome.text, outcome.finish_reason, outcome.usage
    )
    response = jsonify(payload)
    response.headers.update(headers)
    return response
