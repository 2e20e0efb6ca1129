"""Request ids and the server's table of last answers: how a write retried after a crash and restart is
answered again instead of being applied twice.

A client sends each write with a request id ``(client, sequence)``: ``client`` names one thread of one
process (a token made fresh in every process, also after ``fork``, and the thread's ident), and the
sequence grows across the whole process, so it never repeats for a client. A client thread has at most
one write outstanding, and retries only its last one: the server keeps, per client, the sequence and the
answer of its last write that changed the state. The entry is made under the store's mutex together
with the change and its journal record, and it is saved in the snapshot, so a restarted server knows
every write it applied. A write that changed nothing (``compare_and_set`` that did not match, ``remove``
of a missing name, an error) leaves no entry: its retry is simply a new attempt.

The table is bounded: the ``MAX_CLIENTS`` clients that wrote last are kept (least recently written
first out). A retried write is recognised as long as fewer than that many other client threads wrote
after it — a retry comes within its caller's timeout, so that bound is never reached in practice.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from typing import Any

#: Clients (process threads) whose last answer the server keeps.
MAX_CLIENTS = 65_536


# -- the client's side -------------------------------------------------------------------------------
class _ClientIds(threading.local):
    client: str | None = None


_token = os.urandom(8).hex()
_ids = _ClientIds()
_sequence = itertools.count(1)


def request_id() -> tuple[str, int]:
    """A fresh request id for a write of the calling thread."""
    client = _ids.client
    if client is None:
        client = _ids.client = f"{_token}.{threading.get_ident()}"
    return (client, next(_sequence))


def _after_fork_in_child() -> None:
    # The child is another client: the parent's ids (and their answers at the server) are not its own.
    global _token, _ids
    _token = os.urandom(8).hex()
    _ids = _ClientIds()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the server's side -------------------------------------------------------------------------------
class _Request(threading.local):
    """The request id of the write the current server thread is serving (``None`` for other calls)."""

    rid: tuple[str, int] | None = None


current_request = _Request()


class Duplicate(Exception):
    """Raised inside a write whose request id was answered already: its answer."""

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer


_NOT_FOUND = object()


class Answers:
    """The last answer of each client that wrote (callers hold the store's mutex to change it)."""

    NOT_FOUND = _NOT_FOUND

    def __init__(self, cap: int = MAX_CLIENTS) -> None:
        self._table: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._cap = cap

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, client: str, sequence: int) -> Any:
        """The answer of the write ``(client, sequence)`` if it was applied, else ``NOT_FOUND``."""
        entry = self._table.get(client)
        if entry is not None and entry[0] == sequence:
            return entry[1]
        return _NOT_FOUND

    def remember(self, client: str, sequence: int, answer: Any) -> None:
        table = self._table
        table[client] = (sequence, answer)
        table.move_to_end(client)
        if len(table) > self._cap:
            table.popitem(last=False)

    def copy(self) -> dict[str, list[Any]]:
        """The table as the snapshot holds it: client to ``[sequence, answer]``, oldest first."""
        return {client: [sequence, answer] for client, (sequence, answer) in self._table.items()}

    def load(self, saved: dict[str, Any]) -> None:
        """Install the table of a snapshot (what ``copy`` made); ignores entries of another shape."""
        self._table.clear()
        for client, entry in saved.items():
            if isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int:
                self.remember(client, entry[0], entry[1])
