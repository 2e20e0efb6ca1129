"""Change notifications (API.md section 13) on every backend and both faces: the kind and value of every
write, commit order, the filters (pattern, names, scope, together; clears and restores reach all),
argument errors, lossless from the moment ``watch`` returns, overflow past the buffer, ``wait``, closing,
and the asyncio iterators. (A local server's own cases: tests/test_watch.py.)"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import sharedstate
from sharedstate import Change

CLEARED = Change(None, "cleared", None)
RESTORED = Change(None, "restored", None)
OVERFLOW = Change(None, "overflow", None)


def taken(changes: Any, count: int, timeout: float = 10) -> list[Change]:
    """The next ``count`` changes; fails if one does not come within ``timeout``."""
    got = []
    for _ in range(count):
        change = changes.next(timeout)
        assert change is not None, f"only {got} came"
        got.append(change)
    return got


def until_cleared(changes: Any, timeout: float = 10) -> list[Change]:
    """The changes up to the next "cleared" (which every watcher gets), without it: a test that clears
    last knows that nothing else came, without waiting for nothing."""
    got = []
    while (change := changes.next(timeout)) != CLEARED:
        assert change is not None, f"no clear came after {got}"
        got.append(change)
    return got


def set_(name: str, value: Any) -> Change:
    return Change(name, "set", value)


def removed(name: str) -> Change:
    return Change(name, "removed", None)


def test_every_write_is_one_change_with_its_kind_and_value(state, tmp_path):
    with state.watch() as changes:
        state.set("a", 1)
        state.set("b", [1, 2], scope="s")
        state.update({"u2": 2, "u1": 1})  # one change per name, in the mapping's order
        state.incr("n")
        state.incr("n", 2)
        state.append("l", "x")
        state.setdefault("d", 5)
        state.setdefault("d", 6)  # stores nothing: no change
        state.compare_and_set("d", 5, 7)
        state.compare_and_set("d", 5, 8)  # no match: no change
        state.remove("a")
        state.pop("b")
        state.remove("missing")  # removes nothing: no change
        state.clear()
        state.set("p", 1)
        state.popitem()
        path = tmp_path / "saved.json"
        state.set("r", 1)
        state.save(path)
        state.restore(path)
        state.restore(path, merge=True)
        state.clear()
        assert taken(changes, 12) == [
            set_("a", 1),
            set_("b", [1, 2]),
            set_("u2", 2),
            set_("u1", 1),
            set_("n", 1),
            set_("n", 3),
            set_("l", ["x"]),
            set_("d", 5),
            set_("d", 7),
            removed("a"),
            removed("b"),
            CLEARED,
        ]
        assert until_cleared(changes) == [set_("p", 1), removed("p"), set_("r", 1), RESTORED, RESTORED]


def test_changes_come_in_commit_order(state, peer):
    count = 200
    with state.watch(names=["n"]) as changes:

        def count_up() -> None:
            for _ in range(count // 2):
                peer.incr("n")

        thread = threading.Thread(target=count_up)
        thread.start()
        for _ in range(count // 2):
            peer.incr("n")  # the same handle in two threads: two connections, interleaved
        thread.join(30)
        assert [change.value for change in taken(changes, count)] == list(range(1, count + 1))


def test_a_write_right_after_watch_returns_is_seen(state, peer):
    for round in range(5):
        with state.watch(names=["x"]) as changes:
            peer.set("x", round)
            assert changes.next(10) == set_("x", round)


def test_a_pattern_a_list_of_names_and_scopes_filter_named_changes_only(state, peer, tmp_path):
    path = tmp_path / "saved.json"
    with (
        state.watch("^user:") as by_pattern,
        state.watch(names=["a", "user:2"]) as by_names,
        state.watch(scope=["web", "api"]) as by_scope,
        state.watch("^user:", scope="web") as pattern_and_scope,
        state.watch(names=["a", "b"], scope="web") as names_and_scope,
    ):
        peer.set("a", 1, scope="web")
        peer.set("user:1", 1, scope="api")
        peer.set("user:2", 2, scope="web")
        peer.set("b", 3)
        peer.remove("user:2")  # its scopes at the change still count
        peer.save(path)
        peer.clear()
        peer.restore(path)
        peer.clear()
        assert taken(by_pattern, 4) == [set_("user:1", 1), set_("user:2", 2), removed("user:2"), CLEARED]
        assert until_cleared(by_pattern) == [RESTORED]
        assert taken(by_names, 4) == [set_("a", 1), set_("user:2", 2), removed("user:2"), CLEARED]
        assert until_cleared(by_names) == [RESTORED]
        assert taken(by_scope, 5) == [set_("a", 1), set_("user:1", 1), set_("user:2", 2), removed("user:2"), CLEARED]
        assert until_cleared(by_scope) == [RESTORED]
        assert taken(pattern_and_scope, 3) == [set_("user:2", 2), removed("user:2"), CLEARED]
        assert until_cleared(pattern_and_scope) == [RESTORED]
        assert taken(names_and_scope, 2) == [set_("a", 1), CLEARED]
        assert until_cleared(names_and_scope) == [RESTORED]


def test_a_pattern_only_python_can_match_filters_as_re_search_does(state, peer):
    # A backreference and a lookahead: a server's RE2 cannot match them, the watcher's process does.
    with state.watch(r"(\w)\1") as repeated, state.watch(r"^a(?!b)") as lookahead:
        for name in ("xaa", "xab", "ab", "ac", "été"):
            peer.set(name, 1)
        peer.clear()
        assert until_cleared(repeated) == [set_("xaa", 1)]
        assert until_cleared(lookahead) == [set_("ac", 1)]


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"pattern": 5}, TypeError),
        ({"pattern": "("}, ValueError),
        ({"names": "abc"}, TypeError),
        ({"names": ["a", 5]}, TypeError),
        ({"scope": 5}, TypeError),
        ({"buffer": 0}, ValueError),
        ({"buffer": "10"}, TypeError),
        ({"buffer": 2.5}, TypeError),
    ],
)
def test_watch_refuses_bad_arguments(state, arguments, error):
    with pytest.raises(error):
        state.watch(**arguments).__enter__()


def test_wait_refuses_bad_arguments(state):
    with pytest.raises(TypeError):
        state.wait(5)
    with pytest.raises(TypeError):
        state.wait("x", timeout="1")
    with pytest.raises(ValueError):
        state.wait("x", timeout=-2)  # -1 is no timeout, as for a lock


def test_a_watcher_more_than_its_buffer_behind_gets_one_overflow_then_the_present(state, peer):
    with state.watch(buffer=5) as changes:
        for value in range(20):
            peer.set("k", value)
        assert changes.next(10) == OVERFLOW
        peer.clear()
        rest = until_cleared(changes)
        assert OVERFLOW not in rest
        assert 1 <= len(rest) <= 5
        assert [change.value for change in rest] == list(range(20 - len(rest), 20))
        peer.set("k", "after")  # and it goes on
        assert changes.next(10) == set_("k", "after")


def test_wait_answers_the_next_change_of_its_name(state, peer):
    peer.set("x", 0)
    timer = threading.Timer(0.2, lambda: (peer.set("other", 1), peer.set("x", 1)))
    timer.start()
    try:
        assert state.wait("x", timeout=10) == 1
    finally:
        timer.join()
    timer = threading.Timer(0.2, peer.remove, ("x",))
    timer.start()
    try:
        assert state.wait("x", timeout=10) is None
    finally:
        timer.join()
    with pytest.raises(TimeoutError):
        state.wait("x", timeout=0.05)


def _set_until(target: Any, stop: Any) -> None:
    """In a child process: set ``x`` to 1, 2, 3... until ``stop`` is set."""
    with target.connect() as state:
        value = 0
        while not stop.wait(0.02):
            value += 1
            state.set("x", value)


def test_wait_sees_a_change_made_by_another_process(state, target, child_context):
    stop = child_context.Event()
    child = child_context.Process(target=_set_until, args=(target, stop))
    child.start()
    try:
        first = state.wait("x", timeout=30)
        second = state.wait("x", timeout=30)
        assert type(first) is int and second > first  # a change after each call began
    finally:
        stop.set()
        child.join(30)
    assert child.exitcode == 0


def test_closing_stops_the_iteration_also_from_another_thread(state):
    changes = state.watch()
    changes.__enter__()
    started = threading.Event()
    got: list[Any] = []

    def iterate() -> None:
        started.set()
        got.append(changes.next(None))  # blocks until the close

    thread = threading.Thread(target=iterate)
    thread.start()
    started.wait(10)
    changes.__exit__(None, None, None)
    thread.join(30)
    assert not thread.is_alive() and got == [None]
    assert changes.next(0.1) is None


def test_a_closed_changes_iterator_ends(sync_state):
    changes = sync_state.watch()
    sync_state.set("a", 1)
    assert next(changes) == set_("a", 1)
    changes.close()
    assert list(changes) == []
    changes.close()  # again: nothing


def test_the_asyncio_iterators(async_target, event_loop_thread):
    async def run() -> list[Any]:
        astate = await sharedstate.aio.connect(async_target.address, async_target.authkey, **async_target.options())
        try:
            seen = []
            async with astate.watch(names=["a"]) as changes:
                await astate.set("a", 1)
                await astate.set("b", 1)
                await astate.remove("a")
                async for change in changes:
                    seen.append(change)
                    if change.kind == "removed":
                        break
            later = astate.watch("^c")  # used only with async for: it starts at the first iteration
            got = []

            async def write_soon() -> None:
                while not got:
                    await astate.set("c", len(got))
                    await asyncio.sleep(0.05)

            writer = asyncio.ensure_future(write_soon())
            async for change in later:
                got.append(change)
                break
            await later.aclose()
            await writer
            assert await later.next(0.1) is None
            return seen + got
        finally:
            await astate.close()

    seen = event_loop_thread.run(run())
    assert seen[:2] == [set_("a", 1), removed("a")]
    assert seen[2].name == "c" and seen[2].kind == "set"


def test_an_expired_name_reaches_its_watchers_though_no_call_touches_it(state):
    """Removed where the state lives (the server's sweeper; on Redis, a watching process' purge), and
    told as "expired" to the watchers its scope and name match; ``wait`` answers ``None`` for it."""
    with state.watch(scope="sess") as scoped, state.watch(names=["other"]) as others:
        state.set("s", {"user": "ada"}, scope="sess", ttl=0.3)
        assert taken(scoped, 2) == [set_("s", {"user": "ada"}), Change("s", "expired", None)]
        state.set("w", 1, ttl=0.5)  # time enough for wait to start watching first
        assert state.wait("w", timeout=10) is None
        state.clear()
        assert until_cleared(others) == []
        assert until_cleared(scoped) == []


def test_two_threads_reading_one_watch_get_each_change_once(state, peer):
    # Their reads take turns (one waits at a time), so no change is taken twice.
    last = 99
    got: list[Any] = []
    done = threading.Event()
    with state.watch(names=["x"]) as changes:

        def read() -> None:
            while not done.is_set():
                change = changes.next(0.2)
                if change is not None:
                    got.append(change.value)
                    if change.value == last:
                        done.set()

        readers = [threading.Thread(target=read) for _ in range(2)]
        for reader in readers:
            reader.start()
        try:
            for value in range(last + 1):
                peer.set("x", value)
            for reader in readers:
                reader.join(60)
            assert not any(reader.is_alive() for reader in readers), f"the last change never came: {sorted(got)}"
        finally:
            done.set()  # a failed test's readers end too
            for reader in readers:
                reader.join(10)
    assert sorted(got) == list(range(last + 1))


def test_next_with_no_time_left_answers_what_is_there_at_once(state):
    """``next(0)`` takes a change made before it without waiting, and answers ``None`` when none is there
    (on asyncio too, where taking the watcher's turn must not need the event loop to run first)."""
    with state.watch() as changes:
        assert changes.next(0) is None
        state.set("a", 1)
        state.set("b", 2)
        assert changes.next(0) == set_("a", 1)
        assert changes.next(0) == set_("b", 2)
        assert changes.next(0) is None
