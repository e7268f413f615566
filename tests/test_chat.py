"""POST /v1/chat/completions through the real stack, with the official openai SDK as client."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from app.services.chat_request import PARAMETERS
from tests.fake_upstream import FakeUpstream
from tests.helpers import follow
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
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
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


# -- every Chat Completions parameter: carried to the upstream, or a 400 naming it ------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ANSWER_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {}}},
}
Expect = dict[str, Any] | str | Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Case:
    """A parameter's test: the body patch, and per provider what the upstream gets.

    OpenAI(-compatible) providers must receive the patch as sent. For Anthropic, a dict is
    what the Messages request must contain, a callable checks it, a string is the param
    the 400 names. For the mock, None means accepted and a string the param refused.
    """

    patch: dict[str, Any]
    anthropic: Expect
    mock: str | None = None


PARAMETER_CASES: dict[str, Case] = {
    "max_tokens": Case({"max_tokens": 7}, {"max_tokens": 7}),
    "max_completion_tokens": Case({"max_completion_tokens": 9}, {"max_tokens": 9}),
    "temperature": Case({"temperature": 0.5}, {"temperature": 0.5}),
    "top_p": Case({"top_p": 0.5}, {"top_p": 0.5}),
    "stop": Case({"stop": ["END"]}, {"stop_sequences": ["END"]}),
    "user": Case({"user": "u-1"}, {"metadata": {"user_id": "u-1"}}),
    "metadata": Case({"metadata": {"team": "a"}}, lambda body: "metadata" not in body),
    "n": Case({"n": 2}, "n"),
    "tools": Case(
        {"tools": [WEATHER]},
        {
            "tools": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "input_schema": WEATHER["function"]["parameters"],
                }
            ]
        },
    ),
    "tool_choice": Case(
        {
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
        {"tool_choice": {"type": "tool", "name": "get_weather"}},
    ),
    "parallel_tool_calls": Case(
        {"tools": [WEATHER], "parallel_tool_calls": False},
        {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
    ),
    "response_format": Case(
        {"response_format": ANSWER_FORMAT}, {"tool_choice": {"type": "tool", "name": "answer"}}
    ),
    "seed": Case({"seed": 42}, "seed"),
    "presence_penalty": Case({"presence_penalty": 0.5}, "presence_penalty"),
    "frequency_penalty": Case({"frequency_penalty": 0.5}, "frequency_penalty"),
    "logit_bias": Case({"logit_bias": {"50256": -100}}, "logit_bias"),
    "logprobs": Case({"logprobs": True}, "logprobs"),
    "top_logprobs": Case({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    "reasoning_effort": Case(
        {"reasoning_effort": "low"},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048},
    ),
    "service_tier": Case({"service_tier": "auto"}, {"service_tier": "auto"}),
    "store": Case({"store": True}, "store"),
    "modalities": Case({"modalities": ["text", "audio"]}, "modalities", "modalities"),
    "audio": Case({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio"),
    "prediction": Case(
        {"prediction": {"type": "content", "content": "x"}}, "prediction", "prediction"
    ),
    "web_search_options": Case(
        {"web_search_options": {}}, "web_search_options", "web_search_options"
    ),
    "verbosity": Case({"verbosity": "low"}, "verbosity", "verbosity"),
    "prompt_cache_key": Case({"prompt_cache_key": "k"}, "prompt_cache_key", "prompt_cache_key"),
    "safety_identifier": Case({"safety_identifier": "s"}, "safety_identifier", "safety_identifier"),
    "functions": Case(
        {"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions", "functions"
    ),
    "function_call": Case({"function_call": "auto"}, "function_call", "function_call"),
}


def test_every_parameter_has_a_case() -> None:
    """A parameter added to the validator's table without a case here fails."""
    assert set(PARAMETER_CASES) == set(PARAMETERS)


def _post(client: httpx.Client, model: str, patch: dict[str, Any]) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], **patch}
    return client.post("/v1/chat/completions", json=body)


def _refused(response: httpx.Response, param: str, provider: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert f"provider '{provider}'" in error["message"] and param in error["message"]


@pytest.mark.parametrize("name", sorted(PARAMETER_CASES))
def test_parameter_reaches_the_upstream_or_is_refused(
    client: httpx.Client, upstream: FakeUpstream, name: str
) -> None:
    case = PARAMETER_CASES[name]
    scenario = f"param-{name}"
    response = _post(client, f"openai/{scenario}", case.patch)
    assert response.status_code == 200, response.text
    sent = upstream.last_request(scenario)
    assert sent is not None and {k: sent.get(k) for k in case.patch} == case.patch

    response = _post(client, f"anthropic/{scenario}", case.patch)
    if isinstance(case.anthropic, str):
        _refused(response, case.anthropic, "anthropic")
    else:
        assert response.status_code == 200, response.text
        sent = upstream.last_request(scenario)
        assert sent is not None and sent.get("model") == scenario
        if callable(case.anthropic):
            assert case.anthropic(sent), sent
        else:
            assert {k: sent.get(k) for k in case.anthropic} == case.anthropic

    response = _post(client, "mock/echo", case.patch)
    if case.mock is None:
        assert response.status_code == 200, response.text
    else:
        _refused(response, case.mock, "mock")


def test_unknown_keys_pass_to_openai_compatible_only(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    patch = {"vendor_knob": {"depth": 3}, "top_k": 5}
    assert _post(client, "openai/unknown-keys", patch).status_code == 200
    sent = upstream.last_request("unknown-keys")
    assert sent is not None and sent["vendor_knob"] == {"depth": 3} and sent["top_k"] == 5
    _refused(_post(client, "anthropic/unknown-keys", patch), "vendor_knob", "anthropic")
    _refused(_post(client, "mock/echo", patch), "vendor_knob", "mock")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
        ({"seed": "1"}, "seed"),
        ({"n": 0}, "n"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
                ]
            },
            "messages[0].tool_calls[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x"}}],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_tool_and_format_shapes_name_the_parameter(
    client: httpx.Client, patch: dict[str, Any], param: str
) -> None:
    response = _post(client, "openai/shapes", patch)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_tool_messages_and_content_parts_reach_the_upstream(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                },
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {
                    "type": "file",
                    "file": {
                        "file_data": "data:application/pdf;base64,JVBERi0=",
                        "filename": "a.pdf",
                    },
                },
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
    ]
    body = {"model": "openai/parts", "messages": messages, "tools": [WEATHER]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    sent = upstream.last_request("parts")
    assert sent is not None and sent["messages"] == messages
    body["model"] = "anthropic/parts"
    detail = "messages[0].content[1].image_url.detail"
    _refused(client.post("/v1/chat/completions", json=body), detail, "anthropic")
    body["messages"][0]["content"][1]["image_url"]["detail"] = "auto"
    _refused(client.post("/v1/chat/completions", json=body), "messages[0].content[2]", "anthropic")
    body["messages"][0]["content"].pop(2)
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    sent = upstream.last_request("parts")
    assert sent is not None
    kinds = [block["type"] for block in sent["messages"][0]["content"]]
    assert kinds == ["text", "image", "document"]
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "cold"}
    ]


def test_jobs_and_batch_lines_share_the_validator(
    client: httpx.Client, openai_client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    body = {
        "model": "openai/jobs-params",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER],
        "seed": 5,
        "mode": "batch",
    }
    accepted = client.post("/v1/jobs", json=body)
    assert accepted.status_code == 202, accepted.text
    job = wait_job(client, accepted.json()["id"])
    assert job["status"] == "succeeded", job
    sent = upstream.last_request("jobs-params")
    assert sent is not None and sent["tools"] == [WEATHER] and sent["seed"] == 5
    refused = client.post("/v1/jobs", json={**body, "model": "anthropic/x"})
    _refused(refused, "seed", "anthropic")

    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
    line["body"] = {k: v for k, v in body.items() if k != "mode"} | {"model": "anthropic/x"}
    upload = openai_client.files.create(
        file=("in.jsonl", io.BytesIO((json.dumps(line) + "\n").encode())), purpose="batch"
    )
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.errors is not None
    assert [(e.line, e.param) for e in batch.errors.data] == [(1, "body.seed")]


def test_jobs_carry_stream_options_to_their_events(client: httpx.Client) -> None:
    """/v1/jobs honours stream_options (usage on the job's event stream) or refuses it."""
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
    body |= {"mode": "stream", "stream": True, "stream_options": {"include_usage": True}}
    accepted = client.post("/v1/jobs", json=body, headers={"Prefer": "respond-async"})
    assert accepted.status_code in (200, 202), accepted.text
    job_id = accepted.headers.get("x-sluice-job-id") or accepted.json()["id"]
    events = follow(client, job_id)
    data = [e["data"] for e in events.events if isinstance(e["data"], dict)]
    assert events.done and any(chunk.get("usage") for chunk in data), data
    refused = client.post("/v1/jobs", json={**body, "stream": False})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_options"


def wait_job(client: httpx.Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_batch_output_lines_carry_tool_calls_and_structured_output(
    openai_client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    calls = [{"id": "call_b1", "name": "get_weather", "arguments": '{"city":"Lima"}'}]
    upstream.add_scenario("batch-tools", deltas=[], tool_calls=calls)
    hello = [{"role": "user", "content": "Lima"}]
    bodies = {
        "mock-tools": {"model": "mock/tools", "messages": hello, "tools": [WEATHER]},
        "upstream-tools": {"model": "openai/batch-tools", "messages": hello, "tools": [WEATHER]},
        "structured": {"model": "mock/x", "messages": hello, "response_format": ANSWER_FORMAT},
        "plain": {"model": "mock/echo", "messages": hello},
    }
    lines = [
        {"custom_id": name, "method": "POST", "url": "/v1/chat/completions", "body": body}
        for name, body in bodies.items()
    ]
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = openai_client.files.create(file=("in.jsonl", io.BytesIO(raw)), purpose="batch")
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
        batch = openai_client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.output_file_id, batch
    output = openai_client.files.content(batch.output_file_id).text.splitlines()
    results = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, output)}
    mock_call = results["mock-tools"]["choices"][0]
    assert mock_call["finish_reason"] == "tool_calls"
    assert mock_call["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    upstream_message = results["upstream-tools"]["choices"][0]["message"]
    assert [
        (c["id"], c["function"]["name"], c["function"]["arguments"])
        for c in upstream_message["tool_calls"]
    ] == [(c["id"], c["name"], c["arguments"]) for c in calls]  # byte-identical
    assert json.loads(results["structured"]["choices"][0]["message"]["content"]) == {}
    assert results["plain"]["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Lima",
        "refusal": None,
    }
