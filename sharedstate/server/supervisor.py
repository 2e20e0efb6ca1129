"""The owner's side of one server process: start it and wait until it listens, watch it and start it again
at the same address when it crashes, stop it in bounded steps (a request on a control connection, then
SIGTERM, then SIGKILL), and read what it reported about its final save.

The server process runs ``sharedstate.server.process.main``; ``StateServer`` (``_owner``) is the public
face of this module.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import stat
import subprocess
import threading
import time
from multiprocessing import spawn
from pathlib import Path
from typing import Any

from sharedstate._errors import ServerUnavailable, SharedStateError, SnapshotError
from sharedstate.server.config import EXIT_SAVE_FAILED, ServerConfig
from sharedstate.server.logrelay import LogListener, close_log_pipe_end, open_log_pipe, owner_level
from sharedstate.wire.addresses import CONNECT_TIMEOUT, Address, format_address
from sharedstate.wire.handshake import open_control
from sharedstate.wire.versions import retire

log = logging.getLogger(__name__)

#: How long a new server process may take to report that it listens.
START_TIMEOUT_S = 30.0
#: Bounded steps of a shutdown: ask, then SIGTERM, then SIGKILL.
STOP_TIMEOUT_S = 10.0
#: How long the request to stop may take to reach a server that does not answer (stopped, hung).
CONTROL_TIMEOUT_S = CONNECT_TIMEOUT
#: The folder this package is imported from, put first on the server process' path.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)


class Supervisor:
    """Runs one server process for the process that owns it: ``start()`` launches it with ``config``;
    if it crashes it is started again with the same ``config`` (``restart``); ``stop()`` ends it."""

    def __init__(self, config: ServerConfig, restart: bool) -> None:
        self.config = config
        self.restart = restart
        #: The running server process (``None`` before ``start()``); a restart replaces it.
        self.proc: subprocess.Popen[bytes] | None = None
        #: The shared memory version table of the running server process (``{"name", "token"}``).
        self.versions: dict[str, Any] | None = None
        self._stopping = False
        self._mutex = threading.Lock()

    def start(self) -> Address:
        """Start the server process and watch it; return the address it listens on. Raises whatever the
        server process failed with (an ``OSError`` for an address in use, say)."""
        proc, info = _spawn(self.config)
        self.config.address = info["address"]  # a restart binds the address the first process bound
        with self._mutex:
            self.proc = proc
            self.versions = info.get("versions")
        threading.Thread(target=self._monitor, args=(proc,), name="sharedstate-monitor", daemon=True).start()
        return info["address"]

    def _monitor(self, proc: subprocess.Popen[bytes]) -> None:
        """Reap the server process; start it again if it crashed (not if it stopped cleanly)."""
        while True:
            code = proc.wait()
            with self._mutex:
                # A server that died did not retire its version table: clients must not trust their
                # cached values any more, and the block must not outlive it.
                versions = self.versions
                if versions is not None and self.proc is proc:
                    retire(versions["name"], versions["token"])
                if self._stopping or self.proc is not proc:
                    return
                clean = code in (0, EXIT_SAVE_FAILED, -signal.SIGTERM, -signal.SIGINT)
                if clean or not self.restart:
                    log.warning("the sharedstate server (pid %d) exited with status %d", proc.pid, code)
                    return
                log.warning("the sharedstate server (pid %d) died with status %d; starting it again", proc.pid, code)
                _final_report(proc)  # nothing to report: it crashed; this closes the pipe
                try:
                    proc, info = _spawn(self.config)
                except (OSError, SharedStateError) as exc:
                    log.error("could not start the sharedstate server again: %s", exc)
                    _remove_dead_socket(self.config.address)
                    return
                self.proc = proc
                self.versions = info.get("versions")

    def stop(self) -> SharedStateError | None:
        """Stop the server process for good: ask it to (it saves, when it has a path, and exits), and
        past ``STOP_TIMEOUT_S`` SIGTERM it, then SIGKILL it; it is reaped and never started again.

        Returns what went wrong with its final save: the error it reported, or, with a path, a
        ``SnapshotError`` if it had to be killed before it reported that its final save finished;
        ``None`` when nothing did."""
        with self._mutex:
            self._stopping = True
            proc = self.proc
        assert proc is not None, "stop() before start()"
        config = self.config
        escalated = False
        if proc.poll() is None:
            try:
                open_control(config.address, config.authkey, "shutdown", CONTROL_TIMEOUT_S)
            except (SharedStateError, OSError):
                pass
            escalated = _wait_or_kill(proc, STOP_TIMEOUT_S)
        reported, failed = _final_report(proc)
        if escalated and not reported and failed is None and config.path is not None:
            # Killed by the escalation (a final save that did not finish in time, or a stopped process):
            # whatever it was saving may be lost, which must not pass for a clean stop.
            kept = (
                "the journal beside it keeps every change"
                if config.durability == "journal"
                else "the changes since the last save are lost"
            )
            failed = SnapshotError(
                f"the server was killed before its final save to {config.path} finished (it did not stop "
                f"within {STOP_TIMEOUT_S:g} s; exit status {proc.returncode}); {kept}",
                config.path,
            )
        return failed


def _final_report(proc: subprocess.Popen[bytes]) -> tuple[bool, SharedStateError | None]:
    """Whether an exited server process reported that it stopped, and what it reported about its final
    save (the error, if it failed); closes the pipe it reported on, once the records it logged last
    were handled here."""
    listener = getattr(proc, "log_listener", None)
    if listener is not None:
        proc.log_listener = None  # type: ignore[attr-defined]
        listener.finish()
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
    gets a pipe of its own to tell, as it exits, whether its final save failed (``proc.report_fd``), and
    one for its log records, which this process' logging handles (``proc.log_listener``)."""
    code = f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); from sharedstate.server.process import main; main()"
    report_r, report_w = os.pipe()
    log_r, log_w = open_log_pipe()  # closed in any child forked meanwhile (a copy would keep it open)
    os.set_blocking(report_r, False)
    config.report_fd, config.log_fd = report_w, log_w
    config.log_level = owner_level()  # as the owner's loggers are set now, at each start
    payload = pickle.dumps(config)
    config.report_fd = config.log_fd = None  # the same config starts the next process, with its own pipes
    try:
        proc = subprocess.Popen(
            [spawn.get_executable(), "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            pass_fds=(report_w, log_w),
            # Its own session: a Ctrl-C in the terminal (SIGINT to the foreground group) is for the owner,
            # which decides when the server stops; the server still stops when the owner dies.
            start_new_session=True,
        )
    except BaseException:
        os.close(report_r)
        close_log_pipe_end(log_r)
        raise
    finally:
        os.close(report_w)
        close_log_pipe_end(log_w)
    proc.report_fd = report_r  # type: ignore[attr-defined]
    proc.log_listener = LogListener(log_r)  # type: ignore[attr-defined]
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


def _remove_dead_socket(address: Any) -> None:
    """No server will bind the socket of a server that could not be started again: without its file,
    clients waiting for a restart give up within moments (a client expects no restart of a server whose
    socket file stays gone), not at their timeout."""
    if not isinstance(address, str):
        return  # TCP: nothing on disk tells clients; they wait until their call's timeout
    try:
        if stat.S_ISSOCK(os.lstat(address).st_mode):
            os.unlink(address)
    except OSError:
        pass
