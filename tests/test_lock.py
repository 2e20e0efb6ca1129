"""The local server frees the lock of a holder that dies (the lock itself, on every backend:
tests/contract/test_locks.py)."""

from __future__ import annotations

import signal
import time

import pytest
import workers
from conftest import kill, process_state, reap, wait_until


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
    line = f"WARNING: released the global lock held by pid {proc.pid}"
    assert line in logged.log_text(line)


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
        line = f"held by pid {proc.pid}: its process is gone"
        assert line in logged.log_text(line)
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
