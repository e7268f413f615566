"""The one gunicorn configuration, read by `sluice web` (and by a bare `gunicorn` here).

Command-line flags override it: `sluice dev` and the test stack pass their own --bind.
"""

import os

wsgi_app = "app:create_app()"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = 10000
bind = [f"0.0.0.0:{os.environ.get('PORT', '8000')}"]
timeout = 120
graceful_timeout = 5


def post_worker_init(worker: object) -> None:
    """Once the worker has loaded the app: move what start-up made (modules, the app, its
    config) out of the collector's way, so its full collections walk only what requests make."""
    from app.heap import freeze_heap

    freeze_heap()
