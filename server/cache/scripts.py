"""Lua scripts that make multi-key cache writes atomic in Redis."""

from __future__ import annotations

# KEYS[1]: the key; KEYS[2..]: tag sets it joins. ARGV[1]: value; ARGV[2]: TTL in ms.
# A tag set lives at least as long as its longest-lived member, so invalidating the tag finds it.
FILL = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local ttl = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
"""

# KEYS[1..n]: keys to delete; KEYS[n+1..]: tag sets whose members are deleted with the set itself.
# ARGV[1]: n. Returns how many keys existed and were deleted. One script, so one request's
# invalidation is atomic: no reader sees some of its keys gone and others still cached.
INVALIDATE = """
local n = tonumber(ARGV[1])
local deleted = 0
for i = 1, n do
  deleted = deleted + redis.call('DEL', KEYS[i])
end
for i = n + 1, #KEYS do
  local members = redis.call('SMEMBERS', KEYS[i])
  for _, member in ipairs(members) do
    deleted = deleted + redis.call('DEL', member)
  end
  redis.call('DEL', KEYS[i])
end
return deleted
"""
