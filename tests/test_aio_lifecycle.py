"""The life of an asyncio handle on a local server beyond one event loop: a process forked after the
handle was used calls at once, a second ``asyncio.run`` reconnects, and ``aclose()`` leaves no connection
behind, not even one whose handshake was under way."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os

import pytest
from conftest import run_to_completion
from test_aio_transport import run, settled_clients

import sharedstate
from sharedstate import aio


def _incr_in_a_new_loop(state: aio.AsyncState) -> None:
    """A child's use of its parent's handle; the exit code says how it went."""
    code = 1
    try:
        code = 0 if asyncio.run(asyncio.wait_for(state.incr("n"), 10)) > 0 else 2
    finally:
        os._exit(code)


def test_a_child_forked_after_the_handle_was_used_and_a_second_loop_call_at_once(server):
    async def use():
        state = await aio.connect(server.address, server.authkey, timeout=5)
        assert await state.incr("n") == 1
        return state

    state = asyncio.run(use())  # no aclose(): the end of the loop closes its connection
    clients = server.state.stats()["clients"]

    pid = os.fork()
    if pid == 0:
        _incr_in_a_new_loop(state)  # never returns
    _, status = os.waitpid(pid, 0)  # the child's call has a deadline: it exits within 10 s
    assert os.waitstatus_to_exitcode(status) == 0

    run_to_completion([multiprocessing.get_context("fork").Process(target=_incr_in_a_new_loop, args=(state,))], 30)
    assert server.state.get("n") == 3

    async def again():
        # The first loop is closed: this one opens its own connection, and the handle works as before.
        assert await state.incr("n") == 4
        async with state.lock:
            assert await state.get("n") == 4
        await state.aclose()
        return await settled_clients(server, clients)

    assert asyncio.run(again()) == clients


def test_aclose_closes_a_connection_whose_handshake_is_under_way(server):
    async def main():
        state = aio.AsyncState(sharedstate.connect(server.address, server.authkey, cache=False))
        state.sync.get("n")  # the blocking handle's own connection is open
        before = await settled_clients(server, server.state.stats()["clients"])
        fds = len(os.listdir("/proc/self/fd"))
        calls = [asyncio.ensure_future(state.incr("n")) for _ in range(3)]
        await asyncio.sleep(0)  # the first call began to connect; the others wait for it
        await state.aclose()
        for call in calls:
            with pytest.raises(sharedstate.SharedStateError, match="closed"):
                await call
        # The handshake's thread ends, and what it opened is closed, not kept by the closed handle.
        assert await settled_clients(server, before) == before
        deadline = asyncio.get_running_loop().time() + 5
        while len(os.listdir("/proc/self/fd")) > fds and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert len(os.listdir("/proc/self/fd")) <= fds
        state.sync.close()

    run(main())
    assert server.state.get("n") is None


def test_a_loop_closed_without_shutting_down_its_async_generators_leaves_no_connection(server):
    # ``loop.close()`` without ``shutdown_asyncgens()`` (as some test runners' loops end) does not close
    # the handle's connections: the next loop must not use them, and closes them.
    before = server.state.stats()["clients"]

    async def use():
        state = await aio.connect(server.address, server.authkey, timeout=5)
        assert await state.incr("n") == 1
        calls = state._backend._calls
        conn, _ = await calls._open()
        calls._keep_idle(conn)  # as a lock wait's connection is kept for the next wait when it ends
        return state

    loop = asyncio.new_event_loop()
    try:
        state = loop.run_until_complete(use())
    finally:
        loop.close()

    async def again():
        # A call on a connection of its own, first: not on the idle one of the closed loop.
        assert (await state.snapshot())["n"] == 1
        assert await state.incr("n") == 2
        assert sorted(await asyncio.gather(*(state.incr("n") for _ in range(5)))) == [3, 4, 5, 6, 7]
        async with state.lock:
            assert await state.get("n") == 7
        await state.aclose()
        return await settled_clients(server, before)

    assert asyncio.run(again()) == before
    gc.collect()  # an unclosed socket of the first loop would warn (an error in this suite) here
    assert server.state.get("n") == 7
