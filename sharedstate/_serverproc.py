"""The server process: a ``multiprocessing.managers.Server`` that exposes one store at a fixed id.

Started by ``StateServer.start()`` as ``python -c ...`` (not through ``multiprocessing``, so it never
re-imports the user's ``__main__`` and behaves the same under every start method). It reads its
configuration as a pickle on stdin, answers ``("ready", info)`` or ``("error", exception)`` on stdout,
then serves until it is told to stop (``shutdown``, SIGTERM, SIGINT) or its owner process dies.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import pickle
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from multiprocessing import connection as mpc
from multiprocessing import managers
from pathlib import Path
from typing import Any

import psutil

from ._admission import Admission, raise_fd_limit
from ._answers import Duplicate, current_request
from ._errors import SnapshotError
from ._files import backup_path, check_slot, write_atomic
from ._journal import Journal, replay_records, scan_journals
from ._lockfile import Holder, LockFile
from ._locktable import RECONNECT_GRACE_S, Client, LockTable, process_alive
from ._schedule import SaveEvery, parse_schedule
from ._snapshot import FileOwnership, Snapshot, read_snapshot, write_snapshot
from ._store import Store
from ._transport import (
    BOOT_SCOPE,
    STORE_ID,
    Address,
    MessageReader,
    format_address,
    frame,
    key_file_for,
    write_message,
    write_raw,
)
from ._values import check_value
from ._versions import VersionTable

log = logging.getLogger("sharedstate")

#: Connections that may wait to be accepted.
LISTEN_BACKLOG = 1024
#: How often the server checks that its owner process is still alive.
OWNER_POLL_S = 0.5
#: Answers are plain data and exceptions, read by ``pickle.loads`` on the other side.
_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: The answer to a lock_acquire that was handed the lock, framed.
_GRANTED = frame(pickle.dumps(("#RETURN", True), _PROTOCOL))


@dataclass
class ServerConfig:
    """What the owner tells a new server process."""

    address: Address
    authkey: bytes
    write_key_file: bool
    owner_pid: int | None
    owner_create_time: float | None
    path: str | None = None
    save_every: SaveEvery = None
    durability: str = "snapshot"
    journal_fsync: str = "everysec"
    log_level: int = logging.WARNING
    #: Where the process writes, as it exits, whether its final save failed (a pipe to the owner).
    report_fd: int | None = None
    #: Where the lock table is recorded, in a folder only this user may write, so a server process
    #: started again after a crash holds the same locks (``None``: locks do not survive a crash).
    lock_file: str | None = None
    #: The owner starts this server again if it crashes: clients then retry their calls (``info``).
    restart: bool = False


#: The exit status of a server process that stopped as asked but could not write its final snapshot.
EXIT_SAVE_FAILED = 3


class _Current(threading.local):
    """The client that the current server thread is serving, and how to reach its connection."""

    client: Client | None = None
    #: Writes "you have the lock" to that connection: how a lock is handed over to a waiting call.
    notify: Callable[[], None] | None = None
    #: Waits up to so many seconds for that connection to have something to read.
    readable: Callable[[float], bool] | None = None


class _Handed:
    __slots__ = ()

    def __repr__(self) -> str:
        return "HANDED"


#: What ``lock_acquire`` returns when the lock was handed over after a wait: the answer is written.
HANDED = _Handed()


_current = _Current()


#: A keepalive: an empty message, which no answer is (an answer is a pickle).
_KEEPALIVE = frame(b"")


def _readable_within(fd: int, keepalive: float | None = None) -> Callable[[float], bool]:
    """``readable(seconds)``: whether ``fd`` has something to read within that long. With ``keepalive``
    (seconds), a waiting caller is sent an empty message at least that often meanwhile, so that its
    receive timeout tells a long lock wait from a server that stopped answering."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if keepalive is None:

        def readable(seconds: float) -> bool:
            return bool(poller.poll(seconds * 1000))

        return readable

    interval = max(keepalive, 0.001)
    # When the last keepalive went out (or the wait began), and when the last call of a wait returned: a
    # lock wait calls this again and again, so a longer pause means a new wait, whose caller heard from
    # the server just now (its request went out): a wait shorter than the interval costs no keepalive.
    last = [0.0]
    returned = [0.0]

    def readable_with_keepalives(seconds: float) -> bool:
        now = time.monotonic()
        if now - returned[0] > interval:
            last[0] = now
        try:
            return _poll_with_keepalives(now + seconds)
        finally:
            returned[0] = time.monotonic()

    def _poll_with_keepalives(end: float) -> bool:
        while True:
            now = time.monotonic()
            if now - last[0] >= interval:
                # One small write: it never splits a hand-over's answer written by another thread. A
                # keepalive that lands after that answer is skipped by the client before its next one.
                try:
                    write_raw(fd, _KEEPALIVE)
                except OSError:
                    return True  # the caller is gone: its wait ends
                last[0] = now
            span = min(end, last[0] + interval) - now
            if poller.poll(max(0.0, span) * 1000):
                return True
            if time.monotonic() >= end:
                return False

    return readable_with_keepalives


class StateService(Store):
    """The store as clients see it: data operations, locks and statistics."""

    EXPOSED = Store.EXPOSED + (
        "lock_acquire",
        "lock_release",
        "lock_locked",
        "lock_owner",
        "lock_renew",
        "stats",
        "save",
        "restore",
    )

    def __init__(self, config: ServerConfig) -> None:
        super().__init__()
        self.config = config
        self.lock_file = None if config.lock_file is None else LockFile(config.lock_file)
        self.locks = LockTable(self.lock_file)
        self.started_at = time.time()
        self.address: Address | None = None
        self._clients: dict[Hashable, Client] = {}
        self._clients_mutex = threading.Lock()
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
        pid, scope, ctime = hello["pid"], hello["scope"], hello.get("ctime")
        key = (scope, pid, ctime)
        with self._clients_mutex:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = Client(key, pid, scope == BOOT_SCOPE, ctime)
            client.conns += 1
        return client

    def rebuild_locks(self) -> None:
        """Hold again the locks that the previous server process recorded (after a crash), for the
        holders still alive; each holder is a client that has not connected yet."""
        if self.lock_file is None:
            return
        grace = time.monotonic() + RECONNECT_GRACE_S

        def client_for(holder: Holder) -> Client:
            scope, pid, ctime = holder.client
            with self._clients_mutex:
                client = self._clients.get(holder.client)
                if client is None:
                    client = self._clients[holder.client] = Client(holder.client, pid, scope == BOOT_SCOPE, ctime)
                    client.rebuilt_until = grace
            return client

        self.locks.rebuild(self.lock_file.load(), client_for)
        with self._clients_mutex:  # the holders found dead need no place among the clients
            for key, client in list(self._clients.items()):
                if client.conns == 0 and not client.alive():
                    del self._clients[key]

    def disconnected(self, client: Client) -> None:
        with self._clients_mutex:
            client.conns -= 1
            gone = client.conns == 0
            if gone and self._clients.get(client.key) is client:
                del self._clients[client.key]
        if gone:
            self.locks.release_client(client)

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
        current = _current
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
        client = _current.client
        assert client is not None
        self.locks.release(key, client, thread, held, request)

    def lock_renew(self, locks: list[tuple[str | None, Hashable]]) -> list[tuple[str | None, Hashable]]:
        client = _current.client
        assert client is not None
        return self.locks.renew(client, locks)

    def lock_locked(self, key: str | None) -> bool:
        return self.locks.locked(key)

    def lock_owner(self, key: str | None) -> int | None:
        return self.locks.owner(key)

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
        """Write a snapshot; return its path. Filters apply in Pode's order: scope, then include, then
        exclude (so exclude has the last word)."""
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
            data, scopes, answers = self.entries(final=final, new_generation=generation or None)
            if scope:
                wanted = set(scope)
                data = {n: v for n, v in data.items() if not wanted.isdisjoint(scopes.get(n, ()))}
            if include:
                data = {n: data[n] for n in include if n in data}
            if exclude:
                for name in exclude:
                    data.pop(name, None)
            try:
                # Only the server's own file keeps the answers: they belong to this server's clients.
                own = target == self.path
                write_snapshot(target, data, scopes, generation, answers if own else None, ours=own)
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
        data, scopes = snapshot.data, snapshot.scopes
        for name, value in data.items() if snapshot.foreign else ():  # Pode's JSON may hold any shape
            try:
                check_value(name, value)
            except (TypeError, ValueError) as exc:
                raise SnapshotError(f"{target} is not a valid snapshot: {exc}", str(target)) from None
        self.replace(data, scopes, merge)
        return len(data)

    # -- statistics ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._mutex:
            self.ops += 1
            names, ops = len(self._data), self.ops
        with self._clients_mutex:
            clients = sum(c.conns for c in self._clients.values())
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
            "lock_recoveries": self.locks.recoveries,
            "restored_from_backup": self.restored_from_backup,
            **self.locks.status(),
            "address": format_address(self.address) if self.address is not None else None,
            "path": self.config.path,
        }


class ManagerServer(managers.Server):
    """``managers.Server`` with the store at a fixed id, client tracking, and a stoppable accept loop."""

    def __init__(self, service: StateService, address: Address, authkey: bytes) -> None:
        super().__init__({}, address, authkey, "pickle")
        # The manager listens with a backlog of 16 (Python < 3.13): a pool of processes connecting at
        # once would overflow it. listen() again raises the backlog of the same socket.
        sock = self.listener._listener._socket
        sock.listen(LISTEN_BACKLOG)
        self.admission = Admission(sock, raise_fd_limit())
        self.service = service
        self.id_to_obj[STORE_ID] = (service, frozenset(service.EXPOSED), None)
        #: What a request may call, bound once: the serving loop looks a method up in one dict.
        self.methods: dict[str, Callable[..., Any]] = {name: getattr(service, name) for name in service.EXPOSED}
        self.stop_event = threading.Event()

    def accept_connection(self, c: mpc.Connection, hello: Any) -> None:  # type: ignore[override]
        if not isinstance(hello, dict) or "pid" not in hello or "scope" not in hello:
            raise TypeError("not a sharedstate client")
        client = self.service.connected(hello)
        _current.client = client
        _current.notify = functools.partial(write_raw, c.fileno(), _GRANTED)
        keepalive = hello.get("keepalive")
        _current.readable = _readable_within(
            c.fileno(), keepalive if type(keepalive) in (int, float) and keepalive > 0 else None
        )
        try:
            c.send(("#RETURN", self.service.info()))
            writer = hello.get("client")
            self.serve(c, writer if type(writer) is str else None)
        finally:
            _current.client = _current.notify = _current.readable = None
            self.service.disconnected(client)
        # Returning normally would make the manager send one more ('#RETURN', None), which a client
        # waiting for an answer would take as a success.
        raise SystemExit(0)

    def serve(self, conn: mpc.Connection, client: str | None = None) -> None:
        """Answer one client's requests until it goes away or the server stops: the stdlib's
        ``serve_client`` loop with the same requests and answers, made leaner (one read and one write
        per call, the plain pickler, methods bound once). A method's exception is answered with
        ``('#ERROR', exception)``; a request that is not a call of an exposed method with
        ``('#TRACEBACK', text)``; an answer that cannot be pickled with ``('#UNSERIALIZABLE', text)``.

        A write names the store by its request id instead: its sequence number (the client is the one
        the connection introduced as, ``client``), or ``(client, sequence)`` (``_answers``)."""
        reader = MessageReader(conn.fileno())
        read, fd = reader.read, reader.fd
        methods = self.methods
        answers = self.service.answers.table
        request_now = current_request
        stopping = self.stop_event.is_set
        loads, dumps = pickle.loads, pickle.dumps
        while not stopping():
            try:
                request = read()
            except (EOFError, OSError):
                return  # the client closed its connection (or it broke)
            try:
                ident, name, args, kwds = loads(request)
                writer = None
                if ident != STORE_ID:
                    # A write: its request id in place of the store's id (``_answers``).
                    if type(ident) is int and client is not None:
                        writer, sequence = client, ident
                    elif type(ident) is tuple and len(ident) == 2 and type(ident[0]) is str and type(ident[1]) is int:
                        writer, sequence = ident
                    else:
                        raise KeyError(f"no object with id {ident!r}")
                function = methods[name]
            except Exception:
                reply: tuple[str, Any] = ("#TRACEBACK", traceback.format_exc())
            else:
                try:
                    if writer is None:
                        result = function(*args, **kwds) if kwds else function(*args)
                    else:
                        # Inline: this is on the path of every write. If the id was applied already
                        # (before a crash, say), the answer it had then is the answer.
                        entry = answers.get(writer)
                        if entry is not None and entry[0] == sequence:
                            result = entry[1]
                        else:
                            request_now.rid = (writer, sequence)
                            try:
                                result = function(*args, **kwds) if kwds else function(*args)
                            except Duplicate as duplicate:  # the same id twice at once: checked under the mutex
                                result = duplicate.answer
                            finally:
                                request_now.rid = None
                except Exception as exc:
                    # Without its traceback: the reply, kept until the next request, would otherwise hold
                    # this frame through it (a cycle only the garbage collector frees).
                    reply = ("#ERROR", exc.with_traceback(None))
                else:
                    if result is HANDED:
                        continue  # a lock handed over: its answer is written already
                    reply = ("#RETURN", result)
            try:
                try:
                    payload = dumps(reply, _PROTOCOL)
                except Exception:
                    payload = dumps(("#UNSERIALIZABLE", traceback.format_exc()), _PROTOCOL)
                write_message(fd, payload)
            except Exception:
                return  # the client is gone

    def accepter(self) -> None:
        admission = self.admission
        while not self.stop_event.is_set():
            try:
                fd = admission.accept()
            except OSError:
                if self.stop_event.is_set():
                    return
                time.sleep(0.01)  # do not spin on a failing accept
                continue
            if fd is None:
                continue
            try:
                threading.Thread(target=self.handle_request, args=(fd,), daemon=True).start()
            except RuntimeError:  # no thread to spare: the connection goes, the server stays
                admission.admitted(fd)
                os.close(fd)

    def handle_request(self, fd: int) -> None:  # type: ignore[override]
        """Serve one connection: the challenge both ways, then one request of the manager protocol
        (usually accept_connection, which serves the client until it leaves).

        Until the peer has proved it knows the key it is sent nothing but the challenge and its fixed
        failure message: a failed or garbled challenge closes the connection without a word (the
        stdlib's server would answer with a traceback, which names the server's files)."""
        c = mpc.Connection(fd)
        try:
            try:
                mpc.deliver_challenge(c, self.authkey)
                mpc.answer_challenge(c, self.authkey)
            except Exception:  # a wrong key, garbage, a timeout or a peer that left: just close
                return
            finally:
                self.admission.admitted(fd)
            self._serve_request(c)
        except SystemExit:
            pass  # accept_connection and the stdlib's serve_client end with it
        finally:
            c.close()

    def _serve_request(self, c: mpc.Connection) -> None:
        """The stdlib's handling of an authenticated connection's first request."""
        try:
            request = c.recv()
            ignore, funcname, args, kwds = request
            if funcname not in self.public:
                raise ValueError(f"{funcname!r} unrecognized")
            func = getattr(self, funcname)
        except Exception:
            msg: tuple[str, Any] = ("#TRACEBACK", traceback.format_exc())
        else:
            try:
                msg = ("#RETURN", func(c, *args, **kwds))
            except Exception:
                msg = ("#TRACEBACK", traceback.format_exc())
        try:
            c.send(msg)
        except Exception:
            pass  # the client is gone


def _check_backup_journals(path: Path, bak: Path, generation: int, files: list[tuple[int, Path]]) -> None:
    """Refuse to start from the backup ``bak`` (of journal ``generation``) if the journals to replay
    over it do not follow it without a gap: later changes replayed over a state that lacks earlier ones
    would make a state that never existed."""
    needed = [g for g, _ in files if g >= generation]
    if needed and needed != list(range(generation, generation + len(needed))):
        present = ", ".join(str(p) for g, p in files if g >= generation)
        missing = sorted(set(range(generation, needed[-1] + 1)) - set(needed)) or [generation]
        raise SnapshotError(
            f"{path} is missing and its backup {bak} (journal generation {generation}) cannot be "
            f"brought up to date: the journal of generation {missing[0]} is missing, so replaying {present} over "
            f"the backup would skip changes; restore a snapshot by hand, or move those journals away to start "
            f"from the backup alone",
            str(bak),
        )


def _clear_stale_socket(address: str) -> None:
    """Remove a socket file left by a server that died, refuse one that a live server answers on, and
    never touch anything that is not a socket."""
    try:
        mode = os.lstat(address).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "the address exists and is not a socket", address)
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.settimeout(1.0)
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(address)
        return
    except OSError as exc:
        raise OSError(exc.errno, f"cannot use {address}: {exc.strerror}") from None
    finally:
        probe.close()
    raise OSError(f"address {address} is in use by a running server")


class ServerProcess:
    """The life of one server process: bind, serve, stop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.service = StateService(config)
        self.server: ManagerServer | None = None
        self.stop_reason: str | None = None
        self._key_file: str | None = None
        self._ownership: FileOwnership | None = None
        #: Why the final save failed, for the owner (``None``: it did not fail, or there was none).
        self.final_error: SnapshotError | None = None
        self.schedule = parse_schedule(config.save_every) if config.path is not None else None

    def open(self) -> Address:
        config = self.config
        path = self.service.path
        if path is not None:
            # One clear error before anything is created or taken, rather than a failure at each save.
            check_slot(path, ours=False)
            for beside in (backup_path(path), *FileOwnership.files(path)):
                check_slot(beside)
            self._ownership = FileOwnership(path)
            self._ownership.acquire()
            try:
                self._recover(path)
            except BaseException:
                self._ownership.release()
                raise
        self.service.rebuild_locks()
        if isinstance(config.address, str):
            _clear_stale_socket(config.address)
            if config.write_key_file:
                # The key is on disk before the socket appears, so a client that sees the socket finds it.
                self._key_file = str(key_file_for(config.address))
                write_atomic(Path(self._key_file), [config.authkey.hex()], backup=False)
        old_umask = os.umask(0o177)  # the socket file: this user only
        try:
            self.server = ManagerServer(self.service, config.address, config.authkey)
        finally:
            os.umask(old_umask)
        self.service.address = self.server.address
        # Only once the address is ours: the block's name comes from it, and making it retires a block
        # that a killed server left there.
        try:
            self.service.versions = VersionTable(self.server.address)
        except OSError as exc:  # no POSIX shared memory here: clients then read through the server
            log.warning("no shared memory for the clients' caches (%s): every read is a round trip", exc)
        return self.server.address

    def _recover(self, path: Path) -> None:
        """Restore the snapshot, replay the journals it does not cover, and open the journal."""
        service = self.service
        files, torn = scan_journals(path)  # before anything is restored: a damaged journal refuses the start
        snapshot = read_snapshot(path)
        generation = 0
        bak = backup_path(path)
        if snapshot is None and not path.exists() and bak.exists():
            # Never start empty beside a good backup: the next saves would replace it with nothing.
            snapshot = read_snapshot(bak)
            if snapshot is not None:
                _check_backup_journals(path, bak, snapshot.generation, files)
                log.warning("%s is missing: starting from its backup %s (%d names)", path, bak, len(snapshot.data))
                service.restored_from_backup = 1
        if snapshot is not None:
            service.install(path, snapshot)
            service.answers.load(snapshot.answers or {})
            generation = snapshot.generation
            log.info("restored %d names from %s", len(snapshot.data), path)
        for empty in torn:
            log.warning("%s: removed a journal whose header a crash cut short (it held no changes)", empty)
            empty.unlink()
        replayed = 0
        for record in replay_records(path, generation, files):
            service.apply(record)
            replayed += 1
        newest = max([generation, *(g for g, _ in files)])
        if self.config.durability == "journal":
            journal = Journal(path, self.config.journal_fsync)
            journal.generation = newest
            journal.saved = generation
            service.journal = journal
            if replayed:
                service.save_to(path, why="save after replaying the journal")
            elif newest == generation and generation not in {g for g, _ in files}:
                # The journal of the snapshot's own generation (a clean stop removed it, empty): so the
                # backup the next save makes of this snapshot has every journal it needs, with no gap.
                journal.start_generation(generation)
            else:
                journal.start_generation(newest + 1)
            journal.start_flusher()
        else:
            if replayed:  # a journal left by a journaling server: fold it into the snapshot
                # A generation above every journal on disk: if the clean-up below does not happen, the
                # next start still replays none of them twice.
                service.save_to(path, why="save after replaying the journal", generation=newest + 1)
            Journal(path, "everysec").close(remove=True)

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        assert self.server is not None
        self.server.stop_event.set()

    def run(self) -> int:
        server = self.server
        assert server is not None
        signalled: list[str] = []

        def on_signal(signum: int, frame: Any) -> None:
            # Only note it: setting an Event from a handler can deadlock on the Event's own lock.
            signalled.append(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        threading.Thread(target=server.accepter, name="sharedstate-accept", daemon=True).start()
        if self.config.owner_pid is not None:
            threading.Thread(target=self._watch_owner, name="sharedstate-owner", daemon=True).start()
        if self.schedule is not None:
            threading.Thread(target=self._save_on_schedule, name="sharedstate-schedule", daemon=True).start()
        while not server.stop_event.is_set():
            if signalled:
                self.stop(signalled[0])
                break
            server.stop_event.wait(0.1)
        if self.stop_reason is None:
            self.stop_reason = "shutdown requested"
        log.info("stopping: %s", self.stop_reason)
        self.close()
        return 0 if self.final_error is None else EXIT_SAVE_FAILED

    def _watch_owner(self) -> None:
        config = self.config
        assert config.owner_pid is not None and self.server is not None
        while not self.server.stop_event.wait(OWNER_POLL_S):
            if not process_alive(config.owner_pid, config.owner_create_time):
                self.stop(f"owner process {config.owner_pid} is gone")
                return

    def _save_on_schedule(self) -> None:
        assert self.schedule is not None and self.server is not None and self.service.path is not None
        origin = self.service.started_at
        while True:
            now = time.time()
            due = self.schedule.next_after(origin, now)
            if self.server.stop_event.wait(max(0.0, due - now)):
                return
            try:
                self.service.save_to(self.service.path, why="scheduled save")
            except Exception:
                pass  # logged and kept in stats by save_to; the server serves on

    def close(self) -> None:
        server = self.server
        if server is not None:
            try:
                server.listener.close()  # no new connections; also unlinks a Unix socket
            except OSError:
                pass
        try:
            self._final_save()
        finally:
            if self.service.versions is not None:
                self.service.versions.close()
            if self._ownership is not None:
                self._ownership.release()
            if self.service.lock_file is not None:  # a clean stop: no lock outlives this server
                self.service.lock_file.close(remove=True)
            if self._key_file is not None:
                try:
                    os.unlink(self._key_file)
                except FileNotFoundError:
                    pass

    def _final_save(self) -> None:
        path = self.service.path
        if path is not None:
            saved = False
            try:
                self.service.save_to(path, final=True, why="final save")
                saved = True
            except Exception as exc:  # logged by save_to
                if self.service.journal is not None:
                    kept = "the journal beside it keeps every change"
                else:
                    kept = "the changes since the last save are lost"
                self.final_error = SnapshotError(
                    f"the final save to {path} failed ({type(exc).__name__}: {exc}); {kept}", str(path)
                )
            if self.service.journal is not None:
                # The final snapshot holds every change: the journal is only needed if it failed.
                self.service.journal.close(remove=saved)


def main() -> None:
    """Entry point of the server process."""
    out = sys.stdout.buffer
    config: ServerConfig = pickle.load(sys.stdin.buffer)
    logging.basicConfig(
        level=config.log_level, format="sharedstate[%(process)d] %(levelname)s: %(message)s", stream=sys.stderr
    )
    process = ServerProcess(config)
    try:
        address = process.open()
    except BaseException as exc:  # report every failure to the owner, which raises it
        try:
            reply = pickle.dumps(("error", exc))
        except Exception:
            reply = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        out.write(reply)
        out.flush()
        os._exit(1)
    versions = None if process.service.versions is None else process.service.versions.info()
    out.write(pickle.dumps(("ready", {"pid": os.getpid(), "address": address, "versions": versions})))
    out.flush()
    # Nothing more goes to the owner's pipe: stdout becomes /dev/null.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    code = process.run()
    logging.shutdown()
    if config.report_fd is not None:
        try:
            os.write(config.report_fd, pickle.dumps(("stopped", process.final_error)))
        except OSError:
            pass  # the owner is gone: nobody to tell
    os._exit(code)
