"""A cheap estimate of how many bytes a stored value holds, for the watchers' bounds (``server.changes``):
it runs with the store's mutex held, on every change a watcher is told of, so it looks at a few items of
a container and scales them up, rather than walking the whole value."""

from __future__ import annotations

import sys
from itertools import islice
from typing import Any

#: Items of a container looked at; the others are taken to be of their average size.
SAMPLE = 8
#: Containers nested deeper than this count as their own (shallow) size.
DEPTH = 3

_getsizeof = sys.getsizeof
_SCALARS = frozenset((int, float, bool, type(None)))
_SEQUENCES = frozenset((list, tuple, set, frozenset))


def estimate(value: Any, depth: int = DEPTH) -> int:
    """About how many bytes ``value`` holds: exact for a ``str``/``bytes``; for a container, its own
    size and its first ``SAMPLE`` items' estimates scaled to its length. Never raises for a value the
    store holds; bounded work whatever its size."""
    kind = type(value)
    if kind in _SCALARS:
        return 32
    if kind is str or kind is bytes or kind is bytearray:
        return len(value) + 49
    size = _getsizeof(value, 64)  # the default: an object that cannot tell
    if depth <= 0:
        return size
    if kind is dict:
        count = len(value)
        if count:
            part = sum(estimate(k, depth - 1) + estimate(v, depth - 1) for k, v in islice(value.items(), SAMPLE))
            size += part * count // min(count, SAMPLE)
    elif kind in _SEQUENCES:
        count = len(value)
        if count:
            part = sum(estimate(item, depth - 1) for item in islice(value, SAMPLE))
            size += part * count // min(count, SAMPLE)
    return size
