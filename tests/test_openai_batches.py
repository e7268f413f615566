"""OpenAI Batches API end to end, with the official SDK against the real stack."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import httpx
import openai
import pytest
from flask import Flask
from sqlalchemy import func, select

from app.auth import lookup_key
from app.extensions import db
from app.models import Job
from app.services.files import create_generated_file
from tests.helpers import BATCH_TERMINAL
from tests.stack import Stack


def _line(
    custom_id: Any, model: str = "mock/echo", content: str = "hello there", **over: Any
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}]},
    }
    line.update(over)
    return line


def _upload(client: openai.OpenAI, lines: list[Any]) -> str:
    raw = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    return client.files.create(file=("in.jsonl", io.BytesIO(raw.encode())), purpose="batch").id


def _create(client: openai.OpenAI, file_id: str, **extra: Any) -> Any:
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **extra
    )


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 45) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in BATCH_TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.2)


def _jsonl(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    text = client.files.content(file_id).read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_upload_create_poll_download(openai_client: openai.OpenAI) -> None:
    lines = [_line(f"req-{i}", content=f"say number {i}") for i in range(5)]
    file_id = _upload(openai_client, lines)
    created = _create(openai_client, file_id, metadata={"project": "sluice"})
    assert created.object == "batch" and created.id.startswith("batch_")
    assert created.status in ("validating", "in_progress", "finalizing", "completed")
    assert created.input_file_id == file_id
    assert created.endpoint == "/v1/chat/completions" and created.completion_window == "24h"
    assert created.metadata == {"project": "sluice"}
    assert created.request_counts is not None and created.request_counts.total == 5
    assert created.expires_at is not None and created.expires_at > created.created_at

    done = _wait(openai_client, created.id)
    assert done.status == "completed", done
    assert done.errors is None
    assert done.request_counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
    assert done.error_file_id is None
    assert done.output_file_id is not None
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.failed_at is None and done.cancelled_at is None and done.expired_at is None
    assert done.usage is not None and done.usage.total_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    output_file = openai_client.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output"
    results = _jsonl(openai_client, done.output_file_id)
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(5)]
    completion_tokens = 0
    for i, result in enumerate(results):
        assert result["id"].startswith("batch_req_")
        assert result["error"] is None
        response = result["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == "mock/echo"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert f"say number {i}" in choice["message"]["content"]
        assert choice["finish_reason"] == "stop"
        completion_tokens += body["usage"]["completion_tokens"]
        # the body parses as the SDK's ChatCompletion, as a chat call would
        openai.types.chat.ChatCompletion.model_validate(body)
    assert done.usage.output_tokens == completion_tokens


def test_mix_of_succeeding_and_failing_lines(openai_client: openai.OpenAI) -> None:
    lines = [
        _line("ok-1", model="openai/fake"),
        _line("bad-1", model="openai/reject?status=400&message=model%20refused"),
        _line("ok-2", model="openai/fake"),
        _line("bad-2", model="openai/reject?status=400&message=model%20refused"),
        _line("ok-3", model="mock/echo"),
    ]
    batch = _wait(openai_client, _create(openai_client, _upload(openai_client, lines)).id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 3, "failed": 2}
    assert batch.output_file_id and batch.error_file_id

    outputs = _jsonl(openai_client, batch.output_file_id)
    assert [o["custom_id"] for o in outputs] == ["ok-1", "ok-2", "ok-3"]
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    assert outputs[0]["response"]["body"]["model"] == "openai/fake"

    errors = _jsonl(openai_client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad-1", "bad-2"]
    for error in errors:
        assert error["id"].startswith("batch_req_")
        assert error["error"]["code"] and "model refused" in error["error"]["message"]
        assert error["response"]["status_code"] == 400
        assert "model refused" in error["response"]["body"]["error"]["message"]


def test_input_validation_fails_the_batch(
    openai_client: openai.OpenAI, app: Flask, api_key: str
) -> None:
    lines = [
        _line("a"),  # 1: fine
        '{"custom_id": "b", "method": "POST",',  # 2: bad JSON
        {k: v for k, v in _line("x").items() if k != "custom_id"},  # 3: no custom_id
        _line("a"),  # 4: duplicate of line 1
        _line("c", method="GET"),  # 5: wrong method
        _line("d", url="/v1/embeddings"),  # 6: wrong url
        _line("e", model="nosuchprovider/model"),  # 7: the chat endpoint rejects the model
        {**_line("f"), "body": {"model": "mock/echo"}},  # 8: no messages
        {**_line("g"), "body": {**_line("g")["body"], "n": 0}},  # 9: n < 1
        "[1, 2]",  # 10: JSON but not an object
    ]
    batch = _create(openai_client, _upload(openai_client, lines))
    assert batch.status == "failed"
    assert batch.failed_at is not None and batch.in_progress_at is None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.request_counts.total == 0
    assert batch.errors is not None and batch.errors.object == "list"
    found = {(e.line, e.code, e.param) for e in batch.errors.data}
    assert (2, "invalid_json_line", None) in found
    assert (3, "missing_custom_id", "custom_id") in found
    assert (4, "duplicate_custom_id", "custom_id") in found
    assert (5, "invalid_method", "method") in found
    assert (6, "url_mismatch", "url") in found
    assert (10, "invalid_json_line", None) in found
    by_line = {e.line: e for e in batch.errors.data}
    assert by_line[7].param == "body.model" and "nosuchprovider" in by_line[7].message
    assert by_line[8].param == "body.messages"
    assert by_line[9].param == "body.n"
    assert 1 not in by_line
    assert all(e.message for e in batch.errors.data)
    assert openai_client.batches.retrieve(batch.id).status == "failed"
    with app.app_context():
        jobs = db.session.scalar(select(func.count()).where(Job.batch_id == batch.id))
        assert jobs == 0


def test_a_bad_last_line_leaves_no_item_written(openai_client: openai.OpenAI, app: Flask) -> None:
    """Lines are validated and staged in one pass: good lines before a bad one are never
    inserted, and the error names the line."""
    ids = [f"staged-{time.time_ns()}-{i}" for i in range(3)]
    lines = [*(_line(i) for i in ids), {**_line("last"), "method": "GET"}]
    batch = _create(openai_client, _upload(openai_client, lines))
    assert batch.status == "failed" and batch.request_counts.total == 0
    assert [(e.line, e.code) for e in batch.errors.data] == [(4, "invalid_method")]
    with app.app_context():
        assert db.session.scalar(select(func.count()).where(Job.item_id.in_(ids))) == 0


def test_empty_input_file_fails(openai_client: openai.OpenAI) -> None:
    file_id = openai_client.files.create(
        file=("empty.jsonl", io.BytesIO(b"\n\n")), purpose="batch"
    ).id
    batch = _create(openai_client, file_id)
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("empty_file", None)]


def test_bad_request_parameters(
    client: httpx.Client, openai_client: openai.OpenAI, app: Flask, api_key: str
) -> None:
    file_id = _upload(openai_client, [_line("a")])
    with app.app_context():
        tenant_id = lookup_key(api_key).tenant_id
        output = create_generated_file(tenant_id, "out.jsonl", "batch_output", [b"{}\n"])
        db.session.commit()
        output_id = output.id
    good = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    cases = [
        ({k: v for k, v in good.items() if k != "input_file_id"}, 400, "input_file_id"),
        ({**good, "input_file_id": "file-doesnotexist"}, 404, "input_file_id"),
        ({**good, "input_file_id": output_id}, 400, "input_file_id"),
        ({**good, "endpoint": "/v1/embeddings"}, 400, "endpoint"),
        ({k: v for k, v in good.items() if k != "endpoint"}, 400, "endpoint"),
        ({**good, "completion_window": "48h"}, 400, "completion_window"),
        ({**good, "metadata": {"k": 1}}, 400, "metadata"),
    ]
    for payload, status, param in cases:
        response = client.post("/v1/batches", json=payload)
        assert response.status_code == status, (payload, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"], (payload, error)
    not_json = client.post("/v1/batches", content=b"nope", headers={"Content-Type": "text/plain"})
    assert not_json.status_code == 400
    with pytest.raises(openai.BadRequestError):
        _create(openai_client, output_id)
    assert client.get("/v1/batches/batch_nope").status_code == 404
    assert client.post("/v1/batches/batch_nope/cancel").status_code == 404
    assert client.get("/v1/batches", params={"limit": "101"}).status_code == 400


def test_cancel(openai_client: openai.OpenAI) -> None:
    slow = "mock/slow-item?ttft_ms=1500&length=3"
    lines = [_line(f"s-{i}", model=slow) for i in range(80)]
    batch = _create(openai_client, _upload(openai_client, lines))
    cancelling = openai_client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    done = _wait(openai_client, batch.id)
    assert done.status == "cancelled"
    assert done.cancelled_at is not None and done.completed_at is None
    counts = done.request_counts
    assert counts.total == 80 and counts.completed + counts.failed == 80
    assert counts.failed > 0  # the queued items never ran
    assert done.error_file_id is not None
    errors = _jsonl(openai_client, done.error_file_id)
    assert len(errors) == counts.failed
    assert any(e["error"]["code"] == "batch_cancelled" for e in errors)
    outputs = _jsonl(openai_client, done.output_file_id) if done.output_file_id else []
    assert len(outputs) == counts.completed
    assert openai_client.batches.cancel(batch.id).status == "cancelled"  # idempotent
    with pytest.raises(openai.ConflictError):  # a failed batch cannot be cancelled
        openai_client.batches.cancel(_failed_batch(openai_client))


def _failed_batch(client: openai.OpenAI, file_id: str | None = None) -> str:
    return _create(client, file_id or _upload(client, ["not json"])).id


def test_list_with_pagination(openai_client: openai.OpenAI, client: httpx.Client) -> None:
    file_id = _upload(openai_client, ["not json"])  # failed batches: cheap and immediate
    ids = [_failed_batch(openai_client, file_id) for _ in range(5)]
    page = client.get("/v1/batches", params={"limit": 2}).json()
    assert page["object"] == "list"
    assert [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["first_id"] == ids[4] and page["last_id"] == ids[3] and page["has_more"] is True
    assert all(b["object"] == "batch" for b in page["data"])
    listed = [b.id for b in openai_client.batches.list(limit=2)]  # auto-pagination via `after`
    assert listed == ids[::-1]
    last = client.get("/v1/batches", params={"limit": 2, "after": ids[1]}).json()
    assert [b["id"] for b in last["data"]] == [ids[0]] and last["has_more"] is False


def test_idempotency_key(openai_client: openai.OpenAI, client: httpx.Client) -> None:
    file_id = _upload(openai_client, ["not json"])
    payload = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    headers = {"Idempotency-Key": "same-key"}
    first = client.post("/v1/batches", json=payload, headers=headers).json()
    second = client.post("/v1/batches", json=payload, headers=headers).json()
    assert first["id"] == second["id"]


def test_tenant_isolation(openai_client: openai.OpenAI, stack: Stack, other_key: str) -> None:
    file_id = _upload(openai_client, [_line("a")])
    batch_id = _failed_batch(openai_client)
    other = openai.OpenAI(base_url=stack.url + "/v1", api_key=other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch_id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch_id)
    with pytest.raises(openai.NotFoundError) as caught:
        _create(other, file_id)
    assert caught.value.body["param"] == "input_file_id"
    assert [b.id for b in other.batches.list()] == []
    assert openai_client.batches.retrieve(batch_id).id == batch_id


def test_expiry_writes_unrun_items_to_the_error_file(
    openai_client: openai.OpenAI, app: Flask
) -> None:
    """The engine's expiry (what the sweeper does past the window) ends as OpenAI's `expired`."""
    from app.services.batch_lifecycle import expire_batch

    slow = "mock/slow-item?ttft_ms=1500&length=3"
    batch = _create(
        openai_client, _upload(openai_client, [_line(f"e-{i}", model=slow) for i in range(80)])
    )
    with app.app_context():
        expire_batch(batch.id)
    done = _wait(openai_client, batch.id)
    assert done.status == "expired"
    assert done.expired_at is not None and done.completed_at is None
    counts = done.request_counts
    assert counts.total == 80 and counts.completed + counts.failed == 80 and counts.failed > 0
    errors = _jsonl(openai_client, done.error_file_id)
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
