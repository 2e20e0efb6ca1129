"""What ``State.watch`` and ``AsyncState.watch`` answer: the changes of a ``Watcher`` one by one, and
``wait`` for one name, on every backend."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from sharedstate._changes import OVERFLOW, RESTORED, SET, Change, deadline_of, left
from sharedstate._pattern import Pattern, compile_pattern
from sharedstate._values import check_names, check_scope

if TYPE_CHECKING:
    from sharedstate.backends.base import AsyncWatcher, Watcher

__all__ = ["AsyncChanges", "Changes", "deadline_of", "left", "waited"]

#: The buffer of the watch behind ``wait``: it needs one change; more than this many of one name before
#: it looks only say that the name changed, which ``wait`` then reads.
WAIT_BUFFER = 64


class Changes(Iterator[Change]):
    """The changes since ``watch`` returned, in commit order; iterating blocks until the next one. A
    context manager: leaving it (or ``close()``) stops the watch and frees what it holds. Closed from
    another thread, it ends an iteration blocked on it (the backend's watcher wakes its wait)."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher
        self._waiting: deque[Change] = deque()
        self._closed = False

    def __enter__(self) -> Changes:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Changes:
        return self

    def __next__(self) -> Change:
        while True:
            try:  # another thread may take the last one between a test and a pop
                return self._waiting.popleft()
            except IndexError:
                if self._closed:
                    raise StopIteration from None
            self._waiting.extend(self._watcher.next(None))

    def next(self, timeout: float | None = None) -> Change | None:
        """The next change, waiting up to ``timeout`` seconds (``None``: as long as it takes); ``None`` if
        none came in time or the watch is closed."""
        if not self._waiting and not self._closed:
            self._waiting.extend(self._watcher.next(timeout))
        try:
            return self._waiting.popleft()
        except IndexError:
            return None

    def close(self) -> None:
        self._closed = True
        self._watcher.close()


class AsyncChanges(AsyncIterator[Change]):
    """``Changes`` for asyncio. The watch starts at ``async with`` (lossless from there) or, used only
    as ``async for``, at the first iteration."""

    def __init__(self, start: Callable[[], Awaitable[AsyncWatcher]]) -> None:
        self._start = start
        self._watcher: AsyncWatcher | None = None
        self._waiting: deque[Change] = deque()
        self._closed = False

    async def _started(self) -> AsyncWatcher:
        if self._watcher is None:
            self._watcher = await self._start()
        return self._watcher

    async def __aenter__(self) -> AsyncChanges:
        await self._started()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncChanges:
        return self

    async def __anext__(self) -> Change:
        while not self._waiting:
            if self._closed:
                raise StopAsyncIteration
            watcher = await self._started()
            self._waiting.extend(await watcher.next(None))
        return self._waiting.popleft()

    async def next(self, timeout: float | None = None) -> Change | None:
        """As ``Changes.next``."""
        if not self._waiting and not self._closed:
            watcher = await self._started()
            self._waiting.extend(await watcher.next(timeout))
        return self._waiting.popleft() if self._waiting else None

    async def aclose(self) -> None:
        self._closed = True
        if self._watcher is not None:
            await self._watcher.aclose()


def waited(name: str, change: Change | None, timeout: float | None) -> tuple[bool, Any]:
    """What ``wait`` answers for the first ``change`` of ``name`` after it began: ``(True, value)``, or
    ``(False, None)`` when the value must be read (the state was restored, or the watch overflowed).
    ``TimeoutError`` when no change came within ``timeout``."""
    if change is None:
        raise TimeoutError(f"{name!r} did not change within {timeout:g} seconds")
    if change.kind == SET:
        return True, change.value
    if change.kind in (RESTORED, OVERFLOW):
        return False, None
    return True, None  # removed, expired, cleared


def watch_arguments(
    pattern: object, names: object, scope: object, buffer: object
) -> tuple[Pattern | None, tuple[str, ...] | None, tuple[str, ...], int]:
    """``watch``'s arguments, checked, as ``Backend.watch`` takes them."""
    checked = None if pattern is None else compile_pattern(pattern)
    listed = None if names is None else tuple(check_names(names))
    if type(buffer) is not int:
        raise TypeError(f"buffer must be an int, not {type(buffer).__name__}")
    if buffer < 1:
        raise ValueError(f"buffer must be at least 1, not {buffer!r}")
    return checked, listed, check_scope(scope), buffer
