"""Owner-aware, reentrant locks kept by the server: the global lock and one per name.

A lock belongs to one thread (or asyncio task) of one client process. Unlike the manager's ``RLock``,
it does not stay locked forever when its holder dies: it is freed when every connection of the holder's
process has closed (the usual case: the kernel closes them at exit), or, while someone waits for it,
when the holder's process is found dead (exited, a zombie, or its pid reused). Liveness is checked only
on the contended path, so an uncontended acquire stays one dictionary update (and one line appended to
the lock file, when there is one). A freed lock goes to the first waiting call, whose caller the freeing
thread tells at once.

A lock rebuilt after a restart is "not yet reclaimed" until its holder thread makes a lock call on the
new server: until then the holder may have no connection at all, so its process closing its other
connections does not free it while the process lives (a waiter still frees it once the process is gone).

A lock may carry a lease: a holder that has not renewed it for that many seconds (a process stopped or
hung) loses it. Without one, a stopped holder keeps its lock as long as its process exists.

A caller that believes it holds a lock says so (``held``): if the table has it as someone else's or as
free (lost in a restart, freed when the holder's connections closed, or its lease ran out), the call
raises ``LockLost`` instead of silently taking it again.

Lock calls may arrive twice: a client sends a call again when the server crashed before answering, and
the server restarted from the lock file may have applied it. The caller's count makes an acquire and any
release but the last one idempotent (the count after the call is the caller's count plus or minus one).
The last release frees the lock, after which the table cannot tell "released" from "lost" by the holder
alone: so it keeps, per holder, the request id of the last release that freed a lock of its own (in the
lock file too), and a release carrying that id again is answered as it was, with nothing changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from sharedstate._errors import describe_lock, lock_lost, lock_not_held
from sharedstate._figures import WaitWindow
from sharedstate.server.clients import Client
from sharedstate.server.holders import CHECK_EVERY_S, LastCalls, Rebuilt, wait_for
from sharedstate.server.lockfile import Holder, LockFile

log = logging.getLogger(__name__)

#: Who holds a lock: ``(client key, thread)``.
_Owner = tuple[Hashable, Hashable]


@dataclass(slots=True, eq=False)  # eq=False: a queue removes this very waiter, not an equal one
class _Waiter:
    """A call waiting for a lock. The thread that frees the lock hands it over: it makes the waiter the
    owner and tells its caller at once (``notify``), so the waiting thread need not wake first."""

    key: str | None
    entry: _Entry
    owner: _Owner
    client: Client
    notify: Callable[[], Any]
    deadline: float | None
    lease: float | None
    queued_at: float
    granted: bool = False


@dataclass(slots=True, eq=False)  # eq=False: the table finds an entry by identity
class _Entry:
    owner: _Owner | None = None
    client: Client | None = None
    count: int = 0
    #: Calls waiting for the lock, first come first served (none while the lock is free).
    queue: deque[_Waiter] = field(default_factory=deque)
    checked_at: float = 0.0
    #: The holder's lease in seconds (``None``: none), and when it last took or renewed the lock.
    lease: float | None = None
    renewed_at: float = 0.0
    #: Rebuilt from the lock file, and its holder thread has made no lock call since.
    rebuilt: bool = False
    #: When its holder took it (``time.monotonic()``; after a restart: when the table was rebuilt).
    taken_at: float = 0.0


class LockTable:
    """Every lock of one server, by name (``None`` for the global lock)."""

    def __init__(self, file: LockFile | None = None) -> None:
        self._mutex = threading.Lock()
        self._entries: dict[str | None, _Entry] = {}
        #: Locks freed because their holder died or disconnected.
        self.recoveries = 0
        #: How long recent acquires waited (0: taken at once), for ``stats()``.
        self.waits = WaitWindow()
        #: Where every change of a holder is recorded, for the next server process after a crash.
        self._file = file
        #: ``(client key, thread)`` -> ``(key, request)``: the last release that freed a lock of that
        #: holder, and its request id, so that the same release sent again is not ``LockLost``.
        self._released = LastCalls()
        #: The keys of locks rebuilt after a restart and not yet reclaimed, by holder (see ``_reclaim``).
        self._rebuilt = Rebuilt()

    def rebuild(self, holders: list[Holder], client_for: Callable[[Holder], Client]) -> None:
        """Hold again the locks the lock file recorded, for holders still alive; free (and count) those
        of dead ones. ``client_for`` gives the (not yet connected) client of a holder."""
        with self._mutex:
            now = time.monotonic()
            kept = []
            for holder in holders:
                client = client_for(holder)
                if not client.alive():
                    self.recoveries += 1
                    log.warning(
                        "released %s held by pid %s before the restart: its process is gone",
                        describe_lock(holder.key),
                        client.pid,
                    )
                    continue
                entry = self._entries[holder.key] = _Entry()
                entry.owner = (client.key, holder.thread)
                entry.client = client
                entry.count = holder.count
                entry.lease = holder.lease
                entry.renewed_at = entry.taken_at = now
                entry.rebuilt = True
                self._rebuilt.add(entry.owner, holder.key)
                kept.append(holder)
            if kept:
                log.warning("kept %d lock(s) held across the restart by live processes", len(kept))
            if self._file is not None:
                # The latest last; the file may hold more than the table keeps (appended since a rewrite).
                self._released = LastCalls(self._file.released.items())
                self._file.start(kept, self._released.calls)

    def acquire(
        self,
        key: str | None,
        client: Client,
        thread: Hashable,
        blocking: bool,
        timeout: float | None,
        notify: Callable[[], Any],
        lease: float | None = None,
        held: int = 0,
    ) -> bool | _Waiter:
        """Take the lock for ``(client, thread)``; reentrant. Returns ``True`` when taken, ``False`` when
        not (not blocking, or a timeout of 0), or else a waiter, queued: pass it to ``wait``. Whoever
        frees the lock hands it to the first waiter and calls its ``notify`` (with the table's mutex
        held: it must not block), which tells the caller it holds the lock. ``lease``: seconds the lock
        stays held without a renewal. ``held``: how often the caller believes it holds the lock already
        (a reentrant acquire when above 0); ``LockLost`` if it does not hold it. The caller's count
        wins: when it believes it holds the lock 0 times, an earlier acquire's answer never reached
        it."""
        owner = (client.key, thread)
        with self._mutex:
            if self._rebuilt:
                self._reclaim(owner, client)
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            elif entry.lease is not None:
                self._expire(key, entry)
            if entry.owner is None and not held:
                self._take(key, entry, owner, client, lease, None)
                return True
            if entry.owner == owner:
                if not held:
                    log.info("%s is this caller's already: an acquire sent again after a restart", describe_lock(key))
                entry.count = held + 1
                self._record(key, entry)
                return True
            if held:
                self._forget_if_idle(key, entry)
                raise lock_lost(key)
            self._check_holder(key, entry)
            if entry.owner is None:
                self._take(key, entry, owner, client, lease, None)
                return True
            if not blocking or (timeout is not None and timeout <= 0):
                return False
            now = time.monotonic()
            deadline = None if timeout is None else now + timeout
            waiter = _Waiter(key, entry, owner, client, notify, deadline, lease, now)
            entry.queue.append(waiter)
            return waiter

    def wait(self, waiter: _Waiter, readable: Callable[[float], bool]) -> bool:
        """Wait until ``waiter`` is handed the lock (``True``: its caller has been told) or gives up
        (``False``: its timeout passed, or its caller went away): ``holders.wait_for``."""
        key, entry = waiter.key, waiter.entry

        def give_up() -> None:
            if waiter in entry.queue:  # not if ``give_back`` took it out already
                entry.queue.remove(waiter)
            self._forget_if_idle(key, entry)

        return wait_for(waiter, self._mutex, self.waits, readable, lambda: self._check_holder(key, entry), give_up)

    def release(self, key: str | None, client: Client, thread: Hashable, held: int = 0, request: int = 0) -> None:
        """Release once. ``held``: how often the caller believes it holds the lock; above 0, losing it
        is ``LockLost`` rather than the ``RuntimeError`` of a release by a thread that never held it.
        ``request``: the release's id (unique in the client process, 0: none); a release that freed the
        lock and comes again with the same id is answered again (``None``) and changes nothing."""
        owner = (client.key, thread)
        with self._mutex:
            if self._rebuilt:
                self._reclaim(owner, client)
            entry = self._entries.get(key)
            if entry is not None and entry.lease is not None:
                self._expire(key, entry)
            if entry is None or entry.owner != owner:
                if held:
                    if self._released.was(owner, key, request):
                        # Applied before the crash that lost its answer.
                        log.info("%s was released by this caller already: a release sent again", describe_lock(key))
                        return
                    raise lock_lost(key)
                raise lock_not_held(key, None if entry is None or entry.client is None else entry.client.pid)
            entry.count = held - 1 if held > 0 else entry.count - 1
            if entry.count > 0:
                self._record(key, entry)
            elif not request:
                self._free(key, entry)
            else:
                self._released.remember(owner, key, request)
                file = self._file
                full = file is not None and not file.released_by(key, client.key, thread, request)
                self._free(key, entry, recorded=True)
                if full:
                    self._compact()  # once the lock is free (or its next holder's): with the release in it

    def give_back(self, key: str | None, client: Client, thread: Hashable) -> None:
        """Undo an acquire of ``(client, thread)`` whose caller gave up on its answer (and held the lock
        0 times before): its waiter leaves the queue, or the lock handed to it is freed."""
        owner = (client.key, thread)
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                return
            for waiter in entry.queue:
                if waiter.owner == owner:
                    entry.queue.remove(waiter)
                    return
            if entry.owner == owner:
                log.info("%s: freed, its holder gave up on the acquire that took it", describe_lock(key))
                self._free(key, entry)

    def renew(self, client: Client, locks: list[tuple[str | None, Hashable]]) -> list[tuple[str | None, Hashable]]:
        """Renew the leases of ``locks`` (``(key, thread)`` pairs) held by ``client``; return those it no
        longer holds."""
        gone = []
        with self._mutex:
            now = time.monotonic()
            for key, thread in locks:
                entry = self._entries.get(key)
                if entry is not None and entry.lease is not None:
                    self._expire(key, entry)
                if entry is None or entry.owner != (client.key, thread):
                    gone.append((key, thread))
                else:
                    entry.renewed_at = now
        return gone

    def owner(self, key: str | None) -> int | None:
        """The pid of the lock's holder; ``None``: the lock is free."""
        with self._mutex:
            entry = self._current(key)
            return None if entry is None or entry.client is None else entry.client.pid

    def release_client(self, client: Client) -> None:
        """Free every lock ``client`` holds: its last connection has closed. Not a lock rebuilt after a
        restart whose holder thread has not reclaimed it, while the process lives: that thread may simply
        not have called since (its connection died with the old server), whatever others closed."""
        with self._mutex:
            for key, entry in list(self._entries.items()):
                if entry.client is client:
                    if entry.rebuilt and client.alive():  # no connection left: alive only if rebuilt
                        continue
                    self._recover(key, entry, "its process closed its last connection")

    # -- internals, called with the mutex held ------------------------------------------------------
    def _reclaim(self, owner: _Owner, client: Client) -> None:
        """The holder thread of locks rebuilt after a restart calls again: from now on its locks follow
        the usual rule (freed when every connection of its process has closed), on its current client
        (the rebuilt one may have been dropped when other connections of the process closed)."""

        def move(key: str | None) -> None:
            entry = self._entries.get(key)
            if entry is not None and entry.owner == owner and entry.rebuilt:
                entry.rebuilt = False
                entry.client = client

        self._rebuilt.reclaim(owner, move)

    def _current(self, key: str | None) -> _Entry | None:
        """The lock's entry once a lease that ran out has freed it (as an acquire would), so that those
        who only look do not see a holder that lost it."""
        entry = self._entries.get(key)
        if entry is not None and entry.lease is not None:
            self._expire(key, entry)
        return entry

    def _take(
        self, key: str | None, entry: _Entry, owner: _Owner, client: Client, lease: float | None, since: float | None
    ) -> None:
        """Make ``owner`` the holder; ``since``: when it began to wait for the lock (``None``: it did not)."""
        # Freeing a dead holder's named lock may have dropped the entry from the table just before: put it
        # back, or the lock would be held in an entry nobody else sees.
        self._entries[key] = entry
        entry.owner = owner
        entry.client = client
        entry.count = 1
        entry.lease = lease
        entry.rebuilt = False
        entry.taken_at = entry.renewed_at = time.monotonic()
        self.waits.record(since, entry.taken_at)
        self._record(key, entry)

    def _record(self, key: str | None, entry: _Entry) -> None:
        """Write the lock's new holder (or count) to the lock file."""
        file = self._file
        if file is None:
            return
        assert entry.owner is not None and entry.client is not None
        if not file.held(key, entry.client.key, entry.owner[1], entry.count, entry.lease):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the full lock file with the held locks (the change that did not fit among them)."""
        assert self._file is not None
        self._file.compact(
            (
                (k, e.client.key, e.owner[1], e.count, e.lease)
                for k, e in self._entries.items()
                if e.owner is not None and e.client is not None
            ),
            self._released.calls,
        )

    def _expire(self, key: str | None, entry: _Entry) -> None:
        """Free the lock if its holder's lease ran out."""
        if entry.owner is not None and entry.lease is not None and time.monotonic() - entry.renewed_at > entry.lease:
            self._recover(key, entry, f"its lease of {entry.lease:g} s ran out without a renewal")

    def _free(self, key: str | None, entry: _Entry, recorded: bool = False) -> None:
        """Free the lock, or hand it to the first waiter and tell that waiter's caller. ``recorded``: the
        lock file says already that the lock is free."""
        if entry.queue:
            waiter = entry.queue.popleft()
            self._take(key, entry, waiter.owner, waiter.client, waiter.lease, waiter.queued_at)
            waiter.granted = True
            try:
                waiter.notify()
            except Exception:
                pass  # its caller is gone: the end of its connection frees what it holds
            return
        entry.owner = None
        entry.client = None
        entry.count = 0
        entry.lease = None
        entry.rebuilt = False
        if self._file is not None and not recorded and not self._file.freed(key):
            self._compact()
        self._forget_if_idle(key, entry)

    def _forget_if_idle(self, key: str | None, entry: _Entry) -> None:
        # Named locks come and go with their names: keep only the ones in use (and always the global one,
        # so its uncontended acquire allocates nothing).
        if key is not None and entry.owner is None and not entry.queue and self._entries.get(key) is entry:
            del self._entries[key]

    def _check_holder(self, key: str | None, entry: _Entry) -> None:
        client = entry.client
        if client is None:
            return
        if entry.lease is not None:  # cheap, so not rate limited: the lease bound is to the poll
            self._expire(key, entry)
            if entry.client is not client:
                return
        now = time.monotonic()
        if now - entry.checked_at < CHECK_EVERY_S:
            return
        entry.checked_at = now
        if not client.alive():
            self._recover(key, entry, "its process is gone")

    def _recover(self, key: str | None, entry: _Entry, why: str) -> None:
        pid = entry.client.pid if entry.client is not None else None
        if entry.rebuilt:
            self._rebuilt.discard(entry.owner, key)
        self.recoveries += 1
        log.warning("released %s held by pid %s: %s", describe_lock(key), pid, why)
        self._free(key, entry)

    def holders(self) -> list[tuple[str | None, int, float, int]]:
        """Every held lock as ``(name, holder pid, seconds held, waiters)`` (``None``: the global lock); a
        call waits only for a lock that is held, so these are all the waiters."""
        with self._mutex:
            now, entries = time.monotonic(), self._entries.items()
            return [(k, e.client.pid, now - e.taken_at, len(e.queue)) for k, e in entries if e.client is not None]
