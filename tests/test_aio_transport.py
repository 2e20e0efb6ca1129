"""The asyncio client's transport on a local server: the calls of every task share one pipelined
connection, answers reach the tasks that asked (a failed or cancelled call disturbs no other), and a lock
wait takes a connection of its own so that it stalls no other task's call."""

from __future__ import annotations

import asyncio

import pytest

import sharedstate
from sharedstate import aio


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def settled_clients(server: sharedstate.StateServer, expected: int) -> int:
    """The server's count of open client connections, once it is ``expected`` (a connection closed a
    moment ago is counted until the server has read its end) or after 5 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        clients = server.state.stats()["clients"]
        if clients == expected or loop.time() > deadline:
            return clients
        await asyncio.sleep(0.01)


def test_the_calls_of_many_tasks_share_one_connection_and_each_gets_its_own_answer(server):
    async def main():
        before = server.state.stats()["clients"]
        async with await aio.connect(server.address, server.authkey, cache=False) as state:
            await state.set("n", 0)
            assert await settled_clients(server, before + 1) == before + 1
            await state.update({f"k{i}": i for i in range(100)})
            # Reads and writes of 300 tasks at once, each answer the one its own request asked for.
            reads = [state.get(f"k{i}") for i in range(100)]
            writes = [state.incr("n") for _ in range(100)]
            appends = [state.append("list", i) for i in range(100)]
            results = await asyncio.gather(*reads, *writes, *appends)
            assert results[:100] == list(range(100))
            assert sorted(results[100:200]) == list(range(1, 101))
            assert sorted(results[200:]) == list(range(1, 101))
            assert sorted(await state.get("list")) == list(range(100))
            assert await settled_clients(server, before + 1) == before + 1

    run(main())


def test_an_error_answer_or_a_cancelled_call_disturbs_no_other_call(server):
    async def main():
        async with await aio.connect(server.address, server.authkey, cache=False) as state:
            await state.set("text", "not a number")
            await state.set("n", 0)
            calls = [asyncio.ensure_future(state.incr("n")) for _ in range(60)]
            failing = [asyncio.ensure_future(state.incr("text")) for _ in range(10)]
            cancelled = [asyncio.ensure_future(state.get("n")) for _ in range(20)]
            await asyncio.sleep(0)  # the requests are on their way
            for task in cancelled:
                task.cancel()
            results = await asyncio.gather(*calls)
            for task in failing:
                with pytest.raises(TypeError):
                    await task
            assert sorted(results) == list(range(1, 61))
            assert await state.get("n") == 60 and await state.get("text") == "not a number"

    run(main())


def test_a_lock_wait_has_a_connection_of_its_own_and_stalls_no_other_call(server):
    async def main():
        before = server.state.stats()["clients"]
        async with await aio.connect(server.address, server.authkey, cache=False) as state:
            holder = asyncio.Event()
            release = asyncio.Event()

            async def hold():
                async with state.named_lock("job"):
                    holder.set()
                    await release.wait()

            async def wait():
                async with state.named_lock("job"):
                    return await state.incr("waited")

            holding = asyncio.ensure_future(hold())
            await holder.wait()
            waiting = asyncio.ensure_future(wait())
            while server.state.stats()["lock_waiters"] == 0:
                await asyncio.sleep(0.01)
            # The wait is on a second connection; the shared one answers 100 calls meanwhile.
            assert await settled_clients(server, before + 2) == before + 2
            assert sorted(await asyncio.gather(*(state.incr("n") for _ in range(100)))) == list(range(1, 101))
            assert not waiting.done()
            release.set()
            assert await waiting == 1
            await holding
            assert not await state.named_lock("job").locked()

    run(main())


def test_calls_on_a_closed_handle_open_no_connection(server):
    async def main():
        state = await aio.connect(server.address, server.authkey)
        await state.aclose()
        await state.aclose()  # closing twice is harmless
        for call in (state.incr("n"), state.get("n"), state.save(), state.lock.acquire(), state.snapshot()):
            with pytest.raises(sharedstate.SharedStateError, match="is closed"):
                await call  # closed for good, unlike a blocking State's connection: connect again

    run(main())
    assert server.state.get("n") is None
    assert isinstance(server.state, sharedstate.State)
