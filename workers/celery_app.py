"""Worker entry point: `sluice worker --mode stream|batch` (or `celery -A workers.celery_app`)."""

from typing import Any

from celery.signals import beat_init

from app import create_app
from app.services import sweeper

flask_app = create_app()
celery_app = flask_app.extensions["celery"]


@beat_init.connect(weak=False)
def _sweep_in_beat(sender: Any, **_: Any) -> None:
    """Beat's process runs the sweeper itself: never through a queue, so no backlog delays it."""
    if sender.app is celery_app:
        sweeper.start(flask_app)
