"""The lock: reentrant, exclusive across threads and processes, and freed when its holder dies."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import workers
from conftest import kill, process_state, reap, run_to_completion, wait_until

import sharedstate


@pytest.fixture
def state(any_state):
    """Every test here that takes ``state`` runs once per backend: the local server, then Redis."""
    return any_state


def test_reentrant_in_one_thread(state):
    lock = state.lock
    assert lock.acquire() is True
    assert lock.acquire() is True
    with lock:
        assert lock.locked()
    lock.release()
    assert lock.locked() and lock.owner() == os.getpid()
    lock.release()
    assert not lock.locked() and lock.owner() is None


def test_excludes_another_thread_of_the_same_process(state):
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=workers.thread_holds, args=(state.lock, held, release))
    holder.start()
    try:
        assert held.wait(10)
        assert state.lock.acquire(blocking=False) is False
        assert state.lock.acquire(timeout=0.2) is False
        release.set()
        assert state.lock.acquire(timeout=10) is True
        state.lock.release()
    finally:
        release.set()
        holder.join(10)


def test_a_waiting_thread_gets_the_lock_when_it_is_released(state):
    acquired = threading.Event()
    state.lock.acquire()

    def waiter():
        with state.lock:
            acquired.set()

    t = threading.Thread(target=waiter)
    t.start()
    try:
        assert not acquired.wait(0.3)
        state.lock.release()
        assert acquired.wait(10)
    finally:
        t.join(10)


def test_hold_raises_lock_timeout(state):
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=workers.thread_holds, args=(state.named_lock("job"), held, release))
    holder.start()
    try:
        assert held.wait(10)
        start = time.monotonic()
        with pytest.raises(sharedstate.LockTimeout) as info:
            with state.named_lock("job").hold(timeout=0.3):
                pytest.fail("acquired a held lock")
        assert time.monotonic() - start >= 0.29
        assert isinstance(info.value, TimeoutError)
        assert info.value.name == "job" and info.value.timeout == 0.3
        assert "'job'" in str(info.value) and "0.3 s" in str(info.value) and str(os.getpid()) in str(info.value)
        with state.lock.hold(timeout=1):  # the global lock is another lock
            pass
    finally:
        release.set()
        holder.join(10)


def test_release_by_a_non_owner_is_a_runtime_error(state):
    with pytest.raises(RuntimeError, match="does not hold it"):
        state.lock.release()
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=workers.thread_holds, args=(state.lock, held, release))
    holder.start()
    try:
        assert held.wait(10)
        with pytest.raises(RuntimeError, match=f"held by pid {os.getpid()}"):
            state.lock.release()
        assert state.lock.locked()
    finally:
        release.set()
        holder.join(10)


def test_bad_acquire_arguments(state):
    with pytest.raises(ValueError):
        state.lock.acquire(blocking=False, timeout=1)
    with pytest.raises(ValueError):
        state.lock.acquire(timeout=-2)
    with pytest.raises(TypeError):
        state.lock.acquire(timeout="1")
    assert not state.lock.locked()


def test_named_locks_are_independent_and_owner_gives_the_pid(state, mp_context):
    held = mp_context.Event()
    proc = mp_context.Process(target=workers.hold_lock_forever, args=(state, "a", held))
    proc.start()
    try:
        assert held.wait(30)
        assert state.named_lock("a").owner() == proc.pid
        assert state.named_lock("a").locked()
        assert state.named_lock("a").acquire(blocking=False) is False
        assert state.named_lock("b").acquire(blocking=False) is True
        assert state.lock.acquire(blocking=False) is True
        assert state.named_lock("b").owner() == os.getpid()
        assert not state.named_lock("c").locked()
        state.named_lock("b").release()
        state.lock.release()
    finally:
        kill(proc.pid)
        reap(proc)


def _recovered_within(state, seconds: float) -> float:
    start = time.monotonic()
    assert state.lock.acquire(timeout=5), "the dead holder's lock was never freed"
    took = time.monotonic() - start
    state.lock.release()
    assert took <= seconds, f"took {took:.2f} s"
    return took


def test_sigkill_of_the_holder_frees_the_lock_within_a_second(logged, mp_context):
    state = logged.state
    held = mp_context.Event()
    proc = mp_context.Process(target=workers.hold_lock_forever, args=(state, None, held))
    proc.start()
    try:
        assert held.wait(30)
        assert state.lock.owner() == proc.pid
        kill(proc.pid)
        _recovered_within(state, 1.0)
    finally:
        reap(proc)
    assert state.stats()["lock_recoveries"] == 1
    assert f"WARNING: released the global lock held by pid {proc.pid}" in logged.log_text()


@pytest.mark.parametrize("end", ["sigkill", "exit-unreaped"])
def test_a_dead_holder_is_found_even_if_its_connection_stays_open(logged, end):
    """A forked grandchild keeps the holder's socket open, so only the liveness check (psutil, with the
    create time, zombies counted as dead) can tell the holder is gone."""
    import multiprocessing

    state = logged.state
    ctx = multiprocessing.get_context("fork")
    held, go = ctx.Event(), ctx.Event()
    grandchild = ctx.Value("i", 0)
    target = workers.hold_lock_with_fd_kept_open if end == "sigkill" else workers.hold_lock_fd_open_then_exit
    args = (state, held, grandchild) if end == "sigkill" else (state, held, grandchild, go)
    proc = ctx.Process(target=target, args=args)
    proc.start()
    try:
        assert held.wait(30)
        if end == "sigkill":
            kill(proc.pid)
        else:
            go.set()  # it exits; we do not join it, so it stays a zombie
            wait_until(lambda: process_state(proc.pid) == "Z", 10, what="the holder to exit")
        _recovered_within(state, 1.0)
        assert state.stats()["lock_recoveries"] == 1
        assert f"held by pid {proc.pid}: its process is gone" in logged.log_text()
    finally:
        kill(proc.pid)
        if grandchild.value:
            kill(grandchild.value)
        reap(proc)


def test_closing_every_connection_frees_the_lock(server, mp_context):
    state = server.state  # the local server's behaviour: a Redis lock is leased, not tied to connections
    held, go = mp_context.Event(), mp_context.Event()
    proc = mp_context.Process(target=workers.hold_lock_then_close, args=(state, held, go))
    proc.start()
    try:
        assert held.wait(30)
        assert state.lock.owner() == proc.pid
        go.set()
        _recovered_within(state, 5.0)
        assert state.stats()["lock_recoveries"] == 1
    finally:
        kill(proc.pid)
        reap(proc)


def test_an_interrupted_wait_does_not_take_the_lock(server, mp_context):
    """A client that gives up mid-wait (its connection closes) must not be handed the lock later."""
    state = server.state  # the local server's waiters (a Redis waiter asks again, it is never handed a lock)
    held = mp_context.Event()
    holder = mp_context.Process(target=workers.hold_lock_forever, args=(state, None, held))
    holder.start()
    waiter = None
    try:
        assert held.wait(30)
        waiting = mp_context.Event()
        waiter = mp_context.Process(target=workers.wait_for_lock, args=(state, waiting))
        waiter.start()
        assert waiting.wait(30)
        wait_until(lambda: state.stats()["lock_waiters"] == 1, 10, what="the waiter's request")
        kill(waiter.pid, signal.SIGKILL)
        reap(waiter)
        # The server notices the waiter is gone and stops waiting on its behalf.
        wait_until(lambda: state.stats()["lock_waiters"] == 0, 2, what="the abandoned wait to end")
        kill(holder.pid)
        reap(holder)
        _recovered_within(state, 2.0)
        assert state.stats()["lock_recoveries"] == 1  # the holder's lock only: the waiter never took it
    finally:
        kill(holder.pid)
        reap(holder)
        if waiter is not None:
            reap(waiter)


@pytest.fixture
def recipe_server():
    with sharedstate.StateServer() as srv:
        yield srv


def test_lock_get_set_recipe_from_four_processes_loses_nothing(recipe_server, mp_context):
    state = recipe_server.state
    start = mp_context.Event()
    procs = [
        mp_context.Process(target=workers.locked_read_modify_write, args=(state, "c", 200, start)) for _ in range(4)
    ]
    run_to_completion(procs, 60, go=start)
    assert state.get("c") == 800
    assert not state.lock.locked()
