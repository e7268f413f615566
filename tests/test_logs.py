"""Quiet by default: which lines are logged at which level (app.log_levels, telemetry, sweeper)."""

from __future__ import annotations

import logging
from datetime import timedelta
from types import SimpleNamespace

import pytest
from flask import Flask

from app import log_levels, telemetry
from app.models import utcnow
from app.services import sweeper


@pytest.fixture
def restore_levels() -> object:
    names = ("", *log_levels.PER_TASK_LOGGERS)
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_celery_per_task_lines_show_only_at_debug(restore_levels: object) -> None:
    log_levels.apply("INFO")
    trace = logging.getLogger("celery.app.trace")
    assert not trace.isEnabledFor(logging.INFO)  # "Task ... succeeded in ..."
    assert trace.isEnabledFor(logging.ERROR)  # a task that raised still shows
    assert logging.getLogger("app.services.stream_runner").isEnabledFor(logging.INFO)
    log_levels.apply("debug")
    assert trace.isEnabledFor(logging.INFO)
    log_levels.apply("WARNING")
    assert not logging.getLogger("app").isEnabledFor(logging.INFO)
    assert logging.getLogger("app").isEnabledFor(logging.WARNING)


def _row(status: str, **fields: object) -> SimpleNamespace:
    now = utcnow()
    values = {
        "id": "job_x", "mode": "stream", "provider": "mock", "status": status,
        "created_at": now - timedelta(seconds=2), "first_token_at": now - timedelta(seconds=1),
        "finished_at": now, "usage": {"completion_tokens": 5}, "error": None,
    }  # fmt: skip
    return SimpleNamespace(**(values | fields))


def test_a_succeeded_job_is_debug_and_a_failed_one_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="app.telemetry"):
        telemetry.log_ended([_row("succeeded")])
        assert caplog.records == []
        failed = _row("failed", error={"code": "rate_limit_exceeded", "message": "slow down"})
        telemetry.log_ended([failed])
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "job_x" in record.getMessage() and "failed" in record.getMessage()
    assert "rate_limit_exceeded" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="app.telemetry"):
        telemetry.log_ended([_row("succeeded")])
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_a_quiet_sweep_pass_logs_nothing_at_info(
    app_ctx: Flask, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet = [("a.nothing", lambda: 0), ("b.nothing", lambda: {"lost": 0})]
    monkeypatch.setattr(sweeper, "steps", lambda: quiet)
    with caplog.at_level(logging.INFO):
        done = sweeper.sweep()
    assert all(done.values())
    assert [r.getMessage() for r in caplog.records if r.levelno <= logging.INFO] == []
    with caplog.at_level(logging.DEBUG, logger="app.services.sweeper"):
        sweeper.sweep()
    assert any("sweep pass" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(sweeper, "steps", lambda: [*quiet, ("c.acted", lambda: {"lost": 2})])
    with caplog.at_level(logging.INFO):
        sweeper.sweep()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "c.acted" in line and "'lost': 2" in line


def test_a_sweep_step_that_recovers_something_says_so() -> None:
    assert sweeper._acted({"lost": 1, "unstarted": 0})
    assert sweeper._acted(3)
    assert not sweeper._acted({"lost": 0})
    assert not sweeper._acted(0) and not sweeper._acted(None) and not sweeper._acted(True)
