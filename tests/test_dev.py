"""`sluice dev` supervises its children: one that dies is restarted; only a signal stops all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from app.cli.supervisor import Supervisor
from app.embedded_redis import die_with_parent
from app.services.heartbeat import live_workers
from tests.helpers import autogroup_nice, niceness
from tests.stack import free_port

SLUICE = str(Path(sys.executable).parent / "sluice")


def test_supervisor_restarts_with_growing_backoff() -> None:
    lines: list[str] = []
    supervisor = Supervisor(log=lines.append, min_backoff=0.1, max_backoff=0.4)
    supervisor.add("crasher", [sys.executable, "-c", "import sys; sys.exit(3)"])
    deadline = time.monotonic() + 20
    while sum("exited" in line for line in lines) < 4:
        assert time.monotonic() < deadline, lines
        supervisor.poll()
        time.sleep(0.02)
    supervisor.stop()
    delays = [float(d) for d in re.findall(r"restarting in ([\d.]+)s", "\n".join(lines))]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.4]
    assert all("exit code 3" in line for line in lines if "exited" in line)
    assert sum(line.startswith("started crasher") for line in lines) >= 4


def _pid(log: Path, name: str, after: int = 0) -> int | None:
    found = re.findall(rf"started {name} \(pid (\d+)\)", log.read_text())
    return int(found[-1]) if len(found) > after else None


def _wait(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (httpx.HTTPError, OSError, redis.RedisError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_dev_restarts_a_killed_worker_and_stops_on_sigterm(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    home, port = tmp_path / "home", free_port()
    env = {k: v for k, v in test_env.items() if k != "REDIS_URL"} | {
        "SLUICE_HOME": str(home),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'dev.db'}",  # its own, not the session's
        "WEB_CONCURRENCY": "1",
        "SLUICE_LOG_LEVEL": "INFO",  # the default: quiet without being told to
    }
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        dev = subprocess.Popen(
            [SLUICE, "dev", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait("sluice dev ready", lambda: httpx.get(url + "/readyz").status_code == 200, 150)
        _wait("the banner", lambda: "Admin key" in log.read_text(), 30)
        text = log.read_text()
        banner = text.index("Sluice is ready")
        # the banner comes last: after every child started and /readyz answered 200
        assert banner > text.index("started sweeper")  # (a restart under load may log later)
        assert "[tasks]" not in text and "celery beat v" not in text  # no Celery banners
        key = (home / "dev-admin-key").read_text().strip()
        chat = {"model": "mock/demo", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(
            url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 200, answer.text
        redis_client = redis.Redis.from_url((home / "redis.url").read_text(), decode_responses=True)
        batch_names = {
            w["hostname"] for w in live_workers(redis_client, 3) if w["modes"] == ["batch"]
        }
        assert len(batch_names) == 1
        first = _pid(log, "batch")
        assert first is not None
        # interactive work wins the CPU: the batch worker runs at BATCH_WORKER_NICE (10)
        started = os.getpriority(os.PRIO_PROCESS, 0)
        assert niceness(first) == {max(10, started)}
        assert niceness(_pid(log, "stream") or 0) == {started} == niceness(_pid(log, "web") or 0)
        # each child leads its own session: under the kernel's autogroups that session's
        # niceness is what weighs it against the stream workers and web
        if Path("/proc/self/autogroup").exists():
            assert autogroup_nice(first) == 10
            assert autogroup_nice(_pid(log, "stream") or 0) == 0

        os.kill(first, signal.SIGKILL)
        _wait("the restart", lambda: _pid(log, "batch", after=1) not in (None, first), 30)
        assert dev.poll() is None, log.read_text()
        text = log.read_text()
        assert re.search(r"batch \(pid \d+\) exited .*killed by SIGKILL.*restarting in", text)
        assert "stopping" not in text

        def batch_back() -> bool:
            workers = live_workers(redis_client, 3)
            batch = [w for w in workers if w["modes"] == ["batch"]]
            return [w["hostname"] for w in batch] == sorted(batch_names) and batch[0][
                "pid"
            ] != first

        _wait("the batch worker's heartbeat under its old name", batch_back, 90)
        assert httpx.get(url + "/readyz").status_code == 200

        redis_pid = _pid(log, "redis")  # dev's own Redis comes back on the same port
        assert redis_pid is not None
        os.kill(redis_pid, signal.SIGKILL)
        _wait("Redis restarted", lambda: _pid(log, "redis", after=1) not in (None, redis_pid), 30)
        restarted = time.time()

        def beating_again() -> bool:
            fresh = [w for w in live_workers(redis_client, 3) if w["last_seen"] > restarted + 1]
            return {m for w in fresh for m in w["modes"]} == {"batch", "stream"}

        _wait("every worker beating on the restarted Redis", beating_again, 90)
        assert httpx.get(url + "/readyz").status_code == 200
        assert dev.poll() is None

        # quiet by default: no per-task or per-sweep lines in all that time
        text = log.read_text()
        assert "Task sluice" not in text and "sweep pass" not in text, text[-3000:]
        pids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", text)]
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(60) == 0
        assert [pid for pid in pids if _alive(pid)] == []
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(10)
