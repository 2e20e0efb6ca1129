"""Snapshots on every backend and both faces: save filters, a private JSON file kept with a backup,
restore (replace or merge, Pode's files too), and bad files that change nothing. (A server's own file,
its schedule and its start-up: tests/test_snapshot.py.)"""

from __future__ import annotations

import datetime
import json
import os
import stat
from pathlib import Path

import pytest

import sharedstate
from contract.storable import assert_holds, fill_every_type


@pytest.fixture
def state_with_scopes(state):
    state.set("a", 1, scope="web")
    state.set("b", 2, scope=["web", "admin"])
    state.set("c", 3, scope="admin")
    state.set("d", 4)
    return state


def saved_names(path: Path) -> list[str]:
    return sorted(json.loads(path.read_text())["names"])


def test_save_filters_in_podes_order(state_with_scopes, tmp_path):
    state = state_with_scopes
    out = tmp_path / "out.json"
    assert state.save(out) == out
    assert saved_names(out) == ["a", "b", "c", "d"]
    state.save(out, include=["a", "d", "zzz"])
    assert saved_names(out) == ["a", "d"]
    state.save(out, exclude=["a", "zzz"])
    assert saved_names(out) == ["b", "c", "d"]
    state.save(out, include=["a", "b"], exclude=["b"])  # exclude wins over include
    assert saved_names(out) == ["a"]
    state.save(out, scope="admin")
    assert saved_names(out) == ["b", "c"]
    state.save(out, scope=["admin"], include=["b", "d"])  # then include narrows the scoped names
    assert saved_names(out) == ["b"]
    state.save(out, scope="web", exclude=["a"])
    assert saved_names(out) == ["b"]
    state.save(out, include=[])  # an empty list is no filter (Pode's rule)
    assert saved_names(out) == ["a", "b", "c", "d"]


def test_a_relative_path_is_the_callers(state_with_scopes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = state_with_scopes.save("rel.json")
    assert written == tmp_path / "rel.json" and written.exists()


def test_restore_replaces_or_merges(state_with_scopes, tmp_path):
    state = state_with_scopes
    out = tmp_path / "out.json"
    state.save(out, scope="web")  # a and b
    state.set("a", "changed", scope="other")
    state.set("e", 5)
    assert state.restore(out, merge=True) == 2
    assert state.snapshot() == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    assert state.names(scope="web") == ["a", "b"]
    assert state.restore(out) == 2
    assert state.snapshot() == {"a": 1, "b": 2}
    assert state.names(scope="admin") == ["b"]


def test_a_valid_snapshot_with_no_names_empties_the_state(state, tmp_path):
    out = tmp_path / "empty.json"
    state.save(out)
    state.set("x", 1)
    assert state.restore(out) == 0
    assert state.snapshot() == {}


@pytest.mark.parametrize("content", [None, b"", b"  \n\t  ", "\ufeff".encode()])
def test_a_missing_or_empty_file_restores_nothing_and_changes_nothing(state, tmp_path, content):
    path = tmp_path / "blank.json"
    if content is not None:
        path.write_bytes(content)
    state.set("keep", 1)
    assert state.restore(path) == 0
    assert state.snapshot() == {"keep": 1}


CORRUPT = {
    "truncated": b'{"format": "sharedstate", "version": 1, "names": {"a": 1',
    "not json": b"hello",
    "array": b"[1, 2]",
    "bad tag": b'{"format": "sharedstate", "version": 1, "scopes": {}, "names": {"a": {"$type": "nope", "value": 1}}}',
    "bad tag, no scopes": b'{"format": "sharedstate", "version": 1, "names": {"x": {"$type": "nope", "value": 1}}}',
    "bad bytes": b'{"format": "sharedstate", "version": 1, "scopes": {}, '
    b'"names": {"a": {"$type": "bytes", "value": "@@"}}}',
    "future version": b'{"format": "sharedstate", "version": 99, "scopes": {}, "names": {}}',
    "names not an object": b'{"format": "sharedstate", "version": 1, "scopes": {}, "names": [1]}',
    "not utf-8": b'{"a": "\xff\xfe\xfa"}',
    "pode v3": b'{"__pode_state_metadata__": {"Version": 3}, "__pode_state_data__": {}}',
}


@pytest.mark.parametrize("label", CORRUPT)
def test_a_corrupt_file_raises_snapshot_error_and_changes_nothing(state, tmp_path, label):
    path = tmp_path / "corrupt.json"
    path.write_bytes(CORRUPT[label])
    state.set("keep", [1])
    with pytest.raises(sharedstate.SnapshotError) as info:
        state.restore(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)
    assert path.read_bytes() == CORRUPT[label]
    assert state.snapshot() == {"keep": [1]}


def test_save_and_restore_need_a_path(state, tmp_path):
    """The state has no file of its own (the local server was started with no path; Redis has none)."""
    state.set("keep", 1)
    with pytest.raises(ValueError, match="needs a path"):
        state.save()
    with pytest.raises(ValueError, match="needs a path"):
        state.restore()
    with pytest.raises(TypeError):
        state.save(5)
    with pytest.raises(TypeError):
        state.save(tmp_path / "s.json", include="abc")
    with pytest.raises((TypeError, ValueError)):  # two mistakes: either may be reported first
        state.save(include="abc")
    with pytest.raises(TypeError):
        state.restore(tmp_path / "s.json", merge="yes")
    assert state.snapshot() == {"keep": 1}
    assert not (tmp_path / "s.json").exists()


def test_every_type_and_scope_survive_a_save_and_a_restore(state, tmp_path):
    expected = fill_every_type(state)
    path = state.save(tmp_path / "all.json")
    state.clear()
    assert state.restore(path) == len(expected)
    assert_holds(state, expected)


def test_the_saved_file_is_private_json_and_the_previous_one_is_kept_as_bak(state, tmp_path):
    state.set("greeting", "héllo", scope="web")
    path = tmp_path / "f.json"
    assert state.save(path) == path
    first = path.read_bytes()
    doc = json.loads(first.decode("utf-8"))
    assert doc["format"] == "sharedstate" and doc["names"] == {"greeting": "héllo"}
    assert doc["scopes"] == {"greeting": ["web"]}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    state.set("n", 1)
    state.save(path)
    bak = Path(str(path) + ".bak")
    assert bak.read_bytes() == first and stat.S_IMODE(os.stat(bak).st_mode) == 0o600
    assert json.loads(path.read_text())["names"] == {"greeting": "héllo", "n": 1}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_backup_restores_like_any_snapshot(state, tmp_path):
    state.set("a", 1, scope="web")
    state.set("b", 2, scope="web")
    state.set("c", 3)
    path = state.save(tmp_path / "f.json", scope="web", exclude=["b"])
    state.save(tmp_path / "f.json", include=["c", "zz"])  # the previous file becomes the .bak
    state.clear()
    state.set("x", 9)
    assert state.restore(tmp_path / "f.json.bak", merge=True) == 1
    assert state.snapshot() == {"a": 1, "x": 9} and state.names(scope="web") == ["a"]
    assert state.restore(path) == 1
    assert state.snapshot() == {"c": 3} and state.names(scope="web") == []


def test_a_pode_state_file_restores(state, tmp_path):
    state.set("keep", 1)
    pode = tmp_path / "pode.json"
    pode.write_text(json.dumps({"when": {"Value": "/Date(0)/", "Scope": ["s"]}}))
    assert state.restore(pode, merge=True) == 1
    assert state.get("when") == datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    assert state.names(scope="s") == ["when"] and state.get("keep") == 1
