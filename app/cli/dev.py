"""`sluice dev`: the whole system in the foreground, with embedded defaults, supervised."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import click
import httpx

from app import embedded_redis
from app.cli.context import make_app
from app.cli.processes import log_level, sweeper_argv, web_argv, worker_argv
from app.cli.supervisor import Supervisor

READY_WAIT = 120.0  # the banner waits this long for /readyz, then shows what is missing


def _dev_key(home: Path) -> str:
    """The dev admin key, created on first run and kept (0600) under the data dir."""
    key_file = home / "dev-admin-key"
    if key_file.is_file():
        return key_file.read_text().strip()
    from app.auth import create_key

    _, plaintext = create_key("dev", admin=True, name="dev admin key")
    key_file.write_text(plaintext + "\n")
    key_file.chmod(0o600)
    return plaintext


def _children(host: str, port: int) -> dict[str, list[str]]:
    return {
        "web": web_argv("--bind", f"{host}:{port}"),
        # two stream worker processes: one is CPU-bound well before 50 concurrent streams
        "stream": worker_argv("stream", name="stream1", quiet=True),
        "stream2": worker_argv("stream", name="stream2", quiet=True),
        "batch": worker_argv("batch", quiet=True),
        "sweeper": sweeper_argv(quiet=True),
    }


def _log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    click.secho(f"{stamp} sluice dev: {message}", fg="yellow", err=True)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def dev(host: str, port: int) -> None:
    """Start Redis (embedded unless REDIS_URL), migrate, and run web, workers and sweeper.

    A child that dies is restarted (with backoff, under the same node name); only Ctrl-C
    or SIGTERM stops everything.
    """
    app = make_app()
    home = Path(app.config["SLUICE_HOME"])
    supervisor = Supervisor(log=_log)
    url = app.config["REDIS_URL"]
    if not url:
        url = embedded_redis.running_url(home)
        if url is None:  # ours: supervised like the other children, on the same port
            url, redis_proc = embedded_redis.start(home)
            supervisor.add(
                "redis", embedded_redis.server_argv(home, embedded_redis.port_of(url)), redis_proc
            )
        os.environ["REDIS_URL"] = url  # every child inherits it
    import flask_migrate

    with app.app_context():
        flask_migrate.upgrade()
        key = _dev_key(home)

    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        for name, argv in _children(host, port).items():
            supervisor.add(name, argv)
        base = f"http://{host}:{port}"
        missing = _wait_ready(base, supervisor, lambda: stopping)
        if stopping:
            return
        status = "is ready" if not missing else f"is up, not ready yet ({', '.join(missing)})"
        click.secho(
            f"\nSluice {status} (data in {home})\n"
            f"  API        {base}/v1   (OpenAI-compatible; model mock/demo works without keys)\n"
            f"  Dashboard  {base}/dashboard\n"
            f"  Ready?     {base}/readyz\n"
            f"  Admin key  {key}\n"
            f"  Redis      {url}\n"
            f"A process that dies is restarted; Ctrl-C stops everything."
            f" Logs: SLUICE_LOG_LEVEL={log_level()} (DEBUG shows every task).\n",
            fg="green",
        )
        while not stopping:
            supervisor.poll()
            time.sleep(0.2)
    finally:
        _log("stopping…")
        supervisor.stop(last=("redis",))


def _wait_ready(
    base: str, supervisor: Supervisor, stopping: Callable[[], bool], timeout: float = READY_WAIT
) -> list[str]:
    """Supervise until /readyz answers 200 (the banner comes last, after the children's
    start-up lines); what is still missing when `timeout` passes ([] once ready)."""
    deadline = time.monotonic() + timeout
    missing = ["web"]
    while not stopping() and time.monotonic() < deadline:
        supervisor.poll()
        try:
            response = httpx.get(base + "/readyz", timeout=2)
            if response.status_code == 200:
                return []
            missing = list(response.json().get("missing") or ["web"])
        except (httpx.HTTPError, ValueError):
            missing = ["web"]
        time.sleep(0.3)
    return missing
