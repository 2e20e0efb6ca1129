"""Functions run in client processes by the asyncio tests (importable under every start method)."""

from __future__ import annotations

import asyncio
import traceback
from pathlib import Path

import sharedstate.aio


def count_awaited_incrs(address: str, authkey: bytes, name: str, tasks: int, report: str, go, stop) -> None:
    """``tasks`` tasks of one ``AsyncState`` ``await incr`` until ``stop`` is set; write to ``report`` how
    many calls returned, then every error."""
    go.wait(60)
    done, errors = 0, []

    async def one(state: sharedstate.aio.AsyncState) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                await state.incr(name)
                done += 1
            except Exception:
                errors.append(traceback.format_exc())
                return

    async def main() -> None:
        async with await sharedstate.aio.connect(address, authkey, cache=False) as state:
            await asyncio.gather(*(one(state) for _ in range(tasks)))

    try:
        asyncio.run(main())
    except Exception:
        errors.append(traceback.format_exc())
    Path(report).write_text(f"{done}\n" + "\n".join(errors))
