"""Document intake: every file type, JSONL streaming with line-numbered errors, limits."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import docx
import httpx
import pytest
from flask import Flask
from sqlalchemy import func, select

from app.extensions import db
from app.models import Batch, Job
from tests.helpers import batch_results, pdf_of, wait_batch
from tests.stack import Stack


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF with `text` in Helvetica, xref offsets computed by hand."""
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
    ]
    return pdf_of(objects)


def minimal_docx(*paragraphs: str) -> bytes:
    document = docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


FIELDS = {"model": "openai/echo", "instructions": "Repeat."}


def test_every_file_type(client: httpx.Client) -> None:
    jsonl = "\n".join(
        [json.dumps({"id": "j1", "text": "jsonl one"}), "", json.dumps({"text": "jsonl two"})]
    )
    files = [
        ("files", ("notes.txt", b"plain text file", "text/plain")),
        ("files", ("readme.md", b"# Title\n\nsome *markdown*", "text/markdown")),
        (
            "files",
            (
                "page.html",
                b"<html><head><title>t</title><style>p{}</style></head>"
                b"<body><h1>Heading</h1><p>Para &amp; more</p><script>x()</script></body></html>",
                "text/html",
            ),
        ),
        ("files", ("paper.pdf", minimal_pdf("Hello from a PDF"), "application/pdf")),
        ("files", ("memo.docx", minimal_docx("First paragraph.", "Second paragraph."), "x/docx")),
        ("files", ("more.jsonl", jsonl.encode(), "application/jsonl")),
    ]
    response = client.post("/v1/document-batches", data=FIELDS, files=files)
    assert response.status_code == 202, response.text
    batch = wait_batch(client, response.json()["id"])
    assert batch["counts"]["succeeded"] == 7, batch
    outputs = {line["document_id"]: line["output"] for line in batch_results(client, batch["id"])}
    assert outputs == {
        "notes.txt": "plain text file",
        "readme.md": "# Title\n\nsome *markdown*",
        "page.html": "Heading\nPara & more",
        "paper.pdf": "Hello from a PDF",
        "memo.docx": "First paragraph.\nSecond paragraph.",
        "j1": "jsonl one",
        "more.jsonl:3": "jsonl two",
    }


def test_bad_files_are_all_named(client: httpx.Client) -> None:
    files = [
        ("files", ("good.txt", b"fine", "text/plain")),
        ("files", ("broken.pdf", b"%PDF-1.4 not really", "application/pdf")),
        ("files", ("broken.docx", b"not a zip", "x/docx")),
        ("files", ("image.png", b"\x89PNG", "image/png")),
        ("files", ("latin1.txt", "caf\xe9".encode("latin-1"), "text/plain")),
        ("files", ("empty.md", b"   ", "text/markdown")),
    ]
    response = client.post("/v1/document-batches", data=FIELDS, files=files)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    named = {d["file"] for d in error["details"]}
    assert named == {"broken.pdf", "broken.docx", "image.png", "latin1.txt", "empty.md"}
    for name in named:
        assert name in error["message"]
    assert "unsupported type" in error["message"] and "UTF-8" in error["message"]
    assert client.get("/v1/document-batches").json()["data"] == []  # nothing left behind


def jsonl_post(client: httpx.Client, body: bytes, **params: Any) -> httpx.Response:
    return client.post(
        "/v1/document-batches",
        content=body,
        params={**FIELDS, **params},
        headers={"Content-Type": "application/jsonl"},
    )


def test_jsonl_body_streamed(client: httpx.Client) -> None:
    def lines() -> Iterator[bytes]:  # a chunked upload, as a streaming client sends it
        for i in range(500):
            yield (json.dumps({"id": f"l{i}", "text": f"line text {i}"}) + "\n").encode()

    response = client.post(
        "/v1/document-batches",
        content=lines(),
        params={**FIELDS, "max_tokens": "5"},
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 202, response.text
    batch = wait_batch(client, response.json()["id"])
    assert batch["counts"]["succeeded"] == 500 and batch["params"] == {"max_tokens": 5}
    lines_out = batch_results(client, batch["id"])
    assert lines_out[7]["document_id"] == "l7"
    assert lines_out[7]["output"] == "line text 7"


def test_malformed_jsonl_names_every_line(client: httpx.Client) -> None:
    body = "\n".join(
        [
            json.dumps({"id": "a", "text": "ok"}),
            "{not json",
            json.dumps({"id": "b"}),
            json.dumps(["a list"]),
            json.dumps({"id": "a", "text": "duplicate id"}),
            json.dumps({"id": "c", "text": "fine", "metadata": "nope"}),
        ]
    ).encode()
    response = jsonl_post(client, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_documents"
    assert [d["line"] for d in error["details"]] == [2, 3, 4, 5, 6]
    for fragment in (
        "line 2: invalid JSON",
        "line 3: text must be",
        "line 4: must be a JSON object",
        "line 5: duplicate id 'a'",
        "line 6: metadata must be an object",
    ):
        assert fragment in error["message"]
    assert client.get("/v1/document-batches").json()["data"] == []


def test_json_validation_names_every_document(client: httpx.Client) -> None:
    docs = [{"id": "1", "text": "ok"}, {"id": "2", "text": ""}, "nope", {"id": 3, "text": 4}]
    response = client.post("/v1/document-batches", json={**FIELDS, "documents": docs})
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert [d["index"] for d in details] == [1, 2, 3]
    assert "documents[1]" in response.json()["error"]["message"]

    for body, param in (
        ({"instructions": "x", "documents": docs}, "model"),
        ({"model": "openai/echo", "documents": docs}, "instructions"),
        ({**FIELDS, "prompt_template": "no placeholder", "documents": docs}, "prompt_template"),
        ({**FIELDS, "temperature": 5, "documents": docs}, "temperature"),
        ({**FIELDS, "model": "nope/x", "documents": [{"text": "a"}]}, "model"),
        ({**FIELDS, "documents": "x"}, "documents"),
        ({**FIELDS, "documents": []}, "documents"),
    ):
        bad = client.post("/v1/document-batches", json=body)
        assert bad.status_code == 400, (body, bad.text)
        assert bad.json()["error"]["param"] == param
    assert client.post("/v1/document-batches", content=b"x").status_code == 415


@pytest.fixture
def small_limits(app: Flask) -> Iterator[Flask]:
    saved = {
        k: app.config[k]
        for k in ("BATCH_MAX_DOCUMENTS", "BATCH_MAX_DOCUMENT_BYTES", "BATCH_MAX_REQUEST_BYTES")
    }
    app.config.update(
        BATCH_MAX_DOCUMENTS=3, BATCH_MAX_DOCUMENT_BYTES=20, BATCH_MAX_REQUEST_BYTES=400
    )
    yield app
    app.config.update(saved)


def test_limits(small_limits: Flask, api_key: str) -> None:
    """The same endpoint in-process, with small limits."""
    http = small_limits.test_client()
    headers = {"Authorization": f"Bearer {api_key}"}

    def post(docs: list[dict[str, Any]]) -> Any:
        return http.post(
            "/v1/document-batches", json={**FIELDS, "documents": docs}, headers=headers
        )

    too_many = post([{"text": f"d{i}"} for i in range(4)])
    assert too_many.status_code == 413
    assert "BATCH_MAX_DOCUMENTS" in too_many.json["error"]["message"]
    too_big = post([{"id": "big", "text": "x" * 21}, {"id": "ok", "text": "fine"}])
    assert too_big.status_code == 422
    assert "BATCH_MAX_DOCUMENT_BYTES" in too_big.json["error"]["message"]
    assert too_big.json["error"]["details"][0]["document_id"] == "big"
    request_too_big = post([{"text": "y" * 20}] * 3 + [{"text": "z" * 400}])
    assert request_too_big.status_code == 413
    streamed = http.post(
        "/v1/document-batches",
        data=b"".join(b'{"text": "abcdefghij"}\n' for _ in range(30)),
        query_string=FIELDS,
        headers={**headers, "Content-Type": "application/jsonl"},
    )
    assert streamed.status_code == 413
    with small_limits.app_context():
        tenant_batches = db.session.scalar(select(func.count()).select_from(Batch))
        assert post([{"text": "ok"}]).status_code == 202
        assert db.session.scalar(select(func.count()).select_from(Batch)) == tenant_batches + 1
        assert (
            db.session.scalar(select(func.count()).select_from(Job).where(Job.item_id == "big"))
            == 0
        )


def slow_docx(paragraphs: int) -> bytes:
    """A small .docx (tens of KB) that python-docx takes seconds to read."""
    seed = zipfile.ZipFile(io.BytesIO(minimal_docx("seed")))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in seed.infolist():
            data = seed.read(entry.filename)
            if entry.filename == "word/document.xml":
                paragraph = b"<w:p><w:r><w:t>a</w:t></w:r></w:p>"
                data = data.replace(b"<w:body>", b"<w:body>" + paragraph * paragraphs, 1)
            archive.writestr(entry.filename, data)
    return out.getvalue()


def test_reading_an_upload_leaves_the_web_process_free(stack: Stack, client: httpx.Client) -> None:
    """The finding: a .docx parsed in the (one-gevent-loop) web process held every other
    request and SSE relay of that process until it was done, here for seconds."""
    blob = slow_docx(30_000)
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        answer["batch"] = client.post(
            "/v1/document-batches",
            data={"model": "mock/chat?length=1&tps=0", "instructions": "Summarize."},
            files=[("files", ("slow.docx", blob, "x/docx"))],
            timeout=120,
        )

    upload = threading.Thread(target=send)
    upload.start()
    time.sleep(0.8)  # the upload is in; its file is being read
    with httpx.Client(base_url=stack.url, timeout=60) as probe:
        started = time.monotonic()
        assert probe.get("/healthz").status_code == 200
        waited = time.monotonic() - started
    upload.join(120)
    assert answer["batch"].status_code == 202, answer["batch"].text[:300]
    assert waited < 1.5, f"/healthz waited {waited:.1f} s behind a file being read"
