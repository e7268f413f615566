"""The routing policy: conditions, outcomes, the default policy, validation and reload."""

from __future__ import annotations

import json
import logging
import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from flask import Flask

from app.cli.policy import policy_group
from app.config import ConfigError
from app.policy import (
    PolicyHolder,
    Preferences,
    Route,
    RouteRequest,
    default_policy,
    evaluate,
    explain,
    fmt_tokens,
    install_sighup,
    parse_policy,
    parse_prefer,
    prefers_async,
    request_from_body,
)


def req(**kw: Any) -> RouteRequest:
    base: dict[str, Any] = {
        "endpoint": "/v1/jobs",
        "tenant_id": "ten_1",
        "tenant_name": "acme",
        "model": "mock/fast",
    }
    return RouteRequest(**(base | kw))


def one_rule(when: dict[str, Any], **outcome: Any) -> dict[str, Any]:
    """A policy whose first rule is under test and whose fallback rule is 'other'."""
    rule = {"name": "r", "when": when, "route": "batch"} | outcome
    return {"rules": [rule, {"name": "other", "route": "stream"}]}


# (when, matching request, non-matching request)
CONDITIONS = [
    ({"endpoint": "/v1/chat/completions"}, req(endpoint="/v1/chat/completions"), req()),
    ({"endpoint": ["/v1/batches", "/v1/document-*"]}, req(endpoint="/v1/document-batches"), req()),
    ({"mode": "stream"}, req(requested_mode="stream"), req(requested_mode="auto")),
    ({"mode": ["auto", "batch"]}, req(requested_mode="batch"), req(requested_mode="stream")),
    ({"stream": True}, req(stream=True), req(stream=None)),
    ({"stream": False}, req(stream=False), req(stream=True)),
    ({"prefer_async": True}, req(prefer_async=True), req()),
    ({"prefer_async": False}, req(), req(prefer_async=True)),
    ({"tenant": "acme"}, req(), req(tenant_name="globex")),
    ({"tenant": ["glob*", "ten_1"]}, req(tenant_name="x"), req(tenant_name="x", tenant_id="t2")),
    ({"model": "openai/gpt-4o*"}, req(model="openai/gpt-4o-mini"), req(model="openai/o1")),
    ({"model": ["anthropic/*", "mock/*"]}, req(), req(model="openai/gpt-4o")),
    ({"input_tokens_above": 16000}, req(input_tokens=16001), req(input_tokens=16000)),
    ({"input_tokens_below": 100}, req(input_tokens=99), req(input_tokens=100)),
    ({"priority": 5}, req(priority=5), req(priority=4)),
    ({"priority": [1, 2]}, req(priority=2), req(priority=3)),
    ({"priority_above": 5}, req(priority=6), req(priority=5)),
    ({"priority_below": 0}, req(priority=-1), req(priority=0)),
    ({"metadata_keys": ["team"]}, req(metadata={"team": "x"}), req(metadata={"other": 1})),
    ({"metadata": {"tier": "gold"}}, req(metadata={"tier": "gold"}), req(metadata={"tier": "s"})),
    (
        {"endpoint": "/v1/jobs", "input_tokens_above": 10, "prefer_async": True},
        req(input_tokens=11, prefer_async=True),
        req(input_tokens=11),
    ),
]


@pytest.mark.parametrize(("when", "hit", "miss"), CONDITIONS, ids=lambda v: str(v)[:40])
def test_each_condition_matches_and_misses(
    when: dict[str, Any], hit: RouteRequest, miss: RouteRequest
) -> None:
    policy = parse_policy(one_rule(when))
    assert evaluate(policy, hit).rule == "r"
    assert evaluate(policy, miss).rule == "other"
    _, verdicts = explain(policy, miss)
    assert verdicts[0].rule == "r" and not verdicts[0].matched
    assert any(not ok for ok, _ in verdicts[0].checks)


OUTCOMES = [
    ({"route": "stream"}, {"mode": "stream", "overflow": "reject", "on_disconnect": "detach"}),
    ({"route": "batch"}, {"mode": "batch"}),
    (
        {"route": "reject", "status": 403, "message": "no {model} for {tenant}"},
        {"mode": "reject", "status": 403, "message": "no mock/fast for acme"},
    ),
    ({"route": "reject"}, {"mode": "reject", "status": 400}),
    (
        {"route": "stream", "on_disconnect": "cancel", "overflow": "queue", "queue_timeout": 2.5},
        {"on_disconnect": "cancel", "overflow": "queue", "queue_timeout": 2.5},
    ),
    # overflow=batch needs Prefer: respond-async; without it, queue if it may wait, else reject
    ({"route": "stream", "overflow": "batch"}, {"overflow": "reject"}),
    ({"route": "stream", "overflow": "batch", "queue_timeout": 1}, {"overflow": "queue"}),
    ({"route": "stream", "reason": "custom {rule}: {endpoint}"}, {"reason": "custom r: /v1/jobs"}),
]


@pytest.mark.parametrize(("outcome", "expected"), OUTCOMES, ids=lambda v: str(v)[:50])
def test_each_outcome(outcome: dict[str, Any], expected: dict[str, Any]) -> None:
    route = evaluate(parse_policy(one_rule({}, **outcome)), req())
    assert route.rule == "r"
    for name, value in expected.items():
        assert getattr(route, name) == value, name


def test_overflow_batch_kept_when_client_allows_async() -> None:
    policy = parse_policy(one_rule({}, route="stream", overflow="batch"))
    route = evaluate(policy, req(prefer_async=True))
    assert (route.overflow, route.prefer_async) == ("batch", True)


def test_auto_reason_describes_the_matched_conditions() -> None:
    table = {
        "rules": [
            {
                "name": "big",
                "when": {"input_tokens_above": 16000, "prefer_async": True},
                "route": "batch",
            },
            {
                "name": "big-sync",
                "when": {"input_tokens_above": 16000},
                "route": "reject",
                "reason": "input ~{tokens} tokens > {limit} limit for interactive",
            },
        ]
    }
    policy = parse_policy(table)
    big = evaluate(policy, req(input_tokens=48_300, prefer_async=True))
    assert big.reason == (
        "client allows async (Prefer: respond-async); input ~48k tokens > 16k limit"
    )
    sync = evaluate(policy, req(input_tokens=48_300))
    assert sync.reason == "input ~48k tokens > 16k limit for interactive"
    assert "big-sync" in sync.message  # a reject without a message still says why
    fallback = evaluate(policy, req(input_tokens=10))
    assert (fallback.mode, fallback.rule) == ("stream", "fallback")


def test_tenant_limits_from_the_policy_reach_the_route() -> None:
    table = one_rule({}, route="stream") | {
        "limits": {"max_streams": 9, "max_streams_per_tenant": 3, "tenants": {"acme": 5}}
    }
    policy = parse_policy(table)
    assert (policy.max_streams, policy.max_streams_per_tenant) == (9, 3)
    assert evaluate(policy, req()).tenant_max_streams == 5
    assert evaluate(policy, req(tenant_name="other")).tenant_max_streams is None


CHAT = "/v1/chat/completions"
DEFAULTS = [
    (req(endpoint="/v1/document-batches"), "batch", "batch-endpoints"),
    (req(endpoint="/v1/batches", input_tokens=10**6), "batch", "batch-endpoints"),
    (req(requested_mode="batch"), "batch", "requested-batch"),
    (req(endpoint=CHAT, stream=True), "stream", "interactive"),
    (req(endpoint=CHAT, stream=False), "stream", "interactive"),
    (req(requested_mode="stream"), "stream", "interactive"),
    (req(), "stream", "interactive"),
    (req(endpoint=CHAT, stream=True, input_tokens=48_000), "reject", "large-input"),
    (req(input_tokens=32_001), "reject", "large-input"),
    (req(input_tokens=32_000), "stream", "interactive"),
    (req(endpoint=CHAT, input_tokens=48_000, prefer_async=True), "batch", "large-input-async"),
    (req(requested_mode="batch", input_tokens=48_000), "batch", "requested-batch"),
    (req(prefer_async=True), "batch", "prefer-async"),
    (req(endpoint=CHAT, stream=True, prefer_async=True), "batch", "prefer-async"),
    (req(endpoint=CHAT, stream=False, prefer_async=True), "batch", "prefer-async"),
    (req(requested_mode="stream", prefer_async=True), "stream", "interactive"),
    (req(endpoint="/v1/batches", prefer_async=True), "batch", "batch-endpoints"),
]


@pytest.mark.parametrize(("request_", "mode", "rule"), DEFAULTS, ids=lambda v: str(v)[:60])
def test_default_policy(request_: RouteRequest, mode: str, rule: str) -> None:
    route = evaluate(default_policy(), request_)
    assert (route.mode, route.rule) == (mode, rule)
    assert route.reason
    if rule == "interactive":
        assert route.overflow == "reject"


def test_default_large_input_messages() -> None:
    route = evaluate(default_policy(), req(endpoint=CHAT, input_tokens=48_123))
    assert route.status == 413
    assert route.reason == "input ~48k tokens > 32k limit for interactive"
    assert "POST /v1/document-batches" in route.message
    assert "Prefer: respond-async" in route.message
    small = default_policy({"POLICY_MAX_INTERACTIVE_TOKENS": 16_000})
    assert evaluate(small, req(input_tokens=20_000)).rule == "large-input"


BAD = [
    ({}, "policy.rules must be a non-empty array"),
    ([], "[policy] must be a table"),
    ({"rules": [{"route": "stream"}]}, "policy rule #1: name is required"),
    ({"rules": [{"name": "a", "route": "fast"}]}, "policy rule 'a': route must be one of"),
    ({"rules": [{"name": "a"}]}, "policy rule 'a': route is required"),
    (
        {"rules": [{"name": "a", "route": "batch"}, {"name": "a", "route": "batch"}]},
        "policy rule 'a': name is used by an earlier rule",
    ),
    (
        {"rules": [{"name": "big", "route": "batch", "when": {"input_tokens_above": "32k"}}]},
        "policy rule 'big': when.input_tokens_above must be an integer",
    ),
    (
        {"rules": [{"name": "m", "route": "batch", "when": {"mode": "fast"}}]},
        "policy rule 'm': when.mode must be one of",
    ),
    (
        {"rules": [{"name": "m", "route": "batch", "when": {"colour": "red"}}]},
        "policy rule 'm': when.colour is not a condition",
    ),
    (
        {"rules": [{"name": "m", "route": "batch", "when": {"prefer_async": "yes"}}]},
        "policy rule 'm': when.prefer_async must be true or false",
    ),
    (
        {"rules": [{"name": "s", "route": "stream", "overflow": "spill"}]},
        "policy rule 's': overflow must be one of",
    ),
    (
        {"rules": [{"name": "s", "route": "stream", "overflow": "queue"}]},
        "policy rule 's': queue_timeout is required",
    ),
    (
        {"rules": [{"name": "s", "route": "stream", "on_disconnect": "hang"}]},
        "policy rule 's': on_disconnect must be one of",
    ),
    (
        {"rules": [{"name": "s", "route": "stream", "queue_timeout": -1}]},
        "policy rule 's': queue_timeout must be a non-negative",
    ),
    (
        {"rules": [{"name": "x", "route": "reject", "status": 200}]},
        "policy rule 'x': status must be an HTTP error status",
    ),
    (
        {"rules": [{"name": "x", "route": "batch", "status": 413}]},
        "policy rule 'x': status only applies",
    ),
    (
        {"rules": [{"name": "x", "route": "reject", "message": "too big: {size}"}]},
        "policy rule 'x': message uses unknown placeholder {size}",
    ),
    (
        {"rules": [{"name": "x", "route": "batch", "colour": 1}]},
        "policy rule 'x': colour is not a rule field",
    ),
    ({"rules": [{"name": "x", "route": "batch"}], "extra": 1}, "policy.extra is not"),
    (
        {"rules": [{"name": "x", "route": "batch"}], "limits": {"max_streams": -1}},
        "policy.limits.max_streams must be at least 0",
    ),
    (
        {"rules": [{"name": "x", "route": "batch"}], "limits": {"tenants": {"acme": "ten"}}},
        "policy.limits.tenants.acme must be an integer",
    ),
]


@pytest.mark.parametrize(("table", "message"), BAD, ids=lambda v: str(v)[:50])
def test_invalid_policy_names_rule_and_field(table: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy(table)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("respond-async", True),
        ("wait=10, respond-async", True),
        ("Respond-Async; foo=bar", True),
        ("return=minimal", False),
        ("respond-asynchronously", False),
    ],
)
def test_prefer_header(header: str | None, expected: bool) -> None:
    assert prefers_async(header) is expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, Preferences()),
        ("wait=10", Preferences(wait=10)),
        ("respond-async, wait=5", Preferences(True, 5)),
        ('wait="7"; x=y, respond-async', Preferences(True, 7)),
        ("WAIT=3", Preferences(wait=3)),
        ("wait=-1", Preferences()),
        ("wait=1.5", Preferences()),
        ("wait=", Preferences()),
        ("wait=\u0663", Preferences()),  # a non-ASCII digit is not delta-seconds
        ("wait=2, wait=9", Preferences(wait=2)),  # the first one counts (RFC 7240 2)
        ("wait=" + "9" * 40, Preferences(wait=999_999_999_999)),
    ],
)
def test_prefer_wait(header: str | None, expected: Preferences) -> None:
    assert parse_prefer(header) == expected


def test_a_policy_rule_decides_over_prefer_async() -> None:
    """Only the built-in policy sends respond-async to batch; a rule may say otherwise."""
    policy = parse_policy(one_rule({"prefer_async": True}, route="stream"))
    assert evaluate(policy, req(prefer_async=True)).mode == "stream"
    plain = parse_policy({"rules": [{"name": "all", "route": "stream"}]})
    assert evaluate(plain, req(prefer_async=True)).mode == "stream"


def test_request_from_body_turns_a_document_into_messages() -> None:
    body = {"model": "m", "document": "x" * 4000, "instructions": "sum", "priority": 3}
    r = request_from_body("/v1/jobs", body, tenant_id="t", tenant_name="n", prefer_async=True)
    assert r.input_tokens >= 1000 and r.priority == 3 and r.prefer_async
    assert r.requested_mode == "auto" and r.stream is None
    chat = request_from_body(
        CHAT, {"model": "m", "messages": [], "stream": True}, tenant_id="t", tenant_name="n"
    )
    assert chat.stream is True


def test_fmt_tokens() -> None:
    assert [fmt_tokens(n) for n in (900, 1500, 2000, 48_300, 160_000)] == [
        "900", "1.5k", "2k", "48k", "160k",
    ]  # fmt: skip


# ---------------------------------------------------------------- files: start and reload

GOOD = """
[policy]
[[policy.rules]]
name = "everything-batch"
route = "batch"
"""

GOOD_2 = """
[policy]
[[policy.rules]]
name = "everything-streams"
route = "stream"
overflow = "queue"
queue_timeout = 3
"""

BAD_FILE = """
[policy]
[[policy.rules]]
name = "huge"
route = "batch"
when = { input_tokens_above = "lots" }
"""


def _write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))
    # a distinct mtime even on coarse filesystems
    stamp = time.time() + hash(text) % 1000
    os.utime(path, (stamp, stamp))


def _holder(path: Path, **config: Any) -> PolicyHolder:
    from app.policy import read_policy_file

    settings = {"SLUICE_CONFIG": str(path), "POLICY": read_policy_file(str(path))}
    return PolicyHolder(settings | {"POLICY_RELOAD_SECONDS": 0.0} | config)


def test_bad_policy_file_at_start_fails_create_app(
    tmp_path: Path, make_app: Callable[..., Flask]
) -> None:
    path = tmp_path / "sluice.toml"
    _write(path, BAD_FILE)
    with pytest.raises(ConfigError) as err:
        make_app(SLUICE_CONFIG=str(path))
    assert "policy rule 'huge': when.input_tokens_above" in str(err.value)
    _write(path, GOOD)
    app = make_app(SLUICE_CONFIG=str(path))
    with app.test_request_context():
        from app.policy import decide

        assert decide(req()).rule == "everything-batch"


def test_reload_on_mtime_keeps_last_good_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sluice.toml"
    _write(path, GOOD)
    holder = _holder(path)
    assert holder.current().rules[0].name == "everything-batch"
    _write(path, BAD_FILE)
    with caplog.at_level(logging.ERROR, logger="app.policy"):
        assert holder.current().rules[0].name == "everything-batch"
    assert "policy rule 'huge': when.input_tokens_above" in (holder.last_error or "")
    assert "keeping the last good policy" in caplog.text
    _write(path, GOOD_2)
    assert holder.current().rules[0].name == "everything-streams"
    assert holder.last_error is None


def test_reload_on_sighup(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    _write(path, GOOD)
    holder = _holder(path, POLICY_RELOAD_SECONDS=3600.0)  # no mtime polling: only the signal
    assert install_sighup()
    path.write_text(GOOD_2)
    os.utime(path, None)
    assert holder.current().rules[0].name == "everything-batch"
    os.kill(os.getpid(), signal.SIGHUP)
    deadline = time.monotonic() + 5
    while holder.current().rules[0].name != "everything-streams":
        assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
        time.sleep(0.01)


def test_cli_check_and_explain(tmp_path: Path) -> None:
    runner = CliRunner()
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    _write(good, GOOD_2)
    _write(bad, BAD_FILE)
    ok = runner.invoke(policy_group, ["check", str(good)])
    assert ok.exit_code == 0 and "everything-streams -> stream overflow=queue" in ok.output
    failed = runner.invoke(policy_group, ["check", str(bad)])
    assert failed.exit_code == 1
    assert "policy rule 'huge': when.input_tokens_above" in failed.output

    request = tmp_path / "request.json"
    request.write_text('{"model": "mock/x", "document": "' + "word " * 40_000 + '"}')
    args = ["explain", "--request", str(request), "--file", str(tmp_path / "none.toml")]
    missing = runner.invoke(policy_group, args)
    assert missing.exit_code == 1 and "does not exist" in missing.output
    plain = runner.invoke(
        policy_group, ["explain", "--request", str(request)], env={"SLUICE_CONFIG": ""}
    )
    assert plain.exit_code == 0, plain.output
    assert "MATCH large-input:" in plain.output and "route: reject" in plain.output
    assert "input ~50k tokens > 32k limit" in plain.output
    prefer = runner.invoke(
        policy_group,
        ["explain", "--request", str(request), "--header", "Prefer: respond-async"],
        env={"SLUICE_CONFIG": ""},
    )
    assert "route: batch (rule large-input-async)" in prefer.output
    custom = runner.invoke(
        policy_group, ["explain", "--request", str(request), "--file", str(good)]
    )
    assert "route: stream (rule everything-streams)" in custom.output


def test_route_header() -> None:
    assert Route("batch", "big", "why").header == "batch; rule=big"


def test_shipped_example_policy_is_valid() -> None:
    from app.policy import read_policy_file

    root = Path(__file__).resolve().parent.parent
    policy = parse_policy(read_policy_file(str(root / "sluice.example.toml")))
    assert [r.name for r in policy.rules][:2] == ["batch-endpoints", "requested-batch"]
    big = evaluate(policy, req(input_tokens=48_000))
    assert big.reason == "input ~48k tokens > 16k limit for interactive"
    assert evaluate(policy, req(tenant_name="trial-x", model="openai/gpt-4o")).status == 403
    assert evaluate(policy, req(priority=9)).overflow == "queue"
    assert evaluate(policy, req(tenant_name="acme")).tenant_max_streams == 64


# ---------------------------------------------------------------- POST /v1/jobs on the live stack


def sse_text(response: httpx.Response) -> str:
    """The concatenated delta text of an SSE chat-chunk stream, read to [DONE]."""
    parts: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                parts.append(choice["delta"].get("content") or "")
        if line == "data: [DONE]":
            break
    return "".join(parts)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_jobs_stream_route_answers_sse(client: httpx.Client) -> None:
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "one two three"}]}
    with client.stream("POST", "/v1/jobs", json=body | {"priority": 2}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["X-Sluice-Route"] == "stream; rule=interactive"
        job_id = response.headers["Location"].rsplit("/", 1)[1]
        assert sse_text(response) == "one two three"
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded" and job["mode"] == "stream"
    assert job["endpoint"] == "/v1/jobs"
    assert job["route"] == {
        "mode": "stream",
        "rule": "interactive",
        "reason": "interactive request (mode=auto) streams",
        "on_disconnect": "detach",
    }


def test_jobs_batch_route_answers_202(client: httpx.Client) -> None:
    body = {"model": "mock/echo", "document": "alpha beta", "instructions": "echo it"}
    plain = client.post("/v1/jobs", json=body | {"mode": "batch", "metadata": {"k": "v"}})
    assert plain.status_code == 202, plain.text
    assert plain.headers["X-Sluice-Route"] == "batch; rule=requested-batch"
    assert "Preference-Applied" not in plain.headers
    job = plain.json()
    assert plain.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["mode"] == "batch" and job["route"]["rule"] == "requested-batch"
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded" and done["metadata"] == {"k": "v"}
    asked = client.post(
        "/v1/jobs", json=body | {"mode": "batch"}, headers={"Prefer": "respond-async"}
    )
    assert asked.status_code == 202 and asked.headers["Preference-Applied"] == "respond-async"


def test_jobs_large_input_rejected_or_sent_to_batch(client: httpx.Client) -> None:
    body = {"model": "mock/big?length=3", "document": "word " * 40_000}  # ~50k tokens
    rejected = client.post("/v1/jobs", json=body)
    assert rejected.status_code == 413, rejected.text
    assert rejected.headers["X-Sluice-Route"] == "reject; rule=large-input"
    error = rejected.json()["error"]
    assert error["code"] == "rejected_by_policy" and error["rule"] == "large-input"
    assert "POST /v1/document-batches" in error["message"]
    assert "Prefer: respond-async" in error["message"]
    accepted = client.post("/v1/jobs", json=body, headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["Preference-Applied"] == "respond-async"
    assert accepted.headers["X-Sluice-Route"] == "batch; rule=large-input-async"
    reason = accepted.json()["route"]["reason"]
    assert reason.startswith("input ~50k tokens > 32k limit for interactive")
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "mock/echo", "messages": [{"role": "user", "content": "word " * 40_000}]},
    )
    assert chat.status_code == 413 and chat.headers["X-Sluice-Route"].startswith("reject")
    async_chat = client.post(
        "/v1/chat/completions",
        json={"model": "mock/big?length=3", "messages": body_messages(body["document"])},
        headers={"Prefer": "respond-async"},
    )
    assert async_chat.status_code == 202, async_chat.text
    assert async_chat.headers["Preference-Applied"] == "respond-async"
    job = async_chat.json()
    assert job["mode"] == "batch" and async_chat.headers["Location"] == f"/v1/jobs/{job['id']}"
    deadline = time.monotonic() + 30
    while job["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["endpoint"] == "/v1/chat/completions"
    assert len(job["output"].split()) == 3


def body_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "mock/x"}, "messages"),
        ({"model": "mock/x", "document": "a", "messages": []}, "messages"),
        ({"model": "mock/x", "document": ""}, "document"),
        ({"model": "mock/x", "document": "a", "mode": "fast"}, "mode"),
        ({"model": "mock/x", "document": "a", "priority": "high"}, "priority"),
        ({"model": "mock/x", "document": "a", "metadata": [1]}, "metadata"),
        ({"model": "nope/x", "document": "a"}, "model"),
    ],
)
def test_jobs_bad_input_names_the_field(
    client: httpx.Client, body: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
