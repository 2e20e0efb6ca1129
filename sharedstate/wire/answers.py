"""Request ids and the server's table of last answers: how a write retried after a crash and restart is
answered again instead of being applied twice.

A write carries a request id ``(client, sequence)``: ``client`` names one thread of one process (a
token made fresh in every process, also after ``fork``, and the thread's ident), and the sequence grows
across the whole process, so it never repeats for a client. A connection is used by one thread only, so
the client id travels once, when the connection introduces itself; each write sends only its sequence
number (in place of the store's id). A client thread has at most one write outstanding, and retries only
its last one: the server keeps, per client, the sequence and the answer of its last write that changed
the state. The entry is made under the store's mutex together
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
from typing import Any

from sharedstate._fork import after_fork_in_child
from sharedstate._sentinels import DROPPED

#: Clients (process threads) whose last answer the server keeps.
MAX_CLIENTS = 65_536


# -- the client's side -------------------------------------------------------------------------------
class _ClientIds(threading.local):
    client: str | None = None


_token = os.urandom(8).hex()
#: The client id of each thread (``client_id()`` makes it).
ids = _ClientIds()
#: The sequence numbers of this process' writes.
sequence = itertools.count(1)


def client_id() -> str:
    """The client id of the calling thread."""
    client = ids.client
    if client is None:
        client = ids.client = f"{_token}.{threading.get_ident()}"
    return client


#: Lane ids given back, ready for another write (``take_lane``).
_free_lanes: list[str] = []
_lanes = itertools.count(1)


def take_lane() -> str:
    """A client id for one write of the asyncio client, whose writes from many tasks are in flight on one
    connection at once: each goes under a lane id of its own, given back (``give_lane``) once the write
    has its answer (a cancelled write's too, once its answer has come), so a lane has at most one write
    outstanding, as every client has. Lanes are reused, so the server's table keeps one entry per write in
    flight at once, not one per write."""
    try:
        return _free_lanes.pop()
    except IndexError:
        return f"{_token}.w{next(_lanes)}"


def give_lane(lane: str) -> None:
    if lane.startswith(_token):  # not one of the parent's, in a forked child
        _free_lanes.append(lane)


@after_fork_in_child
def _after_fork_in_child() -> None:
    # The child is another client: the parent's ids (and their answers at the server) are not its own.
    # Only the thread that forked runs in the child: its id is the one to forget.
    global _token
    _token = os.urandom(8).hex()
    ids.client = None
    _free_lanes.clear()


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


#: How a snapshot marks the answer of a write whose removed value it did not keep.
_DROPPED_MARK = "removed"


class Removed:
    """The answer of a ``remove``: the value it removed, kept only until the next save.

    A removed value is answered again to a retry the server can still recognise from memory or from the
    journal, but it is never written into a snapshot (a removed secret must not stay on disk, nor in
    memory past that save): a snapshot keeps the entry marked as dropped (``Answers.copy``), so a
    ``remove`` retried after a crash that only the snapshot covers is still applied once, and answers
    ``DROPPED`` (``remove`` gives ``None`` for it, ``pop`` and ``popitem`` an error saying the value is
    lost)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def answer_of(kept: Any) -> Any:
    """The answer a kept answer stands for (``Removed`` holds its value)."""
    return kept.value if type(kept) is Removed else kept


class Answers:
    """The last answer of each client that wrote (callers hold the store's mutex to change it)."""

    def __init__(self, cap: int = MAX_CLIENTS) -> None:
        #: Client to ``(sequence, answer)``, least recently written first (an entry is popped and put
        #: back at each write). Used directly on the hot paths (``Store._record``, the serving loop).
        self.table: dict[str, tuple[int, Any]] = {}
        self.cap = cap

    def __len__(self) -> int:
        return len(self.table)

    def remember(self, client: str, sequence: int, answer: Any) -> None:
        table = self.table
        known = table.pop(client, None) is not None
        table[client] = (sequence, answer)
        if not known and len(table) > self.cap:
            del table[next(iter(table))]

    def copy(self) -> dict[str, list[Any]]:
        """The table as the snapshot holds it: client to ``[sequence, answer]``, oldest first. Removed
        values are left out, here too: their entry becomes ``[sequence, None, "removed"]`` in the
        snapshot, ``DROPPED`` in memory, so a retry learns its value is gone rather than that it was
        ``None``."""
        table = self.table
        saved = {}
        for client, (sequence, answer) in table.items():
            if type(answer) is Removed or answer is DROPPED:
                table[client] = (sequence, DROPPED)  # the same key: the order and size stay
                saved[client] = [sequence, None, _DROPPED_MARK]
            else:
                saved[client] = [sequence, answer]
        return saved

    def load(self, saved: dict[str, Any]) -> None:
        """Install the table of a snapshot (what ``copy`` made); ignores entries of another shape."""
        self.table.clear()
        for client, entry in saved.items():
            if not isinstance(entry, list) or type(entry[0] if entry else None) is not int:
                continue
            if len(entry) == 2:
                self.remember(client, entry[0], entry[1])
            elif len(entry) == 3 and entry[2] == _DROPPED_MARK:
                self.remember(client, entry[0], DROPPED)
