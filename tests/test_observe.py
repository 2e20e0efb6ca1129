"""stats() beyond the basic figures: calls by name, lock holders and wait percentiles, the client
cache's hits and misses, on the local server and on Redis; and the counters behind them."""

from __future__ import annotations

import multiprocessing
import os
import threading

import psutil
import pytest
from conftest import reap, wait_until

import sharedstate
from sharedstate._figures import WAIT_WINDOW, CallCounts, ThreadCalls, WaitWindow
from sharedstate.backends.redis import figures as redis_figures

#: Keys every stats() had before these figures: they stay.
BASIC = {
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
}
NEW = {
    "calls",
    "locks_held",
    "lock_waiters",
    "lock_holders",
    "lock_wait_p50_s",
    "lock_wait_p99_s",
    "lock_wait_max_s",
    "lock_wait_samples",
    "journal_bytes",
    "cache_hits",
    "cache_misses",
    "cache_hit_ratio",
    "cache_entries",
    "cache_bytes",
}


def _incr_five(state: sharedstate.State) -> None:
    for _ in range(5):
        state.incr("hits")


def test_calls_are_counted_by_name_for_every_client_including_those_gone(server):
    state = server.state
    state.set("greeting", "hello")
    proc = multiprocessing.get_context("fork").Process(target=_incr_five, args=(state,))
    proc.start()
    try:
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        reap(proc)
    stats = state.stats()
    assert BASIC | NEW <= stats.keys()
    # The child's connection is closed: its counts were folded into the totals, not lost.
    assert stats["calls"]["incr"] == 5
    assert stats["calls"]["set"] == 1
    assert stats["calls"]["stats"] == 1
    assert list(stats["calls"]) == sorted(stats["calls"])
    assert "remove" not in stats["calls"]  # never called: left out
    assert state.stats()["calls"]["stats"] == 2


def _get_once_then(address, authkey, ready, more, done, leave) -> None:
    """Connect, ``get`` once, then (when ``more`` is given) 100 ``get`` more once told, and stay connected
    until told to leave."""
    state = sharedstate.connect(address, authkey, cache=False)  # every get reaches the server
    state.get("x")
    ready.set()
    if more is None:
        return
    assert more.wait(60)
    for _ in range(100):
        state.get("x")
    done.set()
    assert leave.wait(60)


def test_a_client_that_leaves_takes_only_its_own_counts_with_it(server):
    """Two connections with equal counts: the one that closes is folded into the totals, the other
    goes on counting (its counter is not taken for the closed one's)."""
    state = server.state
    ctx = multiprocessing.get_context("fork")
    ready_a, ready_b, more, done, leave = (ctx.Event() for _ in range(5))
    a = ctx.Process(target=_get_once_then, args=(server.address, server.authkey, ready_a, more, done, leave))
    b = ctx.Process(target=_get_once_then, args=(server.address, server.authkey, ready_b, None, None, None))
    try:
        a.start()
        assert ready_a.wait(60)
        clients = state.stats()["clients"]
        b.start()
        assert ready_b.wait(60)
        b.join(60)
        assert b.exitcode == 0
        # B's serving thread retires its counter before its connection is counted out.
        wait_until(lambda: state.stats()["clients"] == clients, 30, what="B's connection to close")
        more.set()
        assert done.wait(60)
        assert state.stats()["calls"]["get"] == 102
        leave.set()
        a.join(60)
        assert a.exitcode == 0
        wait_until(lambda: state.stats()["clients"] == clients - 1, 30, what="A's connection to close")
        assert state.stats()["calls"]["get"] == 102
    finally:
        leave.set()
        more.set()
        reap(a, b)


def test_lock_holders_waiters_and_wait_percentiles(server):
    state = server.state
    lock = state.named_lock("jobs")
    lock.acquire()
    got = threading.Event()

    def waiter() -> None:
        if state.named_lock("jobs").acquire(timeout=30):
            got.set()
            state.named_lock("jobs").release()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        wait_until(lambda: state.stats()["lock_waiters"] == 1, 10, what="a waiter")
        stats = state.stats()
        assert stats["locks_held"] == 1
        [holder] = stats["lock_holders"]
        assert holder["lock"] == "jobs" and holder["pid"] == os.getpid() and holder["waiters"] == 1
        assert holder["held_s"] >= 0
        wait_until(lambda: state.stats()["lock_holders"][0]["held_s"] > holder["held_s"], 10, what="time held grows")
    finally:
        lock.release()
        thread.join(30)
    assert got.is_set()
    with state.lock:  # the global lock is listed as None
        stats = state.stats()
        assert [h["lock"] for h in stats["lock_holders"]] == [None]
    stats = state.stats()
    assert stats["locks_held"] == 0 and stats["lock_holders"] == [] and stats["lock_waiters"] == 0
    # Three acquires: two at once (0 s), one that waited until the release.
    assert stats["lock_wait_samples"] == 3
    assert stats["lock_wait_p50_s"] == 0.0
    assert stats["lock_wait_p99_s"] == stats["lock_wait_max_s"] > 0


def test_a_lock_wait_given_up_is_counted(server):
    state = server.state
    with state.lock:
        thread = threading.Thread(target=lambda: state.lock.acquire(timeout=0.2))
        thread.start()
        thread.join(30)
    stats = state.stats()
    assert stats["lock_wait_samples"] == 2
    assert stats["lock_wait_max_s"] >= 0.2


def test_the_client_cache_hits_and_misses(server):
    state = server.state
    other = sharedstate.connect(server.address, server.authkey, cache=False)
    before = state.stats()
    state.set("k", 1)  # kept by the cache as sent
    assert [state.get("k") for _ in range(3)] == [1, 1, 1]  # hits
    other.set("k", 2)  # changed elsewhere: the next read is a miss
    assert state.get("k") == 2
    assert state.get_many(["k"]) == {"k": 2}  # a hit
    assert "k" in state  # a hit
    after = state.stats()
    assert after["cache_hits"] - before["cache_hits"] == 5
    assert after["cache_misses"] - before["cache_misses"] == 1
    assert 0 < after["cache_hit_ratio"] < 1
    assert after["cache_entries"] >= 1 and after["cache_bytes"] > 0
    # Without a cache: every read goes to the server, and the figures say so.
    off = other.stats()
    assert (off["cache_hits"], off["cache_misses"], off["cache_hit_ratio"], off["cache_entries"]) == (0, 0, None, 0)


def test_the_journal_size_is_in_the_stats(tmp_path):
    with sharedstate.StateServer(path=tmp_path / "s.json", durability="journal", save_every=None) as server:
        first = server.state.stats()["journal_bytes"]
        server.state.set("a", "x" * 100)
        assert server.state.stats()["journal_bytes"] > first + 100
    with sharedstate.StateServer() as server:
        assert server.state.stats()["journal_bytes"] is None


def test_the_journal_size_follows_the_journal_written_after_a_failed_save(tmp_path):
    """A save starts a new journal file (``PATH.journal.GEN``); one that fails leaves the server writing
    there. A file-size limit on the server process makes the save fail with EFBIG, as a full disk would."""
    with sharedstate.StateServer(path=tmp_path / "s.json", durability="journal", save_every=None) as server:
        state = server.state
        state.set("big", "x" * 200_000)
        process = psutil.Process(server.pid)
        limits = process.rlimit(psutil.RLIMIT_FSIZE)
        process.rlimit(psutil.RLIMIT_FSIZE, (100_000, limits[1]))
        try:
            with pytest.raises(OSError):
                state.save()
        finally:
            process.rlimit(psutil.RLIMIT_FSIZE, limits)
        before = state.stats()
        assert before["last_save_error"] is not None
        for number in range(10):
            state.set(f"more{number}", "y" * 10_000)
        assert state.stats()["journal_bytes"] >= before["journal_bytes"] + 100_000


def test_redis_stats_have_the_same_keys(redis_state):
    state = redis_state
    state.incr("hits")
    state.incr("hits")
    with state.named_lock("jobs"):
        stats = state.stats()
        assert BASIC | NEW <= stats.keys()
        assert stats["locks_held"] == 1
        assert stats["lock_holders"] == [{"lock": "jobs", "pid": os.getpid(), "held_s": None, "waiters": None}]
    # This handle's calls in this process: Redis keeps no figures of sharedstate's calls.
    assert stats["calls"]["incr"] == 2 and stats["calls"]["lock_acquire"] == 1
    assert stats["lock_wait_samples"] == 1
    assert stats["lock_waiters"] is None and stats["cache_hit_ratio"] is None
    with state.lock:
        assert [h["lock"] for h in state.stats()["lock_holders"]] == [None]
    assert state.stats()["lock_holders"] == []


def test_redis_counts_the_calls_of_a_thread_that_goes_on_after_another_ended(redis_state):
    state = redis_state
    _one_thread_ends_while_another_counts_on(lambda: state.get("x"), lambda: state.stats()["calls"]["get"])
    assert state.stats()["calls"]["get"] == 102


def _hold_in_a_thread(lock, until: threading.Event) -> threading.Thread:
    held = threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            until.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(30)
    return thread


def test_lock_waits_follow_one_rule_on_both_backends(any_state):
    """Taken at the first try: a wait of 0 s. Given up at the first try (not blocking, or a timeout of 0):
    no wait at all, so not recorded. Given up after waiting: recorded."""
    state = any_state
    assert state.lock.acquire()
    state.lock.release()
    stats = state.stats()
    assert (stats["lock_wait_samples"], stats["lock_wait_max_s"]) == (1, 0.0)
    until = threading.Event()
    thread = _hold_in_a_thread(state.named_lock("jobs"), until)
    try:
        assert state.named_lock("jobs").acquire(timeout=0) is False
        assert state.named_lock("jobs").acquire(blocking=False) is False
        assert state.stats()["lock_wait_samples"] == 2  # the holder's, taken at once
        assert state.named_lock("jobs").acquire(timeout=0.1) is False
        stats = state.stats()
        assert stats["lock_wait_samples"] == 3 and stats["lock_wait_max_s"] >= 0.1
    finally:
        until.set()
        thread.join(30)


def test_redis_counts_only_lock_keys_each_once(redis_server, redis_namespace):
    """Another namespace named this one's followed by ``:lock`` keeps its names under this one's prefix of
    lock keys: they are not locks. A key ``SCAN`` returns twice (while Redis resizes its table) counts
    once: that is not something a test can make Redis do at will, so here a client repeats each page."""
    state = sharedstate.connect(redis_server.url, namespace=redis_namespace)
    other = sharedstate.connect(redis_server.url, namespace=redis_namespace + ":lock")
    try:
        other.set("greeting", "hello")  # the hashes NS:lock:data and NS:lock:scopes
        other.set("tagged", 1, scope="s")
        stats = state.stats()
        assert (stats["locks_held"], stats["lock_holders"]) == (0, [])
        with state.named_lock("jobs"), state.lock:
            with redis_server.client() as client:
                twice = _RepeatingScan(client)
                holders, held = redis_figures.lock_holders(twice, redis_namespace + ":lock", redis_namespace + ":lock:")
            assert held == 2 and sorted(h["lock"] or "" for h in holders) == ["", "jobs"]
    finally:
        state.close()
        other.close()  # its keys are under this namespace's: the fixture removes them


class _RepeatingScan:
    """A real Redis client whose ``SCAN`` answers every key twice, as Redis may while it rehashes."""

    def __init__(self, client) -> None:
        self._client = client

    def scan(self, *args, **kwargs):
        cursor, keys = self._client.scan(*args, **kwargs)
        return cursor, keys + keys

    def mget(self, keys):
        return self._client.mget(keys)


# -- the counters themselves --------------------------------------------------------------------------
def test_wait_percentiles_are_nearest_rank_over_a_bounded_window():
    window = WaitWindow()
    assert window.percentiles()["lock_wait_p50_s"] is None
    for value in range(1, 101):
        window.record(0.0, float(value))
    figures = window.percentiles()
    assert (figures["lock_wait_p50_s"], figures["lock_wait_p99_s"], figures["lock_wait_max_s"]) == (50.0, 99.0, 100.0)
    for _ in range(3 * WAIT_WINDOW):
        window.record(1.0, 1.5)
    figures = window.percentiles()
    assert figures["lock_wait_samples"] == WAIT_WINDOW  # the old ones went
    assert figures["lock_wait_max_s"] == 0.5


def _one_thread_ends_while_another_counts_on(call, gets) -> None:
    """``call()`` (a counted ``get``) once in each of two threads, with the same counts; the second ends
    (its counter is retired) while the first lives on and calls 100 times more. ``gets()`` is then 102,
    while the first still lives."""
    counted, more, done, leave = (threading.Event() for _ in range(4))

    def first() -> None:
        call()
        counted.set()
        assert more.wait(30)
        for _ in range(100):
            call()
        done.set()
        assert leave.wait(30)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert counted.wait(30)
        second = threading.Thread(target=call)
        second.start()
        second.join(30)
        more.set()
        assert done.wait(30)
        assert gets() == 102
    finally:
        more.set()
        leave.set()
        thread.join(30)


def test_counts_of_threads_that_ended_are_kept():
    calls = ThreadCalls()
    _one_thread_ends_while_another_counts_on(lambda: calls.count("get"), lambda: calls.counts.totals()["get"])
    calls.count("set")
    assert calls.counts.totals() == {"get": 102, "set": 1}
    assert len(calls.counts._open) == 1  # the ended threads' counters were retired

    counts = CallCounts(["b", "a"])
    mine = counts.open()
    mine["a"] += 2
    assert counts.totals() == {"a": 2}
    counts.retire(mine)
    counts.retire(mine)  # once only
    assert counts.totals() == {"a": 2}


def _count_after_the_fork(calls: ThreadCalls) -> None:
    calls.count("get")
    thread = threading.Thread(target=calls.count, args=("set",))  # a new counter: the mutex is taken
    thread.start()
    thread.join(10)
    assert calls.counts.totals() == {"get": 2, "set": 1, "stats": 1}


def test_a_child_forked_while_a_thread_holds_the_counts_mutex_counts_on():
    """The mutex is held by a thread (as inside ``totals()``) at the fork: that thread does not come
    along, and the child must not wait for it (neither to retire that thread's counter, nor after)."""
    calls = ThreadCalls()
    calls.count("get")
    holding, release = threading.Event(), threading.Event()

    def reader() -> None:
        calls.count("stats")
        with calls.counts._mutex:
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=reader)
    thread.start()
    child = multiprocessing.get_context("fork").Process(target=_count_after_the_fork, args=(calls,))
    try:
        assert holding.wait(30)
        child.start()
        child.join(20)
        assert child.exitcode == 0
    finally:
        release.set()
        thread.join(30)
        reap(child)


def test_redis_lock_holders_stay_in_their_namespace_whatever_its_characters(redis_server, redis_namespace):
    starred = sharedstate.connect(redis_server.url, namespace=redis_namespace + "*[?]")
    plain = sharedstate.connect(redis_server.url, namespace=redis_namespace + "x[a]")
    try:
        with plain.named_lock("theirs"):
            assert starred.stats()["lock_holders"] == [] and starred.stats()["locks_held"] == 0
            with starred.named_lock("ours:1"):
                assert [h["lock"] for h in starred.stats()["lock_holders"]] == ["ours:1"]
                assert plain.stats()["locks_held"] == 1
    finally:
        starred.close()
        plain.close()
