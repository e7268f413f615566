"""One adapter per provider batch API, through the official SDKs (and the mock's own).

Every adapter takes bound requests (the provider's own model name) keyed by custom_id
(Sluice's job id: within Anthropic's `^[a-zA-Z0-9_-]{1,64}$`), and gives back each item's
Outcome in whatever order the provider lists them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from flask import current_app
from redis.typing import EncodableT

from app.extensions import redis_store
from app.providers import ChatRequest, Completion, ProviderError, providers
from app.providers.base import Provider
from app.services.provider_batches.choice import kind_of

T = TypeVar("T")
MB = 1024 * 1024
# (requests, bytes) per provider batch, unless [providers.NAME] says batch_max_requests /
# batch_max_bytes: OpenAI 50,000 requests / 200 MB, Anthropic 100,000 / 256 MB
LIMITS = {
    "openai": (50_000, 200 * MB),
    "anthropic": (100_000, 256 * MB),
    "mock": (100_000, 256 * MB),
}
ANTHROPIC_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


@dataclass(frozen=True)
class Outcome:
    """One item's result from a provider batch."""

    status: str  # succeeded | failed | cancelled | expired
    completion: Completion | None = None
    error: dict[str, Any] | None = None


@dataclass
class Remote:
    """A provider batch as last retrieved."""

    status: str  # the provider's own status
    ended: bool
    final: str = "completed"  # once ended: completed | cancelled | expired | failed
    counts: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # a batch-level failure
    handle: Any = None  # the SDK object, for results
    cancelling: bool = False  # the provider took a cancel and is winding the batch down


class Pending(Exception):
    """Whether a provider batch was created cannot be told yet (a candidate has not ended)."""


def item_error(code: str, message: str, provider: str, **extra: Any) -> dict[str, Any]:
    """An item's error in the OpenAI shape the batch channel stores."""
    return {"message": message, "type": "batch_error", "code": code, "param": None,
            "provider": provider, **extra}  # fmt: skip


class BatchAPI(Protocol):
    name: str
    max_requests: int
    max_bytes: int

    def prepare(self, request: ChatRequest) -> dict[str, Any]:
        """The provider's request body for one item (raises ProviderError if refused)."""
        ...

    def submit(self, bodies: Mapping[str, dict[str, Any]], label: str) -> str: ...

    def find(
        self, label: str, custom_ids: set[str], since: datetime, known: set[str]
    ) -> str | None:
        """The id of a batch created for provider batch `label` but not recorded, if any
        (created after `since`, not in `known`, its requests among `custom_ids`)."""
        ...

    def retrieve(self, remote_id: str) -> Remote: ...

    def cancel(self, remote_id: str) -> None: ...

    def results(
        self, remote_id: str, remote: Remote, requests: Mapping[str, ChatRequest]
    ) -> Iterator[tuple[str, Outcome]]: ...


class _SDKAdapter:
    """What the OpenAI and Anthropic adapters share: the provider's client, mapped errors."""

    def __init__(self, provider: Any, limits: tuple[int, int]) -> None:
        self.provider = provider
        self.name: str = provider.name
        self.max_requests, self.max_bytes = limits

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except ProviderError:
            raise
        except Exception as exc:
            mapped = self.provider._map(exc)
            if mapped is None:
                raise
            raise mapped from exc

    @property
    def client(self) -> Any:
        return self.provider._get_client()


class OpenAIBatchAPI(_SDKAdapter):
    """OpenAI's Files + Batches API: a JSONL input file, a batch, output and error files."""

    def prepare(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = self.provider._params(request)
        return body

    def submit(self, bodies: Mapping[str, dict[str, Any]], label: str) -> str:
        lines = (
            json.dumps(
                {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": b},
                separators=(",", ":"),
            )
            for cid, b in bodies.items()
        )
        data = ("\n".join(lines) + "\n").encode()
        upload = self._call(
            self.client.files.create, file=(f"{label}.jsonl", data), purpose="batch"
        )
        batch = self._call(
            self.client.batches.create,
            input_file_id=upload.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"sluice_provider_batch": label},
        )
        return str(batch.id)

    def find(
        self, label: str, custom_ids: set[str], since: datetime, known: set[str]
    ) -> str | None:
        """OpenAI's batch list (newest first), matched by the metadata submit() set."""

        def scan() -> str | None:
            for batch in self.client.batches.list(limit=100):
                if batch.created_at < since.timestamp():
                    return None
                if (batch.metadata or {}).get("sluice_provider_batch") == label:
                    return str(batch.id)
            return None

        return self._call(scan)

    def retrieve(self, remote_id: str) -> Remote:
        batch = self._call(self.client.batches.retrieve, remote_id)
        status = str(batch.status)
        ended = status in ("completed", "failed", "expired", "cancelled")
        counts = batch.request_counts.model_dump() if batch.request_counts else {}
        error = None
        if status == "failed":
            data = (batch.errors.data if batch.errors else None) or []
            text = "; ".join(f"{e.code}: {e.message}" for e in data) or "the batch failed"
            error = item_error("provider_batch_failed", f"{self.name}: {text}", self.name)
        return Remote(status, ended, status, counts, error, batch, status == "cancelling")

    def cancel(self, remote_id: str) -> None:
        self._call(self.client.batches.cancel, remote_id)

    def results(
        self, remote_id: str, remote: Remote, requests: Mapping[str, ChatRequest]
    ) -> Iterator[tuple[str, Outcome]]:
        batch = remote.handle
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            yield from self._file_outcomes(file_id, requests)

    def _file_outcomes(
        self, file_id: str, requests: Mapping[str, ChatRequest]
    ) -> Iterator[tuple[str, Outcome]]:
        """One results file, streamed line by line (it may be hundreds of MB)."""
        opened = self._call(self.client.files.with_streaming_response.content, file_id)
        with opened as response:
            for raw in response.iter_lines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                custom_id = str(line.get("custom_id"))
                request = requests.get(custom_id)
                if request is not None:
                    yield custom_id, self._outcome(line, request)

    def _outcome(self, line: dict[str, Any], request: ChatRequest) -> Outcome:
        from app.providers.openai_provider import completion_from_body

        response = line.get("response") or None
        error = line.get("error") or None
        if response and response.get("status_code") == 200:
            return Outcome("succeeded", completion_from_body(response.get("body"), request))
        if response:
            body = (response.get("body") or {}).get("error") or {}
            status = response.get("status_code")
            err = {
                "message": f"{self.name}: {body.get('message') or 'the request failed'}",
                "type": body.get("type") or "upstream_error",
                "code": body.get("code") or "upstream_error",
                "param": body.get("param"),
                "status_code": status,
                "provider": self.name,
            }
            return Outcome("failed", error=err)
        code = str((error or {}).get("code") or "failed")
        message = f"{self.name}: {(error or {}).get('message') or 'no result'}"
        if code == "batch_expired":
            return Outcome("expired", error=item_error(code, message, self.name))
        if code == "batch_cancelled":
            return Outcome("cancelled", error=item_error(code, message, self.name))
        return Outcome("failed", error=item_error(code, message, self.name))


class AnthropicBatchAPI(_SDKAdapter):
    """Anthropic's Message Batches: requests inline, a results JSONL stream."""

    def prepare(self, request: ChatRequest) -> dict[str, Any]:
        params = dict(self.provider._translate(request).params)
        extra = params.pop("extra_body", None) or {}
        params.update(extra)
        return params

    def submit(self, bodies: Mapping[str, dict[str, Any]], label: str) -> str:
        betas: set[str] = set()
        requests = []
        for cid, params in bodies.items():
            params = dict(params)
            headers = params.pop("extra_headers", None) or {}
            if beta := headers.get("anthropic-beta"):
                betas.add(str(beta))
            requests.append({"custom_id": cid, "params": params})
        extra = {"anthropic-beta": ",".join(sorted(betas))} if betas else None
        batch = self._call(
            self.client.messages.batches.create, requests=requests, extra_headers=extra
        )
        return str(batch.id)

    def find(
        self, label: str, custom_ids: set[str], since: datetime, known: set[str]
    ) -> str | None:
        """Anthropic's batch list (newest first; batches carry no metadata): an unrecorded
        batch whose results' custom_ids are this row's items. Raises Pending while such a
        candidate has not ended (its results cannot be read yet)."""

        def scan() -> str | None:
            pending = False
            for batch in self.client.messages.batches.list(limit=100):
                if batch.created_at < since:
                    break
                counts = batch.request_counts.model_dump()
                if batch.id in known or not 0 < sum(counts.values()) <= len(custom_ids):
                    continue
                if batch.processing_status != "ended":
                    pending = True
                    continue
                ids = {item.custom_id for item in self.client.messages.batches.results(batch.id)}
                if ids and ids <= custom_ids:
                    return str(batch.id)
            if pending:
                raise Pending(f"{self.name}: an unrecorded batch has not ended yet")
            return None

        return self._call(scan)

    def retrieve(self, remote_id: str) -> Remote:
        batch = self._call(self.client.messages.batches.retrieve, remote_id)
        counts = batch.request_counts.model_dump()
        ended = batch.processing_status == "ended"
        final = "completed"
        if batch.cancel_initiated_at is not None:
            final = "cancelled"
        elif counts.get("expired"):
            final = "expired"
        cancelling = batch.cancel_initiated_at is not None
        return Remote(str(batch.processing_status), ended, final, counts, None, batch, cancelling)

    def cancel(self, remote_id: str) -> None:
        self._call(self.client.messages.batches.cancel, remote_id)

    def results(
        self, remote_id: str, remote: Remote, requests: Mapping[str, ChatRequest]
    ) -> Iterator[tuple[str, Outcome]]:
        from app.providers.anthropic_provider import completion_from_message

        for item in self._call(self.client.messages.batches.results, remote_id):
            request = requests.get(item.custom_id)
            if request is None:
                continue
            result = item.result
            if result.type == "succeeded":
                fmt = self.provider._translate(request).format_tool
                message = result.message.model_dump(mode="json")
                outcome = Outcome("succeeded", completion_from_message(message, fmt))
            elif result.type == "errored":
                inner = result.error.error
                kind = str(getattr(inner, "type", "api_error"))
                outcome = Outcome("failed", error={
                    "message": f"{self.name}: {getattr(inner, 'message', 'the request failed')}",
                    "type": kind,
                    "code": kind,
                    "param": None,
                    "status_code": ANTHROPIC_STATUS.get(kind, 500),
                    "provider": self.name,
                })  # fmt: skip
            elif result.type == "canceled":
                message = (
                    f"{self.name}: the provider cancelled this request (the batch was cancelled)"
                )
                outcome = Outcome(
                    "cancelled", error=item_error("batch_cancelled", message, self.name)
                )
            else:
                message = f"{self.name}: the provider's batch expired before this request ran"
                outcome = Outcome("expired", error=item_error("batch_expired", message, self.name))
            yield item.custom_id, outcome


class MockBatchAPI:
    """The mock provider's batch API, in-process: a batch ends MOCK_BATCH_SECONDS after it
    was created (its state is a Redis hash), then every item is answered as `complete()`
    would, without the mock's pacing. So `make dev` shows the provider executor without keys.
    """

    KEY = "sluice:mockbatch:{}"
    LABEL_KEY = "sluice:mockbatch:label:{}"
    TTL = 7 * 86400

    def __init__(self, provider: Any, limits: tuple[int, int]) -> None:
        from app.providers.mock import MockProvider

        self.name: str = provider.name
        self.max_requests, self.max_bytes = limits
        self.provider = MockProvider(
            provider.name, replace(provider.settings, ttft_ms=0.0, tokens_per_second=0.0)
        )

    def prepare(self, request: ChatRequest) -> dict[str, Any]:
        self.provider.check(request)
        return request.to_record()

    def submit(self, bodies: Mapping[str, dict[str, Any]], label: str) -> str:
        remote_id = "mockbatch_" + uuid.uuid4().hex[:24]
        state: dict[EncodableT, EncodableT] = {"created": time.time(), "total": len(bodies)}
        redis_store.client.hset(self.KEY.format(remote_id), mapping=state)
        redis_store.client.expire(self.KEY.format(remote_id), self.TTL)
        redis_store.client.set(self.LABEL_KEY.format(label), remote_id, ex=self.TTL)
        return remote_id

    def find(
        self, label: str, custom_ids: set[str], since: datetime, known: set[str]
    ) -> str | None:
        found = redis_store.client.get(self.LABEL_KEY.format(label))
        return None if found is None else found.decode() if isinstance(found, bytes) else str(found)

    def _state(self, remote_id: str) -> dict[str, float]:
        raw = redis_store.client.hgetall(self.KEY.format(remote_id))
        if not raw:
            raise ProviderError(
                f"{self.name}: no batch {remote_id}", retryable=False, status_code=404
            )
        return {str(k): float(v) for k, v in raw.items()}

    def retrieve(self, remote_id: str) -> Remote:
        state = self._state(remote_id)
        if "cancelled" in state:
            return Remote("ended", True, "cancelled", {"canceled": int(state["total"])})
        done = time.time() >= state["created"] + current_app.config["MOCK_BATCH_SECONDS"]
        counts = {"processing": 0 if done else int(state["total"])}
        return Remote("ended" if done else "in_progress", done, "completed", counts)

    def cancel(self, remote_id: str) -> None:
        redis_store.client.hset(self.KEY.format(remote_id), "cancelled", time.time())

    def results(
        self, remote_id: str, remote: Remote, requests: Mapping[str, ChatRequest]
    ) -> Iterator[tuple[str, Outcome]]:
        for custom_id, request in requests.items():
            if remote.final == "cancelled":
                message = f"{self.name}: the batch was cancelled before this request ran"
                yield (
                    custom_id,
                    Outcome("cancelled", error=item_error("batch_cancelled", message, self.name)),
                )
                continue
            try:
                yield custom_id, Outcome("succeeded", self.provider.complete(request))
            except ProviderError as exc:
                error = exc.to_openai_error() | {"status_code": exc.status_code}
                yield custom_id, Outcome("failed", error=error)


def batch_api(name: str) -> BatchAPI:
    """The batch API adapter of provider `name`."""
    provider: Provider = providers().get(name)
    kind = kind_of(name)
    table = (current_app.config.get("PROVIDERS") or {}).get(name) or {}
    default = LIMITS.get(kind, LIMITS["openai"])
    limits = (
        int(table.get("batch_max_requests", default[0])),
        int(table.get("batch_max_bytes", default[1])),
    )
    if kind == "mock":
        return MockBatchAPI(provider, limits)
    if kind == "anthropic":
        return AnthropicBatchAPI(provider, limits)
    return OpenAIBatchAPI(provider, limits)
