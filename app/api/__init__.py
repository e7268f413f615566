"""The /v1 API: one blueprint per resource, all behind API-key auth."""

from __future__ import annotations

from flask import Blueprint, Response, g

from app import rate_limits
from app.api import (
    admin,
    batches,
    chat,
    document_batches,
    files,
    jobs,
    keys,
    models,
    responses,
    spend,
    submit,
)
from app.auth import authenticate
from app.services import front_door

bp = Blueprint("v1", __name__, url_prefix="/v1")
bp.before_request(authenticate)
bp.before_request(front_door.bound_request)
bp.after_request(rate_limits.add_headers)


@bp.after_request
def _route_header(response: Response) -> Response:
    """Every answer that got as far as a routing decision says which route it took."""
    route = g.get("sluice_route")
    if route is not None and "X-Sluice-Route" not in response.headers:
        response.headers["X-Sluice-Route"] = route.header
    return response


for resource in (
    keys,
    admin,
    chat,
    responses,
    jobs,
    submit,
    document_batches,
    files,
    batches,
    models,
    spend,
):
    bp.register_blueprint(resource.bp)
