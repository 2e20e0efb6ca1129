"""The client processes a server process knows: one ``Client`` per process, with its open connections,
and whether the process is still alive (the lock table frees the locks of those that are not)."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

from sharedstate._processes import process_alive
from sharedstate.wire.addresses import BOOT_SCOPE

#: A holder rebuilt from the lock file that is not on this machine (so its liveness cannot be checked)
#: keeps its lock this long without reconnecting, then loses it to a waiter.
RECONNECT_GRACE_S = 10.0


class Client:
    """One client process, as the server knows it, with the number of its open connections."""

    __slots__ = ("key", "pid", "local", "create_time", "conns", "rebuilt_until")

    def __init__(self, key: Hashable, pid: int, local: bool, create_time: float | None) -> None:
        self.key = key
        self.pid = pid
        #: Whether ``pid`` is a process of this machine and pid namespace, so psutil can look at it.
        self.local = local and create_time is not None
        #: The process' start time as psutil reports it, to tell it from a later process with its pid.
        self.create_time = create_time
        self.conns = 0
        #: Set for a holder rebuilt from the lock file after a restart, which has not reconnected yet: it
        #: counts as alive while its process is (or, not on this machine, until this monotonic time).
        self.rebuilt_until: float | None = None

    def alive(self) -> bool:
        """False when the process is gone: no connection left, exited, a zombie, or its pid reused."""
        if self.conns <= 0:
            if self.rebuilt_until is None:
                return False
            if not self.local:
                return time.monotonic() < self.rebuilt_until
        return not self.local or process_alive(self.pid, self.create_time)

    def __repr__(self) -> str:
        return f"<client pid {self.pid}>"


class Clients:
    """The clients of one server process by key, ``(scope, pid, create time)`` as a client introduces
    itself; a client is forgotten when its last connection closes."""

    def __init__(self) -> None:
        self._clients: dict[Hashable, Client] = {}
        self._mutex = threading.Lock()

    def _add(self, key: tuple[str, int, float | None]) -> Client:
        """A new client (the mutex is held)."""
        scope, pid, ctime = key
        client = self._clients[key] = Client(key, pid, scope == BOOT_SCOPE, ctime)
        return client

    def connected(self, key: tuple[str, int, float | None]) -> Client:
        """The client of a connection that introduced itself as ``key``, one connection more."""
        with self._mutex:
            client = self._clients.get(key) or self._add(key)
            client.conns += 1
        return client

    def disconnected(self, client: Client) -> bool:
        """One connection of ``client`` closed; returns whether it was its last (the client is gone)."""
        with self._mutex:
            client.conns -= 1
            gone = client.conns == 0
            if gone and self._clients.get(client.key) is client:
                del self._clients[client.key]
        return gone

    def holder(self, key: tuple[str, int, float | None], grace_until: float) -> Client:
        """The client of a lock holder that the previous server process recorded (after a crash); a new
        one has not connected yet and, not on this machine, counts as alive until ``grace_until``
        (``time.monotonic()``)."""
        with self._mutex:
            client = self._clients.get(key)
            if client is None:
                client = self._add(key)
                client.rebuilt_until = grace_until
        return client

    def forget_dead(self) -> None:
        """Forget the clients with no connection whose process is gone (holders found dead at a restart)."""
        with self._mutex:
            for key, client in list(self._clients.items()):
                if client.conns == 0 and not client.alive():
                    del self._clients[key]

    def connections(self) -> int:
        """How many connections the clients have open."""
        with self._mutex:
            return sum(c.conns for c in self._clients.values())
