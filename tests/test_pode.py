"""Pode's state files (Save-PodeState: legacy and version 2, UTF-8, UTF-8 with BOM, UTF-16) restore."""

from __future__ import annotations

import datetime
import decimal
import uuid
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "pode"
UTC = datetime.timezone.utc


@pytest.mark.parametrize("name", ["v2-utf8.json", "v2-utf8-bom.json", "v2-utf16.json"])
def test_a_version_2_file_restores_values_types_and_scopes(state, name):
    assert state.restore(FIXTURES / name) == 17
    expected = {
        "Int": 5,
        "Long": 9007199254740993,
        "Double": 1.5,
        "Decimal": decimal.Decimal("1.10"),
        "Bool": True,
        "String": "héllo wörld ✓",
        "UtcDate": datetime.datetime(2024, 5, 1, 10, 20, 30, 123456, tzinfo=UTC),
        "OffsetDate": datetime.datetime(2024, 5, 1, 10, 20, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        "LocalDate": datetime.datetime(2024, 5, 1, 10, 20, 30, 500000),
        "Span": datetime.timedelta(hours=1, microseconds=1234),
        "Guid": uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e"),
        "Null": None,
        "Hash": {"name": "Rick", "age": 70, "tags": ["a", "b"], "inner": {"x": 0.25}},
        "Array": [1, "two", False],
        "EmptyArray": [],
        "List": [3, 4],
        "HashSet": {"x", "y"},
    }
    got = state.snapshot()
    assert got == expected
    for key, value in expected.items():
        assert type(got[key]) is type(value), key
    assert str(got["Decimal"]) == "1.10"
    assert got["UtcDate"].tzinfo == UTC and got["LocalDate"].tzinfo is None
    assert state.names(scope="web") == ["Decimal", "Int"]
    assert state.names(scope="money") == ["Decimal"]
    assert state.names(scope="users") == ["Hash"]


@pytest.mark.parametrize("name", ["legacy-scoped.json", "legacy-scoped-utf16.json"])
def test_a_legacy_file_with_scopes_restores(state, name):
    assert state.restore(FIXTURES / name) == 5
    assert state.snapshot() == {
        "counter": 42,
        "name": "Rick Sanchez",
        "config": {"theme": "dark", "sizes": [1, 2.5]},
        "started": datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        "nothing": None,
    }
    assert type(state.get("config")["sizes"][1]) is float
    assert state.names(scope="web") == ["config", "counter"]
    assert state.names(scope="admin") == ["config"]


def test_a_legacy_file_without_scopes_reads_every_entry_as_a_value(state):
    assert state.restore(FIXTURES / "legacy-bare.json") == 3
    assert state.snapshot() == {"counter": 42, "list": [1, 2, 3], "mixed": {"Value": 1, "Scope": ["web"]}}
    assert state.names(scope="web") == []


def test_a_pode_file_merges(state):
    state.set("mine", 1)
    state.restore(FIXTURES / "legacy-scoped.json", merge=True)
    assert state.get("mine") == 1 and state.get("counter") == 42


def test_a_server_starts_on_a_pode_file_and_saves_it_in_its_own_format(tmp_path):
    import json

    import sharedstate

    path = tmp_path / "state.json"
    path.write_bytes((FIXTURES / "v2-utf16.json").read_bytes())
    with sharedstate.StateServer(path=path) as server:
        assert server.state.get("Guid") == uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")
    assert json.loads(path.read_text())["format"] == "sharedstate"
    assert Path(str(path) + ".bak").read_bytes() == (FIXTURES / "v2-utf16.json").read_bytes()
