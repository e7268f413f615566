"""Lua scripts run by their SHA (EVALSHA): the script's text is not sent on every call."""

from __future__ import annotations

import hashlib
from typing import Any

import redis

_SHAS: dict[str, str] = {}


def script_sha(script: str) -> str:
    """The SHA1 Redis names a script by."""
    sha = _SHAS.get(script)
    if sha is None:
        sha = _SHAS[script] = hashlib.sha1(script.encode()).hexdigest()
    return sha


def run_script(client: redis.Redis, script: str, numkeys: int, *args: Any) -> Any:
    """Run a Lua script by its SHA; its answer.

    A Redis that does not have it (restarted, flushed) answers NOSCRIPT without running it,
    and EVAL then runs and caches it. On a pipeline the call is queued as EVAL: a NOSCRIPT
    there would surface only at execute().
    """
    if isinstance(client, redis.client.Pipeline):
        return client.eval(script, numkeys, *args)
    try:
        return client.evalsha(script_sha(script), numkeys, *args)
    except redis.exceptions.NoScriptError:
        return client.eval(script, numkeys, *args)


def run_script_calls(
    client: redis.Redis,
    script: str,
    calls: list[tuple[list[str], list[Any]]],
    connection: Any = None,
) -> list[Any]:
    """Run one Lua script for each (keys, args) in one round trip; an answer per call.

    EVALSHA straight, without redis-py's pipeline script check (a SCRIPT EXISTS round trip
    per pipeline); calls that find the script missing (a restarted Redis) are loaded and
    run again: a NOSCRIPT call did not run, so nothing runs twice. With a `connection` the
    caller holds (nothing else in flight on it), the calls are written and read straight
    on it, without the client's per-command path; connection errors are retried as the
    client retries them.
    """
    if connection is None and len(calls) == 1:
        keys, args = calls[0]
        return [run_script(client, script, len(keys), *keys, *args)]
    sha = script_sha(script)
    if connection is None:
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        answers = list(pipe.execute(raise_on_error=False))
    else:
        commands = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        answers = connection.retry.call_with_retry(
            lambda: _send_and_read(connection, commands), lambda _error: connection.disconnect()
        )
    missing = [i for i, a in enumerate(answers) if isinstance(a, redis.exceptions.NoScriptError)]
    if missing:
        client.script_load(script)
        again = run_script_calls(client, script, [calls[i] for i in missing], connection)
        for i, answer in zip(missing, again, strict=True):
            answers[i] = answer
    return answers


def _send_and_read(connection: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Write the commands in one packet and read a reply (or its error) for each."""
    connection.send_packed_command(connection.pack_commands(commands))
    answers: list[Any] = []
    for _ in commands:
        try:
            answers.append(connection.read_response())
        except redis.exceptions.ResponseError as exc:
            answers.append(exc)
    return answers
