"""No call can freeze the server for other clients, and small edge cases of the calls' arguments.

The stall tests measure, in another process, the worst latency of ``get`` while one client does
something expensive. A stall the server causes repeats on every try; a scheduling hiccup of a busy
machine does not: so a measurement is tried up to three times, and the best try (100 ms against
seconds today) or the median (500 ms against 0.5-2.9 s today) must hold the bound.
"""

from __future__ import annotations

import asyncio
import decimal
import gc
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
import weakref

import pytest
from conftest import exited, kill, wait_until

import sharedstate
import sharedstate.aio
from sharedstate._pattern import compile_pattern

#: A probe in its own process: a loop of uncached ``get`` calls, worst latency printed on "stop".
PROBE = r"""
import sys, threading, time
import sharedstate

state = sharedstate.connect(cache=False)
state.get("probe")
stop = threading.Event()
worst = [0.0, 0]

def loop():
    while not stop.is_set():
        started = time.perf_counter()
        state.get("probe")
        took = time.perf_counter() - started
        worst[1] += 1
        worst[0] = max(worst[0], took)

thread = threading.Thread(target=loop)
thread.start()
print("ready", flush=True)
sys.stdin.readline()
stop.set()
thread.join(60)
print(worst[0], worst[1], flush=True)
"""

#: A client that calls names(PATTERN) and prints the answer as JSON ("calling" just before).
NAMES_CALLER = r"""
import json, sys
import sharedstate

state = sharedstate.connect(cache=False)
print("calling", flush=True)
print(json.dumps(state.names(sys.argv[1])), flush=True)
"""

#: Backtracking in re takes tens of seconds on this name (about 2**30 steps): far past the 2 s a caller is given.
SLOW_NAME = "a" * 30 + "!"


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),  # start() exported the server's address and key
    )


def _finish(proc: subprocess.Popen[str]) -> None:
    """Kill the child if it still runs, reap it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's next line, or a failure if it has none within ``timeout`` (the child is killed)."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            _finish(proc)
            pytest.fail(f"no line from child pid {proc.pid} within {timeout} s")
    return proc.stdout.readline().strip()


def _worst_get_latency(during) -> tuple[float, int]:
    """Run ``during()`` while a probe process measures ``get``; return the worst latency and the number
    of gets."""
    probe = _child(PROBE)
    try:
        assert _read_line(probe, 30) == "ready"
        during()
        assert probe.stdin is not None
        probe.stdin.write("stop\n")
        probe.stdin.flush()
        worst, count = _read_line(probe, 60).split()
        return float(worst), int(count)
    finally:
        _finish(probe)


def _tries(during, bound: float | None) -> list[float]:
    """Worst get latencies of up to three tries of ``during`` (stopping at one under ``bound``)."""
    tries = []
    for _ in range(3):
        worst, count = _worst_get_latency(during)
        assert count > 0
        tries.append(worst)
        if bound is not None and worst < bound:
            break
    return tries


# -- point 10: names(pattern) never freezes the server ---------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "pattern, engine",
    [
        (r"^(a+)+$", "re2"),  # catastrophic for re, linear for RE2 in the server
        (r"^(a+)+\1$", "re"),  # a backreference: RE2 has none, so the caller matches it
    ],
)
def test_a_backtracking_pattern_stalls_no_other_client(server, pattern, engine):
    state = server.state
    state.update({SLOW_NAME: 1, "aaa": 2, "probe": 3})
    assert compile_pattern(pattern).engine == engine
    still_running_at_deadline, answers = [], []

    def call_names():
        caller = _child(NAMES_CALLER, pattern)
        try:
            assert _read_line(caller, 30) == "calling"
            try:
                caller.wait(timeout=2.0)  # its answer is a short line: it fits in the pipe, so it can end
            except subprocess.TimeoutExpired:
                still_running_at_deadline.append(True)  # the caller pays for its own pattern
                return
            # Read through the same text stream as "calling": the answer may already be in its buffer
            # (communicate() would read the pipe beneath it and find nothing).
            out = caller.stdout.read()
            # Its status too: a caller that ended without an answer is a failure worth reading.
            assert caller.returncode == 0 and out, f"names() caller ended with status {caller.returncode}: {out!r}"
            answers.append(json.loads(out))
        finally:
            _finish(caller)

    tries = _tries(call_names, 0.100)
    best = min(tries)
    # Today's server runs re.search itself: the probe waits seconds for the server to be free again.
    assert best < 0.100, f"a names({pattern!r}) call stalled other clients: worst get latencies {tries}"
    if engine == "re2":
        assert not still_running_at_deadline and answers[0] == ["aaa"]
        assert state.names(pattern) == ["aaa"]
    else:
        assert still_running_at_deadline, "the backreference pattern was expected to backtrack in its caller"
        state.remove(SLOW_NAME)
        assert state.names(pattern) == ["aaa"]  # and it is matched, by the caller, like re.search


@pytest.mark.parametrize("pattern", ["a{1,4294967296}", "(" * 5000 + ")" * 5000, "(unclosed", "[z-a]"])
def test_an_overflowing_or_too_deep_pattern_is_a_value_error(any_state, pattern):
    any_state.set("a", 1)
    with pytest.raises(ValueError, match="invalid pattern"):
        any_state.names(pattern)
    assert any_state.names() == ["a"]


def test_the_server_checks_a_pattern_itself(state):
    # A client that skipped the check: the server's answer is still a ValueError, and it keeps serving.
    with pytest.raises(ValueError, match="invalid pattern"):
        state.backend._call("names", ("a{1,4294967296}", ()))
    with pytest.raises(ValueError, match="nested too deeply"):
        state.backend._call("names", ("(" * 5000 + ")" * 5000, ()))
    assert state.get("x", 0) == 0


def test_the_cli_prints_one_line_for_a_pattern_that_overflows(server):
    for pattern in ("a{1,4294967296}", "(" * 5000 + ")" * 5000):
        done = subprocess.run(
            [sys.executable, "-m", "sharedstate", "names", pattern],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ),
        )
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "invalid pattern" in lines[0], done.stderr
        assert len(lines[0]) < 300  # a pattern of 10,000 characters is shortened in the message


#: Parts of patterns and names for the comparison with re.search: letters whose case folds outside
#: ASCII (K, ſ, İ), digits and spaces of other scripts, newlines, classes and anchors.
_PIECES = [
    "a", "b", "A", "é", "K", "k", "s", "\\d", "\\D", "\\w", "\\W", "\\s", "\\S", "\\b", "\\B", ".", "^", "$",
    "\\A", "\\Z", "[ab]", "[^a]", "[a-z]", "[^\\s]", "[\\S]", "[\\d\\s]", "[^\\W\\d]", "\\n", "\\x1c", "\\v",
    " ", "_", "0", "٣", "(?i:", "(?s:", "(?m:", "(?-i:", "(?a:", "(", "(?:", ")", "|", "*", "+", "?",
    "{1,2}", "*?", "[[:alpha:]]", "[]a]", "(a)\\1", "(?=a)", "(?<!b)", "a++", "(?>a)",
]  # fmt: skip
_PREFIXES = ["", "(?i)", "(?m)", "(?s)", "(?a)", "(?im)", "(?ai)", "(?x)"]
_CHARS = ["a", "b", "A", "é", "É", "ſ", "K", "k", "s", "S", "\n", "\x1c", "\v", " ", "_", "0", "٣", "[", ":",
          "]", "-", "\t", "İ", "i", "ı"]  # fmt: skip


def test_re2_and_re_find_the_same_names():
    rng = random.Random(1913)
    compared = by_re2 = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "possible nested set" in "[["
        for _ in range(6000):
            pattern = rng.choice(_PREFIXES) + "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 6)))
            try:
                compiled = re.compile(pattern)
            except re.error:
                continue
            names = ["".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 5))) for _ in range(40)]
            checked = compile_pattern(pattern)
            assert sorted(checked.filter(names)) == sorted(n for n in names if compiled.search(n)), pattern
            matched, undecided = checked.split(names)  # what the server answers: RE2's part exact
            decided = set(names) - set(undecided)
            assert set(matched) == {n for n in decided if compiled.search(n)}, pattern
            compared += 1
            by_re2 += checked.engine == "re2"
    # The comparison is not empty, and most patterns are RE2's: only its answers are compared there.
    assert compared > 2000 and by_re2 > compared * 0.6, (compared, by_re2)


def test_names_answers_as_re_search_on_both_backends(any_state):
    names = ["alpha", "beta", "ALPHA", "café", "line\n", "x1", "x٣", "aa", "K", "s_s"]
    any_state.update({name: 1 for name in names})
    for pattern in ["^a", "a$", r"\d$", r"(?i)^alpha$", r"(\w)\1", r"^(?!a)", r"\w+$", "é", r"(?i)k", r"\bs"]:
        compiled = re.compile(pattern)
        assert any_state.names(pattern) == sorted(n for n in names if compiled.search(n)), pattern


class _Text(str):
    """A str subclass the server process cannot import."""


def test_a_str_subclass_pattern_works_like_its_str(any_state):
    any_state.update({"apple": 1, "banana": 2})
    assert any_state.names(_Text("^a")) == any_state.names("^a") == ["apple"]
    assert any_state.names(_Text(r"(a)\1|^b")) == ["banana"]  # one the caller matches itself
    with pytest.raises(TypeError):
        any_state.names(b"^a")


# -- point 12: values that grow when written out; a large journaled update --------------------------------
def _doubling(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value, value]
    return value


@pytest.mark.timeout(60)
def test_a_value_that_doubles_at_each_level_is_refused_at_once(any_state):
    any_state.set("x", "before")
    huge = _doubling(40)  # 2**41 parts written out; 40 lists in memory
    started = time.monotonic()
    for call in (
        lambda: any_state.set("x", huge),
        lambda: any_state.update({"x": huge, "y": 1}),
        lambda: any_state.append("x", huge),
        lambda: any_state.setdefault("z", huge),
        lambda: any_state.compare_and_set("x", "before", huge),
    ):
        with pytest.raises(ValueError, match="parts when written out"):
            call()
    assert time.monotonic() - started < 10  # counted with a memo: no walk of the expanded tree
    assert any_state.get("x") == "before" and "y" not in any_state and "z" not in any_state
    small = _doubling(8)  # shared references are fine while the value stays small
    any_state.set("s", small)
    assert any_state.get("s") == small


def test_the_part_budget_counts_what_a_snapshot_writes(tmp_path):
    from sharedstate._values import MAX_PARTS, check_value

    row = list(range(1000))
    check_value("ok", [row] * (MAX_PARTS // 1001 - 1))  # one list referenced many times, under budget
    with pytest.raises(ValueError, match="parts"):
        check_value("big", [row] * (MAX_PARTS // 1001 + 1))
    with pytest.raises(ValueError, match="nested deeper"):
        deep: list = []
        for _ in range(150):
            deep = [deep]
        wrapped = deep
        for _ in range(60):
            wrapped = [wrapped]
        check_value("deep", [deep, wrapped])  # the second path to ``deep`` is 210 levels deep


def _crash(server: sharedstate.StateServer) -> None:
    """SIGKILL the server process (started with restart=False, so it stays down) and wait for it."""
    pid = server.pid
    kill(pid)
    wait_until(lambda: exited(pid), 10, what="the server to die")
    server.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_journaled_update_of_500k_names_stalls_others_less_than_half_a_second(tmp_path):
    path = tmp_path / "state.json"
    mapping = {f"name:{i}": i for i in range(500_000)}
    server = sharedstate.StateServer(path=path, durability="journal", save_every=None, restart=False).start()
    try:
        state = server.state
        state.set("probe", 0)
        # The median of three: today's stall (the record of 500k names encoded under the store's mutex)
        # is 0.5 to 2.9 s here, so a lucky try below the bound must not pass it.
        tries = _tries(lambda: state.update(mapping), None)
        assert sorted(tries)[1] < 0.500, f"a journaled update stalled other clients: worst get latencies {tries}"
        assert state.get("name:499999") == 499999
    finally:
        _crash(server)  # the journal holds the update: a crash loses none of it
    again = sharedstate.StateServer(path=path, durability="journal", save_every=None).start()
    try:
        assert again.state.get("name:499999") == 499999 and len(again.state) == 500_001
    finally:
        again.shutdown()


def test_a_large_update_journal_record_replays_in_order(tmp_path):
    path = tmp_path / "state.json"
    srv = sharedstate.StateServer(
        path=path, durability="journal", journal_fsync="always", save_every=None, restart=False
    ).start()
    try:
        state = srv.state
        state.set("n:5", "first")
        state.update({f"n:{i}": i for i in range(25_000)})  # written in pieces of 10,000 names
        state.set("n:7", "after")
        state.remove("n:9")
    finally:
        _crash(srv)
    again = sharedstate.StateServer(path=path, durability="journal", save_every=None).start()
    try:
        got = again.state
        assert got.get("n:5") == 5 and got.get("n:7") == "after" and "n:9" not in got and len(got) == 24_999
    finally:
        again.shutdown()


# -- point 17: small ones ---------------------------------------------------------------------------------
def test_a_signalling_nan_is_a_value_error(any_state):
    snan = decimal.Decimal("sNaN")
    any_state.set("d", decimal.Decimal("1.5"))
    with pytest.raises(ValueError, match="sNaN"):
        any_state.incr("d", snan)
    with pytest.raises(ValueError, match="sNaN"):
        any_state.compare_and_set("d", snan, 1)
    with pytest.raises(ValueError, match="sNaN"):
        any_state.compare_and_set("d", decimal.Decimal("1.5"), [snan])
    with pytest.raises(ValueError, match="sNaN"):
        any_state.set("e", {"k": (snan,)})
    assert any_state.get("d") == decimal.Decimal("1.5") and "e" not in any_state
    assert any_state.incr("d", decimal.Decimal("1")) == decimal.Decimal("2.5")


def test_a_decimal_overflow_in_incr_is_a_value_error(state):
    state.set("d", decimal.Decimal("9E+999999"))
    with pytest.raises(ValueError, match="cannot incr 'd'"):
        state.incr("d", decimal.Decimal("9E+999999"))
    assert state.get("d") == decimal.Decimal("9E+999999")


def test_an_empty_filter_list_is_no_filter(any_state, tmp_path):
    any_state.set("a", 1, scope="web")
    any_state.set("b", 2)
    assert any_state.names(scope=[]) == ["a", "b"]
    assert any_state.names("a", scope=[]) == ["a"]
    out = tmp_path / "out.json"
    for filters in ({"include": []}, {"exclude": []}, {"scope": []}, {"include": [], "exclude": [], "scope": []}):
        any_state.save(out, **filters)
        assert sorted(json.loads(out.read_text())["names"]) == ["a", "b"], filters
    any_state.save(out, include=[], exclude=["a"])
    assert sorted(json.loads(out.read_text())["names"]) == ["b"]


def test_an_empty_include_may_save_to_the_servers_own_file(tmp_path):
    path = tmp_path / "own.json"
    with sharedstate.StateServer(path=path, save_every=None) as server:
        server.state.set("a", 1)
        assert server.state.save(include=[]) == path
        assert json.loads(path.read_text())["names"] == {"a": 1}


def test_with_a_started_server_works(tmp_path):
    with sharedstate.StateServer(path=tmp_path / "s.json", save_every=None).start() as server:
        server.state.set("a", 1)
        pid = server.pid
    assert exited(pid)
    assert json.loads((tmp_path / "s.json").read_text())["names"] == {"a": 1}
    with pytest.raises(RuntimeError):  # a stopped server is not started again
        with server:
            pass


def test_locks_accept_weak_references(state):
    lock, named = state.lock, state.named_lock("jobs")
    ref, named_ref = weakref.ref(lock), weakref.ref(named)
    assert ref() is lock and named_ref() is named
    with ref():
        assert lock.locked()
    del named
    gc.collect()
    assert named_ref() is None


def test_async_locks_accept_weak_references(server):
    async def main():
        state = await sharedstate.aio.connect()
        try:
            lock, named = state.lock, state.named_lock("jobs")
            assert weakref.ref(lock)() is lock and weakref.ref(named)() is named
        finally:
            await state.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_raised_server_error_leaves_no_reference_cycle(state):
    state.set("text", "not a number")
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            try:
                state.incr("text")
            except TypeError:
                pass
        found = gc.collect()
    finally:
        gc.enable()
    # With the cycle (gh-106558), each raised error keeps its traceback, the frames and their locals,
    # until the garbage collector runs.
    assert found == 0, f"{found} objects were only freed by the garbage collector"


class _Boom(Exception):
    pass


def test_the_server_keeps_no_cycle_through_an_error_it_answered():
    # The serving loop of a server process, run here on a socket pair, answering a method that raises.
    import pickle
    import socket
    import threading
    import types
    from multiprocessing.connection import Connection

    from sharedstate.server.serving import ManagerServer
    from sharedstate.wire.addresses import STORE_ID

    raised = []

    def made() -> _Boom:
        exc = _Boom("refused")
        raised.append(weakref.ref(exc))
        return exc

    def boom():
        raise made()

    loop = ManagerServer.__new__(ManagerServer)  # only what serve() uses
    loop.methods = {"boom": boom}
    loop.stop_event = threading.Event()
    loop.service = types.SimpleNamespace(answers=types.SimpleNamespace(table={}))  # no write is sent
    ours, theirs = socket.socketpair()
    client, served = Connection(ours.detach()), Connection(theirs.detach())
    gc.collect()
    gc.disable()
    try:
        thread = threading.Thread(target=loop.serve, args=(served,))
        thread.start()
        client.send_bytes(pickle.dumps((STORE_ID, "boom", (), {})))
        kind, answer = pickle.loads(client.recv_bytes())
        assert kind == "#ERROR" and type(answer) is _Boom
        del answer
        client.close()  # the loop ends with the connection
        thread.join(10)
        assert not thread.is_alive()
        served.close()
        # Kept with its traceback, the error would hold the loop's frame, which holds the error.
        assert raised[0]() is None, "the server's error is only freed by the garbage collector"
    finally:
        gc.enable()
