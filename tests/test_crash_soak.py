"""Soak across server crashes: 8 client processes (fork, spawn and forkserver in turn) doing ``incr`` and
lock + get + set while the server process is killed with SIGKILL 20 times (journal, ``fsync="always"``)
and its owner starts it again. Callers see no exception, every count is exact, and the lock never has
two holders at once."""

from __future__ import annotations

import multiprocessing
import random
import signal
import time
import traceback

import pytest
from conftest import START_METHODS, kill, reap, wait_until

import sharedstate

CLIENTS = 8
KILLS = 20


def crash_soak_client(state, i, stop, calls, locked, inside, overlaps, errors, started) -> None:
    """``incr`` of its own counter and a locked read-modify-write of a shared ledger, until ``stop``.
    Every exception is counted (and its text kept for the report), never swallowed."""
    try:
        started[i] = 1
        while not stop.value:
            value = state.incr(f"count-{i}")
            calls[i] += 1
            if value != calls[i]:
                errors[i] += 1
                print(f"client {i}: incr returned {value} after {calls[i]} calls", flush=True)
            with state.lock:
                inside[i] = 1
                others = [j for j in range(CLIENTS) if j != i and inside[j]]
                if others:
                    overlaps.value += 1
                ledger = state.get("ledger", {})
                ledger[str(i)] = ledger.get(str(i), 0) + 1
                state.set("ledger", ledger)
                locked[i] += 1
                inside[i] = 0
    except BaseException:
        errors[i] += 1
        traceback.print_exc()
        raise


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_callers_see_no_error_and_lose_nothing_across_20_server_crashes(tmp_path):
    # Clients of every start method in one soak: each sees all 20 crashes, and the kills are made once.
    contexts = [multiprocessing.get_context(START_METHODS[i % len(START_METHODS)]) for i in range(CLIENTS)]
    server = sharedstate.StateServer(
        path=tmp_path / "state.json", durability="journal", journal_fsync="always", save_every=None
    ).start()
    # Shared memory without locks: nothing here can be left held by a killed process.
    stop = multiprocessing.RawValue("b", 0)
    overlaps = multiprocessing.RawValue("q", 0)
    calls, locked, errors = (multiprocessing.RawArray("q", CLIENTS) for _ in range(3))
    inside, started = (multiprocessing.RawArray("b", CLIENTS) for _ in range(2))
    args = (stop, calls, locked, inside, overlaps, errors, started)
    procs = [
        ctx.Process(target=crash_soak_client, args=(server.state, i, *args), daemon=True)
        for i, ctx in enumerate(contexts)
    ]
    rng = random.Random(13)
    try:
        for proc in procs:
            proc.start()
        wait_until(lambda: all(started) and all(calls), 60, what="every client made a call")
        for _ in range(KILLS):
            before = sum(calls)
            old = server.pid
            kill(old, signal.SIGKILL)
            wait_until(lambda: server.pid != old, 30, what="the owner started a new server")  # noqa: B023
            # Load reaches the new server before the next kill, some of it mid-call at the kill.
            wait_until(lambda: sum(calls) > before + CLIENTS, 30, what="calls go on after the restart")  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.2))
        stop.value = 1
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0] * CLIENTS, "a client raised or hung (see its output)"
        assert list(errors) == [0] * CLIENTS
        assert overlaps.value == 0, "two processes were inside the lock at once"
        state = server.state
        for i in range(CLIENTS):
            assert calls[i] > 0 and locked[i] > 0
            assert state.get(f"count-{i}") == calls[i], f"client {i}: an incr was lost or applied twice"
        ledger = state.get("ledger")
        assert {int(k): v for k, v in ledger.items()} == {i: locked[i] for i in range(CLIENTS)}
        assert not state.lock.locked()
    finally:
        stop.value = 1
        for proc in procs:
            if proc.pid is not None:
                kill(proc.pid)
        reap(*[p for p in procs if p.pid is not None])
        server.shutdown()
