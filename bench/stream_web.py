"""`python -m bench.stream_web`: the web's CPU to set up one stream, in this process alone.

Calls the app's WSGI callable (as gunicorn's gevent worker does, minus the HTTP parse and
the socket) with `POST /v1/chat/completions` (`stream: true`) against a Redis (`REDIS_URL`,
default a local one on db 13, flushed) and a fresh SQLite file, reads the body's first
piece (`retry:`) and closes it: the request's parse, auth, policy, admission, the job's
insert and task push, the relay's subscribe and unsubscribe, all of it in this process
(the stream hub included). No worker runs the jobs: each wave's tasks and slots are
dropped after it. Prints this process's CPU per request for each concurrency (gevent
greenlets); `--profile FILE` writes a cProfile of the last wave. A/B runs of two builds,
alternated, are steadier than the whole-stack bench. Prints; never passes or fails.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import sys
import tempfile
import time
from typing import Any


def main(argv: list[str]) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent.pool

    parser = argparse.ArgumentParser(prog="python -m bench.stream_web", description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--requests", type=int, default=500, help="per wave")
    parser.add_argument("--rounds", type=int, default=3, help="waves per concurrency")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the last wave into FILE")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() after start-up")
    args = parser.parse_args(argv)

    home = tempfile.mkdtemp(prefix="sluice-bench-")
    os.environ.update(
        SLUICE_HOME=home,
        DATABASE_URL=f"sqlite:///{home}/b.db",
        REDIS_URL=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/13",
        SLUICE_LOG_LEVEL="WARNING",
        SLUICE_STREAM_MAX_CONCURRENT="0",
        # no worker writes a first entry: without this, each request waits 1 s for one
        SLUICE_STREAM_ERROR_STATUS_SECONDS="0",
    )
    from app import create_app
    from app.auth import create_key
    from app.extensions import db, redis_store

    app = create_app()
    with app.app_context():
        redis_store.client.flushdb()
        db.create_all()
        key = create_key("bench")[1]
    if args.freeze:
        import gc

        gc.freeze()
    payload = json.dumps(
        {
            "model": "mock/bench",
            "messages": [{"role": "user", "content": "bench"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    base = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/v1/chat/completions",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(payload)),
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_AUTHORIZATION": f"Bearer {key}",
        "HTTP_ACCEPT": "text/event-stream",
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    statuses: dict[str, int] = {}

    def one(_: int) -> None:
        environ: dict[str, Any] = dict(base)
        environ["wsgi.input"] = io.BytesIO(payload)

        def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
            statuses[status] = statuses.get(status, 0) + 1

        body = app.wsgi_app(environ, start_response)
        try:
            next(iter(body), None)  # `retry:` (the relay is subscribed by now)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def wave(concurrency: int, n: int) -> float:
        pool = gevent.pool.Pool(concurrency)
        started = time.process_time()
        for i in range(n):
            pool.spawn(one, i)
        pool.join()
        spent = time.process_time() - started
        with app.app_context():  # no worker: drop the wave's tasks and slots
            redis_store.client.flushdb()
        return spent * 1000 / n

    print("\n| requests at once | CPU per request, each round |")
    print("|---:|---|")
    profiler = cProfile.Profile() if args.profile else None
    for concurrency in args.concurrency:
        wave(concurrency, min(args.requests, 50))  # warm: pools, caches, the hub
        figures = []
        for round_ in range(args.rounds):
            last = profiler is not None and concurrency == args.concurrency[-1]
            if last and round_ == args.rounds - 1:
                profiler.enable()  # type: ignore[union-attr]
            figures.append(wave(concurrency, args.requests))
        if profiler is not None:
            profiler.disable()
        shown = " / ".join(f"{f * 1000:.0f} us" for f in figures)
        print(f"| {concurrency} ({args.requests} each) | {shown} |", flush=True)
    print(f"\nstatuses: {statuses}", file=sys.stderr)
    if profiler is not None and args.profile:
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main(sys.argv[1:])
