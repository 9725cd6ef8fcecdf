"""The tamper-evident audit log: one hash-chained, MAC'd JSON line per operation.

Used by every entry point (the CLI now, the gRPC service later); knows nothing of which store is
behind the `AuditAnchor` it is given.
"""

from secrets_manager.audit.actor import local_actor
from secrets_manager.audit.adopt import adopt_log, discard_adopted_lock
from secrets_manager.audit.anchor import (
    AuditAnchor,
    anchor_a_restored_store,
    page_token_mac,
    page_token_macs,
    value_fingerprint,
    value_fingerprints,
)
from secrets_manager.audit.errors import AuditError, AuditPartialRecordError, AuditTamperError
from secrets_manager.audit.files import refuse_files_of_others
from secrets_manager.audit.log import AuditLog
from secrets_manager.audit.prune import Pruned, PrunedFile
from secrets_manager.audit.records import GENESIS_HASH, AuditEvent
from secrets_manager.audit.witness import Head, read_witness
from secrets_manager.store.base import Anchor

__all__ = [
    "GENESIS_HASH",
    "Anchor",
    "AuditAnchor",
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "AuditPartialRecordError",
    "AuditTamperError",
    "Head",
    "Pruned",
    "PrunedFile",
    "adopt_log",
    "anchor_a_restored_store",
    "discard_adopted_lock",
    "local_actor",
    "page_token_mac",
    "page_token_macs",
    "read_witness",
    "refuse_files_of_others",
    "value_fingerprint",
    "value_fingerprints",
]
