"""What differs between platforms. This machine is Linux: the macOS and Windows branches are tested through
the functions that choose them (each takes the platform's facts as arguments), and the parts that can
run here run for real (the registry of shared memory names, a package imported without fcntl or
os.register_at_fork)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, kill, reap

import sharedstate
from sharedstate.persistence.files import dir_fsync_possible, fsync_call, fsync_file
from sharedstate.wire import versions
from sharedstate.wire.addresses import NO_SERVER_ON_WINDOWS, check_server_supported, server_supported
from sharedstate.wire.shmnames import SHM_DIR, Registry, sweep_source


# -- fsync: F_FULLFSYNC where fcntl has it ---------------------------------------------------------------
class FcntlWithFullFsync:
    """Stands for macOS's fcntl module, which Linux's lacks the F_FULLFSYNC of: records the calls made."""

    F_FULLFSYNC = 51  # macOS's value

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def fcntl(self, fd: int, command: int) -> int:
        self.calls.append((fd, command))
        if self.refuse:  # a file system without it (SMB, some FUSE ones)
            raise OSError(errno.ENOTSUP, "Operation not supported")
        return 0


def test_fsync_is_f_fullfsync_where_fcntl_has_it(tmp_path):
    import fcntl

    assert fsync_call(None) is os.fsync  # Windows: no fcntl
    assert fsync_call(fcntl) is os.fsync  # Linux's fcntl has no F_FULLFSYNC
    assert fsync_file is os.fsync
    mac = FcntlWithFullFsync()
    with open(tmp_path / "f", "wb") as f:
        fsync_call(mac)(f.fileno())
        assert mac.calls == [(f.fileno(), 51)]


def test_fsync_falls_back_to_fsync_where_the_file_system_refuses_f_fullfsync(tmp_path):
    refusing = FcntlWithFullFsync(refuse=True)
    with open(tmp_path / "f", "wb") as f:
        fsync_call(refusing)(f.fileno())  # os.fsync then succeeds on the real file
        fd = f.fileno()
    # A closed descriptor shows the fallback is the real os.fsync: it fails as os.fsync fails.
    with pytest.raises(OSError) as raised:
        fsync_call(refusing)(fd)
    assert raised.value.errno == errno.EBADF and len(refusing.calls) == 2


#: The package imported with ``os.fsync`` counting the files it is called for: ``fsync_file`` takes it at
#: import. Then ``os.fsync`` itself fails, so an fsync that does not go through ``fsync_file`` shows.
_COUNT_FSYNCS = """
import os, sys
from pathlib import Path
real, synced = os.fsync, []

def counting(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    real(fd)

def elsewhere(fd):
    raise AssertionError("an fsync that does not go through sharedstate.persistence.files.fsync_file")

os.fsync = counting
from sharedstate.persistence import files, journal, snapshot
assert files.fsync_file is counting
os.fsync = elsewhere
path = Path(sys.argv[1]) / "state.json"
snapshot.write_snapshot(path, {"a": 1}, {})
changes = journal.Journal(path, "always")
changes.start_generation(1)
changes.commit(changes.append(["set", "a", 2]))
changes.close(remove=False)
print("\\n".join(synced))
"""


def test_the_snapshot_and_the_journal_fsync_through_the_one_helper(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_FSYNCS, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    synced = done.stdout.splitlines()
    temporary = [name for name in synced if name.startswith(f"{tmp_path}/.state.json.") and name.endswith(".tmp")]
    assert len(temporary) == 1, synced  # the snapshot, before its rename
    assert synced.count(str(tmp_path)) == 2, synced  # the folder, after the rename and the new journal
    assert synced.count(f"{tmp_path}/state.json.journal") == 3, synced  # its header, the change, the close


def test_no_module_but_the_one_helper_calls_fsync():
    package = Path(sharedstate.__file__).parent
    direct = re.compile(r"\bos\.f(?:data)?sync\b|\bF_FULLFSYNC\b|\bfrom os import\b")
    callers = {str(path.relative_to(package)) for path in package.rglob("*.py") if direct.search(path.read_text())}
    assert callers == {"persistence/files.py"}


def test_folders_are_fsynced_except_on_windows():
    assert dir_fsync_possible("posix") is True
    assert dir_fsync_possible("nt") is False


# -- Windows: no server (yet), one clear error ------------------------------------------------------------
def test_a_server_is_refused_on_windows_with_one_clear_error():
    assert server_supported("posix") is True
    assert server_supported("nt") is False
    check_server_supported("posix")
    with pytest.raises(NotImplementedError) as raised:
        check_server_supported("nt")
    assert str(raised.value) == NO_SERVER_ON_WINDOWS
    assert "not supported on Windows yet" in NO_SERVER_ON_WINDOWS
    assert "LocalFileStorage" in NO_SERVER_ON_WINDOWS and "redis://" in NO_SERVER_ON_WINDOWS


#: Where the decision says Windows: every way to start or reach a local server fails at once with the error.
_AS_ON_WINDOWS = """
import sys
from sharedstate.wire import addresses
addresses.server_supported = lambda os_name: False  # the decision, as it is on Windows
import sharedstate
if sys.argv[1] == "cli":
    from sharedstate._cli import main
    main(sys.argv[2:])
calls = {
    "start": lambda: sharedstate.StateServer(save_every=None).start(),
    "serve": lambda: sharedstate.serve().__enter__(),
    "socket": lambda: sharedstate.connect(sys.argv[2], b"key"),
    "tcp": lambda: sharedstate.connect("127.0.0.1:1", b"key"),
}
for what, call in calls.items():
    try:
        call()
    except NotImplementedError as exc:
        print(what, exc)
    else:
        print(what, "did not raise")
"""


def _as_on_windows(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", _AS_ON_WINDOWS, *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_starting_or_reaching_a_server_where_the_decision_says_windows_raises_the_error(tmp_path):
    done = _as_on_windows("api", str(tmp_path / "s.sock"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{what} {NO_SERVER_ON_WINDOWS}" for what in ("start", "serve", "socket", "tcp")
    ]
    for command in (["serve", "--address", str(tmp_path / "s.sock")], ["run", "--", sys.executable, "-c", "pass"]):
        done = _as_on_windows("cli", *command)
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        assert done.stderr == f"sharedstate: error: {NO_SERVER_ON_WINDOWS}\n"


#: Imports the package as on Windows as far as Linux allows: no fcntl, no fork nor os.register_at_fork,
#: no POSIX shared memory; then LocalFileStorage and (given a URL) the Redis backend are used for real.
_WITHOUT_POSIX = """
import os, sys
sys.modules["fcntl"] = None
sys.modules["_posixshmem"] = None
del os.register_at_fork, os.fork  # as on Windows (the stdlib's random registers its hook if fork exists)
import warnings
warnings.simplefilter("ignore")  # filelock warns that it falls back to soft locks without fcntl
import sharedstate
from sharedstate.persistence import files
from sharedstate.wire import versions
assert files.fsync_file is os.fsync and versions._posixshmem is None
storage = sharedstate.LocalFileStorage(sys.argv[1])
storage.set("price", 1.5)
storage.set("when", b"bytes")
assert storage.get("price") == 1.5 and storage.get("when") == b"bytes"
assert storage.get_all_keys() == {"price", "when"}
storage.remove("price")
assert not storage.contains_key("price")
storage.clear()
assert storage.get_all_keys() == set()
if len(sys.argv) > 2:
    state = sharedstate.connect(sys.argv[2], namespace=sys.argv[3])
    state.set("n", 1)
    assert state.incr("n") == 2
    with state.lock:
        state.set("locked", True)
    assert state.snapshot() == {"n": 2, "locked": True}
    state.close()
print("ok")
"""


def _run_without_posix(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_POSIX, *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_package_and_local_file_storage_work_without_fcntl_or_fork_hooks(tmp_path):
    done = _run_without_posix(str(tmp_path / "storage"))
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_the_redis_backend_works_without_fcntl_or_fork_hooks(tmp_path, redis_server, redis_namespace):
    done = _run_without_posix(str(tmp_path / "storage"), redis_server.tcp_url, redis_namespace)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


# -- macOS: the blocks of killed servers, found without /dev/shm ---------------------------------------------
def test_the_sweep_lists_dev_shm_where_there_is_one_and_reads_the_registry_elsewhere():
    assert sweep_source(has_dev_shm=True) == "listing"
    assert sweep_source(has_dev_shm=False) == "registry"


#: A server's version table made with a registry, in a process that is then killed.
_TABLE = """
import sys, time
from pathlib import Path
from sharedstate.wire.shmnames import Registry
from sharedstate.wire.versions import VersionTable
table = VersionTable(sys.argv[1], Registry(Path(sys.argv[2])))
print(table.name, flush=True)
time.sleep(60)
"""


def _start_table(address: Path, registry: Registry) -> subprocess.Popen[str]:
    """A process that makes the version table of a server at ``address`` with ``registry``, prints its
    block's name and waits to be killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", _TABLE, str(address), str(registry.folder)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)


def test_the_registry_finds_the_block_of_a_killed_server_and_the_sweep_removes_it(tmp_path):
    registry = Registry.open(tmp_path / "registry")
    assert registry is not None and (tmp_path / "registry").stat().st_mode & 0o777 == 0o700
    proc = _start_table(tmp_path / "a.sock", registry)
    live = None
    try:
        dead = proc.stdout.readline().strip()
        kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        live = versions.VersionTable(str(tmp_path / "b.sock"), registry)  # its sweep finds the dead block
        assert not os.path.exists(SHM_DIR + dead), "the killed server's block was not swept"
        assert registry.names() == [live.name]
        assert (registry.folder / "blocks").stat().st_mode & 0o777 == 0o600
        assert versions.sweep(registry) == 0  # a live server's block stays, and so does its name
        assert registry.names() == [live.name] and os.path.exists(SHM_DIR + live.name)
        live.close()
        live = None
        assert versions.sweep(registry) == 0 and registry.names() == []  # removed by its server: forgotten
    finally:
        if live is not None:
            live.close()
        reap(proc)
        proc.stdout.close()


def test_a_registry_folder_others_may_write_or_a_link_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert Registry.open(shared) is None
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(private)
    assert Registry.open(tmp_path / "link") is None
    # A link planted as the file inside a trusted folder is neither read nor written through.
    registry = Registry.open(private)
    assert registry is not None
    target = tmp_path / "elsewhere"
    target.write_text("/sharedstate-0123456789abcdef\n")
    (private / "blocks").symlink_to(target)
    assert registry.names() == []
    registry.add("/sharedstate-fedcba9876543210")
    assert target.read_text() == "/sharedstate-0123456789abcdef\n"


def test_a_sweep_that_found_a_name_gone_keeps_it_once_a_server_made_its_block(tmp_path):
    """A sweep read the names, found a block missing, and drops the names it found gone; meanwhile a
    server made a block of that name (one address, one name): the name stays, so the block is swept
    once that server is killed."""
    registry = Registry.open(tmp_path / "registry")
    proc = _start_table(tmp_path / "a.sock", registry)
    name = None
    try:
        name = proc.stdout.readline().strip()
        registry.forget([name])  # the slow sweep's last step
        assert registry.names() == [name]
        kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert versions.sweep(registry) == 1 and not os.path.exists(SHM_DIR + name)
        assert registry.names() == []
    finally:
        reap(proc)
        proc.stdout.close()
        if name:
            versions.retire(name)


#: A server's version table made with a registry where no file may grow beyond 64 KiB: the name is
#: recorded, the block is opened, and it cannot be given its size (EFBIG).
_BLOCK_TOO_LARGE = """
import resource, sys
from pathlib import Path
from sharedstate.wire.shmnames import Registry
from sharedstate.wire.versions import VersionTable
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    VersionTable(sys.argv[1], Registry(Path(sys.argv[2])))
except OSError as exc:
    print(exc.errno)
"""


def test_a_block_that_could_not_be_made_leaves_no_name_in_the_registry(tmp_path):
    registry = Registry.open(tmp_path / "registry")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", _BLOCK_TOO_LARGE, str(tmp_path / "a.sock"), str(registry.folder)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout == f"{errno.EFBIG}\n", done.stderr
    assert (registry.folder / "blocks").exists()  # the name was recorded, then dropped
    assert registry.names() == []
