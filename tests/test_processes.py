"""Deployment: one definition of each process, unique worker names, /readyz per mode."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from flask import Flask

from app import embedded_redis
from app.cli.processes import gunicorn_conf, worker_argv
from app.embedded_redis import die_with_parent
from app.services.heartbeat import live_workers
from tests.helpers import niceness

ROOT = Path(__file__).resolve().parent.parent
SLUICE = str(Path(sys.executable).parent / "sluice")
PROCESSES = {
    "web": "sluice web",
    "stream": "sluice worker --mode stream",
    "batch": "sluice worker --mode batch",
    "sweeper": "sluice sweeper",
}


def _procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def _compose_commands() -> dict[str, str]:
    text = (ROOT / "docker-compose.yml").read_text()
    services = re.split(r"\n  (?=[a-z-]+:\n)", text.split("\nservices:\n", 1)[1])
    found = {}
    for block in services:
        name = block.split(":", 1)[0].strip()
        command = re.search(r"\n    command: (\[.*\])", block)
        if command:
            found[name] = " ".join(json.loads(command.group(1)))
    return found


def _readme_processes() -> dict[str, str]:
    text = (ROOT / "README.md").read_text().split("## Processes", 1)[1]
    rows = re.findall(r"^\| ([a-z ]+) \| `([^`]+)` \|$", text, re.M)
    return {name.split()[0]: command for name, command in rows}


def test_every_deployment_runs_the_same_commands() -> None:
    assert {k: v for k, v in _procfile().items() if k != "release"} == PROCESSES
    compose = _compose_commands()
    assert compose["web"] == PROCESSES["web"]
    assert compose["stream-worker"] == PROCESSES["stream"]
    assert compose["batch-worker"] == PROCESSES["batch"]
    assert compose["sweeper"] == PROCESSES["sweeper"]
    assert _readme_processes() == PROCESSES
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["sluice", "web"]' in dockerfile
    assert "COPY pyproject.toml README.md gunicorn.conf.py" in dockerfile
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    names = {m: worker_argv(m)[worker_argv(m).index("-n") + 1] for m in ("stream", "batch")}
    assert names["stream"] == "stream@%h" and names["batch"] == "batch@%h"


def test_gunicorn_config_honours_web_concurrency_and_port() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(gunicorn_conf()), "--print-config"],
        env={"WEB_CONCURRENCY": "3", "PORT": "8123", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    settings = dict(re.findall(r"^(\w+)\s+= (.*)$", printed, re.M))
    assert settings["workers"] == "3"
    assert settings["bind"] == "['0.0.0.0:8123']"
    assert settings["worker_class"] == "gevent"
    assert settings["wsgi_app"] == "app:create_app()"


def _ready(app: Flask) -> tuple[int, list[str]]:
    answer = app.test_client().get("/readyz")
    return answer.status_code, answer.json["missing"]


def _wait(app: Flask, missing: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = _ready(app)
    while state[1] != missing:
        assert time.monotonic() < deadline, f"/readyz still says {state}, wanted {missing}"
        time.sleep(0.2)
        state = _ready(app)


def test_readme_worker_commands_are_each_seen_by_readyz(
    make_app: Callable[..., Flask], test_env: dict[str, str], tmp_path: Path
) -> None:
    """The README's commands give each worker its own node name, so both modes are live."""
    redis_url, redis_proc = embedded_redis.start(tmp_path / "redis")  # no other worker here
    env = test_env | {"REDIS_URL": redis_url}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for mode in ("stream", "batch"):
            argv = [SLUICE, *_readme_processes()[mode].split()[1:]]
            log = (tmp_path / f"{mode}.log").open("wb")
            procs[mode] = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        app = make_app({"REDIS_URL": redis_url})
        _wait(app, [], timeout=90)
        with app.app_context():
            from app.extensions import redis_store
            from app.services.heartbeat import live_workers

            workers = live_workers(redis_store.client, 3.0)
        names = sorted(w["hostname"].split("@")[0] for w in workers)
        assert names == ["batch", "stream"]
        assert sorted(m for w in workers for m in w["modes"]) == ["batch", "stream"]

        procs["batch"].send_signal(signal.SIGKILL)  # its beats stop: missing within 3 beats
        _wait(app, ["batch_worker"], timeout=15)
        procs["stream"].terminate()  # a clean stop removes its beat at once
        procs["stream"].wait(30)
        _wait(app, ["batch_worker", "stream_worker"], timeout=5)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)


def test_a_batch_worker_runs_at_the_configuredniceness(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    """`sluice worker --mode batch` lowers its CPU priority to BATCH_WORKER_NICE; a stream
    worker (and one of both queues) keeps the priority it was started with."""
    redis_url, redis_proc = embedded_redis.start(tmp_path / "redis")
    env = test_env | {"REDIS_URL": redis_url, "SLUICE_BATCH_WORKER_NICE": "7"}
    started = os.getpriority(os.PRIO_PROCESS, 0)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for mode in ("batch", "stream"):
            log = (tmp_path / f"{mode}.log").open("wb")
            procs[mode] = subprocess.Popen(
                [SLUICE, "worker", "--mode", mode],
                env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )  # fmt: skip
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        deadline = time.monotonic() + 90
        while {w["pid"] for w in live_workers(client, 3.0)} != {p.pid for p in procs.values()}:
            assert time.monotonic() < deadline, "the workers never beat"
            time.sleep(0.2)
        assert niceness(procs["batch"].pid) == {max(7, started)}
        assert niceness(procs["stream"].pid) == {started}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)


@pytest.mark.parametrize(
    "argv",
    [
        [SLUICE, "web"],
        [SLUICE, "worker", "--mode", "stream"],
        [SLUICE, "sweeper"],
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "solo"],
    ],
    ids=["web", "worker", "sweeper", "bare-celery-worker"],
)
def test_no_redis_url_is_a_clear_error(
    argv: list[str], test_env: dict[str, str], tmp_path: Path
) -> None:
    """Outside `sluice dev` nothing starts an embedded Redis; the error says what to set."""
    env = test_env | {"REDIS_URL": "", "SLUICE_HOME": str(tmp_path)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "REDIS_URL is not set" in done.stdout + done.stderr
    assert not (tmp_path / "redis.url").exists()


def test_a_started_worker_freezes_its_heap(test_env: dict[str, str]) -> None:
    """worker_ready moves the started heap out of the collector's scans (its own app only)."""
    probe = (
        "import gc\n"
        "from celery.signals import worker_ready\n"
        "import workers.celery_app as w\n"
        "class Consumer:\n"
        "    def __init__(self, app): self.app = app\n"
        "worker_ready.send(sender=Consumer(object()))\n"
        "print(gc.get_freeze_count())\n"
        "worker_ready.send(sender=Consumer(w.celery_app))\n"
        "print(gc.get_freeze_count())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=test_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, after = (int(n) for n in done.stdout.split())
    assert before == 0
    assert after > 10_000
