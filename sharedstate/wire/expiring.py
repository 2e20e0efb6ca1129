"""How a read answers a name that has an expiry: its value wrapped with its deadline, which the client
unwraps and keeps with the value in its cache (``wire.cache``), so that a hit past the deadline is a miss.

A name without an expiry is answered as the bare value, as before: wrapping costs only the names that
expire. ``get_many`` answers ``(found, deadlines)`` instead of ``found`` when any name it found expires.
"""

from __future__ import annotations

import time
from typing import Any

#: The clock deadlines are taken and compared on, in the server process (``server.expiry``) and in its
#: clients' caches (``wire.cache``): UTC seconds of the one machine whose shared memory the cache maps.
clock = time.time


class Expiring:
    """A read's answer for a name that expires at ``deadline`` (absolute UTC seconds, the server's clock)."""

    __slots__ = ("value", "deadline")

    def __init__(self, value: Any, deadline: float) -> None:
        self.value = value
        self.deadline = deadline

    def __reduce__(self) -> tuple[Any, ...]:
        return (Expiring, (self.value, self.deadline))

    def __repr__(self) -> str:
        return f"Expiring({self.value!r}, {self.deadline!r})"


def unwrap(answer: Any) -> tuple[Any, float | None]:
    """The value a read answered and its deadline (``None``: the name does not expire)."""
    if type(answer) is Expiring:
        return answer.value, answer.deadline
    return answer, None


def unwrap_many(answer: Any) -> tuple[dict[str, Any], dict[str, float] | None]:
    """What ``get_many`` found and the deadlines of those that expire (``None``: none does)."""
    if type(answer) is tuple:
        return answer[0], answer[1]
    return answer, None
