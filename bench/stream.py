"""`python -m bench stream`: the stream channel against the fake upstream, and direct to it.

Starts its own stack (gunicorn gevent web with one worker process (--web-workers), Celery
gevent stream workers (--workers), embedded Redis, SQLite unless DATABASE_URL is set) and
the fake upstream as a separate process, then drives both with a small asyncio SSE client
(so the client's own cost is the same on both sides). Prints tables; never passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from app.cli.processes import web_argv, worker_argv
from app.embedded_redis import die_with_parent
from tests.stack import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    """One stream as the client saw it."""

    ok: bool = False
    status: int = 0
    ttft: float | None = None  # seconds from request write to first content
    total: float | None = None  # seconds from request write to `[DONE]`
    arrivals: list[float] = field(default_factory=list)
    text: str = ""
    error: str | None = None

    @property
    def gaps(self) -> list[float]:
        a = self.arrivals
        return [a[i] - a[i - 1] for i in range(1, len(a))]


async def sse_stream(
    port: int,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    *,
    idle: bool = False,
    on_open: Callable[[], None] | None = None,
) -> Result:
    """One SSE request over a raw connection: chunked decoding, `data:` lines, [DONE]."""
    result = Result()
    payload = json.dumps(body).encode() if body is not None else b""
    method = "POST" if body is not None else "GET"
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**22)
    except OSError as exc:
        result.error = f"connect: {exc}"
        return result
    started = time.perf_counter()
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        status_line = await reader.readline()
        result.status = int(status_line.split()[1]) if status_line else 0
        if on_open is not None:
            on_open()
        chunked = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        if result.status != 200:
            result.error = f"HTTP {result.status}"
            return result
        buffer = b""
        while True:
            if chunked:
                size_line = await reader.readline()
                if not size_line:
                    break
                size = int(size_line.strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                buffer += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
                buffer += data
            now = time.perf_counter()
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                if not raw.startswith(b"data: "):
                    continue
                text = raw[6:]
                if text.strip() == b"[DONE]":
                    result.total = now - started
                    result.ok = result.error is None
                    return result
                chunk = json.loads(text)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    continue
                for choice in chunk.get("choices") or []:
                    content = choice.get("delta", {}).get("content")
                    if content:
                        if result.ttft is None:
                            result.ttft = now - started
                        result.arrivals.append(now)
                        result.text += content
        result.error = result.error or "cut: no [DONE]"
        return result
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        writer.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def redis_server_pids(client: redis.Redis) -> list[int]:
    """The server's process behind a client, when it runs on this machine (else none)."""
    try:
        pid = int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return []
    return [pid] if Path(f"/proc/{pid}").exists() else []


def children(pid: int) -> list[int]:
    """pid and every descendant (the gunicorn master and its worker, a celery worker)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid in found:
            found.append(int(entry.name))
    return found


class BenchStack:
    """Fake upstream, Redis, database, web and one stream worker, all real processes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
        self.web_port = free_port()
        self.upstream_port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env: dict[str, str] = {}

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.procs[name] = proc
        return proc

    def start(self) -> None:
        from app import embedded_redis

        redis_url = os.environ.get("REDIS_URL")
        if redis_url:
            redis.Redis.from_url(redis_url).flushdb()
        else:
            redis_url, proc = embedded_redis.start(self.home / "redis")
            self.redis_proc = proc
        self.redis_url = redis_url
        self.env = dict(os.environ) | {
            "SLUICE_HOME": str(self.home),
            "DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{self.home / 'b.db'}",
            "REDIS_URL": redis_url,
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.upstream_port}/v1",
            "SLUICE_LOG_LEVEL": "WARNING",
            "SLUICE_STREAM_MAX_CONCURRENT": "0",
            "SLUICE_STREAM_MAX_PER_TENANT": "0",
            "SLUICE_TENANT_MAX_EVENT_STREAMS": "0",  # the idle phase: 10,000 on one tenant
        }
        os.environ.update(self.env)
        py = sys.executable
        self._spawn(
            "upstream",
            [py, "-m", "tests.fake_upstream", "--port", str(self.upstream_port)],
        )
        from flask_migrate import upgrade

        from app import create_app
        from app.auth import create_key

        app = create_app()
        with app.app_context():
            upgrade()
            self.key = create_key(f"bench-{secrets.token_hex(3)}")[1]
        self._spawn("web", web_argv(
            "--workers", str(self.args.web_workers),
            "--worker-connections", str(self.args.idle + 2000),
            "--backlog", "4096", "--bind", f"127.0.0.1:{self.web_port}", "--graceful-timeout", "2",
        ))  # fmt: skip
        for n in range(self.args.workers):
            name = f"bench{n}-{secrets.token_hex(3)}"
            self._spawn(
                f"stream{n}", worker_argv("stream", self.args.worker_concurrency, name=name)
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                checks = httpx.get(f"http://127.0.0.1:{self.web_port}/readyz", timeout=2)
                state = checks.json()["checks"]
                if state.get("stream_worker") == "ok" and state.get("database") == "ok":
                    httpx.get(f"http://127.0.0.1:{self.upstream_port}/_health", timeout=2)
                    time.sleep(4)  # the worker warms its providers after it says ready
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"stack did not start; logs in {self.home}")

    def web_pids(self) -> list[int]:
        return children(self.procs["web"].pid)

    def worker_pids(self) -> list[int]:
        pids: list[int] = []
        for n in range(self.args.workers):
            pids += children(self.procs[f"stream{n}"].pid)
        return pids

    def pids(self) -> list[int]:
        return self.web_pids() + self.worker_pids()

    def redis_pids(self) -> list[int]:
        """The Redis server's process, when it runs on this machine (else none: not counted)."""
        if getattr(self, "redis_proc", None) is not None:
            return [self.redis_proc.pid]
        return redis_server_pids(redis.Redis.from_url(self.redis_url))

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if getattr(self, "redis_proc", None) is not None:
            self.redis_proc.terminate()


def chat_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "bench"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def wave(
    stack: BenchStack, concurrency: int, total: int, *, direct: bool
) -> tuple[list[Result], float]:
    args = stack.args
    options = f"ttft_ms={args.ttft_ms:g}&tps={args.tps:g}&tokens={args.tokens}"
    if direct:
        port, path = stack.upstream_port, "/v1/chat/completions"
        headers = {"Authorization": "Bearer sk-bench"}
        model = f"bench?{options}"
    else:
        port, path = stack.web_port, "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {stack.key}"}
        model = f"openai/bench?{options}"
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> Result:
        async with semaphore:
            return await sse_stream(port, path, chat_body(model), headers)

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(total)))
    return list(results), time.perf_counter() - started


def summarise(results: list[Result]) -> dict[str, float]:
    ttfts = [r.ttft * 1000 for r in results if r.ttft is not None]
    gaps = [g * 1000 for r in results for g in r.gaps]
    totals = [r.total * 1000 for r in results if r.total is not None]
    return {
        "total50": pct(totals, 50),
        "total99": pct(totals, 99),
        "ttft50": pct(ttfts, 50),
        "ttft99": pct(ttfts, 99),
        "gap50": pct(gaps, 50),
        "gap99": pct(gaps, 99),
        "deltas": sum(len(r.arrivals) for r in results),
    }


async def run_load(stack: BenchStack) -> list[dict[str, Any]]:
    rows = []
    for concurrency in stack.args.concurrency:
        waves = stack.args.waves
        total = max(concurrency, stack.args.streams if concurrency == 1 else concurrency * waves)
        await wave(stack, min(concurrency, 10), min(concurrency, 10), direct=False)  # warm
        direct, direct_wall = await wave(stack, concurrency, total, direct=True)
        sluice, wall, used, net = await measured_wave(stack, concurrency, total)
        cpu = sum(used)
        d, s = summarise(direct), summarise(sluice)
        expected = direct[0].text if direct and direct[0].ok else None
        cut = sum(1 for r in sluice if not r.ok or (expected is not None and r.text != expected))
        rows.append(
            {
                "concurrency": concurrency,
                "streams": total,
                "direct_ttft50": d["ttft50"],
                "sluice_ttft50": s["ttft50"],
                "overhead50": s["ttft50"] - d["ttft50"],
                "overhead99": s["ttft99"] - d["ttft99"],
                "direct_total50": d["total50"],
                "direct_total99": d["total99"],
                "sluice_total50": s["total50"],
                "sluice_total99": s["total99"],
                "gap_added50": s["gap50"] - d["gap50"],
                "gap_added99": s["gap99"] - d["gap99"],
                "deltas_per_s": s["deltas"] / wall,
                "direct_deltas_per_s": d["deltas"] / direct_wall,
                "cut": cut,
                "errors": sorted({r.error for r in sluice if r.error})[:3],
                "cpu_ms_per_stream": cpu * 1000 / total,
                "net_web_ms": net[0] * 1000 / total,
                "net_worker_ms": net[1] * 1000 / total,
                "net_redis_ms": net[2] * 1000 / total,
                "streams_per_s": total / wall,
            }
        )
    return rows


def py_spy(out: str | None, groups: list[list[int]], tag: str) -> list[subprocess.Popen[bytes]]:
    """With --py-spy DIR: sample the web and worker processes (raw collapsed stacks) into DIR."""
    if not out:
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    procs = []
    for part, pids in zip(("web", "worker"), groups, strict=True):
        for pid in pids:
            path = Path(out) / f"{tag}-{part}-{pid}.txt"
            argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
            procs.append(
                subprocess.Popen(
                    [*argv, "--output", str(path)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    time.sleep(0.5 if procs else 0)  # attached before the wave starts
    return procs


def stop_py_spy(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        proc.wait(60)


async def measured_wave(
    stack: BenchStack, concurrency: int, total: int
) -> tuple[list[Result], float, list[float], list[float]]:
    """A Sluice wave with the CPU seconds of web, workers and Redis: used, and net of idle
    (each process's background CPU, measured for 3 s before, taken out)."""
    groups = [stack.web_pids(), stack.worker_pids(), stack.redis_pids()]
    idle0 = [cpu_seconds(g) for g in groups]
    await asyncio.sleep(3)
    cpu0 = [cpu_seconds(g) for g in groups]
    idle_rate = [(b - a) / 3 for a, b in zip(idle0, cpu0, strict=True)]
    profilers = py_spy(stack.args.py_spy, groups[:2], f"c{concurrency}-t{stack.args.tokens}")
    results, wall = await wave(stack, concurrency, total, direct=False)
    cpu1 = [cpu_seconds(g) for g in groups]
    stop_py_spy(profilers)
    used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    net = [max(0.0, u - r * wall) for u, r in zip(used, idle_rate, strict=True)]
    return results, wall, used, net


async def run_breakdown(stack: BenchStack) -> list[dict[str, Any]]:
    """CPU per part: waves of 1-token and N-token streams at each concurrency; the
    difference over N-1 deltas is the per-delta cost, the rest the per-stream set-up."""
    args = stack.args
    tokens = args.tokens
    rows = []
    for concurrency in args.concurrency:
        total = max(concurrency * 4, args.streams)
        per: dict[int, list[float]] = {}
        cut = 0
        for n in (1, tokens):
            args.tokens = n
            await wave(stack, min(concurrency, 10), min(concurrency, 10), direct=False)  # warm
            results, _, _, net = await measured_wave(stack, concurrency, total)
            cut += sum(1 for r in results if not r.ok)
            per[n] = [x * 1000 / total for x in net]
        args.tokens = tokens
        delta = [(b - a) / max(1, tokens - 1) for a, b in zip(per[1], per[tokens], strict=True)]
        setup = [a - d for a, d in zip(per[1], delta, strict=True)]
        rows.append(
            {"concurrency": concurrency, "streams": total, "setup": setup, "delta": delta,
             "whole": per[tokens], "tokens": tokens, "cut": cut}
        )  # fmt: skip
    return rows


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes."""
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page for p in pids)


def redis_clients(url: str) -> int:
    return int(redis.Redis.from_url(url).info("clients")["connected_clients"])


async def run_idle(stack: BenchStack) -> dict[str, Any]:
    """Open many idle SSE relays on a few jobs that produce nothing, then end them all."""
    n, jobs = stack.args.idle, max(1, stack.args.idle // 500)
    headers = {"Authorization": f"Bearer {stack.key}"}
    base = f"http://127.0.0.1:{stack.web_port}"
    before = redis_clients(stack.redis_url)
    ids = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        for _ in range(jobs):
            body = chat_body("openai/idle?ttft_ms=600000&tokens=1")
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                ids.append(response.headers["x-sluice-job-id"])
    web_pid = children(stack.procs["web"].pid)
    rss_before = rss_bytes(web_pid)
    opened = 0

    def one_opened() -> None:
        nonlocal opened
        opened += 1

    async def subscriber(job_id: str) -> Result:
        path = f"/v1/jobs/{job_id}/events"
        return await sse_stream(stack.web_port, path, None, headers, on_open=one_opened)

    started = time.perf_counter()
    tasks: list[asyncio.Task[Result]] = []
    # open them in waves (at most 500 waiting for their answer) so no SYN overflows the
    # listen backlog into the kernel's retransmit back-off; all of them stay open
    deadline = time.monotonic() + 600
    while len(tasks) < n and time.monotonic() < deadline:
        if len(tasks) - opened < 500:
            for _ in range(min(100, n - len(tasks))):
                tasks.append(asyncio.create_task(subscriber(ids[len(tasks) % jobs])))
        await asyncio.sleep(0.02)
    while opened < n and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    open_s = time.perf_counter() - started
    await asyncio.sleep(2)
    cpu0 = cpu_seconds(web_pid)
    await asyncio.sleep(10)
    idle_cpu = (cpu_seconds(web_pid) - cpu0) / 10
    with_streams = redis_clients(stack.redis_url)
    rss = rss_bytes(web_pid)
    ended = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
        for job_id in ids:
            await http.post(f"/v1/jobs/{job_id}/cancel")
    results = await asyncio.gather(*tasks)
    fanout = time.perf_counter() - ended
    return {
        "idle_streams": n,
        "opened": opened,
        "web_rss_before_mb": rss_before / 2**20,
        "kb_per_relay": (rss - rss_before) / max(1, opened) / 1024,
        "jobs": jobs,
        "open_s": open_s,
        "redis_clients_before": before,
        "redis_clients_with_streams": with_streams,
        "web_cpu_idle_pct": idle_cpu * 100,
        "web_rss_mb": rss / 2**20,
        "ended_with_event": sum(1 for r in results if r.error and "cancel" in r.error),
        "end_all_s": fanout,
    }


def print_tables(args: argparse.Namespace, rows: list[dict[str, Any]], idle: dict | None) -> None:
    if rows:
        _print_load(args, rows)
    if idle:
        _print_idle(idle)


def _print_load(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(
        f"\nfake upstream: TTFT {args.ttft_ms:g} ms, {args.tps:g} tokens/s, "
        f"{args.tokens} tokens per stream\n"
    )
    print(
        "| streams at once | TTFT direct p50 | TTFT Sluice p50 | TTFT overhead p50 / p99 "
        "| total direct p50 / p99 | total Sluice p50 / p99 "
        "| inter-token added p50 / p99 | deltas/s Sluice (direct) | streams/s | cut streams "
        "| CPU ms per stream (web+worker+Redis) | net of idle: web + worker + Redis |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} ({r['streams']} streams) | {r['direct_ttft50']:.1f} ms "
            f"| {r['sluice_ttft50']:.1f} ms | {r['overhead50']:.1f} / {r['overhead99']:.1f} ms "
            f"| {r['direct_total50']:.0f} / {r['direct_total99']:.0f} ms "
            f"| {r['sluice_total50']:.0f} / {r['sluice_total99']:.0f} ms "
            f"| {r['gap_added50']:.1f} / {r['gap_added99']:.1f} ms "
            f"| {r['deltas_per_s']:.0f} ({r['direct_deltas_per_s']:.0f}) "
            f"| {r['streams_per_s']:.1f} | {r['cut']} "
            f"| {r['cpu_ms_per_stream']:.1f} "
            f"| {r['net_web_ms']:.1f} + {r['net_worker_ms']:.1f} + {r['net_redis_ms']:.1f} |"
        )
        if r["errors"]:
            print(f"  errors: {r['errors']}")


def print_breakdown(rows: list[dict[str, Any]]) -> None:
    """CPU ms net of idle per part: set-up per stream and cost per delta, for each process."""
    print(
        "\n| streams at once | web set-up | worker set-up | Redis set-up | per delta: web "
        "| per delta: worker | per delta: Redis | whole stream (tokens) | cut |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        (ws, ks, rs), (wd, kd, rd) = r["setup"], r["delta"]
        print(
            f"| {r['concurrency']} ({r['streams']} streams) | {ws:.2f} ms | {ks:.2f} ms "
            f"| {rs:.2f} ms | {wd * 1000:.0f} us | {kd * 1000:.0f} us | {rd * 1000:.0f} us "
            f"| {sum(r['whole']):.1f} ms ({r['tokens']}) | {r['cut']} |"
        )


def _print_idle(idle: dict[str, Any]) -> None:
    if idle:
        print(
            "\n| idle open streams (opened) | jobs | time to open "
            "| Redis clients before / with streams | web CPU while idle "
            "| web RSS before / with streams | per relay | ended with an event | time to end all |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {idle['idle_streams']} ({idle['opened']}) | {idle['jobs']} "
            f"| {idle['open_s']:.1f} s "
            f"| {idle['redis_clients_before']} / {idle['redis_clients_with_streams']} "
            f"| {idle['web_cpu_idle_pct']:.1f} % "
            f"| {idle['web_rss_before_mb']:.0f} / {idle['web_rss_mb']:.0f} MB "
            f"| {idle['kb_per_relay']:.1f} KB "
            f"| {idle['ended_with_event']} | {idle['end_all_s']:.1f} s |"
        )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench stream", description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--streams", type=int, default=30, help="sequential streams at 1")
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--tps", type=float, default=50.0)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--idle", type=int, default=10_000, help="idle open streams (0: skip)")
    parser.add_argument("--workers", type=int, default=1, help="stream worker processes")
    parser.add_argument("--web-workers", type=int, default=1, help="gunicorn web processes")
    parser.add_argument(
        "--waves", type=int, default=2, help="streams per level above 1: concurrency x this"
    )
    parser.add_argument("--worker-concurrency", type=int, default=400, help="greenlets each")
    parser.add_argument("--keep", action="store_true", help="keep the stack's data dir")
    parser.add_argument(
        "--py-spy", metavar="DIR", help="sample web and stream workers with py-spy into DIR"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="CPU per part instead of latency: 1-token and N-token waves at each concurrency",
    )
    args = parser.parse_args(argv)
    stack = BenchStack(args)
    try:
        stack.start()
        if args.breakdown:
            print_breakdown(asyncio.run(run_breakdown(stack)))
            return
        rows = asyncio.run(run_load(stack)) if args.concurrency != [0] else []
        print_tables(args, rows, None)
        if args.idle:
            print_tables(args, [], asyncio.run(run_idle(stack)))
    finally:
        stack.stop()
        print(f"\n(logs in {stack.home})", file=sys.stderr)
