"""A State is a ``collections.abc.MutableMapping`` on every backend: code written for a
``multiprocessing.Manager().dict()`` runs on it unchanged.

Sync face only: ``AsyncState`` has no mapping protocol (its calls are coroutines); its ``keys``,
``values``, ``items``, ``pop``, ``popitem`` and ``length`` are tested in tests/test_aio_handle.py.
"""

from __future__ import annotations

import collections.abc

import pytest


def test_mapping_sugar(sync_state):
    state = sync_state
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


def test_in(sync_state):
    sync_state.set("here", None)
    assert "here" in sync_state
    assert "absent" not in sync_state
    sync_state.remove("here")
    assert "here" not in sync_state


def test_a_state_is_a_mutable_mapping(sync_state):
    assert isinstance(sync_state, collections.abc.MutableMapping)


def test_keys_values_and_items(sync_state):
    state = sync_state
    assert set(state.keys()) == set() and list(state.items()) == [] and list(state.values()) == []
    state.update({"b": 2, "a": [1], "c": None})
    assert set(state.keys()) == {"a", "b", "c"}
    assert "a" in state.keys() and "z" not in state.keys()
    assert sorted(state.items()) == [("a", [1]), ("b", 2), ("c", None)]
    assert sorted(state.values(), key=repr) == sorted([[1], 2, None], key=repr)
    assert len(state.keys()) == len(state.items()) == len(state.values()) == 3
    assert dict(state) == {"a": [1], "b": 2, "c": None}


def test_pop(sync_state):
    state = sync_state
    state.set("a", [1])
    assert state.pop("a") == [1]
    assert not state.contains("a")
    with pytest.raises(KeyError):
        state.pop("a")
    assert state.pop("a", "default") == "default"
    state.set("none", None)
    assert state.pop("none", "default") is None
    assert state.snapshot() == {}


def test_popitem(sync_state):
    state = sync_state
    state.update({"a": 1, "b": 2})
    first = state.popitem()
    second = state.popitem()
    assert sorted([first, second]) == [("a", 1), ("b", 2)]
    assert state.snapshot() == {}
    with pytest.raises(KeyError):
        state.popitem()


def test_update_takes_a_mapping_pairs_and_keywords(sync_state):
    state = sync_state
    state.update({"a": 1}, b=2)
    state.update(c=3)
    state.update([("d", 4), ("a", 10)])
    state.update((pair for pair in [("e", 5)]), f=6)
    assert state.snapshot() == {"a": 10, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}


@pytest.mark.parametrize(
    "args,kwargs",
    [
        (({"a": 2, "bad": object()},), {}),
        (({"a": 2},), {"bad": object()}),
        ((), {"a": 2, "bad": object()}),
        (([("a", 2), ("bad", object())],), {}),
        (([("a", 2), ("bad", 1, 2)],), {}),
        (([("a", 2), 5],), {}),
        (({"a": 2, 5: 1},), {}),
    ],
    ids=["mapping", "keyword", "keywords", "pairs", "not-a-pair", "not-a-sequence", "not-a-str-name"],
)
def test_update_is_all_or_nothing_in_every_form(sync_state, args, kwargs):
    sync_state.set("a", 1)
    with pytest.raises((TypeError, ValueError)):
        sync_state.update(*args, **kwargs)
    assert sync_state.snapshot() == {"a": 1}


def test_equality_compares_the_contents(sync_state):
    state = sync_state
    assert state == {}
    state.update({"a": 1, "b": [2]})
    assert state == {"a": 1, "b": [2]}
    assert not (state != {"a": 1, "b": [2]})
    assert state != {"a": 1}
    assert state != {"a": 1, "b": [3]}
    assert not (state == {"a": 1, "b": [2], "c": 3})


def manager_dict_code(d) -> list:
    """Code written for a ``Manager().dict()``: it uses only what a DictProxy offers."""
    seen: list = []
    d["a"] = 1
    d["b"] = d.get("b", 0) + 2
    d.setdefault("c", [])
    seen.append(d.setdefault("a", 99))
    d.update({"x": 1, "y": 2})
    seen.append("a" in d)
    seen.append("zz" in d)
    seen.append(len(d))
    seen.append(sorted(k for k in d))
    seen.append(sorted(d.items()))
    seen.append(d.pop("x"))
    seen.append(d.pop("missing", "default"))
    del d["y"]
    try:
        d["y"]
    except KeyError:
        seen.append("KeyError")
    seen.append(d.get("y", "gone"))
    seen.append(sorted(d.keys()))
    seen.append(sorted(d.values(), key=repr))
    return seen


def test_code_written_for_a_manager_dict_runs_unchanged(sync_state, child_context):
    with child_context.Manager() as manager:
        proxy = manager.dict()
        expected = manager_dict_code(proxy)
        final = dict(proxy.items())
    assert manager_dict_code(sync_state) == expected
    assert sync_state.snapshot() == final


def test_a_handle_is_weakly_referable_and_unhashable_as_a_mapping_is(sync_state):
    import weakref

    assert weakref.ref(sync_state)() is sync_state
    with pytest.raises(TypeError, match="unhashable"):
        hash(sync_state)


def test_update_from_another_handle_reads_it_in_one_call(sync_state, sync_target):
    source = sync_target.connect()
    source.update({f"n{i}": i for i in range(50)})
    first = sync_state.stats()["ops"]
    before = sync_state.stats()["ops"]  # what a stats() call itself counts: before - first
    sync_state.update(source)  # dict(source) would read it name by name: 52 calls, and not atomic
    after = sync_state.stats()["ops"]
    assert sync_state.snapshot() == {f"n{i}": i for i in range(50)}
    if sync_target.local:
        assert after - before - (before - first) == 2  # the source's snapshot, then the update
    source.close()
