"""``RedisBackend``: the ``Backend`` operations on the keys of one namespace of a Redis database.

Each operation is a ``steps.Operation`` (``connection.operation``): what it sends and how it reads the
replies, without I/O, so the blocking face and the asyncio one (``aio_redis``) run the same code.
Arguments arrive checked by ``State``; what depends on the stored values (``incr`` of text, ``append``
to a number, which ``compare_and_set`` matches, the filters of ``save``, the check of a restored file) is
decided by ``_rules``, the same functions the local server uses.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Generator, Hashable
from typing import Any

from sharedstate import _fork
from sharedstate._figures import ThreadCalls, WaitWindow
from sharedstate._fork import after_fork_in_child
from sharedstate._pattern import Pattern
from sharedstate._rules import add, appended, matches, past, scoped
from sharedstate._sentinels import MISSING, NOT_CACHED
from sharedstate.backends.redis.connection import REPLY_TIMEOUT, AsyncConnection, Connection, operation, redis_call
from sharedstate.backends.redis.connection import text as _text
from sharedstate.backends.redis.figures import lock_holders
from sharedstate.backends.redis.files import FileCalls
from sharedstate.backends.redis.locks import LockCalls
from sharedstate.backends.redis.scripts import EXACT_INT
from sharedstate.backends.redis.semaphores import SemaphoreCalls
from sharedstate.backends.redis.steps import Command, Operation, Pipeline, Script
from sharedstate.backends.redis.stored import dumps, loads, seconds
from sharedstate.backends.redis.stored import ttl_arg as _ttl
from sharedstate.backends.redis.url import Target
from sharedstate.backends.redis.watch import Cursor, Watcher
from sharedstate.wire.cache import cache_figures

__all__ = ["RedisBackend", "dumps", "loads"]

#: Names per HSCAN step of ``names()``.
SCAN_COUNT = 1000

#: Serialises the opening of connections (replaced in a child: another thread may have held it at the fork).
_opening = threading.Lock()


@after_fork_in_child
def _after_fork_in_child() -> None:
    global _opening
    _opening = threading.Lock()


class RedisBackend(FileCalls, LockCalls, SemaphoreCalls):
    """A state kept in Redis or Valkey, under the keys of one namespace (``scripts`` says how each call
    stays atomic; ``locks`` has the lock calls). It pickles as its target (URL with password, namespace,
    lease) and reply timeout, and opens its own connection in each process, also after a fork."""

    #: Held locks are renewed by this process' lease thread (``leases``), not by ``Lock``.
    renews_leases = True

    def __init__(self, target: Target, timeout: float = REPLY_TIMEOUT) -> None:
        self._target = target
        self._url = target.url
        #: The deadline of one reply (redis-py's ``socket_timeout``), checked by ``backends.open_backend``.
        self._timeout = timeout
        prefix = target.namespace + ":"
        self._prefix = prefix
        self._data_key = prefix + "data"
        self._scopes_key = prefix + "scopes"
        self._deadlines_key = prefix + "deadlines"
        self._changes_key = prefix + "changes"
        #: The keys every script on the names takes (``scripts.PRELUDE``).
        self._keys = [self._data_key, self._scopes_key, self._deadlines_key, self._changes_key, prefix + "watching"]
        self._conn_: Connection | None = None
        #: This handle's calls in this process, by name (``redis_call`` counts them), and its lock waits.
        self.counted = ThreadCalls()
        self.waits = WaitWindow()

    # -- plumbing -----------------------------------------------------------------------------------
    @property
    def _conn(self) -> Connection:
        conn = self._conn_
        if conn is None or conn.generation != _fork.generation:
            with _opening:
                conn = self._conn_
                if conn is None or conn.generation != _fork.generation:
                    # After a fork the parent's client is left alone: its sockets are the parent's.
                    conn = self._conn_ = Connection(self._url, self._timeout)
        return conn

    def async_connection(self) -> AsyncConnection:
        """A new asyncio connection to the same server, with the same options (``aio_redis``)."""
        return AsyncConnection(self._url, self._timeout)

    @property
    def address(self) -> str:
        """The Redis URL as given (its password hidden)."""
        return self._target.address

    @property
    def identity(self) -> Hashable:
        return (self._target.address, self._target.namespace)

    @property
    def namespace(self) -> str:
        """The prefix of this state's keys in the Redis database."""
        return self._target.namespace

    @property
    def lease(self) -> float:
        """Seconds a lock of this state stays held without renewal."""
        return self._target.lease

    @property
    def timeout(self) -> float:
        """The deadline of one reply, in seconds (lock waits are made of shorter blocking waits)."""
        return self._timeout

    @redis_call
    def connect(self) -> None:
        """Open this process' connection and check that Redis answers (a ``PING``)."""
        self._conn.client.ping()

    def close(self) -> None:
        """Close this process' connections to Redis (the next call opens them again). Locks held stay
        held, and renewed."""
        conn = self._conn_
        if conn is not None and conn.generation == _fork.generation:
            conn.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # The URL, password included, travels with the backend, as the key does with a local one.
        return (type(self), (self._target, self._timeout))

    def __repr__(self) -> str:
        return f"<RedisBackend at {self.address} namespace {self.namespace!r}>"

    # -- reads --------------------------------------------------------------------------------------
    @operation
    def get(self, name: str) -> Operation:
        raw = yield Script("get", [self._data_key, self._deadlines_key], [name])
        return MISSING if raw is None else loads(raw)

    def peek(self, name: str) -> Any:
        """Always ``NOT_CACHED``: a Redis state has no client cache, every read asks Redis."""
        return NOT_CACHED

    @operation
    def contains(self, name: str) -> Operation:
        return bool((yield Script("contains", self._keys, [name])))

    @operation
    def get_many(self, names: list[str]) -> Operation:
        """One ``MULTI`` block (Redis' clock, the values, their deadlines), filtered here."""
        if not names:
            return {}
        clock, values, deadlines = yield Pipeline(
            [
                Command("time"),
                Command("hmget", (self._data_key, names)),
                Command("zmscore", (self._deadlines_key, names)),
            ]
        )
        now = seconds(clock)
        return {
            name: loads(raw)
            for name, raw, deadline in zip(names, values, deadlines, strict=True)
            if raw is not None and not past(deadline, now)
        }

    @operation
    def names(self, pattern: Pattern | None, scopes: tuple[str, ...]) -> Operation:
        """Walked by ``HSCAN`` steps of ``SCAN_COUNT`` names (one round trip each, never ``KEYS``): a name
        that exists for the whole walk is listed once; one set or removed during it may be listed or not."""
        if scopes:
            pairs = yield from self._scan(self._scopes_key, True)
            found = set(scoped({_text(name): json.loads(value) for name, value in pairs}, scopes))
        else:
            found = {_text(name) for name, _ in (yield from self._scan(self._data_key, False))}
        # Matched in this process, so a backtracking pattern costs only its caller.
        names = pattern.filter(found) if pattern is not None else list(found)
        names.sort()
        return names

    def _scan(self, key: str, values: bool) -> Generator[Script, Any, list[tuple[bytes, Any]]]:
        """Every field of a hash (and its value when ``values``), by HSCAN steps (a field may come twice)."""
        found: list[tuple[bytes, Any]] = []
        cursor: bytes | int = 0
        flag = "1" if values else "0"
        while True:
            reply = yield Script("scan", [key, self._deadlines_key], [cursor, SCAN_COUNT, flag])
            cursor, items = reply[0], reply[1:]
            if values:
                found += zip(items[::2], items[1::2], strict=True)
            else:
                found += ((item, None) for item in items)
            if int(cursor) == 0:
                return found

    @operation
    def length(self) -> Operation:
        return int((yield Script("length", self._keys, [])))

    @operation
    def snapshot(self) -> Operation:
        """One ``MULTI`` block (Redis' clock, every value, every deadline), filtered here."""
        clock, data, deadlines = yield Pipeline(self._everything())
        now = seconds(clock)
        due = {name for name, deadline in deadlines if past(deadline, now)}
        return {_text(name): loads(raw) for name, raw in data.items() if name not in due}

    # -- writes -------------------------------------------------------------------------------------
    @operation
    def set(self, name: str, value: Any, scopes: tuple[str, ...], ttl: float | None = None) -> Operation:
        yield Script("set", self._keys, [name, dumps(value), json.dumps(list(scopes)) if scopes else "", _ttl(ttl)])

    @operation
    def remove(self, name: str) -> Operation:
        found = yield Script("remove", self._keys, [name])
        return loads(found[0]) if found else MISSING

    @operation
    def popitem(self) -> Operation:
        """Remove a name Redis picks at random (which name goes is unspecified), in one script."""
        found = yield Script("popitem", self._keys, [])
        return (_text(found[0]), loads(found[1])) if found else None

    @operation
    def clear(self) -> Operation:
        yield Script("clear", self._keys, [])

    @operation
    def incr(self, name: str, by: Any, ttl: float | None = None) -> Operation:
        """In one script when Lua's doubles add exactly (``scripts.INCR``); else in Python, by ``_swap``.
        ``ttl``: the expiry of the name if this call creates it."""
        kind = type(by)
        if (kind is int and -EXACT_INT < by < EXACT_INT) or (kind is float and math.isfinite(by)):
            args = [name, repr(by), "i" if kind is int else "f", EXACT_INT, _ttl(ttl)]
            reply = yield Script("incr", self._keys, args)
            status = _text(reply[0])  # bytes, or str with decode_responses in the URL
            if status == "ok":
                return loads(reply[1])
            if status == "type":
                add(name, loads(reply[1]), by)  # the TypeError of a value that is not a number
            read = reply[1:]  # what the script saw: no need to read it again
        else:
            read = None
        return (yield from self._swap(name, lambda current: add(name, current, by), _ttl(ttl), read))

    @operation
    def expire(self, name: str, ttl: float | None) -> Operation:
        return (yield Script("expire", self._keys, [name, _ttl(ttl)])) == 1

    @operation
    def ttl(self, name: str) -> Operation:
        left = yield Script("ttl", self._keys, [name])
        return None if left is None else max(0.0, float(left))

    @operation
    def setdefault(self, name: str, default: Any) -> Operation:
        text = dumps(default)
        reply = yield Script("setdefault", self._keys, [name, text])
        return loads(text if reply[0] == 1 else reply[1])  # a copy either way, as values are

    @operation
    def compare_and_set(self, name: str, expected: Any, new: Any) -> Operation:
        """Equal texts are equal values, decided in the script; other texts are compared in Python
        (``1 == 1.0``, a set in another order), and then stored only if the name still holds that text."""
        known = dumps(expected)
        new_text = dumps(new)
        # Equal texts mean equal values, except for NaN, which equals nothing: compare those in Python.
        texts = "0" if '"nan"' in known else "1"
        missing_matches = "1" if matches(MISSING, expected) else "0"
        while True:
            reply = yield Script("compare_and_set", self._keys, [name, known, new_text, missing_matches, texts])
            if reply == 1:
                return True
            if reply == 0 or not matches(loads(reply), expected):
                return False
            known, texts = _text(reply), "1"  # store if the name still holds exactly that text

    @operation
    def append(self, name: str, item: Any) -> Operation:
        reply = yield Script("append", self._keys, [name, dumps(item)])
        status = _text(reply[0])
        if status == "ok":
            return int(reply[1])
        if status == "type":
            appended(name, loads(reply[1]), item)  # the TypeError of a value that is not a list
        return len((yield from self._swap(name, lambda current: appended(name, current, item), "", reply[1:])))

    def _swap(self, name: str, change: Callable[[Any], Any], ttl: str = "", read: list[Any] | None = None) -> Operation:
        """Read ``name``, compute its new value in Python, and store it if the name still holds what was
        read, else read again: two round trips an attempt, and as many attempts as other clients change
        the name in between. ``change`` gets ``MISSING`` for a missing name, and may raise to leave
        everything unchanged; ``ttl`` is the expiry of a name it creates; ``read``, what a script already
        read (``[]``: missing, ``[text]``), for the first attempt. Returns the new value."""
        while True:
            if read is None:
                raw = yield Script("get", [self._data_key, self._deadlines_key], [name])
            else:
                raw, read = (read[0] if read else None), None
            new = change(MISSING if raw is None else loads(raw))
            args = [name, "1", "", dumps(new), ttl] if raw is None else [name, "0", raw, dumps(new), ttl]
            if (yield Script("swap", self._keys, args)) == 1:
                return new

    @operation
    def update(self, mapping: dict[str, Any]) -> Operation:
        """``FileCalls.write_many``: a ``MULTI`` block, so that an update of many names keeps Redis' other
        clients waiting, not failing (``BUSY``) as a script running that long would."""
        yield from self.write_many({name: dumps(value) for name, value in mapping.items()})

    # -- change notifications -----------------------------------------------------------------------
    def watch(
        self, pattern: Pattern | None, names: tuple[str, ...] | None, scopes: tuple[str, ...], buffer: int
    ) -> Watcher:
        """A ``watch.Watcher`` of the namespace's stream, from its present end."""
        self.counted.count("watch")
        return Watcher.start(Cursor(self, pattern, names, scopes, buffer))

    # -- figures ------------------------------------------------------------------------------------
    @redis_call
    def stats(self) -> dict[str, Any]:
        """Under the keys of the local server's ``stats()``: ``names`` (this namespace), ``pid`` (the Redis
        server's process, on its host), ``rss_bytes``, ``uptime_s``, ``ops`` (commands the server
        processed, for every client and database), ``clients`` (connections to the server),
        ``last_save_at``/``last_save_s``/``last_save_error`` (``None``: no scheduled saves of its own),
        ``lock_recoveries`` (semaphore permits whose lease ran out; not locks'). Also ``backend`` (``"redis"``),
        ``address``, ``namespace``, ``lease_s``, ``redis_version``, ``redis_last_save_at`` (Redis' own
        last RDB save, Unix time), ``redis_changes_since_last_save`` and ``redis_aof_enabled``. The
        figures of docs/observability.md, where ``calls`` and the lock waits are this handle's in this
        process (Redis keeps no figures of sharedstate's calls), ``lock_holders`` and ``locks_held`` come
        from the lock keys (``figures``), ``lock_waiters`` is ``None`` and the client cache figures are 0."""
        client = self._conn.client
        names = self._conn.run("length", self._keys, [])  # without the names past their deadline
        pipe = client.pipeline(transaction=False)
        pipe.info()
        pipe.get(self._sem_keys("")[0][2])  # the permits of semaphores whose lease ran out
        info, recovered = pipe.execute()
        holders, held = lock_holders(client, self._lock_keys(None)[0], self._lock_keys("")[0])
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
            "lock_recoveries": int(recovered or 0),
            "backend": "redis",
            "address": self.address,
            "namespace": self.namespace,
            "lease_s": self.lease,
            "redis_version": info.get("redis_version"),
            "redis_last_save_at": info.get("rdb_last_save_time"),
            "redis_changes_since_last_save": info.get("rdb_changes_since_last_save"),
            "redis_aof_enabled": bool(info.get("aof_enabled", 0)),
            "locks_held": held,
            "lock_waiters": None,
            "journal_bytes": None,
            "calls": self.counted.counts.totals(),
            "lock_holders": holders,
            **self.waits.percentiles(),
            **cache_figures(None),
        }
