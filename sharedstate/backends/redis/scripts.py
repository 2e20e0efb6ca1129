"""The Lua scripts the Redis backend runs: each makes one call atomic inside Redis.

Each script's header says what it takes (``KEYS``, ``ARGV``) and returns. They return integers, strings
or arrays only, never a boolean, whose reply differs between RESP2 and RESP3. Values are stored as the
typed JSON of the snapshot codec, so a script reads them as text; where a script cannot decide exactly
as Python would, it answers ``{'py'}`` and the backend finishes the call in Python.
"""

from __future__ import annotations

from sharedstate.backends.redis.semaphore_scripts import SEMAPHORE_SCRIPTS

#: Lua numbers are doubles: an integer is exact, and adds exactly, while its magnitude stays below
#: 2**53. ``incr`` is done in Lua only inside that range (the stored integer, ``by`` and the sum); any
#: other integer is added in Python. The scripts are given this limit as an argument: it is stated here
#: only.
EXACT_INT = 2**53

#: KEYS: data, scopes. ARGV: name, value, scopes as JSON ('' for none).
SET = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
else redis.call('HDEL', KEYS[2], ARGV[1]) end
return 1
"""

#: KEYS: data, scopes. ARGV: name. Returns {} or {old value}.
REMOVE = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return {} end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return {v}
"""

#: KEYS: data, scopes. Removes a name ``HRANDFIELD`` picks (Redis 6.2+; constant time, where a scan from
#: the start of the hash would walk more and more emptied slots as names go). Returns {} or {name, value}.
POPITEM = """
local name = redis.call('HRANDFIELD', KEYS[1])
if not name then return {} end
local v = redis.call('HGET', KEYS[1], name)
redis.call('HDEL', KEYS[1], name)
redis.call('HDEL', KEYS[2], name)
return {name, v}
"""

#: KEYS: data. ARGV: name, default. Returns {1} when it stored the default, else {0, stored value}.
SETDEFAULT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return {1} end
return {0, redis.call('HGET', KEYS[1], ARGV[1])}
"""

#: KEYS: data. ARGV: name, by, 'i' (by is an integer below EXACT_INT) or 'f' (a finite float), EXACT_INT.
#: Returns {'ok', new value}, {'type', stored value} (not a plain number), or {'py'} (finish in Python:
#: a Decimal, a stored integer or an integer sum at or beyond EXACT_INT, a sum that is not finite).
INCR = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local limit = tonumber(ARGV[4])
local a, aint
if not cur then
  a, aint = 0, true
elseif string.find(cur, '^%-?%d+$') then
  -- Rounding is monotonic: a text at or beyond the limit never reads as a number below it.
  a, aint = tonumber(cur), true
  if a >= limit or a <= -limit then return {'py'} end
elseif string.find(cur, '^%-?%d+%.%d+$') or string.find(cur, '^%-?%d+%.?%d*e[%-%+]?%d+$') then
  a, aint = tonumber(cur), false
elseif string.sub(cur, 1, 9) == '{"$type":' then
  return {'py'}
else
  return {'type', cur}
end
local r = a + tonumber(ARGV[2])
local out
if aint and ARGV[3] == 'i' then
  if r >= limit or r <= -limit then return {'py'} end
  out = string.format('%.0f', r)
else
  if r ~= r or r == math.huge or r == -math.huge then return {'py'} end
  out = string.format('%.17g', r)
  if not string.find(out, '[%.e]') then out = out .. '.0' end
end
redis.call('HSET', KEYS[1], ARGV[1], out)
return {'ok', out}
"""

#: KEYS: data. ARGV: name, item. Returns {'ok', new length}, {'type', stored value}, or {'py'}.
APPEND = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  redis.call('HSET', KEYS[1], ARGV[1], '[' .. ARGV[2] .. ']')
  return {'ok', 1}
end
if string.byte(cur, 1) ~= 91 then return {'type', cur} end
local ok, items = pcall(cjson.decode, cur)
if not ok or type(items) ~= 'table' then return {'py'} end
if cur == '[]' then cur = '[' .. ARGV[2] .. ']'
else cur = string.sub(cur, 1, -2) .. ',' .. ARGV[2] .. ']' end
redis.call('HSET', KEYS[1], ARGV[1], cur)
return {'ok', #items + 1}
"""

#: KEYS: data. ARGV: name, expected text, new value, '1' if a missing name matches, '1' to compare texts.
#: Returns 1 (stored), 0 (missing, no match), or the stored text for Python to compare.
COMPARE_AND_SET = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  if ARGV[4] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]); return 1 end
  return 0
end
if ARGV[5] == '1' and cur == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return cur
"""

#: KEYS: data. ARGV: name, '1' if the name must be missing, else '0'; the text it must hold; new value.
#: Returns 1 if it stored the new value, 0 if the name no longer holds what was read.
SWAP = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if cur then return 0 end
elseif cur ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return 1
"""

#: KEYS: a hash. ARGV: cursor, count, '1' to return values too. One HSCAN step: {cursor, items...}.
SCAN = """
local r = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local out = {r[1]}
local items = r[2]
local step = 2
if ARGV[3] == '1' then step = 1 end
for i = 1, #items, step do out[#out + 1] = items[i] end
return out
"""

#: KEYS: lock. ARGV: token, lease ms. Returns -3 when acquired, else the holder's remaining ms (or -2:
#: it just went away).
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -3 end
return redis.call('PTTL', KEYS[1])
"""

#: KEYS: lock, wake list. ARGV: token, lease ms. Returns 1 if released, 0 if the token was not there.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, 0)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

#: KEYS: lock. ARGV: token, lease ms. Returns 1 if renewed, 0 if the lock is no longer this token's.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: Every script, by the attribute name a connection registers it under.
SCRIPTS = {
    "set": SET,
    "remove": REMOVE,
    "popitem": POPITEM,
    "setdefault": SETDEFAULT,
    "incr": INCR,
    "append": APPEND,
    "compare_and_set": COMPARE_AND_SET,
    "swap": SWAP,
    "scan": SCAN,
    "acquire": ACQUIRE,
    "release": RELEASE,
    "renew": RENEW,
}
SCRIPTS.update(SEMAPHORE_SCRIPTS)
