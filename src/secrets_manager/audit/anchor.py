"""What the audit log needs from a store (its audit key and the anchor pinning the log's tail),
and what is checked or made with them.

The store keeps the anchor (last seq and hash) where the log file's owner cannot forge it, so a
cut tail is detected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from secrets_manager.audit.errors import RESET_HINT, AuditTamperError
from secrets_manager.audit.records import GENESIS_HASH, record_verifies
from secrets_manager.crypto.mac import page_token_mac as _page_token_mac
from secrets_manager.crypto.mac import value_fingerprint as _value_fingerprint
from secrets_manager.errors import StoreReadOnlyError
from secrets_manager.store.base import Anchor

T = TypeVar("T")


class AuditAnchor(Protocol):
    """What the audit log needs from a store: a secret key and a tamper-proof anchor."""

    def audit_key(self) -> bytes: ...

    def audit_keys(self, *, reload: bool = False) -> tuple[bytes, ...]:
        """Every audit key the store holds, oldest first (generation N is the N-th; the newest
        is `audit_key()`); `reload`: read them from the store again, not from this handle's
        cache (a writer that found a record under a key newer than it knows)."""
        ...

    def audit_anchor(self) -> Anchor | None: ...

    def set_audit_anchor(
        self, anchor: Anchor, *, lock_wait: float | None = None, reset: bool = False
    ) -> None: ...

    @property
    def audit_anchor_scoped(self) -> bool:
        """Whether the anchor is one of many, kept under a scope derived from the host and the
        log's path (a store several hosts share). A log then meets no anchor whenever that scope
        is new (a new hostname, a moved log), and is anchored anew; an unscoped store has one
        anchor, and none, for a log holding signed records, can only be the anchor deleted."""
        ...


def with_fresh_keys(anchor: AuditAnchor, walk: Callable[[tuple[bytes, ...]], T]) -> T:
    """`walk` (a walk of the log) under the store's audit keys; again under the keys read anew
    from the store if it finds the log not holding and the store now holds more keys. The keys
    are read before the walk, perhaps long before it reaches the newest records (a handle reads
    them once; a long log takes seconds): another process's `audit rotate-key`, and records under
    its new key, landing in between are no forgery. A log that fails under those too is reported
    as it is."""
    keys = anchor.audit_keys()
    try:
        return walk(keys)
    except AuditTamperError:
        fresh = anchor.audit_keys(reload=True)
        if len(fresh) <= len(keys):
            raise
    return walk(fresh)


def value_fingerprint(anchor: AuditAnchor, value: bytes) -> str:
    """`hmac-sha256:<hex>` of a value under the store's audit key (Vault's `sys/audit-hash`)."""
    keys = anchor.audit_keys()
    return _value_fingerprint(keys[-1], value, len(keys))


def value_fingerprints(anchor: AuditAnchor, value: bytes) -> list[str]:
    """The fingerprint of a value under each audit key the store holds, oldest first (the one in
    force last): a record written before an `audit rotate-key` holds the one under its own key."""
    keys = anchor.audit_keys()
    return [_value_fingerprint(key, value, generation) for generation, key in enumerate(keys, 1)]


def page_token_mac(anchor: AuditAnchor, data: bytes) -> str:
    """The service's page-token MAC under the store's audit key, which every replica of the store
    shares (crypto.mac.page_token_mac)."""
    return _page_token_mac(anchor.audit_key(), data)


def page_token_macs(anchor: AuditAnchor, data: bytes, *, reload: bool = False) -> list[str]:
    """The page-token MAC under each audit key the store holds, the one in force first: a token
    issued before an `audit rotate-key` (or by a replica that read the new key first, with
    `reload`) is still the service's own."""
    keys = anchor.audit_keys(reload=reload)
    return [_page_token_mac(key, data) for key in reversed(keys)]


def anchor_a_restored_store(anchor: AuditAnchor) -> None:
    """A store just made from a backup copy has its audit key but no anchor (backups copy none),
    while the log its source wrote may have survived it: the store vouches for the empty chain
    (seq 0), so that log goes on verifying (its records by their MACs) and its next append anchors
    its tail. Without this, a log with signed records and no anchor is taken for an anchor deleted.
    Nothing is done if the store has an anchor."""
    if anchor.audit_anchor() is None:
        anchor.set_audit_anchor(Anchor(seq=0, hash=GENESIS_HASH))


def refuse_if_read_only(anchor: AuditAnchor) -> None:
    """StoreReadOnlyError if `anchor` is a store this process can only read (an EncryptedStore
    on a file it cannot write; other stores have no such state): for what must move or reset
    the anchor before it changes the log's files (`audit prune`, `audit reset`)."""
    refusal = getattr(anchor, "read_only_error", None)
    refused = refusal() if callable(refusal) else None
    if isinstance(refused, StoreReadOnlyError):
        raise refused


def missing_anchor(path: Path) -> AuditTamperError:
    return AuditTamperError(
        f"the store has no audit anchor, but audit log {path} holds records signed with the "
        "store's audit key: the anchor was deleted from the store (which hides records cut from "
        "the end of the log). If the store file was damaged or replaced, restore it from a backup; "
        f"else check the log ('secrets-manager audit show') and start a new chain with {RESET_HINT}"
    )


def another_stores_log(path: Path) -> AuditTamperError:
    """A log whose first and last records are both signed with another audit key, met by a store
    that anchored none of it: the log of the store this one replaced (a store restored from a
    backup into a new database, or made anew, has an audit key of its own), not a forgery."""
    return AuditTamperError(
        f"audit log {path} is another store's: neither its first nor its last record is signed "
        "with this store's audit key (a store restored from a backup or created anew has a key of "
        "its own). Keep that log as the other store's record and give this store's log another "
        "path (audit_file in server.toml, --audit-file, SECRETS_MANAGER_AUDIT_FILE); nothing was written"
    )


def check_tail_against_anchor(
    last: dict[str, Any] | None,
    anchored: Anchor | None,
    path: Path,
    keys: Sequence[bytes] | None = None,
) -> None:
    """Refuse to extend a log that lost records the store vouched for: that would hide the loss.
    With the audit `keys`, the last record must also verify (hash and MAC, under the key it
    names): a forged last line with a large seq would otherwise pass for a log that grew."""
    if keys is not None and last is not None and not record_verifies(last, keys):
        raise AuditTamperError(
            f"the last record of audit log {path} does not verify (edited or forged): run "
            f"'secrets-manager audit verify' and restore the log, or accept the loss with {RESET_HINT}"
        )
    if anchored is None:
        return
    last_seq = 0 if last is None else int(last["seq"])
    if last is None and anchored.seq > 0:
        raise AuditTamperError(
            f"audit log {path} holds no records, but the store anchored record {anchored.seq}: if this "
            "is the wrong file, give the right one (--audit-file, SECRETS_MANAGER_AUDIT_FILE); if "
            f"the log is lost, accept the loss with {RESET_HINT}"
        )
    if last_seq < anchored.seq or (
        last_seq == anchored.seq and last is not None and last["hash"] != anchored.hash
    ):
        raise AuditTamperError(
            f"audit log {path} lost records the store anchored (up to record {anchored.seq}); "
            f"run 'secrets-manager audit verify' and restore the log, or accept the loss with {RESET_HINT}"
        )
