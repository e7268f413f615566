"""`python -m bench batch`: document batches end to end on the real stack.

Starts the fake upstream as its own process (`python -m tests.fake_upstream`), a fresh
SLUICE_HOME (SQLite unless DATABASE_URL; embedded Redis unless REDIS_URL), gunicorn
(gevent) and Celery batch workers, then measures:

- documents/s from submit to the last result stored, with an instant upstream and with a
  200 ms upstream, against the ideal (in-flight provider calls / latency), and the CPU
  time each part of the stack spent per document over that run (the box is shared, so
  CPU per document is the steadier figure);
- time and peak RSS of the web process to accept a 100,000-document JSONL, once as a
  document batch (one streamed body) and once through the OpenAI Files API (upload, then
  POST /v1/batches).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
import redis

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

    def parts(self) -> dict[str, list[int]]:
        """The processes of each part of the stack (a part's children included)."""

        def tree(pid: int) -> list[int]:
            root = psutil.Process(pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]

        out = {"web": self.web_pids()}
        out["batch workers"] = [
            pid
            for name, proc in self.stack.procs.items()
            if name.startswith("batch")
            for pid in tree(proc.pid)
        ]
        if getattr(self, "_redis", None):
            out["redis"] = tree(self._redis.pid)
        if self.upstream:
            out["upstream"] = tree(self.upstream.pid)
        return out

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
        """The batch once it ended. Polled every 0.1 s (the web's CPU per document includes
        these reads), every 10 ms once 99 % of its items are done, so the end is seen within
        ~10 ms, not up to 100 ms late (1 % of a 9 s run)."""
        while True:
            batch = self.http.get(f"/v1/document-batches/{batch_id}").json()
            if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                return batch
            counts = batch.get("counts") or {}
            done = sum(counts.get(k, 0) for k in ("succeeded", "failed", "cancelled", "expired"))
            time.sleep(0.01 if done >= 0.99 * max(1, counts.get("total", 0)) else 0.1)


def cpu_seconds(pids: list[int], kernel_only: bool = False) -> float:
    """User + system (or system only) CPU seconds of these processes so far (gone: 0)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.system if kernel_only else times.user + times.system
    return total


class CPUMeter:
    """CPU seconds spent by each part of the stack between start() and stop()."""

    def __init__(self, parts: dict[str, list[int]]) -> None:
        self.parts = parts
        self.start_at = {name: cpu_seconds(pids) for name, pids in parts.items()}
        self.kernel_at = {name: cpu_seconds(pids, True) for name, pids in parts.items()}
        self.spent: dict[str, float] = {}
        self.kernel: dict[str, float] = {}

    def stop(self) -> dict[str, float]:
        self.spent = {
            name: cpu_seconds(pids) - self.start_at[name] for name, pids in self.parts.items()
        }
        self.kernel = {
            name: cpu_seconds(pids, True) - self.kernel_at[name]
            for name, pids in self.parts.items()
        }
        return self.spent


def profile(
    out: str | None, parts: dict[str, list[int]], tag: str
) -> list[subprocess.Popen[bytes]]:
    """With --py-spy DIR: sample web and batch worker processes (collapsed stacks) into DIR."""
    if not out:
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    procs = []
    for part in ("web", "batch workers"):
        for pid in parts.get(part, []):
            name = f"{tag}-{part.replace(' ', '-')}-{pid}.txt"
            procs.append(
                subprocess.Popen(
                    [
                        str(Path(sys.executable).with_name("py-spy")),
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--output",
                        str(Path(out) / name),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    time.sleep(0.5)  # attached before the run starts
    return procs


def stop_profiling(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


class SlotSampler:
    """The mean number of provider slots held (live leases) while it runs, every 20 ms."""

    def __init__(self, redis_url: str, key: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.key = key
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            seconds, micros = self.client.time()
            now = int(seconds) * 1000 + int(micros) // 1000
            self.samples.append(int(self.client.zcount(self.key, f"({now}", "+inf")))
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.client.close()
        return sum(self.samples) / max(1, len(self.samples))


IDLE_SECONDS = 3.0  # each part's background CPU is measured this long before a run


def throughput(args: argparse.Namespace, delay_ms: float, n: int) -> dict[str, Any]:
    with Bench(args, delay_ms) as bench:
        _, warm = bench.submit_jsonl(min(n, 200), "openai/warmup")  # connections, imports
        bench.wait(warm["id"])
        idle = CPUMeter(bench.parts())
        time.sleep(IDLE_SECONDS)
        idle_rate = {name: spent / IDLE_SECONDS for name, spent in idle.stop().items()}
        meter = CPUMeter(bench.parts())
        profilers = profile(args.py_spy, bench.parts(), f"{delay_ms:g}ms")
        slots = SlotSampler(bench.env["REDIS_URL"], "sluice:provider-sem:openai")
        started = time.perf_counter()
        accept, batch = bench.submit_jsonl(n, "openai/bench")
        done = bench.wait(batch["id"])
        elapsed = time.perf_counter() - started
        cpu = meter.stop()
        in_use = slots.stop()
        stop_profiling(profilers)
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
        "cpu_ms_per_doc": {name: 1000 * spent / n for name, spent in cpu.items()},
        "net_ms_per_doc": {
            name: 1000 * (spent - idle_rate[name] * elapsed) / n for name, spent in cpu.items()
        },
        "load": os.getloadavg()[0],
        "slots_in_use": in_use,
        "worker_kernel_share": meter.kernel["batch workers"] / max(cpu["batch workers"], 1e-9),
    }


class RSSPeak:
    """The peak RSS of the largest of some processes while the block runs."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.base = {pid: psutil.Process(pid).memory_info().rss for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], psutil.Process(pid).memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.02)

    def __enter__(self) -> RSSPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> tuple[float, float]:
        """(RSS before, peak RSS) in MB of the process that grew most."""
        pid = max(self.pids, key=lambda p: self.peak[p])
        return self.base[pid] / 2**20, self.peak[pid] / 2**20


def openai_jsonl(path: Path, n: int, model: str) -> None:
    """An OpenAI Batch API input file of n chat-completions requests."""
    with open(path, "w") as fh:
        for i in range(n):
            body = {
                "model": model,
                "max_tokens": 20,
                "messages": [
                    {"role": "system", "content": "Summarise the document."},
                    {"role": "user", "content": f"document {i}: " + "lorem " * 20},
                ],
            }
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps(line | {"body": body}) + "\n")


def acceptance(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    """Accepting n documents: as a document batch, then through the OpenAI Files API."""
    rows = []
    with Bench(args, 0) as bench:
        # Stop the batch workers, so the runs below measure intake alone.
        for name in [name for name in bench.stack.procs if name.startswith("batch")]:
            bench.stack.kill(name)
        _, warm = bench.submit_jsonl(100, "openai/warmup")  # imports, first-request work
        bench.http.post(f"/v1/document-batches/{warm['id']}/cancel")
        pids = bench.web_pids()
        meter = CPUMeter({"web": pids})
        profilers = profile(args.py_spy, {"web": pids}, "accept-documents")
        with RSSPeak(pids) as rss:
            seconds, batch = bench.submit_jsonl(n, "openai/accept")
        stop_profiling(profilers)
        before, peak = rss.figures()
        rows.append(
            {
                "path": "document batch, one JSONL body",
                "documents": n,
                "steps": f"POST /v1/document-batches {seconds:.2f} s",
                "accept_s": seconds,
                "rss_before_mb": before,
                "rss_peak_mb": peak,
                "web_cpu_s": meter.stop()["web"],
            }
        )
        bench.http.post(f"/v1/document-batches/{batch['id']}/cancel")

        path = bench.home / "requests.jsonl"
        openai_jsonl(path, n, "openai/accept")
        meter = CPUMeter({"web": pids})
        profilers = profile(args.py_spy, {"web": pids}, "accept-openai")
        with RSSPeak(pids) as rss:
            started = time.perf_counter()
            with open(path, "rb") as fh:
                upload = bench.http.post(
                    "/v1/files",
                    files={"file": ("requests.jsonl", fh, "application/jsonl")},
                    data={"purpose": "batch"},
                )
            uploaded = time.perf_counter()
            if upload.status_code != 200:
                sys.exit(f"upload failed: {upload.status_code} {upload.text[:500]}")
            created = bench.http.post(
                "/v1/batches",
                json={
                    "input_file_id": upload.json()["id"],
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            )
            finished = time.perf_counter()
        stop_profiling(profilers)
        if created.status_code != 200 or created.json()["status"] == "failed":
            sys.exit(f"batch create failed: {created.status_code} {created.text[:500]}")
        before, peak = rss.figures()
        rows.append(
            {
                "path": "OpenAI Files + Batches",
                "documents": n,
                "steps": (
                    f"upload {uploaded - started:.2f} s ({path.stat().st_size / 2**20:.0f} MB)"
                    f" + POST /v1/batches {finished - uploaded:.2f} s"
                ),
                "accept_s": finished - started,
                "rss_before_mb": before,
                "rss_peak_mb": peak,
                "web_cpu_s": meter.stop()["web"],
            }
        )
        bench.http.post(f"/v1/batches/{created.json()['id']}/cancel")
    return rows


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
    parser.add_argument(
        "--py-spy", metavar="DIR", help="sample the web and batch workers with py-spy into DIR"
    )
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
        parts = list(rows[0]["cpu_ms_per_doc"])
        print()
        print(
            "| upstream | documents | accepted in | submit -> last result | documents/s"
            " | ideal | % of ideal | slots held (mean) | CPU ms per document: "
            + ", ".join(parts)
            + " | the same net of idle | workers' kernel share | load average |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ideal = f"{r['ideal']:,.0f} ({r['inflight']} in flight)" if r["ideal"] else "n/a"
            pct = f"{100 * r['docs_per_s'] / r['ideal']:.0f}%" if r["ideal"] else "n/a"
            cpu = " + ".join(f"{r['cpu_ms_per_doc'][p]:.2f}" for p in parts)
            net = " + ".join(f"{r['net_ms_per_doc'][p]:.2f}" for p in parts)
            print(
                f"| {r['upstream']} | {r['documents']:,} ({r['succeeded']:,} ok) | "
                f"{r['accept_s']:.2f} s | {r['total_s']:.2f} s | {r['docs_per_s']:,.0f} | "
                f"{ideal} | {pct} | {r['slots_in_use']:.0f} | {cpu} | {net} | "
                f"{100 * r['worker_kernel_share']:.0f}% | {r['load']:.1f} |"
            )
    if args.only in (None, "accept"):
        print()
        print(
            "| intake | documents | steps | accepted in | documents/s | web RSS before"
            " | web RSS peak | web CPU |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for a in acceptance(args, args.accept_documents):
            print(
                f"| {a['path']} | {a['documents']:,} | {a['steps']} | {a['accept_s']:.2f} s | "
                f"{a['documents'] / a['accept_s']:,.0f} | {a['rss_before_mb']:.0f} MB | "
                f"{a['rss_peak_mb']:.0f} MB | {a['web_cpu_s']:.1f} s |"
            )
