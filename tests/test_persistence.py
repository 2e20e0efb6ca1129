"""Persistence under damage and around files that are not ours: damaged journals and snapshots are
refused (never skipped, never read as something else), a missing snapshot starts from its backup, only
regular files are read or replaced, files planted by another user are never written into, and a final
save that fails is reported."""

from __future__ import annotations

import datetime
import json
import os
import pwd
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, as_user, crash, exited, fill, journaling, reap, start_serve, start_with_log

import sharedstate
from sharedstate.persistence.codec import object_hook
from sharedstate.persistence.files import read_regular, write_atomic
from sharedstate.persistence.journal import journal_path
from sharedstate.persistence.snapshot import read_snapshot, snapshot_pieces, write_snapshot


def crashed_with_acknowledged_writes(path: Path, count: int = 20) -> Path:
    """``count`` fsync="always" writes, then SIGKILL: every one of them is acknowledged and journaled."""
    server = journaling(path, journal_fsync="always")
    for i in range(count):
        server.state.set(f"k{i}", i)
    crash(server)
    return journal_path(path)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- 1. damaged journals ----------------------------------------------------------------------------
def test_a_journal_header_with_one_changed_byte_refuses_the_start_and_is_kept(tmp_path):
    path = tmp_path / "state.json"
    journal = crashed_with_acknowledged_writes(path)
    raw = bytearray(journal.read_bytes())
    raw[raw.index(b"journal")] ^= 0x01  # "sharedstate-journal" -> "sharedstate-kournal"
    journal.write_bytes(bytes(raw))
    with pytest.raises(sharedstate.SnapshotError, match=r"state\.json\.journal.*line 1") as caught:
        journaling(path)
    assert caught.value.path == str(journal)
    assert journal.read_bytes() == bytes(raw)
    raw[raw.index(b"kournal")] ^= 0x01  # repaired by hand: nothing was lost
    journal.write_bytes(bytes(raw))
    with sharedstate.StateServer(path=path, durability="journal") as again:
        assert again.state.snapshot() == {f"k{i}": i for i in range(20)}


def test_a_journal_replaced_by_garbage_refuses_the_start_and_is_kept(tmp_path):
    path = tmp_path / "state.json"
    journal = crashed_with_acknowledged_writes(path)
    for garbage in (random.Random(13).randbytes(3000), b"x" * 50):  # with newlines, and without
        journal.write_bytes(garbage)
        with pytest.raises(sharedstate.SnapshotError, match="line 1"):
            journaling(path)
        assert journal.read_bytes() == garbage
        assert not [n for n in listing(tmp_path) if ".journal." in n]


def test_a_journal_whose_header_a_crash_cut_short_is_removed(tmp_path):
    path = tmp_path / "state.json"
    crashed_with_acknowledged_writes(path, 3)
    torn = tmp_path / "state.json.journal.7"
    torn.write_bytes(b'0123abcd {"format":"sharedstate-jo')  # a header line, cut by a crash
    with sharedstate.StateServer(path=path, durability="journal") as again:
        assert again.state.snapshot() == {"k0": 0, "k1": 1, "k2": 2}
        assert not torn.exists()


# -- 2. damaged snapshots -------------------------------------------------------------------------
SMALL = {
    "n": 7,
    "s": "héllo",
    "b": b"\x00\xff",
    "t": (1, 2.5),
    "when": datetime.datetime(2024, 5, 1, 10, 20, 30, tzinfo=datetime.timezone.utc),
    "flag": True,
}
SMALL_SCOPES = {"n": ("web",), "s": ("a", "b")}


def test_no_single_bit_flip_of_a_small_snapshot_is_read_as_different_data(tmp_path):
    path = tmp_path / "state.json"
    write_snapshot(path, SMALL, SMALL_SCOPES, generation=3)
    good = path.read_bytes()
    assert 250 <= len(good) <= 450, len(good)
    expected = read_snapshot(path)
    assert expected.data == SMALL and expected.scopes == SMALL_SCOPES and expected.generation == 3
    same = refused = 0
    different = []
    for bit in range(len(good) * 8):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        try:
            got = read_snapshot(path)
        except sharedstate.SnapshotError:
            refused += 1
            continue
        if got is not None and repr(got) == repr(expected):
            same += 1
        else:
            different.append((bit, bytes(flipped[max(0, bit // 8 - 10) : bit // 8 + 10])))
    assert not different, f"{len(different)} flips read as different data, e.g. {different[:5]}"
    assert refused + same == len(good) * 8 >= 2000


def test_a_misspelt_format_key_is_refused_not_read_as_a_pode_file(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, save_every=None) as server:
        server.state.set("real", 1)
    raw = path.read_bytes().replace(b'"format"', b'"formet"', 1)
    path.write_bytes(raw)
    with pytest.raises(sharedstate.SnapshotError, match="checksum"):
        sharedstate.StateServer(path=path, save_every=None).start()
    assert path.read_bytes() == raw
    assert not (tmp_path / "state.json.bak").exists()


def test_a_new_section_after_the_header_is_covered_by_the_checksum(tmp_path):
    """A later version may add a section (say, the last answer per client): it is covered as written."""
    from sharedstate.persistence.snapshot import _Sealer

    path = tmp_path / "state.json"
    pieces = list(snapshot_pieces({"a": 1}, {}))
    pieces.insert(-1, ',\n"answers": {"client-1": [5, "done"]}')
    sealer = _Sealer()
    write_atomic(path, sealer.pieces(pieces), finish=sealer.finish)
    assert read_snapshot(path).data == {"a": 1}
    path.write_bytes(path.read_bytes().replace(b'"done"', b'"dome"'))
    with pytest.raises(sharedstate.SnapshotError, match="checksum"):
        read_snapshot(path)


def test_a_version_1_snapshot_without_a_checksum_is_still_read(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"format": "sharedstate", "version": 1, "saved_at": "x", "count": 1, "scopes": {"a": ["s"]},\n'
                    '"names": {"a": {"$type": "bytes", "value": "AAE="}}}\n')  # fmt: skip
    with sharedstate.StateServer(path=path, save_every=None) as server:
        assert server.state.get("a") == b"\x00\x01"
        assert server.state.names(scope="s") == ["a"]


def test_a_version_2_snapshot_whose_checksum_is_gone_is_refused(tmp_path):
    path = tmp_path / "state.json"
    write_snapshot(path, {"a": 1}, {})
    path.write_bytes(path.read_bytes().replace(b'"sha256"', b'"sha257"'))
    with pytest.raises(sharedstate.SnapshotError, match="checksum"):
        read_snapshot(path)


# -- 3. a missing snapshot beside its backup ------------------------------------------------------
def test_a_missing_snapshot_starts_from_its_backup_with_a_warning(tmp_path):
    path = tmp_path / "state.json"
    bak = tmp_path / "state.json.bak"
    with sharedstate.StateServer(path=path, save_every=None) as server:
        server.state.set("kept", 1)
        server.save()
        server.state.set("kept", 2)
    # The final save moved the kept=1 file to the backup.
    path.unlink()
    before = bak.read_bytes()
    log = tmp_path / "server.log"
    server = start_with_log(log, path=path, save_every=None)
    try:
        assert server.state.snapshot() == {"kept": 1}
        assert server.state.stats()["restored_from_backup"] == 1
        server.state.set("new", 1)
        assert bak.read_bytes() == before
    finally:
        server.shutdown()
    assert "state.json is missing: starting from its backup" in log.read_text()
    assert read_snapshot(path).data == {"kept": 1, "new": 1}
    assert bak.read_bytes() == before  # the first save had no snapshot to move to the backup
    with sharedstate.StateServer(path=path, save_every=None) as again:
        assert again.state.stats()["restored_from_backup"] == 0


# -- 4. something else where our files should be ---------------------------------------------------
def make_directory(where: Path) -> None:
    where.mkdir()


def make_fifo(where: Path) -> None:
    os.mkfifo(where)


def make_socket(where: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(where.name)  # relative: the test runs in the folder (a Unix socket path is short)
    return sock


def make_device_link(where: Path) -> None:
    where.symlink_to("/dev/null")


KINDS = {"directory": make_directory, "fifo": make_fifo, "socket": make_socket, "device": make_device_link}
SLOTS = ["state.json", "state.json.bak", "state.json.journal", "state.json.owner", "state.json.lock"]


@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_directory_device_fifo_or_socket_in_a_slot_is_refused_at_start(tmp_path, monkeypatch, kind, slot):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "state.json"
    if slot != "state.json":
        write_snapshot(path, {"a": 1}, {})
    planted = tmp_path / slot
    made = KINDS[kind](planted)
    try:
        before = listing(tmp_path)
        with pytest.raises(sharedstate.SnapshotError) as caught:
            sharedstate.StateServer(path=path, durability="journal", save_every=None).start()
        assert caught.value.path in (str(planted), "/dev/null")
        assert str(planted) in str(caught.value) or "/dev/null" in str(caught.value)
        after = listing(tmp_path)
        assert not [n for n in after if ".journal." in n]
        assert set(after) - set(before) <= {"state.json.lock"}
        if kind == "device":
            assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    finally:
        if made is not None:
            made.close()


# -- 5. save and restore of paths that are not regular files ---------------------------------------
@pytest.fixture
def private_null(tmp_path) -> Path:
    """A null device node of our own (so a failing test replaces it, never the machine's /dev/null)."""
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod is not permitted here")
    return node


def test_save_to_a_link_to_a_device_is_refused_and_the_device_stays(tmp_path, private_null, state):
    link = tmp_path / "out.json"
    link.symlink_to(private_null)
    state.set("a", 1)
    with pytest.raises(sharedstate.SnapshotError, match="character device"):
        state.save(link)
    with pytest.raises(sharedstate.SnapshotError, match="character device"):
        state.save(private_null)
    assert stat.S_ISCHR(os.lstat(private_null).st_mode)


def test_save_to_dev_stdout_means_the_callers_stdout_and_is_refused(tmp_path, private_null, server):
    """What the server's /dev/stdout is does not matter: the caller's is a device here."""
    code = (
        "import sys, sharedstate\n"
        "state = sharedstate.connect()\n"
        "try:\n"
        "    state.save('/dev/stdout')\n"
        "except sharedstate.SnapshotError as exc:\n"
        "    print('refused:', exc, file=sys.stderr)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(private_null, "wb") as out:
        done = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=subprocess.PIPE, env=env, timeout=60)
    assert done.returncode == 0 and b"refused:" in done.stderr, done.stderr
    assert stat.S_ISCHR(os.lstat(private_null).st_mode)


def test_save_to_a_fifo_is_refused(tmp_path, state):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(sharedstate.SnapshotError, match="FIFO"):
        state.save(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.timeout(60)
def test_restore_from_a_fifo_or_dev_zero_is_refused_at_once(tmp_path, state):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    state.set("a", 1)
    for source in (fifo, zero):
        errors = []

        def call(source=source, errors=errors):
            try:
                state.restore(source)
            except sharedstate.SnapshotError as exc:
                errors.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), f"restore({source}) blocked"
        assert len(errors) == 1
    assert state.snapshot() == {"a": 1}


def test_the_server_refuses_a_fifo_even_from_a_client_that_does_not_check(tmp_path, state):
    """The server checks the opened file itself (an old client, or a FIFO put there after the check)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(sharedstate.SnapshotError, match="FIFO"):
        state.backend._call("restore", (str(fifo), False))
    with pytest.raises(sharedstate.SnapshotError, match="FIFO"):
        state.backend._call("save", (str(fifo), None, None, ()))


def test_reading_never_blocks_on_a_fifo_nor_reads_an_endless_device(tmp_path):
    """The check on the opened descriptor itself: what a path turns into after any check by name."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for source in (fifo, Path("/dev/zero")):
        with pytest.raises(sharedstate.SnapshotError, match="not a regular file"):
            read_regular(source)
        with pytest.raises(sharedstate.SnapshotError, match="not a regular file"):
            read_snapshot(source)
    grows = tmp_path / "grows"
    grows.write_bytes(b"abc")
    assert read_regular(grows) == b"abc" and read_regular(grows, 2) == b"ab"


def test_redis_save_and_restore_refuse_devices_and_fifos(tmp_path, private_null, redis_state):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "out.json"
    link.symlink_to(private_null)
    redis_state.set("a", 1)
    for target in (fifo, link):
        with pytest.raises(sharedstate.SnapshotError):
            redis_state.save(target)
        with pytest.raises(sharedstate.SnapshotError):
            redis_state.restore(target)
    assert stat.S_ISCHR(os.lstat(private_null).st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert redis_state.snapshot() == {"a": 1}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    full["PYTHONPATH"] = str(ROOT)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "sharedstate", *args], env=full, capture_output=True, timeout=60)


def test_cli_dump_prints_the_live_state_as_typed_json(server):
    server.state.set("b", b"\x00\x01", scope="s")
    server.state.set("n", 5)
    done = cli("dump", env={"SHAREDSTATE_ADDRESS": server.address})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout, object_hook=object_hook) == {"names": {"b": b"\x00\x01", "n": 5}}


def test_cli_restore_of_a_missing_file_exits_1_with_one_line(tmp_path, server):
    server.state.set("a", 1)
    done = cli("restore", str(tmp_path / "nope.json"), env={"SHAREDSTATE_ADDRESS": server.address})
    assert done.returncode == 1
    assert done.stderr.decode().count("\n") == 1 and "nope.json" in done.stderr.decode()
    assert server.state.snapshot() == {"a": 1}


# -- 6. files planted by another user ---------------------------------------------------------------
def test_files_planted_by_another_user_are_never_written_into(second_user, shared_folder):
    path = shared_folder / "state.json"
    crashed_with_acknowledged_writes(path, 3)  # the next start replays, saves, and opens journal.2
    (shared_folder / "state.json.owner").unlink()  # the killed server's pid: gone after a reboot, say
    theirs = shared_folder / "theirs.txt"
    as_user(
        second_user,
        f"import os\n"
        f"open({str(theirs)!r}, 'w').write('mine\\n')\n"
        f"for n in (1, 2, 3):\n"
        f"    open({str(path)!r} + '.journal.%d' % n, 'w').write('mine\\n')\n"
        f"os.symlink({str(theirs)!r}, {str(path)!r} + '.owner')\n",
    )
    planted = [shared_folder / f"state.json.journal.{n}" for n in (1, 2, 3)] + [theirs]
    with pytest.raises(sharedstate.SnapshotError, match=r"state\.json\.owner: it is a symbolic link"):
        journaling(path)
    assert os.readlink(shared_folder / "state.json.owner") == str(theirs)
    as_user(second_user, f"import os\nos.unlink({str(path)!r} + '.owner')\n")
    with pytest.raises(sharedstate.SnapshotError, match=r"state\.json\.journal\.\d: it belongs to another user"):
        journaling(path)
    for name in planted:
        assert name.read_text() == "mine\n" and name.stat().st_uid == pwd.getpwnam(second_user).pw_uid


def test_an_owner_file_link_planted_by_another_user_is_refused(second_user, shared_folder):
    path = shared_folder / "state.json"
    theirs = shared_folder / "theirs.txt"
    as_user(
        second_user,
        f"import os\nopen({str(theirs)!r}, 'w').write('mine')\nos.symlink({str(theirs)!r}, {str(path)!r} + '.owner')\n",
    )
    with pytest.raises(sharedstate.SnapshotError, match=r"state\.json\.owner"):
        sharedstate.StateServer(path=path, save_every=None).start()
    assert theirs.read_text() == "mine"


# -- 16. a final save that fails ------------------------------------------------------------------
def test_shutdown_raises_when_the_final_save_fails_on_a_full_disk(full_disk):
    path = full_disk / "state.json"
    server = sharedstate.StateServer(path=path, save_every=None).start()
    pid = server.pid
    server.state.set("small", 1)
    server.save()
    before = path.read_bytes()
    server.state.set("big", "x" * 40_000)
    fill(full_disk)
    with pytest.raises(sharedstate.SnapshotError, match="final save.*No space left") as caught:
        server.shutdown()
    assert caught.value.path == str(path)
    assert exited(pid)
    assert path.read_bytes() == before
    server.shutdown()  # idempotent: stopped, nothing more to report


def test_serve_exits_non_zero_when_the_final_save_fails(full_disk, tmp_path):
    path = full_disk / "state.json"
    address = str(tmp_path / "s.sock")
    proc = start_serve(path, address)
    try:
        assert proc.stdout.readline().startswith(b"sharedstate: serving at")
        state = sharedstate.connect(address)
        state.set("big", "x" * 40_000)
        state.close()
        fill(full_disk)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        err = proc.stderr.read().decode()
    finally:
        reap(proc)
        proc.stdout.close()
        proc.stderr.close()
    assert code == 1, err
    assert f"sharedstate: error: the final save to {path} failed" in err


# -- 17. Pode's SyncHashtable ---------------------------------------------------------------------
def test_a_pode_sync_hashtable_restores_as_a_dict(tmp_path):
    path = tmp_path / "pode.json"
    doc = {
        "__pode_state_metadata__": {"Version": 2},
        "__pode_state_data__": {
            "Type": "SyncHashtable",
            "Items": [
                {
                    "Key": "cache",
                    "Value": {
                        "Type": "Hashtable",
                        "Items": [
                            {
                                "Key": "Value",
                                "Value": {
                                    "Type": "SyncHashtable",
                                    "Items": [{"Key": "hits", "Value": {"Type": "Int32", "Value": 3}}],
                                },
                            },
                            {"Key": "Scope", "Value": []},
                        ],
                    },
                }
            ],
        },
    }
    path.write_text(json.dumps(doc))
    snapshot = read_snapshot(path)
    assert snapshot.data == {"cache": {"hits": 3}}
