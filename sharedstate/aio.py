"""asyncio access: ``await sharedstate.aio.connect()`` gives an ``AsyncState``.

On a sharedstate server the client speaks the protocol itself on asyncio streams: the calls of every
task share one connection with many requests in flight (``wire.aio_calls``), a lock wait takes a
connection of its own, and no call needs a thread; on Redis, the calls are the blocking backend's own
operations, awaited on a ``redis.asyncio`` client (``backends.aio_redis``). Lock
ownership is per task: two tasks of one loop exclude each other like two threads, and only the task that
acquired a lock may release it.

>>> state = await sharedstate.aio.connect()          # doctest: +SKIP
>>> await state.incr("hits")
>>> async with state.lock:
...     await state.set("total", (await state.get("total", 0)) + 1)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sharedstate._errors import LockLost, lock_timeout
from sharedstate._errors import describe_lock as describe
from sharedstate._fork import ThreadPool
from sharedstate._lock import (
    acquire_begin,
    acquire_done,
    acquire_lost,
    check_lease,
    check_timeout,
    release_begin,
    release_call,
    release_done,
)
from sharedstate._pattern import compile_pattern
from sharedstate._replies import popped, popped_item, removed, sorted_view
from sharedstate._rules import check_increment
from sharedstate._semaphore import AsyncSemaphore, check_permits
from sharedstate._sentinels import MISSING, NO_DEFAULT, NOT_CACHED
from sharedstate._state import _PLAIN_FAST, State, restore_arguments, save_arguments, update_items
from sharedstate._values import check_name, check_names, check_scope, check_ttl, check_value
from sharedstate._watch import WAIT_BUFFER, AsyncChanges, deadline_of, left, waited, watch_arguments
from sharedstate.backends import open_backend
from sharedstate.backends.aio_local import AsyncLocalBackend
from sharedstate.backends.local import LocalBackend

__all__ = ["AsyncLock", "AsyncState", "connect"]

log = logging.getLogger(__name__)

#: Worker threads of an ``AsyncState``, made when first needed: handshakes on a local server; ``save``,
#: ``restore`` and ``stats`` on Redis.
MAX_THREADS = 16

_task_tokens: weakref.WeakKeyDictionary[asyncio.Task[Any], str] = weakref.WeakKeyDictionary()
_counter = itertools.count(1)


def _task_token() -> str:
    """The lock owner id of the current task (unlike thread idents, a ``str``)."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("sharedstate.aio locks must be used from an asyncio task")
    token = _task_tokens.get(task)
    if token is None:
        token = _task_tokens[task] = f"task-{os.getpid()}-{next(_counter)}"
    return token


class AsyncState:
    """The calls of ``State`` as coroutines. Get one from ``await sharedstate.aio.connect()``, or from a
    ``State`` (``AsyncState(state)``: the same state, with the same options)."""

    def __init__(self, state: State, max_threads: int = MAX_THREADS) -> None:
        self._sync = state
        self._executor = ThreadPool(max_threads, "sharedstate-aio")  # started anew in a forked child
        sync = state.backend
        if isinstance(sync, LocalBackend):
            self._backend: Any = AsyncLocalBackend(sync, self._executor)
        else:  # redis.asyncio (and the modules of the Redis backend) only for a Redis state
            from sharedstate.backends.aio_redis import AsyncRedisBackend

            self._backend = AsyncRedisBackend(sync, self._executor)
        self._lock = AsyncLock(self, None)

    @property
    def address(self) -> str:
        return self._sync.address

    @property
    def sync(self) -> State:
        """The blocking ``State`` on the same state (for code that is not async)."""
        return self._sync

    async def aclose(self) -> None:
        """Close the connections and the worker threads. On a sharedstate server the handle stays closed:
        a call on it raises ``SharedStateError`` (connect again for a new one)."""
        await self._backend.aclose()
        self._executor.shutdown(wait=False)

    close = aclose

    async def __aenter__(self) -> AsyncState:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<sharedstate.aio.AsyncState at {self.address}>"

    async def get(self, name: str, default: Any = None) -> Any:
        if type(name) is not str or not name.isascii():
            name = check_name(name)
        value = self._backend.peek(name)  # a cached value costs no round trip
        if value is NOT_CACHED:
            value = await self._backend.get(name)
        return default if value is MISSING else value

    async def set(
        self, name: str, value: Any, *, scope: str | Iterable[str] | None = None, ttl: float | None = None
    ) -> Any:
        if type(name) is not str or not name.isascii():
            name = check_name(name)
        if type(value) not in _PLAIN_FAST:
            check_value(name, value)
        scopes = check_scope(scope) if scope is not None else ()
        if ttl is None:
            await self._backend.set(name, value, scopes)
        else:
            await self._backend.set(name, value, scopes, check_ttl(ttl))
        return value

    async def remove(self, name: str) -> Any:
        return removed(await self._backend.write("remove", check_name(name)))

    async def contains(self, name: str) -> bool:
        return await self._backend.contains(check_name(name))

    async def names(self, pattern: str | None = None, *, scope: str | Iterable[str] | None = None) -> list[str]:
        checked = None if pattern is None else compile_pattern(pattern)
        return await self._backend.names(checked, check_scope(scope))

    async def clear(self) -> None:
        await self._backend.write("clear")

    async def incr(self, name: str, by: Any = 1, *, ttl: float | None = None) -> Any:
        name = check_name(name)
        check_increment(name, by)
        if ttl is None:
            return await self._backend.write("incr", name, by)
        return await self._backend.write("incr", name, by, check_ttl(ttl))

    async def expire(self, name: str, ttl: float | None) -> bool:
        name = check_name(name)
        return await self._backend.write("expire", name, None if ttl is None else check_ttl(ttl))

    async def ttl(self, name: str) -> float | None:
        return await self._backend.ttl(check_name(name))

    async def setdefault(self, name: str, default: Any = None) -> Any:
        name = check_name(name)
        check_value(name, default)
        return await self._backend.write("setdefault", name, default)

    async def compare_and_set(self, name: str, expected: Any, new: Any) -> bool:
        name = check_name(name)
        check_value(name, expected)
        check_value(name, new)
        return await self._backend.write("compare_and_set", name, expected, new)

    async def append(self, name: str, item: Any) -> int:
        name = check_name(name)
        check_value(name, item)
        return await self._backend.write("append", name, item)

    async def update(self, other: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **names: Any) -> None:
        items = update_items(await other.snapshot() if isinstance(other, AsyncState) else other, names)
        if items:
            await self._backend.write("update", items)

    async def pop(self, name: str, default: Any = NO_DEFAULT) -> Any:
        return popped(name, await self._backend.write("remove", check_name(name)), default)

    async def popitem(self) -> tuple[str, Any]:
        return popped_item(await self._backend.write("popitem"))

    async def keys(self) -> Any:
        return dict.fromkeys(await self.names()).keys()

    async def values(self) -> Any:
        return sorted_view(await self.snapshot()).values()

    async def items(self) -> Any:
        return sorted_view(await self.snapshot()).items()

    async def length(self) -> int:
        """The number of names (``len(state)`` of the blocking handle)."""
        return await self._backend.length()

    async def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        return await self._backend.get_many(check_names(names))

    async def snapshot(self) -> dict[str, Any]:
        return await self._backend.snapshot()

    async def save(self, path: Any = None, **filters: Any) -> Path:
        return await self._backend.save(*save_arguments(path, **filters))

    async def restore(self, path: Any = None, *, merge: bool = False) -> int:
        return await self._backend.write("restore", *restore_arguments(path, merge))

    async def stats(self) -> dict[str, Any]:
        return await self._backend.stats()

    def watch(
        self,
        pattern: str | None = None,
        *,
        names: Iterable[str] | None = None,
        scope: str | Iterable[str] | None = None,
        buffer: int = 10_000,
    ) -> AsyncChanges:
        """As ``State.watch``; lossless from ``async with`` (or, used only with ``async for``, from the
        first iteration)."""
        arguments = watch_arguments(pattern, names, scope, buffer)
        return AsyncChanges(lambda: self._backend.watch(*arguments))

    async def wait(self, name: str, *, timeout: float | None = None) -> Any:
        name = check_name(name)
        timeout = check_timeout(True, timeout)
        deadline = deadline_of(timeout)
        async with AsyncChanges(lambda: self._backend.watch(None, (name,), (), WAIT_BUFFER)) as changes:
            known, value = waited(name, await changes.next(left(deadline)), timeout)
        return value if known else await self.get(name)

    @property
    def lock(self) -> AsyncLock:
        """The global lock, owned per task."""
        return self._lock

    def named_lock(self, name: str, lease: float | None = None) -> AsyncLock:
        """An independent lock for ``name``, owned per task; ``lease`` as for ``State.named_lock``."""
        return AsyncLock(self, check_name(name), lease)

    def semaphore(self, name: str, value: int = 1) -> AsyncSemaphore:
        """``State.semaphore`` for asyncio: an ``AsyncSemaphore``."""
        return AsyncSemaphore(self, check_name(name), check_permits(value))


for _name in ("get", "set", "remove", "contains", "names", "clear", "incr", "setdefault", "compare_and_set",
              "append", "update", "get_many", "snapshot", "save", "restore", "stats", "pop", "popitem", "keys",
              "values", "items"):  # fmt: skip
    getattr(AsyncState, _name).__doc__ = getattr(State, _name).__doc__


def _give_back(state: State, name: str | None, token: str) -> None:
    """Release a lock that a cancelled wait took after all."""
    try:
        release_call(state, name, token)
    except Exception as exc:
        log.warning("could not give back %s taken by a cancelled wait: %s", describe(name), exc)


class AsyncLock:
    """A server lock for asyncio: ``async with state.lock``, ``await lock.acquire()``. The owner is the
    task that acquired it. Waiting never blocks the event loop, and a task cancelled while it waits never
    keeps the lock. ``lease``, ``LockLost`` and the promises across a server restart are those of
    ``sharedstate.Lock``."""

    def __init__(self, state: AsyncState, name: str | None, lease: float | None = None) -> None:
        self._state = state
        self._name = name
        self._lease = check_lease(lease)

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def lease(self) -> float | None:
        return self._lease

    async def acquire(self, blocking: bool = True, timeout: float | None = None, lease: float | None = None) -> bool:
        """Acquire for the current task; ``False`` if not free in time (or at once when not blocking).
        ``LockLost`` if the task held the lock (a reentrant acquire) and lost it."""
        timeout = check_timeout(blocking, timeout)
        lease = self._lease if lease is None else check_lease(lease)
        token = _task_token()
        backend = self._state._backend
        ident, count = acquire_begin(backend, self._name, token)

        def late(taken: Any) -> None:
            # The answer of a wait whose task was cancelled: a lock it took after all is given back, on a
            # thread of its own (the loop may be gone by then).
            if taken is True:
                acquire_done(ident, count, backend.sync, lease)
                threading.Thread(target=_give_back, args=(self._state._sync, self._name, token), daemon=True).start()

        try:
            taken = await backend.lock_acquire(self._name, token, blocking, timeout, lease, count, late)
        except LockLost:
            acquire_lost(ident, count)
            raise
        if taken:
            acquire_done(ident, count, backend.sync, lease)
        return taken

    async def release(self) -> None:
        """Release once; ``RuntimeError`` if the current task does not hold the lock, ``LockLost`` if it
        held it and lost it."""
        # Shielded: a task cancelled while its release is in flight still releases.
        await asyncio.shield(self._release(_task_token()))

    async def _release(self, token: str) -> None:
        backend = self._state._backend
        ident, count, was_lost = release_begin(backend, self._name, token)
        if not count:
            await backend.lock_release(self._name, token, 0)
            return
        if not was_lost:
            try:
                await backend.lock_release(self._name, token, count)
            except LockLost:
                was_lost = True
        release_done(ident, count, was_lost)

    async def locked(self) -> bool:
        return await self._state._backend.lock_locked(self._name)

    async def owner(self) -> int | None:
        """The pid of the holding process, or ``None``."""
        return await self._state._backend.lock_owner(self._name)

    @asynccontextmanager
    async def hold(self, timeout: float = 5.0, lease: float | None = None) -> AsyncIterator[AsyncLock]:
        """``async with lock.hold(timeout)``: raises ``LockTimeout`` if not acquired in time."""
        if not await self.acquire(timeout=timeout, lease=lease):
            raise lock_timeout(self._name, timeout, await self.owner())
        try:
            yield self
        finally:
            await self.release()

    async def __aenter__(self) -> AsyncLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()


async def connect(address: object = None, authkey: bytes | None = None, **options: Any) -> AsyncState:
    """``sharedstate.connect()`` for asyncio: the same arguments (``cache``, ``namespace``, ``lease``,
    ``timeout``, keyword-only) and errors, a Redis URL too, and it does not block the loop. ``timeout``
    is the deadline of one call, as for ``sharedstate.connect()``; calls interrupted by a crash of the
    server are sent again while its owner restarts it, the same way."""

    def opened() -> Any:
        backend = open_backend(address, authkey, **options)
        if isinstance(backend, LocalBackend):
            backend.close()  # this worker thread's connection: the asyncio client opens its own
        else:  # imported here, on this worker thread: redis.asyncio takes tens of ms, which would stall the loop
            from sharedstate.backends import aio_redis

            aio_redis.import_redis_asyncio()
        return backend

    state = AsyncState(State(await asyncio.get_running_loop().run_in_executor(None, opened)))
    if isinstance(state._backend, AsyncLocalBackend):
        try:
            await state._backend.connect()
        except BaseException:
            await state.aclose()
            raise
    return state
