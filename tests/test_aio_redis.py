"""The asyncio face of the Redis backend (``backends/aio_redis.py``): its connections across event loops
and forks, its lock waits' connections, an idle connection Redis dropped, and a closed handle. The calls
themselves are the contract suite's (``redis-aio``, ``valkey-aio``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, RedisServer, redis_missing, wait_until

import sharedstate
from sharedstate import aio
from sharedstate.backends.redis.connection import IDLE_WAITS, MAX_WAITS


def test_a_handle_follows_its_event_loop_and_a_forked_child(redis_server, redis_namespace):
    """A second asyncio.run, and a child forked after use, open connections of their own: the calls
    answer, nothing fails after the write, and the parent's connection still works."""
    sync = sharedstate.connect(redis_server.url, namespace=redis_namespace)

    async def first() -> aio.AsyncState:
        state = await aio.connect(redis_server.url, namespace=redis_namespace)
        await state.set("n", 0)
        assert await asyncio.gather(*(state.incr("n") for _ in range(10))) == list(range(1, 11))
        return state

    state = asyncio.run(first())

    async def again() -> None:
        assert await state.incr("n") == 11
        assert sorted(await asyncio.gather(*(state.incr("n") for _ in range(10)))) == list(range(12, 22))
        async with state.lock:
            pass

    asyncio.run(asyncio.wait_for(again(), 30))
    pid = os.fork()
    if pid == 0:  # the child: its own connections, the parent's sockets untouched
        code = 1
        try:
            code = 0 if asyncio.run(asyncio.wait_for(state.incr("n"), 10)) == 22 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    async def parent() -> None:
        assert await state.incr("n") == 23
        pid = os.fork()  # while the loop runs and the connections are open
        if pid == 0:
            code = 1
            try:
                code = 0 if asyncio.run(asyncio.wait_for(state.incr("n"), 10)) == 24 else 2
            finally:
                os._exit(code)
        _, status = await asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert await state.incr("n") == 25
        await state.aclose()

    asyncio.run(asyncio.wait_for(parent(), 30))
    assert sync.get("n") == 25
    sync.close()


def test_every_call_of_a_closed_handle_raises(redis_server, redis_namespace):
    async def main() -> None:
        state = await aio.connect(redis_server.url, namespace=redis_namespace)
        await state.set("n", 1)
        await state.aclose()
        calls = [state.get("n"), state.set("n", 2), state.incr("n"), state.stats(), state.save(),
                 state.lock.acquire(), state.names()]  # fmt: skip
        for call in calls:
            with pytest.raises(sharedstate.SharedStateError, match=r"is closed \(aclose\(\)\): connect again"):
                await call
        await state.aclose()  # again: nothing to do

    asyncio.run(asyncio.wait_for(main(), 30))
    assert sharedstate.connect(redis_server.url, namespace=redis_namespace).get("n") == 1


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts file descriptors in /proc")
def test_many_lock_waiters_hold_a_bounded_number_of_connections(redis_server, redis_namespace):
    """150 tasks wait for a lock a thread holds: at most MAX_WAITS wait connections, trimmed after."""
    sync = sharedstate.connect(redis_server.url, namespace=redis_namespace)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with sync.named_lock("L"):
            held.set()
            release.wait(30)

    async def main() -> None:
        state = await aio.connect(redis_server.url, namespace=redis_namespace)
        await state.get("x")
        before = _fds()
        thread = threading.Thread(target=hold)
        thread.start()
        try:
            assert await asyncio.to_thread(held.wait, 10)

            async def waiter() -> bool:
                lock = state.named_lock("L")
                if not await lock.acquire(timeout=60):
                    return False
                await lock.release()
                return True

            tasks = [asyncio.ensure_future(waiter()) for _ in range(150)]
            peak = 0
            for _ in range(20):  # the waiters settle into their waits
                await asyncio.sleep(0.05)
                peak = max(peak, _fds() - before)
            assert peak <= MAX_WAITS + 24, peak  # and a few connections of the calls (their tries)
        finally:
            release.set()
            await asyncio.to_thread(thread.join, 30)
        assert await asyncio.gather(*tasks) == [True] * 150
        assert _fds() - before <= IDLE_WAITS + 24
        await state.aclose()

    asyncio.run(asyncio.wait_for(main(), 90))
    sync.close()


def test_a_connection_redis_closed_while_idle_is_opened_again(tmp_path):
    """Redis closes clients idle past its ``timeout``: the next call opens a new connection, as the
    blocking face does, rather than fail."""
    if redis_missing() is not None:
        pytest.skip(redis_missing())
    server = RedisServer(tmp_path).start()  # its own: the setting applies to every client
    try:
        with server.client() as client:
            client.config_set("timeout", 1)

        async def main() -> None:
            state = await aio.connect(server.url, namespace="idle")
            await state.set("x", 1)
            await asyncio.sleep(2.5)  # Redis checks idle clients about once a second
            assert await state.get("x") == 1
            assert await state.incr("x") == 2
            await state.aclose()

        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        server.stop()


def test_a_lock_try_cut_short_by_the_end_of_the_loop_keeps_no_lock(redis_server, redis_namespace):
    """asyncio.run ends while a task's try is in flight: whatever the try did, the lock is free soon after,
    not for the whole lease."""
    sync = sharedstate.connect(redis_server.url, namespace=redis_namespace)
    box: dict = {}

    async def main(name: str, turns: int) -> None:
        state = box["state"] = await aio.connect(redis_server.url, namespace=redis_namespace, lease=30)
        await state.get("warm")
        box["task"] = asyncio.ensure_future(state.named_lock(name).acquire())
        for _ in range(turns):  # the try goes out, its answer is not read yet
            await asyncio.sleep(0)
        # asyncio.run cancels the task, and the try's own task

    for name in ("a", "b", "c"):  # the turns the try is in flight at the end vary with the machine's load
        for turns in range(8):
            asyncio.run(main(name, turns))
            if not box["task"].cancelled():  # answered before the end: the lock is the task's, as it asked for
                break
            lock = sync.named_lock(name)
            wait_until(lambda lock=lock: not lock.locked(), 5, what=f"{name} free ({turns} turns)")
    sync.close()


def test_connect_imports_redis_asyncio_off_the_event_loop(redis_server, redis_namespace):
    """redis.asyncio (tens of milliseconds to import, unless ``import redis`` already did) and the asyncio
    face's modules are imported by aio.connect on its worker thread, not on the event loop."""
    code = f"""
import asyncio, sys, threading
import sharedstate.aio
where = []
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name in ("redis.asyncio", "sharedstate.backends.aio_redis"):
            where.append((name, threading.current_thread() is threading.main_thread()))
sys.meta_path.insert(0, Finder())
async def main():
    state = await sharedstate.aio.connect({redis_server.url!r}, namespace={redis_namespace!r})
    await state.get("x")
    await state.aclose()
asyncio.run(main())
assert where and not any(on_loop for _, on_loop in where), where
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts file descriptors in /proc")
def test_no_file_descriptor_left_is_server_unavailable(redis_server, redis_namespace):
    """A call that cannot open a socket (EMFILE) raises ServerUnavailable, not a bare OSError."""
    code = f"""
import asyncio, os, resource
import sharedstate
from sharedstate import aio
async def main():
    state = await aio.connect({redis_server.url!r}, namespace={redis_namespace!r})
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(f) for f in os.listdir("/proc/self/fd")) + 1, hard))
    while True:  # take every descriptor left below the limit
        try:
            os.open(os.devnull, os.O_RDONLY)
        except OSError:
            break
    try:
        await state.get("x")
    except sharedstate.ServerUnavailable:
        return
    raise AssertionError("no error")
asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
