"""The aio face for the contract suite: the blocking API of ``State`` over a ``sharedstate.aio.AsyncState``.

An ``AsyncState`` lives on one event loop that runs in a background thread. Each thread that calls the
adapter gets one long-lived task of its own on that loop, which runs that thread's calls one after
another: asyncio lock ownership is per task, so here it is per calling thread, as on the sync face (a
lock acquired in one thread and released in another raises the same ``RuntimeError``).

The adapter adds nothing and hides nothing: it exposes only what ``AsyncState`` and ``AsyncLock`` have,
refuses (``AssertionError``) a call of theirs that is not a coroutine, and re-raises the exception a call
raised — the same object, so the same type and message.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

from sharedstate.aio import AsyncLock

#: Calls of ``AsyncState`` that are plain functions by design (they only build an ``AsyncLock``, an
#: ``AsyncSemaphore``, or the ``AsyncChanges`` of a watch, which starts at ``async with``).
NOT_COROUTINES = frozenset({"named_lock", "semaphore", "watch"})


class EventLoopThread:
    """An event loop running forever in a daemon thread, until ``close()``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="contract-aio-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 60) -> Any:
        """Run ``coro`` on the loop (in a task of its own) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class _TaskOfThread:
    """The one task that runs the calls of one calling thread, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[tuple[Callable[[], Awaitable[Any]], Future[Any]] | None] = asyncio.Queue()
        self.task = asyncio.run_coroutine_threadsafe(self._serve(), loop)

    async def _serve(self) -> None:
        while (item := await self._queue.get()) is not None:
            make, done = item
            try:
                result = await make()
            except BaseException as exc:  # handed to the calling thread as it is
                done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                done.set_result(result)

    def call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        done: Future[Any] = Future()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (make, done))
        return done.result()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


class Tasks:
    """One ``_TaskOfThread`` per calling thread, all stopped by ``close()``."""

    def __init__(self, loop: EventLoopThread) -> None:
        self._loop = loop
        self._mine = threading.local()
        self._all: list[_TaskOfThread] = []
        self._guard = threading.Lock()

    def call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        task = getattr(self._mine, "task", None)
        if task is None:
            task = self._mine.task = _TaskOfThread(self._loop.loop)
            with self._guard:
                self._all.append(task)
        return task.call(make)

    def close(self) -> None:
        with self._guard:
            tasks, self._all = self._all, []
        for task in tasks:
            task.stop()
        for task in tasks:
            task.task.result(10)


class Blocking:
    """``State``'s blocking API over an ``AsyncState`` or an ``AsyncLock``: coroutine calls run in the
    calling thread's task; locks come back wrapped too."""

    def __init__(self, target: Any, tasks: Tasks) -> None:
        self._target = target
        self._tasks = tasks

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if isinstance(attr, AsyncLock):
            return Blocking(attr, self._tasks)
        if not callable(attr):
            return attr
        if inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self._tasks.call(lambda: attr(*args, **kwargs))
        if name == "hold":  # an async context manager, entered and left in the calling thread's task
            return lambda *args, **kwargs: _Held(attr(*args, **kwargs), self._tasks)
        if name in NOT_COROUTINES:
            return lambda *args, **kwargs: Blocking(attr(*args, **kwargs), self._tasks)
        raise AssertionError(f"{type(self._target).__name__}.{name} is not a coroutine")

    def __enter__(self) -> Blocking:
        self._tasks.call(self._target.__aenter__)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tasks.call(lambda: self._target.__aexit__(*exc))

    def __repr__(self) -> str:
        return f"<blocking {self._target!r}>"


class _Held:
    """``with lock.hold(timeout)`` over ``async with lock.hold(timeout)``."""

    def __init__(self, manager: Any, tasks: Tasks) -> None:
        self._manager = manager
        self._tasks = tasks

    def __enter__(self) -> Blocking:
        return Blocking(self._tasks.call(self._manager.__aenter__), self._tasks)

    def __exit__(self, *exc: Any) -> bool | None:
        return self._tasks.call(lambda: self._manager.__aexit__(*exc))


def blocking_state(loop: EventLoopThread, connect: Callable[[], Awaitable[Any]]) -> tuple[Blocking, Callable[[], None]]:
    """Connect on ``loop`` (``connect`` returns the coroutine of ``sharedstate.aio.connect(...)``); return
    the blocking face and the function that closes it (its tasks, then the ``AsyncState``)."""
    astate = loop.run(connect())
    tasks = Tasks(loop)

    def close() -> None:
        try:
            tasks.close()
        finally:
            loop.run(astate.close())

    return Blocking(astate, tasks), close
