"""The quick-start demo: worker processes share one state through a server and its lock.

Run: python examples/demo.py
"""

from __future__ import annotations

import multiprocessing
import os

import sharedstate


def worker(task: int) -> int:
    state = sharedstate.connect()  # finds the server through the environment StateServer exported
    for _ in range(250):
        state.incr("hits")
    with state.lock:
        seen = state.get("seen_pids", [])
        if os.getpid() not in seen:
            state.set("seen_pids", [*seen, os.getpid()])
    return task


def main() -> None:
    with sharedstate.StateServer() as server:
        state = server.state
        print(f"server pid {server.pid} listening at {server.address}")
        with multiprocessing.Pool(4) as pool:
            pool.map(worker, range(8))
        print(f"8 tasks x 250 increments from {len(state.get('seen_pids'))} processes: hits = {state.get('hits')}")
        assert state.get("hits") == 2000


if __name__ == "__main__":
    main()
