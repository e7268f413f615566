"""Job and batch state changes, broadcast to the dashboard's live feed.

Each change is one Redis PUBLISH on the database's broadcast_channel(), in flask-sse's
message format (`{"data": ..., "type": ...}`), so `flask_sse.Message(**json.loads(raw))`
renders it as an SSE frame. Pub/sub drops what nobody hears; the dashboard re-reads the
database for the truth, so an event is a hint to refresh, never state to rely on.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import inspect

from app.extensions import redis_store
from app.models import Batch, Job
from app.streams.keys import broadcast_channel, db_of

log = logging.getLogger(__name__)

_JOB_FIELDS = ("tenant_id", "mode", "status", "model", "route_rule", "batch_id", "worker")
_BATCH_FIELDS = ("tenant_id", "kind", "status", "model", "total")


def job_changed(job: Job, client: redis.Redis | None = None) -> None:
    """Tell live dashboards that a job was queued, started or ended (best effort).

    `client` may be a pipeline: the PUBLISH then goes with the caller's other commands.
    """
    publish("job", _snapshot(job, _JOB_FIELDS), client)


def batch_changed(batch: Batch) -> None:
    """Tell live dashboards that a batch's status or counts changed (best effort)."""
    publish("batch", _snapshot(batch, _BATCH_FIELDS))


def publish(kind: str, data: dict[str, Any], client: Any = None) -> None:
    """One PUBLISH on the shared pool (or queued on `client`, a pipeline); never raises."""
    try:
        message = json.dumps({"data": data, "type": kind}, default=_json_default)
        client = redis_store.client if client is None else client  # (an empty pipeline is falsy)
        client.publish(broadcast_channel(db_of(client)), message)
    except Exception as exc:  # the feed is best effort: state lives in the database
        log.debug("dashboard event not published: %s", type(exc).__name__)


def _snapshot(obj: Job | Batch, fields: tuple[str, ...]) -> dict[str, Any]:
    """The object's id and whichever fields are loaded, without touching the database.

    After a commit the instance is expired; reading its attributes would issue a SELECT,
    so only what is already in memory is sent.
    """
    try:
        state: Any = inspect(obj)
        loaded = state.dict
        ident = loaded.get("id") or (state.identity[0] if state.identity else None)
        data: dict[str, Any] = {"id": ident}
        data.update({name: loaded[name] for name in fields if name in loaded})
        return data
    except Exception:
        return {"id": getattr(obj, "__dict__", {}).get("id")}


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
