"""The operators' dashboard: workers, jobs and their modes, live."""

from __future__ import annotations

from app.dashboard import job_views  # noqa: F401  # the job page and playground routes
from app.dashboard.views import bp

__all__ = ["bp"]
