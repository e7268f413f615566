"""Admin endpoints for API keys, and the caller's own identity."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from app.auth import admin_required, create_key, revoke_key
from app.errors import APIError
from app.extensions import db
from app.models import ApiKey, Tenant, epoch
from app.services import front_door

bp = Blueprint("keys", __name__)

NAME_MAX = 200  # tenants.name and api_keys.name columns


def key_object(key: ApiKey, tenant_name: str) -> dict[str, Any]:
    return {
        "id": key.id,
        "object": "api_key",
        "tenant": tenant_name,
        "prefix": key.prefix,
        "name": key.name,
        "admin": key.is_admin,
        "created_at": epoch(key.created_at),
        "revoked_at": epoch(key.revoked_at),
    }


@bp.get("/me")
def me() -> ResponseReturnValue:
    tenant = db.session.get(Tenant, g.tenant_id)
    return jsonify(key_object(g.api_key, tenant.name if tenant else ""))


@bp.get("/admin/keys")
@admin_required
def list_keys() -> ResponseReturnValue:
    rows = db.session.execute(
        select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.id.desc())
    ).all()
    return jsonify(object="list", data=[key_object(key, name) for key, name in rows])


@bp.post("/admin/keys")
@admin_required
def create() -> ResponseReturnValue:
    body = front_door.json_body()
    tenant = body.get("tenant")
    if not isinstance(tenant, str) or not tenant.strip():
        raise APIError(400, "'tenant' is required and must be a non-empty string.", param="tenant")
    if len(tenant.strip()) > NAME_MAX or "\x00" in tenant:
        raise APIError(400, f"'tenant' must be at most {NAME_MAX} characters.", param="tenant")
    admin = body.get("admin", False)
    if not isinstance(admin, bool):
        raise APIError(400, "'admin' must be true or false.", param="admin", code="invalid_type")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > NAME_MAX or "\x00" in name):
        raise APIError(
            400, f"'name' must be a string of at most {NAME_MAX} characters.", param="name"
        )
    key, plaintext = create_key(tenant.strip(), admin=admin, name=name)
    return jsonify(key_object(key, tenant.strip()) | {"key": plaintext}), 201


@bp.post("/admin/keys/<key_id>/revoke")
@admin_required
def revoke(key_id: str) -> ResponseReturnValue:
    if not revoke_key(key_id):
        raise APIError(404, f"No API key with id '{key_id}'.", param="key_id")
    return jsonify(id=key_id, object="api_key", revoked=True)
