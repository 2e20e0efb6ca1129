"""Change notifications on Redis: a watcher's place in the namespace's stream, its reads (as
``steps.Operation``s, for both faces), and the thread that keeps this process' watches registered.

The scripts that change the names write each change to the stream ``NAMESPACE:changes`` (``scripts.PRELUDE``'s
``note``) while ``NAMESPACE:watching`` exists, with ids ``0-1``, ``0-2``... numbered by that key (a hash),
trimmed by ``MAXLEN ~`` to the cap it holds. ``watch`` runs ``scripts.WATCH``, which registers this
process in ``NAMESPACE:watchers`` (a lease of ``LEASE_S``), sets ``watching`` and answers the last entry's
number, in one script: every change committed after it is in the stream after that id. A watcher reads
from there with ``XREAD BLOCK`` on a connection of its own and filters in this process.

A watcher gets ``Change(None, "overflow", None)`` and continues from the present when an id is missing
(the cap trimmed entries it had not read, or the stream was lost), when more than ``buffer`` changes it
watches are waiting, when changes may have gone unnoted (this process' registration lapsed: it was stopped
longer than ``LEASE_S``; or ``watching`` was lost: expired, evicted, deleted, whichever process made it
again), when numbering began again (``watching`` and the stream were lost: the new numbers start past any
read, so every watcher of every process finds a gap), and after its
connection failed (a restarted Redis may have lost the stream). A lapse found by one of the process'
``watch()`` calls or ticks is told to every watcher of the namespace in the process.

The thread of this module runs ``scripts.WATCH`` again every ``TICK_S`` for each namespace this process
watches: it renews the registration, and removes the names whose deadline has passed, so that a watcher
hears of an expiry within ``TICK_S`` even when no other call touches the state. Its ticks use a client of
their own with a short reply timeout (``connection.TICK_TIMEOUT``): a Redis server that stopped answering
holds the thread up well within the lease of the namespaces on other servers.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from sharedstate import _fork
from sharedstate._changes import (
    CLEARED,
    EXPIRED,
    OVERFLOW,
    REMOVED,
    RESTORED,
    SET,
    Change,
    deadline_of,
    left,
    take_turn,
)
from sharedstate._fork import after_fork_in_child
from sharedstate._pattern import Pattern
from sharedstate.backends.redis import connection
from sharedstate.backends.redis.connection import text
from sharedstate.backends.redis.steps import Command, Operation, Script, Sleep, run
from sharedstate.backends.redis.stored import loads

if TYPE_CHECKING:
    from sharedstate.backends.redis.backend import RedisBackend

log = logging.getLogger(__name__)

#: How long a process' registration lasts without renewal: writers note changes for that long after the
#: last watcher of a dead process.
LEASE_S = 5.0
#: How often this process renews its registrations and removes expired names.
TICK_S = 0.5
#: The stream keeps at least this many changes (more if a watcher's ``buffer`` is larger).
STREAM_MIN = 10_000
#: Names past their deadline one tick removes at most.
TICK_PURGE = 1000
#: Entries one ``XREAD`` takes at most.
READ_CHUNK = 1000
#: How long a watcher behind a burst of changes lets the burst go on before it reads again: a watcher
#: that keeps up (one entry a read) reads again at once, so a lone change still comes in one hop.
BURST_PAUSE_S = 0.002
#: The longest single ``XREAD BLOCK`` (a longer wait is several), at most half the reply timeout.
BLOCK_SLICE_S = 5.0

_KINDS = {"s": SET, "r": REMOVED, "e": EXPIRED, "c": CLEARED, "R": RESTORED}
#: How an entry is read: its field names, its kinds and the "large" mark, as redis-py answers them (bytes)
#: and as text (``decode_responses`` in the URL). Never one of each: bytes and str that compare are a
#: ``BytesWarning`` under ``python -b``.
_BYTE_ENTRY = (b"k", b"n", b"v", b"s", b"L", {key.encode(): kind for key, kind in _KINDS.items()}, b"1")
_TEXT_ENTRY = ("k", "n", "v", "s", "L", _KINDS, "1")
OVERFLOWED = Change(None, OVERFLOW, None)
#: Stands for the value of a change whose entry left it out (``scripts.NOTE_MAX``) until it is read.
_LARGE = object()


def _seq(entry_id: bytes | str) -> int:
    """The number of an entry id ``0-N`` (an id of another form, written by someone else, counts as 0)."""
    head, _, tail = text(entry_id).partition("-")
    return int(tail) if head == "0" and tail.isdigit() else 0


def _entries(reply: Any) -> list[tuple[Any, dict[Any, Any]]]:
    """The entries of an ``XREAD`` reply of one stream (RESP2: a list of [key, entries]; RESP3: a dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        found = next(iter(reply.values()))
        return found[0] if found and isinstance(found[0], list) else found
    return reply[0][1]


class Cursor:
    """One watcher: its filters, the number of the last entry it read, and its reads as operations."""

    def __init__(
        self,
        backend: RedisBackend,
        pattern: Pattern | None,
        names: tuple[str, ...] | None,
        scopes: tuple[str, ...],
        buffer: int,
    ) -> None:
        self.backend = backend
        self.pattern = pattern
        self.names = None if names is None else frozenset(names)
        self.scopes = frozenset(scopes)
        self.buffer = buffer
        self.last = 0
        #: Changes may have gone past unread: the next read answers ``OVERFLOWED`` and starts again.
        self.lapsed = False
        #: When it last took its place in the stream (``start``): a lapse found by a tick begun later
        #: concerns it no more.
        self.started = 0.0
        #: The watch was closed (a read under way ends); a read is under way.
        self.closed = self.reading = False
        #: The last read found more than one entry waiting: the next one pauses first (``BURST_PAUSE_S``).
        self.behind = False
        self.generation = _fork.generation
        # The client's own reply timeout (a ``socket_timeout`` in the URL wins over ``connect(timeout=)``).
        effective = backend._conn.timeout
        self._slice = BLOCK_SLICE_S if effective is None else min(BLOCK_SLICE_S, effective / 2)

    def start(self) -> Operation:
        """Register this process and take the stream's last id as the place to read from. If changes may
        have gone unnoted since this process' last tick, its cursors of the namespace that took their place
        before are told so (and woken), as the tick does."""
        begun = time.monotonic()
        reply = yield tick(self.backend, registry.cap(self.backend, self), 0)
        self.last = int(reply[1])
        self.lapsed = False
        self.started = time.monotonic()
        if reply[0] == 1 and registry.lapse(self.backend, begun):
            yield from self.wake()

    def adopt(self) -> None:
        """In a forked child, make the watch this process' own: registered here, and read from the present
        (the parent's registration says nothing of the child's)."""
        if self.generation != _fork.generation:
            self.generation, self.lapsed = _fork.generation, True
            registry.add(self)

    def read(self, timeout: float | None) -> Operation:
        """The changes after ``last`` that pass the filters, waiting up to ``timeout`` (``None``: as long as
        it takes) for one; ``[]`` when none came in time or the watch was closed. Past ``buffer`` of them,
        or after a gap, ``OVERFLOWED`` and the newest ``buffer`` changes read (a queue that dropped what it
        held, as the local server's does); after a lapse, ``OVERFLOWED`` and the present."""
        deadline = None if timeout is None else time.monotonic() + timeout
        changes: list[Change] = []
        overflowed = False
        stream = self.backend._changes_key
        # ``self.last`` moves only when the changes read are answered: a read cut short (a cancelled task,
        # a KeyboardInterrupt, a failed connection) between two chunks leaves them to the next read.
        last = self.last
        self.reading = True
        try:
            if self.behind:
                # Entries came faster than one a read: let more gather, so a flood of changes costs the
                # watcher (and Redis) a few reads, not one per change.
                yield Sleep(BURST_PAUSE_S)
            while True:
                if self.closed:
                    return []
                if self.lapsed:
                    yield from self.start()
                    return [OVERFLOWED]
                left = self._slice if deadline is None else min(self._slice, deadline - time.monotonic())
                block = None if changes or overflowed or left <= 0 else max(1, int(left * 1000))
                options = {"count": READ_CHUNK} if block is None else {"count": READ_CHUNK, "block": block}
                entries = _entries((yield Command("xread", ({stream: f"0-{last}"},), options)))
                self.behind = len(entries) > 1
                if self.lapsed or self.closed:  # found while it waited: what it read may follow a loss
                    continue
                for entry_id, fields in entries:
                    seq = _seq(entry_id)
                    if seq != last + 1:  # trimmed or lost before it was read
                        overflowed = True
                        changes.clear()
                    last = seq
                    change = self._change(fields)
                    if change is not None:
                        changes.append(change)
                if len(changes) > self.buffer:
                    overflowed = True
                    del changes[: -self.buffer]
                if len(entries) == READ_CHUNK:
                    continue  # more may be waiting: take them without blocking
                if overflowed or changes or block is None or (deadline is not None and time.monotonic() >= deadline):
                    changes = yield from self._large(changes)
                    self.last = last
                    registry.saw(self.backend, last)
                    return [OVERFLOWED, *changes] if overflowed else changes
        finally:
            self.reading = False

    def wake(self) -> Operation:
        """End the ``read``s blocked in other threads or tasks (after ``closed`` or ``lapsed``): an entry every
        watcher skips."""
        yield Script("note_many", self.backend._keys, ["w"])

    def _change(self, fields: dict[Any, Any]) -> Change | None:
        """The change an entry notes, or ``None`` if this watcher's filters leave it out. A field the entry
        leaves out holds its default (``scripts.PRELUDE``): no scopes (``s``), the value in the entry (``L``)."""
        k, n, v, s, large, kinds, yes = _BYTE_ENTRY if type(next(iter(fields), b"")) is bytes else _TEXT_ENTRY
        kind = kinds.get(fields.get(k))
        if kind is None:
            return None
        if kind in (CLEARED, RESTORED):
            return Change(None, kind)
        name = text(fields[n])
        if self.names is not None and name not in self.names:
            return None
        if self.pattern is not None and not self.pattern.filter([name]):
            return None
        if self.scopes:
            noted = text(fields.get(s, b""))
            if not noted or self.scopes.isdisjoint(json.loads(noted)):
                return None
        if kind is SET:
            return Change(name, kind, _LARGE if fields.get(large) == yes else loads(fields[v]))
        return Change(name, kind)

    def _large(self, changes: list[Change]) -> Operation:
        """``changes`` with the values their entries left out (``scripts.NOTE_MAX``) read now, in one round
        trip: the value at the time of the read (``None`` if the name is gone by then: a later change says so)."""
        names = sorted({change.name for change in changes if change.value is _LARGE})
        if not names:
            return changes
        values = yield from self.backend.get_many.steps(self.backend, names)
        return [
            Change(change.name, change.kind, values.get(change.name)) if change.value is _LARGE else change
            for change in changes
        ]


def tick(backend: RedisBackend, cap: int, purge: int) -> Script:
    """The ``scripts.WATCH`` step: (re)register this process as watching ``backend``'s namespace."""
    keys = [*backend._keys, backend._prefix + "watchers"]
    return Script("watch", keys, [_token, int(LEASE_S * 1000), cap, purge, registry.seen(backend)])


class Registry:
    """The cursors of this process by namespace, and the thread that ticks for them every ``TICK_S``."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        #: A cursor nobody holds any more (its watch was never closed) drops out, and stops being renewed.
        self._watched: dict[Any, tuple[RedisBackend, weakref.WeakSet[Cursor]]] = {}
        self._thread: threading.Thread | None = None
        #: The highest entry number this process has seen in each namespace's stream (``scripts.WATCH``).
        self._seen: dict[Any, int] = {}

    def seen(self, backend: RedisBackend) -> int:
        return self._seen.get((backend._url, backend.namespace), 0)

    def saw(self, backend: RedisBackend, seq: int) -> None:
        key = (backend._url, backend.namespace)
        with self._mutex:
            if seq > self._seen.get(key, 0):
                self._seen[key] = seq

    def cap(self, backend: RedisBackend, cursor: Cursor | None = None) -> int:
        """The stream's cap this process needs in ``backend``'s namespace: the largest ``buffer`` of its live
        cursors there (and ``cursor``'s, one not added yet), at least ``STREAM_MIN``."""
        with self._mutex:
            entry = self._watched.get((backend._url, backend.namespace))
            cursors = list(entry[1]) if entry is not None else []
        if cursor is not None:
            cursors.append(cursor)
        return max([STREAM_MIN, *(each.buffer for each in cursors)])

    def lapse(self, backend: RedisBackend, begun: float) -> list[Cursor]:
        """Mark this process' cursors of ``backend``'s namespace that took their place in the stream before
        ``begun`` as lapsed (changes may have gone past them unnoted); the cursors marked."""
        with self._mutex:
            entry = self._watched.get((backend._url, backend.namespace))
            cursors = [cursor for cursor in entry[1] if cursor.started < begun] if entry is not None else []
        for cursor in cursors:
            cursor.lapsed = True
        return cursors

    def add(self, cursor: Cursor) -> None:
        key = (cursor.backend._url, cursor.backend.namespace)
        with self._mutex:
            self._watched.setdefault(key, (cursor.backend, weakref.WeakSet()))[1].add(cursor)
            if self._thread is None:
                self._thread = threading.Thread(target=self._tick_forever, name="sharedstate-watches", daemon=True)
                self._thread.start()

    def remove(self, cursor: Cursor) -> None:
        key = (cursor.backend._url, cursor.backend.namespace)
        with self._mutex:
            entry = self._watched.get(key)
            if entry is not None:
                entry[1].discard(cursor)
                if not entry[1]:
                    del self._watched[key]

    def _tick_forever(self) -> None:
        while True:
            time.sleep(TICK_S)  # a watch was registered by its start: the first tick can wait
            with self._mutex:
                watched = [(backend, set(cursors)) for backend, cursors in self._watched.values() if cursors]
                if not watched:
                    self._thread = None
                    return
            for backend, cursors in watched:
                self._tick(backend, cursors)
            del watched, backend, cursors  # hold no cursor while asleep: one nobody holds drops out

    @staticmethod
    def _tick(backend: RedisBackend, cursors: set[Cursor]) -> None:
        """Renew this process' registration for ``backend``'s namespace and purge; if it had lapsed, mark
        the cursors that took their place before, then wake them, so that they answer the overflow at once."""
        cap = registry.cap(backend)
        begun = time.monotonic()
        conn = backend._conn
        try:
            lapsed = run(_ticked(tick(backend, cap, TICK_PURGE)), conn, conn.ticks)
        except Exception as exc:  # never let the thread die; a lapse is found at the next tick
            log.debug("could not renew the watches of %r: %s", backend, exc)
            return
        concerned = registry.lapse(backend, begun) if lapsed else []
        if concerned:
            try:
                run(concerned[0].wake(), conn, conn.ticks)
            except Exception as exc:
                log.debug("could not wake the watchers of %r: %s", backend, exc)


def _ticked(step: Script) -> Operation:
    return (yield step)[0] == 1


#: This process' watches (replaced in a forked child: the thread and the registration are the parent's).
registry = Registry()
_token = secrets.token_hex(8)


@after_fork_in_child
def _after_fork_in_child() -> None:
    global registry, _token
    registry = Registry()
    _token = secrets.token_hex(8)


class Watcher:
    """``backends.base.Watcher`` on Redis: a ``Cursor`` read with the blocking client, on a connection of
    its own (``connection.Connection.watches``)."""

    def __init__(self, cursor: Cursor) -> None:
        self._cursor = cursor
        self._closed = False
        self._one = threading.Lock()

    @classmethod
    def start(cls, cursor: Cursor) -> Watcher:
        _guarded(cursor, lambda: run(cursor.start(), cursor.backend._conn))
        registry.add(cursor)
        return cls(cursor)

    def next(self, timeout: float | None) -> list[Change]:
        deadline = deadline_of(timeout)
        if self._closed or not take_turn(self._one, deadline):
            return []
        try:
            if self._closed:  # while it waited its turn
                return []
            cursor = self._cursor
            cursor.adopt()
            conn = cursor.backend._conn
            return _guarded(cursor, lambda: run(cursor.read(left(deadline)), conn, conn.watches))
        finally:
            self._one.release()

    def close(self) -> None:
        if not self._closed:
            self._closed = self._cursor.closed = True
            registry.remove(self._cursor)
            if self._cursor.reading:  # in another thread: wake it
                try:
                    run(self._cursor.wake(), self._cursor.backend._conn)
                except connection.RedisError as exc:  # its wait ends at its next slice all the same
                    log.debug("could not wake a closed watcher: %s", exc)


#: A watcher's read (or start) is tried this often: after a failure of the connection, once more.
ATTEMPTS = (1, 2)


def failed(cursor: Cursor, exc: BaseException, attempt: int) -> BaseException | None:
    """The rule after a failure of the connection, for both faces: the first time, try again from the
    present (``OVERFLOWED`` first: a Redis that restarted may have lost changes): ``None``; the second
    time, sharedstate's error to raise."""
    if attempt < ATTEMPTS[-1]:
        cursor.lapsed = True
        return None
    return connection.translate(exc, cursor.backend.address, "watch")


def _guarded(cursor: Cursor, call: Any) -> Any:
    """``call()`` by the rule of ``failed``."""
    for attempt in ATTEMPTS:
        try:
            return call()
        except connection.RedisError as exc:
            error = failed(cursor, exc, attempt)
            if error is not None:
                raise error from None
    raise AssertionError("unreachable")
