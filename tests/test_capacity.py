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

from app import admission, leases
from app.config import load_config
from app.extensions import redis_store
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
    sem = ProviderSemaphore(redis_store.client, 64, lease=5.0, capacities={provider: 4})
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
    yield provider, ProviderSemaphore(redis_store.client, 64, lease=5.0, capacities={provider: 5})


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
    sem = ProviderSemaphore(redis_store.client, 64, lease=5.0, capacities={provider: 2})
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
    sem = ProviderSemaphore(redis_store.client, 64, lease=5.0, capacities={provider: 2})
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
