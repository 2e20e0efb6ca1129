"""sharedstate.aio: every call as a coroutine, locks owned per task, the event loop never blocked."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import sharedstate
from sharedstate import aio


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_200_concurrent_incr_tasks_count_exactly(server):
    async def main():
        state = await aio.connect()
        results = await asyncio.gather(*(state.incr("hits") for _ in range(200)))
        assert sorted(results) == list(range(1, 201))
        assert await state.get("hits") == 200
        await state.close()

    run(main())


def test_every_call_is_a_coroutine(server):
    async def main():
        state = await aio.connect(server.address, server.authkey)
        assert await state.set("a", b"x", scope="s") == b"x"
        assert await state.get("a") == b"x" and await state.get("zz", 5) == 5
        assert await state.contains("a")
        assert await state.names(scope="s") == ["a"]
        assert await state.setdefault("b", [1]) == [1]
        assert await state.append("b", 2) == 2
        assert await state.compare_and_set("b", [1, 2], (3,)) is True
        await state.update({"c": 1, "d": 2})
        assert await state.get_many(["c", "d", "e"]) == {"c": 1, "d": 2}
        assert await state.remove("d") == 2
        assert (await state.snapshot()).keys() == {"a", "b", "c"}
        assert (await state.stats())["names"] == 3
        with pytest.raises(TypeError):
            await state.set("bad", object())
        await state.clear()
        assert await state.snapshot() == {}
        await state.close()

    run(main())


def test_the_loop_keeps_running_while_a_task_waits_for_a_lock_a_thread_holds(server):
    held, release = threading.Event(), threading.Event()

    def holder():
        with server.state.lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()

    async def main():
        state = await aio.connect()
        assert await asyncio.get_running_loop().run_in_executor(None, held.wait, 10)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def waiter():
            async with state.lock:
                return time.monotonic()

        tick_task = asyncio.create_task(ticker())
        wait_task = asyncio.create_task(waiter())
        await asyncio.sleep(0.5)
        assert not wait_task.done()
        assert ticks >= 20, ticks
        release.set()
        acquired_at = await wait_task
        assert acquired_at > 0
        tick_task.cancel()
        await state.close()

    try:
        run(main())
    finally:
        release.set()
        thread.join(10)


def test_two_tasks_exclude_each_other_and_only_the_owner_releases(server):
    async def main():
        state = await aio.connect()
        order = []
        first_in = asyncio.Event()
        second_tried = asyncio.Event()

        async def first():
            async with state.lock:
                order.append("first in")
                first_in.set()
                await second_tried.wait()
                order.append("first out")

        async def second():
            await first_in.wait()
            assert await state.lock.acquire(timeout=0.2) is False
            assert await state.lock.owner() == __import__("os").getpid()
            with pytest.raises(RuntimeError, match="does not hold it"):
                await state.lock.release()
            second_tried.set()
            async with state.lock.hold(timeout=10):
                order.append("second in")

        await asyncio.gather(first(), second())
        assert order == ["first in", "first out", "second in"]
        assert not await state.lock.locked()
        await state.close()

    run(main())


def test_a_task_is_reentrant_and_hold_times_out(server):
    async def main():
        state = await aio.connect()
        lock = state.named_lock("n")
        assert await lock.acquire()
        assert await lock.acquire()
        await lock.release()
        assert await lock.locked()
        await lock.release()
        assert not await lock.locked()

        async def hog(done):
            async with lock:
                await done.wait()

        done = asyncio.Event()
        task = asyncio.create_task(hog(done))
        while not await lock.locked():
            await asyncio.sleep(0.01)
        with pytest.raises(sharedstate.LockTimeout):
            async with lock.hold(timeout=0.3):
                pass
        done.set()
        await task
        await state.close()

    run(main())


def test_a_cancelled_wait_does_not_keep_the_lock(server):
    async def main():
        state = await aio.connect()
        server.state.lock.acquire()  # held by this thread, not by a task

        async def waiter():
            await state.lock.acquire()

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.state.lock.release()
        await asyncio.sleep(0.3)  # a request already sent may still take it: it must give it back
        assert await state.lock.acquire(timeout=5)
        await state.lock.release()
        await state.close()

    run(main())


def test_lock_ownership_needs_a_task():
    with pytest.raises(RuntimeError):
        aio._task_token()  # no running loop, no task
