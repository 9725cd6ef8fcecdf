"""Secret-level change events, decoded from the storage change feed (names and versions only).

Storage keys are those of store/encrypted.py: `data/<name>#<version>` (a version's value) and
`meta/<name>` (a secret's metadata). `core/*` entries (keysets, header, audit anchor) are not
changes to secrets and are skipped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from secrets_manager.storage.base import ChangeBatch

DATA_PREFIX = "data/"
META_PREFIX = "meta/"


def value_row_parts(key: str) -> tuple[str, str]:
    """The secret's name and the version's text in a value row's key `data/NAME#N` (name "" if
    the key has no '#': a stray row, not of the layout)."""
    name, _, number = key[len(DATA_PREFIX) :].rpartition("#")
    return name, number


class ChangeKind(enum.StrEnum):
    VERSION_ADDED = "version_added"
    METADATA_CHANGED = "metadata_changed"
    SECRET_DESTROYED = "secret_destroyed"  # noqa: S105 (an event name)
    RESYNC = "resync"  # changes were missed (the feed was trimmed): re-read everything cached


@dataclass(frozen=True)
class SecretChange:
    kind: ChangeKind
    name: str
    version: int | None
    revision: int


SecretChanges = list[SecretChange]


def secret_changes(batch: ChangeBatch) -> SecretChanges:
    """One event per secret per commit: a new version, a metadata change, or a destroyed secret."""
    events: list[SecretChange] = []
    if batch.truncated:
        events.append(SecretChange(ChangeKind.RESYNC, "", None, batch.revision))
    versions_added: set[tuple[int, str]] = set()
    for change in batch.changes:
        if change.key.startswith(DATA_PREFIX) and not change.deleted:
            name, number = value_row_parts(change.key)
            if name and number.isdigit():
                versions_added.add((change.revision, name))
                events.append(SecretChange(ChangeKind.VERSION_ADDED, name, int(number), change.revision))
    for change in batch.changes:
        if not change.key.startswith(META_PREFIX):
            continue
        name = change.key[len(META_PREFIX) :]
        if change.deleted:
            events.append(SecretChange(ChangeKind.SECRET_DESTROYED, name, None, change.revision))
        elif (change.revision, name) not in versions_added:
            events.append(SecretChange(ChangeKind.METADATA_CHANGED, name, None, change.revision))
    events.sort(key=lambda e: e.revision)
    return events
