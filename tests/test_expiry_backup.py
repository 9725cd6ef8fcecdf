"""Credential expiry in backups: a store copy and a password backup keep it (a password backup from
Vault into AWS: test_expiry_store.py, beside those stores' fixtures); a
backup with one is format version 2, which a reader of version 1 refuses with "upgrade"."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store import backup as backup_module
from secrets_manager.store.backup import BackupVersionError, read_backup, write_backup
from secrets_manager.store.restore import restore_into

EXPIRES = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
NAME = "market-connector/BINANCE_API_KEY"
BACKUP_PASSWORD = b"off-site backup password"


def test_a_store_copy_restores_the_expiry(
    encrypted_store: EncryptedStore, tmp_path: Path, store_password: str
) -> None:
    encrypted_store.put(NAME, b"v1", expires=EXPIRES)
    encrypted_store.put("auth/DB_PASSWORD", b"pw")
    write_backup(encrypted_store, tmp_path / "copy.smbackup")
    assert (tmp_path / "copy.smbackup").read_bytes().startswith(b"secrets-manager-backup/v1\n")
    backup = read_backup(tmp_path / "copy.smbackup", store_password.encode())
    target = EncryptedStore.create(
        SqliteStorage(tmp_path / "t.db", create=True), PasswordUnlock("t", kdf.TEST)
    )
    try:
        restore_into(target, backup.secrets)
        assert target.describe(NAME).expires == EXPIRES
        assert target.describe("auth/DB_PASSWORD").expires is None
    finally:
        target.close()


def test_a_password_backup_without_expiries_stays_version_1(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    encrypted_store.put(NAME, b"v1", expires=EXPIRES)
    encrypted_store.put(NAME, b"v2")  # version 1's expiry is still kept: the backup has it
    encrypted_store.put("auth/OTHER", b"x")
    write_backup(encrypted_store, tmp_path / "with.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    assert (tmp_path / "with.smbackup").read_bytes().startswith(b"secrets-manager-backup/v2\n")
    encrypted_store.destroy_secret(NAME)
    write_backup(encrypted_store, tmp_path / "without.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    assert (tmp_path / "without.smbackup").read_bytes().startswith(b"secrets-manager-backup/v1\n")


def test_an_older_reader_asks_for_an_upgrade_for_a_backup_with_an_expiry(
    encrypted_store: EncryptedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build before expiries reads version 1 only: it says "upgrade", not "damaged"."""
    encrypted_store.put(NAME, b"v1", expires=EXPIRES)
    write_backup(encrypted_store, tmp_path / "b.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    v1 = backup_module.VERSION_LINE_PREFIX + b"1\n"
    monkeypatch.setattr(backup_module, "VERSION_LINES", {v1: 1})
    monkeypatch.setattr(backup_module, "FORMAT_VERSION", 1)
    with pytest.raises(BackupVersionError, match="upgrade secrets-manager"):
        read_backup(tmp_path / "b.smbackup", BACKUP_PASSWORD)


def test_an_expiry_in_a_version_1_file_is_damage(encrypted_store: EncryptedStore, tmp_path: Path) -> None:
    """Version 1 content has exactly the members it had: `expires` there is not read as one."""
    encrypted_store.put(NAME, b"v1", expires=EXPIRES)
    write_backup(encrypted_store, tmp_path / "b.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    secrets = read_backup(tmp_path / "b.smbackup", BACKUP_PASSWORD).secrets
    assert secrets[0].versions[0].expires == EXPIRES.timestamp()
    doc = backup_module._secret_doc(secrets[0])
    with pytest.raises(ValueError, match="expires"):
        backup_module._secret_from_doc(doc)  # as a version 1 file's line
    assert backup_module._secret_from_doc(doc, expiries=True) == secrets[0]
