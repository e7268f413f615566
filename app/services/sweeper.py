"""The sweeper: a periodic pass over in-flight work of both channels, step by step.

Beat's process runs it itself (`run_forever`, started on `beat_init`), never through the
broker, so a backlog on any queue cannot delay or expire a sweep. Each step runs on its
own; its last success is recorded in Redis, readable by `last_runs` (for /readyz and the
dashboard).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, current_app
from redis.typing import EncodableT

from app import telemetry
from app.extensions import db, redis_store

log = logging.getLogger(__name__)

RUNS_KEY = "sluice:sweeper:runs"  # hash: step name (or "pass") -> unix time of its last success
PASS = "pass"


def steps() -> list[tuple[str, Callable[[], Any]]]:
    """Each channel's sweep steps, by name, in the order they run."""
    from app.services import batch_sweep, costs, files
    from app.services.provider_batches import engine as provider_batches
    from app.services.stream_runner import sweep_streams

    return [
        ("batch.requeue_lost_items", batch_sweep.requeue_lost_items),
        ("batch.resend_orphaned_chunks", batch_sweep.resend_orphaned_chunks),
        ("batch.resend_stranded_jobs", batch_sweep.resend_stranded_jobs),
        ("batch.expire_due_batches", batch_sweep.expire_due_batches),
        ("batch.finalize_stragglers", batch_sweep.finalize_stragglers),
        ("batch.provider_batches", provider_batches.sweep),  # #13: enqueues the provider calls
        ("stream.sweep_streams", sweep_streams),
        ("costs.settle", costs.settle),  # #13: price ended jobs
        ("files.remove_stale_temp_files", files.remove_stale_temp_files),
    ]


def sweep() -> dict[str, bool]:
    """Run every step; one failing never stops the others. Which steps succeeded."""
    done: dict[str, bool] = {}
    started = time.monotonic()
    for name, step in steps():
        try:
            result = step()
            done[name] = True
            if _acted(result):  # recovering something is worth a line; a quiet pass is not
                log.info("sweep step %s: %s", name, result)
        except Exception:
            log.exception("sweep step %s failed", name)
            done[name] = False
        finally:
            db.session.remove()
    _record(done)
    _sample_queues()
    log.debug("sweep pass in %.0f ms: %s", (time.monotonic() - started) * 1000, done)
    return done


def _acted(result: Any) -> bool:
    """Whether a step's result (a count, or counts by kind) says it did something."""
    if isinstance(result, dict):
        return any(bool(v) for v in result.values())
    return isinstance(result, int) and not isinstance(result, bool) and result > 0


def _sample_queues() -> None:
    """The queue depths into this minute's rollup, for the dashboard's queue-depth chart."""
    try:
        client = redis_store.client
        telemetry.sample_queues(telemetry.queue_depths(client), client)
    except Exception as exc:
        log.warning("could not sample the queue depths: %r", exc)


def _record(done: dict[str, bool]) -> None:
    now = time.time()
    stamps: dict[EncodableT, EncodableT] = {name: now for name, ok in done.items() if ok}
    if all(done.values()):
        stamps[PASS] = now
    try:
        if stamps:
            redis_store.client.hset(RUNS_KEY, mapping=stamps)
    except Exception:
        log.warning("could not record the sweep's run in Redis")


def last_runs(client: redis.Redis | None = None) -> dict[str, float]:
    """Unix time of each step's last success, and of the last pass where all succeeded."""
    raw = (client or redis_store.client).hgetall(RUNS_KEY)
    return {str(name): float(value) for name, value in raw.items()}


def state(client: redis.Redis | None = None) -> str:
    """The sweeper's health for /readyz and the dashboard: "ok", or why not (stale: 3 intervals)."""
    last = last_runs(client).get(PASS)
    if last is None:
        return "missing: no sweep has completed"
    age = time.time() - last
    limit = 3 * current_app.config["SWEEP_INTERVAL_SECONDS"]
    return "ok" if age <= limit else f"stale: last complete sweep {age:.0f}s ago"


def run_forever(app: Flask, stop: threading.Event) -> None:
    """Sweep every SWEEP_INTERVAL_SECONDS until stop is set (beat's sweeper thread)."""
    every = app.config["SWEEP_INTERVAL_SECONDS"]
    while not stop.is_set():
        started = time.monotonic()
        try:
            with app.app_context():
                sweep()
        except Exception:
            log.exception("sweep failed")
        stop.wait(max(0.0, every - (time.monotonic() - started)))


def start(app: Flask) -> threading.Event:
    """Run the sweeper in a daemon thread of this process; set the event to stop it."""
    stop = threading.Event()
    threading.Thread(target=run_forever, args=(app, stop), daemon=True, name="sweeper").start()
    return stop
