"""What only the asyncio face has, on every backend: concurrent tasks, lock ownership per task, an event
loop that never blocks, and cancelled waits that never keep a lock. (Every call of ``AsyncState`` runs
in the rest of the contract suite, through the blocking adapter of ``faces.py``.)"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from conftest import cancel_a_lock_wait

from sharedstate import aio


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connect(target) -> aio.AsyncState:
    return await aio.connect(target.address, target.authkey, **target.options())


def test_200_concurrent_incr_tasks_count_exactly(async_target):
    async def main():
        state = await connect(async_target)
        try:
            results = await asyncio.gather(*(state.incr("hits") for _ in range(200)))
            assert sorted(results) == list(range(1, 201))
            assert (await state.get_many(["hits"])) == {"hits": 200}
            assert await state.get("hits") == 200
        finally:
            await state.close()

    run(main())


def test_100_concurrent_calls_start_no_thread(async_target):
    # The client speaks to the server on the loop itself: many calls in flight take no worker thread
    # (a face that ran each call on a thread of a pool would start up to a pool's worth here).
    async def main():
        state = await connect(async_target)
        try:
            await state.incr("warm")  # what the first call opens, once
            before = set(threading.enumerate())
            calls = [state.incr("hits") for _ in range(100)] + [state.set(f"n{i}", i) for i in range(50)]
            await asyncio.gather(*calls, *(state.get_many(["hits", "n1"]) for _ in range(50)))
            started = [thread.name for thread in threading.enumerate() if thread not in before]
            assert started == []
            assert await state.get("hits") == 100
        finally:
            await state.close()

    run(main())


def test_a_task_cancelled_while_its_try_is_in_flight_never_keeps_the_lock(async_target):
    # Cancelled at every early point of an acquire of a free lock: before its try is sent, while it is
    # in flight (the lock is taken all the same, and must be given back), after it was answered.
    async def main():
        state = await connect(async_target)
        lock = state.named_lock("tried")

        async def take():
            if await lock.acquire():
                await lock.release()

        try:
            for turns in range(12):
                task = asyncio.create_task(take())
                for _ in range(turns % 4):
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                deadline = time.monotonic() + 5
                while await lock.locked():
                    assert time.monotonic() < deadline, "a cancelled acquire kept the lock"
                    await asyncio.sleep(0.01)
            assert await lock.acquire(blocking=False)  # and the bookkeeping says it is free
            await lock.release()
        finally:
            await state.close()

    run(main())


def test_a_held_lock_keeps_its_lease_while_the_loop_is_blocked(async_target):
    # Leases are renewed by a thread, not a task: a loop busy for three leases loses nothing.
    async def main():
        state = await connect(async_target)
        try:
            lock = state.named_lock("leased", lease=0.3)
            assert await lock.acquire()
            time.sleep(1.0)  # blocks the event loop, on purpose
            assert await lock.owner() == os.getpid()
            await lock.release()  # no LockLost
            assert not await lock.locked()
        finally:
            await state.close()

    run(main())


def test_the_loop_keeps_running_while_a_task_waits_for_a_lock_a_thread_holds(async_target):
    held, release = threading.Event(), threading.Event()
    sync = async_target.connect()

    def holder():
        with sync.lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()

    async def main():
        state = await connect(async_target)
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
        sync.close()


def test_two_tasks_exclude_each_other_and_only_the_owner_releases(async_target):
    async def main():
        state = await connect(async_target)
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
            assert await state.lock.owner() == os.getpid()
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


def test_many_tasks_take_the_lock_one_at_a_time(async_target):
    async def main():
        state = await connect(async_target)
        inside = most = 0

        async def one():
            nonlocal inside, most
            async with state.lock:  # tasks exclude each other like threads
                inside += 1
                most = max(most, inside)
                await asyncio.sleep(0.01)
                inside -= 1

        await asyncio.gather(*(one() for _ in range(10)))
        assert most == 1
        assert not await state.lock.locked()
        await state.close()

    run(main())


@pytest.mark.parametrize("holder", ["thread", "task"])
def test_a_cancelled_wait_does_not_keep_the_lock(async_target, holder):
    sync = async_target.connect()

    async def main():
        state = await connect(async_target)
        if holder == "thread":
            sync.lock.acquire()  # held by this thread, not by a task
        else:
            await state.lock.acquire()
        await cancel_a_lock_wait(state.lock, 0.3)
        if holder == "thread":
            sync.lock.release()
        else:
            await state.lock.release()
        # A request of the cancelled wait still in flight may take the lock: it must give it back.
        assert await state.lock.acquire(timeout=5)
        await state.lock.release()
        # That request may also come in after this release: then it is given back soon after.
        deadline = time.monotonic() + 5
        while await state.lock.locked():
            assert time.monotonic() < deadline, "a cancelled wait kept the lock"
            await asyncio.sleep(0.01)
        await state.close()

    try:
        run(main())
    finally:
        sync.close()
