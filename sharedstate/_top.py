"""``sharedstate top``: a live view of a running server's ``stats()``, like ``redis-cli --stat``.

On a terminal the screen is redrawn every interval (ANSI clear and redraw); otherwise one line is
printed per interval under a header line, for scripts and logs. ``--count N`` stops after N intervals.
Ctrl-C and SIGTERM end it quietly (exit 0); a server that goes away ends it with one line on stderr
(the command line's usual error, exit 1).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from sharedstate._options import positive

if TYPE_CHECKING:
    from sharedstate._state import State

#: Clear the screen and go home (ANSI), then draw.
_CLEAR = "\x1b[H\x1b[2J"
#: The columns of the one-line form: (title, width).
_COLUMNS = (
    ("time", 8),
    ("ops/s", 10),
    ("clients", 7),
    ("names", 10),
    ("rss", 8),
    ("locks", 5),
    ("waiters", 7),
    ("last-save", 9),
    ("journal", 8),
)
#: Lock holders and busiest calls the terminal view lists at most.
_SHOWN = 5


class _Stop(Exception):
    """SIGTERM: end like Ctrl-C."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``top``."""
    parser.add_argument(
        "--interval", type=positive(float), default=1.0, metavar="SECONDS", help="seconds between views (default 1)"
    )
    parser.add_argument("--count", type=positive(int), default=None, metavar="N", help="stop after N views")


def run_top(state: State, interval: float = 1.0, count: int | None = None, out: IO[str] | None = None) -> int:
    """Show ``state.stats()`` every ``interval`` seconds, ``count`` times (``None``: until stopped).
    Returns the exit status, 0; the ``SharedStateError`` of a server that went away propagates."""
    out = sys.stdout if out is None else out
    terminal = out.isatty()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        before = (time.monotonic(), state.stats())
        if terminal:
            out.write(_CLEAR + _screen(state, before, None, interval))
        else:
            out.write("  ".join(title.rjust(width) for title, width in _COLUMNS).rstrip() + "\n")
        out.flush()
        shown = 0
        while count is None or shown < count:
            time.sleep(max(0.0, before[0] + interval - time.monotonic()))
            now = (time.monotonic(), state.stats())
            out.write(_CLEAR + _screen(state, now, before, interval) if terminal else _line(now, before) + "\n")
            out.flush()
            before = now
            shown += 1
    except (KeyboardInterrupt, _Stop):
        if terminal:
            out.write("\n")
            out.flush()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stop


# -- figures -----------------------------------------------------------------------------------------
Sample = tuple[float, dict[str, Any]]


def _rate(now: Sample, before: Sample | None, get: Any) -> float | None:
    """Per second, between two samples, of the number ``get(stats)``."""
    if before is None or now[0] <= before[0]:
        return None
    return max(0, (get(now[1]) or 0) - (get(before[1]) or 0)) / (now[0] - before[0])


def _size(value: Any) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return "-"  # not reached


def _age(stats: dict[str, Any]) -> str:
    """How long ago the last save was (a Redis state: Redis' own last save)."""
    if stats.get("last_save_error"):
        return "failed"
    at = stats.get("last_save_at") or stats.get("redis_last_save_at")
    if not at:
        return "never"
    seconds = max(0.0, time.time() - at)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _line(now: Sample, before: Sample) -> str:
    stats = now[1]
    rate = _rate(now, before, lambda s: s.get("ops"))
    cells = (
        time.strftime("%H:%M:%S"),
        "-" if rate is None else f"{rate:.1f}",
        _dash(stats.get("clients")),
        _dash(stats.get("names")),
        _size(stats.get("rss_bytes")),
        _dash(stats.get("locks_held")),
        _dash(stats.get("lock_waiters")),
        _age(stats),
        _size(stats.get("journal_bytes")),
    )
    return "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, _COLUMNS, strict=True))


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.2f} ms"


def _screen(state: State, now: Sample, before: Sample | None, interval: float) -> str:
    stats = now[1]
    rate = _rate(now, before, lambda s: s.get("ops"))
    save = _age(stats)
    if stats.get("last_save_s") is not None and save not in ("never", "failed"):
        save += f" ago, took {stats['last_save_s']:.3f} s"
    lines = [
        f"sharedstate top: {state.address} (pid {_dash(stats.get('pid'))})   {time.strftime('%H:%M:%S')}",
        f"every {interval:g} s, Ctrl-C to quit",
        "",
        f"ops/s        {'-' if rate is None else f'{rate:.1f}'}   (ops {_dash(stats.get('ops'))})",
        f"clients      {_dash(stats.get('clients'))}",
        f"names        {_dash(stats.get('names'))}",
        f"rss          {_size(stats.get('rss_bytes'))}",
        f"locks        {_dash(stats.get('locks_held'))} held, {_dash(stats.get('lock_waiters'))} waiting",
        f"lock waits   p50 {_seconds(stats.get('lock_wait_p50_s'))}, p99 {_seconds(stats.get('lock_wait_p99_s'))}"
        f" (last {stats.get('lock_wait_samples', 0)} acquires)",
        f"last save    {save}" + (f": {stats['last_save_error']}" if stats.get("last_save_error") else ""),
        f"journal      {_size(stats.get('journal_bytes'))}",
    ]
    calls = stats.get("calls") or {}
    if before is not None and calls:
        rates = {name: _rate(now, before, lambda s, n=name: (s.get("calls") or {}).get(n)) or 0 for name in calls}
        busiest = sorted(rates.items(), key=lambda item: -item[1])[:_SHOWN]
        lines.append("calls/s      " + ", ".join(f"{name} {value:.1f}" for name, value in busiest if value))
    holders = stats.get("lock_holders") or []
    if holders:
        lines += ["", "lock holders (longest held first)"]
        for holder in holders[:_SHOWN]:
            name = "the global lock" if holder["lock"] is None else repr(holder["lock"])
            held = "" if holder.get("held_s") is None else f" for {holder['held_s']:.1f} s"
            waiters = "" if holder.get("waiters") is None else f", {holder['waiters']} waiting"
            lines.append(f"  {name}: pid {_dash(holder.get('pid'))}{held}{waiters}")
    return "\n".join(lines) + "\n"
