"""The stream workers' side of a cancel: one pub/sub connection per process hears each
cancel as it is raised (writer.request_cancel publishes the job's id) and wakes the run of
that job, so a run waiting on a silent upstream (a long time to first token, a reasoning
pause) need not poll the cancel flag.

The flag stays the truth: a woken run reads it, and every append reads it too. While the
listener does not hear (not connected yet, or reconnecting) runs poll the flag as before
(`poll_seconds`); it wakes every run when it loses its connection (they go back to polling)
and again once it hears again (they look once at what they may have missed).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable

import redis
from flask import current_app

from app.streams.keys import cancel_channel, db_of
from app.streams.wire import Wire

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a run reads the flag itself while no listener hears cancels

Wake = Callable[[], None]


class CancelListener:
    """Per process: job id -> the wake-ups of the runs of that job in this process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pid = os.getpid()
        self.channel = cancel_channel(db_of(redis.Redis.from_url(url)))
        # its connection's name in CLIENT LIST
        self.client_name = f"sluice-cancels-{self.pid}-{uuid.uuid4().hex[:6]}"
        self.hearing = threading.Event()  # subscribed: a cancel raised now wakes its run
        self._runs: dict[str, set[Wake]] = {}
        self._lock = threading.Lock()
        self._started = False
        self._closed = threading.Event()
        self._wire: Wire | None = None

    def poll_seconds(self) -> float | None:
        """How often a run must read the flag itself: never while cancels are heard."""
        return None if self.hearing.is_set() else POLL_SECONDS

    def watch(self, job_id: str, wake: Wake) -> None:
        """Call `wake` (from the listener's thread, once per cancel) when job_id is cancelled."""
        with self._lock:
            self._runs.setdefault(job_id, set()).add(wake)
            if not self._started:
                self._started = True
                threading.Thread(target=self._listen, daemon=True, name="cancels").start()

    def unwatch(self, job_id: str, wake: Wake) -> None:
        with self._lock:
            wakes = self._runs.get(job_id)
            if wakes is not None:
                wakes.discard(wake)
                if not wakes:
                    del self._runs[job_id]

    def close(self) -> None:
        """Stop listening (for a listener made outside `cancel_listener`, as in tests)."""
        self._closed.set()
        if (wire := self._wire) is not None:
            wire.close()  # its blocked read ends

    def _wake(self, job_id: str | None) -> None:
        """Wake the runs of one job, or of every job (None)."""
        with self._lock:
            if job_id is None:
                wakes = [w for ws in self._runs.values() for w in ws]
            else:
                wakes = list(self._runs.get(job_id, ()))
        for wake in wakes:
            try:
                wake()
            except Exception:
                log.exception("a cancel wake-up failed")

    def _listen(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            wire: Wire | None = None
            try:
                wire = self._wire = Wire(self.url, self.client_name)
                wire.send(("SUBSCRIBE", self.channel))
                while True:
                    for reply in wire.replies():
                        if isinstance(reply, Exception):
                            raise reply
                        if reply[0] == "message":
                            self._wake(reply[2])
                        elif reply[0] == "subscribe":
                            wire.settimeout(None)  # (the connect timeout until now)
                            self.hearing.set()
                            backoff = 0.05
                            self._wake(None)  # look once at what was raised while deaf
            except Exception as exc:
                if self.hearing.is_set() and not self._closed.is_set():  # once an outage
                    log.warning("the cancel listener lost its pub/sub connection: %r", exc)
            finally:
                self._wire = None
                if wire is not None:
                    wire.close()
                if self.hearing.is_set():
                    self.hearing.clear()
                    self._wake(None)  # back to polling until it hears again
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 2.0)


_listeners: dict[str, CancelListener] = {}
_listeners_lock = threading.Lock()


def cancel_listener() -> CancelListener:
    """This process's listener for the current app's Redis (a forked child gets its own)."""
    url = current_app.config["REDIS_URL"]
    listener = _listeners.get(url)
    if listener is None or listener.pid != os.getpid():
        with _listeners_lock:
            listener = _listeners.get(url)
            if listener is None or listener.pid != os.getpid():
                listener = _listeners[url] = CancelListener(url)
    return listener
