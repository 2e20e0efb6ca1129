"""``Change``: one change of the state as a watcher receives it (``State.watch``), on every backend; and
the deadline of a wait for changes and the turn of a watcher's ``next``, which the facade and the
backends share."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, NamedTuple

#: The kinds of change, in the words ``Change.kind`` uses.
SET = "set"
REMOVED = "removed"
EXPIRED = "expired"
CLEARED = "cleared"
RESTORED = "restored"
#: Not a change: the watcher fell more than its buffer behind and continues from the present.
OVERFLOW = "overflow"

KINDS = frozenset({SET, REMOVED, EXPIRED, CLEARED, RESTORED, OVERFLOW})


class Change(NamedTuple):
    """A change of ``name`` (``None`` for ``"cleared"``, ``"restored"`` and ``"overflow"``, which concern the
    whole state): ``kind`` one of ``"set"``, ``"removed"``, ``"expired"``, ``"cleared"``, ``"restored"``,
    ``"overflow"``; ``value`` the new value for ``"set"``, else ``None``."""

    name: str | None
    kind: str
    value: Any = None


def deadline_of(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` a wait of ``timeout`` seconds ends at (``None``: never)."""
    return None if timeout is None else time.monotonic() + timeout


def left(deadline: float | None) -> float | None:
    """The seconds left until ``deadline`` (never below 0; ``None``: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def take_turn(lock: threading.Lock, deadline: float | None) -> bool:
    """Take ``lock`` by ``deadline`` (``None``: however long it takes); whether it was taken. A watcher's
    ``next`` holds its lock while it reads: one read of a watch waits at a time, another waits its turn
    (two reads at once would wake each other, or both take the same changes)."""
    return lock.acquire(timeout=-1 if deadline is None else left(deadline))


#: The wait given to an acquire with no time left (see ``take_turn_async``).
_AT_ONCE_S = 0.001


async def take_turn_async(lock: asyncio.Lock, deadline: float | None) -> bool:
    """``take_turn`` for asyncio. With no time left a free lock is still taken: Python 3.10 and 3.11's
    ``wait_for`` cancels a timeout of 0 before the acquire runs, so such a turn gets ``_AT_ONCE_S``."""
    timeout = left(deadline)
    if timeout is not None and timeout <= 0:
        if lock.locked():
            return False
        timeout = _AT_ONCE_S
    try:
        await asyncio.wait_for(lock.acquire(), timeout)
    except asyncio.TimeoutError:
        return False
    return True
