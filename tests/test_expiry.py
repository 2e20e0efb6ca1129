"""Expiry on the local server: the sweeper removes expired names within a second, the client cache never
serves a value past its deadline (even while the server is stopped), snapshots and the journal keep
absolute deadlines (replay gives the exact state after ``kill -9``), and a rate limiter made of
``incr(ttl=)`` is exact across processes. (The calls themselves, on every backend: contract/test_expiry.py.)"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import crash, journaling, reap, wait_until

import sharedstate
from sharedstate import aio
from sharedstate._cli import main as cli_main
from sharedstate._sentinels import NOT_CACHED
from sharedstate.backends.local import cached_many
from sharedstate.persistence.files import backup_path
from sharedstate.persistence.journal import Journal, journal_path, read_journal
from sharedstate.persistence.snapshot import read_snapshot
from sharedstate.server.store import Store
from sharedstate.wire.answers import Duplicate, current_request

TTL = 0.4


def past(deadline: float) -> None:
    """Wait until the clock is past ``deadline`` (a little after: the server took its own after the call)."""
    wait_until(lambda: time.time() > deadline + 0.05, 5, interval=0.01, what="the deadline")


def deadline_of(state: sharedstate.State, name: str) -> float:
    """The absolute deadline of ``name``, as near as a ``ttl()`` call tells it."""
    left = state.ttl(name)
    assert left is not None, f"{name} has no expiry"
    return time.time() + left


@pytest.fixture(scope="module")
def server():
    with sharedstate.StateServer() as running:
        yield running


@pytest.fixture
def state(server):
    server.state.clear()
    return server.state


def test_the_server_removes_expired_names_within_a_second(state):
    state.update({f"plain-{i}": i for i in range(10)})
    for i in range(300):
        state.set(f"s-{i}", i, ttl=TTL, scope="session")
    deadline = time.time() + TTL
    assert state.stats()["names"] == 310
    # Observed without reading the names: stats() counts what the server holds.
    wait_until(lambda: state.stats()["names"] == 10, deadline - time.time() + 5, what="the sweep")
    assert time.time() - deadline < 1.0
    assert state.names(scope="session") == []
    assert state.snapshot() == {f"plain-{i}": i for i in range(10)}


def test_a_handle_never_serves_a_cached_value_past_its_deadline(server, state):
    """The server is stopped (SIGSTOP) after the reads: no sweep, no counter bumped; the cache alone must
    know the deadline it learned from the answers."""
    state.set("read", [1], ttl=TTL)
    state.set("written", {"a": 1}, ttl=TTL)  # the set's answer carries the deadline: cached with it
    state.set("plain", 1)
    state.set("many", 2, ttl=TTL)
    deadline = time.time() + TTL
    assert state.get("read") == [1]
    assert state.get("plain") == 1
    assert state.contains("read")
    assert state.get_many(["many", "plain"]) == {"many": 2, "plain": 1}
    backend = state.backend
    os.kill(server.pid, signal.SIGSTOP)
    try:
        assert backend.peek("read") == [1]  # before the deadline: a hit, with the server stopped
        assert backend.peek("written") == {"a": 1}
        assert cached_many(backend._cache, ["many", "plain"]) == {"many": 2, "plain": 1}
        past(deadline)
        assert backend.peek("read") is NOT_CACHED
        assert backend.peek("written") is NOT_CACHED
        assert cached_many(backend._cache, ["many", "plain"]) is None
        assert backend.peek("plain") == 1  # a name without expiry is still a hit
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert state.get("read") is None and not state.contains("read")


def test_save_and_restore_keep_deadlines_and_drop_passed_ones(state, tmp_path, capsys):
    state.set("long", 1, ttl=100)
    state.set("short", 2, ttl=TTL)
    state.set("plain", 3)
    short = time.time() + TTL
    long = deadline_of(state, "long")
    saved = tmp_path / "saved.json"
    state.save(saved)
    snapshot = read_snapshot(saved)
    assert set(snapshot.deadlines) == {"long", "short"}
    assert abs(snapshot.deadlines["long"] - long) < 0.1
    part = tmp_path / "part.json"
    state.save(part, include=["long", "plain"])
    assert read_snapshot(part).deadlines == {"long": snapshot.deadlines["long"]}
    with pytest.raises(SystemExit) as shown:
        cli_main(["show", str(saved)])
    assert shown.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["names"] == {"long": 1, "short": 2, "plain": 3}
    assert doc["deadlines"] == snapshot.deadlines
    past(short)
    state.clear()
    assert state.restore(saved) == 2  # the names installed: "short" had expired
    assert state.snapshot() == {"long": 1, "plain": 3}
    assert abs(deadline_of(state, "long") - long) < 0.1  # the same absolute deadline, not a new ttl
    assert state.ttl("plain") is None
    state.set("short", 9)
    state.set("long", 0)
    assert state.restore(saved, merge=True) == 2
    assert state.snapshot() == {"long": 1, "plain": 3, "short": 9}
    assert abs(deadline_of(state, "long") - long) < 0.1
    assert state.ttl("short") is None


def test_a_server_starts_from_its_snapshot_or_backup_with_their_deadlines(tmp_path):
    path = tmp_path / "own.json"
    with sharedstate.StateServer(path=path, save_every=None) as first:
        first.state.set("long", 1, ttl=100)
        first.state.set("short", 2, ttl=TTL)
        first.state.set("plain", 3)
        short = time.time() + TTL
        long = deadline_of(first.state, "long")
    assert set(read_snapshot(path).deadlines) == {"long", "short"}  # the final save kept them
    past(short)
    path.rename(backup_path(path))  # the server starts from the backup when the snapshot is missing
    for start in ("backup", "snapshot"):
        with sharedstate.StateServer(path=path, save_every=None) as again:
            assert again.state.snapshot() == {"long": 1, "plain": 3}, start
            assert abs(deadline_of(again.state, "long") - long) < 0.1, start
            assert again.state.stats()["names"] == 2, start  # dropped, not only left out of reads


def _records(path: Path) -> list[list]:
    """The changes of the journal beside ``path``, without their request ids."""
    return [r[4:] if r[0] == "@" else r for r in read_journal(journal_path(path))[1]]


def test_journal_replay_after_kill_keeps_deadlines_and_the_exact_state(tmp_path):
    path = tmp_path / "state.json"
    server = journaling(path)
    state = server.state
    state.set("x", 5, ttl=TTL)
    assert state.incr("x") == 6  # before its deadline: keeps it, then expires with it
    state.set("y", 5, ttl=TTL, scope="s")
    assert state.incr("hits", ttl=TTL) == 1
    state.set("long", [1], ttl=100)
    state.append("long", 2)
    state.set("kept", 1, ttl=100)
    assert state.expire("kept", None) is True
    state.set("plain", 1)
    deadline = time.time() + TTL
    long = deadline_of(state, "long")
    past(deadline)
    assert state.incr("y") == 1  # after the deadline: counts from 0, with no expiry
    assert state.incr("hits", ttl=100) == 1  # a new window
    hits = deadline_of(state, "hits")
    expected = state.snapshot()
    assert expected == {"y": 1, "hits": 1, "long": [1, 2], "kept": 1, "plain": 1}
    crash(server)
    records = _records(path)
    # The expiry the server decided is in the journal, before the write that found the name gone: a
    # replay never asks the clock.
    assert records.index(["expired", "y"]) < records.index(["incr", "y", 1])
    # "x" may or may not have been swept before the crash: gone after the replay either way.
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as again:
        assert again.state.snapshot() == expected
        assert again.state.names(scope="s") == []
        assert again.state.ttl("y") is None and again.state.ttl("kept") is None
        assert abs(deadline_of(again.state, "long") - long) < 0.1
        assert abs(deadline_of(again.state, "hits") - hits) < 0.1


def test_a_journaled_name_whose_deadline_passed_while_the_server_was_down_is_gone(tmp_path):
    path = tmp_path / "state.json"
    server = journaling(path)
    server.state.set("z", 5, ttl=TTL)
    assert server.state.incr("z") == 6
    server.state.set("plain", 1)
    deadline = time.time() + TTL
    crash(server)  # before the deadline: nothing journaled its expiry
    past(deadline)
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as again:
        assert again.state.stats()["names"] == 1
        assert again.state.snapshot() == {"plain": 1}
        again.state.incr("z")  # after the start's removal (journaled): a new name
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as last:
        assert last.state.snapshot() == {"plain": 1, "z": 1}


def test_a_resent_expiry_write_is_answered_as_applied_not_applied_twice():
    """A write sent again under the same request id (after a crash, say) gets its first answer."""
    store = Store()
    store.set("e", 1)
    store.set("old", 1, ttl=0.01)
    wait_until(lambda: store.deadlines.due("old", time.time()), 5, interval=0.01, what="the deadline")
    calls = [
        (lambda: store.incr("n", 1, 100), 1),
        (lambda: store.expire("e", 100), True),
        (lambda: store.incr("old", 1, 100), 1),  # removes the expired name first, then creates it
        (lambda: store.set("s", 1, (), 100), None),  # the counters' answer is not kept: None
    ]
    for sequence, (call, answer) in enumerate(calls, 1):
        current_request.rid = ("client", sequence)
        try:
            call()
            with pytest.raises(Duplicate) as again:
                call()
        finally:
            current_request.rid = None
        assert again.value.answer == answer
    assert store.snapshot() == {"e": 1, "n": 1, "old": 1, "s": 1}
    assert all(99 < store.ttl(name) <= 100 for name in ("e", "n", "old", "s"))


def _replace_records(path: Path) -> list[list]:
    return [record for record in _records(path) if record[0] == "replace"]


def test_a_restore_of_a_saved_deadline_journaled_then_replayed_removes_each_name_once(tmp_path):
    """A merge of a file this server saved gives names the deadline they have already: one removal each,
    at the replay too; and a name left out as expired leaves out its scopes, in the journal as well."""
    path = tmp_path / "state.json"
    server = journaling(path)
    state = server.state
    state.set("plain", 1)
    state.set("gone", 1, scope="s", ttl=TTL)
    state.set("kept", 2, scope="s")
    old = tmp_path / "old.json"
    state.save(old)
    past(time.time() + TTL)
    state.set("n", "v", ttl=1.5)
    deadline = deadline_of(state, "n")
    same = tmp_path / "same.json"
    state.save(same)
    assert state.restore(same, merge=True) == 3
    assert state.restore(old, merge=True) == 2  # "plain" and "kept"; "gone" expired
    assert state.names(scope="s") == ["kept"]
    assert state.ttl("n") is not None  # not removed before the crash: the replay has its deadline twice
    crash(server)
    for record in _replace_records(path):
        assert set(record[2]) <= set(record[1]), record  # scopes only of names installed
    past(deadline)
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as again:
        assert again.state.snapshot() == {"plain": 1, "kept": 2}
        assert again.state.names(scope="s") == ["kept"]


class Told(Store):
    """A store that keeps the expirations it tells the watchers (``Store._notify``)."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple[str, str | None]] = []

    def _notify(self, kind: str, name: str | None, value=None) -> None:
        if kind == "expired":  # the expiry's part of what watchers hear
            self.told.append((kind, name))


def _journaled(store: Store, path: Path) -> Journal:
    journal = Journal(path, "everysec")
    journal.start_generation(1)
    store.journal = journal
    return journal


def test_the_same_deadline_given_twice_is_one_removal_one_record_one_change(tmp_path):
    store = Told()
    journal = _journaled(store, tmp_path / "state.json")
    gone = time.time() - 1  # passed already, as when the sweeper comes late
    store.set("plain", 0)
    for name in ("n0", "n1", "n2"):
        store._set(name, name, (), gone)
    store.replace({"n0": "n0", "n1": "n1"}, {}, True, {"n0": gone, "n1": gone})
    store._incr("c", 1, gone)
    store.expire("c", None)
    store._expire_at("c", gone)
    store._expire_at("c", gone)
    assert store.names() == ["plain"]
    assert store.sweep() > 0  # all removed in one sweep
    assert sorted(store.told) == [("expired", name) for name in ("c", "n0", "n1", "n2")]
    assert store.snapshot() == {"plain": 0} and store.deadlines.at == {}
    records = read_journal(journal.base)[1]
    assert sorted(r[1] for r in records if r[0] == "expired") == ["c", "n0", "n1", "n2"]
    told = len(store.told)
    store.sweep()
    assert len(store.told) == told  # nothing more to remove, nothing more to tell


def test_a_sweep_that_cannot_journal_leaves_the_names_for_the_next_sweep(tmp_path):
    """A file-size limit on this process makes the journal's writes fail with EFBIG, as a full disk would.
    The names not removed are still gone for every read, and the next sweep removes them."""
    store = Told()
    journal = _journaled(store, tmp_path / "state.json")
    store.set("plain", 0)
    for i in range(3):
        store._set(f"x{i}", i, (), time.time() - 1)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (journal.size(), limits[1]))
    try:
        with pytest.raises(OSError):
            store.sweep()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert store.told == []
    assert store.names() == ["plain"] and store.length() == 1
    assert store.snapshot() == {"plain": 0}
    assert store.get_many(["x0", "x1", "plain"]) == {"plain": 0}
    assert store.entries()[0] == {"plain": 0}
    assert store.sweep() > 0
    assert sorted(store.told) == [("expired", f"x{i}") for i in range(3)]
    assert store.deadlines.at == {} and len(store._data) == 1
    assert [r for r in read_journal(journal.base)[1] if r[0] == "expired"] == [["expired", f"x{i}"] for i in range(3)]


def test_expired_names_are_taken_off_the_heap_once_not_walked_by_every_read():
    """20,000 names past their deadline, not swept yet: the first read that needs them all finds them
    (once), and reads of names without expiry never look at them."""
    store = Store()
    store.set("plain", 1)
    gone = time.time() - 1
    for i in range(20_000):
        store._set(f"e{i}", i, (), gone)
    assert store.get_many(["plain"]) == {"plain": 1}
    assert len(store.deadlines._heap) == 20_000  # get_many looked only at the name it found
    assert store.length() == 1
    assert store.deadlines._heap == []  # found once: the next reads only test the names they hold
    assert store.names() == ["plain"] and store.snapshot() == {"plain": 1}
    waits = [store.sweep() for _ in range(20)]
    assert waits == [0.0] * 20  # 1,000 per sweep: never one long hold of the mutex
    assert store.sweep() > 0
    assert len(store._data) == 1 and store.length() == 1


# -- a rate limiter across processes -------------------------------------------------------------------
LIMIT = 5
WINDOW = 0.3


def limited_calls(state: sharedstate.State, key: str, ready, go, stop_at, out) -> None:
    """Call ``incr(key, ttl=WINDOW)`` as fast as possible; report every count the calls got. Stops once
    past ``stop_at`` and at a count that reached the limit, so every window it saw was filled."""
    ready.wait(30)
    go.wait(30)
    counts = []
    while True:
        n = state.incr(key, ttl=WINDOW)
        counts.append(n)
        if n >= LIMIT and time.time() > stop_at.value:
            break
    out.put(counts)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_rate_limiter_of_incr_with_ttl_is_exact_across_4_processes(state, method):
    context = multiprocessing.get_context(method)
    ready = context.Barrier(5)
    go = context.Event()
    stop_at = context.Value("d", 0.0)
    out = context.Queue()
    procs = [context.Process(target=limited_calls, args=(state, "limit", ready, go, stop_at, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    try:
        ready.wait(60)  # every child has started (spawn is slow): the windows start together
        stop_at.value = time.time() + 2.5 * WINDOW
        go.set()
        counts = Counter()
        for _ in procs:
            counts.update(out.get(timeout=60))
        for proc in procs:
            proc.join(30)
            assert proc.exitcode == 0
    finally:
        reap(*procs)
    windows = counts[1]  # each window starts at 1
    assert windows >= 2, counts
    # Each count up to the limit was handed out once per window: exactly LIMIT calls allowed in each.
    assert [counts[n] for n in range(1, LIMIT + 1)] == [windows] * LIMIT, counts
    assert max(counts.values()) == windows  # no count ever handed out twice in one window


# -- asyncio -------------------------------------------------------------------------------------------
def test_asyncio_expiry_calls(server, state):
    async def main() -> None:
        astate = await aio.connect(server.address, server.authkey)
        try:
            await astate.set("a", [1], ttl=TTL)
            deadline = time.time() + TTL
            assert await astate.incr("n", ttl=TTL) == 1
            assert await astate.incr("n", ttl=100) == 2
            assert await astate.expire("missing", 1) is False
            assert await astate.expire("b", 1) is False
            await astate.set("b", 1, ttl=100)
            assert await astate.expire("b", None) is True
            assert await astate.ttl("b") is None
            assert 0 < await astate.ttl("a") <= TTL
            assert await astate.get("a") == [1]
            assert await astate.get_many(["a", "n"]) == {"a": [1], "n": 2}
            assert astate._backend.peek("a") == [1]  # cached, with its deadline
            while time.time() < deadline + 0.05:
                await asyncio.sleep(0.01)
            assert astate._backend.peek("a") is NOT_CACHED
            assert await astate.get("a") is None
            assert not await astate.contains("a")
            assert await astate.get_many(["a", "n", "b"]) == {"b": 1}
            assert await astate.ttl("n") is None
            assert await astate.incr("n", ttl=100) == 1
            assert 99 < await astate.ttl("n") <= 100
        finally:
            await astate.close()

    asyncio.run(main())
