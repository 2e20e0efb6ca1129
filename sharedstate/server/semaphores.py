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

Permits are not written to the lock file: a server process restarted after a crash starts with every
semaphore unknown. A holder then gets ``LockLost`` at its release (it says how many permits it believes
it holds), never a silent success (docs/semaphores.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sharedstate._errors import permit_lost
from sharedstate._figures import WaitWindow
from sharedstate._sentinels import HANDED
from sharedstate.server.clients import Client
from sharedstate.server.locktable import CHECK_EVERY_S, POLL_S

log = logging.getLogger(__name__)


def describe(name: str) -> str:
    """How messages name a semaphore."""
    return f"semaphore {name!r}"


@dataclass(slots=True, eq=False)  # eq=False: a queue removes this very waiter, not an equal one
class _Waiter:
    """A call waiting for a permit; the thread that frees one hands it over (``locktable._Waiter``)."""

    client: Client
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

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._entries: dict[str, _Semaphore] = {}
        #: Permits given back because their holder died or disconnected.
        self.recoveries = 0
        self.waits = WaitWindow()

    def _entry(self, name: str, value: int) -> _Semaphore:
        """The semaphore, made with ``value`` permits if this is the first call on it (mutex held)."""
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Semaphore(value)
        elif entry.value != value:
            raise ValueError(f"{describe(name)} has {entry.value} permits, not {value}: its first call fixed that")
        return entry

    def acquire(
        self, name: str, value: int, client: Client, blocking: bool, timeout: float | None, notify: Callable[[], Any]
    ) -> bool | _Waiter:
        """Take a permit for ``client``: ``True`` when taken, ``False`` when none is free (not blocking, or
        a timeout of 0), else a queued waiter to pass to ``wait`` (as ``LockTable.acquire``)."""
        with self._mutex:
            entry = self._entry(name, value)
            if entry.free() <= 0 or entry.queue:
                self._check_holders(name, entry)
            if entry.free() > 0 and not entry.queue:
                self._take(entry, client, None)
                return True
            if not blocking or (timeout is not None and timeout <= 0):
                return False
            now = time.monotonic()
            waiter = _Waiter(client, notify, None if timeout is None else now + timeout, now)
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
                    self._hand_over(entry)  # a permit freed while the first waiter left goes to the next
                    return False
                self._check_holders(name, entry)
                if waiter.granted:
                    return True

    def release(self, name: str, value: int, client: Client, held: int) -> None:
        """Give back one of ``client``'s permits. ``held``: how many the caller believes its process holds;
        above 0, holding none is ``LockLost`` (lost in a restart, or freed when the process' connections
        closed) rather than the ``RuntimeError`` of a process that never held one."""
        with self._mutex:
            entry = self._entry(name, value)
            count = entry.holders.get(client, 0)
            if not count:
                if held:
                    raise permit_lost(name)
                raise RuntimeError(f"cannot release {describe(name)}: this process holds none of its permits")
            if count == 1:
                del entry.holders[client]
            else:
                entry.holders[client] = count - 1
            self._hand_over(entry)

    def free(self, name: str, value: int) -> int:
        """The permits free now (an unknown semaphore is made with ``value``)."""
        with self._mutex:
            entry = self._entry(name, value)
            self._check_holders(name, entry)
            return max(0, entry.free())

    def release_client(self, client: Client) -> None:
        """Give back every permit ``client`` holds: its last connection has closed."""
        with self._mutex:
            for name, entry in self._entries.items():
                if client in entry.holders:
                    self._recover(name, entry, client, "its process closed its last connection")

    def held(self) -> tuple[int, int]:
        """``(permits held, calls waiting)`` over every semaphore."""
        with self._mutex:
            entries = self._entries.values()
            return sum(sum(e.holders.values()) for e in entries), sum(len(e.queue) for e in entries)

    # -- internals, called with the mutex held ------------------------------------------------------
    def _take(self, entry: _Semaphore, client: Client, since: float | None) -> None:
        entry.holders[client] = entry.holders.get(client, 0) + 1
        self.waits.record(since)

    def _hand_over(self, entry: _Semaphore) -> None:
        """Give free permits to the first waiters, and tell their callers."""
        while entry.queue and entry.free() > 0:
            waiter = entry.queue.popleft()
            self._take(entry, waiter.client, waiter.queued_at)
            waiter.granted = True
            try:
                waiter.notify()
            except Exception:
                pass  # its caller is gone: the end of its connection gives the permit back

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
        self.recoveries += count
        log.warning("gave back %d permit(s) of %s held by pid %s: %s", count, describe(name), client.pid, why)
        self._hand_over(entry)


#: The calls ``SemaphoreCalls`` adds to the server's exposed ones.
SEMAPHORE_CALLS = ("sem_acquire", "sem_release", "sem_value")


class SemaphoreCalls:
    """The semaphore calls of the server's service (``service.StateService``), on its ``semaphores``; the
    caller is the one ``current`` (the serving thread's ``CurrentClient``) names."""

    semaphores: SemaphoreTable
    current: Any

    def sem_acquire(self, name: str, value: int, blocking: bool, timeout: float | None) -> Any:
        current = self.current
        client = current.client
        assert client is not None and current.notify is not None and current.readable is not None
        taken = self.semaphores.acquire(name, value, client, blocking, timeout, current.notify)
        if taken is True or taken is False:
            return taken
        # A wait on the caller's connection: whoever frees a permit answers the caller (``lock_acquire``).
        return HANDED if self.semaphores.wait(name, taken, current.readable) else False

    def sem_release(self, name: str, value: int, held: int) -> None:
        client = self.current.client
        assert client is not None
        self.semaphores.release(name, value, client, held)

    def sem_value(self, name: str, value: int) -> int:
        return self.semaphores.free(name, value)
