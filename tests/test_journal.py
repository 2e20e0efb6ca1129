"""durability="journal": every change is on disk before its call returns and replays after a crash."""

from __future__ import annotations

import random
import threading

import pytest
from conftest import crash, journaling, kill

import sharedstate
from sharedstate.persistence.journal import journal_path, read_journal
from sharedstate.persistence.snapshot import read_snapshot


def crashed_after_sets(path, count: int):
    """Set k0..k(count-1) on a journaling server, SIGKILL it, and return its journal's path."""
    server = journaling(path)
    for i in range(count):
        server.state.set(f"k{i}", i)
    crash(server)
    return journal_path(path)


@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_sigkill_after_500_changes_loses_none_of_them(tmp_path, fsync):
    path = tmp_path / "state.json"
    server = sharedstate.StateServer(
        path=path, durability="journal", journal_fsync=fsync, save_every=None, restart=False
    ).start()
    state = server.state
    for i in range(500):
        state.set(f"name-{i}", {"i": i, "when": b"%d" % i})
        state.incr("count")
    crash(server)
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as again:
        snap = again.state.snapshot()
    assert snap["count"] == 500
    assert all(snap[f"name-{i}"] == {"i": i, "when": b"%d" % i} for i in range(500))


def test_every_kind_of_change_replays(tmp_path):
    path = tmp_path / "state.json"
    server = journaling(path)
    state = server.state
    state.set("scoped", 1, scope=["a", "b"])
    state.set("gone", 1)
    state.remove("gone")
    state.set("deleted", 1)
    del state["deleted"]
    state.update({"u1": (1, 2), "u2": {3}})
    state.incr("n", 2.5)
    state.setdefault("sd", [1])
    state.setdefault("sd", [2])
    state.set("cas", 1, scope="c")
    state.compare_and_set("cas", 1, 2)
    state.compare_and_set("cas", 1, 3)
    state.append("list", "x")
    state.append("list", b"y")
    expected = state.snapshot()
    scoped = state.names(scope=["a", "c"])
    crash(server)
    with sharedstate.StateServer(path=path, durability="journal") as again:
        assert again.state.snapshot() == expected
        assert again.state.names(scope=["a", "c"]) == scoped == ["cas", "scoped"]


def test_clear_and_restore_replay(tmp_path):
    path = tmp_path / "state.json"
    other = tmp_path / "other.json"
    server = journaling(path)
    state = server.state
    state.set("from-file", 1, scope="s")
    state.save(other)
    state.clear()
    state.set("before-restore", 1)
    state.restore(other, merge=True)
    state.set("after", 2)
    crash(server)
    with sharedstate.StateServer(path=path, durability="journal") as again:
        assert again.state.snapshot() == {"before-restore": 1, "from-file": 1, "after": 2}
        assert again.state.names(scope="s") == ["from-file"]


def test_a_torn_last_record_is_dropped_and_the_rest_replays(tmp_path):
    path = tmp_path / "state.json"
    journal = crashed_after_sets(path, 10)
    with open(journal, "ab") as f:  # what a crash in the middle of a write leaves
        f.write(b'1234abcd ["set","k10",10')
    generation, records = read_journal(journal)
    assert len(records) == 10
    with sharedstate.StateServer(path=path, durability="journal") as again:
        assert again.state.snapshot() == {f"k{i}": i for i in range(10)}


def test_a_damaged_record_before_the_last_is_an_error_and_nothing_is_lost(tmp_path):
    path = tmp_path / "state.json"
    journal = crashed_after_sets(path, 5)
    lines = journal.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"k1", b"kX")  # the CRC no longer matches
    journal.write_bytes(b"\n".join(lines))
    before = journal.read_bytes()
    with pytest.raises(sharedstate.SnapshotError, match="line 3 is damaged"):
        sharedstate.StateServer(path=path, durability="journal").start()
    assert journal.read_bytes() == before


def test_a_save_starts_a_fresh_journal_and_shutdown_removes_it(tmp_path):
    path = tmp_path / "state.json"
    journal = journal_path(path)
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as server:
        for i in range(50):
            server.state.set(f"k{i}", i)
        assert len(read_journal(journal)[1]) == 50
        generation = read_journal(journal)[0]
        server.save()
        assert read_journal(journal) == (generation + 1, [])
        assert read_snapshot(path).generation == generation + 1
        server.state.set("after", 1)
        assert len(read_journal(journal)[1]) == 1
        # The journal the save ended is kept for the backup (the snapshot before), which lacks its changes.
        journals = sorted(p.name for p in tmp_path.iterdir() if ".journal" in p.name)
        assert journals == ["state.json.journal", f"state.json.journal.{generation}"]
    assert not journal.exists()
    # After the stop only the journal of the backup's generation is left: the final save's own is empty.
    leftover = sorted(p.name for p in tmp_path.iterdir() if ".journal" in p.name)
    assert leftover == [f"state.json.journal.{generation + 1}"]
    assert read_snapshot(path).data["after"] == 1


def test_a_snapshot_server_folds_a_left_over_journal_in(tmp_path):
    path = tmp_path / "state.json"
    server = journaling(path)
    server.state.set("journaled", 1)
    crash(server)
    with sharedstate.StateServer(path=path) as plain:
        assert plain.state.get("journaled") == 1
        assert not journal_path(path).exists()


def test_journal_needs_a_path():
    with pytest.raises(ValueError, match="needs a path"):
        sharedstate.StateServer(durability="journal")
    with pytest.raises(ValueError):
        sharedstate.StateServer(path="x.json", durability="wal")
    with pytest.raises(ValueError):
        sharedstate.StateServer(path="x.json", journal_fsync="never")


@pytest.mark.slow
def test_a_crash_at_any_moment_of_a_save_replays_every_change_exactly_once(tmp_path):
    """Counters only count right if no journal record is lost or replayed twice across the generations."""
    path = tmp_path / "state.json"
    rng = random.Random(99)
    acknowledged = 0
    for _round in range(6):
        server = journaling(path)
        state = server.state
        assert state.get("n", 0) in (acknowledged, acknowledged + 1)
        acknowledged = state.get("n", 0)
        stop = threading.Event()
        counted = [acknowledged]

        def count(address=server.address, key=server.authkey, stop=stop, counted=counted) -> None:
            handle = sharedstate.connect(address, key)
            while not stop.is_set():
                try:
                    counted[0] = handle.incr("n")
                except sharedstate.ServerUnavailable:
                    return

        def save(address=server.address, key=server.authkey, stop=stop) -> None:
            handle = sharedstate.connect(address, key)
            handle.update({f"pad-{i}": i for i in range(20_000)})
            while not stop.is_set():
                try:
                    handle.save()
                except sharedstate.ServerUnavailable:
                    return

        threads = [threading.Thread(target=count), threading.Thread(target=save)]
        for t in threads:
            t.start()
        threading.Event().wait(rng.uniform(0.2, 1.0))
        kill(server.pid)
        stop.set()
        for t in threads:
            t.join(30)
        crash(server)
        acknowledged = counted[0]
    with sharedstate.StateServer(path=path, durability="journal") as last:
        assert last.state.get("n") in (acknowledged, acknowledged + 1)


@pytest.mark.parametrize("crash_point", ["before the snapshot", "between snapshot and rename", "after the rename"])
def test_each_crash_point_of_a_save_replays_each_record_once(tmp_path, crash_point):
    """The files a save leaves at each instant, and what start-up replays from them."""
    from sharedstate.persistence.journal import Journal, replay_records
    from sharedstate.persistence.snapshot import write_snapshot

    path = tmp_path / "state.json"
    journal = Journal(path, "always")
    journal.start_generation(1)
    write_snapshot(path, {"n": 0}, {}, 1)
    journal.append(["incr", "n", 1])  # in generation 1
    journal.start_generation(2)  # a save begins: its copy holds n=1
    journal.append(["incr", "n", 10])  # in generation 2, after the copy
    if crash_point != "before the snapshot":
        write_snapshot(path, {"n": 1}, {}, 2)
    if crash_point == "after the rename":
        journal.covered(2)
    journal.close(remove=False)
    snapshot = read_snapshot(path)
    replayed = list(replay_records(path, snapshot.generation))
    n = snapshot.data["n"] + sum(record[2] for record in replayed)
    assert n == 11, (crash_point, snapshot.generation, replayed)
