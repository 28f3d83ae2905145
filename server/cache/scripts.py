"""Lua scripts: leases, compare-and-set fills and invalidation, each atomic in Redis.

A lease key sits beside each value key (value key + LEASE_SUFFIX). Only the lease holder loads from
the database, and its fill succeeds only if the lease still holds its token; Invalidate deletes value
and lease together, so a load that began before an invalidation can never write its old value.
"""

from __future__ import annotations

from server.cache.layout import LEASE_SUFFIX

__all__ = [
    "AWAITED_MARK",
    "BUMP_GENERATION",
    "ERROR_MARK",
    "FILL",
    "INVALIDATE",
    "LEASE",
    "LEASE_SUFFIX",
    "RELEASE",
    "WEAK_LEASE_PREFIX",
]

# Every change a process must hear of (a fill, a released lease, an invalidated key, a new generation)
# is published on one channel as "<counter> <seq> <kind> <key>". seq comes from a counter in the
# script's own slot (one counter on a single Redis), so a subscriber that sees a gap in a counter's
# numbers knows it missed something and flushes what it holds (the near cache).
_EVENT = """
local function event(channel, counter, kind, key)
  redis.call('PUBLISH', channel, counter .. ' ' .. redis.call('INCR', counter) .. ' ' .. kind .. ' ' .. key)
end
"""
ERROR_MARK = "!error"  # a lease value: the last load failed; callers back off until it expires
# A refresh's (warming, early refresh) token starts with it: such a lease is weak, and a live caller's
# request takes it over instead of waiting, so a refresh starved of CPU never makes a read wait. The
# refresh's fill is then refused (its token no longer holds), as after an invalidation.
WEAK_LEASE_PREFIX = "w:"
# Appended to a lease's token by the first caller told to wait for it. Only a fill of an awaited lease
# publishes its event: a warm or a miss nobody else wanted costs no message to every process.
AWAITED_MARK = "+"

# The envelope header (see envelope.py), 1-based in Lua: generation is the big-endian u32 at bytes
# 2..5, expires_at_ms the big-endian u64 at bytes 10..17.
_HEADER = """
local function be(value, first, last)
  local n = 0
  for i = first, last do n = n * 256 + string.byte(value, i) end
  return n
end
local function usable(value, generation, now)
  return #value >= 17 and be(value, 2, 5) == generation and be(value, 10, 17) > now
end
"""

# Many requests in one call, so a batch costs one round trip and one command to encode, not one each.
# KEYS, per request: value key, lease key, then its tag sets. ARGV[1]: lease ms, ARGV[2]: now ms,
# ARGV[3]: the namespace generation the caller read; then per request: token, force ('1' takes the
# lease even if the value is fresh: refresh, warming), number of tags.
# Replies, per request: {'value', bytes} if fresh in this generation, {'granted', ''}, {'wait', pttl}
# (which marks the lease awaited) or {'error', pttl}. A key joins its tags at lease time, so a tag
# invalidation during the load voids the lease too.
LEASE = (
    _HEADER
    + """
local lease_ms, now, generation = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local replies = {}
local k = 1
for a = 4, #ARGV, 3 do
  local token, force, tags = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local key, lease = KEYS[k], KEYS[k + 1]
  local reply = nil
  if force ~= '1' then
    local value = redis.call('GET', key)
    if value and usable(value, generation, now) then reply = {'value', value} end
  end
  if not reply then
    local holder = redis.call('GET', lease)
    if holder == token or holder == token .. '"""
    + AWAITED_MARK
    + """' then
      reply = {'granted', ''}  -- our own lease: this request is a retry whose first reply was lost
    elseif holder and not (force ~= '1' and string.sub(holder, 1, 2) == '"""
    + WEAK_LEASE_PREFIX
    + """') then
      local kind = 'wait'
      if holder == '"""
    + ERROR_MARK
    + """' then
        kind = 'error'
      elseif string.sub(holder, -1) ~= '"""
    + AWAITED_MARK
    + """' then
        redis.call('SET', lease, holder .. '"""
    + AWAITED_MARK
    + """', 'KEEPTTL')
      end
      reply = {kind, tostring(redis.call('PTTL', lease))}
    else
      redis.call('SET', lease, token, 'PX', lease_ms)
      for i = k + 2, k + 1 + tags do
        redis.call('SADD', KEYS[i], key)
        if redis.call('PTTL', KEYS[i]) < lease_ms then redis.call('PEXPIRE', KEYS[i], lease_ms) end
      end
      reply = {'granted', ''}
    end
  end
  replies[#replies + 1] = reply
  k = k + 2 + tags
end
return replies
"""
)

# Many fills in one call. KEYS, per fill: value key, lease key, then its tag sets. ARGV[1]: the event
# channel, ARGV[2]: the event counter; then per fill: token ('' writes without a lease: the plain
# baseline), value, TTL ms, number of tags. A fill with a token writes only if the lease still holds
# that token (awaited or not), and publishes its event only if the lease was awaited. Replies 1 or 0.
FILL = (
    _EVENT
    + """
local channel, events = ARGV[1], ARGV[2]
local written = {}
local k = 1
for a = 3, #ARGV, 4 do
  local token, value, ttl, tags = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local key, lease = KEYS[k], KEYS[k + 1]
  local ok, awaited = 1, true
  if token ~= '' then
    local holder = redis.call('GET', lease)
    if holder == token then
      awaited = false
    elseif holder ~= token .. '"""
    + AWAITED_MARK
    + """' then
      ok = 0
    end
  end
  if ok == 1 then
    redis.call('SET', key, value, 'PX', ttl)
    for i = k + 2, k + 1 + tags do
      redis.call('SADD', KEYS[i], key)
      if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
    if token ~= '' then redis.call('DEL', lease) end
    if awaited then event(channel, events, 'f', key) end
  end
  written[#written + 1] = ok
  k = k + 2 + tags
end
return written
"""
)

# KEYS[1]: lease key. ARGV[1]: token, ARGV[2]: error ms (0: just release), ARGV[3]: channel,
# ARGV[4]: value key, ARGV[5]: event counter. A failed load leaves an error mark so other callers do
# not pile onto a database that just failed; waiters are woken either way.
RELEASE = (
    _EVENT
    + """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] and holder ~= ARGV[1] .. '"""
    + AWAITED_MARK
    + """' then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], '"""
    + ERROR_MARK
    + """', 'PX', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
event(ARGV[3], ARGV[5], 'r', ARGV[4])
return 1
"""
)

# KEYS[1..n]: keys; KEYS[n+1..]: tag sets whose members go too. ARGV[1]: n, ARGV[2]: lease suffix,
# ARGV[3]: event channel, ARGV[4]: event counter. Deletes values and their leases (voiding loads in
# flight, whose waiters are woken to load again) and tells every process, whose near caches drop
# the key. Returns how many values existed. One script: one request's invalidation is atomic.
INVALIDATE = (
    _EVENT
    + """
local n = tonumber(ARGV[1])
local suffix = ARGV[2]
local deleted = 0
local function drop(key)
  deleted = deleted + redis.call('DEL', key)
  redis.call('DEL', key .. suffix)
  event(ARGV[3], ARGV[4], 'i', key)
end
for i = 1, n do drop(KEYS[i]) end
for i = n + 1, #KEYS do
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[i])) do drop(member) end
  redis.call('DEL', KEYS[i])
end
return deleted
"""
)

# KEYS[1]: the generation key. ARGV[1]: event channel, ARGV[2]: event counter. Invalidates
# everything at once; near caches flush.
BUMP_GENERATION = (
    _EVENT
    + """
local generation = redis.call('INCR', KEYS[1])
event(ARGV[1], ARGV[2], 'g', '')
return generation
"""
)
