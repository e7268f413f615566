"""`python -m bench quota`: one provider capacity shared by a running batch and a stream burst.

Starts the stack of `bench batch` (fake upstream process, embedded Redis, SQLite unless
DATABASE_URL, gunicorn web, one stream and one batch worker) with a sluice.toml giving
the `openai` provider (the fake upstream) `capacity = N`, then measures:

- stream TTFT of bursts of S concurrent streams with nothing else running;
- the same bursts while a 5,000-document batch runs: TTFT, how long batch took to come
  down to what the streams leave (capacity - S), the calls in flight at the upstream
  (stream + batch, peak), and that the batch still completes;
- with `--compare`, the same on a stack without a shared capacity (batch capped only by
  PROVIDER_CONCURRENCY = N), where nothing yields.

Prints a table; never passes or fails. Figures on a shared box are box figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import sqlalchemy as sa

from app.config import database_url
from app.embedded_redis import die_with_parent
from app.models.job import jobs_t
from bench.batch import Bench, cpu_seconds
from bench.quota_upstream import TAG
from bench.stream import Result, chat_body, pct, sse_stream

STREAM_KEY = "sluice:capacity:stream:openai"
BATCH_KEY = "sluice:provider-sem:openai"


class Sampler:
    """Live members of the stream and batch lease sets of `openai`, every 10 ms."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.samples: list[tuple[float, int, int]] = []  # (time, streams, batch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            seconds, micros = self.client.time()
            now = f"({int(seconds) * 1000 + int(micros) // 1000}"
            pipe = self.client.pipeline(transaction=False)
            pipe.zcount(STREAM_KEY, now, "+inf")
            pipe.zcount(BATCH_KEY, now, "+inf")
            streams, batch = pipe.execute()
            self.samples.append((time.perf_counter(), int(streams), int(batch)))
            time.sleep(0.01)

    def batch_now(self) -> int:
        return self.samples[-1][2] if self.samples else 0

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def burst(bench: Bench, streams: int, model: str, tag: str) -> list[tuple[str, Result]]:
    """`streams` concurrent streams, each prompt its own tag (`quota-<tag>-<i>`)."""
    port = bench.stack.port
    headers = {"Authorization": f"Bearer {bench.key}"}
    tags = [f"{TAG}{tag}-{i}" for i in range(streams)]
    bodies = [chat_body(model) | {"messages": [{"role": "user", "content": t}]} for t in tags]
    results = await asyncio.gather(
        *(sse_stream(port, "/v1/chat/completions", body, headers) for body in bodies)
    )
    return list(zip(tags, results, strict=True))


def stream_model(args: argparse.Namespace) -> str:
    return f"openai/quota?ttft_ms={args.ttft_ms:g}&tps={args.tps:g}&tokens={args.tokens}"


PERF_WALL = time.time() - time.perf_counter()  # perf_counter -> Unix seconds
# the stream path, stamp by stamp: (label, from, to); each from a different clock owner
SEGMENTS = (
    ("web: request -> job row", "client_sent", "created"),
    ("queue: job row -> upstream read it", "created", "received"),
    ("upstream: read -> first token out (ttft_ms)", "received", "upstream_first"),
    ("worker: first token in -> appended", "upstream_first", "worker_first"),
    ("relay: appended -> client", "worker_first", "client_first"),
)


def run_delay_ns(pids: list[int]) -> int:
    """Nanoseconds these processes' threads spent runnable but waiting for a CPU, so far."""
    total = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total


def autogroup(pid: int) -> str:
    """The niceness of a process's autogroup ("-" without autogroups)."""
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[-1]
    except OSError:
        return "-"


def parts(bench: Bench) -> dict[str, list[int]]:
    """The processes of each part, the stream worker among them."""
    out = bench.parts()
    root = psutil.Process(bench.stack.procs["stream"].pid)
    out["stream worker"] = [root.pid, *(c.pid for c in root.children(recursive=True))]
    return out


class Stopwatch:
    """CPU seconds used and seconds waited for a CPU, per part, over the blocks it times."""

    def __init__(self, parts: dict[str, list[int]]) -> None:
        self.parts = parts
        self.cpu = dict.fromkeys(parts, 0.0)
        self.wait = dict.fromkeys(parts, 0.0)
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._at = time.perf_counter()
        self._cpu = {n: cpu_seconds(p) for n, p in self.parts.items()}
        self._wait = {n: run_delay_ns(p) for n, p in self.parts.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._at
        for name, pids in self.parts.items():
            self.cpu[name] += cpu_seconds(pids) - self._cpu[name]
            self.wait[name] += (run_delay_ns(pids) - self._wait[name]) / 1e9


def stamps(bench: Bench, tagged: list[tuple[str, Result]]) -> dict[str, dict[str, float]]:
    """Unix-second stamps of each stream: client, job row, upstream (see SEGMENTS)."""
    out: dict[str, dict[str, float]] = {}
    for tag, r in tagged:
        if r.ok and r.ttft is not None and r.arrivals:
            first = PERF_WALL + r.arrivals[0]
            out[tag] = {"client_sent": first - r.ttft, "client_first": first}
    notes = httpx.get(f"http://127.0.0.1:{bench.upstream_port}/_bench/notes", timeout=30).json()
    engine = sa.create_engine(database_url(bench.env.get("DATABASE_URL"), bench.home))
    cols = jobs_t.c
    query = sa.select(cols.request, cols.created_at, cols.started_at, cols.first_token_at)
    with engine.connect() as conn:
        rows = conn.execute(query.where(cols.mode == "stream")).all()
    engine.dispose()

    def unix(value: datetime | None) -> float | None:
        if value is None:
            return None
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()

    for request, created, started, first_token in rows:
        tag = str((request.get("messages") or [{}])[-1].get("content"))
        if tag in out:
            note = notes.get(tag) or {}
            values = {
                "created": unix(created),
                "started": unix(started),
                "worker_first": unix(first_token),
                "received": note.get("received"),
                "upstream_first": note.get("first"),
            }
            out[tag] |= {k: v for k, v in values.items() if v is not None}
    return out


def segments(stamped: dict[str, dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Each SEGMENTS step's (p50, p95) in ms over the streams that have both stamps."""
    out = {}
    for label, a, b in SEGMENTS:
        spans = [1000 * (s[b] - s[a]) for s in stamped.values() if a in s and b in s]
        out[label] = (pct(spans, 50), pct(spans, 95))
    # the slowest streams: where did their time go?
    slow = sorted(stamped.values(), key=lambda s: s["client_first"] - s["client_sent"])
    tail = slow[-max(1, len(slow) // 20) :]
    for label, a, b in SEGMENTS:
        spans = [1000 * (s[b] - s[a]) for s in tail if a in s and b in s]
        out[f"{label} [slowest 5%, mean]"] = (sum(spans) / max(1, len(spans)), float("nan"))
    return out


def bursts(
    bench: Bench, args: argparse.Namespace, sampler: Sampler, watch: Stopwatch, phase: str
) -> dict[str, Any]:
    """`--rounds` bursts, a pause between; TTFTs and how fast batch yielded to each."""
    ttfts: list[float] = []
    failed = 0
    backoff: list[float] = []
    peaks: list[int] = []
    tagged: list[tuple[str, Result]] = []
    share = max(0, args.capacity - args.streams)
    for round_ in range(args.rounds):
        started = time.perf_counter()
        with watch:
            results = asyncio.run(
                burst(bench, args.streams, stream_model(args), f"{phase}-{round_}")
            )
        ended = time.perf_counter()
        tagged += results
        ttfts += [r.ttft for _, r in results if r.ok and r.ttft is not None]
        failed += sum(not r.ok for _, r in results)
        during = [(t, s, b) for t, s, b in sampler.samples if started <= t <= ended]
        if during:
            peaks.append(max(s + b for _, s, b in during))
            full = next((t for t, s, _ in during if s >= args.streams), None)
            low = next((t for t, _, b in during if full and t >= full and b <= share), None)
            if full is not None and low is not None:
                backoff.append(low - full)  # from the last stream's admission
        time.sleep(args.pause)
    return {
        "ttft_p50_ms": 1000 * pct(ttfts, 50) if ttfts else float("nan"),
        "ttft_p95_ms": 1000 * pct(ttfts, 95) if ttfts else float("nan"),
        "streams_ok": len(ttfts),
        "streams_failed": failed,
        "backoff_s": max(backoff) if backoff else None,
        "peak_in_flight": max(peaks) if peaks else 0,
        "tagged": tagged,
    }


def probe(bench: Bench, row: dict[str, Any], watch: Stopwatch) -> None:
    """Add the row's per-segment figures and each part's CPU and CPU wait per burst second."""
    row["segments"] = segments(stamps(bench, row.pop("tagged")))
    row["cpu"] = {n: v / watch.seconds for n, v in watch.cpu.items()}
    row["cpu_wait"] = {n: v / watch.seconds for n, v in watch.wait.items()}


def run(args: argparse.Namespace, shared: bool) -> list[dict[str, Any]]:
    """Bursts alone, then bursts over a running batch, on one stack."""
    bench = Bench(argparse.Namespace(**vars(args) | {"workers": 1}), args.delay_ms)
    toml = Path(bench.home) / "sluice.toml"
    toml.write_text(f"[providers.openai]\ncapacity = {args.capacity}\n" if shared else "")
    bench.env["SLUICE_CONFIG"] = str(toml)
    rows = []
    label = f"capacity {args.capacity}" if shared else "no shared capacity"
    with bench, Sampler(bench.env["REDIS_URL"]) as sampler:
        record_upstream(bench)
        bench.stack.kill("stream", signal.SIGTERM)  # bench batch's is a token one (10 greenlets)
        bench.stack.start_worker("stream", concurrency=args.stream_concurrency)
        bench.stack.wait_ready()
        asyncio.run(burst(bench, args.streams, stream_model(args), "warm"))  # not counted
        nice = {
            n: (psutil.Process(p.pid).nice(), autogroup(p.pid))
            for n, p in bench.stack.procs.items()
        }
        print(f"{label}: niceness (process, autogroup) {nice}", flush=True)
        watch = Stopwatch(parts(bench))
        alone = {"setup": label, "batch": "none"} | bursts(bench, args, sampler, watch, "alone")
        probe(bench, alone, watch)
        rows.append(alone)
        model = "openai/quota-batch"
        started = time.perf_counter()
        _, batch = bench.submit_jsonl(args.documents, model)
        deadline = time.monotonic() + 60
        while sampler.batch_now() < min(args.capacity, args.provider_concurrency):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        watch = Stopwatch(parts(bench))
        over = bursts(bench, args, sampler, watch, "over")
        done = bench.wait(batch["id"])
        total = time.perf_counter() - started
        over = (
            {"setup": label, "batch": f"{args.documents:,} documents running"}
            | over
            | {
                "batch_status": done["status"],
                "batch_succeeded": done["counts"]["succeeded"],
                "batch_s": total,
            }
        )
        probe(bench, over, watch)
        rows.append(over)
    return rows


def record_upstream(bench: Bench) -> None:
    """Swap the stack's fake upstream for one that notes each stream's stamps (same port)."""
    assert bench.upstream is not None
    bench.upstream.terminate()
    bench.upstream.wait(10)
    bench.upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.quota_upstream", "--port", str(bench.upstream_port),
         "--delay-ms", str(bench.delay_ms), "--tokens", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{bench.upstream_port}/_bench/notes", timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench quota", description=__doc__)
    parser.add_argument("--capacity", type=int, default=32, help="the provider's capacity N")
    parser.add_argument("--streams", type=int, default=20, help="streams per burst")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per measurement")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between bursts")
    parser.add_argument("--documents", type=int, default=5_000)
    parser.add_argument("--delay-ms", type=float, default=200.0, help="upstream batch latency")
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--tps", type=float, default=50.0)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=64, help="batch worker greenlets")
    parser.add_argument("--stream-concurrency", type=int, default=200, help="stream greenlets")
    parser.add_argument("--chunk", type=int, default=100, help="BATCH_CHUNK_SIZE")
    parser.add_argument("--item-concurrency", type=int, default=100)
    parser.add_argument("--compare", action="store_true", help="also without a shared capacity")
    args = parser.parse_args(argv)
    args.provider_concurrency = args.capacity  # without sharing, batch alone is capped at N
    print(
        f"capacity {args.capacity}, bursts of {args.streams} streams x {args.rounds} "
        f"(ttft {args.ttft_ms:g} ms, {args.tokens} tokens at {args.tps:g}/s), batch of "
        f"{args.documents:,} at {args.delay_ms:g} ms a call, database "
        f"{'postgres' if os.environ.get('DATABASE_URL') else 'sqlite'}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rows = run(args, shared=True)
    if args.compare:
        rows += run(args, shared=False)
    print()
    print(
        "| setup | batch | stream TTFT p50 | p95 | streams ok / failed | batch down to"
        " capacity - streams (after the last stream's admission)"
        " | peak calls in flight (stream + batch) | batch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        backoff = f"{r['backoff_s']:.2f} s" if r.get("backoff_s") is not None else "-"
        if "batch_status" in r:
            batch = f"{r['batch_status']}, {r['batch_succeeded']:,} ok in {r['batch_s']:.1f} s"
        else:
            batch = "-"
        print(
            f"| {r['setup']} | {r['batch']} | {r['ttft_p50_ms']:.0f} ms | "
            f"{r['ttft_p95_ms']:.0f} ms | {r['streams_ok']} / {r['streams_failed']} | "
            f"{backoff if r['batch'] != 'none' else '-'} | {r['peak_in_flight']} | {batch} |"
        )
    print()
    print("Where a stream's TTFT goes, ms (p50 / p95 per step; the slowest 5%: mean):")
    print()
    print("| step | " + " | ".join(f"{r['setup']}, batch {r['batch']}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label in rows[0]["segments"]:
        cells = []
        for r in rows:
            p50, p95 = r["segments"][label]
            cells.append(f"{p50:.0f}" if p95 != p95 else f"{p50:.0f} / {p95:.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("Per second of burst: CPU seconds used / seconds waited for a CPU (runnable, not run):")
    print()
    print("| part | " + " | ".join(f"{r['setup']}, batch {r['batch']}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for part in rows[0]["cpu"]:
        cells = [f"{r['cpu'][part]:.2f} / {r['cpu_wait'][part]:.2f}" for r in rows]
        print(f"| {part} | " + " | ".join(cells) + " |")
