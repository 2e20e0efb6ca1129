"""Counting semaphores kept by the server, beside the lock table: ``state.semaphore(name, value)``.

A semaphore has ``value`` permits, fixed by the first call that reaches it (a call with another value is
a ``ValueError``) for as long as this server process runs. A permit belongs to a client *process*: any
thread or task of that process may give back one of its permits, and a process may hold several.

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
lives, until it makes a semaphore call again (its connections died with the old server). A call cut off
by the crash is sent again with its request id; the table keeps, per holder thread, the id of its last
applied call (``"r"`` lines), and answers that call again as it was, without applying it twice. A holder
whose permit was lost anyway (no usable file) gets ``LockLost`` at its release, never a silent success.
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

from sharedstate._errors import permit_lost
from sharedstate._figures import WaitWindow
from sharedstate._sentinels import HANDED
from sharedstate.server.clients import Client
from sharedstate.server.lockfile import Holder, LockFile
from sharedstate.server.locktable import CHECK_EVERY_S, MAX_RELEASED, POLL_S

log = logging.getLogger(__name__)


def describe(name: str) -> str:
    """How messages name a semaphore."""
    return f"semaphore {name!r}"


def _key(name: str, client: Client) -> str:
    """The lock file's key of one holder's permits of one semaphore."""
    return json.dumps([name, *client.key])


@dataclass(slots=True, eq=False)  # eq=False: a queue removes this very waiter, not an equal one
class _Waiter:
    """A call waiting for a permit; the thread that frees one hands it over (``locktable._Waiter``)."""

    name: str
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
        self._done: dict[tuple[Hashable, Hashable], tuple[str | None, int]] = {}
        #: Holders whose permits were rebuilt after a restart and who have made no semaphore call since.
        self._rebuilt: set[Client] = set()

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
                self._rebuilt.add(client)
                kept.append(holder)
            if kept:
                log.warning("kept the permits of %d semaphore holder(s) across the restart", len(kept))
            if self._file is not None:
                self._done = dict(list(self._file.released.items())[-MAX_RELEASED:])
                self._file.start(kept, self._done)

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
            raise ValueError(f"{describe(name)} has {entry.value} permits, not {value}: its first call fixed that")
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
            waiter = _Waiter(name, client, thread, request, notify, deadline, now)
            entry.queue.append(waiter)
            return waiter

    def wait(self, name: str, waiter: _Waiter, readable: Callable[[float], bool]) -> bool:
        """Wait until ``waiter`` is handed a permit (``True``) or gives up (``False``), as ``LockTable.wait``."""
        entry, deadline = self._entries[name], waiter.deadline
        while True:
            wait = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            ready = wait > 0 and readable(wait)
            with self._mutex:
                if waiter.granted:
                    return True
                if ready or (deadline is not None and time.monotonic() >= deadline):
                    self.waits.record(waiter.queued_at, taken=False)
                    entry.queue.remove(waiter)
                    self._hand_over(name, entry)  # a permit freed as the first waiter left: to the next
                    return False
                self._check_holders(name, entry)
                if waiter.granted:
                    return True

    def release(self, name: str, value: int, client: Client, held: int, thread: Hashable, request: int) -> None:
        """Give back one of ``client``'s permits. ``held``: how many the caller believes its process holds;
        above 0, holding none is ``LockLost`` (lost in a restart, or freed when the process' connections
        closed) rather than the ``RuntimeError`` of a process that never held one. ``thread``, ``request``
        as for ``acquire``."""
        with self._mutex:
            entry = self._entry(name, value)
            if self._applied(name, client, thread, request):
                log.info("%s: a release sent again after a restart, applied already", describe(name))
                return
            count = entry.holders.get(client, 0)
            if not count:
                if held:
                    raise permit_lost(name)
                raise RuntimeError(f"cannot release {describe(name)}: this process holds none of its permits")
            if count == 1:
                del entry.holders[client]
            else:
                entry.holders[client] = count - 1
            self._remember(name, client, thread, request)
            self._record(name, entry, client)
            self._hand_over(name, entry)

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
            if client in self._rebuilt:
                if client.alive():
                    return
                self._rebuilt.discard(client)
            for name, entry in self._entries.items():
                if client in entry.holders:
                    self._recover(name, entry, client, "its process closed its last connection")

    # -- internals, called with the mutex held ------------------------------------------------------
    def _applied(self, name: str, client: Client, thread: Hashable, request: int) -> bool:
        """Whether this call was applied already (sent again after a crash); also, the caller's process
        calls again, so permits rebuilt for it follow the usual rules from now on."""
        if self._rebuilt:
            self._rebuilt.discard(client)
        return bool(request) and self._done.get((client.key, thread)) == (_key(name, client), request)

    def _take(
        self, name: str, entry: _Semaphore, client: Client, thread: Hashable, request: int, since: float | None
    ) -> None:
        entry.holders[client] = entry.holders.get(client, 0) + 1
        self.waits.record(since)
        self._remember(name, client, thread, request)
        self._record(name, entry, client)

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

    def _remember(self, name: str, client: Client, thread: Hashable, request: int) -> None:
        """Keep ``request`` as the last applied call of ``(client, thread)`` (in the lock file too)."""
        if not request:
            return
        done, owner, key = self._done, (client.key, thread), _key(name, client)
        if done.pop(owner, None) is None and len(done) >= MAX_RELEASED:
            del done[next(iter(done))]
        done[owner] = (key, request)
        # Before the holder's count: a release line drops the record of the same key when the file is read.
        if self._file is not None and not self._file.released_by(key, client.key, thread, request):
            self._compact()

    def _record(self, name: str, entry: _Semaphore, client: Client) -> None:
        """Write ``client``'s count of permits of the semaphore to the lock file."""
        file = self._file
        if file is None:
            return
        count, key = entry.holders.get(client, 0), _key(name, client)
        if not (file.held(key, client.key, entry.value, count, None) if count else file.freed(key)):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the full lock file with the permits held and the last calls."""
        assert self._file is not None
        self._file.compact(self._held_records(), self._done)

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
        self._rebuilt.discard(client)
        self.recoveries += count
        log.warning("gave back %d permit(s) of %s held by pid %s: %s", count, describe(name), client.pid, why)
        self._record(name, entry, client)
        self._hand_over(name, entry)


#: The calls ``SemaphoreCalls`` adds to the server's exposed ones.
SEMAPHORE_CALLS = ("sem_acquire", "sem_release", "sem_value")


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

    def sem_value(self, name: str, value: int) -> int:
        return self.semaphores.free(name, value)
