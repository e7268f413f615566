"""Chaos, stream channel: a stream worker SIGKILLed under many open streams."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.helpers import SSE, read_sse
from tests.stack import Stack

pytestmark = pytest.mark.chaos

STREAMS = 20
LEASE_SECONDS = 3  # SLUICE_STREAM_LEASE_SECONDS in the tests


def test_killed_stream_worker_under_many_streams(
    stack: Stack, client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.add_scenario("chaos-victim", tokens=2000, tps=20)
    stack.kill("stream", signal.SIGTERM)
    victim = stack.start_worker("stream", name="stream-chaos", concurrency=STREAMS + 5)
    started = threading.Barrier(STREAMS + 1, timeout=60)
    killed = threading.Event()
    ended: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one_stream() -> None:
        body = {
            "model": "openai/chaos-victim",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            first = read_sse(response, max_events=2, lines=lines)
            started.wait()
            rest: SSE = read_sse(response, lines=lines)
            waited = time.monotonic() - killed_at[0] if killed.is_set() else None
        with lock:
            ended.append(
                {
                    "job": response.headers["x-sluice-job-id"],
                    "first": first,
                    "rest": rest,
                    "waited": waited,
                }
            )

    killed_at = [0.0]
    try:
        stack.wait_ready()
        threads = [threading.Thread(target=one_stream, daemon=True) for _ in range(STREAMS)]
        for thread in threads:
            thread.start()
        started.wait()  # every client has its first events: all streams are running
        killed_at[0] = time.monotonic()
        killed.set()
        stack.kill(victim)
        for thread in threads:
            thread.join(60)
        assert len(ended) == STREAMS
        for one in ended:
            rest = one["rest"]
            assert rest.done, one
            assert rest.error is not None and rest.error["code"] == "worker_lost", one
            assert one["waited"] is not None and one["waited"] < 2 * LEASE_SECONDS + 2, one
        for one in ended:
            job = client.get(f"/v1/jobs/{one['job']}").json()
            assert job["status"] == "failed", job
            assert job["error"]["code"] == "worker_lost"
            assert job["output"].startswith(one["first"].text)
    finally:
        if victim in stack.procs:
            stack.kill(victim)
        stack.start_worker("stream")
        stack.wait_ready()
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "after"}]}
    after = client.post("/v1/chat/completions", json=body)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"] == "after"
