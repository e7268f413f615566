"""Reads one untrusted .pdf or .docx in a process of its own (started by app/extraction.py).

Run as a script (`python -I app/extraction_child.py LIMITS_JSON`), never imported by the
app: it takes files on stdin, one after another, and answers one JSON line on stdout for
each, `{"text": ...}` or `{"error": "..."}` saying what is wrong with the file. It caps its
own address space, and its CPU time for each file, so a zip bomb, a decompression bomb or
an endless parse ends here and never in the web process; every other failure is the
file's, named.
"""

from __future__ import annotations

import io
import json
import math
import resource
import sys
import zipfile
from typing import Any


class Refused(Exception):
    """The file breaks a limit or cannot be read; the message says which."""


def _zip_entries(data: bytes, limits: dict[str, Any]) -> None:
    """Refuse what zipfile would choke on or unpack without bound, before python-docx."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise Refused(f"is not a readable .docx ({exc})") from None
    entries = archive.infolist()
    if len(entries) > limits["max_entries"]:
        raise Refused(f"has {len(entries)} zip entries; the limit is {limits['max_entries']}")
    unpacked = 0
    for entry in entries:
        if entry.flag_bits & 0x1:
            raise Refused(f"has an encrypted entry ({entry.filename!r})")
        if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise Refused(
                f"uses an unsupported compression method ({entry.compress_type}) in entry "
                f"{entry.filename!r}"
            )
        unpacked += entry.file_size  # zipfile never unpacks an entry past its declared size
    if unpacked > limits["max_uncompressed"]:
        raise Refused(
            f"unpacks to {unpacked} bytes; the limit is {limits['max_uncompressed']}"
            " (SLUICE_BATCH_MAX_UNCOMPRESSED_BYTES)"
        )


def _docx(data: bytes, limits: dict[str, Any]) -> str:
    _zip_entries(data, limits)
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except MemoryError:
        raise
    except Exception as exc:  # corrupt deflate data, bad XML, missing parts: the file's fault
        raise Refused(f"is not a readable .docx ({type(exc).__name__}: {exc})") from None
    text = "\n".join(p.text for p in document.paragraphs if p.text)
    if len(text.encode("utf-8", "surrogatepass")) > limits["max_text_bytes"]:
        raise Refused(
            f"holds more than {limits['max_text_bytes']} bytes of text"
            " (SLUICE_BATCH_MAX_DOCUMENT_BYTES)"
        )
    return text


def _pdf(data: bytes, limits: dict[str, Any]) -> str:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise Refused("is encrypted")
        pages = len(reader.pages)
        if pages > limits["max_pages"]:
            raise Refused(
                f"has {pages} pages; the limit is {limits['max_pages']}"
                " (SLUICE_BATCH_MAX_PDF_PAGES)"
            )
        parts: list[str] = []
        size = 0
        for page in reader.pages:
            text = page.extract_text() or ""
            size += len(text.encode("utf-8", "surrogatepass"))
            if size > limits["max_text_bytes"]:
                raise Refused(
                    f"holds more than {limits['max_text_bytes']} bytes of text"
                    " (SLUICE_BATCH_MAX_DOCUMENT_BYTES)"
                )
            parts.append(text)
    except (Refused, MemoryError):
        raise
    except Exception as exc:  # pypdf's errors, and whatever a malformed file provokes
        raise Refused(f"is not a readable PDF ({type(exc).__name__}: {exc})") from None
    return "\n".join(parts).strip()


def _answer(header: dict[str, Any], data: bytes, limits: dict[str, Any]) -> dict[str, str]:
    try:
        reader = _pdf if header["type"] == ".pdf" else _docx
        return {"text": reader(data, limits)}
    except Refused as exc:
        return {"error": str(exc)}
    except RecursionError:
        return {"error": "is nested too deeply to read"}


def main() -> int:
    """Answer one JSON line per file: a header line {"type", "size", "cpu_seconds"}, then
    `size` bytes. Ends at end of input, or after a file that ran out of memory."""
    limits = json.loads(sys.argv[1])
    memory = limits["memory_bytes"]
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    source, out = sys.stdin.buffer, sys.stdout
    while line := source.readline():
        header = json.loads(line)
        data = source.read(header["size"])
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = math.ceil(used.ru_utime + used.ru_stime)
        budget = spent + max(1, math.ceil(header["cpu_seconds"]))  # SIGXCPU past it
        resource.setrlimit(resource.RLIMIT_CPU, (budget, hard))
        try:
            answer = _answer(header, data, limits)
        except MemoryError:
            answer = {
                "error": f"needs more than {memory} bytes of memory to read"
                " (SLUICE_EXTRACT_MEMORY_BYTES)"
            }
            out.write(json.dumps(answer) + "\n")
            out.flush()
            return 0  # a fresh process for the next file
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
