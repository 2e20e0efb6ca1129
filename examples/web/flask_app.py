"""A Flask app factory whose gunicorn workers share one hit counter.

With a server around gunicorn, or with gunicorn's master owning it (gunicorn.conf.py):
    sharedstate run --path hits.json -- gunicorn -w 4 --chdir examples/web 'flask_app:create_app()'
    gunicorn -c examples/web/gunicorn.conf.py -w 4 --chdir examples/web 'flask_app:create_app()'
"""

from __future__ import annotations

import os

from flask import Flask, current_app

import sharedstate


def create_app() -> Flask:
    app = Flask(__name__)
    # gunicorn builds the app in each worker, after forking it: this handle is the worker's own. It finds
    # the server through SHAREDSTATE_ADDRESS/AUTHKEY, exported by whichever process started the server.
    app.extensions["sharedstate"] = sharedstate.connect()

    @app.get("/")
    def hits() -> dict:
        state: sharedstate.State = current_app.extensions["sharedstate"]
        return {"hits": state.incr("hits"), "pid": os.getpid()}  # incr is atomic across all workers

    return app
