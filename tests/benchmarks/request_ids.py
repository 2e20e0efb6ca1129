"""What request ids cost a write: round trips of set and incr with and without an id, in one run.

    python tests/benchmarks/request_ids.py [--n 60000] [--rounds 500]

The same server and connection, cache=False; each call in small batches, one after the other in each
round, so drift on a noisy machine hits all of them alike. Prints the p50 of each (µs) and the extra
cost of an id as a share of a get round trip. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import sharedstate  # noqa: E402
from sharedstate._state import State  # noqa: E402


def median_us(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    with sharedstate.StateServer(save_every=None) as server:
        state = sharedstate.connect(server.address, server.authkey, cache=False)
        state.set("x", 1)

        # The same calls sent as before request ids (the store's fixed id in place of a request id), on
        # the same connection, so that both reach the same server thread: a batch without ids runs with
        # State._write switched to State._call (outside the timing; on the class, so that the lookup
        # costs the same).
        def plain_set() -> None:
            state.set("y", 1)

        def plain_incr() -> None:
            state.incr("n")

        calls = {
            "get": (lambda: state.get("x"), False),
            "set (id)": (plain_set, False),
            "set (no id)": (plain_set, True),
            "incr (id)": (plain_incr, False),
            "incr (no id)": (plain_incr, True),
        }
        write = State._write
        samples: dict[str, list[float]] = {key: [] for key in calls}
        clock = time.perf_counter
        per_round = max(20, args.n // args.rounds)
        order = list(calls)
        for round_number in range(args.rounds + 1):
            # Every round in another order: no call always comes after the same one.
            random.shuffle(order)
            for key in order:
                call, without_id = calls[key]
                if without_id:
                    State._write = State._call
                try:
                    out = samples[key]
                    for _ in range(per_round):
                        t = clock()
                        call()
                        out.append(clock() - t)
                finally:
                    if without_id:
                        State._write = write
            if round_number == 0:  # the first round only warms up
                samples = {key: [] for key in calls}
        p50 = {key: median_us(values) for key, values in samples.items()}
        for key, value in p50.items():
            print(f"{key:14s} p50 {value:7.1f} µs")
        for op in ("set", "incr"):
            extra = p50[f"{op} (id)"] - p50[f"{op} (no id)"]
            print(f"{op}: an id costs {extra:+.1f} µs = {100 * extra / p50['get']:+.1f}% of a get round trip")


if __name__ == "__main__":
    main()
