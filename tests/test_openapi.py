"""/openapi.json: every route described, valid OpenAPI 3.1, in step with the validators."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from openapi_spec_validator import validate
from pydantic import BaseModel

from app import validation
from app.openapi import described_rules, openapi_path, operation_id, undescribed
from app.services.chat_request import PARAMETERS, ChatCompletionRequest
from tests.helpers import app_client
from tests.test_isolation import CHAT, DOCS


def spec_of(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


def test_every_route_has_a_description(app: Flask) -> None:
    assert undescribed(app) == [], "describe these in app/openapi/routes.py"
    paths = spec_of(app)["paths"]
    for rule, method in described_rules(app):
        operation = paths[openapi_path(rule)][method.lower()]
        assert operation["operationId"] == operation_id(rule, method)
        assert operation["summary"] and operation["responses"]


def test_a_route_without_a_description_is_named(make_app: Callable[..., Flask]) -> None:
    fresh = make_app()
    fresh.add_url_rule("/v1/widgets/<widget_id>", "v1.widgets.get", lambda widget_id: "")
    assert undescribed(fresh) == ["GET /v1/widgets/<widget_id> (v1.widgets.get)"]


def test_the_description_is_valid_openapi_3_1(app: Flask) -> None:
    spec = spec_of(app)
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_sse_and_admin_routes_are_described(app: Flask) -> None:
    paths = spec_of(app)["paths"]
    for path, method in (
        ("/v1/chat/completions", "post"),
        ("/v1/jobs", "post"),
        ("/v1/jobs/{job_id}/events", "get"),
        ("/v1/document-batches/{batch_id}/events", "get"),
        ("/dashboard/stream", "get"),
    ):
        ok = paths[path][method]["responses"]["200"]
        assert "text/event-stream" in ok["content"], path
    for path, method in (
        ("/v1/admin/keys", "get"),
        ("/v1/admin/keys", "post"),
        ("/v1/admin/keys/{key_id}/revoke", "post"),
    ):
        operation = paths[path][method]
        assert operation["tags"] == ["admin"] and operation["security"] == [{"bearer": []}]


def test_the_chat_body_describes_every_parameter_the_validator_checks(app: Flask) -> None:
    schemas = spec_of(app)["components"]["schemas"]
    assert set(PARAMETERS) - set(schemas["ChatCompletionRequest"]["properties"]) == set()
    # every parameter a field checked by its PARAMETERS entry, in the table's order
    assert list(ChatCompletionRequest.model_fields)[4:] == list(PARAMETERS)
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is True  # carried along


def test_every_json_body_is_parsed_by_the_model_that_describes_it(
    app: Flask, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each /v1 route with a JSON body validates it with its described model, one call."""
    parsed: dict[str, list[str]] = {}
    parse = validation.parse

    def recording(model: type[BaseModel], data: Any, context: Any = None) -> Any:
        parsed.setdefault(str(request.endpoint), []).append(model.__name__)
        return parse(model, data, context)

    monkeypatch.setattr(validation, "parse", recording)
    spec, http = spec_of(app), app_client(app, admin_key)
    described: dict[str, str] = {}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None or not path.startswith("/v1"):
                continue
            described[operation["operationId"]] = body["schema"]["$ref"].rsplit("/", 1)[1]
            response = http.open(path, method=method.upper(), json={"model": 1})
            assert response.status_code == 400, (path, response.get_data(as_text=True))
    assert len(described) == 6, described
    assert {op: names[-1] for op, names in parsed.items()} == described
    assert all(len(names) == 1 for names in parsed.values()), parsed


def _upload(http: FlaskClient) -> dict[str, Any]:
    data = {"purpose": "batch", "file": (io.BytesIO(b"not json\n"), "in.jsonl")}
    body: dict[str, Any] = http.post(
        "/v1/files", data=data, content_type="multipart/form-data"
    ).get_json()
    return body


def test_every_key_the_api_answers_is_described(app: Flask, api_key: str, admin_key: str) -> None:
    """The objects as answered have exactly the keys their schemas name."""
    schemas = spec_of(app)["components"]["schemas"]
    http = app_client(app, api_key)
    file = _upload(http)
    batch = {
        "input_file_id": file["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    admin = app_client(app, admin_key)
    created = admin.post("/v1/admin/keys", json={"tenant": "described"}).get_json()
    answered = {
        "Job": http.post("/v1/jobs", json=CHAT | {"mode": "batch"}).get_json(),
        "DocumentBatch": http.post("/v1/document-batches", json=DOCS).get_json(),
        "FileObject": file,
        "BatchObject": http.post("/v1/batches", json=batch).get_json(),
        "ApiKeyCreated": created,
        "ApiKey": http.get("/v1/me").get_json(),
        "KeyRevoked": admin.post(f"/v1/admin/keys/{created['id']}/revoke").get_json(),
        "FileDeleted": http.delete(f"/v1/files/{file['id']}").get_json(),
        "ModelObject": http.get("/v1/models/mock/echo").get_json(),
        "Error": http.get("/v1/jobs/job_none").get_json(),
    }
    for name, body in answered.items():
        assert set(body) == set(schemas[name]["properties"]), name


def test_a_key_the_body_model_does_not_name_is_refused(
    app: Flask, api_key: str, admin_key: str
) -> None:
    """Honour or refuse: a closed body (additionalProperties false) names an unknown key."""
    http, admin = app_client(app, api_key), app_client(app, admin_key)
    batch = {"input_file_id": _upload(http)["id"], "endpoint": "/v1/chat/completions"}
    for client, path, body in (
        (http, "/v1/batches", batch | {"completion_window": "24h", "priority": 3}),
        (admin, "/v1/admin/keys", {"tenant": "closed", "role": "owner"}),
        (http, "/v1/document-batches", DOCS | {"mode": "stream"}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, response.get_data(as_text=True))
        error = response.get_json()["error"]
        assert error["code"] == "unknown_parameter", error
        assert error["param"] in ("priority", "role", "mode") and error["param"] in error["message"]
    schemas = spec_of(app)["components"]["schemas"]
    for name in ("BatchRequest", "KeyRequest", "DocumentBatchRequest"):
        assert schemas[name]["additionalProperties"] is False, name
