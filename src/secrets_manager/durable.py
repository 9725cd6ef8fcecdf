"""Making names durable: a file's fsync covers its data, not the directory entry that names it.

A rename, link or new file survives a power cut only once its directory is fsynced as well, so
every writer that publishes a file by name (the store, backups, the audit log's rotations) does
that through here.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make the names created, renamed or removed in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
