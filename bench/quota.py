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
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.batch import Bench
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


async def burst(bench: Bench, streams: int, model: str) -> list[Result]:
    port = bench.stack.port
    headers = {"Authorization": f"Bearer {bench.key}"}
    body = chat_body(model)
    return await asyncio.gather(
        *(sse_stream(port, "/v1/chat/completions", body, headers) for _ in range(streams))
    )


def stream_model(args: argparse.Namespace) -> str:
    return f"openai/quota?ttft_ms={args.ttft_ms:g}&tps={args.tps:g}&tokens={args.tokens}"


def bursts(bench: Bench, args: argparse.Namespace, sampler: Sampler) -> dict[str, Any]:
    """`--rounds` bursts, a pause between; TTFTs and how fast batch yielded to each."""
    ttfts: list[float] = []
    failed = 0
    backoff: list[float] = []
    peaks: list[int] = []
    share = max(0, args.capacity - args.streams)
    for _ in range(args.rounds):
        started = time.perf_counter()
        results = asyncio.run(burst(bench, args.streams, stream_model(args)))
        ended = time.perf_counter()
        ttfts += [r.ttft for r in results if r.ok and r.ttft is not None]
        failed += sum(not r.ok for r in results)
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
    }


def run(args: argparse.Namespace, shared: bool) -> list[dict[str, Any]]:
    """Bursts alone, then bursts over a running batch, on one stack."""
    bench = Bench(argparse.Namespace(**vars(args) | {"workers": 1}), args.delay_ms)
    toml = Path(bench.home) / "sluice.toml"
    toml.write_text(f"[providers.openai]\ncapacity = {args.capacity}\n" if shared else "")
    bench.env["SLUICE_CONFIG"] = str(toml)
    rows = []
    label = f"capacity {args.capacity}" if shared else "no shared capacity"
    with bench, Sampler(bench.env["REDIS_URL"]) as sampler:
        bench.stack.kill("stream", signal.SIGTERM)  # bench batch's is a token one (10 greenlets)
        bench.stack.start_worker("stream", concurrency=args.stream_concurrency)
        bench.stack.wait_ready()
        asyncio.run(burst(bench, args.streams, stream_model(args)))  # warm-up, not counted
        alone = bursts(bench, args, sampler)
        rows.append({"setup": label, "batch": "none"} | alone)
        model = "openai/quota-batch"
        started = time.perf_counter()
        _, batch = bench.submit_jsonl(args.documents, model)
        deadline = time.monotonic() + 60
        while sampler.batch_now() < min(args.capacity, args.provider_concurrency):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        over = bursts(bench, args, sampler)
        done = bench.wait(batch["id"])
        total = time.perf_counter() - started
        rows.append(
            {"setup": label, "batch": f"{args.documents:,} documents running"}
            | over
            | {
                "batch_status": done["status"],
                "batch_succeeded": done["counts"]["succeeded"],
                "batch_s": total,
            }
        )
    return rows


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
