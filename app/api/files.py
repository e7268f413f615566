"""/v1 files endpoints (OpenAI Files API); uploads stream to disk, never into memory."""

from __future__ import annotations

import re
from typing import IO, Any, cast

from flask import Blueprint, current_app, g, jsonify, request, send_file
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

from app.errors import APIError
from app.pagination import list_object, page_params
from app.services import files as storage
from app.services.front_door import FORM_OVERHEAD
from app.validation import unknown_parameter

bp = Blueprint("files", __name__)

MAX_FIELD_BYTES = 1024 * 1024  # also bounds the decoder buffer, so above its 64 KiB reads
UPLOAD_FIELDS = {"purpose"}  # besides the `file` part itself
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # NUL, line breaks...: no header or column holds them


def _check_filename(filename: str | None) -> None:
    if filename and CONTROL.search(filename):
        raise APIError(
            400,
            "The file's name contains a control character (a NUL, a line break...).",
            param="file",
            code="invalid_filename",
        )


def _download_name(filename: str) -> str:
    """A name for Content-Disposition (rows stored before names were checked included)."""
    return CONTROL.sub("_", filename) or "file"


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"File is too large: the maximum upload size is {limit} bytes.",
        param="file",
        code="file_too_large",
    )


def _parse_upload() -> tuple[dict[str, str], storage.CountingWriter | None, str | None]:
    """Stream the multipart body: the `file` part to a temp file on disk, fields in memory.

    The fields are every part but `file`, file parts included (by name, with no value)."""
    limit = current_app.config["FILES_MAX_BYTES"]
    mimetype, options = parse_options_header(request.headers.get("Content-Type", ""))
    if mimetype != "multipart/form-data":
        raise APIError(
            400, "Uploads must be sent as multipart/form-data.", param="file", code="invalid_file"
        )
    length = request.content_length
    if length is not None and length > limit + FORM_OVERHEAD:
        raise _too_large(limit)
    budget = [limit]
    parts: list[storage.CountingWriter] = []

    def stream_factory(*_args: Any, **_kwargs: Any) -> IO[bytes]:
        part = storage.CountingWriter(storage.temp_path(), budget)
        parts.append(part)
        return cast(IO[bytes], part)  # a file-like writer, which is all Werkzeug uses

    parser = FormDataParser(
        stream_factory=stream_factory,
        max_form_memory_size=MAX_FIELD_BYTES,
        max_form_parts=50,
        silent=False,
    )
    try:
        _, form, uploaded = parser.parse(request.stream, mimetype, length, options)
    except storage.TooLarge:
        _discard(parts)
        raise _too_large(limit) from None
    except RequestEntityTooLarge:
        _discard(parts)
        raise APIError(
            413, "A form field is too large.", param="purpose", code="field_too_large"
        ) from None
    except ValueError as exc:
        _discard(parts)
        raise APIError(
            400, f"Could not parse the multipart body: {exc}", param="file", code="invalid_file"
        ) from None
    except BaseException:
        _discard(parts)
        raise
    chosen = uploaded.get("file")
    # the stream is one of the CountingWriters that stream_factory made
    keep = cast(storage.CountingWriter | None, chosen.stream if chosen is not None else None)
    _discard([p for p in parts if p is not keep])
    fields = {key: form.get(key, "") for key in form}
    fields |= {key: "" for key in uploaded if key != "file" and key not in fields}
    return fields, keep, chosen.filename if chosen is not None else None


def _check_known(fields: dict[str, str]) -> None:
    """A part this endpoint does not honour (e.g. the SDK's `expires_after[seconds]`) is a
    400 naming it, never silently dropped."""
    unknown = sorted({key.split("[", 1)[0] for key in fields} - UPLOAD_FIELDS)
    if unknown:
        raise unknown_parameter(unknown[0])


def _discard(parts: list[storage.CountingWriter]) -> None:
    for part in parts:
        part.discard()


@bp.post("/files")
def upload_file() -> ResponseReturnValue:
    fields, part, filename = _parse_upload()
    try:
        purpose = fields.get("purpose", "").strip()
        if part is None:
            raise APIError(400, "Missing required parameter: 'file'.", param="file")
        if not purpose:
            raise APIError(400, "Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in storage.UPLOAD_PURPOSES:
            raise APIError(
                400,
                f"Invalid value for 'purpose': {purpose!r}. Supported values are: "
                + ", ".join(repr(p) for p in storage.UPLOAD_PURPOSES)
                + ".",
                param="purpose",
            )
        _check_known(fields)
        _check_filename(filename)
        row = storage.store_upload(g.tenant_id, filename or "upload.jsonl", purpose, part)
    except BaseException:
        if part is not None:
            part.discard()
        raise
    return jsonify(storage.serialize_file(row))


@bp.get("/files")
def list_files() -> ResponseReturnValue:
    limit, after = page_params(request.args, default=10000, maximum=10000)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "Invalid 'order': must be 'asc' or 'desc'.", param="order")
    rows, has_more = storage.list_files(
        g.tenant_id,
        purpose=request.args.get("purpose") or None,
        limit=limit,
        after=after,
        order=order,
    )
    return jsonify(list_object([storage.serialize_file(r) for r in rows], has_more))


@bp.get("/files/<file_id>")
def retrieve_file(file_id: str) -> ResponseReturnValue:
    return jsonify(storage.serialize_file(storage.require_file(g.tenant_id, file_id)))


@bp.get("/files/<file_id>/content")
def file_content(file_id: str) -> ResponseReturnValue:
    row = storage.require_file(g.tenant_id, file_id)
    path = storage.absolute_path(row)
    if not path.is_file():
        raise APIError(404, f"The content of file {file_id} is gone.", param="file_id")
    return send_file(
        path,
        mimetype="application/octet-stream",
        download_name=_download_name(row.filename),
        conditional=False,
        etag=False,
        max_age=0,
    )


@bp.delete("/files/<file_id>")
def delete_file(file_id: str) -> ResponseReturnValue:
    row = storage.require_file(g.tenant_id, file_id)
    storage.delete_file(row)
    return jsonify({"id": file_id, "object": "file", "deleted": True})
