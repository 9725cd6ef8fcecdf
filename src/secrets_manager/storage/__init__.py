"""Untrusted persistence: opaque bytes under string keys, with compare-and-set.

Backends only ever see ciphertext and names (like Vault's physical backends). The protocol is four
verbs — get, put, delete, list — plus `commit`, which applies several puts and deletes atomically
with per-key preconditions, so one logical write of the store is one transaction.
"""

from secrets_manager.storage.base import (
    ABSENT,
    Change,
    ChangeBatch,
    ChangeHead,
    Delete,
    Entry,
    MultiGet,
    PointRead,
    Put,
    ReadAtOnce,
    Scrubbable,
    Snapshotting,
    Storage,
    StorageSnapshot,
)

__all__ = [
    "ABSENT",
    "Change",
    "ChangeBatch",
    "ChangeHead",
    "Delete",
    "Entry",
    "MultiGet",
    "PointRead",
    "Put",
    "ReadAtOnce",
    "Scrubbable",
    "Snapshotting",
    "Storage",
    "StorageSnapshot",
]
