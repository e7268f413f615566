"""Server-sent events: the one writer used by every SSE response.

The chat relay, document-batch progress and the dashboard's live feed all build their
bodies from these pieces and answer with `response()`. Comments (`: ping`) and `retry:`
are written without a blank line after them: a blank line would dispatch an event
without data, which the openai SDK tries (and fails) to parse as JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flask import Response


def frame(data: str, *, event: str | None = None, ident: str | None = None) -> str:
    """One event; `data` must be a single line (JSON is)."""
    head = f"event: {event}\n" if event else ""
    if ident:
        head += f"id: {ident}\n"
    return f"{head}data: {data}\n\n"


def comment(text: str = "ping") -> str:
    """A comment line: keeps the connection (and proxies) alive, dispatches nothing."""
    return f": {text}\n"


def retry(ms: int) -> str:
    """The client's reconnection delay."""
    return f"retry: {int(ms)}\n"


def response(body: Iterable[str], headers: Mapping[str, str] | None = None) -> Response:
    """An SSE response, with the headers that stop caches and proxies from buffering it."""
    out = Response(body, content_type="text/event-stream; charset=utf-8")
    if headers:
        out.headers.update(headers)
    out.headers["Cache-Control"] = "no-cache"
    out.headers["X-Accel-Buffering"] = "no"
    return out
