"""Providers against the fake upstream over real HTTP, plus the mock and the registry."""

from __future__ import annotations

import email.utils
import pickle
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from app.providers import (
    ChatRequest,
    Provider,
    ProviderError,
    ProviderRegistry,
    UnknownModel,
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
