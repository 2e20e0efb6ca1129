"""The deadlines of the names that expire (``State.set(ttl=)``), as the server keeps them: a dict of name to
deadline (absolute UTC seconds, the server process' ``time.time()``) for look-ups, and a heap of the same
deadlines for the sweeper, which removes expired names (``Store.sweep``).

Only names that expire are in here, so a call on a name without expiry pays one test of an empty (or
missing) dict entry. The heap is lazy: a deadline that changed or went stays in it until it comes up,
and is skipped then because the dict no longer holds it.

While the server replays its files at start, ``frozen`` is set: the clock decides nothing then (the
journal records every expiry the server made, ``["expired", name]``), so the replay gives exactly the
state the server had; names past their deadline go once the replay is over.
"""

from __future__ import annotations

import heapq


class Deadlines:
    """The deadline of each name that expires. Used with the store's mutex held."""

    __slots__ = ("at", "_heap", "frozen")

    def __init__(self) -> None:
        #: name -> deadline; always a subset of the store's names. The same dict for the store's life.
        self.at: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        #: Set while the server's files are replayed: nothing is past its deadline then.
        self.frozen = False

    def put(self, name: str, deadline: float) -> None:
        self.at[name] = deadline
        heap = self._heap
        heapq.heappush(heap, (deadline, name))
        if len(heap) > 2 * len(self.at) + 1024:  # mostly stale entries: rebuild
            self._heap = [(d, n) for n, d in self.at.items()]
            heapq.heapify(self._heap)

    def replace(self, deadlines: dict[str, float]) -> None:
        """Make ``deadlines`` all the deadlines there are."""
        self.at.clear()
        self.at.update(deadlines)
        self._heap = [(d, n) for n, d in deadlines.items()]
        heapq.heapify(self._heap)

    def clear(self) -> None:
        self.at.clear()
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
        return deadline is not None and deadline <= now and not self.frozen

    def passed(self, deadlines: dict[str, float] | None, now: float) -> set[str]:
        """Those of ``deadlines`` (a snapshot's, say) that passed by ``now``."""
        if not deadlines or self.frozen:
            return set()
        return {name for name, deadline in deadlines.items() if deadline <= now}

    def expired(self, now: float) -> set[str]:
        """The names past their deadline that are not removed yet. Walks only the part of the heap that is
        due (a heap's children are never due before their parent), not every name that expires."""
        heap, at = self._heap, self.at
        gone: set[str] = set()
        if self.frozen or not heap or heap[0][0] > now:
            return gone
        stack = [0]
        size = len(heap)
        while stack:
            i = stack.pop()
            deadline, name = heap[i]
            if deadline > now:
                continue
            if at.get(name) == deadline:
                gone.add(name)
            stack.extend(c for c in (2 * i + 1, 2 * i + 2) if c < size)
        return gone

    def take_due(self, now: float, limit: int) -> list[str]:
        """Up to ``limit`` names past their deadline, taken off the heap (the caller removes them)."""
        heap, at = self._heap, self.at
        due: list[str] = []
        while heap and heap[0][0] <= now and len(due) < limit and not self.frozen:
            deadline, name = heapq.heappop(heap)
            if at.get(name) == deadline:
                due.append(name)
        return due

    def next_deadline(self) -> float | None:
        """The earliest deadline still held, or ``None``."""
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
