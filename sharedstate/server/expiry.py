"""The store's expiry: names with a deadline (``server.deadlines``), gone for every call once it passes.

Reads leave out a name past its deadline; a write that finds one removes it first (journaled as
``["expired", name]``, so a replay never decides with the clock); ``sweep`` (the server's sweeper thread)
removes them all within a second. A read of a name with a deadline answers the value wrapped with it
(``wire.expiring``), so that a client cache never serves it past the deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sharedstate.server.deadlines import Deadlines
from sharedstate.server.recording import Recording
from sharedstate.wire.expiring import Expiring, clock

#: The longest the sweeper sleeps: an expired name is removed at most this long after its deadline (plus
#: the sweep itself).
SWEEP_S = 0.5
#: Names removed per hold of the mutex by the sweeper, so that a mass expiry never stalls other calls long.
SWEEP_BATCH = 1000
#: The shortest the sweeper sleeps between sweeps: names expiring a few at a time cost one sweep per
#: grain, not one each (reads leave an expired name out before the sweep anyway).
SWEEP_GRAIN_S = 0.05


class Expiry(Recording):
    """The expiry calls and the sweep (``Store`` holds the data, the scopes and ``deadlines``)."""

    _scopes: dict[str, tuple[str, ...]]
    deadlines: Deadlines
    #: ``deadlines.at``: tested on every call, so a store with no name that expires pays one test.
    _expiring: dict[str, float]
    ops: int
    #: ``Store._notify`` (declared only: defined here, it would be one more place to keep in step).
    _notify: Callable[..., None]

    def _purge(self, name: str) -> None:
        """With the mutex held, before a write on ``name``: remove it first if its deadline passed."""
        if self.deadlines.due(name, clock()):
            self._expire_now(name)

    def _expire_now(self, name: str) -> int:
        """With the mutex held: remove ``name``, which expired (journaled, without the request id of a
        write that found it expired: that write is journaled next); return the number to commit. Its
        deadline goes last, so that a removal that fails (a full disk) leaves it to be tried again."""
        if name not in self._data:  # nothing to remove, never a second removal: only the deadline goes
            self.deadlines.drop(name)
            return 0
        number = 0 if self.journal is None else self.journal.append(["expired", name])
        self._notify("expired", name)
        self._scopes.pop(name, None)
        del self._data[name]
        self.deadlines.drop(name)
        self._changed(name)
        return number

    def _read(self, name: str, value: Any, gone: Any) -> Any:
        """With the mutex held: what a read of ``name`` (holding ``value``) answers when it has a deadline:
        ``gone`` past it, else ``value`` with its deadline (``wire.expiring``)."""
        if self.deadlines.due(name, clock()):
            return gone
        return Expiring(value, self._expiring[name])

    def _with_deadlines(self, found: dict[str, Any]) -> Any:
        """With the mutex held: what ``get_many`` answers of ``found`` (names to values): less the names past
        their deadline, and ``(found, deadlines)`` when any of the others expires (``wire.expiring``).
        Only the names found are looked at, however many others expired."""
        expiring, passed, now = self._expiring, self.deadlines.passed, clock()
        deadlines = {}
        for name in self.deadlines.among(found):
            deadline = expiring[name]
            if passed(deadline, now):
                del found[name]
            else:
                deadlines[name] = deadline
        return (found, deadlines) if deadlines else found

    def sweep(self) -> float:
        """Remove the names past their deadline (journaled, counters bumped, watchers told); return how
        long the sweeper may wait before the next sweep. If a removal fails (the journal cannot be
        written), that name and the others not removed yet stay expired, for the next sweep."""
        number = 0
        try:
            with self._mutex:
                due = self.deadlines.first_expired(clock(), SWEEP_BATCH)
                for name in due:
                    number = self._expire_now(name)
                soonest = self.deadlines.next_deadline()
        finally:
            self._commit(number)  # the removals journaled before a failure, too
        if len(due) == SWEEP_BATCH:
            return 0.0  # perhaps more are due: the others' calls had the mutex in between
        if soonest is None:
            return SWEEP_S
        return min(SWEEP_S, max(SWEEP_GRAIN_S, soonest - clock()))

    def expire(self, name: str, ttl: float | None) -> bool:
        """Make ``name`` expire ``ttl`` seconds from now (``None``: never); whether it exists."""
        return self._expire_at(name, None if ttl is None else clock() + ttl)

    def _expire_at(self, name: str, deadline: float | None) -> bool:
        with self._mutex:
            self.ops += 1
            if self._expiring:
                self._purge(name)
            if name not in self._data:
                self._check_duplicate()
                return False
            number = self._record("expire", name, deadline, answer=True)
            if deadline is None:
                self.deadlines.drop(name)
            else:
                self.deadlines.put(name, deadline)
            self._changed(name)  # a client cache holds the deadline with the value
        self._commit(number)
        return True

    def ttl(self, name: str) -> float | None:
        """The seconds ``name`` has left; ``None`` when it has no deadline or does not exist."""
        with self._mutex:
            self.ops += 1
            return self.deadlines.left(name, clock()) if self._expiring else None

    def _expired(self) -> dict[str, float]:
        """With the mutex held: the names past their deadline that the sweep has not removed yet (every
        read leaves them out). Each is found once: a call costs only the deadlines passed since the last."""
        return self.deadlines.expired(clock()) if self._expiring else {}

    def _live(self) -> tuple[dict[str, Any], dict[str, float]]:
        """With the mutex held: a copy of the names and deadlines, less the names past their deadline."""
        data, deadlines = dict(self._data), dict(self._expiring)
        for name in self._expired():
            del data[name], deadlines[name]
        return data, deadlines
