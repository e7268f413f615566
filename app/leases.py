"""Leases in Redis: members of sorted sets scored by their expiry (Redis server time, ms).

The one lease mechanism of Sluice: stream admission slots, the per-provider semaphore of
batch workers (which yields to the provider's streams where a shared capacity is set,
`app.services.capacity`) and the leases batch chunks hold on their claimed items. A holder renews
while it works; one that dies stops renewing and its member lapses on its own, so nothing
leaks. Every acquire first drops the expired members of the sets it counts.

A member may belong to several sets at once (a stream slot counts globally and for its
tenant). Its record, when asked for, is a key holding the names of those sets, so renew
and release need only the member; a released member's late renew finds no record and can
never resurrect the lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from app import windows
from app.redis_scripts import run_script

log = logging.getLogger(__name__)

KEY_PAD_MS = 60_000  # a set's own key outlives its longest lease by this much

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_KEEP = """
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl + PAD then redis.call('PEXPIRE', key, ttl + PAD) end
end
"""

# KEYS: n sets, then the record key when ARGV[4] ~= '', then (metered) the provider's
# window. ARGV: member, ttl_ms, n, record grace_ms (or ''), limit_1..limit_n (0 =
# unlimited), then (metered) requests/minute, tokens/minute (0 = none) and the member's
# tokens. A member already in the first set is re-admitted (not counted again). Returns
# {0, count_1..count_n} when held, else {i, ...}: set i was full, n + 1: the window's
# requests, n + 2: its tokens (app.services.capacity.stream_fits: streams alone count).
ACQUIRE = f"""
{_NOW}
local PAD = {KEY_PAD_MS}
{_KEEP}
{windows.LUA}
local member, ttl, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local metered = #ARGV > 4 + n
local counts = {{}}
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  counts[i] = redis.call('ZCARD', KEYS[i])
end
local charge = ''
if not redis.call('ZSCORE', KEYS[1], member) then
  for i = 1, n do
    local limit = tonumber(ARGV[4 + i])
    if limit > 0 and counts[i] >= limit then return {{i, unpack(counts)}} end
  end
  if metered then
    local key = KEYS[#KEYS]
    local rpm, tpm, cost = tonumber(ARGV[5 + n]), tonumber(ARGV[6 + n]), tonumber(ARGV[7 + n])
    local c = window(key)
    if rpm > 0 and c.sr + 1 > rpm then return {{n + 1, unpack(counts)}} end
    if tpm > 0 and c.st + math.min(cost, tpm) > tpm then return {{n + 2, unpack(counts)}} end
    redis.call('HINCRBY', key, 'sr', 1)
    redis.call('HINCRBY', key, 'st', cost)
    charge = '|' .. key .. ' ' .. c.w .. ' ' .. cost
  end
  for i = 1, n do counts[i] = counts[i] + 1 end
elseif ARGV[4] ~= '' then
  charge = string.match(redis.call('GET', KEYS[n + 1]) or '', '|.*$') or ''
end
local sets = {{}}
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + ttl, member)
  keep(KEYS[i], ttl)
  sets[i] = KEYS[i]
end
if ARGV[4] ~= '' then
  local record = table.concat(sets, ' ') .. charge
  redis.call('SET', KEYS[n + 1], record, 'PX', ttl + tonumber(ARGV[4]))
end
return {{0, unpack(counts)}}
"""

# KEYS: one set, the set it yields to, the provider's window, its batch pause. ARGV:
# ttl_ms, limit (0 = unlimited), capacity (0 = none), requests/minute, tokens/minute (0 =
# none), each member's tokens, members... Holds as many of the members, in order, as the
# limit leaves room for, with a capacity as `capacity - live members of the other set`
# leaves (app.services.capacity.batch_room), and with per-minute limits as the window
# leaves after the streams' reserve (capacity.batch_window_room), counting them there.
# Returns {held, wait_ms, window}: wait_ms > 0 when nothing may start before then (the
# pause, or the window's end).
ACQUIRE_SOME = f"""
{_NOW}
local PAD = {KEY_PAD_MS}
{_KEEP}
{windows.LUA}
local ttl, limit, capacity = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, tpm, cost = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local paused = redis.call('PTTL', KEYS[4])
if paused > 0 then return {{0, paused, 0}} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local room = #ARGV - 6
if limit > 0 or capacity > 0 then
  local held = redis.call('ZCARD', KEYS[1])
  if limit > 0 then room = math.min(room, limit - held) end
  if capacity > 0 then
    local other = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
    room = math.min(room, capacity - other - held)
  end
end
if room <= 0 then return {{0, 0, 0}} end
local w = 0
if rpm > 0 or tpm > 0 then
  local c = window(KEYS[3])
  w = c.w
  if rpm > 0 then room = math.min(room, rpm - c.br - math.max(c.sr, c.psr)) end
  if tpm > 0 then
    local each = math.max(1, math.min(cost, tpm))
    room = math.min(room, math.floor((tpm - c.bt - math.max(c.st, c.pst)) / each))
  end
  if room <= 0 then return {{0, window_left(), w}} end
  redis.call('HINCRBY', KEYS[3], 'br', room)
  redis.call('HINCRBY', KEYS[3], 'bt', room * cost)
end
for i = 7, 6 + room do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
keep(KEYS[1], ttl)
return {{room, 0, w}}
"""

# KEYS: one set. ARGV: ttl_ms, 'XX' (renew live members only) or 'ANY', members...
RENEW = f"""
{_NOW}
local PAD = {KEY_PAD_MS}
{_KEEP}
local ttl = tonumber(ARGV[1])
local renewed = 0
for i = 3, #ARGV do
  if ARGV[2] == 'XX' then
    renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i])
  else
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
    renewed = renewed + 1
  end
end
keep(KEYS[1], ttl)
return renewed
"""

# KEYS: the record. ARGV: member, ttl_ms, grace_ms. Renews a recorded member in every set.
RENEW_RECORDED = f"""
{_NOW}
local PAD = {KEY_PAD_MS}
{_KEEP}
local sets = redis.call('GET', KEYS[1])
if not sets then return 0 end
local ttl = tonumber(ARGV[2])
for key in string.gmatch(string.match(sets, '^[^|]*'), '%S+') do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  keep(key, ttl)
end
redis.call('PEXPIRE', KEYS[1], ttl + tonumber(ARGV[3]))
return 1
"""

# KEYS: the record. ARGV: member. Removes a recorded member from every set and the record.
RELEASE_RECORDED = """
local sets = redis.call('GET', KEYS[1])
local removed = 0
if sets then
  for key in string.gmatch(string.match(sets, '^[^|]*'), '%S+') do
    removed = removed + redis.call('ZREM', key, ARGV[1])
  end
end
redis.call('DEL', KEYS[1])
return removed
"""


def ms(seconds: float) -> int:
    """A lease length in whole milliseconds (at least one)."""
    return max(1, int(seconds * 1000))


@dataclass(frozen=True)
class Meter:
    """A call's place in its provider's per-minute window (app.windows): its limits and cost."""

    key: str
    requests_per_minute: int  # 0: none
    tokens_per_minute: int  # 0: none
    tokens: int  # the call's estimated tokens

    def args(self) -> list[int]:
        return [self.requests_per_minute, self.tokens_per_minute, self.tokens]


def acquire(
    client: redis.Redis,
    sets: Sequence[str],
    member: str,
    ttl_ms: int,
    limits: Sequence[int] | None = None,
    *,
    record: str | None = None,
    record_grace_ms: int = 0,
    meter: Meter | None = None,
) -> tuple[int, list[int]]:
    """Hold `member` in every set if none is full: (0, counts), else (i, counts), set i full.

    With `record`, the member's sets are written there (for renew_recorded and
    release_recorded); it outlives the lease by record_grace_ms. With `meter`, a new member
    also counts one request and its tokens in the window (as a stream: streams alone must
    fit): (len(sets) + 1, counts) when the requests would not, (len(sets) + 2, ...) tokens.
    """
    limits = list(limits) if limits is not None else [0] * len(sets)
    keys = [*sets, record] if record else list(sets)
    grace = str(record_grace_ms) if record else ""
    extra: list[int] = []
    if meter is not None:
        keys.append(meter.key)
        extra = meter.args()
    result = run_script(
        client, ACQUIRE, len(keys), *keys, member, ttl_ms, len(sets), grace, *limits, *extra
    )
    return int(result[0]), [int(c) for c in result[1:]]


@dataclass(frozen=True)
class Taken:
    """What acquire_some held: the members, and when nothing was, how long to wait."""

    members: list[str]
    wait_ms: int = 0  # > 0: nothing may start before then (a pause, a full window)
    window: int = 0  # the window the members were counted in (metered only)


def acquire_some(
    client: redis.Redis,
    key: str,
    members: Sequence[str],
    ttl_ms: int,
    limit: int,
    *,
    within: tuple[str, int] | None = None,
    meter: Meter | None = None,
    pause: str | None = None,
) -> Taken:
    """Hold as many of `members` (in order) in one set as its limit leaves room for.

    `within=(other_set, capacity)`: this set and the other's live members share the
    capacity, and this set takes only what the other leaves. `meter`: each member is a
    batch call counted in the window, within what the streams leave there. `pause` (default
    `<key>:pause`): a key whose life holds every member back.
    """
    if not members:
        return Taken([])
    other, capacity = within if within and within[1] > 0 else (key, 0)
    window, rates = (meter.key, meter.args()) if meter else (key, [0, 0, 0])
    keys = [key, other, window, pause or f"{key}:pause"]
    argv: list[int | str] = [ttl_ms, limit, capacity, *rates, *members]
    held, wait_ms, counted = run_script(client, ACQUIRE_SOME, len(keys), *keys, *argv)
    return Taken(list(members[: int(held)]), int(wait_ms), int(counted))


def renew(
    client: redis.Redis, key: str, members: Sequence[str], ttl_ms: int, *, live_only: bool
) -> int:
    """Extend members' leases in one set; with live_only, a lapsed member stays lapsed."""
    if not members:
        return 0
    return int(run_script(client, RENEW, 1, key, ttl_ms, "XX" if live_only else "ANY", *members))


def renew_recorded(
    client: redis.Redis, record: str, member: str, ttl_ms: int, grace_ms: int
) -> bool:
    """Extend a recorded member in all its sets; False (and a no-op) once it was released.

    On a pipeline the call is queued (and False returned): its answer is the pipeline's.
    """
    result = run_script(client, RENEW_RECORDED, 1, record, member, ttl_ms, grace_ms)
    return False if _queued(client) else bool(result)


def release(client: redis.Redis, key: str, *members: str) -> bool:
    """Give members' leases back (idempotent); whether any was held."""
    return bool(client.zrem(key, *members)) if members else False


def release_recorded(client: redis.Redis, record: str, member: str) -> int:
    """Remove a recorded member from all its sets and drop its record (idempotent).

    On a pipeline the call is queued (and 0 returned): its answer is the pipeline's.
    """
    result = run_script(client, RELEASE_RECORDED, 1, record, member)
    return 0 if _queued(client) else int(result)


def _queued(client: redis.Redis) -> bool:
    """Whether client is a pipeline (its calls are queued, their answers come later)."""
    return isinstance(client, redis.client.Pipeline)


def first_in(client: redis.Redis, key: str, seconds: float) -> bool:
    """Whether this caller is the first to pass `key`'s gate in `seconds` (SET NX EX, at
    least a second): the once-per-period gate of re-sends and one-teller steps."""
    return bool(client.set(key, 1, nx=True, ex=max(1, int(seconds))))


def now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def live_count(client: redis.Redis, key: str) -> int:
    """Members whose lease has not run out."""
    return int(client.zcount(key, f"({now_ms(client)}", "+inf"))


def live_members(client: redis.Redis, key: str, members: Sequence[str]) -> set[str]:
    """Which of `members` hold an unexpired lease in the set."""
    if not members:
        return set()
    now = now_ms(client)
    scores = client.zmscore(key, list(members))
    return {m for m, s in zip(members, scores, strict=True) if s is not None and s > now}


class Renewer:
    """This process's leases in lease sets, renewed by one background thread.

    With live_only, a lease that lapsed (its holder stalled past it) stays lapsed; without,
    renewal re-creates a lease Redis lost (a restart without persistence).
    """

    def __init__(self, client: redis.Redis, seconds: float, *, live_only: bool) -> None:
        self.client = client
        self.seconds = max(1.0, seconds)
        self.live_only = live_only
        self._held: dict[str, str] = {}  # member -> key
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, key: str, member: str) -> None:
        """Renew member's lease in key from now on (the caller acquired it)."""
        with self._lock:
            self._held[member] = key
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._renew_forever, daemon=True, name=f"lease-renew:{key}"
                )
                self._thread.start()

    def drop(self, member: str) -> str | None:
        """Stop renewing member; the key it was held in, if it was."""
        with self._lock:
            return self._held.pop(member, None)

    def forget_all(self) -> None:
        """Stop renewing everything (as a holder that died would)."""
        with self._lock:
            self._held.clear()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.seconds / 3)
            self.renew_once()

    def renew_once(self) -> None:
        with self._lock:
            by_key: dict[str, list[str]] = {}
            for member, key in self._held.items():
                by_key.setdefault(key, []).append(member)
        for key, members in by_key.items():
            try:
                renew(self.client, key, members, ms(self.seconds), live_only=self.live_only)
            except Exception:
                log.warning("could not renew %d lease(s) in %s", len(members), key)
