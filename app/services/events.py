"""Job and batch state changes, broadcast to the dashboard's live feed."""

from __future__ import annotations

from app.models import Batch, Job


def job_changed(job: Job) -> None:
    """Tell live dashboards that a job was queued, started or ended (best effort)."""


def batch_changed(batch: Batch) -> None:
    """Tell live dashboards that a batch's status or counts changed (best effort)."""
