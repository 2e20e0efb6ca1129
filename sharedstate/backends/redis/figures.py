"""The figures of a Redis state's ``stats()`` beyond Redis' own ``INFO``: who holds its locks, read from
their keys. (The parts counted in this process, calls and lock waits, are ``_figures``'.)"""

from __future__ import annotations

import re
from typing import Any

from sharedstate.backends.redis.connection import text as _text

#: Held locks listed at most, as on the local server.
HOLDERS_SHOWN = 100
#: Keys ``SCAN`` looks at per step, and at most in all: on a database with more keys than that, the
#: list may miss locks (``complete`` is then false), rather than every ``stats()`` walking every key.
SCAN_COUNT = 1000
SCAN_BUDGET = 100_000

_GLOB = re.compile(r"([*?\[\]\\])")


def lock_holders(client: Any, prefix: str) -> tuple[list[dict[str, Any]], int | None]:
    """The held locks of the namespace ``prefix`` (``HOLDERS_SHOWN`` at most), as the local server lists
    them, with what Redis cannot know as ``None``: ``lock`` (``None``: the global lock), ``pid`` (on its
    own host), ``held_s`` (``None``: a key keeps no start time) and ``waiters`` (``None``: a waiter is
    a blocked client, not a key); and how many locks are held (a lock's key exists while it is held),
    ``None`` when the ``SCAN`` of the database's keys did not end within ``SCAN_BUDGET`` keys."""
    named = prefix + "lock:"
    listed: list[str] = []
    cursor, looked, count = 0, 0, 0
    match = _GLOB.sub(r"\\\1", named) + "*"
    while True:
        cursor, found = client.scan(cursor, match=match, count=SCAN_COUNT)
        count += len(found)
        listed += [_text(key) for key in found[: HOLDERS_SHOWN - len(listed)]]
        looked += SCAN_COUNT
        if not cursor:
            break
        if looked >= SCAN_BUDGET:
            count = -1
            break
    keys = [prefix + "lock", *listed]
    holders = []
    for key, token in zip(keys, client.mget(keys), strict=True):
        if token is None:  # released (or its lease ran out) since the scan
            continue
        try:
            pid: int | None = int(_text(token).split(":", 1)[0])
        except ValueError:
            pid = None
        name = None if key == keys[0] else key[len(named) :]
        holders.append({"lock": name, "pid": pid, "held_s": None, "waiters": None})
    global_held = any(holder["lock"] is None for holder in holders)
    held = None if count < 0 else count + global_held
    return holders[:HOLDERS_SHOWN], held
