"""The dashboard's charts: series from the workers' per-minute rollup, never the jobs table."""

from __future__ import annotations

import time
from datetime import timedelta
from types import SimpleNamespace

import httpx
import pytest
import redis
from flask import Flask

from app import telemetry
from app.dashboard import charts
from app.models import utcnow
from tests.helpers import stream_chat, submit_documents, wait_batch, wait_stream
from tests.stack import Stack

PAST = 1_000_000_020.0  # a minute in 2001: no other test's jobs land there


def _row(mode: str, status: str, ttft: float | None, duration: float, **fields: object) -> object:
    now = utcnow()
    created = now - timedelta(seconds=duration)
    values = {
        "id": "job_x", "mode": mode, "provider": "mock", "status": status,
        "created_at": created,
        "first_token_at": None if ttft is None else created + timedelta(seconds=ttft),
        "finished_at": now, "usage": {"prompt_tokens": 10, "completion_tokens": 60},
        "error": {"code": "rate_limit_exceeded"} if status == "failed" else None,
    }  # fmt: skip
    return SimpleNamespace(**(values | fields))


@pytest.fixture
def rollup(app_ctx: Flask, redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for key in client.scan_iter(telemetry.MINUTE_PREFIX + "1000000*"):
        client.delete(key)
    return client


def test_series_aggregate_each_minute_into_every_chart(rollup: redis.Redis) -> None:
    minute = telemetry.minute_of(PAST)
    rows = [_row("stream", "succeeded", 0.2, 1.0) for _ in range(9)]
    rows.append(_row("stream", "failed", None, 0.5))
    rows += [_row("batch", "succeeded", None, 3.0) for _ in range(30)]
    telemetry.record(rows, at=PAST, client=rollup)
    rollup.hset(telemetry.MINUTE_PREFIX + str(minute), mapping={"qd|batch": 7})

    body = charts.series("15m", client=rollup, now=PAST)
    assert body["step_seconds"] == 60 and len(body["t"]) == 15 and body["t"][-1] == minute
    last = {name: values[-1] for name, values in body["series"].items()}
    assert all(values[0] in (None, 0) for values in body["series"].values())
    assert 0.1 < last["ttft_p50_stream"] <= 0.2 and last["ttft_p95_stream"] <= 0.2
    assert last["ttft_p50_batch"] is None  # batch items have no first token
    assert 2.0 < last["dur_p50_batch"] <= 3.0
    assert last["jobs_per_min_stream"] == 10 and last["jobs_per_min_batch"] == 30
    assert last["tokens_per_s_stream"] == pytest.approx(600 / 60, abs=0.01)
    assert last["error_rate_stream"] == pytest.approx(0.1) and last["error_rate_batch"] == 0
    assert last["batch_items_per_s"] == pytest.approx(0.5)
    assert last["queue_batch"] == 7 and last["queue_interactive"] is None

    day = charts.series("24h", client=rollup, now=PAST)
    assert day["step_seconds"] == 600 and len(day["t"]) == 144
    assert day["series"]["jobs_per_min_batch"][-1] == pytest.approx(30 / 10)


def test_charts_api_gains_a_point_when_real_jobs_end(
    stack: Stack, admin_key: str, client: httpx.Client
) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as dash:
        assert dash.get("/dashboard/api/charts").status_code == 401
        assert dash.post("/dashboard/login", data={"key": admin_key}).status_code == 302
        before = dash.get("/dashboard/api/charts", params={"window": "15m"}).json()
        wait_stream(client, stream_chat(client, "mock/demo"))
        batch = submit_documents(client, [{"id": "a", "text": "x"}], model="mock/echo").json()
        assert wait_batch(client, batch["id"])["status"] == "completed"
        deadline = time.monotonic() + 15
        while True:
            after = dash.get("/dashboard/api/charts", params={"window": "15m"}).json()
            series = after["series"]
            if sum(series["jobs_per_min_stream"][-2:]) > sum(
                before["series"]["jobs_per_min_stream"][-2:]
            ) and any(v for v in series["batch_items_per_s"][-2:]):
                break
            assert time.monotonic() < deadline, after
            time.sleep(0.3)
    assert after["window"] == "15m" and len(after["t"]) == 15
    assert any(v is not None for v in series["ttft_p50_stream"][-2:])
