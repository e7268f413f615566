"""The OpenAI batch intake's cheaper per-line checks give the verdicts of the full ones.

BodyChecker (the chat rules, made once per model) must accept exactly what
parse_chat_request accepts, build the same bound request and raise the same 400; the
path-free walk of check_json_values must refuse what the path-building one refuses, with
the same message. No stack needed.
"""

from __future__ import annotations

import copy
import gc
import random
from typing import Any

import pytest

from app import heap
from app.errors import APIError
from app.providers import ChatRequest, build_registry
from app.services import chat_request
from app.services.chat_request import BodyChecker, parse_chat_request
from app.validation import MAX_JSON_DEPTH, MAX_JSON_INT, InvalidJSON, _refuse, check_json_values

REGISTRY = build_registry({"PROVIDERS": {"local": {"base_url": "http://127.0.0.1:9/v1"}}})
MODELS = ["mock/echo", "openai/gpt-4o-mini", "anthropic/claude-x", "local/m", "mock/nope"]


def _base(model: str = "mock/echo") -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 20,
        "messages": [
            {"role": "system", "content": "Summarise the document."},
            {"role": "user", "content": "document 1: lorem lorem"},
        ],
    }


# Each variant changes one thing of a good body: some keep it good, most make it bad, and
# several fall outside the short way's shape (so the full parse decides).
VARIANTS: list[dict[str, Any]] = [
    {},
    {"max_tokens": 0},
    {"max_tokens": True},
    {"max_tokens": 2.0},
    {"max_tokens": "20"},
    {"max_tokens": MAX_JSON_INT},
    {"max_tokens": MAX_JSON_INT + 1},
    {"max_tokens": None},
    {"max_completion_tokens": 5},
    {"temperature": 1},
    {"temperature": 0.5},
    {"temperature": 2.5},
    {"temperature": -0.1},
    {"temperature": float("nan")},
    {"temperature": False},
    {"top_p": 1.5},
    {"top_p": 0.9},
    {"n": 0},
    {"n": 3},
    {"n": 129},
    {"seed": 7},
    {"seed": -(2**63)},
    {"seed": -(2**63) - 1},
    {"seed": 1.5},
    {"user": "ann"},
    {"user": 5},
    {"user": "\ud800"},
    {"presence_penalty": 2},
    {"presence_penalty": 3},
    {"frequency_penalty": -2.0},
    {"stream": True},
    {"stream": False},
    {"stream": "yes"},
    {"stream": None},
    {"stream_options": {"include_usage": True}},
    {"stop": "END"},
    {"logprobs": True, "top_logprobs": 3},
    {"top_logprobs": 3},
    {"tool_choice": "auto"},
    {"unknown_key": 1},
    {"model": None},
    {"model": 5},
    {"model": ""},
    {"model": "nope/x"},
    {"model": "mock/"},
    {"model": "openai/x\ud800"},
    {"model": "openai/" + "x" * 300},
    {"messages": None},
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": "hi"}] * 2049},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "assistant"}]},
    {"messages": [{"role": "assistant", "content": None}]},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": [{"role": ["user"], "content": "hi"}]},
    {"messages": [{"role": "tool", "content": "hi"}]},
    {"messages": [{"role": "tool", "content": "hi", "tool_call_id": "c1"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": "hi", "name": "ann"}]},
    {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]},
    {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": ""}]},
    {"messages": [{"role": "user", "content": "hi", "name": 5}]},
    {"messages": [{"role": "user", "content": "hi", "extra": 1}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]},
    {"messages": [{"role": "system", "content": [{"type": "image_url"}]}]},
    {"messages": ["hi"]},
]


def _outcome(run: Any) -> Any:
    try:
        return ("ok", run())
    except APIError as exc:
        return ("error", exc.status, exc.message, exc.param, exc.code)


def _full(body: Any) -> Any:
    def run() -> ChatRequest:
        return REGISTRY.bind(parse_chat_request(copy.deepcopy(body), REGISTRY))[1]

    return _outcome(run)


def _bodies() -> list[Any]:
    bodies: list[Any] = [None, [], "x", {}]
    for model in MODELS:
        for variant in VARIANTS:
            bodies.append(_base(model) | variant)
    rng = random.Random(12)
    for _ in range(400):  # two or three variants at once
        body = _base(rng.choice(MODELS))
        for variant in rng.sample(VARIANTS, rng.randint(2, 3)):
            body |= variant
        bodies.append(body)
    return bodies


@pytest.mark.parametrize("warm", [False, True], ids=["first-line", "after-good-lines"])
def test_body_checker_gives_parse_chat_requests_verdicts(warm: bool) -> None:
    checker = BodyChecker(REGISTRY)
    if warm:  # every model has passed a full parse: bodies of the short shape take it
        for model in MODELS[:-1]:
            checker.check(_base(model))
    for body in _bodies():
        assert _outcome(lambda b=body: checker.check(b)) == _full(body), body


def test_common_lines_skip_the_full_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    full = chat_request.parse_chat_request

    def counted(body: Any, registry: Any = None) -> ChatRequest:
        calls.append(body)
        return full(body, registry)

    monkeypatch.setattr(chat_request, "parse_chat_request", counted)
    checker = BodyChecker(REGISTRY)
    for i in range(50):
        body = _base("openai/gpt-4o-mini")
        body["messages"][1]["content"] = f"document {i}"
        request = checker.check(body)
        assert request.model == "gpt-4o-mini" and request.messages == body["messages"]
    assert len(calls) == 1  # the model's first line only
    with pytest.raises(APIError) as bad:  # a bad line still gets the full parse's 400
        checker.check(_base("openai/gpt-4o-mini") | {"max_tokens": 0})
    assert bad.value.param == "max_tokens" and len(calls) == 2


def test_the_provider_still_checks_every_short_line() -> None:
    checker = BodyChecker(REGISTRY)
    checker.check(_base("anthropic/claude-x") | {"temperature": 0.5})
    for bad in ({"temperature": 1.5}, {"n": 2}, {"seed": 1}):  # valid for OpenAI, not here
        with pytest.raises(APIError) as refused:
            checker.check(_base("anthropic/claude-x") | bad)
        expected = _full(_base("anthropic/claude-x") | bad)
        assert expected[0] == "error" and refused.value.message == expected[2]
        assert refused.value.code == "unsupported_parameter"


def test_any_surprise_in_the_short_way_is_answered_by_the_long_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checker = BodyChecker(REGISTRY)
    checker.check(_base("mock/echo"))
    mock = REGISTRY.get("mock")

    def check(request: ChatRequest) -> None:
        raise ValueError("boom")  # not an Unsupported: pydantic makes it a 400

    monkeypatch.setattr(mock, "check", check)
    outcome = _outcome(lambda: checker.check(_base("mock/echo")))
    assert outcome == _full(_base("mock/echo")) and outcome[0] == "error"


def _json_outcome(value: Any, max_chars: int) -> Any:
    try:
        check_json_values(value, max_chars=max_chars)
    except InvalidJSON as exc:
        return (exc.message, exc.param, exc.code)
    return None


def _reference(value: Any, max_chars: int) -> Any:
    try:
        _refuse(value, max_chars or None)
    except InvalidJSON as exc:
        return (exc.message, exc.param, exc.code)
    return None


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


JSON_VALUES: list[Any] = [
    None,
    True,
    0,
    MAX_JSON_INT,
    -MAX_JSON_INT,
    MAX_JSON_INT + 1,
    -MAX_JSON_INT - 1,
    1.5,
    float("inf"),
    float("-inf"),
    float("nan"),
    "",
    "abc",
    "a\x00b",
    "x" * 11,
    {"a\x00": 1},
    {"a": [1, {"b": "c\x00"}]},
    {"a": [1, 2, {"b": float("nan")}]},
    {"a": ["x" * 11]},
    {"body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}},
    (1, 2),
    {"a": (float("nan"),)},
    _nested(MAX_JSON_DEPTH, 1),
    _nested(MAX_JSON_DEPTH + 1, 1),
    _nested(MAX_JSON_DEPTH, []),
    _nested(MAX_JSON_DEPTH, {}),
    _nested(MAX_JSON_DEPTH, [1]),
    _nested(MAX_JSON_DEPTH - 1, [1]),
    _nested(MAX_JSON_DEPTH + 5, "x"),
]


@pytest.mark.parametrize("max_chars", [0, 10])
def test_check_json_values_refuses_as_the_path_walk_does(max_chars: int) -> None:
    for value in JSON_VALUES:
        assert _json_outcome(value, max_chars) == _reference(value, max_chars), value
    too_long = _json_outcome({"a": ["x" * 11]}, max_chars)
    assert (too_long and too_long[1:]) == (
        ("a[0]", "string_above_max_length") if max_chars else None
    )


def test_check_json_values_reads_the_setting_when_not_given() -> None:
    check_json_values({"a": "x" * 100})  # the default limit is 10 MiB
    with pytest.raises(InvalidJSON) as refused:
        check_json_values({"a": ["ok", "b\x00"]})
    assert refused.value.param == "a[1]"


def test_the_intake_runs_without_full_collections() -> None:
    from app.heap import FULL_COLLECTIONS_OFF, no_full_collections

    before = gc.get_threshold()
    with no_full_collections():
        assert gc.get_threshold() == (*before[:2], FULL_COLLECTIONS_OFF)
        with no_full_collections():  # a second intake at the same time
            pass
        assert gc.get_threshold()[2] == FULL_COLLECTIONS_OFF  # still the first one's
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), no_full_collections():  # a failed intake too
        raise RuntimeError
    assert gc.get_threshold() == before


def test_a_bad_file_is_still_a_failed_batch_under_no_full_collections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The block wraps the engine call only: InvalidInput still ends as a failed batch."""
    from app.services import openai_batches

    seen = []

    def engine(**kwargs: Any) -> Any:
        seen.append(gc.get_threshold()[2])
        raise openai_batches.InvalidInput

    monkeypatch.setattr(openai_batches.batches, "create_batch", engine)
    monkeypatch.setattr(openai_batches, "input_file", lambda tenant, file_id: None)
    monkeypatch.setattr(openai_batches.front_door, "route", lambda request: "route")
    monkeypatch.setattr(openai_batches, "_failed_batch", lambda *args: ("failed", args[5]))
    params = {"input_file_id": "f", "endpoint": "/v1/chat/completions"}
    made = openai_batches.create(
        tenant_id="t", tenant_name="t", params=params | {"completion_window": "24h"}
    )
    assert made[0] == "failed" and seen == [heap.FULL_COLLECTIONS_OFF]
    assert gc.get_threshold()[2] != heap.FULL_COLLECTIONS_OFF
