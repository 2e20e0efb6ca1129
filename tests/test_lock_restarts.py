"""Locks that stay honest across crashes of the server process, and leases for stopped holders.

A lock held across a SIGKILL of the server (which its owner restarts) stays its live holder's; a holder
that died while the server was down loses it at the restart; a holder whose lock was lost anyway gets
``LockLost`` at its next call on it; a leased lock is lost by a stopped holder and kept by a running one.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import START_METHODS, kill, reap, start_with_log, wait_until

import sharedstate
from sharedstate.backends.local import LocalBackend

#: How long a test waits for anything that should happen at once (a restart, a child's answer).
WAIT_S = 30


# -- children ----------------------------------------------------------------------------------------
def _report(results, kind: str, value: object = None) -> None:
    results.put((kind, value))


def _error(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _outcomes(*calls) -> list[tuple[str, object]]:
    """What each call returned, or the error it raised, in order."""
    outcomes: list[tuple[str, object]] = []
    for call in calls:
        try:
            outcomes.append(("returned", call()))
        except Exception as exc:
            outcomes.append(_error(exc))
    return outcomes


def hold_across_restart(address, authkey, name, held, restarted, release, results) -> None:
    """Take ``name`` twice (reentrant), hold it across the server's restart, then release it twice."""
    try:
        state = sharedstate.connect(address, authkey)
        lock = state.named_lock(name)
        lock.acquire()
        with lock:
            held.set()
            assert restarted.wait(WAIT_S)
            # The connection to the killed server is dead: the call is sent again to the new one.
            _report(results, "reconnected", lock.owner())
            assert release.wait(WAIT_S)
        lock.release()
        _report(results, "released", lock.locked())
    except BaseException as exc:
        _report(results, "error", _error(exc))


def hold_then_call_after_restart(address, authkey, name, held, restarted, results) -> None:
    """Hold ``name``; after the restart report what a reentrant acquire and a release raise."""
    try:
        state = sharedstate.connect(address, authkey)
        lock = state.named_lock(name)
        lock.acquire()
        held.set()
        assert restarted.wait(WAIT_S)
        _report(results, "outcomes", _outcomes(lambda: lock.acquire(blocking=False), lock.release, lock.release))
    except BaseException as exc:
        _report(results, "error", _error(exc))


def hold_then_close(address, authkey, name, held, closed, go, results) -> None:
    """Hold ``name``, close every connection (the server frees the lock), then report what the next
    calls on the lock raise."""
    try:
        state = sharedstate.connect(address, authkey)
        lock = state.named_lock(name)
        lock.acquire()
        held.set()
        state.close()
        closed.set()
        assert go.wait(WAIT_S)
        _report(results, "outcomes", _outcomes(lock.release, lambda: lock.acquire(blocking=False)))
    except BaseException as exc:
        _report(results, "error", _error(exc))


def take_turns(address, authkey, inside, overlaps, turns, stop, results) -> None:
    """Take the global lock again and again across restarts of the server, counting the turns and any
    moment at which another process was inside too. Every call, the lock's included, goes through the
    restarts by itself: any exception ends the child with an error."""
    try:
        state = sharedstate.connect(address, authkey)
        lock = state.lock
        while not stop.is_set():
            if not lock.acquire(timeout=0.5):
                continue
            with inside.get_lock():
                inside.value += 1
                if inside.value > 1:
                    overlaps.value += 1
            # Work inside the lock that needs the server: a holder inside when the server is killed
            # stays inside until the new server answers.
            state.incr("work")
            time.sleep(0.01)
            state.incr("work")
            with inside.get_lock():
                inside.value -= 1
            lock.release()
            with turns.get_lock():
                turns.value += 1
        _report(results, "done")
    except BaseException as exc:
        _report(results, "error", _error(exc))


def hold_forever(address, authkey, name, lease, held) -> None:
    state = sharedstate.connect(address, authkey)
    (state.lock if name is None else state.named_lock(name)).acquire(lease=lease)
    held.set()
    while True:
        time.sleep(60)


def try_lock(address, authkey, name, timeout, results) -> None:
    """Report whether ``name`` could be taken within ``timeout`` (and release it if so)."""
    try:
        lock = sharedstate.connect(address, authkey).named_lock(name)
        taken = lock.acquire(timeout=timeout)
        if taken:
            lock.release()
        _report(results, "taken", taken)
    except BaseException as exc:
        _report(results, "error", _error(exc))


def hold_with_lease_until_told(address, authkey, name, lease, held, go, results, global_lock=False) -> None:
    """Hold ``name`` with a lease until ``go``; then report what the release did."""
    try:
        state = sharedstate.connect(address, authkey)
        if global_lock:
            lock = state.lock
            lock.acquire(lease=lease)
        else:
            lock = state.named_lock(name, lease=lease)
            lock.acquire()
        held.set()
        assert go.wait(WAIT_S * 2)
        try:
            lock.release()
            _report(results, "released")
        except Exception as exc:
            _report(results, "release raised", _error(exc))
    except BaseException as exc:
        _report(results, "error", _error(exc))


def async_hold_with_lease_until_told(address, authkey, name, lease, held, go, results) -> None:
    async def main() -> None:
        state = await sharedstate.aio.connect(address, authkey)
        try:
            lock = state.named_lock(name, lease=lease)
            await lock.acquire()
            held.set()
            while not go.is_set():
                await asyncio.sleep(0.02)
            try:
                await lock.acquire(blocking=False)
                _report(results, "reacquired")
            except Exception as exc:
                _report(results, "reacquire raised", _error(exc))
            try:
                await lock.release()
                _report(results, "released")
            except Exception as exc:
                _report(results, "release raised", _error(exc))
        finally:
            await state.close()

    try:
        asyncio.run(main())
    except BaseException as exc:
        _report(results, "error", _error(exc))


# -- helpers -----------------------------------------------------------------------------------------
def crash_and_restart(server: sharedstate.StateServer, before_kill=None) -> sharedstate.State:
    """SIGKILL the server process, wait until its owner has started a new one that answers, and return
    a fresh handle on it."""
    old = server.pid
    assert old is not None
    if before_kill is not None:
        before_kill()
    kill(old)
    wait_until(lambda: server.pid not in (None, old), WAIT_S, what="a new server process")
    state = sharedstate.connect(server.address, server.authkey)
    assert state.stats()["pid"] == server.pid
    server.state.close()  # the owner's handle had a connection to the killed process
    return state


def lock_file(server: sharedstate.StateServer) -> Path:
    assert server._config is not None and server._config.lock_file is not None
    return Path(server._config.lock_file)


def get(results, kind: str):
    got, value = results.get(timeout=WAIT_S)
    assert got == kind, f"expected {kind!r} from the child, got {got!r}: {value!r}"
    return value


# -- across a crash of the server ----------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", START_METHODS)
def test_a_lock_held_across_a_server_crash_stays_its_live_holders(method):
    ctx = multiprocessing.get_context(method)
    with sharedstate.StateServer() as server:
        held, restarted, release = ctx.Event(), ctx.Event(), ctx.Event()
        results = ctx.Queue()
        args = (server.address, server.authkey, "job", held, restarted, release, results)
        holder = ctx.Process(target=hold_across_restart, args=args)
        holder.start()
        try:
            assert held.wait(WAIT_S)
            state = crash_and_restart(server)
            lock = state.named_lock("job")
            assert lock.owner() == holder.pid  # before the holder has reconnected
            restarted.set()
            assert lock.acquire(timeout=1.0) is False
            assert get(results, "reconnected") == holder.pid
            assert lock.acquire(timeout=0.5) is False  # after it has reconnected
            # The holder releases twice (it had taken it twice): only then may another process take it.
            # This process waits for it first, so the second release hands it over here at once.
            acquired, checked = [], threading.Event()

            def wait_then_release() -> None:
                acquired.append(lock.acquire(timeout=WAIT_S))
                if acquired[-1]:
                    checked.wait(WAIT_S)
                    lock.release()  # by the thread that holds it

            waiter = threading.Thread(target=wait_then_release, daemon=True)
            waiter.start()
            wait_until(lambda: state.stats()["lock_waiters"] == 1, WAIT_S, what="this process to wait")
            release.set()
            assert get(results, "released") is True  # its second release: held by this process now
            wait_until(lambda: acquired, WAIT_S, what="the handed lock")
            assert acquired == [True] and lock.owner() == os.getpid()
            checked.set()
            waiter.join(WAIT_S)
            assert not lock.locked()
            assert state.stats()["lock_recoveries"] == 0
        finally:
            restarted.set()
            release.set()
            reap(holder)
        assert holder.exitcode == 0


@pytest.mark.timeout(180)
def test_the_lock_never_has_two_holders_while_the_server_is_killed_again_and_again():
    ctx = multiprocessing.get_context("fork")
    with sharedstate.StateServer() as server:
        inside, overlaps, turns = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
        stop, results = ctx.Event(), ctx.Queue()
        args = (server.address, server.authkey, inside, overlaps, turns, stop, results)
        workers = [ctx.Process(target=take_turns, args=args) for _ in range(4)]
        for proc in workers:
            proc.start()
        try:

            def twenty_more_turns(what: str) -> None:
                before = turns.value
                wait_until(lambda: turns.value >= before + 20, WAIT_S, what=what)

            for _ in range(6):
                twenty_more_turns("turns between two kills")
                crash_and_restart(server).close()
            twenty_more_turns("turns after the last restart")
            stop.set()
            assert [results.get(timeout=WAIT_S) for _ in workers] == [("done", None)] * len(workers)
        finally:
            stop.set()
            reap(*workers)
        assert overlaps.value == 0
        assert server.state.lock.acquire(timeout=5)  # and nobody holds it at the end
        server.state.lock.release()


def test_a_holder_that_reconnects_after_the_restart_frees_its_lock_when_its_connections_close():
    ctx = multiprocessing.get_context("fork")
    with sharedstate.StateServer() as server:
        held, restarted, release = ctx.Event(), ctx.Event(), ctx.Event()
        results = ctx.Queue()
        holder = ctx.Process(target=hold_forever, args=(server.address, server.authkey, "job", None, held))
        holder.start()
        try:
            assert held.wait(WAIT_S)
            state = crash_and_restart(server)
            lock = state.named_lock("job")
            assert lock.acquire(timeout=0.5) is False
            assert lock.owner() == holder.pid
        finally:
            kill(holder.pid)
            reap(holder)
        # Dead now: found by the waiter even though it never reconnected.
        started = time.monotonic()
        assert lock.acquire(timeout=5)
        took = time.monotonic() - started
        assert took <= 1.0, f"took {took:.2f} s"
        lock.release()
        assert state.stats()["lock_recoveries"] == 1
        del restarted, release, results


@pytest.mark.timeout(180)
@pytest.mark.parametrize("other", ["another thread's call", "a handle opened and closed"])
def test_a_rebuilt_lock_stays_held_while_other_connections_of_its_holders_process_close(other):
    # The holder thread's connection died with the killed server and it makes no call for a while: other
    # connections of its process that open and close meanwhile (bringing the process' count to 0) must
    # not free its lock, or a second holder gets in.
    ctx = multiprocessing.get_context("fork")
    with sharedstate.StateServer() as server:
        holder = sharedstate.connect(server.address, server.authkey)
        lock = holder.named_lock("job")
        assert lock.acquire(timeout=5)
        crash_and_restart(server).close()
        if other == "another thread's call":

            def call() -> None:
                holder.get("x")
                holder.close()

            thread = threading.Thread(target=call)
            thread.start()
            thread.join(WAIT_S)
            assert not thread.is_alive()
        else:
            with sharedstate.connect(server.address, server.authkey) as state:
                state.get("x")

        def try_in_another_process(timeout: float) -> bool:
            results = ctx.Queue()
            proc = ctx.Process(target=try_lock, args=(server.address, server.authkey, "job", timeout, results))
            proc.start()
            try:
                return get(results, "taken")
            finally:
                reap(proc)

        assert try_in_another_process(2.0) is False
        assert lock.acquire(timeout=5)  # the holder's first call on the new server: still its lock
        # Reclaimed, the lock follows the usual rule again: freed when the holder's connections close.
        holder.close()
        assert try_in_another_process(WAIT_S) is True
        for _ in range(2):
            with pytest.raises(sharedstate.LockLost):
                lock.release()


def test_a_holder_that_dies_while_the_server_is_down_loses_its_lock_at_the_restart(tmp_path):
    ctx = multiprocessing.get_context("fork")
    server = start_with_log(tmp_path / "server.log")
    try:
        held = ctx.Event()
        holder = ctx.Process(target=hold_forever, args=(server.address, server.authkey, None, None, held))
        holder.start()
        try:
            assert held.wait(WAIT_S)
        finally:
            # The server is stopped, so it never sees the holder's connection close: only the restart
            # can find out that the holder is gone.
            os.kill(server.pid, signal.SIGSTOP)
            kill(holder.pid)
            reap(holder)
        state = crash_and_restart(server)
        started = time.monotonic()
        assert state.lock.acquire(timeout=5)
        took = time.monotonic() - started
        assert took <= 1.0, f"took {took:.2f} s"
        state.lock.release()
        assert state.stats()["lock_recoveries"] == 1
        wait_until(
            lambda: f"released the global lock held by pid {holder.pid} before the restart" in
            (tmp_path / "server.log").read_text(),
            5,
            what="the recovery in the log",
        )  # fmt: skip
    finally:
        server.shutdown()


@pytest.mark.parametrize("damage", ["removed", "garbage", "symlink", "others-may-write", "directory"])
def test_a_holder_whose_lock_the_restarted_server_lost_gets_lock_lost(tmp_path, damage):
    ctx = multiprocessing.get_context("fork")
    server = start_with_log(tmp_path / "server.log")
    target = tmp_path / "not-the-lock-file"
    target.write_text("untouched\n")
    try:
        held, restarted = ctx.Event(), ctx.Event()
        results = ctx.Queue()
        args = (server.address, server.authkey, "job", held, restarted, results)
        holder = ctx.Process(target=hold_then_call_after_restart, args=args)
        holder.start()
        try:
            assert held.wait(WAIT_S)
            path = lock_file(server)

            def damage_the_file() -> None:
                os.kill(server.pid, signal.SIGSTOP)  # it writes no more to the file
                if damage == "removed":
                    path.unlink()
                elif damage == "garbage":
                    path.write_bytes(b"\xff not json\n[1, 2\n" + bytes(100) + b"more\n")
                elif damage == "symlink":
                    path.unlink()
                    path.symlink_to(target)
                elif damage == "directory":
                    path.unlink()
                    path.mkdir()
                else:
                    path.chmod(0o666)

            state = crash_and_restart(server, damage_the_file)
            lock = state.named_lock("job")
            # The restarted server does not know the holder: the lock is free, and this process takes it.
            assert lock.owner() is None
            assert lock.acquire(blocking=False) is True
            restarted.set()
            outcomes = get(results, "outcomes")
            # The holder's next calls on the lock are LockLost: the reentrant acquire, and each release
            # matching its acquires; one release more is the usual RuntimeError.
            assert [o[0] for o in outcomes] == ["LockLost", "LockLost", "RuntimeError"], outcomes
            assert "lock 'job' is no longer held by this thread" in outcomes[0][1]
            assert "does not hold it" in outcomes[2][1]
            assert lock.owner() == os.getpid()  # none of that released this process' lock
            lock.release()
        finally:
            restarted.set()
            reap(holder)
        assert target.read_text() == "untouched\n"
        assert not path.is_symlink()
        if damage != "directory":
            assert path.stat().st_mode & 0o777 == 0o600
        server.shutdown()  # once it stopped, every record of the server process is in the log
        log = (tmp_path / "server.log").read_text()
        if damage == "directory":  # the server runs on, without a lock file, and says so
            assert "is not a regular file" in log and "cannot write the lock file" in log
        if damage == "garbage":
            assert "line 1 is damaged and skipped" in log and "2 damaged lines" in log
            assert "has data after its end" in log
        elif damage == "symlink":
            assert "cannot be opened" in log
        elif damage == "others-may-write":
            assert "others may write it" in log
    finally:
        server.shutdown()


@pytest.mark.parametrize("method", START_METHODS)
def test_a_holder_whose_connections_closed_gets_lock_lost_not_a_second_hold(method):
    ctx = multiprocessing.get_context(method)
    with sharedstate.StateServer() as server:
        held, closed, go, results = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        args = (server.address, server.authkey, "job", held, closed, go, results)
        holder = ctx.Process(target=hold_then_close, args=args)
        holder.start()
        try:
            assert held.wait(WAIT_S) and closed.wait(WAIT_S)
            lock = server.state.named_lock("job")
            assert lock.acquire(timeout=5)  # freed when the holder's last connection closed
            go.set()
            outcomes = get(results, "outcomes")
            # Its release is LockLost and frees nothing; after that the thread holds nothing, so a new
            # acquire is an ordinary one (and finds the lock taken).
            assert outcomes == [outcomes[0], ("returned", False)] and outcomes[0][0] == "LockLost", outcomes
            assert lock.owner() == os.getpid()
            lock.release()
        finally:
            go.set()
            reap(holder)


def test_the_lock_file_keeps_only_held_locks_when_it_fills_up(tmp_path):
    from sharedstate.server.clients import Client
    from sharedstate.server.lockfile import MIN_BYTES, LockFile
    from sharedstate.server.locktable import LockTable

    def client(pid: int) -> Client:
        made = Client(("here", pid, 1.5), pid, False, 1.5)
        made.conns = 1
        return made

    holder, other = client(1), client(2)
    path = str(tmp_path / "locks")
    file = LockFile(path)
    file.start([])
    table = LockTable(file)
    assert table.acquire("kept", holder, 7, True, None, print, 2.5, 0) is True
    assert table.acquire("kept", holder, 7, True, None, print, None, 1) is True  # reentrant: count 2
    for i in range(3 * MIN_BYTES // 100):  # several times what the file holds
        assert table.acquire(f"lock {i}", other, 9, True, None, print) is True
        table.release(f"lock {i}", other, 9, 1)
    assert os.path.getsize(path) == MIN_BYTES
    (found,) = LockFile(path).load()
    assert (found.key, found.client, found.thread, found.count, found.lease) == ("kept", holder.key, 7, 2, 2.5)
    table.release("kept", holder, 7, 2)
    table.release("kept", holder, 7, 1)
    assert LockFile(path).load() == []


def test_a_lock_file_in_a_folder_others_may_write_is_neither_read_nor_written(tmp_path, caplog):
    from sharedstate.server.lockfile import Holder, LockFile

    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "locks"
    path.write_text('["h","job","here",1,1.5,7,1,null]\n')
    path.chmod(0o600)
    folder.chmod(0o777)
    file = LockFile(str(path))
    assert file.load() == []
    assert "not this user's alone" in caplog.text
    file.start([Holder("other", ("here", 2, 1.5), 9, 1, None)])
    assert path.read_text() == '["h","job","here",1,1.5,7,1,null]\n'  # left as it was
    folder.chmod(0o700)
    assert [h.key for h in LockFile(str(path)).load()] == ["job"]


def test_the_lock_file_is_private_and_gone_after_a_clean_stop():
    server = sharedstate.StateServer().start()
    try:
        path = lock_file(server)
        with server.state.named_lock("a"):
            info = path.stat()
            assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o600
            folder = path.parent.stat()
            assert folder.st_uid == os.geteuid() and folder.st_mode & 0o077 == 0
    finally:
        server.shutdown()
    assert not path.exists()


# -- leases --------------------------------------------------------------------------------------------
@contextmanager
def _a_stopped_holder_loses_its_leased_lock(
    state, ctx, address, authkey, lease: float, global_lock: bool
) -> Iterator[None]:
    """Two processes hold a lock each, one with ``lease`` and one without, and are stopped (SIGSTOP): the
    leased lock is this process' within about its lease, the other stays its holder's; the stopped
    holder's release, once it runs again, is ``LockLost`` and frees nothing. The block runs then, before
    the two processes end."""
    leased, plain = ctx.Event(), ctx.Event()
    go, results = ctx.Event(), ctx.Queue()
    args = (address, authkey, "leased", lease, leased, go, results, global_lock)
    holder = ctx.Process(target=hold_with_lease_until_told, args=args)
    # Without a lease a stopped holder keeps its lock (as long as its process exists).
    keeper = ctx.Process(target=hold_forever, args=(address, authkey, "plain", None, plain))
    holder.start()
    keeper.start()
    try:
        assert leased.wait(WAIT_S) and plain.wait(WAIT_S)
        lock = state.lock if global_lock else state.named_lock("leased")
        os.kill(holder.pid, signal.SIGSTOP)
        os.kill(keeper.pid, signal.SIGSTOP)
        started = time.monotonic()
        assert lock.acquire(timeout=lease + 5)
        took = time.monotonic() - started
        assert took <= lease + 1.0, f"took {took:.2f} s"
        assert state.named_lock("plain").acquire(timeout=lease + 1.0) is False
        assert state.named_lock("plain").owner() == keeper.pid
        os.kill(holder.pid, signal.SIGCONT)
        go.set()
        kind, error = results.get(timeout=WAIT_S)
        assert kind == "release raised" and error[0] == "LockLost", (kind, error)
        assert lock.owner() == os.getpid()  # the former holder's release did not free it
        lock.release()
        yield
    finally:
        go.set()
        for proc in (holder, keeper):
            kill(proc.pid, signal.SIGCONT)
        kill(keeper.pid)
        reap(holder, keeper)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("global_lock", [False, True], ids=["named_lock", "global-lock"])
def test_a_stopped_holder_loses_a_leased_lock_and_its_release_raises_lock_lost(global_lock):
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in START_METHODS else "spawn")
    with sharedstate.StateServer() as server:
        with _a_stopped_holder_loses_its_leased_lock(
            server.state, ctx, server.address, server.authkey, 1.0, global_lock
        ):
            assert server.state.stats()["lock_recoveries"] == 1


@pytest.mark.timeout(60)
def test_a_leased_lock_whose_lease_ran_out_shows_as_free_to_locked_and_owner():
    lease = 1.0
    ctx = multiprocessing.get_context("fork")
    with sharedstate.StateServer() as server:
        state = server.state
        held = ctx.Event()
        holder = ctx.Process(target=hold_forever, args=(server.address, server.authkey, "job", lease, held))
        holder.start()
        try:
            assert held.wait(WAIT_S)
            lock = state.named_lock("job")
            assert lock.owner() == holder.pid
            os.kill(holder.pid, signal.SIGSTOP)
            # Nobody acquires: the lease runs out all the same for those who only look.
            wait_until(lambda: not lock.locked(), lease + 5, what="locked() to see the lease run out")
            assert lock.owner() is None
            assert lock.acquire(timeout=0)
            lock.release()
            assert state.stats()["lock_recoveries"] == 1  # counted once
        finally:
            kill(holder.pid, signal.SIGCONT)
            kill(holder.pid)
            reap(holder)


@pytest.mark.timeout(90)
def test_a_renewal_answered_while_the_lock_was_briefly_free_does_not_lose_the_lock_taken_again(monkeypatch):
    # The race under test: a renewal reaches the server in the moment between a release and the next
    # acquire of the same lock (so it is answered "gone"), and its answer is read only after that
    # acquire. The wrapper holds the renewal thread at those two points until the holder has done its part.
    lease = 3.0
    renewing, released, answered, reacquired, renewed_again = (threading.Event() for _ in range(5))
    original = LocalBackend.lock_renew
    with sharedstate.StateServer() as server:
        state = server.state

        def lock_renew(self, held):
            if self is not state.backend or threading.current_thread().name != "sharedstate-renew":
                return original(self, held)
            if renewing.is_set():
                renewed_again.set()
                return original(self, held)
            renewing.set()
            assert released.wait(WAIT_S)
            answer = original(self, held)
            answered.set()
            assert reacquired.wait(WAIT_S)
            return answer

        monkeypatch.setattr(LocalBackend, "lock_renew", lock_renew)
        lock = state.named_lock("job", lease=lease)
        assert lock.acquire(timeout=5)
        assert renewing.wait(WAIT_S)
        lock.release()
        released.set()
        assert answered.wait(WAIT_S)
        assert lock.acquire(timeout=5)
        reacquired.set()
        # The new hold is renewed in turn (a lease lost by mistake would never be renewed again).
        assert renewed_again.wait(WAIT_S)
        lock.release()  # not LockLost
        assert not lock.locked()
        assert state.stats()["lock_recoveries"] == 0


@pytest.mark.timeout(60)
def test_a_running_holder_keeps_a_leased_lock_for_many_lease_periods():
    lease = 0.3
    ctx = multiprocessing.get_context("fork")
    with sharedstate.StateServer() as server:
        state = server.state
        held, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
        args = (server.address, server.authkey, "job", lease, held, go, results)
        holder = ctx.Process(target=hold_with_lease_until_told, args=args)
        holder.start()
        try:
            assert held.wait(WAIT_S)
            # About ten lease periods in which this process waits for the lock.
            assert state.named_lock("job").acquire(timeout=10 * lease) is False
            assert state.named_lock("job").owner() == holder.pid
            go.set()
            assert get(results, "released") is None
        finally:
            go.set()
            reap(holder)
        assert state.stats()["lock_recoveries"] == 0


@pytest.mark.timeout(60)
def test_an_asyncio_holder_loses_a_leased_lock_when_stopped():
    lease = 0.5
    ctx = multiprocessing.get_context("spawn")
    with sharedstate.StateServer() as server:
        held, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
        args = (server.address, server.authkey, "job", lease, held, go, results)
        holder = ctx.Process(target=async_hold_with_lease_until_told, args=args)
        holder.start()
        try:
            assert held.wait(WAIT_S)
            lock = server.state.named_lock("job")
            os.kill(holder.pid, signal.SIGSTOP)
            assert lock.acquire(timeout=lease + 1.0)
            os.kill(holder.pid, signal.SIGCONT)
            go.set()
            assert get(results, "reacquire raised")[0] == "LockLost"
            assert get(results, "release raised")[0] == "LockLost"
            assert lock.owner() == os.getpid()
            lock.release()
        finally:
            go.set()
            kill(holder.pid, signal.SIGCONT)
            reap(holder)


@pytest.mark.parametrize("lease", [0, -1, 0.0, float("nan"), float("inf")])
def test_a_lease_that_is_not_a_positive_number_is_a_value_error(state, lease):
    with pytest.raises(ValueError, match="lease"):
        state.named_lock("x", lease=lease)
    with pytest.raises(ValueError, match="lease"):
        state.lock.acquire(lease=lease)
    with pytest.raises(ValueError, match="lease"):
        state.named_lock("x").acquire(blocking=False, lease=lease)
    assert not state.lock.locked() and not state.named_lock("x").locked()


@pytest.mark.parametrize("lease", ["1", True, b"1", [1]])
def test_a_lease_that_is_not_a_number_is_a_type_error(state, lease):
    with pytest.raises(TypeError, match="lease"):
        state.named_lock("x", lease=lease)
    with pytest.raises(TypeError, match="lease"):
        state.lock.acquire(lease=lease)
    assert not state.lock.locked()


def test_asyncio_locks_check_their_lease(server):
    async def main() -> None:
        state = await sharedstate.aio.connect(server.address, server.authkey)
        try:
            with pytest.raises(ValueError, match="lease"):
                state.named_lock("x", lease=0)
            with pytest.raises(TypeError, match="lease"):
                await state.lock.acquire(lease="2")
            lock = state.named_lock("x", lease=5)
            assert lock.lease == 5.0
            async with lock:
                assert await lock.owner() == os.getpid()
            assert not await lock.locked()
        finally:
            await state.close()

    asyncio.run(main())


def test_a_lease_is_kept_by_a_pickled_lock(state):
    import pickle

    lock = pickle.loads(pickle.dumps(state.named_lock("x", lease=2.5)))
    assert lock.lease == 2.5 and lock.name == "x"


# -- the Redis backend -------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("global_lock", [False, True], ids=["named_lock", "global-lock"])
def test_redis_locks_take_a_lease_of_their_own_and_a_lost_one_is_lock_lost(redis_server, redis_namespace, global_lock):
    # The state's own lease is long: only the lock's own lease lets another process in.
    url = f"{redis_server.url}?namespace={redis_namespace}&lease=30"
    state = sharedstate.connect(url)
    try:
        with _a_stopped_holder_loses_its_leased_lock(
            state, multiprocessing.get_context("fork"), url, None, 0.5, global_lock
        ):
            assert state.named_lock("plain").locked()
    finally:
        state.close()


def test_redis_lock_leases_are_checked(redis_state):
    for lease in (0, -1, float("nan"), 0.01, 10_000):
        with pytest.raises(ValueError, match="lease"):
            redis_state.named_lock("x", lease=lease).acquire()
    with pytest.raises(TypeError, match="lease"):
        redis_state.lock.acquire(lease="1")
    assert not redis_state.lock.locked() and not redis_state.named_lock("x").locked()
    with redis_state.named_lock("x", lease=0.2):  # renewed while it runs, so held past its lease
        time.sleep(0.5)
        assert redis_state.named_lock("x").owner() == os.getpid()
