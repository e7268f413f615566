"""/v1/responses: OpenAI's Responses API over the chat path (same policy, admission, jobs).

A Responses body is translated into a chat body (app.services.responses_request) and run
by run_routed like /v1/chat/completions; its answer is shaped as a `response` object, or
for `stream: true` as the Responses SSE events (app.streams.responses_render).
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, g, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from app import rate_limits
from app.api import jobs
from app.api.chat import make_tail, on_disconnect, run_routed, sse_response
from app.errors import APIError
from app.extensions import db
from app.models import Job
from app.models.job import TERMINAL
from app.pagination import list_object, page_params
from app.services import front_door
from app.services import responses_objects as objects
from app.services.responses_objects import generation_response, job_id_of, job_response
from app.services.responses_request import parse_responses_request
from app.streams.entries import Generation, is_terminal
from app.streams.hub import current_hub
from app.streams.keys import log_key
from app.streams.responses_render import ResponsesRenderer
from app.streams.writer import read_all

bp = Blueprint("responses", __name__)
ENDPOINT = "/v1/responses"


class ResponsesShape:
    """The /v1/responses answers of a chat job (chat.AnswerShape)."""

    def renderer(self, job: Job) -> ResponsesRenderer:
        return ResponsesRenderer(job)

    def completion(self, job: Job, outcome: Generation) -> dict[str, Any]:
        return generation_response(job, outcome)

    def accepted(self, job: Job) -> dict[str, Any]:
        return job_response(job)


@bp.post("/responses")
def create_response() -> ResponseReturnValue:
    raw = _resolve_references(front_door.json_body())
    previous = raw.get("previous_response_id") if isinstance(raw, dict) else None
    history = _history(previous) if isinstance(previous, str) else []
    body = parse_responses_request(raw, history)
    prefer = front_door.preferences()
    route = front_door.route(
        front_door.route_request(
            ENDPOINT,
            model=body.model,
            stream=body.stream,
            prefer_async=prefer.respond_async,
            input_tokens=body.input_tokens(),
            metadata=dict(body.metadata or {}),
        )
    )
    response = run_routed(
        g.tenant_id,
        body,
        route,
        endpoint=ENDPOINT,
        prefer=prefer,
        shape=ResponsesShape(),
        previous_response_id=previous if history else None,
    )
    job_id = response.headers.get("X-Sluice-Job-Id")
    if job_id:
        response.headers["Location"] = f"/v1/responses/{objects.response_id(job_id)}"
    return response


def _resolve_references(raw: Any) -> Any:
    """The body with each `item_reference` input item replaced by the item it names."""
    items = raw.get("input") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not any(_is_reference(item) for item in items):
        return raw
    resolved = [
        _referenced(item, f"input[{i}]") if _is_reference(item) else item
        for i, item in enumerate(items)
    ]
    db.session.commit()  # end the read transaction before the job is admitted
    return raw | {"input": resolved}


def _is_reference(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "item_reference"


def _referenced(reference: dict[str, Any], where: str) -> dict[str, Any]:
    """The output or input item of one of the caller's ended responses an id names."""
    unknown = set(reference) - {"type", "id"}
    if unknown:
        raise APIError(400, f"Unknown parameter: '{where}.{min(unknown)}'.", param=where)
    ident = reference.get("id")
    resp_id = objects.item_response_id(ident) if isinstance(ident, str) else None
    job = _find_response_job(resp_id) if resp_id is not None else None
    if job is not None and _ended(job):
        for item in job_response(job)["output"] + objects.input_items(job):
            if item["id"] == ident:
                return dict(item)
    raise APIError(
        400, f"Item with id {ident!r} not found.", param=f"{where}.id", code="invalid_value"
    )


def _history(previous_id: str) -> list[dict[str, Any]]:
    """The chat messages `previous_response_id` carries in (a 400 naming it if it cannot)."""
    job = _find_response_job(previous_id)
    if job is None:
        raise APIError(
            400,
            f"Previous response with id '{previous_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    if not _ended(job):
        raise APIError(
            400,
            f"Previous response with id '{previous_id}' is still {job.status}: wait for it "
            "to end (or cancel it) before continuing it.",
            param="previous_response_id",
        )
    history = objects.conversation(job)
    db.session.commit()  # end the read transaction before the job is admitted
    return history


ROW_WAIT_SECONDS = 2.0  # how long a row may trail its log's end (the worker writes the log first)


def _ended(job: Job) -> bool:
    """Whether the job ended, its row written: a response answered from its log's end a
    moment ago (`stream: false` too) may not have its row yet, so that row is waited for."""
    if job.status in TERMINAL:
        return True
    last: list[Any] = current_hub().client.xrevrange(log_key(job.id), count=1)  # type: ignore[assignment]
    if not last or not is_terminal(last[0][1]):
        return False
    deadline = time.monotonic() + ROW_WAIT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.02)
        db.session.commit()  # no read transaction held across the wait: each look is fresh
        db.session.refresh(job)
        if job.status in TERMINAL:
            return True
    return False


def _find_response_job(resp_id: str) -> Job | None:
    """The caller's job behind a response id (None: another tenant's does not exist)."""
    job_id = job_id_of(resp_id)
    if job_id is None:
        return None
    return db.session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant_id == g.tenant_id, Job.endpoint == ENDPOINT)
    )


def get_response_job(resp_id: str) -> Job:
    """The caller's job behind a response id, or 404 (another tenant's does not exist)."""
    job = _find_response_job(resp_id)
    if job is None:
        raise APIError(
            404, f"No response found with id '{resp_id}'.", param="response_id", code="not_found"
        )
    return job


def _starting_after() -> int:
    raw = request.args.get("starting_after")
    if raw is None:
        return -1
    if not raw.isdigit() or len(raw) > 18:
        raise APIError(400, "'starting_after' must be a sequence number.", param="starting_after")
    return int(raw)


@bp.get("/responses/<response_id>")
def get_response(response_id: str) -> ResponseReturnValue:
    """The response (tenant-scoped); `?stream=true` replays its events, after `starting_after`."""
    stream = request.args.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise APIError(400, "'stream' must be true or false.", param="stream")
    job = get_response_job(response_id)
    if stream == "true":
        return _replay(job, response_id, _starting_after())
    if job.mode != "stream" or job.status in TERMINAL:
        return job_response(job)
    # a running stream: what it said so far is the log's (which ends before the row does)
    return generation_response(job, Generation.of(read_all(current_hub().client, job.id)))


@bp.get("/responses/<response_id>/input_items")
def list_input_items(response_id: str) -> ResponseReturnValue:
    """The response's input items, a cursor page (`limit`, `after`, `order`: desc first)."""
    limit, after = page_params(request.args)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "'order' must be 'asc' or 'desc'.", param="order")
    if request.args.getlist("include"):
        raise APIError(400, "Sluice returns no extra input item data.", param="include")
    items = objects.input_items(get_response_job(response_id))
    if order == "desc":
        items.reverse()
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"No input item '{after}' in this response.", param="after")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return list_object(page, start + limit < len(items))


@bp.post("/responses/<response_id>/cancel")
def cancel_response(response_id: str) -> ResponseReturnValue:
    """Cancel the response's job by the jobs API's rules (a stream keeps what it said)."""
    job = get_response_job(response_id)
    jobs.cancel_job(job.id)  # its 409 for a background job that already runs, as it is
    db.session.expire_all()
    return job_response(get_response_job(response_id))


def _replay(job: Job, response_id: str, skip_through: int) -> ResponseReturnValue:
    if job.mode != "stream":
        raise APIError(
            400,
            "This response ran in the background and has no event stream: GET it without 'stream'.",
            param="stream",
        )
    if job.status in TERMINAL and not current_hub().client.exists(log_key(job.id)):
        raise APIError(
            400,
            "The event stream of this response has expired: GET it without 'stream'.",
            param="stream",
        )
    headers = {"X-Sluice-Job-Id": job.id, "Location": f"/v1/responses/{response_id}"}
    renderer = ResponsesRenderer(job, skip_through=skip_through)
    tail = make_tail(job.id, running=job.status != "queued")
    db.session.expunge(job)
    db.session.remove()
    return rate_limits.event_stream(
        lambda: sse_response(tail, renderer, headers, on_disconnect(job.on_disconnect, tail))
    )
