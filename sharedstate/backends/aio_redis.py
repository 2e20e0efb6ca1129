"""The Redis backend for asyncio: the operations of ``RedisBackend`` as coroutines, on a ``redis.asyncio``
client, with no thread per call.

Each operation is the blocking backend's own (``redis.steps``: the same scripts, arguments, decoding of
replies, errors and lock rules), carried out here by awaiting each step on an asyncio connection; the
scripts and commands that tasks make at the same time go out together (``steps.Batches``). Only
``save``, ``restore`` and ``stats`` run the blocking backend on a worker thread: the first two read or
write a snapshot file, and ``stats`` walks the lock keys with the blocking client (``redis.figures``);
none of them is a call an app makes often.

A lock this face takes is renewed by the process' lease thread (``redis.leases``) through the blocking
backend's connection, never by a task: a task would not run while the event loop is busy (a long
callback, a blocking call in the app), and a lease not renewed for that long is lost, whereas the thread
runs whatever the loop does, as it does for locks taken by threads.

redis.asyncio's connections belong to the event loop that opened them: a call from another loop (a
second ``asyncio.run``) or in a forked child opens a new ``AsyncConnection`` and drops the last one
unawaited (its loop has ended, or its sockets are the parent's, which a child must not write on).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from sharedstate import _fork
from sharedstate._changes import Change, deadline_of, left, take_turn_async
from sharedstate._errors import SharedStateError, handle_closed
from sharedstate._pattern import Pattern
from sharedstate.backends.base import AsyncBackend
from sharedstate.backends.redis import connection as _connection
from sharedstate.backends.redis import watch as _watch
from sharedstate.backends.redis.backend import RedisBackend
from sharedstate.backends.redis.connection import import_redis_asyncio
from sharedstate.backends.redis.semaphores import AsyncSemaphoreCalls
from sharedstate.backends.redis.steps import Operation, run_async, run_watch
from sharedstate.backends.redis.watch import Cursor

__all__ = ["AsyncRedisBackend", "import_redis_asyncio"]

#: What forked children inherited of their parents' open connections (``_keep_inherited``).
_INHERITED: list[Any] = []


class AsyncRedisBackend(AsyncSemaphoreCalls, AsyncBackend):
    """The operations of ``Backend`` as coroutines, on the Redis state of ``sync`` (a ``RedisBackend``),
    with its options; its call counts and lock waits are ``sync``'s figures."""

    sync: RedisBackend

    def __init__(self, sync: RedisBackend, executor: Executor) -> None:
        super().__init__(sync)
        self._executor = executor
        self._conn: _connection.AsyncConnection | None = None
        #: The event loop and fork generation ``_conn`` was opened in.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = _fork.generation
        self._closed = False
        self._loop_end: Any = None  # ``_until_the_loop_ends`` of ``_conn``

    def close(self) -> None:
        pass  # ``aclose`` closes the connections: redis.asyncio's close is a coroutine

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None and self._mine(asyncio.get_running_loop()):
            await conn.aclose()
        elif conn is not None and self._generation != _fork.generation:
            self._keep_inherited()

    def _keep_inherited(self) -> None:
        """In a forked child, of a loop that was running at the fork: keep the parent's connection, loop
        and loop-end hook for good. Collected, they would close the parent's transports, which takes their
        sockets out of the epoll instance the child shares with the parent (the parent then never hears
        their replies), and would wake the parent's loop."""
        _INHERITED.append((self._conn, self._loop, self._loop_end))

    def _mine(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether ``_conn`` was opened on ``loop`` in this process."""
        return self._loop is loop and self._generation == _fork.generation

    async def _connection(self) -> _connection.AsyncConnection:
        """This loop's connection: a new one on another loop or in a forked child."""
        if self._closed:
            raise handle_closed(self.sync.address)
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or not self._mine(loop):
            if conn is not None and self._generation != _fork.generation:
                self._keep_inherited()
            conn = self._conn = self.sync.async_connection()
            self._loop, self._generation = loop, _fork.generation
            self._loop_end = self._until_the_loop_ends(conn, loop)
            await self._loop_end.asend(None)
        return conn

    async def _until_the_loop_ends(self, conn: _connection.AsyncConnection, loop: asyncio.AbstractEventLoop) -> Any:
        """Closes ``conn`` when ``loop`` ends: an asynchronous generator is closed by the end of its loop
        (``asyncio.run``, ``loop.shutdown_asyncgens()``), while the loop can still close connections."""
        try:
            yield
        finally:
            if self._conn is conn and self._mine(loop):
                self._conn = None
                await conn.aclose()

    def peek(self, name: str) -> Any:
        if self._closed:
            raise handle_closed(self.sync.address)
        return self.sync.peek(name)

    async def _run(
        self,
        method: str,
        *args: Any,
        late: Callable[[Any], None] | None = None,
        unknown: Callable[[], None] | None = None,
    ) -> Any:
        """The blocking backend's ``method``, its steps awaited on this face's connection; redis-py's errors
        as sharedstate's and the call counted, as ``connection.redis_call`` does for the blocking face."""
        sync = self.sync
        conn = await self._connection()
        sync.counted.count(method)
        operation: Operation = getattr(sync, method).steps(sync, *args)
        try:
            return await run_async(operation, conn, late, unknown)
        except (_connection.RedisError, OSError) as exc:  # OSError: no socket to be had (EMFILE ...)
            raise _connection.translate(exc, sync.address, method) from None

    # -- change notifications -----------------------------------------------------------------------
    async def watch(
        self, pattern: Pattern | None, names: tuple[str, ...] | None, scopes: tuple[str, ...], buffer: int
    ) -> AsyncWatcher:
        """``RedisBackend.watch``, its reads awaited on a connection of their own (``AsyncWatcher``)."""
        self.sync.counted.count("watch")
        cursor = Cursor(self.sync, pattern, names, scopes, buffer)
        watcher = AsyncWatcher(self, cursor)
        await watcher.run(cursor.start)
        _watch.registry.add(cursor)
        return watcher

    async def _threaded(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise handle_closed(self.sync.address)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(getattr(self.sync, method), *args)
        )

    # -- reads --------------------------------------------------------------------------------------
    async def get(self, name: str) -> Any:
        return await self._run("get", name)

    async def contains(self, name: str) -> bool:
        return await self._run("contains", name)

    async def get_many(self, names: list[str]) -> dict[str, Any]:
        return await self._run("get_many", names)

    async def names(self, pattern: Pattern | None, scopes: tuple[str, ...]) -> list[str]:
        return await self._run("names", pattern, scopes)

    async def length(self) -> int:
        return await self._run("length")

    async def snapshot(self) -> dict[str, Any]:
        return await self._run("snapshot")

    # -- writes -------------------------------------------------------------------------------------
    async def set(self, name: str, value: Any, scopes: tuple[str, ...], ttl: float | None = None) -> None:
        await self._run("set", name, value, scopes, ttl)

    async def ttl(self, name: str) -> float | None:
        return await self._run("ttl", name)

    async def write(self, method: str, *args: Any) -> Any:
        """Any other write, with the arguments of ``Backend``'s (``restore`` reads its file on a thread)."""
        if method == "restore":
            return await self._threaded(method, *args)
        return await self._run(method, *args)

    # -- files and figures --------------------------------------------------------------------------
    async def save(
        self, path: str | None, include: list[str] | None, exclude: list[str] | None, scopes: tuple[str, ...]
    ) -> Path:
        return await self._threaded("save", path, include, exclude, scopes)

    async def stats(self) -> dict[str, Any]:
        return await self._threaded("stats")

    # -- locks --------------------------------------------------------------------------------------
    async def lock_acquire(self, *args: Any) -> bool:
        """``Backend.lock_acquire``'s arguments and ``late`` (``aio_local``'s, the same): the blocking
        backend's tries and waits (``BLPOP`` on the wake list, short sleeps), awaited; ``late(True)`` runs if
        a task cancelled during a try got the lock all the same."""
        *acquire, late = args
        name, owner = acquire[0], acquire[1]

        def unknown() -> None:
            # A try left without an answer (the loop ended under it) may have taken the lock: give it back
            # by its token, on a thread (the loop may be gone); harmless if the try took nothing.
            threading.Thread(target=self.sync.lock_give_back, args=(name, owner), daemon=True).start()

        return await self._run("lock_acquire", *acquire, late=late, unknown=unknown)

    async def lock_release(self, name: str | None, owner: Hashable, held: int) -> None:
        await self._run("lock_release", name, owner, held)

    async def lock_locked(self, name: str | None) -> bool:
        return await self._run("lock_locked", name)

    async def lock_owner(self, name: str | None) -> int | None:
        return await self._run("lock_owner", name)


class AsyncWatcher:
    """``backends.base.AsyncWatcher`` on Redis: a ``watch.Cursor`` whose ``XREAD BLOCK``s are awaited on a
    connection of their own (``AsyncConnection.watches``), its scripts on the face's connection. The
    process' watch thread keeps it registered, as the lease thread renews this face's locks."""

    def __init__(self, face: AsyncRedisBackend, cursor: Cursor) -> None:
        self._face = face
        self._cursor = cursor
        self._closed = False
        self._one = asyncio.Lock()

    async def run(self, read: Callable[[], Operation]) -> Any:
        """``read()``'s steps awaited; after a failure of the connection, ``watch.failed``'s rule."""
        for attempt in _watch.ATTEMPTS:
            conn = await self._face._connection()
            try:
                return await run_watch(read(), conn)
            except (_connection.RedisError, OSError) as exc:
                error = _watch.failed(self._cursor, exc, attempt)
                if error is not None:
                    raise error from None
        raise AssertionError("unreachable")

    async def next(self, timeout: float | None) -> list[Change]:
        deadline = deadline_of(timeout)
        if self._closed or not await take_turn_async(self._one, deadline):
            return []
        try:
            if self._closed:  # while it waited its turn
                return []
            cursor = self._cursor
            cursor.adopt()
            return await self.run(lambda: cursor.read(left(deadline)))
        finally:
            self._one.release()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = self._cursor.closed = True
            _watch.registry.remove(self._cursor)
            if self._cursor.reading:  # in another task: wake it
                try:
                    await self.run(self._cursor.wake)
                except SharedStateError as exc:  # its wait ends at its next slice all the same
                    _watch.log.debug("could not wake a closed watcher: %s", exc)
