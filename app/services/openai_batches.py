"""The OpenAI Batches API over the batch engine: input validation, the batch object, results.

Input files are read streaming, once: every line is validated (errors name the line, as
OpenAI reports them) and, while none failed, handed to the engine, which stages it (in
memory, then on disk) before anything is written; a file with any bad line ends as a failed
batch naming them, and no item of it is ever inserted. Only the set of custom_ids is held
in memory besides the engine's staging.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flask import current_app
from sqlalchemy import select

from app import limits
from app.errors import APIError
from app.extensions import db
from app.heap import no_full_collections
from app.models import Batch, File, epoch, utcnow
from app.pagination import fetch_page
from app.policy import Route, RouteRequest, estimate_input_tokens
from app.providers import providers
from app.services import batches, events, front_door
from app.services import files as storage
from app.services.batch_lifecycle import cancel_batch
from app.services.chat_request import BodyChecker
from app.services.openai_batch_files import ERROR_STATUSES
from app.validation import check_metadata, loads

KIND = "openai"
ENDPOINTS = ("/v1/chat/completions",)
COMPLETION_WINDOWS = ("24h",)
MAX_ERRORS = 1000
YIELD_EVERY = 200


@dataclass
class Validation:
    """What one validating pass over an input file found."""

    errors: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0
    models: set[str] = field(default_factory=set)
    input_tokens: int = 0

    def add(self, code: str, message: str, *, line: int | None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


# ---------------------------------------------------------------- request parameters


def check_create_params(body: Any) -> tuple[str, str, str, dict[str, str] | None]:
    """(input_file_id, endpoint, completion_window, metadata) or an OpenAI-style 400."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", param=None)
    values: dict[str, str] = {}
    for name in ("input_file_id", "endpoint", "completion_window"):
        value = body.get(name)
        if value is None or value == "":
            raise APIError(
                400,
                f"Missing required parameter: '{name}'.",
                param=name,
                code="missing_required_parameter",
            )
        if not isinstance(value, str):
            raise APIError(
                400,
                f"Invalid type for '{name}': expected a string.",
                param=name,
                code="invalid_type",
            )
        values[name] = value
    if values["endpoint"] not in ENDPOINTS:
        raise APIError(
            400,
            f"Invalid value for 'endpoint': {values['endpoint']!r}. Supported values are: "
            + ", ".join(repr(e) for e in ENDPOINTS)
            + ".",
            param="endpoint",
            code="invalid_value",
        )
    if values["completion_window"] not in COMPLETION_WINDOWS:
        raise APIError(
            400,
            f"Invalid value for 'completion_window': {values['completion_window']!r}. "
            "Supported values are: '24h'.",
            param="completion_window",
            code="invalid_value",
        )
    return (
        values["input_file_id"],
        values["endpoint"],
        values["completion_window"],
        check_metadata(body.get("metadata")),
    )


def input_file(tenant_id: str, file_id: str) -> File:
    """The tenant's batch input file (another tenant's file is a 404, as if it did not exist)."""
    file = storage.get_file(tenant_id, file_id)
    if file is None:
        raise APIError(
            404, f"No such File object: {file_id}", param="input_file_id", code="not_found"
        )
    if file.purpose != "batch":
        raise APIError(
            400,
            f"File {file_id} has purpose {file.purpose!r}; a batch input file must have "
            "purpose 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    return file


# ---------------------------------------------------------------- line validation


def _parse_line(raw: bytes, max_chars: int) -> Any:
    try:
        return loads(raw, max_chars=max_chars)
    except (ValueError, UnicodeDecodeError):
        return _BAD


_BAD = object()


def iter_lines(file: File) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for every non-blank line, streamed from disk."""
    with storage.open_lines(file) as fh:
        for number, raw in enumerate(fh, 1):
            if number % YIELD_EVERY == 0:
                time.sleep(0)  # under gevent, let the web worker's other requests run
            if raw.strip():
                yield number, raw


class InvalidInput(Exception):
    """The input file had bad lines (raised once all of it was read): a failed batch."""


def validated_items(
    file: File, endpoint: str, config: Mapping[str, Any], found: Validation
) -> Iterator[batches.BatchItem]:
    """The engine's items, validated in one streaming pass; what it finds goes in `found`.

    Yields the items while every line so far was good (at most BATCH_MAX_DOCUMENTS), and
    reads on to the end either way, so `found` names every bad line.
    """
    seen: set[str] = set()
    limit = config["BATCH_MAX_DOCUMENTS"]
    checker = BodyChecker(providers())  # the chat endpoint's own rules, made once per model
    max_chars = limits.setting("MAX_STRING_CHARS")  # read once, not by every line
    for number, raw in iter_lines(file):
        found.count += 1
        line = _parse_line(raw, max_chars)
        if line is _BAD or not isinstance(line, dict):
            found.add("invalid_json_line", "This line is not parseable as valid JSON.", line=number)
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            found.add(
                "missing_custom_id",
                "Missing required parameter: 'custom_id' (a non-empty string).",
                line=number,
                param="custom_id",
            )
        elif len(custom_id) > batches.MAX_ITEM_ID:
            found.add(
                "invalid_custom_id",
                f"The custom_id is longer than {batches.MAX_ITEM_ID} characters.",
                line=number,
                param="custom_id",
            )
        elif custom_id in seen:
            found.add(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. The "
                "custom_id parameter must be unique for each request in a batch.",
                line=number,
                param="custom_id",
            )
        else:
            seen.add(custom_id)
        if line.get("method") != "POST":
            found.add(
                "invalid_method",
                f"The method for this request must be 'POST', got {line.get('method')!r}.",
                line=number,
                param="method",
            )
        if line.get("url") != endpoint:
            found.add(
                "url_mismatch",
                "The provided URL for this request does not match the batch endpoint "
                f"({endpoint!r}).",
                line=number,
                param="url",
            )
        body = line.get("body")
        if not isinstance(body, dict):
            found.add(
                "invalid_request",
                "Missing required parameter: 'body' (a JSON object).",
                line=number,
                param="body",
            )
            continue
        try:
            checker.check(body)  # the chat endpoint's own validator
        except APIError as exc:
            param = f"body.{exc.param}" if exc.param else "body"
            found.add(exc.code or "invalid_request", exc.message, line=number, param=param)
            continue
        found.models.add(str(body.get("model")))
        messages = body.get("messages")
        if isinstance(messages, list):
            found.input_tokens += estimate_input_tokens(
                [m for m in messages if isinstance(m, dict)]
            )
        if not found.errors and found.count <= limit:
            item = dict(body)
            item.pop("stream", None)
            item.pop("stream_options", None)
            yield batches.BatchItem(item_id=str(custom_id), body=item)
    if found.count == 0:
        found.add("empty_file", "The input file is empty: it has no requests.", line=None)
    elif found.count > limit:
        found.add(
            "too_many_tasks",
            f"The input file has {found.count} requests; a batch may hold at most {limit}.",
            line=None,
        )


# ---------------------------------------------------------------- create, get, list


def create(
    *,
    tenant_id: str,
    tenant_name: str,
    params: Any,
    idempotency_key: str | None = None,
) -> Batch:
    """POST /v1/batches: validate, route, then a failed batch or a running one."""
    file_id, endpoint, window, metadata = check_create_params(params)
    file = input_file(tenant_id, file_id)
    found = Validation()

    def model() -> str | None:
        return next(iter(found.models)) if len(found.models) == 1 else None

    def route() -> Route:
        return front_door.route(
            RouteRequest(
                endpoint="/v1/batches",
                tenant_id=tenant_id,
                tenant_name=tenant_name,
                model=model() or "",
                requested_mode="batch",
                input_tokens=found.input_tokens,
                metadata=dict(metadata or {}),
            )
        )

    def items() -> Iterator[batches.BatchItem]:
        yield from validated_items(file, endpoint, current_app.config, found)
        if found.errors:
            raise InvalidInput  # before the engine writes anything

    try:
        with no_full_collections():
            return batches.create_batch(
                tenant_id=tenant_id,
                kind=KIND,
                items=items(),
                route=route,
                model=model,
                endpoint=endpoint,
                completion_window=window,
                metadata=metadata,
                idempotency_key=idempotency_key,
                input_file_id=file_id,
            )
    except InvalidInput:
        return _failed_batch(
            tenant_id, file_id, endpoint, window, metadata, found, route(), idempotency_key, model()
        )


def _failed_batch(
    tenant_id: str,
    file_id: str,
    endpoint: str,
    window: str,
    metadata: dict[str, str] | None,
    found: Validation,
    route: Route,
    idempotency_key: str | None,
    model: str | None,
) -> Batch:
    """A batch that failed validation: it exists, names every bad line, and runs nothing."""
    now = utcnow()
    batch = Batch(
        tenant_id=tenant_id,
        kind=KIND,
        status="failed",
        endpoint=endpoint,
        model=model,
        metadata_=metadata,
        idempotency_key=idempotency_key,
        completion_window=window,
        input_file_id=file_id,
        errors=found.errors,
        route_rule=route.rule,
        route_reason=route.reason,
        total=0,
        created_at=now,
        failed_at=now,
        expires_at=now + timedelta(seconds=batches.window_seconds(window)),
    )
    db.session.add(batch)
    db.session.commit()
    events.batch_changed(batch)
    return batch


def get(tenant_id: str, batch_id: str) -> Batch:
    """The tenant's OpenAI batch, or a 404."""
    batch = batches.get_batch(tenant_id, batch_id)
    if batch is None or batch.kind != KIND:
        raise APIError(404, f"No such Batch object: {batch_id}", param="batch_id", code="not_found")
    return batch


def list_batches(tenant_id: str, *, limit: int, after: str | None) -> tuple[list[Batch], bool]:
    """One page of the tenant's OpenAI batches, newest first, and whether more follow."""
    query = select(Batch).where(Batch.tenant_id == tenant_id, Batch.kind == KIND)
    return fetch_page(query, Batch.id, limit=limit, after=after)


def cancel(batch: Batch) -> Batch:
    """POST /v1/batches/{id}/cancel (a terminal batch is a 409, as OpenAI answers)."""
    return cancel_batch(batch)


# ---------------------------------------------------------------- the batch object


def request_counts(batch: Batch) -> dict[str, int]:
    """OpenAI's {total, completed, failed}: cancelled and expired items count as failed."""
    counts = batches.item_counts(batch)
    failed = sum(counts.get(status, 0) for status in ERROR_STATUSES)
    return {"total": counts["total"], "completed": counts.get("succeeded", 0), "failed": failed}


def usage_object(batch: Batch) -> dict[str, Any]:
    prompt, completion = batch.prompt_tokens or 0, batch.completion_tokens or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def errors_object(batch: Batch) -> dict[str, Any] | None:
    if not batch.errors:
        return None
    data = [
        {
            "code": e.get("code"),
            "message": e.get("message"),
            "param": e.get("param"),
            "line": e.get("line"),
        }
        for e in batch.errors
        if isinstance(e, dict)
    ]
    return {"object": "list", "data": data}


def serialize_batch(batch: Batch) -> dict[str, Any]:
    """OpenAI's batch object, every field present."""
    unix = epoch
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": errors_object(batch),
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(batch.in_progress_at),
        "expires_at": unix(batch.expires_at),
        "finalizing_at": unix(batch.finalizing_at),
        "completed_at": unix(batch.completed_at),
        "failed_at": unix(batch.failed_at),
        "expired_at": unix(batch.expired_at),
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at),
        "request_counts": request_counts(batch),
        "metadata": batch.metadata_,
        "usage": usage_object(batch),
    }
