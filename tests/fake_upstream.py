"""A real HTTP server speaking the OpenAI and Anthropic wire formats, for tests and benchmarks."""

# The request's model name picks the behaviour: `echo` repeats the last user message, a
# name registered with `add_scenario` (or `POST /_scenarios`) follows its script, and any
# other name produces deterministic text. Options may ride in the name, as in
# `fake?ttft_ms=100&tps=200&tokens=40`; they override the scenario and server defaults.
# A scenario may answer with tool calls (their arguments streamed in small fragments) or a
# refusal; `n` and `logprobs` in the request are honoured; every request body is recorded.

from __future__ import annotations

import argparse
import dataclasses
import email.policy
import json
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

from app.providers.messages import content_text, estimate_tokens, last_user_text
from app.providers.mock_answers import mock_words, split_tokens


@dataclass(frozen=True)
class Scenario:
    """A scripted upstream behaviour; unset fields fall back to the server defaults."""

    deltas: list[str] | None = None
    echo: bool = False
    tokens: int | None = None
    ttft_ms: float | None = None
    tps: float | None = None
    delay_ms: float | None = None
    status: int | None = None
    retry_after: str | None = None
    fail_times: int | None = None
    error_after: int | None = None
    drop_after: int | None = None
    finish_reason: str = "stop"
    message: str = "scripted failure from the fake upstream"
    tool_calls: list[dict[str, str]] | None = None  # [{"id", "name", "arguments"}]
    refusal: str | None = None
    fragment: int = 3  # characters per streamed tool-call arguments fragment
    # canned OpenAI chunks, sent as given: (choice index, delta, logprobs) and finish per choice
    chunks: list[tuple[int, dict[str, Any], Any]] | None = None
    finishes: dict[int, str] | None = None


_CONVERTERS: dict[str, Any] = {
    "tokens": int,
    "ttft_ms": float,
    "tps": float,
    "delay_ms": float,
    "status": int,
    "retry_after": str,
    "fail_times": int,
    "error_after": int,
    "drop_after": int,
    "finish_reason": str,
    "message": str,
    "echo": lambda v: str(v).lower() in ("1", "true", "yes"),
    "tool_calls": lambda v: [
        {"id": str(c["id"]), "name": str(c["name"]), "arguments": str(c["arguments"])} for c in v
    ],
    "refusal": str,
    "fragment": int,
    "chunks": list,
    "finishes": dict,
}

_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def scenario_from_options(options: dict[str, Any], base: Scenario | None = None) -> Scenario:
    """Build a Scenario from loosely typed options (JSON body or query string)."""
    values: dict[str, Any] = {}
    for key, raw in options.items():
        if key == "deltas":
            values["deltas"] = [str(d) for d in raw] if raw is not None else None
        elif key in _CONVERTERS:
            values[key] = None if raw is None else _CONVERTERS[key](raw)
        elif key != "name":
            raise ValueError(f"unknown scenario option {key!r}")
    return dataclasses.replace(base or Scenario(), **values)


class _Server(ThreadingHTTPServer):
    """A threaded server with a deep accept backlog and daemon handler threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    upstream: FakeUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hang up; report anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FakeUpstream:
    """The fake provider server; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ttft_ms: float = 0.0,
        tps: float = 0.0,
        tokens: int = 20,
        delay_ms: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.defaults = Scenario(tokens=tokens, ttft_ms=ttft_ms, tps=tps, delay_ms=delay_ms)
        self._scenarios: dict[str, Scenario] = {}
        self._requests: Counter[str] = Counter()
        self._disconnects: Counter[str] = Counter()
        self._bodies: dict[str, list[dict[str, Any]]] = {}
        self._headers: dict[str, dict[str, str]] = {}
        self.models: list[str] = ["gpt-fake", "gpt-fake-mini"]  # what GET /v1/models lists
        self.model_list_requests = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.batches = BatchAPIs()  # OpenAI Files + Batches, Anthropic Message Batches

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        """Bind and serve in a background thread."""
        self.stopping.clear()
        self._server = _Server((self.host, self.port), _Handler)
        self._server.upstream = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; open streams are cut at their next delta."""
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The server's root URL."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The base_url for the openai SDK."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The base_url for the anthropic SDK (which adds /v1 itself)."""
        return self.url

    # -- scenarios ---------------------------------------------------------------------------

    def add_scenario(self, name: str, scenario: Scenario | None = None, **options: Any) -> None:
        """Register a scripted behaviour for model `name` (resets its request log)."""
        built = scenario_from_options(options, scenario or Scenario())
        with self._lock:
            self._scenarios[name] = built
            self._requests.pop(name, None)
            self._disconnects.pop(name, None)

    def requests(self, name: str) -> int:
        """How many requests named this model (ignoring any `?options`)."""
        with self._lock:
            return self._requests[name]

    def disconnects(self, name: str) -> int:
        """How many streams for this model the client abandoned before the end."""
        with self._lock:
            return self._disconnects[name]

    def last_request(self, name: str) -> dict[str, Any] | None:
        """The JSON body of the latest request for this model."""
        with self._lock:
            bodies = self._bodies.get(name)
            return bodies[-1] if bodies else None

    def last_headers(self, name: str) -> dict[str, str]:
        """The HTTP headers (lower-cased names) of the latest request for this model."""
        with self._lock:
            return dict(self._headers.get(name) or {})

    def bodies(self, name: str) -> list[dict[str, Any]]:
        """The JSON bodies of every request for this model, oldest first."""
        with self._lock:
            return list(self._bodies.get(name) or [])

    def reset(self) -> None:
        """Forget all scenarios and request logs (and every provider batch)."""
        self.batches = BatchAPIs()
        with self._lock:
            self._scenarios.clear()
            self._requests.clear()
            self._disconnects.clear()
            self._bodies.clear()
            self._headers.clear()

    def _begin(
        self, model: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[str, Scenario, int]:
        """Resolve a model to (name, scenario, attempt number) and log the request."""
        name, _, query = model.partition("?")
        with self._lock:
            base = self._scenarios.get(name)
            self._requests[name] += 1
            attempt = self._requests[name]
            self._bodies.setdefault(name, []).append(body)
            self._headers[name] = headers or {}
        if base is None:
            base = Scenario(echo=name == "echo")
        scenario = scenario_from_options(dict(parse_qsl(query)), base) if query else base
        return name, scenario, attempt

    def _note_disconnect(self, name: str) -> None:
        """Record a stream the client abandoned."""
        with self._lock:
            self._disconnects[name] += 1

    def _setting(self, scenario: Scenario, key: str) -> Any:
        """A scenario value, else the server default."""
        value = getattr(scenario, key)
        return getattr(self.defaults, key) if value is None else value


class _Abort(Exception):
    """The stream must end now (client gone or server stopping)."""


@dataclass
class _Plan:
    """What one request will produce."""

    name: str
    model: str
    scenario: Scenario
    deltas: list[str]
    finish_reason: str
    prompt_tokens: int
    ttft: float
    interval: float
    fail: bool = False
    received: float = 0.0
    choices: int = 1
    top_logprobs: int | None = None  # None: no logprobs asked for

    @property
    def finish(self) -> str:
        """The finish reason (OpenAI terms): tool_calls when the scenario calls tools."""
        return "tool_calls" if self.scenario.tool_calls else self.finish_reason


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the OpenAI, Anthropic and control endpoints."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""

    @property
    def upstream(self) -> FakeUpstream:
        return self.server.upstream

    # -- plumbing ----------------------------------------------------------------------------

    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError as exc:
            raise _Abort from exc

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError as exc:
            raise _Abort from exc

    def _drop(self) -> None:
        """Cut the connection without finishing the chunked body."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _wait_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0 and self.upstream.stopping.wait(delay):
            raise _Abort

    # -- routing -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        if handle_batch_api(self, "GET"):  # provider batch APIs: see their section below
            return
        if self.path.rstrip("/") == "/v1/models":
            self._list_models()
        elif self.path in ("/_health", "/health"):
            self._send_json(200, {"ok": True})
        elif self.path.startswith("/_scenarios/"):
            name = self.path.removeprefix("/_scenarios/")
            counts = {
                "requests": self.upstream.requests(name),
                "disconnects": self.upstream.disconnects(name),
            }
            self._send_json(200, counts)
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_DELETE(self) -> None:
        if self.path == "/_scenarios":
            self.upstream.reset()
            self._send_json(200, {"ok": True})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if handle_batch_api(self, "POST"):  # provider batch APIs: see their section below
            return
        received = time.monotonic()
        try:
            body = self._read_json()
        except ValueError:
            self._send_json(400, {"error": {"message": "body is not JSON"}})
            return
        if self.path == "/_scenarios":
            try:
                name = str(body.pop("name"))
                self.upstream.add_scenario(name, **body)
            except (KeyError, TypeError, ValueError) as exc:
                self._send_json(400, {"error": {"message": f"bad scenario: {exc}"}})
                return
            self._send_json(201, {"ok": True})
        elif self.path.rstrip("/") == "/v1/chat/completions":
            self._serve("openai", body, received)
        elif self.path.split("?")[0].rstrip("/") == "/v1/messages":
            self._serve("anthropic", body, received)
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def _list_models(self) -> None:
        """GET /v1/models in OpenAI's list format (counted in `model_list_requests`)."""
        if not self._authorised("openai"):
            self._send_error("openai", 401, Scenario(message="missing API key"))
            return
        with self.upstream._lock:
            self.upstream.model_list_requests += 1
            names = list(self.upstream.models)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]
        self._send_json(200, {"object": "list", "data": data})

    # -- generation --------------------------------------------------------------------------

    def _plan(self, body: dict[str, Any], received: float) -> _Plan:
        up = self.upstream
        model = str(body.get("model", ""))
        headers = {key.lower(): value for key, value in self.headers.items()}
        name, scenario, attempt = up._begin(model, body, headers)
        messages = list(body.get("messages") or [])
        if isinstance(body.get("system"), str):
            messages.insert(0, {"role": "system", "content": body["system"]})
        if scenario.deltas is not None:
            deltas = list(scenario.deltas)
        elif scenario.echo:
            deltas = split_tokens(last_user_text(messages))
        else:
            words = mock_words(
                f"{model}\n{last_user_text(messages)}", up._setting(scenario, "tokens")
            )
            deltas = [w if i == 0 else " " + w for i, w in enumerate(words)]
        finish = scenario.finish_reason
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and 0 <= limit < len(deltas):
            deltas, finish = deltas[:limit], "length"
        tps = up._setting(scenario, "tps")
        plan = _Plan(
            name=name,
            model=model,
            scenario=scenario,
            deltas=deltas,
            finish_reason=finish,
            prompt_tokens=estimate_tokens(
                [{"content": content_text(m.get("content"))} for m in messages]
            ),
            ttft=up._setting(scenario, "ttft_ms") / 1000,
            interval=1 / tps if tps and tps > 0 else 0.0,
            received=received,
        )
        n = body.get("n")
        plan.choices = n if isinstance(n, int) and n > 0 else 1
        if body.get("logprobs"):
            plan.top_logprobs = int(body.get("top_logprobs") or 0)
        plan.fail = scenario.status is not None and (
            scenario.fail_times is None or attempt <= scenario.fail_times
        )
        return plan

    def _authorised(self, kind: str) -> bool:
        """Whether the request carries an API key the way the real API expects it."""
        bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if kind == "openai":
            return bool(bearer)
        return bool(self.headers.get("x-api-key") or bearer)

    def _serve(self, kind: str, body: dict[str, Any], received: float) -> None:
        if not self._authorised(kind):
            self._send_error(kind, 401, Scenario(message="missing API key"))
            return
        try:
            plan = self._plan(body, received)
        except (TypeError, ValueError) as exc:
            self._send_error(kind, 400, Scenario(message=f"fake upstream: {exc}"))
            return
        scenario = plan.scenario
        if plan.fail:
            self._send_error(kind, int(scenario.status or 500), scenario)
            return
        if not body.get("stream"):
            delay = plan.received + self.upstream._setting(scenario, "delay_ms") / 1000
            if delay > time.monotonic():
                self.upstream.stopping.wait(delay - time.monotonic())
            payload = self._openai_body(plan) if kind == "openai" else self._anthropic_body(plan)
            self._send_json(200, payload)
            return
        self._start_stream()
        events = (
            self._openai_events(plan, body) if kind == "openai" else self._anthropic_events(plan)
        )
        try:
            self._run_stream(plan, events)
        except _Abort:
            self.close_connection = True
            self.upstream._note_disconnect(plan.name)

    def _run_stream(self, plan: _Plan, events: Iterator[tuple[str, str]]) -> None:
        """Write events, pacing deltas; honour error_after / drop_after."""
        start = plan.received
        sent = 0
        scenario = plan.scenario
        for kind, text in events:
            if kind == "delta":
                if sent == scenario.drop_after:
                    self._drop()
                    return
                if sent == scenario.error_after:
                    self._chunk(self._error_event(scenario.message))
                    self._end_stream()
                    return
                self._wait_until(start + plan.ttft + sent * plan.interval)
                sent += 1
            elif kind == "finish":
                if scenario.drop_after is not None and sent >= scenario.drop_after:
                    self._drop()
                    return
                if scenario.error_after is not None and sent >= scenario.error_after:
                    self._chunk(self._error_event(scenario.message))
                    self._end_stream()
                    return
            self._chunk(text)
        self._end_stream()

    # -- error replies -----------------------------------------------------------------------

    def _send_error(self, kind: str, status: int, scenario: Scenario) -> None:
        headers = {"Retry-After": str(scenario.retry_after)} if scenario.retry_after else {}
        if kind == "openai":
            error_type = _OPENAI_ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            )
            payload: dict[str, Any] = {
                "error": {
                    "message": scenario.message,
                    "type": error_type,
                    "param": None,
                    "code": None,
                }
            }
        else:
            error_type = _ANTHROPIC_ERROR_TYPES.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
            payload = {"type": "error", "error": {"type": error_type, "message": scenario.message}}
        self._send_json(status, payload, headers)

    # -- OpenAI wire format ------------------------------------------------------------------

    @staticmethod
    def _openai_usage(plan: _Plan) -> dict[str, int]:
        completion = len([d for d in plan.deltas if d])
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": plan.prompt_tokens + completion,
        }

    @staticmethod
    def _logprob(plan: _Plan, token: str) -> dict[str, Any]:
        """One logprobs `content` entry for a token, with `top_logprobs` alternatives."""
        entry = {"token": token, "logprob": -0.25, "bytes": list(token.encode())}
        tops = [dict(entry, logprob=-0.25 - rank) for rank in range(plan.top_logprobs or 0)]
        return {**entry, "top_logprobs": tops}

    def _logprobs(self, plan: _Plan, tokens: list[str]) -> dict[str, Any] | None:
        if plan.top_logprobs is None or plan.scenario.refusal is not None:
            return None
        return {"content": [self._logprob(plan, t) for t in tokens if t], "refusal": None}

    def _openai_message(self, plan: _Plan) -> dict[str, Any]:
        scenario = plan.scenario
        text = "".join(plan.deltas)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if scenario.refusal is not None:
            message.update(content=None, refusal=scenario.refusal)
        if scenario.tool_calls:
            message["content"] = text or None
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for call in scenario.tool_calls
            ]
        return message

    def _openai_body(self, plan: _Plan) -> dict[str, Any]:
        logprobs = self._logprobs(plan, plan.deltas)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [
                {
                    "index": i,
                    "message": self._openai_message(plan),
                    "logprobs": logprobs,
                    "finish_reason": plan.finish,
                }
                for i in range(plan.choices)
            ],
            "usage": self._openai_usage(plan),
            "system_fingerprint": None,
        }

    def _openai_steps(self, plan: _Plan) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """(delta, logprobs) per streamed step of one choice: refusal, content, tool calls."""
        scenario = plan.scenario
        if scenario.refusal is not None:
            return [({"refusal": piece}, None) for piece in split_tokens(scenario.refusal)]
        steps = [({"content": d}, self._logprobs(plan, [d])) for d in plan.deltas]
        size = max(1, scenario.fragment)
        for k, call in enumerate(scenario.tool_calls or []):
            header = {"index": k, "id": call["id"], "type": "function"}
            header["function"] = {"name": call["name"], "arguments": ""}
            steps.append(({"tool_calls": [header]}, None))
            arguments = call["arguments"]
            for at in range(0, len(arguments), size):
                fragment = {"index": k, "function": {"arguments": arguments[at : at + size]}}
                steps.append(({"tool_calls": [fragment]}, None))
        return steps

    def _openai_events(self, plan: _Plan, body: dict[str, Any]) -> Iterator[tuple[str, str]]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": plan.model,
            "system_fingerprint": None,
        }
        if plan.scenario.chunks is not None:
            yield from self._canned_events(plan.scenario, base, include_usage)
            return
        if include_usage:
            base["usage"] = None

        def chunk(
            delta: dict[str, Any],
            finish: str | None = None,
            index: int = 0,
            logprobs: dict[str, Any] | None = None,
        ) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'choices': [choice]}, ensure_ascii=False)}\n\n"

        for i in range(plan.choices):
            yield "start", chunk({"role": "assistant", "content": "", "refusal": None}, index=i)
        for delta, logprobs in self._openai_steps(plan):
            for i in range(plan.choices):
                yield "delta", chunk(delta, index=i, logprobs=logprobs)
        for i in range(plan.choices):
            yield "finish", chunk({}, plan.finish, index=i)
        if include_usage:
            usage = {**base, "choices": [], "usage": self._openai_usage(plan)}
            yield "usage", f"data: {json.dumps(usage)}\n\n"
        yield "done", "data: [DONE]\n\n"

    @staticmethod
    def _canned_events(
        scenario: Scenario, base: dict[str, Any], include_usage: bool
    ) -> Iterator[tuple[str, str]]:
        """A scenario's canned chunks, between a role chunk and a finish chunk per choice."""
        chunks, finishes = scenario.chunks or [], scenario.finishes or {0: "stop"}

        def chunk(index: int, delta: dict[str, Any], lp: Any = None, finish: Any = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'choices': [choice]}, ensure_ascii=False)}\n\n"

        for index in sorted(finishes):
            yield "start", chunk(index, {"role": "assistant", "content": None, "refusal": None})
        for index, delta, logprobs in chunks:
            yield "delta", chunk(index, delta, logprobs)
        for index, reason in sorted(finishes.items()):
            yield "finish", chunk(index, {}, None, reason)
        if include_usage:
            usage = {"prompt_tokens": 3, "completion_tokens": len(chunks), "total_tokens": 0}
            yield "usage", f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "done", "data: [DONE]\n\n"

    # -- Anthropic wire format ---------------------------------------------------------------

    def _anthropic_body(self, plan: _Plan) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if plan.deltas or not plan.scenario.tool_calls:
            content.append({"type": "text", "text": "".join(plan.deltas)})
        for call in plan.scenario.tool_calls or []:
            content.append(
                {
                    "type": "tool_use",
                    "id": call["id"],
                    "name": call["name"],
                    "input": json.loads(call["arguments"] or "{}"),
                }
            )
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": content,
            "stop_reason": _ANTHROPIC_STOP.get(plan.finish, "end_turn"),
            "stop_sequence": None,
            "usage": {
                "input_tokens": plan.prompt_tokens,
                "output_tokens": len([d for d in plan.deltas if d]),
            },
        }

    def _anthropic_events(self, plan: _Plan) -> Iterator[tuple[str, str]]:
        def event(name: str, data: dict[str, Any]) -> str:
            return (
                f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"
            )

        message = {**self._anthropic_body(plan), "content": [], "stop_reason": None}
        message["usage"] = {"input_tokens": plan.prompt_tokens, "output_tokens": 1}
        yield "start", event("message_start", {"message": message})
        block = 0
        if plan.deltas or not plan.scenario.tool_calls:
            text_block = {"index": 0, "content_block": {"type": "text", "text": ""}}
            yield "start", event("content_block_start", text_block)
            yield "start", event("ping", {})
            for delta in plan.deltas:
                text = {"index": 0, "delta": {"type": "text_delta", "text": delta}}
                yield "delta", event("content_block_delta", text)
            yield "finish", event("content_block_stop", {"index": 0})
            block = 1
        size = max(1, plan.scenario.fragment)
        for call in plan.scenario.tool_calls or []:
            use = {"type": "tool_use", "id": call["id"], "name": call["name"], "input": {}}
            yield "delta", event("content_block_start", {"index": block, "content_block": use})
            arguments = call["arguments"]
            for at in range(0, len(arguments), size):
                piece = {"type": "input_json_delta", "partial_json": arguments[at : at + size]}
                yield "delta", event("content_block_delta", {"index": block, "delta": piece})
            yield "finish", event("content_block_stop", {"index": block})
            block += 1
        stop = {
            "stop_reason": _ANTHROPIC_STOP.get(plan.finish, "end_turn"),
            "stop_sequence": None,
        }
        usage = {"output_tokens": len([d for d in plan.deltas if d])}
        yield "end", event("message_delta", {"delta": stop, "usage": usage})
        yield "end", event("message_stop", {})

    def _error_event(self, message: str) -> str:
        """A mid-stream error in the wire format of the current endpoint."""
        if self.path.rstrip("/") == "/v1/chat/completions":
            error = {"message": message, "type": "server_error", "param": None, "code": None}
            return f"data: {json.dumps({'error': error})}\n\n"
        data = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
        return f"event: error\ndata: {json.dumps(data)}\n\n"


# =============================================================================================
# Provider batch APIs (issue #13): OpenAI's Files + Batches API and Anthropic's Message
# Batches, in their wire formats, for Sluice's `executor = "provider"`.
#
# Every request of a batch is answered when the batch is created (by the same generation
# code as a direct call: scenarios, `?options` in the model name and failures apply), but
# each one only "finishes" at its own moment, spread over `processing_s` in a shuffled order,
# so results come out of order, a cancel keeps what finished before it, and an expiry
# (`expire_after_s`) expires what had not. Results files list the finished requests
# shuffled. `max_requests` bounds one batch (a larger one is refused, as the real APIs do).
# =============================================================================================

_ANTHROPIC_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_OPENAI_EXPIRED = "This request could not be executed before the completion window expired."
_OPENAI_CANCELLED = "This request was not executed because the batch was cancelled."


@dataclass
class FakeFile:
    """An OpenAI file held in memory."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass
class FakeBatch:
    """One provider batch: its requests' answers, and when each one finishes."""

    kind: str  # "openai" | "anthropic"
    id: str
    created: float  # unix time
    custom_ids: list[str]
    answers: dict[str, tuple[bool, int, dict[str, Any]]]  # custom_id -> (ok, status, body)
    done_at: dict[str, float]
    expires_at: float
    cancel_s: float
    expire_at: float | None = None  # the fake's own early expiry (expire_after_s)
    cancel_at: float | None = None
    input_file_id: str | None = None
    endpoint: str = "/v1/chat/completions"
    completion_window: str = "24h"
    metadata: dict[str, Any] | None = None
    model: str | None = None
    failed_errors: list[dict[str, Any]] | None = None  # OpenAI: failed validation
    output_file_id: str | None = None
    error_file_id: str | None = None

    def cutoff(self) -> float | None:
        """The moment after which nothing more finishes (cancel or expiry), if any."""
        if self.cancel_at is not None:
            return self.cancel_at
        last = max(self.done_at.values(), default=self.created)
        if self.expire_at is not None and last > self.expire_at:
            return self.expire_at
        return None

    def ended_at(self) -> float:
        if self.cancel_at is not None:
            return self.cancel_at + self.cancel_s
        cut = self.cutoff()
        return cut if cut is not None else max(self.done_at.values(), default=self.created)

    def ended(self, now: float) -> bool:
        return self.failed_errors is not None or now >= self.ended_at()

    def finished(self, custom_id: str) -> bool:
        cut = self.cutoff()
        return cut is None or self.done_at[custom_id] <= cut

    def final(self) -> str:
        """How the batch ended: completed, cancelled or expired (failed: failed_errors)."""
        if self.cancel_at is not None:
            return "cancelled"
        return "expired" if self.cutoff() is not None else "completed"

    def order(self) -> list[str]:
        """The order results are listed in: by finishing moment (not the input order)."""
        return sorted(self.custom_ids, key=lambda c: self.done_at[c])


class BatchAPIs:
    """The state and settings of the fake's provider batch APIs (`upstream.batches`)."""

    def __init__(self) -> None:
        self.processing_s = 0.3  # requests finish spread over this long after creation
        self.expire_after_s: float | None = None  # end the batch this early, expiring the rest
        self.cancel_s = 0.1  # cancelling -> ended
        self.max_requests = {"openai": 50_000, "anthropic": 100_000}
        self.fail_creates: list[int] = []  # statuses the next batch creates answer with
        self.create_delay_s = 0.0  # a batch create answers this late (widens a race)
        self.lose_create_answers = 0  # the next creates make the batch, then answer 500
        self.retrieve_delay_s = 0.0  # a batch retrieve answers this late
        self.retrieving = 0  # retrieves being answered now
        self.lists: Counter[str] = Counter()  # kind -> batch list calls
        self.files: dict[str, FakeFile] = {}
        self.items: dict[str, FakeBatch] = {}
        self.creates: Counter[str] = Counter()  # kind -> batches created
        self.result_reads: Counter[str] = Counter()  # batch id -> result downloads
        self.cancels: Counter[str] = Counter()
        self.lock = threading.RLock()

    def configure(self, **settings: Any) -> None:
        """Change settings, e.g. configure(processing_s=2, expire_after_s=1)."""
        for key, value in settings.items():
            if not hasattr(self, key) or key in ("files", "items", "lock"):
                raise ValueError(f"unknown batch setting {key!r}")
            setattr(self, key, value)

    def lose_answer(self) -> bool:
        """Whether this create's answer is lost (the batch exists all the same)."""
        with self.lock:
            if self.lose_create_answers <= 0:
                return False
            self.lose_create_answers -= 1
            return True

    def listed(self, kind: str, after: str | None, limit: int) -> tuple[list[FakeBatch], bool]:
        """A page of this kind's batches, newest first, after the batch `after`; more?"""
        with self.lock:
            self.lists[kind] += 1
            ordered = sorted(self.of_kind(kind), key=lambda b: b.created, reverse=True)
        ids = [b.id for b in ordered]
        start = ids.index(after) + 1 if after in ids else 0
        page = ordered[start : start + limit]
        return page, start + limit < len(ordered)

    def of_kind(self, kind: str) -> list[FakeBatch]:
        with self.lock:
            return [b for b in self.items.values() if b.kind == kind]

    def new_batch(
        self, kind: str, requests: list[tuple[str, bool, int, dict[str, Any]]], **fields: Any
    ) -> FakeBatch:
        now = time.time()
        ranks = list(range(len(requests)))
        random.shuffle(ranks)
        n = max(1, len(requests))
        prefix = "batch_" if kind == "openai" else "msgbatch_"
        batch = FakeBatch(
            kind=kind,
            id=prefix + uuid.uuid4().hex[:24],
            created=now,
            custom_ids=[r[0] for r in requests],
            answers={r[0]: (r[1], r[2], r[3]) for r in requests},
            done_at={
                r[0]: now + self.processing_s * (rank + 1) / n
                for r, rank in zip(requests, ranks, strict=True)
            },
            expires_at=now + 86400,
            cancel_s=self.cancel_s,
            expire_at=None if self.expire_after_s is None else now + self.expire_after_s,
            **fields,
        )
        with self.lock:
            self.items[batch.id] = batch
            self.creates[kind] += 1
        return batch

    def add_file(self, filename: str, purpose: str, data: bytes) -> FakeFile:
        file = FakeFile("file-" + uuid.uuid4().hex[:24], filename, purpose, data, int(time.time()))
        with self.lock:
            self.files[file.id] = file
        return file


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _multipart(handler: _Handler, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body as {field: (filename, bytes)}."""
    ctype = handler.headers.get("Content-Type") or ""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw
    )
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        fields[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def _answer(handler: _Handler, kind: str, body: dict[str, Any]) -> tuple[bool, int, dict[str, Any]]:
    """One batched request's answer, made as a direct call's would be: (ok, status, body)."""
    plan = handler._plan(dict(body), time.monotonic())
    if plan.fail:
        status = int(plan.scenario.status or 500)
        if kind == "openai":
            kinds = _OPENAI_ERROR_TYPES
            error_type = kinds.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            )
            err = {
                "message": plan.scenario.message,
                "type": error_type,
                "param": None,
                "code": None,
            }
            return False, status, {"error": err}
        kinds = _ANTHROPIC_ERROR_TYPES
        error_type = kinds.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return (
            False,
            status,
            {"type": "error", "error": {"type": error_type, "message": plan.scenario.message}},
        )
    payload = handler._openai_body(plan) if kind == "openai" else handler._anthropic_body(plan)
    return True, 200, payload


def handle_batch_api(handler: _Handler, method: str) -> bool:
    """Serve a provider batch API route; False when the path is not one."""
    path = handler.path.split("?")[0].rstrip("/")
    parts = path.strip("/").split("/")
    if path.startswith("/v1/messages/batches"):
        kind = "anthropic"
    elif path.startswith(("/v1/files", "/v1/batches")):
        kind = "openai"
    else:
        return False
    length = int(handler.headers.get("Content-Length") or 0)
    raw = handler.rfile.read(length) if length else b""
    if not handler._authorised(kind):
        handler._send_error(kind, 401, Scenario(message="missing API key"))
        return True
    apis = handler.upstream.batches
    creating = method == "POST" and parts[-1] == "batches"
    if creating and apis.create_delay_s:
        time.sleep(apis.create_delay_s)
    if method == "GET" and parts[-2:-1] == ["batches"] and apis.retrieve_delay_s:
        with apis.lock:
            apis.retrieving += 1
        try:
            time.sleep(apis.retrieve_delay_s)
        finally:
            with apis.lock:
                apis.retrieving -= 1
    if creating and apis.fail_creates:
        status = apis.fail_creates.pop(0)
        retry = Scenario(message=f"scripted batch create failure {status}", retry_after="0")
        handler._send_error(kind, status, retry)
        return True
    try:
        if kind == "anthropic":
            _anthropic_batches(handler, apis, method, parts[3:], raw)
        else:
            _openai_batches(handler, apis, method, parts[1:], raw)
    except _NotFound as exc:
        handler._send_error(kind, 404, Scenario(message=str(exc)))
    except _Invalid as exc:
        handler._send_error(kind, 400, Scenario(message=str(exc)))
    return True


class _NotFound(Exception):
    pass


class _Invalid(Exception):
    pass


# -- OpenAI Files + Batches -------------------------------------------------------------------


def _openai_batches(
    handler: _Handler, apis: BatchAPIs, method: str, parts: list[str], raw: bytes
) -> None:
    if parts == ["files"] and method == "POST":
        form = _multipart(handler, raw)
        purpose = form.get("purpose", (None, b""))[1].decode()
        filename, data = form.get("file", (None, b""))
        if purpose != "batch" or "file" not in form:
            raise _Invalid("a batch input needs purpose=batch and a file")
        handler._send_json(200, apis.add_file(filename or "upload.jsonl", purpose, data).obj())
        return
    if parts[0] == "files" and len(parts) >= 2 and method == "GET":
        file = apis.files.get(parts[1])
        if file is None:
            raise _NotFound(f"No such File object: {parts[1]}")
        if parts[2:] == ["content"]:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Content-Length", str(len(file.data)))
            handler.end_headers()
            handler.wfile.write(file.data)
        else:
            handler._send_json(200, file.obj())
        return
    if parts == ["batches"] and method == "POST":
        body = json.loads(raw or b"{}")
        created = _openai_create(handler, apis, body)
        if apis.lose_answer():
            handler._send_error("openai", 500, Scenario(message="answer lost after create"))
            return
        handler._send_json(200, _openai_object(apis, created))
        return
    if parts == ["batches"] and method == "GET":
        query = parse_qs(urlsplit(handler.path).query)
        after = (query.get("after") or [None])[0]
        page, more = apis.listed("openai", after, int((query.get("limit") or ["20"])[0]))
        data = [_openai_object(apis, b) for b in page]
        handler._send_json(200, {"object": "list", "data": data, "has_more": more,
                                 "first_id": page[0].id if page else None,
                                 "last_id": page[-1].id if page else None})  # fmt: skip
        return
    if parts[0] == "batches" and len(parts) >= 2:
        batch = apis.items.get(parts[1])
        if batch is None or batch.kind != "openai":
            raise _NotFound(f"No such Batch object: {parts[1]}")
        if parts[2:] == ["cancel"] and method == "POST":
            with apis.lock:
                if batch.cancel_at is None and not batch.ended(time.time()):
                    batch.cancel_at = time.time()
                apis.cancels[batch.id] += 1
        handler._send_json(200, _openai_object(apis, batch))
        return
    raise _NotFound(f"no route {handler.path}")


def _openai_create(handler: _Handler, apis: BatchAPIs, body: dict[str, Any]) -> FakeBatch:
    file = apis.files.get(str(body.get("input_file_id")))
    if file is None:
        raise _Invalid(f"No such File object: {body.get('input_file_id')}")
    if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
        raise _Invalid("endpoint must be /v1/chat/completions and completion_window 24h")
    lines = [json.loads(line) for line in file.data.splitlines() if line.strip()]
    if len(lines) > apis.max_requests["openai"]:
        raise _Invalid(f"a batch may hold at most {apis.max_requests['openai']} requests")
    errors: list[dict[str, Any]] = []
    models = {str((line.get("body") or {}).get("model")) for line in lines}
    if len(models) > 1:
        errors.append(
            {
                "code": "model_mismatch",
                "message": "every request of a batch must use one model",
                "param": "body.model",
                "line": None,
            }
        )
    for number, line in enumerate(lines, 1):
        if line.get("method") != "POST" or line.get("url") != body["endpoint"]:
            errors.append(
                {
                    "code": "invalid_request",
                    "message": "method must be POST and url the batch endpoint",
                    "param": "url",
                    "line": number,
                }
            )
    fields = {
        "input_file_id": file.id,
        "endpoint": body["endpoint"],
        "completion_window": body["completion_window"],
        "metadata": body.get("metadata"),
        "model": next(iter(models)) if len(models) == 1 else None,
    }
    if errors:
        return apis.new_batch("openai", [], failed_errors=errors, **fields)
    requests = [
        (str(line["custom_id"]), *_answer(handler, "openai", line["body"])) for line in lines
    ]
    return apis.new_batch("openai", requests, **fields)


def _openai_line(batch: FakeBatch, custom_id: str) -> tuple[bool, dict[str, Any]]:
    """(goes to the output file, the line) for one request of an ended batch."""
    ok, status, body = batch.answers[custom_id]
    line: dict[str, Any] = {"id": "batch_req_" + uuid.uuid4().hex[:24], "custom_id": custom_id}
    if not batch.finished(custom_id):
        final = batch.final()
        code, message = (
            ("batch_cancelled", _OPENAI_CANCELLED)
            if final == "cancelled"
            else ("batch_expired", _OPENAI_EXPIRED)
        )
        return False, {**line, "response": None, "error": {"code": code, "message": message}}
    response = {"status_code": status, "request_id": "req_" + uuid.uuid4().hex[:24], "body": body}
    return ok, {**line, "response": response, "error": None}


def _openai_files(apis: BatchAPIs, batch: FakeBatch) -> None:
    """Write the output and error files of an ended batch, once."""
    if batch.output_file_id or batch.error_file_id or batch.failed_errors is not None:
        return
    out: list[bytes] = []
    err: list[bytes] = []
    for custom_id in batch.order():
        ok, line = _openai_line(batch, custom_id)
        (out if ok else err).append(json.dumps(line).encode() + b"\n")
    if out:
        batch.output_file_id = apis.add_file(
            f"{batch.id}_output.jsonl", "batch_output", b"".join(out)
        ).id
    if err:
        batch.error_file_id = apis.add_file(
            f"{batch.id}_error.jsonl", "batch_output", b"".join(err)
        ).id


def _openai_object(apis: BatchAPIs, batch: FakeBatch) -> dict[str, Any]:
    now = time.time()
    status = "in_progress"
    stamps: dict[str, float | None] = dict.fromkeys(
        (
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
            "finalizing_at",
        ),
        None,
    )
    counts = {"total": len(batch.custom_ids), "completed": 0, "failed": 0}
    if batch.failed_errors is not None:
        status, stamps["failed_at"] = "failed", batch.created
    elif batch.ended(now):
        with apis.lock:
            _openai_files(apis, batch)
        status = batch.final()
        stamps[f"{status}_at"] = batch.ended_at()
        stamps["finalizing_at"] = batch.ended_at()
        if batch.cancel_at is not None:
            stamps["cancelling_at"] = batch.cancel_at
    elif batch.cancel_at is not None:
        status, stamps["cancelling_at"] = "cancelling", batch.cancel_at
    for custom_id in batch.custom_ids:
        if batch.done_at[custom_id] <= min(now, batch.cutoff() or now):
            counts["completed" if batch.answers[custom_id][0] else "failed"] += 1
    if status in ("cancelled", "expired"):
        counts["failed"] = counts["total"] - counts["completed"]
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": {"object": "list", "data": batch.failed_errors} if batch.failed_errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created),
        "in_progress_at": int(batch.created),
        "expires_at": int(batch.expires_at),
        **{k: None if v is None else int(v) for k, v in stamps.items()},
        "request_counts": counts,
        "metadata": batch.metadata,
    }


# -- Anthropic Message Batches ----------------------------------------------------------------


def _anthropic_batches(
    handler: _Handler, apis: BatchAPIs, method: str, parts: list[str], raw: bytes
) -> None:
    if not parts and method == "POST":
        body = json.loads(raw or b"{}")
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            raise _Invalid("requests: a non-empty list is required")
        if len(requests) > apis.max_requests["anthropic"]:
            raise _Invalid(f"requests: at most {apis.max_requests['anthropic']} requests per batch")
        seen: set[str] = set()
        for i, item in enumerate(requests):
            custom_id = str(item.get("custom_id"))
            if not _ANTHROPIC_CUSTOM_ID.match(custom_id) or custom_id in seen:
                raise _Invalid(
                    f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$ and be unique"
                )
            seen.add(custom_id)
            if not isinstance(item.get("params"), dict):
                raise _Invalid(f"requests.{i}.params: Field required")
        answered = [
            (str(r["custom_id"]), *_answer(handler, "anthropic", r["params"])) for r in requests
        ]
        created = apis.new_batch("anthropic", answered)
        if apis.lose_answer():
            handler._send_error("anthropic", 500, Scenario(message="answer lost after create"))
            return
        handler._send_json(200, _anthropic_object(handler, created))
        return
    if not parts and method == "GET":
        query = parse_qs(urlsplit(handler.path).query)
        after = (query.get("after_id") or [None])[0]
        page, more = apis.listed("anthropic", after, int((query.get("limit") or ["20"])[0]))
        data = [_anthropic_object(handler, b) for b in page]
        handler._send_json(200, {"data": data, "has_more": more,
                                 "first_id": page[0].id if page else None,
                                 "last_id": page[-1].id if page else None})  # fmt: skip
        return
    batch = apis.items.get(parts[0]) if parts else None
    if batch is None or batch.kind != "anthropic":
        raise _NotFound(f"message batch {parts[0] if parts else ''!r} not found")
    if parts[1:] == ["cancel"] and method == "POST":
        with apis.lock:
            if batch.cancel_at is None and not batch.ended(time.time()):
                batch.cancel_at = time.time()
            apis.cancels[batch.id] += 1
    elif parts[1:] == ["results"] and method == "GET":
        if not batch.ended(time.time()):
            raise _Invalid(f"Message Batch {batch.id} has not ended processing")
        with apis.lock:
            apis.result_reads[batch.id] += 1
        data = b"".join(
            json.dumps(_anthropic_result(batch, c)).encode() + b"\n" for c in batch.order()
        )
        handler.send_response(200)
        handler.send_header("Content-Type", "application/binary")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return
    handler._send_json(200, _anthropic_object(handler, batch))


def _anthropic_result(batch: FakeBatch, custom_id: str) -> dict[str, Any]:
    ok, _status, body = batch.answers[custom_id]
    if not batch.finished(custom_id):
        result: dict[str, Any] = {"type": "canceled" if batch.final() == "cancelled" else "expired"}
    elif ok:
        result = {"type": "succeeded", "message": body}
    else:
        result = {
            "type": "errored",
            "error": {**body, "request_id": "req_" + uuid.uuid4().hex[:24]},
        }
    return {"custom_id": custom_id, "result": result}


def _anthropic_object(handler: _Handler, batch: FakeBatch) -> dict[str, Any]:
    now = time.time()
    ended = batch.ended(now)
    counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
    if not ended:
        counts["processing"] = len(batch.custom_ids)
    else:
        for custom_id in batch.custom_ids:
            kind = _anthropic_result(batch, custom_id)["result"]["type"]
            counts[kind] += 1
    status = "ended" if ended else ("canceling" if batch.cancel_at is not None else "in_progress")
    results_url = (
        f"{handler.upstream.url}/v1/messages/batches/{batch.id}/results" if ended else None
    )
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": _rfc3339(batch.ended_at()) if ended else None,
        "created_at": _rfc3339(batch.created),
        "expires_at": _rfc3339(batch.expires_at),
        "archived_at": None,
        "cancel_initiated_at": _rfc3339(batch.cancel_at),
        "results_url": results_url,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the fake upstream until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="default time to first token")
    parser.add_argument(
        "--tps", type=float, default=0.0, help="default tokens/second (0: no pacing)"
    )
    parser.add_argument("--tokens", type=int, default=20, help="default tokens per answer")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="default non-streaming latency")
    args = parser.parse_args(argv)
    server = FakeUpstream(
        args.host,
        args.port,
        ttft_ms=args.ttft_ms,
        tps=args.tps,
        tokens=args.tokens,
        delay_ms=args.delay_ms,
    )
    server.start()
    print(f"fake upstream on {server.url} (openai: {server.openai_base_url})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
