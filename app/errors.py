"""OpenAI-style error bodies for every /v1 failure; an outage is a 503 with Retry-After."""

from __future__ import annotations

import logging
from typing import Any

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from app.extensions import RedisNotConfigured
from app.logs import current_request_id

log = logging.getLogger(__name__)

# What an unreachable (or restarting, failing-over, full) Redis or database raises.
REDIS_OUTAGES: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # refused, reset, loading, no pooled connection in time
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during failover
    redis.exceptions.OutOfMemoryError,
    kombu.exceptions.OperationalError,  # the broker (Redis) when a task is sent
)
DATABASE_OUTAGES: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,  # refused, terminated, SQLite "database is locked"
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection in time
)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered as {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "api_error")
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error | self.extra}


def error_response(error: APIError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 500:
        return _server_error(getattr(exc, "original_exception", None) or exc)
    code = (exc.name or "error").lower().replace(" ", "_")
    message = exc.description or exc.name
    if status == 404 and request.path.startswith("/v1"):
        message = f"Unknown request URL: {request.method} {request.path}."
    return error_response(APIError(status, message, code=code))


def _outage(exc: Exception) -> Response:
    """Redis or the database is unreachable: 503 with Retry-After, and one log line."""
    if isinstance(exc, RedisNotConfigured):
        what, message = "redis", str(exc)
    else:
        what = "database" if isinstance(exc, DATABASE_OUTAGES) else "redis"
        message = f"Sluice's {what} is unavailable; retry shortly."
    detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
    log.error(
        "%s unavailable: %s %s answered 503 (%s: %s)",
        what, request.method, request.path, type(exc).__name__, detail,
    )  # fmt: skip
    retry_after = str(current_app.config["OUTAGE_RETRY_AFTER_SECONDS"])
    return error_response(
        APIError(503, message, code=f"{what}_unavailable", headers={"Retry-After": retry_after})
    )


def _server_error(exc: BaseException) -> Response:
    """Anything unhandled: logged with its traceback (and request id), answered 500."""
    if isinstance(exc, HTTPException) and (exc.code or 500) < 500:
        return _http_error(exc)
    log.error(
        "%s %s answered 500: %s",
        request.method, request.path, type(exc).__name__,
        exc_info=(type(exc), exc, exc.__traceback__),
    )  # fmt: skip
    request_id = current_request_id()
    message = "The server had an error processing your request."
    if request_id:
        message += f" (Please include the request ID {request_id} if you report it.)"
    return error_response(APIError(500, message, type="server_error"))


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(APIError, error_response)
    app.register_error_handler(HTTPException, _http_error)
    for outage in (*REDIS_OUTAGES, *DATABASE_OUTAGES, RedisNotConfigured):
        app.register_error_handler(outage, _outage)
    app.register_error_handler(Exception, _server_error)
