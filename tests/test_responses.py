"""/v1/responses (OpenAI's Responses API) against the live stack, through real clients:
the openai SDK's responses.create / .parse / .stream and LangChain's ChatOpenAI with
use_responses_api=True; what reaches the provider; refusals naming the Responses field."""

from __future__ import annotations

import json
import threading
import time
import typing
from typing import Any

import httpx
import openai
import pytest
from flask import Flask
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel
from sqlalchemy import select, update

from app.extensions import db
from app.models import Job
from app.services.responses_objects import job_id_of
from app.services.responses_request import translate
from tests.fake_upstream import FakeUpstream
from tests.helpers import read_sse, tuned_batch_worker
from tests.stack import Stack
from tests.test_clients import PIXEL, Person, llm  # noqa: F401 - llm: the fixture, reused

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "strict": None,
}

EVENT_TYPES = {
    model.model_fields["type"].annotation.__args__[0]: model
    for model in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str


def test_create_text_is_a_response_tied_to_its_job(
    openai_client: openai.OpenAI, client: httpx.Client
) -> None:
    raw = openai_client.responses.with_raw_response.create(
        model="mock/echo", input="hello there", instructions="be brief", max_output_tokens=50
    )
    response = raw.parse()
    body = raw.http_response.json()
    Response.model_validate(body)  # strictly OpenAI's shape
    described = client.get("/openapi.json").json()["components"]["schemas"]["ResponseObject"]
    assert set(body) == set(described["properties"])
    job_id = raw.headers["x-sluice-job-id"]
    assert response.id == "resp_" + job_id.removeprefix("job_")
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == "hello there"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.instructions == "be brief" and response.max_output_tokens == 50
    usage = response.usage
    assert usage is not None and usage.output_tokens == 2
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens > 2
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_function_call_round_trip(openai_client: openai.OpenAI) -> None:
    first = openai_client.responses.create(
        model="mock/tools", input="Paris", tools=[WEATHER], parallel_tool_calls=False
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id and call.id.startswith("fc_")
    assert first.tools[0].name == "get_weather" and first.parallel_tool_calls is False
    second = openai_client.responses.create(
        model="mock/tools",
        input=[
            {"role": "user", "content": "Paris"},
            *first.output,  # the SDK's own items, sent back as they came
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"},
        ],
        tools=[WEATHER],
    )
    assert second.output_text == "sunny, 21C"


def test_json_schema_through_parse(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.parse(
        model="mock/chat", input="Grace Hopper", text_format=Person
    )
    assert response.output_parsed == Person(name="Grace Hopper", age=2, likes_tea=True)
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_what_reaches_the_provider(openai_client: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.add_scenario("responses-carry", deltas=["fine"])
    response = openai_client.responses.create(
        model="openai/responses-carry",
        instructions="You see images.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this?"},
                    {"type": "input_image", "image_url": PIXEL, "detail": "low"},
                ],
            }
        ],
        temperature=0.5,
        max_output_tokens=20,
        reasoning={"effort": "low"},
        text={"format": {"type": "json_object"}},
        metadata={"k": "v"},
        user="u-1",
        store=False,
        include=[],  # asks for nothing: accepted
        top_logprobs=0,
    )
    assert response.output_text == "fine" and response.metadata == {"k": "v"}
    sent = upstream.last_request("responses-carry")
    assert sent is not None
    assert sent["messages"] == [
        {"role": "system", "content": "You see images."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}},
            ],
        },
    ]
    assert sent["temperature"] == 0.5 and sent["max_completion_tokens"] == 20
    assert sent["reasoning_effort"] == "low" and sent["user"] == "u-1"
    assert sent["response_format"] == {"type": "json_object"}
    assert "store" not in sent  # Sluice keeps the job whatever `store` says


def _stream_events(openai_client: openai.OpenAI, **body: Any) -> tuple[list[Any], Any]:
    with openai_client.responses.stream(**body) as stream:
        events = list(stream)
        return events, stream.get_final_response()


def test_stream_events_and_final_response(openai_client: openai.OpenAI) -> None:
    events, final = _stream_events(openai_client, model="mock/echo", input="one two three")
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        "one two three"
    )
    assert final.output_text == "one two three" and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 3
    assert final.id == events[0].response.id


def test_stream_function_call_events(openai_client: openai.OpenAI, upstream: FakeUpstream) -> None:
    arguments = '{"city": "Z\\u00fcrich \\"old\\"", "days": [1, 2]}'
    call = {"id": "call_r1", "name": "get_weather", "arguments": arguments}
    upstream.add_scenario("responses-tools", deltas=[], tool_calls=[call], fragment=3, tps=150)
    events, final = _stream_events(
        openai_client, model="openai/responses-tools", input="x", tools=[WEATHER]
    )
    kinds = [e.type for e in events]
    for event in events:
        EVENT_TYPES[event.type].model_validate(
            event.model_dump(exclude={"snapshot"}, warnings=False)
        )
    assert kinds.count("response.function_call_arguments.delta") > 1
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (item,) = final.output
    assert item.type == "function_call" and item.status == "completed"
    assert (item.call_id, item.name, item.arguments) == ("call_r1", "get_weather", arguments)


def test_stream_resumes_after_a_sequence_number(client: httpx.Client) -> None:
    body = {"model": "mock/echo", "input": "alpha beta gamma delta", "stream": True}
    with client.stream("POST", "/v1/responses", json=body) as response:
        whole = read_sse(response)
    events = [e["data"] for e in whole.events]
    for event in events:  # each strictly one of OpenAI's event types, named by `event:`
        EVENT_TYPES[event["type"]].model_validate(event)
    assert events[-1]["type"] == "response.completed"
    resp_id = events[0]["response"]["id"]
    params = {"stream": "true", "starting_after": "3"}
    with client.stream("GET", f"/v1/responses/{resp_id}", params=params) as response:
        again = read_sse(response, max_events=len(events) - 4)
    assert [e["data"] for e in again.events] == events[4:]


def test_stream_failure_is_response_failed(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("responses-cut", deltas=["a ", "b ", "c "], error_after=2)
    body = {"model": "openai/responses-cut", "input": "x", "stream": True}
    with client.stream("POST", "/v1/responses", json=body) as response:
        sse = read_sse(response, max_events=50)
    for event in sse.events:
        EVENT_TYPES[event["data"]["type"]].model_validate(event["data"])
    last = sse.events[-1]["data"]
    assert last["type"] == "response.failed"
    assert last["response"]["status"] == "failed" and last["response"]["error"]["message"]
    (item,) = last["response"]["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == "a b "


def test_reasoning_and_refusal_items_round_trip(
    openai_client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    chunks = [
        (0, {"reasoning_content": "think "}, None),
        (0, {"reasoning_content": "hard"}, None),
        (0, {"content": "no"}, None),
        (0, {"refusal": "I can't"}, None),
    ]
    upstream.add_scenario("responses-think", chunks=chunks, finishes={0: "stop"}, tps=150)
    events, final = _stream_events(openai_client, model="openai/responses-think", input="x")
    for event in events:
        EVENT_TYPES[event.type].model_validate(
            event.model_dump(exclude={"snapshot"}, warnings=False)
        )
    kinds = [e.type for e in events]
    assert "response.reasoning_text.delta" in kinds and "response.refusal.delta" in kinds
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "think hard"
    assert message.type == "message"
    assert [p.type for p in message.content] == ["output_text", "refusal"]
    # the reasoning goes back to the provider with the assistant turn it led to
    again = [item.model_dump(exclude_none=True) for item in final.output]
    openai_client.responses.create(
        model="openai/responses-think",
        input=[{"role": "user", "content": "x"}, *again, {"role": "user", "content": "y"}],
    )
    sent = upstream.last_request("responses-think")
    assert sent is not None
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "no"}, {"type": "refusal", "refusal": "I can't"}],
        "reasoning_content": "think hard",
    }


@pytest.fixture
def responses_llm(llm: ChatOpenAI) -> ChatOpenAI:  # noqa: F811 - test_clients' fixture
    """test_clients' ChatOpenAI (mock/tools on the stack), on the Responses API."""
    return llm.model_copy(update={"use_responses_api": True})


def test_langchain_responses_api(responses_llm: ChatOpenAI) -> None:
    echo = responses_llm.model_copy(update={"model_name": "mock/echo"})
    reply = echo.invoke("hello from langchain")
    assert reply.text == "hello from langchain"
    assert reply.response_metadata["id"].startswith("resp_")
    assert reply.usage_metadata and reply.usage_metadata["output_tokens"] == 3
    chunks = list(echo.stream("streamed words here"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert isinstance(merged, AIMessageChunk) and merged.text == "streamed words here"
    structured = responses_llm.model_copy(update={"model_name": "mock/chat"})
    person = structured.with_structured_output(Person, method="json_schema").invoke("Ada")
    assert isinstance(person, Person) and person.name == "Ada"  # parsed by responses.parse


def test_langchain_bind_tools_round_trip(responses_llm: ChatOpenAI) -> None:
    tools = responses_llm.bind_tools([GetWeather])
    reply = tools.invoke("Oslo")
    assert isinstance(reply, AIMessage)
    (call,) = reply.tool_calls
    assert call["name"] == "GetWeather" and call["args"] == {"city": "Oslo"}
    follow_up = tools.invoke(
        [HumanMessage("Oslo"), reply, ToolMessage("rain, 4C", tool_call_id=str(call["id"]))]
    )
    assert follow_up.text == "rain, 4C" and not follow_up.tool_calls
    streamed = list(tools.stream("Bergen"))
    merged = streamed[0]
    for chunk in streamed[1:]:
        merged += chunk
    assert isinstance(merged, AIMessageChunk)
    assert merged.tool_calls[0]["args"] == {"city": "Bergen"}


REFUSALS = [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [WEATHER | {"defer_loading": True}]}, "tools[0].defer_loading"),
    ({"background": True}, "background"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
     "text.format.name"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation"),
    ({"temperature": 3}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "e"}]},
     "input[0].encrypted_content"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x"}]}]},
     "input[0].content[0].image_url"),
    ({"input": [{"role": "system", "content": [{"type": "input_image", "image_url": PIXEL}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": "nowhere/x"}, "model"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), REFUSALS, ids=[p for _, p in REFUSALS])
def test_refusals_name_the_responses_field(
    client: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "mock/echo", "input": "x"} | extra
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert f"'{param}'" in error["message"] or param in error["message"]
    assert error["type"] == "invalid_request_error"


def test_get_is_tenant_scoped(stack: Stack, client: httpx.Client, other_key: str) -> None:
    created = client.post("/v1/responses", json={"model": "mock/echo", "input": "mine"}).json()
    got = client.get(f"/v1/responses/{created['id']}")
    assert got.status_code == 200
    assert got.json() | {"completed_at": None} == created | {"completed_at": None}
    headers = {"Authorization": f"Bearer {other_key}"}
    theirs = httpx.get(f"{stack.url}/v1/responses/{created['id']}", headers=headers)
    assert theirs.status_code == 404 and theirs.json()["error"]["param"] == "response_id"
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "mock/echo", "messages": [{"role": "user", "content": "x"}]},
    )
    job_id = chat.headers["x-sluice-job-id"]
    not_a_response = client.get("/v1/responses/resp_" + job_id.removeprefix("job_"))
    assert not_a_response.status_code == 404


def test_respond_async_is_queued_then_polled(client: httpx.Client) -> None:
    body = {"model": "mock/echo", "input": "later please"}
    response = client.post("/v1/responses", json=body, headers={"Prefer": "respond-async"})
    assert response.status_code in (200, 202)
    queued = response.json()
    assert queued["object"] == "response" and queued["background"] is True
    assert response.headers["location"] == f"/v1/responses/{queued['id']}"
    assert queued["status"] in ("queued", "in_progress", "completed")
    deadline = time.monotonic() + 20
    polled = queued
    while polled["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
        polled = client.get(f"/v1/responses/{queued['id']}").json()
    assert polled["status"] == "completed"
    assert polled["output"][0]["content"][0]["text"] == "later please"


def test_parallel_function_calls_become_one_assistant_turn() -> None:
    calls = [
        {"type": "function_call", "call_id": f"call_{i}", "name": "f", "arguments": "{}"}
        for i in (1, 2)
    ]
    outputs = [
        {"type": "function_call_output", "call_id": f"call_{i}", "output": "ok"} for i in (1, 2)
    ]
    body = {"model": "mock/tools", "instructions": "sys"}
    translation = translate(body | {"input": [{"role": "user", "content": "u"}, *calls, *outputs]})
    tool_calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for i in (1, 2)
    ]
    assert translation.body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "tool_calls": tool_calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
    ]
    # a chat check's parameter, named as the Responses field it came from
    assert translation.responses_param("messages[3].tool_call_id") == "input[3].call_id"
    assert translation.responses_param("messages[2].tool_calls[1].id") == "input[2].call_id"
    assert translation.responses_param("messages[1].content[0].image_url.url") == (
        "input[0].content[0].image_url"
    )
    assert translation.origins == ["instructions", "input[0]", "input[1]", "input[3]", "input[4]"]


def test_cancel_keeps_what_was_said(openai_client: openai.OpenAI) -> None:
    with openai_client.responses.create(
        model="mock/slow?length=400&tps=40", input="x", stream=True
    ) as stream:
        events = iter(stream)
        created = next(events)
        assert created.type == "response.created"
        next(e for e in events if e.type == "response.output_text.delta")
        cancelled = openai_client.responses.cancel(created.response.id)
    assert cancelled.status == "cancelled" and cancelled.error is not None
    (message,) = cancelled.output
    assert message.type == "message" and message.status == "incomplete"
    assert message.content[0].text  # type: ignore[union-attr]


def test_a_failure_before_any_output_is_an_http_error(openai_client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            openai_client.responses.create(model="mock/error", input="x", stream=stream)
        assert caught.value.status_code == 400 and "simulated" in caught.value.message


def test_input_items_list_what_was_sent(
    openai_client: openai.OpenAI, stack: Stack, other_key: str
) -> None:
    """GET /v1/responses/{id}/input_items, through the SDK: every item as sent, in order."""
    first = openai_client.responses.create(model="mock/tools", input="Paris", tools=[WEATHER])
    (call,) = first.output
    sent: Any = [
        {"role": "user", "content": [
            {"type": "input_text", "text": "Paris"},
            {"type": "input_image", "image_url": PIXEL, "detail": "low"},
        ]},
        *first.output,
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "thanks"},
    ]  # fmt: skip
    response = openai_client.responses.create(
        model="mock/echo", input=sent, instructions="be brief", tools=[WEATHER]
    )
    asc = openai_client.responses.input_items.list(response.id, order="asc")
    kinds = [(item.type, getattr(item, "role", None)) for item in asc.data]
    assert kinds == [
        ("message", "user"),
        ("function_call", None),
        ("function_call_output", None),
        ("message", "assistant"),
        ("message", "user"),
    ]  # the instructions are the response's, not an item
    user, fc, output, said, last = asc.data
    assert [part.type for part in user.content] == ["input_text", "input_image"]
    assert user.content[1].image_url == PIXEL and user.content[1].detail == "low"
    assert (fc.call_id, fc.name, fc.arguments) == (call.call_id, call.name, call.arguments)
    assert output.call_id == call.call_id and output.output == "sunny, 21C"
    assert said.content[0].type == "output_text" and said.content[0].text == "It is sunny."
    assert last.content[0].text == "thanks" and asc.has_more is False
    assert len({item.id for item in asc.data}) == 5
    newest = openai_client.responses.input_items.list(response.id, limit=2)
    assert [item.id for item in newest.data] == [last.id, said.id] and newest.has_more
    rest = openai_client.responses.input_items.list(response.id, limit=2, after=said.id)
    assert [item.id for item in rest.data] == [output.id, fc.id] and rest.has_more
    everything = list(openai_client.responses.input_items.list(response.id, limit=2))
    assert [item.id for item in everything] == [item.id for item in reversed(asc.data)]
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.responses.input_items.list(response.id, after="msg_nope")
    assert bad.value.body["param"] == "after"  # type: ignore[index]
    headers = {"Authorization": f"Bearer {other_key}"}
    theirs = httpx.get(f"{stack.url}/v1/responses/{response.id}/input_items", headers=headers)
    assert theirs.status_code == 404


def test_previous_response_id_carries_the_conversation_in(
    openai_client: openai.OpenAI, upstream: FakeUpstream, client: httpx.Client
) -> None:
    """The previous response's input and output come first; its instructions do not."""
    upstream.add_scenario("responses-chain", deltas=["Hello ", "Ada."])
    first = openai_client.responses.create(
        model="openai/responses-chain", instructions="first rules", input="I am Ada."
    )
    second = openai_client.responses.create(
        model="openai/responses-chain",
        instructions="second rules",
        previous_response_id=first.id,
        input="Who am I?",
    )
    sent = upstream.last_request("responses-chain")
    assert sent is not None
    assert sent["messages"] == [
        {"role": "system", "content": "second rules"},
        {"role": "user", "content": "I am Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "Who am I?"},
    ]
    assert second.previous_response_id == first.id and second.instructions == "second rules"
    assert client.get(f"/v1/responses/{second.id}").json()["previous_response_id"] == first.id
    third = openai_client.responses.create(
        model="openai/responses-chain", previous_response_id=second.id, input="Again?"
    )  # a chain: the second's messages already hold the first's
    sent = upstream.last_request("responses-chain")
    assert sent is not None and [m["content"] for m in sent["messages"]] == [
        "I am Ada.", "Hello Ada.", "Who am I?", "Hello Ada.", "Again?"
    ]  # fmt: skip
    items = openai_client.responses.input_items.list(third.id, order="asc").data
    assert [item.type for item in items] == ["message"] * 5
    with openai_client.responses.stream(
        model="openai/responses-chain", previous_response_id=third.id, input="Last."
    ) as stream:
        events = list(stream)
    assert events[0].type == "response.created"
    assert events[0].response.previous_response_id == third.id
    assert stream.get_final_response().previous_response_id == third.id


def test_previous_response_id_continues_a_function_call(openai_client: openai.OpenAI) -> None:
    """The SDK's stateful tool loop: only the function_call_output is sent back."""
    first = openai_client.responses.create(model="mock/tools", input="Paris", tools=[WEATHER])
    (call,) = first.output
    assert call.type == "function_call"
    second = openai_client.responses.create(
        model="mock/tools",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],
    )
    assert second.output_text == "sunny"


def test_previous_response_id_must_name_an_ended_response_of_the_caller(
    stack: Stack, client: httpx.Client, other_key: str, upstream: FakeUpstream
) -> None:
    mine = client.post("/v1/responses", json={"model": "mock/echo", "input": "mine"}).json()
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "mock/echo", "messages": [{"role": "user", "content": "x"}]},
    )
    not_a_response = "resp_" + chat.headers["x-sluice-job-id"].removeprefix("job_")
    theirs = {"Authorization": f"Bearer {other_key}"}
    for previous, headers in (("resp_nope", {}), (not_a_response, {}), (mine["id"], theirs)):
        body = {"model": "mock/echo", "input": "next", "previous_response_id": previous}
        answer = httpx.post(
            f"{stack.url}/v1/responses", json=body, headers=headers or dict(client.headers)
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "previous_response_id"
        assert error["code"] == "previous_response_not_found"
    bad_type = {"model": "mock/echo", "input": "x", "previous_response_id": 7}
    assert client.post("/v1/responses", json=bad_type).json()["error"]["param"] == (
        "previous_response_id"
    )
    upstream.add_scenario("responses-slow", deltas=list("abcdef"), ttft_ms=50, tps=2)
    with client.stream(
        "POST",
        "/v1/responses",
        json={"model": "openai/responses-slow", "input": "slow", "stream": True},
    ) as streaming:
        created = json.loads(
            next(line for line in streaming.iter_lines() if line.startswith("data:"))[5:]
        )
        running = created["response"]["id"]
        body = {"model": "mock/echo", "input": "next", "previous_response_id": running}
        answer = client.post("/v1/responses", json=body)
        assert answer.status_code == 400 and "still" in answer.json()["error"]["message"]
        assert answer.json()["error"]["param"] == "previous_response_id"


def test_langchain_use_previous_response_id(
    responses_llm: ChatOpenAI, upstream: FakeUpstream, client: httpx.Client
) -> None:
    """ChatOpenAI(use_previous_response_id=True) sends only the turns after its last reply."""
    upstream.add_scenario("responses-lc-chain", deltas=["Noted."])
    chained = responses_llm.model_copy(
        update={"model_name": "openai/responses-lc-chain", "use_previous_response_id": True}
    )
    first = chained.invoke([HumanMessage("My name is Ada.")])
    second = chained.invoke([HumanMessage("My name is Ada."), first, HumanMessage("And?")])
    assert second.text == "Noted."
    sent = upstream.last_request("responses-lc-chain")
    assert sent is not None
    assert sent["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And?"},
    ]
    shown = client.get(f"/v1/responses/{second.response_metadata['id']}").json()
    assert shown["previous_response_id"] == first.response_metadata["id"]  # sent by LangChain


def test_item_references_name_items_of_earlier_responses(
    openai_client: openai.OpenAI, stack: Stack, other_key: str
) -> None:
    """`item_reference` input items: an earlier response's input and output items, by id."""
    first = openai_client.responses.create(model="mock/tools", input="Paris", tools=[WEATHER])
    (call,) = first.output
    (asked,) = openai_client.responses.input_items.list(first.id).data
    second = openai_client.responses.create(
        model="mock/tools",
        input=[
            {"type": "item_reference", "id": asked.id},
            {"type": "item_reference", "id": call.id},
            {"type": "function_call_output", "call_id": call.call_id, "output": "cloudy"},
        ],
        tools=[WEATHER],
    )
    assert second.output_text == "cloudy"
    kinds = [item.type for item in openai_client.responses.input_items.list(second.id).data]
    assert kinds == ["function_call_output", "function_call", "message"]
    for ident in ("msg_nope", "fc_X_0", call.id + "9"):
        with pytest.raises(openai.BadRequestError) as bad:
            openai_client.responses.create(
                model="mock/tools", input=[{"type": "item_reference", "id": ident}]
            )
        assert bad.value.body["param"] == "input[0].id"  # type: ignore[index]
    theirs = httpx.post(
        f"{stack.url}/v1/responses",
        json={"model": "mock/echo", "input": [{"type": "item_reference", "id": call.id}]},
        headers={"Authorization": f"Bearer {other_key}"},
    )
    assert theirs.status_code == 400 and theirs.json()["error"]["param"] == "input[0].id"


@pytest.mark.parametrize("how", ["previous_response_id", "item_reference"])
def test_a_response_whose_row_trails_its_log_can_be_continued_at_once(
    openai_client: openai.OpenAI, upstream: FakeUpstream, app: Flask, how: str
) -> None:
    """`stream: false` answers from the log's end, which the worker writes before the row:
    a client continuing at once must not get a 400 "still running" for that moment."""
    from app.extensions import db
    from app.models import Job
    from app.services.responses_objects import job_id_of

    upstream.add_scenario("responses-trail", deltas=["Hello ", "Ada."])
    first = openai_client.responses.create(model="openai/responses-trail", input="I am Ada.")
    job_id = job_id_of(first.id)
    with app.app_context():  # as in the moment between the worker's two terminal writes
        db.session.execute(update(Job).where(Job.id == job_id).values(status="running"))
        db.session.commit()

    def row_lands() -> None:
        time.sleep(0.3)
        with app.app_context():
            db.session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
            db.session.commit()

    landing = threading.Thread(target=row_lands)
    landing.start()
    try:
        if how == "previous_response_id":
            openai_client.responses.create(
                model="openai/responses-trail", previous_response_id=first.id, input="Who?"
            )
        else:
            said = {"type": "item_reference", "id": first.output[0].id}
            openai_client.responses.create(
                model="openai/responses-trail",
                input=[said, {"role": "user", "content": "Who?"}],  # type: ignore[list-item]
            )
    finally:
        landing.join()
    sent = upstream.last_request("responses-trail")
    assert sent is not None and "Hello Ada." in json.dumps(sent["messages"])  # carried in


def test_background_jobs_hold_no_database_connection_while_they_run(
    stack: Stack, client: httpx.Client, app_ctx: Flask
) -> None:
    """Six background jobs on a worker with two database connections all run at once: a
    job holds a connection only while it reads or writes its row, never through its call."""
    two_connections = {
        "SLUICE_DB_POOL_SIZE": "1",
        "SLUICE_DB_MAX_OVERFLOW": "1",
        "SLUICE_DB_POOL_TIMEOUT": "2",
    }
    with tuned_batch_worker(stack, two_connections, "batch-two-connections"):
        body = {"model": "mock/echo?ttft_ms=4000", "input": "later"}
        ids = []
        for _ in range(6):
            queued = client.post("/v1/responses", json=body, headers={"Prefer": "respond-async"})
            assert queued.status_code in (200, 202), queued.text
            ids.append(queued.json()["id"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            polled = [client.get(f"/v1/responses/{rid}").json()["status"] for rid in ids]
            if all(status not in ("queued", "in_progress") for status in polled):
                break
            time.sleep(0.2)
        assert polled == ["completed"] * 6
    job_ids = [job_id_of(rid) for rid in ids]
    db.session.remove()
    rows = db.session.execute(
        select(Job.started_at, Job.finished_at).where(Job.id.in_(job_ids))
    ).all()
    assert len(rows) == 6
    # every call was in flight at once: the last to start started before the first ended
    assert max(row.started_at for row in rows) < min(row.finished_at for row in rows)
