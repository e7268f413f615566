"""API keys (hashed at rest), tenant scoping and admin checks."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import g, request
from sqlalchemy import select

from app.errors import APIError
from app.extensions import db
from app.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "sk-sluice-"
F = TypeVar("F", bound=Callable[..., Any])


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_key(
    tenant_name: str, *, admin: bool = False, name: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key (and its tenant if new); return the row and the only copy of the plaintext."""
    tenant = db.session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        db.session.add(tenant)
        db.session.flush()
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant.id,
        key_hash=hash_key(plaintext),
        prefix=plaintext[: len(KEY_PREFIX) + 6],
        name=name,
        is_admin=admin,
    )
    db.session.add(key)
    db.session.commit()
    return key, plaintext


def lookup_key(plaintext: str) -> ApiKey | None:
    """The live key with this plaintext, or None."""
    key = db.session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))
    if key is None or key.revoked_at is not None:
        return None
    return key


def revoke_key(key_id: str) -> bool:
    key = db.session.get(ApiKey, key_id)
    if key is None:
        return False
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        db.session.commit()
    return True


def authenticate() -> None:
    """before_request for /v1: resolve the bearer key into g.tenant_id."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    key = lookup_key(token.strip())
    if key is None:
        raise APIError(401, "Incorrect or revoked API key provided.", code="invalid_api_key")
    g.api_key = key
    g.tenant_id = key.tenant_id


def admin_required(view: F) -> F:
    """Answer 403 unless the caller's key is an admin key."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not g.api_key.is_admin:
            raise APIError(403, "This endpoint needs an admin API key.", code="admin_required")
        return view(*args, **kwargs)

    return cast(F, wrapper)  # wraps() keeps the view's signature
