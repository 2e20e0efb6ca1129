"""The client side of the server's locks: ``state.lock`` and ``state.named_lock(name)``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._errors import LockTimeout
from ._locktable import describe

if TYPE_CHECKING:
    from ._client import State

_get_ident = threading.get_ident


def check_timeout(blocking: object, timeout: object) -> float | None:
    """Validate ``acquire``'s arguments as ``threading.Lock`` does; ``-1`` means no timeout."""
    if type(blocking) is not bool:
        raise TypeError(f"blocking must be a bool, not {type(blocking).__name__}")
    if timeout is None or timeout == -1:
        return None
    if type(timeout) not in (int, float):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not blocking:
        raise ValueError("a timeout cannot be given for a non-blocking acquire")
    if not timeout >= 0:  # also refuses NaN
        raise ValueError(f"timeout must be >= 0, not {timeout!r}")
    return float(timeout)


class Lock:
    """A cross-process reentrant lock kept by the server (Pode's ``Lock-PodeObject``).

    It belongs to the thread that acquired it, may be acquired again by that thread (each ``acquire``
    needs its ``release``), and is freed by the server within a second if the holding process dies.

    >>> with state.lock:                                   # doctest: +SKIP
    ...     state.set("total", state.get("total", 0) + 1)
    """

    __slots__ = ("_state", "_name", "__weakref__")  # weakly referable, like threading's locks

    def __init__(self, state: State, name: str | None) -> None:
        self._state = state
        self._name = name

    @property
    def name(self) -> str | None:
        """The lock's name; ``None`` for the global lock."""
        return self._name

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Acquire the lock; return ``True`` once held, ``False`` if not free in time (or at once when
        ``blocking`` is false). ``timeout`` in seconds; ``None`` (or ``-1``) waits as long as it takes."""
        if blocking is not True or timeout is not None:
            timeout = check_timeout(blocking, timeout)
        return self._state._call("lock_acquire", (self._name, _get_ident(), blocking, timeout))

    def release(self) -> None:
        """Release the lock once. Raises ``RuntimeError`` if this thread does not hold it."""
        self._state._call("lock_release", (self._name, _get_ident()))

    def locked(self) -> bool:
        """Whether any thread of any process holds the lock."""
        return self._state._call("lock_locked", (self._name,))

    def owner(self) -> int | None:
        """The pid of the process holding the lock, or ``None`` when it is free."""
        return self._state._call("lock_owner", (self._name,))

    @contextmanager
    def hold(self, timeout: float = 5.0) -> Iterator[Lock]:
        """Hold the lock for a ``with`` block, or raise ``LockTimeout`` if it is not acquired within
        ``timeout`` seconds."""
        if not self.acquire(timeout=timeout):
            raise LockTimeout(
                f"{describe(self._name)} was not acquired within {timeout:g} s (held by pid {self.owner()})",
                self._name,
                timeout,
            )
        try:
            yield self
        finally:
            self.release()

    def __enter__(self) -> Lock:
        self._state._call("lock_acquire", (self._name, _get_ident(), True, None))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._state._call("lock_release", (self._name, _get_ident()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Lock, (self._state, self._name))

    def __repr__(self) -> str:
        return f"<sharedstate.Lock {describe(self._name)} at {self._state.address}>"
