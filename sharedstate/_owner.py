"""``StateServer``: the owner's side of a server process — start, watch, restart, shut down."""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import secrets
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import spawn
from pathlib import Path
from typing import Any

import psutil

from sharedstate._errors import ServerUnavailable, SharedStateError, SnapshotError
from sharedstate._state import State
from sharedstate.persistence.schedule import SaveEvery, parse_schedule
from sharedstate.server.config import EXIT_SAVE_FAILED, ServerConfig
from sharedstate.wire.addresses import (
    BOOT_SCOPE,
    ENV_ADDRESS,
    ENV_AUTHKEY,
    Address,
    format_address,
    is_loopback,
    parse_address,
)
from sharedstate.wire.handshake import open_control
from sharedstate.wire.versions import retire

log = logging.getLogger("sharedstate")

#: How long a new server process may take to report that it listens.
START_TIMEOUT_S = 30.0
#: Bounded steps of a shutdown: ask, then SIGTERM, then SIGKILL.
STOP_TIMEOUT_S = 10.0
#: The folder this package is imported from, put first on the server process' path.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class StateServer:
    """Owns a server process that holds the shared state.

    >>> with sharedstate.StateServer() as server:          # doctest: +SKIP
    ...     server.state.incr("hits")

    ``start()`` launches the process and exports ``SHAREDSTATE_ADDRESS`` and ``SHAREDSTATE_AUTHKEY`` so
    that child processes can call ``sharedstate.connect()``. The server stops on ``shutdown()``, on
    SIGTERM/SIGINT, and when this process dies. If it crashes, it is started again at the same address
    (``restart=True``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        save_every: SaveEvery = "@hourly",
        address: object = None,
        authkey: bytes | None = None,
        durability: str = "snapshot",
        journal_fsync: str = "everysec",
        restart: bool = True,
        allow_remote: bool = False,
    ) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        self._path = None if path is None else Path(os.fspath(path)).absolute()
        parse_schedule(save_every)  # TypeError/ValueError now, not in the server process
        self._save_every = save_every
        self._address: Address | None = None if address is None else parse_address(address)
        if authkey is not None:
            if not isinstance(authkey, (bytes, bytearray)):
                raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
            if not authkey:
                raise ValueError("authkey must not be empty")
            authkey = bytes(authkey)
        self._given_authkey = authkey
        if durability not in ("snapshot", "journal"):
            raise ValueError(f"durability must be 'snapshot' or 'journal', not {durability!r}")
        if journal_fsync not in ("everysec", "always"):
            raise ValueError(f"journal_fsync must be 'everysec' or 'always', not {journal_fsync!r}")
        if durability == "journal" and self._path is None:
            raise ValueError("durability='journal' needs a path for the snapshot and its journal")
        self._durability = durability
        self._journal_fsync = journal_fsync
        self._restart = bool(restart)
        if self._address is not None and not is_loopback(self._address):
            if not allow_remote:
                raise ValueError(
                    f"address {format_address(self._address)} is reachable from other machines: "
                    "pass allow_remote=True (and an explicit authkey) to allow it"
                )
            if authkey is None:
                raise ValueError("a server reachable from other machines needs an explicit authkey")

        self._authkey: bytes | None = None
        self._tmpdir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._config: ServerConfig | None = None
        self._owner_pid: int | None = None
        self._state: State | None = None
        self._stopping = False
        self._stopped = False
        self._mutex = threading.RLock()
        #: The shared memory version table of the running server process (``{"name", "token"}``).
        self._versions: dict[str, Any] | None = None

    # -- properties ---------------------------------------------------------------------------------
    @property
    def address(self) -> str | None:
        """Where the server listens (``None`` before ``start()``), as ``SHAREDSTATE_ADDRESS`` holds it."""
        return None if self._address is None else format_address(self._address)

    @property
    def authkey(self) -> bytes | None:
        """The key clients authenticate with (``None`` before ``start()`` unless one was given)."""
        return self._authkey or self._given_authkey

    @property
    def pid(self) -> int | None:
        """The server process' pid (``None`` before ``start()``)."""
        return None if self._proc is None else self._proc.pid

    @property
    def path(self) -> Path | None:
        """The snapshot file, or ``None`` without persistence."""
        return self._path

    @property
    def state(self) -> State:
        """A ``State`` handle for this process."""
        if self._proc is None or self._address is None:
            raise ServerUnavailable("the server is not started: call start() first")
        if self._state is None:
            # What the server would say about its restart, known before the first connection: a handle
            # pickled into a child at once still waits for a restart that its first call runs into.
            restart = None
            if self._restart and self._config is not None and self._config.owner_pid is not None:
                config = self._config
                restart = {"owner": config.owner_pid, "ctime": config.owner_create_time, "scope": BOOT_SCOPE}
            self._state = State(self._address, self._authkey, restart=restart)
        return self._state

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> StateServer:
        """Start the server process and export its address and key; return ``self``.

        Raises ``RuntimeError`` if already started, and whatever the server process failed with
        (an ``OSError`` for an address in use, say).
        """
        with self._mutex:
            if self._proc is not None:
                raise RuntimeError(f"the server at {self.address} is already started")
            if self._stopped:
                raise RuntimeError("a StateServer cannot be started again after shutdown(); make a new one")
            self._owner_pid = os.getpid()
            self._config = self._server_config(owned=True)
            try:
                self._proc, info = _spawn(self._config)
            except BaseException:
                self._cleanup_tmpdir()
                raise
            self._address = info["address"]
            self._versions = info.get("versions")
            self._config.address = self._address
            os.environ[ENV_ADDRESS] = format_address(self._address)
            os.environ[ENV_AUTHKEY] = self._authkey.hex()
            _warn_if_forkserver_running()
            atexit.register(self._shutdown_at_exit)
            threading.Thread(target=self._monitor, args=(self._proc,), name="sharedstate-monitor", daemon=True).start()
            return self

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save now, to the server's path or to ``path``; return the path written (as ``state.save()``)."""
        return self.state.save(path)

    def _server_config(self, owned: bool) -> ServerConfig:
        """What a server process needs; ``owned=False`` for one that watches no owner (``sharedstate
        serve`` runs it in its own process). Makes the key, and the private folder of the socket."""
        self._authkey = self._given_authkey or secrets.token_bytes(32)
        address = self._address
        # A private folder: only this user may enter it, so only this user reaches the socket (when the
        # address is not given) and the lock file that a restarted server process reads.
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="sharedstate-")
        if address is None:
            address = os.path.join(self._tmpdir, "state.sock")
        owner = psutil.Process() if owned else None
        return ServerConfig(
            address=address,
            authkey=self._authkey,
            write_key_file=isinstance(address, str) and self._given_authkey is None,
            owner_pid=None if owner is None else owner.pid,
            owner_create_time=None if owner is None else owner.create_time(),
            path=None if self._path is None else str(self._path),
            save_every=self._save_every,
            durability=self._durability,
            journal_fsync=self._journal_fsync,
            log_level=logging.getLogger("sharedstate").getEffectiveLevel(),
            lock_file=os.path.join(self._tmpdir, "locks"),
            restart=owned and self._restart,
        )

    def _monitor(self, proc: subprocess.Popen[bytes]) -> None:
        """Reap the server process; start it again if it crashed (not if it stopped cleanly)."""
        while True:
            code = proc.wait()
            with self._mutex:
                # A server that died did not retire its version table: clients must not trust their
                # cached values any more, and the block must not outlive it.
                versions = self._versions
                if versions is not None and self._proc is proc:
                    retire(versions["name"], versions["token"])
                if self._stopping or self._stopped or self._proc is not proc:
                    return
                clean = code in (0, EXIT_SAVE_FAILED, -signal.SIGTERM, -signal.SIGINT)
                if clean or not self._restart:
                    log.warning("the sharedstate server (pid %d) exited with status %d", proc.pid, code)
                    return
                log.warning("the sharedstate server (pid %d) died with status %d; starting it again", proc.pid, code)
                _final_report(proc)  # nothing to report: it crashed; this closes the pipe
                assert self._config is not None
                try:
                    proc, info = _spawn(self._config)
                except (OSError, SharedStateError) as exc:
                    log.error("could not start the sharedstate server again: %s", exc)
                    _remove_dead_socket(self._address)
                    return
                self._proc = proc
                self._versions = info.get("versions")

    def shutdown(self) -> None:
        """Stop the server: it saves (when a path is set) and exits. Idempotent; waits at most about
        ``2 * STOP_TIMEOUT_S`` seconds, escalating to SIGTERM and then SIGKILL. Raises ``SnapshotError``
        (naming the path and the reason) once the server has stopped if its final save failed, or, with a
        path, if it had to be killed before it reported that its final save finished."""
        with self._mutex:
            if self._proc is None or self._stopped:
                self._stopped = True
                return
            if os.getpid() != self._owner_pid:
                raise RuntimeError(f"only the process that started the server (pid {self._owner_pid}) can shut it down")
            self._stopping = True
            proc = self._proc
        try:
            if self._state is not None:
                self._state.close()
            escalated = False
            if proc.poll() is None:
                assert self._address is not None and self._authkey is not None
                try:
                    open_control(self._address, self._authkey, "shutdown")
                except (SharedStateError, OSError):
                    pass
                escalated = _wait_or_kill(proc, STOP_TIMEOUT_S)
            reported, failed = _final_report(proc)
            if escalated and not reported and failed is None and self._path is not None:
                # Killed by the escalation (a final save that did not finish in time, or a stopped
                # process): whatever it was saving may be lost, which must not pass for a clean stop.
                kept = (
                    "the journal beside it keeps every change"
                    if self._durability == "journal"
                    else "the changes since the last save are lost"
                )
                failed = SnapshotError(
                    f"the server was killed before its final save to {self._path} finished (it did not stop "
                    f"within {STOP_TIMEOUT_S:g} s; exit status {proc.returncode}); {kept}",
                    str(self._path),
                )
        finally:
            with self._mutex:
                self._stopped = True
            self._cleanup_tmpdir()
            if self._address is not None and os.environ.get(ENV_ADDRESS) == format_address(self._address):
                os.environ.pop(ENV_ADDRESS, None)
                os.environ.pop(ENV_AUTHKEY, None)
            atexit.unregister(self._shutdown_at_exit)
        if failed is not None:
            raise failed

    def _shutdown_at_exit(self) -> None:
        if os.getpid() == self._owner_pid:  # not in a forked child that inherited this object
            try:
                self.shutdown()
            except Exception as exc:  # never let interpreter exit fail over it
                log.warning("shutting the sharedstate server down at exit failed: %s", exc)

    def _cleanup_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> StateServer:
        # ``with StateServer(...).start() as server:`` enters a server that is running already.
        if self._proc is not None and not self._stopped:
            return self
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        status = "stopped" if self._stopped else "running" if self._proc is not None else "not started"
        return f"<sharedstate.StateServer {status} at {self.address} pid {self.pid}>"


def _warn_if_forkserver_running() -> None:
    """A forkserver that is already running forks every child from the environment it started with, so
    its children do not see the variables just exported (stopping it would wait for, and break, the
    children it already made)."""
    try:
        from multiprocessing import forkserver
    except ImportError:  # a platform without it
        return
    running = getattr(forkserver, "_forkserver", None)
    if running is not None and getattr(running, "_forkserver_pid", None) is not None:
        log.warning(
            "a multiprocessing forkserver was already running when the sharedstate server started: the "
            "processes it starts do not see SHAREDSTATE_ADDRESS; pass them the State handle instead"
        )


def _final_report(proc: subprocess.Popen[bytes]) -> tuple[bool, SharedStateError | None]:
    """Whether an exited server process reported that it stopped, and what it reported about its final
    save (the error, if it failed); closes the pipe it reported on."""
    fd = getattr(proc, "report_fd", None)
    if fd is None:
        return False, None
    proc.report_fd = None  # type: ignore[attr-defined]
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:  # a forked child of ours may hold the other end: do not wait for it
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        kind, error = pickle.loads(b"".join(chunks))
    except Exception:
        return False, None  # killed before it could say (the escalation of a shutdown that took too long)
    if kind != "stopped":
        return False, None
    return True, error if isinstance(error, SharedStateError) else None


def _spawn(config: ServerConfig) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a server process and wait until it listens; return it and what it reported. The process
    gets a pipe of its own to tell, as it exits, whether its final save failed (``proc.report_fd``)."""
    code = f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); from sharedstate.server.process import main; main()"
    report_r, report_w = os.pipe()
    os.set_blocking(report_r, False)
    config.report_fd = report_w
    payload = pickle.dumps(config)
    config.report_fd = None  # the same config starts the next process, with its own pipe
    try:
        proc = subprocess.Popen(
            [spawn.get_executable(), "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            pass_fds=(report_w,),
            # Its own session: a Ctrl-C in the terminal (SIGINT to the foreground group) is for the owner,
            # which decides when the server stops; the server still stops when the owner dies.
            start_new_session=True,
        )
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    proc.report_fd = report_r  # type: ignore[attr-defined]
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
        reply = _read_reply(proc, START_TIMEOUT_S)
    except BaseException:
        _wait_or_kill(proc, 0)
        _final_report(proc)
        raise
    finally:
        proc.stdout.close()
    try:
        kind, value = pickle.loads(reply)
    except Exception:
        _wait_or_kill(proc, 0)
        _final_report(proc)
        raise ServerUnavailable(
            f"the server process exited with status {proc.wait()} before it listened", format_address(config.address)
        ) from None
    if kind == "error":
        _wait_or_kill(proc, 5)
        _final_report(proc)
        raise value
    return proc, value


def _read_reply(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerUnavailable(f"the server process did not start within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``proc`` to exit; past ``timeout``, SIGTERM it, then SIGKILL it. Always reaps it. Returns
    whether it had to be signalled."""
    for step in (None, proc.terminate, proc.kill):
        if step is not None:
            try:
                step()
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout if step is None else STOP_TIMEOUT_S / 2)
            return step is not None
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    return True


@contextmanager
def serve(
    path: str | os.PathLike[str] | None = None,
    save_every: SaveEvery = "@hourly",
    **options: Any,
) -> Iterator[State]:
    """Run a ``StateServer`` for a ``with`` block and yield its ``State``; it takes ``StateServer``'s
    arguments.

    >>> with sharedstate.serve() as state:          # doctest: +SKIP
    ...     state.set("greeting", "hello")
    """
    with StateServer(path, save_every, **options) as server:
        yield server.state


def _remove_dead_socket(address: Any) -> None:
    """No server will bind the socket of a server that could not be started again: without its file,
    clients waiting for a restart give up at once (``State._restart_expected``), not at their timeout."""
    if not isinstance(address, str):
        return  # TCP: nothing on disk tells clients; they wait until their call's timeout
    try:
        if stat.S_ISSOCK(os.lstat(address).st_mode):
            os.unlink(address)
    except OSError:
        pass
