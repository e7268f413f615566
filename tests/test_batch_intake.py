"""Batch intake never holds the database's write lock while reading the client's body."""

from __future__ import annotations

import json
import socket
import sqlite3
import time

import httpx
from flask import Flask
from sqlalchemy import text

from app.extensions import db
from tests.helpers import wait_batch
from tests.stack import Stack


def writers_blocked(app: Flask) -> bool:
    """Would a writer wait on someone else's write transaction right now?"""
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite"):
        conn = sqlite3.connect(uri.split("///", 1)[1], timeout=0.2)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the one write lock, or times out
            conn.rollback()
            return False
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
            return True
        finally:
            conn.close()
    held = db.session.scalar(
        text(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON l.relation = c.oid"
            " WHERE c.relname IN ('batches', 'jobs') AND l.mode = 'RowExclusiveLock'"
            " AND l.pid <> pg_backend_pid()"
        )
    )
    db.session.rollback()
    return bool(held)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_slow_jsonl_upload_holds_no_write_lock_while_it_streams_in(
    stack: Stack, api_key: str, client: httpx.Client, app_ctx: Flask
) -> None:
    lines = [b'{"id": "d%d", "text": "slow upload %d %s"}\n' % (i, i, b"x" * 80) for i in range(40)]
    warm = {"model": "openai/echo", "instructions": "Repeat.", "documents": [{"text": "warm"}]}
    assert client.post("/v1/document-batches", json=warm).status_code == 202  # lazy imports done
    host, port = "127.0.0.1", int(stack.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/document-batches?model=openai/echo&instructions=Repeat. HTTP/1.1\r\n"
            b"Host: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/jsonl\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            % (host.encode(), api_key.encode())
        )
        for line in lines[:20]:  # the first half (beyond any read buffer), then a stall
            sock.sendall(_chunk(line))
        time.sleep(1.5)  # the web has read (and staged) the first half by now
        blocked = [writers_blocked(app_ctx) for _ in range(3)]
        for line in lines[20:]:
            sock.sendall(_chunk(line))
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert not any(blocked), "a writer would wait while the client's body streams in"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202"), answer[:500]
    batch_id = json.loads(body)["id"] if body.lstrip().startswith(b"{") else None
    assert batch_id, body[:200]
    done = wait_batch(client, batch_id)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 40
