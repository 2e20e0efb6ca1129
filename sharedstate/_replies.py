"""What the calls of ``State`` and ``AsyncState`` return (or raise) for their backend's answers."""

from __future__ import annotations

from typing import Any

from sharedstate._errors import SharedStateError
from sharedstate._sentinels import DROPPED, MISSING, NO_DEFAULT


def removed(value: Any) -> Any:
    """What ``remove`` returns for the backend's answer."""
    # DROPPED: removed before a crash, and answered again after it without the value (``pop`` says so).
    return None if value is MISSING or value is DROPPED else value


def popped(name: str, value: Any, default: Any) -> Any:
    """What ``pop(name, default)`` returns (or raises) for the backend's answer."""
    if value is MISSING:
        if default is NO_DEFAULT:
            raise KeyError(name)
        return default
    if value is DROPPED:
        raise _dropped(f"pop({name!r})")
    return value


def popped_item(item: Any) -> tuple[str, Any]:
    """What ``popitem()`` returns (or raises) for the backend's answer."""
    if item is None:
        raise KeyError("popitem(): the state is empty")
    if item is DROPPED:
        raise _dropped("popitem()")
    return item


def sorted_view(data: dict[str, Any]) -> dict[str, Any]:
    return {name: data[name] for name in sorted(data)}


def _dropped(call: str) -> SharedStateError:
    return SharedStateError(
        f"{call} was applied by the server before it crashed, and sent again to the restarted server; a save "
        "in between did not keep the removed value (removed values never reach a snapshot), so it is lost"
    )
