"""Worker entry point: `sluice worker --mode stream|batch` (or `celery -A workers.celery_app`)."""

from app import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
