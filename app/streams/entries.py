"""The delta log's entry format: the one module that writes and reads an entry.

A log entry is a Redis Stream entry with a kind field `t`:

- `delta`: either `d`, the text of choice 0's content (the common case, kept lean), or
  `c`, a JSON list of choice deltas in OpenAI's own terms (`{"index", "delta":
  {content, tool_calls, refusal, reasoning_content}, "logprobs"}`), coalesced by `coalesce`;
- `done` (terminal): `finish_reason` (choice 0's), `usage` as JSON, and `finishes` (JSON
  `{index: reason}`) when there is more than one choice;
- `error` (terminal): `error`, an OpenAI-style error object as JSON.

The worker appends deltas with APPEND_SCRIPT, which also publishes a notice on the job's
own channel (keys.notify_channel): `job\\nprev\\nid\\n<field><value>` hands the entry itself
to relays that hold `prev`; TERMINAL_SCRIPT's is `job\\nprev\\nid\\n*<JSON list of the
entry's field/value pairs>`; a bare `job` notice only says "read the log".
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.providers.base import more_than_text

Entry = tuple[str, dict[str, str]]
ChoiceDelta = dict[str, Any]
TERMINAL_KINDS = ("done", "error")
CANCELLED_CODE = "job_cancelled"  # the error code of a cancelled job's terminal entry
_TEXT_KEYS = ("content", "refusal", "reasoning_content")

# The lease rule, as each writing script applies it: the caller may write if it holds the
# job's lease (its token is the lease's value), or if nobody does and the log has not
# ended (a worker whose lease merely lapsed takes it again; an empty token, a repair or a
# cancel, needs no lease). A holder that was declared lost (its log ended) is refused.
# An entry's first field is `t`, so `last[2][2]` is the newest entry's kind.
_HOLDS = """
local function ended(log)
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
  return last ~= nil and (last[2][2] == 'done' or last[2][2] == 'error')
end
local function holds(log, lease, token, ms)
  local holder = redis.call('GET', lease)
  if holder then return holder == token end
  if ended(log) then return false end
  if token ~= '' then redis.call('SET', lease, token, 'PX', ms) end
  return true
end
"""

# KEYS: log, cancel flag, lease. ARGV: job id, previous entry id, value, expiry (0: leave),
# channel, field (`d` or `c`), lease token, lease ms. Adds the delta, publishes the notice
# (so relays that hold `prev` need no read) and answers {new id, cancel requested}, or
# {"", 0} when the caller no longer holds the job.
APPEND_SCRIPT = (
    _HOLDS
    + """
if not holds(KEYS[1], KEYS[3], ARGV[7], ARGV[8]) then return {'', 0} end
local id = redis.call('XADD', KEYS[1], '*', 't', 'delta', ARGV[6], ARGV[3])
if ARGV[4] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
redis.call('PUBLISH', ARGV[5],
  ARGV[1] .. '\\n' .. ARGV[2] .. '\\n' .. id .. '\\n' .. ARGV[6] .. ARGV[3])
return {id, redis.call('EXISTS', KEYS[2])}
"""
)

# KEYS: log, cancel flag, lease. ARGV: job id, channel, ttl, lease token ('' for none),
# lease ms, then the entry's field/value pairs. Adds the terminal entry unless the log has
# ended or another holds the job; starts the log's expiry, publishes the notice with the
# entry (its pairs as a JSON list: relays that hold the entry before it need no read), drops
# the cancel flag. Answers 1 if it wrote the entry.
TERMINAL_SCRIPT = (
    _HOLDS
    + """
if ended(KEYS[1]) or not holds(KEYS[1], KEYS[3], ARGV[4], ARGV[5]) then return 0 end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[2], ARGV[1] .. '\\n' .. (last and last[1] or '0-0') .. '\\n' .. id
  .. '\\n*' .. cjson.encode({unpack(ARGV, 6)}))
redis.call('DEL', KEYS[2])
return 1
"""
)

# KEYS: lease, log. ARGV: token, lease ms ('0': release). Renews the lease under the lease
# rule, or deletes it only if the caller holds it; answers 1 if it did.
LEASE_SCRIPT = (
    _HOLDS
    + """
if ARGV[2] == '0' then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
  redis.call('DEL', KEYS[1])
  return 1
end
if not holds(KEYS[2], KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)


# ------------------------------------------------------------------------------ writing


def encode_delta(choices: list[ChoiceDelta]) -> tuple[str, str]:
    """The (field, value) of a delta entry for coalesced choice deltas."""
    if len(choices) == 1:
        only = choices[0]
        delta = only["delta"]
        if only["index"] == 0 and "logprobs" not in only and list(delta) == ["content"]:
            return "d", delta["content"]
    return "c", json.dumps(choices)


def done_fields(
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    finishes: Mapping[int, str] | None = None,
) -> dict[str, str]:
    fields = {
        "t": "done",
        "finish_reason": finish_reason or "stop",
        "usage": json.dumps(usage or {}),
    }
    if finishes and any(index != 0 for index in finishes):
        fields["finishes"] = json.dumps({str(i): r for i, r in sorted(finishes.items())})
    return fields


def error_fields(error: dict[str, Any]) -> dict[str, str]:
    return {"t": "error", "error": json.dumps(error)}


def coalesce(deltas: Iterable[ChoiceDelta]) -> tuple[list[ChoiceDelta], dict[int, str]]:
    """Choice deltas merged into one per choice, and the finish reasons they carried.

    Text fields are joined; a tool-call fragment is merged into the call with the same
    index (its `arguments` appended); logprobs lists are joined. A client that
    reassembles the merged deltas gets exactly what it would from the originals.
    """
    merged: dict[int, ChoiceDelta] = {}
    finishes: dict[int, str] = {}
    for choice in deltas:
        index = int(choice.get("index") or 0)
        if choice.get("finish_reason"):
            finishes[index] = str(choice["finish_reason"])
        delta = choice.get("delta") or {}
        logprobs = choice.get("logprobs")
        said = any(v not in (None, "", []) for k, v in delta.items() if k != "role")
        if not said and not logprobs:
            continue
        target = merged.get(index)
        if target is None:
            target = merged[index] = {"index": index, "delta": {}}
        merge_delta(target["delta"], delta)
        if logprobs:
            target["logprobs"] = merge_logprobs(target.get("logprobs"), logprobs)
    return list(merged.values()), finishes


def merge_delta(into: dict[str, Any], delta: Mapping[str, Any]) -> None:
    """Add one delta's fields to an accumulated delta (role is the renderer's business)."""
    for key, value in delta.items():
        if value is None or value == "" or key == "role":
            continue
        if key == "tool_calls":
            calls = into.setdefault("tool_calls", [])
            for fragment in value:
                merge_tool_call(calls, fragment)
        elif isinstance(value, str) and isinstance(into.get(key), str):
            into[key] += value
        else:
            into[key] = copy.deepcopy(value)


def merge_tool_call(calls: list[dict[str, Any]], fragment: Mapping[str, Any]) -> None:
    """Merge a tool-call fragment into the call with its index (or start a new call)."""
    index = fragment.get("index", 0)
    for call in reversed(calls):
        if call.get("index", 0) == index:
            break
    else:
        calls.append({k: copy.deepcopy(v) for k, v in fragment.items() if v is not None})
        return
    for key, value in fragment.items():
        if value is None or key == "index":
            continue
        if key == "function" and isinstance(value, Mapping):
            function = call.setdefault("function", {})
            for name, part in value.items():
                if part is None:
                    continue
                if isinstance(part, str) and isinstance(function.get(name), str):
                    function[name] += part
                else:
                    function[name] = part
        elif key not in call:
            call[key] = value


def merge_logprobs(into: dict[str, Any] | None, more: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(into or {})
    for key, value in more.items():
        if isinstance(value, list):
            out[key] = [*(out.get(key) or []), *value]
        elif key not in out:
            out[key] = value
    return out


# ------------------------------------------------------------------------------ reading


def is_terminal(fields: Mapping[str, str]) -> bool:
    return fields.get("t") in TERMINAL_KINDS


def choices_of(fields: Mapping[str, str]) -> list[ChoiceDelta]:
    """The choice deltas of a delta entry."""
    if "d" in fields:
        return [{"index": 0, "delta": {"content": fields["d"]}}]
    choices: list[ChoiceDelta] = json.loads(fields.get("c") or "[]")
    return choices


def finishes_of(fields: Mapping[str, str]) -> dict[int, str]:
    """A `done` entry's finish reason per choice."""
    raw = fields.get("finishes")
    if raw:
        return {int(i): r for i, r in json.loads(raw).items()}
    return {0: fields.get("finish_reason") or "stop"}


def usage_of(fields: Mapping[str, str]) -> dict[str, Any] | None:
    return json.loads(fields.get("usage") or "{}") or None


def error_of(fields: Mapping[str, str]) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(fields.get("error") or "{}")
    return error


def parse_notice(data: str) -> tuple[str, str | None, Entry | None]:
    """A notice as (job id, previous entry id, the new entry); a bare one has no entry."""
    job_id, sep, rest = data.partition("\n")
    if not sep:
        return job_id, None, None
    prev, _, rest = rest.partition("\n")
    entry_id, _, payload = rest.partition("\n")
    if payload[:1] == "*":  # a terminal entry: its field/value pairs
        pairs = json.loads(payload[1:])
        return job_id, prev, (entry_id, dict(zip(pairs[::2], pairs[1::2], strict=True)))
    return job_id, prev, (entry_id, {"t": "delta", payload[:1]: payload[1:]})


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class _Choice:
    """One choice's generation, accumulated from its deltas."""

    parts: list[str] = field(default_factory=list)
    delta: dict[str, Any] = field(default_factory=dict)  # everything but content
    logprobs: dict[str, Any] | None = None

    def add(self, choice: ChoiceDelta) -> None:
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if isinstance(content, str):
            self.parts.append(content)
        merge_delta(self.delta, {k: v for k, v in delta.items() if k != "content"})
        if choice.get("logprobs"):
            self.logprobs = merge_logprobs(self.logprobs, choice["logprobs"])


@dataclass
class Generation:
    """A job's generation as read from its log: what it said so far and how it ended."""

    choices: dict[int, _Choice] = field(default_factory=dict)
    finish_reason: str | None = None
    finishes: dict[int, str] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    ended: bool = False

    def add(self, fields: Mapping[str, str]) -> None:
        kind = fields.get("t")
        if kind == "delta":
            self.add_choices(choices_of(fields))
        elif kind == "done":
            self.finish_reason = fields.get("finish_reason")
            self.finishes = finishes_of(fields)
            self.usage = usage_of(fields)
            self.ended = True
        elif kind == "error":
            self.error = error_of(fields)
            self.ended = True

    def add_choices(self, choices: Iterable[ChoiceDelta]) -> None:
        """Accumulate choice deltas (a worker's as it appends them, a reader's from its log)."""
        for choice in choices:
            index = int(choice.get("index") or 0)
            self.choices.setdefault(index, _Choice()).add(choice)

    def stored_choices(self) -> list[dict[str, Any]] | None:
        """The choices a job row keeps: None when the answer is only choice 0's text."""
        messages = self.messages()
        return messages if more_than_text(messages) else None

    @property
    def status(self) -> str | None:
        """The job status this log ended with (None while it runs)."""
        if not self.ended:
            return None
        if self.error is None:
            return "succeeded"
        return "cancelled" if self.error.get("code") == CANCELLED_CODE else "failed"

    @property
    def text(self) -> str:
        """Choice 0's content."""
        first = self.choices.get(0)
        return "".join(first.parts) if first else ""

    def messages(self) -> list[dict[str, Any]]:
        """The `chat.completion` choices, as OpenAI's API returns them."""
        out = []
        for index in sorted(set(self.choices) | set(self.finishes) | {0}):
            choice = self.choices.get(index) or _Choice()
            extra = choice.delta
            calls = [
                {k: v for k, v in call.items() if k != "index"}
                for call in extra.get("tool_calls", [])
            ]
            content: str | None = "".join(choice.parts) if choice.parts else None
            if content is None and not calls and not extra.get("refusal"):
                content = ""
            message: dict[str, Any] = {
                "role": "assistant",
                "content": content,
                "refusal": extra.get("refusal"),
            }
            if calls:
                message["tool_calls"] = calls
            for key, value in extra.items():
                if key not in ("tool_calls", "refusal"):
                    message[key] = value
            reason = self.finishes.get(index) or (self.finish_reason if index == 0 else None)
            out.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": choice.logprobs,
                    "finish_reason": reason or "stop",
                }
            )
        return out

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Generation:
        generation = cls()
        for _, fields in entries:
            generation.add(fields)
        return generation


def text_of(entries: Iterable[Entry]) -> str:
    """Choice 0's content in these entries, joined."""
    return Generation.of(entries).text
