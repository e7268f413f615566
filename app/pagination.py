"""Cursor pagination for every list endpoint: `limit` + `after`, ids in time order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from flask import g, has_request_context
from sqlalchemy import Select, select
from sqlalchemy.orm import InstrumentedAttribute

from app.errors import APIError
from app.extensions import db

T = TypeVar("T")


def page_params(
    args: Mapping[str, str], *, default: int = 20, maximum: int = 100
) -> tuple[int, str | None]:
    """`limit` and `after` from a query string, with OpenAI-style 400s naming the field."""
    raw = args.get("limit")
    limit = default
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            raise APIError(
                400, f"Invalid 'limit': {raw!r} is not an integer.", param="limit"
            ) from None
        if not 1 <= limit <= maximum:
            raise APIError(400, f"Invalid 'limit': must be between 1 and {maximum}.", param="limit")
    after = args.get("after") or None
    if after is not None and (len(after) > 64 or "\x00" in after):
        raise APIError(400, "Invalid 'after': not an id.", param="after")
    return limit, after


def fetch_page(
    stmt: Select[T],
    id_column: InstrumentedAttribute[str],
    *,
    limit: int,
    after: str | None,
    order: str = "desc",
) -> tuple[list[T], bool]:
    """One page of rows after the cursor (newest first unless order="asc"), and has_more.

    The cursor must name one of the caller's objects: an unknown one is a 400 naming
    `after` (not the whole list, as a bare `id < after` would give).
    """
    if after:
        check_cursor(id_column, after)
    if order == "asc":
        if after:
            stmt = stmt.where(id_column > after)
        stmt = stmt.order_by(id_column.asc())
    else:
        if after:
            stmt = stmt.where(id_column < after)
        stmt = stmt.order_by(id_column.desc())
    rows = list(db.session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor-page list object."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def check_cursor(id_column: InstrumentedAttribute[str], after: str) -> None:
    """A 400 naming `after` unless it is the id of an object of the calling tenant."""
    owner = id_column.class_.tenant_id
    found = db.session.scalar(select(owner).where(id_column == after))
    tenant = g.get("tenant_id") if has_request_context() else None
    if found is None or (tenant is not None and found != tenant):
        raise APIError(
            400,
            f"Invalid 'after': no object with id {after!r} (a cursor is the id of the "
            "last object of the previous page).",
            param="after",
            code="invalid_cursor",
        )
