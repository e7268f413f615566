"""Admin endpoints for API keys, and the caller's own identity."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from app.auth import admin_required, create_key, revoke_key
from app.errors import APIError
from app.extensions import db
from app.models import ApiKey, Tenant

bp = Blueprint("keys", __name__)


def key_object(key: ApiKey, tenant_name: str) -> dict[str, Any]:
    return {
        "id": key.id,
        "object": "api_key",
        "tenant": tenant_name,
        "prefix": key.prefix,
        "name": key.name,
        "admin": key.is_admin,
        "created_at": int(key.created_at.timestamp()),
        "revoked_at": int(key.revoked_at.timestamp()) if key.revoked_at else None,
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
    body = request.get_json(silent=True) or {}
    tenant = body.get("tenant")
    if not isinstance(tenant, str) or not tenant.strip():
        raise APIError(400, "'tenant' is required and must be a non-empty string.", param="tenant")
    key, plaintext = create_key(
        tenant.strip(), admin=bool(body.get("admin")), name=body.get("name")
    )
    return jsonify(key_object(key, tenant.strip()) | {"key": plaintext}), 201


@bp.post("/admin/keys/<key_id>/revoke")
@admin_required
def revoke(key_id: str) -> ResponseReturnValue:
    if not revoke_key(key_id):
        raise APIError(404, f"No API key with id '{key_id}'.", param="key_id")
    return jsonify(id=key_id, object="api_key", revoked=True)
