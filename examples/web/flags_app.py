"""A FastAPI app whose uvicorn workers hear of a feature flag set through any of them, without polling.

    sharedstate run --path flags.json -- uvicorn --workers 3 --app-dir examples/web flags_app:app

`PUT /flags/NAME` with a JSON body sets a flag, `GET /flags/NAME` reads it; `GET /flags/NAME/next?timeout=S`
answers the flag's next value as soon as any worker sets it (a long poll: `state.wait`), or 204 when
`timeout` seconds pass.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request, Response

import sharedstate


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict]:
    async with await sharedstate.aio.connect() as state:  # each worker's own handle
        yield {"shared": state}


app = FastAPI(lifespan=lifespan)


@app.put("/flags/{name}")
async def set_flag(name: str, request: Request, value: Annotated[Any, Body()]) -> dict:
    await request.state.shared.set(f"flag:{name}", value)
    return {"pid": os.getpid()}


@app.get("/flags/{name}")
async def get_flag(name: str, request: Request) -> dict:
    return {"value": await request.state.shared.get(f"flag:{name}"), "pid": os.getpid()}


@app.get("/flags/{name}/next", response_model=None)
async def next_value(name: str, request: Request, timeout: float = 30.0) -> dict | Response:
    try:
        value = await request.state.shared.wait(f"flag:{name}", timeout=timeout)  # never blocks the loop
    except TimeoutError:
        return Response(status_code=204)
    return {"value": value, "pid": os.getpid()}
