"""/v1 document-batches endpoints."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("document_batches", __name__)
