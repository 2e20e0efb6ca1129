"""``state.semaphore(name, value)``: a cross-process counting semaphore on either backend, blocking
(``Semaphore``) and for asyncio (``AsyncSemaphore``); docs/semaphores.md.

A permit belongs to a *process*: any thread or task of the process that took it may give it back, and
a process may hold several (a semaphore is not reentrant: each ``acquire`` takes one more permit). The
process counts the permits it believes it holds and says so at each release, so that one the semaphore
gave back for it (a dead connection, a restart of the server, a Redis lease that ran out) is
``LockLost``, told apart from the ``RuntimeError`` of a process that took none. A forked child holds
none of its parent's permits.

The count is the sum of what the calls did (one more per permit taken, one fewer per release that went
through or found its permit lost), each added under a mutex as its call ends: a release counts before it
is sent (so two releases racing never both say they held the same permit) and undoes that if it failed
otherwise. A release by one thread while another's acquire is on its way back may make the sum negative
for a moment; it is right again once that acquire counts its permit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Hashable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from sharedstate._errors import LockLost, permit_timeout
from sharedstate._fork import after_fork_in_child
from sharedstate._lock import check_timeout

if TYPE_CHECKING:
    from sharedstate._state import State
    from sharedstate.aio import AsyncState

log = logging.getLogger(__name__)

_get_ident = threading.get_ident

#: ``(the backend's identity, semaphore name)`` -> the permits this process believes it holds.
_held: dict[tuple[Hashable, str], int] = {}
_held_mutex = threading.Lock()


@after_fork_in_child
def _after_fork_in_child() -> None:
    # The child is another holder: the semaphore counts none of its parent's permits as its own.
    global _held_mutex
    _held.clear()
    _held_mutex = threading.Lock()


def _task_owner() -> str:
    """Who makes a call, for the local server to answer a call sent again after a crash as it was: the
    current task (a ``str``, as ``aio``'s lock owners)."""
    return f"task-{os.getpid()}-{id(asyncio.current_task())}"


#: The most permits a semaphore may have: every count stays exact on both backends (Redis' scripts count
#: in doubles).
MAX_PERMITS = 2**53


def check_permits(value: object) -> int:
    """A semaphore's number of permits: an ``int`` from 1 to ``MAX_PERMITS``."""
    if type(value) is not int:
        raise TypeError(f"a semaphore's value must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"a semaphore's value must be at least 1, not {value}")
    if value > MAX_PERMITS:
        raise ValueError(f"a semaphore's value must be at most 2**53, not {value}")
    return value


def _count(ident: tuple[Hashable, str], change: int) -> int:
    """Add ``change`` to the permits this process believes it holds; returns the count before."""
    with _held_mutex:
        before = _held.get(ident, 0)
        if before + change:
            _held[ident] = before + change
        else:
            _held.pop(ident, None)
    return before


@contextmanager
def _releasing(ident: tuple[Hashable, str]) -> Iterator[int]:
    """Around a release of one permit: gives the count the process believed it held, one fewer from now
    on; also when the semaphore answered ``LockLost`` (that permit is gone). Any other failure (none
    held, the state out of reach) puts it back as it was."""
    held = _count(ident, -1)
    try:
        yield max(held, 0)
    except LockLost:
        raise
    except BaseException:
        _count(ident, 1)
        raise


class Semaphore:
    """A counting semaphore of ``value`` permits shared by every process of the state (Pode's
    ``New-PodeSemaphore``; ``threading.BoundedSemaphore`` across processes). Permits of a dead holder come
    back within a second on the local server, within the lease on Redis (docs/semaphores.md).

    >>> with state.semaphore("downloads", 3):             # doctest: +SKIP
    ...     fetch()
    """

    __slots__ = ("_state", "_name", "_value", "__weakref__")

    def __init__(self, state: State, name: str, value: int) -> None:
        self._state = state
        self._name = name
        self._value = value

    @property
    def name(self) -> str:
        return self._name

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take one permit for this process; ``True`` once taken, ``False`` if none was free in time (or at
        once when ``blocking`` is false). ``timeout`` in seconds; ``None`` (or ``-1``) waits as long as it
        takes. ``ValueError`` if the semaphore was made with another value. A wait cut short by an
        exception (``KeyboardInterrupt``, a signal handler's) keeps no permit: the backend gives back one
        handed to it meanwhile."""
        if blocking is not True or timeout is not None:
            timeout = check_timeout(blocking, timeout)
        backend = self._state.backend
        taken = backend.sem_acquire(self._name, self._value, blocking, timeout, _get_ident())
        if taken:
            _count((backend.identity, self._name), 1)
        return taken

    def release(self) -> None:
        """Give back one of this process' permits. ``RuntimeError`` if it holds none, ``LockLost`` if it
        held one that the semaphore gave back for it meanwhile."""
        backend = self._state.backend
        with _releasing((backend.identity, self._name)) as held:
            backend.sem_release(self._name, self._value, held, _get_ident())

    def value(self) -> int:
        """The permits free now (another process may take them at any moment)."""
        return self._state.backend.sem_value(self._name, self._value)

    @contextmanager
    def hold(self, timeout: float = 5.0) -> Iterator[Semaphore]:
        """Hold a permit for a ``with`` block, or raise ``LockTimeout`` if none is free within ``timeout``."""
        if not self.acquire(timeout=timeout):
            raise permit_timeout(self._name, timeout, self._value)
        try:
            yield self
        finally:
            self.release()

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Semaphore, (self._state, self._name, self._value))

    def __repr__(self) -> str:
        return f"<sharedstate.Semaphore {self._name!r} of {self._value} at {self._state.address}>"


def _give_back(state: State, name: str, value: int) -> None:
    """Give back a permit that a cancelled wait took after all."""
    try:
        Semaphore(state, name, value).release()
    except Exception as exc:
        log.warning("could not give back a permit of semaphore %r taken by a cancelled wait: %s", name, exc)


class AsyncSemaphore:
    """``Semaphore`` for asyncio: ``async with state.semaphore(name, 3)``. Waiting never blocks the event
    loop, and a task cancelled while it waits never keeps a permit. Permits are the process' (any of
    its tasks may give one back), as for ``Semaphore``."""

    def __init__(self, state: AsyncState, name: str, value: int) -> None:
        self._state = state
        self._name = name
        self._value = value

    @property
    def name(self) -> str:
        return self._name

    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """``Semaphore.acquire``, awaited."""
        timeout = check_timeout(blocking, timeout)
        backend = self._state._backend
        ident = (backend.identity, self._name)

        def late(taken: Any) -> None:
            # The answer of a wait whose task was cancelled: a permit it took after all is given back, on
            # a thread of its own (the loop may be gone by then).
            if taken is True:
                _count(ident, 1)
                args = (self._state.sync, self._name, self._value)
                threading.Thread(target=_give_back, args=args, daemon=True).start()

        taken = await backend.sem_acquire(self._name, self._value, blocking, timeout, _task_owner(), late)
        if taken:
            _count(ident, 1)
        return taken

    async def release(self) -> None:
        """``Semaphore.release``, awaited; a task cancelled while its release is in flight still releases."""
        await asyncio.shield(self._release())

    async def _release(self) -> None:
        backend = self._state._backend
        with _releasing((backend.identity, self._name)) as held:
            await backend.sem_release(self._name, self._value, held, _task_owner())

    async def value(self) -> int:
        return await self._state._backend.sem_value(self._name, self._value)

    @asynccontextmanager
    async def hold(self, timeout: float = 5.0) -> AsyncIterator[AsyncSemaphore]:
        """``async with sem.hold(timeout)``: raises ``LockTimeout`` if no permit is free in time."""
        if not await self.acquire(timeout=timeout):
            raise permit_timeout(self._name, timeout, self._value)
        try:
            yield self
        finally:
            await self.release()

    async def __aenter__(self) -> AsyncSemaphore:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()

    def __repr__(self) -> str:
        return f"<sharedstate.aio.AsyncSemaphore {self._name!r} of {self._value} at {self._state.address}>"
