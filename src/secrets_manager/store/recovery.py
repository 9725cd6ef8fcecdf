"""Recovery shares for an `EncryptedStore`: a second way to the root key, for when the master
password is forgotten or the AWS KMS key is gone (docs/format.md 4.6).

`recovery init` makes a key pair, seals the root key to its public half and splits the private half
into SLIP-0039 shares, one per custodian; the private key is then dropped. Any `threshold` of the
shares later open the root key once more, to set a new password or KMS key
(`recover_root`, then `EncryptedStore.change_unlock`). Two entries hold it:

- the header's `recovery` section: the root key sealed to the public key (readable without the root
  key: that is the point), rewritten by every root key rotation, which needs only the public key;
- `core/recovery`: the public key and the share set, sealed under the root key, so storage that
  swaps the public key in the header cannot make the next rotation seal the root key to its own.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from secrets_manager.crypto import DataKey, KeyStatus, Purpose, open_record, seal_record
from secrets_manager.crypto.recovery import (
    MAX_SHARES,
    PRIVATE_KEY_SIZE,
    ShareSet,
    combine_recovery_shares,
    describe_share,
    new_recovery_key,
    open_with_recovery_key,
    recovery_public_key,
    seal_to_recovery_key,
    split_recovery_key,
)
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnlockError,
)
from secrets_manager.storage import ABSENT, Delete, Entry, Put, Storage
from secrets_manager.storage.base import Operation
from secrets_manager.store.encrypted import (
    HEADER_KEY,
    RECOVERY_KEY,
    EncryptedStore,
    _dump,
    _load_json,
    _LostRace,
    _named,
    _read_header,
)

SECTION = "recovery"  # the header's member
_UNCHECKED = object()
SECTION_KIND = "x25519-hpke"
_INFO_PREFIX = b"secrets-manager recovery\x00"
_DAMAGED = "the store header is damaged (integrity check failed)"
_WAY_OUT = (
    "so the recovery shares cannot open the store: restore the store from a backup, or drop the set "
    "with 'secrets-manager recovery remove' and make a new one with 'secrets-manager recovery init'"
)
RECORD_DAMAGED = (
    f"the store's recovery record ({RECOVERY_KEY}) is damaged (integrity check failed), {_WAY_OUT}"
)
RECORD_MISSING = (
    f"the store header has a recovery section but the recovery record ({RECOVERY_KEY}) is missing "
    f"(integrity check failed), {_WAY_OUT}"
)


@dataclass(frozen=True)
class RecoverySetup:
    """A store's recovery share set, as `recovery status` shows it (nothing here is secret)."""

    identifier: int  # SLIP-0039's set identifier: printed on every share file of the set
    threshold: int
    shares: int
    created: int
    public_key: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """The first 16 hex digits of the public key's SHA-256: to tell sets apart."""
        return hashlib.sha256(self.public_key).hexdigest()[:16]

    def to_bytes(self) -> bytes:
        return _dump(
            {
                "created": self.created,
                "identifier": self.identifier,
                "public_key": base64.b64encode(self.public_key).decode("ascii"),
                "shares": self.shares,
                "threshold": self.threshold,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RecoverySetup:
        doc = _load_json(data, "recovery record")
        try:
            setup = cls(
                identifier=_int(doc["identifier"]),
                threshold=_int(doc["threshold"]),
                shares=_int(doc["shares"]),
                created=_int(doc["created"]),
                public_key=base64.b64decode(doc["public_key"], validate=True),
            )
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise IntegrityError("the recovery record is damaged (integrity check failed)") from None
        if len(setup.public_key) != PRIVATE_KEY_SIZE or not 1 <= setup.threshold <= setup.shares:
            raise IntegrityError("the recovery record is damaged (integrity check failed)")
        return setup


@dataclass(frozen=True)
class NewShares:
    """A new share set, made but not yet installed: hand out `mnemonics`, then `install_recovery`."""

    setup: RecoverySetup
    mnemonics: tuple[str, ...] = field(repr=False)


def make_recovery_shares(*, threshold: int, shares: int, created: int | None = None) -> NewShares:
    """A new key pair, its private half split into `shares` shares (any `threshold` rebuild it)."""
    private_key = new_recovery_key()
    share_set, mnemonics = split_recovery_key(private_key, threshold=threshold, shares=shares)
    setup = RecoverySetup(
        identifier=share_set.identifier,
        threshold=threshold,
        shares=shares,
        created=int(time.time()) if created is None else created,
        public_key=recovery_public_key(private_key),
    )
    return NewShares(setup=setup, mnemonics=tuple(mnemonics))


def share_set_of(mnemonic: str) -> ShareSet:
    """The set a share belongs to and its threshold; InvalidInputError if it is not a share."""
    return describe_share(mnemonic)


def recovery_setup(store: EncryptedStore) -> RecoverySetup | None:
    """The store's recovery share set, or None if it has none. IntegrityError if the header has a
    recovery section without its `core/recovery` record: the two are written and removed in one
    commit (docs/format.md 4.6), so one without the other is damage, not "no shares"."""

    def attempt() -> RecoverySetup | None:
        header_entry = store._storage.get(HEADER_KEY)
        entry = store._storage.get(RECOVERY_KEY)
        if entry is not None:
            return _open_setup(store._root_lookup, entry.value)
        if header_entry is None or _load_json(header_entry.value, "store header").get(SECTION) is None:
            return None
        refuse_a_section_without_its_record(store, header_entry)
        return None

    return store._retry(attempt)


def refuse_a_section_without_its_record(store: EncryptedStore, header_entry: Entry) -> None:
    """`header_entry` (read before `core/recovery` was found missing) has a recovery section:
    IntegrityError if the header is still at that revision (both reads saw one state); if not, a
    concurrent `recovery remove` or `init` changed both: `_LostRace`, so the caller reads again."""
    again = store._storage.get(HEADER_KEY)
    if again is not None and again.revision == header_entry.revision:
        raise IntegrityError(RECORD_MISSING)
    raise _LostRace()


def install_recovery(
    store: EncryptedStore,
    new: NewShares,
    *,
    replace: bool = False,
    expected: object = _UNCHECKED,  # a RecoverySetup, None (no set), or unchecked
) -> None:
    """Seal the root key to `new`'s public key, in one commit with its `core/recovery` record.

    InvalidInputError if the store has a share set already and `replace` is false: replacing one
    makes the old shares useless, so it must be asked for. `expected`: the set (or None) the caller
    saw; ConflictError if another writer changed it meanwhile (two `--replace` at once would each
    hand out shares, and one set would not work)."""

    def attempt() -> None:
        header_entry = store._storage.get(HEADER_KEY)
        if header_entry is None:
            raise NotFoundError("the store has no header")
        header = _load_json(header_entry.value, "store header")
        if header.get("root_key_id") != store._root.id:
            store._refresh_root(header.get("root_key_id"))  # another process rotated the root key
        existing = store._storage.get(RECOVERY_KEY)
        if existing is not None and not replace:
            raise InvalidInputError(
                "this store has recovery shares already; give --replace to make a new set (the old "
                "shares then stop working)"
            )
        current = None if existing is None else _open_setup(store._root_lookup, existing.value)
        if expected is not _UNCHECKED and current != expected:
            raise ConflictError(
                "another 'recovery init' changed the store's share set meanwhile; these shares were "
                "not installed"
            )
        sealed = seal_record(store._root, Purpose.RECOVERY_KEY, RECOVERY_KEY, 0, new.setup.to_bytes())
        header[SECTION] = sealed_root_section(store._root, new.setup)
        store._commit(
            [
                Put(RECOVERY_KEY, sealed, expect=ABSENT if existing is None else existing.revision),
                Put(HEADER_KEY, _dump(header), expect=header_entry.revision),
            ]
        )

    store._retry(attempt)
    if replace:
        store._scrub()  # the root key sealed to the old set's key leaves the files too


def recovery_header_problem(store: EncryptedStore, setup: RecoverySetup) -> str | None:
    """What is wrong with the header's recovery section, which the shares need, as far as it can
    be checked without them (present, well formed, the current root key, the set `setup` names);
    None if nothing is. The section is not authenticated: storage can damage it unnoticed."""
    header = _read_header(store._storage)
    section = header.get(SECTION)
    if section is None:
        return "the store header has no recovery section"
    try:
        _, identifier, _ = _parse_section(section, header["root_key_id"])
    except IntegrityError:
        return "the store header's recovery section is damaged"
    if identifier is not None and identifier != setup.identifier:
        return f"the store header's recovery section names set {identifier:05d}, not {setup.identifier:05d}"
    return None


def remove_recovery(store: EncryptedStore) -> RecoverySetup | None:
    """Drop the store's share set (its shares stop working); NotFoundError if it has none. A set
    that is damaged (its `core/recovery` record does not open, or only the header's section is
    left) is dropped too, returning None: its shares could not open the store anyway."""

    def attempt() -> RecoverySetup | None:
        header_entry = store._storage.get(HEADER_KEY)
        entry = store._storage.get(RECOVERY_KEY)
        if header_entry is None:
            raise NotFoundError("this store has no recovery shares")
        header = _load_json(header_entry.value, "store header")
        if entry is None and header.get(SECTION) is None:
            raise NotFoundError("this store has no recovery shares")
        setup = None
        if entry is not None:
            with contextlib.suppress(IntegrityError):  # damaged: dropped all the same
                setup = _open_setup(store._root_lookup, entry.value)
        header.pop(SECTION, None)
        # Conditioned on the header's revision, which every install or removal of a set rewrites.
        ops: list[Operation] = [Put(HEADER_KEY, _dump(header), expect=header_entry.revision)]
        if entry is not None:
            ops.append(Delete(RECOVERY_KEY, expect=entry.revision))
        store._commit(ops)
        return setup

    setup: RecoverySetup | None = store._retry(attempt)
    store._scrub()  # the sealed root key of the dropped set leaves the files, not only the header
    return setup


def sealed_root_section(root: DataKey, setup: RecoverySetup) -> dict[str, Any]:
    """The header's `recovery` section: `root` sealed to the set's public key (format 4.6). A root
    key rotation calls this with the new root and the setup read from `core/recovery`."""
    sealed = seal_to_recovery_key(setup.public_key, root.material, _info(root.id, setup.public_key))
    return {
        "identifier": setup.identifier,
        "kind": SECTION_KIND,
        "root_key_id": root.id,
        "sealed_root_key": base64.b64encode(sealed).decode("ascii"),
    }


def recover_root(storage: Storage, mnemonics: list[str], **options: Any) -> EncryptedStore:
    """Open the store on `storage` with recovery shares instead of its unlock source.

    The returned store has no unlock source: give it one with `change_unlock` (a new password or
    KMS key). NotFoundError if the store has no share set; InvalidInputError for shares that do not
    parse or combine; UnlockError for shares of another set; IntegrityError for a doctored header."""
    header = _read_header(storage)
    root, public_key = _root_from_shares(header, mnemonics, "this store")
    # Only the true root key opens core/recovery, and it must name the key the shares rebuilt.
    entry = storage.get(RECOVERY_KEY)
    if entry is None:
        raise IntegrityError(RECORD_MISSING)
    setup = _open_setup(lambda _key_id: root, entry.value)
    if setup.public_key != public_key:
        raise IntegrityError("the recovery record does not match the header (integrity check failed)")
    store = EncryptedStore(storage, root, **options)
    # The unlock section the shares opened beside: a new one replaces it only if it is still there.
    store._unlock_section = header["unlock"]
    return store


def root_from_shares(store_header: dict[str, Any], mnemonics: list[str], what: str) -> DataKey:
    """The root key a store header's recovery section seals, opened with recovery shares: for a
    copy-of-store backup (`what` names it), whose file key the root key wraps. The caller checks
    the root key against what it opens (a backup's file key is authenticated under it). Errors as
    `recover_root`'s."""
    if not isinstance(store_header.get("root_key_id"), int) or not isinstance(
        store_header.get("created"), int
    ):
        raise IntegrityError(_DAMAGED)
    return _root_from_shares(store_header, mnemonics, what)[0]


def _root_from_shares(header: dict[str, Any], mnemonics: list[str], what: str) -> tuple[DataKey, bytes]:
    section = header.get(SECTION)
    if section is None:
        raise NotFoundError(
            f"{what} has no recovery shares: they are made with 'secrets-manager recovery init' "
            "while the store can still be unlocked"
        )
    root_id, stored_identifier, sealed = _parse_section(section, header["root_key_id"])
    private_key = combine_recovery_shares(mnemonics)  # each share parses; one set; enough of them
    given = describe_share(mnemonics[0])
    if stored_identifier is not None and given.identifier != stored_identifier:
        raise UnlockError(_other_set(given, stored_identifier))
    public_key = recovery_public_key(private_key)
    try:
        material = open_with_recovery_key(private_key, sealed, _info(root_id, public_key))
    except IntegrityError:
        raise UnlockError(
            f"these recovery shares do not open {what}: they belong to another store, or to a "
            "set that 'recovery init --replace' replaced"
        ) from None
    root = DataKey(id=root_id, status=KeyStatus.ENABLED, created=int(header["created"]), material=material)
    return root, public_key


def _open_setup(lookup: Callable[[int], DataKey], record: bytes) -> RecoverySetup:
    try:
        plaintext = open_record(lookup, Purpose.RECOVERY_KEY, RECOVERY_KEY, 0, record)
    except IntegrityError as exc:  # not a damaged header, which names itself
        raise _named(exc, RECORD_DAMAGED) from None
    try:
        return RecoverySetup.from_bytes(plaintext)
    except IntegrityError:
        raise IntegrityError(RECORD_DAMAGED) from None


def _parse_section(section: object, header_root_id: int) -> tuple[int, int | None, bytes]:
    try:
        if not isinstance(section, dict) or section["kind"] != SECTION_KIND:
            raise ValueError(SECTION)
        root_id = _int(section["root_key_id"])
        identifier = section.get("identifier")
        sealed = base64.b64decode(section["sealed_root_key"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise IntegrityError(_DAMAGED) from None
    if root_id != header_root_id:
        raise IntegrityError(_DAMAGED)
    return root_id, identifier if isinstance(identifier, int) else None, sealed


def _other_set(given: ShareSet, identifier: int) -> str:
    return (
        f"these recovery shares are of set {given.identifier:05d}; this store's set is "
        f"{identifier:05d} (the number is on every share file)"
    )


def _info(root_id: int, public_key: bytes) -> bytes:
    """HPKE `info`: binds the sealed root key to its id and to the public key it was sealed to."""
    return _INFO_PREFIX + struct.pack(">I", root_id) + public_key


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("not an integer")
    return value


__all__ = [
    "MAX_SHARES",
    "RECORD_DAMAGED",
    "RECORD_MISSING",
    "SECTION",
    "NewShares",
    "RecoverySetup",
    "install_recovery",
    "make_recovery_shares",
    "recover_root",
    "recovery_header_problem",
    "recovery_setup",
    "remove_recovery",
    "sealed_root_section",
    "share_set_of",
]
