"""REDIS_URL=unix://: web, stream worker and batch worker all on a Redis Unix socket."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from app import embedded_redis
from tests.helpers import batch_results, submit_documents, wait_batch
from tests.stack import Stack


@pytest.fixture
def unix_stack(stack: Stack, tmp_path: Path) -> Iterator[Stack]:
    """The test stack's environment, with its own Redis on a Unix socket (database 2)."""
    sock = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [*embedded_redis.server_argv(tmp_path, 0), "--unixsocket", str(sock)],
        preexec_fn=embedded_redis.die_with_parent,
    )
    url = f"unix://{sock}?db=2"
    deadline = time.monotonic() + 10
    while not sock.exists() or not redis.Redis.from_url(url).ping():
        assert time.monotonic() < deadline and server.poll() is None, "Redis did not start"
        time.sleep(0.02)
    own = Stack(env=stack.env | {"REDIS_URL": url}, home=tmp_path)
    try:
        own.start_all()
        yield own
    finally:
        own.stop()
        server.terminate()
        server.wait(10)


def test_streams_and_batches_run_over_a_unix_socket(unix_stack: Stack, api_key: str) -> None:
    client = openai.OpenAI(base_url=unix_stack.url + "/v1", api_key=api_key, max_retries=0)
    stream = client.chat.completions.create(
        model="openai/echo", messages=[{"role": "user", "content": "over a socket"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "over a socket" in text

    with httpx.Client(base_url=unix_stack.url, headers={"Authorization": f"Bearer {api_key}"}) as h:
        created = submit_documents(h, [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}])
        assert created.status_code in (200, 201, 202), created.text
        batch = wait_batch(h, created.json()["id"])
        assert batch["status"] == "completed", batch
        assert len(batch_results(h, batch["id"])) == 2
