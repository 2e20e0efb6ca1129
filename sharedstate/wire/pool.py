"""The connection pool of a client handle: one connection per thread, opened on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sharedstate import _fork
from sharedstate.wire.addresses import CONNECT_TIMEOUT, Address
from sharedstate.wire.connection import Connection
from sharedstate.wire.handshake import open_connection


class ConnectionPool:
    """One connection per thread for one client handle; dropped in a forked child and after any failure.

    A connection is never shared between threads (the protocol is one request, one answer) nor inherited
    across ``fork``: the child opens its own.
    """

    def __init__(
        self,
        address: Address,
        authkey: bytes | None,
        hello: Callable[[], dict[str, Any]],
        on_connect: Callable[[dict[str, Any]], None] | None = None,
        call_timeout: float | None = None,
        restart: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.authkey = authkey
        self.hello = hello
        #: Called with what the server says about itself each time a connection opens.
        self.on_connect = on_connect
        #: How long a call's read or write may make no progress (``None``: no limit).
        self.call_timeout = call_timeout
        #: What the last server reached said about its restart (its owner restarts it if it crashes):
        #: ``{"owner", "ctime", "scope"}``, or ``None`` when no restart is to be expected.
        self.restart = restart
        self._local = threading.local()
        self._generation = _fork.generation

    def get(self, timeout: float | None = None) -> Connection:
        """This thread's connection, opened (within ``timeout`` seconds; by default ``CONNECT_TIMEOUT``,
        or the call timeout when that is shorter) if it has none."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and self._generation == _fork.generation:
            return conn
        if self._generation != _fork.generation:
            self._local = local = threading.local()
            self._generation = _fork.generation
        if timeout is None:
            timeout = CONNECT_TIMEOUT if self.call_timeout is None else min(CONNECT_TIMEOUT, self.call_timeout)
        conn, info = open_connection(self.address, self.authkey, self.hello(), timeout, self.call_timeout)
        self.restart = info.get("restart")
        local.conn = conn
        if self.on_connect is not None:
            self.on_connect(info)
        return conn

    def drop(self) -> None:
        """Close this thread's connection (after a failure, or when the handle is closed)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and self._generation == _fork.generation:
            try:
                conn.close()
            except OSError:
                pass
