"""Expiry on every backend and both faces: ``set(ttl=)``, ``incr(ttl=)``, ``expire``, ``ttl``; an expired
name is gone for every call at once, and a handle that read it just before never serves it past its
deadline. (The local server's sweeper, its files and processes: tests/test_expiry.py.)"""

from __future__ import annotations

import json
import math
import time

import pytest
from conftest import wait_until

from sharedstate import SnapshotError
from sharedstate._sentinels import NOT_CACHED
from sharedstate.persistence.snapshot import write_snapshot

#: Short enough to keep the suite quick, long enough for the reads made before the deadline.
TTL = 0.4


def count(state, face: str) -> int:
    return len(state) if face == "sync" else state.length()


def past(deadline: float) -> None:
    """Wait until the clock is past ``deadline`` (the deadline is the server's, taken after the call: the
    margin covers the call's own time)."""
    wait_until(lambda: time.time() > deadline + 0.05, 5, interval=0.01, what="the deadline")


@pytest.mark.parametrize(
    ("ttl", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (True, TypeError),
        ([1], TypeError),
    ],
    ids=["zero", "negative", "nan", "inf", "str", "bool", "list"],
)
def test_a_bad_ttl_is_refused_and_changes_nothing(state, ttl, error):
    state.set("a", 1)
    with pytest.raises(error):
        state.set("a", 2, ttl=ttl)
    with pytest.raises(error):
        state.set("new", 2, ttl=ttl)
    with pytest.raises(error):
        state.incr("a", ttl=ttl)
    with pytest.raises(error):
        state.incr("n", ttl=ttl)
    with pytest.raises(error):
        state.expire("a", ttl)
    assert state.get("a") == 1
    assert state.ttl("a") is None
    assert state.names() == ["a"]


def test_ttl_expire_and_set_without_ttl(state):
    state.set("a", 1, ttl=100)
    assert 99 < state.ttl("a") <= 100
    state.set("a", 2)  # no ttl: no expiry
    assert state.ttl("a") is None
    assert state.get("a") == 2
    assert state.ttl("missing") is None
    assert state.expire("missing", 5) is False
    assert not state.contains("missing") and state.ttl("missing") is None
    assert state.expire("a", 50) is True
    assert 49 < state.ttl("a") <= 50
    assert state.expire("a", 200.5) is True  # later, or sooner: the last call decides
    assert 199 < state.ttl("a") <= 200.5
    assert state.expire("a", None) is True
    assert state.ttl("a") is None
    assert state.expire("a", None) is True  # no expiry to remove: still there
    assert state.get("a") == 2


def test_what_keeps_an_expiry_and_what_replaces_it(state):
    state.set("l", [1], ttl=100)
    assert state.append("l", 2) == 2
    assert 99 < state.ttl("l") <= 100
    assert state.compare_and_set("l", [1, 2], [3]) is True
    assert 99 < state.ttl("l") <= 100
    state.set("n", 1, ttl=100)
    assert state.incr("n", 2) == 3
    assert 99 < state.ttl("n") <= 100
    assert state.setdefault("n", 7) == 3  # exists: nothing changes
    assert 99 < state.ttl("n") <= 100
    state.update({"n": 5})
    assert state.ttl("n") is None and state.get("n") == 5
    state.remove("l")
    state.setdefault("l", [9])
    assert state.ttl("l") is None
    state.set("c", 1, ttl=100)
    state.clear()
    state.set("c", 1)
    assert state.ttl("c") is None


def test_an_expired_name_is_gone_for_every_call_and_never_served_from_the_cache(state, target, face, tmp_path):
    state.set("keep", 0)
    state.set("long", 1, ttl=100)
    state.set("short", [1, 2], ttl=TTL, scope="s")
    deadline = time.time() + TTL
    # Read just before the deadline: a handle with a cache keeps it, with its deadline.
    assert state.get("short") == [1, 2]
    assert state.contains("short")
    assert state.get_many(["short", "long"]) == {"short": [1, 2], "long": 1}
    if target.caches:
        backend = state.backend if face == "sync" else state.sync.backend
        assert backend.peek("short") is not NOT_CACHED, "the value was not cached"
    assert state.names() == ["keep", "long", "short"]
    assert count(state, face) == 3
    past(deadline)
    # At once, for every call (the server may not have removed it yet: reads leave it out all the same).
    assert state.get("short") is None
    assert state.get("short", "dflt") == "dflt"
    assert not state.contains("short")
    assert state.get_many(["short", "long"]) == {"long": 1}
    assert state.names() == ["keep", "long"]
    assert state.names(scope="s") == []
    assert count(state, face) == 2
    assert state.snapshot() == {"keep": 0, "long": 1}
    assert state.ttl("short") is None
    out = tmp_path / "saved.json"
    state.save(out)
    assert sorted(json.loads(out.read_text())["names"]) == ["keep", "long"]
    assert 98 < state.ttl("long") <= 100


def test_incr_sets_the_expiry_only_when_it_creates_the_name(state):
    state.set("first", 0)
    assert state.incr("hits", ttl=TTL) == 1
    deadline = time.time() + TTL
    assert state.incr("hits", ttl=100) == 2  # exists: keeps its own expiry
    assert state.incr("hits") == 3
    assert state.ttl("hits") <= TTL
    state.set("sd", 1, ttl=TTL)
    state.set("cas", 1, ttl=TTL)
    state.set("plain", 1, ttl=TTL)
    state.set("rm", 1, ttl=TTL)
    past(deadline)
    assert state.remove("rm") is None  # missing, as for any write
    assert state.popitem() == ("first", 0)  # the only name left
    assert state.incr("hits", ttl=100) == 1  # re-created after it expired: a new window
    assert 99 < state.ttl("hits") <= 100
    assert state.incr("plain") == 1  # counts from 0 again, and has no expiry
    assert state.ttl("plain") is None
    assert state.setdefault("sd", 2) == 2  # an expired name is missing: setdefault stores
    assert state.ttl("sd") is None
    assert state.compare_and_set("cas", None, 5) is True  # and compare_and_set sees it missing
    assert state.get("cas") == 5 and state.ttl("cas") is None


def test_a_restore_leaves_out_expired_names_with_their_scopes(state, tmp_path):
    state.set("gone", 1, scope="s", ttl=TTL)
    state.set("kept", 2, scope="s")
    deadline = time.time() + TTL
    saved = tmp_path / "saved.json"
    state.save(saved)
    past(deadline)
    assert state.restore(saved) == 1
    assert state.names(scope="s") == ["kept"]
    state.clear()
    state.set("gone", "new")  # no scope: a merge that leaves out the file's expired "gone" leaves it so
    assert state.restore(saved, merge=True) == 1
    assert state.names(scope="s") == ["kept"]
    assert state.get("gone") == "new" and state.ttl("gone") is None
    part = tmp_path / "part.json"
    state.save(part, scope="s")
    assert sorted(json.loads(part.read_text())["names"]) == ["kept"]


@pytest.mark.parametrize(
    "deadline", [10**400, 1e300, time.time() + 2e10, True], ids=["huge-int", "far", "past-max", "bool"]
)
def test_a_snapshot_with_an_impossible_deadline_is_refused_and_changes_nothing(state, tmp_path, deadline):
    """A deadline is a number of seconds no further from now than the longest ttl (1e10 s): a file that
    holds another is refused as a whole, with ``SnapshotError``."""
    state.set("a", 0)
    bad = tmp_path / "bad.json"
    write_snapshot(bad, {"a": 1, "b": 2}, {}, deadlines={"a": deadline})
    for merge in (False, True):
        with pytest.raises(SnapshotError, match="deadline of 'a'"):
            state.restore(bad, merge=merge)
    assert state.snapshot() == {"a": 0}
    far = time.time() + 1e9  # within the longest ttl: kept as it is
    good = tmp_path / "good.json"
    write_snapshot(good, {"a": 1, "b": 2}, {}, deadlines={"a": far})
    assert state.restore(good) == 2
    assert abs(time.time() + state.ttl("a") - far) < 10
