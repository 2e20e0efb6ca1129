"""gunicorn settings that run the sharedstate server from gunicorn's own server hooks.

The master starts the server before it forks any worker, so every worker inherits SHAREDSTATE_ADDRESS
and SHAREDSTATE_AUTHKEY; the server saves and stops when the master exits. With SHAREDSTATE_ADDRESS set
to a Redis URL (redis://host:6379/0), no server is started: every worker connects to Redis.
    gunicorn -c examples/web/gunicorn.conf.py --chdir examples/web -w 4 wsgi_app:app
"""

import os

import sharedstate

state_server = None


def on_starting(arbiter):
    global state_server
    if os.environ.get("SHAREDSTATE_ADDRESS", "").startswith(("redis://", "rediss://", "unix://")):
        # The state lives in Redis (or Valkey): the workers connect to it, no server to start here.
        arbiter.log.info("sharedstate in Redis at %s", os.environ["SHAREDSTATE_ADDRESS"].rpartition("@")[2])
        return
    path = os.environ.get("HITS_STATE_FILE", "hits.json")
    state_server = sharedstate.StateServer(path=path, save_every=60).start()
    arbiter.log.info("sharedstate server pid %s at %s, saving to %s", state_server.pid, state_server.address, path)


def on_exit(arbiter):
    if state_server is not None:
        state_server.shutdown()  # final save
