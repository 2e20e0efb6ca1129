"""Files written so that a crash never leaves a torn one: atomic replace, fsync of the folder, and the
clean-up of what a writer killed mid-write leaves behind."""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import psutil

log = logging.getLogger("sharedstate")


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, pieces: Iterable[str], backup: bool = True) -> None:
    """Write the text ``pieces`` to ``path`` atomically: a temporary file in the same folder (mode 0600),
    flushed and fsynced, the current file hard-linked to ``NAME.bak`` (``backup``: so a good file stays in
    place at every instant), a rename over ``path``, and an fsync of the folder."""
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        if backup and path.exists():
            bak = backup_path(path)
            bak_tmp = folder / f".{bak.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                os.link(path, bak_tmp)
            except OSError:  # no hard links here: a copy does (the snapshot stays in place meanwhile)
                bak_tmp.write_bytes(path.read_bytes())
                os.chmod(bak_tmp, 0o600)
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
