"""Edges: shutdown races, addresses that are not sockets, errors inside a lock, bursts of
connections, filtered saves, malformed files, terminal signals, IPv6."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
import workers
from conftest import exited, kill, reap, wait_until

import sharedstate
from sharedstate.persistence.snapshot import read_snapshot
from sharedstate.wire.handshake import open_control


def test_no_call_is_acknowledged_and_then_lost_while_the_server_stops(tmp_path):
    """Every call that returned normally during a shutdown is in the final snapshot (over TCP, where a
    stray manager reply would otherwise be read as the answer to the next call)."""
    path = tmp_path / "state.json"
    server = sharedstate.StateServer(path=path, address=("127.0.0.1", 0), restart=False).start()
    pid = server.pid
    try:
        handles = [sharedstate.connect(server.address, server.authkey) for _ in range(4)]
        for h in handles:
            h.get("warm")
        acknowledged = []
        stop = threading.Event()

        def hammer(h, i):
            n = 0
            while not stop.is_set():
                try:
                    if h.incr(f"n{i}") is None:
                        raise AssertionError("a call returned a stray reply")
                    n += 1
                except sharedstate.ServerUnavailable:
                    break
            acknowledged.append((i, n))

        threads = [threading.Thread(target=hammer, args=(h, i)) for i, h in enumerate(handles)]
        for t in threads:
            t.start()
        open_control(("127.0.0.1", int(server.address.rsplit(":", 1)[1])), server.authkey, "shutdown")
        wait_until(lambda: exited(pid), 15, what="the server to stop")
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        stop.set()
        server.shutdown()
    saved = read_snapshot(path).data
    for i, n in acknowledged:
        assert saved.get(f"n{i}", 0) == n, (i, n, saved.get(f"n{i}"))


def test_an_address_that_is_a_regular_file_is_refused_and_kept(tmp_path):
    precious = tmp_path / "important.json"
    precious.write_text('{"keep": "me"}')
    with pytest.raises(FileExistsError, match="not a socket"):
        sharedstate.StateServer(address=str(precious)).start()
    assert json.loads(precious.read_text()) == {"keep": "me"}


def test_an_address_in_use_by_a_live_server_is_refused(server):
    with pytest.raises(OSError, match="in use"):
        sharedstate.StateServer(address=server.address).start()
    assert server.state.get("x") is None  # the first one is untouched


def test_a_failed_call_inside_the_lock_does_not_free_it(state, mp_context):
    held, go = mp_context.Event(), mp_context.Event()
    result = mp_context.Value("i", 0)
    proc = mp_context.Process(target=workers.fail_inside_lock, args=(state, held, go, result))
    proc.start()
    try:
        assert held.wait(30)
        assert result.value == 1  # the child's failed calls raised, and it still held the lock
        assert state.lock.owner() == proc.pid
        assert state.lock.acquire(blocking=False) is False
        go.set()
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        go.set()
        reap(proc)
    assert state.stats()["lock_recoveries"] == 0


def test_a_burst_of_connections_all_get_through(server, mp_context):
    with mp_context.Pool(6) as pool:
        counts = pool.starmap(workers.connect_burst, [(server.address, server.authkey, 30)] * 6)
    assert counts == [30] * 6
    assert server.state.get("burst") == 180


def test_a_filtered_save_to_the_servers_own_file_is_refused(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal") as server:
        server.state.update({"a": 1, "b": 2})
        for filters in ({"include": ["a"]}, {"exclude": ["b"]}, {"scope": "s"}):
            with pytest.raises(ValueError, match="own snapshot"):
                server.state.save(**filters)
            with pytest.raises(ValueError, match="own snapshot"):
                server.state.save(path, **filters)
        pid = server.pid
        kill(pid)  # a crash now must not lose b
        wait_until(lambda: server.pid != pid and _get(server.state, "b") == 2, 15, what="the restarted server")
        assert server.state.snapshot() == {"a": 1, "b": 2}


def _get(state, name):
    try:
        return state.get(name)
    except sharedstate.ServerUnavailable:
        return None


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": "sharedstate", "version": 1, "scopes": {}, "names": {"a": {"$type": "uuid", "value": 5}}}',
        b'{"format": "sharedstate", "version": 1, "scopes": {}, "names": {"a": {"$type": "set", "value": [[1]]}}}',
        b'{"format": "sharedstate", "version": 1, "scopes": {"a": 5}, "names": {"a": 1}}',
        b'{"__pode_state_metadata__": {"Version": 2}, "__pode_state_data__": {"Type": "Hashtable", "Items": 5}}',
        b'{"__pode_state_metadata__": {"Version": 2}, "__pode_state_data__": '
        b'{"Type": "ConcurrentDictionary", "Items": [{"Key": "x", "Value": {"Type": "List", "Items": 5}}]}}',
        b'{"__pode_state_metadata__": {"Version": 2}, "__pode_state_data__": [1, 2]}',
        b'{"__pode_state_metadata__": 7}',
    ],
)
def test_malformed_files_of_any_shape_are_snapshot_errors(state, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    state.set("keep", 1)
    with pytest.raises(sharedstate.SnapshotError):
        state.restore(path)
    assert state.snapshot() == {"keep": 1}
    with pytest.raises(sharedstate.SnapshotError):
        sharedstate.StateServer(path=path).start()
    assert path.read_bytes() == content


def test_the_server_is_out_of_reach_of_a_terminal_ctrl_c(server):
    """It runs in a session of its own: SIGINT to the owner's process group is the owner's to handle."""
    assert os.getpgid(server.pid) != os.getpgid(0)
    assert os.getsid(server.pid) != os.getsid(0)


@pytest.mark.parametrize("address", [("::1", 0), "[::1]:0"])
def test_ipv6_addresses_are_refused_clearly(address):
    with pytest.raises(ValueError, match="IPv6"):
        sharedstate.StateServer(address=address)
    with pytest.raises(ValueError, match="IPv6"):
        sharedstate.connect(address, b"k")


BAD_TEXT = "x\udcff"  # what os.fsdecode makes of bytes that are not UTF-8


def test_text_that_cannot_be_written_as_utf8_is_refused_and_saves_keep_working(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path) as server:
        state = server.state
        state.set("important", 42)
        for call in (
            lambda: state.set("bad", BAD_TEXT),
            lambda: state.set(BAD_TEXT, 1),
            lambda: state.set("bad", [1, {"k": (BAD_TEXT,)}]),
            lambda: state.set("bad", {BAD_TEXT: 1}),
            lambda: state.set("bad", 1, scope=BAD_TEXT),
            lambda: state.update({"ok": 1, "bad": BAD_TEXT}),
            lambda: state.append("list", BAD_TEXT),
        ):
            with pytest.raises(ValueError, match="cannot be stored"):
                call()
        assert state.snapshot() == {"important": 42}
        server.save()
    assert read_snapshot(path).data == {"important": 42}
    storage = sharedstate.LocalFileStorage(tmp_path / "storage")
    with pytest.raises(ValueError):
        storage.set(BAD_TEXT, 1)
    with pytest.raises(ValueError):
        storage.set("k", BAD_TEXT)
    assert storage.getAllKeys() == set()


def test_a_journal_write_that_fails_half_way_leaves_no_torn_record(tmp_path):
    """A file-size limit makes a large record fail part-way (as a full disk would); the changes that
    succeed afterwards must all replay."""
    import psutil

    path = tmp_path / "state.json"
    server = sharedstate.StateServer(path=path, durability="journal", save_every=None, restart=False).start()
    try:
        state = server.state
        state.set("before", 1)
        process = psutil.Process(server.pid)
        limits = process.rlimit(psutil.RLIMIT_FSIZE)
        size = (tmp_path / "state.json.journal").stat().st_size
        process.rlimit(psutil.RLIMIT_FSIZE, (size + 1000, limits[1]))
        with pytest.raises(OSError):
            state.set("big", "x" * 100_000)
        assert "big" not in state
        process.rlimit(psutil.RLIMIT_FSIZE, limits)
        state.set("after", 2)
        state.incr("after")
        kill(server.pid)
        wait_until(lambda: exited(server.pid), 10, what="the server to die")
    finally:
        server.shutdown()
    with sharedstate.StateServer(path=path, durability="journal") as again:
        assert again.state.snapshot() == {"before": 1, "after": 3}


def test_a_save_to_another_spelling_of_the_servers_file_counts_as_its_own(tmp_path):
    path = tmp_path / "state.json"
    (tmp_path / "sub").mkdir()
    other_spelling = tmp_path / "sub" / ".." / "state.json"
    server = sharedstate.StateServer(path=path, durability="journal", save_every=None, restart=False).start()
    try:
        server.state.incr("x")
        server.state.save(other_spelling)
        server.state.incr("x")
        with pytest.raises(ValueError, match="own snapshot"):
            server.state.save(other_spelling, include=["x"])
        kill(server.pid)
        wait_until(lambda: exited(server.pid), 10, what="the server to die")
    finally:
        server.shutdown()
    with sharedstate.StateServer(path=path, durability="journal") as again:
        assert again.state.get("x") == 2  # each increment replayed exactly once


def test_a_snapshot_server_folding_in_a_journal_writes_a_generation_above_it(tmp_path):
    from sharedstate.persistence.journal import journal_files

    path = tmp_path / "state.json"
    server = sharedstate.StateServer(path=path, durability="journal", save_every=None, restart=False).start()
    server.state.incr("x")
    kill(server.pid)
    wait_until(lambda: exited(server.pid), 10, what="the server to die")
    server.shutdown()
    newest = max(g for g, _ in journal_files(path))
    with sharedstate.StateServer(path=path) as plain:
        assert plain.state.get("x") == 1
        assert read_snapshot(path).generation > newest  # a crash before the clean-up replays nothing twice
        assert journal_files(path) == []


def test_a_task_cancelled_while_releasing_still_releases(server):
    import asyncio

    from sharedstate import aio

    async def main():
        state = await aio.connect()
        lock = state.lock
        holding, go = asyncio.Event(), asyncio.Event()

        async def holder():
            await lock.acquire()
            holding.set()
            await go.wait()
            await lock.release()

        async def waiter():
            async with lock:
                pass

        task = asyncio.create_task(holder())
        await holding.wait()
        waiters = [asyncio.create_task(waiter()) for _ in range(20)]  # many waits in flight at once
        await asyncio.sleep(0.3)  # give the waiters time to be waiting: none of them can be allowed to block
        go.set()
        await asyncio.sleep(0)  # the holder sends its release while the waiters wait
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        done, pending = await asyncio.wait(waiters, timeout=20)
        assert not pending, "a waiter never got the lock: the cancelled release leaked it"
        assert not await lock.locked()
        await state.close()

    asyncio.run(main())


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_a_client_pushed_out_of_the_challenge_connects_again(server, tmp_path):
    """The server's admission closes the oldest connection still in the challenge when too many are
    (a burst of clients, idle peers): such a client connects again, within its connect timeout, rather
    than failing. Here a relay in front of the real server closes the first three connections the way
    the admission does, and forwards the fourth."""
    address = str(tmp_path / "relay.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(8)
    accepted: list[socket.socket] = []  # and the relay's connections to the server
    pumps: list[threading.Thread] = []

    def relay() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            accepted.append(client)
            if len(accepted) <= 3:
                client.shutdown(socket.SHUT_RDWR)  # pushed out before the challenge is over
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(server.address)
            accepted.append(upstream)
            for pair in ((client, upstream), (upstream, client)):
                pumps.append(threading.Thread(target=_pump, args=pair, daemon=True))
                pumps[-1].start()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        state = sharedstate.connect(address, server.authkey, cache=False)
        assert state.incr("relayed") == 1
        assert len(accepted) == 5  # three pushed out, the fourth relayed (and its upstream)
        state.close()
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the relay's accept(), which close() alone would not
        listener.close()
        thread.join(10)
        for pump in pumps:
            pump.join(10)
        for sock in accepted:
            sock.close()
        assert not thread.is_alive() and not any(pump.is_alive() for pump in pumps)
