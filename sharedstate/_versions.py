"""Version counters in shared memory: how a client knows, with no round trip, that a name has not changed.

The server keeps a block of POSIX shared memory (``/dev/shm/sharedstate-…`` on Linux) of 8-byte words:

- word 0, the *token*: a random number naming the live server process (0 once the block is retired);
- word 1, the *epoch*: bumped by a change of every name at once (``clear``, a full ``restore``) and when
  the block is retired; it starts at a random number, so no two servers share one;
- then ``SLOTS`` counters: a name hashes (CRC-32 of its UTF-8) to one of them, and every change of the
  name bumps its counter before the changing call returns.

A client reads the epoch and the name's counter *before* it asks the server for a value, and keeps the
value with them; while both are unchanged, the value is still the server's. A change that returned
before a read began has bumped the counter already, so a read never returns a value older than it.

The block is made with the ``shm_open`` primitive that ``multiprocessing.shared_memory`` is built on,
but without that module's resource tracker: on Python < 3.13 the tracker of every process that merely
attaches a block unlinks it when that process exits. Clients map it read-only. Its name is derived from
the server's address, so the next server at an address finds and retires a block left by one that was
killed; the owner of a server that crashed retires it at once.
"""

from __future__ import annotations

import _posixshmem
import hashlib
import mmap
import os
import secrets
import zlib

from ._transport import BOOT_SCOPE, Address, format_address

#: Counters per server (a power of two). Names that share a counter only cost each other cache misses.
SLOTS = 1 << 16
HEADER_WORDS = 2
TOKEN, EPOCH = 0, 1
SIZE = (HEADER_WORDS + SLOTS) * 8
_MASK = SLOTS - 1


def slot_of(name: str) -> int:
    """The index of the word that counts the changes of ``name``."""
    return HEADER_WORDS + (zlib.crc32(name.encode("utf-8", "surrogatepass")) & _MASK)


def block_name(address: Address) -> str:
    """The shared memory name of the server at ``address`` (short enough for every POSIX system)."""
    seed = f"{os.getuid()}|{BOOT_SCOPE}|{format_address(address)}".encode("utf-8", "surrogatepass")
    return "/sharedstate-" + hashlib.sha256(seed).hexdigest()[:16]


def _map(name: str, writable: bool) -> tuple[mmap.mmap, memoryview]:
    fd = _posixshmem.shm_open(name, os.O_RDWR if writable else os.O_RDONLY, mode=0o600)
    try:
        if os.fstat(fd).st_size < SIZE:
            raise OSError(f"shared memory {name} is smaller than a version table")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    return mm, memoryview(mm).cast("Q")


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        pass


def retire(name: str, token: int | None = None) -> bool:
    """Mark the block ``name`` as belonging to no live server and remove it; ``token`` (when given) must
    match, so a block that a newer server made under the same name is left alone. Returns whether a
    block was retired. Clients that still map it see its epoch change, so none of their cached values
    is served again."""
    try:
        mm, words = _map(name, writable=True)
    except (FileNotFoundError, PermissionError):
        return False
    except OSError:  # not a version table: not ours to remove
        return False
    try:
        if token is not None and words[TOKEN] != token:
            return False
        words[TOKEN] = 0
        words[EPOCH] = (words[EPOCH] + 1) & 0xFFFFFFFFFFFFFFFF
        _unlink(name)
        return True
    finally:
        words.release()
        mm.close()


class VersionTable:
    """The server's side: creates the block and bumps counters (always under the store's mutex)."""

    def __init__(self, address: Address) -> None:
        name = block_name(address)
        retire(name)  # a block left by a server that was killed at this address
        try:
            fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        except FileExistsError:
            # Left by another user, or not a version table: use a name of our own.
            name = f"{name}-{secrets.token_hex(4)}"
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
        self.words = memoryview(self._mmap).cast("Q")
        self._closed = False
        self.words[EPOCH] = secrets.randbits(62)
        self.words[TOKEN] = self.token

    def info(self) -> dict[str, object]:
        """What a client needs to map the block."""
        return {"name": self.name, "token": self.token}

    def bump(self, name: str) -> tuple[int, int, int]:
        """Count a change of ``name``; return its counters after it (``slot, epoch, version``)."""
        words = self.words
        slot = slot_of(name)
        version = words[slot] = (words[slot] + 1) & 0xFFFFFFFFFFFFFFFF
        return slot, words[EPOCH], version

    def bump_all(self) -> None:
        words = self.words
        words[EPOCH] = (words[EPOCH] + 1) & 0xFFFFFFFFFFFFFFFF

    def close(self) -> None:
        """Retire and remove the block (the server is stopping)."""
        if self._closed:
            return
        self._closed = True
        words = self.words
        words[TOKEN] = 0
        words[EPOCH] = (words[EPOCH] + 1) & 0xFFFFFFFFFFFFFFFF
        _unlink(self.name)
        words.release()
        self._mmap.close()


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

    def live(self) -> bool:
        return self.words[TOKEN] == self.token


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
