"""The Redis (or Valkey) backend: a ``State`` whose dictionary lives in a Redis database.

``sharedstate.connect("redis://host:6379/0")`` (also ``rediss://`` and ``unix://`` URLs, and
``SHAREDSTATE_ADDRESS`` holding one) returns a ``RedisState``: the calls of ``State``, with the same
checks, the same value types (through the snapshot codec) and the same errors, on keys of one
namespace:

- ``NAMESPACE:data``, a hash of name to the value as typed JSON (``_codec``), and
  ``NAMESPACE:scopes``, a hash of name to its scopes as a JSON list (only names that have scopes);
- ``NAMESPACE:lock`` and ``NAMESPACE:lock:NAME``, the locks (a string: holder pid, process token and
  thread, with a lease), and ``NAMESPACE:wake[:NAME]``, a list a release pushes to so a waiter wakes.

Every call is one round trip and atomic in Redis: a single command, a ``MULTI``/``EXEC`` block, or a
Lua script. The scripts do exact arithmetic only where Lua's doubles are exact (integers below 10**15,
finite floats); any other ``incr``, and a ``compare_and_set`` whose stored text differs from the
expected value's text, is finished in Python with an optimistic compare-and-swap on the stored text,
so ``Decimal``, big integers and Python's ``==`` (``1 == 1.0 == True``, sets in any order) behave as on
the local server. ``names()`` walks the hash with ``HSCAN`` (inside a script, so only names travel),
never ``KEYS``.

Locks are leased: a ``SET NX PX`` with a token, renewed every third of the lease by a thread of the
holding process, released by a script that deletes the key only if it still holds the token. A dead
holder stops renewing, so its lock is free within the lease. Reentrancy is counted in the process.

redis-py is imported only when a Redis URL is used.
"""

from __future__ import annotations

import decimal
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from sharedstate._errors import AccessDenied, LockLost, ServerUnavailable, SharedStateError, SnapshotError
from sharedstate._errors import describe_lock as describe
from sharedstate._fork import after_fork_in_child
from sharedstate._pattern import compile_pattern
from sharedstate._sentinels import MISSING, STILL_HELD
from sharedstate._state import State
from sharedstate._values import PartBudget, check_name, check_names, check_scope, check_text, check_value
from sharedstate.persistence.codec import encode, object_hook
from sharedstate.persistence.files import caller_target
from sharedstate.persistence.snapshot import read_snapshot, write_snapshot
from sharedstate.wire.addresses import ENV_ADDRESS, check_call_timeout

log = logging.getLogger("sharedstate")

__all__ = ["DEFAULT_LEASE", "DEFAULT_NAMESPACE", "RedisState", "connect", "redis_url"]

#: URL schemes that name a Redis (or Valkey) server, as redis-py reads them.
SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_NAMESPACE = "sharedstate"
#: Seconds a lock stays held without renewal: a dead holder's lock is free within this time.
DEFAULT_LEASE = 2.0
#: Shortest and longest leases accepted (a renewal runs every third of the lease).
MIN_LEASE, MAX_LEASE = 0.1, 3600.0
#: Longest single wait of a lock waiter before it asks again (it wakes earlier on a release, or when
#: the holder's lease runs out).
WAIT_SLICE_S = 0.5
#: Redis serves the timeouts of blocking commands on its clock ticks (``hz``, 10 a second by default),
#: so a ``BLPOP`` timeout ends up to this much late. A release wakes a waiter at once all the same.
REDIS_TICK_S = 0.1
#: How often a waiter asks in the last moments before the holder's lease runs out or its own timeout
#: ends, where a ``BLPOP`` timeout would be too coarse.
POLL_S = 0.02
#: Names per HSCAN step.
SCAN_COUNT = 1000
#: Fields per HSET inside one MULTI block when many names are written at once.
WRITE_CHUNK = 10_000
#: Connecting may take this long before the server counts as unavailable (as for the local server).
CONNECT_TIMEOUT = 5.0
#: A reply may take this long by default (``connect(timeout=)``; redis-py's own default is no limit
#: before version 8, 5 s from 8 on).
REPLY_TIMEOUT = 30.0
_INSTALL_HINT = "pip install 'sharedstate[redis]'"

_NUMBER_TYPES = (int, float, decimal.Decimal)
#: Lua numbers are doubles: integers are exact below 2**53.
_EXACT_INT = 2**53
#: ``incr`` of a Decimal uses the context a fresh process has, as the local server does, whatever
#: context the calling thread has set.
_DECIMAL = decimal.Context(
    prec=28,
    rounding=decimal.ROUND_HALF_EVEN,
    Emin=-999999,
    Emax=999999,
    capitals=1,
    clamp=0,
    flags=[],
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

# -- Lua scripts ---------------------------------------------------------------------------------------
# Each returns integers, strings or arrays only (never a boolean, whose reply differs between RESP2
# and RESP3).

#: KEYS: data, scopes. ARGV: name, value, scopes as JSON ('' for none).
_SET = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
else redis.call('HDEL', KEYS[2], ARGV[1]) end
return 1
"""

#: KEYS: data, scopes. ARGV: name. Returns {} or {old value}.
_REMOVE = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return {} end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return {v}
"""

#: KEYS: data. ARGV: name, default. Returns {1} when it stored the default, else {0, stored value}.
_SETDEFAULT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return {1} end
return {0, redis.call('HGET', KEYS[1], ARGV[1])}
"""

#: KEYS: data. ARGV: name, by, 'i' (by is an exact integer) or 'f' (a finite float).
#: Returns {'ok', new value}, {'type', stored value} (not a number), or {'py'} (finish in Python:
#: a Decimal, a big integer, a non-finite result, anything Lua cannot add exactly).
_INCR = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local a, aint
if not cur then
  a, aint = 0, true
elseif string.find(cur, '^%-?%d+$') then
  if #cur > 16 or (#cur == 16 and string.byte(cur, 1) ~= 45) then return {'py'} end
  a, aint = tonumber(cur), true
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
  if r >= 9007199254740992 or r <= -9007199254740992 then return {'py'} end
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
_APPEND = """
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
_COMPARE_AND_SET = """
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

#: KEYS: data. ARGV: name, '1' if the name must be missing, else the text it must hold; new value.
#: Returns 1 if it stored the new value, 0 if the name no longer holds what was read.
_SWAP = """
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
_SCAN = """
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
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -3 end
return redis.call('PTTL', KEYS[1])
"""

#: KEYS: lock, wake list. ARGV: token, lease ms. Returns 1 if released, 0 if the token was not there.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, 0)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

#: KEYS: lock. ARGV: token, lease ms. Returns 1 if renewed, 0 if the lock is no longer this token's.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_SCRIPTS = {
    "set": _SET,
    "remove": _REMOVE,
    "setdefault": _SETDEFAULT,
    "incr": _INCR,
    "append": _APPEND,
    "compare_and_set": _COMPARE_AND_SET,
    "swap": _SWAP,
    "scan": _SCAN,
    "acquire": _ACQUIRE,
    "release": _RELEASE,
    "renew": _RENEW,
}

# -- redis-py, imported on first use -----------------------------------------------------------------
_redis_module: Any = None


class _NeverRaised(Exception):
    """Stands for redis-py's error class until redis-py is imported."""


_RedisError: type[BaseException] = _NeverRaised


def _import_redis() -> Any:
    global _redis_module, _RedisError
    if _redis_module is None:
        try:
            import redis
            import redis.exceptions
        except ImportError:
            raise ImportError(
                f"a Redis URL needs redis-py, an optional extra of sharedstate: {_INSTALL_HINT}"
            ) from None
        _RedisError = redis.exceptions.RedisError
        _redis_module = redis
    return _redis_module


# -- processes and forks -----------------------------------------------------------------------------
class _Process:
    """What identifies this process to Redis: a random token (pids repeat across hosts and over time),
    and a generation that a fork bumps. A forked child gets a new token, new connections and no locks."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(8)
        self.generation = 0

    def forked(self) -> None:
        self.token = secrets.token_hex(8)
        self.generation += 1


_process = _Process()
#: Serialises the opening of clients (replaced in a child: another thread may have held it at the fork).
_opening = threading.Lock()


@after_fork_in_child
def _after_fork_in_child() -> None:
    global _leases, _opening
    _process.forked()
    _opening = threading.Lock()
    # Locks belong to the parent's threads (the parent keeps renewing them); the child holds none.
    _leases = _Leases()


# -- values --------------------------------------------------------------------------------------------
def _dumps(value: Any) -> str:
    return json.dumps(encode(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _loads(raw: bytes) -> Any:
    return json.loads(raw, object_hook=object_hook)


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


# -- addresses -----------------------------------------------------------------------------------------
def redis_url(address: object = None) -> str | None:
    """``address`` (or ``SHAREDSTATE_ADDRESS`` when it is ``None``) if it is a Redis URL, else ``None``."""
    if address is None:
        address = os.environ.get(ENV_ADDRESS)
    if isinstance(address, str) and address.startswith(SCHEMES):
        return address
    return None


def _split_options(url: str) -> tuple[str, dict[str, str]]:
    """The URL without sharedstate's own query options (``namespace``, ``lease``), and those options.
    (Rebuilt as text: ``urlunsplit`` would turn ``unix:///path`` into ``unix:/path``.)"""
    base, _, rest = url.partition("?")
    query, mark, fragment = rest.partition("#")
    ours: dict[str, str] = {}
    theirs = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in ("namespace", "lease"):
            ours[key] = value
        else:
            theirs.append((key, value))
    if not ours:
        return url, ours
    return base + ("?" + urlencode(theirs) if theirs else "") + mark + fragment, ours


def _mask(url: str) -> str:
    """The URL with its password, if any, hidden (for messages and ``address``)."""
    netloc = urlsplit(url).netloc
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return url.replace(netloc, f"{user}:***@{host}", 1)


def _check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
    if not namespace:
        raise ValueError("namespace must not be empty")
    return check_text(str.__str__(namespace), "a namespace")


def _check_lease(lease: object) -> float:
    if isinstance(lease, str):
        try:
            lease = float(lease)
        except ValueError:
            raise ValueError(f"lease must be a number of seconds, not {lease!r}") from None
    if type(lease) not in (int, float):
        raise TypeError(f"lease must be a number of seconds, not {type(lease).__name__}")
    if not MIN_LEASE <= lease <= MAX_LEASE:  # also refuses NaN
        raise ValueError(f"lease must be between {MIN_LEASE:g} and {MAX_LEASE:g} seconds, not {lease!r}")
    return float(lease)


# -- connections ---------------------------------------------------------------------------------------
class _Conn:
    """One process' redis-py client of a ``RedisState``, with its scripts registered."""

    __slots__ = ("client", "generation", *_SCRIPTS)

    def __init__(self, url: str, timeout: float = REPLY_TIMEOUT) -> None:
        redis = _import_redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            # A Redis server that stops answering (SIGSTOP, a frozen host) fails the call after it.
            "socket_timeout": timeout,
            # No silent retries: a script whose reply was lost may have run, and running it again
            # would count twice. A failed call raises ServerUnavailable, as on the local server.
            "retry": Retry(NoBackoff(), 0),
        }
        # Options in the URL's query win (redis-py lets them override keyword arguments).
        self.client = redis.Redis.from_url(url, **options)
        self.generation = _process.generation
        for name, source in _SCRIPTS.items():
            setattr(self, name, self.client.register_script(source))


def _translate(exc: BaseException, address: str, call: str) -> BaseException:
    """A redis-py error as the error sharedstate raises for the same failure of the local server."""
    errors = _redis_module.exceptions
    text = str(exc) or type(exc).__name__
    if isinstance(exc, getattr(errors, "AuthenticationError", ())) or text.startswith(("NOAUTH", "WRONGPASS")):
        return AccessDenied(f"the Redis server at {address} refused the credentials: {text}", address)
    if isinstance(exc, getattr(errors, "NoPermissionError", ())):
        return AccessDenied(f"the Redis server at {address} refused {call}(): {text}", address)
    if isinstance(exc, (errors.ConnectionError, errors.TimeoutError)):
        if call == "connect":
            return ServerUnavailable(f"no Redis server answers at {address}: {text}", address)
        return ServerUnavailable(f"the Redis server at {address} went away during {call}(): {text}", address)
    return SharedStateError(f"the Redis server at {address} failed in {call}(): {text}")


def _redis_call(function: Callable[..., Any]) -> Callable[..., Any]:
    """Raise sharedstate's errors, not redis-py's, from a ``RedisState`` call."""
    call = function.__name__.strip("_")

    def wrapper(self: RedisState, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(self, *args, **kwargs)
        except _RedisError as exc:
            raise _translate(exc, self.address, call) from None

    wrapper.__name__ = function.__name__
    wrapper.__qualname__ = function.__qualname__
    # A call of State keeps its documentation, unless this backend says more.
    wrapper.__doc__ = function.__doc__ or getattr(getattr(State, function.__name__, None), "__doc__", None)
    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


# -- the state -----------------------------------------------------------------------------------------
class RedisState(State):
    """A ``State`` kept in Redis or Valkey, under the keys of one namespace.

    Every call of ``State``, with the same checks, value types and errors; each is one round trip and
    atomic in Redis. Locks are leased: free within ``lease`` seconds of their holder's death, and renewed
    by the holding process in the background as long as it lives. The handle pickles (URL, namespace
    and lease) and opens its own connections in each process, also after a fork.

    ``save()`` and ``restore()`` write and read snapshot files in the calling process, in the local
    server's format, so a state moves between the two backends in either direction; ``save()`` needs a
    path (there is no server file).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str | None = None,
        lease: float | None = None,
        cache: bool = True,
        timeout: float = REPLY_TIMEOUT,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(SCHEMES):
            raise ValueError(f"not a Redis URL: {url!r} (expected redis://, rediss:// or unix://)")
        clean, options = _split_options(url)
        if namespace is not None and "namespace" in options and options["namespace"] != namespace:
            raise ValueError(
                f"two namespaces given: {options['namespace']!r} in the URL and {namespace!r} as an argument"
            )
        self._url = clean
        self._namespace = _check_namespace(
            namespace if namespace is not None else options.get("namespace", DEFAULT_NAMESPACE)
        )
        self._lease = _check_lease(lease if lease is not None else options.get("lease", DEFAULT_LEASE))
        self._lease_ms = max(1, round(self._lease * 1000))
        #: Accepted for the same signature as ``connect()``; a Redis state has no client cache.
        self._cache = bool(cache)
        #: The deadline of one reply (redis-py's ``socket_timeout``).
        self._timeout = check_call_timeout(timeout)
        self._address = _mask(url)
        prefix = self._namespace + ":"
        self._prefix = prefix
        self._data_key = prefix + "data"
        self._scopes_key = prefix + "scopes"
        self._keys = [self._data_key, self._scopes_key]
        self._conn_: _Conn | None = None

    # -- plumbing -----------------------------------------------------------------------------------
    @property
    def _conn(self) -> _Conn:
        conn = self._conn_
        if conn is None or conn.generation != _process.generation:
            with _opening:
                conn = self._conn_
                if conn is None or conn.generation != _process.generation:
                    # After a fork the parent's client is left alone: its sockets are the parent's.
                    conn = self._conn_ = _Conn(self._url, self._timeout)
        return conn

    @property
    def address(self) -> str:
        """The Redis URL (its password hidden)."""
        return self._address

    @property
    def namespace(self) -> str:
        """The prefix of this state's keys in the Redis database."""
        return self._namespace

    @property
    def lease(self) -> float:
        """Seconds a lock of this state stays held without renewal."""
        return self._lease

    @_redis_call
    def _connect(self) -> None:
        self._conn.client.ping()

    def close(self) -> None:
        """Close this process' connections to Redis (they are opened again by the next call). Locks
        held stay held, and renewed."""
        conn = self._conn_
        if conn is not None and conn.generation == _process.generation:
            conn.client.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # The URL, password included, travels with the handle, as the key does with a local one.
        return (_rebuild, (self._url, self._namespace, self._lease, self._cache, self._address, self._timeout))

    def __repr__(self) -> str:
        return f"<sharedstate.State at {self.address} namespace {self._namespace!r}>"

    def _call(self, method: str, args: tuple[Any, ...]) -> Any:
        """The lock calls of the local server's protocol (``Lock`` and ``aio`` use them)."""
        try:
            handler = _LOCK_CALLS[method]
        except KeyError:
            raise SharedStateError(f"{method}() is not a call of the Redis backend") from None
        return handler(self, *args)

    # -- Pode's calls -------------------------------------------------------------------------------
    @_redis_call
    def get(self, name: str, default: Any = None) -> Any:
        raw = self._conn.client.hget(self._data_key, check_name(name))
        return default if raw is None else _loads(raw)

    @_redis_call
    def set(self, name: str, value: Any, *, scope: str | Iterable[str] | None = None) -> Any:
        name = check_name(name)
        check_value(name, value)
        scopes = check_scope(scope)
        text = _dumps(value)
        self._conn.set(keys=self._keys, args=[name, text, json.dumps(list(scopes)) if scopes else ""])
        return value

    @_redis_call
    def remove(self, name: str) -> Any:
        found = self._conn.remove(keys=self._keys, args=[check_name(name)])
        return _loads(found[0]) if found else None

    @_redis_call
    def contains(self, name: str) -> bool:
        return bool(self._conn.client.hexists(self._data_key, check_name(name)))

    @_redis_call
    def names(self, pattern: str | None = None, *, scope: str | Iterable[str] | None = None) -> list[str]:
        checked = None if pattern is None else compile_pattern(pattern)
        scopes = check_scope(scope)  # an empty list: no filter (Pode's rule)
        if scopes:
            wanted = set(scopes)
            found = {
                _text(name)
                for name, value in self._scan(self._scopes_key, True)
                if not wanted.isdisjoint(json.loads(value))
            }
        else:
            found = {_text(name) for name, _ in self._scan(self._data_key, False)}
        # Matched in this process, so a backtracking pattern costs only its caller.
        names = checked.filter(found) if checked is not None else list(found)
        names.sort()
        return names

    def _scan(self, key: str, values: bool) -> Iterator[tuple[bytes, bytes | None]]:
        """Every field of a hash (and its value when ``values``), by HSCAN steps (a field may come twice)."""
        script = self._conn.scan
        cursor: bytes | int = 0
        flag = "1" if values else "0"
        while True:
            reply = script(keys=[key], args=[cursor, SCAN_COUNT, flag])
            cursor, items = reply[0], reply[1:]
            if values:
                yield from zip(items[::2], items[1::2], strict=True)
            else:
                for item in items:
                    yield item, None
            if int(cursor) == 0:
                return

    @_redis_call
    def clear(self) -> None:
        self._conn.client.delete(self._data_key, self._scopes_key)

    # -- atomic calls -------------------------------------------------------------------------------
    @_redis_call
    def incr(self, name: str, by: int | float = 1) -> Any:
        name = check_name(name)
        kind = type(by)
        if kind not in _NUMBER_TYPES:
            raise TypeError(f"cannot incr {name!r} by {kind.__name__}: by must be an int, float or Decimal")
        if kind is decimal.Decimal:
            check_value(name, by)  # a signalling NaN: ValueError
        if (kind is int and -_EXACT_INT < by < _EXACT_INT) or (kind is float and math.isfinite(by)):
            reply = self._conn.incr(keys=self._keys[:1], args=[name, repr(by), "i" if kind is int else "f"])
            status = reply[0]
            if status == b"ok":
                return _loads(reply[1])
            if status == b"type":
                current = _loads(reply[1])
                if type(current) not in _NUMBER_TYPES:
                    raise TypeError(f"cannot incr {name!r}: it holds {type(current).__name__}, not a number")
        return self._swap(name, lambda current: _add(name, current, by))

    @_redis_call
    def setdefault(self, name: str, default: Any) -> Any:
        name = check_name(name)
        check_value(name, default)
        reply = self._conn.setdefault(keys=self._keys[:1], args=[name, _dumps(default)])
        return default if reply[0] == 1 else _loads(reply[1])

    @_redis_call
    def compare_and_set(self, name: str, expected: Any, new: Any) -> bool:
        name = check_name(name)
        check_value(name, expected)
        check_value(name, new)
        known = _dumps(expected)
        new_text = _dumps(new)
        # Equal texts mean equal values, except for NaN, which equals nothing: compare those in Python.
        texts = "0" if '"nan"' in known else "1"
        missing_matches = "1" if expected is None else "0"
        while True:
            reply = self._conn.compare_and_set(
                keys=self._keys[:1], args=[name, known, new_text, missing_matches, texts]
            )
            if reply == 1:
                return True
            if reply == 0 or _loads(reply) != expected:
                return False
            # Equal by ==, though written differently (1 and 1.0, a set in another order): store the
            # new value if the name still holds exactly that text.
            known, texts = _text(reply), "1"

    @_redis_call
    def append(self, name: str, item: Any) -> int:
        name = check_name(name)
        check_value(name, item)
        reply = self._conn.append(keys=self._keys[:1], args=[name, _dumps(item)])
        status = reply[0]
        if status == b"ok":
            return int(reply[1])
        if status == b"type":
            current = _loads(reply[1])
            if type(current) is not list:
                raise TypeError(f"cannot append to {name!r}: it holds {type(current).__name__}, not a list")
        return len(self._swap(name, lambda current: _appended(name, current, item)))

    def _swap(self, name: str, change: Callable[[Any], Any]) -> Any:
        """Read ``name``, compute its new value in Python, and store it if the name still holds what was
        read (else read again). ``change`` gets ``MISSING`` for a missing name, and may raise to leave
        everything unchanged. Returns the new value."""
        conn = self._conn
        while True:
            raw = conn.client.hget(self._data_key, name)
            new = change(MISSING if raw is None else _loads(raw))
            args = [name, "1", "", _dumps(new)] if raw is None else [name, "0", raw, _dumps(new)]
            if conn.swap(keys=self._keys[:1], args=args) == 1:
                return new

    @_redis_call
    def update(self, mapping: Mapping[str, Any]) -> None:
        if not isinstance(mapping, Mapping):
            raise TypeError(f"update() takes a mapping of names to values, not {type(mapping).__name__}")
        encoded, budget = {}, PartBudget()  # one budget: each value is encoded in full
        for name, value in mapping.items():
            name = check_name(name)
            check_value(name, value, budget)
            encoded[name] = value
        if not encoded:
            return
        encoded = {name: _dumps(value) for name, value in encoded.items()}
        pipe = self._conn.client.pipeline(transaction=True)
        self._write(pipe, encoded, {}, merge=True)
        pipe.execute()

    def _write(self, pipe: Any, encoded: dict[str, str], scopes: dict[str, str], merge: bool) -> None:
        """Queue the commands that store ``encoded`` values with ``scopes`` (names without any lose
        theirs); with ``merge=False`` everything else goes first."""
        if not merge:
            pipe.delete(self._data_key, self._scopes_key)
        names = list(encoded)
        for start in range(0, len(names), WRITE_CHUNK):
            chunk = names[start : start + WRITE_CHUNK]
            pipe.hset(self._data_key, mapping={n: encoded[n] for n in chunk})
            if merge:
                pipe.hdel(self._scopes_key, *chunk)
        items = list(scopes.items())
        for start in range(0, len(items), WRITE_CHUNK):
            pipe.hset(self._scopes_key, mapping=dict(items[start : start + WRITE_CHUNK]))

    @_redis_call
    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        wanted = check_names(names)
        if not wanted:
            return {}
        values = self._conn.client.hmget(self._data_key, wanted)
        return {name: _loads(raw) for name, raw in zip(wanted, values, strict=True) if raw is not None}

    @_redis_call
    def snapshot(self) -> dict[str, Any]:
        return {_text(name): _loads(raw) for name, raw in self._conn.client.hgetall(self._data_key).items()}

    @_redis_call
    def save(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        scope: str | Iterable[str] | None = None,
    ) -> Path:
        """Write a snapshot of the state to ``path`` (JSON, atomically, mode 0600, the previous file kept
        as ``NAME.bak``), in the calling process; return the path written. The file is the one the local
        server writes, so ``restore`` of either backend reads it.

        ``scope`` keeps names having any of those scopes, ``include`` keeps only the names listed, and
        ``exclude`` drops names, in that order (Pode's). Raises ``ValueError`` without a ``path``: a
        Redis state has no file of its own (Redis' persistence keeps its data), and the ``OSError`` of a
        failed write (the previous file is then untouched).
        """
        target = _target(path, "save")
        # An empty list is no filter (Pode's rule), as for names(scope=[]).
        include_list = (check_names(include) if include is not None else None) or None
        exclude_list = check_names(exclude) if exclude is not None else None
        wanted = set(check_scope(scope))
        pipe = self._conn.client.pipeline(transaction=True)
        pipe.hgetall(self._data_key)
        pipe.hgetall(self._scopes_key)
        raw_data, raw_scopes = pipe.execute()
        scopes = {_text(name): tuple(json.loads(value)) for name, value in raw_scopes.items()}
        names = [_text(name) for name in raw_data]
        if wanted:
            names = [n for n in names if not wanted.isdisjoint(scopes.get(n, ()))]
        if include_list is not None:
            present = set(names)
            names = [n for n in dict.fromkeys(include_list) if n in present]
        if exclude_list:
            dropped = set(exclude_list)
            names = [n for n in names if n not in dropped]
        data = {name: _loads(raw_data[name.encode("utf-8")]) for name in names}
        write_snapshot(target, data, scopes, ours=False)  # a path the caller chose
        return target

    @_redis_call
    def restore(self, path: str | os.PathLike[str] | None = None, *, merge: bool = False) -> int:
        """Load a snapshot file (the local server's format, or a Pode state file) from ``path``, read in
        the calling process; return the number of names it held. With ``merge=False`` it replaces the
        whole state (in one ``MULTI`` block); with ``merge=True`` its names are set over the current ones.
        A missing file, or one that is empty or only white space, restores 0 names and changes nothing;
        an invalid one raises ``SnapshotError`` and changes nothing. Raises ``ValueError`` without a path.
        """
        if type(merge) is not bool:
            raise TypeError(f"merge must be a bool, not {type(merge).__name__}")
        target = _target(path, "restore")
        snapshot = read_snapshot(target)
        if snapshot is None:
            return 0
        data = snapshot.data
        try:
            for name, value in data.items():
                if snapshot.foreign:  # Pode's JSON may hold any shape
                    check_value(name, value)
                check_name(name)
            encoded = {name: _dumps(value) for name, value in data.items()}
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"{target} is not a valid snapshot: {exc}", str(target)) from None
        scopes = {name: json.dumps(list(scope)) for name, scope in snapshot.scopes.items() if scope and name in data}
        pipe = self._conn.client.pipeline(transaction=True)
        self._write(pipe, encoded, scopes, merge=merge)
        pipe.execute()
        return len(data)

    @_redis_call
    def stats(self) -> dict[str, Any]:
        """Figures of the Redis server and of this namespace, under the keys of the local server's
        ``stats()``: ``names`` (this namespace), ``pid`` (the Redis server's process, on its host),
        ``rss_bytes``, ``uptime_s``, ``ops`` (commands the server processed, for every client and
        database), ``clients`` (connections to the server), ``last_save_at``/``last_save_s``/
        ``last_save_error`` (``None``: a Redis state has no scheduled saves of its own), and
        ``lock_recoveries`` (0: expired leases are not counted). Also ``backend`` (``"redis"``),
        ``address``, ``namespace``, ``lease_s``, ``redis_version``, ``redis_last_save_at`` (Redis' own
        last RDB save, Unix time), ``redis_changes_since_last_save`` and ``redis_aof_enabled``."""
        pipe = self._conn.client.pipeline(transaction=False)
        pipe.hlen(self._data_key)
        pipe.info()
        names, info = pipe.execute()
        return {
            "names": int(names),
            "pid": info.get("process_id"),
            "rss_bytes": info.get("used_memory_rss"),
            "uptime_s": info.get("uptime_in_seconds"),
            "ops": info.get("total_commands_processed"),
            "clients": info.get("connected_clients"),
            "last_save_at": None,
            "last_save_s": None,
            "last_save_error": None,
            "lock_recoveries": 0,
            "backend": "redis",
            "address": self.address,
            "namespace": self._namespace,
            "lease_s": self._lease,
            "redis_version": info.get("redis_version"),
            "redis_last_save_at": info.get("rdb_last_save_time"),
            "redis_changes_since_last_save": info.get("rdb_changes_since_last_save"),
            "redis_aof_enabled": bool(info.get("aof_enabled", 0)),
        }

    # -- mapping sugar ------------------------------------------------------------------------------
    @_redis_call
    def __getitem__(self, name: str) -> Any:
        name = check_name(name)
        raw = self._conn.client.hget(self._data_key, name)
        if raw is None:
            raise KeyError(name)
        return _loads(raw)

    @_redis_call
    def __delitem__(self, name: str) -> None:
        name = check_name(name)
        if not self._conn.remove(keys=self._keys, args=[name]):
            raise KeyError(name)

    @_redis_call
    def __len__(self) -> int:
        return int(self._conn.client.hlen(self._data_key))

    # -- locks (reached through ``_call``, as ``Lock`` and ``aio.AsyncLock`` call them) ----------------
    def _lock_keys(self, name: str | None) -> tuple[str, str]:
        if name is None:
            return self._prefix + "lock", self._prefix + "wake"
        return f"{self._prefix}lock:{name}", f"{self._prefix}wake:{name}"

    _renews_leases = True

    @_redis_call
    def _lock_acquire(
        self,
        name: str | None,
        owner: Any,
        blocking: bool,
        timeout: float | None,
        lease: float | None = None,
        held: int = 0,
    ) -> bool:
        """``lease``: this lock's own lease (default: the state's); ``held`` is the generic client's
        count, not needed here: this process keeps its own."""
        key, wake = self._lock_keys(name)
        ident = (self._url, key)
        leases = _leases
        if leases.reenter(ident, owner):
            return True
        lease = self._lease if lease is None else _check_lease(lease)
        lease_ms = max(1, round(lease * 1000))
        token = f"{os.getpid()}:{_process.token}:{owner}"
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self._conn
        while True:
            left = conn.acquire(keys=[key], args=[token, lease_ms])
            if left == -3:
                leases.add(ident, _Held(self, conn, name, key, token, owner, lease))
                return True
            if not blocking:
                return False
            if left == -2:
                continue  # released between the two commands of the script: ask again at once
            now = time.monotonic()
            until = now + WAIT_SLICE_S
            if left >= 0:  # the holder's lease runs out then, unless it renews it or releases first
                until = min(until, now + left / 1000 + 0.001)
            if deadline is not None:
                if now >= deadline:
                    return False
                until = min(until, deadline)
            # A blocking wait also stays well inside the reply timeout, so it is never taken for a
            # server that stopped answering.
            span = min(until, now + self._timeout / 2) - now
            if span > 2 * REDIS_TICK_S:
                # Woken at once by a release; the timeout itself is served on one of Redis' ticks, so
                # it may end up to a tick late: ask for one tick less.
                conn.client.blpop([wake], timeout=span - REDIS_TICK_S)
            else:  # the last moments before the lease runs out or the caller gives up: on time
                time.sleep(min(span, POLL_S))

    @_redis_call
    def _lock_release(self, name: str | None, owner: Any, held_count: int = 0) -> None:
        key, wake = self._lock_keys(name)
        held = _leases.leave(self._url, key, owner)
        if held is None:
            holder = self._lock_owner(name)
            raise RuntimeError(
                f"cannot release {describe(name)}: this thread does not hold it "
                f"(held by {'nobody' if holder is None else f'pid {holder}'})"
            )
        if held is STILL_HELD:
            return
        released = self._conn.release(keys=[key, wake], args=[held.token, held.lease_ms])
        if released != 1 or held.lost:
            raise LockLost(
                f"cannot release {describe(name)}: its lease of {held.lease:g} s ran out before it was renewed "
                "(was this process stopped, or Redis out of reach?), so another process may have held it too",
                name,
            )

    @_redis_call
    def _lock_locked(self, name: str | None) -> bool:
        return bool(self._conn.client.exists(self._lock_keys(name)[0]))

    @_redis_call
    def _lock_owner(self, name: str | None) -> int | None:
        raw = self._conn.client.get(self._lock_keys(name)[0])
        if raw is None:
            return None
        try:
            return int(_text(raw).split(":", 1)[0])
        except ValueError:
            return None


_LOCK_CALLS: dict[str, Callable[..., Any]] = {
    "lock_acquire": RedisState._lock_acquire,
    "lock_release": RedisState._lock_release,
    "lock_locked": RedisState._lock_locked,
    "lock_owner": RedisState._lock_owner,
}


def _add(name: str, current: Any, by: Any) -> Any:
    """``incr``'s arithmetic, as the local server does it."""
    if current is MISSING:
        current = 0
    if type(current) not in _NUMBER_TYPES:
        raise TypeError(f"cannot incr {name!r}: it holds {type(current).__name__}, not a number")
    try:
        with decimal.localcontext(_DECIMAL):
            return current + by
    except TypeError:
        raise TypeError(f"cannot incr {name!r}: cannot add {type(by).__name__} to {type(current).__name__}") from None
    except decimal.DecimalException as exc:  # an overflow (the context traps it)
        raise ValueError(f"cannot incr {name!r} by {by!r}: {type(exc).__name__}") from None


def _appended(name: str, current: Any, item: Any) -> list[Any]:
    if current is MISSING:
        return [item]
    if type(current) is not list:
        raise TypeError(f"cannot append to {name!r}: it holds {type(current).__name__}, not a list")
    return [*current, item]


def _target(path: object, verb: str) -> Path:
    if path is None:
        raise ValueError(
            f"{verb}() on a Redis state needs a path: it has no snapshot file of its own "
            "(Redis' own persistence keeps its data)"
        )
    return caller_target(path, verb)  # the same rules as the local server's: a regular file, resolved here


# -- leases --------------------------------------------------------------------------------------------
class _Held:
    """A lock this process holds: who holds it, how often, and when to renew its lease."""

    __slots__ = (
        "state", "conn", "name", "key", "token", "owner", "count", "renew_at", "lost", "lease", "lease_ms",
        "__weakref__",
    )  # fmt: skip

    def __init__(
        self, state: RedisState, conn: _Conn, name: str | None, key: str, token: str, owner: Any, lease: float
    ) -> None:
        self.state = state
        self.conn = conn
        self.name = name
        self.key = key
        self.token = token
        self.owner = owner
        self.count = 1
        self.lease = lease
        self.lease_ms = max(1, round(lease * 1000))
        self.renew_at = time.monotonic() + lease / 3
        #: The lease ran out before a renewal: another process may have taken the lock.
        self.lost = False


class _Leases:
    """The locks this process holds, and the thread that renews their leases every third of a lease."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[tuple[str, str], _Held] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def reenter(self, ident: tuple[str, str], owner: Any) -> bool:
        """Count one more acquire by ``owner`` if it holds the lock; ``LockLost`` (and the lock forgotten)
        if its lease was lost."""
        with self._mutex:
            held = self._held.get(ident)
            if held is not None and held.owner == owner:
                if held.lost:
                    del self._held[ident]
                    raise LockLost(
                        f"{describe(held.name)} is no longer held by this thread: its lease of {held.lease:g} s "
                        "ran out before it was renewed, so another process may have held it since",
                        held.name,
                    )
                held.count += 1
                return True
            return False

    def add(self, ident: tuple[str, str], held: _Held) -> None:
        with self._mutex:
            self._held[ident] = held
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew_forever, name="sharedstate-leases", daemon=True)
                self._thread.start()
        self._wake.set()

    def leave(self, url: str, key: str, owner: Any) -> _Held | None:
        """Count one release by ``owner``: ``None`` if it does not hold the lock, ``STILL_HELD`` if it
        still does (reentrancy), else the lock, forgotten here (the caller releases it in Redis)."""
        with self._mutex:
            held = self._held.get((url, key))
            if held is None or held.owner != owner:
                return None
            held.count -= 1
            if held.count:
                return STILL_HELD
            del self._held[(url, key)]
            return held

    def _renew_forever(self) -> None:
        while True:
            self._wake.clear()
            with self._mutex:
                held = [h for h in self._held.values() if not h.lost]
            now = time.monotonic()
            for h in held:
                if h.renew_at <= now:
                    try:
                        self._renew(h)
                    except Exception:  # never let this thread die: every held lock depends on it
                        h.renew_at = time.monotonic() + min(0.1, h.lease / 10)
                        log.exception("renewing the lease of %s failed", describe(h.name))
            with self._mutex:
                pending = [h.renew_at for h in self._held.values() if not h.lost]
            self._wake.wait(max(0.0, min(pending) - time.monotonic()) if pending else None)

    def _renew(self, held: _Held) -> None:
        state = held.state
        try:
            renewed = held.conn.renew(keys=[held.key], args=[held.token, held.lease_ms])
        except _RedisError as exc:
            # Try again soon: the lease is lost only if no renewal gets through before it runs out.
            held.renew_at = time.monotonic() + min(0.1, held.lease / 10)
            log.warning("could not renew the lease of %s at %s: %s", describe(held.name), state.address, exc)
            return
        if renewed == 1:
            held.renew_at = time.monotonic() + held.lease / 3
            return
        with self._mutex:
            if self._held.get((state._url, held.key)) is not held:
                return  # released meanwhile
            held.lost = True
        log.warning(
            "lost %s at %s: its lease of %g s ran out before it was renewed",
            describe(held.name),
            state.address,
            held.lease,
        )


_leases = _Leases()


# -- connecting ----------------------------------------------------------------------------------------
def _rebuild(
    url: str, namespace: str, lease: float, cache: bool, address: str, timeout: float = REPLY_TIMEOUT
) -> RedisState:
    state = RedisState(url, namespace=namespace, lease=lease, cache=cache, timeout=timeout)
    state._address = address
    return state


def connect(
    address: object = None,
    authkey: bytes | None = None,
    *,
    cache: bool = True,
    namespace: str | None = None,
    lease: float | None = None,
    timeout: float = REPLY_TIMEOUT,
) -> RedisState | None:
    """``sharedstate.connect()`` for a Redis URL: a connected ``RedisState``, or ``None`` when
    ``address`` (or ``SHAREDSTATE_ADDRESS``, when ``address`` is ``None``) is not a Redis URL.

    ``namespace`` (default ``"sharedstate"``, or ``?namespace=`` in the URL) prefixes every key, so
    several states share one database; ``lease`` (seconds, default 2, or ``?lease=``) bounds how long a
    dead holder's lock stays held. A password goes in the URL (``redis://:PASSWORD@host:6379/0``), not
    in ``authkey``. ``cache`` is accepted and ignored. Raises ``ServerUnavailable`` when no Redis server
    answers (within 5 seconds), ``AccessDenied`` when it refuses the credentials, and ``ImportError``
    naming ``pip install 'sharedstate[redis]'`` without redis-py. A reply that takes longer than
    ``timeout`` seconds (a Redis server that stopped answering) raises ``ServerUnavailable``; lock waits
    are made of shorter blocking waits, so they are not cut short by it.
    """
    url = redis_url(address)
    if url is None:
        if namespace is not None or lease is not None:
            raise TypeError(
                "namespace and lease are options of a Redis state: give a redis://, rediss:// or unix:// URL"
            )
        return None
    if authkey is not None:
        raise ValueError(
            f"{_mask(url)} is a Redis URL: give its password in the URL (redis://:PASSWORD@host), not as authkey"
        )
    state = RedisState(url, namespace=namespace, lease=lease, cache=cache, timeout=timeout)
    state._connect()
    return state
