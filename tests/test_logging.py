"""Structured logs (app/logs.py): JSON lines, request ids end to end, no secrets, 500s logged."""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest
from flask import Flask
from werkzeug.exceptions import InternalServerError

from app.logs import REQUEST_LOGGER, JsonFormatter, redact
from tests.helpers import app_client, submit_documents, tenant_of, tuned_batch_worker, wait_batch
from tests.stack import Stack

TASK_LOGGERS = ("celery.app.trace", "app.", "workers.")  # lines logged inside a running task
KEY = "sk-sluice-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v"


def formatted(record: logging.LogRecord) -> dict[str, object]:
    line = JsonFormatter().format(record)
    assert "\n" not in line  # one line
    parsed: dict[str, object] = json.loads(line)
    return parsed


def test_a_line_is_one_json_object_with_its_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "x", "levelname": "INFO", "msg": "a %s", "args": ("b",), "route": "/v1/jobs"}
    )
    line = formatted(record)
    assert line["message"] == "a b" and line["level"] == "INFO" and line["logger"] == "x"
    assert line["route"] == "/v1/jobs" and "ts" in line


def test_keys_and_bearer_tokens_never_reach_the_output() -> None:
    text = f"Authorization: Bearer {KEY} api_key='{KEY}' upstream sk-ant-{KEY[10:]}"
    assert KEY not in redact(text) and KEY[10:] not in redact(text)
    try:
        raise RuntimeError(f"failed with {KEY}")
    except RuntimeError:
        record = logging.makeLogRecord({"msg": f"key {KEY}", "exc_info": sys.exc_info()})
    line = json.dumps(formatted(record))
    assert KEY not in line and "[redacted]" in line and "RuntimeError" in line


@pytest.fixture
def request_lines(
    caplog: pytest.LogCaptureFixture,
) -> Iterator[Callable[[], list[dict[str, object]]]]:
    """The request lines logged so far in the test, formatted."""
    with caplog.at_level(logging.DEBUG, logger=REQUEST_LOGGER):
        yield lambda: [formatted(r) for r in caplog.records if r.name == REQUEST_LOGGER]


def test_one_line_per_request_with_id_route_status_duration_and_tenant(
    app: Flask, api_key: str, request_lines: Callable[[], list[dict[str, object]]]
) -> None:
    http = app_client(app, api_key)
    response = http.get("/v1/jobs/job_nope", headers={"X-Request-ID": "req-42.a"})
    assert response.status_code == 404
    assert response.headers["X-Request-ID"] == "req-42.a"
    [line] = request_lines()
    with app.app_context():
        tenant = tenant_of(api_key)
    assert line["request_id"] == "req-42.a"
    assert line["route"] == "/v1/jobs/<job_id>" and line["path"] == "/v1/jobs/job_nope"
    assert line["status"] == 404 and line["method"] == "GET"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["tenant_id"] == tenant
    assert api_key not in json.dumps(line)
    assert line["level"] == "INFO"


def test_probe_lines_are_debug(
    app: Flask, request_lines: Callable[[], list[dict[str, object]]]
) -> None:
    app.test_client().get("/healthz")
    [line] = request_lines()
    assert line["route"] == "/healthz" and line["level"] == "DEBUG"


def test_a_missing_or_unsafe_request_id_is_replaced(
    app: Flask, request_lines: Callable[[], list[dict[str, object]]]
) -> None:
    client = app.test_client()
    for sent in (None, "x" * 129, "bad id; Injected: 1", '{"a":1}'):
        headers = {"X-Request-ID": sent} if sent is not None else {}
        answered = client.get("/healthz", headers=headers).headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", answered), sent
    ids = [line["request_id"] for line in request_lines()]
    assert len(ids) == 4 and len(set(ids)) == 4


def test_a_500_is_logged_with_its_traceback_and_request_id(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    broken = make_app()

    def explode() -> str:
        raise RuntimeError(f"kaboom with {KEY}")

    broken.add_url_rule("/explode", "explode", explode)
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        response = broken.test_client().get("/explode", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.get_json()["error"]["type"] == "server_error"
    assert "boom-1" in response.get_json()["error"]["message"]  # to quote when reporting it
    assert response.headers["X-Request-ID"] == "boom-1"
    [record] = [r for r in caplog.records if r.name == "app.errors"]
    line = formatted(record)
    assert line["request_id"] == "boom-1" and line["level"] == "ERROR"
    traceback = str(line["traceback"])
    assert "RuntimeError: kaboom" in traceback and "explode" in traceback
    assert KEY not in json.dumps(line)


def test_the_request_id_rides_with_the_task_onto_every_line_of_the_job(
    stack: Stack, api_key: str
) -> None:
    """A document batch submitted with X-Request-ID: the batch worker (at DEBUG, so Celery's
    per-task lines show) logs the id on every line it writes while it runs those items."""
    request_id = f"rid-{secrets.token_hex(6)}"
    name = f"batch-logs-{secrets.token_hex(3)}"
    headers = {"Authorization": f"Bearer {api_key}", "X-Request-ID": request_id}
    with (
        tuned_batch_worker(stack, {"SLUICE_LOG_LEVEL": "DEBUG"}, name),
        httpx.Client(base_url=stack.url, headers=headers, timeout=30) as client,
    ):
        docs = [{"id": str(i), "text": f"log doc {i}"} for i in range(3)]
        submitted = submit_documents(client, docs)
        assert submitted.status_code == 202, submitted.text
        assert submitted.headers["X-Request-ID"] == request_id
        assert wait_batch(client, submitted.json()["id"])["status"] == "completed"
    text = (stack.home / f"{name}.log").read_text()
    lines = [json.loads(raw) for raw in text.splitlines() if raw.startswith("{")]
    ours = [line for line in lines if line.get("request_id") == request_id]
    assert any("succeeded" in line["message"] for line in ours), text[-3000:]
    tasks = {m for line in ours for m in re.findall(r"\[([0-9a-f-]{36})\]", line["message"])}
    assert tasks
    for line in lines:  # every line the task logs while it runs (the consumer's come first)
        if line["logger"].startswith(TASK_LOGGERS) and any(t in line["message"] for t in tasks):
            assert line.get("request_id") == request_id, line
    assert api_key not in text


def test_an_internal_server_error_raised_as_such_is_logged_too(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    broken = make_app()

    def abort_500() -> str:
        raise InternalServerError()

    broken.add_url_rule("/abort", "abort_500", abort_500)
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        response = broken.test_client().get("/abort", headers={"X-Request-ID": "abort-1"})
    assert response.status_code == 500
    [record] = [r for r in caplog.records if r.name == "app.errors"]
    assert formatted(record)["request_id"] == "abort-1"
