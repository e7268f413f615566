"""Admin endpoints for API keys, and the caller's own identity."""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint, g, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select

from app.auth import admin_required, create_key, revoke_key
from app.errors import APIError
from app.extensions import db
from app.models import ApiKey, Tenant, epoch
from app.services import front_door
from app.validation import checked

bp = Blueprint("keys", __name__)

NAME_MAX = 200  # tenants.name and api_keys.name columns


def _tenant(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, "'tenant' is required and must be a non-empty string.", param="tenant")
    if len(value.strip()) > NAME_MAX or "\x00" in value:
        raise APIError(400, f"'tenant' must be at most {NAME_MAX} characters.", param="tenant")
    return value.strip()


def _admin(value: Any) -> bool:
    if not isinstance(value, bool):
        raise APIError(400, "'admin' must be true or false.", param="admin", code="invalid_type")
    return value


def _name(value: Any) -> str | None:
    if value is not None and (
        not isinstance(value, str) or len(value) > NAME_MAX or "\x00" in value
    ):
        raise APIError(
            400, f"'name' must be a string of at most {NAME_MAX} characters.", param="name"
        )
    return value


class KeyRequest(BaseModel):
    """POST /v1/admin/keys: the tenant (created if new), and the key's role and name."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"tenant": "made-by-example"}]}
    )

    tenant: Annotated[str, checked(_tenant)] = Field(min_length=1, max_length=NAME_MAX)
    admin: Annotated[bool, checked(_admin)] = False
    name: Annotated[str | None, checked(_name)] = Field(None, max_length=NAME_MAX)

    @model_validator(mode="before")
    @classmethod
    def _tenant_named(cls, data: Any) -> Any:
        """An absent tenant: the tenant check's own 400."""
        if isinstance(data, dict) and data.get("tenant") is None:
            _tenant(None)
        return data


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
    body = front_door.parse_body(KeyRequest)
    key, plaintext = create_key(body.tenant, admin=body.admin, name=body.name)
    return jsonify(key_object(key, body.tenant) | {"key": plaintext}), 201


@bp.post("/admin/keys/<key_id>/revoke")
@admin_required
def revoke(key_id: str) -> ResponseReturnValue:
    if not revoke_key(key_id):
        raise APIError(404, f"No API key with id '{key_id}'.", param="key_id")
    return jsonify(id=key_id, object="api_key", revoked=True)
