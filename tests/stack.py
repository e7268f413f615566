"""The real stack for tests: database, Redis, gunicorn web and Celery workers as processes."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
import psycopg

from app.cli.processes import web_argv, worker_argv
from app.embedded_redis import die_with_parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_postgres_database(url: str) -> tuple[str, str]:
    """Create an empty database on the server that url names; return (its url, its name)."""
    name = f"sluice_test_{secrets.token_hex(4)}"
    parts = urlsplit(url.replace("postgresql+psycopg://", "postgresql://"))
    with psycopg.connect(
        url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}")), name


def drop_postgres_database(url: str, name: str) -> None:
    with psycopg.connect(
        url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Stack:
    """Web and worker processes sharing one environment."""

    env: dict[str, str]
    home: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # an interrupted session leaves no orphan consumers
        )

    def start_web(self) -> None:
        self._spawn("web", web_argv(
            "--workers", "1", "--worker-connections", "2000", "--bind", f"127.0.0.1:{self.port}",
            "--graceful-timeout", "2",
        ))  # fmt: skip

    def start_worker(self, mode: str, name: str | None = None, concurrency: int = 50) -> str:
        name = name or mode
        self._spawn(name, worker_argv(mode, concurrency, name=f"{name}-{secrets.token_hex(3)}"))
        return name

    def start_all(self) -> None:
        """gunicorn web, one stream worker and one batch worker; returns once /readyz says so
        (a failed start stops what did start)."""
        self.start_web()
        self.start_worker("stream")
        self.start_worker("batch")
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def kill(self, name: str, sig: int = signal.SIGKILL, grace: float = 30) -> None:
        """Kill a process group (the worker and its pool) as a crash would.

        A group still there after `grace` seconds (a worker whose Redis is gone may never
        finish a warm shutdown) is SIGKILLed, so a teardown never leaves it running.
        """
        proc = self.procs.pop(name)
        for signum in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                grace = 30

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: see {self.home / (name + '.log')}")
            try:
                last = httpx.get(self.url + "/readyz", timeout=2)
                if last.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"stack not ready: {last.text if last else 'no answer'}")

    def wait_healthy(self, timeout: float = 60) -> None:
        """Wait until the web process answers /healthz (workers not needed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["web"].poll() is not None:
                raise RuntimeError(f"web exited: see {self.home / 'web.log'}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"web not healthy after {timeout}s: see {self.home / 'web.log'}")

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


class TcpProxy:
    """A TCP proxy in front of a server (Redis, PostgreSQL) that a test can cut and restore.

    cut() closes every proxied connection and refuses new ones, as a crashed or unreachable
    server would; restore() listens again on the same port.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 0)
        self.port = free_port()
        self.url = urlunsplit(parts._replace(netloc=self._netloc(parts)))
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.restore()

    def _netloc(self, parts: SplitResult) -> str:
        auth = parts.netloc.rpartition("@")[0]
        return f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._conns -= {src, dst}
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
