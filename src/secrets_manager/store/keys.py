"""The key lifecycle of an `EncryptedStore` (docs/format.md 6.1 and 11): status, rotate, rewrap,
disable, enable, destroy, the key policy, and rotation of the root key.

Invariant: no step makes a stored secret unreadable.

* `rotate_key` adds a key and makes it primary: new records use it, old keys still decrypt.
* `rewrap` re-seals every record of a namespace that is not under the primary, a small batch per
  commit: each record compare-and-set on its revision, the keyset's use count in the same commit.
  Killed at any point, every record is under a key that still decrypts; run again, it finishes.
* `disable_key` is refused while any record of its namespace names the key; the count and the
  commit are tied by compare-and-set on the keyset, which every write to the namespace rewrites.
* `destroy_key` takes only a disabled key that no record names, drops its material from the
  keyset, and asks the storage to erase superseded bytes (`Scrubbable`), so no older sealed copy
  of the keyset (which held the material) survives in the store's files.
* `rotate_root_key` re-seals every keyset and the other root-sealed entries under a new root key
  and rewrites the header in one commit: O(namespaces), whatever the number of secrets.

Record counts come from record headers (`record_key_id`): nothing is decrypted to count. This
module is the other half of `EncryptedStore`, split out for size; it uses that class's internals.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from secrets_manager.crypto import (
    DataKey,
    Keyset,
    KeyStatus,
    Purpose,
    RotationPolicy,
    open_record,
    seal_record,
)
from secrets_manager.crypto.aead import new_key
from secrets_manager.crypto.keyset import DEFAULT_POLICY, ROTATE_AFTER_USES, new_key_id
from secrets_manager.crypto.record import record_key_id
from secrets_manager.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from secrets_manager.storage import ABSENT, Entry, Put, Snapshotting
from secrets_manager.store.encrypted import (
    AUDIT_ANCHOR_KEY,
    AUDIT_KEY_KEY,
    DATA_PREFIX,
    HEADER_KEY,
    KEY_POLICY_KEY,
    KEYSET_PREFIX,
    META_PREFIX,
    RECOVERY_KEY,
    SCOPED_ANCHOR_PREFIX,
    EncryptedStore,
    Operations,
    _core_damaged,
    _dump,
    _expect,
    _keyset_damaged,
    _keyset_missing,
    _load_json,
    _named,
    root_sealed_keys,
)
from secrets_manager.store.names import (
    DEFAULT_NAMESPACE,
    namespace_of,
    validate_name,
    validate_namespace,
)
from secrets_manager.store.recovery import RECORD_DAMAGED as RECOVERY_RECORD_DAMAGED
from secrets_manager.store.recovery import SECTION as RECOVERY_SECTION
from secrets_manager.store.recovery import (
    RecoverySetup,
    refuse_a_section_without_its_record,
    sealed_root_section,
)

DEFAULT_REWRAP_BATCH = 100  # records per commit: small enough to stay out of live writers' way
MAX_REWRAP_PASSES = 5  # a `keys rotate` during a pass leaves fresh work behind: passes at most

# progress(namespace, records done, records to do in all)
RewrapProgress = Callable[[str, int, int], None]

# The part of a `data/` key after the prefix (docs/format.md 8): a name, '#', a decimal version.
_DATA_KEY = re.compile(r"(?P<name>[^#]+)#(?P<version>[1-9][0-9]{0,18})")


@dataclass(frozen=True)
class KeyInfo:
    """One data key as `keys status` shows it. `records` counts values and metadata under it."""

    namespace: str
    id: int
    state: str  # "primary", "enabled", "disabled" or "destroyed"
    created: datetime
    uses: int
    records: int


@dataclass(frozen=True)
class UnreadableRecord:
    """A record rewrap could not open: under a disabled key, or damaged (integrity check failed)."""

    name: str
    version: int  # 0: the secret's metadata
    key_id: int | None  # None: not even the record header is intact


@dataclass(frozen=True)
class RewrapResult:
    namespace: str
    primary_id: int
    rewrapped: int
    unreadable: tuple[UnreadableRecord, ...] = ()
    left: int = 0  # records still under older keys: the primary was rotated during every pass


@dataclass(frozen=True)
class DestroyResult:
    namespace: str
    scrubbed: bool  # False: the storage could not erase superseded bytes (see `Scrubbable`)


@dataclass(frozen=True)
class RootRotation:
    old_id: int
    new_id: int
    namespaces: int
    scrubbed: bool


# ---- reading -------------------------------------------------------------------------------------


def namespaces(store: EncryptedStore) -> list[str]:
    """Every namespace that has a keyset, sorted."""
    return [key[len(KEYSET_PREFIX) :] for key in store._storage.list(KEYSET_PREFIX)]


def key_status(store: EncryptedStore, namespace: str | None = None) -> list[KeyInfo]:
    """Every key of one namespace (or of all), in creation order, with how many records use it."""
    if namespace is not None:
        _require_keyset(store, namespace)
    selected = [namespace] if namespace is not None else namespaces(store)
    counts = _count_records(store, namespace)
    result = []
    for ns in selected:
        keyset = store._keyset_for_read(ns)
        for key in keyset.keys:
            result.append(
                KeyInfo(
                    namespace=ns,
                    id=key.id,
                    state="primary" if key.id == keyset.primary_id else key.status.value,
                    created=datetime.fromtimestamp(key.created, tz=UTC),
                    uses=key.uses,
                    records=counts[ns, key.id],
                )
            )
    return result


# ---- data keys -----------------------------------------------------------------------------------


def rotate_key(store: EncryptedStore, namespace: str) -> int:
    """Add a key to the namespace's keyset and make it primary; return its id."""
    _require_keyset(store, namespace)

    def attempt() -> int:
        entry = store._storage.get(KEYSET_PREFIX + namespace)
        if entry is None:
            raise _missing_keyset(namespace)
        keyset = store._decode_keyset(namespace, entry).with_new_primary(created=int(store._clock()))
        store._commit_with_keyset(namespace, entry.revision, keyset, [])
        return keyset.primary_id

    return store._retry(attempt)


def rewrap(
    store: EncryptedStore,
    namespace: str,
    *,
    progress: RewrapProgress | None = None,
    batch_size: int = DEFAULT_REWRAP_BATCH,
) -> RewrapResult:
    """Re-seal every record of `namespace` (values and metadata) that is not under the primary key,
    keeping names, version numbers, labels and metadata as they are.

    Records that cannot be opened are left alone and listed in the result. If the primary is due
    under the key policy it is rotated first; during the rewrap only the hard limit
    (ROTATE_AFTER_USES) rotates it, so a low policy threshold cannot keep the job from finishing.
    """
    _require_keyset(store, namespace)
    if batch_size < 1:
        raise InvalidInputError("the rewrap batch size is at least 1 record")
    _rotate_if_due(store, namespace)
    report = progress or (lambda _ns, _done, _total: None)
    unreadable: dict[str, UnreadableRecord] = {}
    rewrapped = done = 0
    for _pass in range(MAX_REWRAP_PASSES):
        primary_id = store._keyset_for_read(namespace).primary_id
        pending = [
            key
            for key, key_id in _record_key_ids(store, namespace)
            if key not in unreadable and key_id not in (None, primary_id)
        ]
        if not pending:
            break
        total = done + len(pending)
        report(namespace, done, total)
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            count, bad = store._retry(partial(_rewrap_batch, store, namespace, batch))
            rewrapped += count
            unreadable.update(bad)
            done += len(batch)
            report(namespace, done, total)
        if store._keyset_for_read(namespace).primary_id == primary_id:
            break  # only the primary encrypts: with no rotation meanwhile, nothing new can be left
    else:
        # Every pass was outrun by a rotation (another process's, or the key policy's at other
        # writers' writes): what they wrote under the keys rotated away is still there.
        primary_id = store._keyset_for_read(namespace).primary_id
        left = sum(
            1
            for key, key_id in _record_key_ids(store, namespace)
            if key not in unreadable and key_id not in (None, primary_id)
        )
        return RewrapResult(namespace, primary_id, rewrapped, _sorted(unreadable), left)
    return RewrapResult(
        namespace=namespace,
        primary_id=store._keyset_for_read(namespace).primary_id,
        rewrapped=rewrapped,
        unreadable=_sorted(unreadable),
    )


def _sorted(unreadable: dict[str, UnreadableRecord]) -> tuple[UnreadableRecord, ...]:
    return tuple(unreadable[key] for key in sorted(unreadable))


def disable_key(store: EncryptedStore, key_id: int, namespace: str | None = None) -> str:
    """Disable a key no record uses any more (it stops decrypting); return its namespace.

    ConflictError (saying how many records and what to run) while records still use it, and for
    the primary or a destroyed key. Disabling a disabled key changes nothing."""
    ns = _namespace_of_key(store, key_id, namespace)

    def attempt() -> None:
        entry, keyset = _keyset_entry(store, ns)
        key = keyset.key(key_id)
        if key_id == keyset.primary_id:
            raise _primary_conflict(key_id, ns, "disabled")
        if key.status is KeyStatus.DESTROYED:
            raise ConflictError(f"key {key_id} of namespace {ns!r} is destroyed; there is nothing to disable")
        if key.status is KeyStatus.DISABLED:
            return
        in_use = _count_records(store, ns)[ns, key_id]
        if in_use:
            raise ConflictError(
                f"key {key_id} still encrypts {in_use} record{'s' if in_use != 1 else ''} of namespace "
                f"{ns!r}; run 'secrets-manager keys rewrap {ns}' first"
            )
        store._commit_with_keyset(ns, entry.revision, keyset.with_status(key_id, KeyStatus.DISABLED), [])

    store._retry(attempt)
    return ns


def enable_key(store: EncryptedStore, key_id: int, namespace: str | None = None) -> str:
    """Let a disabled key decrypt again; return its namespace. A destroyed key cannot come back."""
    ns = _namespace_of_key(store, key_id, namespace)

    def attempt() -> None:
        entry, keyset = _keyset_entry(store, ns)
        key = keyset.key(key_id)
        if key.status is KeyStatus.DESTROYED:
            raise ConflictError(f"key {key_id} of namespace {ns!r} is destroyed; its material is gone")
        if key.status is KeyStatus.ENABLED:
            return
        store._commit_with_keyset(ns, entry.revision, keyset.with_status(key_id, KeyStatus.ENABLED), [])

    store._retry(attempt)
    return ns


def destroy_key(store: EncryptedStore, key_id: int, namespace: str | None = None) -> DestroyResult:
    """Erase a disabled, unused key's material from the keyset and from the store's files."""
    ns = _namespace_of_key(store, key_id, namespace)

    def attempt() -> None:
        entry, keyset = _keyset_entry(store, ns)
        key = keyset.key(key_id)
        if key_id == keyset.primary_id:
            raise _primary_conflict(key_id, ns, "destroyed")
        if key.status is KeyStatus.ENABLED:
            raise ConflictError(
                f"key {key_id} of namespace {ns!r} is enabled; disable it first with "
                f"'secrets-manager keys disable {key_id}'"
            )
        if key.status is KeyStatus.DESTROYED:
            return
        in_use = _count_records(store, ns)[ns, key_id]
        if in_use:  # a disabled key cannot gain records; these came from outside (a restore, tampering)
            raise ConflictError(
                f"disabled key {key_id} still has {in_use} record{'s' if in_use != 1 else ''} of "
                f"namespace {ns!r}; run 'secrets-manager keys enable {key_id}' and "
                f"'secrets-manager keys rewrap {ns}' first"
            )
        store._commit_with_keyset(ns, entry.revision, keyset.with_destroyed(key_id), [])

    store._retry(attempt)
    return DestroyResult(namespace=ns, scrubbed=store._scrub())


# ---- the key policy ------------------------------------------------------------------------------


def update_key_policy(
    store: EncryptedStore, change: Callable[[RotationPolicy], RotationPolicy]
) -> RotationPolicy:
    """Replace the store's key policy by `change(current)`, compare-and-set; return the new one."""

    def attempt() -> RotationPolicy:
        entry = store._storage.get(KEY_POLICY_KEY)
        current = DEFAULT_POLICY if entry is None else store._open_policy(entry)
        try:
            new = change(current)
        except ValueError as exc:
            raise InvalidInputError(f"key policy: {exc}") from None
        ops: Operations = [] if entry is not None else [store._root_guard()]
        sealed = seal_record(store._root, Purpose.KEY_POLICY, KEY_POLICY_KEY, 0, new.to_bytes())
        ops.append(Put(KEY_POLICY_KEY, sealed, _expect(entry)))
        store._commit(ops)
        return new

    return store._retry(attempt)


# ---- the root key --------------------------------------------------------------------------------


def rotate_root_key(store: EncryptedStore) -> RootRotation:
    """A new root key: every keyset, the audit key, the audit anchor and the key policy re-sealed
    under it and the header rewritten (wrapped by the same unlock source, so the password stays),
    all in one commit. The old root key's sealed entries are then scrubbed from the storage."""
    unlock = store._unlock
    if unlock is None:
        raise InvalidInputError("this store handle has no unlock source to wrap a new root key with")
    old_id = store._root.id
    new_root = DataKey(
        id=new_key_id({old_id}), status=KeyStatus.ENABLED, created=int(store._clock()), material=new_key()
    )
    section = unlock.wrap(new_root)  # once: with a password this runs Argon2id

    def attempt() -> int:
        header_entry = store._storage.get(HEADER_KEY)
        if header_entry is None:
            raise NotFoundError("the store has no header")
        header = _load_json(header_entry.value, "store header")
        if header.get("root_key_id") != store._root.id or header.get("unlock") != store._unlock_section:
            raise ConflictError(
                "the root key or the master password was changed by another process since this one "
                "opened the store; run the command again"
            )
        ops: Operations = []
        recovery: dict[str, Any] | None = None
        keyset_keys = store._storage.list(KEYSET_PREFIX)
        for key in keyset_keys:
            entry = store._storage.get(key)
            if entry is None:
                continue
            ns = key[len(KEYSET_PREFIX) :]
            try:
                plaintext = open_record(store._root_lookup, Purpose.KEYSET, ns, 0, entry.value)
            except IntegrityError as exc:
                raise _named(exc, _keyset_damaged(ns)) from None
            ops.append(
                Put(key, seal_record(new_root, Purpose.KEYSET, ns, 0, plaintext), expect=entry.revision)
            )
        for key, purpose, _ in root_sealed_keys(store._storage):
            if key.startswith(KEYSET_PREFIX):
                continue  # above, each with its namespace's name
            entry = store._storage.get(key)
            if entry is None:  # creating one carries the header guard, so it cannot slip past us
                continue
            try:
                plaintext = open_record(store._root_lookup, purpose, key, 0, entry.value)
            except IntegrityError as exc:
                raise _named(exc, _root_sealed_damaged(key)) from None
            ops.append(Put(key, seal_record(new_root, purpose, key, 0, plaintext), expect=entry.revision))
            if key == RECOVERY_KEY:  # the shares stay valid: seal the new root to their public key
                recovery = sealed_root_section(new_root, RecoverySetup.from_bytes(plaintext))
        if recovery is None and header.get(RECOVERY_SECTION) is not None:
            # The section without its record: sealing nothing would drop it for good (damage).
            refuse_a_section_without_its_record(store, header_entry)
        header.update(root_key_id=new_root.id, unlock=section)
        header.pop(RECOVERY_SECTION, None)
        if recovery is not None:
            header[RECOVERY_SECTION] = recovery
        ops.append(Put(HEADER_KEY, _dump(header), expect=header_entry.revision))
        store._commit(ops)
        return len(keyset_keys)

    count = store._retry(attempt)
    store._root = new_root
    store._unlock_section = section
    store._keysets.clear()
    store._policy = None
    return RootRotation(old_id=old_id, new_id=new_root.id, namespaces=count, scrubbed=store._scrub())


# ---- helpers -------------------------------------------------------------------------------------


def _root_sealed_damaged(key: str) -> str:
    if key == AUDIT_ANCHOR_KEY or key.startswith(SCOPED_ANCHOR_PREFIX):
        return (
            f"the store's audit anchor ({key}) is damaged (integrity check failed): if the store file "
            "itself was damaged, restore it from a backup; else replace the anchor with "
            "'secrets-manager audit reset --accept-loss'"
        )
    if key == RECOVERY_KEY:
        return RECOVERY_RECORD_DAMAGED
    what = {AUDIT_KEY_KEY: "audit key", KEY_POLICY_KEY: "key policy"}
    return _core_damaged(f"{what.get(key, 'entry')} ({key})")


def _require_keyset(store: EncryptedStore, namespace: str) -> None:
    validate_namespace(namespace)
    if store._storage.get(KEYSET_PREFIX + namespace) is None:
        raise _missing_keyset(namespace)


def _missing_keyset(namespace: str) -> NotFoundError:
    return NotFoundError(
        f"namespace {namespace!r} has no keys (nothing was ever stored in it); "
        "see 'secrets-manager keys status'"
    )


def _keyset_entry(store: EncryptedStore, namespace: str) -> tuple[Entry, Keyset]:
    entry = store._storage.get(KEYSET_PREFIX + namespace)
    if entry is None:
        raise _keyset_missing(namespace)
    return entry, store._decode_keyset(namespace, entry)


def _primary_conflict(key_id: int, namespace: str, what: str) -> ConflictError:
    return ConflictError(
        f"key {key_id} is the primary key of namespace {namespace!r} and cannot be {what}; run "
        f"'secrets-manager keys rotate {namespace}' and 'secrets-manager keys rewrap {namespace}' first"
    )


def _namespace_of_key(store: EncryptedStore, key_id: int, namespace: str | None) -> str:
    """The namespace whose keyset holds `key_id` (ids are unique within a keyset, random across)."""
    if isinstance(key_id, bool) or not isinstance(key_id, int) or not 0 < key_id < 2**32:
        raise InvalidInputError(
            "a key id is a number from 1 to 4294967295 (see 'secrets-manager keys status')"
        )
    if namespace is not None:
        _require_keyset(store, namespace)
        if all(key.id != key_id for key in store._keyset_for_read(namespace).keys):
            raise NotFoundError(
                f"namespace {namespace!r} has no key {key_id}; see 'secrets-manager keys status {namespace}'"
            )
        return namespace
    found = [ns for ns in namespaces(store) if any(k.id == key_id for k in store._keyset_for_read(ns).keys)]
    if not found:
        raise NotFoundError(f"no key has id {key_id}; see 'secrets-manager keys status'")
    if len(found) > 1:
        raise InvalidInputError(
            f"key id {key_id} exists in namespaces {', '.join(found)}; say which with --namespace"
        )
    return found[0]


def _rotate_if_due(store: EncryptedStore, namespace: str) -> None:
    def attempt() -> None:
        entry, keyset = _keyset_entry(store, namespace)
        rotated = keyset.with_rotation_if_due(created=int(store._clock()), policy=store.key_policy())
        if rotated is not keyset:
            store._commit_with_keyset(namespace, entry.revision, rotated, [])

    store._retry(attempt)


def _rewrap_batch(
    store: EncryptedStore, namespace: str, batch: Sequence[str]
) -> tuple[int, dict[str, UnreadableRecord]]:
    """One commit: re-seal the records of `batch` not under the primary; (count, unreadable)."""
    expect, keyset = store._keyset_for_write(namespace, DEFAULT_POLICY)
    if expect is ABSENT:
        raise _keyset_missing(namespace)
    ops: Operations = []
    unreadable: dict[str, UnreadableRecord] = {}
    if store._multi_get is not None:  # one round trip for the batch, not one per record
        entries: dict[str, Entry | None] = dict(store._multi_get.get_many(batch))
    else:
        entries = {key: store._storage.get(key) for key in batch}
    for key in batch:
        entry = entries.get(key)
        if entry is None:  # pruned or destroyed since the scan
            continue
        purpose, name, version = _record_place(key)
        try:
            key_id: int | None = record_key_id(entry.value)
            if key_id == keyset.primary_id:
                continue  # rewritten by a writer since the scan
            plaintext = open_record(keyset.key_for_decryption, purpose, name, version, entry.value)
        except IntegrityError:
            key_id = _key_id_at(store, key)
            unreadable[key] = UnreadableRecord(name=name, version=version, key_id=key_id)
            continue
        sealed = seal_record(keyset.primary, purpose, name, version, plaintext)
        ops.append(Put(key, sealed, expect=entry.revision))
    count = len(ops)
    if count:
        # Silent: re-encryption changes no secret, so watchers are not told of it.
        store._commit_with_keyset(namespace, expect, keyset.with_uses(count), ops, silent=True)
    return count, unreadable


def _record_keys(store: EncryptedStore, namespace: str | None) -> Iterator[str]:
    """Storage keys of the value and metadata records of one namespace (or of all)."""
    for prefix in _record_prefixes(namespace):
        for key in store._storage.list(prefix):
            if namespace is None or namespace_of(_record_place(key)[1]) == namespace:
                yield key


def _record_key_ids(store: EncryptedStore, namespace: str | None) -> list[tuple[str, int | None]]:
    """(storage key, id of the key its record names or None) of every value and metadata record
    of one namespace (or of all): where the storage can, read in one pass of a snapshot (one
    query per prefix) instead of one read per record, which on a database server was a round
    trip each (30,000 for 15,000 secrets)."""
    storage = store._storage
    if not isinstance(storage, Snapshotting):
        return [(key, _key_id_at(store, key)) for key in _record_keys(store, namespace)]
    found: list[tuple[str, int | None]] = []
    with storage.snapshot() as snapshot:
        for prefix in _record_prefixes(namespace):
            for key, entry in snapshot.scan(prefix):
                if namespace is None or namespace_of(_record_place(key)[1]) == namespace:
                    found.append((key, _header_key_id(entry.value)))
    return found


def _record_prefixes(namespace: str | None) -> list[str]:
    if namespace is None or namespace == DEFAULT_NAMESPACE:
        return [META_PREFIX, DATA_PREFIX]  # `default` also holds names without '/'
    return [f"{META_PREFIX}{namespace}/", f"{DATA_PREFIX}{namespace}/"]


def _header_key_id(record: bytes) -> int | None:
    try:
        return record_key_id(record)
    except IntegrityError:
        return None


def _record_place(key: str) -> tuple[Purpose, str, int]:
    """(purpose, name, version) a record under this storage key is sealed for; IntegrityError
    naming the entry if its key is not one of the storage layout (docs/format.md 8)."""
    if key.startswith(DATA_PREFIX):
        match = _DATA_KEY.fullmatch(key[len(DATA_PREFIX) :])
        if match is None:
            raise _stray_entry(key)
        purpose, name, version = Purpose.SECRET_VALUE, match["name"], int(match["version"])
    else:
        purpose, name, version = Purpose.SECRET_METADATA, key[len(META_PREFIX) :], 0
    try:
        validate_name(name)
    except InvalidInputError:
        raise _stray_entry(key) from None
    return purpose, name, version


def _stray_entry(key: str) -> IntegrityError:
    return IntegrityError(
        f"the entry {key!r} is not part of the store layout (integrity check failed): the store was "
        "damaged or edited by hand; restore it from a backup"
    )


def _key_id_at(store: EncryptedStore, key: str) -> int | None:
    """The key id in the header of the record stored under `key`; None if missing or malformed."""
    entry = store._storage.get(key)
    return None if entry is None else _header_key_id(entry.value)


def _count_records(store: EncryptedStore, namespace: str | None) -> Counter[tuple[str, int]]:
    """How many records each (namespace, key id) seals, read from record headers alone."""
    counts: Counter[tuple[str, int]] = Counter()
    for key, key_id in _record_key_ids(store, namespace):
        if key_id is not None:
            counts[namespace_of(_record_place(key)[1]), key_id] += 1
    return counts


__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_REWRAP_BATCH",
    "ROTATE_AFTER_USES",
    "DestroyResult",
    "KeyInfo",
    "RewrapProgress",
    "RewrapResult",
    "RootRotation",
    "RotationPolicy",
    "UnreadableRecord",
    "destroy_key",
    "disable_key",
    "enable_key",
    "key_status",
    "namespaces",
    "rewrap",
    "rotate_key",
    "rotate_root_key",
    "update_key_policy",
]
