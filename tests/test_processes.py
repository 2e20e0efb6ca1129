"""Many processes share one state: pools, executors and plain processes under every start method."""

from __future__ import annotations

import concurrent.futures
import pickle

import workers
from conftest import reap, stop_forkserver, wait_until

import sharedstate


def test_eight_pool_tasks_of_250_incr_end_at_exactly_2000(state, mp_context):
    with mp_context.Pool(4) as pool:
        pids = pool.starmap(workers.incr_many, [(state, "hits", 250)] * 8)
    assert state.get("hits") == 2000
    assert len(set(pids)) >= 2


def test_pool_tasks_connect_from_the_environment(state, mp_context):
    stop_forkserver()  # the server is started before any forkserver, as a program would do
    with mp_context.Pool(4) as pool:
        pool.starmap(workers.incr_many_from_env, [("env-hits", 100)] * 8)
    assert state.get("env-hits") == 800


def test_a_state_handle_goes_to_a_process_pool_executor(state, mp_context):
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=mp_context) as pool:
        list(pool.map(workers.incr_many, [state] * 4, ["x"] * 4, [50] * 4))
    assert state.get("x") == 200


def test_a_state_handle_and_a_lock_go_to_a_process(state, mp_context):
    state.set("greeting", "hello")
    result = mp_context.Value("i", -1)
    proc = mp_context.Process(target=workers.try_lock, args=(state, result, "job"))
    proc.start()
    try:
        proc.join(30)
        assert proc.exitcode == 0 and result.value == 1
    finally:
        reap(proc)
    # the child's lock was freed when it exited
    assert state.named_lock("job").acquire(timeout=5)
    state.named_lock("job").release()


def test_a_child_connects_with_no_arguments(state, mp_context):
    stop_forkserver()
    state.set("greeting", "hi from the parent")
    queue = mp_context.Queue()
    proc = mp_context.Process(target=workers.connect_and_report, args=(queue,))
    proc.start()
    try:
        kind, value, pid = queue.get(timeout=30)
    finally:
        reap(proc)
    assert (kind, value, pid) == ("ok", "hi from the parent", proc.pid)


def test_a_handle_pickles_with_its_address_and_key(state):
    clone = pickle.loads(pickle.dumps(state))
    assert clone.address == state.address
    clone.set("a", 1)
    assert state.get("a") == 1
    lock = pickle.loads(pickle.dumps(state.named_lock("n")))
    assert lock.name == "n" and not lock.locked()


def test_two_servers_in_one_process_stay_apart():
    with sharedstate.StateServer() as one, sharedstate.StateServer() as two:
        one.state.set("who", "one")
        two.state.set("who", "two")
        assert one.state.get("who") == "one" and two.state.get("who") == "two"
        assert sharedstate.connect(one.address, one.authkey).get("who") == "one"
        assert sharedstate.connect(two.address, two.authkey).get("who") == "two"


def test_a_forkserver_already_running_is_named_in_a_warning(caplog):
    """Its children keep the environment it started with, so the owner says so when it starts a server."""
    import logging
    import multiprocessing

    proc = multiprocessing.get_context("forkserver").Process(target=workers.noop)
    proc.start()  # the forkserver now runs
    proc.join(30)
    with caplog.at_level(logging.WARNING, logger="sharedstate"):
        with sharedstate.StateServer():
            pass
    assert "forkserver was already running" in caplog.text
    stop_forkserver()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sharedstate"):
        with sharedstate.StateServer():
            pass
    assert "forkserver" not in caplog.text


def test_state_handles_close_their_connections(server):
    before = server.state.stats()["clients"]
    with sharedstate.connect(server.address, server.authkey) as other:
        other.get("x")
        assert server.state.stats()["clients"] == before + 1
    # The server counts the connection out when its serving thread reads the end of it, which can come
    # just after a call on another connection.
    wait_until(lambda: server.state.stats()["clients"] == before, 5, what="the closed connection to be counted out")
