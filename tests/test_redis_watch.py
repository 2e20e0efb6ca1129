"""Change notifications on the Redis backend: the namespace's stream, written by the scripts that change
the names while someone watches; kinds, order and filters; overflow when the stream's cap trimmed what a
watcher had not read, when it is more than its buffer behind, or when its process' registration was lost;
a watcher in another process; asyncio; a Redis restart under a watcher. The semantics every backend
shares are the contract suite's (``tests/contract/test_watch.py``)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import RedisServer, clean_env, reap, redis_missing, wait_until

import sharedstate
from sharedstate import Change, ServerUnavailable, SharedStateError, aio
from sharedstate.backends.redis import watch
from sharedstate.backends.redis.scripts import NOTE_MAX
from sharedstate.backends.redis.steps import Script, run
from sharedstate.backends.redis.watch import READ_CHUNK, STREAM_MIN

OVERFLOW = Change(None, "overflow", None)


def _all(changes, timeout: float = 5.0) -> list[Change]:
    """Every change waiting now: the first within ``timeout``, then those already there."""
    got = []
    change = changes.next(timeout)
    while change is not None:
        got.append(change)
        change = changes.next(0)
    return got


def test_every_kind_of_change_in_commit_order(redis_state, tmp_path):
    state = redis_state
    saved = state.save(tmp_path / "s.json")
    with state.watch() as changes:
        state.set("a", 1)
        state.update({"b": [1], "c": "x"})
        state.incr("a", 2)
        state.append("b", 2)
        state.setdefault("c", "ignored")  # exists: no change
        state.setdefault("d", None)
        state.compare_and_set("a", 99, 0)  # no match: no change
        state.compare_and_set("a", 3, 4)
        state.incr("big", 2**60)  # finished in Python
        state.expire("a", 60)  # only the deadline: no change
        state.remove("d")
        assert state.pop("c") == "x"
        state.clear()
        state.restore(saved)
        state.set("e", 1, ttl=0.2)
        expected = [
            Change("a", "set", 1),
            Change("b", "set", [1]),
            Change("c", "set", "x"),
            Change("a", "set", 3),
            Change("b", "set", [1, 2]),
            Change("d", "set", None),
            Change("a", "set", 4),
            Change("big", "set", 2**60),
            Change("d", "removed"),
            Change("c", "removed"),
            Change(None, "cleared"),
            Change(None, "restored"),
            Change("e", "set", 1),
            Change("e", "expired"),
        ]
        got = []
        while len(got) < len(expected):
            change = changes.next(5)
            assert change is not None, got
            got.append(change)
        assert got == expected


def test_filters_apply_to_named_changes_and_clear_and_restore_reach_everyone(redis_state, tmp_path):
    state = redis_state
    saved = state.save(tmp_path / "s.json")
    with state.watch("^user:") as by_pattern, state.watch(names=["b"]) as by_name, state.watch(scope="s") as scoped:
        state.set("user:1", 1)
        state.set("a", 1, scope="s")
        state.set("b", 2)
        state.remove("a")
        state.set("t", 1, scope=["x", "s"], ttl=0.2)
        wait_until(lambda: "t" not in state, 5, what="the deadline")
        state.clear()
        state.restore(saved)
        whole = [Change(None, "cleared"), Change(None, "restored")]
        assert _all(by_pattern) == [Change("user:1", "set", 1), *whole]
        assert _all(by_name) == [Change("b", "set", 2), *whole]
        assert _all(scoped) == [
            Change("a", "set", 1),
            Change("a", "removed"),
            Change("t", "set", 1),
            Change("t", "expired"),
            *whole,
        ]


def test_writers_note_nothing_while_nobody_watches(redis_state, redis_server, redis_namespace):
    redis_state.set("a", 1)
    redis_state.incr("n")
    with redis_server.client() as client:
        assert client.exists(f"{redis_namespace}:changes") == 0
    with redis_state.watch() as changes:
        redis_state.set("a", 2)
        assert changes.next(5) == Change("a", "set", 2)


def test_the_streams_cap_follows_the_live_watchers_and_the_stream_goes_with_the_last(
    redis_state, redis_server, redis_namespace
):
    keys = f"{redis_namespace}:watching", f"{redis_namespace}:changes"
    with redis_server.client() as client, redis_state.watch() as changes:
        with redis_state.watch(buffer=STREAM_MIN * 2):
            redis_state.set("a", 1)
            assert int(client.hget(keys[0], "cap")) == STREAM_MIN * 2
            with redis_state.watch():  # a new watch asks for the process' largest buffer, not its own
                assert int(client.hget(keys[0], "cap")) == STREAM_MIN * 2
        wait_until(lambda: int(client.hget(keys[0], "cap")) == STREAM_MIN, 5, what="the next tick")
        assert changes.next(5) == Change("a", "set", 1)
        # Renewed with the watchers' lease: gone once nobody renews it.
        assert 0 < client.pttl(keys[1]) <= watch.LEASE_S * 1000


def test_a_stream_a_write_creates_after_the_watch_gets_the_watchers_lease(redis_state, redis_server, redis_namespace):
    """The watch's lease was given while the stream did not exist yet (nothing written during the watch):
    the write that creates it gives it the rest of that lease, so it does not outlive every watcher."""
    redis_state.watch().close()  # as wait() does: gone before its first tick
    redis_state.set("a", 1)
    with redis_server.client() as client:
        assert 0 < client.pttl(f"{redis_namespace}:changes") <= watch.LEASE_S * 1000


def test_a_watcher_more_than_its_buffer_behind_gets_one_overflow_and_goes_on(redis_state):
    """Then the newest ``buffer`` changes it read, as a local server's queue that dropped what it held."""
    with redis_state.watch(buffer=5) as changes:
        for i in range(10):
            redis_state.set("n", i)
        assert _all(changes) == [OVERFLOW, *(Change("n", "set", i) for i in range(5, 10))]
        redis_state.set("n", "after")
        assert _all(changes) == [Change("n", "set", "after")]


def test_entries_trimmed_by_the_streams_cap_before_they_were_read_are_an_overflow(redis_state):
    """One ``update`` of more names than the stream keeps: the entries after the watcher's place are gone
    (the stream's ids have a gap), though none of them passed its filter; those after the gap still come."""
    with redis_state.watch(names=["last"], buffer=10) as changes:
        redis_state.update({f"n{i}": i for i in range(STREAM_MIN + 2000)})
        redis_state.set("last", 1)
        assert _all(changes) == [OVERFLOW, Change("last", "set", 1)]
        redis_state.set("last", 2)
        assert _all(changes) == [Change("last", "set", 2)]


def test_a_lost_registration_is_an_overflow_not_a_silent_loss(redis_state, redis_server, redis_namespace):
    """The keys that make writers note changes are gone (as after a FLUSHDB): a change made before this
    process' next tick is not in the stream, so the watcher is told it may have missed some."""
    with redis_state.watch() as changes:
        with redis_server.client() as client:
            client.delete(f"{redis_namespace}:watching", f"{redis_namespace}:watchers")
        redis_state.set("unnoted", 1)
        assert changes.next(5) == OVERFLOW
        redis_state.set("noted", 1)
        assert _all(changes) == [Change("noted", "set", 1)]


def test_a_new_watch_in_a_lapsed_process_tells_its_older_watchers(redis_state, redis_server, redis_namespace):
    """The new watch re-registers the process: the older watcher must still hear of the changes that went
    unnoted meanwhile, whether the new watch or the tick found the lapse."""
    with redis_state.watch() as older:
        with redis_server.client() as client:
            client.delete(f"{redis_namespace}:watching", f"{redis_namespace}:watchers")
        redis_state.set("unnoted", 1)
        with redis_state.watch():
            redis_state.set("noted", 1)
            assert older.next(5) == OVERFLOW


def test_only_watching_lost_is_an_overflow(redis_state, redis_server, redis_namespace):
    """``NS:watching`` alone is gone (evicted, deleted) while the process is registered: writers noted
    nothing until the next tick made it again."""
    with redis_state.watch() as changes:
        with redis_server.client() as client:
            client.delete(f"{redis_namespace}:watching")
        redis_state.set("unnoted", 1)
        assert changes.next(5) == OVERFLOW


def _other_process_ticks(state, seen: int = 0) -> None:
    """What another process' ``watch()`` or tick does: ``scripts.WATCH`` with a token of its own."""
    backend = state.backend
    keys = [*backend._keys, backend._prefix + "watchers"]
    step = run_script("watch", keys, ["other-process", int(watch.LEASE_S * 1000), STREAM_MIN, 0, seen])
    run(step, backend._conn)


def run_script(name, keys, args):
    return (yield Script(name, keys, args))


def test_watching_made_again_by_another_process_is_a_lapse_here_too(redis_state, redis_server, redis_namespace):
    """``NS:watching`` lost, then made again by another process' tick before this process' own: the change
    made meanwhile went unnoted for this process' watchers too."""
    with redis_state.watch() as changes:
        with redis_server.client() as client:
            client.delete(f"{redis_namespace}:watching")
            redis_state.set("unnoted", 1)
            _other_process_ticks(redis_state)
        redis_state.set("noted", 1)
        assert changes.next(5) == OVERFLOW


def test_numbering_begun_again_by_a_process_that_read_less_is_a_gap_to_those_that_read_more(
    redis_state, redis_server, redis_namespace
):
    """``NS:watching`` and the stream lost, then made again by a process that had read nothing: the new
    numbers cannot be ones this process' watcher already read, so it sees the gap at once."""
    with redis_state.watch() as changes:
        for i in range(5):
            redis_state.set("x", i)
        assert _all(changes) == [Change("x", "set", i) for i in range(5)]
        with redis_server.client() as client:
            client.delete(f"{redis_namespace}:watching", f"{redis_namespace}:changes")
            redis_state.set("unnoted", 1)
            _other_process_ticks(redis_state)
        for i in range(8):
            redis_state.set("y", i)
        assert changes.next(5) == OVERFLOW


def test_a_stream_lost_alone_goes_on_numbering_so_unread_entries_lost_are_an_overflow(
    redis_state, redis_server, redis_namespace
):
    with redis_state.watch() as changes, redis_state.watch() as behind:
        for i in range(3):
            redis_state.set("x", i)
        assert _all(changes) == [Change("x", "set", i) for i in range(3)]
        with redis_server.client() as client:
            client.delete(f"{redis_namespace}:changes")
        for i in range(5):
            redis_state.set("y", i)
        ys = [Change("y", "set", i) for i in range(5)]
        assert _all(changes) == ys  # it had read everything lost: nothing missed
        assert _all(behind) == [OVERFLOW, *ys]


def test_a_large_value_is_not_copied_into_the_stream_and_watchers_read_it_when_they_read_the_change(
    redis_state, redis_server, redis_namespace
):
    """``append`` to a long list would otherwise write the whole list to the stream each time."""
    items = ["x" * 1000] * (NOTE_MAX // 1000 + 1)
    with redis_state.watch() as changes:
        redis_state.set("list", items)
        redis_state.append("list", "y")
        redis_state.set("small", 1)
        with redis_server.client() as client:
            noted = sum(len(fields.get(b"v", b"")) for _, fields in client.xrange(f"{redis_namespace}:changes"))
        assert noted < 100
        now = [*items, "y"]  # the value when the watcher reads: the first change's too
        assert _all(changes) == [Change("list", "set", now), Change("list", "set", now), Change("small", "set", 1)]


def test_an_entry_leaves_out_the_fields_that_hold_their_default(redis_state, redis_server, redis_namespace):
    """Most changes have no scopes and a value in the entry: those two fields are left out (each field
    costs every watcher's parse and the stream's memory); an entry that carries them is read alike."""
    with redis_state.watch() as changes:
        redis_state.set("plain", 1)
        redis_state.set("scoped", 2, scope="team")
        redis_state.set("big", "x" * (NOTE_MAX + 1))
        with redis_server.client() as client:
            stream = f"{redis_namespace}:changes"
            entries = [fields for _, fields in client.xrange(stream)]
            assert [sorted(fields) for fields in entries] == [
                [b"k", b"n", b"v"],
                [b"L", b"k", b"n", b"s", b"v"],
                [b"L", b"k", b"n", b"s", b"v"],
            ]
            assert entries[2][b"L"] == b"1" and entries[1][b"s"] != b""
        assert _all(changes) == [
            Change("plain", "set", 1),
            Change("scoped", "set", 2),
            Change("big", "set", "x" * (NOTE_MAX + 1)),
        ]


_ENTRY_READER = """
import json
from sharedstate import Change
from sharedstate._pattern import compile_pattern
from sharedstate.backends.redis.watch import _LARGE, Cursor


def cursor(scopes=(), names=None, pattern=None):
    made = object.__new__(Cursor)  # only its filters: what ``_change`` reads
    made.scopes, made.names = frozenset(scopes), names if names is None else frozenset(names)
    made.pattern = None if pattern is None else compile_pattern(pattern)
    return made


def entry(as_text, **fields):
    return {(key if as_text else key.encode()): (value if as_text else value.encode()) for key, value in fields.items()}


for as_text in (False, True):
    plain = entry(as_text, k="s", n="a", v="1")  # the fields a change without scopes has now
    full = entry(as_text, k="s", n="a", v="1", s="", L="0")  # as an older version writes every change
    scoped = entry(as_text, k="s", n="a", v='{"x":1}', s=json.dumps(["team"]), L="0")
    large = entry(as_text, k="s", n="a", v="", s=json.dumps(["team"]), L="1")
    removed = entry(as_text, k="r", n="a", v="")
    for fields in (plain, full):
        assert cursor()._change(fields) == Change("a", "set", 1)
        assert cursor(scopes=["team"])._change(fields) is None
        assert cursor(names=["b"])._change(fields) is None
        assert cursor(pattern="^a$")._change(fields) == Change("a", "set", 1)
    assert cursor(scopes=["team"])._change(scoped) == Change("a", "set", {"x": 1})
    assert cursor(scopes=["other"])._change(scoped) is None
    assert cursor()._change(large) == Change("a", "set", _LARGE)
    assert cursor()._change(removed) == Change("a", "removed")
    assert cursor()._change(entry(as_text, k="c")) == Change(None, "cleared")
    assert cursor()._change(entry(as_text, k="w")) is None  # a wake-up every watcher skips
    assert cursor()._change(entry(as_text, n="a", v="1")) is None  # written by someone else
    assert cursor()._change({}) is None
print("ok")
"""


def test_entries_of_every_shape_are_read_as_bytes_or_text_without_mixing_the_two():
    """Entries as this version writes them and as an older one did (every field), as redis-py answers them
    (bytes) or decoded (``decode_responses``); under ``python -bb`` a bytes key compared with a str one
    would be an error."""
    result = subprocess.run(
        [sys.executable, "-bb", "-c", _ENTRY_READER], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


class _Interrupted:
    """A watcher's client whose second ``XREAD`` is interrupted (Ctrl-C, or a task cancelled while it waits)."""

    def __init__(self, client) -> None:
        self.client, self.calls = client, 0

    def xread(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.client.xread(*args, **kwargs)


def test_a_read_cut_short_between_two_chunks_leaves_what_it_read_to_the_next(redis_state):
    with redis_state.watch() as changes:
        redis_state.update({f"n{i}": i for i in range(READ_CHUNK + 10)})
        cursor = changes._watcher._cursor
        conn = redis_state.backend._conn
        with pytest.raises(KeyboardInterrupt):
            run(cursor.read(5), conn, _Interrupted(conn.watches))
        assert not cursor.reading
        assert _all(changes) == [Change(f"n{i}", "set", i) for i in range(READ_CHUNK + 10)]


def test_a_write_whose_note_fails_changes_nothing(redis_state, redis_server, redis_namespace, tmp_path):
    """A key of another kind holds the stream's name (here a stream with ids of its own): the write raises,
    and neither the data nor the other keys were changed."""
    redis_state.set("a", 1, ttl=60)
    saved = redis_state.save(tmp_path / "s.json")
    redis_state.remove("a")
    with redis_server.client() as client:
        client.xadd(f"{redis_namespace}:changes", {"x": "1"})
    with redis_state.watch():
        calls = (lambda: redis_state.set("a", 1, ttl=60), lambda: redis_state.update({"a": 1}))
        for call in (*calls, lambda: redis_state.restore(saved)):
            with pytest.raises(SharedStateError):
                call()
            assert redis_state.get("a") is None
            assert redis_state.ttl("a") is None


def test_a_socket_timeout_in_the_url_sizes_the_watchers_waits(redis_server, redis_namespace):
    state = sharedstate.connect(redis_server.url + "?socket_timeout=0.4", namespace=redis_namespace)
    try:
        with state.watch() as changes:
            assert changes.next(1) is None  # not an overflow, nor an error, after the socket timed out
            state.set("a", 1)
            assert changes.next(5) == Change("a", "set", 1)
    finally:
        state.close()


def test_a_stopped_redis_server_does_not_lapse_the_watches_of_another(
    redis_state, redis_namespace, tmp_path, monkeypatch
):
    """One thread renews every watch of the process: a tick to a server that stopped answering gives up
    well within the lease, so the other server's watchers are renewed in time."""
    monkeypatch.setattr(watch, "LEASE_S", 2.5)
    other = RedisServer(tmp_path).start()
    try:
        stopped = sharedstate.connect(other.url, namespace="other")
        with redis_state.watch() as changes, stopped.watch():
            os.kill(other.proc.pid, signal.SIGSTOP)
            try:
                got = []
                deadline = time.monotonic() + 3.5
                i = 0
                while time.monotonic() < deadline:
                    redis_state.set("n", i)
                    i += 1
                    got += _all(changes, 0.1)
            finally:
                os.kill(other.proc.pid, signal.SIGCONT)
            got += _all(changes, 1)
            assert got == [Change("n", "set", j) for j in range(i)]
        stopped.close()
    finally:
        other.stop()


def _watch_in_child(url: str, namespace: str, ready, queue) -> None:
    state = sharedstate.connect(url, namespace=namespace)
    with state.watch(names=["flag", "stop"]) as changes:
        ready.set()
        got = []
        for change in changes:
            if change.name == "stop":
                break
            got.append(tuple(change))
    queue.put(got)


def test_a_watcher_in_another_process_sees_every_change_from_the_moment_watch_returned(
    redis_state, redis_server, redis_namespace
):
    ctx = multiprocessing.get_context("spawn")
    ready, queue = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_watch_in_child, args=(redis_server.url, redis_namespace, ready, queue))
    child.start()
    try:
        assert ready.wait(60)
        for value in (True, False, True):
            redis_state.set("flag", value)
            redis_state.set("other", value)
        redis_state.remove("flag")
        redis_state.set("stop", 1)
        assert queue.get(timeout=30) == [
            ("flag", "set", True),
            ("flag", "set", False),
            ("flag", "set", True),
            ("flag", "removed", None),
        ]
    finally:
        reap(child)
    assert child.exitcode == 0


def test_wait_answers_the_next_change_of_its_name(redis_state):
    timer = threading.Timer(0.2, lambda: (redis_state.set("other", 1), redis_state.set("w", "new")))
    timer.start()
    try:
        assert redis_state.wait("w", timeout=10) == "new"
    finally:
        timer.join()
    with pytest.raises(TimeoutError):
        redis_state.wait("w", timeout=0.2)


def test_the_asyncio_face_watches_and_waits_without_blocking_the_loop(redis_state, redis_server, redis_namespace):
    async def main() -> None:
        state = await aio.connect(redis_server.url, namespace=redis_namespace)
        try:
            async with state.watch(names=["a", "b"]) as changes:
                ticks = 0

                async def ticking() -> None:
                    nonlocal ticks
                    while True:
                        await asyncio.sleep(0.01)
                        ticks += 1

                ticker = asyncio.create_task(ticking())
                assert await changes.next(0.3) is None  # the loop kept running meanwhile
                assert ticks >= 5
                ticker.cancel()
                redis_state.set("a", 1)
                redis_state.set("c", 1)
                await state.set("b", 2)
                assert [await changes.next(5), await changes.next(5)] == [Change("a", "set", 1), Change("b", "set", 2)]
            waiter = asyncio.create_task(state.wait("b", timeout=10))
            await asyncio.sleep(0.2)
            await state.remove("b")
            assert await waiter is None
            with pytest.raises(TimeoutError):
                await state.wait("b", timeout=0.2)
        finally:
            await state.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_watcher_across_a_redis_restart_raises_then_overflows_and_goes_on(tmp_path):
    """Redis goes away under a blocked ``XREAD``: the watcher raises the backend's usual error at once
    (no hang); once Redis is back, it answers an overflow (a Redis without persistence lost the stream)
    and the changes after it."""
    why = redis_missing()
    if why is not None:
        pytest.skip(why)
    server = RedisServer(tmp_path).start()
    try:
        state = sharedstate.connect(server.url, namespace="restart", timeout=5)
        with state.watch() as changes:
            state.set("a", 1)
            assert changes.next(5) == Change("a", "set", 1)
            stop = threading.Timer(0.3, server.stop)
            stop.start()
            with pytest.raises(ServerUnavailable):
                changes.next(10)
            stop.join()
            server.start()
            assert changes.next(5) == OVERFLOW
            state.set("b", 2)
            assert _all(changes) == [Change("b", "set", 2)]
        state.close()
    finally:
        server.stop()


def test_a_large_update_does_not_make_other_clients_busy(redis_state, redis_server):
    """Past Redis' ``busy-reply-threshold`` a running script makes every other client's call fail with
    ``BUSY``; a ``MULTI`` block of short steps only makes them wait. Watched, so that the notes are written."""
    errors: list[BaseException] = []
    done = threading.Event()
    other = sharedstate.connect(redis_server.url, namespace=redis_state.backend.namespace)

    def read() -> None:
        while not done.is_set():
            try:
                other.get("n1")
            except SharedStateError as exc:
                errors.append(exc)
            time.sleep(0.002)

    with redis_server.client() as client, redis_state.watch(names=["none"]):
        # ``lua-time-limit``: the name Redis 6.2 knows, kept by 7 for ``busy-reply-threshold``. 50 ms: far
        # below what this update takes as one script, above what one of its short steps takes under load.
        (before,) = client.config_get("lua-time-limit").values()
        client.config_set("lua-time-limit", 50)
        thread = threading.Thread(target=read)
        thread.start()
        try:
            redis_state.update({f"n{i}": i for i in range(50_000)})
        finally:
            done.set()
            thread.join(30)
            client.config_set("lua-time-limit", before)
            other.close()
    assert not thread.is_alive()
    assert errors == []
    assert redis_state.get("n49999") == 49_999
