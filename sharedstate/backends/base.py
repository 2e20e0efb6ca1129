"""``Backend``: the operations a ``State`` delegates to, already validated.

``State`` (the facade) checks every argument once, turns the public calls into these operations and
keeps the mapping sugar; a backend only carries them out, atomically, and raises the package's errors
(``ServerUnavailable``, ``AccessDenied``, ``SnapshotError`` ...) and the ``TypeError``/``ValueError`` that
depend on what is stored (``incr`` of a string). Names are ``str``, values have passed
``_values.check_value``, scopes are tuples of ``str``, paths are absolute and checked in the caller.

A backend pickles: a ``State`` travels to another process as its backend, which opens its own
connections there.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sharedstate._changes import Change
from sharedstate._pattern import Pattern

#: ``(name, owner)`` of a held lock, as ``Backend.lock_renew`` takes and answers them.
LockRef = tuple[str | None, Hashable]


class Watcher(Protocol):
    """The changes a ``Backend.watch`` started: kept (at most ``buffer`` of them, then one ``"overflow"``
    change and the present) until taken."""

    def next(self, timeout: float | None) -> list[Change]:
        """The changes waiting, oldest first, after waiting up to ``timeout`` seconds (``None``: as long as
        it takes) for at least one; ``[]`` when none came in time."""
        ...

    def close(self) -> None:
        """Stop watching and free what the watch holds where the state lives; more calls do nothing."""
        ...


class AsyncWatcher(Protocol):
    """``Watcher`` for asyncio: its ``next`` never blocks the event loop."""

    async def next(self, timeout: float | None) -> list[Change]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """What a ``State`` needs of the place its dictionary lives in."""

    #: Whether the backend renews leased locks itself (Redis); if not, ``Lock``'s thread calls
    #: ``lock_renew`` every third of a lease.
    renews_leases: bool

    @property
    def address(self) -> str:
        """Where the state lives, as ``SHAREDSTATE_ADDRESS`` holds it (no password)."""
        ...

    @property
    def identity(self) -> Hashable:
        """The same for every handle on the same state, different for any other (two namespaces of one
        Redis database are two states): what this process' lock bookkeeping is keyed by."""
        ...

    # -- reads --------------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The value of ``name``, or ``MISSING``."""
        ...

    def peek(self, name: str) -> Any:
        """The value of ``name`` if this process knows it is still the stored one (a client cache hit),
        ``MISSING`` if it knows there is no such name, else ``NOT_CACHED``. Never a round trip."""
        ...

    def contains(self, name: str) -> bool: ...

    def get_many(self, names: list[str]) -> dict[str, Any]:
        """The values of those of ``names`` that exist."""
        ...

    def names(self, pattern: Pattern | None, scopes: tuple[str, ...]) -> list[str]:
        """The sorted names that match ``pattern`` and have any of ``scopes`` (empty: no filter)."""
        ...

    def length(self) -> int: ...

    def snapshot(self) -> dict[str, Any]: ...

    # -- writes -------------------------------------------------------------------------------------
    def set(self, name: str, value: Any, scopes: tuple[str, ...], ttl: float | None = None) -> None:
        """Store ``value``; ``ttl`` (checked, > 0) makes the name expire that many seconds after the change,
        ``None`` removes any expiry. Deadlines are absolute UTC seconds taken by the clock where the state
        lives (the server's, Redis' ``TIME``), never the caller's."""
        ...

    def remove(self, name: str) -> Any:
        """Remove ``name``; its value, or ``MISSING``. A local server may also answer ``DROPPED``: the
        call was a retry of one applied before a save, which did not keep the removed value."""
        ...

    def popitem(self) -> tuple[str, Any] | None:
        """Remove some name and return it with its value; ``None`` when the state is empty (or
        ``DROPPED``, as for ``remove``)."""
        ...

    def clear(self) -> None: ...

    def incr(self, name: str, by: Any, ttl: float | None = None) -> Any:
        """Add ``by``; ``ttl`` is the expiry of a name this call creates (an existing name keeps its own)."""
        ...

    def expire(self, name: str, ttl: float | None) -> bool:
        """Give ``name`` an expiry ``ttl`` seconds from now (``None``: remove it); whether the name exists."""
        ...

    def ttl(self, name: str) -> float | None:
        """The seconds ``name`` has left; ``None`` when it has no expiry or does not exist."""
        ...

    def setdefault(self, name: str, default: Any) -> Any: ...

    def compare_and_set(self, name: str, expected: Any, new: Any) -> bool: ...

    def append(self, name: str, item: Any) -> int: ...

    def update(self, mapping: dict[str, Any]) -> None:
        """Store every name of ``mapping`` (not empty) at once, all or nothing; their scopes go."""
        ...

    # -- change notifications -----------------------------------------------------------------------
    def watch(
        self, pattern: Pattern | None, names: tuple[str, ...] | None, scopes: tuple[str, ...], buffer: int
    ) -> Watcher:
        """Start watching: every change committed after this returns that concerns a name matching
        ``pattern``, one of ``names`` (``None``: any name) and having any of ``scopes`` (empty: no filter),
        plus every ``"cleared"`` and ``"restored"``, reaches the watcher in commit order."""
        ...

    # -- files and figures --------------------------------------------------------------------------
    def save(
        self, path: str | None, include: list[str] | None, exclude: list[str] | None, scopes: tuple[str, ...]
    ) -> Path: ...

    def restore(self, path: str | None, merge: bool) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    # -- locks (``name`` None: the global lock; ``owner``: a thread ident or an asyncio task's token) --
    def lock_acquire(
        self, name: str | None, owner: Hashable, blocking: bool, timeout: float | None, lease: float | None, held: int
    ) -> bool:
        """Acquire for ``owner``, which believes it holds the lock ``held`` times; ``LockLost`` if it
        believed it held it and no longer does."""
        ...

    def lock_release(self, name: str | None, owner: Hashable, held: int) -> None:
        """Release once; ``RuntimeError`` if ``owner`` does not hold it, ``LockLost`` if it lost it."""
        ...

    def lock_renew(self, held: list[LockRef]) -> list[LockRef]:
        """Renew the leases of ``held``; answer those no longer held."""
        ...

    def lock_locked(self, name: str | None) -> bool: ...

    def lock_owner(self, name: str | None) -> int | None: ...

    # -- semaphores (``value``: checked, fixed by the first call; ``owner``: as for locks) --------------
    def sem_acquire(self, name: str, value: int, blocking: bool, timeout: float | None, owner: Hashable) -> bool:
        """Take a permit for this process; ``ValueError`` if the semaphore has another value. A call cut
        short by an exception of the caller's (``KeyboardInterrupt``, a signal handler's) keeps no permit."""
        ...

    def sem_release(self, name: str, value: int, held: int, owner: Hashable) -> None:
        """Give back one of this process' permits (it believes it holds ``held``): ``RuntimeError`` if it
        holds none, ``LockLost`` if it held one that was given back for it."""
        ...

    def sem_value(self, name: str, value: int) -> int:
        """The permits free now."""
        ...

    def close(self) -> None:
        """Close this thread's (or process') connections; the next call opens them again."""
        ...


class AsyncBackend:
    """What the asyncio face of a backend shares (``aio_local``, ``aio_redis``): the blocking backend of
    the same state it is made from (``sync``), whose address and identity are its own. Its operations are
    those of ``Backend`` as coroutines, every write but ``set`` as ``write(method, *args)`` (``expire``
    too; ``incr`` with a ``ttl`` as ``write("incr", name, by, ttl)``), and ``lock_acquire`` (and
    ``sem_acquire``) takes a ``late(answer)`` too: what to do with the answer of a wait whose task was
    cancelled. ``watch`` is a coroutine that answers an ``AsyncWatcher``."""

    def __init__(self, sync: Backend) -> None:
        self.sync = sync

    @property
    def address(self) -> str:
        return self.sync.address

    @property
    def identity(self) -> Hashable:
        return self.sync.identity

    def close(self) -> None:
        """Close this face's connections (the next call opens them again)."""

    async def aclose(self) -> None:
        """``close``, for a face whose connections close by a coroutine."""
        self.close()
