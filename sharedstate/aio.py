"""asyncio access: ``await sharedstate.aio.connect()`` gives an ``AsyncState``.

Every call runs on a small pool of worker threads (each with its own connection), so nothing blocks the
event loop — not even a wait for a lock. Lock ownership is per task: two tasks of one loop exclude each
other like two threads, and only the task that acquired a lock may release it.

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
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sharedstate._errors import describe_lock as describe
from sharedstate._errors import lock_timeout
from sharedstate._lock import acquire_call, check_lease, check_timeout, release_call
from sharedstate._sentinels import MISSING, NOT_CACHED
from sharedstate._state import State
from sharedstate._values import check_name
from sharedstate.backends import open_backend

__all__ = ["AsyncLock", "AsyncState", "connect"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Worker threads (and so connections) per ``AsyncState``.
MAX_THREADS = 16
#: A lock wait is made of server-side waits this long, so it never holds a worker thread for long.
LOCK_SLICE_S = 0.1

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
    """The calls of ``State`` as coroutines. Get one from ``await sharedstate.aio.connect()``."""

    def __init__(self, state: State, max_threads: int = MAX_THREADS) -> None:
        self._sync = state
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="sharedstate-aio")
        self._lock = AsyncLock(self, None)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    @property
    def address(self) -> str:
        return self._sync.address

    @property
    def sync(self) -> State:
        """The blocking ``State`` behind this handle (for code that is not async)."""
        return self._sync

    async def aclose(self) -> None:
        """Close the worker threads and their connections."""
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
        value = self._sync.backend.peek(name)  # a cached value costs no thread hop and no round trip
        if value is NOT_CACHED:
            return await self._run(self._sync.get, name, default)
        return default if value is MISSING else value

    async def set(self, name: str, value: Any, *, scope: str | Iterable[str] | None = None) -> Any:
        return await self._run(lambda: self._sync.set(name, value, scope=scope))

    async def remove(self, name: str) -> Any:
        return await self._run(self._sync.remove, name)

    async def contains(self, name: str) -> bool:
        return await self._run(self._sync.contains, name)

    async def names(self, pattern: str | None = None, *, scope: str | Iterable[str] | None = None) -> list[str]:
        return await self._run(lambda: self._sync.names(pattern, scope=scope))

    async def clear(self) -> None:
        await self._run(self._sync.clear)

    async def incr(self, name: str, by: Any = 1) -> Any:
        return await self._run(self._sync.incr, name, by)

    async def setdefault(self, name: str, default: Any = None) -> Any:
        return await self._run(self._sync.setdefault, name, default)

    async def compare_and_set(self, name: str, expected: Any, new: Any) -> bool:
        return await self._run(self._sync.compare_and_set, name, expected, new)

    async def append(self, name: str, item: Any) -> int:
        return await self._run(self._sync.append, name, item)

    async def update(self, other: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **names: Any) -> None:
        await self._run(lambda: self._sync.update(other, **names))

    async def pop(self, name: str, *default: Any) -> Any:
        return await self._run(self._sync.pop, name, *default)

    async def popitem(self) -> tuple[str, Any]:
        return await self._run(self._sync.popitem)

    async def keys(self) -> Any:
        return await self._run(self._sync.keys)

    async def values(self) -> Any:
        return await self._run(self._sync.values)

    async def items(self) -> Any:
        return await self._run(self._sync.items)

    async def length(self) -> int:
        """The number of names (``len(state)`` of the blocking handle)."""
        return await self._run(self._sync.__len__)

    async def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        return await self._run(self._sync.get_many, names)

    async def snapshot(self) -> dict[str, Any]:
        return await self._run(self._sync.snapshot)

    async def save(self, path: Any = None, **filters: Any) -> Path:
        return await self._run(lambda: self._sync.save(path, **filters))

    async def restore(self, path: Any = None, *, merge: bool = False) -> int:
        return await self._run(lambda: self._sync.restore(path, merge=merge))

    async def stats(self) -> dict[str, Any]:
        return await self._run(self._sync.stats)

    @property
    def lock(self) -> AsyncLock:
        """The global lock, owned per task."""
        return self._lock

    def named_lock(self, name: str, lease: float | None = None) -> AsyncLock:
        """An independent lock for ``name``, owned per task; ``lease`` as for ``State.named_lock``."""
        return AsyncLock(self, check_name(name), lease)


for _name in ("get", "set", "remove", "contains", "names", "clear", "incr", "setdefault", "compare_and_set",
              "append", "update", "get_many", "snapshot", "save", "restore", "stats", "pop", "popitem", "keys",
              "values", "items"):  # fmt: skip
    getattr(AsyncState, _name).__doc__ = getattr(State, _name).__doc__


def _give_back(state: Any, name: str | None, token: str) -> None:
    """Release a lock that a cancelled wait took after all (in a thread of its own: the workers and the
    loop may be gone)."""
    try:
        release_call(state, name, token)
    except Exception as exc:
        log.warning("could not give back %s taken by a cancelled wait: %s", describe(name), exc)


class AsyncLock:
    """A server lock for asyncio: ``async with state.lock``, ``await lock.acquire()``. The owner is the
    task that acquired it. Waiting never blocks the event loop. ``lease``, ``LockLost`` and the promises
    across a server restart are those of ``sharedstate.Lock``."""

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
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not blocking:
                wait = None
            else:
                wait = LOCK_SLICE_S if deadline is None else max(0.0, min(LOCK_SLICE_S, deadline - time.monotonic()))
            if await self._attempt(token, blocking and wait is not None and wait > 0, wait, lease):
                return True
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                return False

    async def _attempt(self, token: str, blocking: bool, wait: float | None, lease: float | None) -> bool:
        state = self._state._sync
        attempt = self._state._executor.submit(
            acquire_call, state, self._name, token, blocking, wait if blocking else None, lease
        )
        try:
            return await asyncio.shield(asyncio.wrap_future(attempt))
        except asyncio.CancelledError:
            # The request may still take the lock for a task that is gone: give it back when it does. The
            # callback hangs on the worker's own future, so it runs even if the loop has closed by then.
            def give_back(done: Future[bool]) -> None:
                if not done.cancelled() and done.exception() is None and done.result():
                    threading.Thread(target=_give_back, args=(state, self._name, token), daemon=True).start()

            attempt.add_done_callback(give_back)
            raise

    async def release(self) -> None:
        """Release once; ``RuntimeError`` if the current task does not hold the lock, ``LockLost`` if it
        held it and lost it."""
        token = _task_token()
        future = asyncio.get_running_loop().run_in_executor(
            self._state._executor, release_call, self._state._sync, self._name, token
        )
        # Shielded: a task cancelled while its release waits for a worker thread still releases.
        await asyncio.shield(future)

    async def locked(self) -> bool:
        return await self._state._run(self._state._sync.backend.lock_locked, self._name)

    async def owner(self) -> int | None:
        """The pid of the holding process, or ``None``."""
        return await self._state._run(self._state._sync.backend.lock_owner, self._name)

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
    backend = await asyncio.get_running_loop().run_in_executor(None, lambda: open_backend(address, authkey, **options))
    return AsyncState(State(backend))
