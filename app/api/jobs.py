"""/v1/jobs: read, list, follow (SSE, resumable) and cancel the tenant's jobs."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flask import Blueprint, Response, g, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from app import rate_limits
from app.api.chat import make_tail, on_disconnect, sse_response
from app.errors import APIError
from app.extensions import db
from app.models import Job, epoch
from app.models.job import MODES, STATUSES, TERMINAL
from app.pagination import fetch_page, list_object, page_params
from app.services.front_door import wait_for_job
from app.services.jobs import cancel_background_job, job_object
from app.services.stream_runner import CANCELLED_ERROR, cancel_queued_job, db_text
from app.streams.entries import Generation, entry_key, is_terminal
from app.streams.hub import current_hub
from app.streams.keys import log_key
from app.streams.render import ChunkRenderer
from app.streams.writer import read_all, request_cancel

bp = Blueprint("jobs", __name__)

_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
CANCEL_WAIT_SECONDS = 3.0


def get_job(job_id: str) -> Job:
    """The caller's job, or 404 (another tenant's job does not exist for the caller)."""
    job = db.session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == g.tenant_id))
    if job is None:
        raise APIError(404, f"No job found with id '{job_id}'.", param="id", code="not_found")
    return job


@bp.get("/jobs")
def list_jobs() -> ResponseReturnValue:
    args = request.args
    stmt = select(Job).where(Job.tenant_id == g.tenant_id)
    mode = args.get("mode")
    if mode:
        if mode not in MODES:
            raise APIError(400, f"'mode' must be one of {', '.join(MODES)}.", param="mode")
        stmt = stmt.where(Job.mode == mode)
    status = args.get("status")
    if status:
        if status not in STATUSES:
            raise APIError(400, f"'status' must be one of {', '.join(STATUSES)}.", param="status")
        stmt = stmt.where(Job.status == status)
    limit, after = page_params(args)
    page, has_more = fetch_page(stmt, Job.id, limit=limit, after=after)
    return list_object([job_object(job) for job in page], has_more)


@bp.get("/jobs/<job_id>")
def show_job(job_id: str) -> ResponseReturnValue:
    job = get_job(job_id)
    if job.mode != "stream" or job.status in TERMINAL:
        return job_object(job)
    # Live: the text so far is the log's; a log that has ended is ahead of its row (the
    # worker writes the log's end first), so the job is shown as the log ended it.
    entries = read_all(current_hub().client, job.id)
    generation = Generation.of(entries)
    if generation.status is None:
        return job_object(job, output=generation.text or None)
    db.session.expunge(job)  # shown, never written back

    def at(entry_id: str) -> datetime:  # an entry id is the time it was written
        moment = datetime.fromtimestamp(entry_key(entry_id)[0] / 1000, UTC)
        return moment if job.created_at.tzinfo else moment.replace(tzinfo=None)

    job.finished_at = at(entries[-1][0])
    if job.first_token_at is None and len(entries) > 1:
        job.first_token_at = at(entries[0][0])
    job.status = generation.status
    job.output = db_text(generation.text) if generation.choices else job.output  # as the row will
    job.error = generation.error
    if generation.error is None:
        job.finish_reason = generation.finish_reason
        job.usage = generation.usage
        job.choices = generation.stored_choices()
    return job_object(job)


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> ResponseReturnValue:
    last = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or None
    if last is not None:
        last = last.strip()
        if not _ENTRY_ID.match(last) or max(entry_key(last)) >= 2**64:
            raise APIError(
                400, f"'last_event_id' is not an event id: {last!r}.", param="last_event_id"
            )
    job = get_job(job_id)
    headers = {"X-Sluice-Job-Id": job.id, "Location": f"/v1/jobs/{job.id}"}
    if job.mode != "stream":
        return Response(status=204, headers=headers)
    client = current_hub().client
    if job.status in TERMINAL or last is not None:
        pipe = client.pipeline(transaction=False)
        pipe.exists(log_key(job.id))
        pipe.xrevrange(log_key(job.id), count=1)
        exists, newest = pipe.execute()
        end = entry_key(newest[0][0]) if newest else (0, 0)
        # the log ends before the row does (the worker writes the row next): a client that
        # has the terminal entry has seen the end whatever the row says yet
        ended = bool(newest) and is_terminal(newest[0][1])
        if (exists or not (job.status in TERMINAL or ended)) and (
            last is not None and entry_key(last) > end
        ):  # no client saw such an id
            raise APIError(
                400, f"'last_event_id' {last} is past the end of the stream.", param="last_event_id"
            )
        if job.status in TERMINAL or ended:
            if not exists:
                return Response(status=204, headers=headers)  # the log expired: read the job
            if last is not None and end <= entry_key(last):
                return Response(status=204, headers=headers)  # the client has seen the end
    include_usage = bool(((job.request or {}).get("stream_options") or {}).get("include_usage"))
    created = epoch(job.created_at)
    renderer = ChunkRenderer(job.id, job.model, created, include_usage)
    renderer.resumed = last is not None
    tail = make_tail(job.id, after=last or "0-0", running=job.status != "queued")
    db.session.remove()
    return rate_limits.event_stream(
        lambda: sse_response(tail, renderer, headers, on_disconnect(job.on_disconnect, tail))
    )


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> ResponseReturnValue:
    job = get_job(job_id)
    if job.status in TERMINAL:
        return job_object(job)
    if job.mode == "stream":
        request_cancel(current_hub().client, job.id)
        if job.status == "queued":
            cancel_queued_job(job.id)  # lost the race? the worker sees the flag instead
    else:
        if not cancel_background_job(job.id, CANCELLED_ERROR):
            raise APIError(
                409, "This background job is already running and cannot be stopped.", param="id"
            )
    return job_object(wait_for_job(job.id, CANCEL_WAIT_SECONDS) or job)
