"""The Lua scripts the Redis backend runs: each makes one call atomic inside Redis.

Each script's header says what it takes (``KEYS``, ``ARGV``) and returns. They return integers, strings
or arrays only, never a boolean, whose reply differs between RESP2 and RESP3. Values are stored as the
typed JSON of the snapshot codec, so a script reads them as text; where a script cannot decide exactly
as Python would, it answers ``{'py', stored text}`` (``{'py'}`` for a missing name) and the backend
finishes the call in Python from that text.
"""

from __future__ import annotations

from sharedstate.backends.redis.read_scripts import NOW, READ_SCRIPTS, READS_ON_NAMES
from sharedstate.backends.redis.semaphore_scripts import SEMAPHORE_SCRIPTS

#: Lua numbers are doubles: an integer is exact, and adds exactly, while its magnitude stays below
#: 2**53. ``incr`` is done in Lua only inside that range (the stored integer, ``by`` and the sum); any
#: other integer is added in Python. The scripts are given this limit as an argument: it is stated here
#: only.
EXACT_INT = 2**53

#: The largest value, in bytes of its stored text, a change's entry in the stream carries (``PRELUDE``).
NOTE_MAX = 64 * 1024

#: Names a script removes as expired before its own work, at most (more wait for the next script; every
#: read leaves out a name past its deadline whether it was removed yet or not).
PURGE_BATCH = 100

#: Opens every script on a state's names. KEYS: data, scopes, deadlines, changes, watching (``NAMESPACE:``
#: ``data``, ``scopes``, ``deadlines`` (a sorted set: name by its absolute deadline, UTC seconds of Redis'
#: ``TIME``), ``changes`` (the stream) and ``watching`` (a hash, present while anyone watches)).
#: ``clock`` asks Redis' ``TIME`` once, and only when a deadline is involved: a state without expiry never
#: pays for it.
#: ``note`` writes a change to the stream, only while someone watches, with ids ``0-N``, ``0-N+1``... one
#: after the other, numbered by the ``seq`` field of ``watching`` (a hash: ``cap``, ``seq``, and a
#: ``p:TOKEN`` field per watching process, its own cap; ``WATCH`` sets where numbering begins), so that a
#: stream deleted or evicted alone goes on with the next number: a watcher sees a gap where entries it had
#: not read are gone. A stream the note creates (the watchers' ``PEXPIRE`` found none to renew) gets what
#: is left of ``watching``'s lease, so that it never outlives the watchers. Every script notes a change
#: *before* it writes the data: a note that fails (a key of another type under the stream's name, an id
#: out of order) ends the script before anything changed, as Redis does not undo a script's earlier
#: writes (the ``MULTI`` blocks of ``restore`` and ``update`` check first with a note every watcher skips).
#: An entry leaves out both ``s`` (scopes) and ``L`` when both hold the default (none; ``0``), as readers
#: take them then. A value longer than ``NOTE_MAX`` bytes is not copied into the stream (the entry says
#: ``L``: large), so that a namespace's stream does not hold many copies of a large value (an ``append``
#: to a long list would write the whole list each time); its watchers read the name's value when they
#: read the entry.
#: ``fresh`` removes a name past its deadline (noting ``expired``), ``purge`` up to that many such names.
PRELUDE = (
    NOW
    + """
local D, S, X, C, W = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, nowtext, cap, leased
local function clock()
  if not now then
    now = redis_now()
    nowtext = string.format('%.6f', now)
  end
  return now
end
local function watched()
  if cap == nil then cap = redis.call('HGET', W, 'cap') or false end
  return cap
end
local function note(kind, name, value, scopes)
  if watched() then
    local id = '0-' .. string.format('%.0f', redis.call('HINCRBY', W, 'seq', 1))
    local large = '0'
    if #value > NOTE_MAX then value, large = '', '1' end
    if large == '0' and scopes == '' then  -- what a reader takes when a field is left out
      redis.call('XADD', C, 'MAXLEN', '~', cap, id, 'k', kind, 'n', name, 'v', value)
    else
      redis.call('XADD', C, 'MAXLEN', '~', cap, id, 'k', kind, 'n', name, 'v', value, 's', scopes, 'L', large)
    end
    if not leased then
      leased = true
      local left = redis.call('PTTL', W)
      if left > 0 and redis.call('PTTL', C) == -1 then redis.call('PEXPIRE', C, left) end
    end
  end
end
local function scopes_of(name)
  if watched() then return redis.call('HGET', S, name) or '' end
  return ''
end
local function drop(name, kind)
  note(kind, name, '', scopes_of(name))
  redis.call('HDEL', D, name)
  redis.call('HDEL', S, name)
  redis.call('ZREM', X, name)
end
local function fresh(name)
  local d = redis.call('ZSCORE', X, name)
  if d and tonumber(d) <= clock() then drop(name, 'e') end
end
local function purge(limit)
  if redis.call('EXISTS', X) == 0 then return end
  clock()
  local due = redis.call('ZRANGEBYSCORE', X, '-inf', nowtext, 'LIMIT', 0, limit)
  for i = 1, #due do drop(due[i], 'e') end
end
local function expire_in(name, ttl)
  if ttl == '' then redis.call('ZREM', X, name)
  else redis.call('ZADD', X, string.format('%.6f', clock() + tonumber(ttl)), name) end
end
"""
)

#: ARGV: name, value, scopes as JSON ('' for none), ttl ('' for none).
SET = """
purge(PURGE_BATCH)
fresh(ARGV[1])
note('s', ARGV[1], ARGV[2], ARGV[3])
redis.call('HSET', D, ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', S, ARGV[1], ARGV[3])
else redis.call('HDEL', S, ARGV[1]) end
expire_in(ARGV[1], ARGV[4])
return 1
"""

#: ARGV: name. Returns {} or {old value}.
REMOVE = """
purge(PURGE_BATCH)
fresh(ARGV[1])
local v = redis.call('HGET', D, ARGV[1])
if not v then return {} end
drop(ARGV[1], 'r')
return {v}
"""

#: Removes a name ``HRANDFIELD`` picks (Redis 6.2+; constant time, where a scan from the start of the hash
#: would walk more and more emptied slots as names go). Returns {} or {name, value}.
POPITEM = """
purge(PURGE_BATCH)
while true do
  local name = redis.call('HRANDFIELD', D)
  if not name then return {} end
  fresh(name)
  local v = redis.call('HGET', D, name)
  if v then
    drop(name, 'r')
    return {name, v}
  end
end
"""

#: ARGV: name, default. Returns {1} when it stored the default, else {0, stored value}.
SETDEFAULT = """
purge(PURGE_BATCH)
fresh(ARGV[1])
local cur = redis.call('HGET', D, ARGV[1])
if cur then return {0, cur} end
note('s', ARGV[1], ARGV[2], '')
redis.call('HSET', D, ARGV[1], ARGV[2])
return {1}
"""

#: ARGV: name, by, 'i' (by is an integer below EXACT_INT) or 'f' (a finite float), EXACT_INT, ttl of a
#: name it creates ('' for none). Returns {'ok', new value}, {'type', stored value} (not a plain number),
#: or {'py', stored text} (finish in Python: a Decimal, a stored integer or an integer sum at or beyond EXACT_INT, a
#: sum that is not finite).
INCR = """
purge(PURGE_BATCH)
fresh(ARGV[1])
local cur = redis.call('HGET', D, ARGV[1])
local limit = tonumber(ARGV[4])
local a, aint
if not cur then
  a, aint = 0, true
elseif string.find(cur, '^%-?%d+$') then
  -- Rounding is monotonic: a text at or beyond the limit never reads as a number below it.
  a, aint = tonumber(cur), true
  if a >= limit or a <= -limit then return {'py', cur} end
elseif string.find(cur, '^%-?%d+%.%d+$') or string.find(cur, '^%-?%d+%.?%d*e[%-%+]?%d+$') then
  a, aint = tonumber(cur), false
elseif string.sub(cur, 1, 9) == '{"$type":' then
  return {'py', cur}
else
  return {'type', cur}
end
local r = a + tonumber(ARGV[2])
local out
if aint and ARGV[3] == 'i' then
  if r >= limit or r <= -limit then return {'py', cur} end
  out = string.format('%.0f', r)
else
  if r ~= r or r == math.huge or r == -math.huge then return {'py', cur} end
  out = string.format('%.17g', r)
  if not string.find(out, '[%.e]') then out = out .. '.0' end
end
note('s', ARGV[1], out, scopes_of(ARGV[1]))
redis.call('HSET', D, ARGV[1], out)
if not cur and ARGV[5] ~= '' then expire_in(ARGV[1], ARGV[5]) end
return {'ok', out}
"""

#: ARGV: name, item. Returns {'ok', new length}, {'type', stored value}, or {'py', stored value}.
APPEND = """
purge(PURGE_BATCH)
fresh(ARGV[1])
local cur = redis.call('HGET', D, ARGV[1])
local n
if not cur then
  cur, n = '[' .. ARGV[2] .. ']', 1
else
  if string.byte(cur, 1) ~= 91 then return {'type', cur} end
  local ok, items = pcall(cjson.decode, cur)
  if not ok or type(items) ~= 'table' then return {'py', cur} end
  if cur == '[]' then cur = '[' .. ARGV[2] .. ']'
  else cur = string.sub(cur, 1, -2) .. ',' .. ARGV[2] .. ']' end
  n = #items + 1
end
note('s', ARGV[1], cur, scopes_of(ARGV[1]))
redis.call('HSET', D, ARGV[1], cur)
return {'ok', n}
"""

#: ARGV: name, expected text, new value, '1' if a missing name matches, '1' to compare texts.
#: Returns 1 (stored), 0 (missing, no match), or the stored text for Python to compare.
COMPARE_AND_SET = """
purge(PURGE_BATCH)
fresh(ARGV[1])
local cur = redis.call('HGET', D, ARGV[1])
if (not cur and ARGV[4] == '1') or (cur and ARGV[5] == '1' and cur == ARGV[2]) then
  note('s', ARGV[1], ARGV[3], scopes_of(ARGV[1]))
  redis.call('HSET', D, ARGV[1], ARGV[3])
  return 1
end
if not cur then return 0 end
return cur
"""

#: ARGV: name, '1' if the name must be missing, else '0'; the text it must hold; new value; ttl of a
#: name it creates ('' for none). Returns 1 if it stored the new value, 0 if the name no longer holds
#: what was read.
SWAP = """
purge(PURGE_BATCH)
fresh(ARGV[1])
local cur = redis.call('HGET', D, ARGV[1])
if ARGV[2] == '1' then
  if cur then return 0 end
elseif cur ~= ARGV[3] then
  return 0
end
note('s', ARGV[1], ARGV[4], scopes_of(ARGV[1]))
redis.call('HSET', D, ARGV[1], ARGV[4])
if not cur and ARGV[5] ~= '' then expire_in(ARGV[1], ARGV[5]) end
return 1
"""

#: ARGV: name, ttl ('' to remove the expiry). 1 if the name exists, else 0 (nothing changes).
EXPIRE = """
purge(PURGE_BATCH)
fresh(ARGV[1])
if redis.call('HEXISTS', D, ARGV[1]) == 0 then return 0 end
expire_in(ARGV[1], ARGV[2])
return 1
"""

CLEAR = """
note('c', '', '', '')
redis.call('DEL', D, S, X)
return 1
"""

#: ARGV: how many names past their deadline to remove at most.
PURGE = """
purge(tonumber(ARGV[1]))
return 1
"""

#: KEYS: the five, then ``NAMESPACE:watchers`` (a sorted set: a watching process' token by the deadline of
#: its registration, ms). ARGV: token, lease ms, the stream's cap this process needs, names to purge, the
#: highest entry number this process has seen in the stream. Registers (or renews) the process, makes
#: writers note changes for a lease (``watching``: this process' cap, the cap, the largest of the live
#: processes', and ``seq``), gives the stream the same lease (it goes when nobody watches any more), then
#: purges expired names. Returns {1 if changes may have gone unnoted or unseen since this process' last
#: tick, else 0; the number of the last entry}. Unnoted: the process' registration had lapsed, or its own
#: field was missing from ``watching`` (``watching`` was lost, expired, evicted or deleted, while it was
#: registered, whichever process made it again). Unseen: the numbers cannot go on (``watching`` and the
#: stream were both lost) or went back below what this process has read: they begin again from Redis'
#: ``TIME`` in microseconds, past any number a process has read, so every watcher's next read sees a gap.
WATCH = """
local nowms = math.floor(clock() * 1000)
local lease = tonumber(ARGV[2])
local P = KEYS[6]
local mine = redis.call('ZSCORE', P, ARGV[1])
local lapsed = 0
if not mine or tonumber(mine) < nowms then lapsed = 1 end
redis.call('ZREMRANGEBYSCORE', P, '-inf', nowms - 1)
redis.call('ZADD', P, nowms + lease, ARGV[1])
redis.call('PEXPIRE', P, lease)
if redis.call('HEXISTS', W, 'p:' .. ARGV[1]) == 0 then lapsed = 1 end
local seq = redis.call('HGET', W, 'seq')
if seq then
  seq = tonumber(seq)
else
  lapsed = 1
  if redis.call('EXISTS', C) == 1 then
    local info = redis.call('XINFO', 'STREAM', C)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local head, tail = string.match(info[i + 1], '^(%d+)-(%d+)$')
        if head == '0' then seq = tonumber(tail) end
      end
    end
  end
end
local seen = tonumber(ARGV[5])
if not seq or seq < seen then
  -- Numbering begins again: from Redis' clock in microseconds, a number past any a process can have read
  -- (a namespace would have to note more than a million changes a second to reach it).
  lapsed = 1
  local t = redis.call('TIME')
  seq = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), seen)
end
seq = string.format('%.0f', seq)
redis.call('HSET', W, 'p:' .. ARGV[1], ARGV[3], 'seq', seq)
local want = 0
local fields = redis.call('HGETALL', W)
for i = 1, #fields, 2 do
  local token = string.match(fields[i], '^p:(.*)$')
  if token then
    if redis.call('ZSCORE', P, token) then want = math.max(want, tonumber(fields[i + 1]))
    else redis.call('HDEL', W, fields[i]) end
  end
end
redis.call('HSET', W, 'cap', want)
redis.call('PEXPIRE', W, lease)
redis.call('PEXPIRE', C, lease)
cap = nil
purge(tonumber(ARGV[4]))
return {lapsed, seq}
"""

#: ``PRELUDE``'s notes, for what a ``MULTI`` block writes (``restore``, ``update``; the block runs them
#: first, as the scripts do) and to wake watchers. ARGV: kind, then name and value for each
#: change ('c' and 'R': none; 'w', which every watcher skips: only to wake them).
NOTE_MANY = """
if #ARGV == 1 then note(ARGV[1], '', '', '') end
for i = 2, #ARGV, 2 do note(ARGV[1], ARGV[i], ARGV[i + 1], '') end
return 1
"""

#: ARGV: names. Removes those among them past their deadline (noting ``expired``), and up to
#: ``PURGE_BATCH`` others: what ``update`` runs, in chunks, before its ``MULTI`` block writes.
FRESH = """
purge(PURGE_BATCH)
for i = 1, #ARGV do fresh(ARGV[i]) end
return 1
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

#: The scripts on a state's names, which open with ``PRELUDE`` (their KEYS: ``PRELUDE``'s).
_ON_NAMES = {
    "set": SET,
    "remove": REMOVE,
    "popitem": POPITEM,
    "setdefault": SETDEFAULT,
    "incr": INCR,
    "append": APPEND,
    "compare_and_set": COMPARE_AND_SET,
    "swap": SWAP,
    **READS_ON_NAMES,
    "expire": EXPIRE,
    "clear": CLEAR,
    "purge": PURGE,
    "watch": WATCH,
    "note_many": NOTE_MANY,
    "fresh": FRESH,
}

#: Every script, by the attribute name a connection registers it under.
SCRIPTS = {
    **{
        name: (PRELUDE + body).replace("PURGE_BATCH", str(PURGE_BATCH)).replace("NOTE_MAX", str(NOTE_MAX))
        for name, body in _ON_NAMES.items()
    },
    **READ_SCRIPTS,
    "acquire": ACQUIRE,
    "release": RELEASE,
    "renew": RENEW,
}
SCRIPTS.update(SEMAPHORE_SCRIPTS)
