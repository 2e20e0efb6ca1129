"""Semaphores across real processes on the local server and Redis: never more holders than permits while
holders are SIGKILLed, a dead holder's permits back in time (the local server: within 1 s, also when only
the liveness check can tell; Redis: within the lease), asyncio tasks and an asyncio holder killed. The
calls themselves on every backend and face: tests/contract/test_semaphores.py."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
import time
import uuid

import pytest
import semaphore_workers as workers
from conftest import START_METHODS, kill, reap, wait_until
from test_lock_restarts import crash_and_restart

import sharedstate
from sharedstate import aio

#: Redis permits are leases: a dead holder's come back when its lease ends. The tests use a short one.
REDIS_LEASE = 0.5


@pytest.fixture(params=["local", "redis"])
def target(request, tmp_path):
    """``(address, authkey, options)`` of a fresh state on each backend, and a sync handle on it."""
    if request.param == "local":
        server = request.getfixturevalue("server")
        yield request.param, server.address, server.authkey, {}
        return
    redis_server = request.getfixturevalue("redis_server")
    namespace = request.getfixturevalue("redis_namespace")
    yield request.param, redis_server.url, None, {"namespace": namespace, "lease": REDIS_LEASE}


def _connect(target) -> sharedstate.State:
    _, address, authkey, options = target
    return sharedstate.connect(address, authkey, **options)


def _bound(target) -> float:
    """How soon a dead holder's permits must come back."""
    return 1.0 if target[0] == "local" else REDIS_LEASE + 0.5  # a waiter asks again right after the lease


def _most_inside(log: str) -> tuple[int, int, dict[int, int]]:
    """From an enter (``+``) / exit (``-``) log where ``k`` marks a holder killed: the most holders at once,
    the most at once since the last ``k``, and the entries per pid."""
    inside: set[int] = set()
    most = since = 0
    entries: dict[int, int] = {}
    with open(log) as f:
        for line in f:
            event, pid = line.split()
            if event == "+":
                inside.add(int(pid))
                entries[int(pid)] = entries.get(int(pid), 0) + 1
                most = max(most, len(inside))
                since = max(since, len(inside))
            else:
                inside.discard(int(pid))
                if event == "k":
                    since = len(inside)
    return most, since, entries


def test_never_more_holders_than_permits_while_holders_are_killed(target, tmp_path):
    state = _connect(target)
    name, value, turns = f"sem-{uuid.uuid4().hex[:8]}", 3, 4
    log = str(tmp_path / "events.log")
    open(log, "w").close()
    sync = multiprocessing.get_context("spawn")  # its events and semaphores work under every start method
    ready, go, stop = sync.Semaphore(0), sync.Event(), sync.Event()
    contexts = [multiprocessing.get_context(m) for m in START_METHODS]
    victims, held = [], []
    for i in range(2):
        held.append(sync.Event())
        ctx = contexts[i % len(contexts)]
        victims.append(ctx.Process(target=workers.hold_forever, args=(state, name, value, 1, log, held[i])))
    args = (state, name, value, turns, log, ready, go, stop)
    others = [contexts[i % len(contexts)].Process(target=workers.take_turns, args=args) for i in range(8)]
    procs = victims + others
    try:
        for proc in procs:
            proc.start()
        assert all(event.wait(60) for event in held)
        for _ in others:
            assert ready.acquire(timeout=60)
        go.set()

        def killed(victim) -> None:
            with open(log, "a") as f:  # counted out before it dies: its permit is not free before
                f.write(f"k {victim.pid}\n")
            kill(victim.pid)

        killed(victims[0])
        wait_until(lambda: sum(_most_inside(log)[2].values()) >= 12, 60, what="turns")
        killed(victims[1])
        # The turns go on until the dead holders' permits served them: three holders at once since.
        wait_until(lambda: _most_inside(log)[1] >= value, 30, what="three holders at once")
        stop.set()
        for proc in others:
            proc.join(60)
            assert proc.exitcode == 0, f"{proc.name} ended with {proc.exitcode}"
    finally:
        for victim in victims:
            kill(victim.pid)
        reap(*procs)
    most, _, entries = _most_inside(log)
    assert most <= value, f"{most} holders at once"
    assert all(entries[p.pid] >= turns for p in others)
    assert state.semaphore(name, value).value() == value
    assert state.stats()["lock_recoveries"] == 2
    state.close()


def test_the_permits_of_a_killed_holder_come_back_in_time(target):
    """On the local server a grandchild keeps the holder's connection open, so only the liveness check
    (psutil: the killed holder is an unreaped zombie) finds it gone; on Redis, the lease ends."""
    state = _connect(target)
    name = f"sem-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("fork")
    held, grandchild = ctx.Event(), ctx.Value("i", 0)
    proc = ctx.Process(target=workers.hold_with_fd_kept_open, args=(state, name, 2, held, grandchild))
    proc.start()
    sem = state.semaphore(name, 2)
    try:
        assert held.wait(30)
        assert sem.value() == 0 and sem.acquire(blocking=False) is False
        kill(proc.pid)  # not reaped: a zombie until the end
        start = time.monotonic()
        assert sem.acquire(timeout=10) and sem.acquire(timeout=10), "the dead holder's permits never came back"
        took = time.monotonic() - start
        assert took <= _bound(target), f"took {took:.2f} s"
        assert state.stats()["lock_recoveries"] == 2
        sem.release()
        sem.release()
    finally:
        kill(proc.pid)
        if grandchild.value:
            kill(grandchild.value)
        reap(proc)
    state.close()


def test_asyncio_tasks_share_the_permits_and_a_killed_asyncio_holder_gives_its_back(target):
    _, address, authkey, options = target
    name = f"sem-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("forkserver")
    held = ctx.Event()
    holder = ctx.Process(target=workers.hold_in_a_task, args=(address, authkey, options, name, 2, held))
    holder.start()
    try:
        assert held.wait(60)

        async def main() -> tuple[int, int]:
            state = await aio.connect(address, authkey, **options)
            sem = state.semaphore(name, 2)
            inside = most = 0
            first_done = asyncio.Event()

            async def task() -> None:
                nonlocal inside, most
                turns = 0
                while turns < 3 or most < 2:  # until the killed holder's permit served a task
                    async with sem.hold(timeout=30):
                        inside += 1
                        most = max(most, inside)
                        await asyncio.sleep(0.02)
                        inside -= 1
                    turns += 1
                    first_done.set()

            tasks = [asyncio.ensure_future(task()) for _ in range(6)]
            await asyncio.wait_for(first_done.wait(), 30)
            alone = most  # while the other process holds the second permit
            kill(holder.pid)
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            assert await sem.value() == 2
            await state.aclose()
            return alone, most

        alone, most = asyncio.run(main())
        assert alone == 1, "a task entered beside the other process' permit"
        assert most == 2, "the killed holder's permit never served a task"
    finally:
        kill(holder.pid)
        reap(holder)
    with _connect(target) as state:
        assert state.stats()["lock_recoveries"] == 1


def test_permits_held_across_a_crash_of_the_server_stay_their_live_holders():
    """The restarted server gives the permits back to their live holders, not to anyone else: a holder
    releases its own without ``LockLost``, and a holder killed after the restart (it has not reconnected:
    only the liveness check can tell) gets its permit counted back within a second."""
    ctx = multiprocessing.get_context("fork")
    name = f"sem-{uuid.uuid4().hex[:8]}"
    with sharedstate.StateServer() as server:
        held, go, results, forever = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Event()
        releaser = ctx.Process(target=workers.hold_across_restart, args=(server.state, name, 3, held, go, results))
        keeper = ctx.Process(target=workers.hold_forever, args=(server.state, name, 3, 1, None, forever))
        releaser.start()
        keeper.start()
        try:
            assert held.wait(30) and forever.wait(30)
            state = crash_and_restart(server)
            sem = state.semaphore(name, 3)
            assert sem.value() == 1
            assert sem.acquire(blocking=False) is True
            assert sem.acquire(timeout=0.2) is False  # never more than three holders
            go.set()
            assert results.get(timeout=30) == ("released", 1)
            sem.release()
            assert sem.value() == 2
            kill(keeper.pid)  # not reaped: a zombie, whose permit the server finds dead
            start = time.monotonic()
            assert sem.acquire(timeout=10) and sem.acquire(timeout=10) and sem.acquire(timeout=10)
            took = time.monotonic() - start
            assert took <= 1.0, f"took {took:.2f} s"
            assert state.stats()["lock_recoveries"] == 1
            for _ in range(3):
                sem.release()
            state.close()
        finally:
            go.set()
            kill(keeper.pid)
            reap(releaser, keeper)


def test_a_holder_whose_permit_was_given_back_gets_lock_lost_at_its_release(target):
    """Local server: the holder closed every connection of its process. Redis: the holder was stopped
    for longer than its lease. Either way another process took the permit, and the holder's release is
    ``LockLost``, not a second holder going on silently."""
    state = _connect(target)
    name, local = f"sem-{uuid.uuid4().hex[:8]}", target[0] == "local"
    ctx = multiprocessing.get_context("fork")
    held, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=workers.lose_then_release, args=(state, name, local, held, go, results))
    proc.start()
    sem = state.semaphore(name, 1)
    try:
        assert held.wait(30)
        if not local:
            kill(proc.pid, signal.SIGSTOP)  # it renews nothing while stopped
        assert sem.acquire(timeout=10) is True
        kill(proc.pid, signal.SIGCONT)
        go.set()
        kind, message = results.get(timeout=30)
        assert kind == "LockLost" and repr(name) in message
        assert state.stats()["lock_recoveries"] == 1
        sem.release()
    finally:
        kill(proc.pid, signal.SIGCONT)
        go.set()
        reap(proc)
    state.close()


def test_a_rebuilt_holder_releases_after_another_thread_of_its_process_closed_its_connection():
    """After a crash of the server, another thread of the holder's process connects and closes again (the
    process' last connection on the new server): the holder keeps its permit, and its release finds it."""
    ctx = multiprocessing.get_context("fork")
    name = f"sem-{uuid.uuid4().hex[:8]}"
    with sharedstate.StateServer() as server:
        held, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
        args = (server.state, name, 2, held, go, results, True)
        holder = ctx.Process(target=workers.hold_across_restart, args=args)
        holder.start()
        try:
            assert held.wait(30)
            state = crash_and_restart(server)
            assert state.semaphore(name, 2).value() == 1
            go.set()
            assert results.get(timeout=30) == ("released", 2)
            assert state.stats()["lock_recoveries"] == 0
            state.close()
        finally:
            go.set()
            reap(holder)


@pytest.mark.parametrize("kind", ["semaphore", "lock"])
def test_an_acquire_interrupted_after_the_server_handed_it_a_permit_gives_it_back(kind):
    """The waiting process is stopped while the permit (or the lock: the same for both) is handed to it,
    then a signal handler's exception ends its wait: the permit comes back while the process lives
    (another thread of it keeps a connection open, so only the interrupted call can give it back)."""
    ctx = multiprocessing.get_context("fork")
    name = f"sem-{uuid.uuid4().hex[:8]}"
    with sharedstate.StateServer() as server:
        state = server.state
        if kind == "semaphore":
            waited, free = state.semaphore(name, 1), lambda: waited.value() == 1
        else:
            waited, free = state.named_lock(name), lambda: waited.owner() is None
        assert waited.acquire()
        ready, results = ctx.Event(), ctx.Queue()
        waiter = ctx.Process(target=workers.wait_interrupted, args=(state, kind, name, ready, results))
        waiter.start()
        try:
            assert ready.wait(30)
            deadline = time.monotonic() + 30
            while True:  # until the permit went to the (stopped) waiter, not back to this process
                kill(waiter.pid, signal.SIGSTOP)
                waited.release()
                if not waited.acquire(blocking=False):
                    break
                kill(waiter.pid, signal.SIGCONT)
                assert time.monotonic() < deadline, "the child never waited for the permit"
                time.sleep(0.05)
            kill(waiter.pid, signal.SIGUSR1)
            kill(waiter.pid, signal.SIGCONT)
            assert results.get(timeout=30) == ("interrupted", None)
            wait_until(free, 5, what="the permit back")
            assert waited.acquire(timeout=5) is True
            waited.release()
        finally:
            kill(waiter.pid, signal.SIGCONT)
            kill(waiter.pid)
            reap(waiter)


def test_a_crash_at_any_byte_of_a_semaphore_record_leaves_a_consistent_lock_file(tmp_path):
    """The record of an acquire (its request id and the count it led to) cut at every byte, as a crash of
    the server would leave it: the call sent again is applied exactly once, so the holder has its three
    permits, never more holders than permits, never a permit answered but not held."""
    from sharedstate.server.clients import Client
    from sharedstate.server.lockfile import LockFile
    from sharedstate.server.semaphores import SemaphoreTable

    tmp_path.chmod(0o700)
    path = tmp_path / "locks-semaphores"
    key = ("boot", 4242, None)

    def client() -> Client:
        made = Client(key, 4242, False, None)  # not local: alive while connected
        made.conns = 1
        return made

    table, holder = SemaphoreTable(LockFile(str(path))), client()
    table.rebuild([], lambda h: holder)
    for request in (1, 2):
        assert table.acquire("s", 3, holder, 7, request, False, None, lambda: None) is True
    before = path.read_bytes().rstrip(b"\0")
    assert table.acquire("s", 3, holder, 7, 3, False, None, lambda: None) is True
    after = path.read_bytes().rstrip(b"\0")
    assert after.startswith(before) and len(after) > len(before)
    size = path.stat().st_size
    table.close(remove=False)
    for cut in range(len(before), len(after) + 1):
        path.write_bytes(after[:cut].ljust(size, b"\0"))
        again, rebuilt = SemaphoreTable(LockFile(str(path))), client()
        again.rebuild(again.load(), lambda h, rebuilt=rebuilt: rebuilt)
        assert again.acquire("s", 3, rebuilt, 7, 3, False, None, lambda: None) is True, f"cut at {cut}"
        assert again.free("s", 3) == 0, f"cut at {cut}"
        again.release("s", 3, rebuilt, 3, 7, 4)
        assert again.free("s", 3) == 1, f"cut at {cut}"
        again.close(remove=False)


def test_a_redis_release_that_failed_keeps_the_permit(redis_server, redis_namespace):
    """Redis refuses the release (this user may run no script for a moment): the process still holds
    its permit, and gives it back once Redis takes the release."""
    user = f"sem-{uuid.uuid4().hex[:8]}"
    with redis_server.client() as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", ">secret", "~*", "&*", "+@all")
        try:
            url = f"redis://{user}:secret@127.0.0.1:{redis_server.port}/0"
            state = sharedstate.connect(url, namespace=redis_namespace, lease=5.0)
            sem = state.semaphore(f"sem-{uuid.uuid4().hex[:8]}", 1)
            assert sem.acquire()
            admin.execute_command("ACL", "SETUSER", user, "-evalsha", "-eval")
            with pytest.raises(sharedstate.SharedStateError):
                sem.release()
            admin.execute_command("ACL", "SETUSER", user, "+evalsha", "+eval")
            sem.release()
            assert sem.value() == 1
            with pytest.raises(RuntimeError, match="holds none"):
                sem.release()
            state.close()
        finally:
            admin.execute_command("ACL", "DELUSER", user)


def test_a_release_while_another_threads_acquire_is_on_its_way_back_keeps_the_count_right(server, monkeypatch):
    """One thread's acquire was granted but has not counted its permit yet when another thread releases
    (the gap widened here): that release gives back the permit just granted, and once both calls ended
    the process holds none, so its next release is the plain ``RuntimeError``, not ``LockLost``."""
    from sharedstate import _semaphore

    counted, count = threading.Event(), _semaphore._count

    def late_count(ident, change):
        if change > 0:
            assert counted.wait(30)  # after the other thread's release
        return count(ident, change)

    monkeypatch.setattr(_semaphore, "_count", late_count)
    sem = server.state.semaphore(f"sem-{uuid.uuid4().hex[:8]}", 2)
    thread = threading.Thread(target=sem.acquire)
    thread.start()
    try:
        wait_until(lambda: sem.value() == 1, 10, what="the acquire granted")
        sem.release()  # any thread of the process may give back its permit
    finally:
        counted.set()
        thread.join(30)
    assert sem.value() == 2
    with pytest.raises(RuntimeError, match="holds none") as info:
        sem.release()
    assert not isinstance(info.value, sharedstate.LockLost)


@pytest.mark.parametrize("kind", ["semaphore", "lock"])
def test_a_rebuilt_holder_that_dies_before_it_calls_again_leaves_nothing_pending(tmp_path, kind):
    """After a restart, a rebuilt holder's records wait for its next call; if its process dies first, its
    permits (or locks) come back and the table forgets them: nothing stays pending for a dead holder, and
    the tables' calls go back to skipping the look-up of rebuilt records."""
    from sharedstate.server.clients import Client
    from sharedstate.server.lockfile import LockFile
    from sharedstate.server.locktable import LockTable
    from sharedstate.server.semaphores import SemaphoreTable

    tmp_path.chmod(0o700)
    path = str(tmp_path / "locks")

    def client() -> Client:
        made = Client(("boot", 4242, None), 4242, False, None)  # not local: alive while connected
        made.conns = 1
        return made

    holder, file = client(), LockFile(path)
    if kind == "semaphore":
        table = SemaphoreTable(file)
        table.rebuild([], lambda h: holder)
        for request, name in enumerate(("a", "b"), 1):
            assert table.acquire(name, 2, holder, 7, request, False, None, lambda: None) is True
    else:
        file.start([])
        table = LockTable(file)
        for name in ("a", "b"):
            assert table.acquire(name, holder, 7, True, None, print) is True
    file.close(remove=False)
    file, rebuilt = LockFile(path), client()
    again = SemaphoreTable(file) if kind == "semaphore" else LockTable(file)
    again.rebuild(file.load(), lambda h: rebuilt)
    assert again._rebuilt  # both records wait for the holder's next call
    rebuilt.conns = 0  # its process died before it called
    again.release_client(rebuilt)
    assert not again._rebuilt
    assert again.recoveries == 2
    file.close(remove=False)
