"""The figures of a Redis state's ``stats()`` beyond Redis' own ``INFO``: who holds its locks, read from
their keys. (The parts counted in this process, calls and lock waits, are ``_figures``'.)"""

from __future__ import annotations

import re
from typing import Any

from sharedstate.backends.redis.connection import text as _text
from sharedstate.backends.redis.leases import pid_of

#: Held locks listed at most, as on the local server.
HOLDERS_SHOWN = 100
#: Keys ``SCAN`` looks at per step, and at most in all: on a database with more keys than that, the
#: list may miss locks (and their number is not known), rather than every ``stats()`` walking every key.
SCAN_COUNT = 1000
SCAN_BUDGET = 100_000

_GLOB = re.compile(r"([*?\[\]\\])")


def lock_holders(client: Any, global_key: str, named: str) -> tuple[list[dict[str, Any]], int | None]:
    """The held locks of a namespace (``HOLDERS_SHOWN`` at most): its global lock's key, and the prefix
    of its named locks' keys. Listed as the local server lists them, with what Redis cannot know as
    ``None``: ``lock`` (``None``: the global lock), ``pid`` (on its own host), ``held_s`` (``None``: a
    key keeps no start time) and ``waiters`` (``None``: a waiter is a blocked client, not a key). Also
    how many locks are held (a lock's key exists while it is held), ``None`` when the ``SCAN`` of the
    database's keys did not end within ``SCAN_BUDGET`` keys."""
    listed: list[str] = []
    cursor, looked, count = 0, 0, 0
    match = _GLOB.sub(r"\\\1", named) + "*"  # the namespace is any text: its glob characters are literal
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
    keys = [global_key, *listed]
    holders = []
    for key, token in zip(keys, client.mget(keys), strict=True):
        if token is not None:  # else released (or its lease ran out) since the scan
            lock = None if key == global_key else key[len(named) :]
            holders.append({"lock": lock, "pid": pid_of(token), "held_s": None, "waiters": None})
    global_held = any(holder["lock"] is None for holder in holders)
    return holders[:HOLDERS_SHOWN], None if count < 0 else count + global_held
