"""`python -m bench batch`: document batches end to end on the real stack.

Starts the fake upstream as its own process (`python -m tests.fake_upstream`), a fresh
SLUICE_HOME (SQLite unless DATABASE_URL; embedded Redis unless REDIS_URL), gunicorn
(gevent) and Celery batch workers, then measures:

- documents/s from submit to the last result stored, with an instant upstream and with a
  200 ms upstream, against the ideal (in-flight provider calls / latency);
- time and peak RSS of the web process to accept a 100,000-document JSONL upload.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.embedded_redis import die_with_parent
from tests.stack import Stack, free_port


def _run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return done.stdout.strip()


class Bench:
    """The stack for one benchmark configuration."""

    def __init__(self, args: argparse.Namespace, delay_ms: float) -> None:
        self.args = args
        self.delay_ms = delay_ms
        self.home = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
        self.upstream_port = free_port()
        self.upstream: subprocess.Popen[bytes] | None = None
        env = dict(os.environ)
        env.update(
            {
                "SLUICE_HOME": str(self.home),
                "OPENAI_API_KEY": "sk-bench",
                "OPENAI_BASE_URL": f"http://127.0.0.1:{self.upstream_port}/v1",
                "SLUICE_LOG_LEVEL": "WARNING",
                "SLUICE_BATCH_CHUNK_SIZE": str(args.chunk),
                "SLUICE_PROVIDER_CONCURRENCY": str(args.provider_concurrency),
                "SLUICE_BATCH_ITEM_CONCURRENCY": str(args.item_concurrency),
                "SLUICE_WORKER_HEARTBEAT_SECONDS": "1",
            }
        )
        env.pop("SLUICE_CONFIG", None)
        self.env = env
        self.stack = Stack(env=env, home=self.home)

    def __enter__(self) -> Bench:
        py = sys.executable
        self.upstream = subprocess.Popen(
            [py, "-m", "tests.fake_upstream", "--port", str(self.upstream_port),
             "--delay-ms", str(self.delay_ms), "--tokens", "20"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )  # fmt: skip
        if not self.env.get("REDIS_URL"):
            from app import embedded_redis

            self.env["REDIS_URL"], self._redis = embedded_redis.start(self.home / "redis")
        _run([py, "-c", "from app.cli import main; main()", "db", "upgrade"], self.env)
        self.key = _run(
            [py, "-c", "from app.cli import main; main()", "keys", "create", "--tenant", "bench"],
            self.env,
        )
        self.stack.start_web()
        self.stack.start_worker("stream", concurrency=10)  # readyz wants one; it stays idle
        for i in range(self.args.workers):
            self.stack.start_worker("batch", f"batch{i}", concurrency=self.args.concurrency)
        self.stack.wait_ready()
        self.http = httpx.Client(
            base_url=self.stack.url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=httpx.Timeout(600),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        self.stack.stop()
        if self.upstream:
            self.upstream.terminate()
            self.upstream.wait(10)
        if getattr(self, "_redis", None):
            self._redis.terminate()
            self._redis.wait(10)

    def web_pids(self) -> list[int]:
        root = psutil.Process(self.stack.procs["web"].pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]

    def submit_jsonl(self, n: int, model: str) -> tuple[float, dict[str, Any]]:
        def body() -> Iterator[bytes]:
            lines = []
            for i in range(n):
                lines.append(json.dumps({"id": f"d{i}", "text": f"document {i}: " + "lorem " * 20}))
                if len(lines) == 1000:
                    yield ("\n".join(lines) + "\n").encode()
                    lines = []
            if lines:
                yield ("\n".join(lines) + "\n").encode()

        started = time.perf_counter()
        response = self.http.post(
            "/v1/document-batches",
            content=body(),
            params={"model": model, "instructions": "Summarise the document.", "max_tokens": 20},
            headers={"Content-Type": "application/jsonl"},
        )
        elapsed = time.perf_counter() - started
        if response.status_code != 202:
            sys.exit(f"submit failed: {response.status_code} {response.text[:500]}")
        return elapsed, response.json()

    def wait(self, batch_id: str) -> dict[str, Any]:
        while True:
            batch = self.http.get(f"/v1/document-batches/{batch_id}").json()
            if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                return batch
            time.sleep(0.05)


def throughput(args: argparse.Namespace, delay_ms: float, n: int) -> dict[str, Any]:
    with Bench(args, delay_ms) as bench:
        _, warm = bench.submit_jsonl(min(n, 200), "openai/warmup")  # connections, imports
        bench.wait(warm["id"])
        started = time.perf_counter()
        accept, batch = bench.submit_jsonl(n, "openai/bench")
        done = bench.wait(batch["id"])
        elapsed = time.perf_counter() - started
    inflight = min(
        args.provider_concurrency, args.workers * args.concurrency * args.item_concurrency
    )
    ideal = inflight / (delay_ms / 1000) if delay_ms else None
    return {
        "upstream": f"{delay_ms:g} ms",
        "documents": n,
        "succeeded": done["counts"]["succeeded"],
        "accept_s": accept,
        "total_s": elapsed,
        "docs_per_s": n / elapsed,
        "ideal": ideal,
        "inflight": inflight,
    }


def acceptance(args: argparse.Namespace, n: int) -> dict[str, Any]:
    with Bench(args, 0) as bench:
        pids = bench.web_pids()
        peak = {pid: 0 for pid in pids}
        base = {pid: psutil.Process(pid).memory_info().rss for pid in pids}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for pid in pids:
                    try:
                        peak[pid] = max(peak[pid], psutil.Process(pid).memory_info().rss)
                    except psutil.NoSuchProcess:
                        pass
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds, batch = bench.submit_jsonl(n, "openai/accept")
        stop.set()
        sampler.join()
        bench.http.post(f"/v1/document-batches/{batch['id']}/cancel")
    worker_pid = max(pids, key=lambda p: peak[p])
    return {
        "documents": n,
        "accept_s": seconds,
        "docs_per_s": n / seconds,
        "rss_before_mb": base[worker_pid] / 2**20,
        "rss_peak_mb": peak[worker_pid] / 2**20,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench batch", description=__doc__)
    parser.add_argument("--documents", type=int, default=20_000, help="for the instant run")
    parser.add_argument("--slow-documents", type=int, default=5_000, help="for the 200 ms run")
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--accept-documents", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1, help="batch worker processes")
    parser.add_argument("--concurrency", type=int, default=64, help="greenlets per worker")
    parser.add_argument("--chunk", type=int, default=100, help="BATCH_CHUNK_SIZE")
    parser.add_argument("--item-concurrency", type=int, default=100)
    parser.add_argument("--provider-concurrency", type=int, default=256)
    parser.add_argument("--only", choices=["instant", "slow", "accept"], default=None)
    args = parser.parse_args(argv)

    print(
        f"batch workers: {args.workers} x -c {args.concurrency}, chunk {args.chunk}, "
        f"item concurrency {args.item_concurrency}, PROVIDER_CONCURRENCY "
        f"{args.provider_concurrency}, database "
        f"{'postgres' if os.environ.get('DATABASE_URL') else 'sqlite'}"
    )
    rows = []
    if args.only in (None, "instant"):
        rows.append(throughput(args, 0, args.documents))
    if args.only in (None, "slow"):
        rows.append(throughput(args, args.delay_ms, args.slow_documents))
    if rows:
        print()
        print(
            "| upstream | documents | accepted in | submit -> last result | documents/s"
            " | ideal | % of ideal |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            ideal = f"{r['ideal']:,.0f} ({r['inflight']} in flight)" if r["ideal"] else "n/a"
            pct = f"{100 * r['docs_per_s'] / r['ideal']:.0f}%" if r["ideal"] else "n/a"
            print(
                f"| {r['upstream']} | {r['documents']:,} ({r['succeeded']:,} ok) | "
                f"{r['accept_s']:.2f} s | {r['total_s']:.2f} s | {r['docs_per_s']:,.0f} | "
                f"{ideal} | {pct} |"
            )
    if args.only in (None, "accept"):
        a = acceptance(args, args.accept_documents)
        print()
        print("| JSONL documents | accepted in | documents/s | web RSS before | web RSS peak |")
        print("|---|---|---|---|---|")
        print(
            f"| {a['documents']:,} | {a['accept_s']:.2f} s | {a['docs_per_s']:,.0f} | "
            f"{a['rss_before_mb']:.0f} MB | {a['rss_peak_mb']:.0f} MB |"
        )
