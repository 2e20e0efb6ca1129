"""The Redis locks this process holds, and the thread that renews their leases.

A Redis lock is a key holding its holder's token, which expires after the lease unless renewed. Every
holding process renews its own locks, every third of their lease, from one daemon thread; a dead or
stopped holder renews nothing, so its locks are free within the lease. Reentrancy is counted here, in
the process: Redis holds each lock once.

A forked child holds none of its parent's locks (the parent keeps renewing them) and identifies itself
to Redis by a token of its own.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from sharedstate._errors import LockLost, describe_lock
from sharedstate._fork import after_fork_in_child
from sharedstate._sentinels import STILL_HELD
from sharedstate.backends.redis import connection
from sharedstate.backends.redis.url import lease_ms

if TYPE_CHECKING:
    from sharedstate.backends.redis.connection import Connection

log = logging.getLogger(__name__)

#: (the backend's URL, the lock's key): a lock, whichever handle of the same state took it.
LockId = tuple[str, str]


class Held:
    """A lock this process holds: who holds it, how often, and when to renew its lease."""

    __slots__ = ("conn", "address", "name", "key", "token", "owner", "count", "renew_at", "lost", "lease", "lease_ms")
    #: The script that renews it (``scripts.SCRIPTS``).
    renew_script = "renew"

    def describe(self) -> str:
        """How the lease thread's messages name what it renews."""
        return describe_lock(self.name)

    def __init__(
        self, conn: Connection, address: str, name: str | None, key: str, token: str, owner: Hashable, lease: float
    ) -> None:
        self.conn = conn
        self.address = address
        self.name = name
        self.key = key
        self.token = token
        self.owner = owner
        self.count = 1
        self.lease = lease
        self.lease_ms = lease_ms(lease)
        self.renew_at = time.monotonic() + lease / 3
        #: The lease ran out before a renewal: another holder may have taken the lock.
        self.lost = False


def token(owner: Hashable) -> str:
    """What a lock's key holds while ``owner`` of this process holds it: the pid first (``lock_owner``
    reads it), then a random token of the process (pids repeat across hosts and over time)."""
    return f"{os.getpid()}:{_process_token}:{owner}"


def pid_of(token: bytes | str) -> int | None:
    """The holder's pid, from what a lock's key holds (``token``); ``None`` if it holds no such thing."""
    head = token.split(b":" if isinstance(token, bytes) else ":", 1)[0]
    try:
        return int(head)
    except ValueError:
        return None


def lost_lease(held: Held) -> LockLost:
    """The error of any call by the owner of ``held`` once its lease ran out unrenewed."""
    return LockLost(
        f"{describe_lock(held.name)} is no longer held by this thread: its lease of {held.lease:g} s ran out "
        "before it was renewed (was this process stopped, or Redis out of reach?), so another holder may "
        "have had it since",
        held.name,
    )


class Leases:
    """The locks this process holds, and the thread that renews their leases every third of a lease."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[LockId, Held] = {}
        #: Locks another owner of this process took after their lease ran out, by (lock, old owner): the
        #: old owner's next call on the lock is ``LockLost``.
        self._taken: dict[tuple[LockId, Hashable], Held] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def reenter(self, ident: LockId, owner: Hashable) -> bool:
        """Count one more acquire by ``owner`` if it holds the lock; ``LockLost`` (and the lock forgotten)
        if its lease was lost."""
        with self._mutex:
            taken = self._taken.pop((ident, owner), None) if self._taken else None
            if taken is not None:
                raise lost_lease(taken)
            held = self._held.get(ident)
            if held is None or held.owner != owner:
                return False
            if held.lost:
                del self._held[ident]
                raise lost_lease(held)
            held.count += 1
            return True

    def add(self, ident: LockId, held: Held) -> None:
        with self._mutex:
            before = self._held.get(ident)
            if before is not None:  # its lease ran out (Redis let this owner take the lock): lost
                before.lost = True
                self._taken[(ident, before.owner)] = before
            self._held[ident] = held
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew_forever, name="sharedstate-leases", daemon=True)
                self._thread.start()
        self._wake.set()

    def leave(self, ident: LockId, owner: Hashable) -> Any:
        """Count one release by ``owner``: ``None`` if it does not hold the lock, ``STILL_HELD`` if it
        still does (reentrancy), else the ``Held`` lock, forgotten here (the caller releases it in Redis,
        or raises ``LockLost`` if it is ``lost``)."""
        with self._mutex:
            taken = self._taken.pop((ident, owner), None) if self._taken else None
            if taken is not None:
                return taken  # lost: the caller finds the lease ran out
            held = self._held.get(ident)
            if held is None or held.owner != owner:
                return None
            held.count -= 1
            if held.count:
                return STILL_HELD
            del self._held[ident]
            return held

    def _renew_forever(self) -> None:
        while True:
            self._wake.clear()
            with self._mutex:
                due = [h for h in self._held.values() if not h.lost]
            now = time.monotonic()
            for held in due:
                if held.renew_at <= now:
                    try:
                        self._renew(held)
                    except Exception:  # never let this thread die: every held lock depends on it
                        held.renew_at = time.monotonic() + min(0.1, held.lease / 10)
                        log.exception("renewing the lease of %s failed", held.describe())
            with self._mutex:
                pending = [h.renew_at for h in self._held.values() if not h.lost]
            self._wake.wait(max(0.0, min(pending) - time.monotonic()) if pending else None)

    def _renew(self, held: Held) -> None:
        try:
            renewed = held.conn.run(held.renew_script, [held.key], [held.token, held.lease_ms])
        except connection.RedisError as exc:
            # Try again soon: the lease is lost only if no renewal gets through before it runs out.
            held.renew_at = time.monotonic() + min(0.1, held.lease / 10)
            log.warning("could not renew the lease of %s at %s: %s", held.describe(), held.address, exc)
            return
        if renewed == 1:
            held.renew_at = time.monotonic() + held.lease / 3
            return
        with self._mutex:
            if held.count == 0 or held.lost:
                return  # released meanwhile
            held.lost = True
        log.warning(
            "lost %s at %s: its lease of %g s ran out before it was renewed",
            held.describe(),
            held.address,
            held.lease,
        )


#: This process' locks (replaced in a forked child, which holds none of them).
leases = Leases()
_process_token = secrets.token_hex(8)


@after_fork_in_child
def _after_fork_in_child() -> None:
    global leases, _process_token
    leases = Leases()
    _process_token = secrets.token_hex(8)
