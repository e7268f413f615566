"""Redis key and channel names of the stream channel (one place for every name)."""

from __future__ import annotations

from typing import Any

NOTIFY_PREFIX = "sluice:stream-notify:"  # + job id: "job X has new entries" (see entries.py)


def db_of(client: Any) -> int:
    """The database number of a redis-py client or pipeline (its connection pool's)."""
    return int(client.connection_pool.connection_kwargs.get("db") or 0)


def broadcast_channel(db: int) -> str:
    """Job and batch state changes (app/services/events.py), for one Redis database.

    Pub/sub channels are server-wide, not per database: the number keeps two deployments
    that share a Redis server on different databases out of each other's dashboards."""
    return f"sluice:{db}:dashboard"


def cancel_channel(db: int) -> str:
    """The id of each stream job whose cancel flag was just raised, for one Redis database:
    every stream worker process hears it (app/streams/cancels.py)."""
    return f"sluice:{db}:cancels"


def keys_channel(db: int) -> str:
    """ "<key hash> <ack list>" per revoked API key (app/auth.py), for one Redis database."""
    return f"sluice:{db}:keys-revoked"


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
