"""Keep `sluice dev`'s children running: a child that exits is restarted, with backoff."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.embedded_redis import die_with_parent


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None  # set while the child waits out its backoff
    failures: int = 0  # exits in a row, each within `stable_after` of its start


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Supervisor:
    """Each child runs its one command line (so a worker keeps its node name) until stop().

    A child that exits is logged and restarted after a backoff that doubles from
    `min_backoff` to `max_backoff` while it keeps failing; one that ran `stable_after`
    seconds starts again from `min_backoff`.
    """

    log: Callable[[str], None]
    min_backoff: float = 1.0
    max_backoff: float = 30.0
    stable_after: float = 60.0
    children: dict[str, Child] = field(default_factory=dict)

    def add(self, name: str, argv: list[str], proc: subprocess.Popen[bytes] | None = None) -> None:
        """Supervise argv as name; start it now unless proc (already running it) is given."""
        child = Child(name, argv)
        self.children[name] = child
        if proc is None:
            self._start(child)
        else:
            child.proc, child.started = proc, time.monotonic()
            self.log(f"started {name} (pid {proc.pid})")

    def _start(self, child: Child) -> None:
        # its own session: a Ctrl-C reaches only `sluice dev`, which stops the children in
        # order (Redis last) with one SIGTERM each; it still dies with dev (PDEATHSIG)
        child.proc = subprocess.Popen(
            child.argv, preexec_fn=die_with_parent, start_new_session=True
        )
        child.started = time.monotonic()
        child.restart_at = None
        self.log(f"started {child.name} (pid {child.proc.pid})")

    def poll(self) -> None:
        """Notice exited children and restart those whose backoff is over."""
        now = time.monotonic()
        for child in self.children.values():
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            assert child.proc is not None
            code = child.proc.poll()
            if code is None:
                continue
            ran = now - child.started
            child.failures = 1 if ran >= self.stable_after else child.failures + 1
            delay = min(self.max_backoff, self.min_backoff * 2 ** (child.failures - 1))
            child.restart_at = now + delay
            self.log(
                f"{child.name} (pid {child.proc.pid}) exited after {ran:.1f}s"
                f" ({describe_exit(code)}); restarting in {delay:g}s"
            )

    def stop(self, timeout: float = 15, last: tuple[str, ...] = ()) -> None:
        """Terminate every child (those named in `last` after the others are gone), killing
        what still runs after timeout."""
        for child in self.children.values():
            child.restart_at = None
        first = [c for name, c in self.children.items() if name not in last]
        self._stop([c.proc for c in first if c.proc is not None], timeout)
        rest = [c for name, c in self.children.items() if name in last]
        self._stop([c.proc for c in rest if c.proc is not None], timeout)

    @staticmethod
    def _stop(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
