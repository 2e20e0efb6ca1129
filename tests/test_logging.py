"""The server process logs through its owner's logging: an app's own handler and format receive the
server's records (a lock recovery, under each start method the app may have been started with, and
across a restart of the server), the owner's levels apply, the last records of a shutdown arrive (through
a slow handler too; one that blocks does not hang the shutdown), no thread is left behind, an owner that
stops reading never holds the server up and is told what it missed, and a child forked while the server
starts does not keep the server's records from its stderr once the owner is gone."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import workers
from conftest import ROOT, START_METHODS, exited, kill, reap, start_serve, wait_until

import sharedstate

WAIT_S = 30
#: The app's format: every record the app's handler gets is formatted with it.
APP_FORMAT = "app|%(name)s|%(levelname)s|%(process)d|%(message)s"


class Collect(logging.Handler):
    """An app's handler: keeps every record, formatted with the app's own format."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(APP_FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def wait_for(self, text: str) -> str:
        """The first line holding ``text``, once it has arrived."""
        wait_until(lambda: any(text in line for line in self.lines), WAIT_S, what=repr(text))
        return next(line for line in self.lines if text in line)


def app_owner(method: str, snapshot: str, results) -> None:
    """An app that installs its own handler, starts a server, and has a lock holder SIGKILLed; reports
    the lines its handler got."""
    try:
        handler = Collect()
        logging.getLogger().addHandler(handler)
        logging.getLogger("sharedstate").setLevel(logging.INFO)
        logging.getLogger("sharedstate.server.process").setLevel(logging.WARNING)  # not its "stopping: ..."
        ctx = multiprocessing.get_context(method)
        server = sharedstate.StateServer(path=snapshot, save_every=None).start()
        try:
            first = server.pid
            held = ctx.Event()
            holder = ctx.Process(target=workers.hold_lock_forever, args=(server.state, None, held))
            holder.start()
            try:
                assert held.wait(WAIT_S)
                kill(holder.pid)
                assert server.state.lock.acquire(timeout=WAIT_S)  # the server frees the dead holder's lock
                server.state.lock.release()
            finally:
                reap(holder)
            recovery = handler.wait_for(f"held by pid {holder.pid}")
            server.state.set("kept", 1)
            server.save()
            kill(first)  # the owner starts a new server process, whose records arrive just the same
            wait_until(lambda: server.pid not in (None, first), WAIT_S, what="a new server process")
            restored = handler.wait_for("restored 1 names from")
            second = server.pid
        finally:
            server.shutdown()
        # Handled before shutdown() returned: the last records of the server, and nothing left running.
        final = [line for line in handler.lines if "final save" in line]
        stopping = [line for line in handler.lines if "stopping:" in line]
        threads = [t.name for t in threading.enumerate() if t.name == "sharedstate-server-logs"]
        results.put(("done", first, second, recovery, restored, final, stopping, threads))
    except BaseException:
        results.put(("error", traceback.format_exc()))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", START_METHODS)
def test_a_lock_recovery_in_the_server_reaches_the_apps_handler(tmp_path, method):
    ctx = multiprocessing.get_context(method)
    results = ctx.Queue()
    owner = ctx.Process(target=app_owner, args=(method, str(tmp_path / "state.json"), results))
    owner.start()
    try:
        report = results.get(timeout=120)
    finally:
        reap(owner)
    assert report[0] == "done", report[1]
    _, first, second, recovery, restored, final, stopping, threads = report
    assert recovery.startswith(f"app|sharedstate.server.locktable|WARNING|{first}|released the global lock held by")
    assert restored.startswith(f"app|sharedstate.server.recovery|INFO|{second}|restored 1 names from")
    assert len(final) == 1 and final[0].startswith(f"app|sharedstate.server.service|INFO|{second}|final save:")
    assert stopping == []  # the owner's level for sharedstate.server.process is WARNING
    assert threads == []


def quiet_owner(snapshot: str, started, go, results, stderr: str | None = None) -> None:
    """An owner whose handler counts the server's save records; it is stopped (SIGSTOP) meanwhile. With
    ``stderr``, its stderr (which its server inherits) goes to that file."""
    try:
        if stderr is not None:
            fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(fd, 2)
            os.close(fd)
        handler = Collect()
        logging.getLogger("sharedstate").addHandler(handler)
        logging.getLogger("sharedstate").setLevel(logging.INFO)
        with sharedstate.StateServer(save_every=None) as server:
            started.put((server.address, server.authkey, server.pid))
            assert go.wait(120)
        saves = sum(1 for line in handler.lines if f"save: 0 names to {snapshot}" in line)
        dropped = [line for line in handler.lines if "log record(s) of the server process were dropped" in line]
        results.put(("done", saves, dropped))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def saves_while_the_owner_is_stopped(snapshot: str, calls: int, stderr: Path | None = None) -> tuple[int, int, list]:
    """Start ``quiet_owner``; with it stopped (SIGSTOP), make ``calls`` saves, each of which logs a record;
    with ``stderr``, then stop the server (SIGTERM) while the owner is still stopped. Returns the server's
    pid, how many save records the owner handled, and the warnings about dropped records it got."""
    ctx = multiprocessing.get_context("fork")
    started, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    owner = ctx.Process(target=quiet_owner, args=(snapshot, started, go, results, stderr and str(stderr)))
    owner.start()
    try:
        address, authkey, server_pid = started.get(timeout=60)
        state = sharedstate.connect(address, authkey, timeout=10)
        os.kill(owner.pid, signal.SIGSTOP)
        try:
            for _ in range(calls):
                state.save(snapshot)  # a call that logs: it returns though nobody takes its record
            if stderr is not None:
                state.close()
                os.kill(server_pid, signal.SIGTERM)
                wait_until(lambda: exited(server_pid), WAIT_S, what="the server's exit")
        finally:
            os.kill(owner.pid, signal.SIGCONT)
        if stderr is None:
            assert state.get("missing", "default") == "default"
            state.close()
        go.set()
        report = results.get(timeout=60)
    finally:
        go.set()
        os.kill(owner.pid, signal.SIGCONT)
        reap(owner)
    assert report[0] == "done", report[1]
    return server_pid, report[1], report[2]


@pytest.mark.timeout(180)
def test_a_server_whose_owner_stops_reading_its_records_serves_on_and_counts_what_it_dropped(tmp_path):
    """More records than the server keeps for its owner (its queue and the pipe) while the owner is
    stopped: every call is still answered, and the records the owner missed are counted, not lost
    silently."""
    calls = 2000  # each logs one record, far more than the queue (1000) and the pipe hold
    server_pid, saves, dropped = saves_while_the_owner_is_stopped(str(tmp_path / "copy.json"), calls)
    assert dropped, "the server dropped records but never said so"
    lost = sum(int(line.split("|")[4].split()[0]) for line in dropped)
    assert 0 < saves < calls and saves + lost == calls
    assert all(f"|{server_pid}|" in line for line in dropped)


def test_every_module_logs_to_the_logger_of_its_own_name():
    package = Path(sharedstate.__file__).parent
    modules = [path for path in package.rglob("*.py") if "log = " in path.read_text()]
    assert len(modules) > 10
    for path in modules:
        assigned = [line for line in path.read_text().splitlines() if line.startswith("log = ")]
        assert assigned == ["log = logging.getLogger(__name__)"], path


@contextlib.contextmanager
def app_handler(name: str, handler: logging.Handler) -> Iterator[logging.Logger]:
    """The app's ``handler`` on the logger ``name``, set to INFO, for the ``with`` body."""
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_the_owners_level_applies_to_the_records_of_a_running_server(tmp_path):
    """Records are filtered by the owner's loggers as they are when a record arrives (shutdown() returns
    once every record of the server was handled)."""
    handler = Collect()
    with app_handler("sharedstate.server.service", handler) as logger:
        with sharedstate.StateServer(save_every=None) as server:
            server.save(tmp_path / "a.json")
            line = handler.wait_for("save: 0 names to")
            logger.setLevel(logging.ERROR)
            server.save(tmp_path / "b.json")  # its record arrives before shutdown() returns
    assert line.startswith(f"app|sharedstate.server.service|INFO|{server.pid}|save: 0 names to ")
    assert "a.json" in line
    assert "b.json" not in "".join(handler.lines)


#: A command for ``sharedstate run``: a child of it takes the global lock and is killed, then the command
#: takes the lock, which the server frees with a warning.
_DEAD_HOLDER = """
import subprocess, sys, sharedstate
holder = "import sharedstate, time; sharedstate.connect().lock.acquire(); print('held', flush=True); time.sleep(60)"
child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "held\\n"
child.kill()
child.wait()
state = sharedstate.connect()
assert state.lock.acquire(timeout=30)
print(child.pid)
"""


def test_the_command_line_logs_the_servers_records_on_stderr_in_the_plain_format(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "sharedstate", "run", "--", sys.executable, "-c", _DEAD_HOLDER]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    holder = done.stdout.strip()
    line = f"WARNING: released the global lock held by pid {holder}"
    assert re.search(rf"^sharedstate\[\d+\] {line}", done.stderr, re.M), done.stderr
    serve = start_serve(tmp_path / "state.json", str(tmp_path / "s.sock"), text=True)
    try:
        assert serve.stdout.readline().startswith("sharedstate: serving at")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
        err = serve.stderr.read()
    finally:
        reap(serve)
        serve.stdout.close()
        serve.stderr.close()
    assert re.search(rf"^sharedstate\[{serve.pid}\] INFO: final save: 0 names to ", err, re.M), err


class SlowThenBlocked(logging.Handler):
    """An app's handler that takes the save records only once ``go`` is set, slowly, and blocks over the
    server's "stopping:" record until the test lets it go (outside the handler's lock, which the
    records of the test's own process take too)."""

    def __init__(self) -> None:
        super().__init__()
        self.saves: list[str] = []
        self.go = threading.Event()
        self.blocked = threading.Event()
        self.release = threading.Event()

    def handle(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("save: 0 names to"):
            self.go.wait(WAIT_S)
            time.sleep(0.5)  # a slow handler (a remote log service, say), not a synchronisation
            self.saves.append(message)
        elif message.startswith("stopping:"):
            self.blocked.set()
            self.release.wait(WAIT_S)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        pass


def test_shutdown_waits_for_a_slow_handler_but_not_for_one_that_blocks(tmp_path):
    """Every record is handled before shutdown() returns, however slowly the app's handler takes them
    (here 3 s for the saves, more than the 2 s a handler may take over one record); a handler that
    blocks over one record is not waited for beyond those 2 s."""
    handler = SlowThenBlocked()
    try:
        with app_handler("sharedstate", handler):
            with sharedstate.StateServer(save_every=None) as server:
                for i in range(6):
                    server.save(tmp_path / f"{i}.json")
                handler.go.set()
            assert len(handler.saves) == 6, handler.saves
            assert handler.blocked.is_set()  # the last record reached the handler, which holds it still
    finally:
        handler.release.set()


@pytest.mark.timeout(180)
def test_the_records_a_stopping_server_cannot_send_to_an_owner_that_does_not_read_are_reported(tmp_path):
    """The server stops (SIGTERM) while its owner is stopped and the pipe is full: the records still
    waiting are lost, and the server says how many on its stderr, in the plain format."""
    stderr = tmp_path / "stderr"
    calls = 400  # more than the pipe holds (about 130), fewer than the server's queue (1000)
    server_pid, saves, dropped = saves_while_the_owner_is_stopped(str(tmp_path / "copy.json"), calls, stderr)
    assert dropped == []  # none was dropped while the server ran: its queue held them
    text = stderr.read_text()
    found = re.findall(
        rf"^sharedstate\[{server_pid}\] WARNING: (\d+) log record\(s\) of the server process were dropped", text, re.M
    )
    assert len(found) == 1, text
    lost = int(found[0])
    # Lost: the saves the owner never got, and the record(s) of the server's own stop behind them.
    assert 0 < saves < calls and calls - saves <= lost <= calls - saves + 2, (saves, lost)


#: An owner with a logger class of its own that forks a child while the owner starts its server: right
#: after the log pipe was made, before the server process gets it (the child sleeps, keeping what it got).
_FORK_IN_START = """
import logging, os, sys, time
import sharedstate

class ForkingLogger(logging.Logger):
    child = None

    def getEffectiveLevel(self):
        if ForkingLogger.child is None:
            pid = os.fork()
            if pid == 0:
                time.sleep(120)
                os._exit(0)
            ForkingLogger.child = pid
        return super().getEffectiveLevel()

logging.getLogger("sharedstate").setLevel(logging.INFO)
logging.setLoggerClass(ForkingLogger)
logging.getLogger("sharedstate.app")  # its level is read as the server starts
server = sharedstate.StateServer(save_every=None).start()
print(server.pid, ForkingLogger.child, flush=True)
time.sleep(120)
"""


def test_a_child_forked_while_the_server_starts_does_not_keep_its_log_pipe(tmp_path):
    """A child forked right after the log pipe was made does not keep the pipe: once the owner is gone
    (SIGKILL), the server's last records go to its stderr instead of into a pipe nobody reads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        owner = subprocess.Popen([sys.executable, "-c", _FORK_IN_START], env=env, stdout=subprocess.PIPE, stderr=err)
    child = None
    try:
        server_pid, child = map(int, owner.stdout.readline().split())
        kill(owner.pid)
        wait_until(lambda: exited(server_pid), WAIT_S, what="the server's exit once its owner is gone")
    finally:
        if child is not None:
            kill(child)
        reap(owner)
        owner.stdout.close()
    assert re.search(rf"^sharedstate\[{server_pid}\] INFO: stopping: ", stderr.read_text(), re.M), stderr.read_text()
