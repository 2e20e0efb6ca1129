"""Typed JSON: plain values stay plain JSON, every other storable type is a small tagged object.

A tagged value is ``{"$type": TAG, "value": ...}`` (datetimes and times with a ``zoneinfo`` zone also
carry ``"zone"`` and ``"fold"``). A user's own dict that has a ``"$type"`` key is itself written tagged,
as ``{"$type": "dict", "value": [[key, value], ...]}``, so it can never be mistaken for a tag.

Decoding is a ``json.loads`` ``object_hook``: it sees every JSON object once, bottom-up, and looks for
one key, so a file of plain values restores at the speed of the C decoder.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
import uuid
import zoneinfo
from collections.abc import Iterator
from typing import Any

MARK = "$type"

#: Values the C encoder writes exactly as they are (floats only when finite: checked separately).
_PLAIN = frozenset({str, int, bool, type(None)})
#: json refuses to write or read integers with more digits than this (Python 3.11+); larger ones are tagged.
_MAX_PLAIN_INT_BITS = 4000 * 3


class DecodeError(ValueError):
    """A JSON object that looks like a tagged value but is not a valid one."""


def encode(value: Any) -> Any:
    """``value`` as JSON-ready data: plain parts unchanged, every other type tagged."""
    kind = type(value)
    if kind in _PLAIN:
        if kind is int and value.bit_length() > _MAX_PLAIN_INT_BITS:
            return {MARK: "int", "value": format(value, "x")}
        return value
    if kind is float:
        return value if math.isfinite(value) else {MARK: "float", "value": repr(value)}
    if kind is list:
        return [encode(item) for item in value]
    if kind is dict:
        encoded = {key: encode(item) for key, item in value.items()}
        if MARK in encoded:
            return {MARK: "dict", "value": [[key, item] for key, item in encoded.items()]}
        return encoded
    if kind is tuple:
        return {MARK: "tuple", "value": [encode(item) for item in value]}
    if kind is set:
        return {MARK: "set", "value": [encode(item) for item in value]}
    if kind is frozenset:
        return {MARK: "frozenset", "value": [encode(item) for item in value]}
    if kind is bytes:
        return {MARK: "bytes", "value": base64.b64encode(value).decode("ascii")}
    if kind is bytearray:
        return {MARK: "bytearray", "value": base64.b64encode(value).decode("ascii")}
    if kind is datetime.datetime or kind is datetime.time:
        tag = "datetime" if kind is datetime.datetime else "time"
        tz = value.tzinfo
        if type(tz) is zoneinfo.ZoneInfo:  # the zone's key, and the wall time in it
            naive = value.replace(tzinfo=None).isoformat()
            return {MARK: tag, "value": naive, "zone": tz.key, "fold": value.fold}
        return {MARK: tag, "value": value.isoformat()}
    if kind is datetime.date:
        return {MARK: "date", "value": value.isoformat()}
    if kind is datetime.timedelta:
        return {MARK: "timedelta", "value": [value.days, value.seconds, value.microseconds]}
    if kind is uuid.UUID:
        return {MARK: "uuid", "value": str(value)}
    if kind is decimal.Decimal:
        return {MARK: "decimal", "value": str(value)}
    raise TypeError(f"{kind.__name__} is not a storable type")


def _zoned(naive: Any, obj: dict[str, Any]) -> Any:
    zone = obj.get("zone")
    if zone is None:
        return naive
    if not isinstance(zone, str) or obj.get("fold", 0) not in (0, 1):
        raise DecodeError(f"bad zone in {obj!r}")
    return naive.replace(tzinfo=zoneinfo.ZoneInfo(zone), fold=obj.get("fold", 0))


def _items(value: Any) -> list[Any]:
    if type(value) is not list:
        raise DecodeError(f"expected a list, found {type(value).__name__}")
    return value


def _decode_dict(value: Any) -> dict[str, Any]:
    result = {}
    for pair in _items(value):
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
            raise DecodeError(f"expected a [key, value] pair, found {pair!r}")
        result[pair[0]] = pair[1]
    return result


def _b64(value: Any) -> bytes:
    if type(value) is not str:
        raise DecodeError("expected base64 text")
    return base64.b64decode(value.encode("ascii"), validate=True)


def _float(value: Any) -> float:
    if value not in ("nan", "inf", "-inf"):
        raise DecodeError(f"bad float {value!r}")
    return float(value)


_DECODERS = {
    "tuple": lambda v, o: tuple(_items(v)),
    "set": lambda v, o: set(_items(v)),
    "frozenset": lambda v, o: frozenset(_items(v)),
    "dict": lambda v, o: _decode_dict(v),
    "bytes": lambda v, o: _b64(v),
    "bytearray": lambda v, o: bytearray(_b64(v)),
    "datetime": lambda v, o: _zoned(datetime.datetime.fromisoformat(v), o),
    "date": lambda v, o: datetime.date.fromisoformat(v),
    "time": lambda v, o: _zoned(datetime.time.fromisoformat(v), o),
    "timedelta": lambda v, o: datetime.timedelta(*_items(v)),
    "uuid": lambda v, o: uuid.UUID(v),
    "decimal": lambda v, o: decimal.Decimal(v),
    "float": lambda v, o: _float(v),
    "int": lambda v, o: int(v, 16),
}


def object_hook(obj: dict[str, Any]) -> Any:
    """``json.loads`` hook: turn tagged objects back into their types; raises ``DecodeError``."""
    if MARK not in obj:
        return obj
    tag = obj[MARK]
    decoder = _DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None or "value" not in obj or not set(obj) <= {MARK, "value", "zone", "fold"}:
        raise DecodeError(f"unknown tagged value {obj!r:.200}")
    try:
        return decoder(obj["value"], obj)
    except DecodeError:
        raise
    except (TypeError, ValueError, AttributeError, ArithmeticError, KeyError, zoneinfo.ZoneInfoNotFoundError) as exc:
        raise DecodeError(f"bad {tag} value {obj['value']!r:.200}: {exc}") from None


#: Names per ``json.dumps`` call. The C encoder holds the GIL for a whole call, so a save of a large
#: state is cut into pieces that each take a few milliseconds, and clients are served in between.
CHUNK = 5000


def iter_json_object(data: dict[str, Any]) -> Iterator[str]:
    """The JSON text of ``data`` (a dict of names to storable values), one name per line, in pieces.

    Runs of plain scalar values go to the C encoder in one call per ``CHUNK`` names, untouched; other
    values are encoded one by one. No piece holds the GIL for long.
    """
    escaped = MARK in data
    yield '{"$type": "dict", "value": [\n' if escaped else "{\n"
    first = True
    run: dict[str, Any] = {}
    for name, value in data.items():
        kind = type(value)
        if kind in _PLAIN or (kind is float and math.isfinite(value)):
            run[name] = value
            if len(run) < CHUNK:
                continue
            text = _dumps_run(run, escaped)
            run = {}
        else:
            if run:
                text = _dumps_run(run, escaped)
                run = {}
                yield text if first else ",\n" + text
                first = False
            text = _dumps_one(name, encode(value), escaped)
        yield text if first else ",\n" + text
        first = False
    if run:
        text = _dumps_run(run, escaped)
        yield text if first else ",\n" + text
    yield "\n]}" if escaped else "\n}"


def _dumps_run(run: dict[str, Any], escaped: bool) -> str:
    """Scalars only, so the item separator falls between names: one name a line."""
    try:
        if escaped:  # rare (a name is "$type"): one [name, value] pair a line
            return ",\n".join(json.dumps([k, v], ensure_ascii=False, allow_nan=False) for k, v in run.items())
        return json.dumps(run, ensure_ascii=False, separators=(",\n", ": "), allow_nan=False)[1:-1]
    except ValueError:  # an integer too large for json: encode() tags it
        return ",\n".join(_dumps_one(name, encode(value), escaped) for name, value in run.items())


def _dumps_one(name: str, encoded: Any, escaped: bool) -> str:
    if escaped:
        return json.dumps([name, encoded], ensure_ascii=False, allow_nan=False)
    return json.dumps(name, ensure_ascii=False) + ": " + json.dumps(encoded, ensure_ascii=False, allow_nan=False)
