"""The dictionary that lives in the server process, and every operation on it.

Each operation runs under one mutex, so compound calls (``incr``, ``append``, ``compare_and_set``...)
are atomic. Stored values are never mutated in place: a change stores a new object. A snapshot is then a
consistent copy of the dict's references, taken in one short critical section.

Arguments reach the store already checked by the client (``_values``); the store checks only what
depends on the current state, such as the type of the value ``incr`` adds to, with the rules the Redis
backend applies too (``_rules``).

Names that expire have a deadline (``server.deadlines``): reads leave out a name past it, a write that finds
one removes it first (journaled as ``["expired", name]``), and ``sweep`` removes them all within a second.
A read of a name with a deadline answers it wrapped with the value (``wire.expiring``), for the client cache.
"""

from __future__ import annotations

import decimal
import threading
from typing import TYPE_CHECKING, Any

from sharedstate._pattern import compile_pattern
from sharedstate._rules import add, appended, matches, scoped
from sharedstate._sentinels import MISSING
from sharedstate.persistence.journal import encode_record
from sharedstate.server.changes import Watchers
from sharedstate.server.deadlines import Deadlines
from sharedstate.server.expiry import Expiry
from sharedstate.wire.answers import Answers, Duplicate, Removed, answer_of, current_request
from sharedstate.wire.expiring import clock

if TYPE_CHECKING:
    from sharedstate.persistence.journal import Journal
    from sharedstate.wire.versions import VersionTable


class Store(Expiry):
    """Names to values, each name with an optional tuple of scopes."""

    #: The operations a client may call, by name (the manager refuses any other).
    EXPOSED: tuple[str, ...] = (
        "get",
        "set",
        "remove",
        "popitem",
        "contains",
        "names",
        "clear",
        "incr",
        "setdefault",
        "compare_and_set",
        "append",
        "update",
        "get_many",
        "snapshot",
        "length",
        "expire",
        "ttl",
    )

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._scopes: dict[str, tuple[str, ...]] = {}
        self._mutex = threading.Lock()
        #: The deadlines of the names that expire; ``_expiring`` is its dict, tested on every call.
        self.deadlines = Deadlines()
        self._expiring = self.deadlines.at
        #: Operations served, for ``stats()``.
        self.ops = 0
        #: Where changes are written before they are made (``durability="journal"``), or ``None``.
        self.journal: Journal | None = None
        #: The shared counters that tell clients' caches a name changed, or ``None``. Bumped with the
        #: mutex held, so before the changing call returns.
        self.versions: VersionTable | None = None
        #: The last answer of each client's last write, by request id (``wire.answers``).
        self.answers = Answers()
        self._answer_table = self.answers.table
        #: Who is told of each change (``server.changes``); ``_watching`` is its list of open watches,
        #: looked at before any work is done for them.
        self.watchers = Watchers(self._mutex)
        self._watching = self.watchers.active

    def _notify(self, kind: str, name: str | None, value: Any = None) -> None:
        """With the mutex held, as a change is made: tell the watchers (``server.changes``) that ``name``
        changed (``kind`` as ``Change.kind``; ``value`` the new value of a ``"set"``). Called before a
        removed name's scopes are dropped, so that watchers filtering by scope see them."""
        if self._watching:
            self.watchers.publish(kind, name, value, None if name is None else self._scopes.get(name))

    # -- reads -------------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The value, or ``MISSING`` (the caller's default never travels to the server)."""
        with self._mutex:
            self.ops += 1
            if self._expiring and name in self._expiring:
                return self._read(name, self._data[name], MISSING)
            return self._data.get(name, MISSING)

    def contains(self, name: str) -> bool:
        with self._mutex:
            self.ops += 1
            if self._expiring and name in self._expiring:
                return self._read(name, True, False)
            return name in self._data

    def get_many(self, names: list[str]) -> dict[str, Any] | tuple[dict[str, Any], dict[str, float]]:
        """The values of those of ``names`` that exist; ``(values, deadlines)`` when any of them expires."""
        with self._mutex:
            self.ops += 1
            data = self._data
            found = {n: data[n] for n in names if n in data}
            return self._with_deadlines(found) if self._expiring else found

    def length(self) -> int:
        with self._mutex:
            self.ops += 1
            return len(self._data) - len(self._expired())

    def names(self, pattern: str | None = None, scope: tuple[str, ...] = ()) -> list[str] | tuple[list[str], list[str]]:
        """The sorted names having any of ``scope`` (all when empty) that ``pattern`` is found in.

        Only RE2 runs here (linear time: no pattern can stall other clients). Names RE2 cannot decide
        as ``re.search`` would are answered apart: ``(matched, undecided)``, for the caller to match
        with ``re`` in its own process (``_pattern``)."""
        checked = None if pattern is None else compile_pattern(pattern)  # ValueError before any work
        with self._mutex:
            self.ops += 1
            if scope:
                found = scoped(self._scopes, scope)
            else:
                found = list(self._data)
            gone = self._expired()
            if gone:
                found = [name for name in found if name not in gone]
        if checked is None:
            found.sort()
            return found
        matched, undecided = checked.split(found)
        matched.sort()
        return (matched, undecided) if undecided else matched

    def snapshot(self) -> dict[str, Any]:
        with self._mutex:
            self.ops += 1
            return self._live()[0]

    def entries(
        self, final: bool = False, new_generation: int | None = None
    ) -> tuple[dict[str, Any], dict[str, tuple[str, ...]], dict[str, Any], dict[str, float]]:
        """A consistent copy of the references of every value, scope and deadline (less the names past
        theirs), and of the table of last answers (for saving): the only part of
        a save that makes other calls wait. ``final=True`` keeps the store locked afterwards, so no call
        can change it once the last snapshot of a stopping server is taken. ``new_generation`` starts a
        new journal at the same instant, so the copy holds exactly the changes of the older journals."""
        self._mutex.acquire()
        try:
            if new_generation is not None and self.journal is not None:
                self.journal.start_generation(new_generation)
            data, deadlines = self._live()
            return data, dict(self._scopes), self.answers.copy(), deadlines
        finally:
            if not final:
                self._mutex.release()

    # -- writes ------------------------------------------------------------------------------------
    def set(self, name: str, value: Any, scope: tuple[str, ...] = (), ttl: float | None = None) -> Any:
        """Store ``value`` (expiring ``ttl`` seconds from now, if given); return the name's counters after
        the change, so the caller's cache can keep the value it just set (and its deadline, after them)."""
        return self._set(name, value, scope, None if ttl is None else clock() + ttl)

    def _set(self, name: str, value: Any, scope: tuple[str, ...] = (), deadline: float | None = None) -> Any:
        with self._mutex:
            self.ops += 1
            if self._expiring:
                self._purge(name)
            if deadline is None:
                number = self._record("set", name, value, scope)
            else:
                number = self._record("set", name, value, scope, deadline)
            self._data[name] = value
            if scope:
                self._scopes[name] = scope
            else:
                self._scopes.pop(name, None)
            if deadline is not None:
                self.deadlines.put(name, deadline)
            elif self._expiring:
                self.deadlines.drop(name)
            stamp = self._changed(name)
            self._notify("set", name, value)
        self._commit(number)
        return stamp if deadline is None or stamp is None else (*stamp, deadline)

    def remove(self, name: str) -> Any:
        with self._mutex:
            self.ops += 1
            if self._expiring:
                self._purge(name)
            if name not in self._data:
                self._check_duplicate()
                return MISSING
            number = self._record("remove", name, answer=Removed(self._data[name]))
            self._notify("removed", name)
            self._scopes.pop(name, None)
            value = self._data.pop(name)
            if self._expiring:
                self.deadlines.drop(name)
            self._changed(name)
        self._commit(number)
        return value

    def popitem(self) -> tuple[str, Any] | None:
        """Remove the name added last and answer it with its value (``None`` when there is none)."""
        with self._mutex:
            self.ops += 1
            while self._expiring and self._data and self.deadlines.due(next(reversed(self._data)), clock()):
                self._expire_now(next(reversed(self._data)))
            if not self._data:
                self._check_duplicate()
                return None
            name = next(reversed(self._data))
            item = (name, self._data[name])
            # Journaled as the remove it is; the answer holds the value, so it is kept as ``Removed``.
            number = self._record("remove", name, answer=Removed(item))
            self._notify("removed", name)
            del self._data[name]
            self._scopes.pop(name, None)
            if self._expiring:
                self.deadlines.drop(name)
            self._changed(name)
        self._commit(number)
        return item

    def clear(self) -> None:
        with self._mutex:
            self.ops += 1
            number = self._record("clear")
            self._data.clear()
            self._scopes.clear()
            self.deadlines.clear()
            self._changed_all()
            self._notify("cleared", None)
        self._commit(number)

    def update(self, mapping: dict[str, Any]) -> None:
        # Encoding the journal record of a large mapping is most of an update's work: it is done before
        # the mutex is taken, so other calls do not wait for it; the line is still written under the
        # mutex, so the journal's order stays the order of the changes. The request id is checked and
        # kept under the mutex, as ``_record`` does.
        journal = self.journal
        rid = current_request.rid
        if journal is None:
            line = None
        elif rid is None:
            line = encode_record(["update", mapping])
        else:
            line = encode_record(["@", rid[0], rid[1], None, "update", mapping])
        with self._mutex:
            self.ops += 1
            entry = None
            touched = self.deadlines.among(mapping) if self._expiring else ()  # the names that lose their expiry
            for name in touched:
                self._purge(name)
            if rid is not None:
                entry = self._answer_table.pop(rid[0], None)
                if entry is not None and entry[0] == rid[1]:
                    self._answer_table[rid[0]] = entry
                    raise Duplicate(answer_of(entry[1]))
            try:
                number = 0 if line is None else journal.append_line(line)  # type: ignore[union-attr]
            except BaseException:
                if entry is not None:
                    self._answer_table[rid[0]] = entry  # type: ignore[index]
                raise
            if rid is not None:
                self._keep(rid[0], rid[1], None, entry)
            self._data.update(mapping)
            scopes = self._scopes
            if scopes:
                for name in mapping:
                    scopes.pop(name, None)
            for name in touched:
                self.deadlines.drop(name)
            self._changed_many(mapping)
            if self._watching:
                for name, value in mapping.items():
                    self._notify("set", name, value)
        self._commit(number)

    def replace(
        self,
        data: dict[str, Any],
        scopes: dict[str, tuple[str, ...]],
        merge: bool,
        deadlines: dict[str, float] | None = None,
    ) -> None:
        """Install restored entries (with the scopes and ``deadlines`` of those that have them): all of them
        (``merge=False``), or over the current ones. Scopes and deadlines of names not in ``data`` (left
        out as expired, say) are dropped, in the journal's record too."""
        scopes = {name: scope for name, scope in scopes.items() if name in data}
        deadlines = {name: deadline for name, deadline in (deadlines or {}).items() if name in data}
        with self._mutex:
            extra = [deadlines] if deadlines else []  # a record without deadlines stays as it was
            number = self._record("replace", data, scopes, merge, *extra, answer=len(data))
            if merge:
                self._data.update(data)
                for name in data:
                    self._scopes.pop(name, None)
                    if name not in deadlines:
                        self.deadlines.drop(name)
                self._scopes.update(scopes)
                for name, deadline in deadlines.items():
                    self.deadlines.put(name, deadline)
                self._changed_many(data)
            else:
                self._data = dict(data)
                self._scopes = dict(scopes)
                self.deadlines.replace(deadlines)
                self._changed_all()
            self._notify("restored", None)
        self._commit(number)

    # -- atomic read-modify-write ------------------------------------------------------------------
    def _put(self, name: str, value: Any, record: tuple[Any, ...], answer: Any) -> int:
        """With the mutex held: journal ``record`` with its ``answer``, then store ``value`` under ``name``;
        return the number to commit."""
        number = self._record(*record, answer=answer)
        self._data[name] = value
        self._changed(name)
        self._notify("set", name, value)
        return number

    def incr(self, name: str, by: int | float | decimal.Decimal = 1, ttl: float | None = None) -> Any:
        """Add ``by``; a name this call creates expires ``ttl`` seconds from now, if given."""
        return self._incr(name, by, None if ttl is None else clock() + ttl)

    def _incr(self, name: str, by: int | float | decimal.Decimal, deadline: float | None = None) -> Any:
        with self._mutex:
            self.ops += 1
            if self._expiring:
                self._purge(name)
            current = self._data.get(name, MISSING)
            try:
                new = add(name, current, by)
            except (TypeError, ValueError):
                self._check_duplicate()
                raise
            record = ("incr", name, by) if deadline is None else ("incr", name, by, deadline)
            number = self._put(name, new, record, new)
            if deadline is not None and current is MISSING:
                self.deadlines.put(name, deadline)
        self._commit(number)
        return new

    def setdefault(self, name: str, default: Any) -> Any:
        with self._mutex:
            self.ops += 1
            if self._expiring:
                self._purge(name)
            data = self._data
            if name in data:
                self._check_duplicate()
                return data[name]
            number = self._put(name, default, ("setdefault", name, default), default)
        self._commit(number)
        return default

    def compare_and_set(self, name: str, expected: Any, new: Any) -> bool:
        with self._mutex:
            self.ops += 1
            if self._expiring:
                self._purge(name)
            if not matches(self._data.get(name, MISSING), expected):
                self._check_duplicate()
                return False
            number = self._put(name, new, ("put", name, new), True)
        self._commit(number)
        return True

    def append(self, name: str, item: Any) -> int:
        with self._mutex:
            self.ops += 1
            if self._expiring:
                self._purge(name)
            try:
                new = appended(name, self._data.get(name, MISSING), item)
            except TypeError:
                self._check_duplicate()
                raise
            number = self._put(name, new, ("append", name, item), len(new))
        self._commit(number)
        return len(new)
