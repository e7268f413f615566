"""/openapi.json: every route described, valid OpenAPI 3.1, in step with the validators."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from app.openapi import described_rules, openapi_path, operation_id, undescribed
from app.services.chat_request import PARAMETERS
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
    described = set(schemas["ChatCompletionRequest"]["properties"])
    assert set(PARAMETERS) - described == set()
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is True  # carried along


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
    answered = {
        "Job": http.post("/v1/jobs", json=CHAT | {"mode": "batch"}).get_json(),
        "DocumentBatch": http.post("/v1/document-batches", json=DOCS).get_json(),
        "FileObject": file,
        "BatchObject": http.post("/v1/batches", json=batch).get_json(),
        "ApiKeyCreated": app_client(app, admin_key)
        .post("/v1/admin/keys", json={"tenant": "described"})
        .get_json(),
        "ApiKey": http.get("/v1/me").get_json(),
    }
    for name, body in answered.items():
        assert set(body) == set(schemas[name]["properties"]), name
