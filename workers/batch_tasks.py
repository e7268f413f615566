"""Thin tasks for the batch channel (queue `batch`)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from app.services import batch_runner


def _worker(task: Any) -> str:
    return str(task.request.hostname or "local")


@shared_task(name="sluice.batch.run_chunk", bind=True, ignore_result=True)
def run_chunk(self: Any, batch_id: str, first: int, last: int) -> int:
    """Run the still-queued items first..last of a batch (safe to run twice)."""
    return batch_runner.run_chunk(batch_id, first, last, _worker(self))


@shared_task(name="sluice.batch.run_job", bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> bool:
    """Run one standalone background job (safe to run twice)."""
    return batch_runner.run_job(job_id, _worker(self))
