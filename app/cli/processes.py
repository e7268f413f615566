"""The one definition of each process's command line: web, stream/batch worker, sweeper.

The Procfile, docker-compose.yml, the Dockerfile, `sluice dev` and the test stack all start
processes through these (`sluice web`, `sluice worker --mode M`, `sluice sweeper`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from app.config import ConfigError, load_config
from app.extensions import REDIS_URL_MISSING
from app.queueing import BATCH_QUEUE, STREAM_QUEUE

WORKER_QUEUES = {
    "stream": STREAM_QUEUE,
    "batch": BATCH_QUEUE,
    "both": f"{STREAM_QUEUE},{BATCH_QUEUE}",
}
WORKER_CONCURRENCY = {"stream": 200, "batch": 64, "both": 200}


def gunicorn_conf() -> Path:
    """gunicorn.conf.py beside the source tree (a checkout), else in the working directory."""
    beside = Path(__file__).resolve().parents[2] / "gunicorn.conf.py"
    return beside if beside.is_file() else Path.cwd() / "gunicorn.conf.py"


def web_argv(*extra: str) -> list[str]:
    """gunicorn with the one config file; extra arguments (e.g. --bind) override it."""
    return [sys.executable, "-m", "gunicorn", "-c", str(gunicorn_conf()), *extra]


def log_level() -> str:
    """The children's log level: SLUICE_LOG_LEVEL, default INFO (see app.log_levels)."""
    return os.environ.get("SLUICE_LOG_LEVEL", "INFO").strip().upper() or "INFO"


def worker_argv(
    mode: str, concurrency: int | None = None, name: str | None = None, *, quiet: bool = False
) -> list[str]:
    """A Celery worker of one mode, named `<name or mode>@<host>`: unique per mode and host.

    quiet: without Celery's start-up banner (`sluice dev` prints one banner of its own).
    """
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", *(["-q"] if quiet else []),
        "worker", "-Q", WORKER_QUEUES[mode], "-P", "gevent",
        "-c", str(concurrency or WORKER_CONCURRENCY[mode]),
        "-n", f"{name or mode}@%h", "--loglevel", log_level(),
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def sweeper_argv(loglevel: str | None = None, *, quiet: bool = False) -> list[str]:
    """Celery beat; its schedule file is the config's (SLUICE_HOME/celerybeat-schedule)."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", *(["-q"] if quiet else []),
        "beat", "-l", loglevel or log_level(),
    ]  # fmt: skip


def _exec(argv: list[str]) -> None:
    """Replace this process with argv, once the configuration it needs is known to be good."""
    try:
        config = load_config()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    if not config["REDIS_URL"]:
        raise click.ClickException(REDIS_URL_MISSING)
    os.execv(argv[0], argv)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
def web(gunicorn_args: tuple[str, ...]) -> None:
    """Run the web tier: gunicorn with gunicorn.conf.py (WEB_CONCURRENCY, PORT); extra
    arguments go to gunicorn."""
    _exec(web_argv(*gunicorn_args))


@click.command()
@click.option("--mode", type=click.Choice(sorted(WORKER_QUEUES)), default="both")
@click.option("--concurrency", "-c", type=int, default=None, help="Greenlets per worker.")
@click.option("--name", default=None, help="Node name before @host (default: the mode).")
def worker(mode: str, concurrency: int | None, name: str | None) -> None:
    """Run a Celery worker for the stream queue, the batch queue, or both."""
    _exec(worker_argv(mode, concurrency, name))


@click.command()
def sweeper() -> None:
    """Run the sweeper (Celery beat): fails lost streams, re-queues lost items, expires."""
    _exec(sweeper_argv())
