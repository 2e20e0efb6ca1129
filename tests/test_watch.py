"""Watches on a local server (``server.changes``): watchers in processes of every start method, a
watcher killed or stopped, a server that restarts under a watcher, cancelled asyncio waits, what the
writer's thread hands over, the byte bound, bad calls, and two readers of one watch. (What every
backend does: tests/contract/test_watch.py.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import threading

import pytest
from conftest import kill, reap, wait_until
from watch_workers import count_in_bursts, count_to, watch_forever, watch_until

import sharedstate
import sharedstate.aio
from sharedstate import Change
from sharedstate._sentinels import HANDED
from sharedstate.server.changes import BUFFER_BYTES, Waiting
from sharedstate.server.clients import Client
from sharedstate.server.serving import _readable_within
from sharedstate.server.store import Store

OVERFLOW = Change(None, "overflow", None)


class Recorded:
    """A value that notes in ``pickled`` each time it is pickled."""

    def __init__(self, pickled: list) -> None:
        self.pickled = pickled

    def __reduce__(self):
        self.pickled.append(1)
        return (int, ())


@pytest.fixture
def server():
    with sharedstate.StateServer() as server:
        yield server


def test_watchers_under_every_start_method_see_a_writer_process_changes_in_order(server):
    state = server.state
    last = 300
    watchers = []
    for method in ("fork", "spawn", "forkserver"):
        context = multiprocessing.get_context(method)
        ready, out = context.Event(), context.Queue()
        process = context.Process(target=watch_until, args=(state, ready, last, out))
        process.start()
        watchers.append((method, process, ready, out))
    writer = None
    try:
        for method, _, ready, _ in watchers:
            assert ready.wait(60), f"the {method} watcher did not start"
        writer = multiprocessing.get_context("fork").Process(target=count_to, args=(state, last))
        writer.start()
        for method, _, _, out in watchers:
            assert out.get(timeout=60) == [("n", "set", value) for value in range(1, last + 1)], method
    finally:
        reap(*(process for _, process, _, _ in watchers), *([writer] if writer else []))


def test_a_killed_watcher_process_frees_its_watch(server):
    state = server.state
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    process = context.Process(target=watch_forever, args=(state, ready))
    process.start()
    try:
        assert ready.wait(30)
        assert state.stats()["watchers"] == 1
        kill(process.pid)
        wait_until(lambda: state.stats()["watchers"] == 0, 10, what="the dead watcher's watch to go")
        state.set("after", 1)  # nobody to tell: the write goes on
    finally:
        reap(process)


def test_a_stopped_watcher_overflows_instead_of_growing_the_server(server):
    state = server.state
    context = multiprocessing.get_context("fork")
    ready, out = context.Event(), context.Queue()
    last = 2000
    process = context.Process(target=watch_until, args=(state, ready, last, out, 10))
    process.start()
    try:
        assert ready.wait(30)
        os.kill(process.pid, signal.SIGSTOP)
        try:
            big = "x" * 10_000
            for value in range(1, last):
                state.set("n", [value, big] if value < last - 5 else value)
            stats = state.stats()
            assert stats["watchers"] == 1
            assert stats["watch_queued"] <= 11  # its buffer and one overflow marker, not 2000 values
        finally:
            os.kill(process.pid, signal.SIGCONT)
        state.set("n", last)
        seen = out.get(timeout=30)
    finally:
        reap(process)
    kinds = [kind for _, kind, _ in seen]
    assert kinds.count("overflow") == 1
    after = seen[kinds.index("overflow") + 1 :]
    assert [value for _, _, value in after][-6:] == list(range(last - 5, last + 1))


def test_a_watcher_gets_one_overflow_after_a_restart_of_the_server_and_goes_on(server):
    state = server.state
    astate = None
    with state.watch(names=["x"]) as changes:
        old = server.pid
        got: list = []
        waiting = threading.Thread(target=lambda: got.append(changes.next(60)))
        waiting.start()
        wait_until(lambda: state.stats()["watchers"] == 1, 10)
        kill(old)
        waiting.join(60)
        assert got == [OVERFLOW]  # the waiting call learns that changes may be lost
        assert server.pid != old
        state.set("x", 1)
        assert changes.next(10) == Change("x", "set", 1)

        async def restarted_under_an_async_watcher() -> list:
            nonlocal astate
            astate = await sharedstate.aio.connect(server.address, server.authkey)
            try:
                async with astate.watch(names=["x"]) as achanges:
                    before = server.pid
                    kill(before)
                    first = await achanges.next(60)  # reaches the new server
                    await astate.set("x", 2)
                    return [first, await achanges.next(10), before != server.pid]
            finally:
                await astate.close()

        assert asyncio.run(restarted_under_an_async_watcher()) == [OVERFLOW, Change("x", "set", 2), True]
        # The blocking watcher, idle meanwhile, finds its watch gone too.
        assert changes.next(10) == OVERFLOW
        state.set("x", 3)
        assert changes.next(10) == Change("x", "set", 3)


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_a_waiting_watcher_gets_small_and_large_values(where):
    # A small answer is written by the writer's thread on a Unix socket; a large one, or any on TCP, by
    # the thread that waits, woken through its pipe.
    with sharedstate.StateServer(address=("127.0.0.1", 0) if where == "tcp" else None) as server:
        state = server.state
        with state.watch() as changes:
            for value in ("small", "x" * 200_000, "small again"):
                got: list = []
                waiting = threading.Thread(target=lambda got=got: got.append(changes.next(30)))
                waiting.start()
                wait_until(lambda: state.stats()["watch_waiting"] == 1, 10, what="the watcher to wait")
                state.set("v", value)
                waiting.join(30)
                assert got == [Change("v", "set", value)]


def test_a_cancelled_async_wait_ends_in_the_server_and_loses_nothing(server):
    async def run() -> list:
        astate = await sharedstate.aio.connect(server.address, server.authkey)
        try:
            async with astate.watch(names=["x"]) as changes:
                waiting = asyncio.ensure_future(changes.next(None))
                while (await astate.stats())["watch_waiting"] != 1:
                    await asyncio.sleep(0.01)
                waiting.cancel()
                try:
                    await waiting
                except asyncio.CancelledError:
                    pass
                while (await astate.stats())["watch_waiting"] != 0:  # the server's wait ended too
                    await asyncio.sleep(0.01)
                await astate.set("x", 1)
                return [await changes.next(10), waiting.cancelled()]
        finally:
            await astate.close()

    assert asyncio.run(run()) == [Change("x", "set", 1), True]


def test_async_nexts_cancelled_mid_wait_keep_the_order_and_raise_no_false_overflow(server):
    # A cancelled next() leaves its batch to arrive late; the next next() waits for it before it asks
    # for more, so the batches neither cross nor look lost (a false overflow) to the server.
    last = 1000
    context = multiprocessing.get_context("fork")
    go = context.Event()
    writer = context.Process(target=count_in_bursts, args=(server.state, go, last))
    writer.start()

    async def run() -> tuple[list, int]:
        astate = await sharedstate.aio.connect(server.address, server.authkey)
        seen, cancels, in_a_row = [], 0, 0
        try:
            async with astate.watch(names=["n"], buffer=100_000) as changes:
                go.set()
                while not seen or seen[-1].value != last:
                    # 0.3 ms, doubled after each cancel in a row: a slow machine still gets on.
                    try:
                        seen.append(await asyncio.wait_for(changes.next(None), 0.0003 * 2 ** min(in_a_row, 12)))
                        in_a_row = 0
                    except asyncio.TimeoutError:
                        cancels += 1
                        in_a_row += 1
        finally:
            await astate.close()
        return seen, cancels

    try:
        seen, cancels = asyncio.run(asyncio.wait_for(run(), 90))
    finally:
        reap(writer)
    assert cancels > 0
    assert seen == [Change("n", "set", value) for value in range(1, last + 1)]


def _waiting_on(
    store: Store, client: Client, ident: int, sock: socket.socket, got: int
) -> tuple[threading.Thread, list]:
    """A thread in ``Watchers.next`` for watch ``ident`` (``got`` batches received), as a server's
    connection thread waits on ``sock``; once it waits. Its answer goes to the list."""
    answer: list = []
    waiting = Waiting(sock.fileno())
    readable = _readable_within(sock.fileno())

    def wait() -> None:
        try:
            answer.append(store.watchers.next(ident, client, 30, got, readable, waiting))
        finally:
            waiting.close()

    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(lambda: store.watchers.figures()["watch_waiting"] == 1, 10, what="the watcher to wait")
    return thread, answer


def _frames(sock: socket.socket) -> list:
    """The answers written to ``sock``'s peer so far, each a whole frame (else ``AssertionError``)."""
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except BlockingIOError:
        pass
    answers = []
    while data:
        (size,) = struct.unpack("!i", data[:4])
        assert len(data) >= 4 + size, f"a frame of {size} bytes cut at {len(data) - 4}"
        answers.append(pickle.loads(data[4 : 4 + size]))
        data = data[4 + size :]
    return answers


def test_the_writers_thread_hands_over_only_what_a_send_takes_whole_and_never_pickles_a_large_value():
    # A Unix socket with a small send buffer (as on macOS): a non-blocking send of more than part of it
    # may be cut short, which would corrupt the stream. And a large value is never pickled by the writer
    # (with the store's mutex held): the waiting thread answers it.
    store = Store()
    client = Client(("test", os.getpid(), None), os.getpid(), False, None)
    ident = store.watchers.open(client, None, None, [], 100)
    server_end, client_end = socket.socketpair()
    pickled = []
    try:
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        thread, answer = _waiting_on(store, client, ident, server_end, 0)
        store.set("v", "x" * 12_000)
        thread.join(30)
        assert answer == [[("v", "set", "x" * 12_000)]]  # answered by the waiting thread
        assert _frames(client_end) == []

        thread, answer = _waiting_on(store, client, ident, server_end, 1)
        store.set("v", "small")
        client_end.send(b"?")  # the caller's next request: it ends the wait, which answered nothing
        thread.join(30)
        assert server_end.recv(1) == b"?"
        assert answer == [HANDED]  # answered by the writer's thread, in one piece
        assert _frames(client_end) == [("#RETURN", [("v", "set", "small")])]

        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        thread, answer = _waiting_on(store, client, ident, server_end, 2)
        large = [Recorded(pickled) for _ in range(100_000)]
        store.set("v", large)
        thread.join(30)
        assert answer == [[("v", "set", large)]] and pickled == []
    finally:
        server_end.close()
        client_end.close()


def test_a_watcher_that_does_not_read_keeps_a_bounded_size_of_values(server):
    state = server.state
    megabyte = 1 << 20
    with state.watch(names=["v"]) as changes:
        for i in range(BUFFER_BYTES // megabyte + 20):
            state.set("v", bytes([i % 256]) * megabyte)
        assert state.stats()["watch_queued"] <= BUFFER_BYTES // megabyte + 1
        assert changes.next(10) == OVERFLOW
        assert changes.next(10).value[0] > 0


def test_a_bad_watch_next_or_a_failing_watcher_never_fails_a_writer(server):
    state = server.state
    with state.watch(names=["x"]) as changes:
        calls = changes._watcher._calls
        ident = changes._watcher._ident
        for args in [(ident, 0, "1"), (str(ident), 0, 0), (ident, float("nan"), 0), (ident, "1", 0)]:
            with pytest.raises(TypeError):
                calls.lock_call("watch_next", args)
        got: list = []
        waiting = threading.Thread(target=lambda: got.append(changes.next(30)))
        waiting.start()
        wait_until(lambda: state.stats()["watch_waiting"] == 1, 10, what="the watcher to wait")
        state.set("x", 1)
        waiting.join(30)
        assert got == [Change("x", "set", 1)]

    # A watcher whose wait cannot be woken any more (its pipe is gone) is dropped, the write made.
    store = Store()
    client = Client(("test", os.getpid(), None), os.getpid(), False, None)
    ident = store.watchers.open(client, None, None, [], 100)
    server_end, client_end = socket.socketpair()
    broken = Waiting(server_end.fileno())
    os.close(broken.write_fd)
    try:
        store.watchers._by_ident[ident].waiter = broken  # as a waiting call leaves it
        store.set("y", "x" * 100_000)  # too large to hand over: the waiting thread is woken, or not
        assert store.get("y") == "x" * 100_000
        with pytest.raises(KeyError):
            store.watchers.next(ident, client, 0, 0, _readable_within(server_end.fileno()), broken)
    finally:
        broken.sock.detach()
        os.close(broken.read_fd)
        server_end.close()
        client_end.close()


def test_two_threads_waiting_on_one_watch_take_turns_instead_of_waking_each_other(server):
    state = server.state
    with state.watch(names=["nobody"]) as changes:
        before = state.stats()["calls"].get("watch_next", 0)
        threads = [threading.Thread(target=changes.next, args=(0.5,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert state.stats()["calls"]["watch_next"] - before <= 4
