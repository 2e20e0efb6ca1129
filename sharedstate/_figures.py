"""Figures kept for ``stats()`` on the path of every call, cheaply: calls counted by name, a bounded
window of recent lock waits with its percentiles (and the rule of what a wait is), and the list of lock
holders. Both backends use them (the local server for its clients, the Redis backend for its own
process)."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

from sharedstate._fork import after_fork_in_child

#: Lock waits (acquires that ended: taken, or given up) kept for the percentiles: the most recent ones.
WAIT_WINDOW = 1024
#: Held locks ``stats()`` lists at most (the longest held first, where that is known), so that its answer
#: stays small.
HOLDERS_SHOWN = 100


class CallCounts:
    """Calls counted by name, with no lock on the counting path: each counter (a serving thread, a
    client thread) increments a dict of its own, which only it writes; ``totals()`` sums them. Reading
    another thread's dict needs no lock either: ``dict(d)`` copies it in one step under the GIL."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._names = tuple(names)
        self._mutex = threading.Lock()  # taken when a counter opens or retires, and by totals()
        self._pid = os.getpid()  # the process whose mutex this is (see ``retire``)
        #: The counters not retired, by ``id``: two counters with the same counts are still two.
        self._open: dict[int, dict[str, int]] = {}
        self._retired: dict[str, int] = {}
        _instances.add(self)

    def open(self) -> dict[str, int]:
        """A new counter, for one thread: ``counts[name] += 1`` for each call (the ``names`` given to the
        constructor are there already, at 0). ``retire`` it when its thread is done."""
        counts = dict.fromkeys(self._names, 0)
        with self._mutex:
            self._open[id(counts)] = counts
        return counts

    def retire(self, counts: dict[str, int]) -> None:
        """Fold a finished counter into the totals (once: a counter retired already is left alone)."""
        if self._pid != os.getpid():
            # A forked child, before its fork hooks ran: the interpreter is dropping the threads that
            # did not come along (their counters retire here), only this thread runs, and the mutex
            # may be held by one of those threads. Nothing else can run, so nothing needs excluding.
            self._fold(counts)
            return
        with self._mutex:
            self._fold(counts)

    def _fold(self, counts: dict[str, int]) -> None:
        if self._open.pop(id(counts), None) is counts:
            _add(self._retired, counts)

    def totals(self) -> dict[str, int]:
        """Every call counted so far by name (names never called left out), sorted by name."""
        with self._mutex:
            total = dict(self._retired)
            for counts in self._open.values():
                _add(total, dict(counts))
        return {name: total[name] for name in sorted(total) if total[name]}


#: Every ``CallCounts`` of this process, for the fork hook.
_instances: weakref.WeakSet[CallCounts] = weakref.WeakSet()


@after_fork_in_child
def _new_mutexes() -> None:
    # A thread of the parent may have held a mutex at the fork; it did not come along to release it.
    for calls in list(_instances):
        calls._mutex = threading.Lock()
        calls._pid = os.getpid()


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for name, count in counts.items():
        total[name] = total.get(name, 0) + count


class ThreadCalls:
    """``CallCounts`` with one counter per thread that calls ``count``, retired when the thread ends
    (its thread-local value is let go then)."""

    def __init__(self) -> None:
        self.counts = CallCounts()
        self._local = threading.local()

    def count(self, name: str) -> None:
        try:
            counts = self._local.counts
        except AttributeError:
            counts = self._local.counts = self.counts.open()
            # Runs when the thread's local storage is dropped, at the thread's end.
            self._local.retire = _Retire(self.counts, counts)
        counts[name] = counts.get(name, 0) + 1


class _Retire:
    """Retires one thread's counter when that thread's local storage lets it go."""

    __slots__ = ("_calls", "_counts")

    def __init__(self, calls: CallCounts, counts: dict[str, int]) -> None:
        self._calls = calls
        self._counts = counts

    def __del__(self) -> None:
        self._calls.retire(self._counts)


class WaitWindow:
    """The last ``WAIT_WINDOW`` lock waits, in seconds (0 for a lock taken at once). ``deque.append``
    is atomic, so recording takes no lock of its own."""

    def __init__(self) -> None:
        self.waits: deque[float] = deque(maxlen=WAIT_WINDOW)

    def record(self, since: float | None, until: float | None = None, taken: bool = True) -> None:
        """Record how long one acquire of a lock waited, by the rule both backends follow. ``since``: when
        it began to wait (``time.monotonic()``), ``None`` if it did not wait. An acquire that took the
        lock at its first try waited 0 s; one that waited, until ``until`` (default: now), whether it was
        then handed the lock or gave up at its timeout; one that gave up at its first try (``taken``
        false: not blocking, or a timeout of 0 or less) never waited and is left out. (A reentrant
        acquire of a lock its caller holds takes nothing, and is not recorded either.)"""
        if since is not None:
            self.waits.append((time.monotonic() if until is None else until) - since)
        elif taken:
            self.waits.append(0.0)

    def percentiles(self) -> dict[str, float | int | None]:
        """``lock_wait_p50_s``, ``lock_wait_p99_s`` and ``lock_wait_max_s`` of the window (``None`` when
        it is empty) and ``lock_wait_samples``, how many waits it holds."""
        waits = sorted(list(self.waits))  # list(): a snapshot, taken at once
        count = len(waits)
        if not count:
            return {"lock_wait_p50_s": None, "lock_wait_p99_s": None, "lock_wait_max_s": None, "lock_wait_samples": 0}
        return {
            "lock_wait_p50_s": _rank(waits, 0.50),
            "lock_wait_p99_s": _rank(waits, 0.99),
            "lock_wait_max_s": waits[-1],
            "lock_wait_samples": count,
        }


def _rank(ordered: list[float], quantile: float) -> float:
    """The nearest-rank percentile of a sorted, non-empty list."""
    index = max(0, -(-int(quantile * 1000) * len(ordered) // 1000) - 1)  # ceil(q * n) - 1, in integers
    return ordered[min(index, len(ordered) - 1)]


def lock_holders(held: Iterable[tuple[str | None, int | None, float | None, int | None]]) -> list[dict[str, Any]]:
    """``stats()["lock_holders"]`` of the held locks given as ``(lock, pid, held_s, waiters)`` (``lock``
    ``None``: the global lock; a figure the backend does not know: ``None``): ``HOLDERS_SHOWN`` at most,
    the longest held first (in the given order where the times are not known)."""
    ordered = sorted(held, key=lambda holder: -(holder[2] or 0.0))  # stable
    return [
        {"lock": lock, "pid": pid, "held_s": seconds, "waiters": waiters}
        for lock, pid, seconds, waiters in ordered[:HOLDERS_SHOWN]
    ]
