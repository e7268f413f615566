"""POST /v1/jobs: one entry point; the routing policy picks the stream or batch channel."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, request
from flask.blueprints import BlueprintSetupState

from app import policy
from app.api.chat import run_routed
from app.errors import APIError
from app.extensions import db
from app.models import Tenant
from app.providers import ChatRequest
from app.services.chat_request import parse_chat_request

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


def _validate(body: dict[str, Any]) -> ChatRequest:
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
    chat.pop("stream_options", None)
    # 400 naming the field, before routing; a stream route always answers SSE
    return parse_chat_request({**chat, "stream": True, "metadata": metadata})


def _tenant_name(tenant_id: str) -> str:
    tenant = db.session.get(Tenant, tenant_id)
    return tenant.name if tenant is not None else tenant_id


@bp.post("/jobs")
def submit_job() -> Response:
    """Route one job by the policy: SSE for stream, 202 + Location for batch."""
    body = _body()
    chat = _validate(body)
    prefer_async = policy.prefers_async(request.headers.get("Prefer"))
    req = policy.request_from_body(
        "/v1/jobs",
        {**body, "messages": chat.messages},
        tenant_id=g.tenant_id,
        tenant_name=_tenant_name(g.tenant_id),
        prefer_async=prefer_async,
    )
    route = policy.decide(req)
    g.sluice_route = route
    return run_routed(
        g.tenant_id, chat, route, endpoint="/v1/jobs", priority=body.get("priority", 0)
    )
