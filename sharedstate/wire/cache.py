"""A ``State`` handle's cache of the values it read, kept coherent by the server's version table.

An entry holds a name's value as it was fetched, with the epoch and the name's counter read *before* the
request left (``wire.versions``). While both are unchanged the server has not changed the name since, so the
value is served with no round trip, until its deadline if the name expires (``wire.expiring``): a
hit past it is a miss (the server's clock and this one are the same machine's: the table is shared
memory). A value that could be mutated is kept pickled and unpickled on every
hit, so what a caller does to the object it got never reaches the cache.

The handles of one process on one server share one cache. Its memory is bounded: at most
``MAX_ENTRIES`` names and ``MAX_BYTES`` of values, the least recently used going first; a value larger
than ``MAX_VALUE_BYTES`` is never cached.
"""

from __future__ import annotations

import datetime
import decimal
import pickle
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from sharedstate._fork import after_fork_in_child
from sharedstate._sentinels import MISSING, NOT_CACHED, PRESENT
from sharedstate.wire.expiring import clock
from sharedstate.wire.versions import EPOCH, TOKEN, VersionView, attach, slot_of

#: Names one process keeps at most for one server.
MAX_ENTRIES = 10_000
#: Bytes of values one process keeps at most for one server (pickled size, or ``sys.getsizeof``).
MAX_BYTES = 32 * 1024 * 1024
#: A value larger than this is fetched every time.
MAX_VALUE_BYTES = 1024 * 1024


#: Values that cannot be changed in place: a hit returns the cached object itself.
_IMMUTABLE = frozenset(
    {
        str,
        int,
        float,
        bool,
        type(None),
        bytes,
        decimal.Decimal,
        uuid.UUID,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        type(MISSING),
    }
)

Stamp = tuple[int, int, int]
#: A value as the cache keeps it: (the object when immutable, else None; its pickle, else None; size).
Encoded = tuple[Any, "bytes | None", int]


def _past(deadline: float) -> bool:
    """Whether the deadline of a cached value passed: a hit is then a miss, even before the server removed
    the name (its sweep comes within a second)."""
    return deadline <= clock()


def encode(value: Any) -> Encoded:
    """A value as an entry keeps it: the object itself when it cannot change, else its pickle."""
    if type(value) in _IMMUTABLE:
        return value, None, sys.getsizeof(value)
    blob = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return None, blob, len(blob)


class ClientCache:
    """The entries of one process for one server process, shared by every handle on that server."""

    __slots__ = ("view", "token", "_words", "_entries", "_bytes", "_mutex", "hits", "misses")

    def __init__(self, view: VersionView) -> None:
        self.view = view
        self.token = view.token
        self._words = view.words
        #: name -> (slot, epoch, version, value or None, pickled value or None, size, deadline or None)
        self._entries: OrderedDict[str, tuple[int, int, int, Any, bytes | None, int, float | None]] = OrderedDict()
        self._bytes = 0
        self._mutex = threading.Lock()
        #: Reads the cache answered, and reads that went to the server, counted by the handles
        #: (``backends.local``) with no lock: threads of one process that race may lose a count.
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def live(self) -> bool:
        """False once the server retired its table (it stopped, or died and was cleaned up after)."""
        return self._words[TOKEN] == self.token

    def lookup(self, name: str) -> Any:
        """The value of ``name`` (``MISSING`` for a name known not to exist, ``PRESENT`` for one known to
        exist), or ``NOT_CACHED`` when there is no entry or the name may have changed since."""
        entry = self._entries.get(name)
        if entry is None:
            return NOT_CACHED
        words = self._words
        # Counters only grow: equal now (slot) and a moment later (epoch, token) means equal in between,
        # so the value is the server's at an instant within this call.
        if words[entry[0]] != entry[2] or words[EPOCH] != entry[1] or words[TOKEN] != self.token:
            return NOT_CACHED
        if entry[6] is not None and _past(entry[6]):
            return NOT_CACHED
        try:
            self._entries.move_to_end(name)
        except KeyError:  # evicted by another thread meanwhile: the entry read is still right
            pass
        blob = entry[4]
        return entry[3] if blob is None else pickle.loads(blob)

    def lookup_many(self, names: list[str]) -> dict[str, Any] | None:
        """Every one of ``names`` from the cache, as of one instant, or ``None`` if any is not cached.

        Every entry's counters were read before the first check here: each one still equal at its check
        was equal at the first check too, so all the values were the server's at that instant."""
        entries = self._entries
        words = self._words
        found = []
        for name in names:
            entry = entries.get(name)
            if entry is None or entry[3] is PRESENT or words[entry[0]] != entry[2] or words[EPOCH] != entry[1]:
                return None
            if entry[6] is not None and _past(entry[6]):
                return None
            found.append((name, entry))
        if words[TOKEN] != self.token:
            return None
        result = {}
        for name, entry in found:
            value = entry[3] if entry[4] is None else pickle.loads(entry[4])
            if value is not MISSING:
                result[name] = value
        return result

    def stamp(self, name: str) -> Stamp:
        """The counters of ``name``, to be read before its value is requested."""
        slot = slot_of(name)
        words = self._words
        return slot, words[EPOCH], words[slot]

    def stamps(self, names: Iterable[str]) -> dict[str, Stamp]:
        return {name: self.stamp(name) for name in names}

    def fill(self, name: str, stamp: Stamp, value: Any, deadline: float | None = None) -> None:
        """Keep ``value`` (just fetched, with ``stamp`` read before the request) for ``name``, until
        ``deadline`` if it expires."""
        self.put(name, stamp, encode(value), deadline)

    def fill_many(
        self, stamps: dict[str, Stamp], found: dict[str, Any], deadlines: dict[str, float] | None = None
    ) -> None:
        """``fill`` for each name of a ``get_many`` (``stamps``), with what it found (a name not found is
        kept as missing) and the deadlines of those that expire."""
        for name, stamp in stamps.items():
            self.fill(name, stamp, found.get(name, MISSING), None if deadlines is None else deadlines.get(name))

    def put(self, name: str, stamp: Stamp, encoded: Encoded, deadline: float | None = None) -> None:
        kept, blob, size = encoded
        slot, epoch, version = stamp[0], stamp[1], stamp[2]  # a set with a ttl answers the deadline after them
        with self._mutex:
            entries = self._entries
            old = entries.pop(name, None)
            if old is not None:
                self._bytes -= old[5]
            if size > MAX_VALUE_BYTES:
                return
            entries[name] = (slot, epoch, version, kept, blob, size, deadline)
            self._bytes += size
            while len(entries) > MAX_ENTRIES or self._bytes > MAX_BYTES:
                _, evicted = entries.popitem(last=False)
                self._bytes -= evicted[5]


class CacheSlot:
    """The cache a handle uses: the one of the server process its connection reached (``connected``), and
    none once a connection was given up (``dropped``: the next one may reach a new server process)."""

    __slots__ = ("cache",)

    def __init__(self) -> None:
        #: ``None`` when off, before the first connection, or when the server's table cannot be mapped here.
        self.cache: ClientCache | None = None

    def connected(self, info: dict[str, Any]) -> None:
        self.cache = cache_for(info.get("versions"))

    def dropped(self) -> None:
        self.cache = None


def cache_figures(cache: ClientCache | None) -> dict[str, Any]:
    """The client side's part of ``stats()``: ``cache_hits`` and ``cache_misses`` (reads of this process
    on this server, by all its handles), ``cache_hit_ratio`` (``None`` before any read), ``cache_entries``
    and ``cache_bytes``. All 0 (the ratio ``None``) without a cache."""
    hits, misses = (0, 0) if cache is None else (cache.hits, cache.misses)
    return {
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_ratio": hits / (hits + misses) if hits + misses else None,
        "cache_entries": 0 if cache is None else len(cache),
        "cache_bytes": 0 if cache is None else cache.size_bytes,
    }


# -- one cache per server process, shared by this process' handles --------------------------------------
_caches: dict[int, ClientCache] = {}
_caches_mutex = threading.Lock()


def cache_for(versions: object) -> ClientCache | None:
    """This process' cache for the server that described its table as ``versions``; ``None`` when this
    process cannot map it. Caches of servers that retired their table are let go."""
    if not isinstance(versions, dict):
        return None
    token = versions.get("token")
    with _caches_mutex:
        cache = _caches.get(token)  # type: ignore[arg-type]
        if cache is not None and cache.live():
            return cache
        view = attach(versions)
        for old in [t for t, c in _caches.items() if not c.live()]:
            del _caches[old]
        if view is None:
            return None
        cache = _caches[view.token] = ClientCache(view)
        return cache


@after_fork_in_child
def _forget_after_fork() -> None:
    # A forked child starts with caches of its own: a mutex may have been held by another thread at the
    # fork (the parent's entries would be right, but not worth that risk).
    global _caches_mutex
    _caches.clear()
    _caches_mutex = threading.Lock()
