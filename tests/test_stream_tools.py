"""Whole chat deltas through the delta log: tool calls, n > 1, logprobs, refusal.

The upstream's chunks are canned here (fake upstream scenarios sent as given), so what
reaches the client can be compared byte for byte with what the upstream sent: streamed,
collected by stream:false, and resumed at every cut point.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
from flask import Flask

from app.extensions import redis_store
from app.streams.entries import Generation, coalesce, encode_delta
from app.streams.keys import log_key
from tests.fake_upstream import FakeUpstream
from tests.helpers import follow, read_sse

ARGS = [
    '{"city": "Z\\u00fcrich \\"old town\\"", "days": [1, 2, 3], "note": "🌍 a\\nb"}',
    '{"query": "数据流 data: x\\n\\nid: 7", "limit": 10}',
]
NAMES = ["get_weather", "lookup"]


def _pieces(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _tool_deltas() -> list[dict[str, Any]]:
    """Two parallel tool calls, their arguments split across many chunks."""
    out: list[dict[str, Any]] = []
    for index, (name, args) in enumerate(zip(NAMES, ARGS, strict=True)):
        head = {"index": index, "id": f"call_{index}", "type": "function"}
        out.append({"tool_calls": [head | {"function": {"name": name, "arguments": ""}}]})
        for piece in _pieces(args):
            out.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    return out


def _canned(model: str) -> tuple[list[tuple[int, dict[str, Any], Any]], dict[int, str]]:
    """(choice index, delta, logprobs) per chunk, and the finish reason per choice."""
    if model == "canned-tools":
        return [(0, d, None) for d in _tool_deltas()], {0: "tool_calls"}
    if model == "canned-n2":
        chunks: list[tuple[int, dict[str, Any], Any]] = []
        for i in range(6):
            lp = {
                "content": [{"token": f"a{i}", "logprob": -0.5, "bytes": None, "top_logprobs": []}]
            }
            chunks.append((0, {"content": f"a{i} "}, lp))
            chunks.append((1, {"content": f"b{i} "}, None))
        chunks.append((1, {"refusal": "no "}, None))
        chunks.append((1, {"refusal": "thanks"}, None))
        return chunks, {0: "stop", 1: "length"}
    raise KeyError(model)


@pytest.fixture
def canned(upstream: FakeUpstream) -> FakeUpstream:
    """The fake upstream, answering `canned-*` models with the chunks above."""
    for name in ("canned-tools", "canned-n2"):
        chunks, finishes = _canned(name)
        upstream.add_scenario(name, chunks=chunks, finishes=finishes, tps=150)
    return upstream


def _reassemble(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """What an OpenAI client builds from chunks: per choice, text fields and tool calls."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            got = out.setdefault(choice["index"], {"calls": {}, "roles": 0, "logprobs": []})
            delta = choice["delta"]
            got["roles"] += delta.get("role") == "assistant"
            for key in ("content", "refusal"):
                if delta.get(key):
                    got[key] = got.get(key, "") + delta[key]
            for call in delta.get("tool_calls") or []:
                into = got["calls"].setdefault(call["index"], {"arguments": ""})
                for key in ("id", "type"):
                    if call.get(key):
                        into[key] = call[key]
                function = call.get("function") or {}
                if function.get("name"):
                    into["name"] = function["name"]
                into["arguments"] += function.get("arguments") or ""
            if choice.get("logprobs"):
                got["logprobs"] += choice["logprobs"]["content"]
            if choice.get("finish_reason"):
                got["finish"] = choice["finish_reason"]
    return out


def _expected_calls() -> dict[int, dict[str, Any]]:
    return {
        i: {"id": f"call_{i}", "type": "function", "name": n, "arguments": a}
        for i, (n, a) in enumerate(zip(NAMES, ARGS, strict=True))
    }


def _body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "x"}], **extra}


def test_tool_calls_stream_byte_identical(canned: FakeUpstream, client: httpx.Client) -> None:
    body = _body("openai/canned-tools", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        sse = read_sse(response)
    assert sse.done
    chunks = [e["data"] for e in sse.events if isinstance(e["data"], dict)]
    assert len([c for c in chunks if c["choices"]]) > 3, "the arguments came in one piece"
    got = _reassemble(chunks)
    assert got[0]["calls"] == _expected_calls()
    assert got[0]["roles"] == 1 and got[0]["finish"] == "tool_calls"
    assert chunks[-1]["usage"]["prompt_tokens"] == 3


def test_tool_calls_through_the_openai_sdk(
    canned: FakeUpstream, openai_client: openai.OpenAI
) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    stream = openai_client.chat.completions.create(
        model="openai/canned-tools", messages=messages, stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                into = calls.setdefault(call.index, {"arguments": ""})
                if call.id:
                    into["id"] = call.id
                if call.function and call.function.name:
                    into["name"] = call.function.name
                into["arguments"] += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i]["arguments"] for i in sorted(calls)] == ARGS
    whole = openai_client.chat.completions.create(model="openai/canned-tools", messages=messages)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    assert [
        (c.id, c.type, c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ] == [(f"call_{i}", "function", n, a) for i, (n, a) in enumerate(zip(NAMES, ARGS, strict=True))]


def test_resume_in_the_middle_of_tool_call_arguments(
    canned: FakeUpstream, client: httpx.Client
) -> None:
    body = _body("openai/canned-tools", stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        job_id = response.headers["x-sluice-job-id"]
        full = read_sse(response)
    assert full.done
    total = len(full.events)
    mid_arguments = 0
    for cut in range(1, total):
        first = follow(client, job_id, max_events=cut)
        rest = follow(client, job_id, last=first.last_id)
        assert rest.status == 200 or rest.status == 204
        ids = first.ids + rest.ids
        assert len(ids) == len(set(ids)), f"an event twice at cut {cut}"
        chunks = [e["data"] for e in first.events + rest.events if isinstance(e["data"], dict)]
        got = _reassemble(chunks)
        assert got[0]["calls"] == _expected_calls(), f"cut after {cut} events"
        assert got[0]["roles"] == 1
        so_far = _reassemble([e["data"] for e in first.events if isinstance(e["data"], dict)])
        partial = so_far.get(0, {}).get("calls", {})
        if any(0 < len(c["arguments"]) < len(ARGS[i]) for i, c in partial.items()):
            mid_arguments += 1
    assert mid_arguments >= 2, "no cut fell inside a tool call's arguments"


def test_n2_choices_logprobs_and_refusal(canned: FakeUpstream, client: httpx.Client) -> None:
    body = _body("openai/canned-n2")  # the canned upstream answers two choices regardless
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        sse = read_sse(response)
    assert sse.done
    got = _reassemble([e["data"] for e in sse.events if isinstance(e["data"], dict)])
    assert got[0]["content"] == "".join(f"a{i} " for i in range(6))
    assert [lp["token"] for lp in got[0]["logprobs"]] == [f"a{i}" for i in range(6)]
    assert got[1]["content"] == "".join(f"b{i} " for i in range(6))
    assert got[1]["refusal"] == "no thanks"
    assert got[0]["finish"] == "stop" and got[1]["finish"] == "length"
    assert got[0]["roles"] == 1 and got[1]["roles"] == 1
    whole = client.post("/v1/chat/completions", json=body).json()
    first, second = whole["choices"]
    assert first["message"]["content"] == got[0]["content"]
    assert [lp["token"] for lp in first["logprobs"]["content"]] == [f"a{i}" for i in range(6)]
    assert second["message"]["refusal"] == "no thanks" and second["finish_reason"] == "length"


@pytest.mark.parametrize("model", ["openai/canned-tools", "openai/canned-n2"])
def test_a_streamed_job_keeps_its_choices_in_its_row(
    canned: FakeUpstream, client: httpx.Client, app: Flask, model: str
) -> None:
    """Tool calls and n > 1 of a streamed job outlive its delta log, as a background job's do."""
    whole = client.post("/v1/chat/completions", json=_body(model)).json()
    with client.stream("POST", "/v1/chat/completions", json=_body(model, stream=True)) as response:
        job_id = response.headers["x-sluice-job-id"]
        assert read_sse(response).done
    live = client.get(f"/v1/jobs/{job_id}").json()  # the row or, until it is written, the log
    assert live["choices"] == whole["choices"]
    with app.app_context():
        redis_store.client.delete(log_key(job_id))
    deadline = time.monotonic() + 10
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] != "succeeded":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["choices"] == whole["choices"]
    assert job["output"] == (whole["choices"][0]["message"]["content"] or "")


# ------------------------------------------------------------------ the format, no stack


@pytest.mark.unit
def test_coalesce_merges_fragments_of_the_same_call_only() -> None:
    deltas = [{"index": 0, "delta": d} for d in _tool_deltas()]
    deltas.append({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
    for size in (1, 2, 5, 1000):
        entries = []
        for start in range(0, len(deltas), size):
            merged, finishes = coalesce(deltas[start : start + size])
            if merged:
                name, value = encode_delta(merged)
                entries.append((f"{start}-0", {"t": "delta", name: value}))
        entries.append(("9-0", {"t": "done", "finish_reason": "tool_calls", "usage": "{}"}))
        message = Generation.of(entries).messages()[0]["message"]
        assert message["content"] is None
        assert [c["function"]["arguments"] for c in message["tool_calls"]] == ARGS
        assert [c["id"] for c in message["tool_calls"]] == ["call_0", "call_1"]
    assert finishes == {0: "tool_calls"}


@pytest.mark.unit
def test_plain_content_keeps_the_lean_entry() -> None:
    merged, _ = coalesce(
        [{"index": 0, "delta": {"content": "a"}}, {"index": 0, "delta": {"content": "b"}}]
    )
    assert encode_delta(merged) == ("d", "ab")
