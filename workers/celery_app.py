"""Worker entry point: `celery -A workers.celery_app worker -Q interactive|batch -P gevent`."""

from __future__ import annotations

import os
import threading
from typing import Any

from celery.signals import beat_init, worker_ready, worker_shutdown

from app import create_app
from app.extensions import redis_store
from app.services import sweeper
from app.services.heartbeat import beat, forget

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
_stop = threading.Event()


def _beat_forever(hostname: str, queues: list[str], every: float) -> None:
    while not _stop.is_set():
        try:
            beat(redis_store.client, hostname, queues, pid=os.getpid())
        except Exception:
            pass
        _stop.wait(every)


@worker_ready.connect
def _start_heartbeat(sender: Any, **_: Any) -> None:
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    every = flask_app.config["WORKER_HEARTBEAT_SECONDS"]
    args = (sender.hostname, queues, every)
    threading.Thread(target=_beat_forever, args=args, daemon=True, name="heartbeat").start()


@worker_shutdown.connect
def _stop_heartbeat(sender: Any, **_: Any) -> None:
    _stop.set()
    forget(redis_store.client, sender.hostname)


@beat_init.connect
def _start_sweeper(sender: Any, **_: Any) -> None:
    """Beat runs the sweeper itself, so no queue backlog can delay or expire a sweep."""
    sweeper.start(flask_app)
