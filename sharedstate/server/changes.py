"""The watchers of a server process (``State.watch``): what each one asked to hear of, the changes
queued for it, and the long-poll call that hands them over.

The store publishes every change with its mutex held, in commit order (``Store._notify``); the watchers
share that mutex, so a watch opened is lossless from the moment ``watch_open`` answers. Each watcher
keeps at most ``buffer`` changes, and values of about ``BUFFER_BYTES`` at most (``sizes.estimate``): one
more drops them all for a single ``overflow`` marker, so a watcher that stopped reading (a stopped
process) costs the server a bounded amount of memory. A caller waiting in ``watch_next`` is answered by
the writer's thread (a small answer on a Unix socket, ``Watcher._hand_over``) or woken through a pipe of
its own, only when it waits: a writer whose watcher is busy or already woken only appends to a list.
A watcher that keeps up change by change is answered at once. One behind a burst (its last batch
carried two changes or more) has its next call wait out the rest of a short window after that batch
(``BATCH_WINDOW``; a poll with a timeout, never a timed wait with the mutex held), or until enough is
queued: a flood goes out in few large batches, each costing the server one call.

A watcher belongs to the client process that opened it and goes when that process' last connection
closes (it died, or closed its handle). The server forgets every watcher when it stops: a client that
finds its watch gone (``KeyError``) opens it again and tells its user with an ``overflow``.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from sharedstate._pattern import Pattern, compile_pattern
from sharedstate._sentinels import HANDED
from sharedstate.server.clients import Client
from sharedstate.server.sizes import estimate
from sharedstate.wire.framing import frame

log = logging.getLogger(__name__)

#: The marker a watcher's queue starts with after it fell more than its buffer behind.
OVERFLOWED = (None, "overflow", None)
#: The largest answer written by the thread that made the change (``Watcher._hand_over``), and the most a
#: value of it may be estimated at: pickling it holds the store's mutex.
HANDOVER_MAX = 16 * 1024
#: About how many bytes of values one watcher may keep queued (``sizes.estimate``): one more value
#: overflows it, as one change more than its ``buffer`` does (a lone value of any size is kept).
BUFFER_BYTES = 64 * 1024 * 1024
#: Linux writes a non-blocking send on a Unix stream socket of at most half its send buffer as one
#: buffer, whole or not at all (EAGAIN). Elsewhere (macOS) such a send may be cut short: no hand-over.
_WHOLE_SENDS = sys.platform.startswith("linux")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_dumps = pickle.dumps
#: The longest single poll of a wait with no timeout (``poll`` takes milliseconds as a C int).
_LONGEST_POLL_S = 3600.0
#: A watcher behind a burst (``Watcher.hurried``) waits out this much after its last batch before its next
#: one, so that a flood goes out in few large batches instead of one call per change.
BATCH_WINDOW = 0.002
#: ...unless this many changes, or values of about ``BATCH_BYTES``, are queued for it before then.
BATCH_CHANGES = 256
BATCH_BYTES = 64 * 1024


class Waiting:
    """How the thread of one connection waits for a watch's changes: a pipe that wakes it, and its Unix
    socket, on which a small answer may be handed over (``Watcher._hand_over``). Made at the
    connection's first wait and kept for its next ones; ``close()`` with the connection."""

    __slots__ = ("read_fd", "write_fd", "sock", "limit", "woken", "handed")

    def __init__(self, fd: int) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.sock = _unix_socket(fd)
        #: The largest answer handed over on ``sock``: a quarter of its send buffer (Linux sends up to
        #: half minus a header in one piece), ``HANDOVER_MAX`` at most; 0: none.
        self.limit = 0
        if self.sock is not None and _WHOLE_SENDS:
            self.limit = min(HANDOVER_MAX, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4)
        #: A byte is in the pipe (it is read when the wait ends).
        self.woken = False
        #: The thread of a change wrote this wait's answer already.
        self.handed = False

    def wake(self) -> None:
        if not self.woken:
            self.woken = True
            os.write(self.write_fd, b"\0")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.detach()  # the descriptor is the connection's
        os.close(self.read_fd)
        os.close(self.write_fd)


class Watcher:
    """One watch: its filters, its queue, and the call waiting for it, if any."""

    __slots__ = (
        "ident", "client", "pattern", "names", "scopes", "buffer", "queue", "behind", "size", "waiter", "batches",
        "enough", "hurried", "answered", "until",
    )  # fmt: skip

    def __init__(
        self,
        ident: int,
        client: Client,
        pattern: Pattern | None,
        names: frozenset[str] | None,
        scopes: frozenset[str],
        buffer: int,
    ) -> None:
        self.ident = ident
        self.client = client
        self.pattern = pattern
        self.names = names
        self.scopes = scopes
        self.buffer = buffer
        #: Changes not taken yet, as ``(name, kind, value)``; a name the server's RE2 could not decide for
        #: the pattern comes as ``(name, kind, value, True)`` for the client to match.
        self.queue: list[tuple[Any, ...]] = []
        #: Changes queued since the queue was last emptied or overflowed, and their values' estimated bytes.
        self.behind = 0
        self.size = 0
        #: The call waiting for changes (``None``: nobody waits): a change wakes it, once.
        self.waiter: Waiting | None = None
        #: Non-empty batches answered: the client says how many it received, so a lost answer is noticed.
        self.batches = 0
        #: Changes that end a batching window: ``BATCH_CHANGES``, and half the buffer, so that a window
        #: ends long before the buffer would overflow.
        self.enough = max(1, min(BATCH_CHANGES, buffer // 2))
        #: The watcher is behind a burst: its last batch carried two changes or more. Its next call waits
        #: out the rest of ``BATCH_WINDOW`` after ``answered`` (when that batch went out). A watcher that
        #: keeps up change by change (each batch one change) is answered at once. (Changes found queued on
        #: arrival do not count: in a ping-pong, the writer's next change often beats the watcher's call.)
        self.hurried = False
        self.answered = 0.0
        #: While a call waits out a window: when it ends (a change queued after that ends it); else 0.
        self.until = 0.0

    def put(self, change: tuple[Any, ...], size: int) -> None:
        """Queue ``change``, whose value is estimated at ``size`` bytes."""
        if self.behind >= self.buffer or (self.behind and self.size + size > BUFFER_BYTES):
            self.queue = [OVERFLOWED]
            self.behind = self.size = 0
        self.queue.append(change)
        self.behind += 1
        self.size += size
        waiter = self.waiter
        if waiter is None or waiter.woken or waiter.handed:
            return
        if self.until and self.behind < self.enough and self.size < BATCH_BYTES and time.monotonic() < self.until:
            return  # the waiting call waits out its window; the last change of a burst is taken by its poll
        self.until = 0.0
        if not self._hand_over(waiter, size):
            waiter.wake()

    def _hand_over(self, waiter: Waiting, size: int) -> bool:
        """Answer the waiting call from this (the writer's) thread, as a lock is handed over: the change
        reaches the watcher without waking the thread that waits, which answers nothing then (``HANDED``).
        Only a small answer (values estimated small before anything is pickled under the mutex) on a Unix
        socket that takes it whole or not at all (``Waiting.limit``), so that it never splits, nor is
        split by, a keepalive. Whether it was sent."""
        limit = waiter.limit
        if not limit or self.size > limit:  # ``size`` is counted in it
            return False
        payload = frame(_dumps(("#RETURN", self.queue), _PROTOCOL))
        if len(payload) > limit:
            return False
        try:
            sent = waiter.sock.send(payload, socket.MSG_DONTWAIT)  # type: ignore[union-attr]
        except OSError:  # full (a stopped watcher), or gone: the waiting thread answers, or sees it gone
            return False
        waiter.handed = True
        if sent != len(payload):  # never on Linux (``Waiting.limit``); the stream would be cut: end it
            log.error("a watch answer was sent in part (%d of %d bytes): its connection is closed", sent, len(payload))
            waiter.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
            return True
        self.take()
        return True

    def take(self) -> list[tuple[Any, ...]]:
        batch, self.queue, self.behind, self.size = self.queue, [], 0, 0
        self.batches += 1
        self.hurried = len(batch) > 1
        self.answered = time.monotonic()
        return batch


class Watchers:
    """The watchers of one store, guarded by the store's ``mutex``. ``active`` is the list the store looks
    at before publishing: while it is empty, a change costs the store one test of it."""

    def __init__(self, mutex: threading.Lock) -> None:
        self._mutex = mutex
        self.active: list[Watcher] = []
        self._by_ident: dict[int, Watcher] = {}

    # -- publishing (the store's mutex is held) -------------------------------------------------------
    def publish(self, kind: str, name: str | None, value: Any, scopes: Iterable[str] | None) -> None:
        """Queue a change for every watcher whose filters it passes ("cleared" and "restored", which have
        no name, pass every filter). ``scopes``: the name's scopes at the change."""
        change = (name, kind, value)
        size = -1
        failed = None
        for watcher in self.active:
            try:
                if name is not None:
                    if watcher.names is not None and name not in watcher.names:
                        continue
                    if watcher.scopes and (not scopes or watcher.scopes.isdisjoint(scopes)):
                        continue
                    if watcher.pattern is not None:
                        matched, undecided = watcher.pattern.split((name,))
                        if not matched and not undecided:
                            continue
                        if undecided:
                            if size < 0:
                                size = estimate(value)
                            watcher.put((name, kind, value, True), size)
                            continue
                if size < 0:
                    size = estimate(value)
                watcher.put(change, size)
            except Exception:
                # The change is made: the writer is not to hear of a watcher's failure. The watcher goes;
                # its process finds it gone and tells its user of an overflow (``local_watch``).
                log.exception("watch %x failed to queue a change and is dropped", watcher.ident)
                failed = [*(failed or ()), watcher]
        for watcher in failed or ():
            self._drop(watcher)

    # -- the calls ------------------------------------------------------------------------------------
    def open(
        self, client: Client, pattern: str | None, names: list[str] | None, scopes: Iterable[str], buffer: int
    ) -> int:
        """Start a watch for ``client``; its id. Arguments were checked by the client, but a server never
        trusts them: a bad one is a ``TypeError``/``ValueError`` here too."""
        checked = None if pattern is None else compile_pattern(pattern)
        if type(buffer) is not int or buffer < 1:
            raise ValueError(f"buffer must be an int of at least 1, not {buffer!r}")
        listed = None if names is None else frozenset(_strings(names, "names"))
        wanted = frozenset(_strings(scopes, "scopes"))
        with self._mutex:
            ident = secrets.randbits(62)  # random: an id of a server before a restart never names another's
            while ident in self._by_ident:
                ident = secrets.randbits(62)
            watcher = Watcher(ident, client, checked, listed, wanted, buffer)
            self._by_ident[ident] = watcher
            self.active.append(watcher)
        return ident

    def next(
        self,
        ident: int,
        client: Client,
        timeout: float | None,
        got: int,
        readable: Callable[[float, int], bool],
        waiting: Waiting,
    ) -> Any:
        """The changes queued for watch ``ident``, waiting up to ``timeout`` seconds (``None``: until one
        comes) for the first; ``[]`` at the timeout, when the watch is closed meanwhile, or when the
        caller's connection has something to read (it went away, or ended the wait). ``got``: how many
        non-empty batches the caller received; fewer than were answered means one was lost on its way,
        which the next batch starts with an ``overflow`` to say. ``KeyError`` for a watch this server
        does not know (it restarted, or the client's connections all closed). ``HANDED`` when the
        thread of a change wrote the answer to the caller's connection itself. ``waiting``: how the
        calling connection's thread waits."""
        if type(ident) is not int or type(got) is not int:
            raise TypeError(f"a watch id and a batch count are ints, not {ident!r}, {got!r}")
        if timeout is not None and (type(timeout) not in (int, float) or timeout != timeout):
            raise TypeError(f"timeout must be None or a number of seconds, not {timeout!r}")
        mutex = self._mutex
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with mutex:
            watcher = self._find(ident, client)
            if got != watcher.batches:
                watcher.batches = got
                if not watcher.queue or watcher.queue[0] is not OVERFLOWED:
                    watcher.queue.insert(0, OVERFLOWED)
            queued = watcher.queue
            until = 0.0
            if watcher.hurried and watcher.behind < watcher.enough and watcher.size < BATCH_BYTES:
                until = watcher.answered + BATCH_WINDOW
                if deadline is not None:
                    until = min(until, deadline)
                if until <= time.monotonic():
                    until = 0.0
            if not until and (queued or (deadline is not None and timeout <= 0)):  # type: ignore[operator]
                return watcher.take() if queued else []
            waiting.handed = False
            self._wait_with(watcher, waiting)
            if until:
                watcher.until = until
        try:
            while True:
                end = until or deadline
                span = _LONGEST_POLL_S if end is None else min(_LONGEST_POLL_S, end - time.monotonic())
                ready = span > 0 and readable(span, waiting.read_fd)
                with mutex:
                    if waiting.handed:
                        if watcher.waiter is waiting:
                            watcher.waiter = None
                        return HANDED  # the answer is written already
                    if watcher.waiter is not waiting:
                        return []  # closed, or another call waits for it now
                    if until and (waiting.woken or not watcher.until or time.monotonic() >= until):
                        until = watcher.until = 0.0  # the window is over: what is queued goes out now
                    if (
                        ready
                        or (watcher.queue and not until)
                        or (deadline is not None and time.monotonic() >= deadline)
                    ):
                        watcher.waiter = None
                        watcher.until = 0.0
                        # A caller whose connection has something to read stopped waiting: the changes
                        # stay queued for its next call.
                        return watcher.take() if watcher.queue and not ready else []
                    if waiting.woken:  # woken for nothing (a call of another thread took the changes)
                        os.read(waiting.read_fd, 1)
                        waiting.woken = False
        finally:
            with mutex:
                if watcher.waiter is waiting:  # left by an exception: no change may wake it any more
                    watcher.waiter = None
                    watcher.until = 0.0
                woken, waiting.woken = waiting.woken, False
            if woken:  # the byte that woke it, read before the connection's next wait
                os.read(waiting.read_fd, 1)

    def _wait_with(self, watcher: Watcher, waiting: Waiting) -> None:
        """Make ``waiting`` the call waiting for ``watcher``; a call that waited already is woken (it
        answers ``[]``: one call waits at a time)."""
        previous = watcher.waiter
        watcher.waiter = waiting
        watcher.until = 0.0
        if previous is not None and not previous.handed:
            previous.wake()

    def close(self, ident: int, client: Client) -> None:
        """Stop watch ``ident`` and wake the call waiting for it; one this server does not know is no error
        (closed already, or lost in a restart)."""
        with self._mutex:
            watcher = self._by_ident.get(ident)
            if watcher is not None and watcher.client is client:
                self._drop(watcher)

    def drop_client(self, client: Client) -> None:
        """Stop the watches of a client process that is gone."""
        with self._mutex:
            for watcher in [w for w in self.active if w.client is client]:
                self._drop(watcher)

    def _drop(self, watcher: Watcher) -> None:
        self._by_ident.pop(watcher.ident, None)
        if watcher in self.active:
            self.active.remove(watcher)
        watcher.queue = []
        watcher.behind = watcher.size = 0
        waiter, watcher.waiter = watcher.waiter, None
        watcher.until = 0.0
        if waiter is not None and not waiter.handed:
            waiter.wake()

    def _find(self, ident: int, client: Client) -> Watcher:
        watcher = self._by_ident.get(ident)
        if watcher is None or watcher.client is not client:
            raise KeyError(f"no watch {ident!r} on this server (it restarted, or the watch was closed)")
        return watcher

    def figures(self) -> dict[str, int]:
        """For ``stats()``: the watches open, the changes queued for them, and the calls waiting for one."""
        with self._mutex:
            active = self.active
            return {
                "watchers": len(active),
                "watch_queued": sum(len(w.queue) for w in active),
                "watch_waiting": sum(1 for w in active if w.waiter is not None and not w.waiter.handed),
            }


def _strings(values: Iterable[Any], what: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{what} must be a list of str, not {type(values).__name__}")
    for value in values:
        if type(value) is not str:
            raise TypeError(f"{what} must hold str, not {type(value).__name__}")
    return list(values)


def _unix_socket(fd: int) -> socket.socket | None:
    """The connection ``fd`` as a socket to hand answers over on, if it is a Unix one (``_hand_over``);
    ``detach()`` it after (the descriptor stays the connection's)."""
    sock = socket.socket(fileno=fd)
    if sock.family == socket.AF_UNIX:
        return sock
    sock.detach()
    return None
