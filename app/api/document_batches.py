"""/v1 document-batches endpoints: submit, list, get, cancel, results (JSONL), events (SSE)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from werkzeug.exceptions import RequestEntityTooLarge

from app import extraction, rate_limits, sse
from app.errors import APIError
from app.extensions import current_flask_app, db
from app.models import Batch, Job, epoch, utcnow
from app.models.batch import TERMINAL
from app.models.job import STATUSES
from app.pagination import fetch_page, list_object, page_params
from app.services import batch_lifecycle, batches, documents, front_door
from app.services.costs import batch_cost_usd
from app.streams.hub import current_hub
from app.validation import check_model_name

bp = Blueprint("document_batches", __name__)

JSONL_TYPES = (
    "application/jsonl",
    "application/x-ndjson",
    "application/x-jsonlines",
    "application/json-lines",
    "text/jsonl",
)
KIND = "documents"
MAX_WINDOW_SECONDS = 365 * 86400
MAX_WINDOW_CHARS = 10  # the batches.completion_window column
PAGE = 1000


def batch_json(batch: Batch, counts: dict[str, int] | None = None) -> dict[str, Any]:
    """The document batch object."""
    counts = counts or batches.item_counts(batch)
    return {
        "id": batch.id,
        "object": "document_batch",
        "status": batch.status,
        "model": batch.model,
        "instructions": batch.instructions,
        "prompt_template": batch.prompt_template,
        "params": batch.params or {},
        "metadata": batch.metadata_,
        "completion_window": batch.completion_window,
        "counts": counts,
        "request_counts": {
            "total": counts["total"],
            "completed": counts["succeeded"],
            "failed": counts["failed"],
        },
        "usage": {
            "prompt_tokens": batch.prompt_tokens,
            "completion_tokens": batch.completion_tokens,
            "total_tokens": batch.prompt_tokens + batch.completion_tokens,
        },
        "errors": batch.errors,
        "route": {
            "rule": batch.route_rule,
            "reason": batch.route_reason,
            "executor": batch.executor or "workers",  # #13
        },
        "cost_usd": batch_cost_usd(batch.id),  # #13: the sum of its items' costs
        "created_at": epoch(batch.created_at),
        "in_progress_at": epoch(batch.in_progress_at),
        "finalizing_at": epoch(batch.finalizing_at),
        "completed_at": epoch(batch.completed_at),
        "failed_at": epoch(batch.failed_at),
        "expires_at": epoch(batch.expires_at),
        "expired_at": epoch(batch.expired_at),
        "cancelling_at": epoch(batch.cancelling_at),
        "cancelled_at": epoch(batch.cancelled_at),
        "results_url": f"/v1/document-batches/{batch.id}/results",
    }


def _batch_or_404(batch_id: str) -> Batch:
    batch = batches.get_batch(g.tenant_id, batch_id)
    if batch is None or batch.kind != KIND:
        raise APIError(
            404, f"No document batch with id '{batch_id}'.", param="batch_id", code="not_found"
        )
    return batch


def _intake(options: documents.Options) -> documents.Intake:
    config = current_app.config
    return documents.Intake(
        options=options,
        max_documents=config["BATCH_MAX_DOCUMENTS"],
        max_document_bytes=config["BATCH_MAX_DOCUMENT_BYTES"],
        max_prompt_bytes=config["BATCH_MAX_PROMPT_BYTES"],
        max_expanded_bytes=config["BATCH_MAX_EXPANDED_BYTES"],
        max_file_bytes=config["BATCH_MAX_FILE_BYTES"],
        extraction=extraction.limits_from(config),
        extraction_slots=extraction.slots(current_flask_app()),
    )


def _read_submission(max_bytes: int) -> tuple[documents.Options, Iterator[batches.BatchItem]]:
    """Options and a lazy item stream from a JSON, JSONL or multipart body."""
    mimetype = request.mimetype
    if mimetype == "application/json":
        body = front_door.parse_body(documents.DocumentBatchRequest)
        return body, documents.from_json(body.documents, _intake(body))
    if mimetype in JSONL_TYPES:
        options = documents.parse_options(request.args)
        return options, documents.from_jsonl(request.stream, _intake(options), max_bytes)
    if mimetype == "multipart/form-data":
        request.max_form_parts = current_app.config["BATCH_MAX_DOCUMENTS"] + 100
        try:
            form, uploaded = request.form, request.files
        except RequestEntityTooLarge:  # past the byte limit (a chunked body) or the parts
            if request.content_length is None or request.content_length > max_bytes:
                raise documents.request_too_large(max_bytes) from None
            raise APIError(
                413,
                f"too many form parts: at most {request.max_form_parts}"
                " (SLUICE_BATCH_MAX_DOCUMENTS + 100)",
                param="files",
                code="too_many_documents",
            ) from None
        options = documents.parse_options(form)
        files = [(f.filename or name, f.stream) for name, f in uploaded.items(multi=True)]
        return options, documents.from_files(files, _intake(options))
    raise APIError(
        415,
        "Send application/json, multipart/form-data (files) or application/jsonl"
        " (batch fields in the query string).",
        code="unsupported_media_type",
    )


@bp.post("/document-batches")
def create() -> ResponseReturnValue:
    """Validate every document, then queue the batch (202 + Location)."""
    started = utcnow()
    max_bytes = current_app.config["BATCH_MAX_REQUEST_BYTES"]
    if request.content_length is not None and request.content_length > max_bytes:
        raise documents.request_too_large(max_bytes)
    key = front_door.idempotency_key(KIND, request.headers.get("Idempotency-Key"))
    options, items = _read_submission(max_bytes)
    digest = documents.InputDigest()
    items = digest.wrap(items)
    same = _same_request(options, digest)  # a replay's options and documents must match
    existing = front_door.replay(g.tenant_id, key)
    if existing is not None:
        for _ in items:  # read (and validated) whole, so its documents are compared too
            pass
        front_door.check_same(existing, same)
        return _created(existing, replayed=True)
    check_model_name(options.model)
    documents.check_with_provider(options)
    route = front_door.route(
        front_door.route_request(
            "/v1/document-batches",
            model=options.model,
            requested_mode="batch",
            prefer_async=True,
            metadata=options.metadata or {},
        )
    )
    window = _window(options)
    if len(window) > MAX_WINDOW_CHARS or batches.window_seconds(window) > MAX_WINDOW_SECONDS:
        raise APIError(
            400,
            f"completion_window must be at most {MAX_WINDOW_SECONDS // 86400} days, like '24h'",
            param="completion_window",
            code="invalid_completion_window",
        )
    batch = batches.create_batch(
        tenant_id=g.tenant_id,
        kind=KIND,
        items=items,
        route=route,
        model=options.model,
        completion_window=window,
        metadata=options.metadata,
        idempotency_key=key,
        instructions=options.instructions,
        prompt_template=options.prompt_template,
        params=options.params() or None,
        input_hash=digest.hexdigest,
    )
    front_door.check_same(batch, same)  # a concurrent create with the key may have won
    return _created(batch, replayed=batch.created_at < started)


def _window(options: documents.Options) -> str:
    hours = current_app.config["BATCH_COMPLETION_WINDOW_HOURS"]
    return options.completion_window or f"{hours:g}h"


def _same_request(
    options: documents.Options, digest: documents.InputDigest
) -> Callable[[Batch], bool]:
    """Whether a batch was created with these options and documents (for an
    Idempotency-Key replay; a batch from before 0006 has no hash: options only)."""
    wanted = (
        options.model,
        options.instructions,
        options.prompt_template,
        options.params() or None,
        options.metadata or None,
        _window(options),
    )

    def same(batch: Batch) -> bool:
        made = (batch.model, batch.instructions, batch.prompt_template, batch.params or None)
        if (*made, batch.metadata_ or None, batch.completion_window) != wanted:
            return False
        return batch.input_hash is None or batch.input_hash == digest.hexdigest()

    return same


def _created(batch: Batch, *, replayed: bool) -> ResponseReturnValue:
    response = jsonify(batch_json(batch))
    response.status_code = 200 if replayed else 202
    response.headers["Location"] = f"/v1/document-batches/{batch.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("/document-batches")
def list_batches() -> ResponseReturnValue:
    """Newest first; ?limit=1..100 (default 20), ?after=<batch id> for the next page."""
    limit, after = page_params(request.args)
    query = select(Batch).where(Batch.tenant_id == g.tenant_id, Batch.kind == KIND)
    page, has_more = fetch_page(query, Batch.id, limit=limit, after=after)
    return jsonify(list_object([batch_json(b) for b in page], has_more))


@bp.get("/document-batches/<batch_id>")
def get(batch_id: str) -> ResponseReturnValue:
    return jsonify(batch_json(_batch_or_404(batch_id)))


@bp.post("/document-batches/<batch_id>/cancel")
def cancel(batch_id: str) -> ResponseReturnValue:
    batch = batch_lifecycle.cancel_batch(_batch_or_404(batch_id))
    return jsonify(batch_json(batch))


def _result_line(row: Any) -> str:
    return json.dumps(
        {
            "document_id": row.item_id,
            "index": row.item_index,
            "status": row.status,
            "output": row.output,
            "finish_reason": row.finish_reason,
            "usage": row.usage,
            "error": row.error,
            "metadata": row.metadata,
        },
        ensure_ascii=False,
    )


@bp.get("/document-batches/<batch_id>/results")
def results(batch_id: str) -> ResponseReturnValue:
    """One JSONL line per document in submission order; ?status= filters."""
    batch = _batch_or_404(batch_id)
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        raise APIError(400, f"status must be one of {', '.join(STATUSES)}", param="status")
    db_engine = db.engine
    jobs = Job.__table__
    columns = [
        jobs.c[n]
        for n in (
            "item_index",
            "item_id",
            "status",
            "output",
            "finish_reason",
            "usage",
            "error",
            "metadata",
        )
    ]
    db.session.remove()

    def generate() -> Iterator[str]:
        last = -1
        while True:
            query = select(*columns).where(jobs.c.batch_id == batch.id, jobs.c.item_index > last)
            if status:
                query = query.where(jobs.c.status == status)
            with db_engine.connect() as conn:  # a short read per page, never held across yields
                rows = conn.execute(query.order_by(jobs.c.item_index).limit(PAGE)).all()
            if not rows:
                return
            yield "".join(_result_line(r) + "\n" for r in rows)
            last = rows[-1].item_index

    headers = {"Content-Disposition": f'attachment; filename="{batch.id}-results.jsonl"'}
    return Response(generate(), mimetype="application/jsonl", headers=headers)


def _is_about(message: str, batch_id: str) -> bool:
    """Whether a broadcast message (app/services/events.py) is a change of this batch."""
    if batch_id not in message:
        return False
    try:
        event = json.loads(message)
        return bool(event.get("type") == "batch" and event["data"].get("id") == batch_id)
    except (ValueError, KeyError, AttributeError, TypeError):
        return False


@bp.get("/document-batches/<batch_id>/events")
def events(batch_id: str) -> ResponseReturnValue:
    """SSE: `progress` with counts whenever they change, then one terminal `done` event.

    Woken by the batch's published changes, read at most once per BATCH_EVENTS_MIN_INTERVAL_SECONDS
    under a burst; a re-read every ping interval covers a change whose notice was lost.
    """
    batch = _batch_or_404(batch_id)
    tenant_id = g.tenant_id
    app = current_flask_app()
    spacing = max(0.05, app.config["BATCH_EVENTS_MIN_INTERVAL_SECONDS"])
    ping_every = max(0.2, app.config["STREAM_PING_SECONDS"])
    hub = current_hub()
    db.session.remove()

    def snapshot() -> dict[str, Any] | None:
        with app.app_context():
            try:
                current = batches.get_batch(tenant_id, batch.id)
                return batch_json(current) if current is not None else None
            finally:
                db.session.remove()

    def generate() -> Iterator[str]:
        feed = hub.feed()  # before the first read: no change can fall between read and wait
        try:
            yield sse.retry(app.config["STREAM_RETRY_MS"])
            last_sent: Any = None
            last_write = last_read = time.monotonic()
            while True:
                if (wait := last_read + spacing - time.monotonic()) > 0:
                    time.sleep(wait)
                state = snapshot()
                last_read = time.monotonic()
                if state is None:
                    return
                data = json.dumps(state)
                if state["status"] in TERMINAL:
                    yield sse.frame(data, event="progress") + sse.frame(data, event="done")
                    return
                if (state["status"], state["counts"]) != last_sent:
                    yield sse.frame(data, event="progress")
                    last_sent = (state["status"], state["counts"])
                    last_write = time.monotonic()
                while True:
                    idle = last_write + ping_every - time.monotonic()
                    if any(_is_about(m, batch.id) for m in feed.wait(max(0.0, idle))):
                        break
                    if time.monotonic() - last_write >= ping_every:
                        yield sse.comment()
                        last_write = time.monotonic()
                        break  # and re-read: a notice may have been lost
        finally:
            hub.unfeed(feed)

    return rate_limits.event_stream(lambda: sse.response(generate()))
