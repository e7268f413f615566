"""/v1 batches endpoints (OpenAI Batches API) over the batch engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.models import Batch
from app.pagination import list_object, page_params
from app.services import front_door, openai_batches
from app.services.chat_request import Metadata

bp = Blueprint("batches", __name__)


class BatchRequest(BaseModel):
    """POST /v1/batches (OpenAI's body; any other key is refused with a 400 naming it)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1)
    endpoint: str = Field(json_schema_extra={"enum": list(openai_batches.ENDPOINTS)})
    completion_window: str = Field(
        json_schema_extra={"enum": list(openai_batches.COMPLETION_WINDOWS)}
    )
    metadata: Metadata | None = None

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data: Any) -> Any:
        """OpenAI's rules, each its own 400 (missing, type, value), before the types."""
        openai_batches.check_create_params(data)
        return data


@bp.post("/batches")
def create_batch() -> ResponseReturnValue:
    key = front_door.idempotency_key(openai_batches.KIND, request.headers.get("Idempotency-Key"))
    params = front_door.parse_body(BatchRequest).model_dump(exclude_none=True)
    replayed = front_door.replay(g.tenant_id, key)
    batch = replayed or openai_batches.create(
        tenant_id=g.tenant_id,
        tenant_name=g.api_key.tenant.name,
        params=params,
        idempotency_key=key,
    )
    front_door.check_same(batch, _same_as(params))  # a replay, or a create that lost a race
    response = jsonify(openai_batches.serialize_batch(batch))
    if replayed is not None:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _same_as(params: dict[str, Any]) -> Callable[[Batch], bool]:
    """Whether a batch was created from these parameters (for an Idempotency-Key replay)."""
    file_id, endpoint, window, metadata = openai_batches.check_create_params(params)
    wanted = (file_id, endpoint, window, metadata or None)

    def same(batch: Batch) -> bool:
        made = (batch.input_file_id, batch.endpoint, batch.completion_window)
        return (*made, batch.metadata_ or None) == wanted

    return same


@bp.get("/batches")
def list_batches() -> ResponseReturnValue:
    limit, after = page_params(request.args)
    rows, has_more = openai_batches.list_batches(g.tenant_id, limit=limit, after=after)
    return jsonify(list_object([openai_batches.serialize_batch(b) for b in rows], has_more))


@bp.get("/batches/<batch_id>")
def retrieve_batch(batch_id: str) -> ResponseReturnValue:
    return jsonify(openai_batches.serialize_batch(openai_batches.get(g.tenant_id, batch_id)))


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> ResponseReturnValue:
    batch = openai_batches.cancel(openai_batches.get(g.tenant_id, batch_id))
    return jsonify(openai_batches.serialize_batch(batch))
