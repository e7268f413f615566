"""Field rules shared by every front door (each answered as a 400 naming the field)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError, ValidatorFunctionWrapHandler, WrapValidator

from app import limits
from app.errors import APIError

METADATA_MAX_KEYS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512


def check_metadata(value: Any, *, param: str = "metadata") -> dict[str, str] | None:
    """OpenAI's metadata rules: up to 16 string pairs, keys <= 64 and values <= 512 chars."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(
            400,
            f"Invalid type for '{param}': expected an object.",
            param=param,
            code="invalid_type",
        )
    if len(value) > METADATA_MAX_KEYS:
        raise APIError(
            400,
            f"Invalid '{param}': at most {METADATA_MAX_KEYS} keys.",
            param=param,
            code="invalid_value",
        )
    for key, item in value.items():
        if (
            len(key) > METADATA_MAX_KEY_CHARS
            or not isinstance(item, str)
            or len(item) > METADATA_MAX_VALUE_CHARS
            or "\x00" in key
            or "\x00" in item
        ):
            raise APIError(
                400,
                f"Invalid '{param}': keys must be at most {METADATA_MAX_KEY_CHARS} characters "
                f"and values strings of at most {METADATA_MAX_VALUE_CHARS} characters.",
                param=param,
                code="invalid_value",
            )
    return dict(value)


MAX_JSON_DEPTH = 64
MAX_JSON_INT = 2**63 - 1  # the widest integer any field (a seed, a priority) can mean
MAX_MODEL_CHARS = 200  # the model columns of jobs and batches


class InvalidJSON(ValueError):
    """JSON text that parses but breaks a rule of check_json_values (or is nested too deep)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _json_error(message: str, path: str) -> InvalidJSON:
    return InvalidJSON(message, path[:200] or None)


def check_json_values(value: Any, *, max_chars: int | None = None) -> None:
    """Raise InvalidJSON, naming the path, for what no field can hold: nesting over 64
    levels, NaN/Infinity, integers wider than 64 bits, NUL characters (PostgreSQL text
    cannot store them), strings longer than MAX_STRING_CHARS.

    `max_chars` is that setting when the caller read it once already (0: no limit); a value
    that passes is walked once without building any path (a refusal walks it again).
    """
    if max_chars is None:
        max_chars = limits.setting("MAX_STRING_CHARS")
    if not _fine(value, max_chars, 0):
        _refuse(value, max_chars or None)


def _fine(item: Any, max_chars: int, depth: int) -> bool:
    """Whether check_json_values passes `item`, building no paths (False when unsure:
    `_refuse` then decides, naming the path)."""
    if depth > MAX_JSON_DEPTH:
        return False
    kind = type(item)
    if kind is dict:
        for key in item:
            if type(key) is not str or "\x00" in key:
                return False
        children: Any = item.values()
    elif kind is list:
        children = item
    else:
        return _fine_scalar(item, max_chars)
    if depth == MAX_JSON_DEPTH and item:
        return False
    for child in children:
        kind = type(child)
        if kind is str:
            if "\x00" in child or (max_chars and len(child) > max_chars):
                return False
        elif kind is dict or kind is list:
            if not _fine(child, max_chars, depth + 1):
                return False
        elif not _fine_scalar(child, max_chars):
            return False
    return True


def _fine_scalar(item: Any, max_chars: int) -> bool:
    kind = type(item)
    if kind is str:
        return "\x00" not in item and not (max_chars and len(item) > max_chars)
    if kind is int:
        return bool(-MAX_JSON_INT <= item <= MAX_JSON_INT)
    if kind is float:
        return math.isfinite(item)
    return item is None or kind is bool


def _refuse(value: Any, max_chars: int | None) -> None:
    """check_json_values' walk that names the path of what it refuses."""
    pending: list[tuple[Any, str, int]] = [(value, "", 0)]
    while pending:
        item, path, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise _json_error(f"'{path}' is nested deeper than {MAX_JSON_DEPTH} levels.", path)
        if isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else str(key)
                if "\x00" in key:
                    raise _json_error(f"The key '{child_path}' contains a NUL character.", path)
                pending.append((child, child_path, depth + 1))
        elif isinstance(item, list):
            pending.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            if "\x00" in item:
                raise _json_error(f"'{path}' contains a NUL character.", path)
            if max_chars and len(item) > max_chars:
                message = limits.string_too_long(path, len(item), max_chars)
                raise InvalidJSON(message, path[:200] or None, "string_above_max_length")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise _json_error(f"'{path}' must be a finite number, got {item!r}.", path)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_JSON_INT:
            raise _json_error(f"'{path}' is out of range (a 64-bit integer at most).", path)


def loads(data: bytes | str, *, max_chars: int | None = None) -> Any:
    """Parse JSON text under check_json_values' rules; every refusal is a ValueError."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise InvalidJSON(f"The JSON is nested deeper than {MAX_JSON_DEPTH} levels.") from None
    check_json_values(value, max_chars=max_chars)
    return value


def check_model_name(value: str, *, param: str = "model") -> str:
    """A model name that fits the model columns and holds no NUL character."""
    if len(value) > MAX_MODEL_CHARS or "\x00" in value:
        raise APIError(
            400,
            f"'{param}' must be at most {MAX_MODEL_CHARS} characters, without NUL.",
            param=param,
            code="invalid_value",
        )
    return value


# -- request models --------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)

_TYPE_ERRORS = ("_type", "_parsing", "is_instance_of", "model_attributes_type")


def field_path(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'"""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path[:200]


def unknown_parameter(path: str) -> APIError:
    """The 400 for a request field Sluice neither honours nor knows, naming it."""
    return APIError(
        400,
        f"Unrecognized request argument supplied: {path}",
        param=path,
        code="unknown_parameter",
    )


def validation_error(exc: ValidationError) -> APIError:
    """Pydantic's first error as OpenAI's 400, naming the field path."""
    error = exc.errors(include_url=False)[0]
    kind, path = error["type"], field_path(error["loc"])
    message = str(error["msg"])
    if kind == "missing":
        return APIError(
            400,
            f"Missing required parameter: '{path}'.",
            param=path,
            code="missing_required_parameter",
        )
    if kind == "extra_forbidden":
        return unknown_parameter(path)
    if kind.endswith(_TYPE_ERRORS):
        return APIError(
            400, f"Invalid type for '{path}': {message}.", param=path, code="invalid_type"
        )
    return APIError(400, f"Invalid '{path}': {message}.", param=path, code="invalid_value")


def parse(model: type[M], data: Any, context: dict[str, Any] | None = None) -> M:
    """Validate data into the request model; every refusal is an APIError (a 400 naming
    the field): the model's validators raise theirs as they are, pydantic's are mapped."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise validation_error(exc) from None


def checked(check: Callable[[Any], Any]) -> Any:
    """A field validator that runs an existing check first (its APIError, as it is), then
    the field's declared type; the value is the check's (an int stays an int)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        value = check(value)
        handler(value)
        return value

    return WrapValidator(validate)
