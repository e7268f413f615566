"""Text out of untrusted .pdf and .docx uploads, bounded in time and memory.

A request's files are read by a subprocess (app/extraction_child.py), one after another,
with a capped address space (EXTRACT_MEMORY_BYTES) and CPU time per file; it is killed when
a file takes more than EXTRACT_TIMEOUT_SECONDS of wall time (the next file gets a new one).
The web process only waits on a pipe (cooperatively under gevent), so a zip bomb, a
decompression bomb, a slow or endless parse, or a crash in a parser costs that one upload
its answer, never the process or its other requests. Every failure is a ValueError
whose message says what is wrong with the file; the intake names it on the document.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from flask import Flask

CHILD = str(Path(__file__).with_name("extraction_child.py"))
TYPES = (".pdf", ".docx")
MAX_ZIP_ENTRIES = 10_000


@dataclass(frozen=True)
class Limits:
    """What one extraction may use (from the EXTRACT_* and BATCH_MAX_* settings)."""

    max_pages: int
    max_uncompressed: int
    max_text_bytes: int
    memory_bytes: int
    seconds: float
    max_entries: int = MAX_ZIP_ENTRIES


def limits_from(config: Mapping[str, Any]) -> Limits:
    return Limits(
        max_pages=int(config["BATCH_MAX_PDF_PAGES"]),
        max_uncompressed=int(config["BATCH_MAX_UNCOMPRESSED_BYTES"]),
        max_text_bytes=int(config["BATCH_MAX_DOCUMENT_BYTES"]),
        memory_bytes=int(config["EXTRACT_MEMORY_BYTES"]),
        seconds=float(config["EXTRACT_TIMEOUT_SECONDS"]),
    )


class Extractor:
    """One reading subprocess for a request's files, started at the first file and again
    after one it had to give up on (killed past its time, or out of memory)."""

    def __init__(self, limits: Limits, slots: threading.Semaphore | None = None) -> None:
        self.limits = limits
        self.slots = slots  # files read at once in this process, across requests
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop(process)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            argv = json.dumps(asdict(self.limits))
            self._process = subprocess.Popen(  # our own script, with arguments we built
                [sys.executable, "-I", CHILD, argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                bufsize=0,
            )
        return self._process

    def extract(self, ext: str, data: bytes) -> str:
        """The text of a .pdf or .docx; ValueError saying what is wrong with the file."""
        if ext not in TYPES:
            raise ValueError(f"has an unsupported type for extraction: {ext}")
        if self.slots is None:
            return self._extract(ext, data)
        with self.slots:  # waits (cooperatively under gevent) while others are read
            return self._extract(ext, data)

    def _extract(self, ext: str, data: bytes) -> str:
        deadline = time.monotonic() + self.limits.seconds
        process = self._started()
        assert process.stdin is not None and process.stdout is not None
        header = {"type": ext, "size": len(data), "cpu_seconds": self.limits.seconds}
        try:
            _write_all(process.stdin, json.dumps(header).encode() + b"\n")
            _write_all(process.stdin, data)
            line = _read_line(process.stdout.fileno(), deadline)
        except TimeoutError:
            self.close()
            raise ValueError(_timed_out(self.limits)) from None
        except OSError:  # the process died while reading the file (a broken pipe)
            line = b""
        if not line:
            self._process = None
            raise ValueError(_died(_stop(process), self.limits))
        answer = json.loads(line)
        if "error" in answer:
            raise ValueError(str(answer["error"]))
        return str(answer["text"])


def slots(app: Flask) -> threading.Semaphore:
    """This process's extraction slots (EXTRACT_MAX_PROCESSES files read at once)."""
    found: threading.Semaphore | None = app.extensions.get("sluice_extraction_slots")
    if found is None:
        size = max(1, int(app.config["EXTRACT_MAX_PROCESSES"]))
        found = app.extensions["sluice_extraction_slots"] = threading.BoundedSemaphore(size)
    return found


def extract(ext: str, data: bytes, limits: Limits) -> str:
    """One file's text, read by a subprocess of its own (see Extractor)."""
    with Extractor(limits) as reader:
        return reader.extract(ext, data)


def _write_all(stream: IO[bytes], data: bytes) -> None:
    """Write every byte (an unbuffered pipe may take fewer than it is given)."""
    view = memoryview(data)
    while view:
        written = stream.write(view)
        view = view[written if written is not None else len(view) :]


def _read_line(fd: int, deadline: float) -> bytes:
    """Bytes up to a newline from fd (b"" at end of file); TimeoutError past deadline."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b""
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)


def _stop(process: subprocess.Popen[bytes]) -> int:
    """End the process (closing its input ends a healthy one) and reap it; its exit code."""
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        return process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _timed_out(limits: Limits) -> str:
    return f"took longer than {limits.seconds:g} s to read (SLUICE_EXTRACT_TIMEOUT_SECONDS)"


def _died(code: int, limits: Limits) -> str:
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return _timed_out(limits)
    return (
        f"could not be read within {limits.memory_bytes} bytes of memory"
        " (SLUICE_EXTRACT_MEMORY_BYTES)"
    )
