"""The chat request without the stack: validation, the stored record, provider refusals."""

from __future__ import annotations

import time
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from app import validation
from app.errors import APIError
from app.providers import ChatRequest, build_registry
from app.services.chat_request import Message, parse_chat_request
from app.services.job_request import JobRequest
from app.validation import field_path, validation_error

REGISTRY = build_registry({"PROVIDERS": {"local": {"base_url": "http://127.0.0.1:9/v1"}}})
MESSAGE = {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"}


def parse(**body: Any) -> ChatRequest:
    body.setdefault("model", "mock/echo")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_chat_request(body, REGISTRY)


def test_the_record_round_trips() -> None:
    request = parse(
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=5,
        max_completion_tokens=7,
        stop="END",
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="auto",
        seed=3,
        metadata={"team": "a"},
    )
    assert request.stop == ["END"] and request.options == {"seed": 3}
    assert request.include_usage and request.limit == 7  # max_completion_tokens wins
    record = request.to_record()
    assert record["stream_options"] == {"include_usage": True} and record["seed"] == 3
    assert ChatRequest.from_record(record) == request
    assert ChatRequest.from_record({**record, "stop": "END"}) == request  # a raw body too


def test_max_tokens_precedence_is_one_rule() -> None:
    both = ChatRequest.from_record(
        {"model": "m/x", "messages": [], "max_tokens": 9, "max_completion_tokens": 4}
    )
    assert both.limit == 4 and both.max_tokens == 9
    assert ChatRequest.from_record({"model": "m/x", "messages": [], "max_tokens": 9}).limit == 9


def test_bind_gives_the_provider_its_own_model_name() -> None:
    provider, bound = REGISTRY.bind(parse(model="local/llama-3/q4"))
    assert provider.name == "local" and bound.model == "llama-3/q4"


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        ("mock/echo", {"vendor_knob": 1}, "vendor_knob"),
        ("anthropic/c", {"seed": 1}, "seed"),
        ("anthropic/c", {"n": 3}, "n"),
        ("anthropic/c", {"reasoning_effort": "extreme"}, "reasoning_effort"),
        ("anthropic/c", {"reasoning_effort": "high", "max_tokens": 100}, "max_tokens"),
        ("anthropic/c", {"service_tier": "flex"}, "service_tier"),
        ("anthropic/c", {"temperature": 1.5}, "temperature"),
        (
            "anthropic/c",
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
    ],
)
def test_provider_refusals_name_parameter_and_provider(
    model: str, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(APIError) as info:
        parse(model=model, **body)
    assert info.value.status == 400 and info.value.param == param
    assert f"provider '{model.partition('/')[0]}'" in info.value.message
    assert info.value.code == "unsupported_parameter"


def test_openai_compatible_providers_take_everything() -> None:
    request = parse(model="local/x", vendor_knob={"a": 1}, seed=2, n=3, logprobs=True)
    assert request.options == {"vendor_knob": {"a": 1}, "seed": 2, "logprobs": True}
    assert request.n == 3


def refusal(**body: Any) -> APIError:
    with pytest.raises(APIError) as info:
        parse(**body)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [  # the types of ChatCompletionRequest, enforced past the hand-written checks
        ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name", None),
        ({"messages": [{"role": "user", "content": "hi", "tool_call_id": 1}]}, None, None),
        ({"modalities": ["text", 7]}, "modalities[1]", "invalid_type"),
        ({"functions": ["f"]}, "functions[0]", "invalid_type"),
    ],
)
def test_the_model_types_are_enforced(body: dict[str, Any], param: str | None, code: str) -> None:
    error = refusal(**body)
    assert error.param == (param or "messages[0].tool_call_id")
    assert error.code == (code or "invalid_type") and error.param in error.message


@pytest.mark.parametrize(
    ("body", "param", "code", "message"),
    [  # the hand-written checks' answers, unchanged under the model
        ({"model": None}, "model", "missing_required", "'model' is required: a string like"),
        ({"messages": []}, "messages", "invalid_value", "'messages' must contain at least one"),
        ({"messages": [{"role": "bot"}]}, "messages[0].role", "invalid_value", "must be one of"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required", "required"),
        ({"temperature": "hot"}, "temperature", "invalid_type", "'temperature' must be a number"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value", "'max_tokens' must be at least 1"),
        ({"stream": "yes"}, "stream", "invalid_type", "'stream' must be a boolean."),
        ({"stream_options": {}}, "stream_options", "invalid_value", "only allowed when"),
        ({"metadata": {"k": 1}}, "metadata", "invalid_value", "Invalid 'metadata'"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value", "requires 'logprobs'"),
        ({"tool_choice": "auto"}, "tool_choice", "invalid_value", "only allowed when 'tools'"),
    ],
)
def test_the_checks_answer_as_before(
    body: dict[str, Any], param: str, code: str, message: str
) -> None:
    error = refusal(**body)
    assert (error.param, error.code) == (param, code) and message in error.message


def test_a_body_that_is_not_an_object() -> None:
    with pytest.raises(APIError) as info:
        parse_chat_request(["model"], REGISTRY)
    assert info.value.code == "invalid_json" and info.value.param is None


def test_values_are_carried_as_sent() -> None:
    request = parse(model="local/x", temperature=1, top_p=1, messages=[MESSAGE], vendor_knob=None)
    assert type(request.temperature) is int and type(request.top_p) is int  # not 1.0
    assert request.messages == [MESSAGE] and "vendor_knob" not in request.options  # null: unset


def test_pydantic_errors_name_the_field_path() -> None:
    assert field_path(("messages", 0, "content", 1, "text")) == "messages[0].content[1].text"
    error = validation_error(_validation_error())
    assert error.param == "messages[0].role" and error.code == "missing_required_parameter"


def _validation_error() -> ValidationError:
    class Body(BaseModel):
        messages: list[Message]

    try:
        Body.model_validate({"messages": [{"content": "x"}]})
    except ValidationError as exc:
        return exc
    raise AssertionError("valid")


def test_a_chat_body_parses_well_under_100_microseconds() -> None:
    body = {
        "model": "local/x",
        "messages": [{"role": "user", "content": "some text " * 20}] * 10,
        "temperature": 0.7,
        "max_tokens": 256,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
    }
    started = time.process_time()
    for _ in range(200):
        parse_chat_request(body, REGISTRY)
    per_parse = (time.process_time() - started) / 200
    assert per_parse < 500e-6, per_parse  # ~40 us on a quiet box; a loose bound under load


@pytest.mark.parametrize(
    ("options", "param", "code"),
    [  # OpenAI's two keys, each checked; any other named (it was carried silently)
        ({"bogus": True}, "stream_options.bogus", "unknown_parameter"),
        ({"include_usage": True, "x": 1}, "stream_options.x", "unknown_parameter"),
        ({"include_usage": "yes"}, "stream_options.include_usage", "invalid_type"),
        ({"include_obfuscation": 1}, "stream_options.include_obfuscation", "invalid_type"),
        (
            {"include_obfuscation": True},
            "stream_options.include_obfuscation",
            "unsupported_parameter",
        ),
    ],
)
def test_stream_options_keys_are_checked(options: dict[str, Any], param: str, code: str) -> None:
    error = refusal(stream=True, stream_options=options)
    assert (error.param, error.code) == (param, code) and param in error.message


def test_stream_options_without_obfuscation_is_carried() -> None:
    options = {"include_usage": True, "include_obfuscation": False}
    request = parse(stream=True, stream_options=options)
    assert request.include_usage and request.to_record()["stream_options"] == {
        "include_usage": True
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [  # each tool / function field named by its own path, not by 'tools'
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": 3}]}, "tools[1]"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": 1}}]},
            "tools[0].function.description",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": "y"}}]},
            "tools[0].function.strict",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "no way"}},
            },
            "tool_choice.function.name",
        ),
        ({"functions": [{"name": "bad name"}]}, "functions[0].name"),
        ({"functions": [{"name": "f", "parameters": 1}]}, "functions[0].parameters"),
        ({"functions": [{"name": "f"}], "function_call": {"name": ""}}, "function_call.name"),
    ],
)
def test_tool_fields_are_named_by_their_path(body: dict[str, Any], param: str) -> None:
    error = refusal(**body)
    assert error.param == param and param in error.message


def _job(**body: Any) -> JobRequest:
    body.setdefault("model", "mock/echo")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return validation.parse(JobRequest, body, {"registry": REGISTRY})


def test_a_stream_mode_job_takes_stream_options_without_stream() -> None:
    job = _job(mode="stream", stream_options={"include_usage": True})
    assert job.request.include_usage and job.record()["stream"] is True
    for refused in ({"mode": "batch"}, {"mode": "batch", "stream": True}, {"mode": "auto"}):
        with pytest.raises(APIError) as info:
            _job(stream_options={"include_usage": True}, **refused)
        assert info.value.param == "stream_options", refused
    with pytest.raises(APIError) as info:
        _job(mode="stream", stream_options={"bogus": True})
    assert info.value.param == "stream_options.bogus"
