"""/v1/models: the models a tenant can route to, in OpenAI's list format."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.errors import APIError
from app.providers import providers

bp = Blueprint("models", __name__)


@bp.get("/models")
def list_models() -> ResponseReturnValue:
    return {"object": "list", "data": providers().catalog.models()}


@bp.get("/models/<path:model_id>")
def get_model(model_id: str) -> ResponseReturnValue:
    found = providers().catalog.get(model_id)
    if found is None:
        raise APIError(
            404,
            f"The model '{model_id}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return found
