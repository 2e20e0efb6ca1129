"""Quick figures of ``State.watch`` on a local server (a script, not a test; see METHOD.md for why):

- the latency of a change, from a writer process calling ``set`` to a watcher process holding the
  ``Change``, one change every 1.5 ms, beside a ``get`` round trip measured in the same loop;
- a writer's ``set`` rate with no watcher, a stopped watcher (publishing only), a watcher taking every
  change, and one that works 1 ms per batch, interleaved in rounds; with the server's CPU per ``set`` and
  its ``watch_next`` calls per ``set``.

``python tests/benchmarks/watch.py``
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import time

import psutil

import sharedstate


def _latencies(state: sharedstate.State, ready, count: int, out) -> None:
    seen = []
    with state.watch(names=["t"]) as changes:
        ready.set()
        while len(seen) < count:
            change = changes.next(5)
            if change is None:
                break
            seen.append(time.perf_counter() - change.value)
    out.put(seen)


def _drain(state: sharedstate.State, ready, stop, out, pause: float) -> None:
    count = 0
    with state.watch() as changes:
        ready.set()
        while not stop.is_set():
            if changes.next(0.2) is not None:
                count += 1
                if pause and not changes._waiting:  # the batch is done: work on it
                    time.sleep(pause)
    out.put(count)


def _rate(state: sharedstate.State, server: psutil.Process, count: int) -> tuple[float, float, int]:
    calls = state.stats()["calls"].get("watch_next", 0)
    cpu = sum(server.cpu_times()[:2])
    start = time.perf_counter()
    for value in range(count):
        state.set("w", value)
    rate = count / (time.perf_counter() - start)
    cpu_us = (sum(server.cpu_times()[:2]) - cpu) / count * 1e6
    return rate, cpu_us, state.stats()["calls"].get("watch_next", 0) - calls


def _p(values: list[float], fraction: float) -> float:
    return sorted(values)[int(len(values) * fraction)] * 1e6


def main(count: int = 1000, sets: int = 10_000, rounds: int = 7) -> None:
    context = multiprocessing.get_context("spawn")
    with sharedstate.StateServer() as owner:
        state = sharedstate.connect(owner.address, owner.authkey, cache=False)
        server = psutil.Process(owner.pid)
        state.set("g", 1)
        ready, out = context.Event(), context.Queue()
        watcher = context.Process(target=_latencies, args=(state, ready, count, out))
        watcher.start()
        ready.wait(30)
        round_trips = []
        for _ in range(count):
            start = time.perf_counter()
            state.get("g")
            round_trips.append(time.perf_counter() - start)
            time.sleep(0.0005)
            state.set("t", time.perf_counter())
            time.sleep(0.001)
        latencies = out.get(timeout=30)
        watcher.join(30)
        print(
            f"get round trip p50 {_p(round_trips, 0.5):.0f} us p90 {_p(round_trips, 0.9):.0f} us; "
            f"change latency p50 {_p(latencies, 0.5):.0f} us p90 {_p(latencies, 0.9):.0f} us"
        )
        figures: dict[str, list[tuple[float, float, int]]] = {"none": [], "stopped": [], "busy": [], "1ms/batch": []}
        for _ in range(rounds):
            figures["none"].append(_rate(state, server, sets))
            for mode, pause in (("stopped", 0.0), ("busy", 0.0), ("1ms/batch", 0.001)):
                ready, stop, out = context.Event(), context.Event(), context.Queue()
                drain = context.Process(target=_drain, args=(state, ready, stop, out, pause))
                drain.start()
                ready.wait(30)
                if mode == "stopped":
                    os.kill(drain.pid, signal.SIGSTOP)
                try:
                    figures[mode].append(_rate(state, server, sets))
                finally:
                    if mode == "stopped":
                        os.kill(drain.pid, signal.SIGCONT)
                stop.set()
                out.get(timeout=30)
                drain.join(30)
        base = statistics.median(rate for rate, _, _ in figures["none"])
        for mode, runs in figures.items():
            rate = statistics.median(r for r, _, _ in runs)
            cpu = statistics.median(c for _, c, _ in runs)
            calls = statistics.median(n for _, _, n in runs) / sets
            print(
                f"sets/s with {mode}: {rate:.0f} ({(rate / base - 1) * 100:+.1f} %), "
                f"server CPU per set {cpu:.1f} us, watch_next per set {calls:.3f}"
            )


if __name__ == "__main__":
    main()
