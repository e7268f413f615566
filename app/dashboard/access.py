"""Dashboard access: an admin API key, remembered as its key id in the signed session."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

from flask import Flask, session

from app.auth import lookup_key
from app.extensions import db
from app.models import ApiKey

SESSION_KEY = "dashboard_key_id"


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
