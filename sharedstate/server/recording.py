"""How the store records its changes: each one journaled before it is made (``durability="journal"``),
with the request id and answer of the write that made it (``wire.answers``), committed once the mutex is
released; the clients' cache counters bumped (``wire.versions``); and the journal's records made again
when the server starts (``apply``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from sharedstate.wire.answers import Answers, Duplicate, Removed, answer_of, current_request

if TYPE_CHECKING:
    from sharedstate.persistence.journal import Journal
    from sharedstate.wire.versions import VersionTable


class Recording:
    """The store's recording of changes (``Store`` makes the changes and sets these attributes)."""

    _data: dict[str, Any]
    _mutex: threading.Lock
    journal: Journal | None
    versions: VersionTable | None
    answers: Answers
    _answer_table: dict[str, tuple[int, Any]]

    def _changed(self, name: str) -> tuple[int, int, int] | None:
        """Bump the counter of ``name``; return its counters after the change, if there is a table."""
        return None if self.versions is None else self.versions.bump(name)

    def _changed_many(self, names: Any) -> None:
        if self.versions is not None:
            self.versions.bump_many(names)

    def _changed_all(self) -> None:
        if self.versions is not None:
            self.versions.bump_all()

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
            data, scopes, merge = args[:3]
            deadlines = args[3] if len(args) > 3 else None
            self.replace(data, {name: tuple(scope) for name, scope in scopes.items()}, merge, deadlines)
        elif op == "expired":
            with self._mutex:
                self._expire_now(args[0])  # a name not held (already removed) is left alone
        elif op in _REPLAYED_AS:  # with the deadline the server computed, not one computed again now
            getattr(self, _REPLAYED_AS[op])(*args)
        elif op in _REPLAYABLE:
            getattr(self, op)(*args)
        else:
            raise ValueError(f"unknown journal record {op!r}")


_REPLAYABLE = frozenset({"remove", "clear", "update", "setdefault", "append"})
_REPLAYED_AS = {"set": "_set", "incr": "_incr", "expire": "_expire_at"}
