"""Providers against the fake upstream over real HTTP, plus the mock and the registry."""

from __future__ import annotations

import email.utils
import json
import pickle
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from app.providers import (
    ChatRequest,
    Completion,
    Provider,
    ProviderError,
    ProviderRegistry,
    UnknownModel,
    Unsupported,
    Usage,
    build_registry,
    delta_text,
    estimate_tokens,
)
from app.providers.base import parse_retry_after
from app.providers.mock import MockProvider, MockSettings
from tests.fake_upstream import FakeUpstream

SDK_PROVIDERS = ["openai", "anthropic"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def registry(upstream: FakeUpstream) -> ProviderRegistry:
    return build_registry(
        {
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": upstream.openai_base_url,
            "ANTHROPIC_API_KEY": "ak-test",
            "ANTHROPIC_BASE_URL": upstream.anthropic_base_url,
            "PROVIDER_TIMEOUT": 10.0,
            "MOCK_TTFT_MS": 0,
            "MOCK_TOKENS_PER_SECOND": 0,
        }
    )


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def call(registry: ProviderRegistry, model: str, **kwargs: Any) -> tuple[Provider, ChatRequest]:
    provider, upstream_model = registry.resolve(model)
    messages = kwargs.pop("messages", user("hello there"))
    return provider, ChatRequest(upstream_model, messages, **kwargs)


def texts(choices: Iterable[dict[str, Any]]) -> list[str]:
    """The non-empty content fragments of a stream of choice deltas."""
    return [text for choice in choices if (text := delta_text(choice))]


def texts_of(choices: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The content fragments of a stream of choice deltas, lazily (to close mid-stream)."""
    for choice in choices:
        if text := delta_text(choice):
            yield text


def stream_error(provider: Provider, request: ChatRequest) -> tuple[list[str], ProviderError]:
    """Stream until the ProviderError; return the text deltas seen before it."""
    seen: list[str] = []
    with pytest.raises(ProviderError) as info:
        stream = provider.stream(request)
        for choice in stream:
            seen.extend(texts([choice]))
    return seen, info.value


# -- happy paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_stream_deltas_usage_and_finish(registry: ProviderRegistry, kind: str) -> None:
    provider, request = call(registry, f"{kind}/plain?tokens=6")
    stream = provider.stream(request)
    deltas = texts(stream)
    assert len(deltas) == 6
    assert deltas[0][0] != " " and all(d.startswith(" ") for d in deltas[1:])
    assert stream.finish_reason == "stop"
    assert stream.usage is not None
    assert stream.usage.completion_tokens == 6 and stream.usage.prompt_tokens > 0


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_complete_matches_stream(registry: ProviderRegistry, kind: str) -> None:
    provider, request = call(registry, f"{kind}/same?tokens=9")
    completion = provider.complete(request)
    assert completion.text == "".join(texts(provider.stream(request)))
    assert completion.finish_reason == "stop"
    assert completion.usage.completion_tokens == 9
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 9


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_max_tokens_gives_length(registry: ProviderRegistry, kind: str) -> None:
    provider, request = call(registry, f"{kind}/capped?tokens=30", max_tokens=4)
    stream = provider.stream(request)
    assert len(texts(stream)) == 4
    assert stream.finish_reason == "length"
    assert provider.complete(request).finish_reason == "length"


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_echo_keeps_multibyte_and_newlines(registry: ProviderRegistry, kind: str) -> None:
    text = "héllo 世界 🚀\n\nsecond line\ttab  double  spaces\n" + "é" * 3000
    provider, request = call(registry, f"{kind}/echo", messages=user(text))
    assert "".join(texts(provider.stream(request))) == text
    assert provider.complete(request).text == text


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_scripted_deltas_with_empty_and_long(
    upstream: FakeUpstream, registry: ProviderRegistry, kind: str
) -> None:
    long = "ü" * 20000
    deltas = ["", "a", "", long, "\n", "z"]
    upstream.add_scenario(f"scripted-{kind}", deltas=deltas)
    provider, request = call(registry, f"{kind}/scripted-{kind}")
    assert "".join(texts(provider.stream(request))) == "".join(deltas)
    assert upstream.requests(f"scripted-{kind}") == 1


def test_anthropic_request_conversion(upstream: FakeUpstream, registry: ProviderRegistry) -> None:
    messages = [
        {"role": "system", "content": "rule one"},
        {"role": "system", "content": [{"type": "text", "text": "rule two"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "part a "}, {"type": "text", "text": "b"}],
        },
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    provider, request = call(
        registry,
        "anthropic/convert",
        messages=messages,
        stop=["END"],
        temperature=0.5,
        top_p=0.9,
        user="u-1",
    )
    provider.complete(request)
    body = upstream.last_request("convert")
    assert body is not None
    assert body["system"] == "rule one\n\nrule two"
    assert body["messages"] == [
        {"role": "user", "content": "part a b"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    assert body["max_tokens"] == 1024
    assert body["stop_sequences"] == ["END"]
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9
    assert body["metadata"] == {"user_id": "u-1"}


def test_openai_request_passthrough(upstream: FakeUpstream, registry: ProviderRegistry) -> None:
    provider, request = call(registry, "openai/passthrough", max_tokens=50, stop=["x"], user="u")
    list(provider.stream(request))
    body = upstream.last_request("passthrough")
    assert body is not None
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 50 and body["stop"] == ["x"] and body["user"] == "u"
    assert "temperature" not in body


# -- error mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
@pytest.mark.parametrize("streaming", [True, False])
def test_429_is_retryable_with_retry_after(
    upstream: FakeUpstream, registry: ProviderRegistry, kind: str, streaming: bool
) -> None:
    upstream.add_scenario("limited", status=429, retry_after="7")
    provider, request = call(registry, f"{kind}/limited")
    with pytest.raises(ProviderError) as info:
        provider.stream(request) if streaming else provider.complete(request)
    error = info.value
    assert error.retryable and error.status_code == 429
    assert error.retry_after == pytest.approx(7)
    assert error.code == "rate_limit_exceeded"
    assert error.to_openai_error()["type"] == "rate_limit_error"
    assert upstream.requests("limited") == 1


def test_429_retry_after_http_date(upstream: FakeUpstream, registry: ProviderRegistry) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    upstream.add_scenario("limited-date", status=429, retry_after=when)
    provider, request = call(registry, "openai/limited-date")
    with pytest.raises(ProviderError) as info:
        provider.complete(request)
    assert info.value.retry_after is not None and 20 < info.value.retry_after <= 30


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (529, True), (408, True), (400, False), (401, False), (404, False)],
)
def test_status_mapping(
    upstream: FakeUpstream, registry: ProviderRegistry, kind: str, status: int, retryable: bool
) -> None:
    upstream.add_scenario(f"status-{status}", status=status, message=f"boom {status}")
    provider, request = call(registry, f"{kind}/status-{status}")
    with pytest.raises(ProviderError) as info:
        provider.complete(request)
    assert info.value.retryable is retryable
    assert info.value.status_code == status
    assert f"boom {status}" in str(info.value)
    with pytest.raises(ProviderError) as info:
        provider.stream(request)
    assert info.value.retryable is retryable


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_fail_times_then_success(
    upstream: FakeUpstream, registry: ProviderRegistry, kind: str
) -> None:
    upstream.add_scenario("flaky", status=503, fail_times=2, tokens=3)
    provider, request = call(registry, f"{kind}/flaky")
    for _ in range(2):
        with pytest.raises(ProviderError) as info:
            provider.complete(request)
        assert info.value.retryable
    assert provider.complete(request).usage.completion_tokens == 3
    assert upstream.requests("flaky") == 3


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_mid_stream_error_event(
    upstream: FakeUpstream, registry: ProviderRegistry, kind: str
) -> None:
    upstream.add_scenario("midway", tokens=10, error_after=3, message="overloaded now")
    provider, request = call(registry, f"{kind}/midway")
    seen, error = stream_error(provider, request)
    assert len(seen) == 3
    assert error.retryable and error.code == "upstream_stream_error"
    assert "overloaded now" in str(error)


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_dropped_connection(upstream: FakeUpstream, registry: ProviderRegistry, kind: str) -> None:
    upstream.add_scenario("dropped", tokens=10, drop_after=4)
    provider, request = call(registry, f"{kind}/dropped")
    seen, error = stream_error(provider, request)
    assert len(seen) == 4
    assert error.retryable


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_connection_refused_is_retryable(kind: str) -> None:
    registry = build_registry(
        {
            "OPENAI_API_KEY": "k",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "ANTHROPIC_API_KEY": "k",
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
        }
    )
    provider, request = call(registry, f"{kind}/x")
    with pytest.raises(ProviderError) as info:
        provider.complete(request)
    assert info.value.retryable and info.value.code == "upstream_connection_error"
    with pytest.raises(ProviderError):
        provider.stream(request)


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_timeouts_are_retryable(upstream: FakeUpstream, kind: str) -> None:
    registry = build_registry(
        {
            "OPENAI_API_KEY": "k",
            "OPENAI_BASE_URL": upstream.openai_base_url,
            "ANTHROPIC_API_KEY": "k",
            "ANTHROPIC_BASE_URL": upstream.anthropic_base_url,
            "PROVIDER_TIMEOUT": 0.3,
        }
    )
    provider, request = call(registry, f"{kind}/sleepy?delay_ms=1500&ttft_ms=1500")
    with pytest.raises(ProviderError) as info:
        provider.complete(request)
    assert info.value.retryable and info.value.code == "upstream_timeout"
    _, error = stream_error(provider, request)
    assert error.retryable


def test_missing_api_key_fails_at_call_time() -> None:
    registry = build_registry({})
    provider, request = call(registry, "openai/gpt-4o-mini")
    with pytest.raises(ProviderError) as info:
        provider.complete(request)
    assert not info.value.retryable
    assert "OPENAI_API_KEY is not set" in str(info.value)
    with pytest.raises(ProviderError, match="ANTHROPIC_API_KEY is not set"):
        call(registry, "anthropic/claude")[0].stream(request)


# -- close / cancel ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_close_mid_stream_stops_promptly(
    upstream: FakeUpstream, registry: ProviderRegistry, kind: str
) -> None:
    name = f"long-{kind}"
    upstream.add_scenario(name, tokens=400, tps=40)  # ten seconds if left alone
    provider, request = call(registry, f"{kind}/{name}")
    stream = provider.stream(request)
    started = time.monotonic()
    seen: list[str] = []
    for delta in texts_of(stream):
        seen.append(delta)
        if len(seen) == 3:
            stream.close()
    stream.close()  # idempotent
    assert len(seen) == 3
    assert time.monotonic() - started < 3
    assert stream.usage is not None and stream.usage.completion_tokens == 3
    deadline = time.monotonic() + 3
    while upstream.disconnects(name) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.disconnects(name) == 1


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_close_from_another_thread(
    upstream: FakeUpstream, registry: ProviderRegistry, kind: str
) -> None:
    upstream.add_scenario(f"stalled-{kind}", tokens=5, ttft_ms=8000)
    provider, request = call(registry, f"{kind}/stalled-{kind}")
    stream = provider.stream(request)
    outcome: list[object] = []

    def consume() -> None:
        try:
            outcome.append(texts(stream))
        except BaseException as exc:  # recorded for the assertion below
            outcome.append(exc)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    time.sleep(0.2)
    stream.close()
    worker.join(timeout=3)
    assert not worker.is_alive()
    assert outcome == [[]]


# -- mock -------------------------------------------------------------------------------------


def fast_mock(**settings: Any) -> MockProvider:
    return MockProvider(settings=MockSettings(**{"ttft_ms": 0, "tokens_per_second": 0, **settings}))


def test_mock_is_deterministic_and_prompt_dependent() -> None:
    mock = fast_mock()
    a = mock.complete(ChatRequest("m", user("alpha")))
    assert a == mock.complete(ChatRequest("m", user("alpha")))
    assert a.text != mock.complete(ChatRequest("m", user("beta"))).text
    assert a.finish_reason == "stop"
    assert a.usage == Usage(estimate_tokens(user("alpha")), 40)
    assert len(a.text.split()) == 40


def test_mock_stream_shape_length_and_max_tokens() -> None:
    mock = fast_mock(length=12)
    stream = mock.stream(ChatRequest("m", user("x")))
    deltas = texts(stream)
    assert len(deltas) == 12
    assert not deltas[0].startswith(" ") and all(d.startswith(" ") for d in deltas[1:])
    assert stream.finish_reason == "stop" and stream.usage is not None
    assert stream.usage.completion_tokens == 12
    capped = mock.stream(ChatRequest("m", user("x"), max_tokens=5))
    assert texts(capped) == deltas[:5]
    assert capped.finish_reason == "length" and capped.usage == Usage(capped.usage.prompt_tokens, 5)


def test_mock_options_in_model_name_and_pacing() -> None:
    mock = MockProvider()
    started = time.monotonic()
    stream = mock.stream(ChatRequest("m?length=5&ttft_ms=100&tps=100", user("x")))
    first = delta_text(next(iter(stream)))
    assert first and time.monotonic() - started >= 0.09
    assert (
        len(mock.complete(ChatRequest("m?length=5&ttft_ms=0&tps=0", user("x"))).text.split()) == 5
    )


def test_mock_close_and_error_preset() -> None:
    mock = fast_mock(length=100)
    stream = mock.stream(ChatRequest("m", user("x")))
    seen = []
    for delta in texts_of(stream):
        seen.append(delta)
        if len(seen) == 2:
            stream.close()
    assert len(seen) == 2 and stream.usage is not None and stream.usage.completion_tokens == 2
    with pytest.raises(ProviderError) as info:
        mock.stream(ChatRequest("error", user("x")))
    assert not info.value.retryable


def test_mock_echo_keeps_text() -> None:
    text = "héllo 世界\n\n  spaced\tout "
    stream = fast_mock().stream(ChatRequest("echo", user(text)))
    assert "".join(texts(stream)) == text and stream.finish_reason == "stop"


# -- registry ---------------------------------------------------------------------------------


def test_registry_resolution_and_errors(registry: ProviderRegistry) -> None:
    provider, model = registry.resolve("openai/ft:gpt-4o/custom")
    assert provider.name == "openai" and model == "ft:gpt-4o/custom"
    assert registry.resolve("openai/x")[0] is provider  # cached
    assert registry.names() == ["mock", "openai", "anthropic"]
    with pytest.raises(
        UnknownModel, match="unknown provider 'foo' in model 'foo/bar'; known: mock"
    ):
        registry.resolve("foo/bar")
    for bad in ["gpt-4o", "", "/x", "openai/"]:
        with pytest.raises(UnknownModel, match="provider/model"):
            registry.resolve(bad)
    assert issubclass(UnknownModel, ValueError)


def test_custom_openai_compatible_provider(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_TEST_KEY", "local-secret")
    registry = build_registry(
        {
            "PROVIDERS": {
                "local": {
                    "kind": "openai",
                    "base_url": upstream.openai_base_url,
                    "api_key_env": "LOCAL_TEST_KEY",
                },
                "keyless": {"kind": "openai", "base_url": upstream.openai_base_url},
                "claude-proxy": {"kind": "anthropic", "base_url": upstream.anthropic_base_url},
            }
        }
    )
    assert registry.names() == ["mock", "openai", "anthropic", "local", "keyless", "claude-proxy"]
    for name in ["local", "keyless", "claude-proxy"]:
        provider, request = call(registry, f"{name}/echo", messages=user("round trip"))
        assert provider.name == name
        assert "".join(texts(provider.stream(request))) == "round trip"


def test_builtin_override_and_bad_config(upstream: FakeUpstream) -> None:
    registry = build_registry(
        {"PROVIDERS": {"openai": {"base_url": upstream.openai_base_url, "api_key": "sk-lit"}}}
    )
    provider, request = call(registry, "openai/echo", messages=user("via table"))
    assert provider.complete(request).text == "via table"
    with pytest.raises(ValueError, match="unknown kind"):
        build_registry({"PROVIDERS": {"odd": {"kind": "cohere", "base_url": "http://x"}}})
    with pytest.raises(ValueError, match="base_url"):
        build_registry({"PROVIDERS": {"nourl": {"kind": "openai"}}})


# -- base helpers -----------------------------------------------------------------------------


def test_provider_error_pickles_and_serialises() -> None:
    error = ProviderError("slow down", retryable=True, status_code=429, retry_after=2.5, code="x")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.message, clone.retryable, clone.status_code, clone.retry_after, clone.code) == (
        "slow down",
        True,
        429,
        2.5,
        "x",
    )
    assert error.to_openai_error() == {
        "message": "slow down",
        "type": "upstream_error",
        "code": "x",
        "param": None,
    }


def test_parse_retry_after_and_estimate_tokens() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "garbage"}) is None
    assert parse_retry_after({}) is None
    assert Usage(3, 4).as_dict() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert estimate_tokens(user("x" * 400)) == pytest.approx(104, abs=10)


# -- chat fidelity: tool calls, refusal, logprobs, n, structured output ------------------------

CALLS = [
    {"id": "call_a1", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
    {"id": "call_b2", "name": "get_time", "arguments": '{"zone":"Europe/Paris","fmt":"%H:%M 🕐"}'},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


def assemble(choices: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Fold choice deltas into per-choice messages, as an OpenAI client does."""
    out: dict[int, dict[str, Any]] = {}
    for choice in choices:
        message = out.setdefault(choice["index"], {"content": "", "tool_calls": {}})
        delta = choice["delta"]
        message["content"] += delta.get("content") or ""
        if "refusal" in delta:
            message["refusal"] = message.get("refusal", "") + delta["refusal"]
        for call in delta.get("tool_calls") or []:
            slot = message["tool_calls"].setdefault(call["index"], {"arguments": ""})
            for key in ("id", "type"):
                if call.get(key):
                    slot[key] = call[key]
            function = call.get("function") or {}
            if function.get("name"):
                slot["name"] = function["name"]
            slot["arguments"] += function.get("arguments") or ""
        if choice.get("logprobs"):
            message.setdefault("logprobs", []).extend(choice["logprobs"]["content"])
        if choice.get("finish_reason"):
            message["finish_reason"] = choice["finish_reason"]
    return out


@pytest.mark.parametrize("kind", SDK_PROVIDERS)
def test_parallel_tool_calls_reassemble_byte_identical(
    upstream: FakeUpstream, registry: ProviderRegistry, kind: str
) -> None:
    name = f"tools-{kind}"
    upstream.add_scenario(name, deltas=[], tool_calls=CALLS, fragment=2)
    provider, request = call(registry, f"{kind}/{name}", tools=TOOLS, tool_choice="auto")
    stream = provider.stream(request)
    choices = list(stream)
    fragments = [c for c in choices if c["delta"].get("tool_calls")]
    assert len(fragments) > 2 * len(CALLS)  # arguments arrived in many pieces
    message = assemble(choices)[0]
    calls = [message["tool_calls"][i] for i in sorted(message["tool_calls"])]
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [
        (c["id"], c["name"], c["arguments"]) for c in CALLS
    ]
    assert all(c["type"] == "function" for c in calls)
    assert message["finish_reason"] == "tool_calls" and stream.finish_reason == "tool_calls"
    completion = provider.complete(request)
    assert completion.finish_reason == "tool_calls"
    got = completion.choices[0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"]) for c in got] == [(c["id"], c["name"]) for c in CALLS]
    for sent, received in zip(CALLS, got, strict=True):
        assert json.loads(received["function"]["arguments"]) == json.loads(sent["arguments"])
    if kind == "openai":  # OpenAI gives the argument string itself
        assert [c["function"]["arguments"] for c in got] == [c["arguments"] for c in CALLS]


def test_openai_refusal_logprobs_and_n(upstream: FakeUpstream, registry: ProviderRegistry) -> None:
    upstream.add_scenario("refuses", refusal="I can't help with that.")
    provider, request = call(registry, "openai/refuses")
    message = assemble(provider.stream(request))[0]
    assert message["refusal"] == "I can't help with that." and message["content"] == ""
    assert provider.complete(request).choices[0]["message"]["refusal"] == "I can't help with that."

    upstream.add_scenario("lp", deltas=["Hi", " there"])
    options = {"logprobs": True, "top_logprobs": 2}
    provider, request = call(registry, "openai/lp", n=2, options=options)
    messages = assemble(provider.stream(request))
    assert sorted(messages) == [0, 1]
    for message in messages.values():
        assert message["content"] == "Hi there" and message["finish_reason"] == "stop"
        assert [e["token"] for e in message["logprobs"]] == ["Hi", " there"]
        assert all(len(e["top_logprobs"]) == 2 for e in message["logprobs"])
    completion = provider.complete(request)
    assert [c["index"] for c in completion.choices] == [0, 1]
    assert completion.choices[1]["logprobs"]["content"][1]["token"] == " there"
    body = upstream.last_request("lp")
    assert body is not None and body["n"] == 2 and body["logprobs"] is True


def test_openai_passes_every_parameter_and_unknown_keys(
    upstream: FakeUpstream, registry: ProviderRegistry
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}
    provider, request = call(
        registry,
        "openai/everything",
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        response_format=fmt,
        max_completion_tokens=9,
        options={"seed": 7, "vendor_knob": {"x": 1}, "parallel_tool_calls": False},
    )
    provider.complete(request)
    body = upstream.last_request("everything")
    assert body is not None
    assert body["tools"] == TOOLS and body["tool_choice"]["function"]["name"] == "get_time"
    assert body["response_format"] == fmt and body["max_completion_tokens"] == 9
    assert body["seed"] == 7 and body["vendor_knob"] == {"x": 1}
    assert body["parallel_tool_calls"] is False and "max_tokens" not in body


def test_anthropic_tools_images_and_tool_results(
    upstream: FakeUpstream, registry: ProviderRegistry
) -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {k: c[k] for k in ("name", "arguments")},
                }
                for c in CALLS
            ],
        },
        {"role": "tool", "tool_call_id": "call_a1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b2", "content": [{"type": "text", "text": "noon"}]},
    ]
    provider, request = call(
        registry,
        "anthropic/convert-tools",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        options={"parallel_tool_calls": False},
    )
    provider.complete(request)
    body = upstream.last_request("convert-tools")
    assert body is not None
    assert body["system"] == "be brief"
    user, assistant, results = body["messages"]
    assert user["content"] == [
        {"type": "text", "text": "what is this?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    assert assistant == {
        "role": "assistant",
        "content": [
            {
                "type": "tool_use",
                "id": c["id"],
                "name": c["name"],
                "input": json.loads(c["arguments"]),
            }
            for c in CALLS
        ],
    }
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_a1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_b2", "content": "noon"},
        ],
    }
    assert body["tools"][0] == {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": TOOLS[0]["function"]["parameters"],
    }
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


@pytest.mark.parametrize("streaming", [True, False])
def test_anthropic_json_schema_is_a_forced_tool(
    upstream: FakeUpstream, registry: ProviderRegistry, streaming: bool
) -> None:
    answer = '{"name": "Ada", "born": 1815}'
    upstream.add_scenario(
        "structured", deltas=[], tool_calls=[{"id": "t1", "name": "person", "arguments": answer}]
    )
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    provider, request = call(registry, "anthropic/structured", response_format=fmt)
    if streaming:
        stream = provider.stream(request)
        message = assemble(stream)[0]
        assert message["content"] == answer and message["tool_calls"] == {}
        assert stream.finish_reason == "stop"
    else:
        completion = provider.complete(request)
        assert json.loads(completion.text) == json.loads(answer)
        assert "tool_calls" not in completion.choices[0]["message"]
        assert completion.finish_reason == "stop"
    body = upstream.last_request("structured")
    assert body is not None
    assert body["tools"][0]["name"] == "person" and body["tools"][0]["input_schema"] == schema
    assert body["tool_choice"] == {"type": "tool", "name": "person"}


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 2}, "n"),
        ({"options": {"seed": 1}}, "seed"),
        ({"options": {"logprobs": True}}, "logprobs"),
        ({"options": {"vendor_knob": 1}}, "vendor_knob"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
    ],
)
def test_anthropic_refuses_what_it_cannot_honour(
    registry: ProviderRegistry, options: dict[str, Any], param: str
) -> None:
    provider, request = call(registry, "anthropic/x", **options)
    with pytest.raises(Unsupported) as info:
        provider.check(request)
    assert info.value.param == param and "anthropic" in info.value.message
    with pytest.raises(ProviderError) as error:
        provider.complete(request)
    assert not error.value.retryable and error.value.status_code == 400


def test_mock_tools_model_calls_the_first_tool() -> None:
    mock = fast_mock()
    request = ChatRequest("tools", user("weather in Paris"), tools=TOOLS)
    stream = mock.stream(request)
    choices = list(stream)
    message = assemble(choices)[0]
    (only,) = message["tool_calls"].values()
    assert only["name"] == "get_weather" and only["id"].startswith("call_")
    assert json.loads(only["arguments"]) == {"city": "weather in Paris", "unit": "c"}
    assert len([c for c in choices if c["delta"].get("tool_calls")]) > 2
    assert stream.finish_reason == "tool_calls"
    completion = mock.complete(request)
    assert completion == mock.complete(request)  # deterministic
    assert (
        completion.choices[0]["message"]["tool_calls"][0]["function"]["arguments"]
        == only["arguments"]
    )
    named = ChatRequest(
        "echo",
        user("x"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert (
        mock.complete(named).choices[0]["message"]["tool_calls"][0]["function"]["name"]
        == "get_time"
    )
    answered = [
        *user("weather in Paris"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "sunny, 21C"},
    ]
    after = mock.complete(ChatRequest("tools", answered, tools=TOOLS))
    assert after.text == "sunny, 21C" and after.finish_reason == "stop"


def test_mock_json_modes_n_stop_and_logprobs() -> None:
    mock = fast_mock()
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ok": {"type": "boolean"},
        },
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}}
    value = json.loads(mock.complete(ChatRequest("x", user("hello"), response_format=fmt)).text)
    assert value == {"title": "hello", "tags": ["hello"], "ok": True}
    as_object = mock.complete(
        ChatRequest("x", user("hello"), response_format={"type": "json_object"})
    )
    assert isinstance(json.loads(as_object.text), dict)
    two = mock.complete(ChatRequest("x", user("hello"), n=2))
    assert [c["index"] for c in two.choices] == [0, 1] and two.choices[0] != two.choices[1]
    assert (
        two.choices[0]["message"]["content"] == mock.complete(ChatRequest("x", user("hello"))).text
    )
    stopped = mock.complete(ChatRequest("echo", user("one two STOP three"), stop=["STOP"]))
    assert stopped.text == "one two " and stopped.finish_reason == "stop"
    scored = mock.complete(
        ChatRequest("echo", user("a b"), options={"logprobs": True, "top_logprobs": 3})
    )
    entries = scored.choices[0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["a", " b"] and all(
        len(e["top_logprobs"]) == 3 for e in entries
    )
    with pytest.raises(Unsupported, match="'vendor_knob' is not supported by provider 'mock'"):
        mock.check(ChatRequest("x", user("y"), options={"vendor_knob": 1}))


def test_completion_more_than_text() -> None:
    plain = Completion.of_text("hi", "stop", Usage())
    assert not plain.more_than_text and plain.text == "hi"
    refusal = {"role": "assistant", "content": None, "refusal": "no"}
    assert Completion([{"index": 0, "message": refusal}], Usage()).more_than_text
    calls = fast_mock().complete(ChatRequest("tools", user("x"), tools=TOOLS))
    assert calls.more_than_text and calls.text == ""
    assert fast_mock().complete(ChatRequest("x", user("x"), n=2)).more_than_text


def test_anthropic_strict_tools_are_sent_strict_with_the_beta_header(
    upstream: FakeUpstream, registry: ProviderRegistry
) -> None:
    """`strict` on a tool or a json_schema is honoured as Anthropic's strict tool use."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema, "strict": True}}
    provider, request = call(registry, "anthropic/strict", tools=[tool])
    provider.complete(request)
    body = upstream.last_request("strict")
    assert body is not None and body["tools"][0]["strict"] is True
    assert upstream.last_headers("strict")["anthropic-beta"] == "structured-outputs-2025-11-13"

    answer = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    provider, request = call(registry, "anthropic/strict", response_format=answer)
    provider.complete(request)
    body = upstream.last_request("strict")
    assert body is not None and [(t["name"], t["strict"]) for t in body["tools"]] == [("a", True)]
    assert upstream.last_headers("strict")["anthropic-beta"] == "structured-outputs-2025-11-13"

    tool["function"]["strict"] = False
    provider, request = call(registry, "anthropic/strict", tools=[tool])
    provider.complete(request)
    body = upstream.last_request("strict")
    assert body is not None and "strict" not in body["tools"][0]
    assert "anthropic-beta" not in upstream.last_headers("strict")
