"""One fork hook for the whole package.

A forked child is another client: it holds none of its parent's locks, must not use its parent's
connections, caches or request ids, and may have been forked while another thread held a mutex. Each
module that keeps such per-process things registers what to forget with ``after_fork_in_child``; the
package installs one ``os.register_at_fork`` hook that runs them in the order they were registered, and
counts the forks (``generation``) so that a connection can tell it was opened by the parent. What a child
must close has to be recorded in the same instant it is opened: ``no_fork()`` holds off a fork from any
other thread meanwhile.

``ThreadPool`` is a pool of worker threads that a child makes anew: the parent's workers do not exist
in the child, but the copy of a ``ThreadPoolExecutor`` there believes they do and would start none.

Platforms without ``fork`` (Windows) have no such hook, and need none.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

#: Bumped in every forked child: anything opened at another generation belongs to an ancestor.
generation = 0

_callbacks: list[Callable[[], None]] = []
#: Held by ``no_fork()``, and by a fork while it copies the process.
_forking = threading.Lock()


def after_fork_in_child(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` in every child this process forks from now on (usable as a decorator)."""
    _callbacks.append(callback)
    return callback


@contextmanager
def no_fork() -> Iterator[None]:
    """No thread of this process forks while the block runs (a fork waits for its end), so a child gets
    what the block opened only together with what the block recorded for ``after_fork_in_child`` to
    close. Keep the block short, and never fork inside it."""
    with _forking:
        yield


class ThreadPool(Executor):
    """A ``ThreadPoolExecutor`` (started at its first task) that is started anew in a forked child: the
    child's copy of the parent's pool counts the parent's idle workers, which the child does not have,
    so a task given to it would never run."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        self._options = {"max_workers": max_workers, "thread_name_prefix": thread_name_prefix}
        self._pool: ThreadPoolExecutor | None = None
        self._generation = generation
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        pool = self._pool
        if pool is None or self._generation != generation:
            pool = self._pool = ThreadPoolExecutor(**self._options)  # type: ignore[arg-type]
            self._generation = generation
        return pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        pool = self._pool
        if pool is not None and self._generation == generation:
            pool.shutdown(wait, cancel_futures=cancel_futures)


def _in_child() -> None:
    global generation
    _forking.release()  # held by the fork that made this process (``before``), for the parent's threads
    generation += 1
    for callback in _callbacks:
        callback()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_forking.acquire, after_in_parent=_forking.release, after_in_child=_in_child)
