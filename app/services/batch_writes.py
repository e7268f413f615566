"""Batch results written once: conditional bulk UPDATEs, and one writer per worker process.

- Every result is written with `UPDATE jobs ... WHERE id=:id AND status='running' AND
  attempts=:attempt`, so a redelivered, duplicated or re-queued item never writes twice.
- The process's `ResultWriter` collects the finished items of every chunk the process runs
  and writes them together (one statement per batch and flush, at most FLUSH_SECONDS after
  the first was handed in, sooner once FLUSH_ITEMS wait or a run waits for its own), so the
  fixed cost of a flush (transaction, telemetry, dashboard event) is paid per flush, not per
  chunk and quarter second. A run waits for its results before it ends, so its claim lease
  is held until every result is in the database or given back.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from flask import Flask, current_app
from sqlalchemy import bindparam, update
from sqlalchemy.exc import OperationalError

from app import telemetry
from app.extensions import current_flask_app, db
from app.models import Batch, utcnow
from app.models.batch import batches_t
from app.models.job import jobs_t
from app.services import events
from app.services.stream_runner import db_text

log = logging.getLogger(__name__)

FLUSH_ITEMS = 200  # results waiting that make the writer flush at once
FLUSH_SECONDS = 0.25  # the longest a result waits for its flush


@dataclass
class ItemResult:
    """What one item produced, to be written with a conditional UPDATE."""

    job_id: str
    attempt: int
    status: str  # succeeded | failed | cancelled | expired
    output: str | None = None
    choices: list[dict[str, Any]] | None = None  # set when the answer is more than text
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


_WRITE = (
    update(jobs_t)
    .where(
        jobs_t.c.id == bindparam("b_id"),
        jobs_t.c.status == "running",
        jobs_t.c.attempts == bindparam("b_attempt"),
    )
    .values(
        status=bindparam("b_status"),
        output=bindparam("b_output"),
        choices=bindparam("b_choices", type_=jobs_t.c.choices.type),
        finish_reason=bindparam("b_finish"),
        usage=bindparam("b_usage", type_=jobs_t.c.usage.type),
        error=bindparam("b_error", type_=jobs_t.c.error.type),
        finished_at=bindparam("b_finished"),
    )
)


class Ended(NamedTuple):
    """A result as written, in the shape telemetry counts (its _COLUMNS)."""

    id: str
    mode: str
    provider: str | None
    status: str
    created_at: datetime | None
    first_token_at: datetime | None
    finished_at: datetime
    usage: dict[str, Any] | None
    error: dict[str, Any] | None


def write_results(
    batch_id: str | None, outcomes: list[ItemResult], claimed: Mapping[str, Any] | None = None
) -> int:
    """Write outcomes whose claim is still ours, in one short transaction; returns how many."""
    return len(_write(batch_id, outcomes, claimed))


def _write(
    batch_id: str | None, outcomes: list[ItemResult], claimed: Mapping[str, Any] | None
) -> list[ItemResult]:
    """Write outcomes whose claim is still ours; the ones written.

    One executemany for all of them; only if it moved fewer rows than it was given (a
    redelivered or expired item) is the transaction rolled back and each written alone, to
    learn which ones were ours. `claimed` (job id -> claimed row) feeds the counters.
    """
    if not outcomes:
        return []
    if marker := current_app.config["BATCH_FAULT_WRITE_MARKER"]:
        _injected_fault(marker, outcomes)
    now = utcnow()
    params = [
        {
            "b_id": o.job_id,
            "b_attempt": o.attempt,
            "b_status": o.status,
            "b_output": db_text(o.output) if o.output is not None else None,
            "b_choices": o.choices,
            "b_finish": o.finish_reason,
            "b_usage": o.usage,
            "b_error": o.error,
            "b_finished": now,
        }
        for o in outcomes
    ]
    written: list[ItemResult] = []
    with db.engine.connect() as conn:
        if len(params) > 1 and conn.dialect.supports_sane_multi_rowcount:
            with conn.begin() as tx:
                if conn.execute(_WRITE, params).rowcount == len(params):
                    written = outcomes
                    _add_tokens(conn, batch_id, written)
                else:
                    tx.rollback()
        if not written:
            with conn.begin():
                for o, one in zip(outcomes, params, strict=True):
                    if conn.execute(_WRITE, one).rowcount:
                        written.append(o)
                _add_tokens(conn, batch_id, written)
    telemetry.batch_rows_written([_ended(o, now, claimed) for o in written])
    return written


def _add_tokens(conn: Any, batch_id: str | None, written: list[ItemResult]) -> None:
    """Add the written results' usage to their batch's token totals."""
    prompt = completion = 0
    for o in written:
        if o.usage:
            prompt += int(o.usage.get("prompt_tokens") or 0)
            completion += int(o.usage.get("completion_tokens") or 0)
    if batch_id and (prompt or completion):
        conn.execute(
            update(batches_t)
            .where(batches_t.c.id == batch_id)
            .values(
                prompt_tokens=batches_t.c.prompt_tokens + prompt,
                completion_tokens=batches_t.c.completion_tokens + completion,
            )
        )


def _ended(o: ItemResult, finished: datetime, claimed: Mapping[str, Any] | None) -> Ended:
    row = (claimed or {}).get(o.job_id)
    return Ended(
        id=o.job_id,
        mode="batch",
        provider=getattr(row, "provider", None),
        status=o.status,
        created_at=getattr(row, "created_at", None),
        first_token_at=None,
        finished_at=finished,
        usage=o.usage,
        error=o.error,
    )


def _injected_fault(marker: str, outcomes: list[ItemResult]) -> None:
    """Tests only: an output containing `<marker><n>` fails its write on attempts 1..n."""
    for o in outcomes:
        found = re.search(re.escape(marker) + r"(\d+)", o.output or "")
        if found and o.attempt <= int(found.group(1)):
            raise OperationalError("UPDATE jobs", None, RuntimeError(f"injected fault {marker}"))


def flush(
    batch_id: str | None, outcomes: list[ItemResult], claimed: Mapping[str, Any]
) -> tuple[list[ItemResult], list[ItemResult], Exception | None]:
    """Write outcomes; (written, those that could not be, the last write error).

    A failed batched write is retried one result at a time, so one bad result (a value the
    database refuses) does not take its neighbours with it; if the first two of those fail
    too, the database is taken to be down and the rest are not tried. Results that were
    not ours (a stale claim) are in neither list.
    """
    error: Exception | None = None
    if not outcomes:
        return [], [], error
    failed: list[ItemResult] = []
    try:
        written = _write(batch_id, outcomes, claimed)
    except Exception as exc:
        log.warning("writing %d result(s) failed (%r); trying one by one", len(outcomes), exc)
        error, written = exc, []
        for i, outcome in enumerate(outcomes):
            try:
                written += _write(batch_id, [outcome], claimed)
            except Exception as one:
                error = one
                failed.append(outcome)
                if i == 1 and len(failed) == 2:  # the first two failed: the database is down
                    failed += outcomes[2:]
                    break
    if batch_id:
        events.batch_changed(Batch(id=batch_id, status="in_progress"))
    return written, failed, error


@dataclass(eq=False)
class Ticket:
    """One run's results in the writer: how many wait, how many were written, which failed."""

    pending: int = 0
    written: int = 0
    failed: list[ItemResult] = field(default_factory=list)
    error: BaseException | None = None
    done: Any = None  # a gevent Event, set while nothing of this run waits

    def __post_init__(self) -> None:
        from gevent.event import Event

        self.done = Event()
        self.done.set()


class _Entry(NamedTuple):
    batch_id: str | None
    outcome: ItemResult
    row: Any  # the claimed row (telemetry's provider and created_at)
    ticket: Ticket


class ResultWriter:
    """The writer of one worker process (one greenlet): results of every run, flushed together."""

    def __init__(self, app: Flask) -> None:
        from gevent.event import Event

        self.app = app
        self.waiting: list[_Entry] = []
        self.first_at = 0.0  # when the oldest waiting result was handed in
        self.hurry = False  # a run waits for its results: flush now
        self.wake = Event()
        self.greenlet: Any = None
        self.flushes = 0

    def put(self, batch_id: str | None, outcome: ItemResult, row: Any, ticket: Ticket) -> None:
        """Hand in one result of a run; it is written within FLUSH_SECONDS."""
        if not self.waiting:
            self.first_at = time.monotonic()
        self.waiting.append(_Entry(batch_id, outcome, row, ticket))
        ticket.pending += 1
        ticket.done.clear()
        if len(self.waiting) >= FLUSH_ITEMS:
            self.wake.set()
        self._start()

    def wait(self, ticket: Ticket) -> None:
        """Flush now and wait until none of this run's results is waiting."""
        if ticket.pending:
            self.hurry = True
            self.wake.set()
            self._start()
            ticket.done.wait()

    def _start(self) -> None:
        if self.greenlet is None or self.greenlet.dead:
            import gevent

            self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        with self.app.app_context():
            try:
                while self.waiting:
                    due = self.first_at + FLUSH_SECONDS - time.monotonic()
                    if due > 0 and not self.hurry and len(self.waiting) < FLUSH_ITEMS:
                        self.wake.clear()
                        self.wake.wait(due)
                        continue
                    entries, self.waiting, self.hurry = self.waiting, [], False
                    self._flush(entries)
            except BaseException as exc:  # GreenletExit too: no run waits for nothing
                entries, self.waiting = self.waiting, []
                self._give_up(entries, exc)
                raise

    def _flush(self, entries: list[_Entry]) -> None:
        """Write these results (one flush per batch among them) and tell their runs."""
        self.flushes += 1
        by_batch: dict[str | None, list[_Entry]] = {}
        for entry in entries:
            by_batch.setdefault(entry.batch_id, []).append(entry)
        groups = list(by_batch.items())
        for at, (batch_id, group) in enumerate(groups):
            try:
                claimed = {e.outcome.job_id: e.row for e in group}
                written, failed, error = flush(batch_id, [e.outcome for e in group], claimed)
            except BaseException as exc:
                for _, left in groups[at:]:
                    self._give_up(left, exc)
                raise
            ok = {id(o) for o in written}
            bad = {id(o) for o in failed}
            for entry in group:
                ticket = entry.ticket
                if id(entry.outcome) in ok:
                    ticket.written += 1
                elif id(entry.outcome) in bad:
                    ticket.failed.append(entry.outcome)
                    ticket.error = error
                self._resolved(ticket)

    def _give_up(self, entries: list[_Entry], exc: BaseException) -> None:
        """These results were not written (the writer itself failed): their runs give them back."""
        for entry in entries:
            entry.ticket.failed.append(entry.outcome)
            entry.ticket.error = exc
            self._resolved(entry.ticket)

    @staticmethod
    def _resolved(ticket: Ticket) -> None:
        ticket.pending -= 1
        if ticket.pending <= 0:
            ticket.done.set()


def result_writer() -> ResultWriter:
    """This process's result writer (one per app), made on first use."""
    app = current_flask_app()
    writer: ResultWriter | None = app.extensions.get("sluice_batch_writer")
    if writer is None:
        writer = app.extensions["sluice_batch_writer"] = ResultWriter(app)
    return writer
