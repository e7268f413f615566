"""The fake upstream's provider batch APIs, driven by the official SDKs (issue #13)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.fake_upstream import FakeUpstream


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        server.add_scenario("bad", status=400, message="nope")
        yield server


def _openai(up: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.openai_base_url, api_key="k", max_retries=0)


def _anthropic(up: FakeUpstream) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=up.anthropic_base_url, api_key="k", max_retries=0)


def _until_ended(get: object, batch_id: str, done: tuple[str, ...]) -> object:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = get(batch_id)  # type: ignore[operator]
        status = getattr(batch, "status", None) or batch.processing_status  # type: ignore[attr-defined]
        if status in done:
            return batch
        time.sleep(0.05)
    raise AssertionError(f"{batch_id} did not end")


def test_openai_files_and_batches_succeed_and_fail_per_request(upstream: FakeUpstream) -> None:
    client = _openai(upstream)
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "echo", "messages": [{"role": "user", "content": f"hello {i}"}]},
        }
        for i in range(6)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert client.files.content(upload.id).content == data
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 6
    batch = _until_ended(client.batches.retrieve, batch.id, ("completed",))
    assert batch.request_counts.completed == 6 and batch.error_file_id is None
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == [f"c{i}" for i in range(6)]
    by_id = {x["custom_id"]: x["response"]["body"] for x in out}
    assert by_id["c3"]["choices"][0]["message"]["content"] == "hello 3"


def test_openai_batch_of_two_models_fails_validation(upstream: FakeUpstream) -> None:
    client = _openai(upstream)
    lines = [
        {"custom_id": f"c{m}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": m, "messages": [{"role": "user", "content": "x"}]}}
        for m in ("echo", "other")
    ]  # fmt: skip
    upload = client.files.create(
        file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.errors and batch.errors.data


def test_openai_cancel_and_expiry_go_to_the_error_file(upstream: FakeUpstream) -> None:
    client = _openai(upstream)
    upstream.batches.configure(processing_s=30)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "echo", "messages": [{"role": "user", "content": "x"}]}}  # fmt: skip
    upload = client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = _until_ended(client.batches.retrieve, batch.id, ("cancelled",))
    error = json.loads(client.files.content(batch.error_file_id).text)
    assert error["error"]["code"] == "batch_cancelled" and error["response"] is None
    upstream.batches.configure(expire_after_s=0.2)
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = _until_ended(client.batches.retrieve, batch.id, ("expired",))
    error = json.loads(client.files.content(batch.error_file_id).text)
    assert error["error"]["code"] == "batch_expired"


def test_anthropic_message_batches(upstream: FakeUpstream) -> None:
    client = _anthropic(upstream)
    params = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    requests = [{"custom_id": f"c{i}", "params": {"model": "bad" if i == 0 else "echo", **params}}
                for i in range(8)]  # fmt: skip
    batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 8
    batch = _until_ended(client.messages.batches.retrieve, batch.id, ("ended",))
    counts = batch.request_counts
    assert (counts.succeeded, counts.errored, counts.processing) == (7, 1, 0)
    results = list(client.messages.batches.results(batch.id))
    assert sorted(r.custom_id for r in results) == [f"c{i}" for i in range(8)]
    errored = next(r for r in results if r.custom_id == "c0")
    assert errored.result.type == "errored"
    assert errored.result.error.error.message == "nope"  # type: ignore[union-attr]
    ok = next(r for r in results if r.custom_id == "c1")
    assert ok.result.type == "succeeded" and ok.result.message.content[0].text == "hi"  # type: ignore[union-attr]


def test_anthropic_cancel_keeps_finished_requests_and_cancels_the_rest(
    upstream: FakeUpstream,
) -> None:
    client = _anthropic(upstream)
    upstream.batches.configure(processing_s=1.0)
    params = {"model": "echo", "max_tokens": 10, "messages": [{"role": "user", "content": "q"}]}
    requests = [{"custom_id": f"c{i}", "params": params} for i in range(20)]
    batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    time.sleep(0.5)
    assert client.messages.batches.cancel(batch.id).processing_status == "canceling"
    batch = _until_ended(client.messages.batches.retrieve, batch.id, ("ended",))
    counts = batch.request_counts
    assert counts.succeeded + counts.canceled == 20 and counts.canceled > 0
    kinds = {r.result.type for r in client.messages.batches.results(batch.id)}
    assert kinds == {"succeeded", "canceled"}


def test_anthropic_expiry_and_bad_custom_ids(upstream: FakeUpstream) -> None:
    client = _anthropic(upstream)
    upstream.batches.configure(processing_s=5, expire_after_s=0.2)
    params = {"model": "echo", "max_tokens": 10, "messages": [{"role": "user", "content": "q"}]}
    batch = client.messages.batches.create(requests=[{"custom_id": "a", "params": params}])  # type: ignore[list-item]
    batch = _until_ended(client.messages.batches.retrieve, batch.id, ("ended",))
    assert batch.request_counts.expired == 1
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.create(requests=[{"custom_id": "no spaces", "params": params}])  # type: ignore[list-item]
