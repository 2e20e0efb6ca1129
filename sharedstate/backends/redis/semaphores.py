"""The semaphore calls of ``RedisBackend`` (and of its asyncio face): acquire (waiting on a list a release
pushes to, as a lock waiter does), release and the permits free, each step one script of
``semaphore_scripts``.

Each permit this process takes is a member of the semaphore's sorted set with a token of its own, renewed
every third of the backend's lease by the process' lease thread (``leases``, as its locks are): the
permit of a dead or stopped holder is free once its lease ends, for the next call on the semaphore.
Permits belong to the process: a release gives back the latest one it took, whichever thread took it;
the process forgets that permit only once Redis answered the release (a release that failed, Redis out
of reach say, leaves it held and renewed).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sharedstate._errors import permit_lost, permit_not_held, permit_value
from sharedstate._fork import after_fork_in_child
from sharedstate.backends.redis import leases as _leases
from sharedstate.backends.redis.connection import operation
from sharedstate.backends.redis.connection import text as _text
from sharedstate.backends.redis.locks import pause
from sharedstate.backends.redis.steps import Operation, Script
from sharedstate.backends.redis.url import lease_ms

if TYPE_CHECKING:
    from sharedstate._figures import WaitWindow
    from sharedstate.backends.redis.connection import Connection

log = logging.getLogger(__name__)


class Permit(_leases.Held):
    """A permit this process holds: a lease renewed by the lease thread, with the semaphore's script."""

    __slots__ = ()
    renew_script = "sem_renew"

    def describe(self) -> str:
        return f"a permit of semaphore {self.name!r}"


#: ``(the backend's URL, the semaphore's key)`` -> the permits this process holds there, the latest last.
_mine: dict[tuple[str, str], list[Permit]] = {}
_mutex = threading.Lock()
_serial = itertools.count(1)


@after_fork_in_child
def _after_fork_in_child() -> None:
    # A forked child holds none of its parent's permits (the parent keeps renewing them).
    global _mutex
    _mine.clear()
    _mutex = threading.Lock()


def permit_token() -> str:
    """A token for a new permit of this process: its pid first (as a lock token), unique in the process."""
    return _leases.token(f"permit-{next(_serial)}")


class SemaphoreCalls:
    """The ``sem_*`` operations, for ``RedisBackend``, whose keys, connection, lease and reply timeout
    they use."""

    _prefix: str
    _url: str
    _timeout: float
    _conn: Connection
    address: str
    lease: float
    waits: WaitWindow

    def _sem_keys(self, name: str) -> tuple[list[str], str]:
        """The script keys (permits, value, the namespace's recoveries) and the wake list."""
        prefix = self._prefix
        keys = [f"{prefix}semaphore:{name}", f"{prefix}semaphore-value:{name}", prefix + "semaphore-recoveries"]
        return keys, f"{prefix}semaphore-wake:{name}"

    @operation
    def sem_acquire(
        self, name: str, value: int, blocking: bool, timeout: float | None, owner: Any = None, token: str = ""
    ) -> Operation:
        """``owner`` is not needed (the permits are the process'); ``token``: the new permit's (the asyncio
        face makes it first, to give back a try cut short)."""
        keys, wake = self._sem_keys(name)
        token = token or permit_token()
        lease = self.lease
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        waiting = None  # since when this call waits (None: at its first try, it does not yet)
        while True:
            reply = yield Script("sem_acquire", keys, [value, token, lease_ms(lease)])
            status = _text(reply[0])
            if status == "ok":
                permit = Permit(self._conn, self.address, name, keys[0], token, token, lease)
                _leases.leases.add((self._url, f"{keys[0]}\n{token}"), permit)
                with _mutex:
                    _mine.setdefault((self._url, keys[0]), []).append(permit)
                self.waits.record(waiting)
                return True
            if status == "value":
                raise permit_value(name, int(reply[1]), value)
            if not blocking:
                return False
            step = pause(wake, int(reply[1]), deadline, self._timeout)
            if step is None:
                self.waits.record(waiting, time.monotonic(), taken=False)
                return False
            waiting = start
            yield step

    @operation
    def sem_release(self, name: str, value: int, held: int, owner: Any = None) -> Operation:
        keys, wake = self._sem_keys(name)
        mine = (self._url, keys[0])
        with _mutex:
            permits = _mine.get(mine)
            permit = permits.pop() if permits else None  # this release's alone, while Redis is asked
        if permit is not None:
            lease = (self._url, f"{keys[0]}\n{permit.token}")
            _leases.leases.leave(lease, permit.token)  # no renewal racing the release
        answered = False
        try:
            reply = yield Script(
                "sem_release",
                [keys[0], wake, keys[1]],
                ["" if permit is None else permit.token, lease_ms(self.lease), value],
            )
            status = _text(reply[0])
            if status == "value":
                raise permit_value(name, int(reply[1]), value)
            answered = True
        finally:
            if not answered and permit is not None:  # not released: still this process' (and renewed)
                permit.count = 1
                _leases.leases.add(lease, permit)
                with _mutex:
                    _mine.setdefault(mine, []).append(permit)
        if permit is None:
            if held:
                raise permit_lost(name)
            raise permit_not_held(name)
        if status != "ok" or permit.lost:
            raise permit_lost(name)

    @operation
    def sem_value(self, name: str, value: int) -> Operation:
        reply = yield Script("sem_value", self._sem_keys(name)[0], [value])
        if _text(reply[0]) == "value":
            raise permit_value(name, int(reply[1]), value)
        return int(reply[1])

    def sem_give_back(self, name: str, value: int, token: str) -> None:
        """Give back the permit ``token`` if a try whose answer was lost took it (the asyncio face's try cut
        short by the end of its event loop); nothing if it took none. Blocking; errors are logged."""
        keys, wake = self._sem_keys(name)
        try:
            self._conn.run("sem_release", [keys[0], wake, keys[1]], [token, lease_ms(self.lease), value])
        except Exception as exc:
            log.warning("could not give back a permit of semaphore %r a cut-short try may have taken: %s", name, exc)


class AsyncSemaphoreCalls:
    """The same operations on the asyncio face (``aio_redis.AsyncRedisBackend``), awaited step by step."""

    sync: Any
    _run: Callable[..., Any]

    async def sem_acquire(
        self, name: str, value: int, blocking: bool, timeout: float | None, owner: Any, late: Callable[[Any], None]
    ) -> bool:
        """``late(True)`` runs if a task cancelled during a try got a permit all the same."""
        token = permit_token()

        def unknown() -> None:
            # A try left without an answer may have taken the permit: give it back by its token, on a
            # thread (the loop may be gone); harmless if the try took nothing.
            threading.Thread(target=self.sync.sem_give_back, args=(name, value, token), daemon=True).start()

        return await self._run("sem_acquire", name, value, blocking, timeout, owner, token, late=late, unknown=unknown)

    async def sem_release(self, name: str, value: int, held: int, owner: Any) -> None:
        await self._run("sem_release", name, value, held, owner)

    async def sem_value(self, name: str, value: int) -> int:
        return await self._run("sem_value", name, value)
