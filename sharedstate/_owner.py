"""``StateServer`` and ``serve()``: the public face of a server process owned by this process — its
arguments, its address and key exported to child processes, its ``State`` handle, and its shutdown at
exit. Starting, watching, restarting and stopping the process is ``server.supervisor``'s job."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from sharedstate._errors import ServerUnavailable
from sharedstate._state import State
from sharedstate.backends.local import LocalBackend
from sharedstate.persistence.schedule import SaveEvery, parse_schedule
from sharedstate.server.config import ServerConfig
from sharedstate.server.supervisor import Supervisor
from sharedstate.wire.addresses import (
    BOOT_SCOPE,
    ENV_ADDRESS,
    ENV_AUTHKEY,
    Address,
    check_server_supported,
    format_address,
    is_loopback,
    parse_address,
)

log = logging.getLogger(__name__)


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
                    f"address {format_address(self._address)} is reachable from other machines: allow it "
                    "explicitly, with an explicit key (allow_remote=True and authkey=; sharedstate serve "
                    "--allow-remote --authkey-file FILE)"
                )
            if authkey is None:
                raise ValueError(
                    "a server reachable from other machines needs an explicit key (authkey=; sharedstate serve "
                    "--authkey-file FILE)"
                )

        self._authkey: bytes | None = None
        self._tmpdir: str | None = None
        self._config: ServerConfig | None = None
        #: What starts, watches and restarts the server process, once started.
        self._supervisor: Supervisor | None = None
        self._owner_pid: int | None = None
        self._state: State | None = None
        self._stopped = False
        self._mutex = threading.RLock()

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
        proc = None if self._supervisor is None else self._supervisor.proc
        return None if proc is None else proc.pid

    @property
    def path(self) -> Path | None:
        """The snapshot file, or ``None`` without persistence."""
        return self._path

    @property
    def state(self) -> State:
        """A ``State`` handle for this process."""
        if self._supervisor is None or self._address is None:
            raise ServerUnavailable("the server is not started: call start() first")
        if self._state is None:
            # What the server would say about its restart, known before the first connection: a handle
            # pickled into a child at once still waits for a restart that its first call runs into.
            restart = None
            if self._restart and self._config is not None and self._config.owner_pid is not None:
                config = self._config
                restart = {"owner": config.owner_pid, "ctime": config.owner_create_time, "scope": BOOT_SCOPE}
            self._state = _handle(self._address, self._authkey, restart)
        return self._state

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> StateServer:
        """Start the server process and export its address and key; return ``self``.

        Raises ``RuntimeError`` if already started, ``NotImplementedError`` on Windows (not supported there
        yet), and whatever the server process failed with (an ``OSError`` for an address in use, say).
        """
        with self._mutex:
            if self._supervisor is not None:
                raise RuntimeError(f"the server at {self.address} is already started")
            if self._stopped:
                raise RuntimeError("a StateServer cannot be started again after shutdown(); make a new one")
            self._owner_pid = os.getpid()
            self._config = self._server_config(owned=True)
            supervisor = Supervisor(self._config, self._restart)
            try:
                self._address = supervisor.start()
            except BaseException:
                self._cleanup_tmpdir()
                raise
            self._supervisor = supervisor
            os.environ[ENV_ADDRESS] = format_address(self._address)
            os.environ[ENV_AUTHKEY] = self._authkey.hex()
            _warn_if_forkserver_running()
            atexit.register(self._shutdown_at_exit)
            return self

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save now, to the server's path or to ``path``; return the path written (as ``state.save()``)."""
        return self.state.save(path)

    def _server_config(self, owned: bool) -> ServerConfig:
        """What a server process needs; ``owned=False`` for one that watches no owner (``sharedstate
        serve`` runs it in its own process). Makes the key, and the private folder of the socket.
        ``NotImplementedError`` where a server cannot run (Windows)."""
        check_server_supported()
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
            lock_file=os.path.join(self._tmpdir, "locks"),
            restart=owned and self._restart,
        )

    def shutdown(self) -> None:
        """Stop the server: it saves (when a path is set) and exits. Idempotent; waits at most about
        ``2 * STOP_TIMEOUT_S`` seconds, escalating to SIGTERM and then SIGKILL. Raises ``SnapshotError``
        (naming the path and the reason) once the server has stopped if its final save failed, or, with a
        path, if it had to be killed before it reported that its final save finished."""
        with self._mutex:
            if self._supervisor is None or self._stopped:
                self._stopped = True
                return
            if os.getpid() != self._owner_pid:
                raise RuntimeError(f"only the process that started the server (pid {self._owner_pid}) can shut it down")
            supervisor = self._supervisor
        try:
            if self._state is not None:
                self._state.close()
            failed = supervisor.stop()
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
        if self._supervisor is not None and not self._stopped:
            return self
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        status = "stopped" if self._stopped else "running" if self._supervisor is not None else "not started"
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


def _handle(address: Address, authkey: bytes | None, restart: dict[str, Any] | None) -> State:
    """The ``State`` handle that ``server.state`` gives: the one place that builds it."""
    return State(LocalBackend(address, authkey, restart=restart))


@contextmanager
def standalone_config(**options: Any) -> Iterator[ServerConfig]:
    """The configuration of a server process that watches no owner (``sharedstate serve`` runs one in its
    own process), from ``StateServer``'s arguments, checked as ``StateServer`` checks them. The private
    folder it names (for the socket and the lock file) is removed when the block ends."""
    plan = StateServer(**options)
    try:
        yield plan._server_config(owned=False)
    finally:
        plan._cleanup_tmpdir()


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
