"""The figures of a Redis state's ``stats()`` beyond Redis' own ``INFO``: who holds its locks, read from
their keys, and the parts counted in this process (calls, lock waits; no client cache)."""

from __future__ import annotations

import re
from typing import Any

#: Lock keys read at most for ``lock_holders`` (the scan stops there), so a state with very many named
#: locks held does not make ``stats()`` slow.
HOLDERS_READ = 100
#: Keys ``SCAN`` looks at per step.
SCAN_COUNT = 1000

_GLOB = re.compile(r"([*?\[\]\\])")


def lock_holders(client: Any, prefix: str) -> list[dict[str, Any]]:
    """The held locks of the namespace ``prefix`` (``HOLDERS_READ`` at most), as the local server lists
    them, with what Redis cannot know as ``None``: ``lock`` (``None``: the global lock), ``pid`` (on its
    own host), ``held_s`` (``None``: a key keeps no start time) and ``waiters`` (``None``: a waiter is
    a blocked client, not a key). One ``SCAN`` of the database's keys: its cost grows with the database."""
    keys = [prefix + "lock"]
    named = prefix + "lock:"
    for key in client.scan_iter(match=_GLOB.sub(r"\\\1", named) + "*", count=SCAN_COUNT):
        if len(keys) > HOLDERS_READ:
            break
        keys.append(key.decode("utf-8") if isinstance(key, bytes) else key)
    holders = []
    for key, token in zip(keys, client.mget(keys), strict=True):
        if token is None:
            continue
        try:
            pid: int | None = int(token.split(b":", 1)[0])
        except ValueError:
            pid = None
        name = None if key == prefix + "lock" else key[len(named) :]
        holders.append({"lock": name, "pid": pid, "held_s": None, "waiters": None})
    return holders[:HOLDERS_READ]
