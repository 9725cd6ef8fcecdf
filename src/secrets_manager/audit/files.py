"""The audit log's files one at a time: opened safely (regular files only, created 0600),
locked with a deadline, read line by line (forwards, or backwards from the end) without ever
reading a line longer than a record can be.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from secrets_manager.audit.errors import (
    RESET_HINT,
    RESTORE_HINT,
    AuditError,
    AuditTamperError,
    not_an_audit_log,
)
from secrets_manager.audit.records import chained, parse_line
from secrets_manager.durable import fsync_directory
from secrets_manager.environment import user_name
from secrets_manager.errors import InvalidInputError

_TAIL_CHUNK = 4096
PARTIAL_LIMIT = 1 << 20  # a partial record longer than this is not one a write cut short


def open_private(path: Path, flags: int) -> int:
    """Open a regular file we own, created 0600. O_NONBLOCK so a FIFO cannot block the open."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AuditError(f"{path} is a symbolic link; give the audit log's own path") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AuditError(f"{path} is not a regular file; the audit log must be one")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_for_reading(path: Path) -> BinaryIO:
    """A file of the log opened for reading. Anything but a regular file is refused as damage
    (AuditTamperError): a FIFO would hang the reader, a directory crash it, a symbolic link point
    anywhere. O_NONBLOCK so a FIFO cannot block the open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except PermissionError as exc:  # another user's file (one a root run rotated into place)
        raise AuditError(f"cannot read audit log file {path}: {exc.strerror}{_owned_by(path)}") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        fd = None
    try:
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            kind = "a symbolic link" if fd is None else "not a regular file (a directory, a FIFO?)"
            raise AuditTamperError(
                f"{path} is {kind}, so it cannot be a file of the audit log: move it away and run "
                f"'secrets-manager audit verify', or accept the loss with {RESET_HINT}"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _owned_by(path: Path) -> str:
    """Whose `path` is, and what to do, for a file of the log this user may not open."""
    try:
        owner = os.stat(path).st_uid
    except OSError:
        return ""
    if owner == os.getuid():
        return ""
    return (
        f" (it belongs to {user_name(owner)}): run the command as the store's owner, or give the "
        f"log's files back to it (chown)"
    )


def make_directory(directory: Path) -> list[Path]:
    """`directory` made (0700) if missing, with its missing parents (as mkdir -p, but 0700 each,
    not 0777 less the umask: under umask 000 others could rename the log away); the ones this
    made, outermost first."""
    missing = []
    for path in (directory, *directory.parents):
        if os.path.lexists(path):
            break
        missing.append(path)
    made = []
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        made.append(path)
        fsync_directory(path.parent)  # its name durable (the log's own directory is synced later)
    return made


def flock_with_deadline(fd: int, deadline: float) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                # timed_out, as the caller's own wait: the sink worker's flock can pass the shared
                # deadline a moment before its caller stops waiting, and then this is the error the
                # caller raises (the service records no refusal after a timeout: it would wait as
                # long again).
                raise AuditError(
                    "another process holds the audit log lock; try again",
                    timed_out=True,
                    cause="another process held the audit log's lock too long",
                ) from None
            time.sleep(0.005)


def is_seq_number(text: str) -> bool:
    """Whether a file name's suffix is a rotated file's first seq: ASCII digits only (str.isdigit
    alone takes '²', which int() refuses, and other scripts' digits, which no rotation writes)."""
    return text.isascii() and text.isdigit()


def file_stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y%m%dT%H%M%SZ")


def unused_path(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`… if it is taken (a rename would silently replace it)."""
    candidate, number = path, 1
    while os.path.lexists(candidate):
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def _identity(found: os.stat_result) -> tuple[int, int]:
    return found.st_dev, found.st_ino


def refuse_files_of_others(path: Path, others: Sequence[tuple[Path, str]]) -> None:
    """InvalidInputError (exit 2) if the audit log `path` is one of `others` (each a file and what
    it is: the store's own file, its -wal, the password file), so a writer never appends to it,
    sets its end aside or renames it. Compared by device and inode where both exist (a hard link,
    another name through a symbolic link), else by their resolved paths."""
    try:
        mine: tuple[int, int] | None = _identity(os.stat(path))
    except OSError:
        mine = None
    for other, what in others:
        try:
            same = mine is not None and mine == _identity(os.stat(other))
        except OSError:
            same = False
        if not same:
            with contextlib.suppress(OSError, RuntimeError):
                same = os.path.realpath(path) == os.path.realpath(other)
        if same:
            raise InvalidInputError(
                f"the audit log {path} is {what} ({other}), which the log would overwrite: give the "
                "audit log a file of its own (--audit-file, SECRETS_MANAGER_AUDIT_FILE, audit_file)"
            )


def read_lines(
    handle: BinaryIO,
    reader_lock: Callable[[], contextlib.AbstractContextManager[None]] | None,
    path: Path,
) -> Iterator[bytes]:
    """The lines of an open log file. A reader can see the first bytes of a write before its
    last: with `reader_lock`, a last line without its newline is read again from its start
    holding the writers' lock (no write under way then), so it is a partial record only if it
    still is (a crash's leftover). What follows it by then (more records; or, if a writer set a
    crash's partial record aside meanwhile, what replaced it) is read too. A line longer than
    any record (`PARTIAL_LIMIT`) is never read whole: AuditTamperError naming it (read whole,
    a line of gigabytes took the reader's memory, and `verify` ended in an internal error)."""
    start = number = 0
    while line := handle.readline(PARTIAL_LIMIT + 1):
        number += 1
        if len(line) > PARTIAL_LIMIT:
            raise overlong_line(path, number)
        if reader_lock is None or line.endswith(b"\n"):
            start += len(line)
            yield line
            continue
        rest: list[bytes] = []
        with reader_lock():
            handle.seek(start)
            while piece := handle.readline(PARTIAL_LIMIT + 1):
                if len(piece) > PARTIAL_LIMIT:
                    raise overlong_line(path, number + len(rest))
                rest.append(piece)
        yield from rest
        return


def overlong_line(path: Path, number: int) -> AuditTamperError:
    return AuditTamperError(
        f"audit log {path.name} line {number} is not an audit record (over {PARTIAL_LIMIT} bytes; "
        f"damaged or forged): {RESTORE_HINT}"
    )


def lines_backwards(path: Path, end: int | None) -> Iterator[bytes]:
    """The whole lines of a file (of its first `end` bytes), last first; a last line without its
    newline (a partial record) is passed over."""
    with open_for_reading(path) as handle:
        position = handle.seek(0, os.SEEK_END) if end is None else end
        rest = b""
        after_last_newline = True  # the first piece split off is what follows the last newline
        chunk_size = _TAIL_CHUNK
        while position > 0:
            start = max(0, position - chunk_size)
            handle.seek(start)
            data = handle.read(position - start) + rest
            position = start
            rest, *lines = data.split(b"\n")  # rest: a line that began before this chunk
            if after_last_newline and lines:
                lines.pop()  # empty, or a partial record
                after_last_newline = False
            yield from reversed(lines)
            chunk_size = min(chunk_size * 2, 1 << 20)
        if rest and not after_last_newline:
            yield rest


def first_record_in(path: Path) -> dict[str, Any] | None:
    with open_for_reading(path) as handle:
        line = handle.readline(PARTIAL_LIMIT + 1)  # a longer one is no record: not read whole
    return chained(parse_line(line, path, 1), path, 1) if line.strip() else None


def last_record_in(path: Path, *, end: int | None = None) -> dict[str, Any] | None:
    """The file's last record, reading backwards only as far as its start; `end`: of the file's
    first `end` bytes only."""
    with open_for_reading(path) as handle:
        if end is None:
            end = handle.seek(0, os.SEEK_END)
        if end == 0:
            return None
        chunk_size = _TAIL_CHUNK
        while True:
            start = max(0, end - chunk_size)
            handle.seek(start)
            chunk = handle.read(end - start)
            body = chunk.rstrip(b"\n")
            if b"\n" in body or start == 0:
                break
            if len(body) > PARTIAL_LIMIT:  # no record is this long: not read whole (gigabytes)
                if not starts_with_a_record(path):
                    raise not_an_audit_log(path)
                raise AuditTamperError(
                    f"audit log {path} ends in a line of over {PARTIAL_LIMIT} bytes, which is no "
                    f"record (damaged or forged): run 'secrets-manager audit verify' and restore the "
                    f"log, or accept the loss with {RESET_HINT}"
                )
            chunk_size = min(chunk_size * 4, PARTIAL_LIMIT + 2)  # a whole longest line and its newlines
    if not chunk.endswith(b"\n"):
        raise AuditError(f"audit log {path} ends in a partial record; run 'secrets-manager audit verify'")
    try:
        return chained(parse_line(body.rsplit(b"\n", 1)[-1], path, -1), path, -1)
    except AuditTamperError:
        if not starts_with_a_record(path):
            raise not_an_audit_log(path) from None
        raise AuditTamperError(
            f"audit log {path} ends in a damaged record: run 'secrets-manager audit verify' and restore "
            f"the log, or accept the loss with {RESET_HINT}"
        ) from None


def starts_with_a_record(path: Path) -> bool:
    """Whether the file's first line is a whole record (read no further than a record can be
    long: a file that is no log may have no newline for gigabytes)."""
    try:
        with open_for_reading(path) as handle:
            line = handle.readline(PARTIAL_LIMIT)
        return line.endswith(b"\n") and chained(parse_line(line, path, 1), path, 1) is not None
    except AuditTamperError:
        return False
