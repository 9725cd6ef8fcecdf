"""`EncryptedStore`: our barrier. Plaintext above, ciphertext only below (in a `Storage`).

Key hierarchy (docs/format.md): unlock source → root key → one keyset per namespace → records.
Storage layout:

    core/header              JSON: format, creation time, root key id, the unlock source's section
    core/keyset/<namespace>  the namespace's keyset, sealed under the root key
    core/key-policy          when primaries rotate on their own, sealed under the root key
    core/recovery            the recovery shares' public key (if set up), sealed under the root key
    meta/<name>              the secret's metadata (versions, labels, tags), sealed under its keyset
    data/<name>#<version>    one version's value, sealed under its keyset

Every logical write is one `Storage.commit` guarded by compare-and-set on each entry it read, and
is retried from a fresh read when another writer got there first: no update is ever lost.
The key lifecycle (rotate, rewrap, disable, destroy, root rotation) is in `store/keys.py`.

Another process may rotate the root key while this one has the store open: a root-sealed entry
naming a root key id other than ours makes us unwrap the new root from the header again (with the
unlock source we were opened with), so long-lived handles keep working. The header is not
authenticated, so the new root is adopted only once an entry sealed under it opens to what this
handle read under the old one (the audit key, or a data key of a keyset): proof that whoever made
it held the old root (`_prove_successor`). Opening the store checks the header's root key the same
way: it must open one of the store's root-sealed entries (`_what_the_root_opens_not`), or the
header is not this store's and nothing is read or sealed with it.
"""

from __future__ import annotations

import builtins
import contextlib
import hmac
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from secrets_manager.crypto import (
    DataKey,
    KdfParams,
    Keyset,
    Purpose,
    RotationPolicy,
    open_record,
    seal_record,
)
from secrets_manager.crypto.aead import new_key
from secrets_manager.crypto.keyset import DEFAULT_POLICY, KeyStatus, new_key_id
from secrets_manager.crypto.mac import audit_keys_of, value_digest, value_digest_ok, value_fingerprint
from secrets_manager.crypto.record import record_key_id
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    SecretsManagerError,
    SecretStateError,
    StorageError,
    StoreReadOnlyError,
    UnlockError,
    UnsupportedOperationError,
)
from secrets_manager.storage import (
    ABSENT,
    ChangeHead,
    Delete,
    Entry,
    MultiGet,
    Put,
    ReadAtOnce,
    Scrubbable,
    Snapshotting,
    Storage,
)
from secrets_manager.storage.base import Expect, Operation, StorageSnapshot
from secrets_manager.store.backoff import Backoff
from secrets_manager.store.base import (
    AUDIT_KEYS_RECHECK_SECONDS,
    CURRENT,
    DEFAULT_MAX_VERSIONS,
    IF_EXISTS,
    LABELS,
    PENDING,
    PREVIOUS,
    Anchor,
    Capability,
    CurrentRead,
    Secret,
    SecretExistsError,
    SecretMetadata,
    VersionInfo,
    acting_actor,
    acting_for,
    checked_expect_version,
    checked_expiry,
    checked_expiry_change,
    checked_max_versions,
    checked_metadata,
    checked_metadata_update,
    checked_target,
    checked_value,
    destroyed_current_message,
    expiry_of,
    refuse_expiry_without_current,
    refuse_if_changed,
    refuse_if_rotating,
    refuse_if_staged,
    refuse_if_unchanged,
    refuse_to_demote,
    refuse_unless_current,
    refuse_unless_deleted_before,
    refuse_unless_still_current,
    unknown_label,
    unsupported_capabilities,
    updated_metadata,
)
from secrets_manager.store.changes import SecretChanges, secret_changes, value_row_parts
from secrets_manager.store.kms import AwsKmsUnlock
from secrets_manager.store.names import DEFAULT_NAMESPACE, namespace_of, validate_name, validate_prefix
from secrets_manager.store.read_cache import ReadCache
from secrets_manager.store.unlock import PasswordUnlock, UnlockKey, UnlockKeyUnlock, UnlockSource
from secrets_manager.values import SecretValue

STORE_FORMAT = 1
HEADER_KEY = "core/header"
KEYSET_PREFIX = "core/keyset/"
META_PREFIX = "meta/"
DATA_PREFIX = "data/"
AUDIT_KEY_KEY = "core/audit-key"
OPEN_READ_ATTEMPTS = 5  # header and a root-sealed entry read again while root rotations land between
META_READ_ATTEMPTS = 5  # metadata and keyset read again while rewraps and disables land between
AUDIT_ANCHOR_KEY = "core/audit-anchor"
SCOPED_ANCHOR_PREFIX = AUDIT_ANCHOR_KEY + "/"  # + scope: the anchor of one of several audit logs
_AUDIT_SCOPE = re.compile(r"[A-Za-z0-9_-]{1,64}")
SNAPSHOT_ATTEMPTS = 3  # reads of a snapshot tried again after the root key changed under it
BULK_READ_BATCH = 500  # records asked for in one multi-get of a bulk read (read_current)
RENEW_RETRY_SECONDS = 5.0  # between attempts to read an unlock source again that failed
KEY_POLICY_KEY = "core/key-policy"
RECOVERY_KEY = "core/recovery"  # the recovery public key, sealed under the root key
RETRY_DEADLINE_SECONDS = 30.0
LISTINGS_KEPT = 8  # listings (prefix, include_deleted) kept while the change head stays put
DECODED_META_KEPT = 200_000  # decrypted metadata kept by row for listings; past it, all dropped
# (rows a listing no longer finds are dropped as it ends: _forget_decoded_rows_gone)
# The root-sealed entries (docs/format.md 8) under a key of their own, and what each is sealed for.
_FIXED_ROOT_SEALED = {
    AUDIT_KEY_KEY: Purpose.AUDIT_KEY,
    KEY_POLICY_KEY: Purpose.KEY_POLICY,
    RECOVERY_KEY: Purpose.RECOVERY_KEY,
}

T = TypeVar("T")
Operations = list[Operation]


@dataclass(frozen=True, repr=False)
class NewRoot:
    """A new store's root key and its header's unlock section (`EncryptedStore.new_root`)."""

    root: DataKey
    section: dict[str, Any]
    created: int

    def __repr__(self) -> str:
        return "NewRoot(<root key>)"


class _LostRace(Exception):
    """A storage precondition failed because another writer committed first: re-read and retry."""


class _RootChangedUnderSnapshot(Exception):
    """A record read in a storage snapshot is sealed under a root key other than the one this
    handle holds (another process rotated it, before or after the snapshot began). Adopting the
    new one needs a header read outside the snapshot: on PostgreSQL a second pooled connection,
    which a pool full of waiting snapshots never frees. So the snapshot ends, and the read is
    tried again."""

    namespace: str | None = None  # whose keyset it was, if one: named if no root key opens it


# Who the versions written in this thread (or task) are by, when not the store's own actor: the
# service's caller (EncryptedStore.acting_for).


class EncryptedStore:
    """A `SecretStore` that encrypts everything it hands to its `Storage`."""

    def __init__(
        self,
        storage: Storage,
        root_key: DataKey,
        *,
        actor: str = "unknown",
        clock: Callable[[], float] = time.time,
        max_versions: int = DEFAULT_MAX_VERSIONS,
        audit_scope: str | None = None,
    ) -> None:
        if audit_scope is not None and not _AUDIT_SCOPE.fullmatch(audit_scope):
            raise InvalidInputError(f"invalid audit scope {audit_scope!r}")
        self._storage = storage
        self._multi_get = storage if isinstance(storage, MultiGet) else None
        # A get in one statement (metadata, keyset, value and change head): PostgreSQL.
        self._read_at_once = storage if isinstance(storage, ReadAtOnce) else None
        # Reads decoded since the storage's last change (store/read_cache.py); needs its change head.
        self._change_head = storage if isinstance(storage, ChangeHead) else None
        self._read_cache: ReadCache[_CachedSecret] = ReadCache()
        # The last few listings (store.list), by prefix, while the change head stays put; and the
        # metadata they decrypted, by namespace then row key: (the sealed record, id of the key
        # that sealed it, metadata). The record itself, not its row's revision: a database that
        # came back with less history (a failover, a restore) gives the same revision to another
        # record. Used and changed under _listing_lock.
        self._listings: ReadCache[tuple[SecretMetadata, ...]] = ReadCache(LISTINGS_KEPT)
        self._listing_lock = threading.Lock()
        self._decoded_meta: dict[str, dict[str, tuple[bytes, int, SecretMetadata]]] = {}
        self._root = root_key
        self._actor = actor
        self._clock = clock
        self._max_versions = max_versions
        self._keysets: dict[str, tuple[int, Keyset]] = {}
        self._policy: tuple[int, RotationPolicy] | None = None
        self._audit_key: bytes | None = None  # the audit keys, oldest first (`audit_keys`)
        self._audit_keys_cache: tuple[bytes, tuple[bytes, ...]] | None = None
        self._audit_keys_read_at = 0.0  # time.monotonic() of the last read of the keyring
        # One anchor per audit log: a store shared by several hosts (PostgreSQL) has one log each.
        self._anchor_key = AUDIT_ANCHOR_KEY if audit_scope is None else SCOPED_ANCHOR_PREFIX + audit_scope
        self._unlock: UnlockSource | None = None
        self._unlock_section: dict[str, Any] | None = None  # the header section _unlock matches
        # A long-running process (serve) can read its unlock source again (a password file): see
        # renew_unlock_with. Failed attempts are spaced, for each costs an Argon2id derivation.
        self._renew_unlock: Callable[[], UnlockSource] | None = None
        self._renew_lock = threading.Lock()
        self._renew_failed_at: float | None = None
        # The last header whose root key was refused (_prove_successor), and why: not unwrapped
        # again (an Argon2id run or a KMS call) on every call while it stays in place.
        self._refused: tuple[bytes, type[SecretsManagerError], str] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @staticmethod
    def new_root(unlock: UnlockSource, *, clock: Callable[[], float] = time.time) -> NewRoot:
        """A new root key wrapped by `unlock` (Argon2id for a password, a call for AWS KMS), for
        `create`: made before the storage is, so a store never waits through that without its header."""
        now = int(clock())
        root = DataKey(id=new_key_id(set()), status=KeyStatus.ENABLED, created=now, material=new_key())
        return NewRoot(root=root, section=unlock.wrap(root), created=now)

    @classmethod
    def create(
        cls, storage: Storage, unlock: UnlockSource, *, new_root: NewRoot | None = None, **options: Any
    ) -> EncryptedStore:
        """Initialise an empty storage: a new root key wrapped by `unlock` (`new_root`, if made
        already by `EncryptedStore.new_root` with it). Never overwrites."""
        if new_root is None:
            new_root = cls.new_root(unlock, clock=options.get("clock", time.time))
        root, section, now = new_root.root, new_root.section, new_root.created
        header = {"format": STORE_FORMAT, "created": now, "root_key_id": root.id, "unlock": section}
        try:
            storage.put(HEADER_KEY, _dump(header), expect=ABSENT)
        except ConflictError:
            raise ConflictError("the store is already initialised; init never overwrites a store") from None
        store = cls(storage, root, **options)
        store._unlock = unlock
        store._unlock_section = section
        return store

    @classmethod
    def open(cls, storage: Storage, unlock: UnlockSource, **options: Any) -> EncryptedStore:
        """Unlock an existing store. UnlockError on a wrong password; nothing is written.

        The header is not authenticated, so the root key it yields must open something the store
        sealed under its root key (the audit key, a namespace's keyset, an anchor, the key policy,
        the recovery record): IntegrityError (`_HEADER_NOT_OURS`) if the store holds such entries
        and it opens none of them, the header of another store (or one wrapping a root key of
        whoever could write the file) put over this store's data. Nothing could be read with it,
        and nothing may be sealed under it. A store with no root-sealed entry has nothing to check
        it against (a new one), unless it holds secrets (`_KEYS_GONE`)."""
        for _ in range(OPEN_READ_ATTEMPTS):
            header, sealed = _header_and_what_its_root_seals(storage)
            root = _unwrap_root(unlock, header)
            store = cls(storage, root, **options)
            store._unlock = unlock
            store._unlock_section = header["unlock"]
            if store._learn_what_the_root_seals(sealed):
                return store
            problem = store._what_the_root_opens_not()
            if problem is None:
                return store
            if _read_header(storage) == header:
                raise IntegrityError(problem)
            # The header changed meanwhile (a root rotation, a passwd): open it again.
        raise ConflictError(
            "the store's root key or unlock source kept changing while this process opened it "
            "(keys rotate --root, passwd, unlock-with elsewhere); run the command again"
        )

    def _learn_what_the_root_seals(self, sealed: tuple[str, Entry] | None) -> bool:
        """Open `sealed` (read with the header, under the root key it names: the audit key, or else
        one namespace's keyset), which every root rotation re-seals unchanged: a later root key
        is adopted only if it opens the same (`_prove_successor`). Nothing is written. Whether
        it opened: an entry that does not is looked into by `_what_the_root_opens_not`."""
        if sealed is None:
            return False
        key, entry = sealed
        try:
            if key == AUDIT_KEY_KEY:
                self._audit_key = open_record(_only(self._root), Purpose.AUDIT_KEY, key, 0, entry.value)
            else:
                self._decode_keyset(key[len(KEYSET_PREFIX) :], entry, _only(self._root))
        except IntegrityError:
            return False
        return True

    def _what_the_root_opens_not(self) -> str | None:
        """None if the root key this handle holds opens one of the store's root-sealed entries (a
        damaged one among them is left for the command that uses it), or if there is none and the
        store holds no secrets either (a new store: nothing to check the header against). Else
        what is wrong, for an IntegrityError. Read only when the entry read with the header did not
        open (or none was read), so an intact store pays nothing for it."""
        found = False
        for key, purpose, name in root_sealed_keys(self._storage):
            entry = self._storage.get(key)
            if entry is None:
                continue
            found = True
            try:
                plaintext = open_record(_only(self._root), purpose, name, 0, entry.value)
            except IntegrityError:
                continue
            if key == AUDIT_KEY_KEY:
                self._audit_key = plaintext
            elif key.startswith(KEYSET_PREFIX):
                with contextlib.suppress(IntegrityError):
                    self._keysets[name] = (entry.revision, Keyset.from_bytes(plaintext))
            return None
        if found:
            return _HEADER_NOT_OURS
        if self._storage.list(META_PREFIX) or self._storage.list(DATA_PREFIX):
            return _KEYS_GONE
        return None

    def change_unlock(self, unlock: UnlockSource) -> bool:
        """Rewrap the root key under a new unlock source (e.g. a new password). O(1) in secrets.

        The old wrapping is then scrubbed from the storage's files (`Scrubbable`), so a copy of
        them taken later does not open with the old password; returns False if it could not be.
        ConflictError if another process changed the unlock source since this handle opened the
        store (or last adopted its header): of two `passwd` at once, one must fail, not both
        report success while only one password opens the store."""
        entry = self._storage.get(HEADER_KEY)
        if entry is None:
            raise NotFoundError("the store has no header")
        header = _load_json(entry.value, "store header")
        if header.get("root_key_id") != self._root.id:
            # Another process rotated the root key: wrapping ours would lock every keyset out.
            self._refresh_root(header.get("root_key_id"))
        if self._unlock_section is not None and header.get("unlock") != self._unlock_section:
            raise _unlock_changed()
        header["unlock"] = unlock.wrap(self._root)
        try:
            self._storage.put(HEADER_KEY, _dump(header), expect=entry.revision)
        except ConflictError:
            raise _unlock_changed() from None
        self._unlock = unlock
        self._unlock_section = header["unlock"]
        return self._scrub()

    def renew_unlock_with(self, source: Callable[[], UnlockSource]) -> None:
        """Let this handle ask `source` for its unlock source again when the one it holds stops
        opening the header: another process changed the master password (`passwd`) and then
        rotated the root key. Without it a long-running service fails every call until restarted;
        with it, putting the new password in its password file is enough."""
        self._renew_unlock = source

    def read_only_error(self) -> StoreReadOnlyError | None:
        """What every write is refused with, the audit anchor's too, when this process can only
        read the store (the file's mode, a read-only directory or file system); None if it can
        write it."""
        refuse = getattr(self._storage, "read_only_error", None)
        return refuse() if callable(refuse) else None

    @property
    def unlock_kind(self) -> str:
        """What unlocks this store now: "password" or "aws-kms" (its header's unlock section)."""
        return str((self._unlock_section or {}).get("kind", PasswordUnlock.kind))

    @property
    def kms_key(self) -> str | None:
        """The ARN of the AWS KMS key that unlocks this store (its header's unlock section), or
        None if a password does: what a new host's credentials need kms:Decrypt on."""
        section = self._unlock_section or {}
        if section.get("kind") != "aws-kms" or not isinstance(section.get("key_arn"), str):
            return None
        return str(section["key_arn"])

    @property
    def kdf_params(self) -> KdfParams | None:
        """The Argon2id costs of the master password (None if no password unlocks the store)."""
        if isinstance(self._unlock, PasswordUnlock | UnlockKeyUnlock):
            return self._unlock.params
        return None

    @property
    def unlock_key(self) -> UnlockKey | None:
        """The unlock key the master password gave when it opened this store (None if no password
        did): what the CLI gives its agent, so the next command opens the store without it."""
        return self._unlock.unlock_key if isinstance(self._unlock, PasswordUnlock) else None

    def require_password_unlock(self) -> PasswordUnlock:
        """The password source that unlocks this store; InvalidInputError if it is not a password."""
        if not isinstance(self._unlock, PasswordUnlock):
            raise InvalidInputError(
                f"this store is unlocked by {self.unlock_kind}, not a master password; to unlock it "
                "with a password instead, run 'secrets-manager unlock-with password'"
            )
        return self._unlock

    def change_password(self, new_password: bytes) -> bool:
        """Rewrap the root key under a new master password with the same Argon2id costs; False
        if the old wrapping could not be scrubbed (see `change_unlock`)."""
        return self.change_unlock(PasswordUnlock(new_password, self.require_password_unlock().params))

    @contextlib.contextmanager
    def acting_for(self, actor: str) -> Iterator[None]:
        """Versions written in this block, in this thread or task, record `actor` as their creator
        (`created_by`): the service's caller rather than the user the service runs as."""
        with acting_for(actor):
            yield

    def close(self) -> None:
        self._read_cache.clear()
        self._listings.clear()
        self._decoded_meta.clear()
        self._storage.close()

    def __repr__(self) -> str:
        return f"EncryptedStore({self._storage!r})"

    # ---- reads -----------------------------------------------------------------------------

    def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        return self._get(name, version, label, fingerprint=False)[0]

    def get_with_fingerprint(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> tuple[Secret, str]:
        """`get`, and the value's audit fingerprint (`audit.value_fingerprint`): the service
        audits every read with it, and a cached read remembers it instead of computing it again."""
        secret, fingerprint = self._get(name, version, label, fingerprint=True)
        assert fingerprint is not None
        return secret, fingerprint

    def _get(
        self, name: str, version: int | None, label: str | None, *, fingerprint: bool
    ) -> tuple[Secret, str | None]:
        validate_name(name)
        if version is not None and label is not None:
            raise InvalidInputError("give a version or a label, not both")
        if label is not None and label not in LABELS:
            raise unknown_label(label)
        label = label or (CURRENT if version is None else None)
        if self._read_at_once is not None:
            return self._get_at_once(self._read_at_once, name, version, label, fingerprint=fingerprint)
        head = self._cache_head()
        if head is not None:
            hit = self._cached_get(head, name, version, label, fingerprint=fingerprint)
            if hit is not None:
                return hit
        resealed: IntegrityError | None = None
        for _attempt in range(3):  # a concurrent prune or rewrap between the reads: read again
            meta_entry, meta = self._read_meta(name)
            if meta_entry is None or meta is None:
                raise NotFoundError(f"secret {name!r} not found")
            if meta.deleted is not None:  # as AwsStore says it: a deleted secret can come back
                raise NotFoundError(f"secret {name!r} is deleted; 'undelete {name}' restores it")
            number = self._resolve(meta, name, version, label)
            entry = self._storage.get(_data_key(name, number))
            if entry is None:
                # Every commit that deletes a kept version's value (destroy, prune, destroy --all)
                # rewrites or deletes the metadata too, and revisions only grow: metadata still at
                # the revision read means the two reads saw one state, in which the value is gone.
                again = self._storage.get(META_PREFIX + name)
                if again is not None and again.revision == meta_entry.revision:
                    raise _value_missing(name, number)
                continue
            used: list[DataKey] = []
            try:
                plaintext = open_record(
                    _noting(self._fresh_key_lookup(namespace_of(name)), used),
                    Purpose.SECRET_VALUE,
                    name,
                    number,
                    entry.value,
                )
            except IntegrityError as exc:  # a damaged keyset names itself, and stays so
                # A record re-sealed since it was read (a rewrap), its old key disabled meanwhile
                # (a thread sharing this handle may have cached that keyset): read it again.
                again = self._storage.get(_data_key(name, number))
                if again is not None and again.revision != entry.revision:
                    resealed = _named(exc, _value_damaged(name, number))
                    continue
                raise _named(exc, _value_damaged(name, number)) from None
            try:
                meta.check_value(name, number, plaintext)
            except IntegrityError:
                # Another value of the same name and version (a secret destroyed and stored anew
                # since the metadata was read): only metadata still at the revision read makes it
                # damage. Revisions only grow, so that is the state the value was read in.
                again = self._storage.get(META_PREFIX + name)
                if again is None or again.revision != meta_entry.revision:
                    continue
                raise
            # Kept only if nothing changed while it was read (the head is where it was before).
            keep = head is not None and self._cache_head() == head
            return self._read_done(
                head if keep else None, name, number, meta, plaintext, (entry.value, used[0]), fingerprint
            )
        if resealed is not None:  # re-sealed between the reads at every try
            raise resealed
        raise NotFoundError(f"version {number} of {name!r} is no longer stored")

    def _cached_get(
        self, head: int, name: str, version: int | None, label: str | None, *, fingerprint: bool
    ) -> tuple[Secret, str | None] | None:
        """`get` from the read cache, if it holds the version asked for at `head`."""
        cached = self._read_cache.get(head, name)
        if cached is None:
            return None
        number = self._resolve(cached.meta, name, version, label)
        sealed = cached.records.get(number)
        if sealed is None:
            return None
        try:
            plaintext = open_record(_only(sealed.key), Purpose.SECRET_VALUE, name, number, sealed.record)
        except IntegrityError as exc:
            raise _named(exc, _value_damaged(name, number)) from None
        cached.meta.check_value(name, number, plaintext)
        if fingerprint:
            # Under the audit key in force: one cached before `audit rotate-key` (the keys read
            # again since) is computed anew, as every fingerprint after it is.
            audit_keys = self.audit_keys()
            if sealed.fingerprint is None or sealed.fingerprint_key is not audit_keys[-1]:
                sealed.fingerprint = value_fingerprint(audit_keys[-1], plaintext, len(audit_keys))
                sealed.fingerprint_key = audit_keys[-1]
        return _secret(name, number, cached.meta, plaintext), sealed.fingerprint

    def _cache_holds(self, name: str, version: int | None, label: str | None) -> bool:
        """Whether the read cache holds the record a get of `name` asks for, at whatever head it is
        at: if the head has not moved since, reading the head alone answers the get."""
        held = self._read_cache.holding(name)
        if held is None:
            return False
        try:
            number = self._resolve(held[1].meta, name, version, label)
        except NotFoundError:
            return False
        return number in held[1].records

    def _read_done(
        self,
        head: int | None,
        name: str,
        number: int,
        meta: _Meta,
        plaintext: bytes,
        sealed: tuple[bytes, DataKey],
        fingerprint: bool,
    ) -> tuple[Secret, str | None]:
        """The secret a get read, with its fingerprint if asked for; its record kept in the read
        cache under `head` (None: not kept), which everything read must be of."""
        audit_keys = self.audit_keys() if fingerprint else ()
        fingerprinted = audit_keys[-1] if audit_keys else None
        value_hmac = value_fingerprint(audit_keys[-1], plaintext, len(audit_keys)) if audit_keys else None
        if head is not None:
            cached = self._read_cache.get(head, name) or _CachedSecret(meta, {})
            if cached.meta == meta:
                cached.records[number] = _SealedValue(sealed[0], sealed[1], value_hmac, fingerprinted)
                self._read_cache.put(head, name, cached)
        return _secret(name, number, meta, plaintext), value_hmac

    def _get_at_once(
        self, storage: ReadAtOnce, name: str, version: int | None, label: str | None, *, fingerprint: bool
    ) -> tuple[Secret, str | None]:
        """`get` on a storage that reads several keys, the newest record under a prefix and its
        change head in one statement (`ReadAtOnce`: PostgreSQL). The metadata, the namespace's
        keyset, the value record (of the version asked for by number, else the newest under the
        name: the current version's unless another is staged beside it) and the
        change head the read cache is tagged with are all of one instant: one round trip, and no
        view mixed of before and after another writer's commit. Where the newest record is not
        the version the metadata names, a second read takes the metadata, the keyset and that
        record again at one instant of their own (and again, a few times, while writers keep
        moving it). Where the read cache holds the record asked for, the head alone is read
        first, as `_get` does: the whole read's statement costs more than the head's even where
        the cache answers (bench/pg_get.py: a cached get 0.37 ms so, 0.11 ms with the head
        alone). Only if the head moved is the whole read made: two statements then.

        Every check of `get` holds: a record that does not open in a read where all are of one
        instant is damaged (no read again, as `read_current`'s snapshot), a value its metadata
        keeps that is missing from such a read is missing, and a keyset sealed under a root key
        another process rotated to is adopted as `_root_lookup` adopts it."""
        namespace = namespace_of(name)
        meta_key, keyset_key = META_PREFIX + name, KEYSET_PREFIX + namespace
        wanted = None if version is None else _data_key(name, version)
        number = version
        if self._cache_holds(name, version, label):
            head = self._cache_head()  # one small statement: the head alone
            if head is not None:
                hit = self._cached_get(head, name, version, label, fingerprint=fingerprint)
                if hit is not None:
                    return hit
        for _attempt in range(META_READ_ATTEMPTS):
            before = getattr(self._storage, "incarnation", 0)
            asked = wanted
            found = storage.read_at_once(
                [meta_key, keyset_key] if asked is None else [meta_key, keyset_key, asked],
                newest_under=f"{DATA_PREFIX}{name}#" if asked is None else None,
            )
            head = self._cache_tag(before, found.head)
            if head is not None:
                hit = self._cached_get(head, name, version, label, fingerprint=fingerprint)
                if hit is not None:
                    return hit
            meta_entry = found.entries.get(meta_key)
            if meta_entry is None:
                raise NotFoundError(f"secret {name!r} not found")
            keyset = self._keyset_from(namespace, found.entries.get(keyset_key))
            meta = _open_meta(keyset, name, meta_entry.value)
            if meta.deleted is not None:  # as AwsStore says it: a deleted secret can come back
                raise NotFoundError(f"secret {name!r} is deleted; 'undelete {name}' restores it")
            number = self._resolve(meta, name, version, label)
            key = _data_key(name, number)
            entry = found.entries.get(key)
            if entry is None and found.newest is not None and found.newest[0] == key:
                entry = found.newest[1]
            if entry is None:
                if asked == key:  # the metadata and the values of one instant: the value is gone
                    raise _value_missing(name, number)
                wanted = key
                continue
            used: list[DataKey] = []
            try:
                plaintext = open_record(
                    _noting(keyset.key_for_decryption, used), Purpose.SECRET_VALUE, name, number, entry.value
                )
            except IntegrityError as exc:
                raise _named(exc, _value_damaged(name, number)) from None
            meta.check_value(name, number, plaintext)
            return self._read_done(head, name, number, meta, plaintext, (entry.value, used[0]), fingerprint)
        raise NotFoundError(f"version {number} of {name!r} is no longer stored")

    def describe(self, name: str) -> SecretMetadata:
        validate_name(name)
        _, meta = self._read_meta(name)
        if meta is None:
            raise NotFoundError(f"secret {name!r} not found")
        return meta.public(name)

    def history(self, name: str) -> list[VersionInfo]:
        return list(self.describe(name).versions)

    def list(self, prefix: str = "", *, include_deleted: bool = False) -> list[SecretMetadata]:
        """Every secret's metadata under `prefix`, sorted by name.

        On a storage with a change head (SQLite, PostgreSQL) the last few listings are kept while
        the head stays put (as the read cache keeps reads: any change by any process moves it), so
        the service's next page costs one read of the head; and metadata decrypted once is kept by
        its row's revision, so a listing after a change decrypts only the rows that changed."""
        validate_prefix(prefix)
        if isinstance(self._storage, Snapshotting):  # one scan instead of two reads per secret
            which = f"{int(include_deleted)}{prefix}"
            kept = self._kept_listing(which)
            if kept is not None:
                return builtins.list(kept)
            # One scan at a time: callers asking for the same listing meanwhile take its result.
            with self._listing_lock:
                kept = self._kept_listing(which)
                if kept is not None:
                    return builtins.list(kept)
                head = self._cache_head()
                result = self._list_decoding_outside(self._storage, prefix, include_deleted)
                # Kept only if nothing changed while it was read (the head is where it was before).
                if head is not None and self._cache_head() == head:
                    self._listings.put(head, which, tuple(result))
                return result
        result = []
        for key in self._storage.list(META_PREFIX + prefix):
            name = key[len(META_PREFIX) :]
            _, meta = self._read_meta(name)
            if meta is not None and (include_deleted or meta.deleted is None):
                result.append(meta.public(name))
        return sorted(result, key=_by_name)

    def _kept_listing(self, which: str) -> tuple[SecretMetadata, ...] | None:
        """The listing `which` kept at the storage's change head as it is now, if there is one."""
        head = self._cache_head()
        return None if head is None else self._listings.get(head, which)

    def _cache_head(self) -> int | None:
        """What the read cache and the kept listings are tagged with: the storage's change head, or
        None (nothing cached for this read). On a storage whose server can be replaced under it
        (PostgreSQL's `incarnation`: a connection found the server restarted or failed over) the
        incarnation is its high part. A database that came back with less history (a failover to a
        standby that lacked the last commits, a restore of the database) reaches the revisions it
        lost again with other content: what was cached at one of them must not be served then. A
        head read while the incarnation moved is not used (it may be either server's)."""
        if self._change_head is None:
            return None
        before = getattr(self._storage, "incarnation", 0)
        return self._cache_tag(before, self._change_head.change_head())

    def _cache_tag(self, before: int, revision: int) -> int | None:
        """The tag of a change head `revision` read while the storage's incarnation was `before`
        (see `_cache_head`); None if it moved meanwhile."""
        incarnation = getattr(self._storage, "incarnation", 0)
        if incarnation != before:
            return None
        return (incarnation << 64) | revision  # revisions are PostgreSQL bigints: below 2**63

    def _list_decoding_outside(
        self, storage: Snapshotting, prefix: str, include_deleted: bool
    ) -> builtins.list[SecretMetadata]:
        namespace = None
        for _ in range(SNAPSHOT_ATTEMPTS):
            try:
                return self._list_from_snapshot(storage, prefix, include_deleted=include_deleted)
            except _RootChangedUnderSnapshot as exc:
                namespace = exc.namespace
                self._adopt_the_headers_root()
        # A keyset under a root key no header ever named.
        raise IntegrityError(_keyset_damaged(namespace)) if namespace else IntegrityError()

    def _list_from_snapshot(
        self, storage: Snapshotting, prefix: str, *, include_deleted: bool
    ) -> builtins.list[SecretMetadata]:
        """Every secret's metadata under `prefix` from one consistent scan (and one keyset read per
        namespace): on PostgreSQL a round trip per page rather than two per secret.

        The snapshot only reads the rows; they are decrypted after it ends, for a snapshot holds
        its storage handle (SQLite: the handle's lock) and every other read of the service would
        wait behind the decryption. A row whose revision is as when it was last decrypted (the same
        record), under a key its keyset still holds enabled, is not decrypted again."""
        with storage.snapshot() as snap:
            rows = builtins.list(snap.scan(META_PREFIX + prefix))
            namespaces = {namespace_of(key[len(META_PREFIX) :]) for key, _ in rows}
            keyset_entries = {ns: snap.get(KEYSET_PREFIX + ns) for ns in namespaces}
        result = []
        keysets: dict[str, Keyset] = {}
        decoded = self._decoded_meta
        if sum(len(group) for group in decoded.values()) > DECODED_META_KEPT:
            decoded.clear()
        self._forget_decoded_rows_gone(prefix, {key for key, _ in rows})
        for key, entry in rows:
            name = key[len(META_PREFIX) :]
            namespace = namespace_of(name)
            if namespace not in keysets:
                try:
                    keysets[namespace] = self._keyset_from(
                        namespace, keyset_entries[namespace], self._root_in_snapshot
                    )
                except _RootChangedUnderSnapshot as exc:
                    exc.namespace = namespace
                    raise
            keyset = keysets[namespace]
            group = decoded.setdefault(namespace, {})
            known = group.get(key)
            meta = None
            if known is not None and known[0] == entry.value:
                # The same record as decrypted before, if the key that sealed it still opens it.
                with contextlib.suppress(IntegrityError):
                    keyset.key_for_decryption(known[1])
                    meta = known[2]
            if meta is None:
                meta = _open_meta(keyset, name, entry.value).public(name)
                group[key] = (entry.value, record_key_id(entry.value), meta)
            if include_deleted or meta.deleted is None:
                result.append(meta)
        result.sort(key=_by_name)  # storage order is key order, but a database may collate otherwise
        return result

    def _forget_decoded_rows_gone(self, prefix: str, found: set[str]) -> None:
        """Drop the metadata kept for rows under `prefix` that a scan of it no longer `found`: the
        secret was purged or destroyed (here or by another process: `purge` from cron). Kept, each
        name that ever came and went stayed decrypted in serve until DECODED_META_KEPT, about 2 KB
        a name: serve grew by megabytes an hour under names made and purged every second. A prefix
        naming a namespace (it has a '/') looks at that namespace's rows alone."""
        start = META_PREFIX + prefix
        head, slash, _ = prefix.partition("/")
        reached = [head] if slash else builtins.list(self._decoded_meta)
        for namespace in reached:
            group = self._decoded_meta.get(namespace)
            if group is None:
                continue
            for key in [key for key in group if key.startswith(start) and key not in found]:
                del group[key]
            if not group:
                del self._decoded_meta[namespace]

    def read_current(
        self, names: Sequence[str] = (), *, prefix: str | None = None, fingerprints: bool = False
    ) -> builtins.list[CurrentRead]:
        """`BulkReader` (store.base.read_current): the current version of each of `names`, or of
        every secret under `prefix` that is not deleted, all read at one instant.

        On a storage with snapshots (SQLite: one read transaction; PostgreSQL: one REPEATABLE READ
        transaction) the metadata is scanned (a prefix) or multi-read (names), then the keysets and
        the values multi-read, `BULK_READ_BATCH` keys a statement: a few round trips per batch
        instead of four per secret. The snapshot reads the rows and opens the metadata (which
        names the current version); the values are decrypted after it ends. Each secret gets every
        check `get` makes: NotFoundError as `get` says it (not found, deleted, no current version,
        destroyed), IntegrityError naming a damaged record (its metadata, its value, a value its
        metadata keeps that is missing, its namespace's keyset), its value's digest checked. A root
        key another process rotated before the snapshot began is adopted and the read made again,
        as a listing does. A storage without snapshots gets `get` of each."""
        if prefix is not None:
            validate_prefix(prefix)
        wanted = [validate_name(name) for name in names]
        storage = self._storage
        if not isinstance(storage, Snapshotting):
            if prefix is not None:
                wanted = [meta.name for meta in self.list(prefix)]
            return [self._read_one_current(name, fingerprints) for name in wanted]
        sealed = self._current_decoding_outside(storage, wanted, prefix)
        audit_keys = self.audit_keys() if fingerprints and any(s.error is None for s in sealed) else ()
        return [_opened_current(item, audit_keys) for item in sealed]

    def _read_one_current(self, name: str, fingerprints: bool) -> CurrentRead:
        try:
            secret, fingerprint = self._get(name, None, None, fingerprint=fingerprints)
        except (NotFoundError, IntegrityError) as exc:
            return CurrentRead(name, error=exc)
        return CurrentRead(name, secret, fingerprint)

    def _current_decoding_outside(
        self, storage: Snapshotting, names: builtins.list[str], prefix: str | None
    ) -> builtins.list[_SealedCurrent]:
        namespace = None
        for _ in range(SNAPSHOT_ATTEMPTS):
            try:
                return self._current_from_snapshot(storage, names, prefix)
            except _RootChangedUnderSnapshot as exc:
                namespace = exc.namespace
                self._adopt_the_headers_root()
        # A keyset under a root key no header ever named.
        raise IntegrityError(_keyset_damaged(namespace)) if namespace else IntegrityError()

    def _current_from_snapshot(
        self, storage: Snapshotting, names: builtins.list[str], prefix: str | None
    ) -> builtins.list[_SealedCurrent]:
        """The records of a bulk read (`read_current`), from one snapshot, not yet decrypted."""
        with storage.snapshot() as snap:
            # An embedded file's point reads cost less than one IN (...) query (MultiGet).
            fetch = snap.get_many if isinstance(snap, MultiGet) else partial(_point_reads, snap)

            def fetch_all(keys: builtins.list[str]) -> dict[str, Entry]:
                found: dict[str, Entry] = {}
                for start in range(0, len(keys), BULK_READ_BATCH):
                    found.update(fetch(keys[start : start + BULK_READ_BATCH]))
                return found

            rows: builtins.list[tuple[str, Entry | None]]
            if prefix is not None:
                rows = [(key[len(META_PREFIX) :], entry) for key, entry in snap.scan(META_PREFIX + prefix)]
            else:
                metas = fetch_all([META_PREFIX + name for name in dict.fromkeys(names)])
                rows = [(name, metas.get(META_PREFIX + name)) for name in names]
            namespaces = sorted({namespace_of(name) for name, entry in rows if entry is not None})
            keyset_entries = fetch_all([KEYSET_PREFIX + namespace for namespace in namespaces])
            keysets: dict[str, Keyset | IntegrityError] = {}
            for namespace in namespaces:
                try:
                    keysets[namespace] = self._keyset_from(
                        namespace, keyset_entries.get(KEYSET_PREFIX + namespace), self._root_in_snapshot
                    )
                except _RootChangedUnderSnapshot as exc:
                    exc.namespace = namespace
                    raise
                except IntegrityError as exc:  # damaged or missing: each of its secrets says so
                    keysets[namespace] = exc
            found: builtins.list[_SealedCurrent] = []
            for name, entry in rows:
                found.append(self._current_of(name, entry, keysets, listing=prefix is not None))
            values = fetch_all(
                [_data_key(item.name, item.number) for item in found if item.keyset is not None]
            )
        for item in found:
            if item.keyset is not None:
                item.record = values.get(_data_key(item.name, item.number))
        return [item for item in found if not item.hidden]

    def _current_of(
        self,
        name: str,
        entry: Entry | None,
        keysets: Mapping[str, Keyset | IntegrityError],
        *,
        listing: bool,
    ) -> _SealedCurrent:
        """Which version of `name` a bulk read takes (its metadata opened), or why none, as `get`
        says it; `listing`: read by prefix, so a deleted secret is left out as `list` leaves it."""
        if entry is None:
            return _SealedCurrent(name, error=NotFoundError(f"secret {name!r} not found"))
        keyset = keysets[namespace_of(name)]
        if isinstance(keyset, IntegrityError):
            return _SealedCurrent(name, error=keyset)
        try:
            meta = _open_meta(keyset, name, entry.value)
        except IntegrityError as exc:  # the record and the keyset of one instant: damaged
            return _SealedCurrent(name, error=exc)
        if meta.deleted is not None:
            return _SealedCurrent(
                name,
                error=NotFoundError(f"secret {name!r} is deleted; 'undelete {name}' restores it"),
                hidden=listing,
            )
        try:
            number = self._resolve(meta, name, None, CURRENT)
        except NotFoundError as exc:
            return _SealedCurrent(name, error=exc)
        return _SealedCurrent(name, meta=meta, number=number, keyset=keyset)

    def _resolve(self, meta: _Meta, name: str, version: int | None, label: str | None) -> int:
        if label is not None:
            if label not in meta.labels:
                raise NotFoundError(f"secret {name!r} has no version labelled {label!r}")
            number = meta.labels[label]
        else:
            assert version is not None
            number = version
        info = meta.versions.get(number)
        if info is None:
            raise NotFoundError(f"secret {name!r} has no version {number}")
        if info["destroyed"]:
            if label == CURRENT and version is None:  # a plain read: say how to get a value again
                raise NotFoundError(destroyed_current_message(name, number))
            raise NotFoundError(f"version {number} of {name!r} was destroyed")
        return number

    # ---- writes ----------------------------------------------------------------------------

    def put(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        max_versions: int | None = None,
        expires: datetime | None = None,
    ) -> VersionInfo:
        validate_name(name)
        value = checked_value(value)
        expires = checked_expiry(name, expires)
        if expect_version is not None and expect_version < 0:
            raise InvalidInputError("--expect-version must be 0 (create only) or a version number")
        checked_metadata(name, description, tags)
        checked_max_versions(name, max_versions)

        def attempt() -> VersionInfo:
            now = self._clock()
            meta_entry, meta = self._read_meta(name)
            current = None if meta is None else meta.labels.get(CURRENT)
            if meta is not None and meta.deleted is not None:
                raise SecretStateError(
                    f"secret {name!r} is deleted; run 'undelete {name}' first, or 'destroy {name} --all'"
                )
            if expect_version is not None and (current or 0) != expect_version:
                raise ConflictError(
                    f"secret {name!r} is at version {current or 0}, not {expect_version}; "
                    "read it again and retry"
                )
            if meta is None:
                meta = _Meta.new(now, acting_actor(self._actor), self._max_versions)
            if description is not None:
                meta.description = description
            if tags is not None:
                meta.tags = dict(tags)
            if max_versions is not None:  # before _write_version prunes, so this write prunes under it
                meta.max_versions = max_versions
            return self._write_version(name, value, meta_entry, meta, now, label=CURRENT, expires=expires)

        return self._retry(attempt)

    def put_batch(
        self,
        writes: Sequence[tuple[str, bytes]],
        *,
        if_exists: str = "fail",
        expires: datetime | None = None,
    ) -> builtins.list[VersionInfo | None]:
        """`BatchWriter.put_batch`: every new version (values, metadata and the keysets' use
        counts) in one storage commit, so a failure or a crash leaves none of them and a lost race
        with another writer retries the whole batch, reading each secret again."""
        if if_exists not in IF_EXISTS:
            raise InvalidInputError(f"if_exists must be one of {', '.join(IF_EXISTS)}")
        names = [name for name, _ in writes]
        if len(set(names)) != len(names):
            raise InvalidInputError("a batch names a secret twice")
        checked: builtins.list[tuple[str, bytes]] = []
        for name, value in writes:
            validate_name(name)
            checked.append((name, checked_value(value)))
        expires = None if not checked else checked_expiry(checked[0][0], expires)

        def attempt() -> builtins.list[VersionInfo | None]:
            now = self._clock()
            actor = acting_actor(self._actor)
            found = self._meta_entries([name for name, _ in checked])
            planned: builtins.list[tuple[str, bytes, Entry | None, _Meta] | None] = []
            for name, value in checked:
                meta_entry, meta = self._read_meta(name) if name in found else (None, None)
                if meta is not None and if_exists == "skip":
                    planned.append(None)
                    continue
                if meta is not None and if_exists == "fail":
                    raise SecretExistsError(name)
                if meta is not None and meta.deleted is not None:
                    raise SecretStateError(
                        f"secret {name!r} is deleted; run 'undelete {name}' first, or 'destroy {name} --all'"
                    )
                planned.append((name, value, meta_entry, meta or _Meta.new(now, actor, self._max_versions)))
            keysets: dict[str, tuple[Expect, Keyset]] = {}
            ops: Operations = []
            numbers: builtins.list[int | None] = []
            for plan in planned:
                if plan is None:
                    numbers.append(None)
                    continue
                name, value, meta_entry, meta = plan
                ns = namespace_of(name)
                if ns not in keysets:
                    keysets[ns] = self._keyset_for_write(ns)
                expect, keyset = keysets[ns]
                number, version_ops = self._version_ops(
                    name, value, meta_entry, meta, now, actor, keyset.primary, label=CURRENT, expires=expires
                )
                ops.extend(version_ops)
                keysets[ns] = (expect, keyset.with_uses(2))
                numbers.append(number)
            if not ops:
                return [None] * len(planned)
            sealed: dict[str, Keyset] = {}
            for ns, (expect, keyset) in keysets.items():
                if expect is ABSENT:
                    ops.append(self._root_guard())
                record = seal_record(self._root, Purpose.KEYSET, ns, 0, keyset.to_bytes())
                ops.append(Put(KEYSET_PREFIX + ns, record, expect))
                sealed[ns] = keyset
            try:
                revision = self._commit(ops)
            except _LostRace:
                for plan, written in zip(planned, numbers, strict=True):
                    if plan is not None and written is not None:
                        self._refuse_if_rolled_back(plan[0], written, plan[2])
                raise
            for ns, keyset in sealed.items():
                self._keysets[ns] = (revision, keyset)
            return [
                None
                if plan is None or written is None
                else next(v for v in plan[3].public(plan[0]).versions if v.version == written)
                for plan, written in zip(planned, numbers, strict=True)
            ]

        return self._retry(attempt)

    def _meta_entries(self, names: builtins.list[str]) -> set[str]:
        """Which of `names` have a metadata row (one read of them all where the storage can)."""
        keys = [META_PREFIX + name for name in names]
        if self._multi_get is not None:
            found = self._multi_get.get_many(keys)
            return {key[len(META_PREFIX) :] for key in found}
        return {key[len(META_PREFIX) :] for key in keys if self._storage.get(key) is not None}

    def _write_version(
        self,
        name: str,
        value: bytes,
        meta_entry: Entry | None,
        meta: _Meta,
        now: float,
        *,
        label: str,
        expires: datetime | None = None,
        target: str | None = None,
    ) -> VersionInfo:
        """Inside a retried attempt: seal `value` as the next version, labelled `label`, prune,
        and commit it with the metadata (compare-and-set on the metadata read)."""
        ns = namespace_of(name)
        ks_expect, keyset = self._keyset_for_write(ns)
        number, ops = self._version_ops(
            name,
            value,
            meta_entry,
            meta,
            now,
            acting_actor(self._actor),
            keyset.primary,
            label=label,
            expires=expires,
            target=target,
        )
        try:
            self._commit_with_keyset(ns, ks_expect, keyset.with_uses(2), ops)
        except _LostRace:
            self._refuse_if_rolled_back(name, number, meta_entry)
            raise
        return next(v for v in meta.public(name).versions if v.version == number)

    def _version_ops(
        self,
        name: str,
        value: bytes,
        meta_entry: Entry | None,
        meta: _Meta,
        now: float,
        actor: str,
        key: DataKey,
        *,
        label: str,
        expires: datetime | None = None,
        target: str | None = None,
    ) -> tuple[int, Operations]:
        """The next version of `name` added to `meta` (labelled, pruned) and the operations that
        store it: the pruned values' deletes, the sealed value, the metadata (compare-and-set on
        `meta_entry`). `put` commits them alone, `put_batch` with the rest of its batch."""
        number = meta.next_version
        meta.add_version(number, now, actor, label=label, value=value)
        if expires is not None:
            meta.set_expiry(number, expires)
        if target is not None:
            meta.versions[number]["target"] = target
        ops: Operations = [Delete(_data_key(name, old)) for old in meta.prune()]
        ops.append(
            Put(
                _data_key(name, number),
                seal_record(key, Purpose.SECRET_VALUE, name, number, value),
                expect=ABSENT,
            )
        )
        ops.append(Put(META_PREFIX + name, self._seal_meta(key, name, meta), _expect(meta_entry)))
        return number, ops

    def _refuse_if_rolled_back(self, name: str, number: int, meta_entry: Entry | None) -> None:
        """After a lost commit of version `number`: IntegrityError if its value row was already
        there while the metadata stayed as read. Every write commits a value with the metadata
        that lists it, so that is no race another writer won (it would have moved the metadata):
        the metadata was rolled back to an older copy (or deleted) and the row is orphaned.
        Retrying could only fail again until the deadline."""
        if self._storage.get(_data_key(name, number)) is None:
            return
        again = self._storage.get(META_PREFIX + name)
        if (again is None) != (meta_entry is None) or (
            again is not None and meta_entry is not None and again.revision != meta_entry.revision
        ):
            return  # another writer changed the metadata meanwhile: a race, retried
        orphans = self._orphaned_versions(name, number)
        numbers = ", ".join(map(str, orphans))
        restore = (
            "'secrets-manager restore FILE --on-existing overwrite' brings the secret back from a backup"
        )
        if meta_entry is None:
            raise IntegrityError(
                f"secret {name!r} has stored values (version {numbers}) but no metadata: its metadata "
                "was deleted from the store; nothing was written. To go on, erase those values with "
                f"'secrets-manager destroy {name} --all' (then {restore}), and store it again"
            )
        listed = " ".join(f"--version {n}" for n in orphans)
        raise IntegrityError(
            f"secret {name!r} has stored values its metadata does not list (version {numbers}): its "
            "metadata was rolled back to an older copy, so 'get' may serve an older value as current; "
            "nothing was written. Check it against a backup; to go on, erase those values with "
            f"'secrets-manager destroy {name} {listed}' (then {restore}), and store again"
        )

    def unlisted_values(self, listed: Iterable[SecretMetadata]) -> dict[str, builtins.list[int]]:
        """Values stored that their secret's metadata does not list as kept, by name: what a
        `meta/` row rolled back to an older copy, or deleted, leaves behind (the next write of
        the name refuses to go on). `listed`: every secret's metadata (`list(include_deleted=
        True)`), so this costs one scan of the `data/` keys and no decryption, except a fresh
        read of the metadata of a name that looks wrong (a write may have landed between the two
        reads)."""
        kept = {meta.name: {v.version for v in meta.versions if not v.destroyed} for meta in listed}
        suspects = set()
        for key in self._storage.list(DATA_PREFIX):
            name, number = value_row_parts(key)
            if not number.isdigit() or int(number) not in kept.get(name, set()):
                suspects.add(name)
        found: dict[str, builtins.list[int]] = {}
        for name in sorted(suspects):
            # Rows, then the metadata, then the rows again: a row and the metadata that lists it are
            # committed together, so a row seen before a metadata read that does not list it, and
            # still there after, is unlisted; a write landing meanwhile adds rows only to the
            # second scan, a destroy removes them from it (either way they are not counted).
            before = set(self._orphaned_versions(name, 1))
            _, meta = self._read_meta(name)
            fresh = set() if meta is None else {n for n, i in meta.versions.items() if not i["destroyed"]}
            unlisted = sorted((before - fresh) & set(self._orphaned_versions(name, 1)))
            if unlisted:
                found[name] = unlisted
        return found

    def _orphaned_versions(self, name: str, first: int) -> builtins.list[int]:
        """The version numbers from `first` on that have a value row (a scan of keys only)."""
        prefix = f"{DATA_PREFIX}{name}#"
        found = []
        for key in self._storage.list(prefix):
            number = key[len(prefix) :]
            if number.isdigit() and int(number) >= first:
                found.append(int(number))
        return sorted(found)

    # ---- rotation: the pending label -----------------------------------------------------------

    def stage(
        self, name: str, value: bytes, *, expect_current: int | None = None, target: str | None = None
    ) -> VersionInfo:
        """A new version labelled `pending`; `current` and `previous` stay where they are. With
        `expect_current`, only if that version is current (checked in the same commit). `target`:
        kept in the version's object of the metadata (docs/format.md), committed with it."""
        self._require_pending_label()
        validate_name(name)
        value = checked_value(value)
        target = checked_target(name, target)

        def attempt() -> VersionInfo:
            now = self._clock()
            meta_entry, meta = self._read_meta(name)
            if meta_entry is None or meta is None:
                raise NotFoundError(f"secret {name!r} not found")
            if meta.deleted is not None:
                raise SecretStateError(
                    f"secret {name!r} is deleted; run 'undelete {name}' first, or 'destroy {name} --all'"
                )
            # Checked on the metadata this attempt commits against: of two stagers, one wins.
            refuse_if_rotating(name, meta.labels.get(PENDING), meta.labels.get(CURRENT))
            refuse_if_changed(name, expect_current, meta.labels.get(CURRENT))
            return self._write_version(name, value, meta_entry, meta, now, label=PENDING, target=target)

        return self._retry(attempt)

    def promote(self, name: str, version: int) -> int | None:
        """`version` (which must carry `pending`) becomes current; the old current, previous.
        Returns that old current, read in the same commit."""
        self._require_pending_label()
        previous: int | None = None

        def change(meta: _Meta, now: float) -> Operations:
            nonlocal previous
            if meta.deleted is not None:
                raise SecretStateError(f"secret {name!r} is deleted; run 'undelete {name}' first")
            pending = meta.labels.get(PENDING)
            if pending != version:
                now_pending = "no version is" if pending is None else f"version {pending} is"
                raise ConflictError(
                    f"version {version} of {name!r} is not pending ({now_pending}); nothing was promoted"
                )
            if meta.versions[version]["destroyed"]:
                raise ConflictError(f"version {version} of {name!r} was destroyed; nothing was promoted")
            refuse_to_demote(name, version, meta.labels.get(CURRENT))
            previous = meta.labels.get(CURRENT)  # set again by each retry: the one that commits wins
            if previous is not None:
                meta.labels[PREVIOUS] = previous
            meta.labels[CURRENT] = version
            del meta.labels[PENDING]
            return []

        self._update_meta(name, change)
        return previous

    def discard_pending(self, name: str) -> int:
        """Remove the `pending` label; the version it was on stays, unlabelled. Returns that
        version, read in the same commit. SecretStateError if the secret is deleted."""
        self._require_pending_label()
        discarded = 0

        def change(meta: _Meta, now: float) -> Operations:
            nonlocal discarded
            if meta.deleted is not None:  # as promote and stage: undelete first
                raise SecretStateError(f"secret {name!r} is deleted; run 'undelete {name}' first")
            if PENDING not in meta.labels:
                raise NotFoundError(f"secret {name!r} has no version labelled {PENDING!r}")
            discarded = meta.labels.pop(PENDING)
            return []

        self._update_meta(name, change)
        return discarded

    def _require_pending_label(self) -> None:
        """A subclass that declares the pending label unsupported gets these operations refused."""
        if Capability.PENDING_LABEL in unsupported_capabilities(self):
            raise UnsupportedOperationError("the 'pending' label is not supported by this store")

    def update_metadata(
        self,
        name: str,
        *,
        description: str | None = None,
        set_tags: Mapping[str, str] | None = None,
        remove_tags: Iterable[str] = (),
        max_versions: int | None = None,
        expires: datetime | None = None,
        clear_expiry: bool = False,
        expect_current: int | None = None,
    ) -> None:
        """The description, tags, max_versions and expiry change in the metadata's own compare-and-set
        commit, so two updates of different tags both land; no version is written, and none is
        pruned: a lower max_versions is applied by the next write (`_Meta.prune`), as Vault does."""
        validate_name(name)
        expires, expiry_given = checked_expiry_change(name, expires, clear_expiry)
        setting, removing = checked_metadata_update(
            name, description, set_tags, remove_tags, max_versions, expiry_change=expiry_given
        )

        def change(meta: _Meta, now: float) -> Operations:
            if meta.deleted is not None:
                raise SecretStateError(f"secret {name!r} is deleted; run 'undelete {name}' first")
            current = meta.labels.get(CURRENT)
            refuse_unless_still_current(name, expect_current, current)  # on the metadata it commits on
            if expiry_given:
                refuse_expiry_without_current(name, current)
            old_expiry = meta.expiry()
            # A clear is of the current version's: another version's (a rollback carries it) stays.
            if expiry_given and (expires is not None or meta.expiry_of(current) is not None):
                assert current is not None
                meta.set_expiry(current, expires)
            before = (meta.description, dict(meta.tags), meta.max_versions)
            meta.description, meta.tags = updated_metadata(
                name,
                meta.description,
                meta.tags,
                new_description=description,
                set_tags=setting,
                remove_tags=removing,
            )
            refuse_if_unchanged(
                name,
                before,
                (meta.description, meta.tags),
                max_versions,
                expiry_changes=meta.expiry() != old_expiry,
            )
            if max_versions is not None:
                meta.max_versions = max_versions
            return []

        self._update_meta(name, change)

    def delete(
        self, name: str, *, expect_version: int | None = None, expect_no_pending: bool = False
    ) -> None:
        """`expect_version` and `expect_no_pending` are checked on the metadata the commit is
        conditional on: a write or a stage landing between the read and the commit makes the commit
        fail and this run again, and refuse."""
        checked_expect_version(expect_version)

        def change(meta: _Meta, now: float) -> Operations:
            if meta.deleted is not None:
                raise NotFoundError(f"secret {name!r} is already deleted")
            refuse_unless_current(name, expect_version, meta.labels.get(CURRENT))
            refuse_if_staged(name, expect_no_pending, meta.labels.get(PENDING), meta.labels.get(CURRENT))
            meta.deleted = now
            return []

        self._update_meta(name, change)

    def undelete(self, name: str) -> None:
        def change(meta: _Meta, now: float) -> Operations:
            if meta.deleted is None:
                raise SecretStateError(f"secret {name!r} is not deleted")
            meta.deleted = None
            return []

        self._update_meta(name, change)

    def destroy(self, name: str, versions: Iterable[int]) -> None:
        wanted = sorted(set(versions))
        if not wanted:
            raise InvalidInputError("name the versions to destroy (--version N), or use --all")

        def change(meta: _Meta, now: float) -> Operations:
            # A value stored past the metadata's next version is orphaned (the metadata was rolled
            # back): it may be erased by number, and the metadata is left as it is.
            unlisted = [v for v in wanted if v not in meta.versions]
            orphans = set(self._orphaned_versions(name, meta.next_version)) if unlisted else set()
            missing = [v for v in unlisted if v not in orphans]
            if missing:
                raise NotFoundError(f"secret {name!r} has no version {missing[0]}")
            for number in wanted:
                if number in meta.versions:
                    meta.versions[number]["destroyed"] = True
            return [Delete(_data_key(name, number)) for number in wanted]

        self._update_meta(name, change)

    def destroy_secret(self, name: str, *, deleted_before: datetime | None = None) -> None:
        validate_name(name)

        def attempt() -> None:
            meta_entry, meta = self._read_meta(name)
            # Value rows the metadata does not list (it was rolled back, or deleted) go too.
            orphans = self._orphaned_versions(name, 1 if meta is None else meta.next_version)
            if deleted_before is not None and meta is not None:
                # Decided on the metadata the commit is conditional on: an undelete that lands
                # first makes the commit fail and this run again, and refuse.
                refuse_unless_deleted_before(
                    name, None if meta.deleted is None else _time(meta.deleted), deleted_before
                )
            if meta_entry is None or meta is None:
                if not orphans or deleted_before is not None:
                    raise NotFoundError(f"secret {name!r} not found")
                # On condition that the metadata is still absent (no writer created the secret).
                self._commit(
                    [*(Delete(_data_key(name, n)) for n in orphans), Delete(META_PREFIX + name, ABSENT)]
                )
                return
            ops: Operations = [Delete(_data_key(name, n)) for n in sorted({*meta.versions, *orphans})]
            ops.append(Delete(META_PREFIX + name, expect=meta_entry.revision))
            self._commit(ops)

        self._retry(attempt)

    def _update_meta(self, name: str, change: Callable[[_Meta, float], Operations]) -> None:
        """Read-modify-write of one secret's metadata (plus the extra operations `change` returns)."""
        validate_name(name)

        def attempt() -> None:
            now = self._clock()
            meta_entry, meta = self._read_meta(name)
            if meta_entry is None or meta is None:
                raise NotFoundError(f"secret {name!r} not found")
            ops = change(meta, now)
            meta.updated = now
            ns = namespace_of(name)
            ks_expect, keyset = self._keyset_for_write(ns)
            ops.append(
                Put(META_PREFIX + name, self._seal_meta(keyset.primary, name, meta), meta_entry.revision)
            )
            self._commit_with_keyset(ns, ks_expect, keyset.with_uses(1), ops)

        self._retry(attempt)

    # ---- keysets and records ---------------------------------------------------------------

    def _fresh_key_lookup(self, namespace: str) -> Callable[[int], DataKey]:
        """Key lookup for a read that has just loaded the namespace's keyset (in `_read_meta`):
        use that copy, and go back to storage only for a key it does not know (a rotation since)."""
        cached = self._keysets.get(namespace)

        def lookup(key_id: int) -> DataKey:
            if cached is not None:
                with contextlib.suppress(IntegrityError):
                    return cached[1].key_for_decryption(key_id)
            return self._keyset_for_read(namespace).key_for_decryption(key_id)

        return lookup

    def _keyset_for_read(self, namespace: str) -> Keyset:
        return self._keyset_from(namespace, self._storage.get(KEYSET_PREFIX + namespace))

    def _keyset_from(
        self, namespace: str, entry: Entry | None, root_lookup: Callable[[int], DataKey] | None = None
    ) -> Keyset:
        """The keyset a read found under `core/keyset/<namespace>`; its absence is an integrity
        failure (a namespace with secrets always has one)."""
        if entry is None:
            raise _keyset_missing(namespace)
        return self._decode_keyset(namespace, entry, root_lookup)

    def _keyset_for_write(
        self, namespace: str, policy: RotationPolicy | None = None
    ) -> tuple[Expect, Keyset]:
        """The keyset to seal with, and the precondition to commit it under. Its primary is replaced
        first if `policy` (default: the store's key policy) says it is due.

        A new keyset only for a namespace without records: one whose keyset is gone (damage, a
        partial copy) is refused, not given a fresh one that would hide the loss and leave its
        secrets unreadable even once the old keyset is put back."""
        entry = self._storage.get(KEYSET_PREFIX + namespace)
        if entry is None:
            if self._has_records(namespace):
                if self._storage.get(KEYSET_PREFIX + namespace) is not None:
                    raise _LostRace()  # another writer made the namespace's first secret meanwhile
                raise _keyset_missing(namespace)
            return ABSENT, Keyset.generate(created=int(self._clock()))
        keyset = self._decode_keyset(namespace, entry)
        if policy is None:
            policy = self.key_policy()
        return entry.revision, keyset.with_rotation_if_due(created=int(self._clock()), policy=policy)

    def _has_records(self, namespace: str) -> bool:
        """Whether any `meta/` or `data/` entry belongs to `namespace` (`default` holds the names
        without '/' too, so it lists them all)."""
        if namespace == DEFAULT_NAMESPACE:
            prefixes = [META_PREFIX, DATA_PREFIX]
        else:
            prefixes = [f"{META_PREFIX}{namespace}/", f"{DATA_PREFIX}{namespace}/"]
        for prefix in prefixes:
            base = len(META_PREFIX if prefix.startswith(META_PREFIX) else DATA_PREFIX)
            for key in self._storage.list(prefix):
                if namespace_of(key[base:].partition("#")[0]) == namespace:
                    return True
        return False

    def _decode_keyset(
        self, namespace: str, entry: Entry, root_lookup: Callable[[int], DataKey] | None = None
    ) -> Keyset:
        cached = self._keysets.get(namespace)
        if cached is not None and cached[0] == entry.revision:
            return cached[1]
        try:
            plaintext = open_record(
                root_lookup or self._root_lookup, Purpose.KEYSET, namespace, 0, entry.value
            )
            keyset = Keyset.from_bytes(plaintext)
        except IntegrityError as exc:
            raise _named(exc, _keyset_damaged(namespace)) from None
        self._keysets[namespace] = (entry.revision, keyset)
        return keyset

    def _root_lookup(self, key_id: int) -> DataKey:
        if key_id != self._root.id:
            self._refresh_root(key_id)
        return self._root

    def _root_in_snapshot(self, key_id: int) -> DataKey:
        """The root key for a record read in a snapshot: only the one held (see
        _RootChangedUnderSnapshot), so nothing inside a snapshot reads storage outside it."""
        if key_id != self._root.id:
            raise _RootChangedUnderSnapshot()
        return self._root

    def _adopt_the_headers_root(self) -> None:
        """Outside any snapshot: adopt the root key the header names now, if it is not ours."""
        root_id = _read_header(self._storage)["root_key_id"]
        if root_id != self._root.id:
            self._refresh_root(root_id)

    def _refresh_root(self, key_id: object) -> None:
        """Adopt the root key the header names now, if it is `key_id` (another process rotated it)
        and it opens what this handle read under its own (`_prove_successor`).

        Any other case is the opaque IntegrityError a record under an unknown root key gets."""
        if self._unlock is None or not isinstance(key_id, int) or key_id == self._root.id:
            raise IntegrityError()
        header = _read_header(self._storage)
        if header["root_key_id"] != key_id:
            raise IntegrityError()
        refused = self._refused
        if refused is not None and refused[0] == _dump(header):
            raise refused[1](refused[2])
        source: UnlockSource | None = self._unlock
        try:
            root = _unwrap_root(self._unlock, header)
        except UnlockError:
            if header["unlock"].get("kind") == AwsKmsUnlock.kind and not isinstance(
                self._unlock, AwsKmsUnlock
            ):
                root, source = self._unwrap_through_kms(header)
            else:
                root, source = self._unwrap_with_renewed_source(header)
        if root is self._root:  # another thread adopted it meanwhile
            return
        proven = self._prove_successor(root, header)
        self._root = root
        self._unlock = source
        self._unlock_section = header["unlock"]
        self._keysets.clear()
        self._keysets.update(proven)
        self._policy = None

    def _prove_successor(self, root: DataKey, header: dict[str, Any]) -> dict[str, tuple[int, Keyset]]:
        """Check that `root`, which the header names, was made by someone who held ours, before it
        is adopted: the header is not authenticated, and someone who may write the storage but
        knows no password could otherwise put a root key of their own there (wrapped by their
        KMS key, which this host's credentials may be allowed to use) and read whatever this
        handle seals next. A root rotation re-seals every root-sealed entry in the same commit
        as the header (format 6.3), so the audit key this handle holds must open under `root` to
        the same bytes; without it, a keyset it read must hold one of the same data keys. Those
        keysets are returned, to be cached under the new root (and prove the next one).

        IntegrityError if what opens differs or nothing opens; ConflictError if this handle
        holds nothing to check against (it read nothing sealed under its root key)."""
        audit_key = self._audit_key
        if audit_key is not None:
            plaintext = self._open_under(root, AUDIT_KEY_KEY, Purpose.AUDIT_KEY, AUDIT_KEY_KEY)[1]
            if plaintext is None or not hmac.compare_digest(plaintext, audit_key):
                raise self._refuse(header, IntegrityError, _NOT_OURS)
            return {}
        for namespace, (_, known) in builtins.list(self._keysets.items()):
            revision, plaintext = self._open_under(root, KEYSET_PREFIX + namespace, Purpose.KEYSET, namespace)
            if plaintext is None:
                raise self._refuse(header, IntegrityError, _NOT_OURS)
            try:
                keyset = Keyset.from_bytes(plaintext)
            except IntegrityError:
                raise self._refuse(header, IntegrityError, _NOT_OURS) from None
            if _shares_a_key(known, keyset):
                return {namespace: (revision, keyset)}
        raise self._refuse(
            header,
            ConflictError,
            "the store's root key was rotated, and this process holds nothing it read under the old "
            "one to check the new one against; open the store again (restart serve)",
        )

    def _open_under(self, root: DataKey, key: str, purpose: Purpose, name: str) -> tuple[int, bytes | None]:
        """The entry `key` (its revision), opened with `root` only; None if it is missing or does
        not open. ConflictError if it is sealed under yet another root key the header names now
        (a second rotation meanwhile)."""
        entry = self._storage.get(key)
        if entry is None:
            return 0, None
        sealed_under = self._sealed_under(entry)
        if sealed_under != root.id:
            if sealed_under is not None and _read_header(self._storage)["root_key_id"] != root.id:
                raise ConflictError(
                    "the store's root key was rotated again while this process adopted it; try again"
                )
            return entry.revision, None
        try:
            return entry.revision, open_record(_only(root), purpose, name, 0, entry.value)
        except IntegrityError:
            return entry.revision, None

    def _refuse(
        self, header: dict[str, Any], kind: type[SecretsManagerError], message: str
    ) -> SecretsManagerError:
        """The refusal of the root key `header` names, remembered while that header stays."""
        self._refused = (_dump(header), kind, message)
        return kind(message)

    def _unwrap_through_kms(self, header: dict[str, Any]) -> tuple[DataKey, UnlockSource | None]:
        """Another process switched the store to AWS KMS (`unlock-with kms`) and rotated the root
        key: the header names the KMS key, so this host's AWS credentials may open it without any
        configuration; ConflictError saying so if they cannot. The root key and the source that
        opened it: adopted only once `_prove_successor` accepts the key."""
        with self._renew_lock:
            if self._root.id == header["root_key_id"]:  # another thread adopted it meanwhile
                return self._root, self._unlock
            source = AwsKmsUnlock()
            try:
                root = _unwrap_root(source, header)
            except SecretsManagerError as exc:
                raise ConflictError(
                    "the store's root key was rotated and it is now unlocked by AWS KMS, which this "
                    f"process could not use ({exc.kind}); open the store again (restart serve) with AWS "
                    "credentials that may call kms:Decrypt on its key"
                ) from None
            return root, source

    def _unwrap_with_renewed_source(self, header: dict[str, Any]) -> tuple[DataKey, UnlockSource | None]:
        """The root key `header` names and the unlock source read again (renew_unlock_with) that
        opened it, adopted only once `_prove_successor` accepts the key; ConflictError if there is
        none, it does not open the header either, or it failed less than RENEW_RETRY_SECONDS ago."""
        if isinstance(self._unlock, AwsKmsUnlock):  # switched from KMS to a password meanwhile
            refused = ConflictError(
                "the store's root key was rotated and it is now unlocked by a master password, not "
                "AWS KMS; open the store again (restart serve) with its password"
            )
        elif isinstance(self._unlock, UnlockKeyUnlock):
            # Opened with the agent's key (run, watch, inject --watch): no password to derive the
            # new header's key with. `_unwrap_root` asks the agent again on every call, so it goes
            # on once a prompted command has given the agent that key.
            refused = ConflictError(
                "the store's root key was rotated (or its password changed) since this process "
                "opened it with the unlock agent's key, and the agent has no key for it yet: run "
                "any command that asks for the master password at a terminal (e.g. 'secrets-manager "
                "list'; it gives the agent the new key) and this process goes on, or start it again"
            )
        else:
            refused = ConflictError(
                "the store's root key was rotated and its master password changed since it was "
                "opened; open the store again"
                + ("" if self._renew_unlock is None else " (or put the new password in its password file)")
            )
        if self._renew_unlock is None:
            raise refused
        with self._renew_lock:
            if self._root.id == header["root_key_id"]:  # another thread renewed it meanwhile
                return self._root, self._unlock
            failed_at = self._renew_failed_at
            if failed_at is not None and time.monotonic() - failed_at < RENEW_RETRY_SECONDS:
                raise refused
            try:
                source = self._renew_unlock()
                root = _unwrap_root(source, header)
            except SecretsManagerError:
                self._renew_failed_at = time.monotonic()
                raise refused from None
            self._renew_failed_at = None
            return root, source

    def _root_guard(self) -> Put:
        """Rewrite the header unchanged, on condition that it is still the one that names our root.

        A commit that creates a root-sealed entry (a namespace's first keyset, the audit key, the
        first anchor or policy) carries this, so it cannot land after another process rotated the
        root key: the rotation rewrote the header, the guard's precondition fails, and the retry
        adopts the new root. Entries that already exist need no guard: a rotation rewrites them,
        so their own compare-and-set fails instead."""
        entry = self._storage.get(HEADER_KEY)
        if entry is None:
            raise NotFoundError("the store has no header")
        root_id = _load_json(entry.value, "store header").get("root_key_id")
        if root_id != self._root.id:
            self._refresh_root(root_id)
        return Put(HEADER_KEY, entry.value, expect=entry.revision)

    def key_policy(self) -> RotationPolicy:
        """When primary keys rotate on their own (`core/key-policy`; the default if never set)."""
        entry = self._storage.get(KEY_POLICY_KEY)
        if entry is None:
            return DEFAULT_POLICY
        if self._policy is not None and self._policy[0] == entry.revision:
            return self._policy[1]
        policy = self._open_policy(entry)
        self._policy = (entry.revision, policy)
        return policy

    def _open_policy(self, entry: Entry) -> RotationPolicy:
        try:
            plaintext = open_record(self._root_lookup, Purpose.KEY_POLICY, KEY_POLICY_KEY, 0, entry.value)
            return RotationPolicy.from_bytes(plaintext)
        except IntegrityError as exc:
            raise _named(exc, _core_damaged(f"key policy ({KEY_POLICY_KEY})")) from None

    @property
    def can_scrub(self) -> bool:
        """Whether the storage can erase superseded bytes at all (SQLite can; PostgreSQL cannot)."""
        return isinstance(self._storage, Scrubbable)

    def _scrub(self) -> bool:
        """Ask the storage to erase superseded bytes (see `Scrubbable`); False if it could not."""
        if isinstance(self._storage, Scrubbable):
            return self._storage.scrub()
        return False

    def _commit_with_keyset(
        self, namespace: str, expect: Expect, keyset: Keyset, ops: Operations, *, silent: bool = False
    ) -> None:
        if expect is ABSENT:
            ops.append(self._root_guard())
        sealed = seal_record(self._root, Purpose.KEYSET, namespace, 0, keyset.to_bytes())
        ops.append(Put(KEYSET_PREFIX + namespace, sealed, expect))
        revision = self._commit(ops, silent=silent)
        self._keysets[namespace] = (revision, keyset)

    def _commit(
        self, ops: Operations, *, silent: bool = False, durable: bool = True, lock_wait: float | None = None
    ) -> int:
        try:
            return self._storage.commit(ops, silent=silent, durable=durable, lock_wait=lock_wait)
        except ConflictError:
            raise _LostRace() from None

    def _read_meta(self, name: str) -> tuple[Entry | None, _Meta | None]:
        """The secret's metadata entry and what it holds (None, None if there is none).

        Where the metadata and the keyset are two reads (SQLite), a `keys rewrap` and a `keys
        disable` (or destroy) of the old key can land between them: the metadata read under the key
        the keyset read says is disabled. So a record that does not open is read again, and only
        one that is still the same record is damaged."""
        namespace = namespace_of(name)
        failed: IntegrityError | None = None
        for _attempt in range(META_READ_ATTEMPTS):
            if self._multi_get is not None:  # both in one read: one round trip to a database server
                both = self._multi_get.get_many([META_PREFIX + name, KEYSET_PREFIX + namespace])
                entry, keyset_entry = both.get(META_PREFIX + name), both.get(KEYSET_PREFIX + namespace)
                if entry is None:
                    return None, None
                keyset = self._keyset_from(namespace, keyset_entry)
            else:
                entry = self._storage.get(META_PREFIX + name)
                if entry is None:
                    return None, None
                keyset = self._keyset_for_read(namespace)
            try:
                return entry, _open_meta(keyset, name, entry.value)
            except IntegrityError as exc:
                again = self._storage.get(META_PREFIX + name)
                if again is not None and again.revision == entry.revision:
                    raise  # the same record, under the keyset as it is now: damaged
                failed = exc
        assert failed is not None  # rewritten between the reads at every try
        raise failed

    def _seal_meta(self, key: DataKey, name: str, meta: _Meta) -> bytes:
        return seal_record(key, Purpose.SECRET_METADATA, name, 0, meta.to_json())

    # ---- change feed ---------------------------------------------------------------------------

    def on_commits(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """Call `callback` soon after any writer commits a change, where the storage can tell
        (PostgreSQL: LISTEN/NOTIFY); returns a function that stops it, or None where it cannot
        (SQLite: read `changes_since` now and then)."""
        listen = getattr(self._storage, "on_commits", None)
        return None if listen is None else listen(callback)

    def changes_since(self, revision: int | None) -> tuple[SecretChanges, int]:
        """Secret changes committed after `revision` by any process (None: start from now), and
        the revision to ask from next time. Names and versions only, never values."""
        if revision is None:
            return [], self._storage.changes_since(2**62).revision
        batch = self._storage.changes_since(revision)
        return secret_changes(batch), batch.revision

    def probe(self) -> None:
        """The service's health check: the storage answers (the change feed's head, one read), and
        the root key the header names is the one this handle holds, or is adopted now (another
        process ran `keys rotate --root`; after a `passwd` too, reading the password file again, at
        most every RENEW_RETRY_SECONDS). While it cannot be adopted every call fails with the
        same ConflictError this raises, so the replica must not say SERVING: clients would keep
        choosing it over one whose password file already holds the new password."""
        self.changes_since(None)
        self._adopt_the_headers_root()

    def change_history(self) -> str | None:
        """The line of the database's history the change feed's revisions are on (storage/base.py
        ChangeHead), or None where the storage cannot tell. A revision kept from another process
        means the same changes only under the same history."""
        history = getattr(self._storage, "history", None)
        return history if isinstance(history, str) else None

    # ---- audit support (the `AuditAnchor` protocol of audit/) -----------------------------------

    @property
    def audit_anchor_scoped(self) -> bool:
        """Whether the anchor is one of a shared store's (PostgreSQL: one per host and log path),
        which a new hostname or log path meets missing. Unscoped, `core/audit-anchor` is the one
        anchor, and missing, while the log holds signed records, it was deleted."""
        return self._anchor_key != AUDIT_ANCHOR_KEY

    def audit_key(self) -> bytes:
        """The store's secret audit key (the newest of `audit_keys`), created on first use."""
        return self.audit_keys()[-1]

    def audit_keys(self, *, reload: bool = False) -> tuple[bytes, ...]:
        """Every audit key of the store, oldest first: `core/audit-key` holds them one after the
        other (docs/format.md, purpose 5), sealed under the root key; `audit rotate-key` appends
        one. Read once per handle, and on a store several hosts share again every
        AUDIT_KEYS_RECHECK_SECONDS (another host's rotation reaches no log of this one: its writer
        learns of it here); `reload`: read again now (another process rotated it)."""
        read_again = reload or (
            self._audit_key is not None
            and self.audit_anchor_scoped
            and time.monotonic() - self._audit_keys_read_at >= AUDIT_KEYS_RECHECK_SECONDS
        )
        keyring = self._audit_keyring(read_again=read_again)
        cached = self._audit_keys_cache
        if cached is not None and cached[0] is not keyring and cached[0] == keyring:
            # The same keys read again: the same objects (fingerprints are cached by key identity).
            self._audit_key = keyring = cached[0]
        if cached is None or cached[0] is not keyring:
            try:
                cached = self._audit_keys_cache = (keyring, audit_keys_of(keyring))
            except ValueError:
                raise IntegrityError(_core_damaged(f"audit key ({AUDIT_KEY_KEY})")) from None
        return cached[1]

    def rotate_audit_key(self) -> int:
        """Append a new random audit key to the store's (`audit rotate-key`) in one
        compare-and-set commit of `core/audit-key`, and return its generation. The older keys stay
        to verify what they signed. The log names the new key in its next record (docs/audit.md
        §3a): until then no writer uses it."""
        self.audit_keys()  # made first if the store has none yet

        def attempt() -> bytes:
            entry = self._storage.get(AUDIT_KEY_KEY)
            if entry is None:
                raise IntegrityError(_core_damaged(f"audit key ({AUDIT_KEY_KEY})"))
            if self._sealed_under(entry) != self._root.id:
                self._refresh_root(self._sealed_under(entry))
            try:
                keyring = open_record(self._root_lookup, Purpose.AUDIT_KEY, AUDIT_KEY_KEY, 0, entry.value)
                audit_keys_of(keyring)
            except (IntegrityError, ValueError) as exc:
                raise IntegrityError(_core_damaged(f"audit key ({AUDIT_KEY_KEY})")) from exc
            rotated = keyring + new_key()
            sealed = seal_record(self._root, Purpose.AUDIT_KEY, AUDIT_KEY_KEY, 0, rotated)
            self._commit([Put(AUDIT_KEY_KEY, sealed, _expect(entry))])
            return rotated

        self._audit_key = self._retry(attempt)
        self._audit_keys_read_at = time.monotonic()
        # The generation written: audit_keys() here could read again (a shared store's recheck
        # interval) and count a rotation another host landed after this one.
        return len(audit_keys_of(self._audit_key))

    def _audit_keyring(self, *, read_again: bool = False) -> bytes:
        """The sealed keyring's plaintext: the audit keys one after the other, oldest first."""
        if self._audit_key is None or read_again:

            def attempt() -> Entry:
                entry = self._storage.get(AUDIT_KEY_KEY)
                if entry is None:
                    guard = self._root_guard()
                    sealed = seal_record(self._root, Purpose.AUDIT_KEY, AUDIT_KEY_KEY, 0, new_key())
                    # If another process made one first, this loses the race and the retry uses theirs.
                    self._commit([Put(AUDIT_KEY_KEY, sealed, expect=ABSENT), guard])
                    entry = self._storage.get(AUDIT_KEY_KEY)
                    if entry is None:
                        raise _LostRace()
                return entry

            entry = self._retry(attempt)
            try:
                self._audit_key = open_record(
                    self._root_lookup, Purpose.AUDIT_KEY, AUDIT_KEY_KEY, 0, entry.value
                )
            except IntegrityError as exc:
                raise _named(exc, _core_damaged(f"audit key ({AUDIT_KEY_KEY})")) from None
            self._audit_keys_read_at = time.monotonic()
        return self._audit_key

    def audit_anchor(self) -> Anchor | None:
        """The newest audit record this store vouched for, or None before the first one.
        IntegrityError naming the anchor, and the way out, if it does not open."""
        entry = self._storage.get(self._anchor_key)
        if entry is None:
            return None
        try:
            doc = _load_json(
                open_record(self._root_lookup, Purpose.AUDIT_ANCHOR, self._anchor_key, 0, entry.value),
                "audit anchor",
            )
            return Anchor(seq=int(doc["seq"]), hash=str(doc["hash"]))
        except (IntegrityError, KeyError, TypeError, ValueError):
            raise IntegrityError(
                f"the store's audit anchor ({self._anchor_key}) is damaged (integrity check failed), so "
                "no command can check the audit log against it: if the store file itself was damaged, "
                "restore it from a backup; else replace the anchor with 'secrets-manager audit reset "
                "--accept-loss' (it starts a new audit chain and keeps the old log files)"
            ) from None

    def set_audit_anchor(
        self, anchor: Anchor, *, lock_wait: float | None = None, reset: bool = False
    ) -> None:
        """Vouch for a newer audit record; `lock_wait` bounds the wait for another writer's
        commit lock (StoreBusyError after it, the anchor unmoved). The anchor never moves back:
        an anchor stored meanwhile at the same or a later seq is left as it is, compared within
        the same compare-and-set commit. Only `reset` ('audit reset', beginning a new chain) sets
        it back; a damaged anchor, which does not open, is replaced."""
        doc = _dump({"seq": anchor.seq, "hash": anchor.hash})

        def attempt() -> None:
            # Compare-and-set, so an anchor sealed under a root key that another process has just
            # rotated away can never replace the one the rotation rewrapped.
            entry = self._storage.get(self._anchor_key)
            guarded = entry is None
            if entry is not None and self._sealed_under(entry) != self._root.id:
                try:
                    self._refresh_root(self._sealed_under(entry))
                except IntegrityError:  # damaged: no root key the header names sealed it
                    guarded = True
            if entry is not None and not reset and not guarded:
                try:
                    stored = _load_json(
                        open_record(
                            self._root_lookup, Purpose.AUDIT_ANCHOR, self._anchor_key, 0, entry.value
                        ),
                        "audit anchor",
                    )
                    if int(stored["seq"]) >= anchor.seq:
                        return  # another writer anchored as far or further: never move it back
                except (IntegrityError, KeyError, TypeError, ValueError):
                    pass  # damaged: replaced, as before
            ops: Operations = [self._root_guard()] if guarded else []
            sealed = seal_record(self._root, Purpose.AUDIT_ANCHOR, self._anchor_key, 0, doc)
            # Not fsynced: a power cut can only make the anchor lag, and records past it verify by MAC.
            # Except the first (the log's empty chain, before its first record): a log with records
            # and no anchor is taken for an anchor deleted. Silent: it is not a secret, so watchers
            # need not hear of it.
            self._commit(
                [*ops, Put(self._anchor_key, sealed, _expect(entry))],
                silent=True,
                durable=entry is None,
                lock_wait=lock_wait,
            )

        self._retry(attempt)

    @staticmethod
    def _sealed_under(entry: Entry) -> int | None:
        """The root key id a root-sealed entry names; None if it is not a record at all."""
        try:
            return _root_id_of(entry)
        except IntegrityError:
            return None

    def _retry(self, attempt: Callable[[], T]) -> T:
        """Run `attempt` until it commits without losing a race, with jittered backoff."""
        backoff = Backoff(first=0.001, cap=0.05, deadline_seconds=RETRY_DEADLINE_SECONDS, what="the store")
        while True:
            try:
                return attempt()
            except _LostRace:
                backoff.wait()


# The member of a version's metadata that holds the SHA-256 (hex) of its value (docs/format.md 7).
VALUE_DIGEST = "sha256"


@dataclass
class _Meta:
    """The decrypted metadata document of one secret (docs/format.md, "Metadata")."""

    created: float
    updated: float
    created_by: str
    max_versions: int
    next_version: int = 1
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    deleted: float | None = None
    labels: dict[str, int] = field(default_factory=dict)
    # Out of repr: each version's `sha256` is a digest of its value, which tests a guess of it.
    versions: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def new(cls, now: float, actor: str, max_versions: int) -> _Meta:
        return cls(created=now, updated=now, created_by=actor, max_versions=max_versions)

    def add_version(
        self, number: int, now: float, actor: str, *, label: str = CURRENT, value: bytes | None = None
    ) -> None:
        """A new version that takes `label`: `current` (the old current becomes `previous`), or
        `pending` (staged for rotation; no other label moves). With its `value`'s digest."""
        self.versions[number] = {"created": now, "created_by": actor, "destroyed": False}
        if value is not None:
            self.versions[number][VALUE_DIGEST] = value_digest(value)
        if label == CURRENT and CURRENT in self.labels:
            self.labels[PREVIOUS] = self.labels[CURRENT]
        self.labels[label] = number
        self.next_version = number + 1
        self.updated = now

    def prune(self) -> list[int]:
        """Forget the oldest versions beyond `max_versions`; never one that carries a label."""
        labelled = set(self.labels.values())
        removable = [n for n in sorted(self.versions) if n not in labelled]
        excess = len(self.versions) - self.max_versions
        pruned = removable[: max(excess, 0)]
        for number in pruned:
            del self.versions[number]
        return pruned

    def check_value(self, name: str, number: int, value: bytes) -> None:
        """IntegrityError naming the version unless `value` is the one this metadata recorded for
        it (docs/format.md 7: a version without a digest, written before it, is not checked). The
        record of another value with the same name, version and key (the namesake of a purged
        secret, replayed by the storage) opens; this tells it apart."""
        digest = self.versions.get(number, {}).get(VALUE_DIGEST)
        if digest is None:
            return
        if not isinstance(digest, str) or not value_digest_ok(value, digest):
            raise IntegrityError(_value_damaged(name, number))

    def labels_of(self, number: int) -> tuple[str, ...]:
        return tuple(label for label in LABELS if self.labels.get(label) == number)

    def expiry(self) -> tuple[int, datetime] | None:
        """The one (version, time) expiry recorded: the `expires` of the version that has one."""
        for number, info in sorted(self.versions.items()):
            if info.get("expires") is not None:
                try:
                    return number, _time(float(info["expires"]))
                except (TypeError, ValueError, OverflowError, OSError):
                    return None
        return None

    def expiry_of(self, number: int | None) -> datetime | None:
        return expiry_of(self.expiry(), number)

    def set_expiry(self, number: int, expires: datetime | None) -> None:
        """Record `expires` for version `number` (None: forget it), the one pair kept: any other
        version's goes."""
        for info in self.versions.values():
            info.pop("expires", None)
        if expires is not None:
            self.versions[number]["expires"] = expires.timestamp()

    def target_of(self, number: int) -> str | None:
        """The rotation target recorded with version `number` when it was staged (None without one,
        or a member another writer spoilt)."""
        target = self.versions[number].get("target")
        return target if isinstance(target, str) and target else None

    def public(self, name: str) -> SecretMetadata:
        return SecretMetadata(
            name=name,
            namespace=namespace_of(name),
            created=_time(self.created),
            updated=_time(self.updated),
            created_by=self.created_by,
            description=self.description,
            tags=dict(self.tags),
            current_version=self.labels.get(CURRENT),
            versions=tuple(
                VersionInfo(
                    version=n,
                    created=_time(info["created"]),
                    created_by=info["created_by"],
                    labels=self.labels_of(n),
                    destroyed=info["destroyed"],
                )
                for n, info in sorted(self.versions.items())
            ),
            deleted=None if self.deleted is None else _time(self.deleted),
            max_versions=self.max_versions,
            labels=dict(self.labels),
            expires=self.expiry_of(self.labels.get(CURRENT)),
        )

    def to_json(self) -> bytes:
        doc = {
            "created": self.created,
            "updated": self.updated,
            "created_by": self.created_by,
            "max_versions": self.max_versions,
            "next_version": self.next_version,
            "description": self.description,
            "tags": self.tags,
            "deleted": self.deleted,
            "labels": self.labels,
            "versions": {str(n): info for n, info in self.versions.items()},
        }
        return _dump(doc)

    @classmethod
    def from_json(cls, data: bytes) -> _Meta:
        doc = _load_json(data, "secret metadata")
        try:
            return cls(
                created=float(doc["created"]),
                updated=float(doc["updated"]),
                created_by=str(doc["created_by"]),
                max_versions=int(doc["max_versions"]),
                next_version=int(doc["next_version"]),
                description=str(doc["description"]),
                tags={str(k): str(v) for k, v in doc["tags"].items()},
                deleted=None if doc["deleted"] is None else float(doc["deleted"]),
                labels={str(k): int(v) for k, v in doc["labels"].items()},
                versions={int(n): dict(info) for n, info in doc["versions"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise IntegrityError() from None


_HEADER_NOT_OURS = (
    "the store header does not belong to this store's data: the root key it unwraps opens none of "
    "the store's own keys (its namespaces' keysets, its audit key), so the header was replaced, or "
    "the header of another store was copied over it (integrity check failed). Treat this as "
    "tampering: nothing was read or written; restore the store file (or its core/header entry) "
    "from a backup, and check who can write it"
)
_KEYS_GONE = (
    "the store holds secrets but none of its own keys (no namespace's keyset, no audit key): they "
    "were deleted, so the store header cannot be checked against its data (integrity check "
    "failed). Treat this as tampering: nothing was read or written; restore the store file from a "
    "backup, and check who can write it"
)
_NOT_OURS = (
    "the store header names a root key that does not open this store's own keys (the header was "
    "replaced or damaged; integrity check failed): this process keeps the root key it holds and "
    "sealed nothing under that one. Treat this as tampering: restore the store file (or its "
    "core/header entry) from a backup, and check who can write it"
)


def _named(exc: IntegrityError, message: str) -> IntegrityError:
    """The opaque error of a record that failed to open, as `message` (which names the record and
    says what to do); an error that names its own cause (a damaged keyset, the header) as it is."""
    return IntegrityError(message) if str(exc) == str(IntegrityError()) else exc


def _open_meta(keyset: Keyset, name: str, record: bytes) -> _Meta:
    try:
        return _Meta.from_json(
            open_record(keyset.key_for_decryption, Purpose.SECRET_METADATA, name, 0, record)
        )
    except IntegrityError as exc:
        raise _named(exc, _meta_damaged(name)) from None


def _value_damaged(name: str, number: int) -> str:
    return (
        f"version {number} of {name!r} is damaged (integrity check failed): restore the secret from a "
        f"backup, or destroy the damaged version: secrets-manager destroy {name} --version {number}"
    )


def _meta_damaged(name: str) -> str:
    return (
        f"the metadata of {name!r} is damaged (integrity check failed), so none of its versions can be "
        "read: restore the secret from a backup"
    )


def _keyset_damaged(namespace: str) -> str:
    return (
        f"the keyset of namespace {namespace!r} (core/keyset/{namespace}) is damaged (integrity check "
        "failed), so none of its secrets can be read or written: restore the store from a backup"
    )


def _core_damaged(what: str) -> str:
    return f"the store's {what} is damaged (integrity check failed): restore the store from a backup"


def _value_missing(name: str, number: int) -> IntegrityError:
    return IntegrityError(
        f"the value of version {number} of {name!r} is missing from the store while its metadata "
        f"keeps it (integrity check failed): restore the secret from a backup, or destroy the "
        f"damaged version: secrets-manager destroy {name} --version {number}"
    )


def _keyset_missing(namespace: str) -> IntegrityError:
    return IntegrityError(
        f"the keyset of namespace {namespace!r} (core/keyset/{namespace}) is missing while the namespace "
        "has secrets (integrity check failed): none of them can be read or written; restore the store "
        "from a backup"
    )


def _unlock_changed() -> ConflictError:
    return ConflictError(
        "another process changed what unlocks the store (passwd, unlock-with, keys rotate --root) "
        "since this one opened it; nothing was changed here: run the command again"
    )


def unlock_kind(storage: Storage) -> str:
    """The unlock source the store's header names ("password", "aws-kms"): read before unlocking,
    so a store that KMS unlocks never asks for a password."""
    kind = _read_header(storage)["unlock"].get("kind")
    if not isinstance(kind, str):
        raise IntegrityError("the store header is damaged (integrity check failed)")
    return kind


def _read_header(storage: Storage) -> dict[str, Any]:
    entry = storage.get(HEADER_KEY)
    if entry is None:
        raise NotFoundError(
            "the store is not initialised (an interrupted 'init'?); remove the file and run init"
        )
    header = _load_json(entry.value, "store header")
    fmt = header.get("format")
    if fmt != STORE_FORMAT:
        if isinstance(fmt, int) and fmt > STORE_FORMAT:
            raise StorageError(f"the store has format {fmt}; upgrade secrets-manager to open it")
        raise IntegrityError("the store header is damaged (integrity check failed)")
    expected_types = {"created": int, "root_key_id": int, "unlock": dict}
    for field_name, expected_type in expected_types.items():
        value = header.get(field_name)
        if not isinstance(value, expected_type) or isinstance(value, bool):
            raise IntegrityError("the store header is damaged (integrity check failed)")
    return header


def _unwrap_root(unlock: UnlockSource, header: dict[str, Any]) -> DataKey:
    """The root key (4.4 steps 4-8): UnlockError for a wrong password, IntegrityError for a header
    whose root key id is not the one the wrapped key was sealed with."""
    root = unlock.unwrap(header["unlock"], created=int(header["created"]))
    if root.id != header["root_key_id"]:
        raise IntegrityError("the store header is damaged (integrity check failed)")
    return root


def _header_and_what_its_root_seals(storage: Storage) -> tuple[dict[str, Any], tuple[str, Entry] | None]:
    """The header, and an entry sealed under the root key it names (the audit key, else one
    keyset; None if there is none). The entry is read first: a root rotation committed between
    the two reads leaves it under the old root while the header names the new one, so both are
    read again (a few times at most; then None, and the handle learns nothing). Read after the
    header, a rotation meanwhile left a handle nothing to prove the next root key with."""
    for _ in range(OPEN_READ_ATTEMPTS):
        sealed = _a_root_sealed_entry(storage)
        header = _read_header(storage)
        if sealed is None:
            return header, None
        with contextlib.suppress(IntegrityError):
            if _root_id_of(sealed[1]) == header["root_key_id"]:
                return header, sealed
    return header, None


def _a_root_sealed_entry(storage: Storage) -> tuple[str, Entry] | None:
    entry = storage.get(AUDIT_KEY_KEY)
    if entry is not None:
        return AUDIT_KEY_KEY, entry
    for key in storage.list(KEYSET_PREFIX)[:1]:
        keyset_entry = storage.get(key)
        if keyset_entry is not None:
            return key, keyset_entry
    return None


def root_sealed_keys(storage: Storage) -> builtins.list[tuple[str, Purpose, str]]:
    """Every entry sealed under the root key (docs/format.md 8), the audit key first: its key, and
    the purpose and name it is sealed for. What opening checks the header against, and what a root
    rotation (store/keys.py) seals anew. A `core/` entry this version does not know is not one."""
    found = []
    for key in storage.list("core/"):
        if key.startswith(KEYSET_PREFIX):
            found.append((key, Purpose.KEYSET, key[len(KEYSET_PREFIX) :]))
        elif key == AUDIT_ANCHOR_KEY or key.startswith(SCOPED_ANCHOR_PREFIX):
            found.append((key, Purpose.AUDIT_ANCHOR, key))
        elif key in _FIXED_ROOT_SEALED:
            found.append((key, _FIXED_ROOT_SEALED[key], key))
    return sorted(found, key=lambda sealed: sealed[0] != AUDIT_KEY_KEY)


def _root_id_of(entry: Entry) -> int:
    """The root key id a root-sealed entry names (IntegrityError if it is not a record)."""
    return record_key_id(entry.value)


def _data_key(name: str, version: int) -> str:
    return f"{DATA_PREFIX}{name}#{version}"


def _expect(entry: Entry | None) -> Expect:
    return ABSENT if entry is None else entry.revision


def _dump(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _refuse_non_finite(token: str) -> float:
    raise ValueError(f"{token} is not JSON")


def _finite_float(token: str) -> float:
    number = float(token)
    if not math.isfinite(number):  # 1e400: a float Python reads as inf
        raise ValueError("a number out of range")
    return number


def strict_json_loads(data: bytes | str) -> Any:
    """JSON as RFC 8259 has it: no NaN or Infinity, no number beyond a float's range (ValueError).
    Python's reader takes both, and `int()` of either raised OverflowError (an 'internal error')
    from an edited header; no writer of ours produces them. Nesting deeper than the parser
    recurses (RecursionError) is a ValueError too."""
    try:
        return json.loads(data, parse_constant=_refuse_non_finite, parse_float=_finite_float)
    except RecursionError:  # '[[[[…': nested deeper than the parser recurses
        raise ValueError("JSON nested too deeply") from None


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = strict_json_loads(data)
    except ValueError:
        raise IntegrityError(f"the {what} is damaged (integrity check failed)") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"the {what} is damaged (integrity check failed)")
    return doc


@dataclass
class _SealedValue:
    """A value record as stored, the data key that opened it, and the value's audit fingerprint
    once someone asked for it."""

    record: bytes
    key: DataKey
    fingerprint: str | None
    fingerprint_key: bytes | None = field(default=None, repr=False)  # the audit key it is under


@dataclass
class _CachedSecret:
    """What `get` keeps of a secret (store/read_cache.py): its metadata and the value records it
    read, by version."""

    meta: _Meta
    records: dict[int, _SealedValue]


@dataclass
class _SealedCurrent:
    """One secret of a bulk read as its snapshot found it: the version to read, its keyset and
    sealed value (decrypted after the snapshot ends), or the error a `get` of it would raise.
    `hidden`: left out of a read by prefix (a deleted secret, which `list` leaves out too)."""

    name: str
    meta: _Meta | None = None
    number: int = 0
    keyset: Keyset | None = None
    record: Entry | None = None
    error: SecretsManagerError | None = None
    hidden: bool = False


def _point_reads(snap: StorageSnapshot, keys: Sequence[str]) -> dict[str, Entry]:
    """`MultiGet.get_many` of a snapshot that has none: a `get` of each key."""
    return {key: entry for key in keys if (entry := snap.get(key)) is not None}


def _opened_current(item: _SealedCurrent, audit_keys: tuple[bytes, ...]) -> CurrentRead:
    """`item`'s value decrypted and checked as `get` checks it (with its fingerprint under the
    newest of `audit_keys`, if any), or its error."""
    if item.error is not None:
        return CurrentRead(item.name, error=item.error)
    assert item.meta is not None and item.keyset is not None
    name, number = item.name, item.number
    if item.record is None:  # metadata and values of one instant: the value is gone
        return CurrentRead(name, error=_value_missing(name, number))
    try:
        plaintext = open_record(
            item.keyset.key_for_decryption, Purpose.SECRET_VALUE, name, number, item.record.value
        )
        item.meta.check_value(name, number, plaintext)
    except IntegrityError as exc:
        return CurrentRead(name, error=_named(exc, _value_damaged(name, number)))
    fingerprint = value_fingerprint(audit_keys[-1], plaintext, len(audit_keys)) if audit_keys else None
    return CurrentRead(name, _secret(name, number, item.meta, plaintext), fingerprint)


def _noting(lookup: Callable[[int], DataKey], used: list[DataKey]) -> Callable[[int], DataKey]:
    """`lookup` that also appends the key it returned to `used`."""

    def noted(key_id: int) -> DataKey:
        key = lookup(key_id)
        used.append(key)
        return key

    return noted


def _shares_a_key(known: Keyset, other: Keyset) -> bool:
    """Whether `other` holds a live data key of `known` (same id, same material): only someone who
    could open `known` can have sealed such a keyset."""
    theirs = {key.id: key.material for key in other.keys if key.material}
    return any(
        key.material and key.id in theirs and hmac.compare_digest(theirs[key.id], key.material)
        for key in known.keys
    )


def _only(key: DataKey) -> Callable[[int], DataKey]:
    """A key lookup that knows one key (a cached record's)."""

    def lookup(key_id: int) -> DataKey:
        if key_id != key.id:
            raise IntegrityError()
        return key

    return lookup


def _secret(name: str, number: int, meta: _Meta, plaintext: bytes) -> Secret:
    return Secret(
        name=name,
        version=number,
        value=SecretValue(plaintext),
        created=_time(meta.versions[number]["created"]),
        labels=meta.labels_of(number),
        expires=meta.expiry_of(number),
        target=meta.target_of(number),
    )


def _by_name(meta: SecretMetadata) -> str:
    return meta.name


def _time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)
