"""Verifying an audit log: the walk over its whole chain that `audit verify`, `audit head`,
`audit prune` and `audit reset` make, against the store's anchor, an archive of pruned files and a
witnessed head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secrets_manager.audit.anchor import missing_anchor
from secrets_manager.audit.errors import RESTORE_HINT, AuditTamperError, partial_record
from secrets_manager.audit.files import open_for_reading
from secrets_manager.audit.reading import LogFiles
from secrets_manager.audit.records import (
    GENESIS_HASH,
    canonical,
    generation_after,
    key_generation,
    may_be_unauthenticated,
    record_hash,
)
from secrets_manager.audit.witness import Head
from secrets_manager.crypto.mac import record_mac_ok
from secrets_manager.errors import InvalidInputError
from secrets_manager.store.base import Anchor


def walk_chain(
    log: LogFiles,
    keys: Sequence[bytes] | bytes,
    anchor: Anchor | None,
    *,
    locked: bool,
    anchor_required: bool,
    archive: Path | None = None,
    witness: Head | None = None,
) -> Walked:
    """The walk `AuditLog.verify` describes: every record checked in order, from the first file
    to the live one; what it found, or AuditTamperError at the first record that does not hold.
    `keys`: the store's audit keys, oldest first. The chain's first authenticated record sets the
    key in force (the one it names); an authenticated `audit.rotate_key` record moves it to the
    newer one its `version` names; every other authenticated record must be under the key in
    force (one under a retired key after a rotation is a forgery made with that key)."""
    if isinstance(keys, bytes):  # one key: a store that was never rotated
        keys = (keys,)
    if archive is not None:
        _check_archive(log, archive)
    if witness is not None and not any(witness.authentic(key) for key in keys):
        raise AuditTamperError(
            f"the witnessed head (record {witness.seq}, {witness.time}) was not made with this store's "
            "audit key: it is another store's head, or it was edited since it was shipped"
        )
    previous_hash, expected_seq, count = GENESIS_HASH, 1, 0
    last: dict[str, Any] | None = None
    first_seq: int | None = None
    anchor_seen = anchor is None or anchor.seq == 0  # seq 0: the empty chain, before any record
    authenticated = False  # a record with a MAC seen
    in_force: int | None = None  # the generation of the audit key in force (None: none seen yet)
    rotated_at: int | None = None  # the seq of the record that put it in force, if a rotation
    # A log `audit prune` shortened begins after record 1. Its first record is taken on trust
    # until the walk is done; then an authenticated audit.prune record must name a file start
    # at or after it as where the chain begins (`pruned_before`), or records are missing.
    pruned_start: tuple[Path, int] | None = None
    file_starts: dict[int, object] = {}  # each file's first seq -> that record's prev
    vouched: list[tuple[int, str]] = []  # (seq, prev) of every audit.prune record's floor

    def partial(path: Path, number: int) -> None:
        """A crash cuts short only a write never acknowledged, so never one the store anchored:
        a partial last line before the anchored record is records cut off, not a crash."""
        if anchor is None and anchor_required and authenticated:
            raise missing_anchor(log.path)
        if not anchor_seen:
            assert anchor is not None
            raise AuditTamperError(
                f"audit log ends at record {count}, then a partial line ({path.name} line {number}), "
                f"but the store anchored record {anchor.seq}: records are missing at the end "
                f"(a crash never cuts an anchored record short): {RESTORE_HINT}"
            )
        raise partial_record(path)

    walk = log._numbered_records(locked=locked, on_partial=partial, archive=archive)
    for path, number, line, record in walk:
        seq = record.get("seq")
        where = f"record {seq}" if type(seq) is int else f"record #{count + 1}"
        at = f"{path.name} line {number}: {RESTORE_HINT}"
        if count == 0 and type(seq) is int and seq > 1 and number == 1:
            if archive is not None:
                raise AuditTamperError(
                    f"audit log begins at record {seq} ({path.name}), and records 1 to {seq - 1} "
                    f"are in neither {archive} nor the log (pruned without --archive, or archived "
                    "files deleted or moved elsewhere)"
                )
            pruned_start = (path, seq)
            expected_seq, previous_hash = seq, str(record.get("prev"))
        if number == 1 and type(seq) is int:
            file_starts[seq] = record.get("prev")
        if seq != expected_seq:
            raise AuditTamperError(
                f"audit chain broken at {where}: expected record {expected_seq} "
                f"(a record was deleted, reordered or inserted), in {at}"
            )
        if record.get("prev") != previous_hash:
            raise AuditTamperError(
                f"audit chain broken at {where}: it does not follow record {seq - 1}, in {at}"
            )
        try:
            hashed: str | None = record_hash(record)
        except (ValueError, RecursionError):  # no JSON the chain could have written (a lone surrogate)
            hashed = None
        if hashed is None or hashed != record.get("hash"):
            raise AuditTamperError(f"audit record {seq} was edited (its hash does not match), in {at}")
        mac = record.get("mac")
        generation = key_generation(record)
        if mac is None:
            if not may_be_unauthenticated(record):
                raise AuditTamperError(f"audit record {seq} lacks its MAC, in {at}")
        elif generation is None or generation > len(keys):
            raise AuditTamperError(
                f"audit record {seq} names an audit key this store does not hold "
                f"(key_id {record.get('key_id')!r}): forged or edited, or another store's, in {at}"
            )
        elif in_force is not None and generation != in_force:
            rotation = f" since record {rotated_at}" if rotated_at is not None else ""
            raise AuditTamperError(
                f"audit record {seq} is MAC'd under audit key {generation}, but key {in_force} is "
                f"in force{rotation}: a record made with a retired audit key is a forgery, in {at}"
            )
        elif not (isinstance(mac, str) and record_mac_ok(keys[generation - 1], hashed, mac)):
            raise AuditTamperError(
                f"audit record {seq} was forged or edited (its MAC does not match), in {at}"
            )
        else:
            authenticated = True
            after = generation_after(record)
            if after is None or not generation <= after <= len(keys):
                raise AuditTamperError(
                    f"audit record {seq} moves the audit key to key {record.get('version')!r}, which "
                    f"this store does not hold after key {generation}: forged or edited, in {at}"
                )
            if after != generation:
                rotated_at = expected_seq
            in_force = after
            floor = _pruned_floor(record)
            if floor is not None:
                vouched.append(floor)
        if line != canonical(record) + b"\n":
            # The hash covers the record as parsed, not the line: a key given twice (parsers
            # differ on which value counts: this one takes the last, others the first), or
            # spacing added, left a record verifying whose line reads otherwise elsewhere.
            raise AuditTamperError(
                f"audit record {seq} was edited (its line is not the canonical JSON the log "
                f"writes: a key given twice, spacing added?), in {at}"
            )
        if anchor is not None and seq == anchor.seq:
            if hashed != anchor.hash:
                raise AuditTamperError(f"audit record {seq} is not the one the store anchored, in {at}")
            anchor_seen = True
        if witness is not None and seq == witness.seq and hashed != witness.hash:
            raise AuditTamperError(
                f"audit record {seq} is not the one the witnessed head names ({witness.time}): the "
                f"log was rolled back (with the store, if nothing else is wrong) and written again "
                f"since that head was shipped, or replaced, in {path.name} line {number}; {_ANOTHER_LOG}"
            )
        if first_seq is None:
            first_seq = seq
        previous_hash, expected_seq, count, last = hashed, expected_seq + 1, count + 1, record
    if pruned_start is not None and not any(
        seq >= pruned_start[1] and file_starts.get(seq) == prev for seq, prev in vouched
    ):
        path, seq = pruned_start
        since = max((floor for floor, _ in vouched if floor < seq), default=1)
        raise AuditTamperError(
            f"audit log begins at record {seq} ({path.name}): records {since} to {seq - 1} are missing, "
            "and no audit.prune record says they were pruned (a rotated file deleted or moved by "
            f"hand; 'secrets-manager audit prune' removes old files so that the log verifies): "
            f"{RESTORE_HINT}"
        )
    if anchor is None and anchor_required and authenticated:
        raise missing_anchor(log.path)
    if not anchor_seen:
        assert anchor is not None
        raise AuditTamperError(
            f"audit log ends at record {count} but the store anchored record {anchor.seq}: "
            f"records are missing at the end: {RESTORE_HINT}"
        )
    if witness is not None:
        _check_witness(witness, first_seq, expected_seq - 1, archive)
    return Walked(count, last, in_force)


def _check_archive(log: LogFiles, archive: Path) -> None:
    """An archive directory to walk: one (InvalidInputError otherwise), whose copies of files
    the log still holds (a prune killed between copying and removing) hold the same bytes."""
    if not archive.is_dir():
        raise InvalidInputError(
            f"archive directory {archive} does not exist: give the one 'audit prune --archive' used"
        )
    for copy in log._rotated_in(archive):
        own = log.path.with_name(copy.name)
        if os.path.lexists(own) and not _same_bytes(own, copy):
            raise AuditTamperError(
                f"archived file {copy} is not a copy of the log's {own.name}, which is still there: "
                "one of them was altered (the log's own is walked; compare them)"
            )


@dataclass(frozen=True)
class Walked:
    """What a walk of the whole chain found: how many records, and the newest."""

    count: int
    last: dict[str, Any] | None
    generation: int | None = None  # the audit key in force after the last record (None: no MAC seen)


# Every log of one store (the CLI's own, each serve replica's) signs its heads with the store's one
# audit key, so a head of another of them passes as this log's and reads as a rollback.
_ANOTHER_LOG = (
    "unless the head is another log's of this store (the CLI's own and each replica's log has its "
    "own heads: give the head shipped from this log, --audit-file PATH)"
)


def _check_witness(witness: Head, first_seq: int | None, last_seq: int, archive: Path | None) -> None:
    """AuditTamperError unless the walk (records `first_seq` to `last_seq`) passed the record a
    witnessed head names (its hash was compared on the way)."""
    if last_seq < witness.seq:
        raise AuditTamperError(
            f"audit log ends at record {last_seq}, but the witnessed head is record {witness.seq} "
            f"({witness.time}): the log was rolled back or cut since that head was shipped (the store "
            f"too, if nothing else is wrong): compare with the records shipped off the host; {_ANOTHER_LOG}"
        )
    if first_seq is not None and witness.seq < first_seq:
        where = f"in neither {archive} nor the log" if archive is not None else "pruned from the log"
        raise AuditTamperError(
            f"record {witness.seq}, which the witnessed head names, is {where} (it begins at record "
            f"{first_seq}): give --archive DIR holding the pruned files, or a newer head; {_ANOTHER_LOG}"
        )


def _same_bytes(own: Path, copy: Path) -> bool:
    """Whether `copy` (in an archive) is `own` itself, or a regular file holding exactly its bytes."""
    with open_for_reading(own) as original, open_for_reading(copy) as copied:
        if os.path.samestat(os.fstat(original.fileno()), os.fstat(copied.fileno())):
            return True
        while chunk := original.read(1 << 20):
            if copied.read(len(chunk)) != chunk:
                return False
        return not copied.read(1)


def _pruned_floor(record: dict[str, Any]) -> tuple[int, str] | None:
    """Where an audit.prune record says the chain now begins: (seq, prev), or None."""
    if record.get("operation") != "audit.prune" or record.get("outcome") != "ok":
        return None
    floor = record.get("pruned_before")
    if not isinstance(floor, dict):
        return None
    seq, prev = floor.get("seq"), floor.get("prev")
    return (seq, prev) if type(seq) is int and isinstance(prev, str) else None
