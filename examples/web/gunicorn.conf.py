"""gunicorn settings whose server hooks run the sharedstate server in gunicorn's master process.

    gunicorn -c examples/web/gunicorn.conf.py -w 4 --chdir examples/web 'flask_app:create_app()'

The master starts the server before it forks any worker, so every worker inherits SHAREDSTATE_ADDRESS and
SHAREDSTATE_AUTHKEY; the server saves to HITS_STATE_FILE (default: hits.json in the folder gunicorn was
started in) every minute and when the master exits. With SHAREDSTATE_ADDRESS set to a Redis URL
(redis://host:6379/0) no server is started: every worker connects to Redis.
"""

import os
import signal

import sharedstate

#: Resolved when gunicorn reads this file, before --chdir moves it: relative to where gunicorn was started.
STATE_FILE = os.path.abspath(os.environ.get("HITS_STATE_FILE", "hits.json"))
state_server = None


def on_starting(server):
    """In the master, before it binds its sockets or forks a worker."""
    global state_server
    if os.environ.get("SHAREDSTATE_ADDRESS", "").startswith(("redis://", "rediss://", "unix://")):
        server.log.info("sharedstate in Redis at %s", os.environ["SHAREDSTATE_ADDRESS"].rpartition("@")[2])
        return
    state_server = sharedstate.StateServer(path=STATE_FILE, save_every=60).start()
    server.log.info("sharedstate server pid %s at %s, saving to %s", state_server.pid, state_server.address, STATE_FILE)


def post_fork(server, worker):
    """In each new worker, before it loads the app: a worker that cannot reach the state fails to boot
    (and gunicorn says so) rather than failing its first request."""
    # gunicorn installs a worker's own signal handlers only after this hook; until then the worker runs
    # the master's, copied by the fork, which only queue the signal for a master loop that never runs
    # here. A SIGTERM to the whole group (a service manager's stop, Ctrl-C) while this hook connects
    # would be lost, and the master would wait out its graceful timeout (30 s) for this worker: until
    # gunicorn's handlers are in place, such a signal ends the booting worker at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sharedstate.connect()


def on_exit(server):
    """In the master, as it exits (after its workers): stop the server, with a final save."""
    if state_server is not None:
        state_server.shutdown()
