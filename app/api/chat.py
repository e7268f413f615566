"""/v1 chat endpoints."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("chat", __name__)
