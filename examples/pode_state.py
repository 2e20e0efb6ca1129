"""Pode's shared-state example, ported.

A timer process appends a random number to a shared hashtable every 2 seconds, under the lock, and
saves the state; `GET /` returns the hashtable; `DELETE /` resets it; the state is restored at start.
Like Pode's, the timer saves only the names in scope "Scope1".

Run: python examples/pode_state.py [--port 8090] [--path state.json] [--interval 2] [--seconds N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sharedstate


def timer(interval: float, path: str, stop: threading.Event) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops this one
    state = sharedstate.connect()
    while not stop.wait(interval):
        with state.lock:  # Lock-PodeObject
            table = state.get("hash")  # Get-PodeState
            table["values"].append(random.randint(0, 9))
            state.set("hash", table, scope=["Scope0", "Scope1"])  # Set-PodeState
            state.save(path, scope="Scope1")  # Save-PodeState -Scope Scope1


class Routes(BaseHTTPRequestHandler):
    state: sharedstate.State

    def reply(self, value: object) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        with self.state.lock:
            self.reply(self.state.get("hash"))

    def do_DELETE(self) -> None:  # noqa: N802
        with self.state.lock:
            self.reply(self.state.set("hash", {"values": []}, scope=["Scope0", "Scope1"]))

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--path", default="state.json")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: never)")
    args = parser.parse_args()
    with sharedstate.StateServer(save_every=None) as server:
        state = server.state
        state.set("hash", {"values": []}, scope=["Scope0", "Scope1"])  # create the shared variable
        restored = state.restore(args.path, merge=True)  # Restore-PodeState: nothing if there is no file
        print(f"restored {restored} names; hash = {state.get('hash')}", flush=True)
        stop = multiprocessing.Event()
        ticker = multiprocessing.Process(target=timer, args=(args.interval, args.path, stop))
        ticker.start()
        Routes.state = state
        web = ThreadingHTTPServer(("127.0.0.1", args.port), Routes)
        print(f"listening on http://127.0.0.1:{web.server_address[1]}/", flush=True)
        # SIGTERM (and the optional time limit) stop the web server; then everything shuts down in order.
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=web.shutdown).start())
        limit = threading.Timer(args.seconds or 0, web.shutdown)
        if args.seconds is not None:
            limit.start()
        try:
            web.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            limit.cancel()  # a stop before the time limit does not wait for it
            stop.set()
            ticker.join(10)
            web.server_close()


if __name__ == "__main__":
    main()
