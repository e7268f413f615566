"""Dashboard access: an admin API key, remembered as its key id in the signed session."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

from flask import Flask, request, session
from flask.sessions import SecureCookieSessionInterface

from app.auth import hash_key, lookup_key
from app.extensions import db, redis_store
from app.models import ApiKey

SESSION_KEY = "dashboard_key_id"
LINK_SECONDS = 60  # a one-time sign-in link's life
LINK_PREFIX = "sluice:dashboard:login-link:"


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with `Secure` whenever the request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
        return bool(super().get_cookie_secure(app) or request.is_secure or forwarded == "https")


def secret_key_for(app: Flask) -> str:
    """SLUICE_SECRET_KEY, else a random key kept (0600) in SLUICE_HOME/secret-key."""
    configured = app.config.get("SECRET_KEY")
    if configured:
        return str(configured)
    return load_or_create_secret(Path(app.config["SLUICE_HOME"]) / "secret-key")


def load_or_create_secret(path: Path) -> str:
    """Read the key file, creating it atomically on first use (safe across processes)."""
    for _ in range(50):
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value = ""
        if value:
            return value
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-key-")
        try:
            os.write(fd, (secrets.token_urlsafe(48) + "\n").encode())
            os.fchmod(fd, 0o600)
            os.close(fd)
            os.link(tmp, path)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        time.sleep(0.01)
    raise RuntimeError(f"could not read or create the secret key at {path}")


def login(plaintext: str) -> bool:
    """Remember an admin key in the session; False (and forget) for any other key."""
    key = lookup_key(plaintext.strip()) if plaintext and plaintext.strip() else None
    if key is None or not key.is_admin:
        session.pop(SESSION_KEY, None)
        return False
    session.clear()
    session[SESSION_KEY] = key.id
    session.permanent = True
    return True


def create_login_link(authorization: str) -> str | None:
    """A one-time sign-in token for the admin key in `Bearer <key>`; None for any other."""
    scheme, _, plaintext = authorization.partition(" ")
    key = lookup_key(plaintext.strip()) if scheme.lower() == "bearer" and plaintext else None
    if key is None or not key.is_admin:
        return None
    token = secrets.token_urlsafe(32)
    redis_store.client.set(LINK_PREFIX + hash_key(token), key.id, ex=LINK_SECONDS)
    return token


def login_with_link(token: str) -> bool:
    """Sign in with a one-time token (used up here); a bad one leaves the session as it was."""
    key_id = redis_store.client.getdel(LINK_PREFIX + hash_key(token)) if token else None
    if not key_id:
        return False
    key = db.session.get(ApiKey, key_id.decode() if isinstance(key_id, bytes) else key_id)
    if key is None or key.revoked_at is not None or not key.is_admin:
        return False
    session.clear()
    session[SESSION_KEY] = key.id
    session.permanent = True
    return True


def logout() -> None:
    session.pop(SESSION_KEY, None)


def current_admin() -> ApiKey | None:
    """The session's admin key if it is still live and still admin (revocation applies)."""
    key_id = session.get(SESSION_KEY)
    if not isinstance(key_id, str):
        return None
    key = db.session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None or not key.is_admin:
        return None
    return key
