"""A keyless, deterministic, built-in provider for development and tests.

`mock/echo` repeats the last user message, `mock/tools` calls the first tool it is given
(arguments derived from the prompt; after a tool result it answers with that result),
`mock/error` fails, `mock/slow` is slow; any other name says deterministic words. Options
ride in the name: `mock/NAME?length=..&ttft_ms=..&tps=..`. `n`, `stop`, `tool_choice`,
`logprobs` are honoured and under `response_format` json_object / json_schema the answer
is valid JSON. Sampling knobs (seed, penalties...) change nothing: the mock is deterministic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from app.providers.base import (
    ChatRequest,
    ChoiceDelta,
    Completion,
    ProviderError,
    Unsupported,
    Usage,
)
from app.providers.errors import refused
from app.providers.messages import KNOWN_PARTS, content_text, estimate_tokens, last_user_text
from app.providers.mock_answers import (
    ToolCall,
    fragments,
    json_answer,
    mock_words,
    split_tokens,
    token_logprobs,
    tool_call,
)

# the presets /v1/models lists; `demo` (the name the dev banner and README use) is like chat
MODELS = ("echo", "tools", "chat", "slow", "error", "demo")
ACCEPTED_OPTIONS = (
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "reasoning_effort",
    "service_tier",
    "store",
)


@dataclass(frozen=True)
class MockSettings:
    """How the mock generates: words per answer, time to first token, token rate."""

    length: int = 40
    ttft_ms: float = 50.0
    tokens_per_second: float = 50.0


# option -> (lowest, highest): a model name must not make a worker allocate or wait unbounded
OPTION_BOUNDS = {
    "length": (0, 100_000),  # words per answer
    "ttft_ms": (0.0, 600_000.0),  # ten minutes
    "tps": (0.0, 1_000_000.0),  # tokens per second (0: no pacing)
}


def _option(options: dict[str, str], name: str, kind: type, default: float, model: str) -> Any:
    low, high = OPTION_BOUNDS[name]
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except (ValueError, OverflowError):
        value = None
    if value is None or not low <= value <= high:  # NaN fails this too
        raise ProviderError(
            f"mock: option {name}={raw[:40]!r} in model '{model[:200]}' must be "
            f"{'an integer' if kind is int else 'a number'} from {low:g} to {high:g}",
            retryable=False,
            status_code=400,
        )
    return value


def _settings_for(model: str, base: MockSettings) -> tuple[str, MockSettings]:
    """Apply `mock/NAME?length=..&ttft_ms=..&tps=..` options (bounded) and the `slow` preset."""
    name, _, query = model.partition("?")
    settings = base
    if name == "slow":
        settings = MockSettings(base.length, 1000.0, 5.0)
    options = dict(parse_qsl(query))
    if "tokens" in options and "length" not in options:
        options["length"] = options["tokens"]
    return name, MockSettings(
        _option(options, "length", int, settings.length, model),
        _option(options, "ttft_ms", float, settings.ttft_ms, model),
        _option(options, "tps", float, settings.tokens_per_second, model),
    )


@dataclass
class _Choice:
    """One planned choice: content fragments or one tool call, and how it finishes."""

    index: int
    pieces: list[str]
    finish: str
    call: ToolCall | None = None
    emitted: list[str] = field(default_factory=list)

    def delta(self, step: int, top_logprobs: int | None) -> ChoiceDelta | None:
        """The choice's delta at `step` (None once it has said everything)."""
        if self.call is not None:
            if step == 0:
                header = {"index": 0, "id": self.call.id, "type": "function"}
                header["function"] = {"name": self.call.name, "arguments": ""}
                return {"index": self.index, "delta": {"tool_calls": [header]}}
            step -= 1
        if step >= len(self.pieces):
            return None
        piece = self.pieces[step]
        self.emitted.append(piece)
        if self.call is not None:
            fragment = {"index": 0, "function": {"arguments": piece}}
            return {"index": self.index, "delta": {"tool_calls": [fragment]}}
        item: ChoiceDelta = {"index": self.index, "delta": {"content": piece}}
        if top_logprobs is not None:
            item["logprobs"] = {"content": [token_logprobs(piece, top_logprobs)], "refusal": None}
        return item

    def choice(self, top_logprobs: int | None) -> dict[str, Any]:
        """The `chat.completion` choice for what was said."""
        text = "".join(self.emitted)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self.call is not None:
            function = {"name": self.call.name, "arguments": text}
            message["content"] = None
            message["tool_calls"] = [{"id": self.call.id, "type": "function", "function": function}]
        logprobs = None
        if top_logprobs is not None and self.call is None:
            content = [token_logprobs(piece, top_logprobs) for piece in self.emitted]
            logprobs = {"content": content, "refusal": None}
        return {
            "index": self.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self.finish,
        }


class MockStream:
    """A paced, deterministic stream of choice deltas."""

    def __init__(
        self,
        choices: list[_Choice],
        settings: MockSettings,
        prompt_tokens: int,
        top_logprobs: int | None = None,
    ) -> None:
        self._choices = choices
        self._settings = settings
        self._prompt_tokens = prompt_tokens
        self._top_logprobs = top_logprobs
        self._closed = threading.Event()
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def __iter__(self) -> Iterator[ChoiceDelta]:
        try:
            if self._settings.ttft_ms > 0:
                time.sleep(self._settings.ttft_ms / 1000)
            tps = self._settings.tokens_per_second
            interval = 1 / tps if tps > 0 else 0
            step = 0
            while True:
                if self._closed.is_set():
                    return
                if step and interval:
                    time.sleep(interval)
                    if self._closed.is_set():
                        return
                deltas = [c.delta(step, self._top_logprobs) for c in self._choices]
                if all(d is None for d in deltas):
                    break
                yield from (d for d in deltas if d is not None)
                step += 1
            self.finish_reason = self._choices[0].finish
            for choice in self._choices:
                yield {"index": choice.index, "delta": {}, "finish_reason": choice.finish}
        finally:
            emitted = sum(len(c.emitted) for c in self._choices)
            self.usage = Usage(self._prompt_tokens, emitted)

    def close(self) -> None:
        """Stop at the next delta."""
        self._closed.set()

    def completion(self) -> Completion:
        """The whole answer: run the stream (keeping its pacing), then its choices."""
        for _ in self:
            pass
        choices = [c.choice(self._top_logprobs) for c in self._choices]
        return Completion(choices, self.usage or Usage())


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    """The text up to the first stop sequence (OpenAI leaves the sequence out)."""
    cuts = [i for s in stop or () if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


class MockProvider:
    """Deterministic answers from the prompt; see the module docstring for the presets."""

    def __init__(self, name: str = "mock", settings: MockSettings | None = None) -> None:
        self.name = name
        self.settings = settings or MockSettings()

    def check(self, request: ChatRequest) -> None:
        """Raise Unsupported for a parameter the mock cannot honour (or an option out of bounds)."""
        try:
            _settings_for(request.model, self.settings)
        except ProviderError as exc:
            raise Unsupported("model", exc.message) from None
        for key in request.options:
            if key not in ACCEPTED_OPTIONS:
                raise Unsupported(key, f"'{key}' is not supported by provider '{self.name}'.")
        for i, tool in enumerate(request.tools or []):
            if tool.get("type") != "function":
                raise Unsupported(
                    f"tools[{i}].type", f"provider '{self.name}' takes function tools only."
                )
        for i, message in enumerate(request.messages):
            content = message.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                if part.get("type") not in KNOWN_PARTS:
                    raise Unsupported(
                        f"messages[{i}].content[{j}].type",
                        f"content parts of type {part.get('type')!r} are not supported by "
                        f"provider '{self.name}'.",
                    )

    def _calls_tool(self, name: str, request: ChatRequest) -> bool:
        if not request.tools or request.tool_choice == "none":
            return False
        if request.tool_choice == "required" or isinstance(request.tool_choice, dict):
            return True
        last = request.messages[-1].get("role") if request.messages else None
        return name == "tools" and last != "tool"

    def _plan(self, name: str, index: int, settings: MockSettings, request: ChatRequest) -> _Choice:
        prompt = last_user_text(request.messages)
        seed = f"{name}\n{prompt}" if index == 0 else f"{name}\n{index}\n{prompt}"
        if self._calls_tool(name, request):
            call = tool_call(request.tools or [], request.tool_choice, prompt, seed)
            return _Choice(index, fragments(call.arguments), "tool_calls", call)
        words = mock_words(seed, settings.length)
        fmt = request.response_format or {}
        if fmt.get("type") in ("json_object", "json_schema"):
            text = json_answer(fmt, prompt, words)
        elif name == "echo":
            text = prompt
        elif name == "tools" and request.messages[-1].get("role") == "tool":
            text = content_text(request.messages[-1].get("content"))
        else:
            text = " ".join(words)
        text = _cut_at_stop(text, request.stop)
        pieces = split_tokens(text)
        limit = request.limit
        if limit is not None and limit < len(pieces):
            return _Choice(index, pieces[: max(0, limit)], "length")
        return _Choice(index, pieces, "stop")

    def _prepare(self, request: ChatRequest) -> MockStream:
        """Check the request and the error preset, then plan every choice."""
        try:
            self.check(request)
        except Unsupported as exc:
            raise refused(self.name, exc) from None
        name, settings = _settings_for(request.model, self.settings)
        if name == "error":
            raise ProviderError(
                "mock: simulated upstream failure", retryable=False, status_code=400
            )
        choices = [self._plan(name, i, settings, request) for i in range(request.choices)]
        top = None
        if request.options.get("logprobs"):
            top = int(request.options.get("top_logprobs") or 0)
        return MockStream(choices, settings, estimate_tokens(request.messages), top)

    def stream(self, request: ChatRequest) -> MockStream:
        """Stream the deterministic answer, paced by the settings."""
        return self._prepare(request)

    def complete(self, request: ChatRequest) -> Completion:
        """Return the whole answer after a delay of ttft plus generation time."""
        return self._prepare(request).completion()
