"""Watches on a local server (``server.changes``): watchers in processes of every start method, a
watcher killed or stopped, and a server that restarts under a watcher. (What every backend does:
tests/contract/test_watch.py.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading

import pytest
from conftest import kill, reap, wait_until
from watch_workers import count_to, watch_forever, watch_until

import sharedstate
import sharedstate.aio
from sharedstate import Change

OVERFLOW = Change(None, "overflow", None)


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
