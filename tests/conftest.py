"""Fixtures shared by the tests: servers that always stop, children that are always reaped."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sharedstate

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

#: Every start method this platform offers: fork, spawn and forkserver on Linux.
START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[sharedstate.StateServer]:
    """A started server on a private socket; shut down (and checked to be gone) afterwards."""
    srv = sharedstate.StateServer().start()
    try:
        yield srv
    finally:
        pid = srv.pid
        srv.shutdown()
        assert pid is not None
        assert not _running(pid), f"server pid {pid} still running after shutdown()"


@pytest.fixture
def state(server: sharedstate.StateServer) -> sharedstate.State:
    return server.state


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """Each multiprocessing start method in turn."""
    return multiprocessing.get_context(request.param)


def stop_forkserver() -> None:
    """Stop this process' forkserver, if one runs, so the next one starts with the current environment
    (as in a program that starts its StateServer before its first forkserver process). Only for tests:
    every child of an earlier test has exited by now, so this does not wait on anyone."""
    from multiprocessing import forkserver

    running = getattr(forkserver, "_forkserver", None)
    if running is not None and getattr(running, "_forkserver_pid", None) is not None:
        running._stop()


def process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (``R``, ``S``, ``Z``...), or ``""`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):  # gone, or being reaped while we read
        return ""


def exited(pid: int) -> bool:
    """Exited: gone, or a zombie (its parent may be gone and nothing reaps it here)."""
    return process_state(pid) in ("", "Z", "X")


def _running(pid: int) -> bool:
    return not exited(pid)


def reap(*procs: multiprocessing.process.BaseProcess | subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Make sure children are gone: join with a deadline, then terminate, then kill."""
    for proc in procs:
        if isinstance(proc, subprocess.Popen):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            continue
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_to_completion(procs, timeout: float = 120.0, go=None) -> None:
    """Start ``procs`` (then set ``go``, if given), wait for each to exit 0, and always reap them."""
    for proc in procs:
        proc.start()
    if go is not None:
        go.set()
    try:
        for proc in procs:
            proc.join(timeout)
            assert proc.exitcode == 0, f"{proc.name} ended with {proc.exitcode}"
    finally:
        reap(*procs)


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition") -> float:
    """Poll ``predicate`` until it is true; return the seconds it took; fail past ``timeout``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class LoggedServer:
    """A server whose stderr (its log) goes to a file the test can read."""

    def __init__(self, server: sharedstate.StateServer, log: Path) -> None:
        self.server = server
        self.log = log
        self.state = server.state

    def log_text(self) -> str:
        return self.log.read_text()


def start_with_log(log: Path, **options) -> sharedstate.StateServer:
    """Start a server whose inherited stderr is ``log``."""
    saved = os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 2)
        return sharedstate.StateServer(**options).start()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[LoggedServer]:
    srv = start_with_log(tmp_path / "server.log")
    try:
        yield LoggedServer(srv, tmp_path / "server.log")
    finally:
        srv.shutdown()
