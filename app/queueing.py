"""Celery bound to the Flask app: queues, reliability settings and the FlaskTask."""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from kombu import Queue

from app.extensions import celery

STREAM_QUEUE = "interactive"
BATCH_QUEUE = "batch"


def celery_init_app(app: Flask) -> None:
    """Configure the shared Celery app so every task runs inside an app context."""

    class FlaskTask(celery.Task):  # type: ignore[name-defined,misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    # gevent pools ack hundreds of late-acked tasks at once: kombu's default of 10 Redis
    # connections runs dry (MaxConnectionsError), the consumer reconnects and cancels its
    # running tasks. Connections are opened lazily, so a high cap costs nothing idle.
    transport = {
        "visibility_timeout": app.config["VISIBILITY_TIMEOUT"],
        "max_connections": app.config["BROKER_MAX_CONNECTIONS"],
    }
    celery.conf.update(
        broker_url=app.config["REDIS_URL"],
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_pool_limit=100,  # producers shared by the web's greenlets
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_queues=[Queue(STREAM_QUEUE), Queue(BATCH_QUEUE)],
        task_default_queue=BATCH_QUEUE,
        task_routes={"sluice.stream.*": {"queue": STREAM_QUEUE}},
        imports=["workers.tasks", "workers.stream_tasks", "workers.batch_tasks"],
        beat_schedule={},  # the sweeper runs inside beat's process (app.services.sweeper)
        beat_schedule_filename=str(Path(app.config["SLUICE_HOME"]) / "celerybeat-schedule"),
        worker_hijack_root_logger=False,
    )
    celery.Task = FlaskTask
    celery.set_default()
    app.extensions["celery"] = celery
