"""Maintenance tasks shared by both channels."""

from __future__ import annotations

from celery import shared_task

from app.services import sweeper


@shared_task(name="sluice.sweep", ignore_result=True, acks_late=False)
def sweep() -> None:
    """One sweep now, on demand (beat's process runs the periodic ones itself)."""
    sweeper.sweep()
