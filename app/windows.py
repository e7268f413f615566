"""Per-minute windows of a provider's shared capacity: requests and tokens, by mode.

One hash per provider (`app.services.capacity.window_key`) counts the current window's
requests and tokens of stream jobs (`sr`, `st`) and of batch calls (`br`, `bt`), and keeps
the streams' counts of the window before (`psr`, `pst`: the reserve batch leaves them).
Windows are fixed minutes of Redis server time (`w` = minute number); the first script to
touch a hash in a new minute rolls it over. The Lua below is included by the acquire
scripts of `app.leases`, so counting a call costs no Redis call of its own; the pure rules
it applies are `app.services.capacity`'s (stream_fits, batch_window_room).
"""

from __future__ import annotations

import redis

from app.redis_scripts import run_script

WINDOW_MS = 60_000
FIELDS = ("w", "sr", "st", "br", "bt", "psr", "pst")

# Needs `now` (ms, Redis time). window(key): the current window's counts, rolled over.
# settle(key, w, field, delta): correct window w's count (dropped once w is two windows old;
# batch counts only while w is current). window_left(): ms until the next window.
LUA = f"""
local WINDOW_MS = {WINDOW_MS}
local function window(key)
  local w = math.floor(now / WINDOW_MS)
  local v = redis.call('HMGET', key, 'w', 'sr', 'st', 'br', 'bt', 'psr', 'pst')
  local c = {{w = w, sr = tonumber(v[2]) or 0, st = tonumber(v[3]) or 0,
    br = tonumber(v[4]) or 0, bt = tonumber(v[5]) or 0,
    psr = tonumber(v[6]) or 0, pst = tonumber(v[7]) or 0}}
  local stored = tonumber(v[1])
  if stored ~= w then
    if stored == w - 1 then c.psr, c.pst = c.sr, c.st else c.psr, c.pst = 0, 0 end
    c.sr, c.st, c.br, c.bt = 0, 0, 0, 0
    redis.call('HSET', key, 'w', w, 'sr', 0, 'st', 0, 'br', 0, 'bt', 0,
      'psr', c.psr, 'pst', c.pst)
    redis.call('PEXPIRE', key, 3 * WINDOW_MS)
  end
  return c
end
local function window_left() return WINDOW_MS - now % WINDOW_MS end
local function settle(key, w, field, delta)
  if delta == 0 then return end
  local c = window(key)
  local f = field
  if c.w == w + 1 and (field == 'sr' or field == 'st') then f = 'p' .. field
  elseif c.w ~= w then return end
  local value = c[f] + delta
  if value < 0 then value = 0 end
  redis.call('HSET', key, f, value)
end
"""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the lease set, the window. ARGV: window w, requests delta, tokens delta, members...
# Gives batch leases back and corrects window w's batch counts, in one call.
RELEASE = f"""
{_NOW}
{LUA}
for i = 4, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
settle(KEYS[2], tonumber(ARGV[1]), 'br', tonumber(ARGV[2]))
settle(KEYS[2], tonumber(ARGV[1]), 'bt', tonumber(ARGV[3]))
return 1
"""

# KEYS: a stream job's lease record. ARGV: its actual tokens. The record's window charge
# ('|window-key w tokens') is corrected to the actual count, once.
SETTLE_RECORDED = f"""
{_NOW}
{LUA}
local record = redis.call('GET', KEYS[1])
if not record then return 0 end
local key, w, charged = string.match(record, '|(%S+) (%d+) (%d+)$')
if not key then return 0 end
settle(key, tonumber(w), 'st', tonumber(ARGV[1]) - tonumber(charged))
local sets = string.match(record, '^[^|]*')
redis.call('SET', KEYS[1], sets .. '|' .. key .. ' ' .. w .. ' ' .. ARGV[1], 'KEEPTTL')
return 1
"""

# KEYS: a provider's batch pause. ARGV: ms. Lengthens the pause, never shortens it.
PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


def release(
    client: redis.Redis,
    key: str,
    window_key: str,
    window: int,
    requests: int,
    tokens: int,
    *members: str,
) -> None:
    """Give batch leases back and correct window `window`'s batch counts by these deltas."""
    run_script(client, RELEASE, 2, key, window_key, window, requests, tokens, *members)


def settle_recorded(client: redis.Redis, record: str, tokens: int) -> None:
    """Correct a stream job's window charge to its actual tokens (a pipeline queues it)."""
    run_script(client, SETTLE_RECORDED, 1, record, max(0, int(tokens)))


def pause(client: redis.Redis, key: str, seconds: float) -> None:
    """Pause (at least `seconds` from now) what checks this key."""
    run_script(client, PAUSE, 1, key, max(1, int(seconds * 1000)))


def counts(values: list[bytes | str | None], now_ms: int) -> dict[str, int]:
    """An HMGET of FIELDS as the current window's counts (rolled over as the Lua would)."""
    raw = dict(zip(FIELDS, (int(v) if v is not None else None for v in values), strict=True))
    current = now_ms // WINDOW_MS
    out = dict.fromkeys(FIELDS[1:], 0)
    if raw["w"] == current:
        out |= {k: raw[k] or 0 for k in FIELDS[1:]}
    elif raw["w"] == current - 1:
        out |= {"psr": raw["sr"] or 0, "pst": raw["st"] or 0}
    return out


def left_ms(now_ms: int) -> int:
    """Milliseconds until the next window."""
    return WINDOW_MS - now_ms % WINDOW_MS
