"""The asyncio handle as a context manager, and the mapping calls of ``State`` as coroutines."""

from __future__ import annotations

import asyncio

import pytest

from sharedstate import aio


def test_async_with_closes_the_handle_and_aclose_is_the_same(server):
    async def main():
        async with await aio.connect(server.address, server.authkey) as state:
            await state.set("a", 1)
            executor = state._executor
        assert executor._shutdown  # the workers are gone with the block
        other = await aio.connect(server.address, server.authkey)
        assert await other.get("a") == 1
        await other.aclose()
        assert other._executor._shutdown

    asyncio.run(main())


def test_the_mapping_calls_are_coroutines_with_the_blocking_calls_answers(any_state):
    async def main(state):
        await state.update([("b", 2)], a=1, c=3)
        assert list(await state.keys()) == ["a", "b", "c"]
        assert list(await state.values()) == [1, 2, 3]
        assert list(await state.items()) == [("a", 1), ("b", 2), ("c", 3)]
        assert await state.length() == 3
        assert await state.pop("a") == 1
        assert await state.pop("a", "gone") == "gone"
        with pytest.raises(KeyError):
            await state.pop("a")
        name, value = await state.popitem()
        assert (name, value) in {("b", 2), ("c", 3)}
        await state.popitem()
        with pytest.raises(KeyError):
            await state.popitem()
        await state.aclose()

    asyncio.run(main(aio.AsyncState(any_state)))
