"""A Flask app whose gunicorn workers share sessions that expire and a rate limit.

    sharedstate run --path sessions.json -- gunicorn -w 4 --chdir examples/web 'sessions_app:create_app()'

`POST /login {"user": ...}` starts a session and answers its id; `GET /me` with the header `X-Session`
answers its user from any worker (401 once it expired: the state drops it, no cleanup job needed), and
each use moves its expiry on; `GET /limited` allows `RATE_LIMIT` calls per client in each window of
`RATE_WINDOW_S` seconds, counted across every worker.
"""

from __future__ import annotations

import os
import secrets

from flask import Flask, request

import sharedstate

SESSION_TTL_S = float(os.environ.get("SESSION_TTL_S", 1800))
RATE_LIMIT = int(os.environ.get("RATE_LIMIT", 100))
RATE_WINDOW_S = float(os.environ.get("RATE_WINDOW_S", 60))


def create_app() -> Flask:
    app = Flask(__name__)
    state = sharedstate.connect()  # this worker's handle (SHAREDSTATE_ADDRESS/AUTHKEY from the server)

    @app.post("/login")
    def login() -> tuple[dict, int]:
        session = secrets.token_urlsafe(16)
        state.set(f"session:{session}", {"user": request.get_json()["user"]}, ttl=SESSION_TTL_S)
        return {"session": session, "pid": os.getpid()}, 201

    @app.get("/me")
    def me() -> tuple[dict, int]:
        name = f"session:{request.headers.get('X-Session', '')}"
        session = state.get(name)
        if session is None or not state.expire(name, SESSION_TTL_S):  # a sliding expiry
            return {"error": "no such session", "pid": os.getpid()}, 401
        return {"user": session["user"], "pid": os.getpid()}, 200

    @app.get("/limited")
    def limited() -> tuple[dict, int]:
        # One atomic call per request: the first call of a window creates the counter with the window's
        # expiry; the others only count. When it expires, the next call starts a new window.
        calls = state.incr(f"rate:{request.remote_addr}", ttl=RATE_WINDOW_S)
        if calls > RATE_LIMIT:
            return {"error": "too many requests", "pid": os.getpid()}, 429
        return {"calls": calls, "pid": os.getpid()}, 200

    return app
