"""Expiry on the Redis backend: deadlines in the namespace's sorted set, taken by Redis' ``TIME``, names
past them hidden from every read at once and removed by the scripts that touch the state, by another
client too, and by a watching process' ticks; ``save`` and ``restore`` with deadlines; the asyncio face.
The semantics every backend shares are the contract suite's (``tests/contract/test_expiry.py``)."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import wait_until

import sharedstate
from sharedstate import Change, aio
from sharedstate.backends.redis.scripts import PURGE_BATCH
from sharedstate.persistence.snapshot import read_snapshot, write_snapshot


def _redis_now(client) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def _raw(redis_server, namespace: str):
    """What Redis holds: the data hash's names and the deadlines by name."""
    with redis_server.client() as client:
        names = {key.decode() for key in client.hgetall(f"{namespace}:data")}
        deadlines = {key.decode(): at for key, at in client.zrange(f"{namespace}:deadlines", 0, -1, withscores=True)}
    return names, deadlines


def test_a_deadline_is_redis_time_plus_the_ttl_and_every_read_hides_the_name_past_it(
    redis_state, redis_server, redis_namespace
):
    with redis_server.client() as client:
        before = _redis_now(client)
        redis_state.set("s", {"user": 1}, ttl=0.4, scope="sessions")
        after = _redis_now(client)
    _, deadlines = _raw(redis_server, redis_namespace)
    assert before + 0.4 - 1e-5 <= deadlines["s"] <= after + 0.4 + 1e-5
    redis_state.set("keep", 1)
    assert 0 < redis_state.ttl("s") <= 0.4 and redis_state.ttl("keep") is None and redis_state.ttl("nope") is None
    wait_until(lambda: redis_state.ttl("s") is None, 5, what="the deadline")
    # Past it, before anything removed it: no read sees it (names, len and snapshot remove nothing).
    assert redis_state.names() == ["keep"] and redis_state.names(scope="sessions") == []
    assert len(redis_state) == 1 and redis_state.snapshot() == {"keep": 1}
    assert redis_state.get_many(["s", "keep"]) == {"keep": 1}
    assert redis_state.get("s") is None and "s" not in redis_state
    assert _raw(redis_server, redis_namespace) == ({"keep"}, {})  # contains() removed it (get() only hides it)


def test_another_clients_write_removes_every_expired_name_and_reads_hide_those_beyond_a_batch(
    redis_server, redis_namespace, tmp_path
):
    """More names expire at once than one script removes (``PURGE_BATCH``; restored with one deadline):
    reads hide them all, each write of any client removes another batch."""
    count = PURGE_BATCH + 50
    path = tmp_path / "many.json"
    deadline = time.time() + 0.3
    write_snapshot(path, {f"n{i}": i for i in range(count)}, {}, ours=False,
                   deadlines={f"n{i}": deadline for i in range(count)})  # fmt: skip
    with sharedstate.connect(redis_server.url, namespace=redis_namespace) as one:
        assert one.restore(path) == count
        one.set("stay", 0)
    with sharedstate.connect(redis_server.url, namespace=redis_namespace) as other:
        wait_until(lambda: other.ttl("n0") is None, 5, what="the deadline")
        names, deadlines = _raw(redis_server, redis_namespace)
        assert len(names) == count and len(deadlines) == count - 1  # still held by Redis (ttl() removed n0)
        assert other.names() == ["stay"] and other.get_many(["n1", "n149", "stay"]) == {"stay": 0}
        assert len(other) == 1
        names, deadlines = _raw(redis_server, redis_namespace)
        assert len(names) == count - PURGE_BATCH  # len() removed a batch; get_many() only hides them
        other.incr("stay")
        assert other.snapshot() == {"stay": 1}
        assert _raw(redis_server, redis_namespace) == ({"stay"}, {})


def test_incr_with_ttl_is_a_fixed_window_and_writes_keep_or_replace_the_expiry(redis_state):
    state = redis_state
    assert state.incr("hits", ttl=0.5) == 1 and state.incr("hits", ttl=60) == 2
    assert state.ttl("hits") <= 0.5  # the second call did not move the window
    wait_until(lambda: "hits" not in state, 5, what="the window's end")
    assert state.incr("hits", ttl=60) == 1 and state.ttl("hits") > 50  # a new window
    # The Python path (a Decimal, an integer beyond Lua's exact range) keeps the same rule.
    assert state.incr("big", 2**60, ttl=60) == 2**60 and state.ttl("big") > 50
    state.expire("big", 30)
    assert state.incr("big", 2**60, ttl=60) == 2**61 and state.ttl("big") <= 30
    for name, write in (
        ("a", lambda: state.append("a", 2)),
        ("c", lambda: state.compare_and_set("c", 1, 2)),
        ("i", lambda: state.incr("i")),
    ):
        state.set(name, [1] if name == "a" else 1, ttl=60)
        write()
        assert state.ttl(name) > 50, name
    state.set("s", 1, ttl=60)
    state.set("s", 2)
    state.set("u", 1, ttl=60)
    state.update({"u": 2})
    assert state.ttl("s") is None and state.ttl("u") is None
    state.set("r", 1, ttl=60)
    state.remove("r")
    state.set("r", 1)
    assert state.ttl("r") is None
    assert state.expire("r", 60) is True and state.expire("r", None) is True and state.ttl("r") is None
    assert state.expire("missing", 5) is False and "missing" not in state
    state.set("d", 1, ttl=0.2)
    wait_until(lambda: state.ttl("d") is None, 5, what="the deadline")
    assert state.setdefault("d", 7) == 7 and state.ttl("d") is None
    assert state.compare_and_set("gone", None, 1) is True  # a missing name matches None


def test_save_writes_deadlines_and_restore_drops_those_past(redis_state, tmp_path):
    state = redis_state
    state.set("long", 1, ttl=3600)
    state.set("plain", 2)
    state.set("short", 3, ttl=0.2)
    wait_until(lambda: state.ttl("short") is None, 5, what="the deadline")
    path = state.save(tmp_path / "s.json")
    saved = read_snapshot(path)
    assert saved.data == {"long": 1, "plain": 2} and set(saved.deadlines) == {"long"}
    assert abs(saved.deadlines["long"] - (time.time() + 3600)) < 60  # UTC seconds
    old = tmp_path / "old.json"
    write_snapshot(old, {"past": 1, "future": 2, "none": 3}, {}, ours=False,
                   deadlines={"past": time.time() - 10, "future": time.time() + 100})  # fmt: skip
    state.set("past", "kept?")
    assert state.restore(old, merge=True) == 2
    assert state.get("past") == "kept?" and state.ttl("future") > 90 and state.get("none") == 3
    assert state.restore(old) == 2 and state.snapshot() == {"future": 2, "none": 3}
    assert state.restore(path) == 2 and state.ttl("long") > 3500 and state.ttl("plain") is None


def test_a_watching_process_removes_expired_names_nobody_touches_within_a_second(
    redis_state, redis_server, redis_namespace
):
    redis_state.set("x", 1, ttl=0.3)
    with redis_state.watch(names=["x"]) as changes:
        # Due in 0.3 s, removed by the watching process' next tick (every 0.5 s): well within 2.5 s.
        assert changes.next(timeout=2.5) == sharedstate.Change("x", "expired", None)
    assert _raw(redis_server, redis_namespace) == (set(), {})


def test_the_asyncio_face_sets_reads_and_changes_expiry(redis_server, redis_namespace):
    async def main() -> None:
        state = await aio.connect(redis_server.url, namespace=redis_namespace)
        try:
            await state.set("a", 1, ttl=60)
            assert 50 < await state.ttl("a") <= 60
            assert await state.incr("n", ttl=0.3) == 1 and await state.incr("n", ttl=60) == 2
            assert await state.ttl("n") <= 0.3
            assert await state.expire("a", None) is True and await state.ttl("a") is None
            assert await state.expire("missing", 1) is False
            while await state.ttl("n") is not None:
                await asyncio.sleep(0.05)
            assert await state.get("n") is None and await state.names() == ["a"]
        finally:
            await state.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_bad_ttls_are_refused_before_anything_changes(redis_state):
    for bad, error in (
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        ("1", TypeError),
        (True, TypeError),
    ):
        with pytest.raises(error):
            redis_state.set("x", 1, ttl=bad)
        with pytest.raises(error):
            redis_state.incr("x", ttl=bad)
    assert "x" not in redis_state


def test_update_of_an_expired_name_not_yet_removed_notes_its_expiry_first(redis_state, redis_server, redis_namespace):
    """More names past their deadline than one call removes: the one ``update`` replaces is still in the
    data hash, and its watchers hear it expired before they hear its new value."""
    from sharedstate.backends.redis.watch import TICK_PURGE

    many = TICK_PURGE * 2 + PURGE_BATCH
    with redis_state.watch(names=["last"]) as changes:
        with redis_server.client() as client:
            now = _redis_now(client)
            names = [f"n{i}" for i in range(many)] + ["last"]  # "last" has the latest deadline: removed last
            client.hset(f"{redis_namespace}:data", mapping=dict.fromkeys(names, "1"))
            client.zadd(f"{redis_namespace}:deadlines", {name: now - 60 + i / 1000 for i, name in enumerate(names)})
        redis_state.update({"last": 2})
        assert [changes.next(5), changes.next(5)] == [Change("last", "expired"), Change("last", "set", 2)]
