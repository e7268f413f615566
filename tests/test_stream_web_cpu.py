"""The web's CPU per stream: no Redis read or write a relay can do without (issue 12)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
from flask import Flask

from app.extensions import redis_store
from app.streams.hub import StreamHub, Tail
from app.streams.keys import notify_channel
from app.streams.relay import sse_body
from app.streams.render import ChunkRenderer
from tests.helpers import content_delta, counted_xread, followed_texts, hub_hears, leased_log


@pytest.fixture
def hub(app_ctx: Flask) -> Iterator[StreamHub]:
    made = StreamHub(app_ctx.config["REDIS_URL"])
    yield made
    made.close()


def test_the_relay_goes_on_from_the_early_error_wait_without_reading_again(
    hub: StreamHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry the early-error wait was handed is the relay's first event: the relay keeps
    that follow() (one subscription, no XREAD of the log from its start)."""
    from app.api.chat import early_error

    reads = counted_xread(hub, monkeypatch)
    job = f"job_fold_{secrets.token_hex(4)}"
    tail = Tail(hub, job, lease_seconds=60, ping_seconds=5)
    assert hub_hears(tail)
    dlog = leased_log(job)
    dlog.append(content_delta("un "))
    items, error = early_error(tail, 2.0)
    assert error is None and items is not None
    sub = tail._sub
    dlog.append(content_delta("deux"))
    dlog.finish("stop", None)
    body = "".join(sse_body(tail, ChunkRenderer(job, "m", 0, False), 1000, lambda _: None, items))
    assert body.count('"content":"un "') == 1 and body.count('"content":"deux"') == 1
    assert body.endswith("data: [DONE]\n\n") and reads == []
    assert sub is not None and job not in hub._subs  # that one subscription, now ended


def test_a_silent_job_the_relay_waits_on_with_the_same_follow(
    hub: StreamHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing in the early-error wait: the relay goes on waiting (no ping for that wait,
    no read), then relays the entries as they come."""
    from app.api.chat import early_error

    reads = counted_xread(hub, monkeypatch)
    job = f"job_fold_{secrets.token_hex(4)}"
    tail = Tail(hub, job, lease_seconds=60, ping_seconds=5)
    assert hub_hears(tail)
    dlog = leased_log(job)
    items, error = early_error(tail, 0.05)
    assert error is None and items is not None
    body = sse_body(tail, ChunkRenderer(job, "m", 0, False), 1000, lambda _: None, items)
    assert next(body).startswith("retry:")
    dlog.append(content_delta("late"))
    dlog.finish("stop", None)
    rest = "".join(body)
    assert '"content":"late"' in rest and ": ping" not in rest and reads == []


def test_an_early_error_still_answers_with_its_status(hub: StreamHub) -> None:
    from app.api.chat import early_error

    job = f"job_fold_{secrets.token_hex(4)}"
    tail = Tail(hub, job, lease_seconds=60, ping_seconds=5)
    assert hub_hears(tail)
    error = {"message": "no", "type": "invalid_request_error", "code": None, "param": None}
    leased_log(job).fail(error)
    items, found = early_error(tail, 2.0)
    assert items is None and found is not None and found["message"] == "no"
    assert job not in hub._subs  # unsubscribed


def _numsub(channel: str) -> int:
    return int(dict(redis_store.client.pubsub_numsub(channel))[channel])


def test_subscribes_asked_for_together_go_out_as_one_command(app_ctx: Flask) -> None:
    """The hub's SUBSCRIBEs asked for before the asking greenlet yields are one write; a
    job whose relays all ended before it went out is unsubscribed after it (not heard)."""
    deferred: list[Callable[[], None]] = []
    hub = StreamHub(app_ctx.config["REDIS_URL"], defer=deferred.append)
    try:
        hub._start()
        assert hub._wire is not None
        sent: list[tuple[tuple[str, ...], ...]] = []
        real_send = hub._wire.send

        def counted_send(*commands: tuple[str, ...]) -> None:
            sent.append(commands)
            real_send(*commands)

        hub._wire.send = counted_send  # type: ignore[method-assign]
        jobs = [f"job_tick_{secrets.token_hex(4)}" for _ in range(4)]
        tails = [Tail(hub, job, lease_seconds=60, ping_seconds=5) for job in jobs]
        for tail in tails:
            tail.register()
        tails[3].close()  # ended before its SUBSCRIBE went out
        assert sent == [] and len(deferred) == 1  # one flush for them all
        deferred.pop()()
        channels = [notify_channel(job) for job in jobs]
        assert sent == [(("SUBSCRIBE", *channels), ("UNSUBSCRIBE", channels[3]))]
        assert all(hub_hears(tail) for tail in tails[:3])
        assert [_numsub(c) for c in channels] == [1, 1, 1, 0]
        dlog = leased_log(jobs[0])
        dlog.append(content_delta("heard"))
        dlog.finish("stop", None)
        texts = [item[1].get("d") for item in tails[0].follow() if item is not None]
        assert texts == ["heard", None]
        for tail in tails:
            tail.close()
    finally:
        hub.close()


def test_the_task_is_sent_without_waiting_for_the_hub_and_nothing_is_missed(
    app_ctx: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tail.sending() never waits for the hub's SUBSCRIBE: a job whose worker writes its
    whole log before the hub hears the channel is relayed in full (one read, once heard);
    a relay whose channel was heard before the send reads nothing."""
    deferred: list[Callable[[], None]] = []
    hub = StreamHub(app_ctx.config["REDIS_URL"], defer=deferred.append)
    try:
        hub._start()
        reads = counted_xread(hub, monkeypatch)
        late, early = (f"job_send_{secrets.token_hex(4)}" for _ in range(2))
        tail = Tail(hub, late, lease_seconds=60, ping_seconds=5)
        tail.register()
        tail.sending()  # the SUBSCRIBE has not even gone out: nothing waits for it
        dlog = leased_log(late)
        dlog.append(content_delta("before "))
        dlog.finish("stop", None)  # the log ended before the hub heard of the job
        deferred.pop()()
        assert followed_texts(tail) == ["before ", None] and len(reads) == 1

        heard = Tail(hub, early, lease_seconds=60, ping_seconds=5)
        heard.register()
        deferred.pop()()
        assert hub_hears(heard)  # the hub hears this job's channel before the send
        dlog = leased_log(early)
        dlog.append(content_delta("after"))
        dlog.finish("stop", None)
        assert followed_texts(heard) == ["after", None] and len(reads) == 1  # no read for it
    finally:
        hub.close()


def test_a_gunicorn_worker_freezes_what_start_up_made() -> None:
    """After the worker loads the app, gc.freeze(): full collections skip start-up's objects."""
    import gc
    import runpy

    from app.cli.processes import gunicorn_conf

    settings = runpy.run_path(str(gunicorn_conf()))
    try:
        settings["post_worker_init"](object())
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
