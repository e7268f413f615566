"""The providers' lean SSE parsing, over canned response bodies (no network)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import openai
import pytest

from app.providers.anthropic_provider import AnthropicStream
from app.providers.base import ChatRequest, ProviderError, delta_text
from app.providers.errors import map_sdk_error
from app.providers.openai_provider import OpenAIStream


class CannedResponse:
    """Stands in for the SDK's httpx response: yields the body in the given pieces."""

    def __init__(self, pieces: list[bytes], fail: BaseException | None = None) -> None:
        self.pieces = pieces
        self.fail = fail
        self.closed = False
        self.extensions: dict[str, object] = {}

    def iter_bytes(self) -> Iterator[bytes]:
        yield from self.pieces
        if self.fail is not None:
            raise self.fail

    def close(self) -> None:
        self.closed = True


def texts(choices: Iterable[dict[str, Any]]) -> list[str]:
    """The non-empty content fragments of a stream of choice deltas."""
    return [text for choice in choices if (text := delta_text(choice))]


def map_openai(exc: BaseException) -> ProviderError | None:
    return map_sdk_error(exc, "openai", openai)


REQUEST = ChatRequest("m", [{"role": "user", "content": "hello"}])


def openai_stream(pieces: list[bytes], fail: BaseException | None = None) -> OpenAIStream:
    stream = OpenAIStream(CannedResponse(pieces, fail), REQUEST, map_openai)
    stream.provider_name = "openai"
    return stream


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = "{}" if content is None else json.dumps({"content": content})
    finish_json = "null" if finish is None else f'"{finish}"'
    return (
        b'data: {"choices":[{"index":0,"delta":'
        + delta.encode()
        + b',"finish_reason":'
        + finish_json.encode()
        + b"}]}\n\n"
    )


def test_split_events_crlf_comments_usage_and_done() -> None:
    body = (
        b": keep-alive comment\r\n\r\n"
        + chunk("Hel").replace(b"\n", b"\r\n")
        + chunk("lo")
        + chunk(finish="length")
        + b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
        + b"data: [DONE]\n\n"
    )
    pieces = [body[i : i + 5] for i in range(0, len(body), 5)]  # events split anywhere
    stream = openai_stream(pieces)
    assert texts(stream) == ["Hel", "lo"]
    assert stream.finish_reason == "length"
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (7, 2)
    assert stream._http.closed


def test_multibyte_text_split_across_reads() -> None:
    body = 'data: {"choices":[{"index":0,"delta":{"content":"h\u00e9\u4e16"}}]}\n\n'.encode()
    body += chunk(finish="stop") + b"data: [DONE]\n\n"
    stream = openai_stream([body[:40], body[40:41], body[41:]])
    assert texts(stream) == ["h\u00e9\u4e16"]


def test_error_payload_and_undecodable_event() -> None:
    error = b'data: {"error":{"message":"overloaded now","type":"server_error"}}\n\n'
    stream = openai_stream([chunk("a"), error])
    seen: list[str] = []
    with pytest.raises(ProviderError) as info:
        for choice in stream:
            seen.extend(texts([choice]))
    assert seen == ["a"] and info.value.retryable and "overloaded now" in info.value.message
    with pytest.raises(ProviderError) as info:
        list(openai_stream([b"data: {not json\n\n"]))
    assert info.value.code == "upstream_stream_error"


def test_end_without_finish_and_dropped_connection_are_retryable() -> None:
    with pytest.raises(ProviderError) as info:
        list(openai_stream([chunk("a")]))
    assert info.value.retryable and "before the generation finished" in info.value.message
    with pytest.raises(ProviderError) as info:
        list(openai_stream([chunk("a")], fail=ConnectionResetError("peer reset")))
    assert info.value.retryable and info.value.code == "upstream_connection_error"


def test_anthropic_events() -> None:
    body = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":9,"output_tokens":1}}}\n\n'
        b"event: ping\ndata: {}\n\n"
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":'
        b'{"stop_reason":"max_tokens"},"usage":{"output_tokens":1}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    stream = AnthropicStream(CannedResponse([body]), REQUEST, lambda exc: None)
    assert texts(stream) == ["Hi"]
    assert stream.finish_reason == "length"
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (9, 1)
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
    error += b'"message":"busy"}}\n\n'
    stream = AnthropicStream(CannedResponse([error]), REQUEST, lambda exc: None)
    stream.provider_name = "anthropic"
    with pytest.raises(ProviderError, match=r"stream error \(overloaded_error\): busy"):
        list(stream)
