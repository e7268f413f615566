"""File storage for the Files API: streamed uploads, generated files, reads and deletes.

Bytes live on disk under FILES_DIR/<tenant_id>/<file_id>; the `files` row holds the path
relative to FILES_DIR. Web and workers must share FILES_DIR (one machine, or a shared
volume) because workers write batch output files and the web tier serves them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from flask import current_app
from sqlalchemy import select

from app.errors import APIError
from app.extensions import db
from app.models import File, epoch, new_id
from app.pagination import fetch_page

UPLOAD_PURPOSES = ("batch",)
PURPOSES = ("batch", "batch_output")
CHUNK = 64 * 1024


class TooLarge(Exception):
    """An upload passed the size limit while streaming in."""


def files_dir() -> Path:
    path = Path(current_app.config["FILES_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def absolute_path(file: File) -> Path:
    """Where a file's bytes are (paths are stored relative to FILES_DIR)."""
    path = Path(file.path)
    return path if path.is_absolute() else files_dir() / path


def temp_path() -> Path:
    """A fresh path under FILES_DIR/tmp for bytes that are not a file yet."""
    tmp = files_dir() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp / f"upload-{secrets.token_hex(12)}"


TEMP_MAX_AGE = 6 * 3600.0  # seconds: longer than any upload or generated file takes to write


def remove_stale_temp_files(max_age: float = TEMP_MAX_AGE) -> int:
    """Delete FILES_DIR/tmp files untouched for max_age (left by a process killed mid-write)."""
    tmp = files_dir() / "tmp"
    if not tmp.is_dir():
        return 0
    cutoff = time.time() - max_age
    removed = 0
    for entry in os.scandir(tmp):
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:  # another sweeper, or its writer finishing, took it
            continue
    return removed


class CountingWriter:
    """A write-only file on disk that raises TooLarge once a shared byte budget is spent."""

    def __init__(self, path: Path, budget: list[int]) -> None:
        self.path = path
        self.budget = budget  # [bytes left], shared by every part of one request
        self.size = 0
        self._fh: IO[bytes] = open(path, "w+b")  # noqa: SIM115 - closed by the owner

    def write(self, data: bytes) -> int:
        self.size += len(data)
        self.budget[0] -= len(data)
        if self.budget[0] < 0:
            raise TooLarge
        return self._fh.write(data)

    def seek(self, *args: Any) -> int:
        return self._fh.seek(*args)

    def read(self, *args: Any) -> bytes:
        return self._fh.read(*args)

    def tell(self) -> int:
        return self._fh.tell()

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def store_upload(tenant_id: str, filename: str, purpose: str, part: CountingWriter) -> File:
    """Move a fully received upload into place and commit its row."""
    file_id = new_id("file-")
    relative = Path(tenant_id) / file_id
    target = files_dir() / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    part.flush()
    os.fsync(part._fh.fileno())
    part.close()
    os.replace(part.path, target)
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=(filename or "upload.jsonl")[:255],
        purpose=purpose,
        bytes=part.size,
        path=str(relative),
    )
    db.session.add(row)
    db.session.commit()
    return row


def create_generated_file(
    tenant_id: str, filename: str, purpose: str, lines: Iterable[bytes], key: str | None = None
) -> File | None:
    """Write lines to a new file and add (not commit) its row; None when there are no lines.

    With a key the bytes go to FILES_DIR/<tenant_id>/<key>, so a re-run (a finalizer taken
    over after a crash) overwrites its earlier attempt instead of leaving orphaned bytes.
    """
    tmp = temp_path()
    count = 0
    size = 0
    with open(tmp, "wb") as fh:
        for line in lines:
            fh.write(line)
            size += len(line)
            count += 1
        fh.flush()
        os.fsync(fh.fileno())
    if count == 0:
        tmp.unlink()
        return None
    file_id = new_id("file-")
    relative = Path(tenant_id) / (key or file_id)
    target = files_dir() / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        path=str(relative),
    )
    db.session.add(row)
    db.session.flush()
    return row


def get_file(tenant_id: str, file_id: str) -> File | None:
    """The tenant's file with this id, or None (another tenant's file is None too)."""
    return db.session.scalar(select(File).where(File.tenant_id == tenant_id, File.id == file_id))


def require_file(tenant_id: str, file_id: str, param: str = "file_id") -> File:
    file = get_file(tenant_id, file_id)
    if file is None:
        raise APIError(404, f"No such File object: {file_id}", param=param, code="not_found")
    return file


def list_files(
    tenant_id: str,
    *,
    purpose: str | None = None,
    limit: int = 10000,
    after: str | None = None,
    order: str = "desc",
) -> tuple[list[File], bool]:
    """One page of the tenant's files and whether more follow."""
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    return fetch_page(query, File.id, limit=limit, after=after, order=order)


def iter_bytes(file: File, chunk: int = CHUNK) -> Iterator[bytes]:
    """The file's bytes in chunks (never all at once)."""
    with open(absolute_path(file), "rb") as fh:
        while data := fh.read(chunk):
            yield data


def open_lines(file: File) -> IO[bytes]:
    """The file opened for reading line by line, in binary."""
    return open(absolute_path(file), "rb")


def delete_file(file: File) -> None:
    """Remove the row and the bytes."""
    path = absolute_path(file)
    db.session.delete(file)
    db.session.commit()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def serialize_file(file: File) -> dict[str, Any]:
    """OpenAI's file object."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": epoch(file.created_at),
        "expires_at": epoch(file.expires_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": None,
    }
