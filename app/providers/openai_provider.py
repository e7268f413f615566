"""OpenAI and OpenAI-compatible chat completions via the official `openai` SDK."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai

from app.providers.base import (
    ChatRequest,
    ChoiceDelta,
    Completion,
    ProviderError,
    Usage,
)
from app.providers.errors import RawResponse
from app.providers.messages import estimate_tokens
from app.providers.sdk import SDKProvider
from app.providers.streaming import RawSSEStream
from app.providers.transport import lean_client

_FINISH_REASONS = {"function_call": "tool_calls"}
LIST_MODELS_TIMEOUT = 10.0


def _finish_reason(value: str | None) -> str:
    """Normalise an OpenAI finish reason."""
    return _FINISH_REASONS.get(value or "stop", value or "stop")


class OpenAIStream(RawSSEStream):
    """A streamed chat completion, parsed from the raw SSE body."""

    def _handle(self, event: str | None, data: Any) -> list[ChoiceDelta] | None:
        """Take usage from the usage chunk and the choice deltas from the others."""
        if not isinstance(data, dict):
            return None
        if data.get("error"):
            error = data["error"]
            message = error.get("message") if isinstance(error, dict) else None
            if not isinstance(message, str) or not message:
                message = "An error occurred during streaming"
            raise self._stream_error(message)
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
        choices = data.get("choices")
        if not choices:
            return None
        out: list[ChoiceDelta] = []
        for choice in choices:
            if isinstance(choice, dict) and (item := self._choice(choice)) is not None:
                out.append(item)
        return out

    def _choice(self, choice: dict[str, Any]) -> ChoiceDelta | None:
        """One upstream choice as a choice delta (no role, no null or empty fields)."""
        index = choice.get("index") or 0
        raw = choice.get("delta")
        delta = {
            k: v
            for k, v in (raw.items() if isinstance(raw, dict) else ())
            if k != "role" and v is not None and v != ""
        }
        item: ChoiceDelta = {"index": index, "delta": delta}
        if choice.get("logprobs") is not None:
            item["logprobs"] = choice["logprobs"]
        if reason := choice.get("finish_reason"):
            item["finish_reason"] = _finish_reason(reason)
            if index == 0:
                self.finish_reason = item["finish_reason"]
        return item if delta or len(item) > 2 else None


class OpenAIProvider(SDKProvider):
    """Chat completions against api.openai.com or any OpenAI-compatible server.

    Every parameter is carried as sent, unknown top-level keys included (as the SDK's
    `extra_body` would): the upstream is the judge of what it supports.
    """

    sdk = openai

    def __init__(
        self,
        name: str = "openai",
        *,
        api_key: str | Callable[[], str | None] | None,
        base_url: str | None = None,
        timeout: float = 600.0,
        key_hint: str = "OPENAI_API_KEY",
    ) -> None:
        super().__init__(
            name, api_key=api_key, base_url=base_url, timeout=timeout, key_hint=key_hint
        )

    def _make_client(self, api_key: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=api_key,
            base_url=self._base_url,
            timeout=self._timeout,
            max_retries=0,
            http_client=lean_client(self._timeout),
        )

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        """The request body: the stored record minus Sluice's own streaming fields."""
        body = request.to_record()
        body.pop("stream", None)
        body.pop("stream_options", None)
        return body

    def _post(self, body: dict[str, Any], *, stream: bool) -> Any:
        """POST /chat/completions through the SDK client; the raw (unparsed) HTTP response.

        The SDK builds and sends the request (base URL, auth, headers, timeout) and raises
        its own errors for HTTP error statuses; the body is left to the lean parsers here,
        and the typed `create()` wrapper, whose per-call walk over the params costs about a
        third of a millisecond per message list, is skipped.
        """
        client = self._get_client()
        try:
            return client.post("/chat/completions", cast_to=RawResponse, body=body, stream=stream)
        except Exception as exc:
            mapped = self._map(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def stream(self, request: ChatRequest) -> OpenAIStream:
        """Start a streamed completion; HTTP errors raise here, later ones during iteration."""
        body = self._params(request) | {"stream": True, "stream_options": {"include_usage": True}}
        stream = OpenAIStream(self._post(body, stream=True), request, self._map)
        stream.provider_name = self.name
        return stream

    def list_models(self) -> list[str]:
        """The upstream's own model ids (`GET /models`)."""
        client = self._get_client().with_options(timeout=LIST_MODELS_TIMEOUT)
        try:
            response = client.get("/models", cast_to=RawResponse)
            body = json.loads(response.content)
        except ValueError:
            raise ProviderError(f"{self.name}: undecodable /models body", retryable=True) from None
        except Exception as exc:
            raise self._map(exc) or exc from exc
        data = body.get("data") if isinstance(body, dict) else None
        return [str(m["id"]) for m in data or [] if isinstance(m, dict) and m.get("id")]

    def complete(self, request: ChatRequest) -> Completion:
        """Run a non-streaming completion (raw SDK response, decoded without models)."""
        response = self._post(self._params(request), stream=False)
        try:
            body = json.loads(response.content)
        except ValueError:
            raise ProviderError(
                f"{self.name}: undecodable response body {response.content[:200]!r}",
                retryable=True,
                code="upstream_error",
            ) from None
        return completion_from_body(body, request)


def completion_from_body(body: Any, request: ChatRequest) -> Completion:
    """A Completion from an OpenAI `chat.completion` JSON body."""
    body = body if isinstance(body, dict) else {}
    raw_choices = [c for c in body.get("choices") or [] if isinstance(c, dict)] or [{}]
    choices = [_completion_choice(c, i) for i, c in enumerate(raw_choices)]
    completion = Completion(choices, Usage())
    raw_usage = body.get("usage")
    if isinstance(raw_usage, dict):
        usage = Usage(
            int(raw_usage.get("prompt_tokens") or 0), int(raw_usage.get("completion_tokens") or 0)
        )
    else:
        usage = Usage(estimate_tokens(request.messages), len(completion.text.split()))
    return Completion(choices, usage)


def _completion_choice(raw: dict[str, Any], position: int) -> dict[str, Any]:
    """One `chat.completion` choice, with its role and a normalised finish reason."""
    message = raw.get("message")
    message = dict(message) if isinstance(message, dict) else {}
    message.setdefault("role", "assistant")
    message.setdefault("content", None)
    return {
        "index": raw.get("index", position),
        "message": message,
        "logprobs": raw.get("logprobs"),
        "finish_reason": _finish_reason(raw.get("finish_reason")),
    }
