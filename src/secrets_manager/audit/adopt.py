"""Adopting a log kept under an old default name (`adopt_log`): its files renamed to the new name,
its anchor copied, only if it is this store's log.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from secrets_manager.audit.anchor import AuditAnchor
from secrets_manager.audit.append import DEFAULT_TIMEOUT_SECONDS, LogWriter
from secrets_manager.audit.errors import AuditError, AuditTamperError
from secrets_manager.audit.files import first_record_in, last_record_in, open_for_reading, read_lines
from secrets_manager.audit.reading import LogFiles
from secrets_manager.audit.records import record_verifies


def adopt_log(
    old_path: Path,
    new_path: Path,
    old_anchor: AuditAnchor,
    anchor: AuditAnchor,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> list[Path]:
    """Give a log that was kept under an old default name (`old_path`, its anchor `old_anchor`)
    the new one (`new_path`, anchored by `anchor`), if it is this store's; return the files moved.

    It is this store's if its last MAC'd record verifies under the store's audit key: a log
    another account or namespace wrote (once they shared the old name) is left where it is, for
    its own store to adopt. The old anchor is copied to the new one first, then the files are
    renamed oldest first (holding both logs' locks), so the tail stays protected. An adoption
    cut short (killed between two renames) left the new name with the chain's first files and no
    live file, the old name with the rest: the next one finishes it. Nothing moves if the new
    log is anything else, or if the new anchor holds something other than the old one."""
    old, new = LogWriter(old_path, timeout=timeout), LogWriter(new_path, timeout=timeout)
    if not old.files() or new_path.exists():
        return []
    deadline = time.monotonic() + timeout
    moved: list[Path] = []
    try:
        old._flock(deadline=deadline)
        new._flock(deadline=deadline)
        files = old.files()
        if not files or new_path.exists():
            return []  # adopted meanwhile by another process
        targets = [new_path.with_name(new_path.name + path.name[len(old_path.name) :]) for path in files]
        key = anchor.audit_keys()
        begun = new.files()
        if begun and not _continues(begun[-1], files[0], key):
            return []
        if any(os.path.lexists(target) for target in targets):
            return []
        try:
            last = _last_signed_record(old)
        except AuditTamperError:  # a file that cannot be read (a FIFO, a directory): not ours to move
            return []
        if last is None or not record_verifies(last, key):
            return []
        anchored, current = old_anchor.audit_anchor(), anchor.audit_anchor()
        if current is not None and current != anchored:
            return []
        if anchored is not None and current is None:
            anchor.set_audit_anchor(anchored)
        for path, target in zip(files, targets, strict=True):
            os.rename(path, target)
            moved.append(target)
        fd = os.open(new_path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        old._remove_lock_file()
        return moved
    finally:
        old._remove_what_was_created()  # a lock file made here for a log adopted meanwhile
        if not moved:
            new._remove_what_was_created()
        for log in (old, new):
            if log._lock_fd is not None:
                os.close(log._lock_fd)
                log._lock_fd = None


def discard_adopted_lock(old_path: Path) -> None:
    """Remove the lock file an adoption killed after its last rename left under the old name, if
    the log there still has no files and no one holds the lock."""
    old = LogWriter(old_path)
    if old.files() or not old.lock_path.exists():
        return
    try:
        if old._flock(deadline=None) and not old.files():
            old._remove_lock_file()
    finally:
        if old._lock_fd is not None:
            os.close(old._lock_fd)
            old._lock_fd = None


def _continues(before: Path, after: Path, key: tuple[bytes, ...]) -> bool:
    """Whether file `after` takes up the chain where file `before` ends: its first record follows
    the last one of `before`, and both verify under the audit keys `key` (the halves of one log
    an adoption cut short, not two logs that happen to share a name)."""
    try:
        last, first = last_record_in(before), first_record_in(after)
    except (AuditError, AuditTamperError):
        return False
    return (
        last is not None
        and first is not None
        and first["seq"] == last["seq"] + 1
        and first.get("prev") == last["hash"]
        and record_verifies(last, key)
        and record_verifies(first, key)
    )


def _last_signed_record(log: LogFiles) -> dict[str, Any] | None:
    """The log's newest record that carries a MAC (a denied unlock's carries none); lines that
    are not records (a partial last write) are passed over."""
    for path in reversed(log.files()):
        last = None
        with open_for_reading(path) as handle:
            for line in read_lines(handle, None, path):
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict) and record.get("mac"):
                    last = record
        if last is not None:
            return last
    return None
