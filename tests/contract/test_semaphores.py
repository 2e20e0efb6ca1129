"""The semaphore (API.md section 14) on every backend and both faces: its arguments, the permits it
counts, waits that give up, releases without a permit, its fixed value. Holders in other processes, and
dead ones: tests/test_semaphores.py."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

import sharedstate


def _name() -> str:
    # A semaphore's value is fixed for good by its first call: each test takes names of its own.
    return f"sem-{uuid.uuid4().hex[:12]}"


def test_bad_arguments_are_refused_at_the_call(state):
    for value in ("3", 1.5, True, None):
        with pytest.raises(TypeError, match="value must be an int"):
            state.semaphore(_name(), value)
    for value in (0, -2):
        with pytest.raises(ValueError, match="at least 1"):
            state.semaphore(_name(), value)
    with pytest.raises(TypeError, match="must be a str"):
        state.semaphore(5)
    with pytest.raises(ValueError, match="at most 2\\*\\*53"):
        state.semaphore(_name(), 2**53 + 1)
    assert state.semaphore(_name(), 2**53).value() == 2**53  # every count exact
    sem = state.semaphore(_name(), 2)
    with pytest.raises(TypeError):
        sem.acquire(blocking="yes")
    with pytest.raises(ValueError):
        sem.acquire(False, timeout=1)
    with pytest.raises(ValueError):
        sem.acquire(timeout=-1.5)
    assert sem.value() == 2  # nothing was taken


def test_value_counts_the_free_permits_and_acquire_gives_up_when_none_is(state):
    sem = state.semaphore(_name(), 3)
    assert sem.value() == 3
    assert sem.acquire() is True
    assert sem.acquire(blocking=False) is True
    assert sem.acquire(timeout=1) is True
    assert sem.value() == 0
    assert sem.acquire(blocking=False) is False
    start = time.monotonic()
    assert sem.acquire(timeout=0.2) is False
    assert time.monotonic() - start >= 0.19
    sem.release()
    assert sem.value() == 1
    with sem:
        assert sem.value() == 0
    sem.release()
    sem.release()
    assert sem.value() == 3
    assert state.semaphore(_name()).value() == 1  # value=1 by default


def test_release_without_a_permit_is_a_runtime_error(state):
    sem = state.semaphore(_name(), 2)
    with pytest.raises(RuntimeError, match="holds none of its permits") as info:
        sem.release()
    assert not isinstance(info.value, sharedstate.LockLost)
    with sem:
        pass
    with pytest.raises(RuntimeError, match="holds none"):
        sem.release()
    assert sem.value() == 2


def test_the_first_call_fixes_the_value(state):
    name, other = _name(), _name()
    state.semaphore(other, 5)  # made, but no call reached the state: it fixes nothing
    assert state.semaphore(other, 2).value() == 2
    sem = state.semaphore(name, 2)
    assert sem.acquire() is True
    for call in ("acquire", "value"):
        with pytest.raises(ValueError, match="has 2 permits, not 3"):
            getattr(state.semaphore(name, 3), call)()
    assert state.semaphore(name, 2).value() == 1  # the refused calls took nothing
    sem.release()


def test_a_release_that_fails_changes_nothing(state):
    """Another value, or no permit: the release raises and the semaphore is as it was; a release on a
    semaphore no call made fixes no value."""
    name = _name()
    sem = state.semaphore(name, 3)
    assert sem.acquire() is True
    with pytest.raises(ValueError, match="has 3 permits, not 5"):
        state.semaphore(name, 5).release()
    assert sem.value() == 2  # the permit is still held...
    sem.release()  # ...and this process' to give back
    assert sem.value() == 3
    unknown = _name()
    with pytest.raises(RuntimeError, match="holds none"):
        state.semaphore(unknown, 4).release()
    assert state.semaphore(unknown, 6).value() == 6


def test_hold_times_out_and_a_waiter_gets_the_released_permit(state):
    sem = state.semaphore(_name(), 1)
    assert sem.acquire() is True
    start = time.monotonic()
    with pytest.raises(sharedstate.LockTimeout) as info:
        with sem.hold(timeout=0.2):
            pytest.fail("took a permit of a full semaphore")
    assert time.monotonic() - start >= 0.19
    assert isinstance(info.value, TimeoutError)
    assert info.value.name == sem.name and info.value.timeout == 0.2
    assert "0.2 s" in str(info.value) and repr(sem.name) in str(info.value)

    entered = threading.Event()

    def waiter() -> None:  # another thread: on the aio face, another task
        with sem.hold(timeout=30):
            entered.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        assert not entered.wait(0.1)
        sem.release()
        assert entered.wait(10)
    finally:
        thread.join(10)
    assert sem.value() == 1
