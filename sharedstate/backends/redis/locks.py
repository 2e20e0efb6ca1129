"""The lock calls of ``RedisBackend``: acquire (waiting on a list a release pushes to), release, and
who holds a lock. The locks this process holds, and their leases, are kept by ``leases``."""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING

from sharedstate._errors import lock_not_held
from sharedstate._sentinels import STILL_HELD
from sharedstate.backends.base import LockRef
from sharedstate.backends.redis import leases as _leases
from sharedstate.backends.redis.connection import operation
from sharedstate.backends.redis.steps import Command, Operation, Script, Sleep
from sharedstate.backends.redis.url import check_lease, lease_ms

if TYPE_CHECKING:
    from sharedstate._figures import WaitWindow
    from sharedstate.backends.redis.connection import Connection

log = logging.getLogger(__name__)

#: Longest single wait of a lock waiter before it asks again (it wakes earlier on a release, or when
#: the holder's lease runs out).
WAIT_SLICE_S = 0.5
#: Redis serves the timeouts of blocking commands on its clock ticks (``hz``, 10 a second by default),
#: so a ``BLPOP`` timeout ends up to this much late. A release wakes a waiter at once all the same.
REDIS_TICK_S = 0.1
#: How often a waiter asks in the last moments before the holder's lease runs out or its own timeout
#: ends, where a ``BLPOP`` timeout would be too coarse.
POLL_S = 0.02


def pause(wake: str, left: int, deadline: float | None, reply_timeout: float) -> Command | Sleep | None:
    """The wait of a lock (or semaphore) waiter before it tries again: a ``BLPOP`` on the ``wake`` list a
    release pushes to, or a short sleep; ``None`` once its ``deadline`` (``time.monotonic()``) has passed.
    ``left``: the ms until the holder's lease runs out (negative: no lease known)."""
    now = time.monotonic()
    until = now + WAIT_SLICE_S
    if left >= 0:  # the holder's lease runs out then, unless it renews it or releases first
        until = min(until, now + left / 1000 + 0.001)
    if deadline is not None:
        if now >= deadline:
            return None
        until = min(until, deadline)
    # A blocking wait also stays well inside the reply timeout, so it is never taken for a server that
    # stopped answering.
    span = min(until, now + reply_timeout / 2) - now
    if span > 2 * REDIS_TICK_S:
        # Woken at once by a release; the timeout itself is served on one of Redis' ticks, so it may end
        # up to a tick late: ask for one tick less.
        return Command("blpop", ([wake],), {"timeout": span - REDIS_TICK_S})
    return Sleep(min(span, POLL_S))  # the last moments before the lease runs out or the caller gives up


class LockCalls:
    """The ``lock_*`` operations of the ``Backend`` protocol, for ``RedisBackend``, whose keys, connection,
    address, lease and reply timeout they use."""

    _prefix: str
    _url: str
    _timeout: float
    _conn: Connection
    address: str
    lease: float
    waits: WaitWindow

    # -- locks --------------------------------------------------------------------------------------
    def _lock_keys(self, name: str | None) -> tuple[str, str]:
        """The lock's key and the list a release pushes to, to wake a waiter."""
        if name is None:
            return self._prefix + "lock", self._prefix + "wake"
        return f"{self._prefix}lock:{name}", f"{self._prefix}wake:{name}"

    @operation
    def lock_acquire(
        self, name: str | None, owner: Hashable, blocking: bool, timeout: float | None, lease: float | None, held: int
    ) -> Operation:
        """``lease``: this lock's own (default: the backend's). Reentrancy, and the locks whose lease ran
        out, are known in this process (``leases``, which renews them), per lock key; ``held`` is not
        needed here. The lease thread renews through this backend's blocking connection, whichever face
        acquired: it goes on while an event loop is busy (``aio_redis``)."""
        key, wake = self._lock_keys(name)
        ident = (self._url, key)
        registry = _leases.leases
        if registry.reenter(ident, owner):
            return True
        # Redis' own bounds (``url.MIN_LEASE``..``MAX_LEASE``), narrower than any positive number ``Lock`` takes.
        lease = self.lease if lease is None else check_lease(lease)
        token = _leases.token(owner)
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        waiting = None  # since when this call waits for the lock (None: at its first try, it does not yet)
        while True:
            left = yield Script("acquire", [key], [token, lease_ms(lease)])
            if left == -3:
                registry.add(ident, _leases.Held(self._conn, self.address, name, key, token, owner, lease))
                self.waits.record(waiting)
                return True
            if not blocking:
                return False
            if left == -2:
                continue  # released between the two commands of the script: ask again at once
            step = pause(wake, left, deadline, self._timeout)
            if step is None:
                self.waits.record(waiting, time.monotonic(), taken=False)  # a wait given up is a wait too
                return False
            waiting = start  # it waits from its request on, as on the local server
            yield step

    def lock_give_back(self, name: str | None, owner: Hashable) -> None:
        """Release ``name`` if a try of ``owner`` whose answer was lost took it (the asyncio face's try cut
        short by the end of its event loop): the script deletes the key only if it holds ``owner``'s token,
        so this does nothing if the try took nothing. Blocking; errors are logged, nobody awaits them."""
        key, wake = self._lock_keys(name)
        try:
            self._conn.run("release", [key, wake], [_leases.token(owner), lease_ms(self.lease)])
        except Exception as exc:
            log.warning("could not give back the lock %s a cut-short try may have taken: %s", key, exc)

    @operation
    def lock_release(self, name: str | None, owner: Hashable, held: int) -> Operation:
        key, wake = self._lock_keys(name)
        mine = _leases.leases.leave((self._url, key), owner)
        if mine is None:
            raise lock_not_held(name, (yield from self.lock_owner.steps(self, name)))
        if mine is STILL_HELD:
            return
        released = yield Script("release", [key, wake], [mine.token, mine.lease_ms])
        if released != 1 or mine.lost:
            raise _leases.lost_lease(mine)

    def lock_renew(self, held: list[LockRef]) -> list[LockRef]:
        """Nothing to do (``renews_leases``): this process' lease thread renews its locks."""
        return []

    @operation
    def lock_locked(self, name: str | None) -> Operation:
        return bool((yield Command("exists", (self._lock_keys(name)[0],))))

    @operation
    def lock_owner(self, name: str | None) -> Operation:
        """The pid of the holder (on its own host), read from the token its key holds."""
        raw = yield Command("get", (self._lock_keys(name)[0],))
        return None if raw is None else _leases.pid_of(raw)
