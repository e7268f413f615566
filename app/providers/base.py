"""The provider interface: requests, completions, streams and errors."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from app.providers.messages import estimate_tokens

ChoiceDelta = dict[str, Any]
"""One element of a `chat.completion.chunk`'s `choices`: `{"index", "delta", ...}`."""


# The record keys that are not ChatRequest fields of the same name.
_RECORD_ONLY = ("model", "messages", "stream", "stream_options")


@dataclass(frozen=True)
class ChatRequest:
    """One chat request in OpenAI terms: built once from the validated body, stored as its record.

    `model` is "provider/model" as the client sent it; the provider itself is handed a copy
    whose `model` is its own name for the model (ProviderRegistry.bind). Parameters without
    a field of their own (seed, logprobs, penalties, unknown keys...) ride in `options`.
    """

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    user: str | None = None
    n: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    stream: bool = False
    include_usage: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        """The provider part of "provider/model"."""
        return self.model.partition("/")[0]

    @property
    def limit(self) -> int | None:
        """The completion token limit: `max_completion_tokens`, else `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def choices(self) -> int:
        """How many choices to generate (`n`)."""
        return self.n or 1

    def input_tokens(self) -> int:
        """A rough prompt-size estimate, for routing."""
        return estimate_tokens(self.messages)

    def to_record(self) -> dict[str, Any]:
        """The stored form: the Chat Completions body, normalised (what the Job row keeps)."""
        record: dict[str, Any] = {"model": self.model, "messages": self.messages}
        record["stream"] = self.stream
        if self.include_usage:
            record["stream_options"] = {"include_usage": True}
        for item in fields(self):
            if item.name in _RECORD_ONLY or item.name in ("include_usage", "options"):
                continue
            value = getattr(self, item.name)
            if value is not None:
                record[item.name] = value
        record.update(self.options)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ChatRequest:
        """The request a stored record (or an already validated body) describes."""
        known = {item.name for item in fields(cls)} - {"include_usage", "options"}
        values = {k: v for k, v in record.items() if k in known and k not in _RECORD_ONLY}
        stop = values.get("stop")
        if isinstance(stop, str):
            values["stop"] = [stop]
        options = {k: v for k, v in record.items() if k not in known and k not in _RECORD_ONLY}
        stream_options = record.get("stream_options")
        include_usage = isinstance(stream_options, Mapping) and bool(
            stream_options.get("include_usage")
        )
        return cls(
            model=str(record["model"]),
            messages=list(record.get("messages") or []),
            stream=bool(record.get("stream")),
            include_usage=include_usage,
            options=options,
            **values,
        )


class Unsupported(ValueError):
    """A request parameter a provider cannot honour; the web answers 400 naming it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class Usage:
    """Token counts for one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """The OpenAI `usage` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class Completion:
    """A finished non-streaming generation: OpenAI `chat.completion` choices and usage."""

    choices: list[dict[str, Any]]
    usage: Usage

    @classmethod
    def of_text(cls, text: str, finish_reason: str, usage: Usage) -> Completion:
        """A one-choice completion holding plain text."""
        message = {"role": "assistant", "content": text}
        return cls([{"index": 0, "message": message, "finish_reason": finish_reason}], usage)

    @property
    def text(self) -> str:
        """Choice 0's content ("" when it has none, e.g. only tool calls)."""
        message = self.choices[0].get("message") if self.choices else None
        content = message.get("content") if isinstance(message, Mapping) else None
        return content if isinstance(content, str) else ""

    @property
    def more_than_text(self) -> bool:
        """Whether the choices hold more than choice 0's text (tool calls, refusal, n > 1...)."""
        return more_than_text(self.choices)

    @property
    def finish_reason(self) -> str:
        """Choice 0's finish reason."""
        return (self.choices[0].get("finish_reason") if self.choices else None) or "stop"


def more_than_text(choices: list[dict[str, Any]]) -> bool:
    """Whether `chat.completion` choices hold more than choice 0's text: a job row keeps
    them whole then (tool calls, refusal, n > 1, logprobs), else only the text."""
    if len(choices) != 1 or choices[0].get("logprobs"):
        return True
    message = choices[0].get("message") or {}
    return any(v is not None for k, v in message.items() if k not in ("role", "content"))


def text_delta(text: str, index: int = 0) -> ChoiceDelta:
    """A choice delta carrying content."""
    return {"index": index, "delta": {"content": text}}


def delta_text(choice: Mapping[str, Any], index: int = 0) -> str:
    """The content of a choice delta if it belongs to choice `index`, else ""."""
    if (choice.get("index") or 0) != index:
        return ""
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, Mapping) else None
    return content if isinstance(content, str) else ""


class ProviderError(Exception):
    """An upstream failure, mapped to retryable or not."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status_code: int | None = None,
        retry_after: float | None = None,
        code: str = "upstream_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after = retry_after
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with keyword arguments intact (Celery results, multiprocessing)."""
        return (_rebuild_error, (self.message, self._kwargs()))

    def _kwargs(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this error."""
        return {
            "retryable": self.retryable,
            "status_code": self.status_code,
            "retry_after": self.retry_after,
            "code": self.code,
        }

    @property
    def error_type(self) -> str:
        """The OpenAI error `type` for this error: an upstream client error keeps its kind
        (its status is answered as is, see `error_status`); any other is Sluice's failure."""
        if self.code == "rate_limit_exceeded":
            return "rate_limit_error"
        if self.status_code is not None and is_client_error(self.status_code):
            return CLIENT_ERROR_TYPES.get(self.status_code, "invalid_request_error")
        return "upstream_error"

    def to_openai_error(self) -> dict[str, Any]:
        """The OpenAI-style `error` object for this failure."""
        return {"message": self.message, "type": self.error_type, "code": self.code, "param": None}

    def __repr__(self) -> str:
        return f"ProviderError({self.message!r}, **{self._kwargs()!r})"


def _rebuild_error(message: str, kwargs: dict[str, Any]) -> ProviderError:
    """Unpickle a ProviderError."""
    return ProviderError(message, **kwargs)


@runtime_checkable
class ProviderStream(Protocol):
    """An in-flight streamed generation; iterate for choice deltas (see ChoiceDelta)."""

    finish_reason: str | None
    usage: Usage | None

    def __iter__(self) -> Iterator[ChoiceDelta]: ...

    def close(self) -> None: ...


@runtime_checkable
class Provider(Protocol):
    """A backend that can generate chat completions."""

    name: str

    def check(self, request: ChatRequest) -> None:
        """Raise Unsupported for a parameter this provider cannot honour."""
        ...

    def stream(self, request: ChatRequest) -> ProviderStream: ...

    def complete(self, request: ChatRequest) -> Completion: ...


RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 529})

# An upstream 4xx that names the caller's mistake is answered with its own status and
# kind; 401/403/407 name Sluice's credentials and 408/425 are transient: those stay 502s.
CLIENT_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "unprocessable_entity_error",
}
_NOT_THE_CALLERS = frozenset({401, 403, 407, 408, 425, 429})
# The HTTP status each error `type` is answered with (an unknown type: 500).
ERROR_STATUSES = {kind: status for status, kind in CLIENT_ERROR_TYPES.items()} | {
    "rate_limit_error": 429,
    "cancelled": 409,
    "upstream_error": 502,
    "service_unavailable": 503,
}


def is_client_error(status_code: int) -> bool:
    """Whether an upstream status is the caller's error, answered as it is."""
    return 400 <= status_code < 500 and status_code not in _NOT_THE_CALLERS


def error_status(error: Mapping[str, Any]) -> int:
    """The HTTP status for a job's OpenAI-style error: a timeout 504, else by its type."""
    if error.get("code") == "upstream_timeout":
        return 504
    return ERROR_STATUSES.get(str(error.get("type")), 500)


def is_retryable_status(status_code: int) -> bool:
    """Whether an upstream HTTP status is worth retrying."""
    return status_code in RETRYABLE_STATUSES or status_code >= 500


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms` / `Retry-After` (seconds or HTTP date)."""
    if not headers:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_status(
    status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> ProviderError:
    """Map an upstream HTTP error status to a ProviderError."""
    if status_code == 429:
        return ProviderError(
            message,
            retryable=True,
            status_code=429,
            retry_after=parse_retry_after(headers),
            code="rate_limit_exceeded",
        )
    return ProviderError(
        message,
        retryable=is_retryable_status(status_code),
        status_code=status_code,
        retry_after=parse_retry_after(headers) if status_code >= 500 else None,
    )
