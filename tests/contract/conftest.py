"""The contract suite's fixtures: every test that takes ``state`` runs on each backend and each face.

Backends: ``local`` (a ``StateServer``, client cache on), ``local-nocache`` (the same server,
``cache=False``), ``redis`` (the session's redis-server) and ``valkey`` (the session's valkey-server).
Faces: ``sync`` (``sharedstate.State``) and ``aio`` (``sharedstate.aio.AsyncState`` behind the blocking
adapter of ``faces.py``). Test ids read ``local-sync``, ``valkey-aio``...

Each test gets a clean state: a namespace of its own on Redis and Valkey (removed afterwards), a cleared
state on the session's local server (a new server when the last test left a lock held or waited for).
"""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import RedisServer, drop_namespace

import sharedstate
from contract.faces import EventLoopThread, blocking_state
from sharedstate import aio

BACKENDS = ("local", "local-nocache", "redis", "valkey")
FACES = ("sync", "aio")
COMBINATIONS = [(backend, face) for backend in BACKENDS for face in FACES]


@dataclass(frozen=True)
class Target:
    """Where a test's state lives: enough for another handle, or another process, to connect to it."""

    backend: str
    address: str
    authkey: bytes | None
    namespace: str | None
    #: The pid of the process that serves it (the StateServer's, or redis-server's/valkey-server's).
    server_pid: int

    @property
    def local(self) -> bool:
        return self.backend.startswith("local")

    @property
    def caches(self) -> bool:
        """Whether a handle keeps a client cache (only the local server's handles have one)."""
        return self.backend == "local"

    def options(self) -> dict[str, Any]:
        if self.local:
            return {"cache": self.caches}
        return {"namespace": self.namespace}

    def connect(self, **options: Any) -> sharedstate.State:
        """A sync handle of its own on the same state (picklable: a child process may take it)."""
        return sharedstate.connect(self.address, self.authkey, **{**self.options(), **options})


class LocalServer:
    """The session's local server, cleared for each test; replaced when a test left a lock behind."""

    def __init__(self) -> None:
        self.server = sharedstate.StateServer().start()

    def fresh(self, new: bool = False) -> sharedstate.StateServer:
        """The server, cleared; a new one if ``new`` or if a lock is still held or waited for."""
        stats = self.server.state.stats()
        if new or stats["locks_held"] or stats["lock_waiters"]:
            self.server.shutdown()
            self.server = sharedstate.StateServer().start()
        else:
            self.server.state.clear()
        return self.server


@pytest.fixture(scope="session")
def local_server() -> Iterator[LocalServer]:
    shared = LocalServer()
    try:
        yield shared
    finally:
        shared.server.shutdown()


@pytest.fixture(scope="session")
def event_loop_thread() -> Iterator[EventLoopThread]:
    loop = EventLoopThread()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def new_local_server() -> None:
    """Asked for by a test that reads the local server's lifetime figures (``stats()``: saves, lock
    recoveries): its local backends then get a server of their own instead of the session's."""


def _target(request: pytest.FixtureRequest, backend: str) -> Iterator[Target]:
    if backend in ("local", "local-nocache"):
        server = request.getfixturevalue("local_server").fresh(new="new_local_server" in request.fixturenames)
        yield Target(backend, server.address, server.authkey, None, server.pid)
        return
    remote: RedisServer = request.getfixturevalue(f"{backend}_server")
    namespace = f"contract-{uuid.uuid4().hex[:12]}"
    try:
        yield Target(backend, remote.url, None, namespace, remote.proc.pid)
    finally:
        drop_namespace(remote, namespace)


@pytest.fixture(params=COMBINATIONS, ids=[f"{b}-{f}" for b, f in COMBINATIONS])
def combination(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.fixture
def target(request: pytest.FixtureRequest, combination: tuple[str, str]) -> Iterator[Target]:
    """The backend of this test's combination, with a clean state."""
    yield from _target(request, combination[0])


@pytest.fixture
def face(combination: tuple[str, str]) -> str:
    """``sync`` or ``aio``."""
    return combination[1]


@pytest.fixture
def state(target: Target, face: str, event_loop_thread: EventLoopThread) -> Iterator[Any]:
    """The state of ``target`` through ``face``: a ``State``, or the blocking adapter of an ``AsyncState``."""
    if face == "sync":
        handle = target.connect()
        try:
            yield handle
        finally:
            handle.close()
        return
    blocking, close = blocking_state(event_loop_thread, lambda: aio.connect(target.address, target.authkey,
                                                                             **target.options()))  # fmt: skip
    try:
        yield blocking
    finally:
        close()


@pytest.fixture
def peer(target: Target) -> Iterator[sharedstate.State]:
    """Another sync handle on the same state, with no client cache: what another process would see."""
    with target.connect(**({"cache": False} if target.local else {})) as handle:
        yield handle


@pytest.fixture(params=BACKENDS)
def sync_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """Each backend with a clean state, for the calls only the sync face has (the mapping protocol)."""
    yield from _target(request, request.param)


@pytest.fixture
def sync_state(sync_target: Target) -> Iterator[sharedstate.State]:
    with sync_target.connect() as handle:
        yield handle


@pytest.fixture(params=BACKENDS)
def async_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """Each backend with a clean state, for what only the aio face has (tasks, cancellation)."""
    yield from _target(request, request.param)


@pytest.fixture(scope="session")
def child_context() -> multiprocessing.context.BaseContext:
    """The start method of the contract suite's child processes. Forkserver: no fork of a process that
    runs the aio face's event loop thread, and cheaper than spawn once its server runs (the start methods
    themselves are tested in test_processes.py, test_lock.py and test_cache.py)."""
    return multiprocessing.get_context("forkserver")
