"""/v1 batches endpoints (OpenAI Batches API) over the batch engine."""

from __future__ import annotations

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue

from app.pagination import list_object, page_params
from app.services import front_door, openai_batches

bp = Blueprint("batches", __name__)


@bp.post("/batches")
def create_batch() -> ResponseReturnValue:
    key = front_door.idempotency_key(openai_batches.KIND, request.headers.get("Idempotency-Key"))
    replayed = front_door.replay(g.tenant_id, key)
    batch = replayed or openai_batches.create(
        tenant_id=g.tenant_id,
        tenant_name=g.api_key.tenant.name,
        params=front_door.json_body(),
        idempotency_key=key,
    )
    response = jsonify(openai_batches.serialize_batch(batch))
    if replayed is not None:
        response.headers["Idempotent-Replayed"] = "true"
    return response


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
