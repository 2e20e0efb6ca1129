"""The aio face's adapter hides nothing: an error comes out unchanged, and a lock belongs to the thread
(the task of the thread) that took it. Without this, the aio half of the contract suite proves nothing."""

from __future__ import annotations

import threading

import pytest

from contract.faces import Blocking


@pytest.fixture(params=[("local", "aio"), ("redis", "aio")], ids=["local-aio", "redis-aio"])
def combination(request):
    """The aio face only (the sync face is the State itself); the adapter is the same on every backend,
    one local and one Redis backend check it."""
    return request.param


@pytest.fixture
def aio_state(state):
    return state


def test_an_error_comes_out_unchanged(aio_state):
    with pytest.raises(TypeError) as info:
        aio_state.set("v", object())
    assert type(info.value) is TypeError and "'v': object is not a storable type" in str(info.value)
    with pytest.raises(ValueError, match="invalid pattern"):
        aio_state.names("(unclosed")


def test_calls_of_one_thread_share_one_task_and_threads_do_not(aio_state):
    lock = aio_state.named_lock("n")
    assert isinstance(lock, Blocking)
    assert lock.acquire(blocking=False) is True
    assert lock.acquire(blocking=False) is True  # reentrant: the same task
    outcome: list = []

    def other_thread():
        outcome.append(lock.acquire(blocking=False))
        try:
            lock.release()
        except RuntimeError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(30)
    assert outcome[0] is False and "does not hold it" in outcome[1]
    lock.release()
    lock.release()
    assert not lock.locked()


def test_a_call_that_is_not_a_coroutine_is_refused():
    with pytest.raises(AssertionError, match="lock.acquire is not a coroutine"):
        _ = Blocking(threading.Lock(), None).acquire
