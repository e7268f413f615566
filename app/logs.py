"""The log format: one JSON object per line, with the request id that caused it.

- Every request gets an id: the client's `X-Request-ID` when it is a sane token, else a new
  one; it is answered in `X-Request-ID` and logged on every line the request causes.
- One `sluice.request` line per request: method, route (the URL rule, not the path with its
  ids), path, status, duration_ms, tenant_id, request_id. Never headers, never the query.
  INFO, except the probes' and scrapers' routes (QUIET_ROUTES), which are DEBUG.
- A task sent while a request is served carries the id (and the tenant) in its Celery
  headers; the worker puts them on every line it logs while it runs that task.
- Secrets never reach the output: API keys (`sk-…`) and `Bearer` tokens are masked in every
  message and traceback, whatever logged them.

Which lines are logged, and at which level, is app/log_levels.py's business.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from celery import signals
from flask import Flask, Response, g, has_request_context, request

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_LOGGER = "sluice.request"
# polled by probes and scrapers every few seconds: their lines are DEBUG, every other INFO
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/dashboard/static/<path:filename>"})
TASK_HEADER = "sluice_request_id"  # Celery message header names
TENANT_HEADER = "sluice_tenant_id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_SECRETS = (
    (re.compile(r"\b(sk-[A-Za-z]{0,6}-?)[A-Za-z0-9_\-]{8,}"), r"\1[redacted]"),
    (re.compile(r"(?i)\b(bearer\s+)[^\s'\",]+"), r"\1[redacted]"),
    (
        re.compile(
            r"(?i)((?:api[_-]?key|authorization|x-api-key)['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+"
        ),
        r"\1[redacted]",
    ),
)
# LogRecord's own attributes: anything else on a record came from `extra=` and is logged
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

request_id_var: ContextVar[str | None] = ContextVar("sluice_request_id", default=None)
tenant_id_var: ContextVar[str | None] = ContextVar("sluice_tenant_id", default=None)


def redact(text: str) -> str:
    """Mask API keys and bearer tokens."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def current_request_id() -> str | None:
    return request_id_var.get()


def _tenant_id() -> str | None:
    if has_request_context():
        tenant = g.get("tenant_id")
        if tenant is not None:
            return str(tenant)
    return tenant_id_var.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, tenant_id, any
    `extra=` fields, and `traceback` for a record with exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            line["request_id"] = request_id
        tenant = getattr(record, "tenant_id", None) or _tenant_id()
        if tenant:
            line["tenant_id"] = tenant
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in line and not key.startswith("_"):
                line[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            line["traceback"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["traceback"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, default=str, ensure_ascii=False)


def install_record_factory() -> None:
    """Stamp each record with the request id and tenant when it is made (so any handler,
    however late it formats, has them)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_sluice", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        request_id = current_request_id()
        if request_id is not None:
            record.request_id = request_id
            record.tenant_id = _tenant_id()
        return record

    factory._sluice = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def install_handler(level: str | int) -> None:
    """The root logger writes JSON lines to stderr (replacing any handler of ours)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler.formatter, JsonFormatter) or getattr(handler, "_sluice", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._sluice = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


# -- requests --------------------------------------------------------------------------------


def _incoming_id() -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "").strip()
    return given if _VALID_ID.match(given) else uuid.uuid4().hex


def _start_request() -> None:
    g.request_started = time.perf_counter()
    g.request_id = _incoming_id()
    g.request_id_token = request_id_var.set(g.request_id)


def _log_request(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id is None:  # before_request never ran (an earlier hook answered)
        return response
    response.headers[REQUEST_ID_HEADER] = request_id
    started = g.get("request_started", time.perf_counter())
    rule = request.url_rule
    route = rule.rule if rule is not None else None
    level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
    logging.getLogger(REQUEST_LOGGER).log(
        level,
        "%s %s %s",
        request.method,
        rule.rule if rule is not None else request.path,
        response.status_code,
        extra={
            "method": request.method,
            "route": route,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        },
    )
    return response


def _end_request(_exc: BaseException | None) -> None:
    token = g.pop("request_id_token", None)
    if token is not None:
        try:
            request_id_var.reset(token)
        except ValueError:  # set in another context (a copied one): just clear it
            request_id_var.set(None)


# -- Celery: the id travels with the task ----------------------------------------------------


def _add_task_headers(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = current_request_id()
    if headers is None or request_id is None:
        return
    headers.setdefault(TASK_HEADER, request_id)
    tenant = _tenant_id()
    if tenant is not None:
        headers.setdefault(TENANT_HEADER, tenant)


def _task_started(task: Any = None, **_: Any) -> None:
    context = getattr(task, "request", None)
    request_id_var.set(getattr(context, TASK_HEADER, None))
    tenant_id_var.set(getattr(context, TENANT_HEADER, None))


def _task_ended(**_: Any) -> None:
    request_id_var.set(None)
    tenant_id_var.set(None)


def _keep_our_logging(**_: Any) -> None:
    """Connected to Celery's setup_logging: Celery then leaves the root logger to us."""


def connect_celery_signals() -> None:
    signals.before_task_publish.connect(_add_task_headers, weak=False, dispatch_uid="sluice-rid")
    signals.task_prerun.connect(_task_started, weak=False, dispatch_uid="sluice-rid")
    signals.task_postrun.connect(_task_ended, weak=False, dispatch_uid="sluice-rid")
    signals.setup_logging.connect(_keep_our_logging, weak=False, dispatch_uid="sluice-rid")


def init_app(app: Flask) -> None:
    """JSON lines on stderr, request ids on every request and the tasks it sends."""
    install_record_factory()
    install_handler(app.config["LOG_LEVEL"])
    app.before_request_funcs.setdefault(None, []).insert(0, _start_request)
    app.after_request(_log_request)
    app.teardown_request(_end_request)
    connect_celery_signals()
