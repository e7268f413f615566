"""The sweeper: one periodic pass over in-flight work of both channels, step by step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def sweep() -> None:
    """Run every step; one failing never stops the others."""
    for name, step in steps():
        try:
            step()
        except Exception:
            log.exception("sweep step %s failed", name)


def steps() -> list[tuple[str, Callable[[], Any]]]:
    """Each channel's sweep steps, by name, in the order they run."""
    from app.services import batch_sweep
    from app.services.stream_runner import sweep_streams

    return [
        ("batch.requeue_lost_items", batch_sweep.requeue_lost_items),
        ("batch.resend_orphaned_chunks", batch_sweep.resend_orphaned_chunks),
        ("batch.expire_due_batches", batch_sweep.expire_due_batches),
        ("batch.finalize_stragglers", batch_sweep.finalize_stragglers),
        ("stream.sweep_streams", sweep_streams),
    ]
