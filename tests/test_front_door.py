"""The four front doors share one path: routing, rejects, Idempotency-Key, Prefer, bad input."""

from __future__ import annotations

import ast
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient

import app as app_package
from app import policy
from tests.stack import Stack

CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
DOCS = {"model": "mock/echo", "instructions": "x", "documents": [{"id": "1", "text": "one"}]}


def batch_line(custom_id: str = "a") -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
    return json.dumps(line).encode() + b"\n"


@pytest.fixture
def http(app: Flask, api_key: str) -> Iterator[FlaskClient]:
    """An in-process client (no workers needed) authenticated as this test's tenant."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_key}"
    yield client


def upload_batch_file(http: FlaskClient, content: bytes) -> str:
    data = {"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")}
    response = http.post("/v1/files", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    file_id: str = response.get_json()["id"]
    return file_id


@pytest.fixture
def closed(app: Flask) -> Iterator[None]:
    """The in-process app's policy rejects everything (restored afterwards)."""
    holder = policy.holder(app)
    assert holder is not None
    saved = holder.policy
    rule = {"name": "closed", "route": "reject", "status": 403, "message": "no {endpoint}"}
    holder.policy = policy.parse_policy({"rules": [rule]})
    try:
        yield
    finally:
        holder.policy = saved


def test_every_front_door_rejects_the_same_way(http: FlaskClient, closed: None) -> None:
    file_id = upload_batch_file(http, batch_line())
    doors: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", CHAT),
        ("/v1/jobs", CHAT),
        ("/v1/document-batches", DOCS),
        (
            "/v1/batches",
            {
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        ),
    ]
    for path, body in doors:
        response = http.post(path, json=body)
        assert response.status_code == 403, (path, response.get_data(as_text=True))
        assert response.headers["X-Sluice-Route"] == "reject; rule=closed", path
        error = response.get_json()["error"]
        assert error["code"] == "rejected_by_policy" and error["rule"] == "closed", path
        assert error["message"] == f"no {path}" and error["type"] == "permission_error", path


def test_idempotency_key_is_scoped_by_batch_kind(http: FlaskClient) -> None:
    """The same key on /v1/document-batches and /v1/batches names two batches, one of each."""
    headers = {"Idempotency-Key": "shared-key"}
    file_id = upload_batch_file(http, b"not json\n")  # fails validation: nothing runs
    openai_body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    docs = http.post("/v1/document-batches", json=DOCS, headers=headers)
    assert docs.status_code == 202, docs.get_data(as_text=True)
    openai_batch = http.post("/v1/batches", json=openai_body, headers=headers)
    assert openai_batch.status_code == 200, openai_batch.get_data(as_text=True)
    assert openai_batch.get_json()["object"] == "batch"
    assert openai_batch.get_json()["id"] != docs.get_json()["id"]
    again_docs = http.post("/v1/document-batches", json=DOCS, headers=headers)
    assert again_docs.status_code == 200 and again_docs.headers["Idempotent-Replayed"] == "true"
    assert again_docs.get_json()["id"] == docs.get_json()["id"]
    again_openai = http.post("/v1/batches", json=openai_body, headers=headers)
    assert again_openai.get_json()["id"] == openai_batch.get_json()["id"]
    assert again_openai.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in openai_batch.headers


def test_an_idempotency_key_reused_with_other_parameters_is_refused(http: FlaskClient) -> None:
    """It replayed the first batch silently; the same body still replays."""
    headers = {"Idempotency-Key": "reused-key"}
    file_id = upload_batch_file(http, b"not json\n")  # fails validation: nothing runs
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    first = http.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == 200, first.get_data(as_text=True)
    other_file = upload_batch_file(http, b"not json either\n")
    for other in ({"metadata": {"k": "v"}}, {"input_file_id": other_file}):
        refused = http.post("/v1/batches", json=body | other, headers=headers)
        assert refused.status_code == 422, (other, refused.get_data(as_text=True))
        error = refused.get_json()["error"]
        assert error["param"] == "Idempotency-Key" and "different parameters" in error["message"]
    again = http.post("/v1/batches", json=body, headers=headers)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    docs = http.post("/v1/document-batches", json=DOCS, headers=headers)
    assert docs.status_code == 202, docs.get_data(as_text=True)
    other_documents = [{"id": "d1", "text": "Other words."}]
    jsonl = b'{"id": "d1", "text": "Other words."}\n'
    for other_docs in (
        {"json": DOCS | {"instructions": "Something else."}},
        {"json": DOCS | {"documents": other_documents}},  # same options, other documents
        {"data": jsonl, "content_type": "application/jsonl", "query_string": _options(DOCS)},
    ):
        refused = http.post("/v1/document-batches", headers=headers, **other_docs)
        error = refused.get_json()["error"]
        assert refused.status_code == 422 and error["param"] == "Idempotency-Key", other_docs
    replayed = http.post("/v1/document-batches", json=DOCS, headers=headers)
    assert replayed.status_code == 200 and replayed.get_json()["id"] == docs.get_json()["id"]
    same_as_jsonl = http.post(  # the same documents in another format are the same request
        "/v1/document-batches",
        data=b'{"id": "1", "text": "one"}\n',
        content_type="application/jsonl",
        query_string=_options(DOCS),
        headers=headers,
    )
    assert same_as_jsonl.status_code == 200, same_as_jsonl.get_data(as_text=True)


def _options(body: dict[str, Any]) -> dict[str, str]:
    """A document batch's options as the query string of a JSONL submission."""
    return {k: v for k, v in body.items() if k != "documents" and isinstance(v, str)}


def test_a_cursor_of_a_listed_object_pages_on(http: FlaskClient) -> None:
    ids = [upload_batch_file(http, b"not json\n") for _ in range(3)]
    page = http.get("/v1/files", query_string={"limit": 1, "after": ids[2]}).get_json()
    assert [f["id"] for f in page["data"]] == [ids[1]] and page["has_more"] is True


@pytest.mark.parametrize("path", ["/v1/document-batches", "/v1/batches"])
def test_idempotency_key_over_255_characters(http: FlaskClient, path: str) -> None:
    response = http.post(path, json=DOCS, headers={"Idempotency-Key": "k" * 256})
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "Idempotency-Key"


def test_list_endpoints_share_one_pagination(http: FlaskClient) -> None:
    for path in ("/v1/jobs", "/v1/document-batches", "/v1/batches", "/v1/files"):
        for bad in ("x", "0", "100001"):
            response = http.get(path, query_string={"limit": bad})
            assert response.status_code == 400, (path, bad)
            assert response.get_json()["error"]["param"] == "limit"
        empty = http.get(path).get_json()
        assert empty["object"] == "list" and empty["has_more"] is False, path
        unknown = http.get(path, query_string={"after": "zzz"})  # it listed everything
        assert unknown.status_code == 400, (path, unknown.get_json())
        assert unknown.get_json()["error"]["param"] == "after"


def test_live_prefer_respond_async_routes_to_batch(client: httpx.Client) -> None:
    """RFC 7240 respond-async on both interactive doors: 202, Location, Preference-Applied."""
    prefer = {"Prefer": "respond-async"}
    for path, body in (("/v1/jobs", CHAT), ("/v1/chat/completions", CHAT | {"stream": True})):
        response = client.post(path, json=body, headers=prefer)
        assert response.status_code == 202, (path, response.text)
        job = response.json()
        assert response.headers["Location"] == f"/v1/jobs/{job['id']}", path
        assert response.headers["Preference-Applied"] == "respond-async", path
        assert response.headers["X-Sluice-Route"] == "batch; rule=prefer-async", path
        assert job["mode"] == "batch" and job["endpoint"] == path
    with client.stream("POST", "/v1/jobs", json=CHAT | {"mode": "stream"}, headers=prefer) as kept:
        assert kept.status_code == 200  # an explicit mode=stream keeps the stream
        assert kept.headers["content-type"].startswith("text/event-stream")
        kept.read()


def test_live_prefer_wait_answers_when_the_job_ends_in_time(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json=CHAT, headers={"Prefer": "respond-async, wait=30"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and job["output"] == "hi" and job["mode"] == "batch"
    assert response.headers["Preference-Applied"] == "wait=30"
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    chat = client.post(
        "/v1/chat/completions", json=CHAT | {"stream": False}, headers={"Prefer": "wait=30"}
    )
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"  # a stream
    routed = client.post(
        "/v1/chat/completions", json=CHAT, headers={"Prefer": "respond-async, wait=30"}
    )
    assert routed.status_code == 200, routed.text  # ran on the batch channel, ended in time
    assert routed.headers["X-Sluice-Route"] == "batch; rule=prefer-async"
    assert routed.headers["Preference-Applied"] == "wait=30"
    completion = routed.json()  # the endpoint's own answer, not the job object
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "hi"
    assert completion["id"] == f"chatcmpl-{routed.headers['X-Sluice-Job-Id']}"


def test_live_prefer_wait_then_202_when_the_job_is_slower(client: httpx.Client) -> None:
    slow = CHAT | {"model": "mock/slow?length=50&tps=10", "mode": "batch"}
    started = time.monotonic()
    response = client.post("/v1/jobs", json=slow, headers={"Prefer": "respond-async, wait=1"})
    waited = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert response.headers["Preference-Applied"] == "respond-async, wait=1"
    assert response.json()["status"] in ("queued", "running")
    assert 0.9 < waited < 10
    client.post(f"/v1/jobs/{response.json()['id']}/cancel")


# ---------------------------------------------------------------- hostile input (issue 10)

MESSAGES = '"messages": [{"role": "user", "content": "hi"}]'
DEEP = "[" * 100_000 + "]" * 100_000
BIG = "1" + "0" * 400  # a 401-digit integer
LONG_MODEL = "mock/" + "x" * 300
NUL_ID = '[{"id": "a\\u0000", "text": "a"}]'


def chat(extra: str, model: str = "mock/echo") -> str:
    return f'{{"model": "{model}", {MESSAGES}{extra}}}'


def docs(extra: str, model: str = "mock/echo", documents: str = '[{"text": "a"}]') -> str:
    return f'{{"model": "{model}", "instructions": "x", "documents": {documents}{extra}}}'


def window(value: str) -> str:
    return f', "completion_window": "{value}"'


HOSTILE_JSON = [  # (path, raw JSON body, the param the 400 names)
    ("/v1/chat/completions", '{"model": "mock/echo", "messages": ' + DEEP + "}", None),
    ("/v1/jobs", '{"model": "mock/echo", "messages": ' + DEEP + "}", None),
    ("/v1/document-batches", docs("", documents=DEEP), None),
    ("/v1/batches", '{"metadata": ' + DEEP + "}", None),
    ("/v1/chat/completions", chat(f', "temperature": {BIG}'), "temperature"),
    ("/v1/jobs", chat(f', "temperature": {BIG}'), "temperature"),
    ("/v1/document-batches", docs(f', "temperature": {BIG}'), "temperature"),
    ("/v1/chat/completions", chat(', "temperature": NaN'), "temperature"),
    ("/v1/document-batches", docs(', "temperature": NaN'), "temperature"),
    ("/v1/jobs", chat(', "top_p": -Infinity'), "top_p"),
    ("/v1/jobs", chat(f', "priority": {10**20}'), "priority"),
    ("/v1/jobs", chat(f', "priority": {2**40}'), "priority"),
    ("/v1/chat/completions", chat("", model="mock/a\\u0000b"), "model"),
    ("/v1/jobs", chat(', "user": "a\\u0000"'), "user"),
    ("/v1/document-batches", docs("", documents=NUL_ID), "documents[0].id"),
    ("/v1/chat/completions", chat("", model=LONG_MODEL), "model"),
    ("/v1/jobs", chat("", model=LONG_MODEL), "model"),
    ("/v1/document-batches", docs("", model=LONG_MODEL), "model"),
    ("/v1/document-batches", docs(window("99999999999999999999d")), "completion_window"),
    ("/v1/document-batches", docs(window("9999d")), "completion_window"),
]


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    HOSTILE_JSON,
    ids=[f"{p}-{q}-{i}" for i, (p, _, q) in enumerate(HOSTILE_JSON)],
)
def test_hostile_json_values_answer_400_naming_the_field(
    http: FlaskClient, path: str, raw: str, param: str | None
) -> None:
    response = http.post(path, data=raw, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)[:500]
    error = response.get_json()["error"]
    assert error["param"] == param and error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.fixture
def admin_http(app: Flask, admin_key: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {admin_key}"
    return client


def test_admin_keys_refuse_a_list_body_and_a_string_admin(admin_http: FlaskClient) -> None:
    listed = admin_http.post("/v1/admin/keys", json=["tenant"])
    assert listed.status_code == 400 and listed.get_json()["error"]["code"] == "invalid_json"
    stringly = admin_http.post("/v1/admin/keys", json={"tenant": "t-str", "admin": "false"})
    assert stringly.status_code == 400 and stringly.get_json()["error"]["param"] == "admin"
    long_name = admin_http.post("/v1/admin/keys", json={"tenant": "t" * 201})
    assert long_name.status_code == 400 and long_name.get_json()["error"]["param"] == "tenant"
    plain = admin_http.post("/v1/admin/keys", json={"tenant": "t-plain", "admin": False})
    assert plain.status_code == 201 and plain.get_json()["admin"] is False
    admin = admin_http.post("/v1/admin/keys", json={"tenant": "t-admin", "admin": True})
    assert admin.status_code == 201 and admin.get_json()["admin"] is True


def test_nul_and_overlong_values_in_the_url(http: FlaskClient, app: Flask) -> None:
    assert app.test_client().get("/v1/jobs/job_a%00b").status_code == 401  # auth comes first
    for path in ("/v1/jobs/job_a%00b", "/v1/document-batches/b%00", "/v1/batches/b%00"):
        response = http.get(path)
        assert response.status_code == 404 and response.get_json()["error"]["param"], path
    assert http.get("/v1/jobs/" + "j" * 300).status_code == 404
    for path in ("/v1/jobs", "/v1/files", "/v1/batches", "/v1/document-batches"):
        response = http.get(path, query_string={"after": "a\x00"})
        assert response.status_code == 400 and response.get_json()["error"]["param"] == "after"
    status = http.get("/v1/jobs", query_string={"status": "queued\x00"})
    assert status.status_code == 400 and status.get_json()["error"]["param"] == "status"


@pytest.mark.parametrize("last", ["18446744073709551616-0", "0-18446744073709551616"])
def test_last_event_id_above_2_to_the_64(http: FlaskClient, last: str) -> None:
    response = http.get("/v1/jobs/job_x/events", headers={"Last-Event-ID": last})
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "last_event_id"


@pytest.fixture
def small_body_limit(app: Flask) -> Iterator[int]:
    saved = app.config["MAX_CONTENT_LENGTH"]
    app.config["MAX_CONTENT_LENGTH"] = 2000
    try:
        yield 2000
    finally:
        app.config["MAX_CONTENT_LENGTH"] = saved


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs", "/v1/batches"])
@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413(
    http: FlaskClient, small_body_limit: int, path: str, chunked: bool
) -> None:
    raw = json.dumps(CHAT | {"user": "u" * small_body_limit}).encode()
    if chunked:  # no Content-Length: the limit holds while the body is read
        response = http.post(
            path,
            input_stream=io.BytesIO(raw),
            content_type="application/json",
            headers={"Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},
        )
    else:
        response = http.post(path, data=raw, content_type="application/json")
    assert response.status_code == 413, response.get_data(as_text=True)[:300]
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    under = http.post(path, json={"model": "mock/echo"})  # small bodies still get through
    assert under.status_code == 400


def test_admin_keys_body_limit(admin_http: FlaskClient, small_body_limit: int) -> None:
    response = admin_http.post("/v1/admin/keys", json={"tenant": "t" * small_body_limit})
    assert response.status_code == 413


def test_live_chunked_body_over_the_default_limit_is_413(client: httpx.Client) -> None:
    """gunicorn hands a chunked body over without a length; it is bounded all the same."""
    chunk = b" " * (1024 * 1024)

    def body() -> Iterator[bytes]:
        yield b'{"model": "mock/echo", "messages": [], "user": "'
        for _ in range(40):  # 40 MiB, over the 32 MiB default MAX_CONTENT_LENGTH
            yield chunk
        yield b'"}'

    response = client.post(
        "/v1/chat/completions", content=body(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"]["code"] == "request_too_large"


HOSTILE_LINES = [DEEP, '{"id": "a\\u0000", "text": "x"}', '{"id": "a", "text": NaN}']


def test_hostile_jsonl_document_lines_are_named_not_500(http: FlaskClient) -> None:
    for line in HOSTILE_LINES:
        response = http.post(
            "/v1/document-batches?model=mock/echo&instructions=x",
            data=line + "\n",
            content_type="application/jsonl",
        )
        assert 400 <= response.status_code < 500, response.get_data(as_text=True)[:300]
        assert "line 1" in response.get_data(as_text=True)


def test_hostile_openai_batch_lines_fail_the_batch_by_line(http: FlaskClient) -> None:
    custom_nul = batch_line().replace(b'"custom_id": "a"', b'"custom_id": "a\\u0000"')
    file_id = upload_batch_file(http, (DEEP + "\n").encode() + custom_nul)
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    response = http.post("/v1/batches", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    batch = response.get_json()
    assert batch["status"] == "failed"
    errors = {(e["line"], e["code"]) for e in batch["errors"]["data"]}
    assert errors == {(1, "invalid_json_line"), (2, "invalid_json_line")}


@pytest.mark.parametrize("value", ["nan", "inf", "1" + "0" * 400])
def test_document_batch_form_numbers(http: FlaskClient, value: str) -> None:
    query = f"model=mock/echo&instructions=x&temperature={value}"
    response = http.post(
        f"/v1/document-batches?{query}", data=b'{"text": "a"}\n', content_type="application/jsonl"
    )
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"]["param"] == "temperature"


def _calls(tree: ast.AST) -> set[str]:
    """The names of the functions a module calls (`f(...)` and `x.f(...)`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            found.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return found


def test_routing_rejects_and_replays_live_in_the_front_door() -> None:
    """One place each: only the front door service decides, turns a reject into an error and
    looks an Idempotency-Key up (the engine keeps its race fallback)."""
    root = Path(app_package.__file__).parent
    for path in root.rglob("*.py"):
        name, text = path.relative_to(root).as_posix(), path.read_text()
        calls = _calls(ast.parse(text))
        if name not in ("services/front_door.py", "policy.py"):
            assert "decide" not in calls, name
        if name not in ("services/front_door.py", "services/batches.py"):
            assert "find_by_idempotency_key" not in calls, name
        if name != "services/front_door.py":
            assert "rejected_by_policy" not in text, name


def test_the_body_limit_holds_outside_v1_too(app: Flask, small_body_limit: int) -> None:
    """The dashboard's login form is parsed before sign-in: MAX_CONTENT_LENGTH bounds it."""
    form = {"key": "k" * (small_body_limit * 2)}
    response = app.test_client().post("/dashboard/login", data=form)
    assert response.status_code == 413


def test_revoke_key_returns_only_after_every_hub_has_dropped_the_key(app_ctx: Flask) -> None:
    """revoke_key waits for each hub that heard the revocation to run its listeners, so a
    slow hub cannot accept the key after the revocation returned (bounded by the ack wait)."""
    from app.auth import create_key, hash_key, revoke_key
    from app.streams.hub import StreamHub

    key, plaintext = create_key("t-revoked-acked")
    heard: list[str | None] = []

    def slow_listener(key_hash: str | None) -> None:
        time.sleep(0.5)
        heard.append(key_hash)

    hub = StreamHub(app_ctx.config["REDIS_URL"])
    try:
        hub.on_revocation(slow_listener)
        assert hub.connected.wait(5)
        heard.clear()
        assert revoke_key(key.id)
        assert hash_key(plaintext) in heard
    finally:
        hub.close()


def test_a_revoked_key_is_refused_at_once_though_every_web_process_cached_it(
    stack: Stack, app: Flask
) -> None:
    """Web processes cache live keys (app/auth.py KeyCache); a revocation, here by the CLI's
    revoke_key in this process, is broadcast and drops the key everywhere at once."""
    from app.auth import create_key, revoke_key

    with app.app_context():
        key, plaintext = create_key("t-revoked-cached")
        key_id = key.id
    headers = {"Authorization": f"Bearer {plaintext}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=10) as http:
        # many connections, so each gunicorn worker process looks the key up and caches it
        for _ in range(20):
            response = http.get("/v1/models", headers={"Connection": "close"})
            assert response.status_code == 200
        with app.app_context():
            assert revoke_key(key_id)
        for _ in range(20):
            response = http.get("/v1/models", headers={"Connection": "close"})
            assert response.status_code == 401, response.text
