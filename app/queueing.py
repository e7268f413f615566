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

    transport = {"visibility_timeout": app.config["VISIBILITY_TIMEOUT"]}
    celery.conf.update(
        broker_url=app.config["REDIS_URL"],
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
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
        beat_schedule={
            "sweep": {"task": "sluice.sweep", "schedule": 5.0, "options": {"expires": 5}},
        },
        beat_schedule_filename=str(Path(app.config["SLUICE_HOME"]) / "celerybeat-schedule"),
        worker_hijack_root_logger=False,
    )
    celery.Task = FlaskTask
    celery.set_default()
    app.extensions["celery"] = celery
