"""Document batches end to end: real web, real batch workers, the fake upstream."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from tests.fake_upstream import FakeUpstream
from tests.helpers import batch_results, submit_documents, wait_batch


def test_many_documents_every_result_present_and_correct(client: httpx.Client) -> None:
    docs = [{"id": f"doc-{i}", "text": f"document number {i} says hello"} for i in range(120)]
    response = submit_documents(client, docs, prompt_template="Text: {document}", max_tokens=50)
    assert response.status_code == 202, response.text
    batch = response.json()
    assert response.headers["Location"] == f"/v1/document-batches/{batch['id']}"
    assert batch["object"] == "document_batch"
    assert batch["status"] == "in_progress"
    assert batch["counts"]["total"] == 120
    assert batch["route"]["rule"]

    done = wait_batch(client, batch["id"])
    assert done["status"] == "completed", done
    counts = done["counts"]
    assert counts["succeeded"] == 120
    assert sum(counts[k] for k in counts if k != "total") == counts["total"] == 120
    assert done["completed_at"] and done["finalizing_at"] and done["in_progress_at"]
    assert done["usage"]["prompt_tokens"] > 0 and done["usage"]["completion_tokens"] > 0

    lines = batch_results(client, batch["id"])
    assert [line["document_id"] for line in lines] == [d["id"] for d in docs]
    for line, doc in zip(lines, docs, strict=True):
        assert line["status"] == "succeeded"
        assert line["output"] == f"Text: {doc['text']}"  # echo of the templated prompt
        assert line["usage"]["completion_tokens"] > 0
        assert line["error"] is None
    total_completion = sum(line["usage"]["completion_tokens"] for line in lines)
    assert done["usage"]["completion_tokens"] == total_completion


def test_get_list_and_tenant_isolation(stack: Any, client: httpx.Client, other_key: str) -> None:
    ids = [
        submit_documents(client, [{"id": "a", "text": f"hello {i}"}]).json()["id"] for i in range(3)
    ]
    page = client.get("/v1/document-batches", params={"limit": 2}).json()
    assert page["object"] == "list"
    assert [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True and page["first_id"] == ids[2] and page["last_id"] == ids[1]
    rest = client.get("/v1/document-batches", params={"limit": 2, "after": page["last_id"]})
    assert [b["id"] for b in rest.json()["data"]] == [ids[0]]
    assert rest.json()["has_more"] is False

    other = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {other_key}"})
    with other:
        for path in ("", "/results", "/events"):
            assert other.get(f"/v1/document-batches/{ids[0]}{path}").status_code == 404
        assert other.post(f"/v1/document-batches/{ids[0]}/cancel").status_code == 404
        assert other.get("/v1/document-batches").json()["data"] == []
    assert client.get("/v1/document-batches/batch_nope").status_code == 404


def test_idempotency_key_returns_the_same_batch(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "retry-me-1"}
    body = {
        "model": "openai/echo",
        "instructions": "x",
        "documents": [{"id": "1", "text": "one"}, {"id": "2", "text": "two"}],
    }
    first = client.post("/v1/document-batches", json=body, headers=headers)
    second = client.post("/v1/document-batches", json=body, headers=headers)
    assert first.status_code == 202 and second.status_code == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert first.json()["id"] == second.json()["id"]
    listed = client.get("/v1/document-batches").json()["data"]
    assert [b["id"] for b in listed] == [first.json()["id"]]


def test_results_filter_by_status_and_failures_do_not_stop_the_batch(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.add_scenario("batch-bad-request", status=400, message="nope, bad request")
    docs = [{"id": f"d{i}", "text": f"text {i}"} for i in range(4)]
    ok = submit_documents(client, docs[:2]).json()
    bad = submit_documents(client, docs[2:], model="openai/batch-bad-request").json()
    assert wait_batch(client, ok["id"])["counts"]["succeeded"] == 2
    done = wait_batch(client, bad["id"])
    assert done["status"] == "completed"
    assert done["counts"]["failed"] == 2
    failed = batch_results(client, bad["id"], status="failed")
    assert [f["document_id"] for f in failed] == ["d2", "d3"]
    assert "nope, bad request" in failed[0]["error"]["message"]
    assert failed[0]["error"]["attempts"] == 1  # a 400 is not retried
    assert batch_results(client, bad["id"], status="succeeded") == []
    assert client.get(f"/v1/document-batches/{ok['id']}/results?status=bogus").status_code == 400


def test_cancel_stops_queued_documents(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("batch-slow", delay_ms=400)
    docs = [{"id": f"c{i}", "text": f"slow {i}"} for i in range(300)]
    batch = submit_documents(client, docs, model="openai/batch-slow").json()
    time.sleep(0.3)
    cancelled = client.post(f"/v1/document-batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] in ("cancelling", "cancelled")
    done = wait_batch(client, batch["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"]
    counts = done["counts"]
    assert counts["cancelled"] > 0
    assert counts["queued"] == counts["running"] == 0
    assert counts["succeeded"] + counts["cancelled"] + counts["failed"] == 300
    assert upstream.requests("batch-slow") == counts["succeeded"] + counts["failed"]
    lines = batch_results(client, batch["id"])
    assert len(lines) == 300 and len({line["document_id"] for line in lines}) == 300
    again = client.post(f"/v1/document-batches/{batch['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_a_finished_batch_is_a_conflict(client: httpx.Client) -> None:
    batch = submit_documents(client, [{"id": "x", "text": "y"}]).json()
    wait_batch(client, batch["id"])
    response = client.post(f"/v1/document-batches/{batch['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "batch_not_cancellable"


def test_events_stream_progress_then_done(client: httpx.Client) -> None:
    docs = [{"id": str(i), "text": f"event doc {i}"} for i in range(30)]
    batch = submit_documents(client, docs).json()
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", f"/v1/document-batches/{batch['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name or "", json.loads(line[6:])))
                if name == "done":
                    break
    assert events[-1][0] == "done"
    assert events[-1][1]["status"] == "completed"
    assert events[-1][1]["counts"]["succeeded"] == 30
    assert all(e[0] in ("progress", "done") for e in events)


def test_response_format_extracts_json_from_every_document(client: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "pages": {"type": "integer"}},
        "required": ["title", "pages"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}}
    docs = [{"id": f"x{i}", "text": f"a report, {i} pages"} for i in range(3)]
    response = submit_documents(client, docs, model="mock/demo", response_format=fmt)
    assert response.status_code == 202, response.text
    assert response.json()["params"]["response_format"] == fmt
    done = wait_batch(client, response.json()["id"])
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 3, done
    for line in batch_results(client, done["id"]):
        value = json.loads(line["output"])
        assert isinstance(value["title"], str) and isinstance(value["pages"], int)

    bad = submit_documents(client, docs, response_format={"type": "yaml"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    form = client.post(
        "/v1/document-batches",
        data={"model": "mock/demo", "instructions": "x", "response_format": "{not json"},
        files={"files": ("a.txt", b"text")},
    )
    assert form.status_code == 400 and form.json()["error"]["param"] == "response_format"
