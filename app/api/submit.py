"""POST /v1/jobs: one entry point; the routing policy picks the stream or batch channel."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask.blueprints import BlueprintSetupState
from sqlalchemy import update

from app import admission, policy
from app.errors import APIError
from app.extensions import db
from app.models import Job, Tenant, new_id

bp = Blueprint("submit", __name__)

JOB_FIELDS = ("mode", "priority", "metadata", "document", "instructions")
MAX_METADATA_KEYS = 16


@bp.record_once
def _init_policy(state: BlueprintSetupState) -> None:
    """Validate the routing policy when the app is built (create_app raises ConfigError)."""
    policy.init_app(state.app)


@bp.after_request
def _route_header(response: Response) -> Response:
    """Every answer that got as far as a routing decision says which route it took."""
    route = g.get("sluice_route")
    if route is not None and "X-Sluice-Route" not in response.headers:
        response.headers["X-Sluice-Route"] = route.header
    return response


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise APIError(400, "The body must be a JSON object.", code="invalid_json")
    return body


def _validate(body: dict[str, Any]) -> dict[str, Any]:
    """Check the /v1/jobs fields and return the chat body to run (document -> messages)."""
    mode = body.get("mode", "auto")
    if mode not in policy.REQUESTED_MODES:
        raise APIError(400, f"mode must be one of {list(policy.REQUESTED_MODES)}", param="mode")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise APIError(400, "priority must be an integer", param="priority")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS
    ):
        raise APIError(
            400, f"metadata must be an object of at most {MAX_METADATA_KEYS} keys", param="metadata"
        )
    has_messages, has_document = "messages" in body, "document" in body
    if has_messages == has_document:
        raise APIError(400, "Send exactly one of messages or document.", param="messages")
    chat = {k: v for k, v in body.items() if k not in JOB_FIELDS}
    if has_document:
        document, instructions = body["document"], body.get("instructions")
        if not isinstance(document, str) or not document.strip():
            raise APIError(400, "document must be a non-empty string", param="document")
        if instructions is not None and not isinstance(instructions, str):
            raise APIError(400, "instructions must be a string", param="instructions")
        chat["messages"] = policy.document_messages(document, instructions)
    elif "instructions" in body:
        raise APIError(400, "instructions only applies with document", param="instructions")
    chat.pop("stream", None)
    chat.pop("stream_options", None)
    from app.services.chat_request import parse_chat_body

    # 400 naming the field, before routing
    parse_chat_body({**chat, "metadata": metadata}, current_app.config)
    return chat


def _tenant_name(tenant_id: str) -> str:
    tenant = db.session.get(Tenant, tenant_id)
    return tenant.name if tenant is not None else tenant_id


def _mark(job_id: str, route: policy.Route, priority: int) -> None:
    """Record what the channel services don't: this endpoint, priority, the route."""
    db.session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            endpoint="/v1/jobs",
            priority=priority,
            route_rule=route.rule,
            route_reason=route.reason,
        )
    )
    db.session.commit()


def _accepted(job: Job, route: policy.Route, prefer_async: bool) -> Response:
    from app.services.jobs import job_object

    response = jsonify(job_object(job))
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if prefer_async:
        response.headers["Preference-Applied"] = "respond-async"
    return response


def _run_batch(
    tenant_id: str, chat: dict[str, Any], route: policy.Route, body: dict[str, Any]
) -> Response:
    from app.services.batches import submit_batch_job

    job = submit_batch_job(tenant_id, chat, route, metadata=body.get("metadata"))
    _mark(job.id, route, body.get("priority", 0))
    db.session.refresh(job)
    return _accepted(job, route, route.prefer_async)


def _run_stream(
    tenant_id: str, chat: dict[str, Any], route: policy.Route, body: dict[str, Any]
) -> Response:
    from app.api.chat import make_tail, sse_response
    from app.services.chat_request import parse_chat_body
    from app.services.jobs import start_stream_job
    from app.streams import ChunkRenderer, request_cancel

    parsed = parse_chat_body(
        {**chat, "stream": True, "metadata": body.get("metadata")}, current_app.config
    )
    job_id = new_id("job_")
    got = admission.acquire_stream_slot(route, tenant_id, job_id)
    if got == "batch":
        g.sluice_route = route = admission.overflow_route(route)
        return _run_batch(tenant_id, chat, route, body)
    try:
        job = start_stream_job(tenant_id, parsed, route, job_id=job_id)
    except BaseException:
        admission.release_stream_slot(job_id)
        raise
    _mark(job.id, route, body.get("priority", 0))
    tail = make_tail(job.id)
    db.session.remove()  # never hold a session across the relay
    renderer = ChunkRenderer(job.id, parsed.model, int(job.created_at.timestamp()), False)

    def on_close(finished: bool) -> None:
        if route.on_disconnect == "cancel" and not finished:
            request_cancel(tail.hub.client, job.id)

    headers = {
        "X-Sluice-Route": route.header,
        "X-Sluice-Job-Id": job.id,
        "Location": f"/v1/jobs/{job.id}",
    }
    return sse_response(tail, renderer, headers, on_close)


@bp.post("/jobs")
def submit_job() -> Response:
    """Route one job by the policy: SSE for stream, 202 + Location for batch."""
    body = _body()
    chat = _validate(body)
    prefer_async = policy.prefers_async(request.headers.get("Prefer"))
    req = policy.request_from_body(
        "/v1/jobs",
        {**body, "messages": chat["messages"]},
        tenant_id=g.tenant_id,
        tenant_name=_tenant_name(g.tenant_id),
        prefer_async=prefer_async,
    )
    route = policy.decide(req)
    g.sluice_route = route
    if route.mode == "reject":
        raise APIError(
            route.status,
            route.message,
            code="rejected_by_policy",
            extra={"rule": route.rule, "reason": route.reason},
        )
    if route.mode == "batch":
        return _run_batch(g.tenant_id, chat, route, body)
    return _run_stream(g.tenant_id, chat, route, body)
