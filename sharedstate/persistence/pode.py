"""Reading the state files of Pode's ``Save-PodeState``: the legacy form and version 2.

Legacy: ``{name: {"Value": v, "Scope": [..]}}`` as plain ``ConvertTo-Json`` wrote it; if any entry has
no ``Scope``, every entry is a bare value (what Pode's ``Restore-PodeState`` does too).

Version 2: ``{"__pode_state_metadata__": {"Version": 2, ...}, "__pode_state_data__": ...}`` where the
data follows ``ConvertTo-PodeStateData``: value types and strings as ``{"Type": "Int32", "Value": 5}``,
``DateTime`` in the round-trip ``o`` format, ``TimeSpan`` in ticks, ``Guid`` as text, dictionaries as
``{"Type": "Hashtable", "Items": [{"Key": k, "Value": v}]}``, lists and sets as ``{"Type": "List",
"Items": [...]}``, and arrays as plain JSON arrays.
"""

from __future__ import annotations

import datetime
import decimal
import re
import uuid
from typing import Any

Entries = tuple[dict[str, Any], dict[str, tuple[str, ...]]]

_INTEGER_TYPES = {"Int16", "Int32", "Int64", "UInt16", "UInt32", "UInt64", "Byte", "SByte"}
_FLOAT_TYPES = {"Double", "Single", "Float"}
_DICT_TYPES = {
    "Hashtable",
    "OrderedDictionary",
    "OrderedHashtable",
    "Dictionary",
    "ConcurrentDictionary",
    "PodeConcurrentOrderedDictionary",
    "PSCustomObject",
    "SyncHashtable",  # [hashtable]::Synchronized(...), the type of Pode's own shared state
}
_LIST_TYPES = {"List", "ConcurrentBag", "PodeConcurrentList", "ConcurrentQueue", "ConcurrentStack"}
_SET_TYPES = {"HashSet", "SortedSet", "PodeConcurrentSet"}

_ROUND_TRIP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,7}))?(Z|[+-]\d\d:\d\d)?")
_MS_DATE = re.compile(r"/Date\((-?\d+)([+-]\d{4})?\)/")


class PodeError(ValueError):
    """The file is a Pode state file, but not one that can be read."""


def is_pode_v2(doc: Any) -> bool:
    return isinstance(doc, dict) and "__pode_state_metadata__" in doc


def read_v2(doc: dict[str, Any]) -> Entries:
    meta = doc["__pode_state_metadata__"]
    version = meta.get("Version") if isinstance(meta, dict) else None
    if version != 2:
        raise PodeError(f"unsupported Pode state file version {version!r}")
    state = _convert(doc.get("__pode_state_data__"))
    if state is None:
        return {}, {}
    if not isinstance(state, dict):
        raise PodeError(f"__pode_state_data__ holds {type(state).__name__}, not a dictionary")
    return _entries(state)


def read_legacy(doc: dict[str, Any]) -> Entries:
    state = {name: _legacy(value) for name, value in doc.items()}
    return _entries(state)


def _entries(state: dict[str, Any]) -> Entries:
    """Split Pode's ``{name: {Value, Scope}}`` into values and scopes, as ``Restore-PodeState`` does."""
    wrapped = all(isinstance(e, dict) and e.get("Scope") is not None for e in state.values())
    if not wrapped:
        return dict(state), {}
    data, scopes = {}, {}
    for name, entry in state.items():
        data[name] = entry.get("Value")
        scope = entry["Scope"]
        if isinstance(scope, str):
            scope = [scope]
        if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
            raise PodeError(f"the Scope of {name!r} is not a list of strings")
        if scope:
            scopes[name] = tuple(sorted(set(scope)))
    return data, scopes


def _convert(obj: Any) -> Any:
    """One value of ``ConvertTo-PodeStateData``'s output, back to Python."""
    if isinstance(obj, list):
        return [_convert(item) for item in obj]
    if not isinstance(obj, dict):
        return _plain(obj)
    kind = obj.get("Type")
    if not isinstance(kind, str) or not kind:
        return {key: _convert(value) for key, value in obj.items()}
    value = obj.get("Value")
    try:
        if kind in _INTEGER_TYPES:
            return int(value)
        if kind in _FLOAT_TYPES:
            return float(value)
        if kind == "Decimal":
            return decimal.Decimal(str(value))
        if kind == "Boolean":
            return bool(value)
        if kind in ("String", "Char"):
            return "" if value is None else str(value)
        if kind == "DateTime":
            return parse_datetime(value)
        if kind == "TimeSpan":
            ticks = int(value)
            micro = abs(ticks) // 10
            return datetime.timedelta(microseconds=micro if ticks >= 0 else -micro)
        if kind == "Guid":
            return uuid.UUID(str(value))
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise PodeError(f"bad {kind} value {value!r}: {exc}") from None
    items = obj.get("Items")
    if items is not None and not isinstance(items, list):
        raise PodeError(f"the Items of a {kind} are not a list: {items!r:.100}")
    if kind in _DICT_TYPES:
        result = {}
        for item in items or []:
            if not isinstance(item, dict) or not isinstance(item.get("Key"), str):
                raise PodeError(f"a {kind} item is not a {{Key, Value}} pair: {item!r:.100}")
            result[item["Key"]] = _convert(item.get("Value"))
        return result
    if kind in _LIST_TYPES:
        return [_convert(item) for item in items or []]
    if kind in _SET_TYPES:
        converted = [_convert(item) for item in items or []]
        try:
            return set(converted)
        except TypeError:  # items that cannot be in a Python set (dicts, lists) stay a list
            return converted
    # Like ConvertFrom-PodeStateData: an unknown type gives its Value, else its Items.
    if "Value" in obj and obj["Value"] is not None:
        return _convert(obj["Value"])
    return _convert(items)


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):  # the file is parsed with Decimal for exact Decimals
        return float(value)
    return value


def _legacy(value: Any) -> Any:
    """A value as plain ``ConvertTo-Json`` wrote it: only Windows PowerShell's ``/Date(ms)/`` dates
    are recognised (other strings stay strings)."""
    if isinstance(value, list):
        return [_legacy(item) for item in value]
    if isinstance(value, dict):
        return {key: _legacy(item) for key, item in value.items()}
    if isinstance(value, str):
        match = _MS_DATE.fullmatch(value)
        if match:
            return datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(
                milliseconds=int(match.group(1))
            )
        return value
    return _plain(value)


def parse_datetime(text: Any) -> datetime.datetime:
    """.NET's round-trip ``o`` format (``2024-05-01T10:20:30.1234567Z``, ``...+02:00``, or no zone)."""
    if not isinstance(text, str):
        raise ValueError("expected text")
    match = _ROUND_TRIP.fullmatch(text)
    if not match:
        raise ValueError("not in the round-trip 'o' format")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = (match.group(7) or "").ljust(7, "0")
    micro = int(fraction[:6])  # .NET ticks are 100 ns; Python keeps microseconds
    zone = match.group(8)
    tz = None
    if zone == "Z":
        tz = datetime.timezone.utc
    elif zone:
        sign = 1 if zone[0] == "+" else -1
        tz = datetime.timezone(sign * datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    return datetime.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
