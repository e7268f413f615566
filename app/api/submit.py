"""POST /v1/jobs: one entry point; the routing policy picks the stream or batch channel."""

from __future__ import annotations

from flask import Blueprint, Response, g

from app import policy
from app.api.chat import run_routed
from app.services import front_door
from app.services.job_request import JobRequest

bp = Blueprint("submit", __name__)


@bp.post("/jobs")
def submit_job() -> Response:
    """Route one job by the policy: SSE for stream, 202 + Location for batch."""
    job = front_door.parse_body(JobRequest)
    chat = job.request
    prefer = front_door.preferences()
    req = policy.request_from_body(
        "/v1/jobs",
        {
            "model": job.model,
            "messages": chat.messages,
            "mode": job.mode,
            "stream": job.stream,
            "priority": job.priority,
            "metadata": job.metadata,
        },
        tenant_id=g.tenant_id,
        tenant_name=g.api_key.tenant.name,
        prefer_async=prefer.respond_async,
    )
    route = front_door.route(req)
    return run_routed(
        g.tenant_id, chat, route, endpoint="/v1/jobs", priority=job.priority, prefer=prefer
    )
