"""How long a stream run gathers deltas before it appends them: a few ms, wider under load.

Each append costs the whole stack a round of work (the worker's round trip, Redis's XADD
and notice, each relay's wake-up, render and write), whatever it carries. At low load a run
appends what arrived within `STREAM_COALESCE_MS` of its last append. When a worker process
runs more streams than `STREAM_APPENDS_PER_SECOND` allows at that window, the window widens
to streams / budget, up to `STREAM_COALESCE_MAX_MS`: the process's append rate stays near
its budget and every stream still gets its text at least that often. The first delta and
the end of a stream are not held back by the writer's window; under load the reader
waits a window between reads while tokens come faster than it (`Window.pause`), so a token,
and an end that came during that wait, may wait up to one window.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Window:
    """The coalescing window's settings: low-load width, widest width, append budget."""

    base: float  # seconds
    widest: float  # seconds
    appends_per_second: float  # per worker process; 0: the window never widens

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Window:
        base = max(0.0, config["STREAM_COALESCE_MS"] / 1000)
        widest = max(base, config["STREAM_COALESCE_MAX_MS"] / 1000)
        return cls(base, widest, max(0.0, config["STREAM_APPENDS_PER_SECOND"]))

    @property
    def widens(self) -> bool:
        """Whether load can widen the window at all."""
        return self.appends_per_second > 0 and self.widest > self.base

    def seconds(self, running: int) -> float:
        """The window while `running` streams run in this process."""
        if self.appends_per_second <= 0:
            return self.base
        return min(self.widest, max(self.base, running / self.appends_per_second))

    def pause(self, running: int, since: float) -> float:
        """How long a reader waits after a read that came `since` seconds after its last:
        under load (a window wider than the base) while tokens come faster than the window,
        the window; else nothing."""
        window = self.seconds(running)
        return window if window > self.base and since < window else 0.0


class StreamLoad:
    """The stream runs in progress in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0

    @contextmanager
    def counted(self) -> Iterator[None]:
        """Count one run while the block runs."""
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1


LOAD = StreamLoad()
