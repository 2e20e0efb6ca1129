"""sharedstate against its peers, measured side by side in one run.

    python tests/benchmarks/bench.py [--names 1000000] [--ops 20000] [--runs 1] [--rounds 5] [--no-pin]

Prints every figure, then the ratios the project holds itself to (see METHOD.md beside this file).
Not collected by pytest. redis-py with a local redis-server, and diskcache, are measured when installed.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import pickle
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import sharedstate  # noqa: E402

CTX = multiprocessing.get_context("fork")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies(call, n: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        call()
        out.append(clock() - t)
    return out


def interleaved(calls: dict, n: int, r: dict[str, float], rounds: int = 10) -> dict[str, list[float]]:
    """Time each of ``calls`` about ``n`` times, in rounds of one warmed batch of each call after the
    other, so that drift on a noisy machine hits all of them alike; put each one's p50 (µs) in ``r`` as
    ``NAME_p50_us`` and return the samples."""
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            latencies(call, 200)  # warm
            samples[key] += latencies(call, max(200, n // rounds))
    for key, values in samples.items():
        r[f"{key}_p50_us"] = pct(values, 0.5) * 1e6
    return samples


# -- the floor: a raw Pipe round trip ------------------------------------------------------------------
def _echo(conn) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def pipe_floor(n: int) -> list[float]:
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_echo, args=(child,))
    proc.start()
    try:
        for _ in range(1000):
            parent.send("x")
            parent.recv()
        return latencies(lambda: (parent.send(("get", "key")), parent.recv()), n)
    finally:
        parent.send(None)
        proc.join()


def _socket_echo(sock) -> None:
    """The bare transport: echo whatever arrives, one read and one write, nothing decoded."""
    fd = sock.fileno()
    while True:
        data = os.read(fd, 65536)
        if not data:
            return
        os.write(fd, data)


# -- many processes at once ----------------------------------------------------------------------------
def _run_many(target, args_for, procs: int) -> float:
    """Start ``procs`` processes that wait on a barrier, time from the barrier to the last one's end."""
    barrier = CTX.Barrier(procs + 1)
    workers = [CTX.Process(target=target, args=(barrier, *args_for(i))) for i in range(procs)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def _manager_recipe(barrier, d, lock, n) -> None:
    barrier.wait()
    for _ in range(n):
        with lock:
            d["c"] = d.get("c", 0) + 1


def _state_incr(barrier, state, n) -> None:
    state.get("warm")
    barrier.wait()
    for _ in range(n):
        state.incr("c")


def _state_recipe(barrier, state, n) -> None:
    state.get("warm")
    barrier.wait()
    for _ in range(n):
        with state.lock:
            state.set("r", state.get("r", 0) + 1)


def _redis_incr(barrier, socket_path, n) -> None:
    import redis

    r = redis.Redis(unix_socket_path=socket_path)
    r.ping()
    barrier.wait()
    for _ in range(n):
        r.incr("c")


def _diskcache_incr(barrier, folder, n) -> None:
    import diskcache

    cache = diskcache.Cache(folder)
    barrier.wait()
    for _ in range(n):
        cache.incr("c")


#: The read-mostly workload's names: each of 4 processes reads one at random 95 times in 100, and sets one
#: 5 times in 100.
MIXED_NAMES = 1000


def _mixed(barrier, state, names: int, n: int, seed: int) -> None:
    """95% reads and 5% writes of ``names`` names, chosen at random."""
    import random

    rng = random.Random(seed)
    keys = [f"m{i}" for i in range(names)]
    plan = [(rng.random() < 0.05, rng.choice(keys)) for _ in range(n)]
    state.get("warm")
    barrier.wait()
    for write, key in plan:
        if write:
            state.set(key, rng.random())
        else:
            state.get(key)


def _ultradict_get(n: int) -> list[float] | None:
    """UltraDict's get through a second view of the dict, when it is installed."""
    try:
        from UltraDict import UltraDict
    except ImportError:
        return None
    ultra = UltraDict()
    try:
        ultra["key"] = 1
        other = UltraDict(name=ultra.name)
        try:
            latencies(lambda: other.get("key"), 1000)
            return latencies(lambda: other.get("key"), n)
        finally:
            other.close()
    finally:
        ultra.close()
        ultra.unlink()


def measure_cache(args, r: dict[str, float]) -> None:
    """The client cache: an unchanged value read with no round trip, against the peers' reads, and a
    read-mostly workload from 4 processes with the cache on and off."""
    n = args.ops
    parent, child = CTX.Pipe()
    echo = CTX.Process(target=_echo, args=(child,))
    echo.start()
    try:
        with multiprocessing.Manager() as manager, sharedstate.StateServer() as server:
            d = manager.dict()
            d["key"] = 1
            cached = sharedstate.connect(server.address, server.authkey)
            cached.set("key", {"a": 1})
            cached.set("int", 1)
            calls = {
                "cache_pipe_rtt": lambda: (parent.send(("get", "key")), parent.recv()),
                "cache_manager_get": lambda: d.get("key"),
                "cached_get": lambda: cached.get("int"),
                "cached_get_dict": lambda: cached.get("key"),
            }
            interleaved(calls, n, r)
            ultra = _ultradict_get(n)
            if ultra is not None:
                r["ultradict_get_p50_us"] = pct(ultra, 0.5) * 1e6
            per = max(2000, n // 2)
            for cache in (True, False):
                handle = sharedstate.connect(server.address, server.authkey, cache=cache)
                handle.update({f"m{i}": 0.0 for i in range(MIXED_NAMES)})
                took = _run_many(_mixed, lambda i, h=handle: (h, MIXED_NAMES, per, i), 4)
                r[f"mixed_{'cache' if cache else 'nocache'}_4p_per_s"] = 4 * per / took
    finally:
        parent.send(None)
        echo.join()


def measure_aio(args, r: dict[str, float]) -> None:
    """The asyncio client against the blocking one, on one sharedstate server, then on one redis-server
    (Unix socket, no persistence; ``redis_`` figures, when redis-server and redis-py are installed):
    ``_aio_figures`` on each."""
    import sharedstate.aio

    with sharedstate.StateServer() as server:
        state = sharedstate.connect(server.address, server.authkey, cache=False)
        _aio_figures(args, r, "", state, lambda: sharedstate.aio.connect(server.address, server.authkey, cache=False))
        state.close()
    with _RedisServer() as redis_server:
        if redis_server.socket is not None:
            url = f"unix://{redis_server.socket}"
            state = sharedstate.connect(url, namespace="bench")
            _aio_figures(args, r, "redis_", state, lambda: sharedstate.aio.connect(url, namespace="bench"))
            state.close()


def _aio_figures(args, r: dict[str, float], prefix: str, state, aconnect) -> None:
    """In one event loop, a blocking handle ``state`` against an ``AsyncState`` of the same state
    (``aconnect()``): an awaited ``incr`` against a blocking ``incr`` (p50, interleaved in 10 rounds as
    the latencies are), and 100 tasks doing ``incr`` at once on one ``AsyncState`` against one thread's
    blocking calls (calls per second, the median of ``--rounds`` rounds, one after the other in each
    round). The figures' names start with ``prefix``."""
    import asyncio

    n = max(2000, args.ops // 2)

    async def main() -> None:
        astate = await aconnect()
        clock = time.perf_counter
        try:
            blocking: list[float] = []
            awaited: list[float] = []
            for _ in range(10):
                for samples, count in ((blocking, 200), (awaited, 200), (blocking, n // 10), (awaited, n // 10)):
                    keep = count != 200  # the first batch of each warms up
                    if samples is blocking:
                        for _ in range(count):
                            t = clock()
                            state.incr("lat")
                            if keep:
                                samples.append(clock() - t)
                    else:
                        for _ in range(count):
                            t = clock()
                            await astate.incr("lat")
                            if keep:
                                samples.append(clock() - t)
            r[f"{prefix}blocking_incr_p50_us"] = pct(blocking, 0.5) * 1e6
            r[f"{prefix}awaited_incr_p50_us"] = pct(awaited, 0.5) * 1e6

            async def task(calls: int) -> None:
                for _ in range(calls):
                    await astate.incr("tasks")

            thread_rates, task_rates = [], []
            for _ in range(args.rounds):
                t = clock()
                for _ in range(n):
                    state.incr("thread")
                thread_rates.append(n / (clock() - t))
                before = state.get("tasks") or 0
                t = clock()
                await asyncio.gather(*(task(n // 100) for _ in range(100)))
                task_rates.append(n // 100 * 100 / (clock() - t))
                assert state.get("tasks") == before + n // 100 * 100
            r[f"{prefix}blocking_thread_incr_per_s"] = statistics.median(thread_rates)
            r[f"{prefix}aio_100_tasks_incr_per_s"] = statistics.median(task_rates)
        finally:
            await astate.aclose()

    asyncio.run(main())


def _watcher(state, name: str, ready, conn, count: int) -> None:
    """Watch ``name``; for each change, send how long ago (``perf_counter``, the same clock in every
    process on Linux and macOS) its writer stamped it, then wait for the writer's next one."""
    with state.watch(names=[name]) as changes:
        ready.set()
        for _ in range(count):
            change = next(changes)
            conn.send(time.perf_counter() - change.value)


def _busy_watcher(state, name: str, ready, stop) -> None:
    """Watch ``name`` and take every change as it comes, until ``stop``."""
    with state.watch(names=[name]) as changes:
        ready.set()
        while not stop.is_set():
            changes.next(0.05)


def _placement() -> tuple[set[int], set[int]] | None:
    """Where the processes of the watch figures run: every client process (writer, watcher) on one CPU,
    the server on another; ``None`` on a machine with one CPU, or that cannot pin."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else None


def _pin(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of process ``pid`` (its threads made later inherit it) on ``cpus``."""
    if cpus is not None:
        for thread in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else [pid]:
            try:
                os.sched_setaffinity(int(thread), cpus)
            except ProcessLookupError:
                pass  # a thread that ended meanwhile


def measure_watch(args, r: dict[str, float]) -> None:
    """Change notifications, on one sharedstate server, then on one redis-server (``redis_`` figures):
    ``_watch_figures`` on each, and the floors of each transport (``_relay_floor``, ``_redis_py_floor``).
    Each server (and the relay of the floor) runs on a CPU of its own, the clients on another
    (``_placement``): a change then crosses between CPUs as often as a round trip does, and no run
    compares a ``get`` whose two ends the scheduler happened to put on one CPU with a change that
    cannot have its three processes there."""
    placement = None if args.no_pin else _placement()
    clients, servers = placement if placement is not None else (None, None)
    r["watch_pinned"] = float(placement is not None)
    before = os.sched_getaffinity(0) if placement is not None else None
    try:
        _pin(os.getpid(), clients)  # the processes forked from here on inherit it
        _relay_floor(max(1000, args.ops // 10), r, servers)
        with sharedstate.StateServer() as server:
            _pin(server.pid, servers)
            state = sharedstate.connect(server.address, server.authkey, cache=False)
            _watch_figures(args, r, "", state)
            state.close()
        with _RedisServer() as redis_server:
            if redis_server.socket is not None:
                if servers is not None:
                    _pin(redis_server.pid(), servers)
                _redis_py_floor(redis_server.socket, max(1000, args.ops // 10), r)
                state = sharedstate.connect(f"unix://{redis_server.socket}", namespace="bench")
                _watch_figures(args, r, "redis_", state)
                state.close()
    finally:
        _pin(os.getpid(), before)


def _messages(sock, others):
    """The messages of ``sock`` one read each, until it ends or says ``q``. ``others``: the descriptors of
    the other processes, inherited, closed first so that a peer that dies is seen as gone."""
    for other in others:
        other.close()
    fd = sock.fileno()
    while True:
        data = os.read(fd, 65536)
        if not data or data[:1] == b"q":
            return
        yield data


def _relay(sock_w, sock_x, others, cpus) -> None:
    """The bare transport of a change: pass each change from the writer on to the watcher, then answer
    the writer; at the writer's end, end the watcher. ``cpus``: where it runs (``_placement``)."""
    _pin(os.getpid(), cpus)
    w, x = sock_w.fileno(), sock_x.fileno()
    for data in _messages(sock_w, others):
        if data[:1] == b"s":
            os.write(x, data)
        os.write(w, b"ok")
    os.write(x, b"q")


def _relay_watcher(sock, report, others) -> None:
    out = report.fileno()
    for data in _messages(sock, others):
        os.write(out, repr(time.perf_counter() - float(data[1:])).encode())


def _read_some(fd: int) -> bytes:
    """One read of ``fd`` (a socket with a receive timeout: ``BlockingIOError`` when nothing came)."""
    data = os.read(fd, 64)
    if not data:
        raise RuntimeError("a process of the floor ended early")
    return data


def _relay_floor(n: int, r: dict[str, float], cpus: set[int] | None) -> None:
    """What the transport alone costs a change: a writer's message through a relay process (which passes
    it on to a watcher process, then answers the writer), one at a time, against a round trip to the relay;
    Unix sockets, one read per message and one write per destination, nothing decoded (``relay_*``
    figures). ``cpus``: where the relay runs (``_placement``)."""
    w_mine, w_relay = socket.socketpair()
    x_relay, x_mine = socket.socketpair()
    report_mine, report_theirs = socket.socketpair()
    procs = [
        CTX.Process(target=_relay, args=(w_relay, x_relay, (w_mine, x_mine, report_mine, report_theirs), cpus)),
        CTX.Process(target=_relay_watcher, args=(x_mine, report_theirs, (w_mine, w_relay, x_relay, report_mine))),
    ]
    for proc in procs:
        proc.start()
    for sock in (w_relay, x_relay, x_mine, report_theirs):
        sock.close()
    for sock in (w_mine, report_mine):  # a peer that hangs fails the measure within a minute
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 60, 0))
    fd, report = w_mine.fileno(), report_mine.fileno()
    trips: list[float] = []
    got: list[float] = []
    try:
        for _ in range(10):
            trips += latencies(lambda: (os.write(fd, b"g"), _read_some(fd)), n // 10)
            for _ in range(n // 10):
                os.write(fd, b"s" + repr(time.perf_counter()).encode())
                _read_some(fd)
                got.append(float(_read_some(report)))
    finally:
        w_mine.close()  # the relay reads its end, and tells the watcher
        report_mine.close()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    r["relay_change_p50_us"] = pct(got, 0.5) * 1e6
    r["relay_round_trip_p50_us"] = pct(trips, 0.5) * 1e6


def _redis_stream_reader(path: str, ready, conn, count: int) -> None:
    import redis

    from sharedstate.backends.redis.watch import _entries  # the reply's shape (RESP2 or RESP3), nothing timed

    client = redis.Redis(unix_socket_path=path)
    last = client.xadd("floor", {"v": "0"})
    ready.set()
    for _ in range(count):
        found = None
        while not found:
            found = client.xread({"floor": last}, block=1000, count=100)
        entries = _entries(found)
        last = entries[-1][0]
        conn.send(time.perf_counter() - float(entries[-1][1][b"v"]))


def _redis_py_floor(path: str, n: int, r: dict[str, float]) -> None:
    """What Redis alone costs a change, with redis-py and nothing of sharedstate: an ``XADD`` reaching an
    ``XREAD BLOCK`` in another process, one at a time, against an ``HGET`` round trip
    (``redis_py_*`` figures)."""
    import redis

    client = redis.Redis(unix_socket_path=path)
    client.hset("floor:h", "k", "1")
    got: list[float] = []
    trips: list[float] = []
    try:
        for _ in range(10):
            ready = CTX.Event()
            parent, child = CTX.Pipe()
            reader = CTX.Process(target=_redis_stream_reader, args=(path, ready, child, n // 10))
            reader.start()
            child.close()
            try:
                if not ready.wait(60):
                    raise RuntimeError("the reader did not start")
                trips += latencies(lambda: client.hget("floor:h", "k"), n // 10)
                for _ in range(n // 10):
                    client.xadd("floor", {"v": repr(time.perf_counter())}, maxlen=1000, approximate=True)
                    if not parent.poll(60):
                        raise RuntimeError("the reader did not answer within 60 s")
                    got.append(parent.recv())
            finally:
                parent.close()
                reader.join(10)
                if reader.is_alive():
                    reader.terminate()
                    reader.join()
    finally:
        client.delete("floor", "floor:h")
        client.close()
    r["redis_py_xadd_xread_p50_us"] = pct(got, 0.5) * 1e6
    r["redis_py_hget_p50_us"] = pct(trips, 0.5) * 1e6


def _watch_figures(args, r: dict[str, float], prefix: str, state) -> None:
    """How long a change takes to reach a watcher in another process (p50, one change at a time, each
    stamped by its writer just before its ``set``), against a ``get`` round trip on the same handle
    (interleaved in 10 rounds); and a writer's ``incr`` rate while one other process watches what it
    writes, against its rate with no watcher (the median of ``--rounds`` rounds, alternating)."""
    n = max(1000, args.ops // 10)
    got: list[float] = []
    trips: list[float] = []
    for _ in range(10):
        ready = CTX.Event()
        parent, child = CTX.Pipe()
        watcher = CTX.Process(target=_watcher, args=(state, "ping", ready, child, n // 10))
        watcher.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the watcher did not start")
            trips += latencies(lambda: state.get("ping"), n // 10)
            for _ in range(n // 10):
                state.set("ping", time.perf_counter())
                got.append(parent.recv())
        finally:
            watcher.join(60)
    r[f"{prefix}watch_latency_p50_us"] = pct(got, 0.5) * 1e6
    r[f"{prefix}watch_get_p50_us"] = pct(trips, 0.5) * 1e6

    def rate() -> float:
        count = max(2000, args.ops // 4)
        t = time.perf_counter()
        for _ in range(count):
            state.incr("written")
        return count / (time.perf_counter() - t)

    alone, watched = [], []
    for _ in range(args.rounds):
        alone.append(rate())
        ready, stop = CTX.Event(), CTX.Event()
        watcher = CTX.Process(target=_busy_watcher, args=(state, "written", ready, stop))
        watcher.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the watcher did not start")
            watched.append(rate())
        finally:
            stop.set()
            watcher.join(60)
    r[f"{prefix}writer_alone_incr_per_s"] = statistics.median(alone)
    r[f"{prefix}writer_watched_incr_per_s"] = statistics.median(watched)


def _plain_dict_rss(names: int, queue) -> None:
    data = {f"name-{i}": i for i in range(names)}
    gc.collect()
    queue.put(psutil.Process().memory_info().rss)
    del data


def _baseline_rss(queue) -> None:
    queue.put(psutil.Process().memory_info().rss)


class _RedisServer:
    """A throw-away redis-server on a Unix socket, when redis-server and redis-py are installed."""

    def __init__(self) -> None:
        self.socket: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> _RedisServer:
        binary = shutil.which("redis-server")
        try:
            import redis  # noqa: F401
        except ImportError:
            return self
        if binary is None:
            return self
        self._tmp = tempfile.TemporaryDirectory()
        sock = os.path.join(self._tmp.name, "redis.sock")
        self._proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.socket = sock
        return self

    def pid(self) -> int:
        """The server's process id as it says it (the program started may be a wrapper that forked it)."""
        import redis

        with redis.Redis(unix_socket_path=self.socket) as client:
            return int(client.info("server")["process_id"])

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()


def _have_diskcache() -> bool:
    try:
        import diskcache  # noqa: F401
    except ImportError:
        return False
    return True


def measure(args) -> dict[str, float]:
    r: dict[str, float] = {}
    n = args.ops
    rounds = 10
    parent, child = CTX.Pipe()
    echo = CTX.Process(target=_echo, args=(child,))
    echo.start()
    near, far = socket.socketpair()
    bare = CTX.Process(target=_socket_echo, args=(far,))
    bare.start()
    far.close()
    near_fd = near.fileno()
    message = pickle.dumps(("sharedstate", "get", ("key",), {}), pickle.HIGHEST_PROTOCOL)
    message = len(message).to_bytes(4, "big") + message
    with multiprocessing.Manager() as manager, sharedstate.StateServer() as quick, _RedisServer() as redis_server:
        d = manager.dict()
        d["key"] = 1
        # The round trip: the cache would answer an unchanged value without one (measured apart below).
        state = sharedstate.connect(quick.address, quick.authkey, cache=False)
        state.set("key", 1)
        calls = {
            "socket_rtt": lambda: (os.write(near_fd, message), os.read(near_fd, 65536)),
            "pipe_rtt": lambda: (parent.send(("get", "key")), parent.recv()),
            "manager_get": lambda: d.get("key"),
            "get": lambda: state.get("key"),
        }
        samples = interleaved(calls, n, r, rounds)
        r["get_p99_us"] = pct(samples["get"], 0.99) * 1e6
        lat = latencies(lambda: d.__setitem__("key", 2), n)
        r["manager_set_p50_us"] = pct(lat, 0.5) * 1e6
        lat = latencies(lambda: state.set("key", 2), n)
        r["set_p50_us"], r["set_p99_us"] = pct(lat, 0.5) * 1e6, pct(lat, 0.99) * 1e6

        # Many processes at once: every figure is measured once per round, the rounds one after the other,
        # and each figure is the median of its rounds (so that a slow moment of the machine does not land
        # on one contender only).
        lock = manager.Lock()
        recipe_per = max(200, n // 20)
        incr_per = max(500, n // 4)

        def manager_recipe() -> float:
            d["c"] = 0
            took = _run_many(_manager_recipe, lambda i: (d, lock, recipe_per), 4)
            assert d["c"] == 4 * recipe_per
            return 4 * recipe_per / took

        def state_recipe() -> float:
            state.set("r", 0)
            took = _run_many(_state_recipe, lambda i: (state, recipe_per), 4)
            assert state.get("r") == 4 * recipe_per
            return 4 * recipe_per / took

        def state_incr(procs: int) -> float:
            state.set("c", 0)
            took = _run_many(_state_incr, lambda i: (state, incr_per), procs)
            assert state.get("c") == procs * incr_per
            return procs * incr_per / took

        contenders = {
            "manager_recipe_4p_per_s": manager_recipe,
            "recipe_4p_per_s": state_recipe,
            **{f"incr_{p}p_per_s": (lambda p=p: state_incr(p)) for p in (1, 2, 4, 8)},
        }
        if redis_server.socket is not None:
            sock = redis_server.socket
            contenders["redis_incr_4p_per_s"] = lambda: (
                4 * incr_per / _run_many(_redis_incr, lambda i: (sock, incr_per), 4)
            )
        folder = tempfile.mkdtemp()
        if _have_diskcache():
            contenders["diskcache_incr_4p_per_s"] = lambda: (
                4 * recipe_per / _run_many(_diskcache_incr, lambda i: (folder, recipe_per), 4)
            )
        rates: dict[str, list[float]] = {k: [] for k in contenders}
        try:
            for _ in range(args.rounds):
                for key, run in contenders.items():
                    rates[key].append(run())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        for key, values in rates.items():
            r[key] = statistics.median(values)
        state.clear()
        state.update({f"name-{i}": i for i in range(1000)})
        parent.send(None)
        echo.join()
        near.close()
        bare.terminate()  # (the processes forked since hold copies of its socket: it sees no end of file)
        bare.join()

        with tempfile.TemporaryDirectory() as tmp:
            with sharedstate.StateServer(path=os.path.join(tmp, "s.json"), save_every=None) as server:
                state = sharedstate.connect(server.address, server.authkey, cache=False)
                batch = {f"u{i}": i for i in range(1000)}
                updates: list[float] = []
                sets: list[float] = []
                for _ in range(5):  # interleaved: 4 updates, then 1,000 sets, five times
                    updates += [_time(lambda: state.update(batch)) for _ in range(4)]
                    sets.append(_time(lambda: [state.set(k, v) for k, v in batch.items()]))
                r["update_1000_ms"] = statistics.median(updates) * 1e3
                r["sets_1000_ms"] = statistics.median(sets) * 1e3
                state.clear()

                # --names names
                names = args.names
                for start in range(0, names, 20_000):
                    state.update({f"name-{i}": i for i in range(start, min(names, start + 20_000))})
                gc.collect()
                # The same get on a server with 1,000 names and on this one, interleaved, each round on
                # new connections, so on new server threads: where the scheduler puts one thread is not
                # what this compares.
                at_small: list[float] = []
                at_big: list[float] = []
                for _ in range(rounds):
                    for holder, samples_at in ((quick, at_small), (server, at_big)):
                        with sharedstate.connect(holder.address, holder.authkey, cache=False) as handle:
                            latencies(lambda h=handle: h.get("name-500"), 200)
                            samples_at += latencies(lambda h=handle: h.get("name-500"), max(200, n // rounds))
                r["get_at_1k_p50_us"] = pct(at_small, 0.5) * 1e6
                r["get_at_big_p50_us"] = pct(at_big, 0.5) * 1e6
                r["server_rss_mb"] = state.stats()["rss_bytes"] / 2**20

                waits: list[float] = []
                stop = threading.Event()

                def client() -> None:
                    other = sharedstate.connect(server.address, server.authkey, cache=False)
                    while not stop.is_set():
                        t = time.perf_counter()
                        other.get("name-1")
                        waits.append(time.perf_counter() - t)

                t = threading.Thread(target=client)
                t.start()
                time.sleep(0.2)
                r["save_big_s"] = _time(lambda: state.save())
                time.sleep(0.1)
                stop.set()
                t.join()
                r["worst_wait_during_save_ms"] = max(waits) * 1e3
                r["restore_big_s"] = _time(lambda: state.restore())
                assert len(state) == names

            plain = {f"name-{i}": i for i in range(args.names)}
            target = Path(tmp) / "plain.json"

            def dump(one_shot: bool) -> None:
                with open(target, "w") as f:
                    if one_shot:  # json.dumps runs the C encoder in one call: faster than json.dump
                        f.write(json.dumps(plain))
                    else:
                        json.dump(plain, f)
                    f.flush()
                    os.fsync(f.fileno())

            # The reference is the faster of the two plain ways to write the same dict.
            r["json_dump_fsync_s"] = min(_time(lambda: dump(False)), _time(lambda: dump(True)))
            r["json_load_s"] = _time(lambda: json.loads(target.read_text()))
            plain.clear()
            queue = CTX.Queue()
            proc = CTX.Process(target=_plain_dict_rss, args=(args.names, queue))
            proc.start()
            r["plain_dict_rss_mb"] = queue.get() / 2**20
            proc.join()

            with sharedstate.StateServer(path=os.path.join(tmp, "j.json"), durability="journal", save_every=None) as s:
                for _ in range(500):
                    s.state.set("k", 1)
                lat = latencies(lambda: s.state.set("k", {"a": 1}), n // 4)
                r["journal_set_p50_us"] = pct(lat, 0.5) * 1e6
    measure_cache(args, r)
    return r


def redis_backend(args) -> dict[str, float]:
    """sharedstate on a Redis URL against redis-py's own commands, on one redis-server (Unix socket, no
    persistence), measured side by side: get p50 (interleaved rounds), incr and the lock recipe from 4
    processes. Empty when redis-server or redis-py is missing."""
    r: dict[str, float] = {}
    redis_server = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return r
    if redis_server is None:
        return r
    n = args.ops
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "redis.sock")
        proc = subprocess.Popen(
            [redis_server, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock) and time.monotonic() < deadline:
                time.sleep(0.05)
            state = sharedstate.connect(f"unix://{sock}", namespace="bench")
            raw = redis.Redis(unix_socket_path=sock)
            state.set("key", 1)
            raw.set("key", 1)
            calls = {"redis_backend_get": lambda: state.get("key"), "redis_py_get": lambda: raw.get("key")}
            interleaved(calls, n, r)
            per = max(500, n // 4)
            took = _run_many(_redis_incr, lambda i: (sock, per), 4)
            assert int(raw.get("c")) == 4 * per
            r["redis_py_incr_4p_per_s"] = 4 * per / took
            took = _run_many(_state_incr, lambda i: (state, per), 4)
            assert state.get("c") == 4 * per
            r["redis_backend_incr_4p_per_s"] = 4 * per / took
            per = max(200, n // 20)
            took = _run_many(_state_recipe, lambda i: (state, per), 4)
            assert state.get("r") == 4 * per
            r["redis_backend_recipe_4p_per_s"] = 4 * per / took
            raw.close()
            state.close()
        finally:
            proc.terminate()
            proc.wait()
    return r


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


Target = tuple[str, Any, float, bool]


def _ratios(prefix: str, label: str, rows: list[tuple[str, str, str, float, bool]]) -> list[Target]:
    """Targets that are the ratio of two figures of the server whose figures start with ``prefix``:
    ``(name, numerator, denominator, goal, higher is better)`` each."""
    return [
        (f"{label}{name}", lambda r, a=top, b=bottom: r[prefix + a] / r[prefix + b], goal, higher)
        for name, top, bottom, goal, higher in rows
    ]


def _watch_targets(prefix: str, label: str) -> list[Target]:
    """The targets of change notifications (``_watch_figures``)."""
    return _ratios(prefix, label, [
        ("watch latency vs get round trip (p50)", "watch_latency_p50_us", "watch_get_p50_us", 2.0, False),
        ("writer rate, one watcher vs none", "writer_watched_incr_per_s", "writer_alone_incr_per_s", 0.9, True),
    ])  # fmt: skip


def _aio_targets(prefix: str, label: str) -> list[Target]:
    """The asyncio client's targets (``_aio_figures``)."""
    return _ratios(prefix, label, [
        ("awaited incr vs blocking incr (p50)", "awaited_incr_p50_us", "blocking_incr_p50_us", 1.5, False),
        ("100 tasks incr vs one blocking thread", "aio_100_tasks_incr_per_s", "blocking_thread_incr_per_s", 2.0, True),
    ])  # fmt: skip


TARGETS = [
    # (label, value, target, higher is better)
    ("get rate vs Manager dict get", lambda r: r["manager_get_p50_us"] / r["get_p50_us"], 0.9, True),
    ("get rate vs pipe floor", lambda r: r["pipe_rtt_p50_us"] / r["get_p50_us"], 0.8, True),
    ("incr 4 procs vs Manager recipe", lambda r: r["incr_4p_per_s"] / r["manager_recipe_4p_per_s"], 4.0, True),
    ("incr 4 procs vs redis INCR", lambda r: r["incr_4p_per_s"] / r["redis_incr_4p_per_s"], 1.0, True),
    (
        "lock+get+set 4 procs vs Manager recipe",
        lambda r: r["recipe_4p_per_s"] / r["manager_recipe_4p_per_s"],
        1.0,
        True,
    ),
    ("update 1000 vs 1000 sets (speed-up)", lambda r: r["sets_1000_ms"] / r["update_1000_ms"], 50.0, True),
    ("save big vs json.dump+fsync", lambda r: r["save_big_s"] / r["json_dump_fsync_s"], 2.0, False),
    ("restore big vs json.load", lambda r: r["restore_big_s"] / r["json_load_s"], 2.0, False),
    ("worst client wait during save (ms)", lambda r: r["worst_wait_during_save_ms"], 100.0, False),
    ("server RSS vs plain dict process", lambda r: r["server_rss_mb"] / r["plain_dict_rss_mb"], 2.0, False),
    ("get at big vs at 1k (slow-down)", lambda r: r["get_at_big_p50_us"] / r["get_at_1k_p50_us"], 1.2, False),
    (
        "cached get vs Manager dict get (speed-up)",
        lambda r: r["cache_manager_get_p50_us"] / r["cached_get_p50_us"],
        20.0,
        True,
    ),
    (
        "mixed 95/5, 4 procs: cache vs cache=False",
        lambda r: r["mixed_cache_4p_per_s"] / r["mixed_nocache_4p_per_s"],
        3.0,
        True,
    ),
    *_aio_targets("", ""),
    *_aio_targets("redis_", "Redis: "),
    *_watch_targets("", ""),
    *_watch_targets("redis_", "Redis: "),
    (
        "Redis backend incr 4p vs redis-py INCR",
        lambda r: r["redis_backend_incr_4p_per_s"] / r["redis_py_incr_4p_per_s"],
        0.5,
        True,
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", type=int, default=1_000_000)
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the many-process figures per run")
    parser.add_argument(
        "--only",
        choices=["all", "cache", "aio", "watch"],
        default="all",
        help="cache, aio, watch: the figures of the client cache, the asyncio client or change notifications alone",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="watch figures: let the scheduler place the processes (default: each server on a CPU of its own)",
    )
    args = parser.parse_args()
    if args.only == "cache":
        runs = []
        for _ in range(args.runs):
            runs.append({})
            measure_cache(args, runs[-1])
    elif args.only in ("aio", "watch"):
        runs = []
        for _ in range(args.runs):
            runs.append({})
            (measure_aio if args.only == "aio" else measure_watch)(args, runs[-1])
    else:
        runs = [measure(args) for _ in range(args.runs)]
        for run in runs:
            run.update(redis_backend(args))
            measure_aio(args, run)
            measure_watch(args, run)
    keys = list(runs[0])
    print(f"{'figure':34} " + " ".join(f"{'run ' + str(i + 1):>12}" for i in range(args.runs)))
    for key in keys:
        print(f"{key:34} " + " ".join(f"{run.get(key, float('nan')):12.2f}" for run in runs))
    for missing, what in (("redis_incr_4p_per_s", "redis (redis-server and redis-py)"),
                          ("diskcache_incr_4p_per_s", "diskcache"),
                          ("ultradict_get_p50_us", "UltraDict")):  # fmt: skip
        if missing not in runs[0] and (args.only == "all" or missing.startswith("ultradict")):
            print(f"skipped: {what} is not installed")
    print()
    print(f"{'target':42} {'goal':>8} " + " ".join(f"{'run ' + str(i + 1):>8}" for i in range(args.runs)) + "  holds")
    for label, ratio, goal, higher in TARGETS:
        values = []
        for run in runs:
            try:
                values.append(ratio(run))
            except KeyError:
                values.append(float("nan"))
        ok = all((v >= goal) if higher else (v <= goal) for v in values)
        sign = ">=" if higher else "<="
        cells = " ".join(f"{v:8.2f}" for v in values)
        print(f"{label:42} {sign}{goal:6.2f} {cells}  {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
