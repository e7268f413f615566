"""The process's append batcher: its own connection, one answer per call, NOSCRIPT, errors."""

from __future__ import annotations

import secrets
import threading

import pytest
import redis

from app.streams.writer import AppendBatcher

COUNT = "return redis.call('INCR', KEYS[1])"


def _script() -> str:
    """A script this Redis has never seen (its SHA is new): its first call answers NOSCRIPT."""
    return f"-- {secrets.token_hex(8)}\n{COUNT}"


def _client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def _stat(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_missing_script_is_loaded_and_each_call_runs_once(redis_url: str) -> None:
    client = _client(redis_url)
    batcher = AppendBatcher(client, _script())
    keys = [f"test:writer:{secrets.token_hex(4)}" for _ in range(3)]
    assert batcher._round_trip([([k], []) for k in keys]) == [1, 1, 1]  # NOSCRIPT, load, run
    assert batcher.append([keys[0]], []) == 2
    assert [client.get(k) for k in keys] == ["2", "1", "1"]
    client.delete(*keys)


def test_appends_go_over_the_batchers_one_connection(redis_url: str) -> None:
    client = _client(redis_url)
    batcher = AppendBatcher(client, _script())
    key = f"test:writer:{secrets.token_hex(4)}"
    batcher.append([key], [])
    conn = batcher._conn
    assert conn is not None
    assert conn not in client.connection_pool._available_connections  # held, not pooled
    evalshas = _stat(client, "evalsha")
    for n in range(2, 6):
        assert batcher.append([key], []) == n
    assert batcher._conn is conn
    assert _stat(client, "evalsha") == evalshas + 4  # by SHA, one command per append
    client.delete(key)


def test_an_error_answer_fails_only_its_own_call(redis_url: str) -> None:
    client = _client(redis_url)
    batcher = AppendBatcher(client, _script())
    good, bad = (f"test:writer:{secrets.token_hex(4)}" for _ in range(2))
    client.set(bad, "not a number")
    answers = batcher._round_trip([([good], []), ([bad], []), ([good], [])])
    assert answers[0] == 1 and answers[2] == 2
    assert isinstance(answers[1], redis.exceptions.ResponseError)
    with pytest.raises(redis.exceptions.ResponseError):
        batcher.append([bad], [])
    assert batcher.append([good], []) == 3  # the connection is still in step
    client.delete(good, bad)


def test_a_dropped_connection_is_made_again(redis_url: str) -> None:
    client = _client(redis_url)
    batcher = AppendBatcher(client, _script())
    key = f"test:writer:{secrets.token_hex(4)}"
    assert batcher.append([key], []) == 1
    batcher._conn.disconnect()  # as a Redis restart or an idle timeout leaves it
    assert batcher.append([key], []) == 2
    client.delete(key)


def test_concurrent_appends_all_get_their_own_answer(redis_url: str) -> None:
    client = _client(redis_url)
    batcher = AppendBatcher(client, _script())
    keys = [f"test:writer:{secrets.token_hex(4)}" for _ in range(8)]
    batcher.append([keys[0]], [])  # the script is loaded
    client.delete(keys[0])
    answers: dict[str, list[int]] = {k: [] for k in keys}

    def job(key: str) -> None:
        for _ in range(20):
            answers[key].append(batcher.append([key], []))

    threads = [threading.Thread(target=job, args=(k,)) for k in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(answers[k] == list(range(1, 21)) for k in keys)
    client.delete(*keys)
