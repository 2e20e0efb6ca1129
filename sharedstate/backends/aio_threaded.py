"""A blocking backend's operations as coroutines, each run on a worker thread: the asyncio face of a
backend that has no asyncio transport of its own (``aio_local`` is the local server's).

A lock wait is made of short server-side waits (``LOCK_SLICE_S``), so it never holds a worker thread for
long; a wait whose task was cancelled hands the answer it got all the same to ``late``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future
from typing import Any

from sharedstate.backends.base import AsyncBackend, Backend

#: A lock wait is made of server-side waits this long, so it never holds a worker thread for long.
LOCK_SLICE_S = 0.1


class ThreadedBackend(AsyncBackend):
    """``sync``'s operations as coroutines, on the threads of ``executor``."""

    def __init__(self, sync: Backend, executor: Executor) -> None:
        super().__init__(sync)
        self._executor = executor

    def close(self) -> None:
        pass  # each worker thread's connection goes with its thread

    def peek(self, name: str) -> Any:
        return self.sync.peek(name)

    async def _run(self, method: str, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, getattr(self.sync, method), *args)

    async def write(self, method: str, *args: Any) -> Any:
        return await self._run(method, *args)

    async def lock_acquire(
        self, name: Any, owner: Any, blocking: bool, timeout: Any, lease: Any, held: int, late: Any
    ) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not blocking:
                wait = None
            else:
                wait = LOCK_SLICE_S if deadline is None else max(0.0, min(LOCK_SLICE_S, deadline - time.monotonic()))
            slice_blocks = blocking and wait is not None and wait > 0
            if await self._attempt((name, owner, slice_blocks, wait if slice_blocks else None, lease, held), late):
                return True
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                return False

    async def _attempt(self, args: tuple[Any, ...], late: Callable[[Any], None]) -> bool:
        attempt = self._executor.submit(self.sync.lock_acquire, *args)
        try:
            return await asyncio.shield(asyncio.wrap_future(attempt))
        except asyncio.CancelledError:
            # The request may still take the lock for a task that is gone: ``late`` gives it back.
            def give_back(done: Future[bool]) -> None:
                if not done.cancelled() and done.exception() is None and done.result():
                    late(True)

            attempt.add_done_callback(give_back)
            raise


for _method in ("get", "contains", "get_many", "names", "length", "snapshot", "set", "save", "stats",
                "lock_release", "lock_locked", "lock_owner"):  # fmt: skip

    def _make(method: str) -> Callable[..., Awaitable[Any]]:
        async def run(self: ThreadedBackend, *args: Any) -> Any:
            return await self._run(method, *args)

        run.__name__ = method
        return run

    setattr(ThreadedBackend, _method, _make(_method))
