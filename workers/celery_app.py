"""Worker entry point: `sluice worker --mode stream|batch` (or `celery -A workers.celery_app`)."""

import os
from pathlib import Path
from typing import Any

from celery.signals import beat_init, celeryd_after_setup, worker_ready

from app import create_app
from app.heap import freeze_heap
from app.queueing import BATCH_QUEUE, STREAM_QUEUE
from app.services import sweeper

flask_app = create_app()
celery_app = flask_app.extensions["celery"]


@beat_init.connect(weak=False)
def _sweep_in_beat(sender: Any, **_: Any) -> None:
    """Beat's process runs the sweeper itself: never through a queue, so no backlog delays it."""
    if sender.app is celery_app:
        sweeper.start(flask_app)


def lower_priority(nice: int) -> None:
    """Raise this process's niceness to `nice` (never lower it), on every thread it has.

    Linux keeps a niceness per thread (threads started later inherit the caller's). With
    the kernel's autogroups (sched_autogroup_enabled), niceness only orders threads of one
    session; a process that leads its own session (`sluice dev` starts each child so) is
    weighed against the others by its autogroup's niceness, so that is raised too.
    """
    tids = [int(t.name) for t in Path("/proc/self/task").glob("*")] or [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except (ProcessLookupError, PermissionError):
            continue  # a thread that ended meanwhile
    group = Path("/proc/self/autogroup")  # "/autogroup-N nice K"; absent without autogroups
    if os.getsid(0) == os.getpid() and group.exists():
        try:
            if int(group.read_text().split()[-1]) < nice:
                group.write_text(str(min(nice, 19)))
        except (OSError, ValueError):
            pass


@celeryd_after_setup.connect(weak=False)
def _batch_worker_yields_the_cpu(sender: Any, instance: Any, **_: Any) -> None:
    """A worker of the batch queue alone runs at BATCH_WORKER_NICE: on a shared host the
    interactive path (web, stream workers) wins the CPU whenever it needs it."""
    queues = set(instance.app.amqp.queues.consume_from)
    if instance.app is celery_app and BATCH_QUEUE in queues and STREAM_QUEUE not in queues:
        lower_priority(flask_app.config["BATCH_WORKER_NICE"])


@worker_ready.connect(weak=False)
def _freeze_the_started_heap(sender: Any, **_: Any) -> None:
    """Once started (SDKs loaded, consumer up), the heap so far leaves the collector's scans.

    Without it each full collection of a worker's heap took 220-350 ms, freezing every
    stream of the process (one fell inside each 50-stream bench wave); after it, ~2 ms.
    """
    if sender.app is celery_app:
        freeze_heap()
