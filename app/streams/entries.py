"""The delta log's entry format: the one module that writes and reads an entry.

A log entry is a Redis Stream entry with a kind field `t`:

- `delta`: `d` is the text of one coalesced content delta;
- `done` (terminal): `finish_reason`, and `usage` as JSON;
- `error` (terminal): `error`, an OpenAI-style error object as JSON.

The worker appends deltas with APPEND_SCRIPT, which also publishes a notice on
NOTIFY_CHANNEL: `job\\nprev\\nid\\ntext` hands the entry itself to relays that hold `prev`;
a bare `job` notice (terminal entries, repairs) only says "read the log".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Entry = tuple[str, dict[str, str]]
TERMINAL_KINDS = ("done", "error")

# KEYS: log, cancel flag. ARGV: job id, previous entry id, text, expiry (0: leave), channel.
# Adds the delta, publishes the notice (so relays that hold `prev` need no read) and
# answers {new id, cancel requested}.
APPEND_SCRIPT = """
local id = redis.call('XADD', KEYS[1], '*', 't', 'delta', 'd', ARGV[3])
if ARGV[4] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
redis.call('PUBLISH', ARGV[5], ARGV[1] .. '\\n' .. ARGV[2] .. '\\n' .. id .. '\\n' .. ARGV[3])
return {id, redis.call('EXISTS', KEYS[2])}
"""


def delta_fields(text: str) -> dict[str, str]:
    return {"t": "delta", "d": text}


def done_fields(finish_reason: str | None, usage: dict[str, Any] | None) -> dict[str, str]:
    return {"t": "done", "finish_reason": finish_reason or "stop", "usage": json.dumps(usage or {})}


def error_fields(error: dict[str, Any]) -> dict[str, str]:
    return {"t": "error", "error": json.dumps(error)}


def is_terminal(fields: dict[str, str]) -> bool:
    return fields.get("t") in TERMINAL_KINDS


def delta_text(fields: dict[str, str]) -> str | None:
    """The text of a delta entry; None for any other kind."""
    return fields.get("d", "") if fields.get("t") == "delta" else None


def usage_of(fields: dict[str, str]) -> dict[str, Any] | None:
    return json.loads(fields.get("usage") or "{}") or None


def error_of(fields: dict[str, str]) -> dict[str, Any]:
    return json.loads(fields.get("error") or "{}")


def parse_notice(data: str) -> tuple[str, str | None, Entry | None]:
    """A notice as (job id, previous entry id, the new entry); a bare one has no entry."""
    job_id, sep, rest = data.partition("\n")
    if not sep:
        return job_id, None, None
    prev, _, rest = rest.partition("\n")
    entry_id, _, text = rest.partition("\n")
    return job_id, prev, (entry_id, delta_fields(text))


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Generation:
    """A job's generation as read from its log: text so far and, once ended, how it ended."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    ended: bool = False

    def add(self, fields: dict[str, str]) -> None:
        kind = fields.get("t")
        if kind == "delta":
            self.parts.append(fields.get("d", ""))
        elif kind == "done":
            self.finish_reason = fields.get("finish_reason")
            self.usage = usage_of(fields)
            self.ended = True
        elif kind == "error":
            self.error = error_of(fields)
            self.ended = True

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Generation:
        generation = cls()
        for _, fields in entries:
            generation.add(fields)
        return generation


def text_of(entries: Iterable[Entry]) -> str:
    """The text of every delta entry, joined."""
    return Generation.of(entries).text
