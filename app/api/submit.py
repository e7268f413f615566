"""POST /v1/jobs: one entry point; the routing policy picks the stream or batch channel."""

from __future__ import annotations

from flask import Blueprint, Response, g

from app import policy
from app.api.chat import run_routed
from app.services import front_door
from app.services.jobs import parse_job_body

bp = Blueprint("submit", __name__)


@bp.post("/jobs")
def submit_job() -> Response:
    """Route one job by the policy: SSE for stream, 202 + Location for batch."""
    body = front_door.json_body()
    chat = parse_job_body(body)
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
