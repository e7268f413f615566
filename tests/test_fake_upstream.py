"""The fake upstream itself: control endpoints, pacing, concurrency, wire details."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fake_upstream import FakeUpstream, split_tokens


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(tokens=5) as server:
        yield server


HEADERS = {"Authorization": "Bearer test", "x-api-key": "test"}


def chat(model: str, *, stream: bool = False, text: str = "hi") -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}


def test_split_tokens_round_trips() -> None:
    for text in ["", "a", " lead", "a b\n\nc  ", "世界 🚀\tx\n"]:
        assert "".join(split_tokens(text)) == text


def test_scenarios_over_http(upstream: FakeUpstream) -> None:
    with httpx.Client(base_url=upstream.url, headers=HEADERS) as client:
        created = client.post(
            "/_scenarios", json={"name": "remote", "status": 429, "retry_after": 2}
        )
        assert created.status_code == 201
        assert client.post("/_scenarios", json={"name": "bad", "nope": 1}).status_code == 400
        reply = client.post("/v1/chat/completions", json=chat("remote"))
        assert reply.status_code == 429 and reply.headers["retry-after"] == "2"
        assert reply.json()["error"]["type"] == "rate_limit_error"
        reply = client.post("/v1/messages", json={**chat("remote"), "max_tokens": 5})
        assert reply.json() == {
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": "scripted failure from the fake upstream",
            },
        }
        assert client.get("/_scenarios/remote").json() == {"requests": 2, "disconnects": 0}
        assert client.get("/_health").json() == {"ok": True}


def test_openai_stream_wire_format(upstream: FakeUpstream) -> None:
    body = {**chat("wire", stream=True), "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", f"{upstream.openai_base_url}/chat/completions", json=body, headers=HEADERS
    ) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]] == [None] * 5 + ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_anthropic_stream_event_order(upstream: FakeUpstream) -> None:
    body = {**chat("order", stream=True), "max_tokens": 100}
    with httpx.stream("POST", f"{upstream.url}/v1/messages", json=body, headers=HEADERS) as reply:
        events = [
            line.removeprefix("event: ") for line in reply.iter_lines() if line.startswith("event:")
        ]
    assert events == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_pacing_is_roughly_right(upstream: FakeUpstream) -> None:
    body = chat("paced?ttft_ms=200&tps=50&tokens=10", stream=True)
    started = time.monotonic()
    stamps: list[float] = []
    with httpx.stream(
        "POST", f"{upstream.openai_base_url}/chat/completions", json=body, headers=HEADERS
    ) as reply:
        for line in reply.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                stamps.append(time.monotonic() - started)
    assert len(stamps) == 10
    assert 0.18 <= stamps[0] < 1.0  # ttft 200 ms
    assert 0.15 <= stamps[-1] - stamps[0] < 1.5  # nine gaps of 20 ms


def test_many_concurrent_streams(upstream: FakeUpstream) -> None:
    results: list[int] = []
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
    client = httpx.Client(timeout=20, limits=limits, headers=HEADERS)

    def one(i: int) -> None:
        body = chat("crowd?tps=100&tokens=10", stream=True, text=f"caller {i}")
        reply = client.post(f"{upstream.openai_base_url}/chat/completions", json=body)
        with lock:
            results.append(reply.text.count('"content": "') - 1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    with client:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert results == [10] * 200
    assert upstream.requests("crowd") == 200


def test_missing_key_is_a_401(upstream: FakeUpstream) -> None:
    assert httpx.post(f"{upstream.url}/v1/messages", json=chat("x")).status_code == 401


def test_bad_model_options_are_a_400(upstream: FakeUpstream) -> None:
    reply = httpx.post(
        f"{upstream.openai_base_url}/chat/completions", json=chat("x?bogus=1"), headers=HEADERS
    )
    assert reply.status_code == 400 and "bogus" in reply.json()["error"]["message"]


def test_drop_leaves_chunked_body_incomplete(upstream: FakeUpstream) -> None:
    upstream.add_scenario("cut", drop_after=2)
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST",
            f"{upstream.openai_base_url}/chat/completions",
            json=chat("cut", stream=True),
            headers=HEADERS,
        ) as reply,
    ):
        for _ in reply.iter_bytes():
            pass


def _openai_chunks(upstream: FakeUpstream, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST", f"{upstream.openai_base_url}/chat/completions", json=body, headers=HEADERS
    ) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_openai_tool_call_chunks_and_recorded_bodies(upstream: FakeUpstream) -> None:
    calls = [
        {"id": "call_1", "name": "a", "arguments": '{"x": 1}'},
        {"id": "call_2", "name": "b", "arguments": '{"y": "two"}'},
    ]
    upstream.add_scenario("wire-tools", deltas=[], tool_calls=calls, fragment=4)
    body = {**chat("wire-tools", stream=True), "tools": [{"type": "function"}], "seed": 9}
    chunks = _openai_chunks(upstream, body)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    headers = [
        d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]
    ]
    assert [(h["index"], h["id"], h["function"]["name"]) for h in headers] == [
        (0, "call_1", "a"),
        (1, "call_2", "b"),
    ]
    for index, call in enumerate(calls):
        pieces = [
            d["tool_calls"][0]["function"]["arguments"]
            for d in deltas
            if "tool_calls" in d and d["tool_calls"][0]["index"] == index
        ]
        assert "".join(pieces) == call["arguments"] and len(pieces) > 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert upstream.last_request("wire-tools") == body
    assert upstream.bodies("wire-tools") == [body]


def test_openai_refusal_n_and_logprobs_chunks(upstream: FakeUpstream) -> None:
    upstream.add_scenario("wire-refusal", refusal="No can do.")
    chunks = _openai_chunks(upstream, chat("wire-refusal", stream=True))
    refusal = "".join(c["choices"][0]["delta"].get("refusal") or "" for c in chunks)
    assert refusal == "No can do."
    upstream.add_scenario("wire-n", deltas=["a", "b"])
    body = {**chat("wire-n", stream=True), "n": 2, "logprobs": True, "top_logprobs": 1}
    chunks = _openai_chunks(upstream, body)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content") or "" for c in mine) == "ab"
        tokens = [c["logprobs"]["content"][0]["token"] for c in mine if c["logprobs"]]
        assert tokens == ["a", "b"]


def test_anthropic_tool_use_events(upstream: FakeUpstream) -> None:
    calls = [{"id": "toolu_1", "name": "lookup", "arguments": '{"q": "sluice gates"}'}]
    upstream.add_scenario("wire-tool-use", deltas=[], tool_calls=calls, fragment=5)
    body = {**chat("wire-tool-use", stream=True), "max_tokens": 100}
    with httpx.stream("POST", f"{upstream.url}/v1/messages", json=body, headers=HEADERS) as reply:
        data = [
            json.loads(line.removeprefix("data: "))
            for line in reply.iter_lines()
            if line.startswith("data:")
        ]
    start = next(d for d in data if d["type"] == "content_block_start")
    assert start["content_block"] == {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "lookup",
        "input": {},
    }
    pieces = [d["delta"]["partial_json"] for d in data if d["type"] == "content_block_delta"]
    assert "".join(pieces) == calls[0]["arguments"] and len(pieces) > 2
    stop = next(d for d in data if d["type"] == "message_delta")
    assert stop["delta"]["stop_reason"] == "tool_use"


def test_models_list(upstream: FakeUpstream) -> None:
    before = upstream.model_list_requests
    listed = httpx.get(f"{upstream.openai_base_url}/models", headers=HEADERS).json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == upstream.models
    assert upstream.model_list_requests == before + 1
    assert httpx.get(f"{upstream.openai_base_url}/models").status_code == 401
