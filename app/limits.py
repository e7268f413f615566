"""Request limits: the setting behind each, and the one way a refusal names it.

Every limit is a setting of app/config.py (SLUICE_<NAME>, or `name` in [sluice]); the
README's "Limits" section lists them with their defaults. A refusal is OpenAI-shaped and
names the limit, its value and the setting that raises it. Sizes of whole bodies and files
answer 413; a string or an array over its length answers 400 as OpenAI's API does
(`string_above_max_length`, `array_above_max_length`); a document over a limit is named
among the batch's 422 `invalid_documents` details.
"""

from __future__ import annotations

from typing import Any

from flask import current_app, has_app_context, has_request_context, request

from app.config import TUNABLES
from app.errors import APIError


def setting(name: str) -> int:
    """A limit's configured value (its default outside an app)."""
    value = current_app.config[name] if has_app_context() else TUNABLES[name][1]
    return int(value)


def too_large(what: str, limit: int, name: str, *, param: str | None, code: str) -> APIError:
    """413: `what` is over `limit` bytes (setting `name`)."""
    return APIError(
        413,
        f"{what} is larger than the limit of {limit} bytes (SLUICE_{name}).",
        param=param,
        code=code,
    )


def configured_body_limit() -> int | None:
    """The body limit that [limits.body_bytes] of sluice.toml sets for this route, if any."""
    if not has_request_context() or request.url_rule is None:
        return None
    table: dict[str, int] = current_app.config.get("BODY_LIMITS") or {}
    return table.get(request.url_rule.rule)


def check_array(value: list[Any], param: str, name: str) -> None:
    """400 `array_above_max_length` when the array is longer than setting `name`."""
    limit = setting(name)
    if limit and len(value) > limit:
        raise APIError(
            400,
            f"Invalid '{param}': array too long. Expected an array with maximum length "
            f"{limit}, but got an array with length {len(value)} instead (SLUICE_{name}).",
            param=param,
            code="array_above_max_length",
        )


def string_too_long(path: str, length: int, limit: int) -> str:
    """The message for a JSON string over MAX_STRING_CHARS (OpenAI's wording)."""
    return (
        f"Invalid '{path}': string too long. Expected a string with maximum length {limit}, "
        f"but got a string with length {length} instead (SLUICE_MAX_STRING_CHARS)."
    )
