"""An ASGI app whose uvicorn workers share one hit counter through the asyncio client.

sharedstate run --path hits.json -- uvicorn --workers 3 --app-dir examples/web asgi_app:app
"""

from __future__ import annotations

import asyncio
import json
import os

import sharedstate

_state: sharedstate.aio.AsyncState | None = None
_connecting = asyncio.Lock()


async def state() -> sharedstate.aio.AsyncState:
    global _state
    async with _connecting:
        if _state is None:
            _state = await sharedstate.aio.connect()
    return _state


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _state is not None:
                    await _state.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    hits = await (await state()).incr("hits")  # never blocks the event loop
    body = json.dumps({"hits": hits, "pid": os.getpid()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
