"""The Lua scripts of the Redis semaphores (``semaphores``), each one call made atomic inside Redis.

A semaphore is a sorted set of its permits: each member is a holder's token, its score the end of the
holder's lease (Redis' ``TIME``, in ms), pushed on by the holder's lease thread. A permit whose lease
ended is dropped by the next call on the semaphore, and counted (the namespace's recoveries key). The
value lives in a key of its own, set by the first call. Replies are integers, strings or arrays.
"""

from __future__ import annotations

#: Shared head of the scripts below. KEYS: permits, value, recoveries. ARGV[1]: value. Checks the value
#: (returning {'value', fixed value} when it differs), then drops the permits whose lease ended.
_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fixed = redis.call('GET', KEYS[2])
if not fixed then redis.call('SET', KEYS[2], ARGV[1])
elseif fixed ~= ARGV[1] then return {'value', fixed} end
local gone = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if gone > 0 then redis.call('INCRBY', KEYS[3], gone) end
"""

#: KEYS: permits, value, recoveries. ARGV: value, token, lease ms. Returns {'ok'} when taken, {'wait', ms}
#: (until the first lease ends) when none is free, or {'value', fixed value}.
SEM_ACQUIRE = (
    _CHECK
    + """
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  return {'ok'}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {'wait', math.max(0, tonumber(first[2]) - now)}
"""
)

#: KEYS: permits, value, recoveries. ARGV: value. Returns {'free', permits free now} or {'value', fixed}.
SEM_VALUE = (
    _CHECK
    + """
return {'free', math.max(0, tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1]))}
"""
)

#: KEYS: permits, wake list, value. ARGV: token ('' for none), lease ms, value. Returns {'value', fixed value}
#: when the semaphore has another value (and changes nothing), {'none'} when the permit is not there (no
#: token, or its lease ended and a later call dropped it), else {'ok'}: released, and one waiter woken (at
#: most ``value`` wake-ups are kept). An unknown semaphore's value is not fixed by a release.
SEM_RELEASE = """
local fixed = redis.call('GET', KEYS[3])
if fixed and fixed ~= ARGV[3] then return {'value', fixed} end
if ARGV[1] == '' or redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return {'none'} end
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {'ok'}
"""

#: KEYS: permits. ARGV: token, lease ms. Returns 1 if renewed, 0 if the permit is no longer there.
SEM_RENEW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

#: These scripts, by the names a connection registers them under (``scripts.SCRIPTS`` includes them).
SEMAPHORE_SCRIPTS = {
    "sem_acquire": SEM_ACQUIRE,
    "sem_value": SEM_VALUE,
    "sem_release": SEM_RELEASE,
    "sem_renew": SEM_RENEW,
}
