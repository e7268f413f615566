"""Thin tasks for the batch channel (queue `batch`)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from app.services import batch_runner
from app.services.provider_batches import engine as provider_batches


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


# #13: the provider executor's calls run here, enqueued by the sweeper; each task is safe
# to run twice or after a crash (its row is claimed with a conditional UPDATE first).


@shared_task(name="sluice.batch.provider_submit", ignore_result=True)
def provider_submit(batch_id: str | None, provider: str, model: str) -> int:
    """Assign a group's waiting items to provider batches and send them."""
    return provider_batches.submit_group(batch_id, provider, model)


@shared_task(name="sluice.batch.provider_send", ignore_result=True)
def provider_send(pb_id: str) -> int:
    """Send one provider batch (or find the one its dead sender created)."""
    return provider_batches.send(pb_id)


@shared_task(name="sluice.batch.provider_poll", ignore_result=True)
def provider_poll(pb_id: str) -> int:
    """Poll one provider batch from its stored id; apply its results once it ended."""
    return provider_batches.poll(pb_id)
