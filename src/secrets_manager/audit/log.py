"""The audit log (docs/audit.md): `AuditLog`, what callers use, and the operations on a log that
verify it before they change it (`audit prune`, `audit reset`).

The parts live beside it: records.py (the record and its hash), files.py (one file at a time),
reading.py (the log's files, records, follow), verify.py (the chain walk), append.py (the write
path, with sink.py's worker), prune.py, adopt.py, anchor.py (what a store provides), errors.py.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from secrets_manager.audit.anchor import AuditAnchor, refuse_if_read_only, with_fresh_keys
from secrets_manager.audit.append import LogWriter
from secrets_manager.audit.errors import (
    AuditError,
    AuditPartialRecordError,
    AuditTamperError,
    not_an_audit_log,
)
from secrets_manager.audit.files import file_stamp, open_for_reading, unused_path
from secrets_manager.audit.prune import (
    Pruned,
    archive_directory,
    archive_targets,
    file_identity,
    prunable,
    remove_pruned,
)
from secrets_manager.audit.records import GENESIS_HASH, RECORD_START, AuditEvent
from secrets_manager.audit.sink import AppendJob
from secrets_manager.audit.verify import walk_chain
from secrets_manager.audit.witness import Head, head_of
from secrets_manager.errors import ConflictError, IntegrityError
from secrets_manager.store.base import Anchor

# What this module defines. The parts' names are imported from the modules that define them, and
# the package's public ones from `secrets_manager.audit` (its __init__).
__all__ = ["AuditLog", "Reset"]


class AuditLog(LogWriter):
    """One audit log file (plus its rotated predecessors) and the anchor that pins its tail."""

    def restart(self, anchor: AuditAnchor, event: AuditEvent) -> list[Path]:
        """Begin the chain again, for an operator who accepts that the log lost records or was
        damaged (a store restored without its log, a deleted or edited file): every file of the
        old log is renamed `<file>.lost-<time>` and kept, the store's anchor is reset, and the new
        chain starts with `event`. Returns the renamed files."""
        refuse_if_read_only(anchor)
        with self._lock:
            self._flock(deadline=time.monotonic() + self.timeout)
            try:
                return self._restart_locked(anchor, event)
            finally:
                self._unflock()

    def reset(self, anchor: AuditAnchor, event: AuditEvent) -> Reset:
        """`restart`, only if the log does not verify (`audit reset`). Decided holding the lock,
        verifying against the anchor read then: a writer rotating the log meanwhile can neither
        make a good log look broken (and have it set aside) nor slip records in unchecked. A
        store that cannot be written is refused first: its anchor could not be reset once the old
        files were set aside."""
        refuse_if_read_only(anchor)
        with self._lock:
            self._flock(deadline=time.monotonic() + self.timeout)
            try:
                try:
                    self._refuse_unless_a_log()
                except AuditTamperError:
                    self._remove_what_was_created()  # a refused path is left as it was found
                    raise
                aside = None
                try:
                    try:
                        anchored = anchor.audit_anchor()
                    except IntegrityError as exc:  # damaged: the reset replaces it, never needing to read it
                        raise AuditError(str(exc)) from None
                    try:
                        # Keys read anew if the log names a newer one than this handle holds: a
                        # reset must not start a new chain over a log that verifies.
                        count = with_fresh_keys(
                            anchor,
                            lambda keys: walk_chain(
                                self,
                                keys,
                                anchored,
                                locked=True,
                                anchor_required=not anchor.audit_anchor_scoped,
                            ),
                        ).count
                    except AuditPartialRecordError:
                        # A crash's leftover after every anchored record: set aside on its own, as
                        # the next audited command would, not a reason to discard the chain.
                        aside = self._repair_locked(anchor, event)
                        count = walk_chain(
                            self,
                            anchor.audit_keys(),
                            anchor.audit_anchor(),
                            locked=True,
                            anchor_required=not anchor.audit_anchor_scoped,
                        ).count
                except (AuditTamperError, AuditError) as exc:
                    moved = self._restart_locked(anchor, event)
                    return Reset(problem=str(exc), records=0, moved=moved, set_aside=aside)
                return Reset(problem=None, records=count, moved=[], set_aside=aside)
            finally:
                self._unflock()

    def prune(
        self,
        anchor: AuditAnchor,
        event: AuditEvent,
        *,
        older_than: datetime | None = None,
        keep_files: int | None = None,
        archive: Path | None = None,
        dry_run: bool = False,
    ) -> Pruned:
        """Remove the oldest rotated files (the live file never), so the log stops growing without
        its verification failing (`audit prune`). A file goes only if every record in it is
        anchored and, where given, its newest record is older than `older_than` and it is not one
        of the newest `keep_files` rotated files; the files that go are a run from the oldest.

        Only a log that verifies is pruned (pruning must not remove the evidence of tampering).
        The walk runs without the writers' lock, as `audit verify` does: a long log takes seconds,
        and a service's appends wait at most `timeout` for the lock. A file is pruned only if it is
        still, under the lock, the file the walk read (same inode, size and mtime). Then, holding
        the lock, an authenticated `audit.prune` record, fsynced and anchored, says where the
        chain now begins; only then are the files deleted (or moved into `archive`). Killed in
        between, the log still verifies: it begins at or before the record named, which is all
        verification asks."""
        if archive is not None:
            archive_directory(archive)  # a typo in a nightly job's --archive, said on its first run
        verified = {path: file_identity(path) for path in self.files() if path != self.path}
        anchored = anchor.audit_anchor()
        records = with_fresh_keys(
            anchor,
            lambda keys: walk_chain(
                self, keys, anchored, locked=False, anchor_required=not anchor.audit_anchor_scoped
            ),
        ).count
        with self._lock:
            self._flock(deadline=time.monotonic() + self.timeout)
            try:
                chosen = prunable(self, anchor.audit_anchor(), older_than, keep_files, verified)
                targets = archive_targets(chosen, archive) if chosen and archive is not None else []
                if not chosen or dry_run:
                    return Pruned(files=chosen, records=records, archived=targets)
                # Its record must be anchored before any file goes, which such a store cannot do.
                refuse_if_read_only(anchor)
                last = chosen[-1]
                begins = {"seq": last.last_seq + 1, "prev": last.last_hash}
                # Its anchor update waits for the store's lock as an append's does (the writers
                # wait for this one's flock meanwhile), not for the store's own 30 s.
                job = AppendJob(
                    [replace(event, pruned_before=begins)], anchor, deadline=time.monotonic() + self.timeout
                )
                self._write_locked([job], anchor, durable=True)
                owed = self._owed
                if job.records and owed is not None and owed.tail.seq >= job.records[-1]["seq"]:
                    # Written and fsynced, but the store could not vouch for it (another writer held
                    # its lock): cut from the end, it would leave the chain beginning after the
                    # files with nothing to say why. Nothing is removed; the record itself is harmless.
                    raise AuditError(
                        "audit prune removed nothing: its record could not be anchored in the store "
                        "(another writer held the store's lock), and the files go only once it is; "
                        "try again"
                    )
                remove_pruned(chosen, targets, self.path.parent)
                return Pruned(files=chosen, records=records, archived=targets)
            finally:
                self._unflock()

    def _refuse_unless_a_log(self) -> None:
        """Holding the lock, before a reset renames the log's files: each regular one must begin
        as every record does (or be empty), however damaged what follows is. A path that names
        another file (the store's, notes) is refused and left where it is."""
        for path in self.files():
            try:
                with open_for_reading(path) as handle:
                    start = handle.read(len(RECORD_START))
            except (OSError, AuditTamperError):
                continue  # not a regular file (a FIFO, a directory): no one's data; set aside too
            if not RECORD_START.startswith(start):
                raise not_an_audit_log(path)

    def refuse_for_a_new_store(self) -> None:
        """Before a new store is created (init) with this log: ConflictError (exit 7) if a log is
        already here, live or rotated, which holds another store's records (a store deleted
        without its log). The new store's first record would be chained onto it, and refused as
        a forgery, since that store's audit key did not sign it. A file here that is no log is
        refused as the append would refuse it (exit 6). An empty live file holds no one's records,
        and what is not a regular file the append refuses itself. Nothing is created or changed."""
        found: list[Path] = []
        for path in self.files():
            try:
                with open_for_reading(path) as handle:
                    start = handle.read(len(RECORD_START))
            except (OSError, AuditTamperError):
                continue
            if not start:
                continue
            if not RECORD_START.startswith(start[: len(RECORD_START)]):
                raise not_an_audit_log(path)
            found.append(path)
        if not found:
            return
        rotated = [path for path in found if path != self.path]
        where = str(self.path)
        if rotated:
            files = f"{len(rotated)} rotated file{'s' if len(rotated) != 1 else ''} {self.path.name}.*"
            where += f" (with {files})" if self.path in found else f" ({files}; no live file)"
        raise ConflictError(
            f"an audit log of another store is at {where}: move it away (it is that store's record), "
            "or give --audit-file another path"
        )

    def _repair_locked(self, anchor: AuditAnchor, event: AuditEvent) -> Path | None:
        """Holding both locks: set a partial last record aside, as an append does (checked
        against the anchor first), and record the repair; where it went, or None."""
        fd, before = self._live_file(anchor)
        aside = self._set_aside_partial_record(fd, before.st_size, anchor)
        if aside is not None:
            repaired = replace(event, operation="audit.repair", outcome="partial_set_aside")
            self._write_locked([AppendJob([repaired], anchor)], anchor, durable=True)
        return aside

    def _restart_locked(self, anchor: AuditAnchor, event: AuditEvent) -> list[Path]:
        stamp = file_stamp(self._clock())
        moved = []
        for path in self.files():
            target = unused_path(path.with_name(f"{path.name}.lost-{stamp}"))
            path.rename(target)
            moved.append(target)
        if self._file is not None:
            old, self._file = self._file[0], None
            self._file_locked = False
            fcntl.flock(old, fcntl.LOCK_UN)
            os.close(old)
        if self._unsynced is not None:
            unsynced, self._unsynced = self._unsynced, None
            unsynced.close()
        self._owed = self._owed_since = None  # the old chain's records are never anchored over the new one
        self._tail = None
        anchor.set_audit_anchor(Anchor(seq=0, hash=GENESIS_HASH), reset=True)  # the one way back
        self._write_locked([AppendJob([event], anchor)], anchor, durable=True)
        return moved

    def verify(
        self,
        keys: Sequence[bytes] | bytes,
        anchor: Anchor | None,
        *,
        anchor_required: bool = False,
        archive: Path | None = None,
        witness: Head | None = None,
    ) -> int:
        """Walk the whole chain; return the number of records, or raise AuditTamperError naming
        the first record that does not hold (and the file and line it is on). `keys`: the
        store's audit keys, oldest first (`AuditAnchor.audit_keys`).

        `anchor_required`: `anchor` is what the store holds (None: it holds none). A log with
        authenticated records then needs one: its first append anchors the empty chain before
        writing, so none means the anchor row was deleted (hiding records cut from the end).
        Only for a store with one anchor (not `audit_anchor_scoped`): a scoped anchor is missing
        whenever the log's scope is new. Without it, None only means there is no anchor to check
        against (a key alone is).

        `archive`: a directory `audit prune --archive` moved rotated files into. Its files of this
        log are walked before the log's own, as one chain that must begin at record 1: what an
        audit.prune record says was pruned must be there (a copy also in the log must hold the
        same bytes). `witness`: a head `head()` gave, kept off the host: the chain must hold that
        very record (at its seq, with its hash), or the log was rolled back or cut since."""
        return walk_chain(
            self,
            keys,
            anchor,
            locked=False,
            anchor_required=anchor_required,
            archive=archive,
            witness=witness,
        ).count

    def head(
        self, keys: Sequence[bytes] | bytes, anchor: Anchor | None, *, anchor_required: bool = False
    ) -> Head:
        """The head of the whole chain, verified as `verify` does: its newest record's seq, time
        and hash, with a MAC under the audit key in force after it (the newest of `keys` where
        no record carries a MAC), for a witness off the host (`audit head`)."""
        keys = (keys,) if isinstance(keys, bytes) else keys
        walked = walk_chain(self, keys, anchor, locked=False, anchor_required=anchor_required)
        if walked.last is None:
            raise AuditError(f"audit log {self.path} holds no record yet: there is no head to ship")
        generation = walked.generation if walked.generation is not None else len(keys)
        return head_of(keys[generation - 1], walked.last)


@dataclass(frozen=True)
class Reset:
    """What `AuditLog.reset` found and did."""

    problem: str | None  # why the log did not verify; None: it verifies, and no new chain was begun
    records: int  # the records of a log that verifies
    moved: list[Path]  # the old files, set aside as <file>.lost-<time>
    set_aside: Path | None = None  # a crash's partial last record, moved here (<file>.partial-<time>)
