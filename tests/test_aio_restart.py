"""The asyncio client across a crash of the server: calls in flight from many tasks on one pipelined
connection are sent again to the restarted server and applied once. Real SIGKILLs of the server process
(never of the owner, which is this test process and restarts it), real client processes under every start
method."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random

import pytest
from aio_workers import count_awaited_incrs
from conftest import kill, wait_until
from counting import count_under_sigkills

import sharedstate
import sharedstate.aio


def _kill_and_await_restart(server: sharedstate.StateServer) -> None:
    old = server.pid
    kill(old)
    wait_until(lambda: server.pid != old, 30, what="the owner to restart the server")


@pytest.mark.timeout(180)
def test_awaited_incrs_of_many_tasks_are_counted_exactly_under_sigkills(tmp_path):
    """Client processes (fork, spawn and forkserver), each with 25 tasks awaiting ``incr`` on one
    ``AsyncState``, while the server (journal, fsync="always") is SIGKILLed 6 times at random moments —
    with many writes in flight at each kill, some applied and not answered: no task sees an error, and the
    total is exactly the number of calls that returned (nothing applied twice, nothing lost)."""
    path = tmp_path / "state.json"
    methods = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
    rng = random.Random(15)
    with sharedstate.StateServer(path=path, durability="journal", journal_fsync="always", save_every=None) as server:
        clients = []
        for method in methods:
            ctx = multiprocessing.get_context(method)
            go, stop = ctx.Event(), ctx.Event()
            report = tmp_path / f"client-{method}.txt"
            args = (server.address, server.authkey, "n", 25, str(report), go, stop)
            clients.append(
                (ctx.Process(target=count_awaited_incrs, args=args, name=f"client-{method}"), report, go, stop)
            )
        done = count_under_sigkills(server, clients, 6, rng, (0.05, 0.3), 300)
        assert done > 300


def test_an_awaited_lock_wait_is_sent_again_to_the_restarted_server(tmp_path):
    """A task waiting for a lock on a connection of its own, when the server is SIGKILLed: its wait goes
    on at the new server (the holder, alive, keeps the lock across the restart), and it gets the lock once
    the holder releases it; meanwhile other tasks' calls go through."""
    with sharedstate.StateServer(path=tmp_path / "state.json", durability="journal", save_every=None) as server:
        holder = sharedstate.connect(server.address, server.authkey)
        holder.lock.acquire()

        async def main() -> int:
            state = await sharedstate.aio.connect(server.address, server.authkey)
            try:

                async def take() -> tuple[bool, int | None]:  # the task that owns the lock
                    taken = await state.lock.acquire(timeout=30)
                    owner = await state.lock.owner()
                    await state.lock.release()
                    return taken, owner

                waiter = asyncio.ensure_future(take())
                await asyncio.to_thread(wait_until, lambda: holder.stats()["lock_waiters"] == 1, 10)
                await asyncio.to_thread(_kill_and_await_restart, server)
                assert await state.incr("n") == 1  # not stalled behind the wait
                await asyncio.to_thread(wait_until, lambda: holder.stats()["lock_waiters"] == 1, 30)
                assert not waiter.done()
                holder.lock.release()
                assert await asyncio.wait_for(waiter, 30) == (True, os.getpid())
                return await state.incr("n")
            finally:
                await state.close()

        assert asyncio.run(main()) == 2
        holder.close()
