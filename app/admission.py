"""Admission control for the stream channel: concurrent-stream slots held as Redis leases."""

from __future__ import annotations

from app.policy import Route


def acquire_stream_slot(route: Route, tenant_id: str, job_id: str) -> str:
    """Take a slot for job_id or decide the overflow; returns "stream" or "batch".

    Raises APIError(429, with Retry-After) when the route's overflow is reject (or queue,
    after waiting) and no slot is free.
    """
    return "stream"


def release_stream_slot(job_id: str) -> None:
    """Give back job_id's slot (idempotent); called by the worker when the job ends."""


def renew_stream_slot(job_id: str) -> None:
    """Extend job_id's slot lease; called by the worker while the job runs."""
