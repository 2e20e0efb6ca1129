"""A FastAPI app whose uvicorn workers share one hit counter through the asyncio client.

sharedstate run --path hits.json -- uvicorn --workers 3 --app-dir examples/web fastapi_app:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

import sharedstate


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict]:
    # Each worker runs this once: its own handle to the server that `sharedstate run` started (found
    # through SHAREDSTATE_ADDRESS/AUTHKEY), closed when the worker stops.
    async with await sharedstate.aio.connect() as state:
        yield {"shared": state}  # request.state.shared in every request


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def hits(request: Request) -> dict:
    return {"hits": await request.state.shared.incr("hits"), "pid": os.getpid()}  # never blocks the loop
