"""A relay's two ways to hand a job's log to its client: an SSE body, or one whole result."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from app import sse
from app.streams.entries import Entry, Generation, is_terminal
from app.streams.hub import Tail


class Renderer(Protocol):
    """Turns a job's log entries into SSE text (render.ChunkRenderer, responses_render)."""

    def render(self, entry_id: str, fields: dict[str, str]) -> str: ...


def sse_body(
    tail: Tail,
    renderer: Renderer,
    retry_ms: int,
    on_close: Callable[[bool], None],
    items: Iterator[Entry | None] | None = None,
) -> Iterator[str]:
    """The SSE body: `retry:`, one event per entry, pings while idle, then [DONE].

    `items`: the tail's follow() already under way (a caller peeked at its first entry),
    else a new one. on_close(finished) runs when the body ends or the client goes away.
    """
    finished = False
    follow = tail.follow() if items is None else items
    try:
        yield sse.retry(retry_ms)
        for item in follow:
            if item is None:
                yield sse.comment()
                continue
            entry_id, fields = item
            text = renderer.render(entry_id, fields)
            if is_terminal(fields):
                finished = True
            yield text
    finally:
        try:
            close = getattr(follow, "close", None)
            if close is not None:
                close()  # (a follow() generator unsubscribes)
        finally:
            on_close(finished)


def collect(tail: Tail) -> Generation:
    """Wait for the terminal entry and return the whole generation (for stream:false)."""
    generation = Generation()
    for item in tail.follow():
        if item is not None:
            generation.add(item[1])
            if generation.ended:
                return generation
    generation.error = {"message": "stream ended", "type": "server_error"}
    return generation
