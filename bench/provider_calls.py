"""`python -m bench.provider_calls`: the CPU of provider calls alone, in this process.

Runs `complete()` and `stream()` of one SDK provider (`--kind openai|anthropic`) in gevent
greenlets against the fake upstream (its own process, instant), and prints this process's
CPU per non-streaming call, per 1-token stream and per N-token stream, and from the last
two the cost per delta. No Flask, Redis, database or Celery: only the provider path (the
SDK's request building, its httpx client, the transport, the SSE parse). For A/B runs of
two builds, run it from the other worktree with `PYTHONPATH` set to it, alternated.
Prints; never passes or fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench.stream_worker import free_port, start_upstream


def main(argv: list[str]) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent.pool

    parser = argparse.ArgumentParser(prog="python -m bench.provider_calls", description=__doc__)
    parser.add_argument("--kind", choices=["openai", "anthropic"], default="openai")
    parser.add_argument("--calls", type=int, default=3000, help="non-streaming calls per round")
    parser.add_argument("--streams", type=int, default=300, help="streams per wave")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--tps", type=float, default=0.0, help="stream pacing (0: none)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    port = free_port()
    upstream = start_upstream(port)
    try:
        run(args, port, gevent.pool.Pool)
    finally:
        upstream.terminate()


def run(args: argparse.Namespace, port: int, pool_cls: Any) -> None:
    from app.providers import ChatRequest, gevent_compat
    from app.providers.anthropic_provider import AnthropicProvider
    from app.providers.base import Provider
    from app.providers.openai_provider import OpenAIProvider

    gevent_compat.install()
    provider: Provider
    if args.kind == "openai":
        provider = OpenAIProvider(api_key="sk-bench", base_url=f"http://127.0.0.1:{port}/v1")
    else:
        provider = AnthropicProvider(api_key="sk-bench", base_url=f"http://127.0.0.1:{port}")
    messages = [{"role": "user", "content": "bench me a little"}]

    def request(tokens: int) -> ChatRequest:
        return ChatRequest(f"bench?tokens={tokens}&tps={args.tps:g}", messages)

    def complete(_: object) -> None:
        provider.complete(request(20))

    def stream(tokens: int) -> None:
        for _ in provider.stream(request(tokens)):
            pass

    def wave(fn: Any, n: int, arg: object = None) -> float:
        pool = pool_cls(args.concurrency)
        started = time.process_time()
        for _ in pool.imap_unordered(fn, [arg] * n):
            pass
        return (time.process_time() - started) * 1e6 / n

    wave(complete, 200)
    wave(stream, 50, 1)
    print(f"\n{args.kind}, {args.concurrency} at once, tps {args.tps:g}\n")
    print("| round | complete() | stream, 1 token | stream, N tokens | per delta |")
    print("|---:|---:|---:|---:|---:|")
    for r in range(1, args.rounds + 1):
        call = wave(complete, args.calls)
        one = wave(stream, args.streams, 1)
        many = wave(stream, args.streams, args.tokens)
        delta = (many - one) / max(1, args.tokens - 1)
        print(
            f"| {r} | {call:.0f} us | {one:.0f} us | {many:.0f} us ({args.tokens}) "
            f"| {delta:.1f} us |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
