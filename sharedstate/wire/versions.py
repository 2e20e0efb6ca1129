"""Version counters in shared memory: how a client knows, with no round trip, that a name has not changed.

The server keeps a block of POSIX shared memory (``/dev/shm/sharedstate-…`` on Linux) of 8-byte words:

- word 0, the *token*: a random number naming the live server process (0 once the block is retired);
- word 1, the *epoch*: bumped by a change of every name at once (``clear``, a full ``restore``) and when
  the block is retired; it starts at a random number, so no two servers share one;
- word 2, the *format*: the layout and number of counters, so a client never reads a block it does
  not understand;
- words 3 and 4: the server's pid and its start time, so any later server can tell a block whose
  server is gone;
- then ``SLOTS`` counters: a name hashes (CRC-32 of its UTF-8) to one of them, and every change of the
  name bumps its counter before the changing call returns.

A client reads the epoch and the name's counter *before* it asks the server for a value, and keeps the
value with them; while the token is live and both counters are unchanged, the value is still the
server's. A change that returned before a read began has bumped the counter already, so a read never
returns a value older than it.

The block is made with the ``shm_open`` primitive that ``multiprocessing.shared_memory`` is built on,
but without that module's resource tracker: on Python < 3.13 the tracker of every process that merely
attaches a block unlinks it when that process exits. Clients map it read-only. A stopping server
retires its block (token 0) and removes it; the owner of a server that crashed does the same at once;
and every server that starts retires and removes the blocks of this user whose server is gone (killed
with no owner left, say): it finds them by listing ``/dev/shm``, or where there is none (macOS) in the
registry of the names this user's servers made (``shmnames``).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import secrets
import struct
import zlib

import psutil

from sharedstate._processes import process_alive
from sharedstate.wire.addresses import Address
from sharedstate.wire.shmnames import SOURCE, Registry, _posixshmem, listed  # None: no POSIX shared memory

#: Counters per server (a power of two). Names that share a counter only cost each other cache misses.
SLOTS = 1 << 16
TOKEN, EPOCH, FORMAT, PID, STARTED = range(5)
HEADER_WORDS = 5
#: Layout version 1, and the number of counters.
FORMAT_ID = (1 << 32) | SLOTS
SIZE = (HEADER_WORDS + SLOTS) * 8
PREFIX = "sharedstate-"
_MASK = SLOTS - 1
_WORD = 0xFFFFFFFFFFFFFFFF


def slot_of(name: str) -> int:
    """The index of the word that counts the changes of ``name``."""
    try:
        raw = name.encode()
    except UnicodeEncodeError:  # never stored (set refuses it), but it may be read
        raw = name.encode("utf-8", "surrogatepass")
    return HEADER_WORDS + (zlib.crc32(raw) & _MASK)


def block_name(address: Address) -> str:
    """The shared memory name of the server at ``address`` (short enough for every POSIX system).

    One address, one name, however it is spelled: a Unix socket by its real path, TCP by its port (the
    interface it listens on may change between two servers)."""
    where = f"tcp:{address[1]}" if isinstance(address, tuple) else f"unix:{os.path.realpath(address)}"
    return "/" + PREFIX + hashlib.sha256(f"{os.getuid()}|{where}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _double_bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", value))[0]


def _bits_double(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _map(name: str, writable: bool) -> tuple[mmap.mmap, memoryview]:
    if _posixshmem is None:
        raise OSError("no POSIX shared memory on this platform")
    fd = _posixshmem.shm_open(name, os.O_RDWR if writable else os.O_RDONLY, mode=0o600)
    try:
        if os.fstat(fd).st_size != SIZE:
            raise OSError(f"shared memory {name} is not a version table")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    words = memoryview(mm).cast("Q")
    if words[FORMAT] != FORMAT_ID:
        words.release()
        mm.close()
        raise OSError(f"shared memory {name} is not a version table of this version")
    return mm, words


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        pass


def _retire_words(words: memoryview) -> None:
    words[TOKEN] = 0
    words[EPOCH] = (words[EPOCH] + 1) & _WORD


def retire(name: str, token: int | None = None, only_if_dead: bool = False) -> bool:
    """Mark the block ``name`` as belonging to no live server and remove it. ``token`` (when given) must
    match, so a block that a newer server made under the same name is left alone; ``only_if_dead``
    leaves the block of a live server alone. Returns whether the name is free now. Clients that still
    map the block see its token go, so none of their cached values is served again."""
    try:
        mm, words = _map(name, writable=True)
    except FileNotFoundError:
        return True
    except OSError:  # another user's, or not a version table: not ours to remove
        return False
    try:
        if token is not None and words[TOKEN] != token:
            return False
        if only_if_dead and words[TOKEN] != 0 and process_alive(words[PID], _bits_double(words[STARTED])):
            return False
        _retire_words(words)
        _unlink(name)
        return True
    finally:
        words.release()
        mm.close()


def sweep(registry: Registry | None = None) -> int:
    """Retire and remove every block of this user whose server is gone; return how many. The blocks are
    those ``/dev/shm`` lists, or, with a ``registry`` (where there is no ``/dev/shm``), those it names."""
    names = listed(os.getuid()) if registry is None else registry.names()
    removed, gone = 0, []
    for name in names:
        try:
            mm, words = _map(name, writable=False)
        except FileNotFoundError:
            gone.append(name)
            continue
        except OSError:  # not a version table of ours: left alone
            continue
        try:
            dead = words[TOKEN] == 0 or not process_alive(words[PID], _bits_double(words[STARTED]))
        finally:
            words.release()
            mm.close()
        if dead and retire(name, only_if_dead=True):
            removed += 1
            gone.append(name)
    if registry is not None:
        registry.forget(gone)
    return removed


class VersionTable:
    """The server's side: creates the block and bumps counters (always under the store's mutex)."""

    def __init__(self, address: Address, registry: Registry | None = None) -> None:
        """``registry``: where the names of this user's blocks are kept; by default, only where
        ``/dev/shm`` cannot list them (``shmnames.SOURCE``)."""
        if _posixshmem is None:
            raise OSError("no POSIX shared memory on this platform")
        if registry is None and SOURCE == "registry":
            registry = Registry.open()
        sweep(registry)  # blocks left by servers that were killed with no owner to remove them
        name = block_name(address)
        if not retire(name, only_if_dead=True):
            # Held by a live server (another spelling of a TCP address?) or another user: a name of our own.
            name = "/" + PREFIX + secrets.token_hex(8)
        # Recorded before it is made, and dropped again if it cannot be (``Registry.recording``).
        with contextlib.nullcontext() if registry is None else registry.recording(name):
            fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            try:
                os.ftruncate(fd, SIZE)
                self._mmap = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                _unlink(name)
                raise
            finally:
                os.close(fd)
        self.name = name
        self.token = secrets.randbits(63) | 1
        words = self.words = memoryview(self._mmap).cast("Q")
        me = psutil.Process()
        words[PID] = me.pid
        words[STARTED] = _double_bits(me.create_time())
        words[EPOCH] = secrets.randbits(62)
        words[FORMAT] = FORMAT_ID
        words[TOKEN] = self.token  # last: a block is valid once it has its token

    def info(self) -> dict[str, object]:
        """What a client needs to map the block."""
        return {"name": self.name, "token": self.token}

    def bump(self, name: str) -> tuple[int, int, int]:
        """Count a change of ``name``; return its counters after it (``slot, epoch, version``)."""
        words = self.words
        slot = slot_of(name)
        version = words[slot] = (words[slot] + 1) & _WORD
        return slot, words[EPOCH], version

    def bump_many(self, names: object) -> None:
        """``bump`` for each of ``names`` (an ``update``), in one tight loop."""
        words = self.words
        crc = zlib.crc32
        try:
            slots = {crc(name.encode()) & _MASK for name in names}  # type: ignore[attr-defined]
        except UnicodeEncodeError:
            slots = {slot_of(name) - HEADER_WORDS for name in names}  # type: ignore[attr-defined]
        for slot in slots:
            words[slot + HEADER_WORDS] += 1

    def bump_all(self) -> None:
        words = self.words
        words[EPOCH] = (words[EPOCH] + 1) & _WORD

    def close(self) -> None:
        """Retire the block (the server is stopping) and remove its name if it is still this block's.

        The memory stays mapped: a call still being served may bump a counter, harmlessly, and no
        client trusts a retired block."""
        retire(self.name, self.token)
        _retire_words(self.words)


class VersionView:
    """A client's read-only map of a server's block."""

    __slots__ = ("name", "token", "words", "_mmap")

    def __init__(self, name: str, token: int) -> None:
        mm, words = _map(name, writable=False)
        if words[TOKEN] != token:
            words.release()
            mm.close()
            raise OSError(f"shared memory {name} belongs to another server")
        self.name = name
        self.token = token
        self.words = words
        self._mmap = mm


def attach(info: object) -> VersionView | None:
    """Map the block a server described in its ``info``; ``None`` when this process cannot (a client on
    another machine, another user, a server without one)."""
    if not isinstance(info, dict):
        return None
    name, token = info.get("name"), info.get("token")
    if not isinstance(name, str) or not isinstance(token, int):
        return None
    try:
        return VersionView(name, token)
    except (OSError, ValueError):
        return None
