"""Redis key and channel names of the stream channel (one place for every name)."""

from __future__ import annotations

NOTIFY_PREFIX = "sluice:stream-notify:"  # + job id: "job X has new entries" (see entries.py)
BROADCAST_CHANNEL = "sluice:dashboard"  # job and batch state changes (app/services/events.py)
KEYS_CHANNEL = "sluice:keys-revoked"  # "<key hash> <ack list>" per revoked API key (app/auth.py)


def notify_channel(job_id: str) -> str:
    """The job's own notice channel: only the web processes relaying the job hear it."""
    return NOTIFY_PREFIX + job_id


def revocation_ack_key(nonce: str) -> str:
    """The list each hub that heard one revocation pushes to once its caches dropped the key."""
    return f"sluice:keys-revoked:ack:{nonce}"


def log_key(job_id: str) -> str:
    """The job's delta log (a Redis Stream)."""
    return f"sluice:stream:{job_id}"


def lease_key(job_id: str) -> str:
    """The running worker's lease on the job."""
    return f"sluice:lease:job:{job_id}"


def cancel_key(job_id: str) -> str:
    """The cancel flag the worker checks between deltas."""
    return f"sluice:cancel:{job_id}"
