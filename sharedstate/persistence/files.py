"""Files written so that a crash never leaves a torn one: atomic replace, fsync of the file and of its
folder (``fsync``: the one call that puts data on the disk, as each platform needs it), and the clean-up
of what a writer killed mid-write leaves behind; and the checks that keep every file operation on
regular files (never a device, a FIFO or a file another user planted)."""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from sharedstate._errors import SnapshotError

log = logging.getLogger(__name__)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: Opening a FIFO for reading does not wait for a writer (no FIFOs on Windows, nor this flag).
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def fsync_call(fcntl_module: Any) -> Callable[[int], None]:
    """How a file's data is put on the disk, given the platform's ``fcntl`` module (``None`` where there is
    none): ``fcntl(fd, F_FULLFSYNC)`` where it has that (macOS, whose ``fsync`` only hands the data to
    the drive, which may lose it at a power cut), falling back to ``fsync`` where the file system refuses
    it (network and some FUSE file systems do); ``os.fsync`` everywhere else."""
    full = getattr(fcntl_module, "F_FULLFSYNC", None)
    if full is None:
        return os.fsync

    def full_fsync(fd: int) -> None:
        try:
            fcntl_module.fcntl(fd, full)
        except OSError:
            os.fsync(fd)

    return full_fsync


def dir_fsync_possible(os_name: str) -> bool:
    """Whether a folder can be opened to fsync it (``os.name``): not on Windows, where ``os.open`` of a
    directory fails; a rename there is as durable as the file system makes it."""
    return os_name != "nt"


try:
    import fcntl as _fcntl
except ImportError:  # Windows
    _fcntl = None

#: Puts the data of the open file ``fd`` on the disk: every fsync of the package goes through it.
fsync_file = fsync_call(_fcntl)
_DIR_FSYNC = dir_fsync_possible(os.name)


def fsync_dir(folder: Path) -> None:
    """Put the folder's entries (a rename, a new or removed file) on the disk; nothing on Windows."""
    if not _DIR_FSYNC:
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync_file(fd)
    finally:
        os.close(fd)


def private_folder(info: os.stat_result) -> bool:
    """Whether the ``lstat`` ``info`` is of a folder of this user that nobody else may write to (a
    symbolic link is not a folder here)."""
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_slot(path: Path, ours: bool = True, verb: str = "use") -> os.stat_result | None:
    """Refuse ``path`` if something other than a regular file is there (a directory, device, FIFO,
    socket or symbolic link), or, with ``ours``, a file that belongs to another user: the server creates
    or replaces its files there, and must never write into or through what someone else put in place.
    Return its ``lstat`` (``None``: nothing there, which is fine). ``verb`` words the error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot {verb} {path}: {exc.strerror}", str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"cannot {verb} {path}: it is {_kind(st.st_mode)}, not a regular file", str(path))
    if ours and st.st_uid != os.geteuid():
        raise SnapshotError(
            f"cannot {verb} {path}: it belongs to another user (uid {st.st_uid}), not to this server's "
            f"(uid {os.geteuid()}); remove it if it is not needed",
            str(path),
        )
    return st


def caller_target(path: object, verb: str) -> Path:
    """The file a ``save(path)``/``restore(path)`` means, resolved in the calling process (so
    ``/dev/stdout`` is the caller's, and the server, which may run elsewhere, gets a plain path).
    Raises ``SnapshotError`` if it exists and is not a regular file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError("path must be text, not bytes")
    if not text:
        raise ValueError("path must not be empty")
    # Followed first: a symlink to a device is refused even where its target has no name of its own
    # (/dev/stdout may resolve to "pipe:[123]").
    try:
        st = os.stat(text)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"cannot {verb} {text}: it is {_kind(st.st_mode)}, not a regular file", text)
    real = Path(os.path.realpath(text))
    check_slot(real, ours=False)
    return real


def read_regular(path: Path, limit: int | None = None) -> bytes | None:
    """The bytes of the regular file ``path`` (``None`` if it is missing), read without ever blocking on
    a FIFO or reading an endless device: opened non-blocking, checked on the open descriptor, and read
    up to the size it had when opened (at most ``limit`` bytes). A symbolic link there is refused, not
    followed: the server's own files are never links, and a path a caller gave was resolved by
    ``caller_target`` already, so a link here is one planted since."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {_open_failure(path, exc)}", str(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"cannot read {path}: it is {_kind(st.st_mode)}, not a regular file", str(path))
        if _NONBLOCK:
            os.set_blocking(fd, True)
        chunks, left = [], st.st_size if limit is None else min(st.st_size, limit)
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror}", str(path)) from None
    finally:
        os.close(fd)


def _open_failure(path: Path, exc: OSError) -> str:
    """Why ``open(path, O_NOFOLLOW)`` failed, in words: ELOOP there means a symbolic link."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return "it is a symbolic link, not a regular file"
    except OSError:
        pass
    return exc.strerror or str(exc)


def write_atomic(
    path: Path,
    pieces: Iterable[str],
    backup: bool = True,
    finish: Callable[[int], None] | None = None,
    ours: bool = True,
) -> None:
    """Write the text ``pieces`` to ``path`` atomically: a temporary file in the same folder (mode 0600),
    flushed and fsynced, the current file hard-linked to ``NAME.bak`` (``backup``: so a good file stays in
    place at every instant), a rename over ``path``, and an fsync of the folder. ``finish`` gets the
    temporary file's descriptor once every piece is written, before the fsync (to fill in a checksum).
    Refuses (``SnapshotError``, the file there untouched) a ``path`` that is not a regular file (a
    directory, device, FIFO, socket or symbolic link: a rename would replace the node itself, and the
    backup would be made through the link), or with ``ours`` and ``backup`` a file that belongs to another
    user (the backup would be a hard link to their file, which they could change)."""
    current = check_slot(path, ours and backup, verb="write")
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            if finish is not None:
                finish(f.fileno())
            fsync_file(f.fileno())
        if backup and current is not None:
            bak = backup_path(path)
            bak_tmp = folder / f".{bak.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                os.link(path, bak_tmp, follow_symlinks=False)
            except OSError:  # no hard links here: a copy does (the snapshot stays in place meanwhile)
                content = read_regular(path)
                if content is not None:
                    copy = os.open(bak_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
                    with os.fdopen(copy, "wb") as out:
                        out.write(content)
            if os.path.lexists(bak_tmp):
                os.replace(bak_tmp, bak)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stray_temp_files(folder: Path, prefix: str) -> None:
    """Remove the temporary files (``PREFIX….PID.RANDOM.tmp``) of writers that are no longer alive."""
    pattern = re.compile(re.escape(prefix) + r"(?:.*\.)?(\d+)\.[0-9a-f]{8}\.tmp")  # write_atomic's names
    try:
        candidates = list(folder.iterdir())
    except OSError:
        return
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match and (int(match.group(1)) == os.getpid() or not psutil.pid_exists(int(match.group(1)))):
            try:
                candidate.unlink()
                log.info("removed %s, left by a write that did not finish", candidate)
            except OSError:
                pass
