"""A keyless, deterministic, built-in provider for development and tests."""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl

from app.providers.base import (
    ChatRequest,
    ChoiceDelta,
    Completion,
    ProviderError,
    Usage,
    delta_text,
    estimate_tokens,
    last_user_text,
    text_delta,
)

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "by",
    "this",
    "from",
    "at",
    "be",
    "are",
    "was",
    "or",
    "an",
    "which",
    "stream",
    "batch",
    "token",
    "worker",
    "queue",
    "model",
    "river",
    "sluice",
    "gate",
    "water",
    "flow",
    "channel",
    "tenant",
    "job",
    "result",
    "signal",
    "delta",
    "latency",
    "quiet",
    "bright",
    "careful",
    "simple",
    "steady",
    "quick",
    "gentle",
    "open",
    "measure",
    "carry",
    "answer",
    "build",
    "write",
    "read",
    "return",
    "pass",
    "hold",
    "move",
    "shape",
    "follow",
    "keep",
    "turn",
    "light",
    "stone",
    "field",
    "story",
    "reason",
    "moment",
    "window",
    "garden",
    "engine",
    "harbor",
    "lantern",
    "meadow",
]


@dataclass(frozen=True)
class MockSettings:
    """How the mock generates: words per answer, time to first token, token rate."""

    length: int = 40
    ttft_ms: float = 50.0
    tokens_per_second: float = 50.0


def mock_words(seed_text: str, count: int) -> list[str]:
    """Deterministic readable words (with some punctuation) derived from `seed_text`."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    words: list[str] = []
    capitalize = True
    for i in range(count):
        word = rng.choice(WORDS)
        if capitalize:
            word = word.capitalize()
            capitalize = False
        if i == count - 1:
            word += "."
        elif rng.random() < 0.08:
            word += "."
            capitalize = True
        elif rng.random() < 0.08:
            word += ","
        words.append(word)
    return words


def split_tokens(text: str) -> list[str]:
    """Split text into word-ish deltas (leading whitespace attached) that join back to it."""
    return re.findall(r"\s*\S+|\s+$", text) if text else []


def _settings_for(model: str, base: MockSettings) -> tuple[str, MockSettings]:
    """Apply `mock/NAME?length=..&ttft_ms=..&tps=..` options and the `slow` preset."""
    name, _, query = model.partition("?")
    settings = base
    if name == "slow":
        settings = MockSettings(base.length, 1000.0, 5.0)
    options = dict(parse_qsl(query))
    try:
        return name, MockSettings(
            int(options.get("length", options.get("tokens", settings.length))),
            float(options.get("ttft_ms", settings.ttft_ms)),
            float(options.get("tps", settings.tokens_per_second)),
        )
    except ValueError as exc:
        raise ProviderError(
            f"mock: bad options in model '{model}': {exc}", retryable=False, status_code=400
        ) from exc


class MockStream:
    """A paced, deterministic stream of words."""

    def __init__(
        self, deltas: list[str], settings: MockSettings, prompt_tokens: int, *, truncated: bool
    ) -> None:
        self._deltas = deltas
        self._settings = settings
        self._prompt_tokens = prompt_tokens
        self._truncated = truncated
        self._closed = threading.Event()
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def __iter__(self) -> Iterator[ChoiceDelta]:
        emitted = 0
        try:
            if self._settings.ttft_ms > 0:
                time.sleep(self._settings.ttft_ms / 1000)
            interval = (
                1 / self._settings.tokens_per_second if self._settings.tokens_per_second > 0 else 0
            )
            for i, delta in enumerate(self._deltas):
                if self._closed.is_set():
                    return
                if i and interval:
                    time.sleep(interval)
                    if self._closed.is_set():
                        return
                emitted += 1
                yield text_delta(delta)
            self.finish_reason = "length" if self._truncated else "stop"
            yield {"index": 0, "delta": {}, "finish_reason": self.finish_reason}
        finally:
            self.usage = Usage(self._prompt_tokens, emitted)

    def close(self) -> None:
        """Stop at the next delta."""
        self._closed.set()


class MockProvider:
    """Deterministic text from the prompt; `mock/echo`, `mock/error`, `mock/slow` are presets."""

    def __init__(self, name: str = "mock", settings: MockSettings | None = None) -> None:
        self.name = name
        self.settings = settings or MockSettings()

    def _prepare(self, request: ChatRequest) -> MockStream:
        """Check for the error preset, then build a stream for the request."""
        name, settings = _settings_for(request.model, self.settings)
        if name == "error":
            raise ProviderError(
                "mock: simulated upstream failure", retryable=False, status_code=400
            )
        prompt = last_user_text(request.messages)
        if name == "echo":
            deltas = split_tokens(prompt)
        else:
            words = mock_words(f"{name}\n{prompt}", settings.length)
            deltas = [w if i == 0 else " " + w for i, w in enumerate(words)]
        truncated = request.max_tokens is not None and request.max_tokens < len(deltas)
        if truncated:
            deltas = deltas[: max(0, request.max_tokens or 0)]
        return MockStream(deltas, settings, estimate_tokens(request.messages), truncated=truncated)

    def stream(self, request: ChatRequest) -> MockStream:
        """Stream the deterministic answer, paced by the settings."""
        return self._prepare(request)

    def complete(self, request: ChatRequest) -> Completion:
        """Return the whole answer after a delay of ttft plus generation time."""
        stream = self._prepare(request)
        text = "".join(delta_text(d) for d in stream)
        return Completion.of_text(text, stream.finish_reason or "stop", stream.usage or Usage())
