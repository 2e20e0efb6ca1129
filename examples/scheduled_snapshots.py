"""Scheduled snapshots: the server saves on its own every second (use "@hourly" or a cron expression
in real life), with no shutdown and no save() call.

Run: python examples/scheduled_snapshots.py [STATE_FILE]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import sharedstate


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "state.json"
    with sharedstate.StateServer(path=path, save_every=1) as server:
        for tick in range(1, 4):
            server.state.set("tick", tick)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # wait for the schedule to write this tick
                if path.exists() and json.loads(path.read_text())["names"].get("tick") == tick:
                    break
                time.sleep(0.05)
            saved = json.loads(path.read_text())
            print(f"tick {tick}: saved at {saved['saved_at']} with tick={saved['names']['tick']}")
        stats = server.state.stats()
        print(f"last save took {stats['last_save_s'] * 1000:.1f} ms; error: {stats['last_save_error']}")


if __name__ == "__main__":
    main()
