"""The chat request without the stack: validation, the stored record, provider refusals."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import APIError
from app.providers import ChatRequest, build_registry
from app.services.chat_request import parse_chat_request

REGISTRY = build_registry({"PROVIDERS": {"local": {"base_url": "http://127.0.0.1:9/v1"}}})


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
