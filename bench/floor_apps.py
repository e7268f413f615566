"""The bare apps `python -m bench floor` runs: Flask relaying a paced SSE stream, and Celery.

Nothing of Sluice's: a gunicorn + gevent + Flask endpoint that answers a chat request with
N `chat.completion.chunk` events at the fake upstream's pace, and a Celery app configured
as Sluice's (Redis broker, JSON, late acks, prefetch 1, no results) with a task that does
nothing. What these cost is what those parts cost by themselves.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator

import redis
from celery import Celery
from flask import Flask, Response, request

FLOOR_QUEUE = "floor"
LATENCY_KEY = "floor:latency"


def web_app() -> Flask:
    """POST /v1/chat/completions: the body parsed, then paced chunk events and [DONE]."""
    app = Flask("floor")

    @app.post("/v1/chat/completions")
    def chat() -> Response:
        body = request.get_json()
        model = str(body.get("model", "floor"))
        events = int(os.environ.get("FLOOR_EVENTS", "40"))
        ttft = float(os.environ.get("FLOOR_TTFT_MS", "100")) / 1000
        interval = float(os.environ.get("FLOOR_INTERVAL_MS", "20")) / 1000
        head = {"id": "chatcmpl-floor", "object": "chat.completion.chunk", "model": model}

        def body_events() -> Iterator[str]:
            yield "retry: 1000\n\n"
            time.sleep(ttft)
            for n in range(events):
                choice = {"index": 0, "delta": {"content": f"t{n} "}, "finish_reason": None}
                yield f"id: {n}\ndata: {json.dumps(head | {'choices': [choice]})}\n\n"
                time.sleep(interval)
            yield "data: [DONE]\n\n"

        return Response(body_events(), mimetype="text/event-stream")

    return app


@functools.cache
def latency_client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def celery_app(redis_url: str) -> Celery:
    """Celery as Sluice configures it for stream tasks; `floor.noop` does nothing."""
    app = Celery("floor", broker=redis_url)
    app.conf.update(
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=FLOOR_QUEUE,
        broker_transport_options={"max_connections": 1000},
        worker_hijack_root_logger=False,
    )

    @app.task(name="floor.noop")
    def noop(job_id: str, record: dict[str, object], sent: float = 0.0) -> None:
        """Nothing (what is measured is Celery's pick-up, bookkeeping and ack); with `sent`,
        note how long the message took from its send to this line (the latency pass)."""
        if sent:
            latency_client().rpush(LATENCY_KEY, time.time() - sent)

    return app


if os.environ.get("FLOOR_CELERY"):  # only in the floor's own worker processes (celery -A)
    app = celery_app(os.environ["REDIS_URL"])
