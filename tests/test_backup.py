"""Backup and restore (issue 8) through the library: round trips of both kinds, one instant while
another process writes, the file on disk (0600, atomic, no value in its bytes), existing names, and
all or nothing — one commit into an `EncryptedStore`, build-beside-and-link for a new store, an
undo journal for stores reached only through the `SecretStore` protocol.

The CLI contract (exit codes, messages, audit) is in test_backup_cli.py; the format's vectors in
test_backup_vectors.py.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.crypto import Purpose, kdf, open_record
from secrets_manager.crypto.record import record_key_id
from secrets_manager.environment import Environment
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StorageError,
    UnsupportedOperationError,
)
from secrets_manager.storage import Delete, Put
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, SecretMetadata, SecretStore, VersionInfo
from secrets_manager.store import backup as backup_module
from secrets_manager.store import restore as restore_module
from secrets_manager.store.backup import Backup, read_backup, write_backup
from secrets_manager.store.base import PENDING, PREVIOUS, Anchor
from secrets_manager.store.encrypted import DATA_PREFIX, KEYSET_PREFIX, META_PREFIX
from secrets_manager.store.names import namespace_of
from secrets_manager.store.restore import OnExisting, restore_into, restore_new_store
from secrets_manager.store.url import remove_store_files

BACKUP_PASSWORD = b"off-site backup password"
VALUES = {
    "market-connector/BINANCE_API_KEY": [
        b"sk-live-FIRST-9c1d22",
        b"sk-live-SECOND-71aa0e",
        b"sk-live-THIRD-e5f3b8",
    ],
    "auth/DB_PASSWORD": [b"db-password-ONLY-44be19"],
    "auth/EMPTY": [b""],
    "auth/BINARY": [bytes(range(256))],
    "ROOT_LEVEL": [b"root-level-VALUE-0b7d5c", b"root-level-NEWER-3a90d1"],
    "auth/GONE": [b"deleted-VALUE-6f2e81"],
}

OpenStore = Any  # the conftest factory


# ---- helpers -----------------------------------------------------------------------------------------


def populate(store: EncryptedStore) -> None:
    """Several namespaces, several versions, a destroyed version, a deleted secret, tags, a
    max_versions of its own."""
    for name, values in VALUES.items():
        for i, value in enumerate(values):
            store.put(name, value, description=f"about {name}" if i == 0 else None, tags={"v": str(i)})
    store.destroy("market-connector/BINANCE_API_KEY", [1])
    store.update_metadata("market-connector/BINANCE_API_KEY", max_versions=50)
    store.delete("auth/GONE")


def full_state(store: EncryptedStore) -> dict[str, tuple[SecretMetadata, dict[int, bytes]]]:
    """Every secret (deleted ones too): its metadata and the value of every kept version, read
    through the store's own keys (get() refuses deleted secrets)."""
    state = {}
    for meta in store.list("", include_deleted=True):
        keyset = store._keyset_for_read(namespace_of(meta.name))
        values = {}
        for info in meta.versions:
            if info.destroyed:
                continue
            entry = store._storage.get(f"{DATA_PREFIX}{meta.name}#{info.version}")
            assert entry is not None
            values[info.version] = open_record(
                keyset.key_for_decryption, Purpose.SECRET_VALUE, meta.name, info.version, entry.value
            )
        state[meta.name] = (meta, values)
    return state


def entries(path: Path) -> dict[str, bytes]:
    """What a store file holds, except the audit anchor (which every audited command moves)."""
    storage = SqliteStorage(path)
    try:
        return {k: storage.get(k).value for k in storage.list("") if k != "core/audit-anchor"}  # type: ignore[union-attr]
    finally:
        storage.close()


def open_at(path: Path, password: str | bytes) -> EncryptedStore:
    storage = SqliteStorage(path)
    try:
        return EncryptedStore.open(storage, PasswordUnlock(password, kdf.TEST))
    except BaseException:
        storage.close()
        raise


def new_store(path: Path, password: str | bytes = "target password") -> EncryptedStore:  # noqa: S107
    return EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(password, kdf.TEST))


def take(store: SecretStore, path: Path, *, password: bytes | None = None) -> Backup:
    write_backup(store, path, password=password, kdf=kdf.TEST)
    return read_backup(path, password or b"")


def restore_fresh(backup: Backup, path: Path, *, password: bytes = b"new master") -> None:
    restore_new_store(
        backup,
        str(path),
        password=password,
        kdf_profile="test",
        environment=Environment.DEVELOPMENT,
        actor="t",
    )


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def source(encrypted_store: EncryptedStore) -> EncryptedStore:
    populate(encrypted_store)
    return encrypted_store


# ---- round trips ----------------------------------------------------------------------------------


def test_store_copy_restores_every_name_version_label_value_and_metadata(
    source: EncryptedStore, tmp_path: Path, store_password: str
) -> None:
    backup_file = tmp_path / "copy.smbackup"
    write_backup(source, backup_file)
    restore_fresh(read_backup(backup_file, store_password.encode()), tmp_path / "restored" / "store.db")
    restored = open_at(tmp_path / "restored" / "store.db", store_password)  # the same master password
    try:
        assert full_state(restored) == full_state(source)
    finally:
        restored.close()


def test_audit_anchors_are_not_copied_whatever_their_scope(
    source: EncryptedStore, tmp_path: Path, tmp_store_path: Path, store_password: str
) -> None:
    """An anchor pins the source's own audit logs; a restored store starts its logs afresh."""
    source.set_audit_anchor(Anchor(seq=5, hash="ab" * 32))
    replica = EncryptedStore.open(
        SqliteStorage(tmp_store_path), PasswordUnlock(store_password, kdf.TEST), audit_scope="replica-a"
    )
    replica.set_audit_anchor(Anchor(seq=9, hash="cd" * 32))
    replica.close()
    write_backup(source, tmp_path / "copy.smbackup")
    restore_fresh(read_backup(tmp_path / "copy.smbackup", store_password.encode()), tmp_path / "restored.db")
    restored = entries(tmp_path / "restored.db")
    assert not [key for key in restored if key.startswith("core/audit-anchor")]
    assert {k: v for k, v in restored.items() if k.startswith(("meta/", "data/"))} == {
        k: v for k, v in entries(tmp_store_path).items() if k.startswith(("meta/", "data/"))
    }


def test_store_copy_restore_is_the_same_store_byte_for_byte(
    source: EncryptedStore, tmp_path: Path, tmp_store_path: Path, store_password: str
) -> None:
    source.audit_key()  # copied too
    write_backup(source, tmp_path / "copy.smbackup")
    backup = read_backup(tmp_path / "copy.smbackup", store_password.encode())
    restore_fresh(backup, tmp_path / "restored.db")
    assert entries(tmp_path / "restored.db") == entries(tmp_store_path)


def test_password_backup_restores_everything_into_a_new_store_under_a_new_master_password(
    source: EncryptedStore, tmp_path: Path
) -> None:
    backup_file = tmp_path / "off-site.smbackup"
    write_backup(source, backup_file, password=BACKUP_PASSWORD, kdf=kdf.TEST)
    restore_fresh(read_backup(backup_file, BACKUP_PASSWORD), tmp_path / "new.db", password=b"new master")
    restored = open_at(tmp_path / "new.db", "new master")
    try:
        assert full_state(restored) == full_state(source)
    finally:
        restored.close()


def test_restore_into_an_existing_empty_store_seals_under_its_own_keys(
    source: EncryptedStore, tmp_path: Path, store_password: str
) -> None:
    backup_file = tmp_path / "copy.smbackup"
    write_backup(source, backup_file)
    target = new_store(tmp_path / "target.db", "target password")
    try:
        result = restore_into(target, read_backup(backup_file, store_password.encode()).secrets)
        assert (result.secrets, result.versions, result.exact) == (len(VALUES), 8, True)
        assert full_state(target) == full_state(source)
        for key in target._storage.list(META_PREFIX) + target._storage.list(DATA_PREFIX):
            name = key.split("/", 1)[1].split("#")[0]
            keyset = target._keyset_for_read(namespace_of(name))
            assert keyset.key(record_key_id(target._storage.get(key).value))  # type: ignore[union-attr]
    finally:
        target.close()


def test_a_restored_store_takes_new_writes_after_the_restored_versions(
    source: EncryptedStore, tmp_path: Path
) -> None:
    target = new_store(tmp_path / "target.db")
    try:
        restore_into(target, take(source, tmp_path / "b", password=BACKUP_PASSWORD).secrets)
        info = target.put("market-connector/BINANCE_API_KEY", b"sk-live-FOURTH")
        assert info.version == 4
        assert target.get("market-connector/BINANCE_API_KEY", label="previous").value.reveal() == (
            b"sk-live-THIRD-e5f3b8"
        )
        keysets = {k[len(KEYSET_PREFIX) :] for k in target._storage.list(KEYSET_PREFIX)}
        assert keysets == {"market-connector", "auth", "default"}
    finally:
        target.close()


# ---- one instant, while another process writes --------------------------------------------------

WRITER = r"""
import os, sys
from secrets_manager.crypto import kdf
from secrets_manager.storage import Delete, Put
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

unlock = PasswordUnlock(os.environ["TEST_STORE_PASSWORD"], kdf.TEST)
store = EncryptedStore.open(SqliteStorage(sys.argv[1]), unlock)
i = 0
while True:  # until killed: A then B, the same counter (= their version number), two commits
    i += 1
    store.put("pair/a", str(i).encode())
    store.put("pair/b", str(i).encode())
    if i == 5:
        print("writing", flush=True)
"""


def check_one_instant(backup_secrets: Iterable[backup_module.BackupSecret]) -> tuple[int, int]:
    """Every version's value is its number (so no record is torn from another instant), versions
    are contiguous, and B's counter is A's or one behind: the pair as it was between two commits."""
    by_name = {s.name: s for s in backup_secrets}
    for name in ("pair/a", "pair/b"):
        numbers = [v.version for v in by_name[name].versions]
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), numbers
        assert all(v.value == str(v.version).encode() for v in by_name[name].versions)
    a = by_name["pair/a"].labels["current"]
    b = by_name["pair/b"].labels["current"]
    assert a - 1 <= b <= a, (a, b)
    return a, b


@pytest.mark.slow
def test_a_backup_taken_while_another_process_writes_restores_one_instant(
    encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str, tmp_path: Path
) -> None:
    for i in range(1500):  # enough entries that a backup takes a while to read and check
        encrypted_store.put(f"filler/k{i:05d}", b"x" * 64)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_store_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TEST_STORE_PASSWORD=store_password),
    )
    seen: list[tuple[int, int]] = []
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        for round_ in range(6):
            backup_file = tmp_path / f"live-{round_}.smbackup"
            write_backup(encrypted_store, backup_file)
            seen.append(check_one_instant(read_backup(backup_file, store_password.encode()).secrets))
        assert writer.poll() is None, "the writer stopped during the backups"
    finally:
        writer.kill()
        writer.wait()
    assert len({a for a, _ in seen}) > 1, f"the writer made no progress between backups: {seen}"
    restored_path = tmp_path / "restored.db"
    restore_fresh(read_backup(tmp_path / "live-5.smbackup", store_password.encode()), restored_path)
    restored = open_at(restored_path, store_password)
    try:
        a = int(restored.get("pair/a").value.reveal())
        b = int(restored.get("pair/b").value.reveal())
        assert (a, b) == seen[-1]
        for name in ("pair/a", "pair/b"):
            numbers = [v.version for v in restored.describe(name).versions if not v.destroyed]
            assert numbers == list(range(numbers[0], numbers[-1] + 1))
        assert len(restored.list("filler/")) == 1500
    finally:
        restored.close()


# ---- the file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("password", [None, BACKUP_PASSWORD], ids=["store-copy", "backup-password"])
def test_the_backup_file_is_private(source: EncryptedStore, tmp_path: Path, password: bytes | None) -> None:
    os.umask(0o022)
    write_backup(source, tmp_path / "b.smbackup", password=password, kdf=kdf.TEST)
    assert (tmp_path / "b.smbackup").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("password", [None, BACKUP_PASSWORD], ids=["store-copy", "backup-password"])
def test_no_value_appears_in_the_backup_files_bytes(
    source: EncryptedStore, tmp_path: Path, password: bytes | None
) -> None:
    write_backup(source, tmp_path / "b.smbackup", password=password, kdf=kdf.TEST)
    data = (tmp_path / "b.smbackup").read_bytes()
    for values in VALUES.values():
        for value in values:
            if len(value) < 8:
                continue
            for form in (value, base64.b64encode(value), value.hex().encode()):
                assert form not in data
    assert b"sk-live" not in data and b"db-password" not in data


def test_a_failed_write_leaves_nothing_under_the_final_name(
    source: EncryptedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup_module.os, "fsync", failing_fsync)
    with pytest.raises(StorageError, match="No space left"):
        write_backup(source, tmp_path / "b.smbackup")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


_HOLD_LOCKED = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, b"secrets-manager-backup/v1\\n half a backup")
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def _writer_holding(path: Path) -> subprocess.Popen[str]:
    """A process that made `path` as a backup writes its temporary file, and holds its lock."""
    writer = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCKED, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline() == "locked\n"
    return writer


def test_a_backup_killed_mid_write_leaves_nothing_behind_the_next_one(
    source: EncryptedStore, tmp_path: Path
) -> None:
    target = tmp_path / "b.smbackup"
    abandoned = tmp_path / ".b.smbackup.0123456789ab.tmp"
    killed = _writer_holding(abandoned)
    killed.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    killed.wait()
    running = _writer_holding(tmp_path / ".b.smbackup.ba9876543210.tmp")
    try:
        others = [tmp_path / ".other.smbackup.0123456789ab.tmp", tmp_path / ".b.smbackup.notes.tmp"]
        for other in others:
            other.write_bytes(b"not this backup's")
        write_backup(source, target)
        assert leftovers(tmp_path) == sorted(
            [".b.smbackup.ba9876543210.tmp", ".other.smbackup.0123456789ab.tmp", ".b.smbackup.notes.tmp"]
        )  # the killed writer's file is gone; a live writer's and other files stay
        assert target.read_bytes().startswith(b"secrets-manager-backup/v1\n")
    finally:
        running.kill()
        running.wait()


def test_a_backup_killed_mid_write_to_another_name_leaves_nothing_behind_the_next_one(
    source: EncryptedStore, tmp_path: Path
) -> None:
    """Only a backup to the same name removed a killed one's hidden temporary file, so one of a
    nightly backup named by its date (never written to again) stayed for good, a part of the
    store's ciphertext in a hidden file. Any backup into the directory now removes it; another
    program's file of a like name, not a backup's, and a live writer's stay."""
    killed = _writer_holding(tmp_path / ".store-2026-11-30.smbackup.0123456789ab.tmp")
    killed.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    killed.wait()
    (tmp_path / ".store-2026-11-29.smbackup.00112233aabb.tmp").write_bytes(b"")  # killed at its start
    running = _writer_holding(tmp_path / ".store-2026-12-01.smbackup.ba9876543210.tmp")
    try:
        other = tmp_path / ".notes.txt.0123456789ab.tmp"
        other.write_bytes(b"not a backup's")
        write_backup(source, tmp_path / "store-2026-12-02.smbackup")
        assert leftovers(tmp_path) == sorted([".store-2026-12-01.smbackup.ba9876543210.tmp", other.name])
    finally:
        running.kill()
        running.wait()


def test_a_backup_never_replaces_a_file_unless_asked(source: EncryptedStore, tmp_path: Path) -> None:
    target = tmp_path / "b.smbackup"
    target.write_bytes(b"an older backup")
    with pytest.raises(ConflictError, match="already exists"):
        write_backup(source, target)
    assert target.read_bytes() == b"an older backup"
    write_backup(source, target, replace=True)
    assert target.read_bytes().startswith(b"secrets-manager-backup/v1\n")
    assert leftovers(tmp_path) == []


def test_a_store_with_a_damaged_record_is_not_backed_up(
    source: EncryptedStore, tmp_path: Path, tmp_store_path: Path
) -> None:
    raw = SqliteStorage(tmp_store_path)
    try:
        key = f"{DATA_PREFIX}auth/DB_PASSWORD#1"
        value = bytearray(raw.get(key).value)  # type: ignore[union-attr]
        value[-1] ^= 1
        raw.put(key, bytes(value))
    finally:
        raw.close()
    with pytest.raises(IntegrityError):
        write_backup(source, tmp_path / "b.smbackup")
    assert not (tmp_path / "b.smbackup").exists()
    assert leftovers(tmp_path) == []


def add_an_entry_of_a_newer_version(path: Path) -> None:
    """What a newer secrets-manager may leave in a store: a `core/` entry this one does not know, as
    format 4.6 added `core/recovery` (which a version of 2026-11-28, e.g. 97d87ba, then called damage:
    'the store is damaged (the entry 'core/recovery' is not part of the store layout)')."""
    raw = SqliteStorage(path)
    try:
        raw.put("core/from-a-newer-version", b"\x01" + bytes(40))
    finally:
        raw.close()


def test_a_store_a_newer_version_wrote_to_is_not_called_damaged_by_backup(
    source: EncryptedStore, tmp_path: Path, tmp_store_path: Path
) -> None:
    """Before: IntegrityError 'the store is damaged … destroy NAME --version N' (exit 6)."""
    add_an_entry_of_a_newer_version(tmp_store_path)
    for password in (None, BACKUP_PASSWORD):
        with pytest.raises(InvalidInputError, match="newer secrets-manager wrote it") as raised:
            write_backup(source, tmp_path / "b.smbackup", password=password, kdf=kdf.TEST)
        assert "core/from-a-newer-version" in str(raised.value)
        assert "damaged" not in str(raised.value)
        assert not isinstance(raised.value, IntegrityError)
    assert not (tmp_path / "b.smbackup").exists()


def test_a_store_copy_backup_with_an_entry_of_a_newer_version_says_upgrade(
    source: EncryptedStore,
    tmp_path: Path,
    tmp_store_path: Path,
    store_password: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newer version writes its entry into the copy; this one's verify and restore must say
    'upgrade', not 'damaged … use another copy' (exit 6), which sends the user to older copies."""
    add_an_entry_of_a_newer_version(tmp_store_path)
    checked = backup_module._checked
    monkeypatch.setattr(  # the newer writer: it knows its entry
        backup_module,
        "_checked",
        lambda header, root, entries, progress: checked(
            header, root, [e for e in entries if e[0] != "core/from-a-newer-version"], progress
        ),
    )
    path = tmp_path / "newer.smbackup"
    write_backup(source, path, kdf=kdf.TEST)
    monkeypatch.undo()
    with pytest.raises(
        backup_module.BackupVersionError, match="upgrade secrets-manager to verify or restore"
    ):
        read_backup(path, store_password.encode())


def test_a_store_with_rolled_back_metadata_is_not_backed_up_and_the_refusal_names_a_working_command(
    encrypted_store: EncryptedStore, tmp_path: Path, tmp_store_path: Path, store_password: str
) -> None:
    """An older `meta/<name>` put back leaves a stored version its metadata does not list: the
    refusal names that version and the command that erases it ('destroy NAME --version N', which
    refused a number the metadata does not list); after it the backup is written."""
    encrypted_store.put("auth/DB_PASS", b"v1")
    raw = SqliteStorage(tmp_store_path)
    try:
        at_v1 = raw.get(f"{META_PREFIX}auth/DB_PASS").value  # type: ignore[union-attr]
        encrypted_store.put("auth/DB_PASS", b"v2")
        raw.put(f"{META_PREFIX}auth/DB_PASS", at_v1)
    finally:
        raw.close()
    with pytest.raises(IntegrityError) as caught:
        write_backup(encrypted_store, tmp_path / "b.smbackup")
    message = str(caught.value)
    assert "'auth/DB_PASS'" in message and "version 2 stored but not listed" in message
    assert "'secrets-manager destroy NAME --version N'" in message
    assert not (tmp_path / "b.smbackup").exists()
    encrypted_store.destroy("auth/DB_PASS", [2])
    write_backup(encrypted_store, tmp_path / "b.smbackup")
    assert [
        v.version for v in read_backup(tmp_path / "b.smbackup", store_password.encode()).secrets[0].kept
    ] == [1]


# ---- existing names ---------------------------------------------------------------------------------


@pytest.fixture
def backup(source: EncryptedStore, tmp_path: Path) -> Backup:
    return take(source, tmp_path / "b.smbackup", password=BACKUP_PASSWORD)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[EncryptedStore]:
    store = new_store(tmp_path / "target.db")
    store.put("auth/DB_PASSWORD", b"target-OWN-password")
    store.put("other/UNRELATED", b"target-UNRELATED")
    yield store
    store.close()


def test_a_non_empty_store_is_refused_unless_on_existing_is_given(
    backup: Backup, target: EncryptedStore, tmp_path: Path
) -> None:
    before = entries(tmp_path / "target.db")
    with pytest.raises(ConflictError, match=r"not empty \(2 secrets\).*--on-existing"):
        restore_into(target, backup.secrets)
    assert entries(tmp_path / "target.db") == before


def test_on_existing_fail_refuses_a_shared_name_and_writes_nothing(
    backup: Backup, target: EncryptedStore, tmp_path: Path
) -> None:
    before = entries(tmp_path / "target.db")
    with pytest.raises(ConflictError, match="first: auth/DB_PASSWORD"):
        restore_into(target, backup.secrets, on_existing=OnExisting.FAIL)
    assert entries(tmp_path / "target.db") == before


def test_on_existing_fail_allows_a_store_whose_names_differ(backup: Backup, tmp_path: Path) -> None:
    store = new_store(tmp_path / "other.db")
    try:
        store.put("other/UNRELATED", b"kept")
        restore_into(store, backup.secrets, on_existing=OnExisting.FAIL)
        assert len(store.list("", include_deleted=True)) == len(VALUES) + 1
        assert store.get("other/UNRELATED").value.reveal() == b"kept"
    finally:
        store.close()


def test_on_existing_skip_keeps_the_stores_own_secret(backup: Backup, target: EncryptedStore) -> None:
    result = restore_into(target, backup.secrets, on_existing=OnExisting.SKIP)
    assert result.skipped == ("auth/DB_PASSWORD",)
    assert target.get("auth/DB_PASSWORD").value.reveal() == b"target-OWN-password"
    assert target.get("ROOT_LEVEL").value.reveal() == b"root-level-NEWER-3a90d1"
    assert target.get("other/UNRELATED").value.reveal() == b"target-UNRELATED"


def test_on_existing_overwrite_replaces_the_whole_history_of_shared_names_only(
    backup: Backup, target: EncryptedStore, source: EncryptedStore
) -> None:
    target.put("auth/DB_PASSWORD", b"target-SECOND")
    result = restore_into(target, backup.secrets, on_existing=OnExisting.OVERWRITE)
    assert result.overwritten == ("auth/DB_PASSWORD",)
    assert target.describe("auth/DB_PASSWORD") == source.describe("auth/DB_PASSWORD")
    with pytest.raises(NotFoundError):
        target.get("auth/DB_PASSWORD", version=2)
    assert target.get("other/UNRELATED").value.reveal() == b"target-UNRELATED"


def test_an_overwrite_never_gives_a_version_number_to_a_second_value(
    backup: Backup, target: EncryptedStore, source: EncryptedStore
) -> None:
    """Versions the target wrote after the backup are erased, but their numbers stay used: the next
    write takes a new number (as Vault and AWS never reuse one), so the audit log's `store NAME N`
    means one value only."""
    backed_up = source.describe("auth/DB_PASSWORD").versions[-1].version
    for n in range(backed_up + 3):
        target.put("auth/DB_PASSWORD", b"target-LATER-%d" % n)
    given_out = target.describe("auth/DB_PASSWORD").versions[-1].version
    assert given_out > backed_up
    restore_into(target, backup.secrets, on_existing=OnExisting.OVERWRITE)
    assert target.describe("auth/DB_PASSWORD").versions == source.describe("auth/DB_PASSWORD").versions
    assert target.get("auth/DB_PASSWORD").version == backed_up
    assert target.put("auth/DB_PASSWORD", b"after-the-restore").version == given_out + 1


@pytest.mark.parametrize("damage", ["metadata rolled back", "metadata deleted"])
def test_a_restore_replaces_values_their_metadata_does_not_list(
    backup: Backup, target: EncryptedStore, source: EncryptedStore, damage: str, tmp_path: Path
) -> None:
    """A restore is the repair damage messages name, but into a store whose `meta/NAME` was put back
    from an older copy (or deleted), the backup's create-only puts collided with the orphaned
    value rows for 30 s, then 'too many concurrent writes'."""
    for n in range(4):
        target.put("auth/DB_PASSWORD", b"target-%d" % n)
    storage = target._storage
    if damage == "metadata deleted":
        storage.commit([Delete(META_PREFIX + "auth/DB_PASSWORD")])
    else:
        target.put("other/ROLLED", b"v1")
        at_v1 = storage.get(META_PREFIX + "other/ROLLED")
        assert at_v1 is not None
        target.put("other/ROLLED", b"v2")
        storage.commit([Put(META_PREFIX + "other/ROLLED", at_v1.value, None)])
        source.put("other/ROLLED", b"from-the-backup")
        backup = take(source, tmp_path / "again.smbackup", password=BACKUP_PASSWORD)
    started = time.monotonic()
    restore_into(target, backup.secrets, on_existing=OnExisting.OVERWRITE)
    assert time.monotonic() - started < 10
    assert target.describe("auth/DB_PASSWORD").versions == source.describe("auth/DB_PASSWORD").versions
    kept = {
        f"{DATA_PREFIX}auth/DB_PASSWORD#{v.version}" for v in source.describe("auth/DB_PASSWORD").versions
    }
    assert set(storage.list(f"{DATA_PREFIX}auth/DB_PASSWORD#")) == kept
    if damage == "metadata rolled back":
        assert target.get("other/ROLLED").value.reveal() == b"from-the-backup"
        assert target.put("other/ROLLED", b"after").version > 1


# ---- all or nothing ---------------------------------------------------------------------------------


def test_a_failing_commit_leaves_the_existing_store_as_it_was(
    backup: Backup, target: EncryptedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = entries(tmp_path / "target.db")

    def broken_commit(*args: Any, **kwargs: Any) -> int:
        raise StorageError("disk I/O error")

    monkeypatch.setattr(target._storage, "commit", broken_commit)
    with pytest.raises(StorageError):
        restore_into(target, backup.secrets, on_existing=OnExisting.OVERWRITE)
    assert entries(tmp_path / "target.db") == before


def test_the_restore_is_one_commit_so_a_concurrent_writer_is_never_overwritten(
    backup: Backup, target: EncryptedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write lands between the restore's read and its commit: the commit's compare-and-set fails,
    and the retry sees (and keeps) the concurrent write."""
    other = open_at(tmp_path / "target.db", "target password")
    original_commit = target._storage.commit
    calls = []

    def commit_after_a_concurrent_write(ops: Any, **kwargs: Any) -> int:
        if not calls:
            other.put("auth/DB_PASSWORD", b"written-CONCURRENTLY")
        calls.append(len(ops))
        return original_commit(ops, **kwargs)

    monkeypatch.setattr(target._storage, "commit", commit_after_a_concurrent_write)
    try:
        restore_into(target, backup.secrets, on_existing=OnExisting.SKIP)
    finally:
        other.close()
    assert len(calls) == 2
    assert target.get("auth/DB_PASSWORD").value.reveal() == b"written-CONCURRENTLY"
    assert target.get("ROOT_LEVEL").value.reveal() == b"root-level-NEWER-3a90d1"


def test_a_failure_while_building_a_new_store_leaves_no_store(
    backup: Backup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_link(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(restore_module.os, "link", failing_link)
    with pytest.raises(StorageError):
        restore_fresh(backup, tmp_path / "new" / "store.db")
    assert list((tmp_path / "new").iterdir()) == []


def test_a_failure_before_the_new_store_is_complete_is_raised_as_it_is(
    backup: Backup, tmp_path: Path
) -> None:
    """A failure while the new store is still being written (here: its progress callback, as a
    Ctrl-C there would) reached the caller as UnboundLocalError: the cleanup named the files to link
    with the store (this session's audit log under a temporary name) before they were set."""

    def progress(phase: str, done: int, total: int) -> None:
        raise StorageError("disk full while writing")

    with pytest.raises(StorageError, match="disk full while writing"):
        restore_new_store(
            backup, str(tmp_path / "new" / "store.db"), password=b"new master", kdf_profile="test",
            environment=Environment.DEVELOPMENT, actor="t", progress=progress,
        )  # fmt: skip
    assert list((tmp_path / "new").iterdir()) == []


def test_a_new_store_is_never_created_over_an_existing_file(backup: Backup, tmp_path: Path) -> None:
    (tmp_path / "taken.db").write_bytes(b"not ours")
    with pytest.raises(ConflictError, match="already exists"):
        restore_fresh(backup, tmp_path / "taken.db")
    assert (tmp_path / "taken.db").read_bytes() == b"not ours"


# ---- stores reached through the protocol only (Vault, AWS) --------------------------------------------


class ProtocolOnly:
    """Another kind of store: only the `SecretStore` verbs of the store it wraps, so restore and
    backup must go through the protocol (no snapshot, no shared commit, versions numbered by it)."""

    def __init__(self, inner: EncryptedStore, *, fail_on_put: int | None = None) -> None:
        self._inner = inner
        self.puts = 0
        self._fail_on_put = fail_on_put

    def put(self, name: str, value: bytes, **options: Any) -> VersionInfo:
        self.puts += 1
        if self.puts == self._fail_on_put:
            raise StorageError("the backend went away")
        return self._inner.put(name, value, **options)

    def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Any:
        return self._inner.get(name, version=version, label=label)

    def list(self, prefix: str = "", *, include_deleted: bool = False) -> list[SecretMetadata]:
        return self._inner.list(prefix, include_deleted=include_deleted)

    def describe(self, name: str) -> SecretMetadata:
        return self._inner.describe(name)

    def update_metadata(self, name: str, **change: Any) -> None:
        self._inner.update_metadata(name, **change)

    def delete(self, name: str, **condition: Any) -> None:
        self._inner.delete(name, **condition)

    def undelete(self, name: str) -> None:
        self._inner.undelete(name)

    def destroy(self, name: str, versions: Iterable[int]) -> None:
        self._inner.destroy(name, versions)

    def destroy_secret(self, name: str) -> None:
        self._inner.destroy_secret(name)

    def stage(
        self, name: str, value: bytes, *, expect_current: int | None = None, target: str | None = None
    ) -> VersionInfo:
        return self._inner.stage(name, value, expect_current=expect_current, target=target)

    def close(self) -> None:
        self._inner.close()


class NoPendingLabel(ProtocolOnly):
    """As Vault: no `pending` label, so nothing can be staged."""

    unsupported_capabilities = frozenset({"pending-label"})

    def stage(
        self, name: str, value: bytes, *, expect_current: int | None = None, target: str | None = None
    ) -> VersionInfo:
        raise UnsupportedOperationError("the 'pending' label is not supported by this store")


class NoEmptyValues(ProtocolOnly):
    unsupported_capabilities = frozenset({"empty-value"})

    def put(self, name: str, value: bytes, **options: Any) -> VersionInfo:
        if not value:
            raise UnsupportedOperationError("an empty value is not supported by this store")
        return super().put(name, value, **options)


def kept_values(store: SecretStore) -> dict[str, tuple[list[bytes], bool]]:
    """Each secret's kept values oldest first and whether it is deleted: what a store that numbers
    versions itself can keep."""
    result = {}
    for meta in store.list("", include_deleted=True):
        if meta.deleted is not None:
            store.undelete(meta.name)
        values = [
            store.get(meta.name, version=v.version).value.reveal() for v in meta.versions if not v.destroyed
        ]
        if meta.deleted is not None:
            store.delete(meta.name)
        result[meta.name] = (values, meta.deleted is not None)
    return result


def test_migration_through_the_protocol_and_back_keeps_every_value(
    source: EncryptedStore, backup: Backup, tmp_path: Path
) -> None:
    """SQLite → another kind of store (through the protocol) → a backup of that store → SQLite."""
    other = ProtocolOnly(new_store(tmp_path / "other.db"))
    try:
        result = restore_into(other, backup.secrets)
        assert (result.exact, result.secrets, result.versions) == (False, len(VALUES), 8)
        assert kept_values(other) == kept_values(source)
        assert other.get("market-connector/BINANCE_API_KEY").value.reveal() == b"sk-live-THIRD-e5f3b8"
        assert other.describe("auth/DB_PASSWORD").description == "about auth/DB_PASSWORD"
        summary = write_backup(
            other, tmp_path / "from-other.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST
        )
        assert summary.not_included == ("auth/GONE",)  # a deleted secret gives out no value
        other.undelete("auth/GONE")
        write_backup(
            other, tmp_path / "from-other.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST, replace=True
        )
    finally:
        other.close()
    back = tmp_path / "back.db"
    restore_fresh(read_backup(tmp_path / "from-other.smbackup", BACKUP_PASSWORD), back, password=b"back")
    restored = open_at(back, "back")
    try:
        restored.delete("auth/GONE")
        assert kept_values(restored) == kept_values(source)
    finally:
        restored.close()


def test_max_versions_round_trips_exactly_and_through_the_protocol(tmp_path: Path) -> None:
    """A secret's own max_versions reaches the backup and every kind of restore. Through the
    protocol, no kept value is pruned on the way in, even where more are kept than the secret's
    max_versions (lowered, not yet written since)."""
    source = new_store(tmp_path / "source.db")
    try:
        source.put("desk/TOKEN", b"t1", max_versions=3)
        for n in range(2, 6):
            source.put("desk/TOKEN", f"t{n}".encode())
        source.put("desk/EXCHANGE_KEY", b"k1", max_versions=50)
        for n in range(2, 7):
            source.put("desk/EXCHANGE_KEY", f"k{n}".encode())
        source.update_metadata("desk/EXCHANGE_KEY", max_versions=2)
        backup = take(source, tmp_path / "b.smbackup", password=BACKUP_PASSWORD)
        kept = {s.name: (s.max_versions, [v.version for v in s.kept]) for s in backup.secrets}
        assert kept == {"desk/TOKEN": (3, [3, 4, 5]), "desk/EXCHANGE_KEY": (2, [1, 2, 3, 4, 5, 6])}
        restore_fresh(backup, tmp_path / "exact.db")
        exact = open_at(tmp_path / "exact.db", "new master")
        try:
            assert full_state(exact) == full_state(source)
        finally:
            exact.close()
        other = ProtocolOnly(new_store(tmp_path / "other.db"))
        try:
            restore_into(other, backup.secrets)
            assert kept_values(other) == kept_values(source)
            assert {m.name: m.max_versions for m in other.list()} == {"desk/TOKEN": 3, "desk/EXCHANGE_KEY": 2}
            other.put("desk/EXCHANGE_KEY", b"k7")  # the restored setting prunes at the next write
            assert [v.version for v in other.describe("desk/EXCHANGE_KEY").versions] == [6, 7]
        finally:
            other.close()
    finally:
        source.close()


def test_a_protocol_restore_of_a_max_versions_out_of_range_is_refused_before_any_write(
    backup: Backup, tmp_path: Path
) -> None:
    """Another tool may set any max_versions (Vault allows 1 or 500); our stores take 2 to 100."""
    secrets = [replace(s, max_versions=500) if s.name == "ROOT_LEVEL" else s for s in backup.secrets]
    other = ProtocolOnly(new_store(tmp_path / "other.db"))
    try:
        with pytest.raises(InvalidInputError, match=r"ROOT_LEVEL.*2 to 100.*nothing was restored"):
            restore_into(other, secrets)
        assert other.puts == 0
    finally:
        other.close()


def test_a_protocol_restore_that_fails_midway_is_undone(backup: Backup, tmp_path: Path) -> None:
    inner = new_store(tmp_path / "other.db")
    inner.put("auth/DB_PASSWORD", b"other-FIRST")
    inner.put("auth/DB_PASSWORD", b"other-SECOND")
    inner.put("keep/ME", b"untouched")
    inner.delete("keep/ME")
    before = kept_values(inner)
    other = ProtocolOnly(inner, fail_on_put=6)
    try:
        with pytest.raises(StorageError, match="went away"):
            restore_into(other, backup.secrets, on_existing=OnExisting.OVERWRITE)
        assert other.puts >= 6
        assert kept_values(inner) == before
        assert inner.get("auth/DB_PASSWORD").value.reveal() == b"other-SECOND"
    finally:
        other.close()


def test_a_protocol_store_that_cannot_hold_a_value_is_refused_before_any_write(
    backup: Backup, tmp_path: Path
) -> None:
    other = NoEmptyValues(new_store(tmp_path / "other.db"))
    try:
        with pytest.raises(Exception, match="empty value") as caught:
            restore_into(other, backup.secrets)
        assert caught.value.exit_code == 2  # type: ignore[attr-defined]
        assert other.puts == 0
        assert other.list("", include_deleted=True) == []
    finally:
        other.close()


@pytest.mark.parametrize("kind", [ProtocolOnly, NoPendingLabel])
def test_a_pending_rotation_never_becomes_current_through_the_protocol(
    kind: type[ProtocolOnly], tmp_path: Path
) -> None:
    """A secret whose rotation was staged but not promoted (pending newer than current), and one
    where a store came in between (current newer than pending): the target's current and previous
    are the backup's; the pending value is staged again where the store has the label, else left
    out and named. `served` gives the target's number of the value it serves."""
    source = new_store(tmp_path / "source.db")
    try:
        for value in (b"db-ONE", b"db-TWO"):
            source.put("svc/DB", value)
        source.stage("svc/DB", b"db-STAGED-never-deployed")  # current 2, pending 3
        for value in (b"key-ONE", b"key-TWO"):
            source.put("svc/KEY", value)
        source.stage("svc/KEY", b"key-STAGED")  # pending 3
        source.put("svc/KEY", b"key-FOUR")  # current 4, previous 2, pending 3
        backup = take(source, tmp_path / "b.smbackup", password=BACKUP_PASSWORD)
    finally:
        source.close()
    other = kind(new_store(tmp_path / "other.db"))
    try:
        result = restore_into(other, backup.secrets)
        assert other.get("svc/DB").value.reveal() == b"db-TWO"
        assert other.get("svc/DB", label=PREVIOUS).value.reveal() == b"db-ONE"
        assert other.get("svc/KEY").value.reveal() == b"key-FOUR"
        assert other.get("svc/KEY", label=PREVIOUS).value.reveal() == b"key-TWO"
        served = {
            name: (ours, other.get(name, version=theirs).value.reveal())
            for name, ours, theirs in result.served
        }
        assert served == {"svc/DB": (2, b"db-TWO"), "svc/KEY": (4, b"key-FOUR")}
        if kind is NoPendingLabel:
            assert result.pending_left_out == ("svc/DB", "svc/KEY")
            assert result.versions == 5
            values = [
                other.get("svc/KEY", version=v.version).value.reveal()
                for v in other.describe("svc/KEY").versions
            ]
            assert b"key-STAGED" not in values
        else:
            assert result.pending_left_out == ()
            assert result.versions == 7
            assert other.get("svc/DB", label=PENDING).value.reveal() == b"db-STAGED-never-deployed"
            assert other.get("svc/KEY", label=PENDING).value.reveal() == b"key-STAGED"
    finally:
        other.close()


def test_a_store_without_snapshots_is_not_copied_as_a_store(tmp_path: Path) -> None:
    other = ProtocolOnly(new_store(tmp_path / "other.db"))
    try:
        with pytest.raises(Exception, match="--backup-password-file"):
            write_backup(other, tmp_path / "b.smbackup")
        assert not (tmp_path / "b.smbackup").exists()
    finally:
        other.close()


def test_secret_values_stay_redacted_in_backup_objects(backup: Backup) -> None:
    text = repr(backup) + repr(backup.secrets) + repr(backup.summary)
    for values in VALUES.values():
        for value in values:
            if value:
                assert repr(value)[2:-1] not in text


def test_reading_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        read_backup(tmp_path / "nothing.smbackup", b"pw")


def test_removing_store_files_where_none_can_be_is_quiet(tmp_path: Path) -> None:
    """The cleanup after a failed create: under a regular file (NotADirectoryError) or with a name
    too long for the file system there is nothing to remove, and no OSError to mask the cause."""
    (tmp_path / "file.txt").write_text("x")
    remove_store_files(tmp_path / "file.txt" / "store.db")
    remove_store_files(tmp_path / ("a" * 300 + ".db"))
    assert (tmp_path / "file.txt").read_text() == "x"


def test_a_store_copy_keeps_the_rotation_target_of_a_pending_version_restored_into_a_store(
    tmp_path: Path,
) -> None:
    """A pending version records what its rotation staged it for (the PostgreSQL role a resume
    sets it at): a store copy (kind `store`) holds it in the version's metadata, and a fresh
    restore kept it byte for byte, but one into an existing store (ours, or another store through
    the protocol) staged the pending value with none, so a bare `rotate --resume` was refused
    and one naming another role only warned. It is staged with its target now. (A password
    backup's lines have no member for it.) Fails on the old code (target None)."""
    source = new_store(tmp_path / "source.db")
    try:
        source.put("svc/DB", b"db-ONE")
        source.stage("svc/DB", b"db-STAGED", target="postgres-role:app")
        write_backup(source, tmp_path / "copy.smbackup")
    finally:
        source.close()
    backup = read_backup(tmp_path / "copy.smbackup", b"target password")
    _restores_the_target(backup, tmp_path)


def test_a_password_backup_keeps_the_rotation_target_of_a_pending_version(tmp_path: Path) -> None:
    """A password backup's lines had no member for a version's rotation target: restored, the
    pending version recorded none, so a bare `rotate --resume` could not name the role and one
    naming another role only warned. Format version 3 carries it (docs/backup-format.md §7.3, §14);
    a backup without one is still written as version 1, for older readers. Fails on the old code."""
    source = new_store(tmp_path / "source.db")
    try:
        source.put("svc/DB", b"db-ONE")
        write_backup(source, tmp_path / "plain.smbackup", password=b"backup pw", kdf=kdf.TEST)
        source.stage("svc/DB", b"db-STAGED", target="postgres-role:app")
        write_backup(source, tmp_path / "pw.smbackup", password=b"backup pw", kdf=kdf.TEST)
        protocol = ProtocolOnly(source)  # read through the SecretStore protocol, as Vault or AWS are
        write_backup(protocol, tmp_path / "protocol.smbackup", password=b"backup pw", kdf=kdf.TEST)
    finally:
        source.close()
    assert (tmp_path / "plain.smbackup").read_bytes().startswith(b"secrets-manager-backup/v1\n")
    for name in ("pw.smbackup", "protocol.smbackup"):
        assert (tmp_path / name).read_bytes().startswith(b"secrets-manager-backup/v3\n")
        backup = read_backup(tmp_path / name, b"backup pw")
        restore_fresh(backup, tmp_path / f"fresh-{name}.db")
        fresh = EncryptedStore.open(
            SqliteStorage(tmp_path / f"fresh-{name}.db"), PasswordUnlock("new master", kdf.TEST)
        )
        try:
            assert fresh.get("svc/DB", label=PENDING).target == "postgres-role:app"
        finally:
            fresh.close()
        _restores_the_target(backup, tmp_path / name.split(".")[0])


def test_a_finished_rotations_target_does_not_make_a_password_backup_version_3(tmp_path: Path) -> None:
    """A version keeps its rotation target after the rotation promoted it, and a password backup
    wrote it, so after any PostgreSQL role rotation every such backup was version 3, which builds
    before it refuse. Only a pending version's target is used (a resume checks it), so only that
    one is written."""
    store = new_store(tmp_path / "store.db")
    try:
        store.put("svc/DB", b"db-ONE")
        store.promote("svc/DB", store.stage("svc/DB", b"db-TWO", target="postgres-role:app").version)
        write_backup(store, tmp_path / "pw.smbackup", password=b"backup pw", kdf=kdf.TEST)
    finally:
        store.close()
    assert (tmp_path / "pw.smbackup").read_bytes().startswith(b"secrets-manager-backup/v1\n")
    backup = read_backup(tmp_path / "pw.smbackup", b"backup pw")
    assert [v.target for v in backup.secrets[0].versions] == [None, None]


def _restores_the_target(backup: Backup, directory: Path) -> None:
    """`backup`'s svc/DB, restored into existing stores (ours, and another through the protocol),
    is pending db-STAGED for postgres-role:app, its current version with no target."""
    directory.mkdir(exist_ok=True)
    for target in (new_store(directory / "into.db"), ProtocolOnly(new_store(directory / "other.db"))):
        try:
            restore_into(target, backup.secrets)
            pending = target.get("svc/DB", label=PENDING)
            assert (pending.value.reveal(), pending.target) == (b"db-STAGED", "postgres-role:app")
            assert target.get("svc/DB").target is None
        finally:
            target.close()
