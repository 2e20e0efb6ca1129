"""The Lua scripts of the Redis backend's reads (``scripts`` has the writes and puts them all together).

A read never passes more through Lua than it must: ``get`` is a lean script of its own (the deadline, Redis'
``TIME`` only when the name has one, the value); ``get_many`` and ``snapshot`` are not scripts at all but
``MULTI`` blocks whose replies the backend filters in Python, as ``save`` does. Values leave Lua as copies,
which for a large value costs more than the read itself. These reads (and ``SCAN``) hide a name past its
deadline and leave its removal (and the ``expired`` note) to the next write or watch tick. ``contains``,
``len`` and ``ttl`` run on ``scripts.PRELUDE`` instead, and remove (and note) what they find expired, as a
write does.
"""

from __future__ import annotations

#: ``redis_now()``: Redis' ``TIME`` as UTC seconds. Every script that reads the clock opens with it.
NOW = """
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

#: KEYS: data, deadlines. ARGV: name. The stored text, or nil (missing or past its deadline).
GET = (
    NOW
    + """
local d = redis.call('ZSCORE', KEYS[2], ARGV[1])
if d and tonumber(d) <= redis_now() then return false end
return redis.call('HGET', KEYS[1], ARGV[1])
"""
)

#: KEYS: a hash, the deadlines. ARGV: cursor, count, '1' to return values too. One HSCAN step:
#: {cursor, items...}, without the names past their deadline.
SCAN = (
    NOW
    + """
local r = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local out = {r[1]}
local items = r[2]
local step = 2
if ARGV[3] == '1' then step = 1 end
local deadlines = redis.call('EXISTS', KEYS[2]) == 1
local now = 0
if deadlines then now = redis_now() end
for i = 1, #items, 2 do
  local d = deadlines and redis.call('ZSCORE', KEYS[2], items[i])
  if not d or tonumber(d) > now then
    out[#out + 1] = items[i]
    if step == 1 then out[#out + 1] = items[i + 1] end
  end
end
return out
"""
)

#: The reads that open with ``scripts.PRELUDE`` (its KEYS). ARGV: name. 1 if it exists, else 0.
CONTAINS = """
fresh(ARGV[1])
return redis.call('HEXISTS', D, ARGV[1])
"""

#: The number of names (Redis' ``TIME`` only when some name has a deadline).
LENGTH = """
purge(PURGE_BATCH)
if redis.call('EXISTS', X) == 0 then return redis.call('HLEN', D) end
clock()
return redis.call('HLEN', D) - redis.call('ZCOUNT', X, '-inf', nowtext)
"""

#: ARGV: name. The seconds it has left as text, or nil (no expiry, or no such name).
TTL = """
fresh(ARGV[1])
local d = redis.call('ZSCORE', X, ARGV[1])
if not d then return nil end
return string.format('%.6f', tonumber(d) - clock())
"""

#: The reads on ``PRELUDE``, by the attribute name a connection registers them under.
READS_ON_NAMES = {"contains": CONTAINS, "length": LENGTH, "ttl": TTL}
#: The reads that stand alone.
READ_SCRIPTS = {"get": GET, "scan": SCAN}
