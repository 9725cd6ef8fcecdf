"""Backup files (docs/backup-format.md): write one from a store; read, check and decode one.

One container, two kinds (the document's sections are named in brackets):

* kind `store` [4.2]: the store's own records copied as they are (ciphertext), its header and
  wrapped keys; the file key is sealed under the store's root key, so the file opens with the
  master password the store had when the backup was taken. Restores byte for byte into a new
  SQLite store (`store.restore`), or into any store through the logical form it decodes to.
* kind `password` [4.3]: the logical form — names, versions, values, labels, metadata, deleted
  state — under a file key wrapped by Argon2id of a separate backup password, for off-site
  copies and for migration to another kind of store.

Invariants:

* The final name never holds a partial file: a backup is written 0600 to a temporary file beside
  it, fsynced, and then renamed (or hard-linked, when it must not replace a file) into place.
* A backup of an `EncryptedStore` whose storage is `Snapshotting` is one instant of the store:
  every entry is read inside one storage snapshot, whatever other processes write meanwhile.
* `read_backup` returns nothing until every chunk is authenticated (so truncation and reordering
  are caught) and the whole content is checked: for kind `store`, every keyset, metadata and
  value record is opened with the keys in the file, and every kept version has its value.
* Values never appear in messages, `repr` or the file's plaintext bytes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from secrets_manager.crypto import (
    DataKey,
    Keyset,
    KeyStatus,
    Purpose,
    RotationPolicy,
    open_record,
    seal_record,
)
from secrets_manager.crypto import kdf as kdf_module
from secrets_manager.crypto.aead import KEY_SIZE, new_key
from secrets_manager.crypto.keyset import new_key_id
from secrets_manager.crypto.mac import audit_keys_of, value_digest
from secrets_manager.crypto.stream import (
    MIN_SEALED_CHUNK_SIZE,
    SEALED_CHUNK_SIZE,
    ChunkSealer,
    open_chunk,
    payload_context,
)
from secrets_manager.durable import fsync_directory, remove_abandoned
from secrets_manager.environment import Environment
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    SecretsManagerError,
    StorageError,
    UnlockError,
    UnsafeConfigurationError,
)
from secrets_manager.storage import Snapshotting
from secrets_manager.storage.sqlite import sqlite_file_kind
from secrets_manager.store.base import (
    LABELS,
    MAX_VALUE_SIZE,
    PENDING,
    SecretMetadata,
    SecretStore,
    VersionInfo,
    checked_target,
)
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
    STORE_FORMAT,
    VALUE_DIGEST,
    EncryptedStore,
    _dump,
    _Meta,
    _unwrap_root,
    strict_json_loads,
)
from secrets_manager.store.names import namespace_of, validate_name, validate_namespace
from secrets_manager.store.recovery import RecoverySetup
from secrets_manager.store.unlock import PasswordUnlock

T = TypeVar("T")

# The newest version read and written. Version 2 (docs/backup-format.md §14) only adds `expires`
# to the versions of kind `password`, version 3 `target`: a file is written with the lowest
# version that holds what it carries, so an older build restores every backup it can read in full.
FORMAT_VERSION = 3
VERSION_LINE_PREFIX = b"secrets-manager-backup/v"
VERSION_LINE = VERSION_LINE_PREFIX + b"1\n"
VERSION_LINES = {VERSION_LINE_PREFIX + b"%d\n" % n: n for n in range(1, FORMAT_VERSION + 1)}
MAX_HEADER_SIZE = 64 * 1024  # bytes of the header line, without its newline
KIND_STORE = "store"
KIND_PASSWORD = "password"  # noqa: S105 (a kind name, not a password)
KINDS = (KIND_STORE, KIND_PASSWORD)
FILE_KEY_NAME = "backup/file-key"
# What kind `store` leaves out: the header travels in the file header; the audit anchor pins the
# source's audit log, which the restored store does not have (it starts anchoring its own).
NOT_COPIED = (HEADER_KEY, AUDIT_ANCHOR_KEY)
_CORE_PREFIX = "core/"  # the store's own entries (format.md 8); a newer version may add some
_DATA_KEY = re.compile(r"(?P<name>[^#]+)#(?P<version>[1-9][0-9]{0,18})")
_NEWER_VERSION = re.compile(rb"secrets-manager-backup/v(?P<version>[1-9][0-9]{0,8})\n")
# Reads of one secret (its metadata, then its versions) through the protocol, a version gone
# between them each time (a busy secret whose writes prune what was listed), before giving up.
PROTOCOL_READ_ATTEMPTS = 3

# progress(what, done, total)
Progress = Callable[[str, int, int], None]


def _no_progress(_what: str, _done: int, _total: int) -> None:
    pass


# ---- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupVersion:
    """One version of a secret in logical form; `value` is None exactly when it was destroyed."""

    version: int
    created: float
    created_by: str
    destroyed: bool = False
    value: bytes | None = field(default=None, repr=False)
    expires: float | None = None  # the expiry recorded for this version (format.md §7), if any
    # The rotation target recorded with this version (format.md §7), if any: a store copy keeps
    # it in the records it copies, a password backup (version 3) in the version's `target`.
    target: str | None = None


@dataclass(frozen=True)
class BackupSecret:
    """A secret in logical form: its metadata (docs/format.md section 7) and every kept version."""

    name: str
    created: float
    updated: float
    created_by: str
    description: str
    tags: Mapping[str, str]
    max_versions: int
    next_version: int
    deleted: float | None
    labels: Mapping[str, int]
    versions: tuple[BackupVersion, ...]

    @property
    def kept(self) -> tuple[BackupVersion, ...]:
        """The versions that still have a value, oldest first."""
        return tuple(v for v in self.versions if not v.destroyed)

    def metadata(self) -> _Meta:
        """The metadata document `EncryptedStore` keeps for this secret."""
        return _Meta(
            created=self.created,
            updated=self.updated,
            created_by=self.created_by,
            max_versions=self.max_versions,
            next_version=self.next_version,
            description=self.description,
            tags=dict(self.tags),
            deleted=self.deleted,
            labels=dict(self.labels),
            versions={
                v.version: {"created": v.created, "created_by": v.created_by, "destroyed": v.destroyed}
                | ({} if v.value is None else {VALUE_DIGEST: value_digest(v.value)})
                | ({} if v.expires is None else {"expires": v.expires})
                | ({} if v.target is None else {"target": v.target})
                for v in self.versions
            },
        )

    @classmethod
    def from_metadata(cls, name: str, meta: _Meta, values: Mapping[int, bytes]) -> BackupSecret:
        return cls(
            name=name,
            created=meta.created,
            updated=meta.updated,
            created_by=meta.created_by,
            description=meta.description,
            tags=dict(meta.tags),
            max_versions=meta.max_versions,
            next_version=meta.next_version,
            deleted=meta.deleted,
            labels=dict(meta.labels),
            versions=tuple(
                BackupVersion(
                    version=number,
                    created=float(info["created"]),
                    created_by=str(info["created_by"]),
                    destroyed=bool(info["destroyed"]),
                    value=None if info["destroyed"] else values[number],
                    expires=None if info.get("expires") is None else float(info["expires"]),
                    target=meta.target_of(number),
                )
                for number, info in sorted(meta.versions.items())
            ),
        )


@dataclass(frozen=True)
class BackupHeader:
    """What a backup file says about itself before any password: its kind and when it was taken."""

    path: Path
    kind: str
    created: int
    document: Mapping[str, Any] = field(repr=False)
    raw: bytes = field(repr=False)  # the version line and the header line, as in the file
    format_version: int = 1


@dataclass(frozen=True)
class BackupSummary:
    """Counts of a backup: secrets (deleted ones included), kept versions, and for kind `store`
    the storage entries copied."""

    path: Path
    kind: str
    created: int
    size: int
    secrets: int
    versions: int
    deleted: int
    entries: int | None = None
    not_included: tuple[str, ...] = ()  # secrets a store without snapshots would not give out


@dataclass(frozen=True)
class Backup:
    """A backup file read and checked whole. `secrets` is the logical form of either kind; for
    kind `store`, `store_header` and `entries` are what a byte-for-byte restore writes."""

    summary: BackupSummary
    secrets: tuple[BackupSecret, ...] = field(repr=False)
    store_header: Mapping[str, Any] | None = field(default=None, repr=False)
    entries: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    # kind `store`: the store's audit keys, one after the other, oldest first (None if it had none
    # yet), which a restored copy keeps,
    # so that store's audit log goes on verifying (the log of a lost store file can be continued)
    audit_key: bytes | None = field(default=None, repr=False)

    @property
    def audit_keys(self) -> tuple[bytes, ...] | None:
        """The audit keys in `audit_key`, oldest first (None: the store had none yet)."""
        return None if self.audit_key is None else audit_keys_of(self.audit_key)


class BackupDamagedError(IntegrityError):
    """The file is not an intact backup (exit 6): changed, truncated, extended, or not a backup."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"backup {path} is damaged: {reason}; it cannot be restored (use another copy)")


class NotABackupError(InvalidInputError):
    """The file is an SQLite database, a store given by mistake for its backup (exit 2): not a
    damaged backup, and no other copy of a backup would help (backup-format.md 3)."""


class BackupVersionError(InvalidInputError):
    """The file is a backup in a newer format than this program reads (exit 2)."""


class NewerEntryError(InvalidInputError):
    """A `core/` entry this version does not know (exit 2): the store format keeps its number when
    a version adds one (format 4.6 added `core/recovery`), so a newer secrets-manager wrote it.
    Reported as that, not as damage: a version of 2026-11-28 called such a store damaged."""

    def __init__(self, key: str, message: str | None = None) -> None:
        self.key = key
        super().__init__(
            message
            or f"the store holds the entry {key!r}, which this secrets-manager does not know: a newer "
            "secrets-manager wrote it; upgrade secrets-manager to read it whole"
        )


# ---- writing -----------------------------------------------------------------------------------------


def write_backup(
    store: SecretStore,
    path: str | os.PathLike[str],
    *,
    password: bytes | None = None,
    kdf: kdf_module.KdfParams = kdf_module.DEFAULT,
    replace: bool = False,
    progress: Progress = _no_progress,
    clock: Callable[[], float] = time.time,
) -> BackupSummary:
    """Write a backup of `store` to `path`: kind `store` without `password`, kind `password` with it.

    Kind `store` needs an `EncryptedStore`. Any `SecretStore` can be backed up with a password;
    one whose storage takes snapshots is read at one instant, others secret by secret (deleted
    secrets of such stores cannot be read through the protocol and are listed in `not_included`).
    Never replaces an existing file unless `replace`; ConflictError if one exists."""
    path = Path(path)
    if path.exists() and not replace:
        raise ConflictError(f"{path} already exists; choose another name or pass --force to replace it")
    created = int(clock())
    file_key = new_key()
    skipped: tuple[str, ...] = ()
    entries: list[tuple[str, bytes]] = []
    header: dict[str, Any]
    if password is None:
        if not isinstance(store, EncryptedStore):
            raise InvalidInputError(
                "only an encrypted store has keys of its own to protect a backup with; "
                "give --backup-password-file"
            )
        store_header, entries, root = _read_encrypted(store, progress)
        unlocked_by = store_header["unlock"].get("kind")
        if unlocked_by != PasswordUnlock.kind:  # a copy opens with the store's master password only
            raise InvalidInputError(
                f"this store is unlocked by {unlocked_by}, not a master password, so a copy of it "
                "could not be opened to restore: give --backup-password-file (the backup then holds "
                "the secrets under that password)"
            )
        decoded = _checked(store_header, root, entries, progress)
        sealed_key = seal_record(root, Purpose.BACKUP_FILE_KEY, FILE_KEY_NAME, 0, file_key)
        header = {
            "created": created,
            "kind": KIND_STORE,
            "store_header": store_header,
            "file_key": _b64(sealed_key),
        }
        lines = _entry_lines(entries, progress)
    else:
        if not password:
            raise InvalidInputError("the backup password is empty")
        if isinstance(store, EncryptedStore):
            store_header, snapshot_entries, root = _read_encrypted(store, progress)
            decoded = _checked(store_header, root, snapshot_entries, progress)
        else:
            decoded, skipped = _read_through_protocol(store, progress)
        decoded = [_with_pending_target_only(secret) for secret in decoded]
        wrapping = DataKey(id=new_key_id(set()), status=KeyStatus.ENABLED, created=created, material=file_key)
        header = {
            "created": created,
            "kind": KIND_PASSWORD,
            "unlock": PasswordUnlock(password, kdf).wrap(wrapping),
        }
        lines = _secret_lines(decoded, progress)
    size = _write_file(
        path, _dump(header), lines, file_key, replace=replace, version=_version_needed(header, decoded)
    )
    return BackupSummary(
        path=path,
        kind=str(header["kind"]),
        created=created,
        size=size,
        secrets=len(decoded),
        versions=sum(len(s.kept) for s in decoded),
        deleted=sum(1 for s in decoded if s.deleted is not None),
        entries=len(entries) if header["kind"] == KIND_STORE else None,
        not_included=skipped,
    )


def _read_encrypted(
    store: EncryptedStore, progress: Progress
) -> tuple[dict[str, Any], list[tuple[str, bytes]], DataKey]:
    """The store's header, every entry to copy, and the root key, all from one instant."""
    storage = store._storage
    if not isinstance(storage, Snapshotting):
        raise StorageError(
            f"{storage!r} cannot take a consistent snapshot, so a backup of it could mix before and "
            "after a concurrent write"
        )
    progress("reading", 0, 1)
    with storage.snapshot() as snap:
        header_entry = snap.get(HEADER_KEY)
        entries = [
            (key, entry.value)
            for key, entry in snap.scan("")
            if key not in NOT_COPIED and not key.startswith(SCOPED_ANCHOR_PREFIX)
        ]
    progress("reading", 1, 1)
    if header_entry is None:
        raise NotFoundError("the store has no header")
    store_header = _load_store_header(header_entry.value, "the store")
    root = store._root
    if store_header["root_key_id"] != root.id:  # rotated by another process since we opened it
        if store._unlock is None:
            raise IntegrityError()
        root = _unwrap_root(store._unlock, store_header)
    return store_header, entries, root


def _checked(
    store_header: Mapping[str, Any], root: DataKey, entries: Sequence[tuple[str, bytes]], progress: Progress
) -> list[BackupSecret]:
    """The snapshot opened as a reader will open the backup: a backup that could not be restored
    is not written."""
    try:
        return decode_store(store_header, root, entries, progress=progress)
    except NewerEntryError as exc:
        raise NewerEntryError(
            exc.key,
            f"the store holds the entry {exc.key!r}, which this secrets-manager does not know: a newer "
            "secrets-manager wrote it; nothing was written: back the store up with that newer version",
        ) from None
    except IntegrityError as exc:
        raise IntegrityError(
            f"the store is damaged ({_reason(exc)}), so no backup was written; erase the damaged or "
            "unlisted version with 'secrets-manager destroy NAME --version N' (values with no "
            "metadata: 'destroy NAME --all'), or restore the secret from an earlier backup"
        ) from None


def _read_through_protocol(
    store: SecretStore, progress: Progress
) -> tuple[list[BackupSecret], tuple[str, ...]]:
    """The logical form of a store that has no snapshot: each secret read on its own."""
    listed = store.list("", include_deleted=True)
    result = []
    skipped = []
    for done, listed_meta in enumerate(listed, 1):
        read = _versions_through_protocol(store, listed_meta)
        progress("secrets", done, len(listed))
        if read is None:
            continue  # destroyed since the listing: as if it had come after
        meta, versions = read
        if meta.deleted is not None:
            skipped.append(meta.name)  # the protocol hands out no value of a deleted secret
            continue
        numbers = [v.version for v in versions]
        result.append(
            BackupSecret(
                name=meta.name,
                created=meta.created.timestamp(),
                updated=meta.updated.timestamp(),
                created_by=meta.created_by,
                description=meta.description,
                tags=dict(meta.tags),
                max_versions=meta.max_versions,
                next_version=max(numbers, default=0) + 1,
                deleted=None,
                labels={k: v for k, v in meta.labels.items() if v in numbers},
                versions=versions,
            )
        )
    return result, tuple(skipped)


def _versions_through_protocol(
    store: SecretStore, meta: SecretMetadata
) -> tuple[SecretMetadata, tuple[BackupVersion, ...]] | None:
    """`meta`'s secret and its versions, each secret whole: the listing came before the reads, so
    a version it names may be gone by its read (pruned by a write since, destroyed, the secret
    deleted or destroyed). Then the secret is read again, its metadata and then its versions, as
    if the listing had come after (a few times at most). None: the secret is gone."""
    for attempt in range(PROTOCOL_READ_ATTEMPTS):
        if meta.deleted is not None:
            return meta, ()
        try:
            return meta, tuple(_version_through_protocol(store, meta, info) for info in meta.versions)
        except NotFoundError:
            if attempt == PROTOCOL_READ_ATTEMPTS - 1:
                raise
        try:
            meta = store.describe(meta.name)
        except NotFoundError:
            return None
    raise AssertionError("unreachable")


def _with_pending_target_only(secret: BackupSecret) -> BackupSecret:
    """`secret` with the rotation target of its pending version only. A version keeps its target
    after the rotation promoted it, but only a pending one's is ever used (a resume checks it), so
    a finished rotation's is left out: it would make the file version 3, which older readers refuse."""
    pending = secret.labels.get(PENDING)
    if all(v.target is None or v.version == pending for v in secret.versions):
        return secret
    return dataclasses.replace(
        secret,
        versions=tuple(
            v if v.version == pending else dataclasses.replace(v, target=None) for v in secret.versions
        ),
    )


def _version_needed(header: Mapping[str, Any], decoded: Sequence[BackupSecret]) -> int:
    """The lowest format version that holds a file's content (a build before it says "upgrade"
    rather than restore it without): in kind `password`, a rotation target needs version 3, an
    expiry version 2. A store copy carries both inside its sealed records: version 1."""
    if header["kind"] != KIND_PASSWORD:
        return 1
    versions = [v for s in decoded for v in s.versions]
    if any(v.target is not None for v in versions):
        return 3
    return 2 if any(v.expires is not None for v in versions) else 1


def _version_through_protocol(store: SecretStore, meta: SecretMetadata, info: VersionInfo) -> BackupVersion:
    """One version as the protocol gives it: its value and rotation target from a read of it (a
    destroyed one has neither), the expiry only for the current version (the one kept: base.py)."""
    read = None if info.destroyed else store.get(meta.name, version=info.version)
    return BackupVersion(
        version=info.version,
        created=info.created.timestamp(),
        created_by=info.created_by,
        destroyed=info.destroyed,
        value=None if read is None else read.value.reveal(),
        expires=meta.expires.timestamp()
        if meta.expires is not None and info.version == meta.current_version
        else None,
        target=None if read is None else read.target,
    )


def _entry_lines(entries: Sequence[tuple[str, bytes]], progress: Progress) -> Iterator[bytes]:
    total = len(entries)
    for done, (key, value) in enumerate(entries, 1):
        yield _line({"type": "entry", "key": key, "value": _b64(value)})
        if done % 1000 == 0 or done == total:
            progress("writing", done, total)
    yield _line({"type": "end", "entries": total})


def _secret_lines(decoded: Sequence[BackupSecret], progress: Progress) -> Iterator[bytes]:
    total = len(decoded)
    for done, secret in enumerate(decoded, 1):
        yield _line(_secret_doc(secret))
        if done % 1000 == 0 or done == total:
            progress("writing", done, total)
    yield _line({"type": "end", "secrets": total, "versions": sum(len(s.kept) for s in decoded)})


def _secret_doc(secret: BackupSecret) -> dict[str, Any]:
    return {
        "type": "secret",
        "name": secret.name,
        "created": secret.created,
        "updated": secret.updated,
        "created_by": secret.created_by,
        "description": secret.description,
        "tags": dict(secret.tags),
        "max_versions": secret.max_versions,
        "next_version": secret.next_version,
        "deleted": secret.deleted,
        "labels": dict(secret.labels),
        "versions": [
            {
                "version": v.version,
                "created": v.created,
                "created_by": v.created_by,
                "destroyed": v.destroyed,
                "value": None if v.value is None else _b64(v.value),
            }
            | ({} if v.expires is None else {"expires": v.expires})
            | ({} if v.target is None else {"target": v.target})
            for v in secret.versions
        ],
    }


def _write_file(
    path: Path,
    header: bytes,
    lines: Iterable[bytes],
    file_key: bytes,
    *,
    replace: bool,
    nonces: Iterator[bytes] | None = None,
    version: int = 1,
) -> int:
    """Seal `lines` into a backup file at `path`, atomically; return its size."""
    prefix = VERSION_LINE_PREFIX + b"%d\n" % version + header + b"\n"
    sealer = ChunkSealer(file_key, payload_context(prefix), nonces=nonces)
    _remove_abandoned_temporaries(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks the file as being written
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(prefix)
            for line in lines:
                for chunk in sealer.write(line):
                    out.write(chunk)
            out.write(sealer.close())
            out.flush()
            os.fsync(out.fileno())
        _publish(temporary, path, replace=replace)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path.stat().st_size


TEMPORARY_SUFFIX = ".tmp"


def _remove_abandoned_temporaries(path: Path) -> None:
    """Remove what backups killed mid-write (SIGKILL, power cut) left behind in `path`'s
    directory: their hidden temporary files, unlocked once their writers are gone. One a live
    writer holds stays. A backup to `path` itself is known by its name alone; one to another name
    (a nightly backup named by its date is never written to that name again) only if the file
    is ours and holds the start of a backup (or nothing yet): another program's file stays."""
    own = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}{re.escape(TEMPORARY_SUFFIX)}")
    anyone = re.compile(rf"\..+\.[0-9a-f]{{12}}{re.escape(TEMPORARY_SUFFIX)}", re.DOTALL)
    for leftover in path.parent.glob(f".*{TEMPORARY_SUFFIX}"):
        if own.fullmatch(leftover.name) is not None:
            remove_abandoned(leftover, lambda _fd, _info: True)
        elif anyone.fullmatch(leftover.name) is not None:
            remove_abandoned(
                leftover, lambda fd, info: info.st_uid == os.geteuid() and _starts_as_a_backup(fd)
            )


def _starts_as_a_backup(fd: int) -> bool:
    """Whether the open file holds nothing yet or begins as a backup file does (its version line)."""
    try:
        start = os.pread(fd, len(VERSION_LINE_PREFIX), 0)
    except OSError:
        return False
    return not start or start == VERSION_LINE_PREFIX


def _publish(temporary: Path, path: Path, *, replace: bool) -> None:
    """Give a complete, fsynced file its final name in one step, then make the rename durable.
    Without `replace`, a hard link (which fails if the name exists) keeps an existing file."""
    if replace:
        os.replace(temporary, path)
    else:
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise ConflictError(f"{path} already exists; choose another name") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if path.exists():  # no hard links on this file system: check, then rename
                raise ConflictError(f"{path} already exists; choose another name") from None
            os.rename(temporary, path)
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


# ---- reading -----------------------------------------------------------------------------------------


def read_backup_header(path: str | os.PathLike[str]) -> BackupHeader:
    """The version line and header of a backup (section 3, 4): enough to know which password
    opens it. BackupVersionError for a newer format, BackupDamagedError for anything malformed."""
    path = Path(path)
    with _open_backup(path) as source:
        return _read_header(source, path)


def read_backup(
    path: str | os.PathLike[str],
    password: bytes | None,
    *,
    environment: Environment | None = None,
    progress: Progress = _no_progress,
    root_from: Callable[[dict[str, Any]], DataKey] | None = None,
) -> Backup:
    """Open, authenticate and check a whole backup file; nothing is returned from a file that is not
    intact. `password` is the backup password (kind `password`) or the master password the store had
    when the backup was taken (kind `store`). UnlockError for a wrong password (exit 4).

    `root_from(store_header)` (kind `store` only, instead of `password`): the root key by other
    means, the recovery shares (store/recovery.py `root_from_shares`); the file key it must open
    is authenticated, so a wrong root key is a wrong password."""
    path = Path(path)
    minimum = kdf_module.DEFAULT if environment is not None and environment.is_production else None
    with _open_backup(path) as source:
        header = _read_header(source, path)
        if header.kind == KIND_STORE:
            store_header = header.document["store_header"]
            if root_from is not None:
                root = _root_by_other_means(store_header, root_from, path)
            else:
                assert password is not None
                root = _unlock_store_header(store_header, password, minimum, path)
            file_key = _open_file_key(header.document["file_key"], root, path)
        else:
            if password is None:
                raise InvalidInputError(
                    f"backup {path} is protected by a backup password, which recovery shares do not "
                    "open: pass --backup-password-file PATH"
                )
            root = None
            store_header = None
            file_key = _unlock_file_key(header.document["unlock"], password, minimum, header.created, path)
        lines = _payload_lines(source, path, file_key, payload_context(header.raw), progress)
        if header.kind == KIND_STORE:
            assert root is not None and store_header is not None
            entries = _parsed(_parse_entries, lines, path)
            try:
                decoded = decode_store(store_header, root, entries, progress=progress)
            except NewerEntryError as exc:
                raise BackupVersionError(
                    f"{path} holds a store with the entry {exc.key!r}, which this secrets-manager does not "
                    "know: a newer secrets-manager wrote it; upgrade secrets-manager to verify or restore it"
                ) from None
            except IntegrityError as exc:
                raise BackupDamagedError(path, f"the store in it is inconsistent: {_reason(exc)}") from None
        else:
            entries = []
            version = header.format_version
            decoded = _parsed(lambda lines, path: _parse_secrets(lines, path, version), lines, path)
        size = path.stat().st_size
    summary = BackupSummary(
        path=path,
        kind=header.kind,
        created=header.created,
        size=size,
        secrets=len(decoded),
        versions=sum(len(s.kept) for s in decoded),
        deleted=sum(1 for s in decoded if s.deleted is not None),
        entries=len(entries) if header.kind == KIND_STORE else None,
    )
    audit_key = next(
        (
            open_record(_only(root), Purpose.AUDIT_KEY, AUDIT_KEY_KEY, 0, value)
            for key, value in entries
            if root is not None and key == AUDIT_KEY_KEY
        ),
        None,
    )
    return Backup(
        summary=summary,
        secrets=tuple(decoded),
        store_header=store_header,
        entries=tuple(entries),
        audit_key=audit_key,
    )


@contextmanager
def _open_backup(path: Path) -> Iterator[BinaryIO]:
    try:
        source = path.open("rb")
    except FileNotFoundError:
        raise NotFoundError(f"no backup file at {path}") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{path} is a directory, not a backup file") from None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    with source:
        try:
            yield source
        except OSError as exc:  # a read that failed (EIO: a bad disk), not only the open
            raise StorageError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _read_header(source: BinaryIO, path: Path) -> BackupHeader:
    first = source.readline(len(VERSION_LINE_PREFIX) + 11)
    if first not in VERSION_LINES:
        match = _NEWER_VERSION.fullmatch(first)
        if match is not None and int(match["version"]) > FORMAT_VERSION:
            raise BackupVersionError(
                f"{path} is a version {int(match['version'])} backup, newer than this secrets-manager "
                f"reads (version {FORMAT_VERSION}); upgrade secrets-manager to verify or restore it"
            )
        kind = (
            sqlite_file_kind(first + source.read(100 - len(first))) if first.startswith(b"SQLite") else None
        )
        if kind is not None:  # given the store (or another database) for its backup: no damage
            what = "a secrets-manager store" if kind == "store" else "an SQLite database"
            raise NotABackupError(
                f"{path} is {what}, not a backup: give a file made by `secrets-manager backup`"
            )
        raise BackupDamagedError(path, "it does not start with a secrets-manager backup version line")
    line = source.readline(MAX_HEADER_SIZE + 1)
    if not line.endswith(b"\n"):
        raise BackupDamagedError(path, "its header is cut short or too long")
    body = line[:-1]
    try:
        doc = strict_json_loads(body)
    except ValueError:
        raise BackupDamagedError(path, "its header is not JSON") from None
    if not isinstance(doc, dict) or _dump(doc) != body:
        raise BackupDamagedError(path, "its header is not a canonical JSON object")
    kind = doc.get("kind")
    expected = {
        KIND_STORE: {"created", "kind", "store_header", "file_key"},
        KIND_PASSWORD: {"created", "kind", "unlock"},
    }
    if (
        kind not in expected
        or set(doc) != expected[kind]
        or not _is_int(doc["created"])
        or doc["created"] < 0
    ):
        raise BackupDamagedError(path, "its header does not have the fields of version 1")
    if kind == KIND_STORE and not (
        isinstance(doc["store_header"], dict) and isinstance(doc["file_key"], str)
    ):
        raise BackupDamagedError(path, "its header does not have the fields of version 1")
    if kind == KIND_PASSWORD and not isinstance(doc["unlock"], dict):
        raise BackupDamagedError(path, "its header does not have the fields of version 1")
    return BackupHeader(
        path=path,
        kind=kind,
        created=doc["created"],
        document=doc,
        raw=first + line,
        format_version=VERSION_LINES[first],
    )


def _unlock_store_header(
    store_header: dict[str, Any], password: bytes, minimum: kdf_module.KdfParams | None, path: Path
) -> DataKey:
    _refuse_a_newer_store_format(store_header, path)
    try:
        _check_store_header(store_header)
        if store_header["unlock"].get("kind") != PasswordUnlock.kind:
            raise IntegrityError()
        return _unwrap_root(PasswordUnlock(password, minimum=minimum), store_header)
    except UnsafeConfigurationError:  # PasswordUnlock's message is about a store and its remedies
        assert minimum is not None
        raise UnsafeConfigurationError(
            f"backup {path} holds a store whose Argon2id parameters are below the production minimum "
            f"({_costs(minimum)}), which production refuses; make a new backup from a store with "
            "production parameters, or restore this one outside production and run 'secrets-manager "
            "passwd --kdf-profile default' on the restored store"
        ) from None
    except UnlockError:
        raise UnlockError(
            f"wrong password for backup {path}: it opens with the master password its store had when the "
            "backup was taken (give it with --backup-password-file)"
        ) from None
    except IntegrityError:
        raise BackupDamagedError(path, "the store header in it is malformed") from None


def _refuse_a_newer_store_format(store_header: dict[str, Any], path: Path) -> None:
    fmt = store_header.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > STORE_FORMAT:
        raise BackupVersionError(
            f"{path} holds a store of format {fmt}; upgrade secrets-manager to verify or restore it"
        )


def _root_by_other_means(
    store_header: dict[str, Any], root_from: Callable[[dict[str, Any]], DataKey], path: Path
) -> DataKey:
    _refuse_a_newer_store_format(store_header, path)
    try:
        _check_store_header(store_header)
    except IntegrityError:
        raise BackupDamagedError(path, "the store header in it is malformed") from None
    try:
        return root_from(store_header)
    except IntegrityError:
        raise BackupDamagedError(path, "the recovery section of its store header is malformed") from None


def _costs(params: kdf_module.KdfParams) -> str:
    return f"t={params.time_cost}, m={params.memory_cost_kib} KiB, p={params.parallelism}"


def _open_file_key(encoded: str, root: DataKey, path: Path) -> bytes:
    try:
        record = _unb64(encoded)
        file_key = open_record(_only(root), Purpose.BACKUP_FILE_KEY, FILE_KEY_NAME, 0, record)
    except (ValueError, IntegrityError):
        raise BackupDamagedError(path, "its file key does not open under the store's root key") from None
    if len(file_key) != KEY_SIZE:
        raise BackupDamagedError(path, "its file key is not 32 bytes")
    return file_key


def _unlock_file_key(
    section: dict[str, Any], password: bytes, minimum: kdf_module.KdfParams | None, created: int, path: Path
) -> bytes:
    if section.get("kind") != PasswordUnlock.kind:
        raise BackupDamagedError(path, "its password section is malformed")
    try:
        return PasswordUnlock(password, minimum=minimum).unwrap(section, created=created).material
    except UnsafeConfigurationError:
        assert minimum is not None
        raise UnsafeConfigurationError(
            f"backup {path} is locked by a backup password whose Argon2id parameters are below the "
            f"production minimum ({_costs(minimum)}), which production refuses; make a new backup "
            "with 'secrets-manager backup FILE --backup-password-file PATH' (it uses production "
            "parameters), or restore this one outside production"
        ) from None
    except UnlockError:
        raise UnlockError(f"wrong backup password for {path}") from None
    except IntegrityError:
        raise BackupDamagedError(path, "its password section is malformed") from None


def _payload_lines(
    source: BinaryIO, path: Path, file_key: bytes, context: bytes, progress: Progress
) -> Iterator[bytes]:
    """The content's lines, each as soon as the chunk that completes it is authenticated: every
    chunk in order, the last one as final (section 6), the content ending with a newline. Lines are
    handed on as they come, so the file's content is never held whole (it was held three times:
    the chunks, their join, its lines); an error in a later chunk still raises before the reader
    has seen the end record, so nothing is taken from a file that is not intact."""
    total = max(1, os.fstat(source.fileno()).st_size - source.tell())
    index = 0
    partial = b""  # the start of a line whose end is in a later chunk
    current = source.read(SEALED_CHUNK_SIZE)
    if not current:
        raise BackupDamagedError(path, "it has no content (cut short after the header)")
    while True:
        following = source.read(SEALED_CHUNK_SIZE)
        final = not following
        if len(current) < MIN_SEALED_CHUNK_SIZE:
            raise BackupDamagedError(path, "it is cut short (its last chunk is incomplete)")
        try:
            plain = open_chunk(file_key, context, index, final, current)
        except IntegrityError:
            raise BackupDamagedError(
                path, f"integrity check failed in chunk {index + 1}: it was changed, cut short or extended"
            ) from None
        index += 1
        progress("verifying", min(total, index * SEALED_CHUNK_SIZE), total)
        *complete, partial = (partial + plain).split(b"\n")
        yield from complete
        if final:
            break
        current = following
    if partial:
        raise BackupDamagedError(path, "its content does not end with a complete line")


def _parse_entries(lines: Iterator[bytes], path: Path) -> list[tuple[str, bytes]]:
    entries: list[tuple[str, bytes]] = []
    previous = ""
    for number, line in enumerate(lines, 1):
        doc = _payload_doc(line, path, number)
        if doc.get("type") == "end":
            if doc != {"type": "end", "entries": len(entries)}:
                break
            _require_nothing_after(lines, path)
            return entries
        if set(doc) != {"type", "key", "value"} or doc["type"] != "entry":
            raise BackupDamagedError(path, f"content line {number} is not an entry")
        key, value = doc["key"], doc["value"]
        if not isinstance(key, str) or not isinstance(value, str) or key <= previous:
            raise BackupDamagedError(path, f"content line {number} is out of order or malformed")
        try:
            entries.append((key, _unb64(value)))
        except ValueError:
            raise BackupDamagedError(path, f"content line {number} is not valid base64") from None
        previous = key
    raise BackupDamagedError(path, "its content is incomplete (the end record is missing or wrong)")


def _parse_secrets(lines: Iterator[bytes], path: Path, format_version: int = 1) -> list[BackupSecret]:
    result: list[BackupSecret] = []
    previous = ""
    for number, line in enumerate(lines, 1):
        doc = _payload_doc(line, path, number)
        if doc.get("type") == "end":
            expected = {"type": "end", "secrets": len(result), "versions": sum(len(s.kept) for s in result)}
            if doc != expected:
                break
            _require_nothing_after(lines, path)
            return result
        try:
            secret = _secret_from_doc(doc, expiries=format_version >= 2, targets=format_version >= 3)
        except (KeyError, TypeError, ValueError, InvalidInputError):
            raise BackupDamagedError(path, f"content line {number} is not a valid secret") from None
        if secret.name <= previous:
            raise BackupDamagedError(path, f"content line {number} is out of order")
        previous = secret.name
        result.append(secret)
    raise BackupDamagedError(path, "its content is incomplete (the end record is missing or wrong)")


def _parsed(parse: Callable[[Iterator[bytes], Path], T], lines: Iterator[bytes], path: Path) -> T:
    """`parse(lines, path)`; if it finds a line wrong, the chunks after it are authenticated first:
    a chunk that was changed, cut or extended is what is wrong with the file, as when every chunk
    was checked before any line was read."""
    try:
        return parse(lines, path)
    except BackupDamagedError:
        for _ in lines:
            pass
        raise


def _require_nothing_after(lines: Iterator[bytes], path: Path) -> None:
    """The end record must be the last line; reading on also authenticates the chunks left (the
    final one's flag included), which may still refuse the file."""
    for _ in lines:
        raise BackupDamagedError(path, "its content is incomplete (the end record is missing or wrong)")


def _payload_doc(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except ValueError:
        raise BackupDamagedError(path, f"content line {number} is not JSON") from None
    if not isinstance(doc, dict):
        raise BackupDamagedError(path, f"content line {number} is not a JSON object")
    return doc


_SECRET_FIELDS = {
    "type",
    "name",
    "created",
    "updated",
    "created_by",
    "description",
    "tags",
    "max_versions",
    "next_version",
    "deleted",
    "labels",
    "versions",
}
_VERSION_FIELDS = {"version", "created", "created_by", "destroyed", "value"}


def _secret_from_doc(doc: dict[str, Any], *, expiries: bool = False, targets: bool = False) -> BackupSecret:
    """A secret line (section 7.3); ValueError (or KeyError, TypeError) for anything off.
    `expiries` (version 2): a version may also have `expires`, at most one per secret; `targets`
    (version 3): a version may also have `target`, text as a stage takes it."""
    if set(doc) != _SECRET_FIELDS or doc["type"] != "secret":
        raise ValueError("fields")
    name = _str(doc["name"])
    validate_name(name)
    next_version = _count(doc["next_version"])
    versions: list[BackupVersion] = []
    for item in doc["versions"]:
        if not isinstance(item, dict) or set(item) - {"expires", "target"} != _VERSION_FIELDS:
            raise ValueError("version fields")
        if "expires" in item and (not expiries or item["expires"] is None):
            raise ValueError("expires")
        if "target" in item and (not targets or not isinstance(item["target"], str)):
            raise ValueError("target")
        number = _count(item["version"])
        if (versions and number <= versions[-1].version) or number >= next_version:
            raise ValueError("version order")
        destroyed = item["destroyed"]
        if not isinstance(destroyed, bool) or (item["value"] is None) != destroyed:
            raise ValueError("destroyed")
        value = None if destroyed else _unb64(_str(item["value"]))
        if value is not None and len(value) > MAX_VALUE_SIZE:
            raise ValueError("value size")
        expires = _time(item["expires"]) if "expires" in item else None
        try:
            target = checked_target(name, item.get("target"))
        except InvalidInputError:
            raise ValueError("target") from None
        versions.append(
            BackupVersion(
                number, _time(item["created"]), _str(item["created_by"]), destroyed, value, expires, target
            )
        )
    if sum(v.expires is not None for v in versions) > 1:
        raise ValueError("expires")  # one (version, time) pair per secret (format.md §7)
    numbers = {v.version for v in versions}
    labels = doc["labels"]
    if not isinstance(labels, dict) or any(
        k not in LABELS or _count(v) not in numbers for k, v in labels.items()
    ):
        raise ValueError("labels")
    tags = doc["tags"]
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise ValueError("tags")
    return BackupSecret(
        name=name,
        created=_time(doc["created"]),
        updated=_time(doc["updated"]),
        created_by=_str(doc["created_by"]),
        description=_str(doc["description"]),
        tags=dict(tags),
        max_versions=_count(doc["max_versions"]),
        next_version=next_version,
        deleted=None if doc["deleted"] is None else _time(doc["deleted"]),
        labels=dict(labels),
        versions=tuple(versions),
    )


# ---- the content of kind `store` ---------------------------------------------------------------------


def decode_store(
    store_header: Mapping[str, Any],
    root: DataKey,
    entries: Sequence[tuple[str, bytes]],
    *,
    progress: Progress = _no_progress,
) -> list[BackupSecret]:
    """Open every record of a store's entries with its keys (section 8) and return the logical form.

    IntegrityError, naming the entry (names are not secret), if a record fails to open, a key is
    not part of the storage layout (docs/format.md section 8), a kept version has no value, or a
    value has no version; NewerEntryError for a `core/` key this version does not know."""
    if store_header.get("root_key_id") != root.id:
        raise IntegrityError("the root key does not match the store header")
    lookup = _only(root)
    keysets: dict[str, Keyset] = {}
    metas: dict[str, bytes] = {}
    values: dict[str, dict[int, bytes]] = {}
    for key, value in entries:
        with _naming(key):
            if key.startswith(KEYSET_PREFIX):
                namespace = _layout(validate_namespace, key[len(KEYSET_PREFIX) :])
                keysets[namespace] = Keyset.from_bytes(
                    open_record(lookup, Purpose.KEYSET, namespace, 0, value)
                )
            elif key == AUDIT_KEY_KEY:
                try:  # the store's audit keys, oldest first (one more per `audit rotate-key`)
                    audit_keys_of(open_record(lookup, Purpose.AUDIT_KEY, AUDIT_KEY_KEY, 0, value))
                except ValueError:
                    raise IntegrityError() from None
            elif key == KEY_POLICY_KEY:
                RotationPolicy.from_bytes(open_record(lookup, Purpose.KEY_POLICY, KEY_POLICY_KEY, 0, value))
            elif key == RECOVERY_KEY:
                RecoverySetup.from_bytes(open_record(lookup, Purpose.RECOVERY_KEY, RECOVERY_KEY, 0, value))
            elif key.startswith(META_PREFIX):
                metas[_layout(validate_name, key[len(META_PREFIX) :])] = value
            elif key.startswith(DATA_PREFIX) and (match := _DATA_KEY.fullmatch(key[len(DATA_PREFIX) :])):
                values.setdefault(_layout(validate_name, match["name"]), {})[int(match["version"])] = value
            elif key.startswith(_CORE_PREFIX):
                raise NewerEntryError(key)
            else:
                raise IntegrityError(f"the entry {key!r} is not part of the store layout")
    decoded = []
    for done, (name, sealed_meta) in enumerate(sorted(metas.items()), 1):
        namespace = namespace_of(name)
        if namespace not in keysets:
            raise IntegrityError(f"the keyset of namespace {namespace!r} is missing")
        keyset = keysets[namespace]
        with _naming(META_PREFIX + name):
            plaintext = open_record(keyset.key_for_decryption, Purpose.SECRET_METADATA, name, 0, sealed_meta)
            meta = _Meta.from_json(plaintext)
        sealed_values = values.pop(name, {})
        kept = {n for n, info in meta.versions.items() if not info["destroyed"]}
        if set(sealed_values) != kept or any(v not in meta.versions for v in meta.labels.values()):
            raise IntegrityError(
                f"the versions of {name!r} do not match its metadata{_mismatch(meta, sealed_values)}"
            )
        plaintexts = {}
        for number, sealed in sealed_values.items():
            with _naming(f"{DATA_PREFIX}{name}#{number}"):
                plaintexts[number] = open_record(
                    keyset.key_for_decryption, Purpose.SECRET_VALUE, name, number, sealed
                )
            meta.check_value(name, number, plaintexts[number])
        decoded.append(BackupSecret.from_metadata(name, meta, plaintexts))
        if done % 1000 == 0 or done == len(metas):
            progress("checking", done, len(metas))
    if values:
        raise IntegrityError(f"values of {sorted(values)[0]!r} have no metadata")
    return decoded


def _mismatch(meta: _Meta, stored: Mapping[int, bytes]) -> str:
    """Which versions are stored and not listed, or listed and not stored (names, not values)."""
    unlisted = sorted(n for n in stored if n not in meta.versions or meta.versions[n]["destroyed"])
    missing = sorted(n for n, info in meta.versions.items() if not info["destroyed"] and n not in stored)
    facts = []
    if unlisted:
        facts.append(f"version {', '.join(map(str, unlisted))} stored but not listed as kept")
    if missing:
        facts.append(f"version {', '.join(map(str, missing))} listed but not stored")
    return f" ({'; '.join(facts)})" if facts else ""


@contextmanager
def _naming(key: str) -> Iterator[None]:
    """Turn the opaque "integrity check failed" of one entry into a message that names the entry."""
    try:
        yield
    except IntegrityError as exc:
        if str(exc) != "integrity check failed":
            raise
        raise IntegrityError(f"the entry {key!r} failed its integrity check") from None


def _layout(validate: Callable[[str], object], text: str) -> str:
    try:
        validate(text)
    except InvalidInputError:
        raise IntegrityError("an entry's key is not part of the store layout") from None
    return text


def _load_store_header(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        raise IntegrityError(f"the header of {where} is damaged (integrity check failed)") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"the header of {where} is damaged (integrity check failed)")
    _check_store_header(doc)
    return doc


def _check_store_header(doc: Mapping[str, Any]) -> None:
    """docs/format.md 4.4 steps 2 and 3 (the header of a store, here inside a backup)."""
    if (
        doc.get("format") != STORE_FORMAT
        or not all(_is_int(doc.get(f)) for f in ("created", "root_key_id"))
        or not isinstance(doc.get("unlock"), dict)
    ):
        raise IntegrityError("the store header is damaged (integrity check failed)")


# ---- small helpers -----------------------------------------------------------------------------------


def _only(key: DataKey) -> Callable[[int], DataKey]:
    def lookup(key_id: int) -> DataKey:
        if key_id != key.id:
            raise IntegrityError()
        return key

    return lookup


def _reason(exc: SecretsManagerError) -> str:
    return "failed its integrity check" if str(exc) == "integrity check failed" else str(exc)


def _line(doc: Mapping[str, Any]) -> bytes:
    return _dump(doc) + b"\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: object) -> int:
    if not _is_int(value) or not 1 <= value < 2**63:  # type: ignore[operator]
        raise ValueError("not a positive integer")
    return value  # type: ignore[return-value]


def _time(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("not a time")
    return float(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


__all__ = [
    "FORMAT_VERSION",
    "KIND_PASSWORD",
    "KIND_STORE",
    "Backup",
    "BackupDamagedError",
    "BackupHeader",
    "BackupSecret",
    "BackupSummary",
    "BackupVersion",
    "BackupVersionError",
    "NewerEntryError",
    "decode_store",
    "read_backup",
    "read_backup_header",
    "write_backup",
]
