"""Every storable type, one value each, and ``same()``: equal and of the same type all the way down.
Shared by the contract suite and the snapshot, storage and property tests."""

from __future__ import annotations

import datetime
import decimal
import uuid
import zoneinfo

UTC = datetime.timezone.utc

VALUES = {
    "none": None,
    "true": True,
    "int": 12,
    "bigint": 2**100,
    "float": 1.5,
    "nan_free_inf": float("inf"),
    "str": "héllo ✓",
    "bytes": b"\x00\xff",
    "bytearray": bytearray(b"ab"),
    "list": [1, "a", None],
    "tuple": (1, (2, 3)),
    "dict": {"a": {"b": [1, 2]}},
    "set": {1, "a", (1, 2)},
    "frozenset": frozenset({1, frozenset({2})}),
    "datetime": datetime.datetime(2026, 11, 23, 12, 30, 1, 5),
    "datetime_tz": datetime.datetime(2026, 11, 23, 12, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    "datetime_zone": datetime.datetime(2026, 11, 23, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
    "date": datetime.date(2026, 1, 2),
    "time": datetime.time(23, 59, 59, 999999),
    "time_tz": datetime.time(1, 2, tzinfo=UTC),
    "timedelta": datetime.timedelta(days=-1, microseconds=3),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": decimal.Decimal("3.14159265358979323846264338327950288"),
    "nested": {"when": [datetime.date(2020, 1, 1), (b"x", {decimal.Decimal(1)})]},
}


def same(a, b) -> bool:
    """Equal and of the same type, all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def fill_every_type(state) -> dict:
    """Store ``VALUES`` and two names with scopes in ``state``; return its snapshot."""
    state.update(VALUES)
    state.set("scoped", {"a": [1, (2, 3)]}, scope=["web", "admin"])
    state.set("tagged-key", {"$type": "not a tag", "n": 1}, scope="web")
    return state.snapshot()


def assert_holds(state, expected: dict) -> None:
    """``state`` holds ``expected`` (what ``fill_every_type`` answered): the same names, each value equal
    and of the same types, and the scopes."""
    back = state.snapshot()
    assert back.keys() == expected.keys()
    assert all(same(back[k], v) for k, v in expected.items()), [k for k in expected if not same(back[k], expected[k])]
    assert state.names(scope="web") == ["scoped", "tagged-key"]
    assert state.names(scope="admin") == ["scoped"]
