"""The store as the server process serves it: the lock calls, snapshots and statistics around
``Store``, and what each serving thread knows of the client it serves."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import psutil

from sharedstate._figures import CallCounts, lock_holders
from sharedstate._rules import check_restored, select_saved
from sharedstate._sentinels import HANDED
from sharedstate.persistence.files import check_slot
from sharedstate.persistence.snapshot import Snapshot, read_snapshot, write_snapshot
from sharedstate.server.changes import Waiting
from sharedstate.server.clients import RECONNECT_GRACE_S, Client, Clients
from sharedstate.server.config import ServerConfig
from sharedstate.server.lockfile import LockFile
from sharedstate.server.locktable import LockTable
from sharedstate.server.semaphores import SEMAPHORE_CALLS, SemaphoreCalls, SemaphoreTable
from sharedstate.server.store import Store
from sharedstate.wire.addresses import BOOT_SCOPE, STORE_ID, Address, format_address
from sharedstate.wire.expiring import clock

log = logging.getLogger(__name__)


class CurrentClient(threading.local):
    """The client that the current server thread is serving, and how to reach its connection."""

    client: Client | None = None
    #: Writes "you have the lock" to that connection: how a lock is handed over to a waiting call.
    notify: Callable[[], None] | None = None
    #: Waits up to so many seconds for that connection to have something to read (``True``), or for a
    #: second descriptor to (``False``, as at the timeout).
    readable: Callable[..., bool] | None = None
    #: Its descriptor, and how its thread waits for a watch's changes (made at its first wait).
    fd: int = -1
    waiting: Waiting | None = None


#: Set by the serving loop for the connection it serves; read by the lock calls.
current_client = CurrentClient()


class StateService(SemaphoreCalls, Store):
    """The store as clients see it: data operations, locks and statistics."""

    EXPOSED = Store.EXPOSED + (
        "lock_acquire",
        "lock_release",
        "lock_give_back",
        "lock_locked",
        "lock_owner",
        "lock_renew",
        "stats",
        "save",
        "restore",
        *SEMAPHORE_CALLS,
        "watch_open",
        "watch_next",
        "watch_close",
    )
    #: The calls that may wait for long, in the thread of their connection (``serving``).
    WAITS = frozenset(("lock_acquire", "sem_acquire", "watch_next"))
    current = current_client

    def __init__(self, config: ServerConfig) -> None:
        super().__init__()
        self.config = config
        self.lock_file = None if config.lock_file is None else LockFile(config.lock_file)
        self.locks = LockTable(self.lock_file)
        # Permits are kept across a crash as locks are, in a lock file of their own beside the locks' one.
        semaphore_file = None if config.lock_file is None else LockFile(config.lock_file + "-semaphores")
        self.semaphores = SemaphoreTable(semaphore_file)
        self.started_at = time.time()
        self.address: Address | None = None
        self.clients = Clients()
        #: Calls served since the server started, by name: each serving thread counts its own.
        self.calls = CallCounts(self.EXPOSED)
        # Resolved, so that another spelling of the same file (.., a symlink) is still this server's file.
        self.path = None if config.path is None else Path(config.path).resolve()
        self.last_save_at: float | None = None
        self.last_save_s: float | None = None
        self.last_save_error: str | None = None
        #: 1 when the server started from ``NAME.bak`` because the snapshot was missing.
        self.restored_from_backup = 0
        self._save_mutex = threading.Lock()

    # -- clients ------------------------------------------------------------------------------------
    def connected(self, hello: dict[str, Any]) -> Client:
        return self.clients.connected((hello["scope"], hello["pid"], hello.get("ctime")))

    def rebuild_locks(self) -> None:
        """Hold again the locks that the previous server process recorded (after a crash), for the
        holders still alive; each holder is a client that has not connected yet."""
        if self.lock_file is None:
            return
        grace = time.monotonic() + RECONNECT_GRACE_S
        self.locks.rebuild(self.lock_file.load(), lambda holder: self.clients.holder(holder.client, grace))
        self.semaphores.rebuild(self.semaphores.load(), lambda holder: self.clients.holder(holder.client, grace))
        self.clients.forget_dead()  # the holders found dead need no place among the clients

    def disconnected(self, client: Client) -> None:
        if self.clients.disconnected(client):
            self.locks.release_client(client)
            self.semaphores.release_client(client)
            self.watchers.drop_client(client)

    def info(self) -> dict[str, Any]:
        versions = None if self.versions is None else self.versions.info()
        config = self.config
        restart = None
        if config.restart and config.owner_pid is not None:
            # Clients retry a call that a crash interrupted while this owner lives to restart the server.
            restart = {"owner": config.owner_pid, "ctime": config.owner_create_time, "scope": BOOT_SCOPE}
        return {
            "service": STORE_ID,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "versions": versions,
            "restart": restart,
        }

    # -- locks --------------------------------------------------------------------------------------
    def lock_acquire(
        self,
        key: str | None,
        thread: Hashable,
        blocking: bool,
        timeout: float | None,
        lease: float | None = None,
        held: int = 0,
    ) -> Any:
        current = current_client
        client = current.client
        assert client is not None and current.notify is not None and current.readable is not None
        taken = self.locks.acquire(key, client, thread, blocking, timeout, current.notify, lease, held)
        if taken is True or taken is False:
            return taken
        # A wait. This thread waits on its connection rather than on the lock, so that the thread that
        # frees the lock answers the caller itself (one wake-up fewer on every hand-over): the answer is
        # then written already, which HANDED tells the serving loop.
        return HANDED if self.locks.wait(taken, current.readable) else False

    def lock_release(self, key: str | None, thread: Hashable, held: int = 0, request: int = 0) -> None:
        client = current_client.client
        assert client is not None
        self.locks.release(key, client, thread, held, request)

    def lock_give_back(self, key: str | None, thread: Hashable) -> None:
        client = current_client.client
        assert client is not None
        self.locks.give_back(key, client, thread)

    def lock_renew(self, locks: list[tuple[str | None, Hashable]]) -> list[tuple[str | None, Hashable]]:
        client = current_client.client
        assert client is not None
        return self.locks.renew(client, locks)

    def lock_locked(self, key: str | None) -> bool:
        return self.locks.owner(key) is not None

    def lock_owner(self, key: str | None) -> int | None:
        return self.locks.owner(key)

    # -- change notifications (``server.changes``) ------------------------------------------------------
    def watch_open(self, pattern: str | None, names: list[str] | None, scopes: list[str], buffer: int) -> int:
        """Start watching for the calling client; the watch's id. Lossless from this answer on."""
        client = current_client.client
        assert client is not None
        return self.watchers.open(client, pattern, names, scopes, buffer)

    def watch_next(self, ident: int, timeout: float | None, got: int = 0) -> list[tuple[Any, ...]]:
        """The changes queued for watch ``ident``, waiting up to ``timeout`` seconds for the first, as a
        lock wait does: in this connection's thread, with keepalives (``Watchers.next``)."""
        current = current_client
        assert current.client is not None and current.readable is not None
        waiting = current.waiting
        if waiting is None:
            waiting = current.waiting = Waiting(current.fd)
        return self.watchers.next(ident, current.client, timeout, got, current.readable, waiting)

    def watch_close(self, ident: int) -> None:
        client = current_client.client
        assert client is not None
        self.watchers.close(ident, client)

    # -- snapshots ----------------------------------------------------------------------------------
    def _target(self, path: str | None, verb: str) -> Path:
        if path is not None:
            # The caller resolved it already (in its own process); resolving here again only makes
            # another spelling of the server's own file compare equal to it.
            target = Path(path).resolve()
            check_slot(target, ours=False)
            return target
        if self.path is None:
            raise ValueError(f"{verb}() needs a path: this server was started without one")
        return self.path

    def save(
        self,
        path: str | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        scope: tuple[str, ...] = (),
    ) -> str:
        """Write a snapshot; return its path. Filters apply in Pode's order (``_rules.select_saved``)."""
        target = self._target(path, "save")
        include = include or None  # an empty list is no filter (Pode's rule)
        if target == self.path and (include or exclude or scope):
            raise ValueError(
                f"a filtered save would drop names from the server's own snapshot {target}: "
                "save a filtered snapshot to another path"
            )
        return str(self.save_to(target, include, exclude, scope))

    def save_to(
        self,
        target: Path,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        scope: tuple[str, ...] = (),
        final: bool = False,
        why: str = "save",
        generation: int = 0,
    ) -> Path:
        with self._save_mutex:
            started = time.time()
            clock = time.perf_counter()
            # A save of the server's own file starts a new journal generation, which the file records.
            journal = self.journal if target == self.path else None
            if journal is not None:
                generation = journal.generation + 1
            data, scopes, answers, deadlines = self.entries(final=final, new_generation=generation or None)
            if scope or include or exclude:
                data = select_saved(data, scopes, include, exclude, scope)
            try:
                # Only the server's own file keeps the answers: they belong to this server's clients.
                own = target == self.path
                write_snapshot(target, data, scopes, generation, answers if own else None, own, deadlines)
                if journal is not None:
                    journal.covered(generation)
            except Exception as exc:
                self.last_save_error = f"{target}: {type(exc).__name__}: {exc}"
                log.error("%s of %d names to %s failed, the previous file is kept: %s", why, len(data), target, exc)
                raise
            self.last_save_at = started
            self.last_save_s = time.perf_counter() - clock
            self.last_save_error = None
            log.info("%s: %d names to %s in %.3f s", why, len(data), target, self.last_save_s)
            return target

    def restore(self, path: str | None = None, merge: bool = False) -> int:
        """Load a snapshot (ours or Pode's); return the number of names in it. A missing or empty file
        restores nothing and changes nothing."""
        target = self._target(path, "restore")
        snapshot = read_snapshot(target)
        if snapshot is None:
            return 0
        return self.install(target, snapshot, merge)

    def install(self, target: Path, snapshot: Snapshot, merge: bool = False) -> int:
        """Install ``snapshot``'s names, less those past their deadline (unless the server's files are being
        replayed: ``deadlines.frozen``), whose scopes ``replace`` drops with them; return how many were
        installed."""
        data, scopes = snapshot.data, snapshot.scopes
        check_restored(data, snapshot.foreign, str(target))
        gone = self.deadlines.passed_among(snapshot.deadlines, clock())
        if gone:
            data = {name: value for name, value in data.items() if name not in gone}
        self.replace(data, scopes, merge, snapshot.deadlines)
        return len(data)

    # -- statistics ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._mutex:
            self.ops += 1
            names, ops = len(self._data), self.ops
        clients = self.clients.connections()
        held = self.locks.holders()
        journal = self.journal
        return {
            "names": names,
            "pid": os.getpid(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "uptime_s": time.time() - self.started_at,
            "ops": ops,
            "clients": clients,
            "last_save_at": self.last_save_at,
            "last_save_s": self.last_save_s,
            "last_save_error": self.last_save_error,
            "lock_recoveries": self.locks.recoveries + self.semaphores.recoveries,
            "restored_from_backup": self.restored_from_backup,
            "locks_held": len(held),
            "lock_waiters": sum(holder[3] for holder in held),
            "address": format_address(self.address) if self.address is not None else None,
            "path": self.config.path,
            "journal_bytes": None if journal is None else journal.size(),
            "calls": self.calls.totals(),
            **self.watchers.figures(),
            "lock_holders": lock_holders(held),
            **self.locks.waits.percentiles(),
        }
