"""A process pool sharing a counter and a lock.

Eight tasks run in four worker processes. Each adds to a shared counter with the atomic ``incr``, and
appends to a shared list under the cross-process lock with the usual read-modify-write recipe.
Run: python examples/pool_counter.py
"""

from __future__ import annotations

import multiprocessing
import os

import sharedstate


def work(state: sharedstate.State, task: int) -> int:
    for _ in range(250):
        state.incr("hits")  # atomic in the server: one round trip
    with state.lock:  # read-modify-write: needs the lock
        done = state.get("done", [])
        done.append(task)
        state.set("done", done)
    return os.getpid()


def main() -> None:
    with sharedstate.serve() as state:
        with multiprocessing.Pool(4) as pool:
            pids = pool.starmap(work, [(state, task) for task in range(8)])
        print(f"hits = {state.get('hits')} (8 tasks x 250), from {len(set(pids))} worker processes")
        print(f"tasks done = {sorted(state.get('done'))}")
        assert state.get("hits") == 2000 and sorted(state.get("done")) == list(range(8))


if __name__ == "__main__":
    main()
