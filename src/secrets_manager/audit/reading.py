"""Reading an audit log: its files listed and opened as they were at one instant, its records in
order, and following it as it grows (`audit show`, `--follow`).

Readers write nothing. A reader may see the first bytes of a write before its last, and a writer
may rotate the live file between two reads: both are told apart from damage by taking the writers'
lock for a moment, never for a whole read.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from secrets_manager.audit.errors import AuditError, partial_record
from secrets_manager.audit.files import (
    PARTIAL_LIMIT,
    first_record_in,
    flock_with_deadline,
    is_seq_number,
    last_record_in,
    lines_backwards,
    open_for_reading,
    overlong_line,
    read_lines,
)
from secrets_manager.audit.records import parse_line
from secrets_manager.errors import SecretsManagerError

_SNAPSHOT_TRIES = 5  # lock-free listings of a log's files a reader tries before it takes the lock
FOLLOW_POLL_SECONDS = 0.2  # how often `audit show --follow` looks for records appended since


class LogFiles:
    """The files of one audit log (its rotated files oldest first, then the live one), read as
    readers must: never writing, never holding the writers' lock longer than a moment."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float) -> None:
        self.path = Path(path)
        self.lock_path = Path(f"{self.path}.lock")
        self.timeout = timeout  # how long a reader waits for the writers' lock, at most

    def files(self, archive: Path | None = None) -> list[Path]:
        """Rotated files oldest first, then the live file. With `archive` (a directory `audit
        prune --archive` moved files into), its files of this log too, in their place by the
        seq their name gives; a name in both is the log's own file (a prune killed before it
        removed what it copied: `verify` checks the copy holds the same bytes)."""
        rotated = {p.name: p for p in self._rotated_in(self.path.parent)}
        if archive is not None:
            rotated = {**{p.name: p for p in self._rotated_in(archive)}, **rotated}
        ordered = [rotated[name] for name in sorted(rotated)]
        return [*ordered, *([self.path] if os.path.lexists(self.path) else [])]

    def _rotated_in(self, directory: Path) -> list[Path]:
        return [
            p
            for p in directory.glob(f"{self.path.name}.*")
            if is_seq_number(p.name[len(self.path.name) + 1 :])
        ]

    def records(
        self, *, on_partial: Callable[[Path, int], None] | None = None, archive: Path | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every record in order; AuditTamperError on a line that is not a record (or a file of the
        log that is not a regular file). A partial last line (a write cut short; records() does
        not know whether records the store anchored are missing too: verify() does) is given to
        `on_partial` (its file and line number); without one, AuditPartialRecordError. With
        `archive`, the files `audit prune --archive` moved there first, as `files` orders them."""
        for _path, _number, _line, record in self._numbered_records(on_partial=on_partial, archive=archive):
            yield record

    def _numbered_records(
        self,
        *,
        locked: bool = False,
        on_partial: Callable[[Path, int], None] | None = None,
        archive: Path | None = None,
    ) -> Iterator[tuple[Path, int, bytes, dict[str, Any]]]:
        """Every record in order, with the file and line number it is on, and that line.
        `locked`: the caller holds the writers' lock (nothing changes while this reads). A partial
        last line of the live file is given to `on_partial` (its file and line number), which may
        raise; by default it raises AuditPartialRecordError."""
        files = self._snapshot(locked=locked, archive=archive)
        try:
            for path, handle in files:
                live = path == self.path
                lines = read_lines(handle, None if locked or not live else self._reader_lock, path)
                for number, line in enumerate(lines, start=1):
                    if not line.endswith(b"\n") and live:
                        if on_partial is None:
                            raise partial_record(path)
                        on_partial(path, number)
                        return
                    yield path, number, line, parse_line(line, path, number)
        finally:
            for _, handle in files:
                handle.close()

    def follow(
        self,
        stop: threading.Event,
        *,
        poll: float = FOLLOW_POLL_SECONDS,
        on_partial: Callable[[Path, int], None] | None = None,
    ) -> Iterator[Iterable[dict[str, Any]]]:
        """Every record, as one first batch, then each list of records appended since, as they
        are written, until `stop` is set (`audit show --follow`, as `tail -F`). The first batch
        streams by, to be consumed before the next is asked for: as a list, the whole of a long
        log was held in memory to show its last few records (`--follow --last 5`). A rotation is
        followed: the renamed file is read to its end (it is never written again), then the new
        live file from its start. A last line without its newline is a write under way (or a
        crash's partial record, which the next writer cuts off and sets aside): read once whole.
        One there as it starts, still there holding the writers' lock (no write under way), is a
        crash's, given to `on_partial` (its file and line number) as `records` does."""
        files = self._snapshot(locked=False)
        tail = _FollowedFile(self.path, None, self.files)

        def first() -> Iterator[dict[str, Any]]:
            for path, handle in files:
                if path == self.path:
                    tail.handle = handle
                    continue
                with handle:  # read: not held open for the whole follow (pinning a pruned file)
                    for n, line in enumerate(read_lines(handle, None, path), start=1):
                        yield tail.seen(parse_line(line, path, n))
            yield from tail.read()
            if on_partial is not None and tail.partial():
                with self._reader_lock():
                    completed = tail.read()
                yield from completed
                if tail.partial():
                    on_partial(self.path, tail.number + 1)

        try:
            yield first()
            while not stop.wait(poll):
                appended = tail.read()
                if appended:
                    yield appended
        finally:
            for _, handle in files:
                handle.close()
            tail.close()

    def _snapshot(self, *, locked: bool, archive: Path | None = None) -> list[tuple[Path, BinaryIO]]:
        """Every file of the log opened, as they were at one instant. A writer that rotated the
        live file between a reader's listing and its opening made the reader miss the rotated
        file and read the new live one in its place: a false 'chain broken' or 'records are
        missing at the end' (with the default 10 MiB limit, a cron verify alerted at every
        rotation). So the files are listed, opened and listed again, until the two listings
        agree; after a few tries (a log rotating all the time) they are opened holding the
        writers' lock, which only takes as long as the opens. An open file stays whole: a rotated
        file is never written again, and the live one only grows (or is rotated whole)."""
        for _ in range(1 if locked else _SNAPSHOT_TRIES):
            opened = self._open_listed(archive)
            if opened is not None:
                return opened
        if not locked:
            with self._reader_lock():
                opened = self._open_listed(archive)
            if opened is not None:
                return opened
        raise AuditError(f"the files of audit log {self.path} kept changing while they were read; try again")

    def _open_listed(self, archive: Path | None = None) -> list[tuple[Path, BinaryIO]] | None:
        """The log's files opened; None if one was renamed, replaced or added meanwhile."""
        listed = self._listing(archive)
        if listed is None:
            return None
        opened: list[tuple[Path, BinaryIO]] = []
        consistent = False
        try:
            for path, inode in listed:
                try:
                    handle = open_for_reading(path)
                except FileNotFoundError:
                    break
                opened.append((path, handle))
                if os.fstat(handle.fileno()).st_ino != inode:
                    break
            else:
                consistent = self._listing(archive) == listed
        finally:
            if not consistent:
                for _, handle in opened:
                    handle.close()
        return opened if consistent else None

    def _listing(self, archive: Path | None = None) -> list[tuple[Path, int]] | None:
        """The log's files in order with their inodes; None if one went while they were listed."""
        listing = []
        for path in self.files(archive):
            try:
                listing.append((path, os.lstat(path).st_ino))
            except FileNotFoundError:
                return None
        return listing

    @contextlib.contextmanager
    def _reader_lock(self) -> Iterator[None]:
        """The writers' lock, held for a moment by a reader, which writes nothing: on a descriptor
        of its own, and never creating the lock file (without one, no writer is at work). Raises
        AuditError if a writer holds it beyond the timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except (FileNotFoundError, PermissionError):
                yield
                return
            try:
                flock_with_deadline(fd, deadline)
                if os.fstat(fd).st_nlink > 0:  # else deleted meanwhile: not the lock any more
                    yield
                    return
            finally:
                os.close(fd)  # and its flock

    def first_seq(self) -> int | None:
        """The seq of the log's oldest record (above 1 once `audit prune` removed files); None
        if the log holds none."""
        for path in self.files():
            record = first_record_in(path)
            if record is not None:
                return int(record["seq"])
        return None

    def last_record(self) -> dict[str, Any] | None:
        if self.path.exists():  # the common case: no need to look for rotated files
            record = last_record_in(self.path)
            if record is not None:
                return record
        for path in reversed(self.files()):
            record = last_record_in(path)
            if record is not None:
                return record
        return None

    def unfinished_change(self, *, look_back: int = 1000) -> dict[str, Any] | None:
        """The newest change the log holds, if it has no outcome: its `pending` record (written
        before the change began) is followed by no record but refused unlocks. A command killed
        part-way leaves this; after a killed `passwd` it tells a user refused with the old
        password that the new one may hold. Reads the live file's last `look_back` records at
        most; None when there is no live file, or it cannot be read: it is a hint, never a check."""
        try:
            for line in itertools.islice(lines_backwards(self.path, None), look_back):
                record = parse_line(line, self.path, -1)
                if record.get("operation") == "unlock" and record.get("decision") == "deny":
                    continue
                return record if record.get("outcome") == "pending" else None
        except (OSError, SecretsManagerError):
            return None
        return None


class _FollowedFile:
    """The live file as `follow` reads it: whole lines from where it left off, and on to the next
    live file once a writer has rotated this one (or `audit reset` replaced it)."""

    def __init__(self, path: Path, handle: BinaryIO | None, files: Callable[[], list[Path]]) -> None:
        self.path = path
        self.handle = handle  # None: no live file yet
        self.offset = 0  # just past the last whole line read
        self.number = 0  # lines read, for an error's line number
        self.files = files  # the log's files, rotated ones oldest first
        self.last_seq: int | None = None  # the last record's, read from any file

    def seen(self, record: dict[str, Any]) -> dict[str, Any]:
        seq = record.get("seq")
        if type(seq) is int:
            self.last_seq = seq
        return record

    def read(self) -> list[dict[str, Any]]:
        """The records appended since the last read, the rotated file's last ones first."""
        records = self._whole_lines()
        if self._replaced():
            records += self._whole_lines()  # the rest of the renamed file: complete by now
            self.close()
            try:
                self.handle = open_for_reading(self.path)
            except FileNotFoundError:  # renamed again already: the next read finds the new one
                self.handle = None
            self.offset = self.number = 0
            records += self._rotated_between()
            records += self._whole_lines()
        return records

    def _rotated_between(self) -> list[dict[str, Any]]:
        """The files rotated after the one read to its end and before the one now open: on a busy
        log the live file can be rotated twice between two reads, and the file between (never
        open here) was skipped whole. Those whose first record (their name's number) is past the
        last one read, in order, up to the file now open if it was rotated meanwhile too (read
        after that one, once it is found replaced)."""
        if self.last_seq is None:
            return []
        current = os.fstat(self.handle.fileno()).st_ino if self.handle is not None else None
        records: list[dict[str, Any]] = []
        for path in self.files():
            number = path.name[len(self.path.name) + 1 :]
            if path == self.path or not is_seq_number(number) or int(number) <= self.last_seq:
                continue
            try:
                handle = open_for_reading(path)
            except FileNotFoundError:  # pruned meanwhile
                continue
            with handle:
                if os.fstat(handle.fileno()).st_ino == current:
                    break
                for n, line in enumerate(read_lines(handle, None, path), start=1):
                    if line.endswith(b"\n"):  # a rotated file never ends in a partial record
                        records.append(self.seen(parse_line(line, path, n)))
        return records

    def _whole_lines(self) -> list[dict[str, Any]]:
        if self.handle is None:
            return []
        if os.fstat(self.handle.fileno()).st_size < self.offset:  # emptied in place: read anew
            self.offset = self.number = 0
        self.handle.seek(self.offset)
        records = []
        # Line by line, none longer than a record can be: a line of gigabytes (damaged or forged)
        # is named, not read whole; one without its newline is read again, whole, next time.
        while line := self.handle.readline(PARTIAL_LIMIT + 1):
            if len(line) > PARTIAL_LIMIT:
                raise overlong_line(self.path, self.number + 1)
            if not line.endswith(b"\n"):
                break
            self.offset += len(line)
            self.number += 1
            records.append(self.seen(parse_line(line, self.path, self.number)))
        return records

    def partial(self) -> bool:
        """Whether the file read ends in a line without its newline."""
        return self.handle is not None and os.fstat(self.handle.fileno()).st_size > self.offset

    def _replaced(self) -> bool:
        """Whether another file than the one read is at the path now."""
        try:
            at_path = os.lstat(self.path).st_ino
        except FileNotFoundError:  # renamed, its successor not made yet
            return False
        return self.handle is None or os.fstat(self.handle.fileno()).st_ino != at_path

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
