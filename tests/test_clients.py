"""Real clients nobody here wrote, against the live stack: LangChain's ChatOpenAI, openai's parse().

Tool calls, structured output, images, n and logprobs through the stream channel's delta
log, for `stream: true` and the `stream: false` collector alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field, SecretStr

from tests.fake_upstream import FakeUpstream
from tests.stack import Stack

PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="The city, e.g. Paris")
    days: int = Field(description="How many days of forecast")


class Person(BaseModel):
    name: str
    age: int
    likes_tea: bool


@pytest.fixture
def llm(stack: Stack, api_key: str) -> Iterator[ChatOpenAI]:
    """LangChain's OpenAI chat model pointed at Sluice."""
    yield ChatOpenAI(
        model="mock/tools",
        base_url=stack.url + "/v1",
        api_key=SecretStr(api_key),
        max_retries=0,
        timeout=30,
    )


def test_langchain_bind_tools_invoke(llm: ChatOpenAI) -> None:
    reply = llm.bind_tools([GetWeather]).invoke("weather in Paris")
    assert isinstance(reply, AIMessage)
    (call,) = reply.tool_calls
    assert call["name"] == "GetWeather"
    assert call["args"] == {"city": "weather in Paris", "days": 3}
    assert call["id"] and call["id"].startswith("call_")
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    follow_up = llm.bind_tools([GetWeather]).invoke(
        [
            HumanMessage("weather in Paris"),
            reply,
            ToolMessage("sunny, 21C", tool_call_id=call["id"]),
        ]
    )
    assert follow_up.content == "sunny, 21C" and not follow_up.tool_calls


def test_langchain_bind_tools_stream(llm: ChatOpenAI) -> None:
    chunks = list(llm.bind_tools([GetWeather]).stream("weather in Oslo"))
    assert chunks  # the relay may coalesce argument fragments: their count is not fixed
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert isinstance(merged, AIMessageChunk)
    (call,) = merged.tool_calls
    assert call["name"] == "GetWeather"
    assert call["args"] == {"city": "weather in Oslo", "days": 3}


def test_langchain_structured_output_json_schema(llm: ChatOpenAI) -> None:
    structured = llm.with_structured_output(Person, method="json_schema")
    person = structured.invoke("Ada Lovelace")
    assert person == Person(name="Ada Lovelace", age=2, likes_tea=True)


def test_langchain_image_message(llm: ChatOpenAI) -> None:
    echo = llm.model_copy(update={"model_name": "mock/echo"})
    message = HumanMessage(
        content=[
            {"type": "text", "text": "what is in this picture?"},
            {"type": "image_url", "image_url": {"url": PIXEL}},
        ]
    )
    assert echo.invoke([message]).content == "what is in this picture?"


def test_openai_sdk_parse_with_pydantic(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.parse(
        model="mock/chat",
        messages=[{"role": "user", "content": "Grace Hopper"}],
        response_format=Person,
    )
    parsed = completion.choices[0].message.parsed
    assert parsed == Person(name="Grace Hopper", age=2, likes_tea=True)


def test_openai_sdk_parse_tool_arguments(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.parse(
        model="mock/tools",
        messages=[{"role": "user", "content": "Rome"}],
        tools=[openai.pydantic_function_tool(GetWeather)],
    )
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.function.parsed_arguments == GetWeather(city="Rome", days=1)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_upstream_tool_calls_arrive_byte_identical(
    openai_client: openai.OpenAI, upstream: FakeUpstream, kind: str
) -> None:
    # Anthropic sends a non-streamed tool input as JSON, re-encoded here: canonical spacing
    calls = [
        {"id": "call_x1", "name": "get_weather", "arguments": '{"city": "Zürich", "n": [1, 2]}'},
        {"id": "call_x2", "name": "get_time", "arguments": '{"tz": "Europe/Zurich"}'},
    ]
    upstream.add_scenario(f"client-tools-{kind}", deltas=[], tool_calls=calls, fragment=2)
    tools = [
        {"type": "function", "function": {"name": c["name"], "parameters": {"type": "object"}}}
        for c in calls
    ]
    request = {
        "model": f"{kind}/client-tools-{kind}",
        "messages": [{"role": "user", "content": "go"}],
        "tools": tools,
    }
    gathered: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in openai_client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                slot = gathered.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += call.id or ""
                slot["name"] += (call.function and call.function.name) or ""
                slot["arguments"] += (call.function and call.function.arguments) or ""
    assert [gathered[i] for i in sorted(gathered)] == calls and finish == "tool_calls"
    message = openai_client.chat.completions.create(**request).choices[0].message
    assert [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ] == calls
    assert json.loads(calls[0]["arguments"])["city"] == "Zürich"


def test_n_choices_and_logprobs_through_the_stream_channel(openai_client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "two answers"}]
    completion = openai_client.chat.completions.create(
        model="mock/chat?length=4", messages=messages, n=2, logprobs=True, top_logprobs=2
    )
    first, second = completion.choices
    assert (first.index, second.index) == (0, 1)
    assert first.message.content and second.message.content
    assert first.message.content != second.message.content
    assert first.logprobs is not None and first.logprobs.content is not None
    assert "".join(t.token for t in first.logprobs.content) == first.message.content
    assert all(len(t.top_logprobs) == 2 for t in first.logprobs.content)
    texts: dict[int, str] = {}
    for chunk in openai_client.chat.completions.create(
        model="mock/chat?length=4", messages=messages, n=2, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {0: first.message.content, 1: second.message.content}
