"""Every storable type comes back equal and of the same type; anything else is refused at the call, on
every backend and both faces."""

from __future__ import annotations

import datetime
import enum
from collections import OrderedDict

import pytest

from contract.storable import VALUES, same


@pytest.mark.parametrize("name", VALUES)
def test_every_storable_type_comes_back_equal_and_of_the_same_type(state, name):
    value = VALUES[name]
    assert state.set(name, value) is value
    got = state.get(name)
    assert same(got, value), (got, value)
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        assert got.tzinfo == value.tzinfo


def test_all_types_at_once_through_update_and_snapshot(state):
    state.update(VALUES)
    snap = state.snapshot()
    assert all(same(snap[k], v) for k, v in VALUES.items())


class Color(enum.IntEnum):
    RED = 1


class Unknown:
    pass


REFUSED = [
    ("object", object(), "'v': object is not a storable type"),
    ("deep object", {"users": [0, 1, object()]}, "'v'['users'][2]: object is not a storable type"),
    ("function", len, "builtin_function_or_method is not a storable type"),
    ("int subclass", Color.RED, "Color is not a storable type"),
    ("dict subclass", OrderedDict(a=1), "OrderedDict is not a storable type"),
    ("non-str key", {"ok": {3: "x"}}, "'v'['ok']: dict key 3 is int, but keys must be str"),
    ("class in tuple", (1, Unknown), "'v'[1]: type is not a storable type"),
    ("object in set", {1, Unknown()}, "Unknown is not a storable type"),
    (
        "foreign tzinfo",
        datetime.datetime(2020, 1, 1, tzinfo=type("TZ", (datetime.tzinfo,), {})()),
        "tzinfo TZ is not storable",
    ),
    ("complex", 1j, "complex is not a storable type"),
]


@pytest.mark.parametrize("label,value,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_values_are_refused_with_the_path_and_nothing_changes(state, face, label, value, message):
    state.set("v", "before")
    calls = [
        lambda: state.set("v", value),
        lambda: state.setdefault("v", value),
        lambda: state.append("v", value),
        lambda: state.compare_and_set("v", "before", value),
        lambda: state.update({"v": value}),
    ]
    for call in calls:
        with pytest.raises(TypeError) as info:
            call()
        assert message in str(info.value) if call is calls[0] else "'v'" in str(info.value)
    state.set("v2", 1)
    if face == "sync":  # item assignment is the sync face's (AsyncState has no mapping protocol)
        with pytest.raises(TypeError):
            state["v2"] = value
    assert state.snapshot() == {"v": "before", "v2": 1}


def test_update_is_all_or_nothing(state):
    state.set("a", 1)
    with pytest.raises(TypeError, match="'c'"):
        state.update({"a": 2, "b": 3, "c": object()})
    with pytest.raises(TypeError, match="must be a str"):
        state.update({"a": 2, 5: 3})
    assert state.snapshot() == {"a": 1}


@pytest.mark.parametrize("name", [1, None, b"bytes", ("t",), 1.5])
def test_a_name_that_is_not_a_str_is_refused(state, face, name):
    calls = [
        lambda: state.set(name, 1),
        lambda: state.get(name),
        lambda: state.remove(name),
        lambda: state.contains(name),
        lambda: state.incr(name),
        lambda: state.append(name, 1),
        lambda: state.setdefault(name, 1),
        lambda: state.compare_and_set(name, None, 1),
        lambda: state.get_many([name]),
        lambda: state.named_lock(name),
    ]
    if face == "sync":  # item access is the sync face's (AsyncState has no mapping protocol)
        calls.append(lambda: state[name])
    for call in calls:
        with pytest.raises(TypeError, match="name must be a str"):
            call()
    assert state.snapshot() == {}


def test_a_str_subclass_name_is_stored_as_plain_text(state):
    class Name(str):
        pass

    state.set(Name("n"), 1)
    assert state.names() == ["n"] and type(state.names()[0]) is str


def test_a_value_that_contains_itself_is_refused(state):
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="nested deeper"):
        state.set("loop", loop)
    assert not state.contains("loop")


@pytest.mark.parametrize("scope", [5, [1], b"web", {"a": object()}])
def test_a_bad_scope_is_refused(state, scope):
    with pytest.raises(TypeError, match="scope"):
        state.set("a", 1, scope=scope)
    assert not state.contains("a")
