"""save_every: seconds, timedelta or cron; invalid ones refused at construction; no drift."""

from __future__ import annotations

import datetime

import pytest

import sharedstate
from sharedstate.persistence.schedule import parse_schedule


@pytest.mark.parametrize("spec", [1, 0.5, datetime.timedelta(minutes=5), "@hourly", "@daily", "*/5 * * * *", None])
def test_valid_schedules_are_accepted(spec, tmp_path):
    sharedstate.StateServer(path=tmp_path / "s.json", save_every=spec)


@pytest.mark.parametrize(
    "spec", ["every tuesday-ish", "", "* * *", "61 * * * *", 0, -1, float("nan"), datetime.timedelta(0)]
)
def test_invalid_schedules_raise_value_error_at_construction(spec, tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        sharedstate.StateServer(path=tmp_path / "s.json", save_every=spec)


@pytest.mark.parametrize("spec", [True, [1], b"@hourly"])
def test_schedules_of_the_wrong_type_raise_type_error(spec, tmp_path):
    with pytest.raises(TypeError, match="save_every"):
        sharedstate.StateServer(path=tmp_path / "s.json", save_every=spec)


def test_intervals_count_from_the_start_so_saves_do_not_drift():
    schedule = parse_schedule(10)
    origin = 1000.0
    assert schedule.next_after(origin, 1000.0) == 1010.0
    # a save that ended late (at 1013.7) does not push the next one to 1023.7
    assert schedule.next_after(origin, 1013.7) == 1020.0
    assert schedule.next_after(origin, 1020.0) == 1030.0
    assert parse_schedule(datetime.timedelta(seconds=2.5)).next_after(0.0, 6.0) == 7.5


def test_cron_times_fall_on_the_expression():
    now = datetime.datetime(2026, 11, 23, 10, 17, 42).timestamp()
    hourly = datetime.datetime.fromtimestamp(parse_schedule("@hourly").next_after(0, now))
    assert (hourly.hour, hourly.minute, hourly.second) == (11, 0, 0)
    five = datetime.datetime.fromtimestamp(parse_schedule("*/5 * * * *").next_after(0, now))
    assert (five.hour, five.minute, five.second) == (10, 20, 0)
