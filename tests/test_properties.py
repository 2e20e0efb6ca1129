"""Property-based tests (Hypothesis): every public call against a plain-dict model, valid and invalid
input alike, and call sequences run by several processes at once."""

from __future__ import annotations

import datetime
import decimal
import multiprocessing
import re
import uuid
import warnings

import pytest
import workers
from contract.storable import same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import sharedstate

PROFILE = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

names = st.text(max_size=8)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.binary(max_size=5).map(bytearray),
    st.datetimes(timezones=st.sampled_from([None, datetime.timezone.utc])),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.uuids(),
    st.decimals(allow_nan=False, allow_infinity=False),
)
hashables = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.binary(max_size=5))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
    ),
    max_leaves=10,
)


class Unstorable:
    pass


bad_leaves = st.sampled_from([Unstorable(), 1j, object(), len, range(3)])
bad_values = st.recursive(
    bad_leaves,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3),
        st.dictionaries(st.text(max_size=3), inner, min_size=1, max_size=3),
        st.tuples(st.integers(), inner),
    ),
    max_leaves=4,
) | st.dictionaries(st.integers(), scalars, min_size=1, max_size=2)
bad_names = st.one_of(st.integers(), st.none(), st.binary(max_size=3), st.tuples(st.text(max_size=2)))
scopes = st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(alphabet="abc", max_size=2), max_size=3))
patterns = st.text(alphabet="ab.*+?()[]^$|{}\\", max_size=6)
numbers = st.one_of(st.integers(-1000, 1000), st.floats(-1e6, 1e6, allow_nan=False))


def scope_set(scope) -> set[str]:
    if scope is None:
        return set()
    return {scope} if isinstance(scope, str) else set(scope)


class StateModel(RuleBasedStateMachine):
    """One process: every call, and every refusal, against a dict of values and a dict of scopes."""

    state: sharedstate.State

    def __init__(self) -> None:
        super().__init__()
        self.state.clear()
        self.model: dict = {}
        self.scopes: dict[str, set[str]] = {}

    @rule(name=names, value=values, scope=scopes)
    def set(self, name, value, scope):
        assert same(self.state.set(name, value, scope=scope), value)
        self.model[name] = value
        self.scopes[name] = scope_set(scope)

    @rule(name=names, default=values)
    def get(self, name, default):
        assert same(self.state.get(name, default), self.model.get(name, default))

    @rule(name=names)
    def remove(self, name):
        assert same(self.state.remove(name), self.model.pop(name, None))
        self.scopes.pop(name, None)

    @rule(name=names)
    def delitem(self, name):
        if name in self.model:
            del self.state[name]
            del self.model[name]
            self.scopes.pop(name, None)
        else:
            with pytest.raises(KeyError):
                del self.state[name]

    @rule(name=names)
    def contains_and_getitem(self, name):
        assert (name in self.state) == (name in self.model)
        if name in self.model:
            assert same(self.state[name], self.model[name])
        else:
            with pytest.raises(KeyError):
                self.state[name]

    @rule(name=names, by=numbers)
    def incr(self, name, by):
        current = self.model.get(name, 0)
        if type(current) in (int, float) or (type(current) is decimal.Decimal and type(by) is int):
            assert same(self.state.incr(name, by), current + by)
            self.model[name] = current + by
            self.scopes.setdefault(name, set())
        else:
            with pytest.raises(TypeError):
                self.state.incr(name, by)

    @rule(name=names, item=values)
    def append(self, name, item):
        current = self.model.get(name, [])
        if type(current) is list:
            assert self.state.append(name, item) == len(current) + 1
            self.model[name] = [*current, item]
            self.scopes.setdefault(name, set())
        else:
            with pytest.raises(TypeError):
                self.state.append(name, item)

    @rule(name=names, default=values)
    def setdefault(self, name, default):
        if name not in self.model:
            self.model[name] = default
            self.scopes[name] = set()
        assert same(self.state.setdefault(name, default), self.model[name])

    @rule(name=names, new=values, data=st.data())
    def compare_and_set(self, name, new, data):
        expected = data.draw(st.one_of(st.just(self.model.get(name)), values))
        current = self.model.get(name)
        match = expected is None if name not in self.model else current == expected
        assert self.state.compare_and_set(name, expected, new) is match
        if match:
            self.model[name] = new
            self.scopes.setdefault(name, set())

    @rule(mapping=st.dictionaries(names, values, max_size=4))
    def update(self, mapping):
        self.state.update(mapping)
        self.model.update(mapping)
        for name in mapping:
            self.scopes[name] = set()

    @rule(good=st.dictionaries(names, values, max_size=3), bad_name=names, bad=bad_values)
    def update_with_a_bad_value_changes_nothing(self, good, bad_name, bad):
        with pytest.raises(TypeError):
            self.state.update({**good, bad_name: bad})

    @rule(name=names, bad=bad_values)
    def bad_values_are_refused(self, name, bad):
        for call in (
            lambda: self.state.set(name, bad),
            lambda: self.state.append(name, bad),
            lambda: self.state.setdefault(name, bad),
            lambda: self.state.compare_and_set(name, None, bad),
        ):
            with pytest.raises(TypeError):
                call()

    @rule(name=bad_names)
    def bad_names_are_refused(self, name):
        with pytest.raises(TypeError):
            self.state.set(name, 1)
        with pytest.raises(TypeError):
            self.state.get(name)

    @rule(names_=st.lists(names, max_size=4))
    def get_many(self, names_):
        got = self.state.get_many(names_)
        assert got.keys() == {n for n in names_ if n in self.model}
        assert all(same(got[n], self.model[n]) for n in got)

    @rule(pattern=st.one_of(st.none(), patterns), scope=scopes)
    def names(self, pattern, scope):
        # A valid pattern may still warn ("possible nested set" in "[["): not an error here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                compiled = None if pattern is None else re.compile(pattern)
            except re.error:
                with pytest.raises(ValueError):
                    self.state.names(pattern, scope=scope)
                return
            wanted = scope_set(scope)
            expected = sorted(
                n
                for n in self.model
                if (compiled is None or compiled.search(n)) and (not wanted or wanted & self.scopes.get(n, set()))
            )
            assert self.state.names(pattern, scope=scope) == expected

    @rule()
    def clear(self):
        self.state.clear()
        self.model.clear()
        self.scopes.clear()

    @invariant()
    def matches_the_model(self):
        snapshot = self.state.snapshot()
        assert snapshot.keys() == self.model.keys()
        assert all(same(snapshot[n], self.model[n]) for n in snapshot)
        assert len(self.state) == len(self.model)


@pytest.fixture
def state(any_state):
    """The model test runs once per backend: the local server, then Redis."""
    return any_state


def test_every_call_against_a_dict_model(state):
    StateModel.state = state
    run_state_machine_as_test(StateModel, settings=settings(PROFILE, max_examples=60, stateful_step_count=25))


# -- several processes at once ------------------------------------------------------------------------

own_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from("abc"), values),
        st.tuples(st.just("incr"), st.sampled_from("abc"), st.integers(-5, 5)),
        st.tuples(st.just("append"), st.sampled_from("abc"), scalars),
        st.tuples(st.just("remove"), st.sampled_from("abc")),
        st.tuples(st.just("setdefault"), st.sampled_from("abc"), scalars),
        st.tuples(st.just("shared_incr"), st.integers(1, 3)),
        st.tuples(st.just("locked_add"), st.integers(1, 3)),
    ),
    max_size=30,
)


def run_model(ops: list) -> tuple[dict, int, int]:
    """What one process' calls do to its own names, and what it adds to the shared counters."""
    model: dict = {}
    shared = locked = 0
    for op in ops:
        kind = op[0]
        if kind == "set":
            model[op[1]] = op[2]
        elif kind == "incr":
            if type(model.get(op[1], 0)) in (int, float) or type(model.get(op[1])) is decimal.Decimal:
                model[op[1]] = model.get(op[1], 0) + op[2]
        elif kind == "append":
            if type(model.get(op[1], [])) is list:
                model[op[1]] = [*model.get(op[1], []), op[2]]
        elif kind == "remove":
            model.pop(op[1], None)
        elif kind == "setdefault":
            model.setdefault(op[1], op[2])
        elif kind == "shared_incr":
            shared += op[1]
        elif kind == "locked_add":
            locked += op[1]
    return model, shared, locked


@pytest.fixture(scope="module")
def pool_server():
    with sharedstate.StateServer() as server:
        with multiprocessing.get_context("fork").Pool(3) as pool:
            yield server.state, pool


@given(plans=st.lists(own_ops, min_size=3, max_size=3))
@settings(PROFILE, max_examples=30)
def test_call_sequences_from_three_processes_at_once(pool_server, plans):
    state, pool = pool_server
    state.clear()
    results = pool.starmap(workers.run_plan, [(state, f"p{i}-", plan) for i, plan in enumerate(plans)], chunksize=1)
    assert all(r == "ok" for r in results), results
    snapshot = state.snapshot()
    expected_shared = expected_locked = 0
    for i, plan in enumerate(plans):
        model, shared, locked = run_model(plan)
        expected_shared += shared
        expected_locked += locked
        mine = {k[len(f"p{i}-") :]: v for k, v in snapshot.items() if k.startswith(f"p{i}-")}
        assert mine.keys() == model.keys()
        assert all(same(mine[k], model[k]) for k in model)
    assert snapshot.get("shared", 0) == expected_shared
    assert snapshot.get("locked", 0) == expected_locked
    assert not state.lock.locked()


def test_values_strategy_covers_every_type():
    """The model above is only as good as the values it draws: each storable type must be drawable."""
    seen: set[type] = set()

    @given(values)
    @settings(PROFILE, max_examples=400)
    def collect(value):
        stack = [value]
        while stack:
            item = stack.pop()
            seen.add(type(item))
            if isinstance(item, (list, tuple, set, frozenset)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())

    collect()
    wanted = {type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset}
    wanted |= {datetime.datetime, datetime.date, datetime.time, datetime.timedelta, uuid.UUID, decimal.Decimal}
    assert wanted <= seen, wanted - seen
