"""A ``State`` handle's cache of the values it read, kept coherent by the server's version table.

An entry holds a name's value as it was fetched, with the epoch and the name's counter read *before* the
request left (``_versions``). While both are unchanged the server has not changed the name since, so the
value is served with no round trip. A value that could be mutated is kept pickled and unpickled on every
hit, so what a caller does to the object it got never reaches the cache.

Memory is bounded: at most ``MAX_ENTRIES`` names and ``MAX_BYTES`` of values per handle, the least
recently used going first; a value larger than ``MAX_VALUE_BYTES`` is never cached.
"""

from __future__ import annotations

import datetime
import decimal
import os
import pickle
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ._store import MISSING
from ._versions import EPOCH, VersionView, slot_of

#: Names one handle keeps at most.
MAX_ENTRIES = 10_000
#: Bytes of values one handle keeps at most (pickled size; the text of a str, the bytes of bytes).
MAX_BYTES = 32 * 1024 * 1024
#: A value larger than this is fetched every time.
MAX_VALUE_BYTES = 1024 * 1024


class _Present:
    """The entry of a name known to exist (from ``contains``) whose value was not fetched."""

    __slots__ = ()


PRESENT = _Present()
#: What ``lookup`` answers when it has no valid entry.
NOT_CACHED = object()

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
        _Present,
    }
)

Stamp = tuple[int, int, int]


class ClientCache:
    """The entries of one handle for one server process (a new server gets a new cache)."""

    __slots__ = ("view", "token", "pid", "_words", "_entries", "_bytes", "_mutex")

    def __init__(self, view: VersionView) -> None:
        self.view = view
        self.token = view.token
        #: The process that made it: a forked child makes its own (its mutex may have been held at fork).
        self.pid = os.getpid()
        self._words = view.words
        #: name -> (slot, epoch, version, value or None, pickled value or None, size)
        self._entries: OrderedDict[str, tuple[int, int, int, Any, bytes | None, int]] = OrderedDict()
        self._bytes = 0
        self._mutex = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def lookup(self, name: str) -> Any:
        """The value of ``name`` (``MISSING`` for a name known not to exist, ``PRESENT`` for one known to
        exist), or ``NOT_CACHED`` when there is no entry or the name may have changed since."""
        entry = self._entries.get(name)
        if entry is None:
            return NOT_CACHED
        words = self._words
        # Counters only grow: equal now (slot) and a moment later (epoch) means equal in between, so the
        # value is the server's at an instant within this call.
        if words[entry[0]] != entry[2] or words[EPOCH] != entry[1]:
            return NOT_CACHED
        try:
            self._entries.move_to_end(name)
        except KeyError:  # evicted by another thread meanwhile: the entry read is still right
            pass
        blob = entry[4]
        return entry[3] if blob is None else pickle.loads(blob)

    def lookup_many(self, names: list[str]) -> dict[str, Any] | None:
        """Every one of ``names`` from the cache, as of one instant, or ``None`` if any is not cached."""
        entries = self._entries
        found = []
        for name in names:
            entry = entries.get(name)
            if entry is None or entry[3] is PRESENT:
                return None
            found.append((name, entry))
        words = self._words
        # Checked twice: every counter equal in both passes was equal at the instant between them.
        for _ in range(2):
            for _, entry in found:
                if words[entry[0]] != entry[2] or words[EPOCH] != entry[1]:
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

    def fill(self, name: str, stamp: Stamp, value: Any) -> None:
        """Keep ``value`` (just fetched, with ``stamp`` read before the request) for ``name``."""
        if type(value) in _IMMUTABLE:
            blob = None
            size = len(value) if type(value) in (str, bytes) else 0
            kept = value
        else:
            blob = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
            size = len(blob)
            kept = None
        slot, epoch, version = stamp
        with self._mutex:
            entries = self._entries
            old = entries.pop(name, None)
            if old is not None:
                self._bytes -= old[5]
            if size > MAX_VALUE_BYTES:
                return
            entries[name] = (slot, epoch, version, kept, blob, size)
            self._bytes += size
            while len(entries) > MAX_ENTRIES or self._bytes > MAX_BYTES:
                _, evicted = entries.popitem(last=False)
                self._bytes -= evicted[5]
