"""Lua scripts run by SHA: one run per call whether or not Redis has the script (no test
flushes the server's scripts: other sessions may share it)."""

from __future__ import annotations

import secrets

import redis

from app import leases
from app.redis_scripts import run_script, run_script_calls, script_sha

COUNT = "return redis.call('INCR', KEYS[1])"


def _script() -> str:
    """A script this Redis has never seen (its SHA is new)."""
    return f"-- {secrets.token_hex(8)}\n{COUNT}"


def _stat(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_script_redis_lacks_runs_once_then_by_sha(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    script, key = _script(), f"test:scripts:{secrets.token_hex(4)}"
    assert client.script_exists(script_sha(script)) == [False]
    assert run_script(client, script, 1, key) == 1  # NOSCRIPT (not run), then EVAL
    assert client.script_exists(script_sha(script)) == [True]
    evals = _stat(client, "eval")
    assert run_script(client, script, 1, key) == 2
    assert _stat(client, "eval") == evals  # by SHA now: the text is not sent
    client.delete(key)


def test_on_a_pipeline_a_script_costs_no_script_exists(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    script, key = _script(), f"test:scripts:{secrets.token_hex(4)}"
    checks = _stat(client, "script|exists")
    pipe = client.pipeline(transaction=False)
    run_script(pipe, script, 1, key)
    run_script(pipe, script, 1, key)
    assert pipe.execute() == [1, 2]
    assert _stat(client, "script|exists") == checks
    client.delete(key)


def test_batched_calls_run_each_once_when_the_script_went_missing(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    script = _script()  # never seen: every call answers NOSCRIPT first (a restarted Redis)
    keys = [f"test:scripts:{secrets.token_hex(4)}" for _ in range(3)]
    assert run_script_calls(client, script, [([k], []) for k in keys]) == [1, 1, 1]
    assert run_script_calls(client, script, [([k], []) for k in keys]) == [2, 2, 2]
    client.delete(*keys)


def test_a_once_per_period_gate_lets_one_caller_through_until_it_lapses(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    gate = f"test:gate:{secrets.token_hex(4)}"
    assert leases.first_in(client, gate, 30)
    assert not leases.first_in(client, gate, 30)  # the second caller within the period
    assert 0 < client.ttl(gate) <= 30
    assert leases.first_in(client, f"{gate}:other", 0.2)  # under a second: one second
    assert client.ttl(f"{gate}:other") == 1
    client.delete(gate)
    assert leases.first_in(client, gate, 30)  # lapsed (here: deleted): the next one passes
    client.delete(gate, f"{gate}:other")
