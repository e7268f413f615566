"""The coalescing window: a few ms at low load, wider when a worker runs many streams."""

from __future__ import annotations

import time

import pytest
from flask import Flask

from app.extensions import db, redis_store
from app.models import Job
from app.providers.transport import _Body
from app.services import stream_runner
from app.streams.entries import Entry, choices_of, is_terminal, text_of
from app.streams.pacing import LOAD, StreamLoad, Window
from app.streams.writer import read_all
from tests.fake_upstream import FakeUpstream
from tests.helpers import insert_job, tenant_of, tuned

SETTINGS = {"STREAM_COALESCE_MS": 5.0, "STREAM_COALESCE_MAX_MS": 50.0}


def test_the_window_is_the_base_at_low_load_and_widens_with_the_streams_up_to_its_cap() -> None:
    window = Window.from_config(SETTINGS | {"STREAM_APPENDS_PER_SECOND": 500.0})
    assert window.seconds(0) == window.seconds(2) == pytest.approx(0.005)
    assert window.seconds(10) == pytest.approx(0.02)  # 10 streams / 500 appends a second
    assert window.seconds(25) == window.seconds(1000) == pytest.approx(0.05)
    assert window.widens


def test_a_reader_waits_between_reads_only_under_load_while_tokens_come_fast() -> None:
    window = Window.from_config(SETTINGS | {"STREAM_APPENDS_PER_SECOND": 500.0})
    assert window.pause(25, since=0.02) == pytest.approx(0.05)  # 25 streams: 50 ms
    assert window.pause(25, since=0.2) == 0.0  # slower than the window: nothing to gather
    assert window.pause(2, since=0.0) == 0.0  # low load: the base window is the writer's


def test_without_an_append_budget_the_window_never_widens() -> None:
    window = Window.from_config(SETTINGS | {"STREAM_APPENDS_PER_SECOND": 0.0})
    assert window.seconds(10_000) == pytest.approx(0.005)
    assert not window.widens


def test_the_widest_window_is_never_narrower_than_the_base() -> None:
    settings = {"STREAM_COALESCE_MS": 20.0, "STREAM_COALESCE_MAX_MS": 5.0}
    window = Window.from_config(settings | {"STREAM_APPENDS_PER_SECOND": 1.0})
    assert window.seconds(1) == pytest.approx(0.02)


def test_the_load_counts_the_runs_in_progress_also_when_one_fails() -> None:
    load = StreamLoad()
    with load.counted(), load.counted():
        assert load.running == 2
    with pytest.raises(RuntimeError), load.counted():
        raise RuntimeError
    assert load.running == 0


def _run_job(app: Flask, api_key: str, model: str, **settings: float) -> tuple[list[Entry], float]:
    request = {"model": model, "messages": [{"role": "user", "content": "x"}]}
    job_id = insert_job(tenant_of(api_key), "stream", "queued", request=request).id
    started = time.monotonic()
    with tuned(app, **settings):
        assert stream_runner.run_stream_job(job_id, request, "pacing-worker") == "succeeded"
    took = time.monotonic() - started
    entries = read_all(redis_store.client, job_id)
    assert is_terminal(entries[-1][1])
    row = db.session.get(Job, job_id)
    assert row is not None and row.status == "succeeded"
    assert text_of(entries) == row.output
    return entries[:-1], took


@pytest.mark.timeout(60)
def test_under_load_a_run_appends_less_often_and_loses_nothing(
    app_ctx: Flask, api_key: str, upstream: FakeUpstream
) -> None:
    """40 tokens 5 ms apart: each its own append with no window; with a budget of one
    append a second (so one stream is load) the 50 ms window gathers them, the first
    delta still alone and at once."""
    upstream.add_scenario("pacing", tokens=40, tps=200, ttft_ms=10)
    narrow, _ = _run_job(
        app_ctx, api_key, "openai/pacing", STREAM_COALESCE_MS=0.0, STREAM_APPENDS_PER_SECOND=0.0
    )
    wide, _ = _run_job(app_ctx, api_key, "openai/pacing", **SETTINGS, STREAM_APPENDS_PER_SECOND=1.0)
    assert text_of(wide) == text_of(narrow) and len(text_of(wide)) > 40
    assert len(narrow) >= 30, len(narrow)
    assert 3 <= len(wide) <= 10, len(wide)  # ~200 ms of tokens in 50 ms windows
    first = choices_of(wide[0][1])
    assert first[0]["delta"]["content"] == choices_of(narrow[0][1])[0]["delta"]["content"]
    assert LOAD.running == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_under_load_the_reader_takes_what_arrived_meanwhile_in_one_read(
    app_ctx: Flask,
    api_key: str,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    provider: str,
) -> None:
    """The same 40 tokens: a read each at low load; a read a window (50 ms) under load,
    so the worker wakes for the upstream a few times, not 40."""
    reads: list[int] = []
    recv = _Body._recv

    def counted(self: _Body) -> bytes:
        data = recv(self)
        reads.append(len(data))
        return data

    monkeypatch.setattr(_Body, "_recv", counted)
    upstream.add_scenario("pacing-reads", tokens=40, tps=200, ttft_ms=10)
    model = f"{provider}/pacing-reads"
    _run_job(app_ctx, api_key, model, **SETTINGS, STREAM_APPENDS_PER_SECOND=0.0)
    low_load, reads[:] = len(reads), []
    _run_job(app_ctx, api_key, model, **SETTINGS, STREAM_APPENDS_PER_SECOND=1.0)
    assert low_load >= 30, low_load
    assert len(reads) <= 12, reads


@pytest.mark.timeout(60)
def test_the_end_of_the_stream_cuts_the_window_short(
    app_ctx: Flask, api_key: str, upstream: FakeUpstream
) -> None:
    """A 5 s window would hold the rest of a 0.2 s stream for 5 s; the upstream's end
    ends the wait, so the run ends in about the stream's time with two appends."""
    upstream.add_scenario("pacing-end", tokens=40, tps=200, ttft_ms=10)
    entries, took = _run_job(
        app_ctx,
        api_key,
        "openai/pacing-end",
        STREAM_COALESCE_MS=5000.0,
        STREAM_COALESCE_MAX_MS=5000.0,
        STREAM_APPENDS_PER_SECOND=0.0,
    )
    assert len(entries) == 2  # the first delta at once, then the rest at the end
    assert took < 3.0, took
