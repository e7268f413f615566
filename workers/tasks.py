"""Thin Celery tasks: load ids, call services, retry."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="sluice.sweep", ignore_result=True, acks_late=False)
def sweep() -> None:
    """Periodic: re-queue stuck work, fail dead streams, expire old batches."""
