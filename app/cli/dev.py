"""`sluice dev`: the whole system in the foreground, with embedded defaults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from app import embedded_redis
from app.cli.context import make_app
from app.cli.processes import sweeper_argv, web_argv, worker_argv


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
        "stream": worker_argv("stream", name="stream1"),
        "stream2": worker_argv("stream", name="stream2"),
        "batch": worker_argv("batch"),
        "sweeper": sweeper_argv("WARNING"),
    }


def _stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 15
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def dev(host: str, port: int) -> None:
    """Start Redis (embedded unless REDIS_URL), migrate, and run web, workers and sweeper."""
    app = make_app()
    home = Path(app.config["SLUICE_HOME"])
    redis_proc = None
    if not app.config["REDIS_URL"]:
        url = embedded_redis.running_url(home)
        if url is None:
            url, redis_proc = embedded_redis.start(home)
        os.environ["REDIS_URL"] = url
    import flask_migrate

    with app.app_context():
        flask_migrate.upgrade()
        key = _dev_key(home)

    procs = {
        name: subprocess.Popen(argv, preexec_fn=embedded_redis.die_with_parent)
        for name, argv in _children(host, port).items()
    }
    base = f"http://{host}:{port}"
    click.secho(
        f"\nSluice is starting (data in {home})\n"
        f"  API        {base}/v1   (OpenAI-compatible; model mock/demo works without keys)\n"
        f"  Dashboard  {base}/dashboard\n"
        f"  Ready?     {base}/readyz\n"
        f"  Admin key  {key}\n"
        f"  Redis      {os.environ.get('REDIS_URL') or app.config['REDIS_URL']}\n"
        f"Ctrl-C stops everything.\n",
        fg="green",
    )

    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    exit_code = 0
    try:
        while not stopping:
            dead = [name for name, proc in procs.items() if proc.poll() is not None]
            if dead:
                click.secho(f"{', '.join(dead)} exited; stopping everything", fg="red", err=True)
                exit_code = 1
                break
            time.sleep(0.5)
    finally:
        click.echo("stopping…", err=True)
        _stop_all(procs)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    sys.exit(exit_code)
