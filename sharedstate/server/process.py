"""The server process from start to stop: take the snapshot file and recover its state (``recovery``),
bind the address, serve (``serving``), save on schedule, watch the owner process, and save a last time.

Started by its owner's supervisor (``supervisor``) as ``python -c ...`` (not through ``multiprocessing``,
so it never re-imports the user's ``__main__`` and behaves the same under every start method), or run in
the process of ``sharedstate serve`` (``ServerProcess`` alone). Started by a supervisor, it reads its
configuration as a pickle on stdin, answers ``("ready", info)`` or ``("error", exception)`` on stdout,
then serves until it is told to stop (``shutdown``, SIGTERM, SIGINT) or its owner process dies.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sharedstate._errors import SnapshotError
from sharedstate._processes import process_alive
from sharedstate.persistence.files import backup_path, check_slot, write_atomic
from sharedstate.persistence.schedule import parse_schedule
from sharedstate.persistence.snapshot import FileOwnership
from sharedstate.server.config import EXIT_SAVE_FAILED, ServerConfig
from sharedstate.server.logrelay import PLAIN_FORMAT, ROOT, relay_to_owner
from sharedstate.server.recovery import recover
from sharedstate.server.service import StateService
from sharedstate.server.serving import ManagerServer
from sharedstate.wire.addresses import Address, key_file_for
from sharedstate.wire.versions import VersionTable

log = logging.getLogger(__name__)

#: How often the server checks that its owner process is still alive.
OWNER_POLL_S = 0.5


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
        # A stop signal is noted from now on: once the address is announced (by the owner's reply, or
        # ``sharedstate serve``'s output), a SIGTERM must lead to the final save, not kill the process.
        self._signalled: list[str] = []

        def on_signal(signum: int, frame: Any) -> None:
            # Only note it: setting an Event from a handler can deadlock on the Event's own lock.
            self._signalled.append(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
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
                recover(self.service, path)
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

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        assert self.server is not None
        self.server.stop_event.set()

    def run(self) -> int:
        server = self.server
        assert server is not None
        signalled = self._signalled
        threading.Thread(target=server.accepter, name="sharedstate-accept", daemon=True).start()
        if self.config.owner_pid is not None:
            threading.Thread(target=self._watch_owner, name="sharedstate-owner", daemon=True).start()
        if self.schedule is not None:
            threading.Thread(target=self._save_on_schedule, name="sharedstate-schedule", daemon=True).start()
        threading.Thread(target=self._sweep, name="sharedstate-sweep", daemon=True).start()
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

    def _sweep(self) -> None:
        """Remove expired names as they expire (``Store.sweep``)."""
        assert self.server is not None
        while True:
            try:
                wait = self.service.sweep()
            except Exception as exc:  # a journal that cannot be written: the names stay, and are tried again
                log.error("could not remove expired names: %s", exc)
                wait = 1.0
            if self.server.stop_event.wait(wait):
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
        if self.server is not None:
            self.server.stop_listening()
        try:
            self._final_save()
        finally:
            if self.service.versions is not None:
                self.service.versions.close()
            if self._ownership is not None:
                self._ownership.release()
            if self.service.lock_file is not None:  # a clean stop: no lock outlives this server
                self.service.lock_file.close(remove=True)
            self.service.semaphores.close(remove=True)
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
    logging.getLogger(ROOT).setLevel(config.log_level)
    if config.log_fd is not None:  # the owner's logging handles every record
        relay_to_owner(config.log_fd)
    else:
        logging.basicConfig(format=PLAIN_FORMAT, stream=sys.stderr)
    process = ServerProcess(config)
    try:
        address = process.open()
    except BaseException as exc:  # report every failure to the owner, which raises it
        try:
            reply = pickle.dumps(("error", exc))
        except Exception:
            reply = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        logging.shutdown()  # what it logged before it failed reaches the owner first
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


__all__ = ["ServerProcess", "main"]
