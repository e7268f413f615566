"""Celery built inside the factory from app.config: queues, reliability settings, FlaskTask."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from celery import Celery, Task, bootsteps
from celery.backends.base import DisabledBackend
from flask import Flask, current_app
from kombu import Queue

from app.extensions import REDIS_URL_MISSING, redis_store
from app.services.heartbeat import beat, forget, worker_info

log = logging.getLogger(__name__)

STREAM_QUEUE = "interactive"
BATCH_QUEUE = "batch"


def celery_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Sluice's Celery settings, each overridable by the CELERY mapping ([celery] in TOML)."""
    redis_timeouts = {
        "socket_timeout": config["REDIS_SOCKET_TIMEOUT"],
        "socket_connect_timeout": config["REDIS_CONNECT_TIMEOUT"],
        "socket_keepalive": True,
    }
    settings: dict[str, Any] = {
        "broker_url": config["REDIS_URL"],
        # gevent pools ack hundreds of late-acked tasks at once: kombu's default of 10 Redis
        # connections runs dry (MaxConnectionsError), the consumer reconnects and cancels its
        # running tasks. Connections are opened lazily, so a high cap costs nothing idle.
        "broker_transport_options": {
            "visibility_timeout": config["VISIBILITY_TIMEOUT"],
            "max_connections": config["BROKER_MAX_CONNECTIONS"],
            **redis_timeouts,
        },
        "broker_connection_retry_on_startup": True,
        "broker_pool_limit": 100,  # producers shared by the web's greenlets
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_queues": [Queue(STREAM_QUEUE), Queue(BATCH_QUEUE)],
        "task_default_queue": BATCH_QUEUE,
        "task_routes": {"sluice.stream.*": {"queue": STREAM_QUEUE}},
        "imports": ["workers.tasks", "workers.stream_tasks", "workers.batch_tasks"],
        "beat_schedule": {},  # beat's own process runs the sweeper (sweep_in_beat below)
        "beat_schedule_filename": str(Path(config["SLUICE_HOME"]) / "celerybeat-schedule"),
        "worker_hijack_root_logger": False,
    }
    return settings | dict(config.get("CELERY") or {})


def celery_init_app(app: Flask) -> Celery:
    """A Celery app of this Flask app's own, whose every task runs inside an app context."""

    class FlaskTask(Task[Any, Any]):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app: Celery = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(celery_settings(app.config))
    celery_app.steps["worker"].add(worker_heartbeat(app))
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def send_task(name: str, args: list[Any], queue: str) -> None:
    """Send a task by name through the current app's Celery.

    Every Sluice task ignores its result: saying so spares Celery a result backend per
    greenlet (thread-local) on every send, and the log's args repr names the first
    argument (the id) instead of walking a whole stored request.
    """
    celery_app = current_app.extensions["celery"]
    argsrepr = f"[{args[0]!r}, ...]" if len(args) > 1 else repr(args)
    celery_app.send_task(
        name,
        args=args,
        queue=queue,
        ignore_result=True,
        reply_to=celery_app.oid,
        argsrepr=argsrepr,
        kwargsrepr="{}",
    )


def share_disabled_backend(celery_app: Celery) -> None:
    """Give every task one results-disabled backend instead of one per greenlet.

    Celery keeps its backend per thread, which under gevent is per greenlet: each task ran
    in a new one and built a DisabledBackend (~70 us of CPU). It holds no state, so one
    serves all; a configured result backend (which may hold connections) is left alone.
    """
    backend = celery_app.backend
    if isinstance(backend, DisabledBackend):
        for task in celery_app.tasks.values():
            task.backend = backend


def worker_heartbeat(app: Flask) -> type[bootsteps.StartStopStep]:
    """A worker bootstep beating this node's name, queues and pid into Redis while it runs.

    A stream worker first loads the provider SDKs (seconds of CPU that would starve the
    beats under gevent), so it is announced live only once it can take jobs at full speed.
    """

    class Heartbeat(bootsteps.StartStopStep):
        def __init__(self, worker: Any, **kwargs: Any) -> None:
            if not app.config["REDIS_URL"]:
                raise RuntimeError(REDIS_URL_MISSING)
            self.stop_event = threading.Event()
            super().__init__(worker, **kwargs)

        def start(self, worker: Any) -> None:
            share_disabled_backend(worker.app)
            queues = sorted(q.name for q in worker.app.amqp.queues.consume_from.values())
            if STREAM_QUEUE in queues:
                from app.providers import providers

                providers(app).warm_up()
            every = app.config["WORKER_HEARTBEAT_SECONDS"]
            args = (worker, queues, every)
            threading.Thread(target=self._beat, args=args, daemon=True, name="heartbeat").start()

        def stop(self, worker: Any) -> None:
            self.stop_event.set()
            try:
                forget(redis_store.for_app(app), worker.hostname)
            except Exception as exc:
                log.warning("could not remove the heartbeat of %s: %r", worker.hostname, exc)

        def _beat(self, worker: Any, queues: list[str], every: float) -> None:
            while not self.stop_event.is_set():
                try:
                    info = worker_info(worker)
                    beat(redis_store.for_app(app), worker.hostname, queues, pid=os.getpid(), **info)
                except Exception as exc:
                    log.warning("heartbeat of %s failed: %r", worker.hostname, exc)
                self.stop_event.wait(every)

    return Heartbeat
