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
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from sharedstate._pattern import Pattern
from sharedstate.backends.base import AsyncBackend
from sharedstate.backends.redis import connection as _connection
from sharedstate.backends.redis.backend import RedisBackend
from sharedstate.backends.redis.steps import Operation, run_async


class AsyncRedisBackend(AsyncBackend):
    """The operations of ``Backend`` as coroutines, on the Redis state of ``sync`` (a ``RedisBackend``),
    with its options; its call counts and lock waits are ``sync``'s figures."""

    sync: RedisBackend

    def __init__(self, sync: RedisBackend, executor: Executor) -> None:
        super().__init__(sync)
        self._executor = executor
        self._conn = sync.async_connection()

    def close(self) -> None:
        pass  # ``aclose`` closes the connections: redis.asyncio's close is a coroutine

    async def aclose(self) -> None:
        await self._conn.aclose()

    def peek(self, name: str) -> Any:
        return self.sync.peek(name)

    async def _run(self, method: str, *args: Any, late: Callable[[Any], None] | None = None) -> Any:
        """The blocking backend's ``method``, its steps awaited on this face's connection; redis-py's errors
        as sharedstate's and the call counted, as ``connection.redis_call`` does for the blocking face."""
        sync = self.sync
        sync.counted.count(method)
        operation: Operation = getattr(sync, method).steps(sync, *args)
        try:
            return await run_async(operation, self._conn, late)
        except _connection.RedisError as exc:
            raise _connection.translate(exc, sync.address, method) from None

    async def _threaded(self, method: str, *args: Any) -> Any:
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
    async def set(self, name: str, value: Any, scopes: tuple[str, ...]) -> None:
        await self._run("set", name, value, scopes)

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
        return await self._run("lock_acquire", *acquire, late=late)

    async def lock_release(self, name: str | None, owner: Hashable, held: int) -> None:
        await self._run("lock_release", name, owner, held)

    async def lock_locked(self, name: str | None) -> bool:
        return await self._run("lock_locked", name)

    async def lock_owner(self, name: str | None) -> int | None:
        return await self._run("lock_owner", name)
