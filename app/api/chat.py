"""/v1/chat/completions: OpenAI-compatible chat, run as a stream job and relayed over SSE."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol, cast

from flask import Blueprint, Flask, Response, current_app, g, jsonify
from flask.typing import ResponseReturnValue

from app import sse
from app.extensions import current_flask_app, db
from app.models import Job, epoch, new_id
from app.models.job import TERMINAL
from app.policy import Preferences, Route
from app.providers import ChatRequest
from app.providers.base import error_status
from app.services import front_door
from app.services.chat_request import ChatCompletionRequest
from app.services.jobs import completion_object, job_completion_object, job_object
from app.streams.entries import Entry, Generation, error_of
from app.streams.hub import Tail, current_hub
from app.streams.relay import Renderer, collect, sse_body
from app.streams.render import ChunkRenderer
from app.streams.writer import request_cancel

bp = Blueprint("chat", __name__)
log = logging.getLogger(__name__)

RATE_LIMITED_RETRY_AFTER = 1  # seconds, when the upstream named no wait of its own
RETRY_AFTER_CAP = 300  # the longest upstream wait passed on to a client


class AnswerShape(Protocol):
    """How another endpoint (/v1/responses) answers a chat job: its SSE renderer, its whole
    result (stream: false) and its body for a job routed to the batch channel."""

    def renderer(self, job: Job) -> Renderer: ...
    def completion(self, job: Job, outcome: Generation) -> dict[str, Any]: ...
    def accepted(self, job: Job) -> dict[str, Any]: ...


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
        current_hub(),
        job_id,
        after=after,
        lease_seconds=config["STREAM_LEASE_SECONDS"],
        ping_seconds=config["STREAM_PING_SECONDS"],
        running=running,
        outage_seconds=max(10.0, 3 * config["STREAM_LEASE_SECONDS"]),
        check_lost=lost_checker(current_flask_app()),
    )


def sse_response(
    tail: Tail,
    renderer: Renderer,
    headers: dict[str, str],
    on_close: Callable[[bool], None],
    items: Iterator[Entry | None] | None = None,
) -> Response:
    """The SSE response for a job's log, with the anti-buffering headers (`items`: the
    tail's follow() already under way, see relay.sse_body)."""
    body = sse_body(tail, renderer, current_app.config["STREAM_RETRY_MS"], on_close, items)
    return sse.response(body, headers)


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
    body = front_door.parse_body(ChatCompletionRequest).request
    prefer = front_door.preferences()
    route = front_door.route(
        front_door.route_request(
            "/v1/chat/completions",
            model=body.model,
            stream=body.stream,
            prefer_async=prefer.respond_async,
            input_tokens=body.input_tokens(),
            metadata=dict(body.metadata or {}),
        )
    )
    return run_routed(g.tenant_id, body, route, endpoint="/v1/chat/completions", prefer=prefer)


def accepted_response(
    job: Job, route: Route, prefer: Preferences, endpoint: str, shape: AnswerShape | None = None
) -> Response:
    """A job routed to the batch channel: 202 with the job and where to poll it.

    With `Prefer: wait=N`, the answer waits up to N seconds for the job to end and is then
    the finished job (200) instead: on /v1/chat/completions a succeeded job answers as the
    `chat.completion` that endpoint returns.
    """
    applied = []
    if prefer.wait is not None:
        job = front_door.wait_for_job(job.id, prefer.wait) or job
        applied.append(f"wait={prefer.wait}")
    finished = job.status in TERMINAL
    if route.prefer_async and not finished:
        applied.insert(0, "respond-async")
    completed = endpoint == "/v1/chat/completions" and job.status == "succeeded"
    payload = job_completion_object(job) if completed else job_object(job)
    response = jsonify(shape.accepted(job) if shape else payload)
    response.status_code = 200 if finished else 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["X-Sluice-Route"] = route.header
    response.headers["X-Sluice-Job-Id"] = job.id
    if applied:
        response.headers["Preference-Applied"] = ", ".join(applied)
    return response


def run_routed(
    tenant_id: str,
    body: ChatRequest,
    route: Route,
    *,
    endpoint: str,
    priority: int = 0,
    prefer: Preferences | None = None,
    shape: AnswerShape | None = None,
    previous_response_id: str | None = None,
) -> Response:
    """Run a routed chat body: SSE (or one completion) for stream, 202 for batch."""
    job_id = new_id("job_")
    tail = make_tail(job_id)
    if route.mode == "stream":
        tail.register()  # its SUBSCRIBE goes out now, confirmed while admission and the
        # insert run; the task is sent right after (Tail.sending: no wait for the hub)
    try:
        job, route = front_door.start_chat_job(
            tenant_id,
            body,
            route,
            endpoint=endpoint,
            priority=priority,
            job_id=job_id,
            before_send=tail.sending,
            previous_response_id=previous_response_id,
        )
    except BaseException:
        tail.close()
        raise
    if route.mode == "batch":
        tail.close()
        return accepted_response(job, route, prefer or Preferences(), endpoint, shape)
    return stream_response(job, body, route, tail, shape)


def stream_response(
    job: Job, body: ChatRequest, route: Route, tail: Tail, shape: AnswerShape | None = None
) -> Response:
    """The answer of a started stream job: its SSE relay, or one collected completion."""
    db.session.remove()  # never hold a session across the relay
    headers = {
        "X-Sluice-Route": route.header,
        "X-Sluice-Job-Id": job.id,
        "Location": f"/v1/jobs/{job.id}",
    }
    created = epoch(job.created_at)
    if body.stream:
        items, early = early_error(tail, current_app.config["STREAM_ERROR_STATUS_SECONDS"])
        if early is not None:
            return error_response(early, headers)
        renderer: Renderer = (
            shape.renderer(job)
            if shape
            else ChunkRenderer(job.id, body.model, created, body.include_usage)
        )
        on_close = on_disconnect(route.on_disconnect, tail)
        response = sse_response(tail, renderer, headers, on_close, items)
        response.call_on_close(tail.close)  # a body never iterated still unsubscribes
        return response
    try:
        outcome = collect(tail)
    finally:
        tail.close()
    if outcome.error is not None:
        return error_response(outcome.error, headers)
    if shape is not None:
        answer = jsonify(shape.completion(job, outcome))
        answer.headers.update(headers)
        return answer
    payload = completion_object(
        job.id,
        body.model,
        created,
        outcome.text,
        outcome.finish_reason,
        outcome.usage,
        choices=outcome.messages(),
    )
    response = jsonify(payload)
    response.headers.update(headers)
    return response


def early_error(
    tail: Tail, wait: float
) -> tuple[Iterator[Entry | None] | None, dict[str, Any] | None]:
    """(the relay's entries, None), or (None, the job's error) if its log opens with it
    (nothing was streamed).

    Waits for the log's first entry, at most `wait` seconds (nothing yet: the SSE answer
    starts as usual, so a slow first token never holds the headers back longer). The
    relay goes on with the same follow(): the entry read here is its first, and no second
    read (nor a second subscribe) comes before it.
    """
    if wait <= 0:
        return None, None
    # follow() yields None (a ping) after this long without an entry, then pings as usual
    entries = cast(Generator[Entry | None], tail.follow(first_ping=min(tail.ping_seconds, wait)))
    try:
        first = next(entries, None)
    except BaseException:
        entries.close()
        raise
    if first is None:  # nothing yet: the relay goes on waiting
        return entries, None
    if first[1].get("t") == "error":
        entries.close()  # unsubscribes
        return None, error_of(first[1])
    return _prepend(first, entries), None


def _prepend(first: Entry, rest: Iterator[Entry | None]) -> Iterator[Entry | None]:
    yield first
    yield from rest  # (closing this closes `rest`)


def error_response(error: dict[str, Any], headers: dict[str, str]) -> Response:
    """A failed job answered as its error: an upstream 4xx with its own status, 502/504
    for an upstream failure or timeout, 429 with Retry-After for a rate limit."""
    error = dict(error)
    wait = error.pop("retry_after", None)  # the upstream's own, when it named one
    response = jsonify({"error": error})
    response.status_code = error_status(error)
    response.headers.update(headers)
    if response.status_code == 429:
        response.headers["Retry-After"] = str(retry_after_header(wait))
    return response


def retry_after_header(wait: Any) -> int:
    """Whole seconds for a 429's Retry-After: the upstream's wait rounded up and capped."""
    if not isinstance(wait, int | float) or wait <= 0:
        return RATE_LIMITED_RETRY_AFTER
    return min(math.ceil(wait), RETRY_AFTER_CAP)
