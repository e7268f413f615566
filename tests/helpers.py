"""Helpers shared by the test modules: HTTP calls, SSE parsing and row factories."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.auth import lookup_key
from app.extensions import db, redis_store
from app.models import Batch, Job, utcnow
from app.streams.hub import ARM_SECONDS, StreamHub, Tail
from app.streams.keys import lease_key
from app.streams.writer import DeltaLog
from tests.stack import Stack

BATCH_TERMINAL = ("completed", "failed", "cancelled", "expired")


# ---------------------------------------------------------------------- document batches


def submit_documents(
    client: httpx.Client, documents: list[dict[str, Any]], **fields: Any
) -> httpx.Response:
    body = {"model": "openai/echo", "instructions": "Repeat the document.", **fields}
    return client.post("/v1/document-batches", json={**body, "documents": documents})


def wait_batch(client: httpx.Client, batch_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/document-batches/{batch_id}").json()
        if batch["status"] in BATCH_TERMINAL:
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not done: {batch}")


def batch_results(client: httpx.Client, batch_id: str, **params: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/document-batches/{batch_id}/results", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/jsonl")
    return [json.loads(line) for line in response.text.splitlines() if line]


# ------------------------------------------------------------------ streams and SSE


@dataclass
class SSE:
    """The events of one SSE response, as a client sees them."""

    status: int
    events: list[dict[str, Any]] = field(default_factory=list)
    pings: int = 0
    retry: int | None = None
    done: bool = False

    @property
    def text(self) -> str:
        out = []
        for event in self.events:
            data = event["data"]
            if data == "[DONE]" or "error" in data:
                continue
            for choice in data.get("choices") or []:
                out.append(choice["delta"].get("content") or "")
        return "".join(out)

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.events if e["id"]]

    @property
    def last_id(self) -> str | None:
        ids = self.ids
        return ids[-1] if ids else None

    @property
    def error(self) -> dict[str, Any] | None:
        for event in self.events:
            if isinstance(event["data"], dict) and "error" in event["data"]:
                return event["data"]["error"]
        return None


def read_sse(
    response: httpx.Response, max_events: int | None = None, lines: Iterator[str] | None = None
) -> SSE:
    """Parse an SSE body the way EventSource does; stop after max_events data events.

    Pass the same `lines` iterator again to go on reading one response after a stop.
    """
    sse = SSE(response.status_code)
    if response.status_code != 200:
        response.read()
        return sse
    data: list[str] = []
    ident: str | None = None
    for line in lines if lines is not None else response.iter_lines():
        if line.startswith(":"):
            sse.pings += 1
        elif line.startswith("retry:"):
            sse.retry = int(line.split(":", 1)[1])
        elif line.startswith("id:"):
            ident = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "" and data:
            raw = "\n".join(data)
            payload = raw if raw == "[DONE]" else json.loads(raw)
            sse.events.append({"id": ident, "data": payload})
            data, ident = [], None
            if payload == "[DONE]":
                sse.done = True
                break
            if max_events is not None and len(sse.events) >= max_events:
                break
    return sse


def stream_chat(client: httpx.Client, model: str, prompt: str = "x", **extra: Any) -> str:
    """Start a streamed chat, read nothing, return the job id (the job runs on: detach)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body | extra) as response:
        assert response.status_code == 200, response.read()
        return response.headers["x-sluice-job-id"]


def follow(client: httpx.Client, job_id: str, last: str | None = None, **kw: Any) -> SSE:
    headers = {"Last-Event-ID": last} if last else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        return read_sse(response, **kw)


def wait_stream(client: httpx.Client, job_id: str) -> dict[str, Any]:
    sse = follow(client, job_id)
    assert sse.done
    return client.get(f"/v1/jobs/{job_id}").json()


# ------------------------------------------------------------------------- rows


def niceness(pid: int) -> set[int]:
    """The CPU niceness of each thread of a process (Linux keeps one per thread)."""
    stats = (task / "stat" for task in Path(f"/proc/{pid}/task").iterdir())
    return {int(stat.read_text().rsplit(")", 1)[1].split()[16]) for stat in stats}


def autogroup_nice(pid: int) -> int:
    """The niceness of a process's autogroup (its session's CPU weight under autogroups)."""
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


def tenant_of(key: str) -> str:
    found = lookup_key(key)
    assert found is not None
    return found.tenant_id


def insert_job(tenant_id: str, mode: str, status: str, **fields: Any) -> Job:
    """A job row as the channels would leave it (call inside an app context)."""
    now = utcnow()
    values: dict[str, Any] = {
        "tenant_id": tenant_id,
        "mode": mode,
        "status": status,
        "provider": "mock",
        "model": "mock/demo",
        "request": {"messages": [{"role": "user", "content": "hi"}]},
        "route_rule": "interactive" if mode == "stream" else "bulk",
        "route_reason": "stream=true" if mode == "stream" else "document batch",
        "created_at": now - timedelta(seconds=2),
    }
    if status in ("running", "succeeded", "failed"):
        values["started_at"] = now - timedelta(milliseconds=1900)
    if status == "succeeded":
        values["first_token_at"] = now - timedelta(milliseconds=1750)
        values["finished_at"] = now
        values["usage"] = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    if status == "failed":
        values["finished_at"] = now
        values["error"] = {"message": "upstream said no", "code": "provider_error"}
    values.update(fields)
    job = Job(**values)
    db.session.add(job)
    db.session.commit()
    return job


def wait_row(model: type[Job | Batch], row_id: str, status: str, timeout: float = 10.0) -> Any:
    """The row once its status is `status`, read afresh each time (inside an app context)."""
    deadline = time.monotonic() + timeout
    while True:
        db.session.remove()
        row = db.session.get(model, row_id)
        if row is not None and row.status == status:
            return row
        if time.monotonic() >= deadline:
            found = row.status if row is not None else "missing"
            raise AssertionError(f"{model.__name__} {row_id} is {found}, not {status}")
        time.sleep(0.02)


def insert_batch(tenant_id: str, statuses: list[str]) -> Batch:
    batch = Batch(
        tenant_id=tenant_id, kind="documents", status="in_progress", model="mock/demo",
        total=len(statuses), route_rule="bulk", route_reason="document batch",
    )  # fmt: skip
    db.session.add(batch)
    db.session.flush()
    for index, status in enumerate(statuses):
        insert_job(tenant_id, "batch", status, batch_id=batch.id, item_index=index)
    db.session.commit()
    return batch


# ---------------------------------------------------------------------- processes


@contextmanager
def tuned_batch_worker(stack: Stack, settings: dict[str, str], name: str) -> Iterator[Stack]:
    """The session's batch worker swapped for one with these settings (restored afterwards)."""
    stack.kill("batch", signal.SIGTERM)
    own = Stack(env={**stack.env, **settings}, home=stack.home, port=stack.port)
    own.start_worker("batch", name, concurrency=20)
    stack.wait_ready()
    try:
        yield own
    finally:
        own.stop()
        stack.start_worker("batch")
        stack.wait_ready()


def app_client(app: Flask, key: str) -> FlaskClient:
    """An in-process client (no workers needed) authenticated with this key."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


@contextmanager
def tuned(app: Flask, **settings: Any) -> Iterator[None]:
    """The in-process app with these settings for the block (restored afterwards)."""
    saved = {name: app.config[name] for name in settings}
    app.config.update(settings)
    try:
        yield
    finally:
        app.config.update(saved)


def pdf_of(objects: list[bytes]) -> bytes:
    """A PDF of these numbered objects (1 is the catalog), xref offsets computed by hand."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


@contextmanager
def web_with_config(stack: Stack, home: Path, toml: str) -> Iterator[tuple[str, Path]]:
    """A web process of its own (the session's DB, Redis and workers) reading this
    sluice.toml: (its URL, the file's path, which it re-reads when changed)."""
    path = home / "sluice.toml"
    path.write_text(toml)
    web = Stack(env=stack.env | {"SLUICE_CONFIG": str(path)}, home=home)
    web.start_web()
    try:
        web.wait_ready()
        yield web.url, path
    finally:
        web.stop()


# ---------------------------------------------------------------------- delta logs


def content_delta(text: str) -> list[dict[str, Any]]:
    """One choice delta of text, as DeltaLog.append takes it."""
    return [{"index": 0, "delta": {"content": text}}]


def leased_log(job_id: str) -> DeltaLog:
    """A job's delta log whose lease this test holds (token "T")."""
    client = redis_store.client
    client.set(lease_key(job_id), "T", px=60_000)
    return DeltaLog(client, job_id, running_ttl=60, final_ttl=60, token="T", lease_seconds=60)


def counted_xread(hub: StreamHub, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The XREADs the hub's client makes from now on (their arguments), in a list."""
    reads: list[Any] = []
    real_xread = hub.client.xread

    def counting(*args: Any, **kwargs: Any) -> Any:
        reads.append(args)
        return real_xread(*args, **kwargs)

    monkeypatch.setattr(hub.client, "xread", counting)
    return reads


def hub_hears(tail: Tail) -> bool:
    """Register `tail`, wait until its hub hears the job's channel, then mark the send (as a
    task sent after that would be: follow() skips its first read); True once it does."""
    tail.register()
    assert tail._sub is not None
    heard = tail._sub.armed.wait(ARM_SECONDS)
    tail.sending()
    return heard


def followed_texts(tail: Tail, patience: float = 3.0) -> list[str | None]:
    """The texts a relay follows up to its terminal entry (None), or what came in `patience`."""
    texts: list[str | None] = []
    deadline = time.monotonic() + patience
    for item in tail.follow(ping_seconds=0.1):
        if item is not None:
            texts.append(item[1].get("d"))
        elif time.monotonic() > deadline:
            break
    return texts
