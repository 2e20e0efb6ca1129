"""The dictionary that lives in the server process, and every operation on it.

Each operation runs under one mutex, so compound calls (``incr``, ``append``, ``compare_and_set``...)
are atomic. Stored values are never mutated in place: a change stores a new object. A snapshot is then a
consistent copy of the dict's references, taken in one short critical section.

Arguments reach the store already checked by the client (``_values``); the store checks only what
depends on the current state, such as the type of the value ``incr`` adds to, with the rules the Redis
backend applies too (``_rules``).
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
from sharedstate.wire.answers import Answers, Duplicate, Removed, answer_of, current_request

if TYPE_CHECKING:
    from sharedstate.persistence.journal import Journal
    from sharedstate.wire.versions import VersionTable


class Store:
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
    )

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._scopes: dict[str, tuple[str, ...]] = {}
        self._mutex = threading.Lock()
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

    def _changed(self, name: str) -> tuple[int, int, int] | None:
        """Bump the counter of ``name``; return its counters after the change, if there is a table."""
        return None if self.versions is None else self.versions.bump(name)

    def _changed_many(self, names: Any) -> None:
        if self.versions is not None:
            self.versions.bump_many(names)

    def _changed_all(self) -> None:
        if self.versions is not None:
            self.versions.bump_all()

    def _notify(self, kind: str, name: str | None, value: Any = None) -> None:
        """With the mutex held, as a change is made: tell the watchers (``server.changes``) that ``name``
        changed (``kind`` as ``Change.kind``; ``value`` the new value of a ``"set"``). Called before a
        removed name's scopes are dropped, so that watchers filtering by scope see them."""
        if self._watching:
            self.watchers.publish(kind, name, value, None if name is None else self._scopes.get(name))

    def _record(self, *record: Any, answer: Any = None) -> int:
        """Journal a change (with the mutex held, before making it); return the number to commit.

        A write that carries a request id (``wire.answers``) is refused with ``Duplicate`` if that id was
        applied already; else its ``answer`` is kept with it, in the table and in the journal record
        (``["@", client, sequence, answer, op, *args]``), so a replay restores it too."""
        journal = self.journal
        rid = current_request.rid
        if rid is None:
            return 0 if journal is None else journal.append(list(record))
        client, sequence = rid  # checked by the serving loop
        table = self._answer_table
        # Taken out and put back at the end: the table stays in the order clients last wrote.
        entry = table.pop(client, None)
        if entry is not None and entry[0] == sequence:
            table[client] = entry
            raise Duplicate(answer_of(entry[1]))
        try:
            number = 0 if journal is None else journal.append(["@", client, sequence, answer_of(answer), *record])
        except BaseException:
            if entry is not None:
                table[client] = entry
            raise
        self._keep(client, sequence, answer, entry)
        return number

    def _keep(self, client: str, sequence: int, answer: Any, entry: tuple[int, Any] | None) -> None:
        """Make ``answer`` the client's last one (its old ``entry`` was popped from the table)."""
        table = self._answer_table
        table[client] = (sequence, answer)
        if entry is None and len(table) > self.answers.cap:
            del table[next(iter(table))]  # the client that wrote least recently

    def _check_duplicate(self) -> None:
        """With the mutex held, before a write's early return or error: ``Duplicate`` if its request id
        was applied already (the serving loop's look-up runs without the mutex, so a resend that races
        the original can pass it; then a removed name must not answer None, nor a matched
        ``compare_and_set`` False)."""
        rid = current_request.rid
        if rid is not None:
            entry = self._answer_table.get(rid[0])
            if entry is not None and entry[0] == rid[1]:
                raise Duplicate(answer_of(entry[1]))

    def _commit(self, number: int) -> None:
        """After the mutex is released: wait until journal record ``number`` is durable, if asked to."""
        if number and self.journal is not None:
            self.journal.commit(number)

    # -- reads -------------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The value, or ``MISSING`` (the caller's default never travels to the server)."""
        with self._mutex:
            self.ops += 1
            return self._data.get(name, MISSING)

    def contains(self, name: str) -> bool:
        with self._mutex:
            self.ops += 1
            return name in self._data

    def get_many(self, names: list[str]) -> dict[str, Any]:
        with self._mutex:
            self.ops += 1
            data = self._data
            return {n: data[n] for n in names if n in data}

    def length(self) -> int:
        with self._mutex:
            self.ops += 1
            return len(self._data)

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
        if checked is None:
            found.sort()
            return found
        matched, undecided = checked.split(found)
        matched.sort()
        return (matched, undecided) if undecided else matched

    def snapshot(self) -> dict[str, Any]:
        with self._mutex:
            self.ops += 1
            return dict(self._data)

    def entries(
        self, final: bool = False, new_generation: int | None = None
    ) -> tuple[dict[str, Any], dict[str, tuple[str, ...]], dict[str, Any]]:
        """A consistent copy of the references of every value and scope, and of the table of last
        answers (for saving): the only part of
        a save that makes other calls wait. ``final=True`` keeps the store locked afterwards, so no call
        can change it once the last snapshot of a stopping server is taken. ``new_generation`` starts a
        new journal at the same instant, so the copy holds exactly the changes of the older journals."""
        self._mutex.acquire()
        try:
            if new_generation is not None and self.journal is not None:
                self.journal.start_generation(new_generation)
            return dict(self._data), dict(self._scopes), self.answers.copy()
        finally:
            if not final:
                self._mutex.release()

    # -- writes ------------------------------------------------------------------------------------
    def set(self, name: str, value: Any, scope: tuple[str, ...] = ()) -> tuple[int, int, int] | None:
        """Store ``value``; return the name's counters after the change, so the caller's cache can keep
        the value it just set."""
        with self._mutex:
            self.ops += 1
            number = self._record("set", name, value, scope)
            self._data[name] = value
            if scope:
                self._scopes[name] = scope
            else:
                self._scopes.pop(name, None)
            stamp = self._changed(name)
            self._notify("set", name, value)
        self._commit(number)
        return stamp

    def remove(self, name: str) -> Any:
        with self._mutex:
            self.ops += 1
            if name not in self._data:
                self._check_duplicate()
                return MISSING
            number = self._record("remove", name, answer=Removed(self._data[name]))
            self._notify("removed", name)
            self._scopes.pop(name, None)
            value = self._data.pop(name)
            self._changed(name)
        self._commit(number)
        return value

    def popitem(self) -> tuple[str, Any] | None:
        """Remove the name added last and answer it with its value (``None`` when there is none)."""
        with self._mutex:
            self.ops += 1
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
            self._changed(name)
        self._commit(number)
        return item

    def clear(self) -> None:
        with self._mutex:
            self.ops += 1
            number = self._record("clear")
            self._data.clear()
            self._scopes.clear()
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
            self._changed_many(mapping)
            if self._watching:
                for name, value in mapping.items():
                    self._notify("set", name, value)
        self._commit(number)

    def replace(self, data: dict[str, Any], scopes: dict[str, tuple[str, ...]], merge: bool) -> None:
        """Install restored entries: all of them (``merge=False``), or over the current ones."""
        with self._mutex:
            number = self._record("replace", data, scopes, merge, answer=len(data))
            if merge:
                self._data.update(data)
                for name in data:
                    self._scopes.pop(name, None)
                self._scopes.update(scopes)
                self._changed_many(data)
            else:
                self._data = dict(data)
                self._scopes = dict(scopes)
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

    def incr(self, name: str, by: int | float | decimal.Decimal = 1) -> Any:
        with self._mutex:
            self.ops += 1
            try:
                new = add(name, self._data.get(name, MISSING), by)
            except (TypeError, ValueError):
                self._check_duplicate()
                raise
            number = self._put(name, new, ("incr", name, by), new)
        self._commit(number)
        return new

    def setdefault(self, name: str, default: Any) -> Any:
        with self._mutex:
            self.ops += 1
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
            if not matches(self._data.get(name, MISSING), expected):
                self._check_duplicate()
                return False
            number = self._put(name, new, ("put", name, new), True)
        self._commit(number)
        return True

    def append(self, name: str, item: Any) -> int:
        with self._mutex:
            self.ops += 1
            try:
                new = appended(name, self._data.get(name, MISSING), item)
            except TypeError:
                self._check_duplicate()
                raise
            number = self._put(name, new, ("append", name, item), len(new))
        self._commit(number)
        return len(new)

    # -- journal replay -----------------------------------------------------------------------------
    def apply(self, record: list[Any]) -> None:
        """Make a journaled change again (the journal is not open while records are replayed)."""
        op, args = record[0], record[1:]
        if op == "@":  # a write with its request id and answer
            client, sequence, answer = args[:3]
            if args[3] == "remove" and answer is not None:
                answer = Removed(answer)  # as ``remove`` keeps it
            self.apply(list(args[3:]))
            with self._mutex:
                self.answers.remember(client, sequence, answer)
        elif op == "put":
            name, value = args
            with self._mutex:
                self._data[name] = value
                self._changed(name)
        elif op == "replace":
            data, scopes, merge = args
            self.replace(data, {name: tuple(scope) for name, scope in scopes.items()}, merge)
        elif op in _REPLAYABLE:
            getattr(self, op)(*args)
        else:
            raise ValueError(f"unknown journal record {op!r}")


_REPLAYABLE = frozenset({"set", "remove", "clear", "update", "incr", "setdefault", "append"})
