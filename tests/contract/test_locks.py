"""The lock: reentrant, exclusive across threads and processes, on every backend and both faces (what a
backend does when a holder dies: tests/test_lock.py for the local server, tests/test_redis.py for Redis)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import workers
from conftest import kill, reap, run_to_completion

import sharedstate


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


def test_named_locks_are_independent_and_owner_gives_the_pid(state, target, child_context):
    held = child_context.Event()
    proc = child_context.Process(target=workers.hold_lock_forever, args=(target.connect(), "a", held))
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


def test_lock_get_set_recipe_from_four_processes_loses_nothing(state, target, child_context):
    start = child_context.Event()
    procs = [
        child_context.Process(target=workers.locked_read_modify_write, args=(target.connect(), "c", 200, start))
        for _ in range(4)
    ]
    run_to_completion(procs, 120, go=start)
    assert state.get("c") == 800
    assert not state.lock.locked()
