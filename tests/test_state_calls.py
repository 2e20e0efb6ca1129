"""What the calls of State do on the local server only (the calls themselves: tests/contract/test_calls.py),
and that every public call is documented."""

from __future__ import annotations

import sharedstate


def test_stats_count_each_call_the_local_server_serves(server):
    """The keys every backend reports: tests/contract/test_calls.py; here the local server's own count."""
    state = server.state
    state.update({"a": 1, "b": 2})
    stats = state.stats()
    assert stats["pid"] == server.pid
    ops = stats["ops"]
    state.get("a")
    assert state.stats()["ops"] == ops + 2  # the get and the stats call


def test_every_public_call_is_documented():
    for obj in (sharedstate.State, sharedstate.Lock, sharedstate.StateServer):
        for name in dir(obj):
            if name.startswith("_"):
                continue
            assert getattr(obj, name).__doc__, f"{obj.__name__}.{name} has no docstring"
    for name in sharedstate.__all__:
        if name != "__version__":
            assert getattr(sharedstate, name).__doc__, name
