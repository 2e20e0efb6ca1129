"""Lock calls across a crash and restart of the server: sent again to the new server, applied once.

An acquire or a release that the killed server applied but did not answer is answered again (``True``,
``None``), never counted twice and never ``LockLost``; a blocking acquire that was waiting waits again
for what is left of its timeout; the lock never has two holders.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import random
import re
import threading
import time
import traceback
from pathlib import Path

import pytest
from conftest import kill, log_to, reap, wait_until

import sharedstate
from sharedstate import LockLost

WAIT_S = 30
CLIENTS = 4


def restart(server: sharedstate.StateServer) -> None:
    """SIGKILL the server process and wait until its owner has started a new one."""
    old = server.pid
    kill(old)
    wait_until(lambda: server.pid not in (None, old), WAIT_S, what="a new server process")


@pytest.fixture
def info_logs():
    """Servers started meanwhile log at INFO (what a lock call sent again says)."""
    logger = logging.getLogger("sharedstate")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- children ----------------------------------------------------------------------------------------
def take_turns(state, i, stop, inside, overlaps, turns, errors, started) -> None:
    """Take a lock of its own, the global lock (twice: reentrant) and a shared named one again and again,
    with no handling of any failure: every exception is counted and printed."""
    try:
        lock, named, own = state.lock, state.named_lock("job"), state.named_lock(f"own-{i}")
        started[i] = 1
        while not stop.value:
            for _ in range(5):  # uncontended: an acquire answered at once, as often as a release
                own.acquire()
                own.release()
            with lock:
                inside[i] = 1
                if any(inside[j] for j in range(CLIENTS) if j != i):
                    overlaps.value += 1
                lock.acquire()
                inside[i] = 0
                lock.release()
            if named.acquire(timeout=5):
                named.release()
            turns[i] += 1
    except BaseException:
        errors[i] += 1
        traceback.print_exc()
        raise


def wait_for_lock(state, name, timeout, waiting, results) -> None:
    """Acquire ``name`` (``timeout``), report what it returned or raised and how long it took."""
    try:
        lock = state.named_lock(name)
        start = time.monotonic()
        waiting.set()
        taken = lock.acquire(timeout=timeout)
        elapsed = time.monotonic() - start
        if taken:
            lock.release()
        results.put(("returned", taken, elapsed))
    except BaseException as exc:
        results.put(("raised", f"{type(exc).__name__}: {exc}", None))


# -- tests -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lock_calls_in_flight_at_server_kills_never_raise_and_never_overlap(tmp_path, info_logs):
    """Kills at random moments of four processes taking locks in a tight loop land, now and then,
    between a lock call's effect and its answer; the calls sent again are counted in the new servers'
    logs. No call raises, no two processes are ever inside the lock, the lock is free at the end."""
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "servers.log"
    stop, overlaps = ctx.RawValue("b", 0), ctx.RawValue("q", 0)
    turns, errors = ctx.RawArray("q", CLIENTS), ctx.RawArray("q", CLIENTS)
    inside, started = ctx.RawArray("b", CLIENTS), ctx.RawArray("b", CLIENTS)
    rng = random.Random(1313)
    log_to(log)
    server = sharedstate.StateServer().start()
    procs = [
        ctx.Process(target=take_turns, args=(server.state, i, stop, inside, overlaps, turns, errors, started))
        for i in range(CLIENTS)
    ]
    try:
        for proc in procs:
            proc.start()
        wait_until(lambda: all(started) and all(turns), WAIT_S, what="every client took the lock")
        kills = 0
        acquires_again = releases_again = 0
        # At least 20 kills, and on until both windows were hit (each kill lands in one now and then), as the
        # assertion below needs, within bounds.
        while kills < 20 or (kills < 300 and min(acquires_again, releases_again) < 1):
            before = sum(turns)
            time.sleep(rng.uniform(0.0, 0.05))
            restart(server)
            kills += 1
            wait_until(lambda: sum(turns) > before + CLIENTS, WAIT_S, what="turns after the restart")  # noqa: B023
            text = log.read_text(errors="replace")
            acquires_again = len(re.findall(r"an acquire sent again after a restart", text))
            releases_again = len(re.findall(r"a release sent again", text))
        stop.value = 1
        for proc in procs:
            proc.join(WAIT_S)
        print(f"{kills} kills: {acquires_again} acquires and {releases_again} releases answered again")
        assert [p.exitcode for p in procs] == [0] * CLIENTS, "a client raised (see its output)"
        assert list(errors) == [0] * CLIENTS
        assert overlaps.value == 0, "two processes were inside the lock at once"
        assert acquires_again >= 1 and releases_again >= 1, "no kill landed between a lock call and its answer"
        for name in ["job"] + [f"own-{i}" for i in range(CLIENTS)]:
            assert not server.state.named_lock(name).locked(), name
        assert not server.state.lock.locked()
    finally:
        stop.value = 1
        reap(*procs)
        server.shutdown()


def test_a_release_applied_by_the_killed_server_is_answered_again_and_a_lost_lock_still_raises():
    """The killed server's answer to a release is lost when it crashes after applying it: sent again
    (the same request, as the client does), the new server answers ``None``. Any other release of the
    lock the holder no longer has is ``LockLost``."""
    with sharedstate.StateServer() as server:
        state = server.state
        me = threading.get_ident()
        lock = state.named_lock("job")
        lock.acquire()
        # The release the client would make (count 1, a request id), whose answer then gets lost.
        release = ("job", me, 1, 424242)
        assert state.backend._calls.lock_call("lock_release", release) is None
        assert not lock.locked()
        restart(server)
        assert state.backend._calls.lock_call("lock_release", release) is None  # the same request again
        with pytest.raises(LockLost):
            # Another release: the lock is not held.
            state.backend._calls.lock_call("lock_release", ("job", me, 1, 424243))
        with pytest.raises(LockLost):
            state.backend._calls.lock_call("lock_release", ("job", me, 1, 0))
        # Meanwhile someone else holds it: the same request is still answered, and it is still theirs.
        other = state.named_lock("job")
        holder = threading.Thread(target=other.acquire)
        holder.start()
        holder.join(WAIT_S)
        assert state.backend._calls.lock_call("lock_release", release) is None
        assert lock.locked()
        restart(server)
        assert state.backend._calls.lock_call("lock_release", release) is None
        assert lock.owner() == os.getpid()


def test_an_acquire_applied_by_the_killed_server_is_answered_again_and_counted_once():
    with sharedstate.StateServer() as server:
        state = server.state
        me = threading.get_ident()
        acquire = ("job", me, True, None, None, 0)  # this thread believes it holds the lock 0 times
        assert state.backend._calls.lock_call("lock_acquire", acquire) is True
        restart(server)
        # Its answer lost: the same request again.
        assert state.backend._calls.lock_call("lock_acquire", acquire) is True
        # Held once: one release (the client's count 1) frees it.
        assert state.backend._calls.lock_call("lock_release", ("job", me, 1, 7)) is None
        assert not state.named_lock("job").locked()


def _a_waiter(server: sharedstate.StateServer, timeout: float | None):
    """Take lock "job" here and start a forked process that waits for it (``timeout``: its wait's);
    answer the lock, the process and the queue it reports on, once it waits."""
    ctx = multiprocessing.get_context("fork")
    lock = server.state.named_lock("job")
    lock.acquire()
    waiting, results = ctx.Event(), ctx.Queue()
    waiter = ctx.Process(target=wait_for_lock, args=(server.state, "job", timeout, waiting, results))
    waiter.start()
    if not waiting.wait(WAIT_S):
        reap(waiter)
        pytest.fail("the waiter did not start waiting")
    return lock, waiter, results


@pytest.mark.timeout(120)
def test_a_blocking_acquire_waiting_at_the_kill_waits_again_and_gets_the_lock():
    with sharedstate.StateServer() as server:
        lock, waiter, results = _a_waiter(server, None)
        try:
            wait_until(lambda: server.state.stats()["lock_waiters"] == 1, WAIT_S, what="the waiter waits")
            restart(server)
            wait_until(lambda: server.state.stats()["lock_waiters"] == 1, WAIT_S, what="it waits again")
            assert lock.owner() == os.getpid()
            lock.release()  # across the restart, by this thread: the waiter is handed the lock
            kind, value, _ = results.get(timeout=WAIT_S)
            assert (kind, value) == ("returned", True)
        finally:
            reap(waiter)
        assert waiter.exitcode == 0


@pytest.mark.timeout(120)
def test_a_waiting_acquire_with_a_timeout_waits_only_what_is_left_of_it_after_the_restart():
    timeout, kill_after = 4.0, 2.5
    with sharedstate.StateServer() as server:
        lock, waiter, results = _a_waiter(server, timeout)
        try:
            started = time.monotonic()
            wait_until(lambda: server.state.stats()["lock_waiters"] == 1, WAIT_S, what="the waiter waits")
            time.sleep(max(0.0, kill_after - (time.monotonic() - started)))
            restart(server)
            kind, value, elapsed = results.get(timeout=WAIT_S)
            assert (kind, value) == ("returned", False)
            # Its whole timeout again after the kill would be at least 2.5 + 4 s.
            assert timeout - 0.05 <= elapsed < timeout + 2.0
            assert lock.owner() == os.getpid()
            lock.release()
        finally:
            reap(waiter)


@pytest.mark.timeout(120)
def test_an_asyncio_acquire_waiting_at_the_kill_gets_the_lock_and_releases_it():
    with sharedstate.StateServer() as server:
        lock = server.state.named_lock("job")
        held, go = threading.Event(), threading.Event()

        def hold() -> None:
            lock.acquire()
            held.set()
            go.wait(WAIT_S)
            lock.release()  # across the restart: the waiting task is handed the lock

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(WAIT_S)

        async def main() -> tuple[bool, int | None]:
            state = await sharedstate.aio.connect(server.address, server.authkey)
            try:
                alock = state.named_lock("job")

                async def take() -> tuple[bool, int | None]:  # the task that owns the lock
                    taken = await alock.acquire(timeout=20)
                    owner = await alock.owner()
                    await alock.release()
                    return taken, owner

                task = asyncio.ensure_future(take())
                await asyncio.to_thread(
                    wait_until, lambda: server.state.stats()["lock_waiters"] == 1, WAIT_S, what="the task waits"
                )
                await asyncio.to_thread(restart, server)
                go.set()
                return await task
            finally:
                await state.close()

        try:
            taken, owner = asyncio.run(main())
        finally:
            go.set()
            holder.join(WAIT_S)
        assert taken is True and owner == os.getpid()
        assert not lock.locked()


def test_a_release_is_answered_again_after_the_lock_file_was_rewritten_full():
    from sharedstate.server.lockfile import MIN_BYTES

    with sharedstate.StateServer() as server:
        state = server.state
        me = threading.get_ident()
        state.named_lock("job").acquire()
        release = ("job", me, 1, 515151)
        assert state.backend._calls.lock_call("lock_release", release) is None
        path = Path(server._config.lock_file)
        # Held open, so its inode number cannot be given to a later rewrite's file (rewritten more than
        # once, the file could otherwise come back with the first one's number).
        first_file = path.open("rb")
        first = os.fstat(first_file.fileno()).st_ino

        def fill() -> None:  # another holder's calls, until the file was rewritten at least once
            lock = state.named_lock("other")
            for _ in range(2 * MIN_BYTES // 60):
                lock.acquire()
                lock.release()

        filler = threading.Thread(target=fill)
        filler.start()
        filler.join(WAIT_S * 2)
        try:
            assert path.stat().st_ino != first, "the lock file was not rewritten"
        finally:
            first_file.close()
        restart(server)
        assert state.backend._calls.lock_call("lock_release", release) is None
        with pytest.raises(LockLost):
            state.backend._calls.lock_call("lock_release", ("job", me, 1, 515152))
