"""Lua scripts: leases, compare-and-set fills and invalidation, each atomic in Redis.

A lease key sits beside each value key (value key + LEASE_SUFFIX). Only the lease holder loads from
the database, and its fill succeeds only if the lease still holds its token; Invalidate deletes value
and lease together, so a load that began before an invalidation can never write its old value.
"""

from __future__ import annotations

LEASE_SUFFIX = ":lease"
ERROR_MARK = "!error"  # a lease value: the last load failed; callers back off until it expires

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

# KEYS[1]: value key, KEYS[2]: lease key, KEYS[3..]: tag sets. ARGV[1]: token, ARGV[2]: lease ms,
# ARGV[3]: now ms, ARGV[4]: '1' to take a lease even if the value is fresh (refresh, warming),
# ARGV[5]: the namespace generation the caller read (a value of another generation is not fresh).
# Returns {'value', bytes} if fresh, {'granted', ''}, {'wait', pttl} or {'error', pttl}.
# The key joins its tags at lease time, so a tag invalidation during the load voids the lease too.
LEASE = (
    _HEADER
    + """
if ARGV[4] ~= '1' then
  local value = redis.call('GET', KEYS[1])
  if value and usable(value, tonumber(ARGV[5]), tonumber(ARGV[3])) then
    return {'value', value}
  end
end
local holder = redis.call('GET', KEYS[2])
if holder then
  local kind = 'wait'
  if holder == '"""
    + ERROR_MARK
    + """' then kind = 'error' end
  return {kind, tostring(redis.call('PTTL', KEYS[2]))}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local lease_ms = tonumber(ARGV[2])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < lease_ms then redis.call('PEXPIRE', KEYS[i], lease_ms) end
end
return {'granted', ''}
"""
)

# KEYS[1]: value key, KEYS[2]: lease key, KEYS[3..]: tag sets. ARGV[1]: token, ARGV[2]: value,
# ARGV[3]: TTL ms, ARGV[4]: fill channel. Writes only if the lease still holds the token.
FILL = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('DEL', KEYS[2])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
redis.call('PUBLISH', ARGV[4], KEYS[1])
return 1
"""

# Without leases (the plain cache-aside baseline): KEYS as FILL, ARGV[1]: value, ARGV[2]: TTL ms.
SET_TAGGED = """
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
"""

# KEYS[1]: lease key. ARGV[1]: token, ARGV[2]: error ms (0: just release), ARGV[3]: channel,
# ARGV[4]: value key. A failed load leaves an error mark so other callers do not pile onto a
# database that just failed; waiters are woken either way.
RELEASE = (
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], '"""
    + ERROR_MARK
    + """', 'PX', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
)

# KEYS[1..n]: keys; KEYS[n+1..]: tag sets whose members go too. ARGV[1]: n, ARGV[2]: lease suffix,
# ARGV[3]: fill channel. Deletes values and their leases (voiding loads in flight, whose waiters
# are woken to load again). Returns how many values existed. One script: one request's
# invalidation is atomic.
INVALIDATE = """
local n = tonumber(ARGV[1])
local suffix = ARGV[2]
local deleted = 0
local function drop(key)
  deleted = deleted + redis.call('DEL', key)
  if redis.call('DEL', key .. suffix) == 1 then redis.call('PUBLISH', ARGV[3], key) end
end
for i = 1, n do drop(KEYS[i]) end
for i = n + 1, #KEYS do
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[i])) do drop(member) end
  redis.call('DEL', KEYS[i])
end
return deleted
"""
