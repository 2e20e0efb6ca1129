"""One fork hook for the whole package.

A forked child is another client: it holds none of its parent's locks, must not use its parent's
connections, caches or request ids, and may have been forked while another thread held a mutex. Each
module that keeps such per-process things registers what to forget with ``after_fork_in_child``; the
package installs one ``os.register_at_fork`` hook that runs them in the order they were registered, and
counts the forks (``generation``) so that a connection can tell it was opened by the parent.

Platforms without ``fork`` (Windows) have no such hook, and need none.
"""

from __future__ import annotations

import os
from collections.abc import Callable

#: Bumped in every forked child: anything opened at another generation belongs to an ancestor.
generation = 0

_callbacks: list[Callable[[], None]] = []


def after_fork_in_child(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` in every child this process forks from now on (usable as a decorator)."""
    _callbacks.append(callback)
    return callback


def _in_child() -> None:
    global generation
    generation += 1
    for callback in _callbacks:
        callback()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)
