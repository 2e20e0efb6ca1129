"""The calls of State behave as API.md section 3 says (Pode's Set/Get/Remove/Test/Names-PodeState)."""

from __future__ import annotations

import decimal

import pytest

import sharedstate


@pytest.fixture
def state(any_state):
    """Every test here that takes ``state`` runs once per backend: the local server, then Redis."""
    return any_state


def test_get_of_a_missing_name_gives_none_or_the_default(state):
    assert state.get("missing") is None
    assert state.get("missing", 42) == 42
    assert state.get("missing", default=[1]) == [1]


def test_set_returns_the_value_and_replaces_it(state):
    assert state.set("a", {"x": 1}) == {"x": 1}
    assert state.set("a", "second") == "second"
    assert state.get("a") == "second"


def test_remove_returns_the_old_value_or_none(state):
    state.set("a", 5)
    assert state.remove("a") == 5
    assert state.remove("a") is None
    assert "a" not in state


def test_contains_and_in(state):
    state.set("here", None)
    assert state.contains("here") and "here" in state
    assert not state.contains("absent") and "absent" not in state


def test_names_are_sorted_and_filtered_by_regex_search(state):
    for name in ("beta", "alpha", "alphabet", "gamma"):
        state.set(name, 1)
    assert state.names() == ["alpha", "alphabet", "beta", "gamma"]
    assert state.names("^alpha") == ["alpha", "alphabet"]
    assert state.names("ph") == ["alpha", "alphabet"]  # search, not match
    assert state.names("a$") == ["alpha", "beta", "gamma"]


def test_names_filtered_by_scope(state):
    state.set("a", 1, scope="web")
    state.set("b", 2, scope=["web", "admin"])
    state.set("c", 3, scope=["admin"])
    state.set("d", 4)
    assert state.names(scope="web") == ["a", "b"]
    assert state.names(scope=["admin"]) == ["b", "c"]
    assert state.names(scope=["web", "admin"]) == ["a", "b", "c"]
    assert state.names("^[bc]$", scope="web") == ["b"]
    assert state.names(scope=[]) == ["a", "b", "c", "d"]  # an empty list is no filter (Pode's rule)
    state.set("a", 1)  # set replaces the scope too
    assert state.names(scope="web") == ["b"]


def test_an_invalid_pattern_is_a_value_error(state):
    with pytest.raises(ValueError, match="invalid pattern"):
        state.names("(unclosed")
    with pytest.raises(TypeError):
        state.names(5)


def test_clear_removes_everything(state):
    state.update({"a": 1, "b": 2})
    state.clear()
    assert len(state) == 0 and state.names() == []


def test_incr_counts_from_zero_and_returns_the_new_value(state):
    assert state.incr("n") == 1
    assert state.incr("n", 5) == 6
    assert state.incr("n", -10) == -4
    assert state.incr("f", 0.5) == 0.5
    assert state.incr("d", decimal.Decimal("1.10")) == decimal.Decimal("1.10")
    assert type(state.get("d")) is decimal.Decimal


@pytest.mark.parametrize("stored", ["text", [1], None, True])
def test_incr_of_a_non_number_is_a_type_error_and_changes_nothing(state, stored):
    state.set("x", stored)
    with pytest.raises(TypeError, match="'x'"):
        state.incr("x")
    assert state.get("x") == stored and type(state.get("x")) is type(stored)


@pytest.mark.parametrize("by", ["1", None, True, [1]])
def test_incr_by_a_non_number_is_a_type_error(state, by):
    state.set("x", 1)
    with pytest.raises(TypeError):
        state.incr("x", by)
    assert state.get("x") == 1


def test_incr_of_decimal_by_float_is_refused_and_changes_nothing(state):
    state.set("d", decimal.Decimal("1"))
    with pytest.raises(TypeError, match="cannot add float to Decimal"):
        state.incr("d", 0.5)
    assert state.get("d") == decimal.Decimal("1")


def test_setdefault_keeps_an_existing_value(state):
    assert state.setdefault("a", [1]) == [1]
    assert state.setdefault("a", [2]) == [1]
    state.set("none", None)
    assert state.setdefault("none", 5) is None


def test_compare_and_set(state):
    state.set("v", 1)
    assert state.compare_and_set("v", 2, 3) is False
    assert state.get("v") == 1
    assert state.compare_and_set("v", 1, 3) is True
    assert state.get("v") == 3
    assert state.compare_and_set("new", 0, 1) is False
    assert "new" not in state
    assert state.compare_and_set("new", None, 1) is True
    assert state.get("new") == 1


def test_atomic_calls_keep_the_scope(state):
    state.set("n", 1, scope="s")
    state.incr("n")
    state.compare_and_set("n", 2, 3)
    state.set("l", [], scope="s")
    state.append("l", 1)
    assert state.names(scope="s") == ["l", "n"]


def test_append_to_a_list(state):
    assert state.append("l", 1) == 1
    assert state.append("l", {"a": 2}) == 2
    assert state.get("l") == [1, {"a": 2}]
    state.set("t", "text")
    with pytest.raises(TypeError, match="not a list"):
        state.append("t", 1)
    assert state.get("t") == "text"
    state.set("tuple", (1,))
    with pytest.raises(TypeError):
        state.append("tuple", 2)


def test_update_sets_many_names_and_clears_their_scopes(state):
    state.set("a", 0, scope="s")
    state.update({"a": 1, "b": 2})
    assert state.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
    assert state.names(scope="s") == []
    state.update({})


def test_update_takes_what_dict_update_takes_and_refuses_anything_else_whole(state):
    state.update([("a", 1)], b=2)
    assert state.snapshot() == {"a": 1, "b": 2}
    for bad in (5, ["ab", "c"], [("x", 1), ("y",)], "xy"):
        with pytest.raises(TypeError, match="mapping or an iterable"):
            state.update(bad)
    with pytest.raises(TypeError):
        state.update({"c": 1}, d=object())
    assert state.snapshot() == {"a": 1, "b": 2}


def test_get_many_returns_only_existing_names(state):
    state.update({"a": 1, "b": None})
    assert state.get_many(["a", "b", "z"]) == {"a": 1, "b": None}
    assert state.get_many([]) == {}
    with pytest.raises(TypeError):
        state.get_many("ab")  # a lone str is not a list of names


def test_snapshot_is_a_copy(state):
    state.update({"a": [1], "b": 2})
    snap = state.snapshot()
    assert snap == {"a": [1], "b": 2}
    snap["a"].append(2)
    assert state.get("a") == [1]


def test_values_are_copies_not_references(state):
    state.set("l", [1])
    got = state.get("l")
    got.append(2)
    assert state.get("l") == [1]


def test_mapping_sugar(state):
    state["a"] = 1
    assert state["a"] == 1
    with pytest.raises(KeyError):
        state["missing"]
    del state["a"]
    with pytest.raises(KeyError):
        del state["a"]
    state.update({"x": 1, "y": 2})
    assert len(state) == 2
    assert list(state) == ["x", "y"]
    assert bool(state)
    state.clear()
    assert not state  # a mapping: empty is false


def test_names_are_case_sensitive(state):
    state.set("Key", 1)
    state.set("key", 2)
    assert state.get("Key") == 1 and state.get("key") == 2


def test_stats_reports_the_server(server):
    state = server.state  # the local server's figures (Redis': test_redis.py)
    state.update({"a": 1, "b": 2})
    stats = state.stats()
    for key in (
        "names",
        "pid",
        "rss_bytes",
        "uptime_s",
        "ops",
        "clients",
        "last_save_at",
        "last_save_s",
        "last_save_error",
        "lock_recoveries",
    ):
        assert key in stats
    assert stats["names"] == 2
    assert stats["pid"] == server.pid
    assert stats["rss_bytes"] > 1_000_000
    assert stats["clients"] >= 1
    assert stats["lock_recoveries"] == 0
    assert stats["last_save_at"] is None
    ops = stats["ops"]
    state.get("a")
    assert state.stats()["ops"] == ops + 2  # the get and the stats call


def test_every_public_call_is_documented():
    for obj in (sharedstate.State, sharedstate.Lock, sharedstate.StateServer):
        for name in dir(obj):
            if name.startswith("_"):
                continue
            assert getattr(obj, name).__doc__, f"{obj.__name__}.{name} has no docstring"
    for name in sharedstate.__all__:
        if name != "__version__":
            assert getattr(sharedstate, name).__doc__, name
