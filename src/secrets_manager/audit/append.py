"""Appending to the audit log: the chained, MAC'd records written with one lock, one write and one
fsync per batch (group commit by the sink worker), rotated when full, and the store's anchor moved
to them (docs/audit.md).

Writers serialise on an flock of `<file>.lock`. All sink I/O runs with a deadline: a stuck sink
fails the operation instead of hanging it. Failures raise `AuditError`; callers fail closed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secrets_manager.audit.anchor import (
    AuditAnchor,
    another_stores_log,
    check_tail_against_anchor,
    missing_anchor,
)
from secrets_manager.audit.errors import RESET_HINT, AuditError, AuditTamperError, not_an_audit_log
from secrets_manager.audit.files import (
    PARTIAL_LIMIT,
    file_stamp,
    first_record_in,
    flock_with_deadline,
    last_record_in,
    lines_backwards,
    make_directory,
    open_private,
    starts_with_a_record,
    unused_path,
)
from secrets_manager.audit.reading import LogFiles
from secrets_manager.audit.records import (
    GENESIS_HASH,
    KEY_ROTATION,
    RECORD_START,
    AuditEvent,
    canonical,
    generation_after,
    key_generation,
    parse_line,
    record_hash,
    record_verifies,
    with_hash_and_mac,
)
from secrets_manager.audit.sink import AppendJob, SinkWorker
from secrets_manager.crypto.mac import record_mac, sha256_hex
from secrets_manager.durable import fsync_directory
from secrets_manager.environment import Environment
from secrets_manager.errors import SecretsManagerError, StoreBusyError, StoreClosedError, StoreReadOnlyError
from secrets_manager.store.base import Anchor

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_FLUSH_INTERVAL_SECONDS = 0.01
# Anchor updates hold the log's locks, so every append waits for them. A deferred flush's update
# waits this long at most for another writer's lock on the store (a big restore or import is one
# long commit); on a busy store the anchor lags, and flushes leave it alone for the backoff after.
FLUSH_ANCHOR_LOCK_WAIT_SECONDS = 0.1
FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS = 1.0
# An anchor a flush could not move (the store busy, or another process holding the log) is owed:
# the sink worker tries again after the backoff, or this soon when the log's flock was taken.
ANCHOR_FLOCK_RETRY_SECONDS = 0.05
# A durable append's anchor update gives up this long before its caller would, so the caller
# hears that the store's lock was busy, not that the log did not answer.
ANCHOR_ANSWER_MARGIN_SECONDS = 0.25
# Below this much free space on the log's filesystem a record may not fit (the longest are a few
# KiB; a rotation writes a new file's first record too): `require_space` fails, so the service's
# health says NOT_SERVING for as long as the disk is full, rather than SERVING between refusals.
MIN_FREE_BYTES = 64 * 1024


class LogWriter(LogFiles):
    """The write path of one audit log: its records appended, fsynced and anchored, its live file
    rotated. The state below is this process's view of the log between appends."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.time,
        environment: Environment = Environment.DEVELOPMENT,
    ) -> None:
        super().__init__(path, timeout=timeout)
        # A log or lock file group or others can write (they could edit or truncate records, or
        # hold the lock) is refused in production and warned of elsewhere, once per file.
        self._environment = environment
        self._warned_loose: set[str] = set()
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self._clock = clock
        # Guards the file state below between this process's threads; the flock guards it
        # between processes. Held only around a write, never while waiting for a caller.
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # held by a deferred flush from start to end
        self._tail: _Tail | None = None
        self._lock_fd: int | None = None
        # What this process created to lock a log that does not exist yet (the lock file, then
        # the directories it made for it, innermost first), until the log is written: removed
        # again if the log is refused (a mistyped --audit-file must leave nothing behind).
        self._created: list[Path] | None = None
        self._file: tuple[int, int] | None = None  # the live file: descriptor and inode
        self._file_locked = False  # whether this holds the live file's flock (with the lock file's)
        self._unsynced: _Unsynced | None = None
        # The live file was opened since the log's directory was last fsynced: its name, and a
        # rotation's rename before it (or another writer's, killed before it synced them), may not
        # be on disk yet. Fsyncing a file keeps its bytes, not its directory entry, so until the
        # directory is fsynced a power cut could take the file with records already fsynced and
        # anchored (a chain that no longer verifies): it is, before the first record in the file
        # is durable (a durable append's fsync, or the flush of non-durable ones).
        self._name_unsynced = False
        # This process's newest fsynced record not yet anchored (a flush or durable append could
        # not move the anchor): the sink worker retries until it moves or is no longer needed.
        self._owed: _Owed | None = None
        self._owed_since: float | None = None  # monotonic: since when an anchor has been owed
        self._writes = 0  # records written by this process so far: orders the tails it left
        self._failure: str | None = None
        self._second: tuple[int, str] | None = None  # a second and its formatted date and time
        self._anchor_busy_until = 0.0  # monotonic: deferred flushes do not anchor before this
        self._store_asked_at: float | None = None  # a call into the store is under way, since then
        self._worker = SinkWorker(self._write_batch, self._flush_from_worker)

    def append(
        self, events: Sequence[AuditEvent], anchor: AuditAnchor | None, *, durable: bool = True
    ) -> list[dict[str, Any]]:
        """Append records and return them once they are written.

        durable=True (every change, and every CLI operation): the records are fsynced and the
        store's anchor moved before this returns. Concurrent callers are group-committed: the
        sink worker writes every waiting record with one lock, one write, one fsync and one
        anchor update. durable=False (the service's reads, by default): the records are in the
        file — the OS has them, so a crash of this process loses none — before this returns;
        the fsync and the anchor follow within `flush_interval` seconds, for every record
        written in that window at once. That is what Vault's file audit device promises
        (written before the response, never fsynced), plus the bounded fsync.

        Raises AuditError if this does not happen within `timeout` seconds, or if an earlier
        deferred fsync failed (the log may have lost records: every later request is refused).
        `anchor` is None only for a writer that could not unlock the store (a denied unlock):
        such records carry no MAC and do not move the anchor.
        """
        self._raise_if_failed()
        # One timeout for the whole append: a wait for this process's lock (the worker holding it
        # for a flush that waits on a stuck writer) and then for the worker share it, or the
        # caller waited up to twice the timeout.
        deadline = time.monotonic() + self.timeout
        if not durable:
            records = self._append_here(list(events), anchor, deadline)
            if records is not None:
                return records
        job = AppendJob(list(events), anchor, durable=durable, done=threading.Event(), deadline=deadline)
        self._worker.submit(job)
        assert job.done is not None
        if not job.done.wait(max(0.0, deadline - time.monotonic())):
            job.abandoned = True
            raise self._timed_out()
        if job.error is not None:
            if isinstance(job.error, SecretsManagerError):
                raise job.error
            if isinstance(job.error, OSError):
                cause = f"cannot write audit log {self.path}: {job.error.strerror or job.error}"
                raise AuditError(
                    f"{cause}; the operation was refused{_remedy(job.error)}", cause=cause
                ) from None
            raise job.error
        return job.records

    def flush(self) -> None:
        """Fsync records appended with durable=False and anchor them now (e.g. at shutdown)."""
        self._flush()
        self._raise_if_failed()

    def _append_here(
        self, events: list[AuditEvent], anchor: AuditAnchor | None, deadline: float
    ) -> list[dict[str, Any]] | None:
        """A non-durable append on the caller's thread: no hand-off to the worker, no fsync.

        Returns None when another process holds the log's lock: the caller then queues the
        records for the worker, which waits for the lock until the same `deadline`."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._timed_out()
        try:
            if not self._flock(deadline=None):
                return None
            try:
                job = AppendJob(events, anchor, durable=False)
                self._write_locked([job], anchor, durable=False)
            except BaseException:
                self._remove_what_was_created()  # if this made the lock file for a log it refused
                raise
            finally:
                self._unflock()
        except OSError as exc:
            cause = f"cannot write audit log {self.path}: {exc.strerror or exc}"
            raise AuditError(f"{cause}; the operation was refused{_remedy(exc)}", cause=cause) from None
        finally:
            self._lock.release()
        self._worker.flush_within(self.flush_interval)
        return job.records

    def _write_batch(self, jobs: list[AppendJob]) -> None:
        """On the worker: write runs of jobs that share an anchor and durability together."""
        live = [job for job in jobs if not job.abandoned]
        while live:
            first = live[0]
            size = next(
                (
                    i
                    for i, job in enumerate(live)
                    if job.anchor is not first.anchor or job.durable != first.durable
                ),
                len(live),
            )
            group = live[:size]
            live = live[len(group) :]
            try:
                self._write_group(group)
            except BaseException as exc:
                for job in group:
                    job.error = exc
            finally:
                for job in group:
                    if job.done is not None:
                        job.done.set()

    def _write_group(self, jobs: list[AppendJob]) -> None:
        anchor, durable = jobs[0].anchor, jobs[0].durable
        with self._lock:
            self._flock(deadline=time.monotonic() + self.timeout)
            try:
                self._write_locked(jobs, anchor, durable=durable)
            except BaseException:
                self._remove_what_was_created()  # if this made the lock file for a log it refused
                raise
            finally:
                self._unflock()
        if not durable:
            self._worker.flush_within(self.flush_interval)

    # The lock file and the live file stay open between appends (opening, checking and closing
    # them was most of a non-durable append). Both are reopened when they are not the files at
    # their paths any more: the lock file was deleted, the live file rotated or replaced.

    def _flock(self, *, deadline: float | None) -> bool:
        """Take the cross-process lock: once (deadline None; False if busy) or until `deadline`.

        A lock file deleted meanwhile (by a writer that created it for a log it then refused, or
        by hand) is not the lock any more: it is checked once held, and the one at the path is
        locked instead, so two writers never each hold a different file."""
        while True:
            fd = self._lock_fd
            if fd is None:
                fd = self._lock_fd = self._open_lock_file()
            if deadline is not None:
                flock_with_deadline(fd, deadline)
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
            if os.fstat(fd).st_nlink > 0:
                return True
            self._lock_fd = None
            os.close(fd)  # and its flock

    def _open_lock_file(self) -> int:
        """Open (creating it and its directory if need be) the lock file, noting in `_created`
        what this made, until a record is written (a refused log leaves none of it behind)."""
        retries = 2
        while True:
            made = make_directory(self.path.parent)
            try:
                fd = open_private(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return self._guarded(open_private(self.lock_path, os.O_RDWR | os.O_CREAT), self.lock_path)
            except FileNotFoundError:  # a refused writer removed the directory it had made
                if not retries:
                    raise
                retries -= 1
                continue
            self._created = [self.lock_path, *reversed(made)]
            return fd

    def _guarded(self, fd: int, path: Path) -> int:
        """`fd`, the log's file or lock file `path` as opened, unless group or others can write
        it: production refuses that (the descriptor closed), elsewhere it is a warning."""
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if not mode & 0o022 or (str(path) in self._warned_loose and not self._environment.is_production):
            return fd
        problem = (
            f"audit log file {path} has mode {mode:04o}, which group or others can write (they could "
            f"edit or remove records); run 'chmod 600 {path}'"
        )
        try:
            self._environment.guard(problem)
        except BaseException:
            os.close(fd)
            raise
        self._warned_loose.add(str(path))
        return fd

    def _remove_what_was_created(self) -> None:
        """Holding the flock, for a log not created after all (refused, or its anchor unreadable):
        remove the lock file and the directories this process made for it (a directory something
        else now holds stays)."""
        created, self._created = self._created, None
        fd = self._lock_fd
        if created is None or fd is None:
            return
        lock_file, *directories = created
        with contextlib.suppress(OSError):
            if os.stat(lock_file, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock_file)  # waiters on it see st_nlink 0 and lock the path afresh
        self._lock_fd = None
        os.close(fd)
        for directory in directories:
            try:
                directory.rmdir()
            except OSError:
                break

    def _remove_lock_file(self) -> None:
        """Holding the flock, once the log's files are gone for good (adopted under another name):
        remove its lock file, so nothing is left under the old name (a waiter sees st_nlink 0)."""
        fd = self._lock_fd
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.lock_path)

    def _unflock(self) -> None:
        if self._file_locked and self._file is not None:
            fcntl.flock(self._file[0], fcntl.LOCK_UN)
        self._file_locked = False
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _live_file(self, anchor: AuditAnchor | None) -> tuple[int, os.stat_result]:
        """Holding both locks: the live file (rotated first if full) open for appending, and its
        state before this append. A missing one is checked against the store's anchor before it
        is created, so a mistyped --audit-file leaves no empty log behind."""
        try:
            now: os.stat_result | None = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
            if anchor is not None:
                try:
                    self._check_tail(self.last_record(), anchor)
                except BaseException:
                    # Refused (a mistyped --audit-file), or the anchor could not be read (a Vault
                    # or AWS store that is unreachable or refuses us): nothing is written, so
                    # nothing this made for the log stays behind.
                    self._remove_what_was_created()
                    raise
        while True:
            if now is None or self._file is None or now.st_ino != self._file[1]:
                if self._file is not None:
                    old, self._file = self._file[0], None
                    os.close(old)
                fd = self._guarded(open_private(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND), self.path)
                self._file = (fd, os.fstat(fd).st_ino)
                self._name_unsynced = True
            # The live file is locked too: a lock file deleted while a writer held it (by hand)
            # let a second writer lock a new one and append at once (a duplicate seq, a forked
            # chain). The live file cannot go without that being tampering the anchor shows;
            # held, it is checked to be still the file at the path (another writer rotated it).
            fd = self._file[0]
            flock_with_deadline(fd, time.monotonic() + self.timeout)
            self._file_locked = True
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and now.st_ino == self._file[1]:
                if now.st_size < self.max_bytes or not self._rotate(anchor):
                    return fd, os.fstat(fd)
                now = None  # rotated: a new live file
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._file_locked = False

    def _write_locked(self, jobs: list[AppendJob], anchor: AuditAnchor | None, *, durable: bool) -> None:
        """Holding both locks: chain the jobs' records onto the tail, write them, and (durable)
        fsync them and move the anchor. A partial record at the end of the file (a write a crash
        cut short: never acknowledged) is first set aside, and an `audit.repair` record says so."""
        fd, before = self._live_file(anchor)
        tail = self._tail
        repair: list[tuple[AppendJob | None, AuditEvent]] = []
        first = next((event for job in jobs for event in job.events), None)
        changed = tail is None or (before.st_ino, before.st_size) != tail.stamp
        # Only an authenticated writer repairs: its audit.repair record carries a MAC.
        repairing = first is not None and anchor is not None and before.st_size > 0 and changed
        if (
            repairing
            and first is not None
            and anchor is not None
            and self._set_aside_partial_record(fd, before.st_size, anchor)
        ):
            before = os.fstat(fd)
            repaired = AuditEvent("audit.repair", first.actor, first.source, outcome="partial_set_aside")
            repair.append((None, repaired))
        seq, previous, generation = self._tail_of(before, anchor)
        first_seq = seq
        with self._asking_store():
            keys = None if anchor is None else self._keys_reaching(anchor, generation)
            if (
                anchor is not None
                and seq == 0
                and not anchor.audit_anchor_scoped
                and anchor.audit_anchor() is None
            ):
                # The first records of this log: the store vouches for the empty chain first (seq
                # 0), so a log holding authenticated records always has an anchor, and one missing
                # is tampering (the row deleted), not an anchor this append could not move (the
                # store busy, a crash after the fsync). Refused, with nothing written, if it cannot be.
                anchor.set_audit_anchor(Anchor(seq=0, hash=GENESIS_HASH), lock_wait=self._lock_wait_of(jobs))
        now = self._timestamp(self._clock())
        lines = []
        entries = [*repair, *((job, event) for job in jobs for event in job.events)]
        if keys is not None:
            # The log moves to the store's newest audit key with a rotation record under the key
            # in force before it: the one `audit rotate-key` appends, else one this writer adds
            # (the rotation's own record was lost to a crash, or it went to another host's log),
            # so no record is ever MAC'd under a key the chain has not named.
            generation = entries_rotated_to(entries, generation, len(keys))
        lines_generation = generation
        for owner, event in entries:
            seq += 1
            record: dict[str, Any] = {"seq": seq, "time": now, **event.as_record(), "prev": previous}
            if keys is not None and lines_generation is not None and lines_generation > 1:
                record["key_id"] = lines_generation
            if keys is not None and _fingerprinted_under_another_key(event.value_hmac, lines_generation):
                # A read made just before this process met a rotation: its fingerprint is under
                # the key before, which a holder of that key could test guesses against.
                record["value_hmac"] = None
            body = canonical(record)
            record["hash"] = previous = sha256_hex(body)
            record["mac"] = (
                None
                if keys is None or lines_generation is None
                else record_mac(keys[lines_generation - 1], previous)
            )
            if keys is not None and event.operation == KEY_ROTATION and event.outcome == "ok":
                lines_generation = event.version
            if owner is not None:
                owner.records.append(record)
            lines.append(with_hash_and_mac(body, record["hash"], record["mac"]))
        if seq == first_seq:
            return
        data = b"".join(lines)
        self._tail = None  # until the write is known to be whole
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "no space left on its device (a short write)")
            if durable:
                os.fsync(fd)
                unsynced = self._unsynced
                if self._name_unsynced or (
                    unsynced is not None and unsynced.inode == before.st_ino and unsynced.directory
                ):
                    fsync_directory(self.path.parent)
                    self._name_unsynced = False
        except OSError:
            os.ftruncate(fd, before.st_size)  # never leave half a record behind
            raise
        self._writes += 1
        written = self._tail = _Tail(
            before.st_ino, before.st_size + len(data), seq, previous, self._writes, lines_generation
        )
        self._created = None  # a record is written: the lock file and its directory are in use
        if not durable:
            self._note_unsynced(fd, before.st_ino, anchor)
            return
        if self._unsynced is not None and self._unsynced.inode == before.st_ino:
            unsynced, self._unsynced = self._unsynced, None
            unsynced.close()  # this fsync covered those records too
        if anchor is not None:
            try:
                with self._asking_store():
                    anchor.set_audit_anchor(
                        Anchor(seq=seq, hash=previous), lock_wait=self._lock_wait_of(jobs)
                    )
            except StoreBusyError as exc:
                # A change's "pending" record is refused: the change is not made. Any other record
                # reports an operation already done; refusing it would misstate it (a caller would
                # retry a change that stands). Those records are written and fsynced: only the
                # anchor lags, and is owed, as after a deferred flush (the worker retries it).
                refused = StoreBusyError(
                    f"audit log {self.path} could not be anchored, so the operation was refused: {exc}"
                )
                for job in jobs:
                    if all(event.outcome == "pending" for event in job.events):
                        job.error = refused
                self._owe_locked(_Owed(written, anchor))
                self._anchor_busy_until = time.monotonic() + FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS
                self._worker.retry_within(FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS)
            except StoreReadOnlyError:
                # A store this process can only read: its records are written and fsynced,
                # chained and signed, and the anchor stays owed; this handle can never move it,
                # so nothing retries. A later append through a writable handle (the store made
                # writable again) anchors past them. No change can be made through this handle
                # either (its own commit is refused), so a "pending" record is not refused.
                self._owe_locked(_Owed(written, anchor))
            else:
                self._owed = self._owed_since = None  # this record is anchored: older ones are too

    @staticmethod
    def _lock_wait_of(jobs: list[AppendJob]) -> float | None:
        """How long an anchor update may wait for the store's lock: until just before the first
        job's caller gives up (None: no deadline)."""
        waits = [job.deadline for job in jobs if job.deadline is not None]
        if not waits:
            return None
        return max(0.0, min(waits) - time.monotonic() - ANCHOR_ANSWER_MARGIN_SECONDS)

    def _set_aside_partial_record(self, fd: int, size: int, anchor: AuditAnchor) -> Path | None:
        """If the live file ends in a partial line, move that line to `<file>.partial-<time>`
        (kept for inspection), cut the file after its last whole record and return where it went.
        Only a crash's leftover is: if records the store anchored are missing before it (the tail
        cut through an anchored record), AuditTamperError, and nothing is changed."""
        if os.pread(fd, 1, size - 1) == b"\n":
            return None
        window = min(size, PARTIAL_LIMIT)
        chunk = os.pread(fd, window, size - window)
        cut = chunk.rfind(b"\n")
        if cut < 0 and window < size:
            raise AuditError(
                f"audit log {self.path} ends in over {PARTIAL_LIMIT} bytes that are not a record; "
                "run 'secrets-manager audit verify'"
            )
        keep = size - window + cut + 1
        # Nothing is changed before the file is known to be a log: a write cut short leaves the
        # start of a record (canonical JSON: its first key is "actor"), and the file starts with a
        # whole record unless that partial write was its first. Anything else (a wrong
        # --audit-file: notes, the store file) is refused as it is, byte for byte.
        partial = chunk[cut + 1 : cut + 1 + len(RECORD_START)]
        if not RECORD_START.startswith(partial) or (keep and not starts_with_a_record(self.path)):
            raise not_an_audit_log(self.path)
        last = last_record_in(self.path, end=keep) if keep else self._last_rotated_record()
        self._check_tail(last, anchor, live_end=keep)
        aside = unused_path(self.path.with_name(f"{self.path.name}.partial-{file_stamp(self._clock())}"))
        aside_fd = open_private(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(aside_fd, chunk[cut + 1 :])
            os.fsync(aside_fd)
        finally:
            os.close(aside_fd)
        os.ftruncate(fd, keep)
        os.fsync(fd)
        self._tail = None
        return aside

    def _last_rotated_record(self) -> dict[str, Any] | None:
        for path in reversed(self.files()):
            if path != self.path:
                record = last_record_in(path)
                if record is not None:
                    return record
        return None

    def _timestamp(self, epoch: float) -> str:
        """`epoch` as ISO 8601 UTC with microseconds, like datetime.isoformat: the date and time
        of day are formatted once per second (most of the cost, paid on every record before)."""
        fraction, whole = math.modf(epoch)  # the rounding datetime.fromtimestamp does
        second, micro = int(whole), round(fraction * 1_000_000)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        elif micro < 0:  # before 1970
            second, micro = second - 1, micro + 1_000_000
        formatted = self._second
        if formatted is None or formatted[0] != second:
            formatted = self._second = (
                second,
                datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            )
        return f"{formatted[1]}.{micro:06d}+00:00"

    def _tail_of(self, now: os.stat_result, anchor: AuditAnchor | None) -> tuple[int, str, int | None]:
        """The last record's seq and hash, and the generation of the audit key in force after it
        (None: no record carries a MAC). Read from the file (and checked against the store's
        anchor) unless the file is as this process left it (same file, same size: every other
        writer only appends, and a same-size rewrite breaks the chain `verify` walks)."""
        tail = self._tail
        if tail is not None and (now.st_ino, now.st_size) == tail.stamp:
            return tail.seq, tail.hash, tail.generation
        last = self.last_record()
        if anchor is not None:
            self._check_tail(last, anchor)
        if last is None:
            return 0, GENESIS_HASH, None
        generation = generation_after(last) if last.get("mac") is not None else self._generation_at_end()
        return int(last["seq"]), str(last["hash"]), generation

    def _generation_at_end(self) -> int | None:
        """The generation of the audit key in force at the end of the log: that after its newest
        record with a MAC, read back past denied unlocks (which carry none); None if none has."""
        for path in reversed(self.files()):
            for line in lines_backwards(path, None):
                try:
                    record = parse_line(line, path, -1)
                except AuditTamperError:
                    continue
                if record.get("mac") is not None:
                    return generation_after(record)
        return None

    def _keys_reaching(self, anchor: AuditAnchor, generation: int | None) -> tuple[bytes, ...]:
        """The store's audit keys, read again from the store when the log names a newer one than
        this process holds (another process rotated it: from then on this one writes under it
        too, and computes fingerprints with it); AuditTamperError if the store holds none such."""
        keys = anchor.audit_keys()
        if generation is not None and generation > len(keys):
            keys = anchor.audit_keys(reload=True)
            if generation > len(keys):
                raise AuditTamperError(
                    f"audit log {self.path} is under audit key {generation}, which the store does not "
                    "hold (the store restored from an older backup, or the log forged?): run "
                    f"'secrets-manager audit verify', restore the store or the log, or {RESET_HINT}"
                )
        return keys

    def _check_tail(
        self, last: dict[str, Any] | None, anchor: AuditAnchor, *, live_end: int | None = None
    ) -> None:
        """Refuse to extend a log that is not the chain the store anchored (§3): its last record
        must verify and reach the anchor, and where it runs past the anchor, its record at the
        anchor's seq must be the anchored one (an older chain put back after an 'audit reset' is
        longer, and its records verify under the same key). That record is found reading back
        from the end: as many lines as the anchor lags, once per file this process did not write.
        `live_end`: the live file's whole records end there (a partial line follows)."""
        with self._asking_store():
            anchored = anchor.audit_anchor()
            named = None if last is None else max(key_generation(last) or 1, generation_after(last) or 1)
            keys = self._keys_reaching(anchor, named)
        if (
            last is not None
            and (anchored is None or anchored.seq == 0)
            and not record_verifies(last, keys)
            and self._begins_under_another_key(keys)
        ):
            raise another_stores_log(self.path)
        check_tail_against_anchor(last, anchored, self.path, keys)
        if (
            anchored is None
            and last is not None
            and not anchor.audit_anchor_scoped
            and self._holds_authenticated_record(live_end=live_end)
        ):
            raise missing_anchor(self.path)
        if last is None or anchored is None or anchored.seq < 1 or int(last["seq"]) <= anchored.seq:
            return
        found = self._record_at(anchored.seq, live_end=live_end)
        if found is None or record_hash(found) != anchored.hash:
            raise AuditTamperError(
                f"audit log {self.path} is not the chain the store anchored: its record {anchored.seq} "
                f"is {'missing' if found is None else 'another one'} (an older or another copy of the "
                f"log put in its place?): run 'secrets-manager audit verify' and restore the log, or "
                f"accept the loss with {RESET_HINT}"
            )

    def _begins_under_another_key(self, keys: Sequence[bytes]) -> bool:
        """Whether the log's first record carries a MAC that none of `keys` verifies: with its last
        record failing too, and no anchor in the store for it, the log is another store's (an
        edited or forged record leaves those before it verifying)."""
        files = self.files()
        if not files:
            return False
        try:
            first = first_record_in(files[0])
        except (AuditError, AuditTamperError):
            return False
        return first is not None and bool(first.get("mac")) and not record_verifies(first, keys)

    def _holds_authenticated_record(self, *, live_end: int | None) -> bool:
        """Whether any record of the log carries a MAC (was written holding the audit key), read
        back from the end: mostly its last record; only denied unlocks (no MAC) are read past."""
        for path in reversed(self.files()):
            for line in lines_backwards(path, live_end if path == self.path else None):
                try:
                    record = parse_line(line, path, -1)
                except AuditTamperError:
                    continue  # not a record: what verify reports; the question is about records
                if record.get("mac") is not None:
                    return True
        return False

    def _record_at(self, seq: int, *, live_end: int | None) -> dict[str, Any] | None:
        """The record `seq`, read backwards from the end of the log (newest file first); None if
        the lines pass below `seq` without it, or one on the way is no record."""
        for path in reversed(self.files()):
            for line in lines_backwards(path, live_end if path == self.path else None):
                try:
                    record = parse_line(line, path, -1)
                except AuditTamperError:
                    return None
                found = record.get("seq")
                if type(found) is not int or found < seq:
                    return None
                if found == seq:
                    return record
        return None

    def _note_unsynced(self, fd: int, inode: int, anchor: AuditAnchor | None) -> None:
        """Remember the file the next flush must fsync. A file that is no longer the live one
        (it was rotated) is fsynced now, so a flush never has to chase it."""
        current = self._unsynced
        if current is not None and current.inode != inode:
            self._unsynced = None
            try:
                current.sync_and_close()
            except OSError as exc:
                raise self._sync_failed(exc) from None
            current = None
        if current is None:
            current = self._unsynced = _Unsynced(os.dup(fd), inode, anchor)
        elif anchor is not None:
            current.anchor = anchor
        if self._name_unsynced:  # the flush syncs the directory too, before it anchors
            current.directory = self.path.parent
            self._name_unsynced = False

    def _flush_from_worker(self) -> None:
        # A failure is kept as the sticky `_failure` that the next append raises.
        with contextlib.suppress(AuditError):
            self._flush(deferred=True)

    def _flush(self, *, deferred: bool = False) -> None:
        """Fsync the records written without it, then anchor this process's last record.

        The fsync runs outside this process's lock, so appends go on meanwhile (an fsync takes
        milliseconds; holding the lock through it stalled every request behind it). What it
        anchors is this process's newest record as it was *before* the fsync began, so the anchor
        never vouches for a record a power cut could lose; and only under the flock, and only if
        the store's anchor is older, so it never moves backwards (every anchor update holds the
        flock). A failed fsync means records may be lost: from then on every append is refused.
        A failed anchor update is not a loss (the records are on disk and verify by MAC), so it
        waits only briefly for a store whose lock another writer holds (every append waits for it
        meanwhile), and `deferred` flushes then leave the anchor alone for a while. Until it has
        moved, the anchor is owed (`_owed`, kept apart from `_unsynced`): the sink worker tries
        again (after that backoff; soon if another process held the log), with no new append."""
        with self._flushing:  # a flush() waits for one already running: it promises "done now"
            with self._lock:
                unsynced, self._unsynced = self._unsynced, None
                tail = self._tail
            if unsynced is not None:
                try:
                    unsynced.sync_and_close()
                except OSError as exc:
                    raise self._sync_failed(exc) from None
                if unsynced.anchor is not None and tail is not None and tail.inode == unsynced.inode:
                    with self._lock:
                        self._owe_locked(_Owed(tail, unsynced.anchor))
            self._anchor_owed(deferred=deferred)

    def _owe_locked(self, owed: _Owed) -> None:
        """Holding `_lock`: owe the anchor `owed` unless a newer record of this process is owed."""
        current = self._owed
        if current is None or current.tail.written < owed.tail.written:
            self._owed = owed
        if self._owed_since is None:
            self._owed_since = time.monotonic()

    def free_bytes(self) -> int | None:
        """Bytes free for this process on the filesystem of the log's directory (statvfs: blocks
        available to unprivileged users, or to root, reserved ones included), or None if it cannot
        be read. The service's metric: a
        full disk refuses every request, and this is how to see it coming."""
        try:
            status = os.statvfs(self.path.parent)
        except OSError:
            return None
        # Root (a container's process often is) also writes into the blocks a filesystem keeps for
        # it (ext4: 5% by default), which f_bavail leaves out: a root serve on a disk others have
        # filled still writes its records, and must not read NOT_SERVING for it.
        blocks = status.f_bfree if os.geteuid() == 0 else status.f_bavail
        return blocks * status.f_frsize

    def require_space(self, minimum: int = MIN_FREE_BYTES) -> None:
        """AuditError if the log's filesystem has less than `minimum` bytes free (the service's
        health check, after an append of no record, which a full disk does not stop)."""
        free = self.free_bytes()
        if free is not None and free < minimum:
            raise AuditError(
                f"audit log {self.path}: its filesystem has {free} bytes free (below {minimum}); "
                "records cannot be written: free space there, or prune the log ('secrets-manager "
                "audit prune')"
            )

    @property
    def anchor_lag_seconds(self) -> float:
        """How long records this process wrote and fsynced have waited for the store's anchor to
        reach them (0: none waits). A flush moves it within milliseconds; while the store is busy
        or unreachable the sink worker retries, and this grows (the service's metric)."""
        since = self._owed_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def _anchor_owed(self, *, deferred: bool) -> None:
        """Move the store's anchor to the owed record, if one is owed; schedule a retry if it
        cannot move yet. `deferred` (the sink worker): within the backoff after the store was busy
        it only schedules the retry, and it never waits for another process's flock. Otherwise
        (flush(), at shutdown) it waits for both up to `timeout`, and AuditError if the anchor
        still could not move."""
        owed = self._owed
        if owed is None:
            return
        if deferred:
            backoff = self._anchor_busy_until - time.monotonic()
            if backoff > 0:
                self._worker.retry_within(backoff)
                return
        deadline = time.monotonic() + self.timeout
        with self._lock:
            if deferred:
                if not self._flock(deadline=None):
                    self._worker.retry_within(ANCHOR_FLOCK_RETRY_SECONDS)
                    return
                lock_wait: float | None = FLUSH_ANCHOR_LOCK_WAIT_SECONDS
            else:
                try:
                    self._flock(deadline=deadline)
                except AuditError as exc:
                    self._worker.retry_within(ANCHOR_FLOCK_RETRY_SECONDS)
                    raise self._anchor_lags(owed, exc) from None
                lock_wait = max(0.0, deadline - time.monotonic())
            try:
                with self._asking_store():
                    anchored = owed.anchor.audit_anchor()
                # Not needed any more once the store's anchor reached it (another process's append
                # anchored past it), or once its file left the chain (an `audit reset` elsewhere).
                if (anchored is None or anchored.seq < owed.tail.seq) and self._in_chain(owed.tail.inode):
                    with self._asking_store():
                        owed.anchor.set_audit_anchor(
                            Anchor(seq=owed.tail.seq, hash=owed.tail.hash), lock_wait=lock_wait
                        )
            except StoreClosedError as exc:
                # Its owner closed the store (a command ended): nothing can move the anchor through
                # that handle. The records are on disk; the next append through an open store of
                # this log anchors past them.
                if self._owed is owed:
                    self._owed = self._owed_since = None
                if not deferred:
                    raise self._anchor_lags(owed, exc) from None
            except StoreReadOnlyError as exc:
                # Read-only to this process: it stays owed (anchor_lag_seconds grows), and no
                # retry is scheduled, as none through this handle can succeed.
                if not deferred:
                    raise self._anchor_lags(owed, exc) from None
            except SecretsManagerError as exc:
                # Busy, or the store could not be reached: the anchor lags, and is tried again.
                self._anchor_busy_until = time.monotonic() + FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS
                self._worker.retry_within(FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS)
                if not deferred:
                    raise self._anchor_lags(owed, exc) from None
            else:
                if self._owed is owed:
                    self._owed = self._owed_since = None
                else:  # a newer record is owed now: it waits from here
                    self._owed_since = time.monotonic()
            finally:
                self._unflock()

    def _anchor_lags(self, owed: _Owed, exc: SecretsManagerError) -> AuditError:
        if isinstance(exc, StoreReadOnlyError):
            return AuditError(
                f"audit log {self.path}: its records up to {owed.tail.seq} are on disk, but the store "
                f"cannot vouch for them ({exc}): they are anchored by the first command that can "
                "write the store"
            )
        return AuditError(
            f"audit log {self.path}: its records up to {owed.tail.seq} are on disk, but the store's "
            f"anchor could not be moved to them ({exc}); it is tried again while this process runs"
        )

    def _in_chain(self, inode: int) -> bool:
        """Holding the flock: whether the file `inode` is still part of the log (live, or rotated
        away). An `audit reset` in another process sets the old files aside: records there must
        never be anchored over the new chain."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == inode:
                return True
        return any(path.stat().st_ino == inode for path in self.files() if path.exists())

    def _sync_failed(self, exc: OSError) -> AuditError:
        """A deferred fsync failed: records may be gone, so this and every later append fail."""
        self._failure = (
            f"audit log {self.path} could not be synced to disk ({exc.strerror or exc}); "
            "records may be lost, so requests are refused: check the disk and restart"
        )
        return AuditError(self._failure)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise AuditError(self._failure)

    @contextlib.contextmanager
    def _asking_store(self) -> Iterator[None]:
        """Around a call into the store that keeps the anchor: an append that times out meanwhile
        waited for the store (its database locked or unreachable), not for the log's file."""
        self._store_asked_at = time.monotonic()
        try:
            yield
        finally:
            self._store_asked_at = None

    def _timed_out(self) -> AuditError:
        if self._store_asked_at is not None:  # a hint, read across threads: at worst the other cause
            cause = (
                f"the store, which keeps audit log {self.path}'s anchor, did not answer within "
                f"{self.timeout:g} s (its database locked by another session, or unreachable?)"
            )
        else:
            cause = f"audit log {self.path} did not answer within {self.timeout:g} s"
        return AuditError(f"{cause}; the operation was refused", timed_out=True, cause=cause)

    def _rotate(self, anchor: AuditAnchor | None) -> bool:
        """Rename the full live file to `<file>.<first seq>`; False if it holds no record, or if
        it ends in a partial record (the append sets that aside first; a rotated file never
        holds one, where nothing would repair it). With the store (`anchor`), its tail is checked
        first, as before any change (§1): a log whose last record was edited, or that lost
        anchored records, is refused as it is, not renamed (and a new live file made) first.

        The file is fsynced first: it may end in records another process wrote without fsync
        (the service's reads, synced within its flush interval, or never if it was killed), and
        once renamed no append of ours fsyncs it again, while the records we write next, in the
        new file, chain onto them. Lost in a power cut, they would leave a hole in the chain."""
        with self.path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            if end and (handle.seek(end - 1), handle.read(1))[1] != b"\n":
                return False
            first = first_record_in(self.path)
            if first is None:
                return False
            if anchor is not None:
                self._tail_of(os.fstat(handle.fileno()), anchor)
            os.fsync(handle.fileno())
        self.path.rename(self._rotated_path(int(first["seq"])))
        return True

    def _rotated_path(self, first_seq: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{first_seq:012d}")


def entries_rotated_to(
    entries: list[tuple[AppendJob | None, AuditEvent]], generation: int | None, newest: int
) -> int:
    """Where the log's key is behind the store's newest (`generation` < `newest`), make the
    entries begin the move: a key rotation among them is made to name `newest`, else one is
    put first. Returns the generation the first entry is written under."""
    rotations = [event for _, event in entries if event.operation == KEY_ROTATION and event.outcome == "ok"]
    for event in rotations:
        event.version = newest
    if generation is None:
        return newest  # a new chain (or only denied unlocks so far): its first record sets the key
    if generation < newest and not rotations and entries:
        first = entries[0][1]
        entries.insert(0, (None, AuditEvent(KEY_ROTATION, first.actor, first.source, version=newest)))
    return generation


def _fingerprinted_under_another_key(value_hmac: str | None, generation: int | None) -> bool:
    """Whether a record's fingerprint was made under another audit key than the one (generation)
    it is written under; a fingerprint that does not say which key made it is kept."""
    made_under = getattr(value_hmac, "generation", None)
    return made_under is not None and generation is not None and made_under != generation


@dataclass(frozen=True)
class _Tail:
    """The live file as this process last left it, and its last record."""

    inode: int
    size: int
    seq: int
    hash: str
    written: int = 0  # which write of this process left it (later writes, higher numbers)
    generation: int | None = None  # the audit key in force after it (None: no MAC in the log yet)

    @property
    def stamp(self) -> tuple[int, int]:
        return self.inode, self.size


@dataclass
class _Unsynced:
    """A file holding records written without fsync (a descriptor of our own), and the store
    whose anchor they should move."""

    fd: int
    inode: int
    anchor: AuditAnchor | None
    directory: Path | None = None  # to fsync too: the file's name may not be on disk yet

    def sync_and_close(self) -> None:
        try:
            os.fsync(self.fd)
            if self.directory is not None:
                fsync_directory(self.directory)
        finally:
            self.close()

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class _Owed:
    """A record of this process, fsynced, that the store's anchor should reach but does not yet
    (a flush or durable append could not move it): `tail.inode` is the file it is in."""

    tail: _Tail
    anchor: AuditAnchor


def _remedy(error: OSError) -> str:
    """What to do about a log that cannot be written for want of permission (another user's
    home, a read-only file system), or because its path names a directory or leads nowhere a
    file can be made (under /proc, through a file): where else it may go."""
    where = "(--audit-file or SECRETS_MANAGER_AUDIT_FILE; serve: audit_file)"
    if error.errno == errno.EISDIR:
        return f": give the log the path of a file, not of a directory {where}"
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return f": give the log a path in a directory this user can write {where}"
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ""
    # A new, empty log is refused once the store has anchored records: the chain goes on in a copy.
    return (
        ": make it and its directory writable for this user, or copy the log (with its rotated "
        f"files) to a directory this user can write and give the copy's path {where}"
    )
