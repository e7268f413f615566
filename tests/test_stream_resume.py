"""Resuming the SSE relay with Last-Event-ID: nothing lost, nothing twice, text intact."""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest
from flask import Flask

from app.extensions import redis_store
from app.services import events
from app.streams.hub import StreamHub, Tail
from app.streams.keys import notify_channel
from tests.fake_upstream import FakeUpstream
from tests.helpers import (
    content_delta,
    counted_xread,
    follow,
    hub_hears,
    leased_log,
    read_sse,
    stream_chat,
    wait_stream,
)

TRICKY = [
    "Hé",
    "llo",
    "\n",
    "",
    " wörld 🌍",
    "\r\n\n",
    "数据流",
    " data: not a field\n\nid: 7\n",
    "x" * 20_000,
    " ",
    "\u2028end\u0000?",
    "!",
]


def test_live_resume_at_every_point(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("resume-live", deltas=TRICKY, tps=60, ttft_ms=20)
    job_id = stream_chat(client, "openai/resume-live")
    seen: list[str] = []
    text = ""
    last: str | None = None
    for attempt in range(200):
        use_query = attempt % 2 == 1
        headers = {"Last-Event-ID": last} if last and not use_query else {}
        params = {"last_event_id": last} if last and use_query else {}
        with client.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers=headers, params=params
        ) as response:
            if response.status_code == 204:
                break
            sse = read_sse(response, max_events=1 + attempt % 3)
        seen.extend(sse.ids)
        text += sse.text
        last = sse.last_id or last
        if sse.done:
            break
    assert text == "".join(TRICKY)
    assert len(seen) == len(set(seen)), "an event arrived twice"
    job = client.get(f"/v1/jobs/{job_id}").json()
    # the row keeps NUL as U+FFFD (PostgreSQL text cannot hold NUL); the stream is exact
    assert job["status"] == "succeeded"
    assert job["output"] == "".join(TRICKY).replace("\x00", "\ufffd")


def test_every_cut_point_of_a_finished_log(client: httpx.Client, upstream: FakeUpstream) -> None:
    deltas = [f"w{i} " for i in range(30)]
    upstream.add_scenario("resume-cuts", deltas=deltas, tps=400)
    job_id = stream_chat(client, "openai/resume-cuts")
    full = follow(client, job_id)
    assert full.done and full.text == "".join(deltas)
    assert full.events[0]["data"]["choices"][0]["delta"]["role"] == "assistant"
    total = len(full.events)
    for cut in range(1, total):
        first = follow(client, job_id, max_events=cut)
        rest = (
            follow(client, job_id, last=first.last_id) if first.last_id else follow(client, job_id)
        )
        ids = first.ids + rest.ids
        assert len(ids) == len(set(ids))
        assert first.text + rest.text == "".join(deltas), f"cut after {cut} events"
        assert rest.status == 204 or rest.done
        if first.last_id:  # a resumed stream never repeats the role
            roles = [
                e["data"]["choices"][0]["delta"].get("role")
                for e in rest.events
                if isinstance(e["data"], dict) and e["data"].get("choices")
            ]
            assert "assistant" not in roles


def test_late_subscriber_gets_everything(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_scenario("late", deltas=TRICKY)
    job_id = stream_chat(client, "openai/late")
    job = wait_stream(client, job_id)
    assert job["status"] == "succeeded"
    late = follow(client, job_id)
    assert late.done and late.text == "".join(TRICKY)
    assert late.retry == 3000
    # the same for the POST's own relay, read from the start by a client that came late
    again = follow(client, job_id)
    assert again.ids == late.ids


def test_resume_after_the_end_and_expired_log(client: httpx.Client, app: Flask) -> None:
    job_id = stream_chat(client, "mock/echo", "a b c")
    full = follow(client, job_id)
    assert full.done
    after_end = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": full.last_id})
    assert after_end.status_code == 204
    bad = client.get(f"/v1/jobs/{job_id}/events", params={"last_event_id": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "last_event_id"
    from app.extensions import redis_store
    from app.streams.keys import log_key

    with app.app_context():
        redis_store.client.delete(log_key(job_id))
    assert client.get(f"/v1/jobs/{job_id}/events").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").json()["output"] == "a b c"


def test_detach_keeps_the_job_running(client: httpx.Client, upstream: FakeUpstream) -> None:
    deltas = [f"{i} " for i in range(20)]
    upstream.add_scenario("detach", deltas=deltas, tps=100)
    body = {
        "model": "openai/detach",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        job_id = response.headers["x-sluice-job-id"]
        part = read_sse(response, max_events=2)
    assert len(part.events) == 2
    job = wait_stream(client, job_id)
    assert job["status"] == "succeeded" and job["output"] == "".join(deltas)
    rest = follow(client, job_id, last=part.last_id)
    assert part.text + rest.text == "".join(deltas)


def _numsub(channel: str) -> int:
    return int(dict(redis_store.client.pubsub_numsub(channel))[channel])


def test_a_hub_hears_the_broadcast_channel_only_while_a_feed_is_open(app_ctx: Flask) -> None:
    """Every job change is broadcast; a web process with no dashboard or batch-progress feed
    open must not be woken by them: its hub subscribes on the first feed and unsubscribes
    after the last one, and an open feed hears every change published after feed()."""
    hub = StreamHub(app_ctx.config["REDIS_URL"])
    channel = hub.broadcast_channel
    try:
        hub.on_revocation(lambda _hash: None)  # starts the hub (its keys channel)
        assert hub.connected.wait(5)
        before = _numsub(channel)
        first, second = hub.feed(), hub.feed()
        assert _numsub(channel) == before + 1
        events.publish("job", {"id": "job_fed"})
        deadline = time.monotonic() + 5
        heard: list[str] = []
        while not heard and time.monotonic() < deadline:
            heard += first.wait(0.2)
        assert [json.loads(m)["data"]["id"] for m in heard] == ["job_fed"]
        hub.unfeed(first)
        assert _numsub(channel) == before + 1  # one feed is still open
        hub.unfeed(second)
        deadline = time.monotonic() + 5
        while _numsub(channel) != before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _numsub(channel) == before
        third = hub.feed()  # subscribed again, and heard again
        events.publish("job", {"id": "job_fed_again"})
        deadline = time.monotonic() + 5
        heard = []
        while not heard and time.monotonic() < deadline:
            heard += third.wait(0.2)
        assert [json.loads(m)["data"]["id"] for m in heard] == ["job_fed_again"]
    finally:
        hub.close()


def test_a_relay_at_the_tail_reads_nothing_and_gets_the_terminal_entry_from_its_notice(
    app_ctx: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay subscribed before the first entry is handed every delta and the terminal
    entry (fields and all) by the notices: not one XREAD. A relay that starts behind reads."""
    hub = StreamHub(app_ctx.config["REDIS_URL"])
    reads = counted_xread(hub, monkeypatch)
    job = f"job_tail_{secrets.token_hex(4)}"
    try:
        tail = Tail(hub, job, lease_seconds=60, ping_seconds=5)
        assert hub_hears(tail)
        dlog = leased_log(job)
        dlog.append(content_delta("un "))
        dlog.append(content_delta("deux"))
        dlog.finish("length", {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
        entries = [item for item in tail.follow() if item is not None]
        assert [fields.get("d") for _, fields in entries] == ["un ", "deux", None]
        assert entries[-1][1] == {
            "t": "done",
            "finish_reason": "length",
            "usage": json.dumps({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
        }
        assert entries[-1][0] == dlog.client.xrevrange(dlog.key, count=1)[0][0]
        assert reads == []
        late = [item for item in Tail(hub, job, lease_seconds=60).follow() if item is not None]
        assert late == entries and len(reads) == 1  # behind: it reads the log
    finally:
        hub.close()


def test_an_ended_relays_channel_is_dropped_with_the_next_subscribe_and_reused_until_then(
    app_ctx: Flask,
) -> None:
    """The UNSUBSCRIBE of a job whose last relay ended goes out with the next SUBSCRIBE (one
    write, one wake-up); a relay of that job opened meanwhile is armed at once and hears it."""
    hub = StreamHub(app_ctx.config["REDIS_URL"])
    first, second = (f"job_stale_{secrets.token_hex(4)}" for _ in range(2))
    try:
        tail = Tail(hub, first, lease_seconds=60, ping_seconds=5)
        assert hub_hears(tail)
        tail.close()
        assert _numsub(notify_channel(first)) == 1  # still heard: nothing was sent
        again = Tail(hub, first, lease_seconds=60, ping_seconds=5)
        assert hub_hears(again)
        assert again._sub is not None and again._sub.armed.is_set()
        dlog = leased_log(first)
        dlog.append(content_delta("still heard"))
        dlog.finish("stop", None)
        texts = [item[1].get("d") for item in again.follow() if item is not None]
        assert texts == ["still heard", None]  # follow() closed it: stale again
        assert hub_hears(Tail(hub, second, lease_seconds=60, ping_seconds=5))
        assert _numsub(notify_channel(first)) == 0
        assert _numsub(notify_channel(second)) == 1
    finally:
        hub.close()
