"""The figures of a Redis state's ``stats()`` beyond Redis' own ``INFO``: who holds its locks, read from
their keys. (The parts counted in this process, calls and lock waits, are ``_figures``'.)"""

from __future__ import annotations

import re
from typing import Any

from sharedstate._figures import HOLDERS_SHOWN
from sharedstate._figures import lock_holders as listed_holders
from sharedstate.backends.redis.connection import text as _text
from sharedstate.backends.redis.leases import pid_of

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
    database's keys did not end within ``SCAN_BUDGET`` keys.

    Only string keys are lock keys (the namespace's other keys are hashes and lists), and a key ``SCAN``
    returns twice (it may, while Redis resizes its table) counts once. The string keys under the prefix
    of the named locks are the namespace's locks, unless another namespace is this one's name followed
    by ``:lock`` (its locks' keys are then under that prefix too: docs/redis.md)."""
    found: dict[str, None] = {}  # in the order found, each once
    cursor, looked, complete = 0, 0, True
    match = _GLOB.sub(r"\\\1", named) + "*"  # the namespace is any text: its glob characters are literal
    while True:
        cursor, keys = client.scan(cursor, match=match, count=SCAN_COUNT, _type="string")
        found.update(dict.fromkeys(_text(key) for key in keys))
        looked += SCAN_COUNT
        if not cursor:
            break
        if looked >= SCAN_BUDGET:
            complete = False
            break
    keys = [global_key, *list(found)[:HOLDERS_SHOWN]]
    holders = []
    for key, token in zip(keys, client.mget(keys), strict=True):
        if token is not None:  # else released (or its lease ran out) since the scan
            holders.append((None if key == global_key else key[len(named) :], pid_of(token), None, None))
    global_held = any(holder[0] is None for holder in holders)
    return listed_holders(holders), len(found) + global_held if complete else None
