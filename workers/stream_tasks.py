"""Thin tasks for the stream channel (queue `interactive`)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from app.services.stream_runner import run_stream_job


@shared_task(name="sluice.stream.run", bind=True, ignore_result=True)
def run(self: Any, job_id: str, payload: dict[str, Any] | None = None) -> str:
    """Run one stream job; safe to deliver twice (a held lease or a finished job is a no-op)."""
    return run_stream_job(job_id, payload, worker=self.request.hostname or "")
