"""The quick-start demo: worker processes share one state, and the state survives a restart.

Run: python examples/demo.py [STATE_FILE]      (default: a file in a new temporary folder)
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import sharedstate


def worker(task: int) -> int:
    state = sharedstate.connect()  # finds the server through the variables StateServer exported
    for _ in range(250):
        state.incr("hits")  # atomic in the server
    with state.lock:  # a read-modify-write needs the cross-process lock
        seen = state.get("worker_pids", [])
        if os.getpid() not in seen:
            state.set("worker_pids", [*seen, os.getpid()])
    return task


def run(path: Path, number: int) -> int:
    with sharedstate.StateServer(path=path, save_every=60) as server:
        state = server.state
        before = state.get("hits", 0)
        print(f"run {number}: server pid {server.pid}, restored hits = {before} from {path.name}")
        state.set("worker_pids", [])
        with multiprocessing.Pool(4) as pool:
            pool.map(worker, range(8))
        after = state.get("hits")
        print(f"run {number}: 8 tasks x 250 increments from {len(state.get('worker_pids'))} processes: hits = {after}")
        return after
    # leaving the block saves the state to the file and stops the server


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sharedstate-demo-")) / "state.json"
    first = run(path, 1)
    second = run(path, 2)  # a new server process, started from the saved file
    print(f"saved in {path}: hits = {second} after the restart (was {first})")
    assert second == first + 2000


if __name__ == "__main__":
    main()
