"""A server's own snapshot file: every type and scope survives a restart, the file's format, its backup,
saves at shutdown and on schedule, a file that is corrupt or busy, a save that fails. (save() and
restore() on every backend: tests/contract/test_snapshots.py.)"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import psutil
import pytest
from conftest import log_with, start_with_log, wait_until
from contract.storable import VALUES, same
from contract.test_snapshots import CORRUPT

import sharedstate

MARKER_LOOKALIKES = {
    "looks_tagged": {"$type": "bytes", "value": "AAE="},
    "looks_escaped": {"$type": "dict", "value": [["a", 1]]},
    "nested_lookalike": [{"$type": "tuple", "value": [1]}, ({"$type": "x"},)],
    "$type": "a name that is the marker",
    "value": {"$type": None},
}


def test_every_type_and_scope_survives_a_new_server(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path) as server:
        state = server.state
        for i, (name, value) in enumerate({**VALUES, **MARKER_LOOKALIKES}.items()):
            state.set(name, value, scope=["s", f"only-{i}"] if i % 2 else None)
        expected = state.snapshot()
        expected_scoped = state.names(scope="s")
    with sharedstate.StateServer(path=path) as server:
        got = server.state.snapshot()
        assert got.keys() == expected.keys()
        for name in expected:
            assert same(got[name], expected[name]), name
        assert server.state.names(scope="s") == expected_scoped
        assert server.state.names(scope="only-1") == [list(expected)[1]]


def test_the_file_is_readable_json_with_a_header(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.serve(path=path) as state:
        state.set("greeting", "héllo", scope="web")
        state.set("n", 1)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["format"] == "sharedstate" and doc["version"] == 2 and doc["saved_at"].endswith("+00:00")
    assert len(doc["sha256"]) == 64
    assert doc["names"] == {"greeting": "héllo", "n": 1}
    assert doc["scopes"] == {"greeting": ["web"]}
    assert "héllo" in path.read_text(encoding="utf-8")  # not \u escapes


def test_shutdown_saves_the_file_private_and_keeps_the_previous_as_bak(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.serve(path=path) as state:
        state.set("v", 1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = path.read_text()
    with sharedstate.StateServer(path=path) as server:
        assert server.state.get("v") == 1  # restored at start
        server.state.set("v", 2)
        saved = server.save()
        assert saved == path
        assert Path(str(path) + ".bak").read_text() == first
        second = path.read_text()
        server.state.set("v", 3)
    bak = Path(str(path) + ".bak")
    assert bak.read_text() == second
    assert stat.S_IMODE(os.stat(bak).st_mode) == 0o600
    assert json.loads(path.read_text())["names"] == {"v": 3}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_write_just_before_shutdown_is_in_the_file(tmp_path):
    path = tmp_path / "state.json"
    server = sharedstate.StateServer(path=path).start()
    other = sharedstate.connect(server.address, server.authkey)
    for i in range(100):
        other.set(f"k{i}", i)
    server.shutdown()
    assert len(json.loads(path.read_text())["names"]) == 100


def test_a_server_does_not_start_on_a_corrupt_file_and_leaves_it(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(CORRUPT["truncated"])
    with pytest.raises(sharedstate.SnapshotError, match="invalid JSON"):
        sharedstate.StateServer(path=path).start()
    assert path.read_bytes() == CORRUPT["truncated"]
    assert not Path(str(path) + ".bak").exists()
    path.write_text("{}")  # once fixed, the same file can be used (nothing was left locked)
    with sharedstate.StateServer(path=path) as server:
        assert len(server.state) == 0


def test_a_second_server_on_the_same_file_is_refused_with_the_owners_pid(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path) as first:
        first.state.set("a", 1)
        with pytest.raises(sharedstate.StateFileBusy) as info:
            sharedstate.StateServer(path=path).start()
        assert info.value.pid == first.pid and str(first.pid) in str(info.value)
        assert info.value.path == str(path)
        assert first.state.get("a") == 1
    with sharedstate.StateServer(path=path) as again:  # free once the first stopped
        assert again.state.get("a") == 1


def test_a_failed_save_keeps_the_old_file_reports_and_serves_on(tmp_path):
    """A file-size limit on the server process makes its writes fail with EFBIG, as a full disk would."""
    path = tmp_path / "state.json"
    log = tmp_path / "server.log"
    server = start_with_log(log, path=path)
    try:
        state = server.state
        state.set("small", 1)
        server.save()
        good = path.read_bytes()
        state.set("big", "x" * 200_000)
        process = psutil.Process(server.pid)
        limits = process.rlimit(psutil.RLIMIT_FSIZE)
        process.rlimit(psutil.RLIMIT_FSIZE, (100_000, limits[1]))
        with pytest.raises(OSError):
            state.save()
        assert path.read_bytes() == good
        stats = state.stats()
        assert "File too large" in stats["last_save_error"] and str(path) in stats["last_save_error"]
        assert "ERROR: save of 2 names to" in log_with(log, "ERROR: save of 2 names to")
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        state.incr("small")  # still serving
        assert state.get("small") == 2
        process.rlimit(psutil.RLIMIT_FSIZE, limits)
        server.save()
        assert state.stats()["last_save_error"] is None
        assert json.loads(path.read_text())["names"]["small"] == 2
    finally:
        server.shutdown()


def test_stats_report_the_last_save(tmp_path):
    with sharedstate.StateServer(path=tmp_path / "s.json") as server:
        assert server.state.stats()["last_save_at"] is None
        server.state.set("a", 1)
        server.save()
        stats = server.state.stats()
        assert stats["last_save_at"] > 0 and stats["last_save_s"] >= 0 and stats["last_save_error"] is None


def test_save_every_writes_on_schedule_without_shutdown(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, save_every=1) as server:
        server.state.set("tick", 1)
        wait_until(lambda: path.exists() and "tick" in path.read_text(), 5, what="a scheduled save")
        server.state.set("tick", 2)
        wait_until(lambda: json.loads(path.read_text())["names"]["tick"] == 2, 5, what="the next scheduled save")
