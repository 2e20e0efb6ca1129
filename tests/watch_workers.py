"""Functions run in child processes by tests/test_watch.py (importable under every start method)."""

from __future__ import annotations

from typing import Any

import sharedstate


def watch_until(state: sharedstate.State, ready: Any, last: Any, out: Any, buffer: int = 10_000) -> None:
    """Watch ``n``; say so on ``ready``; put every change until ``n`` is set to ``last`` on ``out``."""
    seen = []
    with state.watch(names=["n"], buffer=buffer) as changes:
        ready.set()
        for change in changes:
            seen.append(tuple(change))
            if change.value == last:
                break
    out.put(seen)


def count_to(state: sharedstate.State, last: int) -> None:
    for value in range(1, last + 1):
        state.set("n", value)


def watch_forever(state: sharedstate.State, ready: Any) -> None:
    with state.watch() as changes:
        ready.set()
        for _ in changes:
            pass


def count_in_bursts(state: sharedstate.State, go: Any, last: int) -> None:
    """Set ``n`` to 1..``last`` once ``go`` is set, pausing briefly every 50 (so that a watcher is
    sometimes waiting when a change comes, sometimes not)."""
    import time

    go.wait(60)
    for value in range(1, last + 1):
        state.set("n", value)
        if value % 50 == 0:
            time.sleep(0.002)
