"""``Change``: one change of the state as a watcher receives it (``State.watch``), on every backend."""

from __future__ import annotations

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
