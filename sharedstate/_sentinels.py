"""The package's markers ("no value here", "not cached", "handed over" ...), one module for all of them.

Each pickles as a reference to itself, so a marker sent by the server process is the same object in
the client (``value is MISSING`` holds across processes).
"""

from __future__ import annotations


class Sentinel:
    """A named marker: compared by identity, shown by its name."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __reduce__(self) -> str:
        return self._name  # pickled as the module global of that name

    def __repr__(self) -> str:
        return self._name


#: A name that does not exist (what a backend's ``get`` or ``remove`` answers for it).
MISSING = Sentinel("MISSING")
#: A client cache entry of a name known to exist whose value was not fetched (from ``contains``).
PRESENT = Sentinel("PRESENT")
#: What a client cache answers when it has no valid entry for a name.
NOT_CACHED = Sentinel("NOT_CACHED")
#: What the server's ``lock_acquire`` returns when the lock was handed to a waiter: the answer is written.
HANDED = Sentinel("HANDED")
#: The answer of a ``remove`` or ``popitem`` applied before a save, sent again after a crash: the save
#: did not keep the removed value (``wire.answers.Removed``), so it cannot be answered again.
DROPPED = Sentinel("DROPPED")
#: ``pop``'s default when the caller gave none.
NO_DEFAULT = Sentinel("NO_DEFAULT")
#: What a release answers when the lock stays held by its owner (a reentrant release).
STILL_HELD = Sentinel("STILL_HELD")
