"""Which lines are logged at which level: quiet by default, `SLUICE_LOG_LEVEL` to see more.

At INFO (the default) a console shows warnings, errors and one line per job or batch
state change that matters (a job failed or was cancelled, a batch ended, the sweeper
recovered something). Per-task and per-success lines (Celery's "Task ... received" and
"... succeeded", each succeeded job, each quiet sweep pass) are DEBUG: `SLUICE_LOG_LEVEL=DEBUG`
shows them. (The format of a line is the formatter's business, not this module's.)
"""

from __future__ import annotations

import logging

# Celery's per-task lines, logged at INFO by Celery itself: shown only at DEBUG
PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


def level_number(level: str | int) -> int:
    """A level name or number as a number (an unknown name is INFO)."""
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.strip().upper())
    return value if isinstance(value, int) else logging.INFO


def apply(level: str | int) -> None:
    """Set the root level and hold Celery's per-task lines back unless it is DEBUG."""
    number = level_number(level)
    logging.getLogger().setLevel(number)
    per_task = number if number <= logging.DEBUG else max(number, logging.WARNING)
    for name in PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(per_task)
