"""Field rules shared by every front door (each answered as a 400 naming the field)."""

from __future__ import annotations

from typing import Any

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
