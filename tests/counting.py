"""Client processes that count their calls while the server is SIGKILLed: the run shared by the restart
tests of the blocking and the asyncio client."""

from __future__ import annotations

import random
import time
from pathlib import Path

from conftest import kill, reap, wait_until

import sharedstate


def count_under_sigkills(
    server: sharedstate.StateServer,
    clients: list[tuple[object, Path, object, object]],
    kills: int,
    rng: random.Random,
    pause: tuple[float, float],
    started: int,
) -> int:
    """Start ``clients`` (``(process, report file, go event, stop event)``; each process counts ``n``
    until stopped, then writes how many calls returned and every error to its report), let them count to
    ``started``, SIGKILL the server ``kills`` times ``pause`` seconds apart (the owner restarts it), stop
    and reap them. Asserts that no client saw an error and that ``n`` is exactly the calls that returned;
    returns that number."""
    state = server.state
    procs = [proc for proc, _, _, _ in clients]
    try:
        for proc in procs:
            proc.start()  # type: ignore[attr-defined]
        for _, _, go, _ in clients:
            go.set()  # type: ignore[attr-defined]
        wait_until(lambda: (state.get("n") or 0) > started, 60, what="the clients to start counting")
        for _ in range(kills):
            time.sleep(rng.uniform(*pause))
            old = server.pid
            kill(old)
            wait_until(lambda old=old: server.pid != old, 30, what="the owner to restart the server")
        wait_until(lambda: state.get("n") is not None, 30, what="the last restarted server")
        for _, _, _, stop in clients:
            stop.set()  # type: ignore[attr-defined]
        for proc in procs:
            proc.join(120)  # type: ignore[attr-defined]
            assert proc.exitcode == 0, f"{proc.name} ended with {proc.exitcode}"  # type: ignore[attr-defined]
    finally:
        for _, _, _, stop in clients:
            stop.set()  # type: ignore[attr-defined]
        reap(*procs)  # type: ignore[arg-type]
    results = [report.read_text().split("\n", 1) for _, report, _, _ in clients]
    errors = [text for _, text in results if text.strip()]
    assert not errors, errors[0]
    done = sum(int(count) for count, _ in results)
    assert state.get("n") == done
    return done
