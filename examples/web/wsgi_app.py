"""A WSGI app whose gunicorn workers share one hit counter.

Run it with a server around gunicorn:
    sharedstate run --path hits.json -- gunicorn -w 4 --chdir examples/web wsgi_app:app
or with gunicorn's own server hooks (see gunicorn.conf.py):
    gunicorn -c examples/web/gunicorn.conf.py --chdir examples/web -w 4 wsgi_app:app
"""

from __future__ import annotations

import json
import os

import sharedstate

_state: sharedstate.State | None = None


def state() -> sharedstate.State:
    """This worker's handle, made on first use (after gunicorn forked the worker)."""
    global _state
    if _state is None:
        _state = sharedstate.connect()  # SHAREDSTATE_ADDRESS/AUTHKEY come from the process that started the server
    return _state


def app(environ, start_response):
    hits = state().incr("hits")  # atomic across all workers
    body = json.dumps({"hits": hits, "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
