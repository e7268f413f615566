"""The process heap and the cyclic garbage collector."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator


def freeze_heap() -> None:
    """Move the process's heap so far (imports, the app, the SDKs) out of the collector's scans.

    A full (generation 2) collection walks every long-lived object and freezes every greenlet
    of the process meanwhile: 220-350 ms in a stream worker, ~170 ms in a batch worker (its
    provider calls' slots sit idle). Called once a process has started (Celery's
    worker_ready, gunicorn's post_worker_init); later garbage is collected as before.
    """
    gc.collect()
    gc.freeze()


FULL_COLLECTIONS_OFF = 1 << 30  # a third gc threshold no intake reaches
_quiet = [0]  # intakes running in this process (they share its one collector)
_quiet_lock = threading.Lock()
_thresholds: list[tuple[int, int, int]] = []


@contextlib.contextmanager
def no_full_collections() -> Iterator[None]:
    """No full (generation 2) collection while the block runs; the young ones go on.

    Reading and inserting 100,000 lines promotes enough objects for several full
    collections, each walking every long-lived object of the web process (~0.3 s of CPU in
    all). The young collections still free the lines' own cycles (a bad line's exception
    and traceback, say); the first full collection after the block finds whatever else.
    Nested and concurrent blocks share one count: the last one out restores the thresholds.
    """
    with _quiet_lock:
        if _quiet[0] == 0:
            _thresholds[:] = [gc.get_threshold()]
            gc.set_threshold(*_thresholds[0][:2], FULL_COLLECTIONS_OFF)
        _quiet[0] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet[0] -= 1
            if _quiet[0] == 0:
                gc.set_threshold(*_thresholds.pop())
