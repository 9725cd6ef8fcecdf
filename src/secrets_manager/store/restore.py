"""Restore a checked backup (`store.backup.read_backup`) into a store: all or nothing.

Three ways in (docs/backup-format.md section 9):

* **A new SQLite store** (`restore_new_store`): the store is built complete in a temporary file
  beside the target, closed (its write-ahead log folded in), and hard-linked to the target name,
  which must not exist; a failure at any point removes the temporary file and leaves no store.
  Kind `store` copies the entries byte for byte (the backup's master password opens the result);
  kind `password` creates a store under a new master password and imports the logical form.
* **An existing `EncryptedStore`** (`restore_into`): every record of the restore — values,
  metadata and the keysets whose use counts they change — goes into **one** storage commit, with
  compare-and-set on every name it touches. Either the whole restore lands or nothing does;
  concurrent writers are never overwritten (a lost race re-reads and recomputes). Versions,
  labels, times, authors and deleted state are kept exactly; an overwritten secret keeps its own
  `next_version` where that is higher, so no version number is ever given to a second value.
* **Any other `SecretStore`** (Vault, AWS: no multi-secret transaction): the logical form is
  written through the protocol, secret by secret (`_write_order`: the backup's current last, a
  pending value staged again or, without that label, left out), and a failure midway is
  compensated: every name the restore created is destroyed again, and every name it overwrote is
  written back from the copy read before anything was changed. A name counts as created by the
  restore only once its first, create-only write succeeded: a name that turns out to exist then
  (another writer came first; AWS's ListSecrets lags up to five minutes) was not ours, is never
  destroyed, and meets the --on-existing rule there and then. If that first write's answer was
  lost (a timeout), the name is read back: it is ours only if it holds exactly the one version
  we sent; in doubt it is left in place and named in the error. "As it was" then means the same
  names, each with the same kept values, the same current and previous value and the same deleted
  state; version numbers and times are the target's own (it numbers versions itself). An
  overwritten name is destroyed before it is written, so it is numbered from 1 again: unlike the
  case above, a number the target gave out before may then name another value.

Existing names: with `on_existing=None` the target must hold no secret at all; FAIL refuses if any
name of the backup exists there; SKIP leaves those names as they are; OVERWRITE replaces each
with the backup's secret (its whole history). Every decision is made before the first write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hmac
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from secrets_manager.crypto import Purpose, seal_record
from secrets_manager.environment import Environment
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OperationInterrupted,
    StorageError,
    StoreNotFoundError,
    Terminated,
    UnsupportedOperationError,
    interruptions_ignored,
)
from secrets_manager.storage import ABSENT, Delete, Put
from secrets_manager.storage.base import Expect, Operation, Storage
from secrets_manager.storage.sqlite import create_private_directories
from secrets_manager.store.backup import KIND_STORE, Backup, BackupSecret, BackupVersion
from secrets_manager.store.base import (
    CURRENT,
    DEFAULT_MAX_VERSIONS,
    MAX_MAX_VERSIONS,
    MIN_MAX_VERSIONS,
    PENDING,
    PREVIOUS,
    Capability,
    SecretMetadata,
    SecretStore,
    check_metadata_fits,
    checked_max_versions,
    checked_metadata,
    unsupported_capabilities,
)
from secrets_manager.store.changes import value_row_parts
from secrets_manager.store.encrypted import (
    DATA_PREFIX,
    HEADER_KEY,
    KEYSET_PREFIX,
    META_PREFIX,
    EncryptedStore,
    _data_key,
    _dump,
    _Meta,
)
from secrets_manager.store.names import namespace_of
from secrets_manager.store.url import create_store, open_storage, remove_store_files, sqlite_path

# progress(what, done, total)
Progress = Callable[[str, int, int], None]


def _no_progress(_what: str, _done: int, _total: int) -> None:
    pass


class OnExisting(enum.StrEnum):
    """What a restore does with a name the target already holds."""

    FAIL = "fail"
    SKIP = "skip"
    OVERWRITE = "overwrite"


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did. `exact`: version numbers, labels, times and authors kept as in the backup
    (an `EncryptedStore` target); otherwise the target numbered the versions itself."""

    secrets: int
    versions: int
    skipped: tuple[str, ...] = ()
    overwritten: tuple[str, ...] = ()
    # every version destroyed (or all but a pending one): no current value to write into such a store
    without_value: tuple[str, ...] = ()
    exact: bool = True
    stale_removed: tuple[str, ...] = ()  # files of killed restores into new stores, removed first
    # Through the protocol: each written secret's (name, backup version, target version) of the
    # value the target now serves as current; and the secrets whose pending version was left out
    # (a store without the `pending` label).
    served: tuple[tuple[str, int, int], ...] = ()
    pending_left_out: tuple[str, ...] = ()


# ---- a new SQLite store ----------------------------------------------------------------------------


def restore_new_store(
    backup: Backup,
    url: str | None,
    *,
    password: bytes | None,
    kdf_profile: str,
    environment: Environment,
    actor: str,
    progress: Progress = _no_progress,
    before_publish: Callable[[str, RestoreResult], Sequence[tuple[Path, Path]]] | None = None,
) -> RestoreResult:
    """Create the SQLite store `url` names from `backup`; ConflictError if something is there already
    (a store, or the -wal, -shm or -journal a removed store left: SQLite would read them as the new
    store's own).

    Kind `store`: the entries as they are (the backup's master password opens the store; `password`
    is not used). Kind `password`: a new store locked by `password` (the new master password) with
    `kdf_profile`, then the logical form imported into it.

    `before_publish(url, result)` is called with the URL of the complete, closed store under its
    temporary name and what was restored, just before it is linked into place; it returns files
    (temporary, final) to link into place with it, right after the store (the CLI runs Argon2id
    there and records the restore in a new audit log under a temporary name, so that no store
    appears without the record of its restore but for the instant between two links)."""
    path = sqlite_path(url)
    if path.exists():
        raise ConflictError(
            f"a store already exists at {path}; restore into it with --on-existing, or pick a new path"
        )
    leftovers = [f"{path.name}{suffix}" for suffix in _COMPANIONS if Path(f"{path}{suffix}").exists()]
    if leftovers:  # SQLite would take them for the new store's own and replay an old -wal into it
        raise ConflictError(
            f"{path} has no store, but files of a store removed from there are beside it "
            f"({', '.join(leftovers)}); remove them (or pick a new path), then restore again"
        )
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # say so about the target, not the temporary file beside it
        raise InvalidInputError(f"cannot restore to {path}: {blocker} is not a directory; pick a new path")
    _refuse_what_open_storage_refuses(url, environment)
    create_private_directories(path)
    with _restore_directory(path.parent) as stale:
        result = _build_new_store(
            backup, path, password, kdf_profile, environment, actor, progress, before_publish
        )
    return dataclasses.replace(result, stale_removed=stale)


# SQLite's files beside a database: its write-ahead log, the log's index, a rollback journal.
_COMPANIONS = ("-wal", "-shm", "-journal")


def _refuse_what_open_storage_refuses(url: str | None, environment: Environment) -> None:
    """Apply open_storage's guard rails to the store `url` names before anything is written (in
    production: a directory group or others may write, where they could replace the new store),
    by asking open_storage itself to open it: with no store there yet, that stops at
    StoreNotFoundError once its checks have passed."""
    try:
        open_storage(url, create=False, environment=environment).close()
    except StoreNotFoundError:
        return


# A restore into a new store builds it as `.NAME.restore-<12 hex>` (plus SQLite's -wal, -shm,
# -journal) beside NAME, and the new audit log as `.LOG.restore-<12 hex>` (plus its `.lock`) beside
# LOG, holding a shared flock on the store's directory until they are published or removed.
_TEMPORARY = re.compile(r"\..+\.restore-[0-9a-f]{12}(-wal|-shm|-journal|\.lock)?")


@contextlib.contextmanager
def _restore_directory(directory: Path) -> Iterator[tuple[str, ...]]:
    """Hold a shared flock on `directory` while a restore builds a store in it, and first remove
    the temporary files of restores that were killed there (kill -9, a power cut): when the flock
    can be taken exclusively no restore is running in the directory, so every such file is a
    leftover (its -wal may hold records sealed under the backed-up store's keys). Yields the names
    removed."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        removed: list[str] = []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another restore runs here: its files are not leftovers; the next restore cleans
        else:
            for entry in sorted(os.listdir(fd)):
                if _TEMPORARY.fullmatch(entry):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry, dir_fd=fd)
                        removed.append(entry)
        fcntl.flock(fd, fcntl.LOCK_SH)  # not atomic after LOCK_EX: our own file does not exist yet
        yield tuple(removed)
    finally:
        os.close(fd)  # releases the flock


def _build_new_store(
    backup: Backup,
    path: Path,
    password: bytes | None,
    kdf_profile: str,
    environment: Environment,
    actor: str,
    progress: Progress,
    before_publish: Callable[[str, RestoreResult], Sequence[tuple[Path, Path]]] | None = None,
) -> RestoreResult:
    temporary = path.with_name(f".{path.name}.restore-{secrets.token_hex(6)}")
    companions: Sequence[tuple[Path, Path]] = ()  # bound before anything can fail: the cleanup reads it
    try:
        if backup.summary.kind == KIND_STORE:
            assert backup.store_header is not None
            storage = open_storage(str(temporary), create=True, environment=environment)
            try:
                operations: list[Operation] = [Put(HEADER_KEY, _dump(backup.store_header), ABSENT)]
                operations += [Put(key, value) for key, value in backup.entries]  # a new, private file
                progress("writing", 0, len(operations))
                storage.commit(operations, silent=True)  # nobody can watch a file that has no name yet
                progress("writing", len(operations), len(operations))
            finally:
                storage.close()
            result = RestoreResult(secrets=backup.summary.secrets, versions=backup.summary.versions)
        else:
            if not password:
                raise InvalidInputError("a new store needs a master password")
            store = create_store(
                str(temporary), password, kdf_profile=kdf_profile, environment=environment, actor=actor
            )
            try:
                result = _import_encrypted(store, backup.secrets, None, progress, silent=True)
            finally:
                store.close()
        if before_publish is not None:
            companions = before_publish(str(temporary), result)
        _publish_store(temporary, path, companions)
    except BaseException:
        remove_store_files(temporary)
        for companion, _ in companions:
            companion.unlink(missing_ok=True)
        raise
    return result


def _publish_store(temporary: Path, path: Path, companions: Sequence[tuple[Path, Path]] = ()) -> None:
    """Give a closed SQLite store its final name in one step, never replacing a file there, then
    each of `companions` (temporary, final) its own; if one cannot be, the store is unlinked again."""
    for suffix in ("-wal", "-shm"):  # closing the last connection folds the log in and removes it
        companion = Path(f"{temporary}{suffix}")
        if companion.exists() and companion.stat().st_size and suffix == "-wal":
            raise StorageError(
                f"the restored store {temporary} still has a write-ahead log; it was not published"
            )
        companion.unlink(missing_ok=True)
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise ConflictError(f"a store appeared at {path} during the restore; nothing was restored") from None
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from None
    linked = [path]
    try:
        for companion, final in companions:
            try:
                os.link(companion, final)
                linked.append(final)
            except FileExistsError:
                raise ConflictError(
                    f"{final} appeared during the restore; nothing was restored: move it away, then "
                    "restore again"
                ) from None
            except OSError as exc:
                raise StorageError(f"cannot create {final}: {exc.strerror}; nothing was restored") from None
    except BaseException:
        for published in linked:
            published.unlink()
        raise
    temporary.unlink()
    for companion, _ in companions:
        companion.unlink()
    for directory in dict.fromkeys([path.parent, *(final.parent for _, final in companions)]):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- an existing store -------------------------------------------------------------------------------


def restore_into(
    store: SecretStore,
    backup_secrets: Sequence[BackupSecret],
    *,
    on_existing: OnExisting | None = None,
    progress: Progress = _no_progress,
) -> RestoreResult:
    """Write the logical form of a backup into an existing store, all or nothing (module docstring)."""
    if isinstance(store, EncryptedStore):
        return _import_encrypted(store, backup_secrets, on_existing, progress)
    return _import_through_protocol(store, backup_secrets, on_existing, progress)


def _clashes(
    existing: Iterable[str], backup_secrets: Sequence[BackupSecret], on_existing: OnExisting | None
) -> set[str]:
    """The backup's names the target holds; ConflictError where `on_existing` forbids them."""
    held = set(existing)
    if on_existing is None and held:
        raise ConflictError(
            f"the target store is not empty ({len(held)} secret{'' if len(held) == 1 else 's'}); restore "
            "into an empty store, or pass --on-existing fail|skip|overwrite to say what happens to names "
            "it holds"
        )
    clashes = {s.name for s in backup_secrets if s.name in held}
    if on_existing is OnExisting.FAIL and clashes:
        first = min(clashes)
        names = (
            "1 name of the backup already exists"
            if len(clashes) == 1
            else (f"{len(clashes)} names of the backup already exist")
        )
        raise ConflictError(
            f"{names} in the target store (first: {first}); pass --on-existing skip or overwrite"
        )
    return clashes


def _import_encrypted(
    store: EncryptedStore,
    backup_secrets: Sequence[BackupSecret],
    on_existing: OnExisting | None,
    progress: Progress,
    *,
    silent: bool = False,
) -> RestoreResult:
    """Every record sealed under the target's own keys, then one commit (see the module docstring).
    `silent` leaves the commit out of the change feed: only for a store nobody can be watching yet."""
    by_namespace: dict[str, list[BackupSecret]] = {}
    for secret in backup_secrets:
        by_namespace.setdefault(namespace_of(secret.name), []).append(secret)
    total = len(backup_secrets)

    def attempt() -> RestoreResult:
        storage = store._storage
        clashes = _clashes(
            (key[len(META_PREFIX) :] for key in storage.list(META_PREFIX)), backup_secrets, on_existing
        )
        ops: list[Operation] = []
        guard = False
        done = versions = 0
        skipped: list[str] = []
        overwritten: list[str] = []
        stored = _stored_values_by_name(storage)  # the rows themselves, orphans of damage included
        for namespace, group in sorted(by_namespace.items()):
            keyset_expect, keyset = store._keyset_for_write(namespace)
            key = keyset.primary
            sealed = 0
            for secret in group:
                done += 1
                if done % 1000 == 0 or done == total:
                    progress("restoring", done, total)
                meta_expect: Expect = ABSENT
                old_keys: set[str] = set()
                old: _Meta | None = None
                if secret.name in clashes:
                    if on_existing is OnExisting.SKIP:
                        skipped.append(secret.name)
                        continue
                    entry, old = store._read_meta(secret.name)
                    if entry is None or old is None:  # destroyed meanwhile: write it as new
                        meta_expect = ABSENT
                    else:
                        meta_expect = entry.revision
                        old_keys = {
                            _data_key(secret.name, n) for n, i in old.versions.items() if not i["destroyed"]
                        }
                        overwritten.append(secret.name)
                # Values stored under the name that its metadata does not list (the metadata rolled
                # back or deleted): replaced like the listed ones, where a create-only put of theirs
                # collided for ever ('too many concurrent writes'); a restore is the documented repair.
                old_keys |= stored.get(secret.name, set())
                new_keys = set()
                for version in secret.kept:
                    data_key = _data_key(secret.name, version.version)
                    new_keys.add(data_key)
                    assert version.value is not None
                    record = seal_record(
                        key, Purpose.SECRET_VALUE, secret.name, version.version, version.value
                    )
                    ops.append(Put(data_key, record, None if data_key in old_keys else ABSENT))
                ops.extend(Delete(k) for k in sorted(old_keys - new_keys))
                document = secret.metadata()
                if old is not None:  # never give a number the store gave out again
                    document.next_version = max(document.next_version, old.next_version)
                meta = seal_record(key, Purpose.SECRET_METADATA, secret.name, 0, document.to_json())
                ops.append(Put(META_PREFIX + secret.name, meta, meta_expect))
                sealed += len(new_keys) + 1
                versions += len(new_keys)
            if sealed:
                keyset_record = seal_record(
                    store._root, Purpose.KEYSET, namespace, 0, keyset.with_uses(sealed).to_bytes()
                )
                ops.append(Put(KEYSET_PREFIX + namespace, keyset_record, keyset_expect))
                guard = guard or keyset_expect is ABSENT
        if guard:
            ops.append(store._root_guard())
        if ops:
            store._commit(ops, silent=silent)
        return RestoreResult(
            secrets=total - len(skipped),
            versions=versions,
            skipped=tuple(skipped),
            overwritten=tuple(overwritten),
        )

    return store._retry(attempt)


def _stored_values_by_name(storage: Storage) -> dict[str, set[str]]:
    """Every value row's key, by the secret it belongs to (one scan of the keys, nothing read)."""
    by_name: dict[str, set[str]] = {}
    for key in storage.list(DATA_PREFIX):
        name, _ = value_row_parts(key)
        if name:
            by_name.setdefault(name, set()).add(key)
    return by_name


# ---- any other store, through the protocol ------------------------------------------------------------


def _import_through_protocol(
    store: SecretStore,
    backup_secrets: Sequence[BackupSecret],
    on_existing: OnExisting | None,
    progress: Progress,
) -> RestoreResult:
    existing = {meta.name: meta for meta in store.list("", include_deleted=True)}
    clashes = _clashes(existing, backup_secrets, on_existing)
    lacks = unsupported_capabilities(store)
    if Capability.EMPTY_VALUE in lacks:
        empty = [s.name for s in backup_secrets if any(v.value == b"" for v in s.kept)]
        if empty:
            raise InvalidInputError(
                f"{len(empty)} secret(s) of the backup have an empty value, which this store cannot hold "
                f"(first: {empty[0]}); nothing was restored"
            )
    for secret in backup_secrets:  # the metadata limits of every store and this one's, before any write
        description, tags = secret.description or None, dict(secret.tags) or None
        try:
            checked_metadata(secret.name, description, tags)
            checked_max_versions(secret.name, secret.max_versions)
            check_metadata_fits(
                store, secret.name, description=description, tags=tags, max_versions=secret.max_versions
            )
        except InvalidInputError as exc:  # UnsupportedOperationError too, and kept as such
            raise type(exc)(f"{exc}; nothing was restored") from None
    # Before the first write: a copy of every secret that will be replaced, to put back on failure.
    originals: dict[str, BackupSecret] = {}
    if on_existing is OnExisting.OVERWRITE:
        for name in sorted(clashes):
            originals[name] = _copy_aside(store, name, existing[name])
    journal: list[_Journalled] = []  # what the undo must do, in write order
    doubtful: list[str] = []  # names whose first write's answer was lost and may or may not be ours
    skipped: list[str] = []
    without_value: list[str] = []
    served: list[tuple[str, int, int]] = []
    pending_left_out: list[str] = []
    versions = 0
    total = len(backup_secrets)
    try:
        for done, secret in enumerate(backup_secrets, 1):
            progress("restoring", done, total)
            if secret.name in clashes and on_existing is OnExisting.SKIP:
                skipped.append(secret.name)
                continue
            if not _write_order(secret)[0]:  # nothing it could serve as current
                without_value.append(secret.name)
                continue
            original = originals.get(secret.name)
            try:
                written = _replace_or_create(store, secret, original, journal, doubtful)
            except _AppearedMeanwhile:
                # Another writer created the name after our list (or AWS's list did not show it
                # yet): not ours, so never destroyed; --on-existing decides, as for a listed one.
                if on_existing is OnExisting.SKIP:
                    skipped.append(secret.name)
                    continue
                if on_existing is not OnExisting.OVERWRITE:
                    raise ConflictError(
                        f"{secret.name} appeared in the target store during the restore (another "
                        "writer, or a list that lagged); it was left as it is and nothing was "
                        "restored: pass --on-existing skip or overwrite, or retry"
                    ) from None
                original = _copy_aside(store, secret.name)
                originals[secret.name] = original
                written = _replace_or_create(store, secret, original, journal, doubtful)
            versions += written.versions
            if written.served is not None:
                served.append((secret.name, *written.served))
            if written.pending_left_out:
                pending_left_out.append(secret.name)
    except BaseException as exc:
        _compensate(store, journal, exc, doubtful, progress)
        raise
    return RestoreResult(
        secrets=total - len(skipped) - len(without_value),
        versions=versions,
        skipped=tuple(skipped),
        overwritten=tuple(sorted(originals)),
        without_value=tuple(without_value),
        exact=False,
        served=tuple(served),
        pending_left_out=tuple(pending_left_out),
    )


class _AppearedMeanwhile(Exception):
    """The first, create-only write of a name found it there: another writer's secret."""


def _copy_aside(store: SecretStore, name: str, meta: SecretMetadata | None = None) -> BackupSecret:
    """A copy of `name` as the target holds it, to write back if the restore is undone."""
    meta = meta or store.describe(name)
    if meta.deleted is not None:
        raise ConflictError(
            f"{name} is deleted in the target store, so it cannot be copied aside before it is "
            f"overwritten; nothing was restored: run 'undelete {name}' or 'destroy {name} --all' first"
        )
    return _read_secret(store, name)


@dataclass
class _Journalled:
    """A name the undo must put back as it was: destroy what the restore wrote under it, then
    write `original` back (None: the restore created the name)."""

    name: str
    original: BackupSecret | None
    # The versions the restore wrote under the name, by the target's numbers; None while it is
    # not known (an overwritten name not destroyed yet, or a created one whose answer was lost
    # and whose one version `_created_by_us` found to be ours).
    wrote: set[int] | None = None


def _replace_or_create(
    store: SecretStore,
    secret: BackupSecret,
    original: BackupSecret | None,
    journal: list[_Journalled],
    doubtful: list[str],
) -> _Written:
    """Write `secret`, journalling what the undo must do: a name being overwritten before it is
    destroyed (it is put back from `original`), a new name only once the restore created it."""
    wrote: set[int] = set()
    if original is None:

        def created() -> None:
            if not journal or journal[-1].name != secret.name:  # twice at worst: once
                journal.append(_Journalled(secret.name, None, wrote))

        return _write_secret(store, secret, created=created, doubtful=doubtful, wrote=wrote)
    _refuse_if_changed_since_copied(store, original)
    entry = _Journalled(secret.name, original)
    journal.append(entry)
    store.destroy_secret(secret.name)
    entry.wrote = wrote  # from here on every version under the name is ours or another writer's
    try:
        return _write_secret(store, secret, wrote=wrote)
    except _AppearedMeanwhile:  # written between our destroy and our write: a concurrent writer
        raise ConflictError(
            f"{secret.name} was written by another writer while the restore replaced it; nothing "
            "was restored, retry"
        ) from None


def _refuse_if_changed_since_copied(store: SecretStore, original: BackupSecret) -> None:
    """Just before a name being overwritten is destroyed: ConflictError unless it is still as its
    copy aside (read before the restore's first write, perhaps long before). A version another
    writer stored since would be destroyed with it for good and, were the restore then undone,
    not put back (the undo writes the copy). Neither Vault nor AWS can make the destroy
    conditional: a write landing between this read and the destroy (one round trip) is lost so."""
    now = store.describe(original.name)
    if (
        now.deleted is None
        and {info.version for info in now.versions} == {v.version for v in original.versions}
        and dict(now.labels) == dict(original.labels)
        and now.description == original.description
        and dict(now.tags) == dict(original.tags)
    ):
        return
    raise ConflictError(
        f"{original.name} was written by another writer after the restore copied it aside, before "
        "it was overwritten; it was left as it is and nothing was restored: retry"
    )


def _created_by_us(store: SecretStore, name: str, value: bytes) -> int | Literal[False] | None:
    """After a create-only write whose answer was lost: whether it landed. Its version number if
    `name` holds exactly one version and it is the value we sent, False if `name` is absent, None (doubt)
    otherwise or if it cannot be read back. Another writer's identical single value cannot be
    told apart, which is why only an exact match counts."""
    try:
        meta = store.describe(name)
    except NotFoundError:
        return False
    except Exception:  # the store is still unreachable: cannot tell
        return None
    try:
        if len(meta.versions) != 1 or meta.deleted is not None:
            return None
        held = store.get(name, version=meta.versions[0].version).value.reveal()
    except Exception:
        return None
    return meta.versions[0].version if hmac.compare_digest(held, value) else None


def _read_secret(store: SecretStore, name: str) -> BackupSecret:
    meta = store.describe(name)
    versions = tuple(
        BackupVersion(
            version=info.version,
            created=info.created.timestamp(),
            created_by=info.created_by,
            destroyed=info.destroyed,
            value=None if info.destroyed else store.get(name, version=info.version).value.reveal(),
        )
        for info in meta.versions
    )
    return BackupSecret(
        name=name,
        created=meta.created.timestamp(),
        updated=meta.updated.timestamp(),
        created_by=meta.created_by,
        description=meta.description,
        tags=dict(meta.tags),
        max_versions=meta.max_versions,
        next_version=max((v.version for v in versions), default=0) + 1,
        deleted=None if meta.deleted is None else meta.deleted.timestamp(),
        labels=dict(meta.labels),
        versions=versions,
    )


@dataclass(frozen=True)
class _Written:
    versions: int  # values written (the pending one staged included)
    served: tuple[int, int] | None  # (backup version, target version) of the target's current
    pending_left_out: bool


def _write_order(secret: BackupSecret) -> tuple[list[BackupVersion], BackupVersion | None]:
    """The kept values in the order to `put` them, and the pending one to `stage` after them.

    The backup's `current` goes last (the target's current is the backup's, never a value only a
    rotation staged), its `previous` just before it (so the target's previous is the backup's
    too), the other kept values oldest first before them. A version carrying `pending` but not
    `current` is the rotation's new value, never deployed: it is left out of the puts."""
    labels = secret.labels
    kept = {v.version: v for v in secret.kept}
    pending = labels.get(PENDING) if labels.get(PENDING) != labels.get(CURRENT) else None
    last = [labels[label] for label in (PREVIOUS, CURRENT) if label in labels]
    last = [n for n in last if n in kept and n != pending]
    rest = [n for n in kept if n not in last and n != pending]
    return [kept[n] for n in rest + last], kept.get(pending) if pending is not None else None


def _write_secret(
    store: SecretStore,
    secret: BackupSecret,
    *,
    created: Callable[[], None] | None = None,
    doubtful: list[str] | None = None,
    wrote: set[int] | None = None,
) -> _Written:
    """The kept values in `_write_order` (the backup's current last), then its pending value
    staged where the store has the `pending` label (else left out), then the deleted state.
    The first write is create-only and each next one expects the version before it, so a
    concurrent writer makes the restore fail (and be undone) rather than interleave.

    The first write sets a max_versions with room for every kept value (which may be more than
    the secret's own, for labelled or not yet pruned ones), and the secret's own is set after the
    last, so the target prunes none of them now. (A secret put back by `_compensate` whose
    max_versions another tool set out of our range gets the default.)

    The first write finding the name taken raises `_AppearedMeanwhile`. `created` is called once
    the first write created the name; if that write's answer is lost, or an interruption (Ctrl-C,
    SIGTERM) comes while it is in flight, `_created_by_us` decides, and a name in doubt is added
    to `doubtful` (never undone). `wrote` gets the target's number of each version written."""
    order, pending = _write_order(secret)
    stage = pending is not None and Capability.PENDING_LABEL not in unsupported_capabilities(store)
    wanted = secret.max_versions
    if not MIN_MAX_VERSIONS <= wanted <= MAX_MAX_VERSIONS:
        wanted = DEFAULT_MAX_VERSIONS
    room = min(max(len(order) + stage, wanted), MAX_MAX_VERSIONS)
    expect = 0
    served: tuple[int, int] | None = None
    for version in order:
        assert version.value is not None
        journalled = False
        try:
            info = store.put(
                secret.name,
                version.value,
                expect_version=expect,
                description=secret.description or None,
                tags=dict(secret.tags) or None,
                max_versions=room if expect == 0 else None,
                expires=None if version.expires is None else datetime.fromtimestamp(version.expires, UTC),
            )
            if wrote is not None:
                wrote.add(info.version)
            if expect == 0 and created is not None:
                created()  # inside the try: an interruption right after the put still journals it
                journalled = True
        except ConflictError:
            if expect == 0:
                raise _AppearedMeanwhile() from None
            raise
        except BaseException:  # a lost answer; or Ctrl-C / SIGTERM while the write was in flight
            if expect == 0 and created is not None and not journalled:
                landed = _created_by_us(store, secret.name, version.value)
                if landed:
                    if wrote is not None:
                        wrote.add(landed)
                    created()  # twice at worst (interrupted between the two lines above): harmless
                elif landed is None and doubtful is not None:
                    doubtful.append(secret.name)
            elif wrote is not None and _holds(store, secret.name, expect + 1, version.value):
                wrote.add(expect + 1)  # it landed (the put names the number it writes): ours
            raise
        expect = info.version
        served = (version.version, info.version)
    if stage and pending is not None and pending.value is not None:
        # With what the rotation staged it for (a PostgreSQL role), as the backup's store recorded.
        try:
            staged = store.stage(secret.name, pending.value, target=pending.target)
        except UnsupportedOperationError:
            if pending.target is None:
                raise
            staged = store.stage(secret.name, pending.value)  # AWS: no tag left for it; as before targets
        if wrote is not None:
            wrote.add(staged.version)
    if room != wanted:
        store.update_metadata(secret.name, max_versions=wanted)
    if secret.deleted is not None:
        # Only while the version last written is current: a store landing since (another writer)
        # would be hidden by the delete; refused (ConflictError), the restore fails and is undone
        # but for this name, which holds that writer's version.
        store.delete(secret.name, expect_version=expect or None)
    return _Written(
        versions=len(order) + stage, served=served, pending_left_out=pending is not None and not stage
    )


def _compensate(
    store: SecretStore,
    journal: list[_Journalled],
    cause: BaseException,
    doubtful: Sequence[str] = (),
    progress: Progress = _no_progress,
) -> None:
    """Undo a partial protocol restore, newest first; if that fails too, or a name may or may
    not have been created by it (`doubtful`, left in place), say which names to check. A name
    that holds a version the restore did not write (another writer's, after the restore's: it
    may be what made the restore fail) is left as it is, and named: destroying it would lose that
    write. A second Ctrl-C or SIGTERM during the undo is ignored: it stopped the undo part-way
    while the command said the target was as it had been."""
    left: list[str] = []
    written_over: list[str] = []
    with interruptions_ignored():
        for done, entry in enumerate(reversed(journal), 1):
            progress("undoing", done, len(journal))
            name, original = entry.name, entry.original
            try:
                if entry.wrote is not None and _written_by_another(store, name, entry.wrote):
                    written_over.append(name)
                    continue
                with contextlib.suppress(NotFoundError):  # the failed write created nothing
                    store.destroy_secret(name)
                if original is not None and original.kept:
                    _write_secret(store, original)
            except Exception:  # keep undoing the others, then report every name left
                left.append(name)
    failed = _failed(cause)
    if written_over:
        others = f"; {len(left)} other name(s) could not be undone (first: {sorted(left)[0]})" if left else ""
        raise _as_interrupted_if(
            cause,
            StorageError(
                f"{failed} and was undone, except for {', '.join(sorted(written_over))}: "
                f"{'it holds a version' if len(written_over) == 1 else 'they hold versions'} the "
                "restore did not write (another writer's, which undoing would destroy), so "
                f"{'it was' if len(written_over) == 1 else 'they were'} left as "
                f"{'it is' if len(written_over) == 1 else 'they are'}{others}; check by hand"
            ),
        ) from cause
    if left:
        raise _as_interrupted_if(
            cause,
            StorageError(
                f"{failed} and could not be undone for {len(left)} name(s) (first: {sorted(left)[0]}); "
                "check them by hand"
            ),
        ) from cause
    if doubtful:
        raise _as_interrupted_if(
            cause,
            StorageError(
                f"{failed} and was undone, except that "
                f"{doubtful[0]} may have been created by it (its first write's answer was lost, or the "
                "write was interrupted) "
                "and was left as it is; check it by hand"
            ),
        ) from cause


def _holds(store: SecretStore, name: str, number: int, value: bytes) -> bool:
    """Whether version `number` of `name` holds `value` (False if it cannot be read)."""
    try:
        held = store.get(name, version=number).value.reveal()
    except Exception:
        return False
    return hmac.compare_digest(held, value)


def _written_by_another(store: SecretStore, name: str, wrote: set[int]) -> bool:
    """Whether `name` holds a version that is not among those the restore `wrote` (by number)."""
    try:
        meta = store.describe(name)
    except NotFoundError:
        return False
    return any(info.version not in wrote for info in meta.versions if not info.destroyed)


def _as_interrupted_if(cause: BaseException, error: StorageError) -> StorageError:
    """`error`, which says what an undo left, with the exit code (130, or 143 / 129) and audit
    outcome of the interruption that caused the undo, if one did: a script waiting for a
    restore it stopped still sees it was interrupted."""
    if isinstance(cause, KeyboardInterrupt):
        error.exit_code = getattr(cause, "exit_code", OperationInterrupted.exit_code)
        error.kind = OperationInterrupted.kind
    return error


def _failed(cause: BaseException) -> str:
    """What stopped the restore, for the error that says what the undo left."""
    if isinstance(cause, KeyboardInterrupt):
        return f"the restore was interrupted ({cause if isinstance(cause, Terminated) else 'Ctrl-C'})"
    return f"the restore failed ({type(cause).__name__}: {cause})"


__all__ = ["OnExisting", "RestoreResult", "restore_into", "restore_new_store"]
