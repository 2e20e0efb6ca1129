"""No read is ever stale, on every backend and both faces: what another handle or another process
changes is seen at the next read, and a value returned or given to ``set`` is a copy. (The local
server's client cache itself — round trips saved, its shared-memory version table, its bounds — is
tested in tests/test_cache.py.)"""

from __future__ import annotations

import datetime

import pytest
from conftest import run_to_completion

from sharedstate._sentinels import NOT_CACHED


def handle(state, face: str):
    """The sync ``State`` behind ``state`` (the ``AsyncState``'s own, on the aio face)."""
    return state if face == "sync" else state.sync


@pytest.mark.parametrize(
    "value",
    [
        [1, [2, 3]],
        {"a": {"b": [1]}},
        {1, 2},
        bytearray(b"abc"),
        [datetime.date(2026, 1, 1), {"k": bytearray(b"x")}],
    ],
    ids=["list", "dict", "set", "bytearray", "nested"],
)
def test_mutating_a_returned_value_never_changes_the_next_get(state, target, face, value):
    state.set("v", value)
    original = state.get("v")  # fills the cache
    first = state.get("v")  # a hit, where handles cache
    if target.caches:
        assert handle(state, face).backend.peek("v") is not NOT_CACHED, "the value was not cached"
    if isinstance(first, list):
        first.append("changed")
        if isinstance(first[0], list):
            first[0].append("changed")
    elif isinstance(first, dict):
        first.clear()
    elif isinstance(first, set):
        first.add(99)
    else:
        first[0:1] = b"Z"
    second = state.get("v")
    assert second == value == original
    assert second is not first
    assert state.get_many(["v"]) == {"v": value}


def test_every_kind_of_change_from_another_handle_is_seen(state, peer):
    other = peer

    def read_all() -> dict:
        return {n: state.get(n) for n in ("a", "b", "c", "l")}

    other.update({"a": 1, "b": 2, "c": 3, "l": [1]})
    assert read_all() == {"a": 1, "b": 2, "c": 3, "l": [1]}
    other.incr("a")
    other.append("l", 2)
    other.set("b", "two", scope="s")
    other.remove("c")
    assert read_all() == {"a": 2, "b": "two", "c": None, "l": [1, 2]}
    assert other.compare_and_set("a", 2, 20)
    other.setdefault("c", "new")
    assert read_all() == {"a": 20, "b": "two", "c": "new", "l": [1, 2]}
    del other["c"]
    assert read_all()["c"] is None
    other.clear()
    assert read_all() == {"a": None, "b": None, "c": None, "l": None}
    other.update({"a": 5})
    assert state.get_many(["a", "b"]) == {"a": 5}
    other["b"] = 6
    assert state.get_many(["a", "b"]) == {"a": 5, "b": 6}


def test_restore_from_another_handle_is_seen(state, peer, tmp_path):
    other = peer
    other.update({"a": 1, "b": 2})
    other.save(tmp_path / "one.json")
    other.update({"a": 10, "b": 20, "c": 30})
    assert (state.get("a"), state.get("b"), state.get("c")) == (10, 20, 30)
    other.restore(tmp_path / "one.json")  # replaces everything
    assert (state.get("a"), state.get("b"), state.get("c")) == (1, 2, None)
    other.set("a", 100)
    other.save(tmp_path / "two.json", include=["a"])
    other.set("a", 0)
    assert state.get("a") == 0
    other.restore(tmp_path / "two.json", merge=True)
    assert state.get("a") == 100


def test_contains_then_get_fetches_the_value(state, peer, face):
    peer.set("x", [1, 2])
    assert state.contains("x")  # known to exist, value not fetched
    assert state.get("x") == [1, 2]
    assert state.get_many(["x"]) == {"x": [1, 2]}
    if face == "sync":  # item access is the sync face's
        assert state["x"] == [1, 2]


def test_a_value_changed_after_set_is_not_changed_in_the_state(state):
    value = {"rows": [1, 2]}
    state.set("mine", value)
    value["rows"].append(3)  # changing the object after set changes neither the server nor a cache
    assert state.get("mine") == {"rows": [1, 2]}


def _set_in_a_child(target, name: str, value) -> None:
    target.connect().set(name, value)


def test_a_change_made_by_another_process_is_seen_by_the_next_read(state, target, child_context):
    state.set("x", "before")
    assert state.get("x") == "before"  # read (and, where handles cache, cached) here
    assert state.get("x") == "before"
    assert state.get_many(["x", "y"]) == {"x": "before"}
    child = child_context.Process(target=_set_in_a_child, args=(target, "x", "after"))
    run_to_completion([child], 60)
    assert state.get("x") == "after"
    assert state.get_many(["x", "y"]) == {"x": "after"}
    child = child_context.Process(target=_set_in_a_child, args=(target, "y", [1]))
    run_to_completion([child], 60)
    assert state.contains("y") and state.get("y") == [1]
