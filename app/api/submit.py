"""POST /v1/jobs: one entry point; the routing policy picks the stream or batch channel."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g

from app import policy
from app.api.chat import run_routed
from app.errors import APIError
from app.providers import ChatRequest
from app.services import front_door
from app.services.chat_request import parse_chat_request

bp = Blueprint("submit", __name__)

JOB_FIELDS = ("mode", "priority", "metadata", "document", "instructions")
MAX_PRIORITY = 2**31 - 1  # the jobs.priority column is a 32-bit integer


def _validate(body: dict[str, Any]) -> ChatRequest:
    """Check the /v1/jobs fields and return the chat body to run (document -> messages)."""
    mode = body.get("mode", "auto")
    if mode not in policy.REQUESTED_MODES:
        raise APIError(400, f"mode must be one of {list(policy.REQUESTED_MODES)}", param="mode")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise APIError(400, "priority must be an integer", param="priority")
    if abs(priority) > MAX_PRIORITY:
        raise APIError(
            400, f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}", param="priority"
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
    return parse_chat_request({**chat, "stream": True, "metadata": body.get("metadata")})


@bp.post("/jobs")
def submit_job() -> Response:
    """Route one job by the policy: SSE for stream, 202 + Location for batch."""
    body = front_door.json_body()
    chat = _validate(body)
    prefer = front_door.preferences()
    req = policy.request_from_body(
        "/v1/jobs",
        {**body, "messages": chat.messages},
        tenant_id=g.tenant_id,
        tenant_name=g.api_key.tenant.name,
        prefer_async=prefer.respond_async,
    )
    route = front_door.route(req)
    return run_routed(
        g.tenant_id,
        chat,
        route,
        endpoint="/v1/jobs",
        priority=body.get("priority", 0),
        prefer=prefer,
    )
