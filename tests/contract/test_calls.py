"""The calls of State (Pode's Set/Get/Remove/Test/Names-PodeState) behave as docs/reference.md says, on
every backend and both faces."""

from __future__ import annotations

import decimal
import threading

import pytest
import workers
from conftest import run_to_completion

from contract.storable import same


def test_get_of_a_missing_name_gives_none_or_the_default(state):
    assert state.get("missing") is None
    assert state.get("missing", 42) == 42
    assert state.get("missing", default=[1]) == [1]


def test_set_returns_the_value_and_replaces_it(state):
    assert state.set("a", {"x": 1}) == {"x": 1}
    assert state.set("a", "second") == "second"
    assert state.get("a") == "second"
    assert state.set("b", b"x", scope="s") == b"x"


def test_remove_returns_the_old_value_or_none(state):
    state.set("a", 5)
    assert state.remove("a") == 5
    assert state.remove("a") is None
    assert not state.contains("a")


def test_contains(state):
    state.set("here", None)
    assert state.contains("here")
    assert not state.contains("absent")


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
    assert state.names() == [] and state.snapshot() == {}


def test_incr_counts_from_zero_and_returns_the_new_value(state):
    assert state.incr("n") == 1
    assert state.incr("n", 5) == 6
    assert state.incr("n", -10) == -4
    assert state.incr("f", 0.5) == 0.5
    assert state.incr("d", decimal.Decimal("1.10")) == decimal.Decimal("1.10")
    assert type(state.get("d")) is decimal.Decimal


def test_incr_keeps_python_number_semantics(state):
    total = 0.0
    for _ in range(10):
        total += 0.1
        assert state.incr("f", 0.1) == total  # the same float as Python's own sum, bit for bit
    assert type(state.get("f")) is float
    big = 2**53 - 1
    assert state.incr("big", big) == big
    assert state.incr("big", 2) == 2**53 + 1  # past exact doubles
    assert state.incr("big", 2**200) == 2**53 + 1 + 2**200
    assert state.incr("i", 3) == 3 and type(state.get("i")) is int
    assert state.incr("i", 0.5) == 3.5 and type(state.get("i")) is float
    assert state.incr("whole", 2.0) == 2.0 and type(state.get("whole")) is float
    assert state.incr("neg", -(10**14)) == -(10**14)
    state.set("huge", 1e308)
    assert state.incr("huge", 1e308) == float("inf")
    with decimal.localcontext(decimal.Context(prec=3)):  # the caller's context does not matter
        assert state.incr("d", decimal.Decimal("1.23456789")) == decimal.Decimal("1.23456789")
        assert state.incr("d", 1) == decimal.Decimal("2.23456789")
    state.set("flag", False)
    with pytest.raises(TypeError, match="holds bool"):
        state.incr("flag")
    state.set("tagged", {"$type": "x"})
    with pytest.raises(TypeError, match="holds dict"):
        state.incr("tagged")
    assert state.get("flag") is False and state.get("tagged") == {"$type": "x"}


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


def test_concurrent_incrs_of_decimals_and_big_integers_lose_nothing(state):
    """Values the Redis backend finishes in Python (an optimistic compare-and-swap): exact under contention."""

    def work():
        for _ in range(100):
            state.incr("d", decimal.Decimal("0.01"))
            state.incr("big", 2**64)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert state.get("d") == decimal.Decimal("4.00") and state.get("big") == 400 * 2**64


def test_incr_from_four_processes_loses_nothing(state, target, child_context):
    procs = [child_context.Process(target=workers.incr_many, args=(target.connect(), "hits", 500)) for _ in range(4)]
    run_to_completion(procs, 120)
    assert state.get("hits") == 2000


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
    assert not state.contains("new")
    assert state.compare_and_set("new", None, 1) is True
    assert state.get("new") == 1
    state.set("l", [1, 2])
    assert state.compare_and_set("l", [1, 2], (3,)) is True and state.get("l") == (3,)


def test_compare_and_set_uses_python_equality(state):
    state.set("n", 1)
    assert state.compare_and_set("n", 1.0, "one-float")  # 1 == 1.0
    state.set("n", True)
    assert state.compare_and_set("n", 1, "true-is-one")
    state.set("s", {1.0, 2})
    assert state.compare_and_set("s", frozenset({1, 2}), "set")  # {1.0, 2} == frozenset({1, 2})
    state.set("z", -0.0)
    assert state.compare_and_set("z", 0, "zero")
    state.set("b", bytearray(b"x"))
    assert state.compare_and_set("b", b"x", "bytes")
    state.set("t", (1, 2))
    assert not state.compare_and_set("t", [1, 2], "no")  # a tuple is not a list
    state.set("nan", [float("nan")])
    assert not state.compare_and_set("nan", [float("nan")], "no")  # NaN equals nothing
    assert state.get_many(["n", "s", "z", "b", "t"]) == {"n": "true-is-one", "s": "set", "z": "zero", "b": "bytes",
                                                          "t": (1, 2)}  # fmt: skip


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


def test_append_keeps_exact_items(state):
    state.set("l", [2**70, 1.5, "x"])
    assert state.append("l", {"$type": "not a tag"}) == 4
    assert state.append("l", decimal.Decimal("0.1")) == 5
    assert same(state.get("l"), [2**70, 1.5, "x", {"$type": "not a tag"}, decimal.Decimal("0.1")])
    state.set("empty", [])
    assert state.append("empty", None) == 1 and state.get("empty") == [None]


def test_update_sets_many_names_and_clears_their_scopes(state):
    state.set("a", 0, scope="s")
    state.update({"a": 1, "b": 2})
    assert state.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
    assert state.names(scope="s") == []
    state.update({})
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


def test_names_are_case_sensitive(state):
    state.set("Key", 1)
    state.set("key", 2)
    assert state.get("Key") == 1 and state.get("key") == 2


#: What ``stats()`` reports on every backend.
COMMON_STATS = ("names", "pid", "rss_bytes", "uptime_s", "ops", "clients", "last_save_at", "last_save_s",
                "last_save_error", "lock_recoveries")  # fmt: skip


def test_stats_reports_the_server(new_local_server, state, target):
    state.update({"a": 1, "b": 2})
    stats = state.stats()
    for key in COMMON_STATS:
        assert key in stats
    assert stats["names"] == 2
    assert stats["pid"] == target.server_pid
    assert stats["rss_bytes"] > 1_000_000 and stats["clients"] >= 1 and stats["ops"] > 0
    assert stats["lock_recoveries"] == 0 and stats["last_save_at"] is None
    if target.local:  # the server's own figures
        assert stats["address"] == target.address and stats["path"] is None
    else:  # Redis and Valkey: the namespace's, and the server's persistence settings
        assert stats["backend"] == "redis" and stats["namespace"] == target.namespace
        assert stats["redis_aof_enabled"] is False


def test_get_refuses_a_name_that_cannot_be_stored_as_every_call_does(state):
    for call in (lambda: state.get("\ud800"), lambda: state.get("\ud800", 1), lambda: state.contains("\ud800")):
        with pytest.raises(ValueError, match="cannot be stored"):
            call()


def test_setdefault_answers_a_copy_of_the_value_it_stored(state):
    default = {"k": [1]}
    got = state.setdefault("sd", default)
    assert got == default and got is not default
    got["k"].append(2)
    assert state.get("sd") == {"k": [1]}
