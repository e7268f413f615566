"""The tenant-isolation matrix, generated from /openapi.json: every operation on a path with
an id, called with tenant B's key on tenant A's object, answers 404 and changes nothing.

An operation on an id path that has no MATRIX entry fails the test: describe a new route
in app/openapi/routes.py and it lands here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.openapi import build_spec
from app.openapi.operations import Operation, Response
from app.openapi.routes import ROUTES
from tests.helpers import app_client, insert_job, tenant_of

CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
DOCS = {"model": "mock/echo", "instructions": "x", "documents": [{"id": "1", "text": "one"}]}
BATCH_LINE = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}

# operationId -> the kind of tenant object its id names (None: not a tenant's object)
MATRIX: dict[str, str | None] = {
    "v1.jobs.show_job": "job",
    "v1.jobs.job_events": "job",
    "v1.jobs.cancel_job": "job",
    "v1.responses.get_response": "response",
    "v1.responses.cancel_response": "response",
    "v1.responses.list_input_items": "response",
    "v1.document_batches.get": "documents",
    "v1.document_batches.cancel": "documents",
    "v1.document_batches.results": "documents",
    "v1.document_batches.events": "documents",
    "v1.files.retrieve_file": "file",
    "v1.files.file_content": "file",
    "v1.files.delete_file": "file",
    "v1.batches.retrieve_batch": "openai",
    "v1.batches.cancel_batch": "openai",
    "v1.keys.revoke": "key",  # admin-only: a tenant's key gets 403 before any lookup
    "v1.models.get_model": None,  # model names are the deployment's, not a tenant's
    "dashboard.static": None,  # files, not ids
    # the job page reads any tenant's job for an admin's session; a tenant key cannot sign in
    "dashboard.job_page": None,
    "dashboard.api_job": None,
    "dashboard.api_job_events": None,
    "dashboard.api_job_cancel": None,
    "static": None,
}
EXPECTED = {"key": 403}  # every other kind: 404
SHOWN = {  # how tenant A reads each kind back (status, state) to see that nothing changed
    "job": "/v1/jobs/{}",
    "response": "/v1/responses/{}",
    "documents": "/v1/document-batches/{}",
    "file": "/v1/files/{}",
    "openai": "/v1/batches/{}",
}


def id_operations(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(operationId, method, path template) of every operation on a path with a parameter."""
    return [
        (operation["operationId"], method.upper(), path)
        for path, operations in spec["paths"].items()
        if "{" in path
        for method, operation in operations.items()
    ]


def _upload(http: FlaskClient, content: bytes) -> str:
    data = {"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")}
    response = http.post("/v1/files", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    return str(response.get_json()["id"])


def make_objects(http: FlaskClient, admin: FlaskClient) -> dict[str, str]:
    """One object of every kind, owned by tenant A."""
    batch = {
        "input_file_id": _upload(http, b"not json\n"),
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    key = admin.post("/v1/admin/keys", json={"tenant": "isolation-a"}).get_json()
    return {
        "job": http.post("/v1/jobs", json=CHAT | {"mode": "batch"}).get_json()["id"],
        "documents": http.post("/v1/document-batches", json=DOCS).get_json()["id"],
        "file": _upload(http, json.dumps(BATCH_LINE).encode() + b"\n"),
        "openai": http.post("/v1/batches", json=batch).get_json()["id"],
        "key": key["id"] + " " + key["key"],
    }


def test_every_id_operation_of_the_spec_is_in_the_matrix(app: Flask) -> None:
    spec = app.test_client().get("/openapi.json").get_json()
    operations = {op_id for op_id, _, _ in id_operations(spec)}
    assert operations, "no id routes in the spec?"
    missing = sorted(operations - set(MATRIX))
    assert not missing, f"add these operations to MATRIX: {missing}"
    assert not set(MATRIX) - operations, "MATRIX names operations the spec no longer has"


def test_the_matrix_fails_on_an_id_route_it_does_not_know(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new described id route reaches id_operations through the generated spec."""
    fresh = make_app()
    fresh.add_url_rule("/v1/widgets/<widget_id>", "v1.widgets.get", lambda widget_id: "")
    widget = Operation("Retrieve a widget", "widgets", {"200": Response("The widget")})
    monkeypatch.setitem(ROUTES, "v1.widgets.get", widget)
    operations = {op for op, _, _ in id_operations(build_spec(fresh))}
    assert operations - set(MATRIX) == {"v1.widgets.get"}


def test_another_tenants_objects_answer_404_and_stay_as_they_were(
    app: Flask, api_key: str, other_key: str, admin_key: str
) -> None:
    http, other = app_client(app, api_key), app_client(app, other_key)
    objects = make_objects(http, app_client(app, admin_key))
    with app.app_context():  # a finished response: nothing but a cancel could change it
        job = insert_job(tenant_of(api_key), "stream", "succeeded", endpoint="/v1/responses")
        objects["response"] = "resp_" + job.id.removeprefix("job_")
    key_id, key_secret = objects["key"].split(" ")
    objects["key"] = key_id

    def state(kind: str) -> tuple[int, Any]:
        if kind == "key":
            return app_client(app, key_secret).get("/v1/me").status_code, None
        response = http.get(SHOWN[kind].format(objects[kind]))
        body = response.get_json()
        return response.status_code, body.get("status") if body else None

    before = {kind: state(kind) for kind in objects}
    spec = app.test_client().get("/openapi.json").get_json()
    called: list[str] = []
    for op_id, method, path in id_operations(spec):
        kind = MATRIX[op_id]
        if kind is None:
            continue
        url = path.replace("{" + path.split("{")[1].split("}")[0] + "}", objects[kind])
        response = other.open(url, method=method)
        expected = EXPECTED.get(kind, 404)
        assert response.status_code == expected, (op_id, response.get_data(as_text=True)[:200])
        if expected == 404:
            assert response.get_json()["error"]["type"] == "not_found_error", op_id
        called.append(op_id)
    assert len(called) == sum(1 for kind in MATRIX.values() if kind is not None)
    for kind in objects:
        after = state(kind)
        assert after[0] == 200, kind
        if kind in ("job", "documents"):  # these run on (a batch worker may finish them)
            assert after[1] not in ("cancelled", "cancelling"), kind
        else:
            assert after == before[kind], kind
