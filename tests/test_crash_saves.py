"""A crash at any moment of a save leaves a snapshot that restores (SIGKILL at random moments)."""

from __future__ import annotations

import random
import threading

import pytest
from conftest import kill

import sharedstate
from sharedstate.persistence.snapshot import backup_path, read_snapshot

NAMES = 50_000


def save_in_a_loop(address: str, authkey: bytes, stop: threading.Event) -> None:
    handle = sharedstate.connect(address, authkey)
    while not stop.is_set():
        try:
            handle.save()
        except sharedstate.ServerUnavailable:
            return


@pytest.mark.slow
def test_sigkill_during_saves_always_leaves_a_file_that_restores(tmp_path):
    path = tmp_path / "state.json"
    rng = random.Random(1234)
    with sharedstate.StateServer(path=path, restart=False) as seed:
        seed.state.update({f"name-{i}": {"i": i, "b": b"\x00" * (i % 7)} for i in range(NAMES)})
    kills = 0
    for round_number in range(10):
        server = sharedstate.StateServer(path=path, save_every=None, restart=False).start()
        try:
            state = server.state
            assert len(state) in (NAMES, NAMES + 1)  # restored from whatever the last round left
            state.set("round", round_number)
            assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "stray files not cleaned"
            stop = threading.Event()
            saver = threading.Thread(target=save_in_a_loop, args=(server.address, server.authkey, stop))
            saver.start()
            threading.Event().wait(rng.uniform(0.05, 0.8))  # a random moment in some save
            kill(server.pid)
            kills += 1
            stop.set()
            saver.join(30)
            assert not saver.is_alive()
        finally:
            server.shutdown()
        snapshot = read_snapshot(path)
        assert snapshot is not None, "no snapshot left"
        data = snapshot.data
        assert len(data) in (NAMES, NAMES + 1)
        assert data["name-8"] == {"i": 8, "b": b"\x00"}
        if backup_path(path).exists():
            assert read_snapshot(backup_path(path)) is not None
    assert kills == 10
