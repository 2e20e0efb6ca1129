"""The watches of the local backend (``State.watch`` on a sharedstate server), blocking and asyncio.

A watch lives in the server (``server.changes``); its changes are fetched by ``watch_next``, a long-poll
call that waits in the server as a lock acquire does: on the calling thread's connection (blocking), or
on a connection of its own (asyncio, ``AsyncCalls.wait``), with the server's keepalives, sent again after
a crash of the server. A server that restarted no longer knows the watch (``KeyError``): it is opened
again there, and the user hears of the changes it may have missed as one ``overflow``.

Names the server's RE2 could not decide for the pattern come flagged; they are matched here, with
``re``, at this process' cost (``_pattern``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from sharedstate._changes import OVERFLOW, Change, deadline_of, left, take_turn, take_turn_async
from sharedstate._errors import ServerUnavailable
from sharedstate._pattern import Pattern
from sharedstate.wire.aio_calls import AsyncCalls
from sharedstate.wire.calls import Calls

#: What a watch that had to be opened again tells its user.
_LOST = Change(None, OVERFLOW, None)


def watch_args(
    pattern: Pattern | None, names: tuple[str, ...] | None, scopes: tuple[str, ...], buffer: int
) -> tuple[Any, ...]:
    """The arguments of ``watch_open``."""
    return (None if pattern is None else pattern.text, None if names is None else list(names), list(scopes), buffer)


def changes_of(batch: list[tuple[Any, ...]], pattern: Pattern | None) -> list[Change]:
    """A ``watch_next`` answer as ``Change``s, the names the server left undecided matched here."""
    found = []
    for item in batch:
        if len(item) == 4 and (pattern is None or not pattern.search_undecided((item[0],))):
            continue
        found.append(Change(item[0], item[1], item[2]))
    return found


class _Watch:
    """What the blocking and the asyncio watcher share: the watch's id, the batches received, and the
    arguments of a ``watch_next``."""

    def __init__(self, pattern: Pattern | None, args: tuple[Any, ...]) -> None:
        self._pattern = pattern
        self._args = args
        self._ident = 0
        #: Non-empty batches received (the server prefixes an ``overflow`` when one was lost on its way).
        self._got = 0
        self._closed = False

    def _next_args(self, deadline: float | None) -> Callable[[], tuple[Any, ...]]:
        """The arguments of a ``watch_next`` (made again for a call sent again: what is left of the time)."""
        ident, got = self._ident, self._got
        return lambda: (ident, left(deadline), got)

    def _opened(self, ident: int) -> None:
        self._ident, self._got = ident, 0

    def _received(self, batch: list[tuple[Any, ...]]) -> list[Change]:
        if not batch:
            return []
        self._got += 1
        return changes_of(batch, self._pattern)


class LocalWatcher(_Watch):
    """``base.Watcher`` on a sharedstate server. ``close()`` from another thread wakes a ``next`` that
    waits (the server ends its wait). One ``next`` waits in the server at a time: a second one (of
    another thread) waits for it to end, within its own timeout, as the server keeps one wait per watch."""

    def __init__(self, calls: Calls, pattern: Pattern | None, args: tuple[Any, ...]) -> None:
        super().__init__(pattern, args)
        self._calls = calls
        self._one = threading.Lock()
        self._opened(calls.lock_call("watch_open", args))

    def next(self, timeout: float | None) -> list[Change]:
        deadline = deadline_of(timeout)
        if not take_turn(self._one, deadline):
            return []
        try:
            return self._next(deadline)
        finally:
            self._one.release()

    def _next(self, deadline: float | None) -> list[Change]:
        while not self._closed:
            arguments = self._next_args(deadline)
            try:
                batch = self._calls.lock_call("watch_next", arguments(), arguments)
            except KeyError:
                if self._closed:
                    break
                self._opened(self._calls.lock_call("watch_open", self._args))
                return [_LOST]
            changes = self._received(batch)
            if changes:
                return changes
            if deadline is not None and left(deadline) <= 0:
                break
        return []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._calls.call("watch_close", (self._ident,))
        except ServerUnavailable:
            pass  # the server is gone, and its watches with it


class AsyncLocalWatcher(_Watch):
    """``base.AsyncWatcher`` on a sharedstate server: each ``next`` waits on a connection of its own, so
    the other tasks' calls go on; one ``next`` at a time (another waits for it, within its timeout). A
    task cancelled while it waits keeps what the wait got all the same for the next ``next``, which
    waits for that answer before it asks for more: the batches stay in order, and counted (``got``)."""

    def __init__(self, calls: AsyncCalls, pattern: Pattern | None, args: tuple[Any, ...]) -> None:
        super().__init__(pattern, args)
        self._calls = calls
        self._one = asyncio.Lock()
        #: Changes a cancelled ``next`` received after all, and the end of its wait (``None``: ended).
        self._kept: list[Change] = []
        self._settling: asyncio.Future[None] | None = None

    async def open(self) -> AsyncLocalWatcher:
        self._opened(await self._calls.lock_call("watch_open", self._args))
        return self

    async def next(self, timeout: float | None) -> list[Change]:
        deadline = deadline_of(timeout)
        if not await take_turn_async(self._one, deadline):
            return []
        try:
            return await self._next(deadline)
        finally:
            self._one.release()

    async def _next(self, deadline: float | None) -> list[Change]:
        while not self._closed:
            if self._settling is not None:
                await asyncio.shield(self._settling)  # a cancelled ``next``'s answer comes first
                self._settling = None
            if self._kept:
                kept, self._kept = self._kept, []
                return kept
            arguments = self._next_args(deadline)
            settled = asyncio.get_running_loop().create_future()

            def late(batch: Any, settled: asyncio.Future[None] = settled) -> None:
                if type(batch) is list:
                    self._kept.extend(self._received(batch))
                if not settled.done():
                    settled.set_result(None)

            try:
                batch = await self._calls.wait("watch_next", arguments(), arguments, late)
            except asyncio.CancelledError:
                self._settling = settled  # ``late`` ends it, with the answer or without (``wait``)
                raise
            except KeyError:
                if self._closed:
                    break
                self._opened(await self._calls.lock_call("watch_open", self._args))
                return [_LOST]
            changes = self._received(batch)
            if changes:
                return changes
            if deadline is not None and left(deadline) <= 0:
                break
        return []

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._calls.call("watch_close", (self._ident,))
        except ServerUnavailable:
            pass  # the server is gone, and its watches with it
