"""A stream job's task cut mid-stream (GreenletExit when the worker loses the broker)."""

from __future__ import annotations

import time
from typing import Any

import gevent
import pytest
from flask import Flask

from app.extensions import redis_store
from app.services import stream_runner
from app.streams.keys import lease_key
from app.streams.writer import DeltaLog
from tests.fake_upstream import FakeUpstream
from tests.helpers import insert_job, tenant_of


@pytest.mark.timeout(60)
def test_a_cut_stream_task_closes_its_upstream_stream(
    app_ctx: Flask, api_key: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery kills the task's greenlet at a wait (here: its second append's round trip):
    the provider stream is closed, not left to run on for a job nobody holds."""
    upstream.add_scenario("cutlong", tokens=400, tps=40)
    request = {"model": "openai/cutlong", "messages": [{"role": "user", "content": "x"}]}
    job_id = insert_job(tenant_of(api_key), "stream", "queued", request=request).id
    append = DeltaLog.append
    calls = []

    def cut_at_the_second(self: DeltaLog, choices: Any) -> Any:
        calls.append(choices)
        if len(calls) == 2:
            raise gevent.GreenletExit
        return append(self, choices)

    monkeypatch.setattr(DeltaLog, "append", cut_at_the_second)
    with pytest.raises(gevent.GreenletExit):
        stream_runner.run_stream_job(job_id, request, "cut-worker")
    deadline = time.monotonic() + 5
    while upstream.disconnects("cutlong") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.disconnects("cutlong") == 1, "the upstream stream ran on"
    assert not redis_store.client.exists(lease_key(job_id))  # released: the sweeper fails it
