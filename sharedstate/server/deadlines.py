"""The deadlines of the names that expire (``State.set(ttl=)``), as the server keeps them: a dict of name to
deadline (absolute UTC seconds, ``wire.expiring.clock``) for look-ups, a heap of the same deadlines for
the ones still to come, and the names found past theirs and not removed yet (``Store.sweep`` removes them).

Only names that expire are in here, so a call on a name without expiry pays one test of an empty (or
missing) dict entry. The heap is lazy: a deadline that changed or went stays in it until it comes up,
and is skipped then because the dict no longer holds it. A deadline that passed is taken off the heap
once, into ``expired``: counting or leaving out the expired names then costs nothing more per call, however
many wait for the sweep.

While the server replays its files at start, ``frozen`` is set: the clock decides nothing then (the
journal records every expiry the server made, ``["expired", name]``), so the replay gives exactly the
state the server had; names past their deadline go once the replay is over.
"""

from __future__ import annotations

import heapq
import itertools

from sharedstate._rules import passed_among, past

_EMPTY: dict[str, float] = {}
#: Passed deadlines a read takes off the heap one by one; more are taken in one pass over the heap.
_ONE_BY_ONE = 1024


class Deadlines:
    """The deadline of each name that expires. Used with the store's mutex held."""

    __slots__ = ("at", "_heap", "_expired", "frozen")

    def __init__(self) -> None:
        #: name -> deadline; always a subset of the store's names. The same dict for the store's life.
        self.at: dict[str, float] = {}
        #: ``(deadline, name)`` of the deadlines not found passed yet, and stale ones (skipped).
        self._heap: list[tuple[float, str]] = []
        #: name -> deadline of the names found past it and not removed yet, in the order found; always a
        #: subset of ``at`` (``put`` and ``drop`` keep it so).
        self._expired: dict[str, float] = {}
        #: Set while the server's files are replayed: nothing is past its deadline then.
        self.frozen = False

    def passed(self, deadline: float, now: float) -> bool:
        """The rule: whether ``deadline`` passed by ``now`` (never while the server's files are replayed)."""
        return not self.frozen and past(deadline, now)

    def put(self, name: str, deadline: float) -> None:
        """Make ``deadline`` the one of ``name``. The same deadline again changes nothing (a restore of a
        file this server saved): each name has one entry, so it is removed once."""
        at = self.at
        if at.get(name) == deadline:
            return
        if self._expired:
            self._expired.pop(name, None)
        at[name] = deadline
        heap = self._heap
        heapq.heappush(heap, (deadline, name))
        if len(heap) > 2 * len(at) + 1024:  # mostly stale entries: rebuild
            expired = self._expired
            self._heap = [(d, n) for n, d in at.items() if n not in expired]
            heapq.heapify(self._heap)

    def drop(self, name: str) -> None:
        """Forget the deadline of ``name``, if it has one (removed, or no longer expiring)."""
        if self.at.pop(name, None) is not None and self._expired:
            self._expired.pop(name, None)

    def replace(self, deadlines: dict[str, float]) -> None:
        """Make ``deadlines`` all the deadlines there are."""
        self.at.clear()
        self.at.update(deadlines)
        self._expired.clear()
        self._heap = [(d, n) for n, d in deadlines.items()]
        heapq.heapify(self._heap)

    def clear(self) -> None:
        self.at.clear()
        self._expired.clear()
        self._heap = []

    def among(self, names: dict[str, object]) -> list[str]:
        """Those of ``names`` that have a deadline, found by walking the smaller of the two."""
        at = self.at
        if len(names) <= len(at):
            return [name for name in names if name in at]
        return [name for name in at if name in names]

    def due(self, name: str, now: float) -> bool:
        """Whether ``name`` has a deadline that passed by ``now``."""
        deadline = self.at.get(name)
        return deadline is not None and self.passed(deadline, now)

    def passed_among(self, deadlines: dict[str, float] | None, now: float) -> set[str]:
        """Those of ``deadlines`` (a snapshot's, say) that passed by ``now``."""
        return set() if self.frozen else passed_among(deadlines, now)

    def expired(self, now: float) -> dict[str, float]:
        """The names past their deadline by ``now`` that are not removed yet (the dict itself: not to be
        changed, nor kept past the mutex). Each deadline is taken off the heap once, when it is first found
        passed, so a call costs only the deadlines that passed since the last one."""
        if self.frozen:
            return _EMPTY
        heap = self._heap
        if heap and heap[0][0] <= now:
            self._find(now, None)
        return self._expired

    def first_expired(self, now: float, limit: int) -> list[str]:
        """Up to ``limit`` of the names past their deadline, taking at most so many deadlines off the heap
        (the sweep's batch: a mass expiry never holds the mutex long). They stay until the caller removes
        each (``drop``): a name whose removal fails is still expired, and is tried again."""
        if self.frozen:
            return []
        expired = self._expired
        heap = self._heap
        if len(expired) < limit and heap and heap[0][0] <= now:
            self._find(now, limit - len(expired))
        return list(itertools.islice(expired, limit))

    def _find(self, now: float, most: int | None) -> None:
        """Take the deadlines passed by ``now`` off the heap into ``_expired``: ``most`` of them, or all
        (``None``). All of more than ``_ONE_BY_ONE`` are taken in one pass over the heap instead, which
        takes about a third of the time of popping each (measured with 100,000 passed at once)."""
        heap, at, expired = self._heap, self.at, self._expired
        taken = 0
        while heap and heap[0][0] <= now:
            if taken == most:
                return
            if most is None and taken == _ONE_BY_ONE:
                due = [entry for entry in heap if entry[0] <= now]
                self._heap = [entry for entry in heap if entry[0] > now]
                heapq.heapify(self._heap)
                expired.update({name: deadline for deadline, name in due if at.get(name) == deadline})
                return
            deadline, name = heapq.heappop(heap)
            taken += 1
            if at.get(name) == deadline:  # else stale: changed or removed since
                expired[name] = deadline

    def next_deadline(self) -> float | None:
        """The earliest deadline not found passed yet, or ``None``."""
        heap, at = self._heap, self.at
        while heap and at.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # stale: changed or removed since
        return heap[0][0] if heap else None

    def left(self, name: str, now: float) -> float | None:
        """The seconds ``name`` has left, or ``None`` (no deadline, or past it)."""
        deadline = self.at.get(name)
        if deadline is None or deadline <= now:
            return None
        return deadline - now
