"""Worker liveness in Redis: each worker beats; readyz and the dashboard read the beats."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

WORKERS_KEY = "sluice:workers"
QUEUE_MODES = {"interactive": "stream", "batch": "batch"}


def beat(client: redis.Redis, hostname: str, queues: list[str], **info: Any) -> None:
    """Record that this worker is alive now."""
    modes = sorted({QUEUE_MODES[q] for q in queues if q in QUEUE_MODES})
    payload = json.dumps({"hostname": hostname, "queues": queues, "modes": modes, **info})
    with client.pipeline() as pipe:
        pipe.zadd(WORKERS_KEY, {hostname: time.time()})
        pipe.set(f"{WORKERS_KEY}:{hostname}", payload, ex=60)
        pipe.execute()


def worker_info(worker: Any) -> dict[str, Any]:
    """The beat's details of a Celery worker: pool, concurrency, tasks running now."""
    from celery.worker import state

    pool = getattr(worker, "pool", None)
    pool_name = type(pool).__module__.rsplit(".", 1)[-1] if pool is not None else None
    return {
        "pool": pool_name,
        "concurrency": getattr(worker, "concurrency", None),
        "active": len(state.active_requests),
    }


def forget(client: redis.Redis, hostname: str) -> None:
    client.zrem(WORKERS_KEY, hostname)
    client.delete(f"{WORKERS_KEY}:{hostname}")


def live_workers(client: redis.Redis, max_age: float) -> list[dict[str, Any]]:
    """Workers that beat within max_age seconds, with their queues and modes."""
    now = time.time()
    client.zremrangebyscore(WORKERS_KEY, "-inf", now - 3600)
    # (member, score) pairs with withscores=True, whatever redis-py's annotation says
    names = cast(
        list[tuple[str, float]],
        client.zrangebyscore(WORKERS_KEY, now - max_age, "+inf", withscores=True),
    )
    workers = []
    for name, seen in names:
        raw = client.get(f"{WORKERS_KEY}:{name}")
        if raw:
            workers.append(json.loads(raw) | {"last_seen": seen})
    return workers


def known_workers(client: redis.Redis, max_age: float) -> list[dict[str, Any]]:
    """Every worker that beat within the last hour, `online` when within max_age."""
    now = time.time()
    names = cast(
        list[tuple[str, float]],
        client.zrangebyscore(WORKERS_KEY, now - 3600, "+inf", withscores=True),
    )
    if not names:
        return []
    payloads = client.mget([f"{WORKERS_KEY}:{name}" for name, _ in names])
    found = []
    for (name, seen), raw in zip(names, payloads, strict=True):
        info = json.loads(raw) if raw else {"hostname": name, "queues": [], "modes": []}
        found.append(info | {"last_seen": seen, "online": now - seen <= max_age})
    return found
