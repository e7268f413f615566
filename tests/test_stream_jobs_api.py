"""The jobs API: read, list with pagination, tenant isolation."""

from __future__ import annotations

import time

import httpx
from flask import Flask

from tests.fake_upstream import FakeUpstream
from tests.helpers import follow, stream_chat
from tests.stack import Stack


def test_other_tenants_jobs_do_not_exist(
    client: httpx.Client, stack: Stack, other_key: str
) -> None:
    job_id = stream_chat(client, "mock/echo", "secret words")
    assert follow(client, job_id).done
    with httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {other_key}"}, timeout=10
    ) as other:
        assert other.get(f"/v1/jobs/{job_id}").status_code == 404
        assert other.get(f"/v1/jobs/{job_id}/events").status_code == 404
        assert other.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert job_id not in [j["id"] for j in other.get("/v1/jobs").json()["data"]]
    assert client.get(f"/v1/jobs/{job_id}").json()["output"] == "secret words"
    assert client.get("/v1/jobs/job_nope").json()["error"]["type"] == "not_found_error"


def test_list_newest_first_with_pagination(client: httpx.Client) -> None:
    made = []
    for i in range(5):
        body = {"model": "mock/echo", "messages": [{"role": "user", "content": f"n{i}"}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        made.append(response.headers["x-sluice-job-id"])
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 2, "mode": "stream"} | ({"after": after} if after else {})
        page = client.get("/v1/jobs", params=params).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen.extend(j["id"] for j in page["data"])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == list(reversed(made))
    done = client.get("/v1/jobs", params={"status": "succeeded"}).json()["data"]
    assert {j["id"] for j in done} == set(made)
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["data"] == []
    for bad, param in (
        ({"limit": 0}, "limit"),
        ({"mode": "x"}, "mode"),
        ({"status": "y"}, "status"),
    ):
        response = client.get("/v1/jobs", params=bad)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_job_object_shape(client: httpx.Client, app: Flask) -> None:
    job_id = stream_chat(client, "mock/echo", "shape", metadata={"k": "v"})
    assert follow(client, job_id).done
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["object"] == "job" and job["model"] == "mock/echo" and job["provider"] == "mock"
    assert job["route"]["mode"] == "stream" and job["route"]["reason"]
    assert job["metadata"] == {"k": "v"}
    assert job["finish_reason"] == "stop" and job["error"] is None
    timings = job["timings"]
    assert 0 <= timings["queued_ms"] <= timings["ttft_ms"] <= timings["duration_ms"]


def test_running_job_shows_output_so_far(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("so-far", deltas=["early ", "late"], tps=2)
    job_id = stream_chat(client, "openai/so-far")
    for _ in range(50):
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["output"]:
            break
        time.sleep(0.05)
    assert job["status"] == "running" and job["output"] == "early "
    sse = follow(client, job_id)
    assert sse.text == "early late"


def test_resume_past_the_end_of_a_running_stream_is_400(client: httpx.Client) -> None:
    """An id no relay ever sent (beyond the log's newest) would skip the terminal entry."""
    job_id = stream_chat(client, "mock/slow?length=40&tps=20")
    future = f"{int(time.time() * 1000) + 3_600_000}-0"
    response = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": future})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "last_event_id"
    assert follow(client, job_id).done  # from the start it still ends


def test_a_log_ahead_of_its_row_shows_the_output_the_row_will_hold(
    app_ctx: Flask, api_key: str
) -> None:
    """A stream whose log ended before its row: the job shows the row's text (NUL as U+FFFD),
    the same before and after the row is written."""
    from app.extensions import db, redis_store
    from app.models import Job
    from app.services.stream_runner import fail_lost_job
    from app.streams.keys import lease_key
    from app.streams.writer import DeltaLog
    from tests.helpers import app_client, insert_job, tenant_of

    job = insert_job(tenant_of(api_key), "stream", "running")
    redis_store.client.set(lease_key(job.id), "T", px=60_000)
    dlog = DeltaLog(
        redis_store.client, job.id, running_ttl=60, final_ttl=60, token="T", lease_seconds=60
    )
    dlog.append([{"index": 0, "delta": {"content": "a\x00b"}}])
    dlog.finish("stop", None)
    http = app_client(app_ctx, api_key)
    before = http.get(f"/v1/jobs/{job.id}").get_json()
    assert before["status"] == "succeeded" and before["output"] == "a\ufffdb"
    redis_store.client.delete(lease_key(job.id))
    assert fail_lost_job(job.id)  # the sweeper's step: the row takes the log's end
    db.session.remove()
    assert db.session.get(Job, job.id).status == "succeeded"  # type: ignore[union-attr]
    after = http.get(f"/v1/jobs/{job.id}").get_json()
    assert after["output"] == before["output"]
