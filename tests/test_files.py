"""Files API: upload, list, retrieve, content, delete, limits and tenant isolation."""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from flask import Flask

from tests.stack import Stack


def _upload(client: openai.OpenAI, data: bytes, name: str = "input.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch").id


def test_upload_retrieve_content_delete(openai_client: openai.OpenAI) -> None:
    data = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'
    created = openai_client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    assert created.id.startswith("file-")
    assert created.object == "file"
    assert created.bytes == len(data)
    assert created.filename == "requests.jsonl"
    assert created.purpose == "batch"
    assert created.status == "processed"
    assert isinstance(created.created_at, int)

    fetched = openai_client.files.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    assert openai_client.files.content(created.id).read() == data

    deleted = openai_client.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True and deleted.object == "file"
    with pytest.raises(openai.NotFoundError):
        openai_client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.files.delete(created.id)


def test_large_upload_round_trips(openai_client: openai.OpenAI, client: httpx.Client) -> None:
    data = os.urandom(3 * 1024 * 1024) + b"\n" * 1000
    file_id = _upload(openai_client, data, "big.jsonl")
    assert openai_client.files.retrieve(file_id).bytes == len(data)
    digest = hashlib.sha256()
    with client.stream("GET", f"/v1/files/{file_id}/content") as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_chunked_upload_without_content_length(client: httpx.Client) -> None:
    boundary = "sluiceboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + b"x" * 200_000
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = client.post(
        "/v1/files",
        content=chunks(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == 200_000


def test_list_pagination_and_purpose(openai_client: openai.OpenAI, client: httpx.Client) -> None:
    ids = [_upload(openai_client, f'{{"n": {i}}}\n'.encode(), f"f{i}.jsonl") for i in range(5)]
    page = client.get("/v1/files", params={"limit": 2}).json()
    assert page["object"] == "list"
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    assert page["first_id"] == ids[4] and page["last_id"] == ids[3]
    seen = [f.id for f in openai_client.files.list(limit=2)]  # the SDK follows `after`
    assert seen == ids[::-1]
    ascending = client.get("/v1/files", params={"order": "asc"}).json()
    assert [f["id"] for f in ascending["data"]] == ids
    assert client.get("/v1/files", params={"purpose": "batch_output"}).json()["data"] == []
    assert len(client.get("/v1/files", params={"purpose": "batch"}).json()["data"]) == 5


@pytest.mark.parametrize(
    ("params", "named"),
    [({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"order": "up"}, "order")],
)
def test_list_bad_params(client: httpx.Client, params: dict[str, str], named: str) -> None:
    response = client.get("/v1/files", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == named


def test_upload_validation(client: httpx.Client) -> None:
    files = {"file": ("x.jsonl", b"{}\n")}
    missing_purpose = client.post("/v1/files", files=files)
    assert missing_purpose.status_code == 400
    assert missing_purpose.json()["error"]["param"] == "purpose"
    wrong_purpose = client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    assert wrong_purpose.status_code == 400
    assert wrong_purpose.json()["error"]["param"] == "purpose"
    missing_file = client.post("/v1/files", data={"purpose": "batch"}, files={"x": ("a", b"1")})
    assert missing_file.status_code == 400
    assert missing_file.json()["error"]["param"] == "file"
    not_multipart = client.post("/v1/files", json={"purpose": "batch"})
    assert not_multipart.status_code == 400
    assert not_multipart.json()["error"]["param"] == "file"


def test_size_limit_answers_413(app: Flask) -> None:
    """In-process with a tiny limit: the Content-Length precheck and the streaming count."""
    tmp = Path(app.config["FILES_DIR"]) / "tmp"
    saved = app.config["FILES_MAX_BYTES"]
    app.config["FILES_MAX_BYTES"] = 1000
    try:
        with app.app_context():
            from app.auth import create_key

            key = create_key("files-limit-tenant")[1]
        http = app.test_client()
        headers = {"Authorization": f"Bearer {key}"}
        before = set(tmp.iterdir()) if tmp.exists() else set()
        for size in (5_000, 2_000_000):  # streamed past the limit; refused by Content-Length
            response = http.post(
                "/v1/files",
                headers=headers,
                data={"purpose": "batch", "file": (io.BytesIO(b"y" * size), "big.jsonl")},
                content_type="multipart/form-data",
            )
            assert response.status_code == 413, response.get_data(as_text=True)
            assert response.get_json()["error"]["param"] == "file"
        ok = http.post(
            "/v1/files",
            headers=headers,
            data={"purpose": "batch", "file": (io.BytesIO(b"z" * 1000), "fits.jsonl")},
            content_type="multipart/form-data",
        )
        assert ok.status_code == 200 and ok.get_json()["bytes"] == 1000
        after = set(tmp.iterdir()) if tmp.exists() else set()
        assert after <= before  # no temp files left behind
    finally:
        app.config["FILES_MAX_BYTES"] = saved


def test_tenant_isolation(openai_client: openai.OpenAI, stack: Stack, other_key: str) -> None:
    file_id = _upload(openai_client, b'{"a": 1}\n')
    other = openai.OpenAI(base_url=stack.url + "/v1", api_key=other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(file_id)
    with pytest.raises(openai.NotFoundError):
        other.files.delete(file_id)
    assert [f.id for f in other.files.list()] == []
    assert openai_client.files.retrieve(file_id).id == file_id


def test_the_sweeper_removes_temp_files_a_killed_process_left(app_ctx: Flask) -> None:
    """An upload or generated file whose writer was SIGKILLed stays in FILES_DIR/tmp; the
    sweeper removes it once it is older than any write takes, and leaves one being written."""
    from app.services import files, sweeper

    stale = files.temp_path()
    stale.write_bytes(b'{"custom_id": "half a line')
    old = time.time() - files.TEMP_MAX_AGE - 60
    os.utime(stale, (old, old))
    fresh = files.temp_path()
    fresh.write_bytes(b"being written")
    done = sweeper.sweep()
    assert done["files.remove_stale_temp_files"]
    assert not stale.exists()
    assert fresh.exists()
    fresh.unlink()
