"""Limits (issue 10): each refusal is a 4xx naming its limit and setting, never a 500."""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import docx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from pypdf import PdfWriter

from app.config import ConfigError, load_config
from app.providers.mock import MockSettings, _settings_for
from app.services import documents
from tests.helpers import pdf_of, tuned

CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
ASYNC = {"Prefer": "respond-async"}  # answered at once (202), with no worker needed


@pytest.fixture
def http(app: Flask, api_key: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_key}"
    return client


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    error: dict[str, Any] = response.get_json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


def docx_bytes(text: str = "hello from a docx") -> bytes:
    document = docx.Document()
    document.add_paragraph(text)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def pdf_pages(count: int) -> bytes:
    writer = PdfWriter()
    for _ in range(count):
        writer.add_blank_page(width=72, height=72)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def upload(http: FlaskClient, *files: tuple[bytes, str]) -> Any:
    data: dict[str, Any] = {"model": "mock/echo", "instructions": "Summarize."}
    data["files"] = [(io.BytesIO(content), name) for content, name in files]
    return http.post("/v1/document-batches", data=data, content_type="multipart/form-data")


def named_problem(response: Any, name: str) -> str:
    """The one 422 problem of the upload `name`."""
    error = error_of(response, 422)
    assert error["code"] == "invalid_documents"
    (detail,) = error["details"]
    assert detail["file"] == name and detail["document_id"] == name
    message: str = detail["message"]
    return message


def zip_with(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return out.getvalue()


def patched_headers(data: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite a field at `offset` in every local and central header of a zip."""
    raw = bytearray(data)
    for signature, shift in ((b"PK\x03\x04", 0), (b"PK\x01\x02", 2)):
        start = raw.find(signature)
        while start >= 0:
            raw[start + offset + shift : start + offset + shift + len(value)] = value
            start = raw.find(signature, start + 4)
    return bytes(raw)


# -- chat bodies ----


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs"])
def test_messages_per_request(http: FlaskClient, app: Flask, path: str) -> None:
    messages = [{"role": "user", "content": "hi"}] * 4
    with tuned(app, MAX_MESSAGES=3):
        error = error_of(http.post(path, json={**CHAT, "messages": messages}), 400)
        assert error["code"] == "array_above_max_length" and error["param"] == "messages"
        assert "maximum length 3" in error["message"] and "SLUICE_MAX_MESSAGES" in error["message"]
        fine = http.post(path, json={**CHAT, "messages": messages[:3]}, headers=ASYNC)
        assert fine.status_code == 202


def test_default_messages_limit_is_openais(http: FlaskClient) -> None:
    messages = [{"role": "user", "content": "hi"}] * 2049
    error = error_of(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400)
    assert error["code"] == "array_above_max_length"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs", "/v1/document-batches"])
def test_characters_per_string(http: FlaskClient, app: Flask, path: str) -> None:
    long = "x" * 101
    body = (
        {"model": "mock/echo", "instructions": "x", "documents": [{"id": "a", "text": long}]}
        if path == "/v1/document-batches"
        else {**CHAT, "messages": [{"role": "user", "content": long}]}
    )
    with tuned(app, MAX_STRING_CHARS=100):
        error = error_of(http.post(path, json=body), 400)
    assert error["code"] == "string_above_max_length"
    assert error["param"] in ("messages[0].content", "documents[0].text")
    assert "maximum length 100" in error["message"]


def test_body_bytes_per_route_from_the_config_table(http: FlaskClient, app: Flask) -> None:
    raw = json.dumps({**CHAT, "user": "u" * 1000})
    with tuned(app, BODY_LIMITS={"/v1/chat/completions": 500}):
        error = error_of(
            http.post("/v1/chat/completions", data=raw, content_type="application/json"), 413
        )
        assert error["code"] == "request_too_large" and "500-byte" in error["message"]
        other = http.post("/v1/jobs", data=raw, content_type="application/json", headers=ASYNC)
        assert other.status_code == 202  # the table names one route; the rest keep theirs


def test_body_limits_and_rate_limits_tables_are_checked_at_start(tmp_path: Path) -> None:
    def load(text: str) -> dict[str, Any]:
        path = tmp_path / "sluice.toml"
        path.write_text(text)
        return load_config({"SLUICE_CONFIG": str(path), "SLUICE_HOME": str(tmp_path)})

    config = load('[limits.body_bytes]\n"/v1/chat/completions" = 4096\n')
    assert config["BODY_LIMITS"] == {"/v1/chat/completions": 4096}
    tenants = load("[rate_limits.tenants.acme]\nkey_requests_per_minute = 60\n")["RATE_LIMITS"]
    assert tenants == {"acme": {"key_requests_per_minute": 60}}
    for bad, named in (
        ('[limits.body_bytes]\n"/v1/jobs" = "big"\n', "limits.body_bytes"),
        ("[limits.body_bytes]\njobs = 1\n", "'jobs' must be a route"),
        ("[limits]\nbody = 1\n", "unknown setting(s) in [limits]"),
        ("[rate_limits.tenants.acme]\nrpm = 1\n", "[rate_limits.tenants.acme]"),
        ("[rate_limits.tenants.acme]\nkey_requests_per_minute = -1\n", "non-negative"),
    ):
        with pytest.raises(ConfigError, match=re.escape(named)):
            load(bad)


# -- document intake amplification ----


def docs_body(**fields: Any) -> dict[str, Any]:
    return {"model": "mock/echo", "instructions": "Summarize.", **fields}


def test_templating_is_bounded_after_expansion(http: FlaskClient) -> None:
    """Under the 1 MB document limit, but three copies make a 2.7 MB prompt (default 2 MB)."""
    body = docs_body(
        prompt_template="A: {document}\nB: {document}\nC: {document}",
        documents=[{"id": "big", "text": "x" * 900_000}, {"id": "small", "text": "fine"}],
    )
    error = error_of(http.post("/v1/document-batches", json=body), 422)
    (detail,) = error["details"]
    assert detail["document_id"] == "big"
    assert "SLUICE_BATCH_MAX_PROMPT_BYTES" in detail["message"]


def test_template_expansions(http: FlaskClient) -> None:
    body = docs_body(prompt_template="{document}" * 5, documents=[{"id": "a", "text": "x"}])
    error = error_of(http.post("/v1/document-batches", json=body), 400)
    assert error["code"] == "too_many_template_expansions"
    assert error["param"] == "prompt_template" and "limit is 4" in error["message"]


def test_instructions_copied_into_every_document(http: FlaskClient, app: Flask) -> None:
    body = docs_body(instructions="i" * 2000, documents=[{"id": "a", "text": "x"}])
    with tuned(app, BATCH_MAX_INSTRUCTIONS_BYTES=1000):
        error = error_of(http.post("/v1/document-batches", json=body), 413)
        assert error["code"] == "instructions_too_large" and error["param"] == "instructions"
        query = "model=mock/echo&instructions=" + "i" * 2000
        jsonl = http.post(
            f"/v1/document-batches?{query}",
            data=b'{"text": "a"}\n',
            content_type="application/jsonl",
        )
        assert error_of(jsonl, 413)["code"] == "instructions_too_large"


def test_the_whole_batch_after_templating(http: FlaskClient, app: Flask) -> None:
    documents_ = [{"id": str(i), "text": "x" * 400} for i in range(10)]
    body = docs_body(prompt_template="{document} {document}", documents=documents_)
    with tuned(app, BATCH_MAX_EXPANDED_BYTES=5000):
        error = error_of(http.post("/v1/document-batches", json=body), 413)
    assert (
        error["code"] == "batch_too_large" and "SLUICE_BATCH_MAX_EXPANDED_BYTES" in error["message"]
    )


def test_documents_per_batch(http: FlaskClient, app: Flask) -> None:
    body = docs_body(documents=[{"id": str(i), "text": "x"} for i in range(4)])
    with tuned(app, BATCH_MAX_DOCUMENTS=3):
        error = error_of(http.post("/v1/document-batches", json=body), 413)
    assert error["code"] == "too_many_documents"


# -- uploaded files ----


def test_pdf_and_docx_have_a_size_limit_before_reading(http: FlaskClient, app: Flask) -> None:
    with tuned(app, BATCH_MAX_FILE_BYTES=1000):
        for content, name in ((pdf_pages(1) + b" " * 2000, "a.pdf"), (docx_bytes(), "a.docx")):
            message = named_problem(upload(http, (content, name)), name)
            assert "SLUICE_BATCH_MAX_FILE_BYTES" in message, message


def test_pdf_pages(http: FlaskClient, app: Flask) -> None:
    with tuned(app, BATCH_MAX_PDF_PAGES=2):
        message = named_problem(upload(http, (pdf_pages(3), "long.pdf")), "long.pdf")
    assert "has 3 pages; the limit is 2" in message and "SLUICE_BATCH_MAX_PDF_PAGES" in message


def test_docx_zip_bomb_is_refused_by_its_unpacked_size(http: FlaskClient, app: Flask) -> None:
    bomb = zip_with({"[Content_Types].xml": b"<x/>", "word/document.xml": b" " * 5_000_000})
    assert len(bomb) < 20_000
    with tuned(app, BATCH_MAX_UNCOMPRESSED_BYTES=1_000_000):
        message = named_problem(upload(http, (bomb, "bomb.docx")), "bomb.docx")
    assert "unpacks to 5000004 bytes" in message and "UNCOMPRESSED" in message


def test_docx_with_an_unknown_compression_method(http: FlaskClient) -> None:
    odd = patched_headers(
        zip_with({"[Content_Types].xml": b"<x/>"}, zipfile.ZIP_STORED), 8, b"c\x00"
    )
    message = named_problem(upload(http, (odd, "odd.docx")), "odd.docx")
    assert "unsupported compression method (99)" in message


def test_docx_with_an_encrypted_entry(http: FlaskClient) -> None:
    locked = patched_headers(docx_bytes(), 6, b"\x01\x00")
    message = named_problem(upload(http, (locked, "locked.docx")), "locked.docx")
    assert "encrypted entry" in message


def test_docx_with_corrupt_deflate_data(http: FlaskClient) -> None:
    good = docx_bytes("x" * 5000)
    raw = bytearray(good)
    header = raw.find(b"PK\x03\x04")
    name_length = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra = int.from_bytes(raw[header + 28 : header + 30], "little")
    data = header + 30 + name_length + extra
    raw[data : data + 16] = b"\xff" * 16  # the first entry's deflate stream
    message = named_problem(upload(http, (bytes(raw), "broken.docx")), "broken.docx")
    assert "is not a readable .docx" in message


def test_a_good_pdf_and_docx_are_still_read(http: FlaskClient) -> None:
    response = upload(http, (docx_bytes("hello docx"), "a.docx"), (pdf_pages(1), "blank.pdf"))
    message = named_problem(response, "blank.pdf")  # a blank page has no text; the docx is fine
    assert "no text could be extracted" in message


def test_extraction_is_bounded_in_time(http: FlaskClient, app: Flask) -> None:
    with tuned(app, EXTRACT_TIMEOUT_SECONDS=0.001):
        message = named_problem(upload(http, (docx_bytes(), "slow.docx")), "slow.docx")
    assert "SLUICE_EXTRACT_TIMEOUT_SECONDS" in message


def test_extraction_is_bounded_in_memory(http: FlaskClient, app: Flask) -> None:
    with tuned(app, EXTRACT_MEMORY_BYTES=10_000_000):
        message = named_problem(upload(http, (docx_bytes(), "big.docx")), "big.docx")
    assert "SLUICE_EXTRACT_MEMORY_BYTES" in message


def test_a_nul_in_an_uploaded_documents_name(http: FlaskClient) -> None:
    message = named_problem(upload(http, (b"text", "a\x00b.txt")), "a\x00b.txt")
    assert "NUL" in message


# -- the Files API ----


def multipart_upload(http: FlaskClient, disposition: bytes) -> Any:
    raw = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; ' + disposition + b"\r\n\r\n"
        b"{}\r\n--b--\r\n"
    )
    return http.post("/v1/files", data=raw, content_type="multipart/form-data; boundary=b")


@pytest.mark.parametrize("name", [b"a%0Ab", b"a%0Db", b"a%00b"])
def test_upload_names_with_control_characters(http: FlaskClient, name: bytes) -> None:
    response = multipart_upload(http, b"filename*=UTF-8''" + name)
    error = error_of(response, 400)
    assert error["param"] == "file" and error["code"] == "invalid_filename"
    fine = multipart_upload(http, b"filename*=UTF-8''r%C3%A9sum%C3%A9.jsonl")
    assert fine.status_code == 200 and fine.get_json()["filename"] == "résumé.jsonl"
    content = http.get(f"/v1/files/{fine.get_json()['id']}/content")
    assert content.status_code == 200 and content.data == b"{}"


def test_content_of_a_file_stored_with_a_newline_in_its_name(http: FlaskClient, app: Flask) -> None:
    from app.extensions import db
    from app.models import File

    file_id = multipart_upload(http, b'filename="in.jsonl"').get_json()["id"]
    with app.app_context():
        row = db.session.get(File, file_id)
        assert row is not None
        row.filename = "a\nb.jsonl"  # as an upload before names were checked could be
        db.session.commit()
    content = http.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200 and "a_b.jsonl" in content.headers["Content-Disposition"]


# -- the mock provider ----


@pytest.mark.unit
@pytest.mark.parametrize(
    "model", ["x?length=100000000", "x?ttft_ms=1e12", "x?tps=-1", "x?ttft_ms=nan", "x?tokens=1e400"]
)
def test_mock_options_are_bounded(model: str) -> None:
    from app.providers.base import ProviderError

    with pytest.raises(ProviderError, match="must be"):
        _settings_for(model, MockSettings())


@pytest.mark.unit
def test_mock_options_within_bounds_still_apply() -> None:
    name, settings = _settings_for("chat?length=5&ttft_ms=0&tps=0", MockSettings())
    assert (name, settings) == ("chat", MockSettings(5, 0.0, 0.0))


def test_mock_options_out_of_bounds_answer_400_at_the_front_door(http: FlaskClient) -> None:
    body = {**CHAT, "model": "mock/x?length=100000000"}
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "model" and "100000" in error["message"]


@pytest.mark.unit
def test_prompt_bytes_counts_every_expansion() -> None:
    options = documents.Options(model="m", instructions="ab", prompt_template="<{document}>")
    assert (
        options.prompt_bytes(5)
        == len(json.dumps(options.body("x" * 5)["messages"][1]["content"])) - 2 + 2
    )


@pytest.mark.parametrize("kind", ["json", "multipart"])
def test_document_batch_chunked_bodies_are_bounded(
    http: FlaskClient, app: Flask, kind: str
) -> None:
    """No Content-Length: the batch route's own limit holds while the body is read."""
    if kind == "json":
        raw = json.dumps(docs_body(documents=[{"id": "a", "text": "x" * 5000}])).encode()
        content_type = "application/json"
    else:
        raw = (
            b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\n'
            + b"x" * 5000
            + b"\r\n--b--\r\n"
        )
        content_type = "multipart/form-data; boundary=b"
    with tuned(app, BATCH_MAX_REQUEST_BYTES=2000):
        response = http.post(
            "/v1/document-batches?model=mock/echo&instructions=x",
            input_stream=io.BytesIO(raw),
            content_type=content_type,
            headers={"Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},
        )
    assert error_of(response, 413)["code"] == "request_too_large"


def test_document_batch_form_parts_are_bounded(http: FlaskClient, app: Flask) -> None:
    with tuned(app, BATCH_MAX_DOCUMENTS=1):
        response = upload(http, *[(b"text", f"{i}.txt") for i in range(105)])
    error = error_of(response, 413)
    assert error["code"] == "too_many_documents" and "form parts" in error["message"]


def test_one_bad_file_costs_only_its_own_answer(http: FlaskClient, app: Flask) -> None:
    bomb = zip_with({"[Content_Types].xml": b"<x/>", "word/document.xml": b" " * 2_000_000})
    odd = patched_headers(
        zip_with({"[Content_Types].xml": b"<x/>"}, zipfile.ZIP_STORED), 8, b"c\x00"
    )
    files = [(bomb, "bomb.docx"), (docx_bytes("one"), "one.docx"), (odd, "odd.docx")]
    files += [(docx_bytes("two"), "two.docx")]
    with tuned(app, BATCH_MAX_UNCOMPRESSED_BYTES=1_000_000):
        error = error_of(upload(http, *files), 422)
    assert {d["document_id"] for d in error["details"]} == {"bomb.docx", "odd.docx"}


@pytest.mark.unit
def test_an_extractor_goes_on_after_a_file_it_gave_up_on() -> None:
    from dataclasses import replace

    from app import extraction

    limits = extraction.Limits(10, 10**8, 10**6, 2 * 1024**3, 0.001)
    with extraction.Extractor(limits) as reader:
        with pytest.raises(ValueError, match="EXTRACT_TIMEOUT_SECONDS"):
            reader.extract(".docx", docx_bytes())
        reader.limits = replace(limits, seconds=60)
        assert reader.extract(".docx", docx_bytes("first")) == "first"
        assert reader.extract(".docx", docx_bytes("second")) == "second"  # the same process


@pytest.mark.unit
def test_extracted_text_and_large_files_through_the_pipe() -> None:
    from app import extraction

    limits = extraction.Limits(10, 10**8, 1000, 2 * 1024**3, 60)
    with extraction.Extractor(limits) as reader:
        with pytest.raises(ValueError, match="more than 1000 bytes of text"):
            reader.extract(".docx", docx_bytes("x" * 2000))
        padded = pdf_pages(1) + b"\n%" + b" " * 3_000_000
        assert len(padded) > 3_000_000
        assert reader.extract(".pdf", padded) == ""  # 3 MB written whole; a blank page


@pytest.mark.unit
def test_extraction_slots_are_shared_and_bounded() -> None:
    import threading

    from app import extraction

    slots = threading.BoundedSemaphore(1)
    limits = extraction.Limits(10, 10**8, 10**6, 2 * 1024**3, 60)
    with extraction.Extractor(limits, slots) as reader:
        assert reader.extract(".docx", docx_bytes("mine")) == "mine"
        assert slots.acquire(blocking=False)  # given back after the file
        try:
            waiting = threading.Thread(target=reader.extract, args=(".docx", docx_bytes()))
            waiting.start()
            waiting.join(0.5)
            assert waiting.is_alive()  # no slot: it waits its turn
        finally:
            slots.release()
        waiting.join(30)
        assert not waiting.is_alive()


def flate_bomb_pdf(unpacked: int) -> bytes:
    """A one-page PDF whose content stream is `unpacked` bytes of spaces, deflated."""
    stream = zlib.compress(b" " * unpacked, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(stream), stream),
    ]
    return pdf_of(objects)


def test_encrypted_pdf_and_a_deflate_bomb_are_named(http: FlaskClient) -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=72, height=72)
    writer.encrypt("secret")
    locked = io.BytesIO()
    writer.write(locked)
    bomb = flate_bomb_pdf(100_000_000)
    assert len(bomb) < 200_000
    error = error_of(upload(http, (locked.getvalue(), "locked.pdf"), (bomb, "bomb.pdf")), 422)
    messages = {d["document_id"]: d["message"] for d in error["details"]}
    assert "is encrypted" in messages["locked.pdf"]
    assert "bomb.pdf" in messages  # bounded by pypdf's output cap and the child's limits
