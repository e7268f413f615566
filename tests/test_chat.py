"""POST /v1/chat/completions through the real stack, with the official openai SDK as client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.stack import Stack


def test_sdk_streaming_with_usage_chunk(openai_client: openai.OpenAI, client: httpx.Client) -> None:
    stream = openai_client.chat.completions.create(
        model="mock/echo",
        messages=[{"role": "user", "content": "one two three four five"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-job_")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == "mock/echo" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four five"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])

    job_id = next(iter(ids)).removeprefix("chatcmpl-")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["mode"] == "stream"
    assert job["output"] == text and job["usage"]["completion_tokens"] == 5
    assert job["timings"]["ttft_ms"] is not None and job["timings"]["duration_ms"] is not None
    assert job["route"]["rule"]


def test_sdk_streaming_without_usage(openai_client: openai.OpenAI) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model="mock/echo", messages=[{"role": "user", "content": "hi there"}], stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hi there"


def test_sdk_non_streaming(openai_client: openai.OpenAI) -> None:
    raw = openai_client.chat.completions.with_raw_response.create(
        model="mock/echo", messages=[{"role": "user", "content": "alpha beta gamma"}]
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "alpha beta gamma"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 3
    job_id = raw.headers["X-Sluice-Job-Id"]
    assert raw.headers["Location"] == f"/v1/jobs/{job_id}"
    assert raw.headers["X-Sluice-Route"].startswith("stream; rule=")


def test_sse_headers_and_wire_format(client: httpx.Client) -> None:
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "a b"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        job_id = response.headers["x-sluice-job-id"]
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        raw = response.read().decode()
    assert raw.startswith("retry: ")
    assert raw.endswith("data: [DONE]\n\n")
    raw = raw.replace(": ping\n", "")  # a cold worker may make the relay ping first
    events = [e for e in raw.split("\n\n") if e]
    assert all("data: " in e for e in events), events
    assert events[-1].startswith("id: ")  # the checkpoint is on [DONE]
    assert events[0].startswith("retry: ") and "\nid: " in events[0]


def test_upstream_openai_provider_streams(
    openai_client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.add_scenario("chat-deltas", deltas=["Hé", "llo\n", "", "wörld 🌍", "!"])
    chunks = list(
        openai_client.chat.completions.create(
            model="openai/chat-deltas", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Héllo\nwörld 🌍!"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"n": 0}, "n"),
        ({"model": "nope/x"}, "model"),
        ({"model": "mock"}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_bad_bodies_name_the_parameter(
    client: httpx.Client, patch: dict[str, object], param: str
) -> None:
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "x"}]} | patch
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_not_json_is_a_clean_400(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_max_tokens_gives_length(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.create(
        model="mock/echo", messages=[{"role": "user", "content": "a b c d e f"}], max_tokens=2
    )
    assert completion.choices[0].message.content == "a b"
    assert completion.choices[0].finish_reason == "length"


def test_chat_cli_streams_and_reports_ttft(stack: Stack, api_key: str) -> None:
    from click.testing import CliRunner

    from app.cli import main as sluice

    prompt = "héllo wörld\nsecond line"
    args = ["chat", prompt, "--model", "mock/echo", "--url", stack.url, "--key", api_key]
    result = CliRunner().invoke(sluice, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == prompt
    assert "TTFT" in result.stderr and "tokens/s" in result.stderr
    bad = CliRunner().invoke(sluice, [*args[:4], "--model", "nope/x", *args[4:]])
    assert bad.exit_code != 0 and "model" in bad.output
