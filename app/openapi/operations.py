"""How each route is described: one `Operation` per Flask endpoint (see routes.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

JSON = "application/json"
SSE = "text/event-stream"
JSONL = "application/jsonl"
HTML = "text/html"
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"

# a body is a model (JSON), or media type -> model / raw JSON Schema
Body = type[BaseModel] | Mapping[str, type[BaseModel] | dict[str, Any]]


@dataclass(frozen=True)
class Response:
    """One status: its media types (media type -> model, raw schema, or None for no body)."""

    description: str
    content: Mapping[str, type[BaseModel] | dict[str, Any] | None] = field(default_factory=dict)
    headers: tuple[str, ...] = ()
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (opId, param)


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    where: str = "query"  # query | header
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    responses: dict[str, Response]
    body: Body | None = None
    body_required: bool = True
    params: tuple[Param, ...] = ()
    security: str | None = "bearer"  # bearer | session | None
    description: str = ""


def json_response(
    description: str,
    model: type[BaseModel] | dict[str, Any],
    *,
    headers: tuple[str, ...] = (),
    links: dict[str, tuple[str, str]] | None = None,
) -> Response:
    return Response(description, {JSON: model}, headers=headers, links=links or {})


def string(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


def integer(**extra: Any) -> dict[str, Any]:
    return {"type": "integer", **extra}
