"""The asyncio client's rules for calls that do not simply get their answer on a local server: a write
cancelled in flight keeps its request-id lane until its answer has come (and gives it back then), a
cancelled lock wait on a broken connection only raises its cancellation, a wait cancelled between two
attempts says no answer comes, and a long call fails no other
task's call."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
from test_aio_transport import run, settled_clients

import sharedstate
from sharedstate import aio
from sharedstate.wire import answers
from sharedstate.wire.protocol import call_request


def test_a_write_cancelled_in_flight_keeps_its_lane_until_its_answer_came(server):
    # Lanes are per process: a lane given back while its write is in flight could be taken by a write of
    # another handle, on another connection, whose answer then replaces this one's at the server; after a
    # crash this write, sent again, would be applied twice. Reproducing that needs a crash in the instant
    # between the two; what is checked is the rule that prevents it.
    async def main():
        async with await aio.connect(server.address, server.authkey, cache=False) as state:
            await state.set("n", 0)
            answers._free_lanes.clear()
            os.kill(server.pid, signal.SIGSTOP)  # no answer comes until it goes on
            try:
                await _stopped(server.pid)
                first = asyncio.ensure_future(state.incr("n"))
                second = asyncio.ensure_future(state.incr("n"))
                await asyncio.sleep(0)  # both requests are sent
                second.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await second
                assert answers._free_lanes == []  # its answer has not come: its lane is not free
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await first in (1, 2)
            assert await state.get("n") == 2  # it was in flight: the server applied it
            # Both answers came: both lanes are free again.
            assert len(answers._free_lanes) == 2

    run(main())


async def _stopped(pid: int) -> None:
    """Once every thread of ``pid`` is stopped (a signal reaches a thread running on another core a
    moment later)."""
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(") ", 1)[1][:1])
            except OSError:  # a thread that ended meanwhile
                pass
        if states and all(state in "tT" for state in states):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def test_writes_cancelled_in_flight_give_their_lanes_back_once_answered(tmp_path):
    # A lane kept for good by each cancelled write would grow the server's table of answers (saved in
    # its snapshots) by one entry per cancelled write.
    path = tmp_path / "s.json"

    async def main(server):
        async with await aio.connect(server.address, server.authkey, cache=False) as state:
            await state.incr("warm")
            before = next(answers._lanes)
            for _ in range(10):
                tasks = [asyncio.ensure_future(state.incr("n")) for _ in range(100)]
                await asyncio.sleep(0)
                await asyncio.sleep(0)  # most of them are sent
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                # Its answer comes after those of the cancelled writes sent before it, on the same connection.
                await state.get("n")
            assert 0 < await state.get("n", 0) <= 1000
            return next(answers._lanes) - before - 1

    with sharedstate.StateServer(path=str(path), save_every=None) as server:
        assert run(main(server)) <= 100  # at most 100 in flight at once
        server.save()
        assert len(json.loads(path.read_text())["answers"]) <= 101


def test_a_cancelled_lock_wait_on_a_broken_connection_raises_only_its_cancellation(server):
    async def main():
        async with await aio.connect(server.address, server.authkey, cache=False) as state:
            calls = state._backend._calls
            with server.state.named_lock("job"):  # held by another owner: the acquire below waits
                conn, _ = await calls._open()
                args = ("job", "task-x", True, None, None, 0)
                future = conn.request(call_request("lock_acquire", args))
                while server.state.stats()["lock_waiters"] == 0:
                    await asyncio.sleep(0.01)
                conn.close()  # broken: its request raises EOFError
                late = []
                calls._abandon(conn, future, late.append, "lock_acquire")  # must not raise
                await asyncio.gather(*calls._finishing)
                assert late == [None]  # no answer came: nothing to give back
            assert await state.incr("n") == 1  # the handle goes on

    run(main())


def test_a_long_call_takes_a_connection_of_its_own(server, tmp_path):
    # The shared connection's watchdog fails every call on it once nothing came for the call timeout, so
    # a save of a big state taking longer than that would fail the other tasks' calls with it. (How long
    # a save takes, and how long the other calls wait meanwhile for the store's mutex, depends on the
    # machine: what is checked is where the long calls go, and that the others are answered meanwhile.)
    server.state.update({f"k{i:05d}": {"a": [1, 2, {"b": "x"}]} for i in range(20_000)})

    async def main():
        before = await settled_clients(server, server.state.stats()["clients"])
        async with await aio.connect(server.address, server.authkey, cache=False) as state:
            await state.set("n", 0)
            assert await settled_clients(server, before + 1) == before + 1
            saving = asyncio.ensure_future(state.save(str(tmp_path / "big.json")))
            done = 0
            while not saving.done():
                await asyncio.gather(*(state.incr("n") for _ in range(10)))
                done += 10
            await saving
            assert len(await state.snapshot()) == 20_001
            assert await state.restore(str(tmp_path / "big.json")) == 20_001
            # The shared connection, and one for the long calls, kept for the next one.
            assert await settled_clients(server, before + 2) == before + 2
            return done

    assert run(main()) > 0


def test_a_wait_cancelled_between_two_attempts_is_told_no_answer_comes(server, monkeypatch):
    # A watch's ``next`` cancelled while it waits keeps its place until ``late`` says what the wait got;
    # a wait cancelled in the pause between a failed attempt and the next one must say so too, or every
    # later ``next`` of that watch waits for it forever.
    from sharedstate.wire import aio_calls

    async def main():
        async with await aio.connect(server.address, server.authkey, cache=False) as state:
            calls = state._backend._calls
            paused = asyncio.Event()

            async def refused(*args, **kwargs):
                raise ConnectionRefusedError("the server is restarting")

            def pause(self, exc, sent, restart):
                paused.set()
                return 30.0

            monkeypatch.setattr(calls, "_open", refused)
            monkeypatch.setattr(aio_calls.Retry, "after", pause)
            late = []
            task = asyncio.ensure_future(calls.wait("watch_next", (1, None, 0), lambda: (1, None, 0), late.append))
            await asyncio.wait_for(paused.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert late == [None]

    run(main())
