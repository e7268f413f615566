"""`python -m bench floor`: what the parts Sluice must use cost by themselves, per stream.

Three measurements on this machine, none of them running Sluice's code:

- web: gunicorn with gevent and a bare Flask endpoint (bench/floor_apps.py) answering a chat
  request with paced `chat.completion.chunk` events, driven by the stream bench's client;
  1-event and N-event waves give its set-up per request and its cost per event;
- Celery: a worker configured as Sluice's stream workers (gevent pool, Redis broker, late
  acks, prefetch 1; two processes) running a task that does nothing, one task at a time
  and at a steady rate; worker and Redis CPU per task;
- provider: the official SDK's streaming call on Sluice's leanest path, alone in one
  process (`python -m bench.provider_calls`, run here as it is).

Their sum is the CPU a 40-token stream costs before any of Sluice's own work (auth,
policy, admission, the job's row, the delta log and its relay). CPU is net of each
process's idle rate. Prints tables; never passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.floor_apps import FLOOR_QUEUE, LATENCY_KEY, celery_app
from bench.stream import Result, children, cpu_seconds, pct, redis_server_pids, sse_stream
from tests.stack import free_port

IDLE_SECONDS = 3.0
WEB = "web: gunicorn + gevent + Flask, SSE"
CELERY = "Celery: a do-nothing task (workers + Redis)"
PROVIDER = "provider: SDK streaming call (bench.provider_calls)"


@dataclass
class Procs:
    """Processes started for one measurement, and their CPU rate at rest."""

    popen: list[subprocess.Popen[bytes]]
    extra_pids: list[int]
    idle_rate: float = 0.0

    def pids(self) -> list[int]:
        return [p for proc in self.popen for p in children(proc.pid)] + self.extra_pids

    def measure_idle(self) -> None:
        before = cpu_seconds(self.pids())
        time.sleep(IDLE_SECONDS)
        self.idle_rate = (cpu_seconds(self.pids()) - before) / IDLE_SECONDS

    def net(self, cpu: float, seconds: float) -> float:
        return max(0.0, cpu - self.idle_rate * seconds)

    def stop(self) -> None:
        for proc in self.popen:
            proc.terminate()
        for proc in self.popen:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


# -- web ---------------------------------------------------------------------------------


def web_floor(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    """gunicorn + gevent + Flask, one process: CPU per request and per SSE event."""
    port = free_port()
    rows = []
    for concurrency in args.concurrency:
        per: dict[int, float] = {}
        for events in (1, args.tokens):
            env = dict(os.environ) | {
                "FLOOR_EVENTS": str(events),
                # the 1-event wave answers at once: its time to the first event is the
                # request's own latency
                "FLOOR_TTFT_MS": str(args.ttft_ms if events > 1 else 0),
                "FLOOR_INTERVAL_MS": str(1000 / args.tps),
            }
            argv = [sys.executable, "-m", "gunicorn", "-k", "gevent", "--workers", "1",
                    "--worker-connections", "2000", "--bind", f"127.0.0.1:{port}",
                    "--log-level", "warning", "bench.floor_apps:web_app()"]  # fmt: skip
            procs = Procs([spawn(argv, env, home / "web.log")], [])
            try:
                wait_http(port)
                asyncio.run(web_wave(port, min(concurrency, 10), min(concurrency, 10)))  # warm
                procs.measure_idle()
                total = max(args.streams, concurrency * args.waves)
                before, started = cpu_seconds(procs.pids()), time.perf_counter()
                results = asyncio.run(web_wave(port, concurrency, total))
                seconds = time.perf_counter() - started
                cpu = procs.net(cpu_seconds(procs.pids()) - before, seconds)
                bad = sum(1 for r in results if not r.ok)
                if bad:
                    print(f"(web floor: {bad} of {total} streams did not end well)")
                per[events] = cpu * 1000 / total
                if events == 1:
                    ttfts = [r.ttft * 1000 for r in results if r.ttft is not None]
            finally:
                procs.stop()
        event = (per[args.tokens] - per[1]) / max(1, args.tokens - 1)
        rows.append(
            {"concurrency": concurrency, "setup": per[1] - event, "delta": event,
             "ttft": (pct(ttfts, 50), pct(ttfts, 99))}
        )  # fmt: skip
    return rows


async def web_wave(port: int, concurrency: int, total: int) -> list[Result]:
    semaphore = asyncio.Semaphore(concurrency)
    body = {"model": "floor", "messages": [{"role": "user", "content": "bench"}], "stream": True}

    async def one() -> Result:
        async with semaphore:
            return await sse_stream(port, "/v1/chat/completions", body, {})

    return list(await asyncio.gather(*(one() for _ in range(total))))


def wait_http(port: int) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the floor's web process did not start")


# -- Celery ------------------------------------------------------------------------------


def celery_floor(args: argparse.Namespace, home: Path, redis_url: str) -> list[dict[str, Any]]:
    """Two gevent Celery workers, a do-nothing task: worker + Redis CPU per task."""
    client = redis.Redis.from_url(redis_url)
    env = dict(os.environ) | {"REDIS_URL": redis_url, "FLOOR_CELERY": "1"}
    workers = []
    for n in range(args.workers):
        argv = [sys.executable, "-m", "celery", "-A", "bench.floor_apps", "worker",
                "-Q", FLOOR_QUEUE, "-P", "gevent", "-c", str(args.worker_concurrency),
                "-n", f"floor{n}@%h", "--loglevel", "WARNING",
                "--without-mingle", "--without-gossip"]  # fmt: skip
        workers.append(spawn(argv, env, home / f"celery{n}.log"))
    procs = Procs(workers, redis_server_pids(client))
    sender = celery_app(redis_url)
    record = {"model": "openai/floor", "messages": [{"role": "user", "content": "bench"}]}
    rows = []
    try:
        time.sleep(4)  # the workers connect and start consuming
        send(sender, record, 20)
        drain(client)
        procs.measure_idle()
        for label, rate in (("one at a time", 0.0), (f"{args.rate:g}/s", args.rate)):
            total = args.tasks
            before, started = cpu_seconds(procs.pids()), time.perf_counter()
            if rate:
                for n in range(total):
                    send(sender, record, 1)
                    pause = started + (n + 1) / rate - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
            else:
                for _ in range(total):
                    send(sender, record, 1)
                    drain(client, poll=0.0005)
            drain(client)
            seconds = time.perf_counter() - started
            cpu = procs.net(cpu_seconds(procs.pids()) - before, seconds)
            rows.append({"load": label, "task": cpu * 1000 / total})
        rows[0]["latency"] = pickup_latency(client, sender, record, args.tasks // 2)
    finally:
        procs.stop()
    return rows


def pickup_latency(
    client: redis.Redis, app: Any, record: dict[str, Any], total: int
) -> tuple[float, float]:
    """p50 / p99 ms from a task's send to its first line, one at a time (not in the CPU)."""
    client.delete(LATENCY_KEY)
    for _ in range(total):
        send(app, record, 1, stamped=True)
        drain(client, poll=0.0005)
    values = [float(v) * 1000 for v in client.lrange(LATENCY_KEY, 0, -1)]
    return pct(values, 50), pct(values, 99)


def send(app: Any, record: dict[str, Any], n: int, *, stamped: bool = False) -> None:
    """n do-nothing tasks; `stamped`: each carries its send time (the latency pass)."""
    for _ in range(n):
        args: list[Any] = [f"job_{uuid.uuid4().hex}", record, *([time.time()] if stamped else [])]
        app.send_task("floor.noop", args=args, queue=FLOOR_QUEUE)


def drain(client: redis.Redis, poll: float = 0.01) -> None:
    """Until the queue is empty and no message waits for its ack (kombu's `unacked`)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not client.llen(FLOOR_QUEUE) and not client.hlen("unacked"):
            return
        time.sleep(poll)
    raise RuntimeError("the floor's Celery workers did not drain the queue")


# -- provider ----------------------------------------------------------------------------

_ROW = re.compile(
    r"^\| \d+ \| [\d.]+ us \| ([\d.]+) us \| ([\d.]+) us \((\d+)\) \| ([\d.]+) us \|$"
)


def provider_floor(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`python -m bench.provider_calls` at each concurrency: set-up and per-delta CPU."""
    rows = []
    for concurrency in args.concurrency:
        streams = str(max(concurrency * 4, 40))
        argv = [sys.executable, "-m", "bench.provider_calls", "--tps", f"{args.tps:g}",
                "--tokens", str(args.tokens), "--concurrency", str(concurrency),
                "--streams", streams, "--calls", "100", "--rounds", "2"]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        found = [m for line in out.splitlines() if (m := _ROW.match(line.strip()))]
        one = sum(float(m[1]) for m in found) / len(found) / 1000
        delta = sum(float(m[4]) for m in found) / len(found) / 1000
        rows.append({"concurrency": concurrency, "setup": one - delta, "delta": delta})
    return rows


# -- report ------------------------------------------------------------------------------


def part_row(name: str, load: str, setup: float, delta: float | None, tokens: int) -> str:
    """One row of the parts table (ms, and us a delta)."""
    whole = setup + tokens * (delta or 0.0)
    per_delta = "-" if delta is None else f"{delta * 1000:.0f} us"
    return f"| {name} | {load} | {setup:.2f} ms | {per_delta} | {whole:.2f} ms |"


def print_tables(
    args: argparse.Namespace,
    web: list[dict[str, Any]],
    celery: list[dict[str, Any]],
    provider: list[dict[str, Any]],
) -> None:
    tokens = args.tokens
    print(f"\nfloor: {tokens}-token streams, {args.ttft_ms:g} ms to the first, {args.tps:g}/s\n")
    print("| part | load | set-up a stream | a delta | a whole stream |")
    print("|---|---|---:|---:|---:|")
    for row in web:
        load = f"{row['concurrency']} at once"
        print(part_row(WEB, load, row["setup"], row["delta"], tokens))
    for row in celery:
        print(part_row(CELERY, row["load"], row["task"], None, tokens))
    for row in provider:
        load = f"{row['concurrency']} at once"
        print(part_row(PROVIDER, load, row["setup"], row["delta"], tokens))
    loads = " | ".join(f"{w['concurrency']} at once" for w in web)
    print(f"\n| latency, p50 / p99 | {loads} |")
    print("|---|" + "---:|" * len(web))
    ttft = " | ".join(f"{w['ttft'][0]:.2f} / {w['ttft'][1]:.2f} ms" for w in web)
    print(f"| web: request to its first event (no wait in the endpoint) | {ttft} |")
    p50, p99 = celery[0]["latency"]
    pickup = f"{p50:.2f} / {p99:.2f} ms"
    print(f"| Celery: send_task to the task's first line, one at a time | {pickup} |")
    k = args.coalesced
    print(f"\n| load | floor of a whole stream: web + Celery + provider | the same, {tokens} "
          f"tokens in {k} events and reads |")  # fmt: skip
    print("|---|---:|---:|")
    for w, p in zip(web, provider, strict=True):
        setup = w["setup"] + p["setup"] + celery[-1 if w["concurrency"] > 1 else 0]["task"]
        delta = w["delta"] + p["delta"]
        row = f"| {w['concurrency']} at once | {setup + tokens * delta:.2f} ms |"
        print(f"{row} {setup + k * delta:.2f} ms |")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench floor", description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--streams", type=int, default=30, help="streams of a web wave, at least")
    parser.add_argument("--waves", type=int, default=4, help="web streams = concurrency x this")
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--tps", type=float, default=50.0)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--worker-concurrency", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=500, help="Celery tasks per load")
    parser.add_argument("--rate", type=float, default=50.0, help="Celery tasks/s, steady load")
    parser.add_argument(
        "--coalesced",
        type=int,
        default=16,
        help="events (and upstream reads) a stream takes when coalesced, for the last column",
    )
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="sluice-floor-"))
    redis_url = os.environ.get("REDIS_URL")
    redis_proc = None
    if redis_url:
        redis.Redis.from_url(redis_url).flushdb()
    else:
        from app import embedded_redis

        redis_url, redis_proc = embedded_redis.start(home / "redis")
    try:
        web = web_floor(args, home)
        celery = celery_floor(args, home, redis_url)
        provider = provider_floor(args)
        print_tables(args, web, celery, provider)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
        print(f"\n(logs in {home})", file=sys.stderr)
