"""`python -m bench.stream_worker`: the stream runner's CPU per stream, in this process alone.

Runs `run_stream_job` (as the Celery task does, minus Celery) in gevent greenlets against
the fake upstream (its own process), a Redis (`REDIS_URL`, default a local one on db 14,
flushed) and a fresh SQLite file; prints this process's CPU per stream for 1-token and
N-token waves at each concurrency, and from their difference the set-up per stream and the
cost per delta. No web, no Celery, no client: only the runner's own work is counted, so
A/B runs of two builds (alternated) are steadier than the whole-stack bench. Prints; never
passes or fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    """The fake upstream as its own process on `port`, once it answers its health check."""
    import httpx

    upstream = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/_health")
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    return upstream


def main(argv: list[str]) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent.pool

    parser = argparse.ArgumentParser(prog="python -m bench.stream_worker", description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument(
        "--streams", type=int, default=0, help="per wave (0: 4 x concurrency, >= 30)"
    )
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--tps", type=float, default=50.0)
    args = parser.parse_args(argv)

    home, port = tempfile.mkdtemp(prefix="sluice-bench-"), free_port()
    os.environ.update(
        SLUICE_HOME=home,
        DATABASE_URL=f"sqlite:///{home}/b.db",
        REDIS_URL=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/14",
        OPENAI_API_KEY="sk-bench",
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
        SLUICE_LOG_LEVEL="WARNING",
    )
    upstream = start_upstream(port)
    try:
        run(args, gevent.pool.Pool)
    finally:
        upstream.terminate()


def run(args: argparse.Namespace, pool_cls: Any) -> None:
    from app import create_app
    from app.extensions import db, redis_store
    from app.models import Job, Tenant
    from app.providers import providers
    from app.services.stream_runner import run_stream_job

    app = create_app()
    with app.app_context():
        redis_store.client.flushdb()
        db.create_all()
        tenant = Tenant(name="bench")
        db.session.add(tenant)
        db.session.commit()
        tenant_id = tenant.id
        providers(app).warm_up()

    def jobs(n: int, tokens: int) -> tuple[list[str], dict[str, Any]]:
        options = f"ttft_ms={args.ttft_ms:g}&tps={args.tps:g}&tokens={tokens}"
        payload = {
            "model": f"openai/bench?{options}",
            "messages": [{"role": "user", "content": "bench"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with app.app_context():
            rows = [
                Job(tenant_id=tenant_id, mode="stream", provider="openai",
                    model=payload["model"], request=payload, status="queued")
                for _ in range(n)
            ]  # fmt: skip
            db.session.add_all(rows)
            db.session.commit()
            return [row.id for row in rows], payload

    def one(job_id: str, payload: dict[str, Any]) -> str:
        with app.app_context():  # as the Celery task (FlaskTask) does
            return run_stream_job(job_id, payload, worker="bench@host")

    def wave(concurrency: int, ids: list[str], payload: dict[str, Any]) -> set[str]:
        pool = pool_cls(concurrency)
        greenlets = [pool.spawn(one, job_id, payload) for job_id in ids]
        pool.join()
        return {g.value for g in greenlets}

    print("\n| streams at once | tokens | CPU per stream | runner set-up | per delta | outcomes |")
    print("|---:|---:|---:|---:|---:|---|")
    for concurrency in args.concurrency:
        total = args.streams or max(concurrency * 4, 30)
        per: dict[int, float] = {}
        outcomes: set[str] = set()
        for tokens in (1, args.tokens):
            warm, payload = jobs(min(concurrency, 10), tokens)
            wave(concurrency, warm, payload)
            ids, payload = jobs(total, tokens)
            started = time.process_time()
            outcomes |= wave(concurrency, ids, payload)
            per[tokens] = (time.process_time() - started) * 1000 / total
        delta = (per[args.tokens] - per[1]) / max(1, args.tokens - 1)
        print(
            f"| {concurrency} ({total} streams) | 1 / {args.tokens} "
            f"| {per[1]:.2f} / {per[args.tokens]:.2f} ms | {per[1] - delta:.2f} ms "
            f"| {delta * 1000:.0f} us | {', '.join(sorted(outcomes))} |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
