"""Celery workers: the stream and batch channels."""
