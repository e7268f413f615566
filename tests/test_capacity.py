"""One provider capacity shared by both channels, streams first: the rules, the Lua, admission.

Threads stand in for a batch worker's greenlets; stream jobs are members of the provider's
stream lease set, as admission puts them there.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app import admission, leases, windows
from app.config import load_config
from app.extensions import redis_store
from app.providers.base import ChatRequest, ProviderError
from app.providers.registry import EXTENSION, build_registry
from app.services import capacity
from app.services.batch_semaphore import ProviderSemaphore
from tests.helpers import app_client, tuned

# ------------------------------------------------------------------ the rules (pure)


@pytest.mark.parametrize(
    ("limit", "cap", "streams", "batch", "room"),
    [
        (64, 0, 5, 10, 54),  # no capacity: only the batch limit
        (64, 8, 0, 0, 8),  # the capacity caps batch below its limit
        (64, 8, 3, 2, 3),  # batch takes only what streams leave
        (64, 8, 3, 5, 0),  # ... and none beyond
        (64, 8, 8, 0, 0),  # streams fill it: batch waits
        (4, 8, 1, 2, 2),  # the batch limit still holds
        (64, 8, 6, 5, 0),  # batch over its share (displaced): no new calls
    ],
)
def test_batch_room(limit: int, cap: int, streams: int, batch: int, room: int) -> None:
    assert capacity.batch_room(limit, cap, streams, batch) == room


def test_a_stream_is_refused_only_when_streams_alone_fill_the_capacity() -> None:
    assert capacity.stream_admits(8, 7)
    assert not capacity.stream_admits(8, 8)
    assert capacity.stream_admits(0, 10_000)  # no capacity
    # the batch load a stream finds is displaced, never a reason to refuse it
    assert capacity.displaced(8, 3, 8) == 3
    assert capacity.displaced(8, 3, 5) == 0
    assert capacity.displaced(0, 3, 50) == 0


def test_split_of_one_provider() -> None:
    split = capacity.split("p", 8, 64, 3, 7)
    assert split.as_dict() == {
        "provider": "p",
        "capacity": 8,
        "stream": 3,
        "batch": 7,
        "batch_share": 5,
        "displaced": 2,
        "free": 0,
        "requests_per_minute": None,
        "tokens_per_minute": None,
        "window_resets_in": None,
        "batch_paused_for": 0.0,
    }
    assert capacity.split("q", 0, 64, 1, 2).capacity is None


@pytest.mark.parametrize("bad", [0, -1, "4", 2.5, True])
def test_a_bad_capacity_stops_the_start_naming_it(bad: Any) -> None:
    config = {"PROVIDERS": {"local": {"base_url": "http://x/v1", "capacity": bad}}}
    with pytest.raises(ValueError, match=r"providers\.local\.capacity"):
        build_registry(config)
    with pytest.raises(ValueError, match=r"providers\.openai\.capacity"):
        build_registry({"PROVIDERS": {"openai": {"capacity": bad}}})


def test_capacity_is_read_from_the_provider_tables() -> None:
    config = {"PROVIDERS": {"local": {"capacity": 6}, "openai": {"models": ["m"]}}}
    build_registry(config | {"PROVIDERS": {"local": {"base_url": "u", "capacity": 6}}})
    assert capacity.of(config, "local") == 6
    assert capacity.of(config, "openai") == 0
    assert capacity.of(config, "nowhere") == 0
    assert capacity.capacities(config) == {"local": 6}
    assert capacity.provider_of("local/llama3/8b") == "local"


# ------------------------------------------------------------------ against Redis


def _provider() -> str:
    return f"cap-{secrets.token_hex(4)}"


def _streams(provider: str, count: int, seconds: float = 10.0) -> list[str]:
    """`count` stream jobs holding the provider's capacity, as admission records them."""
    jobs = [f"job_{secrets.token_hex(6)}" for _ in range(count)]
    for job in jobs:
        full, _ = leases.acquire(
            redis_store.client, [capacity.stream_key(provider)], job, leases.ms(seconds)
        )
        assert full == 0
    return jobs


def _end_streams(provider: str, jobs: list[str]) -> None:
    leases.release(redis_store.client, capacity.stream_key(provider), *jobs)


def test_batch_takes_from_redis_only_what_streams_leave(app_ctx: Flask) -> None:
    provider = _provider()
    sem = ProviderSemaphore(redis_store.client, 64, lease=5.0, quotas={provider: capacity.Quota(4)})
    jobs = _streams(provider, 3)
    first = sem.try_acquire(provider)
    assert first is not None and sem.try_acquire(provider) is None  # 3 streams + 1 batch = 4
    _end_streams(provider, jobs)
    more = [sem.try_acquire(provider) for _ in range(3)]
    assert all(more) and sem.try_acquire(provider) is None  # 4 batch, no streams
    sem.release(first, *[t for t in more if t])
    # another provider (no capacity) keeps only the batch limit
    other = _provider()
    free = [t for _ in range(10) if (t := sem.try_acquire(other))]
    assert len(free) == 10
    sem.release(*free)


class _Load:
    """Threads calling through the semaphore back to back; samples of the calls in flight."""

    def __init__(self, sem: ProviderSemaphore, provider: str, threads: int, hold: float) -> None:
        self.sem, self.provider, self.hold = sem, provider, hold
        self.inside = 0
        self.calls = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.sem.slot(self.provider):
                with self.lock:
                    self.inside += 1
                    self.calls += 1
                time.sleep(self.hold)
                with self.lock:
                    self.inside -= 1

    def peak(self, seconds: float) -> int:
        """The most calls in flight seen over the next `seconds`."""
        deadline = time.monotonic() + seconds
        peak = 0
        while time.monotonic() < deadline:
            peak = max(peak, self.inside)
            time.sleep(0.002)
        return peak

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def shared() -> Iterator[tuple[str, ProviderSemaphore]]:
    provider = _provider()
    yield (
        provider,
        ProviderSemaphore(redis_store.client, 64, lease=5.0, quotas={provider: capacity.Quota(5)}),
    )


def test_batch_backs_off_within_a_second_of_streams_and_resumes(
    app_ctx: Flask, shared: tuple[str, ProviderSemaphore]
) -> None:
    provider, sem = shared
    with _Load(sem, provider, threads=12, hold=0.02) as load:
        assert load.peak(0.6) == 5  # batch alone uses the whole capacity
        jobs = _streams(provider, 3)
        time.sleep(capacity.YIELD_SECONDS + 0.3)  # a call's hold, then Redis said no
        assert load.peak(1.0) <= 2  # capacity 5 - 3 streams
        _end_streams(provider, jobs)
        time.sleep(0.3)
        assert load.peak(0.6) == 5  # resumed
        streams_fill = _streams(provider, 5)
        time.sleep(capacity.YIELD_SECONDS + 0.3)
        calls = load.calls
        assert load.peak(0.5) == 0 and load.calls == calls  # streams fill it: batch waits
        _end_streams(provider, streams_fill)
        time.sleep(0.3)
        assert load.calls > calls
    assert sem.in_use(provider) == 0


# ------------------------------------------------------------------ admission


@pytest.fixture
def capped(app: Flask) -> Iterator[tuple[Flask, str]]:
    """The in-process app with a provider whose capacity is 2."""
    provider = _provider()
    providers = dict(app.config["PROVIDERS"]) | {provider: {"kind": "mock", "capacity": 2}}
    saved = app.extensions[EXTENSION]
    with app.app_context(), tuned(app, PROVIDERS=providers):
        app.extensions[EXTENSION] = build_registry(app.config)
        try:
            yield app, provider
        finally:
            app.extensions[EXTENSION] = saved


def test_streams_take_capacity_batch_holds_and_are_refused_when_streams_fill_it(
    capped: tuple[Flask, str],
) -> None:
    _, provider = capped
    limits = admission.Limits(0, 0)
    tenant = f"t-{secrets.token_hex(3)}"
    sem = ProviderSemaphore(redis_store.client, 64, lease=5.0, quotas={provider: capacity.Quota(2)})
    batch = [sem.try_acquire(provider), sem.try_acquire(provider)]
    assert all(batch)  # batch holds the whole capacity ...
    first, second, third = (f"job_{secrets.token_hex(6)}" for _ in range(3))
    assert admission.try_acquire(tenant, first, limits, provider) == 1  # ... streams displace it
    assert admission.try_acquire(tenant, second, limits, provider) == 1
    assert admission.try_acquire(tenant, third, limits, provider) == -2  # streams fill it
    assert admission.try_acquire(tenant, third, limits, "mock") == 1  # other providers: free
    admission.release_stream_slot(first)  # the record names the provider's set too
    assert admission.try_acquire(tenant, f"job_{secrets.token_hex(6)}", limits, provider) == 1
    assert leases.live_count(redis_store.client, capacity.stream_key(provider)) == 2
    for job in (second, third):
        admission.release_stream_slot(job)
    sem.release(*[t for t in batch if t])


def test_admission_refusal_names_the_provider_and_its_capacity(
    capped: tuple[Flask, str], admin_key: str
) -> None:
    app, provider = capped
    held = _streams(provider, 2)
    http = app_client(app, admin_key)
    body = {"model": f"{provider}/x", "messages": [{"role": "user", "content": "hi"}]}
    answer = http.post("/v1/chat/completions", json=body | {"stream": True})
    assert answer.status_code == 429, answer.get_data(as_text=True)
    error = answer.get_json()["error"]
    assert error["code"] == "stream_capacity_exceeded"
    assert error["scope"] == "provider" and error["capacity"] == 2
    assert provider in error["message"]
    _end_streams(provider, held)


def test_stats_and_metrics_show_the_split_by_mode(
    capped: tuple[Flask, str], admin_key: str
) -> None:
    app, provider = capped
    jobs = _streams(provider, 1)
    sem = ProviderSemaphore(redis_store.client, 64, lease=5.0, quotas={provider: capacity.Quota(2)})
    token = sem.try_acquire(provider)
    http = app_client(app, admin_key)
    stats = http.get("/v1/admin/stats").get_json()
    (split,) = [s for s in stats["provider_capacity"] if s["provider"] == provider]
    assert split == {
        "provider": provider,
        "capacity": 2,
        "stream": 1,
        "batch": 1,
        "batch_share": 1,
        "displaced": 0,
        "free": 0,
        "requests_per_minute": None,
        "tokens_per_minute": None,
        "window_resets_in": None,
        "batch_paused_for": 0.0,
    }
    text = http.get("/metrics").get_data(as_text=True)
    assert f'sluice_provider_capacity{{provider="{provider}"}} 2.0' in text
    assert f'sluice_provider_calls_in_flight{{mode="stream",provider="{provider}"}} 1.0' in text
    assert f'sluice_provider_calls_in_flight{{mode="batch",provider="{provider}"}} 1.0' in text
    assert token is not None
    sem.release(token)
    _end_streams(provider, jobs)


def test_the_readme_example_loads(tmp_path: Any) -> None:
    """The README's worked sluice.toml is a valid configuration with the capacities it says."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Shared provider capacity", 1)[1]
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "sluice.toml"
    path.write_text(toml)
    config = load_config({"SLUICE_CONFIG": str(path), "SLUICE_HOME": str(tmp_path)})
    build_registry(config)
    assert capacity.capacities(config) == {"local": 32, "openai": 500}
    assert capacity.batch_share(config["PROVIDER_CONCURRENCY"], 32, 20) == 12
    assert capacity.quota(config, "openai") == capacity.Quota(500, 5000, 800_000)
    assert capacity.batch_window_room(5000, 0, 300, 1000, 0) == 4000


# ------------------------------------------------------------------ per minute: the rules


@pytest.mark.parametrize(
    ("limit", "used", "cost", "fits"),
    [
        (0, 10**9, 10**9, True),  # no limit
        (100, 60, 40, True),
        (100, 60, 41, False),
        (100, 0, 500, True),  # bigger than the whole limit: fits an empty window only
        (100, 1, 500, False),
    ],
)
def test_a_stream_fits_the_window_on_streams_alone(
    limit: int, used: int, cost: int, fits: bool
) -> None:
    assert capacity.stream_fits(limit, used, cost) is fits


@pytest.mark.parametrize(
    ("limit", "batch", "streams", "before", "cost", "room"),
    [
        (0, 50, 50, 50, 10, None),  # no limit
        (100, 0, 0, 0, 10, 10),
        (100, 30, 20, 0, 10, 5),  # what streams and batch used this window
        (100, 30, 20, 40, 10, 3),  # ... and the streams' reserve: their last window's use
        (100, 30, 50, 40, 10, 2),  # streams past last window's use: this window's counts
        (100, 0, 95, 0, 10, 0),  # streams used it: batch waits
        (100, 0, 0, 0, 500, 1),  # bigger than the limit: alone in an empty window
        (100, 1, 0, 0, 500, 0),
    ],
)
def test_batch_takes_what_the_window_leaves_after_the_streams_reserve(
    limit: int, batch: int, streams: int, before: int, cost: int, room: int | None
) -> None:
    assert capacity.batch_window_room(limit, batch, streams, before, cost) == room


def test_a_calls_tokens_are_estimated_from_its_input_and_output_limit() -> None:
    messages = [{"role": "user", "content": "x" * 400}]  # 100 tokens + 4 per message
    assert capacity.estimate(ChatRequest("p/m", messages, max_tokens=50)) == 154
    assert capacity.estimate(ChatRequest("p/m", messages, max_completion_tokens=7)) == 111
    default = capacity.DEFAULT_OUTPUT_TOKENS
    assert capacity.estimate(ChatRequest("p/m", messages)) == 104 + default
    assert capacity.estimate(ChatRequest("p/m", messages, max_tokens=10, n=3)) == 134


@pytest.mark.parametrize("key", ["requests_per_minute", "tokens_per_minute"])
@pytest.mark.parametrize("bad", [-1, "4", 2.5, True])
def test_a_bad_per_minute_limit_stops_the_start_naming_it(key: str, bad: Any) -> None:
    config = {"PROVIDERS": {"local": {"base_url": "http://x/v1", key: bad}}}
    with pytest.raises(ValueError, match=rf"providers\.local\.{key}"):
        build_registry(config)
    with pytest.raises(ValueError, match=rf"providers\.anthropic\.{key}"):
        build_registry({"PROVIDERS": {"anthropic": {key: bad}}})


def test_per_minute_limits_are_read_from_the_provider_tables() -> None:
    tables = {
        "local": {"base_url": "u", "capacity": 4, "requests_per_minute": 600},
        "openai": {"tokens_per_minute": 90_000, "requests_per_minute": 0},
        "anthropic": {"models": ["m"]},
    }
    build_registry({"PROVIDERS": tables})
    config = {"PROVIDERS": tables}
    assert capacity.quota(config, "local") == capacity.Quota(4, 600, 0)
    assert capacity.quota(config, "openai") == capacity.Quota(0, 0, 90_000)
    assert capacity.quotas(config) == {
        "local": capacity.Quota(4, 600, 0),
        "openai": capacity.Quota(0, 0, 90_000),
    }
    assert capacity.capacities(config) == {"local": 4}
    assert not capacity.quota(config, "anthropic") and not capacity.quota(config, "nowhere")


def test_window_counts_roll_over_by_the_minute() -> None:
    now = 1_000 * windows.WINDOW_MS + 5
    stored = [b"1000", b"3", b"300", b"7", b"700", b"1", b"100"]
    assert windows.counts(stored, now) == dict(
        zip(windows.FIELDS[1:], [3, 300, 7, 700, 1, 100], strict=True)
    )
    later = windows.counts(stored, now + windows.WINDOW_MS)  # the streams' use is the reserve
    assert later == {"sr": 0, "st": 0, "br": 0, "bt": 0, "psr": 3, "pst": 300}
    assert windows.counts(stored, now + 2 * windows.WINDOW_MS) == dict.fromkeys(later, 0)
    assert windows.counts([None] * 7, now) == dict.fromkeys(later, 0)
    assert windows.left_ms(now) == windows.WINDOW_MS - 5


# ------------------------------------------------------------------ per minute: against Redis


def room_in_window(seconds: float) -> None:
    """Wait, if need be, for a window with `seconds` left (windows are fixed minutes)."""
    left = windows.left_ms(int(time.time() * 1000)) / 1000
    if left < seconds:
        time.sleep(left + 0.1)


def window(provider: str) -> dict[str, int]:
    client = redis_store.client
    values = client.hmget(capacity.window_key(provider), list(windows.FIELDS))
    return windows.counts(values, leases.now_ms(client))


@pytest.fixture
def metered(app: Flask) -> Iterator[tuple[Flask, str]]:
    """The in-process app with a provider of 3 requests and 1,000 tokens a minute."""
    provider = _provider()
    table = {"kind": "mock", "requests_per_minute": 3, "tokens_per_minute": 1000}
    providers = dict(app.config["PROVIDERS"]) | {provider: table}
    saved = app.extensions[EXTENSION]
    with app.app_context(), tuned(app, PROVIDERS=providers):
        app.extensions[EXTENSION] = build_registry(app.config)
        try:
            room_in_window(5)
            yield app, provider
        finally:
            app.extensions[EXTENSION] = saved


def test_streams_count_in_the_window_and_are_refused_only_when_streams_used_it(
    metered: tuple[Flask, str],
) -> None:
    app, provider = metered
    limits = admission.Limits(0, 0)
    tenant = f"t-{secrets.token_hex(3)}"
    sem = ProviderSemaphore(redis_store.client, 64, 5.0, capacity.quotas(app.config))
    batch = [sem.try_acquire(provider, tokens=200) for _ in range(3)]
    assert all(batch) and sem.try_acquire(provider, tokens=200) is None  # batch used 3 requests
    jobs = [f"job_{secrets.token_hex(6)}" for _ in range(4)]
    assert admission.try_acquire(tenant, jobs[0], limits, provider, 600) == 1  # batch displaced
    assert admission.try_acquire(tenant, jobs[0], limits, provider, 600) == 1  # counted once
    assert admission.try_acquire(tenant, jobs[1], limits, provider, 401) == -4  # tokens: 1,001
    assert admission.try_acquire(tenant, jobs[1], limits, provider, 400) == 1
    assert admission.try_acquire(tenant, jobs[2], limits, provider, 0) == 1
    assert admission.try_acquire(tenant, jobs[3], limits, provider, 0) == -3  # 4th request
    assert window(provider) | {"psr": 0, "pst": 0} == {
        "sr": 3, "st": 1000, "br": 3, "bt": 600, "psr": 0, "pst": 0
    }  # fmt: skip
    # the worker's correction to the usage, on its release pipeline: frees the window
    pipe = redis_store.client.pipeline(transaction=False)
    admission.settle_stream_tokens(jobs[0], provider, {"total_tokens": 100}, pipe)
    admission.settle_stream_tokens(jobs[0], provider, {"total_tokens": 100}, pipe)  # once
    admission.release_stream_slot(jobs[0], pipe)
    pipe.execute()
    assert window(provider)["st"] == 500
    assert leases.live_count(redis_store.client, capacity.stream_key(provider)) == 2
    for job in jobs[1:3]:
        admission.release_stream_slot(job)
    sem.release(*[t for t in batch if t])


def test_calls_waiting_together_are_each_charged_their_own_estimate(
    metered: tuple[Flask, str],
) -> None:
    """Two calls wait for a slot at once; once slots free up, each is counted in the
    window with its own estimate, not the asker's estimate for both."""
    app, provider = metered
    quotas = capacity.quotas(app.config)
    other = ProviderSemaphore(redis_store.client, 2, 5.0, quotas)  # another worker
    sem = ProviderSemaphore(redis_store.client, 2, 5.0, quotas)
    held = [other.try_acquire(provider) for _ in range(2)]
    assert all(held)
    inside, leave = threading.Barrier(3, timeout=10), threading.Barrier(3, timeout=10)

    def call(estimate: int) -> None:
        with sem.slot(provider, lambda: estimate):
            inside.wait()
            leave.wait()

    threads = [threading.Thread(target=call, args=(n,)) for n in (100, 300)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # both wait: the other worker holds every slot
    other.release(*[t for t in held if t], refund=True)
    inside.wait()
    assert window(provider)["bt"] == 400  # 100 + 300 (the asker's estimate twice: 200 or 600)
    leave.wait()
    for thread in threads:
        thread.join(10)


def test_batch_calls_are_counted_corrected_and_wait_for_the_window(
    metered: tuple[Flask, str],
) -> None:
    app, provider = metered
    sem = ProviderSemaphore(redis_store.client, 64, 5.0, capacity.quotas(app.config))
    # last window's streams used 1 request and 400 tokens: batch keeps that for them
    client = redis_store.client
    last = leases.now_ms(client) // windows.WINDOW_MS - 1
    client.hset(capacity.window_key(provider), mapping={"w": last, "sr": 1, "st": 400})
    taken = leases.acquire_some(
        client,
        capacity.batch_key(provider),
        ["a", "b", "c"],
        5_000,
        64,
        meter=capacity.quota(app.config, provider).meter(provider, 250),
        pause=capacity.pause_key(provider),
    )
    assert taken.members == ["a", "b"]  # 1,000 - 400 reserved = 600: two calls of 250
    assert window(provider) == {"sr": 0, "st": 0, "br": 2, "bt": 500, "psr": 1, "pst": 400}
    again = leases.acquire_some(
        client,
        capacity.batch_key(provider),
        ["d"],
        5_000,
        64,
        meter=capacity.quota(app.config, provider).meter(provider, 250),
        pause=capacity.pause_key(provider),
    )
    assert again.members == [] and 0 < again.wait_ms <= windows.WINDOW_MS  # until the next one
    leases.release(client, capacity.batch_key(provider), "a", "b")
    # through the semaphore: a call's count is corrected to its usage when it gives back
    client.delete(capacity.window_key(provider))
    with sem.slot(provider, lambda: 300) as call:
        assert window(provider)["bt"] == 300
        call.tokens = 120
    assert window(provider) | {"psr": 0, "pst": 0} == {
        "sr": 0, "st": 0, "br": 1, "bt": 120, "psr": 0, "pst": 0
    }  # fmt: skip
    # slots taken for waiters that never ran a call are refunded
    token = sem.try_acquire(provider, tokens=100)
    assert token is not None and window(provider)["br"] == 2
    sem._release_quietly([token])
    assert window(provider)["br"] == 1 and window(provider)["bt"] == 120
    # a full window holds calls back until it has room: here a correction frees it
    held = sem.try_acquire(provider, tokens=880)
    done: list[float] = []

    def call() -> None:
        with sem.slot(provider, lambda: 50):
            done.append(time.monotonic())

    waiting = threading.Thread(target=call)
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive() and not done  # 1,000 tokens counted: the call waits
    freed = time.monotonic()
    now_window = leases.now_ms(client) // windows.WINDOW_MS
    windows.release(client, "none", capacity.window_key(provider), now_window, 0, -800)
    waiting.join(3)
    assert done and done[0] - freed < 1.5  # resumed within MAX_WAIT of the room
    assert held is not None
    sem.release(held)
    assert sem.in_use(provider) == 0


def test_an_upstream_429_pauses_the_providers_batch_calls_in_every_process(
    app_ctx: Flask,
) -> None:
    provider = _provider()
    one = ProviderSemaphore(redis_store.client, 64, lease=5.0)
    other = ProviderSemaphore(redis_store.client, 64, lease=5.0)  # another worker
    limited = ProviderError("slow down", retryable=True, status_code=429, retry_after=1.0)
    with pytest.raises(ProviderError), one.slot(provider):
        raise limited
    paused = time.monotonic()
    assert one.try_acquire(provider) is None and other.try_acquire(provider) is None
    (split,) = capacity.snapshot(redis_store.client, {}, [provider])
    assert 0.5 < split.batch_paused_for <= 1.0
    with other.slot(provider):  # waits out the pause, then runs
        assert time.monotonic() - paused >= 0.9
    # other failures (and a 429 without Retry-After) pause nothing
    for status in (500, 429):
        error = ProviderError("x", retryable=True, status_code=status)
        with pytest.raises(ProviderError), one.slot(provider):
            raise error
        token = other.try_acquire(provider)
        assert token is not None
        other.release(token)
    assert one.in_use(provider) == 0


def test_a_stream_refused_by_the_window_names_the_limit_and_when_to_retry(
    metered: tuple[Flask, str], admin_key: str
) -> None:
    app, provider = metered
    job = f"job_{secrets.token_hex(6)}"
    assert admission.try_acquire("t", job, admission.Limits(0, 0), provider, 995) == 1
    http = app_client(app, admin_key)
    body = {"model": f"{provider}/x", "messages": [{"role": "user", "content": "hi"}]}
    # "hi" is about 5 tokens, with max_tokens 5 about 10: 1,005 of 1,000
    refused = http.post("/v1/chat/completions", json=body | {"stream": True, "max_tokens": 5})
    assert refused.status_code == 429, refused.get_data(as_text=True)
    error = refused.get_json()["error"]
    assert error["scope"] == "provider" and error["limit"] == "tokens_per_minute"
    assert error["tokens_per_minute"] == 1000 and provider in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    admission.release_stream_slot(job)


def test_stats_and_metrics_show_the_window_by_mode(
    metered: tuple[Flask, str], admin_key: str
) -> None:
    app, provider = metered
    sem = ProviderSemaphore(redis_store.client, 64, 5.0, capacity.quotas(app.config))
    token = sem.try_acquire(provider, tokens=300)
    job = f"job_{secrets.token_hex(6)}"
    assert admission.try_acquire("t", job, admission.Limits(0, 0), provider, 200) == 1
    http = app_client(app, admin_key)
    stats = http.get("/v1/admin/stats").get_json()
    (split,) = [s for s in stats["provider_capacity"] if s["provider"] == provider]
    assert split["requests_per_minute"] == {
        "limit": 3, "stream": 1, "batch": 1, "reserve": 0, "free": 1
    }  # fmt: skip
    assert split["tokens_per_minute"] == {
        "limit": 1000, "stream": 200, "batch": 300, "reserve": 0, "free": 500
    }  # fmt: skip
    assert 0 < split["window_resets_in"] <= 60
    text = http.get("/metrics").get_data(as_text=True)
    for line in (
        f'sluice_provider_window_requests{{mode="stream",provider="{provider}"}} 1.0',
        f'sluice_provider_window_requests{{mode="batch",provider="{provider}"}} 1.0',
        f'sluice_provider_window_tokens{{mode="stream",provider="{provider}"}} 200.0',
        f'sluice_provider_window_tokens{{mode="batch",provider="{provider}"}} 300.0',
        f'sluice_provider_requests_per_minute{{provider="{provider}"}} 3.0',
        f'sluice_provider_tokens_per_minute{{provider="{provider}"}} 1000.0',
    ):
        assert line in text, line
    admission.release_stream_slot(job)
    assert token is not None
    sem.release(token)
