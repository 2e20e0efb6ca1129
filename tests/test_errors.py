"""The errors of the reference (docs/reference.md, Errors): their bases, their facts, and pickling."""

from __future__ import annotations

import pickle

import pytest

import sharedstate

CASES = [
    (sharedstate.ServerUnavailable("no server at /x.sock", "/x.sock"), ConnectionError, {"address": "/x.sock"}),
    (sharedstate.AccessDenied("key refused at /x.sock", "/x.sock"), PermissionError, {"address": "/x.sock"}),
    (sharedstate.LockTimeout("lock 'a' not acquired in 2 s", "a", 2.0), TimeoutError, {"name": "a", "timeout": 2.0}),
    (sharedstate.LockLost("lock 'a' was lost", "a"), RuntimeError, {"name": "a"}),
    (sharedstate.SnapshotError("bad file /s.json: not JSON", "/s.json"), ValueError, {"path": "/s.json"}),
    (sharedstate.StateFileBusy("/s.json is owned by pid 12", "/s.json", 12), Exception, {"path": "/s.json", "pid": 12}),
]


@pytest.mark.parametrize("error,base,facts", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_errors_subclass_the_nearest_builtin_and_pickle_with_their_facts(error, base, facts):
    assert isinstance(error, sharedstate.SharedStateError) and isinstance(error, base)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        for key, value in facts.items():
            assert getattr(copy, key) == value


def test_facts_default_to_none():
    error = sharedstate.ServerUnavailable("gone")
    assert error.address is None and str(error) == "gone"


def test_errors_raised_in_the_server_reach_the_caller(state):
    state.set("x", "text")
    with pytest.raises(TypeError, match="cannot incr 'x'"):
        state.incr("x")
    with pytest.raises(KeyError):
        state["nothing"]
