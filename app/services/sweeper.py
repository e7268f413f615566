"""The sweeper: one periodic pass over in-flight work of both channels."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def sweep() -> None:
    """Run each channel's sweep; one failing never stops the other."""
    for name, step in _steps():
        try:
            step()
        except Exception:
            log.exception("sweep step %s failed", name)


def _steps() -> list[tuple[str, Callable[[], None]]]:
    """Each channel's sweep step, by name."""
    from app.services.batch_runner import sweep_batches

    steps: list[tuple[str, Callable[[], None]]] = []
    steps.append(("batch", sweep_batches))
    steps.append(("stream", _sweep_streams))
    return steps


def _sweep_streams() -> None:
    """Fail stream jobs whose worker lease lapsed, and stream jobs queued too long."""
    from app.services.stream_runner import sweep_streams

    sweep_streams()
