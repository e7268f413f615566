"""The real stack for tests: database, Redis, gunicorn web and Celery workers as processes."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process group (the worker and its pool) as a crash would."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

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

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)
