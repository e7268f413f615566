"""Maintenance tasks shared by both channels."""

from __future__ import annotations

from celery import shared_task

from app.services import sweeper


@shared_task(name="sluice.sweep", ignore_result=True, acks_late=False)
def sweep() -> None:
    """Periodic: fail dead streams, re-queue stuck batch items, expire old batches."""
    sweeper.sweep()
