"""Text out of untrusted .pdf and .docx uploads, bounded in time and memory.

Each file is read by a subprocess of its own (app/extraction_child.py) with a capped
address space (EXTRACT_MEMORY_BYTES) and CPU time, killed after EXTRACT_TIMEOUT_SECONDS of
wall time. The web process only waits on a pipe (cooperatively under gevent), so a zip
bomb, a decompression bomb, a slow or endless parse, or a crash in a parser costs that one
upload its answer, never the process or its other requests. Every failure is a ValueError
whose message says what is wrong with the file; the intake names it on the document.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


def extract(ext: str, data: bytes, limits: Limits) -> str:
    """The text of a .pdf or .docx; ValueError saying what is wrong with the file."""
    if ext not in TYPES:
        raise ValueError(f"has an unsupported type for extraction: {ext}")
    argv = {**asdict(limits), "type": ext, "cpu_seconds": limits.seconds}
    try:
        done = subprocess.run(
            [sys.executable, "-I", CHILD, json.dumps(argv)],
            input=data,
            capture_output=True,
            timeout=limits.seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ValueError(
            f"took longer than {limits.seconds:g} s to read (SLUICE_EXTRACT_TIMEOUT_SECONDS)"
        ) from None
    if done.returncode != 0:
        raise ValueError(_died(done.returncode, limits))
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        raise ValueError(_died(done.returncode, limits)) from None
    if "error" in answer:
        raise ValueError(str(answer["error"]))
    return str(answer["text"])


def _died(code: int, limits: Limits) -> str:
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"took longer than {limits.seconds:g} s to read (SLUICE_EXTRACT_TIMEOUT_SECONDS)"
    return (
        f"could not be read within {limits.memory_bytes} bytes of memory"
        " (SLUICE_EXTRACT_MEMORY_BYTES)"
    )
