"""GET /v1/admin/workers and /v1/admin/stats: admin keys only, all tenants, real workers."""

from __future__ import annotations

import time

import httpx
import pytest

from app.api.admin import window_seconds
from app.errors import APIError
from tests.helpers import stream_chat, submit_documents, wait_batch, wait_stream
from tests.stack import Stack


def admin(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.mark.parametrize("path", ["/v1/admin/workers", "/v1/admin/stats"])
def test_admin_json_needs_an_admin_key(stack: Stack, api_key: str, path: str) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        missing = http.get(path)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "missing_api_key"
        wrong = http.get(path, headers={"Authorization": "Bearer sk-sluice-nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        tenant = http.get(path, headers={"Authorization": f"Bearer {api_key}"})
        assert tenant.status_code == 403
        error = tenant.json()["error"]
        assert error["code"] == "admin_required" and error["type"] and error["message"]


def test_workers_lists_each_live_worker_with_pool_and_concurrency(
    stack: Stack, admin_key: str
) -> None:
    with admin(stack, admin_key) as http:
        deadline = time.monotonic() + 10
        while True:  # pool and concurrency arrive with the first beat after the pool starts
            body = http.get("/v1/admin/workers").json()
            online = [w for w in body["data"] if w["online"]]
            if {w["mode"] for w in online} >= {"stream", "batch"} and all(
                w["pool"] for w in online
            ):
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.3)
    assert body["object"] == "list"
    for worker in online:
        assert worker["object"] == "sluice.worker"
        assert "@" in worker["name"]
        assert worker["pool"] == "gevent"
        assert isinstance(worker["concurrency"], int) and worker["concurrency"] > 0
        assert isinstance(worker["active_jobs"], int) and worker["active_jobs"] >= 0
        assert abs(worker["last_heartbeat"] - time.time()) < 60
    stream = next(w for w in online if w["mode"] == "stream")
    assert stream["queues"] == ["interactive"]


def test_stats_count_ended_jobs_and_report_ttft_percentiles(
    stack: Stack, admin_key: str, client: httpx.Client
) -> None:
    with admin(stack, admin_key) as http:
        before = http.get("/v1/admin/stats", params={"window": "15m"}).json()
        job_id = stream_chat(client, "mock/demo", "hello there")
        job = wait_stream(client, job_id)
        assert job["status"] == "succeeded"
        batch = submit_documents(
            client, [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}], model="mock/echo"
        ).json()
        assert wait_batch(client, batch["id"])["status"] == "completed"
        deadline = time.monotonic() + 10
        while True:  # the stream's counter is written just after its row
            after = http.get("/v1/admin/stats", params={"window": "15m"}).json()
            done = after["jobs"]["stream"]["succeeded"] > before["jobs"]["stream"]["succeeded"]
            if (
                done
                and after["jobs"]["batch"]["succeeded"] >= before["jobs"]["batch"]["succeeded"] + 2
            ):
                break
            assert time.monotonic() < deadline, (before, after)
            time.sleep(0.2)
    assert after["object"] == "sluice.stats" and after["window_seconds"] == 900
    assert set(after["jobs"]["stream"]) >= {"queued", "running", "succeeded", "failed"}
    ttft = after["ttft_seconds"]["stream"]
    assert ttft["count"] >= 1 and 0 < ttft["p50"] <= ttft["p95"]
    assert after["duration_seconds"]["batch"]["count"] >= 2
    assert after["tokens"]["stream"]["output"] > before["tokens"]["stream"]["output"]
    assert after["jobs_ended_total"]["stream"]["succeeded"] >= 1
    assert set(after["queues"]) == {"interactive", "batch"}
    assert isinstance(after["streams_in_flight"], int)


def test_stats_window_is_validated(stack: Stack, admin_key: str) -> None:
    with admin(stack, admin_key) as http:
        for bad in ("forever", "0m", "25h", "1d", "-1h"):
            response = http.get("/v1/admin/stats", params={"window": bad})
            assert response.status_code == 400, bad
            assert response.json()["error"]["param"] == "window"
        assert http.get("/v1/admin/stats", params={"window": "24h"}).status_code == 200


def test_window_seconds() -> None:
    assert window_seconds(None) == 3600
    assert window_seconds("15m") == 900
    assert window_seconds("24h") == 86400
    assert window_seconds("90s") == 90
    with pytest.raises(APIError):
        window_seconds("59s")
