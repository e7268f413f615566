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
    return steps
