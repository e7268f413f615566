"""What a user trying Sluice with the real clients ran into: each fails without its fix.

The official openai SDK and LangChain's ChatOpenAI against the live stack (real web,
workers, Redis, the fake upstream for `openai/` and `anthropic/` models).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, SecretStr

from tests.fake_upstream import FakeUpstream
from tests.stack import Stack


class Person(BaseModel):
    name: str
    age: int


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": Person.model_json_schema()},
}

# ------------------------------------------------------------------------------ files


def test_files_create_refuses_a_form_field_it_does_not_honour(
    openai_client: openai.OpenAI, client: httpx.Client
) -> None:
    """The SDK's `expires_after` (sent as expires_after[anchor] / [seconds]) was dropped."""
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.files.create(
            file=("in.jsonl", b"{}\n"),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "expires_after", error
    assert "expires_after" in error["message"]
    other = client.post(
        "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch", "tag": "x"}
    )
    assert other.status_code == 400 and other.json()["error"]["param"] == "tag", other.text
    assert not [f for f in openai_client.files.list() if f.filename in ("in.jsonl", "x.jsonl")]


# ------------------------------------------------------------------------------ document batches


def _named(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    details: list[dict[str, Any]] = response.json()["error"]["details"]
    return details


def test_a_document_key_sluice_does_not_know_is_refused_naming_it(client: httpx.Client) -> None:
    """`{"id", "text", "title"}`: the title was dropped without a word."""
    body = {"model": "mock/echo", "instructions": "Summarize."}
    documents = [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta", "title": "B"}]
    (problem,) = _named(client.post("/v1/document-batches", json={**body, "documents": documents}))
    assert problem["document_id"] == "b" and problem["index"] == 1
    assert "'title'" in problem["message"] and "metadata" in problem["message"]
    lines = b'{"id": "a", "text": "alpha"}\n{"id": "b", "text": "beta", "source": "x"}\n'
    as_jsonl = client.post(
        "/v1/document-batches",
        params=body,
        content=lines,
        headers={"Content-Type": "application/jsonl"},
    )
    (problem,) = _named(as_jsonl)
    assert problem["line"] == 2 and "'source'" in problem["message"]
    as_file = client.post("/v1/document-batches", data=body, files={"file": ("docs.jsonl", lines)})
    (problem,) = _named(as_file)
    assert problem["file"] == "docs.jsonl" and problem["line"] == 2
    assert "'source'" in problem["message"]


# ------------------------------------------------------------------------------ models


def test_the_model_the_dev_banner_names_is_listed_and_retrievable(
    openai_client: openai.OpenAI,
) -> None:
    """`sluice dev` and the README say "model mock/demo works without keys": it streamed,
    but /v1/models did not list it and `models.retrieve("mock/demo")` answered 404."""
    assert "mock/demo" in [m.id for m in openai_client.models.list()]
    model = openai_client.models.retrieve("mock/demo")
    assert (model.id, model.owned_by) == ("mock/demo", "mock")
    reply = openai_client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content


# ------------------------------------------------------------------------------ anthropic


TOOL_LOOP = [
    {"role": "user", "content": "weather in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": SCHEMA_FORMAT}, "reasoning_effort"),
        ({"response_format": {"type": "json_object"}}, "reasoning_effort"),
        ({"tools": TOOLS, "tool_choice": "required"}, "reasoning_effort"),
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
            "reasoning_effort",
        ),
        ({"temperature": 0.2}, "temperature"),
        ({"top_p": 0.5}, "top_p"),
        ({"tools": TOOLS, "messages": TOOL_LOOP}, "reasoning_effort"),
    ],
)
def test_anthropic_thinking_refuses_what_anthropic_rejects_with_it(
    openai_client: openai.OpenAI, upstream: FakeUpstream, extra: dict[str, Any], param: str
) -> None:
    """Anthropic answers 400 to extended thinking with a forced tool, a temperature other
    than 1, a top_p under 0.95, or a tool loop whose thinking block it cannot be given
    back: Sluice refuses those itself, naming the parameter, instead of a 502 from upstream
    (which the SDK retried twice)."""
    name = "tryout-thinking-" + hashlib.sha1(json.dumps(extra).encode()).hexdigest()[:8]
    body: dict[str, Any] = {
        "model": f"anthropic/{name}",
        "messages": [{"role": "user", "content": "Ada, 36"}],
        "reasoning_effort": "low",
        **extra,
    }
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(**body)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert error["code"] == "unsupported_parameter" and "anthropic" in error["message"]
    assert upstream.requests(name) == 0
    # the same request without reasoning_effort goes through
    del body["reasoning_effort"]
    assert openai_client.chat.completions.create(**body).choices


def test_anthropic_thinking_alone_and_with_auto_tools_still_goes_through(
    openai_client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    name = "tryout-thinking-ok"
    reply = openai_client.chat.completions.create(
        model=f"anthropic/{name}",
        messages=[{"role": "user", "content": "hi"}],
        reasoning_effort="low",
        tools=TOOLS,
        temperature=1,
        top_p=0.95,
    )
    assert reply.choices[0].message.content
    sent = upstream.last_request(name)
    assert sent is not None and sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert "tool_choice" not in sent and sent["temperature"] == 1


def test_langchain_structured_output_on_anthropic_with_reasoning_is_a_named_400(
    stack: Stack, api_key: str
) -> None:
    llm = ChatOpenAI(
        model="anthropic/tryout-lc-thinking",
        base_url=stack.url + "/v1",
        api_key=SecretStr(api_key),
        reasoning_effort="low",
        max_retries=0,
        timeout=30,
    )
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        llm.with_structured_output(Person, method="json_schema").invoke("Ada, 36")


def test_anthropic_tool_choice_none_without_tools_is_not_sent(
    openai_client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    """OpenAI takes `tool_choice: "none"` without tools; Anthropic wants tools beside any
    tool_choice. Without tools there is nothing to call: the choice is honoured by omission."""
    name = "tryout-none-no-tools"
    reply = openai_client.chat.completions.create(
        model=f"anthropic/{name}", messages=[{"role": "user", "content": "hi"}], tool_choice="none"
    )
    assert reply.choices[0].message.content
    sent = upstream.last_request(name)
    assert sent is not None and "tool_choice" not in sent and "tools" not in sent
    with_tools = f"{name}-tools"
    openai_client.chat.completions.create(
        model=f"anthropic/{with_tools}",
        messages=[{"role": "user", "content": "hi"}],
        tools=TOOLS,
        tool_choice="none",
    )
    sent = upstream.last_request(with_tools)
    assert sent is not None and sent["tool_choice"] == {"type": "none"}
    assert json.dumps(sent["tools"])
