"""``state.lock`` and ``state.named_lock(name)``: the locks of either backend, as the caller sees them.

The process keeps what each of its threads (or asyncio tasks) believes it holds, and says so to the
server: a lock the server no longer has as that thread's (lost in a restart, freed when the process'
connections closed, or its lease ran out) is then ``LockLost`` at the next call on it, never silently
taken a second time. Leased locks of the local server are renewed by one daemon thread per process
(a Redis backend renews its own: ``Backend.renews_leases``).

Across a crash and restart of the server, lock calls are as transparent as the others: a call whose
answer the crash lost is sent again to the new server (``wire.calls``), which rebuilt its locks
from the lock file, and that server answers it as the old one would have, applying it at most once:

- an acquire sends the count its thread believes it holds, and the table sets the count to one more
  than that: an acquire the old server applied (the lock file has this thread as the holder, count + 1)
  is answered ``True`` again, not counted twice; one it did not apply is applied now. A blocking acquire
  that was waiting waits again, for what is left of its timeout (``timeout=None``: as long as it takes);
- a release sends the count too, so a release that left the lock held is the same count either way. The
  release of the last count frees the lock, after which "released" and "lost" look alike to the new
  server: that release carries a request id (unique in the process; a thread retries only its last
  call), and the lock file records, per holder, the id of the last release that freed one of its locks
  (``"r"`` lines, kept with the held locks when the file is rewritten). The same release sent again finds
  its id there and is answered ``None``; a lock lost for another reason (the lock file gone or damaged,
  its holder's connections closed, its lease ran out) has no such record and is ``LockLost``;
- a lease renewal changes nothing but the time of the last renewal, so it is simply sent again.

The lock file, not the journal, keeps these records: locks are the lock table's, which survives a crash
of the server process whatever the state's durability.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sharedstate._errors import LockLost, lock_timeout
from sharedstate._errors import describe_lock as describe
from sharedstate._errors import lock_lost as lost
from sharedstate._fork import after_fork_in_child

if TYPE_CHECKING:
    from sharedstate._state import State
    from sharedstate.backends.base import Backend

log = logging.getLogger(__name__)

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


def check_lease(lease: object) -> float | None:
    """Validate a lock's lease: ``None`` (no lease) or a positive, finite number of seconds."""
    if lease is None:
        return None
    if type(lease) not in (int, float):
        raise TypeError(f"lease must be a number of seconds or None, not {type(lease).__name__}")
    if not 0 < lease < math.inf:  # also refuses NaN
        raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
    return float(lease)


# -- what this process believes it holds -------------------------------------------------------------
#: ``(the backend's identity, lock name, owner)`` -> how often that owner (a thread ident or an asyncio task's
#: token) believes it holds the lock.
_held: dict[tuple[Any, str | None, Hashable], int] = {}
#: Those of ``_held`` that the server said (or the lease renewal found) are no longer their owner's:
#: every call on them raises ``LockLost`` until the owner has released as often as it acquired.
_lost: set[tuple[Any, str | None, Hashable]] = set()


def acquire_begin(backend: Backend, name: str | None, owner: Hashable) -> tuple[Any, int]:
    """Before an acquire of ``name`` for ``owner``: its key in the bookkeeping and how often ``owner``
    believes it holds the lock; ``LockLost`` if it believed it held it and lost it."""
    ident = (backend.identity, name, owner)
    count = _held.get(ident, 0)
    if count and ident in _lost:
        raise lost(name)
    return ident, count


def acquire_lost(ident: Any, count: int) -> None:
    """The server said an acquire's owner had lost the lock it believed it held ``count`` times."""
    if count:
        _lost.add(ident)
        _renewals.discard(ident)


def acquire_done(ident: Any, count: int, backend: Backend, lease: float | None) -> None:
    """An acquire was granted: one hold more, and its lease renewed from now on (through ``backend``, a
    blocking one, unless it renews its own)."""
    _held[ident] = count + 1
    if not count:
        if _lost:  # a renewal that lost a lock the owner released meanwhile may have left it there
            _lost.discard(ident)
        if lease is not None and not backend.renews_leases:
            _renewals.add(ident, backend, lease)


def acquire_call(
    state: State, name: str | None, owner: Hashable, blocking: bool, timeout: float | None, lease: float | None
) -> bool:
    """Acquire ``name`` for ``owner`` through ``state``; ``LockLost`` if ``owner`` believed it held it and
    the server no longer has it as its own."""
    backend = state.backend
    ident, count = acquire_begin(backend, name, owner)
    try:
        taken = backend.lock_acquire(name, owner, blocking, timeout, lease, count)
    except LockLost:
        acquire_lost(ident, count)
        raise
    if taken:
        acquire_done(ident, count, backend, lease)
    return taken


def release_begin(backend: Backend, name: str | None, owner: Hashable) -> tuple[Any, int, bool]:
    """Before a release: the bookkeeping's key, how often ``owner`` believes it holds the lock (0: the
    server is asked all the same, and answers with the ``RuntimeError`` naming the holder), and whether
    it is known to be lost (then the server is not asked)."""
    ident = (backend.identity, name, owner)
    return ident, _held.get(ident, 0), ident in _lost


def release_done(ident: Any, count: int, was_lost: bool) -> None:
    """A release of a lock held ``count`` times went through, or found it lost (``was_lost``): one hold
    less; ``LockLost`` when it was lost. Any other failure (the server out of reach) must not get here:
    it leaves the belief as it was (the release did not happen, or the server is gone with its locks,
    which the next call finds out)."""
    if count > 1:
        _held[ident] = count - 1
        if was_lost:
            _lost.add(ident)
    else:
        _held.pop(ident, None)
        _lost.discard(ident)
        _renewals.discard(ident)
    if was_lost:
        raise lost(ident[1])


def release_call(state: State, name: str | None, owner: Hashable) -> None:
    """Release ``name`` once for ``owner``: ``LockLost`` if it was lost meanwhile, ``RuntimeError`` if
    ``owner`` does not hold it."""
    backend = state.backend
    ident, count, was_lost = release_begin(backend, name, owner)
    if not count:
        backend.lock_release(name, owner, 0)
        return
    if not was_lost:
        try:
            backend.lock_release(name, owner, count)
        except LockLost:
            was_lost = True
    release_done(ident, count, was_lost)


class _Lease:
    __slots__ = ("backend", "lease", "renew_at")

    def __init__(self, backend: Backend, lease: float) -> None:
        self.backend = backend
        self.lease = lease
        self.renew_at = time.monotonic() + lease / 3


class _Renewals:
    """The leased locks of this process and the one daemon thread that renews them every third of their
    lease, in one call per server, while the process runs (a stopped process renews nothing)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._leases: dict[tuple[Any, str | None, Hashable], _Lease] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, ident: tuple[Any, str | None, Hashable], backend: Backend, lease: float) -> None:
        with self._mutex:
            self._leases[ident] = _Lease(backend, lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew_forever, name="sharedstate-renew", daemon=True)
                self._thread.start()
        self._wake.set()

    def discard(self, ident: tuple[Any, str | None, Hashable]) -> None:
        if ident in self._leases:  # read without the mutex: most locks have no lease
            with self._mutex:
                self._leases.pop(ident, None)

    def _renew_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._renew_due()
            except Exception:  # never let this thread die: every leased lock depends on it
                log.exception("renewing lock leases failed")
            with self._mutex:
                pending = [lease.renew_at for lease in self._leases.values()]
            self._wake.wait(max(0.0, min(pending) - time.monotonic()) if pending else None)

    def _renew_due(self) -> None:
        now = time.monotonic()
        groups: dict[int, tuple[Backend, list[tuple[tuple[Any, str | None, Hashable], _Lease]]]] = {}
        with self._mutex:
            for ident, lease in self._leases.items():
                if lease.renew_at <= now:
                    groups.setdefault(id(lease.backend), (lease.backend, []))[1].append((ident, lease))
        for backend, sent in groups.values():
            try:
                gone = backend.lock_renew([(name, owner) for (_, name, owner), _ in sent])
            except Exception as exc:
                # Try again soon: the lease is lost only if no renewal gets through before it runs out.
                log.warning("could not renew lock leases at %s: %s", backend.address, exc)
                with self._mutex:
                    for ident, lease in sent:
                        if self._leases.get(ident) is lease:
                            lease.renew_at = time.monotonic() + min(0.1, lease.lease / 10)
                continue
            gone_set = set(gone)
            with self._mutex:
                for ident, lease in sent:
                    if self._leases.get(ident) is not lease:
                        # Released meanwhile, or released and taken again: the answer may be about the
                        # moment in between, when the lock was free, so it says nothing of the new hold.
                        continue
                    if (ident[1], ident[2]) in gone_set:
                        del self._leases[ident]
                        if ident in _held:
                            _lost.add(ident)
                        log.warning(
                            "lost %s at %s: its lease of %g s ran out before it was renewed",
                            describe(ident[1]),
                            lease.backend.address,
                            lease.lease,
                        )
                    else:
                        lease.renew_at = time.monotonic() + lease.lease / 3
                still_used = any(lease.backend is backend for lease in self._leases.values())
            if not still_used:
                # This thread's connection would keep the process' locks alive after the holder closed
                # its own ones: give it up while there is nothing to renew there.
                backend.close()


_renewals = _Renewals()


@after_fork_in_child
def _after_fork_in_child() -> None:
    # A forked child holds none of its parent's locks, and no renewal thread runs in it.
    global _renewals
    _held.clear()
    _lost.clear()
    _renewals = _Renewals()


class Lock:
    """A cross-process reentrant lock kept by the local server or in Redis (Pode's ``Lock-PodeObject``).

    It belongs to the thread that acquired it and may be acquired again by that thread (each
    ``acquire`` needs its ``release``). On the local server it is freed within a second if the holding
    process dies, stays held across a crash and restart of the server while its holder lives (a call on
    it that the crash cut off is sent again to the new server and applied once), and with a ``lease``
    (in seconds) a holder that is alive but stopped for that long loses it; without one it keeps it. On
    Redis every lock is leased (``backends.redis``). A holder that lost its lock gets ``LockLost`` at
    its next call on it.

    >>> with state.lock:                                   # doctest: +SKIP
    ...     state.set("total", state.get("total", 0) + 1)
    """

    __slots__ = ("_state", "_name", "_lease", "__weakref__")  # weakly referable, like threading's locks

    def __init__(self, state: State, name: str | None, lease: float | None = None) -> None:
        self._state = state
        self._name = name
        self._lease = check_lease(lease)

    @property
    def name(self) -> str | None:
        """The lock's name; ``None`` for the global lock."""
        return self._name

    @property
    def lease(self) -> float | None:
        """The lease of each acquire of this lock, in seconds (``None``: none)."""
        return self._lease

    def acquire(self, blocking: bool = True, timeout: float | None = None, lease: float | None = None) -> bool:
        """Acquire the lock; return ``True`` once held, ``False`` if not free in time (or at once when
        ``blocking`` is false). ``timeout`` in seconds; ``None`` (or ``-1``) waits as long as it takes.
        ``lease``: seconds the lock stays this thread's without a renewal (renewed in the background
        while the process runs); default: the lock's own. ``LockLost`` if this thread held the lock
        (a reentrant acquire) and lost it."""
        if blocking is not True or timeout is not None:
            timeout = check_timeout(blocking, timeout)
        lease = self._lease if lease is None else check_lease(lease)
        return acquire_call(self._state, self._name, _get_ident(), blocking, timeout, lease)

    def release(self) -> None:
        """Release the lock once. Raises ``RuntimeError`` if this thread does not hold it, and
        ``LockLost`` if it held it and lost it (its lease ran out, or the server lost it)."""
        release_call(self._state, self._name, _get_ident())

    def locked(self) -> bool:
        """Whether any thread of any process holds the lock."""
        return self._state.backend.lock_locked(self._name)

    def owner(self) -> int | None:
        """The pid of the process holding the lock, or ``None`` when it is free."""
        return self._state.backend.lock_owner(self._name)

    @contextmanager
    def hold(self, timeout: float = 5.0, lease: float | None = None) -> Iterator[Lock]:
        """Hold the lock for a ``with`` block, or raise ``LockTimeout`` if it is not acquired within
        ``timeout`` seconds."""
        if not self.acquire(timeout=timeout, lease=lease):
            raise lock_timeout(self._name, timeout, self.owner())
        try:
            yield self
        finally:
            self.release()

    def __enter__(self) -> Lock:
        acquire_call(self._state, self._name, _get_ident(), True, None, self._lease)
        return self

    def __exit__(self, *exc: Any) -> None:
        release_call(self._state, self._name, _get_ident())

    def __reduce__(self) -> tuple[Any, ...]:
        return (Lock, (self._state, self._name, self._lease))

    def __repr__(self) -> str:
        return f"<sharedstate.Lock {describe(self._name)} at {self._state.address}>"
