"""A restart callers don't see, and no hang on a silent server (issue 13, points 11 and 13).

Real servers, real SIGSTOP and SIGKILL of the server process (never of the owner, which is this test
process and restarts it), real client processes under every start method.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import pickle
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import RedisServer, exited, kill, process_state, redis_missing, wait_until
from counting import count_under_sigkills
from restart_workers import count_incrs

import sharedstate
import sharedstate.aio
from sharedstate._sentinels import DROPPED
from sharedstate.server.store import Store
from sharedstate.wire import calls
from sharedstate.wire.addresses import STORE_ID
from sharedstate.wire.answers import Answers, Duplicate, client_id, current_request


def _in_thread(call, wait: float):
    """Run ``call`` in a thread; return ``(finished, result or exception, seconds)`` after at most
    ``wait`` seconds (a call that hangs must fail the test, not hang it)."""
    out: list = []

    def run() -> None:
        start = time.monotonic()
        try:
            out.append(call())
        except BaseException as exc:
            out.append(exc)
        out.append(time.monotonic() - start)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait)
    if thread.is_alive():
        return False, None, None, thread
    return True, out[0], out[1], thread


def _outcome(call):
    try:
        return call()
    except BaseException as exc:
        return exc


@pytest.fixture
def stoppable(tmp_path):
    """A server that a test may SIGSTOP: continued (and then shut down and reaped) in any case."""
    server = sharedstate.StateServer().start()
    pid = server.pid
    try:
        yield server
    finally:
        kill(pid, signal.SIGCONT)
        server.shutdown()
        assert exited(pid)


# -- point 11: a deadline on every call -----------------------------------------------------------------
@pytest.mark.parametrize("call", ["get", "incr", "names"])
def test_a_call_to_a_stopped_server_raises_server_unavailable_after_the_timeout(stoppable, call):
    state = sharedstate.connect(stoppable.address, stoppable.authkey, cache=False, timeout=1.0)
    state.set("x", 1)
    os.kill(stoppable.pid, signal.SIGSTOP)
    finished, result, took, thread = _in_thread(
        {"get": lambda: state.get("x"), "incr": lambda: state.incr("n"), "names": state.names}[call], 15
    )
    os.kill(stoppable.pid, signal.SIGCONT)
    thread.join(15)
    assert finished, f"{call}() on a stopped server hung"
    assert isinstance(result, sharedstate.ServerUnavailable), result
    assert "within 1 s" in str(result) and stoppable.address in str(result)
    assert 0.9 < took < 5
    # The handle works again once the server does.
    assert state.get("x") == 1


def test_a_stopped_server_is_not_taken_for_a_restart(stoppable):
    """A server that stops answering is not a crash: the call fails after its timeout, not after two."""
    state = sharedstate.connect(stoppable.address, stoppable.authkey, cache=False, timeout=0.5)
    state.incr("n")
    os.kill(stoppable.pid, signal.SIGSTOP)
    finished, result, took, thread = _in_thread(lambda: state.incr("n"), 15)
    os.kill(stoppable.pid, signal.SIGCONT)
    thread.join(15)
    assert finished and isinstance(result, sharedstate.ServerUnavailable), result
    assert took < 3
    assert state.get("n") in (1, 2)  # it may have been applied just before the stop


def test_a_lock_wait_longer_than_the_timeout_is_not_cut_short(stoppable):
    holder = sharedstate.connect(stoppable.address, stoppable.authkey, timeout=0.3)
    waiter = sharedstate.connect(stoppable.address, stoppable.authkey, timeout=0.3)
    assert holder.lock.acquire()
    # A wait with its own timeout, well past the call timeout: it ends with False, not an error.
    finished, result, took, _ = _in_thread(lambda: waiter.lock.acquire(timeout=1.5), 15)
    assert finished and result is False, result
    assert took >= 1.4
    # A wait with no timeout lasts until the lock is released, however long after the call timeout.
    outcome: list = []

    def acquire_and_release() -> None:
        outcome.append(_outcome(waiter.lock.acquire))
        waiter.lock.release()

    thread = threading.Thread(target=acquire_and_release)
    thread.start()
    thread.join(1.5)
    assert thread.is_alive() and not outcome, outcome  # still waiting, five call timeouts later
    holder.lock.release()
    thread.join(15)
    assert outcome == [True]
    # The keepalives of the wait leave the connection in step: the next calls get their own answers.
    assert waiter.incr("after") == 1 and waiter.get("after") == 1


def test_a_lock_wait_on_a_stopped_server_ends_after_the_timeout(stoppable):
    holder = sharedstate.connect(stoppable.address, stoppable.authkey, timeout=0.5)
    waiter = sharedstate.connect(stoppable.address, stoppable.authkey, timeout=0.5)
    assert holder.lock.acquire()

    def wait_then_stop():
        threading.Timer(0.8, os.kill, (stoppable.pid, signal.SIGSTOP)).start()
        return waiter.lock.acquire()

    finished, result, took, thread = _in_thread(wait_then_stop, 15)
    os.kill(stoppable.pid, signal.SIGCONT)
    thread.join(15)
    assert finished and isinstance(result, sharedstate.ServerUnavailable), result
    assert 0.8 < took < 4


@pytest.mark.parametrize(
    ("timeout", "error"),
    [("1", TypeError), (None, TypeError), (True, TypeError), (0, ValueError), (-1.0, ValueError)]
    + [(float("nan"), ValueError), (float("inf"), ValueError), (1e19, ValueError), (86_400.5, ValueError)],
)
def test_connect_refuses_a_timeout_that_is_not_a_positive_number(server, timeout, error):
    with pytest.raises(error, match="timeout"):
        sharedstate.connect(server.address, server.authkey, timeout=timeout)
    with pytest.raises(error, match="timeout"):
        asyncio.run(sharedstate.aio.connect(server.address, server.authkey, timeout=timeout))


def test_a_timeout_of_a_day_is_the_longest_accepted(server):
    state = sharedstate.connect(server.address, server.authkey, timeout=86_400)
    state.set("a", 1)
    assert state.get("a") == 1


@pytest.mark.parametrize("call", ["get", "set", "get_many"])
def test_a_call_that_must_connect_to_a_stopped_server_fails_within_its_timeout(stoppable, call):
    state = sharedstate.connect(stoppable.address, stoppable.authkey, timeout=1.0)
    state.set("x", 1)
    os.kill(stoppable.pid, signal.SIGSTOP)
    state.close()  # the next call must connect (once for the cache, then for the call: both in 1 s)
    finished, result, took, thread = _in_thread(
        {"get": lambda: state.get("y"), "set": lambda: state.set("y", 1), "get_many": lambda: state.get_many(["y"])}[
            call
        ],
        15,
    )
    os.kill(stoppable.pid, signal.SIGCONT)
    thread.join(15)
    assert finished and isinstance(result, sharedstate.ServerUnavailable), result
    assert 0.8 < took < 1.6  # was 2.05 s: two connection attempts of 1 s each


def test_the_timeout_travels_with_a_pickled_handle(server):
    state = sharedstate.connect(server.address, server.authkey, timeout=2.5)
    assert pickle.loads(pickle.dumps(state)).backend.timeout == 2.5


def _all_threads_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return all(process_state(int(task)) == "T" for task in tasks)


def test_an_async_call_to_a_stopped_server_raises_server_unavailable(stoppable):
    async def main():
        state = await sharedstate.aio.connect(stoppable.address, stoppable.authkey, cache=False, timeout=0.5)
        await state.set("x", 1)
        os.kill(stoppable.pid, signal.SIGSTOP)
        # Every thread stopped: a request sent sooner may still be answered by a thread not stopped yet.
        await asyncio.to_thread(wait_until, lambda: _all_threads_stopped(stoppable.pid), 10)
        try:
            start = time.monotonic()
            with pytest.raises(sharedstate.ServerUnavailable):
                await asyncio.wait_for(state.get("x"), 15)
            return time.monotonic() - start
        finally:
            os.kill(stoppable.pid, signal.SIGCONT)
            await state.close()

    assert asyncio.run(main()) < 3


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test only (it gets stopped): continued, stopped and reaped afterwards."""
    why = redis_missing()
    if why is not None:
        pytest.skip(why)
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        if server.proc is not None:
            kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def test_a_call_to_a_stopped_redis_server_raises_server_unavailable_after_the_timeout(own_redis):
    state = sharedstate.connect(own_redis.url, namespace="stop", timeout=1.0)
    state.set("x", 1)
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    finished, result, took, thread = _in_thread(lambda: state.incr("n"), 15)
    os.kill(own_redis.proc.pid, signal.SIGCONT)
    thread.join(15)
    assert finished and isinstance(result, sharedstate.ServerUnavailable), result
    assert 0.9 < took < 5
    # A lock wait longer than the timeout is made of shorter blocking waits: not cut short.
    holder = sharedstate.connect(own_redis.url, namespace="stop", timeout=0.3)
    waiter = sharedstate.connect(own_redis.url, namespace="stop", timeout=0.3)
    assert holder.lock.acquire()
    try:
        # Another thread: the holder's thread would re-enter its own lock.
        finished, result, took, _ = _in_thread(lambda: waiter.lock.acquire(timeout=1.2), 15)
        assert finished and result is False, result
        assert took >= 1.1
    finally:
        holder.lock.release()
    assert pickle.loads(pickle.dumps(waiter)).backend.timeout == 0.3


# -- point 13: a restart callers don't see ------------------------------------------------------------
def _restarted(server: sharedstate.StateServer, old_pid: int, timeout: float = 30) -> None:
    wait_until(lambda: server.pid != old_pid, timeout, what="the owner to restart the server")


def _raw_write(state: sharedstate.State, rid, method: str, args: tuple):
    """Send one write with a chosen request id, as a client retrying it would."""
    return state.backend._calls._send(method, pickle.dumps((rid, method, args, {}), pickle.HIGHEST_PROTOCOL), True)


def test_a_write_sent_twice_is_applied_once_also_across_a_crash_and_a_save(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal", journal_fsync="always", save_every=None) as server:
        state = sharedstate.connect(server.address, server.authkey, cache=False)
        # Three clients (the server keeps the last write of each client: a client retries only that).
        rid = ("client-a", 1)
        assert _raw_write(state, rid, "incr", ("n", 5)) == 5
        assert _raw_write(state, rid, "incr", ("n", 5)) == 5  # answered again, not applied again
        assert state.get("n") == 5
        other = ("client-b", 7)
        assert _raw_write(state, other, "append", ("log", "a")) == 1
        # The answers survive a crash: replayed from the journal...
        old = server.pid
        kill(old)
        _restarted(server, old)
        assert _raw_write(state, rid, "incr", ("n", 5)) == 5
        assert state.get("n") == 5
        assert _raw_write(state, other, "append", ("log", "a")) == 1
        assert state.get("log") == ["a"]
        # ...and from the snapshot once a save covered the journal.
        third = ("client-c", 1)
        assert _raw_write(state, third, "remove", ("log",)) == ["a"]
        state.save()
        old = server.pid
        kill(old)
        _restarted(server, old)
        # Applied once; a snapshot keeps no removed value, so the retry learns that it was dropped.
        assert _raw_write(state, third, "remove", ("log",)) is DROPPED
        assert _raw_write(state, other, "append", ("log", "a")) == 1
        assert state.snapshot() == {"n": 5}
        # A new request id is a new write.
        assert state.incr("n", 5) == 10


def test_a_pop_sent_again_after_a_crash_says_its_value_is_lost_never_none_or_key_error(tmp_path, monkeypatch):
    """A ``pop``/``popitem`` whose answer was cut off is answered again: with its value while the server
    that applied it runs, and after a crash (whose restart saves, and saves never keep removed values)
    with an error saying the value is lost, never ``None`` or ``KeyError`` as if nothing had been there."""
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal", journal_fsync="always", save_every=None) as server:
        state = sharedstate.connect(server.address, server.authkey, cache=False)
        state.update({"a": 1, "b": 2, "c": 3})
        # Each call below is sent with one fixed request id, as the retry of a call whose answer was lost.
        monkeypatch.setattr(calls, "_sequence", itertools.repeat(900_001))
        assert state.popitem() == ("c", 3)
        assert state.popitem() == ("c", 3)  # answered again, not applied again
        old = server.pid
        kill(old)
        _restarted(server, old)
        with pytest.raises(sharedstate.SharedStateError, match=r"popitem\(\) was applied .* lost"):
            state.popitem()
        monkeypatch.setattr(calls, "_sequence", itertools.repeat(900_002))
        assert state.pop("b") == 2
        state.save()  # a save without a crash drops the value too
        with pytest.raises(sharedstate.SharedStateError, match=r"pop\('b'\) was applied .* lost"):
            state.pop("b")
        assert state.remove("b") is None  # remove() answers None for it, as documented
        monkeypatch.undo()
        assert state.snapshot() == {"a": 1}  # each applied once
        assert state.popitem() == ("a", 1)
        with pytest.raises(KeyError):
            state.popitem()


@pytest.mark.parametrize("durability", ["journal", "snapshot"])
def test_an_update_sent_again_is_applied_once(tmp_path, durability):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability=durability, journal_fsync="always", save_every=None) as server:
        state = sharedstate.connect(server.address, server.authkey, cache=False)
        rid = ("client-u", 1)
        assert _raw_write(state, rid, "update", ({"y": 1},)) is None
        state.set("y", 2)  # another client's later write
        assert _raw_write(state, rid, "update", ({"y": 1},)) is None  # answered again, not applied again
        assert state.get("y") == 2
        if durability == "journal":
            # The journal keeps the update with its id: a resend after a crash is not applied either.
            journals = [p for p in tmp_path.iterdir() if "journal" in p.name]
            assert any('["@","client-u",1,null,"update"' in p.read_text() for p in journals)
            old = server.pid
            kill(old)
            _restarted(server, old)
            assert _raw_write(state, rid, "update", ({"y": 1},)) is None
            assert state.get("y") == 2
        state.save()
        old = server.pid
        kill(old)
        _restarted(server, old)
        assert _raw_write(state, rid, "update", ({"y": 1},)) is None
        assert state.get("y") == 2


@pytest.mark.parametrize("durability", ["journal", "snapshot"])
def test_a_removed_value_is_never_written_into_a_snapshot(tmp_path, durability):
    path = tmp_path / "state.json"
    secret = "TOP-SECRET-" + "x" * 100_000
    with sharedstate.StateServer(path=path, durability=durability, save_every=None) as server:
        state = sharedstate.connect(server.address, server.authkey, cache=False)
        state.set("secret", secret)
        rid = ("client-r", 1)
        assert _raw_write(state, rid, "remove", ("secret",)) == secret
        # Until a save, a resend is answered the removed value.
        assert _raw_write(state, rid, "remove", ("secret",)) == secret
        if durability == "journal":
            # The journal's record keeps it until the save a restarted server makes after replaying it.
            assert any("TOP-SECRET" in p.read_text() for p in tmp_path.iterdir() if "journal" in p.name)
            old = server.pid
            kill(old)
            _restarted(server, old)
            assert b"TOP-SECRET" not in path.read_bytes()  # (the .bak is the state before the remove)
            state.set("secret", "new")
            assert _raw_write(state, rid, "remove", ("secret",)) is DROPPED  # applied once, before the crash
            assert state.get("secret") == "new"
        state.save()
        assert b"TOP-SECRET" not in path.read_bytes()
        # Past the save the value is forgotten in memory too; the retry is still not applied again.
        state.set("secret", "new")
        assert _raw_write(state, rid, "remove", ("secret",)) is DROPPED
        assert state.get("secret") == "new"
        state.save()
    assert b"TOP-SECRET" not in path.read_bytes()
    # Applied, its value left out: marked so, a retry learns the value is gone rather than that it was None.
    assert json.loads(path.read_text())["answers"]["client-r"] == [1, None, "removed"]


def test_a_resend_that_misses_the_fast_check_is_answered_as_applied():
    """The serving loop looks the id up without the store's mutex: a resend racing its original can miss
    it. Then the store's own check, under the mutex, answers it before any early return or error."""
    store = Store()
    store.set("n", 1)

    def twice(rid, call):
        current_request.rid = rid
        try:
            first = call()
            try:
                call()
            except Duplicate as duplicate:
                return first, duplicate.answer
            return first, "applied or answered anew"
        finally:
            current_request.rid = None

    store.set("gone", "v")
    assert twice(("c", 1), lambda: store.remove("gone")) == ("v", "v")  # not None
    store.set("gone", "v")
    assert twice(("c", 2), store.popitem) == (("gone", "v"), ("gone", "v"))  # not another name, nor None
    assert twice(("c", 3), lambda: store.compare_and_set("n", 1, 5)) == (True, True)  # not False
    assert twice(("c", 4), lambda: store.setdefault("d", 1)) == (1, 1)
    assert twice(("c", 5), lambda: store.append("log", 1)) == (1, 1)
    assert twice(("c", 7), lambda: store.update({"u": 1})) == (None, None)
    # An incr whose name another client set to text since: answered 1, not a TypeError.
    assert twice(("c", 6), lambda: (store.incr("k"), store._data.__setitem__("k", "text"))[0]) == (1, 1)
    assert store.snapshot() == {"n": 5, "d": 1, "log": [1], "u": 1, "k": "text"}


def test_the_answers_are_kept_in_the_snapshot_body(tmp_path):
    import json

    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, save_every=None) as server:
        state = sharedstate.connect(server.address, server.authkey)
        state.incr("n")
        other = tmp_path / "export.json"
        state.save(other)
    doc = json.loads(path.read_text())
    assert [answer for _, answer in doc["answers"].values()] == [1]
    assert path.read_text().splitlines()[0].startswith('{"format": "sharedstate"')
    assert "answers" not in path.read_text().splitlines()[0]  # in the body, after the header line
    assert "answers" not in json.loads(other.read_text())  # an export holds no other client's answers


def test_a_forked_child_writes_with_a_client_id_of_its_own():
    mine = client_id()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(writer, client_id().encode())
        finally:
            os._exit(0)
    os.close(writer)
    try:
        child = os.read(reader, 200).decode()
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert child and child != mine
    assert client_id() == mine  # the same thread keeps its id
    ids = set()
    thread = threading.Thread(target=lambda: ids.add(client_id()))
    thread.start()
    thread.join()
    assert mine not in ids  # another thread is another client


def test_the_table_of_answers_keeps_the_clients_that_wrote_last():
    answers = Answers(cap=3)
    for client in "abc":
        answers.remember(client, 1, client.upper())
    answers.remember("a", 2, "A2")  # a wrote again: now the most recent
    answers.remember("d", 1, "D")  # one client too many: b, which wrote least recently, goes
    assert list(answers.table) == ["c", "a", "d"]
    assert answers.table["a"] == (2, "A2")
    copy = Answers(cap=3)
    copy.load(answers.copy())
    assert copy.table == answers.table and list(copy.table) == ["c", "a", "d"]


@pytest.mark.timeout(300)
def test_clients_of_every_start_method_see_no_error_while_the_server_is_sigkilled(tmp_path):
    """8 client processes (fork, spawn and forkserver) incr while the server (journal, fsync="always")
    is SIGKILLed 8 times at random moments, often between applying a write and answering it: no client
    sees an error, and the total is exactly the number of calls that returned (nothing applied twice,
    nothing lost)."""
    path = tmp_path / "state.json"
    methods = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
    rng = random.Random(13)
    with sharedstate.StateServer(path=path, durability="journal", journal_fsync="always", save_every=0.5) as server:
        clients = []
        for i in range(8):
            ctx = multiprocessing.get_context(methods[i % len(methods)])
            go, stop = ctx.Event(), ctx.Event()
            report = tmp_path / f"client-{i}.txt"
            proc = ctx.Process(target=count_incrs, args=(server.state, "n", str(report), go, stop), name=f"client-{i}")
            clients.append((proc, report, go, stop))
        done = count_under_sigkills(server, clients, 8, rng, (0.05, 0.4), 100)
    # And nothing is counted twice by the replay of the next start either.
    with sharedstate.StateServer(path=path, durability="journal") as again:
        assert again.state.get("n") == done


@pytest.mark.timeout(180)
def test_every_counted_incr_is_in_the_total_under_sigkills_in_a_loop(tmp_path):
    """The direct test of the request ids: a journal (fsync="always") server SIGKILLed at random moments
    in a loop while threads incr; each thread counts the calls that returned, and the total equals that
    count exactly — a write applied before the crash was answered again, not applied twice."""
    path = tmp_path / "state.json"
    rng = random.Random(1313)
    with sharedstate.StateServer(path=path, durability="journal", journal_fsync="always", save_every=None) as server:
        stop = threading.Event()
        counted = [0] * 4
        errors: list[BaseException] = []

        def count(slot: int) -> None:
            handle = sharedstate.connect(server.address, server.authkey, cache=False)
            while not stop.is_set():
                try:
                    handle.incr("n")
                except BaseException as exc:
                    errors.append(exc)
                    return
                counted[slot] += 1

        threads = [threading.Thread(target=count, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(15):
                time.sleep(rng.uniform(0.02, 0.3))
                old = server.pid
                kill(old)
                _restarted(server, old)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors
        assert server.state.get("n") == sum(counted)
        assert sum(counted) > 0


def test_async_calls_are_retried_across_a_restart(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as server:

        async def main():
            state = await sharedstate.aio.connect(server.address, server.authkey)
            try:
                for _ in range(20):
                    await state.incr("n")
                old = server.pid
                kill(old)
                # Calls made while the server is dead and being restarted.
                values = await asyncio.gather(*(state.incr("n") for _ in range(20)))
                assert server.pid != old
                assert sorted(values) == list(range(21, 41))
                return await state.get("n")
            finally:
                await state.close()

        assert asyncio.run(main()) == 40


def test_a_handle_passed_to_a_child_waits_for_a_restarting_server(tmp_path):
    """The first call of a handle unpickled in a new process, made while the server is down, waits for
    the restart too (the handle carries what the server said about its restart)."""
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as server:
        state = server.state
        state.set("x", 1)
        copy = pickle.loads(pickle.dumps(state))
        copy.backend.close()
        old = server.pid
        kill(old)
        wait_until(lambda: exited(old), 10, what="the server to die")
        fresh = pickle.loads(pickle.dumps(state))
        assert fresh.incr("n") == 1
        assert fresh.get("x") == 1


def test_calls_fail_soon_when_the_server_stopped_for_good(tmp_path):
    server = sharedstate.StateServer(save_every=None).start()
    state = sharedstate.connect(server.address, server.authkey, cache=False)
    state.set("x", 1)
    os.kill(server.pid, signal.SIGTERM)  # a clean stop: the owner does not restart it
    wait_until(lambda: exited(server.pid), 10, what="the server to stop")
    try:
        start = time.monotonic()
        with pytest.raises(sharedstate.ServerUnavailable):
            state.incr("x")
        assert time.monotonic() - start < 3  # not the whole 30 s timeout
    finally:
        server.shutdown()


def test_in_snapshot_mode_a_crash_loses_the_writes_since_the_last_save_and_a_retry_applies_once(tmp_path):
    """What snapshot durability promises across a crash: the state (and the answers) of the last save;
    a call in flight is applied once on that state."""
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, save_every=None) as server:
        state = sharedstate.connect(server.address, server.authkey, cache=False)
        state.incr("n")
        state.save()
        for _ in range(5):
            state.incr("n")  # acknowledged, never saved
        old = server.pid
        kill(old)
        assert state.incr("n") == 2  # the saved 1, plus this call once
        assert server.pid != old


def test_a_server_that_is_not_restarted_fails_calls_at_once(tmp_path):
    address = str(tmp_path / "s.sock")
    server = sharedstate.StateServer(address=address, restart=False).start()
    try:
        state = sharedstate.connect(address, server.authkey, cache=False, timeout=20)
        state.set("x", 1)
        kill(server.pid)
        wait_until(lambda: exited(server.pid), 10, what="the server to die")
        start = time.monotonic()
        with pytest.raises(sharedstate.ServerUnavailable, match=address):
            state.incr("x")
        assert time.monotonic() - start < 1
    finally:
        server.shutdown()


def test_calls_stop_waiting_when_the_owner_could_not_start_the_server_again(tmp_path):
    path = tmp_path / "state.json"
    server = sharedstate.StateServer(path=path, save_every=None).start()
    try:
        state = sharedstate.connect(server.address, server.authkey, cache=False, timeout=20)
        state.set("x", 1)
        Path(f"{path}.bak").mkdir()  # the next start is refused: a directory where the .bak should be
        old = server.pid
        kill(old)
        wait_until(lambda: exited(old), 10, what="the server to die")
        start = time.monotonic()
        with pytest.raises(sharedstate.ServerUnavailable):
            state.get("x")
        assert time.monotonic() - start < 10  # not the whole 20 s timeout
        start = time.monotonic()
        with pytest.raises(sharedstate.ServerUnavailable):
            state.incr("x")
        assert time.monotonic() - start < 3
        assert server.pid == old  # no server was started again
    finally:
        try:
            server.shutdown()
        except sharedstate.SharedStateError:
            pass


def test_an_old_style_request_without_an_id_still_works(server):
    state = sharedstate.connect(server.address, server.authkey, cache=False)
    request = pickle.dumps((STORE_ID, "incr", ("n",), {}), pickle.HIGHEST_PROTOCOL)
    assert state.backend._calls._send("incr", request) == 1
    assert state.backend._calls._send("incr", request) == 2  # no id: nothing to recognise
    with pytest.raises(sharedstate.SharedStateError, match="no object with id"):
        state.backend._calls._send("incr", pickle.dumps((("bad",), "incr", ("n",), {})), True)
    assert Path(server.address).exists()
