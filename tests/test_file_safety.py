"""Files the server reads and writes stay its own regular files: planted links are refused, not
followed; a final save cut short is reported; a damaged journal is never removed as empty; the backup
fallback replays exactly the journals it needs; only our own header marks a file as ours."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import as_user, crash, exited, fill, journaling, kill, wait_until

import sharedstate
from sharedstate.server import supervisor


def saved_in_thread(server: sharedstate.StateServer, timeout: float = 30.0) -> BaseException | None:
    """What ``save()`` raised (``None``: it returned), failing the test if it did not finish in time."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            server.state.save()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"save() did not finish within {timeout:g} s"
    return outcome[0]


@contextmanager
def final_save_refused(path: Path) -> Iterator[sharedstate.StateServer]:
    """A server on ``path`` whose final save a file another user planted makes fail: its shutdown, at the
    end of the block, raises ``SnapshotError``."""
    server = sharedstate.StateServer(path=path, save_every=None, restart=False).start()
    try:
        yield server
    finally:
        with pytest.raises(sharedstate.SnapshotError, match="final save"):
            server.shutdown()


# -- 1. a symbolic link planted at the snapshot's path ------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("planted", ["link-to-a-fifo", "file"])
def test_a_link_or_a_file_planted_before_the_first_save_is_refused_not_followed(second_user, shared_folder, planted):
    path = shared_folder / "state.json"
    fifo = shared_folder / "evil.fifo"
    if planted == "file":
        code, refusal = f"open({str(path)!r}, 'w').write('{{}}')\n", "it belongs to another user"
    else:
        code = f"import os\nos.mkfifo({str(fifo)!r})\nos.symlink({str(fifo)!r}, {str(path)!r})\n"
        refusal = "it is a symbolic link"
    with final_save_refused(path) as server:
        server.state.set("a", 1)
        as_user(second_user, code)
        error = saved_in_thread(server)
        assert isinstance(error, sharedstate.SnapshotError), error
        assert f"state.json: {refusal}" in str(error)
        assert not os.path.lexists(shared_folder / "state.json.bak")  # never a hard link to their file
        assert server.state.get("a") == 1  # the server serves on
    # What they planted is as they left it, after the final save too.
    if planted == "file":
        assert path.read_text() == "{}"
    else:
        assert os.readlink(path) == str(fifo)


def test_restore_of_the_servers_own_file_does_not_follow_a_planted_link(second_user, shared_folder):
    path = shared_folder / "state.json"
    theirs = shared_folder / "theirs.json"
    with final_save_refused(path) as server:
        server.state.set("mine", 1)
        as_user(
            second_user,
            f"import os\nopen({str(theirs)!r}, 'w').write('{{\"planted\": 1}}')\n"
            f"os.symlink({str(theirs)!r}, {str(path)!r})\n",
        )
        with pytest.raises(sharedstate.SnapshotError, match="state.json: it is a symbolic link"):
            server.state.restore()
        assert server.state.snapshot() == {"mine": 1}
    assert theirs.read_text() == '{"planted": 1}'


def test_save_and_restore_of_a_path_given_through_a_link_still_work(tmp_path, server):
    real = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(real)
    server.state.set("a", 1)
    server.state.save(link)  # resolved by the caller: the link's target is written, the link stays
    assert link.is_symlink() and json.loads(real.read_text())["names"] == {"a": 1}
    server.state.save(link)
    assert link.is_symlink() and (tmp_path / "real.json.bak").is_file()
    server.state.set("a", 2)
    assert server.state.restore(link) == 1 and server.state.get("a") == 1


# -- 3. a journal whose start is zeroed still holds records -------------------------------------------


def test_a_journal_with_its_first_4_kib_zeroed_refuses_the_start_and_is_kept(tmp_path):
    path = tmp_path / "state.json"
    server = journaling(path, journal_fsync="always")
    for i in range(150):
        server.state.set(f"name-{i:04d}", "v" * 100)
    crash(server)
    journal = tmp_path / "state.json.journal"
    raw = bytearray(journal.read_bytes())
    assert len(raw) > 8192
    raw[:4096] = bytes(4096)
    journal.write_bytes(bytes(raw))
    with pytest.raises(sharedstate.SnapshotError, match=r"state\.json\.journal is not a valid journal: line 1"):
        journaling(path)
    assert journal.read_bytes() == bytes(raw)


@pytest.mark.parametrize("content", [b"", bytes(40), b'0123abcd {"format":"sharedstate-jo'])
def test_a_journal_no_longer_than_a_torn_header_is_still_removed(tmp_path, content):
    path = tmp_path / "state.json"
    torn = tmp_path / "state.json.journal.9"
    torn.write_bytes(content)
    with sharedstate.StateServer(path=path, durability="journal") as server:
        assert server.state.snapshot() == {}
        assert not torn.exists()


def test_a_short_file_of_zeros_longer_than_a_header_is_refused(tmp_path):
    path = tmp_path / "state.json"
    planted = tmp_path / "state.json.journal.9"
    planted.write_bytes(bytes(200))
    with pytest.raises(sharedstate.SnapshotError, match=r"journal\.9 is not a valid journal: line 1"):
        journaling(path)
    assert planted.read_bytes() == bytes(200)


# -- 6. a Pode file written on one line ----------------------------------------------------------------
def test_a_compact_pode_file_with_a_sha256_value_is_read_as_pode(tmp_path):
    from sharedstate.persistence.snapshot import read_snapshot

    path = tmp_path / "pode.json"
    digest = "ab" * 32
    doc = {"release": {"Value": {"sha256": digest, "name": "x"}, "Scope": ["build"]}}
    path.write_text(json.dumps(doc, separators=(",", ":")))  # Save-PodeState -Compress: one line
    assert b"\n" not in path.read_bytes()
    snapshot = read_snapshot(path)
    assert snapshot.foreign
    assert snapshot.data == {"release": {"sha256": digest, "name": "x"}}
    assert snapshot.scopes == {"release": ("build",)}
    path.write_text(json.dumps({"release": {"Value": {"sha256": digest}, "Scope": []}}))  # with spaces too
    assert read_snapshot(path).data == {"release": {"sha256": digest}}


# -- 4. the backup and the journals it needs -----------------------------------------------------------
def journal_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".journal" in p.name)


def test_a_start_from_the_backup_replays_every_journal_it_needs_exactly_once(tmp_path):
    path = tmp_path / "state.json"
    server = journaling(path, journal_fsync="always")
    server.state.update({"x": 1, "a": 1})
    server.state.incr("n")
    server.save()
    server.state.update({"x": 2, "b": 1})
    server.state.incr("n")
    server.save()
    server.state.update({"x": 3, "c": 1})
    server.state.incr("n")
    crash(server)
    path.unlink()
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as again:
        assert again.state.stats()["restored_from_backup"] == 1
        assert again.state.snapshot() == {"x": 3, "a": 1, "b": 1, "c": 1, "n": 3}


def test_after_a_clean_stop_the_backup_still_reaches_the_final_state(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as server:
        server.state.set("x", 1)
        server.save()
        server.state.set("x", 2)
        server.state.incr("n")
    names = journal_names(tmp_path)
    assert len(names) == 1 and names[0].startswith("state.json.journal.")  # the one the backup needs
    path.unlink()
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as again:
        assert again.state.snapshot() == {"x": 2, "n": 1}
        again.state.incr("n")
    # Started again from the snapshot that stop wrote, the next backup has its journals too.
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as third:
        third.state.incr("n")
        third.save()
        third.state.incr("n")
        pid = third.pid
        kill(pid)
        wait_until(lambda: exited(pid), 10, what="the server to die")
    path.unlink()
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as fourth:
        assert fourth.state.snapshot() == {"x": 2, "n": 4}


def test_a_start_from_the_backup_over_a_missing_journal_is_refused(tmp_path):
    path = tmp_path / "state.json"
    server = journaling(path, journal_fsync="always")
    server.state.set("a", 1)
    server.save()
    server.state.set("b", 1)
    server.save()
    server.state.set("c", 1)
    crash(server)
    path.unlink()
    older = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.journal.")]
    assert len(older) == 1
    older[0].unlink()  # the journal from the backup to the lost snapshot
    bak = (tmp_path / "state.json.bak").read_bytes()
    with pytest.raises(sharedstate.SnapshotError, match=r"state\.json\.bak .*journal of generation \d+ is missing"):
        journaling(path)
    assert (tmp_path / "state.json.bak").read_bytes() == bak
    assert (tmp_path / "state.json.journal").exists()


# -- 2. a final save cut short by the escalation of a shutdown ------------------------------------------
def shutdown_while_stopped(server: sharedstate.StateServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``server.shutdown()`` with its process stopped (SIGSTOP), so the escalation has to kill it; its
    waits shortened (what is tested is what happens when they run out). Raises what ``shutdown`` raises."""
    monkeypatch.setattr(supervisor, "STOP_TIMEOUT_S", 1.0)
    monkeypatch.setattr(supervisor, "CONTROL_TIMEOUT_S", 0.5)
    pid = server.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        server.shutdown()
    finally:
        kill(pid, signal.SIGCONT)
    assert exited(pid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("durability", ["snapshot", "journal"])
def test_shutdown_raises_when_the_server_is_killed_before_its_final_save_finished(tmp_path, durability, monkeypatch):
    path = tmp_path / "state.json"
    server = sharedstate.StateServer(path=path, save_every=None, restart=False, durability=durability).start()
    pid = server.pid
    server.state.set("a", 1)
    server.save()
    server.state.set("b", 1)  # only in the final save, which never finishes: shutdown must kill it
    with pytest.raises(sharedstate.SnapshotError, match="killed before its final save") as caught:
        shutdown_while_stopped(server, monkeypatch)
    assert caught.value.path == str(path)
    assert exited(pid)
    kept = "journal beside it keeps" if durability == "journal" else "changes since the last save are lost"
    assert kept in str(caught.value)
    server.shutdown()  # idempotent: nothing more to report
    with sharedstate.StateServer(path=path, save_every=None, durability=durability) as again:
        assert again.state.snapshot() == ({"a": 1, "b": 1} if durability == "journal" else {"a": 1})


def test_shutdown_of_a_server_without_a_path_killed_by_the_escalation_does_not_raise(monkeypatch):
    shutdown_while_stopped(sharedstate.StateServer(restart=False).start(), monkeypatch)


# -- 7. the owner file, full disks, journals that cannot be removed, damaged last lines ------------------
@pytest.mark.timeout(90)
def test_an_owner_file_replaced_by_a_fifo_does_not_block_the_stop(tmp_path):
    path = tmp_path / "state.json"
    server = sharedstate.StateServer(path=path, save_every=None, restart=False).start()
    server.state.set("a", 1)
    owner = tmp_path / "state.json.owner"
    owner.unlink()
    os.mkfifo(owner)
    proc = server._supervisor.proc
    server.shutdown()  # the release of the claim reads the owner file: never blocks on a FIFO
    assert proc.returncode == 0
    assert read_snapshot_data(path) == {"a": 1}
    assert stat.S_ISFIFO(os.lstat(owner).st_mode)  # not ours to remove


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_save_whose_journal_header_does_not_fit_on_the_disk_leaks_nothing_and_a_later_save_works(full_disk):
    path = full_disk / "state.json"
    server = sharedstate.StateServer(path=path, durability="journal", save_every=None, restart=False).start()
    try:
        server.state.set("a", 1)
        server.save()
        before = open_fds(server.pid)
        journals = journal_names(full_disk)
        fill(full_disk)
        for _ in range(3):
            with pytest.raises(OSError, match="No space left"):
                server.save()
        assert open_fds(server.pid) == before
        assert journal_names(full_disk) == journals
        (full_disk / "filler").unlink()
        server.save()
        server.state.set("b", 1)
    finally:
        server.shutdown()
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as again:
        assert again.state.snapshot() == {"a": 1, "b": 1}


@pytest.fixture
def immutable():
    """Marks files immutable (``chattr +i``: not even root may remove them) and clears the mark after."""
    import subprocess

    marked: list[Path] = []

    def mark(where: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mark a file immutable here: {done.stderr.decode().strip()}")
        marked.append(where)

    yield mark
    for where in marked:
        subprocess.run(["chattr", "-i", str(where)], check=False)


def test_an_old_journal_that_cannot_be_removed_does_not_fail_saves(second_user, shared_folder, immutable):
    """Another user plants an old journal after the start; the server may not remove it (immutable here:
    root could remove another user's file from a sticky folder, a server run by a normal user could not)."""
    from sharedstate.persistence.journal import FORMAT, _line

    path = shared_folder / "state.json"
    planted = shared_folder / "state.json.journal.99"
    server = journaling(path)
    try:
        server.state.set("a", 1)
        server.save()
        server.state.set("b", 1)
        server.save()
        header = _line({"format": FORMAT, "generation": 0})
        as_user(second_user, f"open({str(planted)!r}, 'wb').write({header!r})\n")
        immutable(planted)
        server.state.set("c", 1)
        server.save()  # the snapshot is written: a journal it cannot remove does not make the save fail
        assert server.state.stats()["last_save_error"] is None
        server.state.set("d", 1)
    finally:
        server.shutdown()  # nor the final one
    assert read_snapshot_data(path) == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert planted.read_bytes() == header


def read_snapshot_data(path: Path) -> dict:
    from sharedstate.persistence.snapshot import read_snapshot

    return read_snapshot(path).data


def test_a_complete_last_journal_line_with_a_bad_crc_refuses_the_start(tmp_path):
    path = tmp_path / "state.json"
    server = journaling(path, journal_fsync="always")
    for i in range(5):
        server.state.set(f"k{i}", i)
    crash(server)
    journal = tmp_path / "state.json.journal"
    lines = journal.read_bytes().split(b"\n")
    assert lines[-1] == b"" and b"k4" in lines[-2]
    lines[-2] = lines[-2].replace(b"k4", b"kX")  # whole (it ends in its newline), but its CRC no longer matches
    journal.write_bytes(b"\n".join(lines))
    before = journal.read_bytes()
    with pytest.raises(sharedstate.SnapshotError, match=f"line {len(lines) - 1} is damaged"):
        journaling(path)
    assert journal.read_bytes() == before
