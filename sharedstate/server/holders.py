"""What the lock table (``locktable``) and the semaphore table (``semaphores``) share about their holders and
waiters: how often liveness is checked, the wait of a call until it is handed what it asked for, the
bounded record of each holder's last applied call, and the records rebuilt after a restart that their
holder has not reclaimed yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from sharedstate._figures import WaitWindow

#: How often a waiter wakes to check the holder's liveness (the 1 s recovery bound rests on this).
POLL_S = 0.25
#: Liveness of one holder is checked at most this often, however many waiters there are.
CHECK_EVERY_S = 0.2
#: Holders whose last applied call a table keeps, least recent first out. A call sent again is recognised
#: while fewer than that many other holders made one after it: it comes within its caller's call timeout
#: of the crash, far within that bound.
MAX_RELEASED = 4096


class Waiter(Protocol):
    """A queued call: its deadline (``time.monotonic()``, ``None``: none), when it was queued, and whether
    the thread that freed what it waits for has handed it over (and told its caller)."""

    deadline: float | None
    queued_at: float
    granted: bool


def wait_for(
    waiter: Waiter,
    mutex: threading.Lock,
    waits: WaitWindow,
    readable: Callable[[float], bool],
    check: Callable[[], None],
    give_up: Callable[[], None],
) -> bool:
    """Wait until ``waiter`` is handed what it waits for (``True``: its caller has been told) or gives up
    (``False``: its timeout passed, or its caller went away). ``readable(seconds)`` waits up to that long
    for the caller's connection to have something to read: while a call waits the caller sends nothing,
    so that is its next request (it was told it was handed over) or the end of its connection. Every
    ``POLL_S``, ``check()`` looks at the holders' liveness; ``give_up()`` takes the waiter out of its queue.
    Both run with ``mutex`` held."""
    deadline = waiter.deadline
    while True:
        wait = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
        ready = wait > 0 and readable(wait)
        with mutex:
            if waiter.granted:
                return True
            if ready or (deadline is not None and time.monotonic() >= deadline):
                waits.record(waiter.queued_at, taken=False)  # a wait given up is a wait too
                give_up()
                return False
            check()
            if waiter.granted:  # a holder was gone, and this waiter was first
                return True


class LastCalls:
    """Per holder (``(client key, thread)``), the record key and request id of its last applied call of a
    kind, at most ``MAX_RELEASED`` holders, the least recent first out; a dict, the latest last, as the
    lock file keeps them."""

    __slots__ = ("calls",)

    def __init__(self, calls: Iterable[tuple[Any, tuple[str | None, int]]] = ()) -> None:
        self.calls: dict[Any, tuple[str | None, int]] = dict(list(calls)[-MAX_RELEASED:])

    def remember(self, owner: Any, key: str | None, request: int) -> None:
        calls = self.calls
        if calls.pop(owner, None) is None and len(calls) >= MAX_RELEASED:
            del calls[next(iter(calls))]
        calls[owner] = (key, request)

    def was(self, owner: Any, key: str | None, request: int) -> bool:
        """Whether ``request`` (not 0) is ``owner``'s last applied call, on ``key``."""
        return bool(request) and self.calls.get(owner) == (key, request)

    def forget(self, owner: Any, key: str | None, request: int) -> None:
        """Forget ``request`` as ``owner``'s last call (it was undone)."""
        if self.was(owner, key, request):
            del self.calls[owner]


class Rebuilt:
    """The records a table rebuilt from the lock file after a restart, by holder, until the holder calls
    again: until then the holder may have no connection at all (its connections died with the old
    server), so its process closing its other connections must not free them while it lives. At its next
    call, the table moves them to the holder's current client (the rebuilt one may have been dropped
    meanwhile, when those other connections closed) and from then on they follow the usual rules."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[Hashable, list[Any]] = {}

    def __bool__(self) -> bool:
        return bool(self._keys)

    def add(self, holder: Hashable, key: Any) -> None:
        self._keys.setdefault(holder, []).append(key)

    def pending(self, holder: Hashable, key: Any) -> bool:
        """Whether ``holder``'s record ``key`` was rebuilt and the holder has not called since."""
        return key in self._keys.get(holder, ())

    def discard(self, holder: Hashable, key: Any) -> None:
        """``holder``'s record ``key`` is freed before the holder called again (its process died)."""
        keys = self._keys.get(holder)
        if keys is not None and key in keys:
            keys.remove(key)
            if not keys:
                del self._keys[holder]

    def reclaim(self, holder: Hashable, move: Callable[[Any], None]) -> None:
        """``holder`` calls again: ``move(key)`` each of its rebuilt records to its current client."""
        for key in self._keys.pop(holder, ()):
            move(key)
