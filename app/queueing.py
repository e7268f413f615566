"""Celery built inside the factory from app.config: queues, reliability settings, FlaskTask."""

from __future__ import annotations

import base64
import logging
import os
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import redis
from celery import Celery, Task, bootsteps, signals
from celery.backends.base import DisabledBackend
from celery.utils.nodenames import anon_nodename
from flask import Flask, current_app
from kombu import Queue
from kombu.utils.json import dumps

from app.extensions import REDIS_URL_MISSING, keepalive, redis_store
from app.services.heartbeat import beat, forget, worker_info

log = logging.getLogger(__name__)

STREAM_QUEUE = "interactive"
BATCH_QUEUE = "batch"


def broker_url(redis_url: str | None) -> str | None:
    """Celery's broker URL for a Redis URL: kombu spells a Unix socket `redis+socket://`,
    and its database `?virtual_host=N` (it ignores redis-py's `?db=N`)."""
    if not redis_url or not redis_url.startswith("unix://"):
        return redis_url
    path, _, query = redis_url.removeprefix("unix://").partition("?")
    params = [("virtual_host" if k == "db" else k, v) for k, v in parse_qsl(query)]
    return "redis+socket://" + path + (f"?{urlencode(params)}" if params else "")


def celery_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Sluice's Celery settings, each overridable by the CELERY mapping ([celery] in TOML)."""
    redis_timeouts = {
        "socket_timeout": config["REDIS_SOCKET_TIMEOUT"],
        "socket_connect_timeout": config["REDIS_CONNECT_TIMEOUT"],
        **keepalive(config["REDIS_URL"] or ""),
    }
    settings: dict[str, Any] = {
        "broker_url": broker_url(config["REDIS_URL"]),
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


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


_directs: weakref.WeakKeyDictionary[Celery, tuple[str, bool]] = weakref.WeakKeyDictionary()


def _direct(celery_app: Celery) -> bool:
    """Whether a task message may be LPUSHed by hand: a plain Redis broker on the app's Redis
    (no key prefix), JSON, protocol 2, uncompressed: exactly what `task_message` writes.

    Asked once per Celery app and Redis URL (reading Celery's settings costs ~20 us)."""
    url = current_app.config["REDIS_URL"]
    known = _directs.get(celery_app)
    if known is not None and known[0] == url:
        return known[1]
    direct = _direct_now(celery_app, url)
    _directs[celery_app] = (url, direct)
    return direct


def _direct_now(celery_app: Celery, url: str) -> bool:
    conf = celery_app.conf
    options = conf.broker_transport_options or {}
    return (
        conf.broker_url == broker_url(url)
        and str(conf.broker_url).startswith(("redis://", "rediss://", "redis+socket://"))
        and not options.get("global_keyprefix")
        and conf.task_serializer == "json"
        and not conf.task_compression
        and conf.task_protocol == 2
    )


def task_message(celery_app: Celery, name: str, args: list[Any], queue: str) -> str:
    """The kombu message (protocol 2) Celery's send_task would LPUSH onto `queue`, as JSON.

    Celery's `before_task_publish` receivers run on its headers as they would for
    send_task (they add the request and tenant ids, app/logs.py).
    """
    task_id = str(uuid.uuid4())
    argsrepr = f"[{args[0]!r}, ...]" if len(args) > 1 else repr(args)
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": argsrepr,
        "kwargsrepr": "{}",
        "origin": anon_nodename(),
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": celery_app.oid,
        "argsrepr": argsrepr,
        "kwargsrepr": "{}",
    }
    body: tuple[list[Any], dict[str, Any], dict[str, None]] = (args, {}, _EMBED)
    if signals.before_task_publish.receivers:
        signals.before_task_publish.send(
            sender=name,
            body=body,
            exchange="",
            routing_key=queue,
            declare=[],
            headers=headers,
            properties=properties,
            retry_policy=None,
        )
    properties |= {
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    message = {
        "body": base64.b64encode(dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return str(dumps(message))


def push_task(client: redis.Redis, name: str, args: list[Any], queue: str) -> None:
    """Send a task as `send_task` does, but as one LPUSH on `client` (a pipeline: the
    caller's other commands share its round trip) when the broker is the app's own Redis;
    otherwise through Celery, at once. Priority 0, so the queue's key is its name."""
    celery_app = current_app.extensions["celery"]
    if not _direct(celery_app):
        send_task(name, args, queue)
        return
    client.lpush(queue, task_message(celery_app, name, args, queue))


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
