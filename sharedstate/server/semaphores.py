"""Counting semaphores kept by the server, beside the lock table: ``state.semaphore(name, value)``.

A semaphore has ``value`` permits, fixed by the first call that reaches it (a call with another value is
a ``ValueError``) for as long as this server process runs: so the table keeps every name it was asked
about (a few hundred bytes each), which a program that makes up semaphore names without end should know.
A permit belongs to a client *process*: any thread or task of that process may give back one of its
permits, and a process may hold several.

Permits of a dead holder come back as a lock does (``locktable``): when every connection of the holder's
process has closed (the usual case: the kernel closes them at exit), or, while someone waits for a
permit, when the holder's process is found dead (exited, a zombie, or its pid reused): ``Client.alive``,
checked every ``POLL_S`` by a waiter and at most every ``CHECK_EVERY_S`` per semaphore. Nothing is
checked on the uncontended path. A freed permit goes to the first waiting call, whose caller the freeing
thread tells at once (``notify``), as a freed lock does.

Across a crash of the server process, permits are kept as locks are (``locktable``, ``lockfile``): every
change of a holder's count is a line of a lock file of their own (the key of a line names the semaphore
and the holder, its "thread" is the semaphore's value), and the restarted server gives the permits of
live holders back to them, not to anyone else. A holder rebuilt so keeps its permits while its process
lives, until it makes a semaphore call again (its connections died with the old server), from any thread:
its permits then move to its current client (``holders.Rebuilt``, as the lock table's). A call cut off
by the crash is sent again with its request id; the table keeps, per holder thread, the id of its last
applied call (``"r"`` lines), and answers that call again as it was, without applying it twice. A holder
whose permit was lost anyway (no usable file) gets ``LockLost`` at its release, never a silent success.
A call's id and the count it led to are one line of the file, so a crash never keeps one without the other.

A blocking acquire whose caller gave up on it (interrupted while it waited) is taken back by its id
(``give_back``): a waiter still queued leaves the queue, a permit it was handed is released.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sharedstate._errors import permit_lost, permit_not_held, permit_value
from sharedstate._figures import WaitWindow
from sharedstate._sentinels import HANDED
from sharedstate.server.clients import Client
from sharedstate.server.holders import CHECK_EVERY_S, LastCalls, Rebuilt, wait_for
from sharedstate.server.lockfile import Done, Holder, LockFile

log = logging.getLogger(__name__)


def describe(name: str) -> str:
    """How messages name a semaphore."""
    return f"semaphore {name!r}"


def _key(name: str, client: Client) -> str:
    """The lock file's key of one holder's permits of one semaphore."""
    return json.dumps([name, *client.key])


@dataclass(slots=True, eq=False)  # eq=False: a queue removes this very waiter, not an equal one
class _Waiter:
    """A call waiting for a permit; the thread that frees one hands it over (``holders.wait_for``)."""

    client: Client
    thread: Hashable
    request: int
    notify: Callable[[], Any]
    deadline: float | None
    queued_at: float
    granted: bool = False


@dataclass(slots=True, eq=False)
class _Semaphore:
    value: int
    #: Permits held, by holding process.
    holders: dict[Client, int] = field(default_factory=dict)
    #: Calls waiting for a permit, first come first served (none while a permit is free).
    queue: deque[_Waiter] = field(default_factory=deque)
    checked_at: float = 0.0

    def free(self) -> int:
        return self.value - sum(self.holders.values())


class SemaphoreTable:
    """Every semaphore of one server, by name."""

    def __init__(self, file: LockFile | None = None) -> None:
        self._mutex = threading.Lock()
        self._entries: dict[str, _Semaphore] = {}
        #: Permits given back because their holder died or disconnected.
        self.recoveries = 0
        self.waits = WaitWindow()
        #: Where every change of a holder's count is recorded, for the next server process after a crash.
        self._file = file
        #: ``(client key, thread)`` -> ``(record key, request)``: that thread's last applied call.
        self._done = LastCalls()
        #: The names of semaphores whose permits were rebuilt after a restart, by holding process (client
        #: key), until that process makes a semaphore call.
        self._rebuilt = Rebuilt()

    def rebuild(self, holders: list[Holder], client_for: Callable[[Holder], Client]) -> None:
        """Give back to their holders still alive the permits the lock file recorded; count (and free)
        those of dead ones. ``client_for`` gives the (not yet connected) client of a holder."""
        with self._mutex:
            kept = []
            for holder in holders:
                try:
                    name, value = json.loads(holder.key)[0], holder.thread
                    if type(name) is not str or type(value) is not int or value < 1:
                        raise ValueError("not a semaphore record")
                    entry = self._entry(name, value)
                    if entry.free() < holder.count:
                        raise ValueError("more permits than the semaphore has")
                except (ValueError, TypeError, IndexError) as exc:
                    log.error("a semaphore record of the lock file is not kept (%s): %r", exc, holder.key)
                    continue
                client = client_for(holder)
                if not client.alive():
                    self.recoveries += holder.count
                    log.warning("gave back %d permit(s) of %s held by pid %s before the restart: its process "
                                "is gone", holder.count, describe(name), client.pid)  # fmt: skip
                    continue
                entry.holders[client] = holder.count
                self._rebuilt.add(client.key, name)
                kept.append(holder)
            if kept:
                log.warning("kept the permits of %d semaphore holder(s) across the restart", len(kept))
            if self._file is not None:
                self._done = LastCalls(self._file.released.items())
                self._file.start(kept, self._done.calls)

    def load(self) -> list[Holder]:
        """The permits held when the last server process stopped (``[]``: none, or no lock file)."""
        return [] if self._file is None else self._file.load()

    def close(self, remove: bool) -> None:
        """Stop recording; ``remove``: the server stops cleanly, so no permit outlives it."""
        if self._file is not None:
            self._file.close(remove)

    def _entry(self, name: str, value: int) -> _Semaphore:
        """The semaphore, made with ``value`` permits if this is the first call on it (mutex held)."""
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Semaphore(value)
        elif entry.value != value:
            raise permit_value(name, entry.value, value)
        return entry

    def _known(self, name: str, value: int) -> _Semaphore | None:
        """The semaphore if a call made it (``ValueError`` if with another value), else ``None``: a call
        that fails on an unknown semaphore must not fix its value (mutex held)."""
        entry = self._entries.get(name)
        if entry is not None and entry.value != value:
            raise permit_value(name, entry.value, value)
        return entry

    def acquire(
        self,
        name: str,
        value: int,
        client: Client,
        thread: Hashable,
        request: int,
        blocking: bool,
        timeout: float | None,
        notify: Callable[[], Any],
    ) -> bool | _Waiter:
        """Take a permit for ``client``: ``True`` when taken, ``False`` when none is free (not blocking, or
        a timeout of 0), else a queued waiter to pass to ``wait`` (as ``LockTable.acquire``). ``thread``
        and ``request``: the calling thread and the call's id, so that a call sent again after a crash is
        answered as it was (0: none)."""
        with self._mutex:
            self._reclaim(client)
            entry = self._entry(name, value)
            if self._applied(name, client, thread, request):
                log.info("%s: an acquire sent again after a restart, applied already", describe(name))
                return True
            if entry.free() <= 0 or entry.queue:
                self._check_holders(name, entry)
            if entry.free() > 0 and not entry.queue:
                self._take(name, entry, client, thread, request, None)
                return True
            if not blocking or (timeout is not None and timeout <= 0):
                return False
            now = time.monotonic()
            deadline = None if timeout is None else now + timeout
            waiter = _Waiter(client, thread, request, notify, deadline, now)
            entry.queue.append(waiter)
            return waiter

    def wait(self, name: str, waiter: _Waiter, readable: Callable[[float], bool]) -> bool:
        """Wait until ``waiter`` is handed a permit (``True``) or gives up (``False``): ``holders.wait_for``."""
        entry = self._entries[name]

        def give_up() -> None:
            if waiter in entry.queue:  # not if ``give_back`` took it out already
                entry.queue.remove(waiter)
            self._hand_over(name, entry)  # a permit freed as the first waiter left: to the next

        return wait_for(waiter, self._mutex, self.waits, readable, lambda: self._check_holders(name, entry), give_up)

    def release(self, name: str, value: int, client: Client, held: int, thread: Hashable, request: int) -> None:
        """Give back one of ``client``'s permits. ``held``: how many the caller believes its process holds;
        above 0, holding none is ``LockLost`` (lost in a restart, or freed when the process' connections
        closed) rather than the ``RuntimeError`` of a process that never held one. ``thread``, ``request``
        as for ``acquire``. A failed release changes nothing (an unknown semaphore stays unknown)."""
        with self._mutex:
            self._reclaim(client)
            entry = self._known(name, value)
            if self._applied(name, client, thread, request):
                log.info("%s: a release sent again after a restart, applied already", describe(name))
                return
            if entry is None or not entry.holders.get(client):
                if held:
                    raise permit_lost(name)
                raise permit_not_held(name)
            self._give(name, entry, client, (thread, request) if request else None)

    def give_back(self, name: str, value: int, client: Client, thread: Hashable, request: int) -> bool:
        """Undo the acquire ``request`` of ``(client, thread)``, whose caller gave up on its answer: a waiter
        still queued leaves the queue (``False``), a permit it was handed is released (``True``)."""
        with self._mutex:
            self._reclaim(client)
            entry = self._known(name, value)
            if entry is None or not request:
                return False
            for waiter in entry.queue:
                if waiter.request == request and waiter.thread == thread and waiter.client.key == client.key:
                    entry.queue.remove(waiter)
                    return False
            owner, key = (client.key, thread), _key(name, client)
            if not self._done.was(owner, key, request) or not entry.holders.get(client):
                return False
            self._done.forget(owner, key, request)
            log.info("%s: gave back a permit taken by an acquire its caller gave up on", describe(name))
            self._give(name, entry, client, None)
            return True

    def free(self, name: str, value: int) -> int:
        """The permits free now (an unknown semaphore is made with ``value``)."""
        with self._mutex:
            entry = self._entry(name, value)
            self._check_holders(name, entry)
            return max(0, entry.free())

    def release_client(self, client: Client) -> None:
        """Give back every permit ``client`` holds: its last connection has closed. Not permits rebuilt
        after a restart while the process lives (as ``LockTable.release_client``)."""
        with self._mutex:
            for name, entry in self._entries.items():
                if client in entry.holders:
                    if self._rebuilt.pending(client.key, name) and client.alive():
                        continue  # no connection left: alive only if rebuilt
                    self._recover(name, entry, client, "its process closed its last connection")

    # -- internals, called with the mutex held ------------------------------------------------------
    def _reclaim(self, client: Client) -> None:
        """The caller's process calls again: permits rebuilt for it after a restart move to its current
        client, and follow the usual rules from now on."""
        if not self._rebuilt:
            return

        def move(name: str) -> None:
            entry = self._entries.get(name)
            if entry is None:
                return
            for old in [c for c in entry.holders if c.key == client.key and c is not client]:
                entry.holders[client] = entry.holders.get(client, 0) + entry.holders.pop(old)

        self._rebuilt.reclaim(client.key, move)

    def _applied(self, name: str, client: Client, thread: Hashable, request: int) -> bool:
        """Whether this call was applied already (sent again after a crash)."""
        return self._done.was((client.key, thread), _key(name, client), request)

    def _take(
        self, name: str, entry: _Semaphore, client: Client, thread: Hashable, request: int, since: float | None
    ) -> None:
        entry.holders[client] = entry.holders.get(client, 0) + 1
        self.waits.record(since)
        self._record(name, entry, client, (thread, request) if request else None)

    def _give(self, name: str, entry: _Semaphore, client: Client, done: Done | None) -> None:
        """One permit of ``client`` back (``done``: by that call), to the first waiter if any."""
        count = entry.holders[client] - 1
        if count:
            entry.holders[client] = count
        else:
            del entry.holders[client]
        self._record(name, entry, client, done)
        self._hand_over(name, entry)

    def _hand_over(self, name: str, entry: _Semaphore) -> None:
        """Give free permits to the first waiters, and tell their callers."""
        while entry.queue and entry.free() > 0:
            waiter = entry.queue.popleft()
            self._take(name, entry, waiter.client, waiter.thread, waiter.request, waiter.queued_at)
            waiter.granted = True
            try:
                waiter.notify()
            except Exception:
                pass  # its caller is gone: the end of its connection gives the permit back

    def _record(self, name: str, entry: _Semaphore, client: Client, done: Done | None = None) -> None:
        """Write ``client``'s count of permits of the semaphore to the lock file, with the call that led
        to it (``done``: its thread and id, kept as that thread's last applied call), in one line."""
        key = _key(name, client)
        if done is not None:
            self._done.remember((client.key, done[0]), key, done[1])
        file = self._file
        if file is None:
            return
        count = entry.holders.get(client, 0)
        if count:
            written = file.held(key, client.key, entry.value, count, None, done)
        elif done is not None:
            written = file.released_by(key, client.key, done[0], done[1])
        else:
            written = file.freed(key)
        if not written:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the full lock file with the permits held and the last calls."""
        assert self._file is not None
        self._file.compact(self._held_records(), self._done.calls)

    def _held_records(self) -> Iterator[tuple[str, Any, int, int, None]]:
        for name, entry in self._entries.items():
            for client, count in entry.holders.items():
                yield _key(name, client), client.key, entry.value, count, None

    def _check_holders(self, name: str, entry: _Semaphore) -> None:
        """Give back the permits of holders whose process is gone (at most every ``CHECK_EVERY_S``)."""
        now = time.monotonic()
        if now - entry.checked_at < CHECK_EVERY_S:
            return
        entry.checked_at = now
        for client in [c for c in entry.holders if not c.alive()]:
            self._recover(name, entry, client, "its process is gone")

    def _recover(self, name: str, entry: _Semaphore, client: Client, why: str) -> None:
        count = entry.holders.pop(client)
        self._rebuilt.discard(client.key, name)
        self.recoveries += count
        log.warning("gave back %d permit(s) of %s held by pid %s: %s", count, describe(name), client.pid, why)
        self._record(name, entry, client)
        self._hand_over(name, entry)


#: The calls ``SemaphoreCalls`` adds to the server's exposed ones.
SEMAPHORE_CALLS = ("sem_acquire", "sem_release", "sem_give_back", "sem_value")


class SemaphoreCalls:
    """The semaphore calls of the server's service (``service.StateService``), on its ``semaphores``; the
    caller is the one ``current`` (the serving thread's ``CurrentClient``) names."""

    semaphores: SemaphoreTable
    current: Any

    def sem_acquire(
        self, name: str, value: int, blocking: bool, timeout: float | None, thread: Hashable = 0, request: int = 0
    ) -> Any:
        current = self.current
        client = current.client
        assert client is not None and current.notify is not None and current.readable is not None
        taken = self.semaphores.acquire(name, value, client, thread, request, blocking, timeout, current.notify)
        if taken is True or taken is False:
            return taken
        # A wait on the caller's connection: whoever frees a permit answers the caller (``lock_acquire``).
        return HANDED if self.semaphores.wait(name, taken, current.readable) else False

    def sem_release(self, name: str, value: int, held: int, thread: Hashable = 0, request: int = 0) -> None:
        client = self.current.client
        assert client is not None
        self.semaphores.release(name, value, client, held, thread, request)

    def sem_give_back(self, name: str, value: int, thread: Hashable, request: int) -> bool:
        client = self.current.client
        assert client is not None
        return self.semaphores.give_back(name, value, client, thread, request)

    def sem_value(self, name: str, value: int) -> int:
        return self.semaphores.free(name, value)
