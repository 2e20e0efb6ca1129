"""``RedisBackend`` itself (the Backend protocol on Redis) and the rules it shares with the local server.

The calls of ``State`` on Redis are tested through the facade by the contract suite and test_redis.py;
here the backend's own operations are called directly, as ``State`` calls them (arguments checked),
against the private redis-server of conftest.py.
"""

from __future__ import annotations

import decimal
import multiprocessing
import os
import pickle
import subprocess
import sys

import pytest
from conftest import ROOT, reap

import sharedstate
from sharedstate import AccessDenied, LockLost, ServerUnavailable, SnapshotError
from sharedstate._pattern import compile_pattern
from sharedstate._rules import DECIMAL_CONTEXT, add, appended, matches, scoped, select_saved
from sharedstate._sentinels import MISSING, NOT_CACHED
from sharedstate.backends.base import Backend
from sharedstate.backends.redis import DEFAULT_LEASE, RedisBackend, open_backend
from sharedstate.backends.redis.scripts import EXACT_INT, NOTE_MAX
from sharedstate.persistence.snapshot import read_snapshot
from sharedstate.server.config import ServerConfig
from sharedstate.server.service import StateService
from sharedstate.server.store import Store


@pytest.fixture
def backend(redis_server, redis_namespace):
    opened = open_backend(redis_server.url, namespace=redis_namespace)
    try:
        yield opened
    finally:
        opened.close()


# -- opening ---------------------------------------------------------------------------------------------
def test_an_address_that_is_not_a_redis_url_is_a_local_servers_and_takes_no_redis_options(monkeypatch):
    monkeypatch.delenv("SHAREDSTATE_ADDRESS", raising=False)
    for address in ("/tmp/some.sock", ("127.0.0.1", 5000), None):
        with pytest.raises(ValueError, match="not a Redis URL"):
            open_backend(address)
    with pytest.raises(TypeError, match="options of a Redis state"):
        sharedstate.connect("/tmp/some.sock", namespace="x")
    with pytest.raises(TypeError, match="options of a Redis state"):
        sharedstate.connect(None, lease=1.0)


def test_open_backend_checks_its_options_before_connecting(redis_server):
    with pytest.raises(ValueError, match="password in the URL"):
        open_backend(redis_server.url, authkey=b"key")
    with pytest.raises(ValueError, match="two namespaces"):
        open_backend(f"{redis_server.url}?namespace=a", namespace="b")
    with pytest.raises(ValueError, match="lease"):
        open_backend(redis_server.url, lease=0)
    with pytest.raises(ValueError, match="lease"):
        open_backend(f"{redis_server.url}?lease=soon")


def test_open_backend_reads_shared_state_address(redis_server, redis_namespace, monkeypatch):
    monkeypatch.setenv("SHAREDSTATE_ADDRESS", f"{redis_server.url}?namespace={redis_namespace}&lease=0.5")
    backend = open_backend(None)
    assert isinstance(backend, RedisBackend) and isinstance(backend, Backend)
    assert backend.namespace == redis_namespace and backend.lease == 0.5 and backend.renews_leases is True
    assert open_backend(redis_server.url).lease == DEFAULT_LEASE


def test_open_backend_pings_and_translates_errors(redis_server):
    from conftest import _free_port

    url = f"redis://127.0.0.1:{_free_port()}/0"
    with pytest.raises(ServerUnavailable) as info:
        open_backend(url)
    assert info.value.address == url
    with redis_server.client() as admin:
        admin.acl_setuser("ssbackend", enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
    try:
        with pytest.raises(AccessDenied) as denied:
            open_backend(f"redis://ssbackend:wrong@127.0.0.1:{redis_server.port}/0")
        assert "wrong" not in str(denied.value) and "ssbackend:***@" in str(denied.value)
    finally:
        with redis_server.client() as admin:
            admin.acl_deluser("ssbackend")


def test_redis_backend_implements_every_member_of_the_protocol():
    """A member added to ``Backend`` must be added here too; none comes from a ``State``."""
    members = [n for n in dir(Backend) if not n.startswith("_")] + list(Backend.__annotations__)
    for name in members:
        assert hasattr(RedisBackend, name), f"RedisBackend does not implement Backend.{name}"
    assert "State" not in {c.__name__ for c in RedisBackend.__mro__}


def test_redis_py_is_imported_only_when_a_backend_connects(redis_server):
    code = (
        "import sys\n"
        "import sharedstate.backends.redis as r\n"
        "print('redis' in sys.modules)\n"
        f"r.open_backend({redis_server.url!r}, namespace='import-check')\n"
        "print('redis' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "True"], result.stderr


# -- data calls -----------------------------------------------------------------------------------------
def test_the_data_calls_answer_as_the_protocol_says(backend):
    assert backend.get("a") is MISSING and backend.remove("a") is MISSING
    assert backend.peek("a") is NOT_CACHED
    backend.set("a", [1, "x"], ("s",))
    backend.set("b", {"k": decimal.Decimal("1.5")}, ())
    assert backend.peek("a") is NOT_CACHED  # no client cache on Redis, even for a name just set
    assert backend.get("a") == [1, "x"] and backend.contains("a") and not backend.contains("z")
    assert backend.length() == 2
    assert backend.get_many(["a", "z", "b"]) == {"a": [1, "x"], "b": {"k": decimal.Decimal("1.5")}}
    assert backend.names(None, ("s",)) == ["a"]
    assert backend.names(compile_pattern("^b"), ()) == ["b"]
    assert backend.remove("a") == [1, "x"] and backend.names(None, ("s",)) == []
    backend.update({"c": 3, "b": 2})
    assert backend.snapshot() == {"b": 2, "c": 3}
    assert backend.setdefault("c", 9) == 3 and backend.setdefault("d", 4) == 4
    backend.clear()
    assert backend.length() == 0 and backend.popitem() is None


def test_popitem_removes_one_name_with_its_scopes(backend):
    backend.set("only", 1, ("s",))
    assert backend.popitem() == ("only", 1)
    assert backend.get("only") is MISSING and backend.names(None, ("s",)) == []
    assert backend.popitem() is None


def _pop_all(backend: RedisBackend, start, out) -> None:
    start.wait(30)
    popped = []
    while (item := backend.popitem()) is not None:
        popped.append(item[0])
    out.put(popped)


def test_popitem_from_two_processes_gives_each_name_once(backend):
    """One script per popitem: no name comes out twice, none is lost (the backend pickles to a spawned child)."""
    backend.update({f"n{i}": i for i in range(2000)})
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_pop_all, args=(backend, start, out)) for _ in range(2)]
    try:
        for proc in procs:
            proc.start()
        start.set()
        popped = out.get(timeout=90) + out.get(timeout=90)
    finally:
        reap(*procs)
    assert sorted(popped) == sorted(f"n{i}" for i in range(2000))
    assert backend.length() == 0


def test_a_backend_pickles_its_target_and_connects_again(backend):
    backend.set("p", 1, ())
    copy = pickle.loads(pickle.dumps(backend))
    assert copy.namespace == backend.namespace and copy.lease == backend.lease and copy.address == backend.address
    assert copy.timeout == backend.timeout and copy.identity == backend.identity
    assert copy._conn_ is None and copy.get("p") == 1


def test_a_forked_child_opens_its_own_connection(backend):
    backend.set("n", 0, ())
    parent_conn = backend._conn
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if backend.incr("n", 1) == 1 and backend._conn is not parent_conn else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert backend._conn is parent_conn and backend.get("n") == 1


# -- incr, append, compare_and_set: the shared rules ------------------------------------------------------
def test_incr_is_exact_on_both_sides_of_the_lua_limit(backend, redis_server):
    for start, by in ((EXACT_INT - 2, 1), (EXACT_INT - 1, 1), (-EXACT_INT + 1, -1), (EXACT_INT, -1), (0, EXACT_INT)):
        backend.set("n", start, ())
        got = backend.incr("n", by)
        assert got == start + by and type(got) is int
        assert backend.get("n") == start + by
    backend.set("f", 0.1, ())
    assert backend.incr("f", 0.2) == 0.1 + 0.2
    backend.set("i", 2, ())
    assert backend.incr("i", 0.5) == 2.5 and type(backend.get("i")) is float
    backend.set("big", 10**30, ())
    assert backend.incr("big", 1) == 10**30 + 1


def _script_runs(redis_server) -> int:
    with redis_server.client() as client:
        return client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def test_incr_stays_in_one_script_up_to_the_lua_limit(backend, redis_server):
    """Every integer below ``EXACT_INT`` is added by the script, 16 digits too: one script run. At the
    limit the sum is finished in Python: the script answers so, and a compare-and-swap script follows."""
    backend.set("warm", 2**60, ())
    backend.incr("warm", 1)  # both scripts loaded: every call below is one EVALSHA each
    for start in (10**15 + 5, EXACT_INT - 2, -(EXACT_INT - 2)):
        backend.set("n", start, ())
        before = _script_runs(redis_server)
        assert backend.incr("n", 1) == start + 1
        assert _script_runs(redis_server) - before == 1, start
    backend.set("n", EXACT_INT - 1, ())
    before = _script_runs(redis_server)
    assert backend.incr("n", 1) == EXACT_INT
    assert _script_runs(redis_server) - before == 2


def test_incr_of_a_decimal_uses_the_fresh_process_context_on_both_backends(backend):
    """Not the calling thread's context: a journal replayed elsewhere, and the other backend, add alike."""
    store = Store()
    store.set("d", decimal.Decimal("1.2345"))
    backend.set("d", decimal.Decimal("1.2345"), ())
    with decimal.localcontext() as ctx:
        ctx.prec = 3
        assert store.incr("d", decimal.Decimal(1)) == decimal.Decimal("2.2345")
        assert backend.incr("d", decimal.Decimal(1)) == decimal.Decimal("2.2345")
    assert DECIMAL_CONTEXT.prec == 28


def _error_of(call):
    try:
        call()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    raise AssertionError("no error")


def test_both_backends_refuse_the_same_calls_with_the_same_words(backend):
    store = Store()
    for target in (store, backend):
        target.set("text", "abc", ())
        target.set("num", 5, ())
        target.set("dec", decimal.Decimal("9E+999999"), ())
    cases = [
        lambda t: t.incr("text", 1),
        lambda t: t.incr("num", decimal.Decimal(1)) and t.incr("dec", 0.5),
        lambda t: t.incr("dec", decimal.Decimal("9E+999999")),
        lambda t: t.append("num", 1),
    ]
    for case in cases:
        assert _error_of(lambda: case(store)) == _error_of(lambda: case(backend))  # noqa: B023 (called at once)
    assert store.snapshot() == backend.snapshot()
    assert backend.get("text") == "abc"


def test_compare_and_set_follows_the_shared_rule(backend):
    assert not backend.compare_and_set("m", 0, 1)  # a missing name matches only None
    assert backend.get("m") is MISSING
    assert backend.compare_and_set("m", None, 1)
    assert backend.compare_and_set("m", 1.0, 2)  # Python's ==, decided in Python
    backend.set("nan", float("nan"), ())
    assert not backend.compare_and_set("nan", float("nan"), 0)
    assert matches(MISSING, None) and not matches(MISSING, 0) and matches(1, True)


def test_append_through_python_when_lua_cannot_read_the_list(backend):
    backend.set("l", [1], ())
    assert backend.append("l", {"a": (1, 2)}) == 2
    assert backend.get("l") == [1, {"a": (1, 2)}]
    assert appended("x", MISSING, 1) == [1] and add("x", MISSING, 2) == 2


# -- save filters and restore checks ----------------------------------------------------------------------
def test_the_save_filter_applies_scope_then_include_then_exclude():
    data = {"a": 1, "b": 2, "c": 3, "d": 4}
    scopes = {"a": ("s",), "b": ("s", "t"), "c": ("t",)}
    assert select_saved(data, scopes, None, None, ()) == data
    assert select_saved(data, scopes, None, None, ("s",)) == {"a": 1, "b": 2}
    assert select_saved(data, scopes, ["b", "c", "d"], None, ("s",)) == {"b": 2}
    assert select_saved(data, scopes, ["b", "d", "b"], ["b"], ()) == {"d": 4}
    assert select_saved(data, scopes, [], [], ()) == data  # empty filters filter nothing
    assert scoped(scopes, ("t", "u")) == ["b", "c"]  # any one scope in common


def test_a_filtered_save_on_redis_writes_what_the_rule_selects(backend, tmp_path):
    backend.set("a", 1, ("s",))
    backend.set("b", 2, ("s", "t"))
    backend.set("c", 3, ())
    path = tmp_path / "snap.json"
    assert backend.save(str(path), ["b", "c"], None, ("s",)) == path
    assert read_snapshot(path).data == {"b": 2}
    backend.clear()
    assert backend.restore(str(path), False) == 1
    assert backend.snapshot() == {"b": 2} and backend.names(None, ("t",)) == ["b"]
    with pytest.raises(ValueError, match="needs a path"):
        backend.save(None, None, None, ())
    with pytest.raises(ValueError, match="needs a path"):
        backend.restore(None, True)


def test_a_restored_file_with_a_name_no_snapshot_can_hold_is_refused_by_both_backends(backend, tmp_path):
    """Our own layout without its header line (version 1) may hold a lone surrogate as a name, which no
    later save could write: refused on restore, by the server as by Redis, and nothing changes. A Pode
    file's values are checked too."""
    path = tmp_path / "bad.json"
    path.write_text('{"format": "sharedstate", "version": 1, "names": {"ok": 1, "\\ud800": 2}}')
    pode = tmp_path / "pode.json"
    pode.write_text('{"a": "\\ud800"}')
    service = StateService(ServerConfig(address=str(tmp_path / "s.sock"), authkey=b"k" * 32,
                                        write_key_file=False, owner_pid=None, owner_create_time=None))  # fmt: skip
    for target in (backend, service):
        target.set("kept", 1, ())
        with pytest.raises(SnapshotError, match="not a valid snapshot"):
            target.restore(str(path), False)
        with pytest.raises(SnapshotError, match="not a valid snapshot"):
            target.restore(str(pode), True)
        assert target.snapshot() == {"kept": 1}


# -- locks ------------------------------------------------------------------------------------------------
def test_lock_calls_count_reentrancy_and_refuse_a_release_by_another_owner(backend):
    assert backend.lock_acquire("job", "me", True, None, None, 0)
    assert backend.lock_acquire("job", "me", True, None, None, 1)
    assert backend.lock_owner("job") == os.getpid() and backend.lock_locked("job")
    assert not backend.lock_acquire("job", "other", False, None, None, 0)
    with pytest.raises(RuntimeError, match=f"held by pid {os.getpid()}"):
        backend.lock_release("job", "other", 0)
    assert backend.lock_renew([("job", "me")]) == []
    backend.lock_release("job", "me", 2)
    assert backend.lock_locked("job")
    backend.lock_release("job", "me", 1)
    assert not backend.lock_locked("job") and backend.lock_owner("job") is None
    with pytest.raises(RuntimeError, match="held by nobody"):
        backend.lock_release(None, "me", 0)
    for lease in (0.01, 10_000):  # Redis' own bounds on a lease
        with pytest.raises(ValueError, match="lease must be between"):
            backend.lock_acquire("job", "me", True, None, lease, 0)
    assert not backend.lock_locked("job")


def test_a_lock_whose_lease_ran_out_raises_lock_lost(backend, redis_server):
    """Even when another owner of this process took it since: the first owner's next call (a release,
    or a reentrant acquire) is ``LockLost``, not the other owner's lock nor "not held"."""
    for name, call in (("short", "release"), ("short2", "acquire")):
        assert backend.lock_acquire(name, "me", True, None, 0.3, 0)
        with redis_server.client() as client:
            client.delete(f"{backend.namespace}:lock:{name}")  # as if the lease had run out unrenewed
        assert backend.lock_acquire(name, "other", False, None, None, 0)
        with pytest.raises(LockLost):
            if call == "release":
                backend.lock_release(name, "me", 1)
            else:
                backend.lock_acquire(name, "me", True, None, 0.3, 1)
        assert backend.lock_owner(name) == os.getpid()
        backend.lock_release(name, "other", 1)
        assert not backend.lock_locked(name)


def test_a_lock_lost_in_one_namespace_leaves_the_same_lock_of_another_namespace_alone(redis_server):
    """Two namespaces of one database are two states: this process' lock bookkeeping keeps them apart, so
    losing lock "x" in one does not make the release of "x" in the other a ``LockLost`` that leaves it
    held (and renewed) for ever."""
    first = sharedstate.connect(redis_server.url, namespace="ns-first")
    second = sharedstate.connect(redis_server.url, namespace="ns-second")
    assert first.backend.identity != second.backend.identity
    mine, theirs = first.named_lock("x", lease=5), second.named_lock("x", lease=5)
    assert mine.acquire(timeout=5) and theirs.acquire(timeout=5)
    with redis_server.client() as client:
        client.delete("ns-first:lock:x")  # as if its lease had run out while the process was stopped
    with pytest.raises(LockLost):
        mine.release()
    theirs.release()
    assert not theirs.locked() and not mine.locked()
    first.close()
    second.close()


def test_a_waiter_is_woken_by_a_release_in_another_process(backend):
    assert backend.lock_acquire(None, "holder", True, None, None, 0)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_acquire_and_report, args=(backend, out))
    try:
        proc.start()
        assert out.get(timeout=60) == "waiting"
        assert backend.lock_locked(None)
        backend.lock_release(None, "holder", 1)
        assert out.get(timeout=30) is True
    finally:
        reap(proc)


def _acquire_and_report(backend: RedisBackend, out) -> None:
    out.put("waiting")
    out.put(backend.lock_acquire(None, "child", True, 30.0, None, 0))
    backend.lock_release(None, "child", 1)


def test_replies_decoded_by_the_urls_decode_responses_are_read_alike(redis_server, redis_namespace):
    """``?decode_responses=true`` makes redis-py answer str, not bytes: the scripts' answers still count
    (an incr was added twice when its "ok" was not recognised)."""
    state = sharedstate.connect(f"{redis_server.url}?decode_responses=true", namespace=redis_namespace)
    try:
        assert state.incr("n") == 1 and state.incr("n", 2) == 3 and state.get("n") == 3
        assert state.append("l", "x") == 1 and state.get("l") == ["x"]
        with pytest.raises(TypeError):
            state.incr("l")
        with state.watch(names=["n"]) as changes, state.watch(scope="team") as scoped:
            state.incr("n", ttl=5)
            assert changes.next(5) == sharedstate.Change("n", "set", 4)
            large = "y" * (NOTE_MAX + 1)
            state.set("n", large, scope="team")  # an entry with its scopes and "large"
            assert changes.next(5) == scoped.next(5) == sharedstate.Change("n", "set", large)
            state.remove("n")
            assert changes.next(5) == scoped.next(5) == sharedstate.Change("n", "removed")
            state.clear()
            assert changes.next(5) == scoped.next(5) == sharedstate.Change(None, "cleared")
    finally:
        state.close()
