"""stats() beyond the basic figures: calls by name, lock holders and wait percentiles, the client
cache's hits and misses, on the local server and on Redis; and the counters behind them."""

from __future__ import annotations

import multiprocessing
import os
import threading

from conftest import reap, wait_until

import sharedstate
from sharedstate._figures import WAIT_WINDOW, CallCounts, ThreadCalls, WaitWindow

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


# -- the counters themselves --------------------------------------------------------------------------
def test_wait_percentiles_are_nearest_rank_over_a_bounded_window():
    window = WaitWindow()
    assert window.percentiles()["lock_wait_p50_s"] is None
    for value in range(1, 101):
        window.append(float(value))
    figures = window.percentiles()
    assert (figures["lock_wait_p50_s"], figures["lock_wait_p99_s"], figures["lock_wait_max_s"]) == (50.0, 99.0, 100.0)
    for _ in range(3 * WAIT_WINDOW):
        window.append(0.5)
    figures = window.percentiles()
    assert figures["lock_wait_samples"] == WAIT_WINDOW  # the old ones went
    assert figures["lock_wait_max_s"] == 0.5


def test_counts_of_threads_that_ended_are_kept():
    calls = ThreadCalls()

    def work() -> None:
        for _ in range(100):
            calls.count("get")
        calls.count("set")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    calls.count("get")
    assert calls.counts.totals() == {"get": 401, "set": 4}
    assert len(calls.counts._open) == 1  # the ended threads' counters were retired

    counts = CallCounts(["b", "a"])
    mine = counts.open()
    mine["a"] += 2
    assert counts.totals() == {"a": 2}
    counts.retire(mine)
    assert counts.totals() == {"a": 2}


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
