"""Recovery shares (store/recovery.py, cli/recovery_commands.py, docs/format.md 4.6): any K of N
SLIP-0039 shares open a store whose master password or KMS key is lost, to set a new one.

In process: the round trip with every K-subset, shares that outlive root key rotation and password
changes, shares of another or a replaced set, too few or mistyped shares (messages never quote a
word), a doctored header (a root key rotation seals to the authenticated public key, not the
header's), and backups of a store with a share set. Through the console script: the files, the
exit codes, stdin, the audit records, and a KMS store recovered with no AWS at all."""

from __future__ import annotations

import base64
import itertools
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.crypto.recovery import new_recovery_key, recovery_public_key, seal_to_recovery_key
from secrets_manager.environment import Environment
from secrets_manager.errors import IntegrityError, InvalidInputError, NotFoundError, UnlockError
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store import recovery as rec
from secrets_manager.store.backup import read_backup, write_backup
from secrets_manager.store.keys import rotate_root_key
from secrets_manager.store.restore import restore_new_store

VALUE = b"recovery-test-SEEKRIT"
NEW_PASSWORD = b"the new master password"


def _shares(store: EncryptedStore, *, threshold: int = 3, shares: int = 5) -> rec.NewShares:
    new = rec.make_recovery_shares(threshold=threshold, shares=shares)
    rec.install_recovery(store, new)
    return new


def _recover(path: Path, mnemonics: list[str]) -> EncryptedStore:
    storage = SqliteStorage(path)
    try:
        return rec.recover_root(storage, mnemonics)
    except BaseException:
        storage.close()
        raise


def quotes_a_share(text: str, mnemonics: Sequence[str]) -> bool:
    """Whether `text` holds three consecutive words of a share (single words are no evidence: the
    SLIP-0039 word list has common English words such as "any" and "open")."""
    flat = " ".join(text.lower().split())
    for mnemonic in mnemonics:
        words = mnemonic.split()
        if any(" ".join(words[i : i + 3]) in flat for i in range(len(words) - 2)):
            return True
    return False


def _header(path: Path) -> dict[str, Any]:
    with sqlite3.connect(path) as db:
        (raw,) = db.execute("SELECT value FROM entries WHERE key = 'core/header'").fetchone()
    return dict(json.loads(raw))


def _write_header(path: Path, header: dict[str, Any]) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET value = ? WHERE key = 'core/header'", (json.dumps(header).encode(),))


def test_any_threshold_of_the_shares_opens_the_store_and_sets_a_new_password(
    encrypted_store: EncryptedStore, tmp_store_path: Path, open_store: Any
) -> None:
    encrypted_store.put("auth/DB_PASSWORD", VALUE)
    new = _shares(encrypted_store)
    for subset in itertools.combinations(new.mnemonics, 3):
        recovered = _recover(tmp_store_path, list(subset))
        assert recovered.get("auth/DB_PASSWORD").value.reveal() == VALUE
        recovered.close()
    recovered = _recover(tmp_store_path, [new.mnemonics[4], new.mnemonics[0], new.mnemonics[2]])
    recovered.change_unlock(PasswordUnlock(NEW_PASSWORD, kdf.TEST))
    recovered.close()
    with pytest.raises(UnlockError):
        open_store()  # the old password
    reopened = open_store(password=NEW_PASSWORD.decode())
    assert reopened.get("auth/DB_PASSWORD").value.reveal() == VALUE
    assert rec.recovery_setup(reopened) == new.setup  # the shares still open it


def test_shares_outlive_root_key_rotations_and_password_changes(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    encrypted_store.put("auth/DB_PASSWORD", VALUE)
    new = _shares(encrypted_store, threshold=2, shares=3)
    first_root = _header(tmp_store_path)["root_key_id"]
    rotate_root_key(encrypted_store)
    encrypted_store.change_password(b"another password")
    rotate_root_key(encrypted_store)
    header = _header(tmp_store_path)
    assert header["root_key_id"] != first_root
    assert header["recovery"]["root_key_id"] == header["root_key_id"]
    recovered = _recover(tmp_store_path, list(new.mnemonics[1:]))
    assert recovered.get("auth/DB_PASSWORD").value.reveal() == VALUE
    recovered.close()


def test_too_few_mistyped_repeated_or_foreign_shares_are_refused_without_quoting_a_word(
    encrypted_store: EncryptedStore, tmp_store_path: Path, tmp_path: Path
) -> None:
    new = _shares(encrypted_store)
    first = new.mnemonics[0].split()
    typo = " ".join([*first[:10], "zzzz" if first[10] != "zzzz" else "yyyy", *first[11:]])
    swapped = " ".join([*first[:10], first[11], first[10], *first[12:]])
    cases: list[tuple[list[str], type[Exception], str]] = [
        (list(new.mnemonics[:2]), InvalidInputError, "2 recovery share(s) given; this set needs 3"),
        ([typo, *new.mnemonics[1:3]], InvalidInputError, "share 1: not a valid recovery share"),
        ([new.mnemonics[1], swapped, new.mnemonics[2]], InvalidInputError, "share 2: not a valid"),
        ([new.mnemonics[0], new.mnemonics[0], new.mnemonics[1]], InvalidInputError, "given twice"),
        ([], InvalidInputError, "no recovery shares given"),
    ]
    other_storage = SqliteStorage(tmp_path / "other.db", create=True)
    other = EncryptedStore.create(other_storage, PasswordUnlock("x", kdf.TEST))
    foreign = _shares(other)
    other.close()
    cases.append((list(foreign.mnemonics[:3]), UnlockError, f"set {foreign.setup.identifier:05d}"))
    cases.append(([new.mnemonics[0], *foreign.mnemonics[:2]], InvalidInputError, "another set"))
    before = tmp_store_path.read_bytes()
    for mnemonics, error, message in cases:
        with pytest.raises(error) as caught:
            _recover(tmp_store_path, mnemonics)
        assert message in str(caught.value)
        assert not quotes_a_share(str(caught.value), new.mnemonics), str(caught.value)
    assert tmp_store_path.read_bytes() == before


def test_a_replaced_set_no_longer_opens_and_replacing_must_be_asked_for(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    old = _shares(encrypted_store)
    with pytest.raises(InvalidInputError, match="--replace"):
        rec.install_recovery(encrypted_store, rec.make_recovery_shares(threshold=2, shares=2))
    assert rec.recovery_setup(encrypted_store) == old.setup
    new = rec.make_recovery_shares(threshold=2, shares=2)
    rec.install_recovery(encrypted_store, new, replace=True)
    assert rec.recovery_setup(encrypted_store) == new.setup
    if old.setup.identifier != new.setup.identifier:  # 15-bit identifiers: 1 in 32768 collide
        with pytest.raises(UnlockError, match="set"):
            _recover(tmp_store_path, list(old.mnemonics[:3]))
    header = _header(tmp_store_path)
    header["recovery"]["identifier"] = old.setup.identifier  # so the check reaches the seal itself
    _write_header(tmp_store_path, header)
    with pytest.raises(UnlockError, match="do not open this store"):
        _recover(tmp_store_path, list(old.mnemonics[:3]))
    header["recovery"]["identifier"] = new.setup.identifier
    _write_header(tmp_store_path, header)
    _recover(tmp_store_path, list(new.mnemonics)).close()


def test_removed_shares_no_longer_open_the_store(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    new = _shares(encrypted_store)
    assert rec.remove_recovery(encrypted_store) == new.setup
    assert rec.recovery_setup(encrypted_store) is None
    assert "recovery" not in _header(tmp_store_path)
    with pytest.raises(NotFoundError, match="no recovery shares"):
        _recover(tmp_store_path, list(new.mnemonics[:3]))
    with pytest.raises(NotFoundError):
        rec.remove_recovery(encrypted_store)


def test_a_rotation_seals_to_the_authenticated_public_key_not_the_headers(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    """Storage that puts its own public key in the header must not get the next root key: the
    rotation reads the public key from core/recovery, which only the root key opens."""
    encrypted_store.put("auth/DB_PASSWORD", VALUE)
    new = _shares(encrypted_store)
    attacker = new_recovery_key()
    header = _header(tmp_store_path)
    header["recovery"]["sealed_root_key"] = base64.b64encode(
        seal_to_recovery_key(recovery_public_key(attacker), b"\0" * 32, b"anything")
    ).decode()
    _write_header(tmp_store_path, header)
    with pytest.raises(UnlockError):
        _recover(tmp_store_path, list(new.mnemonics[:3]))  # the doctored seal does not open
    rotate_root_key(encrypted_store)
    sealed = base64.b64decode(_header(tmp_store_path)["recovery"]["sealed_root_key"])
    with pytest.raises(IntegrityError):  # nothing in the new header opens with the attacker's key
        rec.open_with_recovery_key(attacker, sealed, b"")
    recovered = _recover(tmp_store_path, list(new.mnemonics[2:]))
    assert recovered.get("auth/DB_PASSWORD").value.reveal() == VALUE
    recovered.close()


def test_a_header_naming_another_root_key_or_a_missing_record_is_damage(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    new = _shares(encrypted_store)
    header = _header(tmp_store_path)
    header["recovery"]["root_key_id"] += 1
    _write_header(tmp_store_path, header)
    with pytest.raises(IntegrityError):
        _recover(tmp_store_path, list(new.mnemonics[:3]))
    header["recovery"]["root_key_id"] -= 1
    _write_header(tmp_store_path, header)
    with sqlite3.connect(tmp_store_path) as db:
        db.execute("DELETE FROM entries WHERE key = 'core/recovery'")
    with pytest.raises(IntegrityError):
        _recover(tmp_store_path, list(new.mnemonics[:3]))


def test_the_recovery_key_is_never_stored(
    encrypted_store: EncryptedStore, tmp_store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[bytes] = []

    def remembered() -> bytes:
        made.append(new_recovery_key())
        return made[-1]

    monkeypatch.setattr(rec, "new_recovery_key", remembered)
    new = _shares(encrypted_store)
    encrypted_store.close()
    files = b"".join(
        p.read_bytes() for p in tmp_store_path.parent.iterdir() if p.name.startswith(tmp_store_path.name)
    )
    (private_key,) = made
    assert private_key not in files and base64.b64encode(private_key) not in files
    assert not any(m.split()[5].encode() + b" " + m.split()[6].encode() in files for m in new.mnemonics)


def test_a_backup_of_a_store_with_shares_restores_with_its_shares(
    encrypted_store: EncryptedStore, tmp_path: Path, store_password: str
) -> None:
    """A copy of the store (kind `store`) keeps its root key, so its shares open the copy too; a
    backup under its own password makes a new store (new root key, no shares)."""
    encrypted_store.put("auth/DB_PASSWORD", VALUE)
    new = _shares(encrypted_store)
    copy, logical = tmp_path / "copy.smbackup", tmp_path / "logical.smbackup"
    write_backup(encrypted_store, copy)
    write_backup(encrypted_store, logical, password=b"backup password", kdf=kdf.TEST)
    for backup, password, path in (
        (copy, store_password.encode(), tmp_path / "from-copy" / "secrets.db"),
        (logical, b"backup password", tmp_path / "from-logical" / "secrets.db"),
    ):
        restore_new_store(
            read_backup(backup, password),
            str(path),
            password=b"restored password",
            kdf_profile="test",
            environment=Environment.DEVELOPMENT,
            actor="t",
        )
    recovered = _recover(tmp_path / "from-copy" / "secrets.db", list(new.mnemonics[:3]))
    assert recovered.get("auth/DB_PASSWORD").value.reveal() == VALUE
    recovered.close()
    with pytest.raises(NotFoundError, match="no recovery shares"):
        _recover(tmp_path / "from-logical" / "secrets.db", list(new.mnemonics[:3]))
