"""Functions run in child processes by tests/test_semaphores.py (importable under every start method)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import sharedstate
from sharedstate import aio


def _log(fd: int, event: str) -> None:
    os.write(fd, f"{event} {os.getpid()}\n".encode())  # one write on an O_APPEND file: never interleaved


def take_turns(state: sharedstate.State, name: str, value: int, turns: int, log: str, ready, go, stop) -> None:
    """Enter the semaphore at least ``turns`` times, and until ``stop`` is set, writing each entry (``+``)
    and exit (``-``) to ``log``."""
    sem = state.semaphore(name, value)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    sem.value()  # connected before the start
    ready.release()
    go.wait(30)
    done = 0
    while done < turns or not stop.is_set():
        done += 1
        with sem.hold(timeout=60):
            _log(fd, "+")
            time.sleep(0.02)
            _log(fd, "-")


def hold_forever(state: sharedstate.State, name: str, value: int, permits: int, log: str | None, held) -> None:
    """Take ``permits`` permits (logging the entry) and keep them until killed."""
    sem = state.semaphore(name, value)
    for _ in range(permits):
        sem.acquire()
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        _log(fd, "+")
    held.set()
    while True:
        time.sleep(60)


def hold_with_fd_kept_open(state: sharedstate.State, name: str, value: int, held, grandchild) -> None:
    """Take every permit, then fork a child that keeps this process' connections open and outlives it:
    on the local server only the liveness check (psutil) can tell this holder is gone."""
    sem = state.semaphore(name, value)
    for _ in range(value):
        sem.acquire()
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    grandchild.value = pid
    held.set()
    while True:
        time.sleep(60)


def hold_in_a_task(address: str, authkey: bytes | None, options: dict, name: str, value: int, held) -> None:
    """An asyncio holder: a task takes a permit and keeps it until the process is killed."""

    async def main() -> None:
        state = await aio.connect(address, authkey, **options)
        async with state.semaphore(name, value):
            held.set()
            await asyncio.sleep(3600)

    asyncio.run(main())


def hold_across_restart(
    state: sharedstate.State, name: str, value: int, held, go, results, other_closes: bool = False
) -> None:
    """Take a permit, keep it across a crash of the server, then give it back when told; report how the
    release went. ``other_closes``: first, another thread makes a call and closes its connection (the
    last one of this process on the new server, as the holder's died with the old one)."""
    sem = state.semaphore(name, value)
    sem.acquire()
    held.set()
    go.wait(30)
    if other_closes:

        def other() -> None:
            state.get("x", None)
            state.close()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(30)
    try:
        sem.release()
        results.put(("released", sem.value()))
    except Exception as exc:
        results.put((type(exc).__name__, str(exc)))


def lose_then_release(state: sharedstate.State, name: str, close: bool, held, go, results) -> None:
    """Take the permit of a semaphore of 1, close every connection of this process if ``close`` (the local
    server then gives the permit back), and once told, release it: report how the release went."""
    sem = state.semaphore(name, 1)
    sem.acquire()
    if close:
        state.close()
    held.set()
    go.wait(30)
    try:
        sem.release()
        results.put(("released", None))
    except Exception as exc:
        results.put((type(exc).__name__, str(exc)))


class Interrupted(Exception):
    """What this process' ``SIGUSR1`` handler raises, as a ``KeyboardInterrupt`` would arrive."""


def wait_interrupted(state: sharedstate.State, kind: str, name: str, ready, results) -> None:
    """Wait for the permit of a semaphore of 1 (``kind``: ``"semaphore"``) or for a lock (``"lock"``) until
    ``SIGUSR1`` interrupts the wait, with another thread of this process keeping a connection open all
    along; report how the wait ended."""

    def interrupt(*_: object) -> None:
        raise Interrupted()

    signal.signal(signal.SIGUSR1, interrupt)
    connected, stop = threading.Event(), threading.Event()

    def other() -> None:
        state.get("x", None)
        connected.set()
        stop.wait()

    threading.Thread(target=other, daemon=True).start()
    connected.wait(30)
    waited = state.semaphore(name, 1) if kind == "semaphore" else state.named_lock(name)
    state.get("x", None)  # this thread's connection, before the start
    ready.set()
    try:
        results.put(("acquired", waited.acquire(timeout=60)))
    except Interrupted:
        results.put(("interrupted", None))
    stop.wait()
