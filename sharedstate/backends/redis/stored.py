"""How the Redis backend writes what it sends and reads what Redis answers: values (the snapshot codec's
typed JSON), times to live, and Redis' clock."""

from __future__ import annotations

import json
from typing import Any

from sharedstate.persistence.codec import encode, object_hook


def dumps(value: Any) -> str:
    """A value as it is stored in Redis: the snapshot codec's typed JSON, compact."""
    return json.dumps(encode(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


#: One decoder for every read (``json.loads`` with a hook makes a new one for each call).
_decode = json.JSONDecoder(object_hook=object_hook).decode


def loads(raw: bytes | str) -> Any:
    """A value as ``dumps`` stored it: UTF-8 bytes as redis-py answers them, or text (``decode_responses``).
    Anything else (another encoding, not JSON: written by another client) is a ``ValueError``."""
    return _decode(raw.decode("utf-8") if type(raw) is bytes else raw)


def ttl_arg(ttl: float | None) -> str:
    """A ``ttl`` as the scripts take it: ``''`` for none."""
    return "" if ttl is None else repr(ttl)


def seconds(clock: tuple[Any, Any]) -> float:
    """Redis' ``TIME`` reply as UTC seconds."""
    return int(clock[0]) + int(clock[1]) / 1e6
