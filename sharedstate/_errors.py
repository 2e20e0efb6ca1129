"""The exceptions of sharedstate: each subclasses the nearest built-in and pickles with its facts."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccessDenied",
    "LockLost",
    "LockTimeout",
    "ServerUnavailable",
    "SharedStateError",
    "SnapshotError",
    "StateFileBusy",
]


class SharedStateError(Exception):
    """Base class of every error sharedstate raises on purpose.

    The facts an error carries (``address``, ``path``, ``pid``, ``name``, ``timeout``) are attributes,
    also named in the message, and survive pickling so an error can cross a process boundary intact.
    """

    #: The attribute names this class carries beside its message.
    _facts: tuple[str, ...] = ()

    def __init__(self, message: str, *facts: Any) -> None:
        # Only the message goes to the built-in base: OSError subclasses would read a second positional
        # argument as an errno.
        super().__init__(message)
        for field, value in zip(self._facts, facts, strict=False):
            setattr(self, field, value)
        for field in self._facts[len(facts) :]:
            setattr(self, field, None)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], *(getattr(self, f) for f in self._facts)))


class ServerUnavailable(SharedStateError, ConnectionError):
    """No server answers at the address, or it went away during a call. Has ``address``."""

    _facts = ("address",)


class AccessDenied(SharedStateError, PermissionError):
    """The server refused the authentication key (or none was found). Has ``address``."""

    _facts = ("address",)


class LockTimeout(SharedStateError, TimeoutError):
    """A lock was not acquired within its timeout. Has ``name`` (``None`` for the global lock) and
    ``timeout``."""

    _facts = ("name", "timeout")


class LockLost(SharedStateError, RuntimeError):
    """A lock this thread (or task) believed it held is no longer its own: the server lost it in a
    restart, freed it when the holder's connections closed, or its lease ran out. Raised at the next call
    on that lock, so a holder never goes on as a silent second holder. Has ``name`` (``None`` for the
    global lock)."""

    _facts = ("name",)


class SnapshotError(SharedStateError, ValueError):
    """A snapshot or storage file is not valid. Has ``path``."""

    _facts = ("path",)


class StateFileBusy(SharedStateError):
    """Another live server owns the snapshot file. Has ``path`` and ``pid`` (the owner's)."""

    _facts = ("path", "pid")


def handle_closed(address: str) -> SharedStateError:
    """What every call of an asyncio handle raises after its ``aclose()`` (on either backend)."""
    return SharedStateError(f"this asyncio handle on {address} is closed (aclose()): connect again")


def describe_lock(key: str | None) -> str:
    """How messages name a lock: the global one, or one by its name."""
    return "the global lock" if key is None else f"lock {key!r}"


def lock_timeout(key: str | None, timeout: float, holder: int | None) -> LockTimeout:
    """The error of ``hold(timeout)`` on a lock that stayed held by ``holder`` (a pid) for ``timeout`` s."""
    return LockTimeout(
        f"{describe_lock(key)} was not acquired within {timeout:g} s (held by pid {holder})", key, timeout
    )


def lock_lost(key: str | None) -> LockLost:
    """The error of a holder whose lock the server no longer has as its own."""
    return LockLost(
        f"{describe_lock(key)} is no longer held by this thread: the server freed it (its lease ran out, the "
        "server restarted without it, or this process' connections closed), so another holder may have "
        "had it since",
        key,
    )


def permit_timeout(name: str, timeout: float, value: int) -> LockTimeout:
    """The error of ``hold(timeout)`` on a semaphore of ``value`` permits none of which came free for this
    caller within ``timeout`` s."""
    message = f"no permit of semaphore {name!r} (of {value}) was free for this call within {timeout:g} s"
    return LockTimeout(message, name, timeout)


def permit_lost(name: str) -> LockLost:
    """The error of a release by a process whose permit the semaphore no longer counts as its own."""
    return LockLost(
        f"a permit of semaphore {name!r} is no longer held by this process: it was given back for it (the server "
        "restarted without it, this process' connections closed, or its lease ran out), so another holder may "
        "have had it since",
        name,
    )


def permit_value(name: str, fixed: object, value: int) -> ValueError:
    """The error of a call on a semaphore with another number of permits than its first call fixed."""
    return ValueError(f"semaphore {name!r} has {fixed} permits, not {value}: its first call fixed that")


def permit_not_held(name: str) -> RuntimeError:
    """The error of a release by a process that holds none of a semaphore's permits (and believed so)."""
    return RuntimeError(f"cannot release semaphore {name!r}: this process holds none of its permits")


def lock_not_held(key: str | None, holder: int | None) -> RuntimeError:
    """The error of a release by a thread that does not hold the lock (``holder``: the pid that does)."""
    by = "nobody" if holder is None else f"pid {holder}"
    return RuntimeError(f"cannot release {describe_lock(key)}: this thread does not hold it (held by {by})")
