"""GET /openapi.json: an OpenAPI 3.1 description of every route, built by apispec from the
route table (routes.py) and the pydantic models of schemas.py."""

from __future__ import annotations

import re
from typing import Any

from apispec import APISpec
from flask import Blueprint, Flask, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel
from werkzeug.routing import Rule

from app.openapi.operations import JSON, Operation, Param, Response
from app.openapi.routes import ROUTES
from app.openapi.schemas import Error

bp = Blueprint("openapi", __name__)

IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})
MAX_ID_CHARS = 200  # front_door.bound_request answers 404 past it
REQUEST_ID = "X-Request-ID"
_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
_COMPONENT = re.compile(r"[^a-zA-Z0-9.\-_]")
_REF = "#/components/schemas/{model}"


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)


@bp.get("/openapi.json")
def spec() -> ResponseReturnValue:
    cached = current_app.extensions.get("openapi")
    if cached is None:
        cached = current_app.extensions["openapi"] = build_spec(current_app)
    return jsonify(cached)


def openapi_path(rule: Rule) -> str:
    """/v1/jobs/<job_id> -> /v1/jobs/{job_id}"""
    return _ARGUMENT.sub(r"{\1}", rule.rule)


def operation_id(rule: Rule, method: str) -> str:
    methods = sorted(set(rule.methods or ()) - IGNORED_METHODS)
    return rule.endpoint if len(methods) == 1 else f"{rule.endpoint}.{method.lower()}"


def described_rules(app: Flask) -> list[tuple[Rule, str]]:
    """Every (rule, method) the app answers, in path order."""
    rules = sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint))
    return [(r, m) for r in rules for m in sorted(set(r.methods or ()) - IGNORED_METHODS)]


def undescribed(app: Flask) -> list[str]:
    return [
        f"{m} {r.rule} ({r.endpoint})" for r, m in described_rules(app) if r.endpoint not in ROUTES
    ]


class _Schemas:
    """Pydantic models as components; raw schemas may hold models anywhere."""

    def __init__(self, spec: APISpec) -> None:
        self.spec = spec
        self.names: dict[type[BaseModel], str] = {}

    def ref(self, value: Any, *, request: bool = False) -> Any:
        if isinstance(value, type) and issubclass(value, BaseModel):
            return {"$ref": _REF.format(model=self.add(value, request=request))}
        if isinstance(value, dict):
            return {k: self.ref(v, request=request) for k, v in value.items()}
        if isinstance(value, list):
            return [self.ref(v, request=request) for v in value]
        return value

    def add(self, model: type[BaseModel], *, request: bool = False) -> str:
        if model in self.names:
            return self.names[model]
        name = _COMPONENT.sub("_", model.__name__)
        self.names[model] = name
        schema = _clean(model.model_json_schema(ref_template=_REF), unset_null=request)
        for def_name, definition in schema.pop("$defs", {}).items():
            if def_name not in self.spec.components.schemas:
                self.spec.components.schema(def_name, definition)
        if name not in self.spec.components.schemas:
            self.spec.components.schema(name, schema)
        return name


_NULL = {"type": "null"}


def _clean(schema: Any, *, unset_null: bool = False) -> Any:
    """Drop pydantic's titles and `default: null`; with unset_null (a request body), also an
    optional field's `null` (absent or null means unset: the value's schema describes it)."""
    if isinstance(schema, dict):
        options = schema.get("anyOf")
        if unset_null and schema.get("default", ...) is None and isinstance(options, list):
            values = [option for option in options if option != _NULL]
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            schema = rest | values[0] if len(values) == 1 else rest | {"anyOf": values}
        return {
            k: _clean(v, unset_null=unset_null)
            for k, v in schema.items()
            if not (k == "title" and isinstance(v, str)) and not (k == "default" and v is None)
        }
    if isinstance(schema, list):
        return [_clean(v, unset_null=unset_null) for v in schema]
    return schema


def _parameter(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {"name": param.name, "in": param.where, "schema": param.schema}
    if param.description:
        out["description"] = param.description
    if param.required:
        out["required"] = True
    return out


def _response(response: Response, schemas: _Schemas, ops: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": response.description}
    if response.content:
        out["content"] = {
            media: {"schema": schemas.ref(model) if model is not None else {}}
            for media, model in response.content.items()
        }
    out["headers"] = {
        name: {"schema": {"type": "string"}} for name in (REQUEST_ID, *response.headers)
    }
    if response.links:
        out["links"] = {
            name: {
                "operationId": ops.get(target, target),
                "parameters": {param: "$response.body#/id"},
            }
            for name, (target, param) in response.links.items()
        }
    return out


def _operation(
    rule: Rule, method: str, op: Operation, schemas: _Schemas, ops: dict[str, str]
) -> dict[str, Any]:
    params = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
        }
        for name in sorted(rule.arguments)
    ]
    params += [_parameter(p) for p in op.params]
    params.append(
        {
            "name": REQUEST_ID,
            "in": "header",
            "description": "echoed on the response and carried to the job's worker logs",
            "schema": {"type": "string", "maxLength": 128},
        }
    )
    responses = {code: _response(r, schemas, ops) for code, r in op.responses.items()}
    error = {JSON: {"schema": schemas.ref(Error)}}
    headers = {REQUEST_ID: {"schema": {"type": "string"}}}
    responses.setdefault("4XX", {"description": "Refused (OpenAI's error body)", "content": error})
    responses["4XX"].setdefault("headers", headers)
    if rule.rule.startswith("/v1"):
        responses.setdefault(
            "503",
            {
                "description": "Redis or the database is unreachable (Retry-After)",
                "content": error,
                "headers": headers | {"Retry-After": {"schema": {"type": "string"}}},
            },
        )
    out: dict[str, Any] = {
        "operationId": operation_id(rule, method),
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": params,
        "responses": responses,
    }
    if op.description:
        out["description"] = op.description
    if op.body is not None and method in ("POST", "PUT", "PATCH"):
        content = op.body if isinstance(op.body, dict) else {JSON: op.body}
        out["requestBody"] = {
            "required": op.body_required,
            "content": {
                media: {"schema": schemas.ref(m, request=True)} for media, m in content.items()
            },
        }
    if op.security == "bearer":
        out["security"] = [{"bearer": []}]
    elif op.security == "session":
        out["security"] = [{"session": []}]
    else:
        out["security"] = []
    return out


def build_spec(app: Flask) -> dict[str, Any]:
    spec = APISpec(
        title="Sluice",
        version="0.1.0",
        openapi_version="3.1.0",
        info={"description": "A job orchestrator for LLM work (OpenAI-compatible /v1)."},
    )
    spec.components.security_scheme(
        "bearer", {"type": "http", "scheme": "bearer", "description": "an API key, sk-sluice-…"}
    )
    spec.components.security_scheme(
        "session", {"type": "apiKey", "in": "cookie", "name": "session"}
    )
    schemas = _Schemas(spec)
    rules = [(r, m) for r, m in described_rules(app) if r.endpoint in ROUTES]
    ops = {r.endpoint: operation_id(r, m) for r, m in rules}
    paths: dict[str, dict[str, Any]] = {}
    for rule, method in rules:
        operation = _operation(rule, method, ROUTES[rule.endpoint], schemas, ops)
        paths.setdefault(openapi_path(rule), {})[method.lower()] = operation
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()
