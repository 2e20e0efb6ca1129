"""An owner process for the tests: starts a server, reports, then waits to be killed.

Usage: python owner_script.py PATH DURABILITY
Prints one JSON line {"server_pid", "address", "authkey"} once the server holds the changes.
"""

from __future__ import annotations

import json
import sys
import time

import sharedstate

if __name__ == "__main__":
    path, durability = sys.argv[1], sys.argv[2]
    server = sharedstate.StateServer(path=path, durability=durability, save_every=None).start()
    server.state.set("last", "set by the owner")
    print(
        json.dumps({"server_pid": server.pid, "address": server.address, "authkey": server.authkey.hex()}), flush=True
    )
    while True:
        time.sleep(60)
