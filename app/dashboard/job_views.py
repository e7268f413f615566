"""The job page and the playground: the /v1 job views, called for an admin's session.

No second implementation: each route loads the job across tenants (the dashboard is
admin-only), takes the job's tenant (or, in the playground, the admin key's own) as the
caller, and answers with the very view a client of /v1 gets: `GET /v1/jobs/{id}` (live
text while running), the resumable SSE relay of `/v1/jobs/{id}/events`, the cancel, the
model list and `POST /v1/jobs`.
"""

from __future__ import annotations

from typing import Any

from flask import g, render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from app.api import jobs as jobs_api
from app.api import models as models_api
from app.api import submit as submit_api
from app.dashboard import access, queries
from app.dashboard.views import bp
from app.errors import APIError
from app.extensions import db
from app.models import ApiKey, Job, Tenant
from app.services import front_door

# A header a cross-site form cannot send: the dashboard's POSTs carry it (CSRF guard).
CSRF_HEADER = "X-Sluice-Dashboard"


def _job_or_404(job_id: str) -> Job:
    if len(job_id) > front_door.MAX_ID_CHARS or "\x00" in job_id:
        raise APIError(404, "No job with that id.", param="job_id", code="not_found")
    job = db.session.get(Job, job_id)
    if job is None:
        raise APIError(404, f"No job found with id '{job_id}'.", param="job_id", code="not_found")
    return job


def _act_as_tenant_of(job: Job) -> None:
    """The /v1 views scope by g.tenant_id: the admin reads this job as its tenant would."""
    admin = access.current_admin()
    assert admin is not None  # the blueprint's before_request saw to it
    g.api_key = admin
    g.tenant_id = job.tenant_id


def _act_as_admin() -> ApiKey:
    """The playground runs as the signed-in admin key itself (its own tenant)."""
    admin = access.current_admin()
    assert admin is not None
    g.api_key = admin
    g.tenant_id = admin.tenant_id
    return admin


def _csrf() -> None:
    if request.headers.get(CSRF_HEADER) != "1":
        raise APIError(403, f"Dashboard requests need the {CSRF_HEADER} header.", code="forbidden")


def job_details(job_id: str) -> dict[str, Any]:
    """`GET /v1/jobs/{id}`'s object plus what only operators see (tenant, request, timeline)."""
    job = _job_or_404(job_id)
    _act_as_tenant_of(job)
    tenant = db.session.scalar(select(Tenant.name).where(Tenant.id == job.tenant_id))
    request_body = job.request
    extra = {
        "tenant": tenant,
        "tenant_id": job.tenant_id,
        "priority": job.priority,
        "item_index": job.item_index,
        "request": request_body,
        "choices": job.choices,
        "timeline": {
            "created_at": queries.iso(job.created_at),
            "started_at": queries.iso(job.started_at),
            "first_token_at": queries.iso(job.first_token_at),
            "finished_at": queries.iso(job.finished_at),
        },
    }
    shown = jobs_api.show_job(job_id)
    body: dict[str, Any] = shown if isinstance(shown, dict) else {}
    return body | extra


@bp.get("/jobs/<job_id>")
def job_page(job_id: str) -> ResponseReturnValue:
    try:
        details = job_details(job_id)
    except APIError as exc:
        if exc.status != 404:
            raise
        return render_template("job.html", job=None, job_id=job_id[:64]), 404
    return render_template("job.html", job=details, job_id=job_id)


@bp.get("/api/jobs/<job_id>")
def api_job(job_id: str) -> ResponseReturnValue:
    return job_details(job_id)


@bp.get("/api/jobs/<job_id>/events")
def api_job_events(job_id: str) -> ResponseReturnValue:
    """The job's SSE relay, exactly as `/v1/jobs/{id}/events` (Last-Event-ID resumes)."""
    _act_as_tenant_of(_job_or_404(job_id))
    return jobs_api.job_events(job_id)


@bp.post("/api/jobs/<job_id>/cancel")
def api_job_cancel(job_id: str) -> ResponseReturnValue:
    _csrf()
    _act_as_tenant_of(_job_or_404(job_id))
    return jobs_api.cancel_job(job_id)


@bp.get("/playground")
def playground() -> ResponseReturnValue:
    admin = _act_as_admin()
    tenant = db.session.get(Tenant, admin.tenant_id)
    return render_template("playground.html", tenant=tenant.name if tenant else "")


@bp.get("/api/models")
def api_models() -> ResponseReturnValue:
    """`GET /v1/models`, for the playground's model picker."""
    _act_as_admin()
    return models_api.list_models()


@bp.post("/api/playground/jobs")
def api_playground_submit() -> ResponseReturnValue:
    """`POST /v1/jobs` as the admin key's tenant: SSE for a stream route, 202 for batch."""
    _csrf()
    _act_as_admin()
    front_door.bound_request()
    response = submit_api.submit_job()
    route = g.get("sluice_route")
    if route is not None:
        response.headers.setdefault("X-Sluice-Route", route.header)
    return response
