"""Pruning an audit log (`audit prune`): which rotated files may go, and archiving them
(`--archive`) durably and never over another file.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secrets_manager.audit.errors import AuditError
from secrets_manager.audit.files import first_record_in, last_record_in, open_for_reading
from secrets_manager.audit.reading import LogFiles
from secrets_manager.durable import fsync_directory, remove_abandoned
from secrets_manager.errors import ConflictError, InvalidInputError
from secrets_manager.store.base import Anchor


@dataclass(frozen=True)
class PrunedFile:
    """A rotated file `audit prune` removes: its records and its newest record's time."""

    path: Path
    first_seq: int
    last_seq: int
    last_time: str
    last_hash: str


@dataclass(frozen=True)
class Pruned:
    """What `AuditLog.prune` removed (or, in a dry run, would remove), oldest first."""

    files: list[PrunedFile]
    records: int  # the records of the log, which verified, before anything was removed
    archived: list[Path]  # where each file went, with an archive directory


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """Which file is at `path`, and whether it changed: inode, size, modification time (None:
    no file there any more)."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


def _record_moment(record: dict[str, Any]) -> datetime:
    """A record's time; one that does not parse as an aware time counts as the latest possible,
    so a damaged time never makes a file look old enough to prune."""
    try:
        moment = datetime.fromisoformat(str(record.get("time")))
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)
    return moment if moment.tzinfo is not None else datetime.max.replace(tzinfo=UTC)


def archive_directory(directory: Path) -> None:
    """InvalidInputError unless `directory` is one (`audit prune --archive`), whether or not any
    file is due to go there this time."""
    if not directory.is_dir():
        raise InvalidInputError(
            f"archive directory {directory} does not exist: create it, or leave --archive out"
        )


def archive_targets(files: Sequence[PrunedFile], directory: Path) -> list[Path]:
    """Where each file goes in `directory`: refused before anything is written if the directory
    is missing or already holds a file of that name (an archive is never overwritten)."""
    archive_directory(directory)
    targets = [directory / found.path.name for found in files]
    taken = [
        target
        for found, target in zip(files, targets, strict=True)
        if os.path.lexists(target) and not _archived_already(found.path, target)
    ]
    if taken:
        raise ConflictError(
            f"{taken[0]} already exists: an archive is never overwritten; move it away or archive elsewhere"
        )
    return targets


def _archived_already(source: Path, target: Path) -> bool:
    """Whether `target` is a regular file holding exactly what `source` holds: the copy a prune
    killed before it removed `source` made (it is linked into place complete, or not at all), which
    the next prune need not, and must not refuse to, make again. Only such a copy: this user's,
    that group and others may not write (a prune makes it 0600), and never `source` itself under
    another name (`--archive` naming the log's own directory, a hard link), which the prune would
    then delete with no copy left."""
    try:
        found = os.lstat(target)
        if (
            not stat.S_ISREG(found.st_mode)
            or found.st_uid != os.geteuid()
            or stat.S_IMODE(found.st_mode) & 0o022
            or os.path.samestat(found, os.stat(source))
        ):
            return False
        with open_for_reading(source) as original, target.open("rb") as copy:
            while chunk := original.read(1 << 20):
                if copy.read(len(chunk)) != chunk:
                    return False
            return not copy.read(1)
    except OSError:
        return False


def _archive_file(source: Path, target: Path) -> None:
    """Copy a log file to `target` (0600), durably, never over an existing file: written under a
    temporary name, fsynced, then linked in place, so a crash leaves no half-copied archive. The
    temporary copy is locked while it is written: one a killed prune left (unlocked, under another
    pid) is removed first, so none stays in the archive for good."""
    _remove_abandoned_copies(target)
    temporary = target.with_name(f"{_ARCHIVE_COPY_PREFIX.format(target.name)}{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks the copy as being written
        with open_for_reading(source) as reader, os.fdopen(fd, "wb", closefd=False) as writer:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink()
        raise
    os.close(fd)
    try:
        os.link(temporary, target)
    finally:
        temporary.unlink()
    fsync_directory(target.parent)


_ARCHIVE_COPY_PREFIX = ".{}.partial-"  # then the pid of the prune writing it


def _remove_abandoned_copies(target: Path) -> None:
    """Remove the temporary copies of `target` that prunes killed while archiving it left beside
    it (regular files of ours, `.NAME.partial-<pid>`, that no live prune holds locked)."""
    prefix = _ARCHIVE_COPY_PREFIX.format(target.name)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name[len(prefix) :].isdigit() and name.isascii():
            remove_abandoned(target.parent / name, lambda _fd, info: info.st_uid == os.geteuid())


def prunable(
    log: LogFiles,
    anchored: Anchor | None,
    older_than: datetime | None,
    keep_files: int | None,
    verified: dict[Path, tuple[int, int, int] | None],
) -> list[PrunedFile]:
    """Holding the lock: the oldest rotated files that may go, oldest first (see AuditLog.prune); the
    run stops at a file that is not as the verification read it."""
    rotated = [path for path in log.files() if path != log.path]
    if keep_files is not None:
        rotated = rotated[: max(0, len(rotated) - keep_files)]
    chosen = []
    for path in rotated:
        identity = file_identity(path)
        if identity is None or verified.get(path) != identity:
            break
        first, last = first_record_in(path), last_record_in(path)
        if first is None or last is None or anchored is None or last["seq"] > anchored.seq:
            break
        if older_than is not None and _record_moment(last) >= older_than:
            break
        chosen.append(PrunedFile(path, first["seq"], last["seq"], str(last["time"]), last["hash"]))
    return chosen


def remove_pruned(chosen: Sequence[PrunedFile], targets: Sequence[Path], directory: Path) -> None:
    """Delete the files chosen, each archived first where `targets` names a place, then fsync the
    log's `directory`; AuditError saying how far it got if a step fails (the log still verifies)."""
    done = 0
    try:
        for found, target in itertools.zip_longest(chosen, targets):
            if target is not None and not _archived_already(found.path, target):
                _archive_file(found.path, target)
            found.path.unlink()
            done += 1
        fsync_directory(directory)
    except OSError as exc:
        raise AuditError(
            f"audit prune removed {done} of {len(chosen)} files, then {exc.strerror or exc} "
            f"({getattr(exc, 'filename', None) or directory}); the log still verifies: "
            "fix that and run the prune again"
        ) from None
