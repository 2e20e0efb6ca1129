"""Addresses and keys: how a client names a server (``SHAREDSTATE_ADDRESS``, a Unix socket or a TCP
address), which key it uses and which key files it trusts, the deadlines of its calls, and what
identifies this machine to a server."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from pathlib import Path

from sharedstate._errors import AccessDenied, ServerUnavailable

Address = str | tuple[str, int]

ENV_ADDRESS = "SHAREDSTATE_ADDRESS"
ENV_AUTHKEY = "SHAREDSTATE_AUTHKEY"

#: The well-known id under which the server exposes its store, so that ids survive a server restart.
STORE_ID = "sharedstate"

#: How long connecting and authenticating may take before the server counts as unavailable.
CONNECT_TIMEOUT = 5.0
#: How long one call on an open connection may wait for its answer by default (``connect(timeout=)``).
CALL_TIMEOUT = 30.0
#: The longest call timeout: a server silent for a day is not answering. Longer ones do not fit the
#: socket options and poll intervals they end up in (1e19 s overflows a timeval; a poll takes at most
#: 2**31 ms, and the server's keepalive interval is a quarter of the timeout).
MAX_CALL_TIMEOUT = 86_400.0
#: A server sends a keepalive to a caller that waits for a lock this many times per call timeout, so
#: a long lock wait is never taken for a server that stopped answering.
KEEPALIVES_PER_TIMEOUT = 4


#: Why a sharedstate server cannot be started or reached on Windows.
NO_SERVER_ON_WINDOWS = (
    "a sharedstate server is not supported on Windows yet (it is built on Unix sockets, POSIX shared memory "
    "and fork-aware clients): use LocalFileStorage, or a Redis or Valkey server through "
    "sharedstate.connect('redis://...')"
)


def server_supported(os_name: str) -> bool:
    """Whether a sharedstate server can run here, and its clients connect to it (``os.name``): not on
    Windows yet."""
    return os_name != "nt"


def check_server_supported(os_name: str = os.name) -> None:
    """Raise ``NotImplementedError`` where a sharedstate server is not supported (``server_supported``)."""
    if not server_supported(os_name):
        raise NotImplementedError(NO_SERVER_ON_WINDOWS)


def check_call_timeout(timeout: object) -> float:
    """``connect(timeout=)``: a positive number of seconds, at most ``MAX_CALL_TIMEOUT``."""
    if type(timeout) not in (int, float):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 < timeout <= MAX_CALL_TIMEOUT:  # also refuses NaN and infinity
        raise ValueError(
            f"timeout must be a positive number of seconds, at most {MAX_CALL_TIMEOUT:g} (a day), not {timeout!r}"
        )
    return float(timeout)


def parse_address(address: object) -> Address:
    """Normalise an address: a Unix socket path (``str``/``PathLike``), a ``(host, port)`` pair, or the
    text forms ``"host:port"`` and ``"[v6]:port"`` used in ``SHAREDSTATE_ADDRESS``."""
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[0], str) or type(address[1]) is not int:
            raise TypeError(f"a TCP address must be (host: str, port: int), not {address!r}")
        if not 0 <= address[1] <= 65535:
            raise ValueError(f"port out of range in address {address!r}")
        if ":" in address[0]:
            # multiprocessing's listener makes IPv4 sockets only.
            raise ValueError(f"IPv6 addresses are not supported ({address[0]!r}): use an IPv4 address or a Unix socket")
        return (address[0], address[1])
    if isinstance(address, os.PathLike):
        address = os.fspath(address)
    if not isinstance(address, str):
        raise TypeError(f"an address must be a socket path or (host, port), not {type(address).__name__}")
    if not address:
        raise ValueError("an address must not be empty")
    if "/" in address or ":" not in address:
        return address
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"cannot read address {address!r}: expected a socket path or HOST:PORT") from None
    return parse_address((host, number))


def format_address(address: Address) -> str:
    """The text form of an address, as ``parse_address`` reads it back."""
    if isinstance(address, tuple):
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address


def is_loopback(address: Address) -> bool:
    """True for a Unix socket or a TCP address on the loopback interface."""
    if not isinstance(address, tuple):
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_file_for(address: Address) -> Path | None:
    """Where a server on a Unix socket with a generated key writes that key (``ADDRESS.key``)."""
    if isinstance(address, tuple):
        return None
    return Path(address + ".key")


#: A key file holds 64 hex digits and a newline; anything much larger is not one.
_KEY_FILE_MAX = 4096


def _trusted_owner(uid: int) -> bool:
    """A file this process may take a key from, or trust a server behind: its own, or root's."""
    return uid in (os.geteuid(), 0)


def read_key_file(address: Address) -> bytes | None:
    """The key in ``ADDRESS.key``, if there is one and it can be trusted (``read_trusted_key``), beside a
    socket that belongs to this user or root too; ``None`` when there is no such file."""
    path = key_file_for(address)
    if path is None:
        return None
    key = read_trusted_key(path, format_address(address))
    if key is not None:
        _check_socket_owner(address, path)
    return key


def read_trusted_key(path: Path, about: str) -> bytes | None:
    """The hex key in the file ``path`` (``None`` if there is no such file), if it can be trusted.

    A key this process did not generate is only as good as the file it came from: a key that another
    user wrote, or could read, lets that user answer the challenge as the server (and a client then
    unpickles whatever that user sends), or connect to it. So the file (opened without following a
    symlink, checked on the opened descriptor) must be a regular file of this user or root that nobody
    else may read or write. Otherwise ``AccessDenied`` (about ``about``, an address) names the file.
    """
    text = about
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AccessDenied(f"the key file {path} is a symbolic link: refusing to trust it", text) from None
        raise AccessDenied(f"cannot read the key file {path}: {exc.strerror}", text) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AccessDenied(f"the key file {path} is not a regular file: refusing to trust it", text)
        if not _trusted_owner(info.st_uid):
            raise AccessDenied(
                f"the key file {path} belongs to uid {info.st_uid}, not to this user or root: refusing to trust it",
                text,
            )
        if info.st_mode & 0o066:
            raise AccessDenied(
                f"the key file {path} is readable or writable by others (mode {stat.S_IMODE(info.st_mode):04o}): "
                "refusing to trust it",
                text,
            )
        data = os.read(fd, _KEY_FILE_MAX)
    finally:
        os.close(fd)
    try:
        return bytes.fromhex(data.decode("ascii").strip())
    except ValueError:  # also UnicodeDecodeError
        raise AccessDenied(f"the key file {path} does not hold a hex key", text) from None


def _check_socket_owner(address: Address, key_path: Path) -> None:
    """The socket beside a trusted key file must be this user's or root's: a socket of another user is
    a server of that user, whatever the key file says."""
    assert isinstance(address, str)
    try:
        info = os.stat(address)
    except OSError:
        return  # nothing there (yet): connecting reports that
    if not _trusted_owner(info.st_uid):
        raise AccessDenied(
            f"the socket {address} belongs to uid {info.st_uid}, not to this user or root: refusing to use "
            f"the key in {key_path} with it",
            address,
        )


def resolve(address: object = None, authkey: object = None) -> tuple[Address, bytes | None]:
    """The address and key a client should use: the arguments, else the environment (``SHAREDSTATE_AUTHKEY``
    for ``SHAREDSTATE_ADDRESS``, or for any address when that is not set), else the key file."""
    env_address = os.environ.get(ENV_ADDRESS)
    if address is None:
        if not env_address:
            raise ServerUnavailable(
                f"no address given and {ENV_ADDRESS} is not set: start a StateServer in this process or "
                "a parent, or pass the address"
            )
        address = env_address
    parsed = parse_address(address)
    if authkey is not None:
        if isinstance(authkey, str):
            raise TypeError("authkey must be bytes, not str (use bytes.fromhex for a hex key)")
        if not isinstance(authkey, (bytes, bytearray)):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        return parsed, bytes(authkey)
    env_key = os.environ.get(ENV_AUTHKEY)
    # The variable's key is for the variable's address; set alone, for whatever address is given.
    if env_key and (not env_address or parse_address(env_address) == parsed):
        try:
            return parsed, bytes.fromhex(env_key)
        except ValueError:
            raise AccessDenied(f"{ENV_AUTHKEY} does not hold a hex key", format_address(parsed)) from None
    return parsed, read_key_file(parsed)


def _boot_scope() -> str:
    """Identifies this machine and pid namespace, so the server knows whether a client's pid means
    anything to it."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            pass
    return "|".join(parts)


BOOT_SCOPE = _boot_scope()
