"""Document intake: JSON, JSONL streams and uploaded files, validated into BatchItems.

Every source is read lazily and validated as it goes. Problems are collected (not raised
one at a time) so the final 422 names every bad document or line; the generators raise
it once the input is exhausted, which rolls back the engine's single transaction.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import IO, Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, model_validator

from app import extraction, limits, validation
from app.errors import APIError
from app.services.batches import BatchItem
from app.services.chat_request import MODEL_FIELD, PARAMETERS, Metadata, parse_chat_request
from app.validation import MAX_JSON_INT, check_metadata, checked, loads

TEXT_TYPES = (".txt", ".md", ".markdown", ".text")
HTML_TYPES = (".html", ".htm")
FILE_TYPES = (*TEXT_TYPES, *HTML_TYPES, ".pdf", ".docx", ".jsonl")
MAX_LISTED = 50  # problems spelled out in error.message; `details` carries up to MAX_DETAILS
MAX_DETAILS = 1000
DOCUMENT_KEYS = frozenset({"id", "text", "metadata"})  # any other key is refused, named


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _number(raw: Any, name: str, kind: type, low: float, high: float | None) -> Any:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise APIError(400, f"{name} must be a number", param=name)
    try:
        value = kind(raw)
        if kind is int and isinstance(raw, float) and raw != int(raw):
            raise ValueError
    except (TypeError, ValueError):
        raise APIError(
            400,
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}",
            param=name,
        ) from None
    if not (low <= value and (high is None or value <= high)):  # NaN fails this too
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise APIError(400, f"{name} must be {bound}, got {raw!r}", param=name)
    return value


def _model(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, "model is required (e.g. 'openai/gpt-4o-mini')", param="model")
    return value.strip()


def _instructions(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise APIError(
            400,
            "instructions is required: the system prompt for every document",
            param="instructions",
        )
    size = _bytes(value)
    if size > (most := limits.setting("BATCH_MAX_INSTRUCTIONS_BYTES")):
        raise limits.too_large(
            f"instructions ({size} bytes, copied into every document's prompt)",
            most,
            "BATCH_MAX_INSTRUCTIONS_BYTES",
            param="instructions",
            code="instructions_too_large",
        )
    return value


def _prompt_template(value: Any) -> str | None:
    template = value or None
    if template is not None and (not isinstance(template, str) or "{document}" not in template):
        raise APIError(
            400, "prompt_template must be a string containing {document}", param="prompt_template"
        )
    expansions = template.count("{document}") if template else 1
    if expansions > (most := limits.setting("BATCH_MAX_TEMPLATE_EXPANSIONS")):
        raise APIError(
            400,
            f"prompt_template repeats {{document}} {expansions} times; the limit is {most}"
            " (SLUICE_BATCH_MAX_TEMPLATE_EXPANSIONS)",
            param="prompt_template",
            code="too_many_template_expansions",
        )
    return template


def _metadata(value: Any) -> dict[str, str] | None:
    return check_metadata(_json_field(value, "metadata"))


def _response_format(value: Any) -> dict[str, Any] | None:
    response_format = _json_field(value, "response_format")
    if response_format is None:
        return None
    checked_format: dict[str, Any] = PARAMETERS["response_format"](
        "response_format", response_format
    )
    return checked_format


def _completion_window(value: Any) -> str | None:
    window = value or None
    if window is not None and not isinstance(window, str):
        raise APIError(
            400, "completion_window must be a string like '24h'", param="completion_window"
        )
    return window


def _max_tokens(value: Any) -> int | None:
    number: int | None = _number(value, "max_tokens", int, 1, None)
    return number


def _temperature(value: Any) -> float | None:
    number: float | None = _number(value, "temperature", float, 0, 2)
    return number


class Options(BaseModel):
    """What applies to every document of a batch: the batch fields of a JSON body, a form or
    a JSONL request's query string (numbers and objects may come as text there)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Annotated[str, checked(_model)] = MODEL_FIELD
    instructions: Annotated[str, checked(_instructions)] = Field(
        min_length=1, description="the system prompt for every document"
    )
    prompt_template: Annotated[str | None, checked(_prompt_template)] = Field(
        None, description="must contain `{document}`"
    )
    metadata: Annotated[Metadata | None, checked(_metadata)] = None
    response_format: Annotated[dict[str, Any] | None, checked(_response_format)] = Field(
        None, description="e.g. json_schema: an extraction per document"
    )
    completion_window: Annotated[str | None, checked(_completion_window)] = Field(
        None, max_length=10, examples=["24h"]
    )
    max_tokens: Annotated[int | None, checked(_max_tokens)] = Field(None, ge=1, le=MAX_JSON_INT)
    temperature: Annotated[float | None, checked(_temperature)] = Field(None, ge=0, le=2)

    @model_validator(mode="before")
    @classmethod
    def _required(cls, data: Any) -> Any:
        """An absent model or instructions: its own check's 400."""
        if isinstance(data, dict):
            for name, check in (("model", _model), ("instructions", _instructions)):
                if data.get(name) is None:
                    check(None)
        return data

    def params(self) -> dict[str, Any]:
        pairs = (
            ("max_tokens", self.max_tokens),
            ("temperature", self.temperature),
            ("response_format", self.response_format),
        )
        return {k: v for k, v in pairs if v is not None}

    def prompt_bytes(self, text_bytes: int) -> int:
        """The bytes of one document's prompt (instructions and templated text)."""
        template = self.prompt_template
        if not template:
            return _bytes(self.instructions) + text_bytes
        expansions = template.count("{document}")
        return _bytes(self.instructions) + _bytes(template) + expansions * (text_bytes - 10)

    def body(self, text: str) -> dict[str, Any]:
        """The chat-completions body for one document."""
        prompt = self.prompt_template.replace("{document}", text) if self.prompt_template else text
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.instructions},
                {"role": "user", "content": prompt},
            ],
            **self.params(),
        }


DOCUMENTS_EXAMPLE: dict[str, Any] = {
    "model": "mock/echo",
    "instructions": "Summarize.",
    "documents": [{"id": "a", "text": "Some text."}],
}


class Document(BaseModel):
    """One document (checked as it streams through the intake: every problem in one 422)."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(None, max_length=512, description="default: its index")
    text: str = Field(min_length=1)
    metadata: Metadata | None = None


def _not_an_array() -> APIError:
    return APIError(400, "documents must be an array of {id, text, metadata}", param="documents")


def _an_array(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _not_an_array()
    return value


class DocumentBatchRequest(Options):
    """POST /v1/document-batches as JSON: the batch fields and the documents."""

    model_config = ConfigDict(json_schema_extra={"examples": [DOCUMENTS_EXAMPLE]})

    documents: Annotated[SkipValidation[list[Document]], checked(_an_array)]

    @model_validator(mode="before")
    @classmethod
    def _documents_sent(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("documents") is None:
            raise _not_an_array()
        return data


def parse_options(source: Mapping[str, Any]) -> Options:
    """Validate the batch-wide fields (from form fields or the query string)."""
    return validation.parse(Options, dict(source))


class InputDigest:
    """A running SHA-256 of a submission's items in order: an Idempotency-Key replay must
    carry the same documents, not only the same options."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def wrap(self, items: Iterable[BatchItem]) -> Iterator[BatchItem]:
        """The items, each added to the digest as it passes."""
        for item in items:
            record = [item.item_id, item.body, item.metadata]
            self._sha.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
            self._sha.update(b"\n")
            yield item

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def check_with_provider(options: Options) -> None:
    """The chat endpoint's checks of one document's request, provider included (Anthropic
    refuses a temperature above 1...): a 400 naming the field before anything is queued,
    not the same failure on every document."""
    parse_chat_request(options.body("document"))


def _json_field(value: Any, name: str) -> Any:
    """An object field: as is from a JSON body, parsed from a form or query-string value."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value else None
        except ValueError:
            raise APIError(400, f"{name} must be a JSON object", param=name) from None
    return value


@dataclass
class Intake:
    """Collects problems and enforces limits while documents stream through."""

    options: Options
    max_documents: int
    max_document_bytes: int
    max_prompt_bytes: int = 0  # one document's prompt after templating (0: no limit)
    max_expanded_bytes: int = 0  # every prompt of the batch, templated (0: no limit)
    max_file_bytes: int = 0  # one uploaded .pdf/.docx as sent (0: no limit)
    extraction: extraction.Limits | None = None  # how .pdf/.docx uploads are read
    extraction_slots: threading.Semaphore | None = None  # shared by this process's requests
    expanded_bytes: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    problem_count: int = 0
    count: int = 0
    seen: set[str] = field(default_factory=set)

    def problem(self, message: str, **where: Any) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_DETAILS:
            self.problems.append({**where, "message": message})

    def document(
        self, doc_id: Any, text: Any, metadata: Any, label: str, **where: Any
    ) -> BatchItem | None:
        """Validate one document; a BatchItem, or None after recording what is wrong."""
        return self.parsed({"id": doc_id, "text": text, "metadata": metadata}, label, **where)

    def parsed(self, doc: dict[str, Any], label: str, **where: Any) -> BatchItem | None:
        """document() for a parsed JSON object: a key it does not know is a problem too."""
        doc_id: Any = doc.get("id")
        text: Any = doc.get("text")
        metadata: Any = doc.get("metadata")
        self.count += 1
        if self.count > self.max_documents:
            raise APIError(
                413,
                f"too many documents: at most {self.max_documents} per batch"
                " (SLUICE_BATCH_MAX_DOCUMENTS)",
                param="documents",
                code="too_many_documents",
            )
        bad: list[str] = []
        if doc_id is None:
            doc_id = where.get("file") or str(self.count - 1)
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        if not isinstance(doc_id, str) or not doc_id.strip():
            bad.append("id must be a non-empty string")
        elif len(doc_id) > 512:
            bad.append("id is longer than 512 characters")
        elif "\x00" in doc_id:
            bad.append("id contains a NUL character")
        elif doc_id in self.seen:
            bad.append(f"duplicate id {doc_id!r}")
        if not isinstance(text, str) or not text.strip():
            bad.append("text must be a non-empty string")
        else:
            size = _bytes(text)
            prompt = self.options.prompt_bytes(size)
            if size > self.max_document_bytes:
                bad.append(
                    f"document is {size} bytes; the limit is {self.max_document_bytes}"
                    " (BATCH_MAX_DOCUMENT_BYTES)"
                )
            elif self.max_prompt_bytes and prompt > self.max_prompt_bytes:
                bad.append(
                    f"its prompt (instructions and templated text) is {prompt} bytes; the"
                    f" limit is {self.max_prompt_bytes} (SLUICE_BATCH_MAX_PROMPT_BYTES)"
                )
            else:
                self.expanded_bytes += prompt
                if self.max_expanded_bytes and self.expanded_bytes > self.max_expanded_bytes:
                    raise limits.too_large(
                        "The batch's prompts (instructions and templated documents, together)",
                        self.max_expanded_bytes,
                        "BATCH_MAX_EXPANDED_BYTES",
                        param="documents",
                        code="batch_too_large",
                    )
        if metadata is not None and not isinstance(metadata, dict):
            bad.append("metadata must be an object")
        if unknown := sorted(set(doc) - DOCUMENT_KEYS):
            keys = ", ".join(repr(key[:64]) for key in unknown[:5])
            bad.append(
                f"unknown key {keys}: a document has id, text and metadata"
                " (put the rest in metadata)"
            )
        if bad:
            shown = doc_id if isinstance(doc_id, str) else None
            self.problem(f"{label}: {'; '.join(bad)}", document_id=shown, **where)
            return None
        self.seen.add(doc_id)
        return BatchItem(item_id=doc_id, body=self.options.body(text), metadata=metadata)

    def finish(self) -> None:
        """Raise the 422 naming every problem, if there were any; 400 if there was nothing."""
        if self.problem_count:
            listed = "; ".join(p["message"] for p in self.problems[:MAX_LISTED])
            more = self.problem_count - min(self.problem_count, MAX_LISTED)
            suffix = f"; and {more} more (see details)" if more else ""
            raise APIError(
                422,
                f"{self.problem_count} invalid document(s), nothing was queued: {listed}{suffix}",
                param="documents",
                code="invalid_documents",
                extra={"details": self.problems},
            )
        if self.count == 0:
            raise APIError(400, "no documents were given", param="documents", code="no_documents")


def from_json(documents: list[Any], intake: Intake) -> Iterator[BatchItem]:
    """Documents from a JSON array of {"id", "text", "metadata"} (DocumentBatchRequest's)."""
    for index, doc in enumerate(documents):
        label = f"documents[{index}]"
        if not isinstance(doc, dict):
            intake.count += 1
            intake.problem(f"{label}: must be an object with id and text", index=index)
            continue
        item = intake.parsed(doc, label, index=index)
        if item is not None:
            yield item
    intake.finish()


def _jsonl(lines: Iterable[bytes], intake: Intake, source: str | None) -> Iterator[BatchItem]:
    """Documents from JSONL lines; errors carry 1-based line numbers (and the file name)."""
    where_file = {"file": source} if source else {}
    prefix = f"{source} " if source else ""
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        label = f"{prefix}line {number}"
        try:
            doc = loads(line)
        except ValueError as exc:
            intake.count += 1
            intake.problem(f"{label}: invalid JSON ({exc})", line=number, **where_file)
            continue
        if not isinstance(doc, dict):
            intake.count += 1
            intake.problem(
                f"{label}: must be a JSON object with id and text", line=number, **where_file
            )
            continue
        if doc.get("id") is None and source:
            doc = {**doc, "id": f"{source}:{number}"}
        item = intake.parsed(doc, label, line=number, **where_file)
        if item is not None:
            yield item


def from_jsonl(stream: IO[bytes], intake: Intake, max_bytes: int) -> Iterator[BatchItem]:
    """Documents from a JSONL request body, read line by line with a byte budget."""
    yield from _jsonl(_limited_lines(stream, max_bytes), intake, None)
    intake.finish()


def _limited_lines(stream: IO[bytes], max_bytes: int) -> Iterator[bytes]:
    seen = 0
    # A raw stream (Werkzeug's LimitedStream is one) gets a buffer: IOBase.readline on an
    # unbuffered stream reads one byte per call.
    raw = cast(io.RawIOBase, stream)
    reader = stream if hasattr(stream, "peek") else io.BufferedReader(raw, 1 << 16)
    while True:
        line = reader.readline(1 << 24)
        if not line:
            return
        seen += len(line)
        if seen > max_bytes:
            raise request_too_large(max_bytes)
        yield line


def request_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"request body is larger than {max_bytes} bytes (BATCH_MAX_REQUEST_BYTES)",
        code="request_too_large",
    )


class _HTMLText(HTMLParser):
    """Visible text of an HTML document (script and style dropped)."""

    SKIP = frozenset({"script", "style", "head", "title", "noscript", "template"})
    BLOCK = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return "\n".join(line for line in lines if line)


def html_text(raw: str) -> str:
    parser = _HTMLText()
    parser.feed(raw)
    parser.close()
    return parser.text()


def extract_text(name: str, data: IO[bytes], extractor: extraction.Extractor | None = None) -> str:
    """The text of one uploaded document; ValueError says what is wrong with it.

    .pdf and .docx are read by a bounded subprocess (app/extraction.py) given an `extractor`,
    as every request path does; without one, in this process (tests, tools).
    """
    ext = os.path.splitext(name)[1].lower()
    if ext in TEXT_TYPES or ext in HTML_TYPES:
        try:
            text = data.read().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValueError("is not UTF-8 text") from None
        return html_text(text) if ext in HTML_TYPES else text
    if ext in extraction.TYPES and extractor is not None:
        return extractor.extract(ext, data.read())
    if ext == ".pdf":
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError

        try:
            reader = PdfReader(data)
            return "\n".join((page.extract_text() or "") for page in reader.pages).strip()
        except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
            raise ValueError(f"is not a readable PDF ({exc})") from None
    if ext == ".docx":
        import zipfile

        import docx

        try:
            document = docx.Document(data)
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
            raise ValueError(f"is not a readable .docx ({type(exc).__name__})") from None
        return "\n".join(p.text for p in document.paragraphs if p.text)
    raise ValueError(f"has an unsupported type; accepted: {', '.join(FILE_TYPES)}")


def _size(data: IO[bytes]) -> int:
    data.seek(0, os.SEEK_END)
    size = data.tell()
    data.seek(0)
    return size


def from_files(files: list[tuple[str, IO[bytes]]], intake: Intake) -> Iterator[BatchItem]:
    """Documents from uploaded files: one per text/html/pdf/docx file, one per JSONL line."""
    if not files:
        raise APIError(400, "upload at least one file (field name: files)", param="files")
    bounds = intake.extraction
    reader = extraction.Extractor(bounds, intake.extraction_slots) if bounds else None
    try:
        yield from _from_files(files, intake, reader)
    finally:
        if reader is not None:
            reader.close()
    intake.finish()


def _from_files(
    files: list[tuple[str, IO[bytes]]], intake: Intake, reader: extraction.Extractor | None
) -> Iterator[BatchItem]:
    for index, (name, data) in enumerate(files):
        name = name or f"file{index}"
        if name.lower().endswith(".jsonl"):
            yield from _jsonl(iter(data.readline, b""), intake, name)
            continue
        size = _size(data)
        packed = name.lower().endswith(extraction.TYPES)
        most, setting = (
            (intake.max_file_bytes, "SLUICE_BATCH_MAX_FILE_BYTES")
            if packed
            else (intake.max_document_bytes * 4, "BATCH_MAX_DOCUMENT_BYTES")
        )
        if most and size > most:
            intake.count += 1
            intake.problem(
                f"{name}: file is {size} bytes; the limit is {most} ({setting})",
                file=name,
                document_id=name,
            )
            continue
        try:
            text = extract_text(name, data, reader)
        except ValueError as exc:
            intake.count += 1
            intake.problem(f"{name}: {exc}", file=name, document_id=name)
            continue
        if not text.strip():
            intake.count += 1
            intake.problem(f"{name}: no text could be extracted", file=name, document_id=name)
            continue
        item = intake.document(name, text, None, name, file=name)
        if item is not None:
            yield item
