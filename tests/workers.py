"""Functions run in child processes by the tests (importable under every start method)."""

from __future__ import annotations

import os
import threading
import time

import sharedstate


def incr_many(state: sharedstate.State, name: str, times: int) -> int:
    for _ in range(times):
        state.incr(name)
    return os.getpid()


def incr_many_from_env(name: str, times: int) -> int:
    state = sharedstate.connect()
    for _ in range(times):
        state.incr(name)
    return os.getpid()


def locked_read_modify_write(state: sharedstate.State, name: str, times: int, start) -> None:
    start.wait(30)
    for _ in range(times):
        with state.lock:
            state.set(name, state.get(name, 0) + 1)


def hold_lock_forever(state: sharedstate.State, lock_name, held) -> None:
    lock = state.lock if lock_name is None else state.named_lock(lock_name)
    lock.acquire()
    held.set()
    while True:
        time.sleep(60)


def hold_lock_with_fd_kept_open(state: sharedstate.State, held, child_pid) -> None:
    """Take the lock, then fork a child that keeps this process' connection open and outlives it."""
    state.lock.acquire()
    pid = os.fork()
    if pid == 0:  # the grandchild: holds a copy of the connection's socket, does nothing with it
        time.sleep(60)
        os._exit(0)
    child_pid.value = pid
    held.set()
    while True:
        time.sleep(60)


def hold_lock_then_exit(state: sharedstate.State, held, go) -> None:
    state.lock.acquire()
    held.set()
    go.wait(30)
    os._exit(0)  # exits holding the lock; the parent does not reap it at once


def try_lock(state: sharedstate.State, result, lock_name=None) -> None:
    lock = state.lock if lock_name is None else state.named_lock(lock_name)
    result.value = 1 if lock.acquire(blocking=False) else 0


def connect_and_report(queue) -> None:
    try:
        state = sharedstate.connect()
        queue.put(("ok", state.get("greeting"), os.getpid()))
    except Exception as exc:  # reported to the test
        queue.put(("error", repr(exc), os.getpid()))


def thread_holds(lock: sharedstate.Lock, held: threading.Event, release: threading.Event) -> None:
    with lock:
        held.set()
        release.wait(30)


def hold_lock_fd_open_then_exit(state: sharedstate.State, held, child_pid, go) -> None:
    """Like ``hold_lock_with_fd_kept_open``, but exit (unreaped: a zombie) when ``go`` is set."""
    state.lock.acquire()
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    child_pid.value = pid
    held.set()
    go.wait(30)
    os._exit(0)


def hold_lock_then_close(state: sharedstate.State, held, go) -> None:
    state.lock.acquire()
    held.set()
    go.wait(30)
    state.close()  # its only connection: the lock is freed though this process lives on
    time.sleep(60)


def wait_for_lock(state: sharedstate.State, waiting) -> None:
    state.get("warm-up")  # connected before saying so
    waiting.set()
    state.lock.acquire()
    time.sleep(60)


def run_plan(state: sharedstate.State, prefix: str, plan: list) -> str:
    """Make the calls of ``plan`` on this process' own names (``prefix``) and the shared counters."""
    for op in plan:
        kind = op[0]
        try:
            if kind == "set":
                state.set(prefix + op[1], op[2])
            elif kind == "incr":
                state.incr(prefix + op[1], op[2])
            elif kind == "append":
                state.append(prefix + op[1], op[2])
            elif kind == "remove":
                state.remove(prefix + op[1])
            elif kind == "setdefault":
                state.setdefault(prefix + op[1], op[2])
            elif kind == "shared_incr":
                state.incr("shared", op[1])
            elif kind == "locked_add":
                with state.lock:
                    state.set("locked", state.get("locked", 0) + op[1])
        except TypeError:
            pass  # incr or append on a value of another type: refused, as the model expects
    return "ok"


def soak_client(state, i, victim, stop, incr_counts, locked_counts, holding) -> None:
    """Mixed calls until ``stop``; a victim lingers inside the lock so that it gets killed there."""
    import random

    rng = random.Random(i)
    own = f"list-{i}"
    if not victim:
        state.set(own, [])
    while not stop.value:
        incr_counts[i] = state.incr(f"count-{i}")
        with state.lock:
            holding[i] = 1
            ledger = state.get("ledger", {})
            ledger[str(i)] = ledger.get(str(i), 0) + 1
            state.set("ledger", ledger)
            if not victim:
                locked_counts[i] += 1
            elif rng.random() < 0.5:
                time.sleep(0.05)
            holding[i] = 0
        if not victim:
            state.append(own, len(state.get(own)))
        state.get_many([f"count-{j}" for j in range(8)])
        state.names("^count-")
        state.set(f"scratch-{i}", {"n": rng.random(), "b": b"x" * rng.randrange(100)}, scope="soak")


def fill_storage(folder: str, process: int, count: int) -> None:
    storage = sharedstate.LocalFileStorage(folder)
    for i in range(count):
        storage.set(f"p{process}-{i}", i)


def noop() -> None:
    pass


def fail_inside_lock(state: sharedstate.State, held, go, result) -> None:
    """Inside the lock, make calls that fail in this process; the lock must stay held."""
    with state.lock:
        failures = 0
        assert state.get("missing", default=lambda: 0)() == 0  # a default never travels
        try:
            state.set("bad", object())
        except TypeError:
            failures += 1
        try:
            state.names("(")
        except ValueError:
            failures += 1
        result.value = 1 if failures == 2 else 0
        held.set()
        go.wait(30)


def connect_burst(address: str, authkey: bytes, threads: int) -> int:
    """``threads`` threads connecting at the same instant."""
    barrier = threading.Barrier(threads)
    done = []

    def one() -> None:
        barrier.wait(30)
        sharedstate.connect(address, authkey).incr("burst")
        done.append(1)

    workers_ = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers_:
        w.start()
    for w in workers_:
        w.join(60)
    return len(done)


def write_sequence(state: sharedstate.State, name: str, count: int, returned, index: int, start) -> None:
    """Write 1..count to ``name``; after each write returns, publish its number in ``returned[index]``.
    ``start`` is an Event or a Barrier.
    The first writer also sets ``slow`` every 25 writes (published in the last item of ``returned``): a
    name readers mostly find in their caches."""
    start.wait(30)
    for seq in range(1, count + 1):
        state.set(name, seq)
        returned[index] = seq
        if index == 0 and seq % 25 == 0:
            state.set("slow", seq)
            returned[len(returned) - 1] = seq


def read_monotonic(state: sharedstate.State, names: list[str], count: int, returned, start, hits, index: int) -> None:
    """Read ``names`` until every writer is done. A read must see at least the number whose write had
    returned before the read began, and never go back; ``hits[index]`` counts reads of ``slow`` that
    the cache answered."""
    from sharedstate._sentinels import NOT_CACHED

    start.wait(30)
    last = dict.fromkeys([*names, "slow"], 0)
    deadline = time.monotonic() + 90
    while True:
        floors = [returned[i] for i in range(len(names))]  # read before the reads begin
        slow_floor = returned[len(returned) - 1]
        for name, floor in zip(names, floors, strict=True):
            value = state.get(name, 0)
            assert value >= floor, f"{name}: read {value} after the write of {floor} had returned"
            assert value >= last[name], f"{name}: read {value} after reading {last[name]}"
            last[name] = value
        if state.backend.peek("slow") is not NOT_CACHED:
            hits[index] += 1
        value = state.get("slow", 0)
        assert value >= slow_floor, f"slow: read {value} after the write of {slow_floor} had returned"
        assert value >= last["slow"], f"slow: read {value} after reading {last['slow']}"
        last["slow"] = value
        if min(floors) == count:
            return
        assert time.monotonic() < deadline, "the writers did not finish in time"
