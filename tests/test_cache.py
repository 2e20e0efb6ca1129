"""The local server's coherent client cache: unchanged values cost no round trip, its version table, its
bounds, and no stale read across a crash or a restart. (No stale read on every backend and face:
tests/contract/test_cache.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, kill, reap, run_to_completion, wait_until
from workers import read_monotonic, write_sequence

import sharedstate
from sharedstate._sentinels import NOT_CACHED
from sharedstate.wire import cache as _cache
from sharedstate.wire.versions import EPOCH, TOKEN, block_name, retire, slot_of

SHM = Path("/dev/shm")


def ops(state: sharedstate.State) -> int:
    """The server's count of served calls (the ``stats()`` call itself counts one)."""
    return state.stats()["ops"]


def shm_entry(name: str) -> Path:
    return SHM / name.lstrip("/")


def block_words(name: str, count: int = 2) -> list[int]:
    """The first words of a version table, read from its file."""
    data = shm_entry(name).read_bytes()[: 8 * count]
    return [int.from_bytes(data[i : i + 8], sys.byteorder) for i in range(0, len(data), 8)]


def test_an_unchanged_value_is_read_with_no_round_trip(server):
    writer = sharedstate.connect(server.address, server.authkey, cache=False)
    reader = sharedstate.connect(server.address, server.authkey)
    writer.set("config", {"mode": "fast", "limits": [1, 2, 3]})
    assert reader.get("config") == {"mode": "fast", "limits": [1, 2, 3]}  # fetched once
    before = ops(reader)
    for _ in range(500):
        assert reader.get("config") == {"mode": "fast", "limits": [1, 2, 3]}
        assert reader["config"]["mode"] == "fast"
        assert reader.contains("config") and "config" in reader
        assert reader.get_many(["config"]) == {"config": {"mode": "fast", "limits": [1, 2, 3]}}
    assert ops(reader) - before == 1  # only the stats() call reached the server


def test_missing_names_are_cached_too_and_a_set_elsewhere_is_seen(server):
    writer = sharedstate.connect(server.address, server.authkey, cache=False)
    reader = sharedstate.connect(server.address, server.authkey)
    assert reader.get("later", "default") == "default"
    with pytest.raises(KeyError):
        reader["later"]
    assert not reader.contains("later")
    before = ops(reader)
    assert reader.get("later") is None
    assert ops(reader) - before == 1
    writer.set("later", 1)
    assert reader.get("later") == 1
    assert reader["later"] == 1 and "later" in reader


def test_cache_false_sends_every_read(server):
    server.state.set("x", 1)
    reader = sharedstate.connect(server.address, server.authkey, cache=False)
    before = ops(reader)
    for _ in range(10):
        assert reader.get("x") == 1
    assert ops(reader) - before == 11
    assert reader.backend._cache is None


def test_names_sharing_a_counter_stay_right(state):
    base = slot_of("k0")
    twin = next(f"k{i}" for i in range(1, 10**6) if slot_of(f"k{i}") == base)
    state.set("k0", "first")
    state.set(twin, "second")
    assert (state.get("k0"), state.get(twin)) == ("first", "second")
    state.set(twin, "changed")  # bumps the counter k0 shares
    assert state.backend.peek("k0") is NOT_CACHED  # a miss, never a wrong value
    assert (state.get("k0"), state.get(twin)) == ("first", "changed")


def test_get_many_answers_from_the_cache_only_when_every_name_is_there(server):
    other = sharedstate.connect(server.address, server.authkey, cache=False)
    state = server.state
    other.update({"a": 1, "b": 2})
    assert state.get_many(["a", "b", "zz"]) == {"a": 1, "b": 2}
    before = ops(state)
    assert state.get_many(["a", "b", "zz"]) == {"a": 1, "b": 2}
    assert ops(state) - before == 1
    other.set("b", 3)
    assert state.get_many(["a", "b", "zz"]) == {"a": 1, "b": 3}
    assert state.get_many(["a", "new"]) == {"a": 1}


def test_memory_per_handle_is_bounded(state, monkeypatch):
    monkeypatch.setattr(_cache, "MAX_ENTRIES", 50)
    monkeypatch.setattr(_cache, "MAX_BYTES", 20_000)
    monkeypatch.setattr(_cache, "MAX_VALUE_BYTES", 5_000)
    state.update({f"n{i}": i for i in range(200)})
    for i in range(200):
        assert state.get(f"n{i}") == i
    cache = state.backend._cache
    assert len(cache) == 50
    # The least recently used went first.
    assert state.backend.peek("n199") == 199 and state.backend.peek("n0") is NOT_CACHED
    state.set("big", "x" * 6_000)
    assert state.get("big") == "x" * 6_000
    assert state.backend.peek("big") is NOT_CACHED  # too large to keep
    state.update({f"s{i}": "y" * 1_000 for i in range(40)})
    for i in range(40):
        state.get(f"s{i}")
    assert cache.size_bytes <= 20_000 and len(cache) <= 50
    assert state.backend.peek("s39") == "y" * 1_000


def test_handles_of_one_process_share_one_cache(server):
    first = sharedstate.connect(server.address, server.authkey)
    second = sharedstate.connect(server.address, server.authkey)
    first.set("shared", {"a": 1})
    assert first.backend._cache is second.backend._cache
    before = ops(second)
    assert second.get("shared") == {"a": 1}  # kept by the first handle's set
    assert ops(second) - before == 1


def test_the_block_is_private_and_removed_at_shutdown():
    server = sharedstate.StateServer().start()
    try:
        name = server._supervisor.versions["name"]
        entry = shm_entry(name)
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600
        assert block_words(name)[TOKEN] == server._supervisor.versions["token"]
        server.state.set("x", 1)
        assert server.state.get("x") == 1
    finally:
        server.shutdown()
    assert not entry.exists()


def test_a_handle_pickled_into_a_child_caches_there(state, mp_context):
    state.set("x", [1])
    result = mp_context.Queue()
    proc = mp_context.Process(target=_read_twice_and_report, args=(state, result))
    run_to_completion([proc], timeout=60)
    assert result.get(timeout=10) == ([1], [1], True)


def _read_twice_and_report(state, result) -> None:
    first = state.get("x")
    second = state.get("x")
    result.put((first, second, state.backend.peek("x") is not NOT_CACHED))


def test_the_asyncio_client_answers_hits_without_a_round_trip(server):
    async def main() -> tuple[int, object]:
        astate = await sharedstate.aio.connect(server.address, server.authkey)
        try:
            await astate.set("x", {"k": [1]})
            assert await astate.get("x") == {"k": [1]}
            before = await astate.stats()
            for _ in range(100):
                value = await astate.get("x")
                value["k"].append(2)
            after = await astate.stats()
            return after["ops"] - before["ops"], await astate.get("x")
        finally:
            await astate.close()

    delta, value = asyncio.run(main())
    assert delta == 1 and value == {"k": [1]}


@pytest.mark.timeout(240)
def test_reads_are_never_older_than_a_returned_write(state, mp_context):
    """Writers publish each sequence number after its set returns; readers in other processes must
    never read less than a number published before their read began, nor go back."""
    writers, readers, count = 2, 3, 300
    names = [f"seq{i}" for i in range(writers)]
    returned = mp_context.RawArray("q", writers + 1)  # each writer's last returned number, then slow's
    hits = mp_context.RawArray("q", readers)
    start = mp_context.Barrier(writers + readers)  # everyone starts together, however slow its start method
    procs = [
        mp_context.Process(target=write_sequence, args=(state, names[i], count, returned, i, start), name=f"writer{i}")
        for i in range(writers)
    ] + [
        mp_context.Process(
            target=read_monotonic, args=(state, names, count, returned, start, hits, i), name=f"reader{i}"
        )
        for i in range(readers)
    ]
    run_to_completion(procs, timeout=180)
    assert list(returned) == [count] * writers + [count]
    assert sum(hits) > 0, "no read was answered by the cache"
    assert state.get("slow") == count


def _get_or_error(state: sharedstate.State, name: str) -> object:
    try:
        return state.get(name)
    except (sharedstate.ServerUnavailable, sharedstate.AccessDenied) as exc:
        return exc


def test_after_a_crash_and_restart_no_stale_value_is_served(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as server:
        reader = sharedstate.connect(server.address, server.authkey)
        writer = sharedstate.connect(server.address, server.authkey, cache=False)
        writer.set("x", 1)
        assert reader.get("x") == 1 and reader.backend.peek("x") == 1
        old = dict(server._supervisor.versions)
        old_pid = server.pid
        kill(old_pid)
        wait_until(lambda: server.pid != old_pid, 15, what="the restart")
        wait_until(lambda: not isinstance(_get_or_error(writer, "x"), Exception), 15, what="the new server")
        writer.set("x", 2)
        # The old block was retired before the new server started: the cached 1 is never served again.
        seen = [_get_or_error(reader, "x") for _ in range(3)]
        assert 1 not in seen, seen
        assert seen[-1] == 2
        new = server._supervisor.versions
        assert new["token"] != old["token"] and new["name"] == old["name"]
        # The name holds one block, and it is the new server's: the dead server's block is gone.
        assert block_words(new["name"])[TOKEN] == new["token"]


def test_a_crashed_server_that_stays_down_leaves_no_block_and_no_cached_reads(tmp_path):
    server = sharedstate.StateServer(restart=False).start()
    try:
        reader = server.state
        reader.set("x", 1)
        assert reader.get("x") == 1 and reader.backend.peek("x") == 1
        name = server._supervisor.versions["name"]
        kill(server.pid)
        wait_until(lambda: not shm_entry(name).exists(), 10, what="the owner to remove the block")
        assert reader.backend.peek("x") is NOT_CACHED
        with pytest.raises(sharedstate.ServerUnavailable):
            reader.get("x")
    finally:
        server.shutdown()


def _serve(path: Path, address: str | None = None) -> tuple[subprocess.Popen, str]:
    """``sharedstate serve`` in the background (at ``address``, or where it chooses); returns the process
    and the address it serves at."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    where = [] if address is None else ["--address", address]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedstate", "serve", "--path", str(path), *where],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("sharedstate: serving at"), line
    return proc, line.split()[3]


def test_the_next_server_at_an_address_retires_the_block_of_a_killed_one(tmp_path):
    """A standalone server has no owner to clean up after a SIGKILL: the next start at its address
    retires the block it left, so old handles stop trusting their cached values."""
    address = str(tmp_path / "s.sock")
    name = block_name(address)
    first, _ = _serve(tmp_path / "one.json", address)
    second = None
    try:
        reader = sharedstate.connect(address)
        reader.set("x", "from the first server")
        assert reader.get("x") == "from the first server"
        epoch = block_words(name)[EPOCH]
        kill(first.pid, signal.SIGKILL)
        reap(first)
        assert shm_entry(name).exists()  # nobody was there to remove it
        assert reader.backend.peek("x") == "from the first server"
        second, _ = _serve(tmp_path / "two.json", address)
        words = block_words(name)
        assert words[TOKEN] != 0 and words[EPOCH] != epoch  # a new block under the same name
        assert reader.backend.peek("x") is NOT_CACHED
        assert isinstance(_get_or_error(reader, "x"), Exception)  # the dead connection
        fresh = sharedstate.connect(address)
        assert fresh.get("x") is None  # the second server has its own, empty state
    finally:
        for proc in (first, second):
            if proc is not None:
                kill(proc.pid, signal.SIGTERM)
                reap(proc)
                proc.stdout.close()
    wait_until(lambda: not shm_entry(name).exists(), 10, what="the block's removal")


def test_a_value_a_handle_set_is_read_back_with_no_round_trip_until_changed(server):
    state = server.state
    other = sharedstate.connect(server.address, server.authkey, cache=False)
    value = {"rows": [1, 2]}
    state.set("mine", value)
    value["rows"].append(3)  # changing the object after set changes neither the server nor the cache
    before = ops(state)
    assert state.get("mine") == {"rows": [1, 2]}
    assert ops(state) - before == 1
    other.set("mine", "theirs")
    assert state.get("mine") == "theirs"


def test_a_block_whose_server_is_gone_is_removed_by_any_later_server(tmp_path):
    """A server killed with no owner, at an address nobody uses again: the next server anywhere removes
    its block."""
    proc, address = _serve(tmp_path / "one.json")
    try:
        name = block_name(address)
        assert shm_entry(name).exists()
        kill(proc.pid, signal.SIGKILL)
        reap(proc)
        assert shm_entry(name).exists()
    finally:
        kill(proc.pid)
        reap(proc)
        proc.stdout.close()
    with sharedstate.StateServer() as other:
        other.state.set("x", 1)
        assert not shm_entry(name).exists()


def test_the_same_socket_spelled_another_way_is_the_same_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert block_name("s.sock") == block_name(str(tmp_path / "s.sock"))
    (tmp_path / "link").symlink_to(tmp_path)
    assert block_name(str(tmp_path / "link" / "s.sock")) == block_name("s.sock")
    assert block_name(("127.0.0.1", 5000)) == block_name(("0.0.0.0", 5000)) != block_name(("127.0.0.1", 5001))


def test_a_second_server_never_takes_a_live_servers_block(tmp_path, monkeypatch):
    """Two live servers whose addresses give one name (two spellings of one TCP port cannot both
    listen, so forced here): the second makes a block of its own and leaves the first's alone."""
    first = sharedstate.StateServer().start()
    try:
        name = first._supervisor.versions["name"]
        monkeypatch.setattr("sharedstate.wire.versions.block_name", lambda address: name)
        table = __import__("sharedstate.wire.versions", fromlist=["VersionTable"]).VersionTable(
            str(tmp_path / "x.sock")
        )
        try:
            assert table.name != name
            assert block_words(name)[TOKEN] == first._supervisor.versions["token"]
            first.state.set("x", 1)
            assert first.state.get("x") == 1 and first.state.backend.peek("x") == 1
        finally:
            table.close()
        assert block_words(name)[TOKEN] == first._supervisor.versions["token"]  # its close removed only its own
    finally:
        first.shutdown()


@pytest.mark.timeout(180)
def test_reads_while_a_server_stops_are_never_trusted_by_the_next_one(tmp_path):
    """Values fetched while a server stops (after it retired its table) must not be served once a new
    server holds other values at the same address."""
    address = str(tmp_path / "s.sock")
    key = b"k" * 32
    for round_ in range(5):
        server = sharedstate.StateServer(address=address, authkey=key).start()
        stop = threading.Event()
        readers = [sharedstate.connect(address, key) for _ in range(3)]
        writer = sharedstate.connect(address, key, cache=False)
        writer.set("cfg", f"old{round_}")

        def read(state: sharedstate.State, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    state.get("cfg")
                except sharedstate.SharedStateError:
                    pass

        threads = [threading.Thread(target=read, args=(r,)) for r in readers]
        for t in threads:
            t.start()
        try:
            server.shutdown()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        with sharedstate.StateServer(address=address, authkey=key) as second:
            sharedstate.connect(address, key, cache=False).set("cfg", f"new{round_}")
            for reader in readers:
                values = [_get_or_error(reader, "cfg") for _ in range(3)]
                assert f"old{round_}" not in values, values
                assert values[-1] == f"new{round_}"
            assert second.state.get("cfg") == f"new{round_}"


def test_values_fetched_after_the_table_is_retired_are_never_served(server):
    """A stopping server retires its table, then may still answer calls on open connections: what a
    client fetches then must not be served from its cache later."""
    state = server.state
    state.set("x", 1)
    retire(server._supervisor.versions["name"], server._supervisor.versions["token"])
    assert state.get("x") == 1
    assert state.backend.peek("x") is NOT_CACHED
    assert state.get_many(["x"]) == {"x": 1} and state.backend._cache.lookup_many(["x"]) is None
