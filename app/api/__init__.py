"""The /v1 API: one blueprint per resource, all behind API-key auth."""

from __future__ import annotations

from flask import Blueprint

from app.api import batches, chat, document_batches, files, jobs, keys, models, submit
from app.auth import authenticate

bp = Blueprint("v1", __name__, url_prefix="/v1")
bp.before_request(authenticate)
for resource in (keys, chat, jobs, submit, document_batches, files, batches, models):
    bp.register_blueprint(resource.bp)
