"""When to save: a fixed interval (seconds or a ``timedelta``) or a cron expression (via croniter)."""

from __future__ import annotations

import datetime
import math

from croniter import croniter

SaveEvery = int | float | datetime.timedelta | str | None


class Schedule:
    """The times of scheduled saves. Each next time is computed from the schedule, not from when the
    previous save ended, so saves do not drift."""

    def __init__(self, spec: SaveEvery) -> None:
        self.spec = spec
        self._interval: float | None = None
        self._cron: str | None = None
        if isinstance(spec, bool) or not isinstance(spec, (int, float, datetime.timedelta, str)):
            raise TypeError(
                "save_every must be seconds (int or float), a datetime.timedelta, a cron expression "
                f"or None, not {type(spec).__name__}"
            )
        if isinstance(spec, str):
            expression = spec.strip()
            if not croniter.is_valid(expression):
                raise ValueError(
                    f"save_every {spec!r} is not a cron expression (for example '@hourly' or '*/5 * * * *')"
                )
            self._cron = expression
            return
        seconds = spec.total_seconds() if isinstance(spec, datetime.timedelta) else float(spec)
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"save_every must be a positive interval, not {spec!r}")
        self._interval = seconds

    def next_after(self, origin: float, now: float) -> float:
        """The first scheduled time (a ``time.time()`` value) after ``now``; intervals count from
        ``origin`` (when the server started)."""
        if self._interval is not None:
            steps = math.floor((now - origin) / self._interval) + 1
            return origin + steps * self._interval
        assert self._cron is not None
        base = datetime.datetime.fromtimestamp(now).astimezone()  # cron times are local times
        return croniter(self._cron, base).get_next(datetime.datetime).timestamp()

    def __repr__(self) -> str:
        return f"Schedule({self.spec!r})"


def parse_schedule(spec: SaveEvery) -> Schedule | None:
    """A ``Schedule``, or ``None`` for no scheduled saves. Raises ``TypeError``/``ValueError`` for an
    invalid one."""
    return None if spec is None else Schedule(spec)
