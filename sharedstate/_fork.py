"""One fork hook for the whole package.

A forked child is another client: it holds none of its parent's locks, must not use its parent's
connections, caches or request ids, and may have been forked while another thread held a mutex. Each
module that keeps such per-process things registers what to forget with ``after_fork_in_child``; the
package installs one ``os.register_at_fork`` hook that runs them in the order they were registered, and
counts the forks (``generation``) so that a connection can tell it was opened by the parent. What a child
must close has to be recorded in the same instant it is opened: ``no_fork()`` holds off a fork from any
other thread meanwhile.

Platforms without ``fork`` (Windows) have no such hook, and need none.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


def _in_child() -> None:
    global generation
    _forking.release()  # held by the fork that made this process (``before``), for the parent's threads
    generation += 1
    for callback in _callbacks:
        callback()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_forking.acquire, after_in_parent=_forking.release, after_in_child=_in_child)
