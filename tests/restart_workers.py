"""Functions run in client processes by the restart tests (importable under every start method)."""

from __future__ import annotations

import traceback
from pathlib import Path

import sharedstate


def count_incrs(state: sharedstate.State, name: str, report: str, go, stop) -> None:
    """``incr`` until ``stop`` is set; write to ``report`` how many calls returned, then every error."""
    go.wait(60)
    done, errors = 0, []
    while not stop.is_set():
        try:
            state.incr(name)
            done += 1
        except Exception:
            errors.append(traceback.format_exc())
            if len(errors) > 20:
                break
    Path(report).write_text(f"{done}\n" + "\n".join(errors))
