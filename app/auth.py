"""API keys (hashed at rest), tenant scoping and admin checks."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import current_app, g, request
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from app.errors import APIError
from app.extensions import db, redis_store
from app.models import ApiKey, Tenant, utcnow
from app.streams.hub import StreamHub, current_hub
from app.streams.keys import db_of, keys_channel, revocation_ack_key

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-sluice-"
KEY_CACHE_SECONDS = 10.0  # the longest a web process trusts a key it looked up
KEY_CACHE_MAX = 10_000  # keys cached per process (cleared when full)
REVOCATION_ACK_SECONDS = 2.0  # the longest revoke_key waits for every web process to drop a key
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
    try:
        _broadcast_revocation(key.key_hash)
    except Exception as exc:
        log.warning(
            "key revocation not broadcast (%r); caches drop it within %gs", exc, KEY_CACHE_SECONDS
        )
    return True


def _broadcast_revocation(key_hash: str) -> None:
    """Publish the revocation and wait until every hub that heard it has acknowledged, so
    that no web process accepts the key once this returns (KEY_CACHE_SECONDS bounds a hub
    that never answers within REVOCATION_ACK_SECONDS)."""
    client = redis_store.client
    ack = revocation_ack_key(secrets.token_hex(8))
    heard = int(client.publish(keys_channel(db_of(client)), f"{key_hash} {ack}"))
    deadline = time.monotonic() + REVOCATION_ACK_SECONDS
    acked = 0
    while acked < heard and (left := deadline - time.monotonic()) > 0:
        if client.blpop([ack], timeout=max(left, 0.01)) is None:
            break
        acked += 1
    client.delete(ack)
    if acked < heard:
        log.warning(
            "%d of %d web processes did not confirm a key revocation; they drop it within %gs",
            heard - acked,
            heard,
            KEY_CACHE_SECONDS,
        )


class KeyCache:
    """A web process's live keys by hash, each for KEY_CACHE_SECONDS at most.

    Used only while the stream hub hears keys_channel(), where revoke_key() announces each
    revocation: a revoked key is dropped at once, and everything is dropped whenever the
    hub's connection is lost (a revocation may have been missed meanwhile). A lookup that
    raced a revocation is not cached (the generation changed under it).
    """

    def __init__(self, hub: StreamHub) -> None:
        self.hub = hub
        self.generation = 0
        self._keys: dict[str, tuple[ApiKey, float]] = {}
        hub.on_revocation(self.forget)

    def forget(self, key_hash: str | None) -> None:
        self.generation += 1
        if key_hash is None:
            self._keys.clear()
        else:
            self._keys.pop(key_hash, None)

    def lookup(self, plaintext: str) -> ApiKey | None:
        """The live key with this plaintext (detached, its tenant loaded), or None."""
        key_hash = hash_key(plaintext)
        usable = self.hub.connected.is_set()
        if usable:
            found = self._keys.get(key_hash)
            if found is not None and found[1] > time.monotonic():
                return found[0]
        generation = self.generation
        key = db.session.scalar(
            select(ApiKey).options(joinedload(ApiKey.tenant)).where(ApiKey.key_hash == key_hash)
        )
        if key is None or key.revoked_at is not None:
            return None
        db.session.expunge(key.tenant)  # never expired by a commit, shared by requests
        db.session.expunge(key)
        if usable and generation == self.generation:
            if len(self._keys) >= KEY_CACHE_MAX:
                self._keys.clear()
            self._keys[key_hash] = (key, time.monotonic() + KEY_CACHE_SECONDS)
        return key


def key_cache() -> KeyCache:
    """The current app's key cache in this process (made on first use)."""
    extensions = current_app.extensions
    cache = extensions.get("sluice_key_cache")
    if cache is None or cache.hub.pid != os.getpid():
        cache = extensions["sluice_key_cache"] = KeyCache(current_hub())
    assert isinstance(cache, KeyCache)
    return cache


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
    plaintext = token.strip()
    key = (
        key_cache().lookup(plaintext) if current_app.config["REDIS_URL"] else lookup_key(plaintext)
    )
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
