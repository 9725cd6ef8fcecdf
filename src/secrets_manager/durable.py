"""Making names durable: a file's fsync covers its data, not the directory entry that names it.

A rename, link or new file survives a power cut only once its directory is fsynced as well, so
every writer that publishes a file by name (the store, backups, the audit log's rotations) does
that through here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make the names created, renamed or removed in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_abandoned(path: Path, accept: Callable[[int, os.stat_result], bool]) -> None:
    """Remove `path`, a temporary file a writer killed mid-write (SIGKILL, a power cut) left: only
    a regular file (not followed if a symbolic link) that `accept(fd, its stat)` takes for one of
    ours and that no live writer holds locked (writers hold a flock on theirs while they write)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # gone meanwhile, a symbolic link, or not ours to open: left alone
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not accept(fd, info):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its writer is alive and writing it now
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    finally:
        os.close(fd)
