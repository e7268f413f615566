"""Chaos, web tier: one of two web nodes SIGKILLed under open streams; clients resume on the
other with Last-Event-ID and lose nothing."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.helpers import SSE, follow, read_sse
from tests.stack import Stack

pytestmark = pytest.mark.chaos

STREAMS = 10


def test_killed_web_node_streams_resume_on_the_other(
    stack: Stack,
    test_env: dict[str, str],
    api_key: str,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    upstream.add_scenario("chaos-web", tokens=150, tps=30)  # ~5 s a stream
    victim = Stack(env=test_env, home=tmp_path)  # a second web node on the same Redis and DB
    victim.start_web()
    auth = {"Authorization": f"Bearer {api_key}"}
    started = threading.Barrier(STREAMS + 1, timeout=60)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one_stream(index: int) -> None:
        body = {
            "model": "openai/chaos-web",
            "messages": [{"role": "user", "content": f"stream {index}"}],
            "stream": True,
        }
        first = SSE(0)
        cut: str | None = None
        with (
            httpx.Client(base_url=victim.url, headers=auth, timeout=30) as node,
            node.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            job_id = response.headers["x-sluice-job-id"]
            lines = response.iter_lines()
            first = read_sse(response, max_events=3, lines=lines)
            started.wait()
            try:
                more = read_sse(response, lines=lines)
                first.events += more.events
                first.done = more.done
            except httpx.HTTPError as exc:  # the node died under us
                cut = type(exc).__name__
        with httpx.Client(base_url=stack.url, headers=auth, timeout=60) as other:
            rest = follow(other, job_id, last=first.last_id) if not first.done else SSE(200)
            job = other.get(f"/v1/jobs/{job_id}").json()
        with lock:
            results.append({"job": job, "first": first, "rest": rest, "cut": cut})

    try:
        victim.wait_healthy()
        threads = [
            threading.Thread(target=one_stream, args=(i,), daemon=True) for i in range(STREAMS)
        ]
        for thread in threads:
            thread.start()
        started.wait()  # every client has its first events from the victim
        victim.kill("web", signal.SIGKILL)
        for thread in threads:
            thread.join(90)
        assert len(results) == STREAMS
        assert sum(1 for r in results if r["cut"]) >= STREAMS // 2  # the kill did cut streams
        for one in results:
            first, rest, job = one["first"], one["rest"], one["job"]
            assert rest.status == 200 and (first.done or rest.done), one
            assert rest.error is None and job["status"] == "succeeded", one
            assert first.text + rest.text == job["output"], one
            assert not set(first.ids) & set(rest.ids)  # resumed exactly after the last seen
    finally:
        victim.stop()
