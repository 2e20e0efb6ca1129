"""The local backend for asyncio: the operations of ``base.Backend`` as coroutines, on a sharedstate
server, spoken on asyncio streams (``wire.aio_calls``: one pipelined connection for every task's calls,
and a connection of its own for each lock wait).

Reads use the same client cache as the blocking backend (``wire.cache``; a look-up is a read of shared
memory, no I/O): a value this process read and that has not changed since costs no round trip.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from sharedstate._errors import ServerUnavailable
from sharedstate._pattern import Pattern
from sharedstate._sentinels import MISSING, NOT_CACHED
from sharedstate.backends.base import AsyncBackend
from sharedstate.backends.local import (
    LocalBackend,
    acquire_again,
    cached,
    cached_many,
    matched_names,
    names_args,
    read_result,
    set_args,
)
from sharedstate.backends.local_watch import AsyncLocalWatcher, watch_args
from sharedstate.wire.aio_calls import AsyncCalls
from sharedstate.wire.answers import sequence as _sequence
from sharedstate.wire.cache import CacheSlot, ClientCache, cache_figures, encode
from sharedstate.wire.expiring import unwrap_many

_monotonic = time.monotonic


class AsyncLocalBackend(AsyncBackend):
    """The operations of ``Backend`` as coroutines, on the server that ``sync`` (a ``LocalBackend``) talks
    to, with its options. ``sync`` stays the blocking face of the same state: lock leases are renewed
    through it (``_lock``'s renewal thread)."""

    def __init__(self, sync: LocalBackend, executor: Executor) -> None:
        super().__init__(sync)
        self._use_cache = sync.uses_cache
        self._slot = slot = CacheSlot()
        self._calls = calls = AsyncCalls(
            sync.calls, connected=slot.connected if self._use_cache else None, dropped=slot.dropped, executor=executor
        )
        self._call = calls.call
        self._write = calls.write

    async def _fresh_cache(self) -> ClientCache | None:
        if self._use_cache:
            try:
                await self._calls.connection()
            except ServerUnavailable:
                return None  # the call itself reconnects, or waits for a restarting server
        return self._slot.cache

    async def connect(self) -> None:
        await self._calls.connection()

    def close(self) -> None:
        self._calls.close()

    async def aclose(self) -> None:
        await self._calls.aclose()

    # -- reads --------------------------------------------------------------------------------------
    async def _read(self, name: str, method: str) -> Any:
        value = cached(self._slot.cache, name, method)
        if value is not NOT_CACHED:
            return value
        start = _monotonic()
        cache = await self._fresh_cache()
        stamp = None if cache is None else cache.stamp(name)  # before the request (``LocalBackend._read``)
        value, deadline = read_result(method, await self._call(method, (name,), start))
        if stamp is not None and cache is self._slot.cache:
            cache.fill(name, stamp, value, deadline)
        return value

    async def get(self, name: str) -> Any:
        return await self._read(name, "get")

    def peek(self, name: str) -> Any:
        # Not a miss yet when it is not cached: the caller reads it next (``get``), which counts it.
        return cached(self._slot.cache, name, "get", count_miss=False)

    async def contains(self, name: str) -> bool:
        return await self._read(name, "contains") is not MISSING

    async def get_many(self, names: list[str]) -> dict[str, Any]:
        found = cached_many(self._slot.cache, names)
        if found is not None:
            return found
        start = _monotonic()
        cache = await self._fresh_cache()
        stamps = None if cache is None else cache.stamps(names)
        found, deadlines = unwrap_many(await self._call("get_many", (names,), start))
        if stamps is not None and cache is self._slot.cache:
            cache.fill_many(stamps, found, deadlines)
        return found

    async def names(self, pattern: Pattern | None, scopes: tuple[str, ...]) -> list[str]:
        return matched_names(pattern, await self._call("names", names_args(pattern, scopes)))

    async def length(self) -> int:
        return await self._call("length", ())

    async def snapshot(self) -> dict[str, Any]:
        return await self._call("snapshot", ())

    # -- writes -------------------------------------------------------------------------------------
    async def set(self, name: str, value: Any, scopes: tuple[str, ...], ttl: float | None = None) -> None:
        start = _monotonic()
        cache = await self._fresh_cache()
        kept = None if cache is None else encode(value)  # as sent, whatever the caller does to it next
        stamp = await self._write("set", set_args(name, value, scopes, ttl), start)
        if stamp is not None and kept is not None and cache is self._slot.cache:
            cache.put(name, stamp, kept, None if ttl is None else stamp[3])

    async def write(self, method: str, *args: Any) -> Any:
        """Any other write: ``remove``, ``popitem``, ``clear``, ``incr`` (``ttl`` last, if given),
        ``expire``, ``setdefault``, ``compare_and_set``, ``append``, ``update``, ``restore`` with the
        arguments of ``Backend``'s."""
        return await self._write(method, args)

    async def ttl(self, name: str) -> float | None:
        return await self._call("ttl", (name,))

    # -- change notifications -----------------------------------------------------------------------
    async def watch(
        self, pattern: Pattern | None, names: tuple[str, ...] | None, scopes: tuple[str, ...], buffer: int
    ) -> AsyncLocalWatcher:
        return await AsyncLocalWatcher(self._calls, pattern, watch_args(pattern, names, scopes, buffer)).open()

    # -- files and figures --------------------------------------------------------------------------
    async def save(
        self, path: str | None, include: list[str] | None, exclude: list[str] | None, scopes: tuple[str, ...]
    ) -> Path:
        return Path(await self._call("save", (path, include, exclude, scopes)))

    async def stats(self) -> dict[str, Any]:
        return {**await self._call("stats", ()), **cache_figures(self._slot.cache)}

    # -- locks --------------------------------------------------------------------------------------
    async def lock_acquire(
        self,
        name: str | None,
        owner: Hashable,
        blocking: bool,
        timeout: float | None,
        lease: float | None,
        held: int,
        late: Callable[[Any], None],
    ) -> bool:
        """``Backend.lock_acquire``; ``late(answer)`` runs with the answer of a wait whose task was
        cancelled (``AsyncCalls.lock_wait``)."""
        return await self._acquire("lock_acquire", (name, owner, blocking, timeout, lease, held), late)

    async def _acquire(self, method: str, args: tuple[Any, ...], late: Callable[[Any], None]) -> bool:
        """``lock_acquire`` or ``sem_acquire`` (``args``: the server call's, blocking and timeout third and fourth)."""
        # First without waiting, on the shared connection: the uncontended path is one round trip there.
        # Shielded: a task cancelled while its try is in flight hands a lock it took all the same to ``late``.
        attempt = asyncio.ensure_future(self._calls.lock_call(method, (*args[:2], False, None, *args[4:])))
        try:
            taken = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(functools.partial(_late_answer, late))
            raise
        if taken or not args[2] or args[3] == 0:
            return taken
        return await self._calls.wait(method, args, acquire_again(args), late)

    async def lock_release(self, name: str | None, owner: Hashable, held: int) -> None:
        if not held:  # the server answers with the RuntimeError naming the holder
            await self._call("lock_release", (name, owner, 0))
            return
        # The request id tells a release sent again after a crash from a lost lock (``server/locktable``).
        await self._calls.lock_call("lock_release", (name, owner, held, next(_sequence)))

    async def lock_locked(self, name: str | None) -> bool:
        return await self._call("lock_locked", (name,))

    async def lock_owner(self, name: str | None) -> int | None:
        return await self._call("lock_owner", (name,))

    # -- semaphores (as ``LocalBackend``'s; ``late`` as for ``lock_acquire``) -------------------------
    async def sem_acquire(
        self, name: str, value: int, blocking: bool, timeout: float | None, owner: Hashable, late: Any
    ) -> bool:
        return await self._acquire("sem_acquire", (name, value, blocking, timeout, owner, next(_sequence)), late)

    async def sem_release(self, name: str, value: int, held: int, owner: Hashable) -> None:
        if held:
            await self._calls.lock_call("sem_release", (name, value, held, owner, next(_sequence)))
        else:
            await self._call("sem_release", (name, value, 0))

    async def sem_value(self, name: str, value: int) -> int:
        return await self._call("sem_value", (name, value))


def _late_answer(late: Callable[[Any], None], attempt: asyncio.Future[Any]) -> None:
    """The answer of a try whose task was cancelled: a lock it took goes to ``late``."""
    if not attempt.cancelled() and attempt.exception() is None and attempt.result() is True:
        late(True)
