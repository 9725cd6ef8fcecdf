"""Recovery shares (store/recovery.py, cli/recovery_commands.py, docs/format.md 4.6): any K of N
SLIP-0039 shares open a store whose master password or KMS key is lost, to set a new one.

In process: the round trip with every K-subset, shares that outlive root key rotation and password
changes, shares of another or a replaced set, too few or mistyped shares (messages never quote a
word), a doctored header (a root key rotation seals to the authenticated public key, not the
header's), and backups of a store with a share set. Through the console script: the files, the
exit codes, stdin, the audit records, and a KMS store recovered with no AWS at all."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import pty
import select
import sqlite3
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import shamir_mnemonic

from secrets_manager.crypto import kdf
from secrets_manager.crypto.recovery import new_recovery_key, recovery_public_key, seal_to_recovery_key
from secrets_manager.environment import Environment
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnlockError,
)
from secrets_manager.storage import Entry
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store import recovery as rec
from secrets_manager.store.backup import read_backup, write_backup
from secrets_manager.store.keys import rotate_root_key
from secrets_manager.store.restore import restore_new_store
from service_fixtures import SCRIPT, run_script

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


def _store_files(path: Path) -> bytes:
    """The store file and its SQLite companions (WAL, shared memory), as bytes."""
    return b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))


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


def test_a_recovery_unlock_with_refuses_to_undo_a_password_set_since_the_shares_opened_the_store(
    encrypted_store: EncryptedStore, tmp_store_path: Path, open_store: Any
) -> None:
    new = _shares(encrypted_store, threshold=2, shares=3)
    first, second = (
        _recover(tmp_store_path, list(new.mnemonics[:2])),
        _recover(tmp_store_path, list(new.mnemonics[1:])),
    )
    try:
        first.change_unlock(PasswordUnlock(NEW_PASSWORD, kdf.TEST))
        with pytest.raises(ConflictError, match="another process changed what unlocks the store"):
            second.change_unlock(PasswordUnlock(b"another new password", kdf.TEST))
    finally:
        first.close()
        second.close()
    assert open_store(password=NEW_PASSWORD.decode())


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
        (
            [new.mnemonics[1], new.mnemonics[0], new.mnemonics[1]],
            InvalidInputError,
            "share 3 is the same recovery share as share 1",
        ),
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


def test_an_altered_share_is_named_or_passed_over_when_the_others_suffice(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    """A share changed so that its checksum still holds (re-encoded with another value): among
    exactly `threshold` shares it is refused as altered; beside a share of the same number it is
    named; among more shares than the threshold the others open the store."""
    new = _shares(encrypted_store)
    honest = shamir_mnemonic.Share.from_mnemonic(new.mnemonics[0])
    altered = dataclasses.replace(honest, value=bytes(b ^ 0x5A for b in honest.value)).mnemonic()
    assert shamir_mnemonic.Share.from_mnemonic(altered).index == honest.index  # its checksum holds
    with pytest.raises(InvalidInputError, match="one of them was altered") as caught:
        _recover(tmp_store_path, [altered, *new.mnemonics[1:3]])
    assert "same share number" not in str(caught.value)
    with pytest.raises(InvalidInputError, match="shares 1 and 4 hold the same share number"):
        _recover(tmp_store_path, [new.mnemonics[0], *new.mnemonics[1:3], altered])
    _recover(tmp_store_path, [altered, *new.mnemonics[1:4]]).close()  # 3 good ones of 4 given


def test_a_replaced_set_no_longer_opens_and_replacing_must_be_asked_for(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    old = _shares(encrypted_store)
    with pytest.raises(InvalidInputError, match="--replace"):
        rec.install_recovery(encrypted_store, rec.make_recovery_shares(threshold=2, shares=2))
    assert rec.recovery_setup(encrypted_store) == old.setup
    old_seal = _header(tmp_store_path)["recovery"]["sealed_root_key"].encode()
    new = rec.make_recovery_shares(threshold=2, shares=2)
    rec.install_recovery(encrypted_store, new, replace=True)
    assert rec.recovery_setup(encrypted_store) == new.setup
    assert old_seal not in _store_files(tmp_store_path)  # erased from the file and its WAL too
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


def test_a_replace_that_lost_a_race_installs_nothing(encrypted_store: EncryptedStore) -> None:
    """Two operators run 'recovery init --replace' at once: the second must not also succeed
    (one of the two handed-out sets would not work)."""
    first = _shares(encrypted_store)
    mine, theirs = (rec.make_recovery_shares(threshold=2, shares=2) for _ in range(2))
    rec.install_recovery(encrypted_store, theirs, replace=True, expected=first.setup)
    with pytest.raises(ConflictError, match="changed the store's share set meanwhile"):
        rec.install_recovery(encrypted_store, mine, replace=True, expected=first.setup)
    assert rec.recovery_setup(encrypted_store) == theirs.setup


def test_status_reports_a_damaged_header_section_and_a_root_rotation_mends_it(cli: Cli) -> None:
    cli.make_shares(2, 2)
    header = cli.header()
    del header["recovery"]
    _write_header(cli.store, header)
    status = cli.with_password("recovery", "status")
    assert status.returncode == 6 and b"keys rotate --root" in status.stderr
    assert cli.with_password("keys", "rotate", "--root").returncode == 0
    assert cli.with_password("recovery", "status").returncode == 0
    args = [a for p in cli.share_files() for a in ("--share-file", str(p))]
    reset = cli(
        "recovery", "unlock-with", "password", *args, "--new-password-file", str(cli.new_password_file)
    )
    assert reset.returncode == 0, reset.stderr


def test_removed_shares_no_longer_open_the_store(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    new = _shares(encrypted_store)
    seal = _header(tmp_store_path)["recovery"]["sealed_root_key"].encode()
    assert seal in _store_files(tmp_store_path)
    assert rec.remove_recovery(encrypted_store) == new.setup
    assert seal not in _store_files(tmp_store_path)
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


def _delete_entry(path: Path, key: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM entries WHERE key = ?", (key,))


def _flip_last_bit(path: Path, key: str) -> None:
    with sqlite3.connect(path) as db:
        (value,) = db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        db.execute(
            "UPDATE entries SET value = ? WHERE key = ?", (bytes(value[:-1]) + bytes([value[-1] ^ 1]), key)
        )


@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_a_header_section_whose_record_is_gone_or_damaged_is_damage_not_no_shares(
    damage: str, encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    """Not "no shares": a root rotation would drop the section for good. `recovery remove` is the
    way out (with a new set after it), besides restoring a backup."""
    encrypted_store.put("auth/DB_PASSWORD", VALUE)
    new = _shares(encrypted_store)
    if damage == "deleted":
        _delete_entry(tmp_store_path, "core/recovery")
        named = "the recovery record (core/recovery) is missing"
    else:
        _flip_last_bit(tmp_store_path, "core/recovery")
        named = "the store's recovery record (core/recovery) is damaged"
    header = _header(tmp_store_path)
    for operation in (lambda: rec.recovery_setup(encrypted_store), lambda: rotate_root_key(encrypted_store)):
        with pytest.raises(IntegrityError) as caught:
            operation()
        assert named in str(caught.value) and "recovery remove" in str(caught.value)
    assert _header(tmp_store_path) == header  # the rotation was refused: the section is kept
    with pytest.raises(IntegrityError, match="integrity check failed"):
        _recover(tmp_store_path, list(new.mnemonics[:3]))
    assert rec.remove_recovery(encrypted_store) is None
    assert "recovery" not in _header(tmp_store_path)
    assert rec.recovery_setup(encrypted_store) is None
    rotate_root_key(encrypted_store)
    again = _shares(encrypted_store)
    recovered = _recover(tmp_store_path, list(again.mnemonics[:3]))
    assert recovered.get("auth/DB_PASSWORD").value.reveal() == VALUE
    recovered.close()


def test_a_set_removed_while_it_is_read_is_no_damage(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    """`recovery remove` commits between the header's read and the record's: no shares, not damage."""
    _shares(encrypted_store)

    class Raced(SqliteStorage):
        def get(self, key: str) -> Entry | None:
            if key == "core/recovery" and not raced:
                raced.append(True)
                rec.remove_recovery(encrypted_store)
            return super().get(key)

    raced: list[bool] = []
    reader = EncryptedStore(Raced(tmp_store_path), encrypted_store._root)
    try:
        assert rec.recovery_setup(reader) is None
        assert raced
    finally:
        reader.close()


def test_cli_reports_a_lost_recovery_record_refuses_a_root_rotation_and_remove_mends_it(cli: Cli) -> None:
    cli.make_shares(2, 2)
    _delete_entry(cli.store, "core/recovery")
    header = cli.header()
    for args in (("recovery", "status"), ("status",), ("keys", "rotate", "--root")):
        proc = cli.with_password(*args)
        assert proc.returncode == 6, (args, proc.stderr)
        assert b"(core/recovery) is missing" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert cli.header() == header
    removed = cli.with_password("recovery", "remove")
    assert removed.returncode == 0 and b"damaged recovery share set" in removed.stderr
    status = cli.with_password("recovery", "status")
    assert status.returncode == 0 and b"no recovery shares" in status.stderr


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
    files = _store_files(tmp_store_path)
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


# ---- the console script --------------------------------------------------------------------------


class Cli:
    """The console script on one store, with the master password in a file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(exist_ok=True)
        self.store = directory / "store.db"
        self.password_file = directory / "password.txt"
        self.password_file.write_text("the old password\n")
        self.new_password_file = directory / "new-password.txt"
        self.new_password_file.write_bytes(NEW_PASSWORD + b"\n")
        self.shares_dir = directory / "shares"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(directory),
            "SECRETS_MANAGER_STORE": str(self.store),
        }

    def __call__(
        self, *args: str, input: bytes = b"", env: Mapping[str, str | None] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """The command with `env` over the fixture's environment (a None value unsets one)."""
        return run_script(self.env, *args, input=input, env=env)

    def with_password(self, *args: str, password: Path | None = None, input: bytes = b"") -> Any:
        return self("--password-file", str(password or self.password_file), *args, input=input)

    def make_shares(self, shares: int, threshold: int, *, password: bool = True) -> None:
        """`recovery init` into `shares_dir`; it must succeed."""
        args = ("recovery", "init", "--shares", str(shares), "--threshold", str(threshold))
        args += ("--out-dir", str(self.shares_dir))
        made = self.with_password(*args) if password else self(*args)
        assert made.returncode == 0, made.stderr

    def share_files(self) -> list[Path]:
        return sorted(self.shares_dir.iterdir())

    def mnemonics(self) -> list[str]:
        return [_mnemonic(p) for p in self.share_files()]

    def header(self) -> dict[str, Any]:
        return _header(self.store)

    def audit(self) -> list[dict[str, Any]]:
        path = self.dir / "store.audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def _mnemonic(path: Path) -> str:
    (line,) = [x for x in path.read_text().splitlines() if x and not x.startswith("#")]
    return line


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    assert c.with_password("init", "--kdf-profile", "test").returncode == 0
    assert c.with_password("store", "auth/DB_PASSWORD", input=VALUE).returncode == 0
    return c


def test_cli_init_writes_private_share_files_and_status_describes_the_set(cli: Cli) -> None:
    made = cli.with_password(
        "recovery", "init", "--shares", "5", "--threshold", "3", "--out-dir", str(cli.shares_dir)
    )
    assert made.returncode == 0, made.stderr
    files = cli.share_files()
    assert [p.name for p in files] == [f"recovery-share-{i}-of-5.txt" for i in range(1, 6)]
    assert stat.S_IMODE(cli.shares_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert all(len(_mnemonic(p).split()) == 33 for p in files)
    status = cli.with_password("recovery", "status", "--json")
    doc = json.loads(status.stdout)
    assert (doc["threshold"], doc["shares"]) == (3, 5)
    assert f"set {doc['set']:05d}" in files[0].read_text()
    mnemonics = cli.mnemonics()
    for proc in (made, status):
        assert not quotes_a_share((proc.stdout + proc.stderr).decode(), mnemonics)
    ops = [r["operation"] for r in cli.audit()]
    assert "recovery.init" in ops and "recovery.status" in ops
    assert not quotes_a_share((cli.dir / "store.audit.jsonl").read_text(), mnemonics)


# Loaded into the console script through PYTHONPATH: `recovery init` is killed (SIGKILL) just before
# or just after the store commits the new set, with its share files already written.
_KILLED_INIT = """
import os, signal
import secrets_manager.cli.recovery_commands as commands
_install = commands.install_recovery
def _killed(*args, **kwargs):
    if os.environ["KILL_INIT"] == "after":
        _install(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
commands.install_recovery = _killed
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_killed_cli_init_leaves_no_set_of_valid_looking_share_files_and_the_next_run_cleans_up(
    cli: Cli, when: str
) -> None:
    hook = cli.dir / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILLED_INIT)
    args = ("recovery", "init", "--shares", "3", "--threshold", "2", "--out-dir", str(cli.shares_dir))
    killed = cli(
        "--password-file", str(cli.password_file), *args, env={"PYTHONPATH": str(hook), "KILL_INIT": when}
    )
    assert killed.returncode == -9
    left = sorted(p.name for p in cli.shares_dir.iterdir())
    assert left == [f"recovery-share-{i}-of-3.txt.incomplete" for i in (1, 2, 3)]  # none looks finished
    installed = json.loads(cli.with_password("recovery", "status", "--json").stdout)
    assert (installed is None) == (when == "before")

    again = cli.with_password(*args)
    files = sorted(cli.shares_dir.iterdir())
    assert [p.name for p in files] == [f"recovery-share-{i}-of-3.txt" for i in (1, 2, 3)]
    if when == "before":  # the leftovers were of a set the store never had: removed, a new set made
        assert again.returncode == 0, again.stderr
        assert b"removed 3 share files" in again.stderr and b"never had their set" in again.stderr
    else:  # the store has the killed run's set: its files get their names, and init asks for --replace
        assert again.returncode == 2 and b"--replace" in again.stderr
        assert f"installed set {installed['set']:05d}:".encode() in again.stderr
    setup = json.loads(cli.with_password("recovery", "status", "--json").stdout)
    assert all(f"set {setup['set']:05d}," in p.read_text() for p in files)
    opened = cli(
        "recovery",
        "unlock-with",
        "password",
        "--share-file",
        str(files[0]),
        "--share-file",
        str(files[2]),
        "--new-password-file",
        str(cli.new_password_file),
        "--kdf-profile",
        "test",
    )
    assert opened.returncode == 0, opened.stderr


# `recovery init` killed (SIGKILL) while it gives its share files their final names, after the first.
_KILLED_RENAMING = """
import os, signal
import secrets_manager.cli.recovery_commands as commands
_move = commands.move_private_file
_moved = []
def _killed(source, target):
    if _moved:  # the second file: linked to its name, its *.incomplete name not removed yet
        os.link(source, target)
        os.kill(os.getpid(), signal.SIGKILL)
    _moved.append(_move(source, target))
commands.move_private_file = _killed
"""


def test_a_cli_init_killed_while_naming_its_share_files_is_finished_by_the_next_run(cli: Cli) -> None:
    """Killed after the store committed the set and the first file got its name (here as the
    second got it, its *.incomplete name not removed yet), a run left the other shares as
    *.incomplete files, which the docs call not shares yet. The next run, which
    should give them their names (README), refused first because share 1 existed ('move the old
    shares away'), so they stayed *.incomplete: deleted as such, the set could fall below its
    threshold, and the store's recovery with it."""
    hook = cli.dir / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILLED_RENAMING)
    args = ("recovery", "init", "--shares", "3", "--threshold", "2", "--out-dir", str(cli.shares_dir))
    killed = cli("--password-file", str(cli.password_file), *args, env={"PYTHONPATH": str(hook)})
    assert killed.returncode == -9
    left = sorted(p.name for p in cli.shares_dir.iterdir())
    assert left == [
        "recovery-share-1-of-3.txt",
        "recovery-share-2-of-3.txt",
        "recovery-share-2-of-3.txt.incomplete",
        "recovery-share-3-of-3.txt.incomplete",
    ]
    installed = json.loads(cli.with_password("recovery", "status", "--json").stdout)
    assert installed is not None

    again = cli.with_password(*args)
    assert again.returncode == 2 and b"--replace" in again.stderr, again.stderr
    assert f"installed set {installed['set']:05d}:".encode() in again.stderr
    files = sorted(cli.shares_dir.iterdir())
    assert [p.name for p in files] == [f"recovery-share-{i}-of-3.txt" for i in (1, 2, 3)]
    assert all(f"set {installed['set']:05d}," in p.read_text() for p in files)
    opened = cli(
        "recovery",
        "unlock-with",
        "password",
        "--share-file",
        str(files[1]),
        "--share-file",
        str(files[2]),
        "--new-password-file",
        str(cli.new_password_file),
        "--kdf-profile",
        "test",
    )
    assert opened.returncode == 0, opened.stderr


def test_cli_init_never_overwrites_share_files_and_asks_for_replace(cli: Cli) -> None:
    cli.shares_dir.mkdir(mode=0o700)
    (cli.shares_dir / "recovery-share-2-of-3.txt").write_text("someone's old share\n")
    refused = cli.with_password(
        "recovery", "init", "--shares", "3", "--threshold", "2", "--out-dir", str(cli.shares_dir)
    )
    assert refused.returncode == 2
    assert b"already holds recovery-share-2-of-3.txt" in refused.stderr
    assert (cli.shares_dir / "recovery-share-2-of-3.txt").read_text() == "someone's old share\n"
    assert json.loads(cli.with_password("recovery", "status", "--json").stdout) is None
    first = cli.dir / "first"
    assert (
        cli.with_password(
            "recovery", "init", "--shares", "2", "--threshold", "2", "--out-dir", str(first)
        ).returncode
        == 0
    )
    again = cli.with_password(
        "recovery", "init", "--shares", "2", "--threshold", "2", "--out-dir", str(cli.dir / "second")
    )
    assert again.returncode == 2 and b"--replace" in again.stderr
    assert not (cli.dir / "second").exists()  # refused before any share was written
    bad = cli.with_password(
        "recovery", "init", "--shares", "3", "--threshold", "4", "--out-dir", str(cli.dir / "x")
    )
    assert bad.returncode == 2 and b"--threshold 4 is more than --shares 3" in bad.stderr
    one = cli.with_password(
        "recovery", "init", "--shares", "3", "--threshold", "1", "--out-dir", str(cli.dir / "y")
    )
    assert one.returncode == 2 and b"every share the whole key" in one.stderr
    assert not (cli.dir / "y").exists()


def test_cli_unlock_with_sets_a_new_password_from_files_or_stdin(cli: Cli) -> None:
    cli.make_shares(3, 2)
    files = cli.share_files()
    reset = cli(
        "recovery", "unlock-with", "password", "--share-file", str(files[2]), "--share-file", str(files[0]),
        "--new-password-file", str(cli.new_password_file), "--kdf-profile", "test",
    )  # fmt: skip
    assert reset.returncode == 0, reset.stderr
    assert cli.with_password("get", "auth/DB_PASSWORD").returncode == 4  # the old password no longer opens
    got = cli.with_password("get", "auth/DB_PASSWORD", password=cli.new_password_file)
    assert got.returncode == 0 and got.stdout.rstrip(b"\n") == VALUE
    piped = "".join(p.read_text() for p in files[1:])  # the files' comment lines and all
    again = cli(
        "recovery", "unlock-with", "password", "--new-password-file", str(cli.password_file),
        "--kdf-profile", "test", input=piped.encode(),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert cli.with_password("get", "auth/DB_PASSWORD").returncode == 0
    records = [r for r in cli.audit() if r["operation"] == "recovery.unlock-with"]
    assert [r["outcome"] for r in records] == ["pending", "ok", "pending", "ok"]
    assert cli.with_password("audit", "verify").returncode == 0


def test_cli_unlock_with_bad_shares_gives_one_line_and_its_exit_code(cli: Cli, tmp_path: Path) -> None:
    cli.make_shares(3, 2)
    files = cli.share_files()
    mnemonics = cli.mnemonics()
    damaged = tmp_path / "damaged.txt"
    damaged.write_text(_mnemonic(files[0]).replace(" ", "  ", 1)[:-3] + "xyz\n")
    other = Cli(tmp_path / "other")
    assert other.with_password("init", "--kdf-profile", "test").returncode == 0
    other.make_shares(2, 2)
    before = cli.store.read_bytes()
    cases = [
        ([files[0]], 2, "1 recovery share(s) given; this set needs 2"),
        ([damaged, files[1]], 2, "share 1: not a valid recovery share"),
        ([tmp_path / "missing.txt"], 2, "does not exist"),
        ([cli.password_file], 2, "share 1: not a valid recovery share"),
        (other.share_files(), 4, "this store's set is"),
    ]
    for share_files, code, message in cases:
        args = [a for p in share_files for a in ("--share-file", str(p))]
        proc = cli(
            "recovery", "unlock-with", "password", *args, "--new-password-file", str(cli.new_password_file)
        )
        assert proc.returncode == code, (share_files, proc.stderr)
        assert message.encode() in proc.stderr
        assert len(proc.stderr.decode().strip().splitlines()) == 1
        assert not quotes_a_share(proc.stderr.decode(), mnemonics)
    assert cli.store.read_bytes() == before
    denied = [r for r in cli.audit() if r["operation"] == "unlock" and r["decision"] == "deny"]
    assert len(denied) == 1  # the foreign set's shares, as a wrong password would be
    no_input = cli("recovery", "unlock-with", "password", "--new-password-file", str(cli.new_password_file))
    assert no_input.returncode == 2 and b"--share-file" in no_input.stderr
    kms_no_key = cli("recovery", "unlock-with", "kms", "--share-file", str(files[0]))
    assert kms_no_key.returncode == 2 and b"give the KMS key" in kms_no_key.stderr


def test_cli_remove_makes_the_shares_useless(cli: Cli) -> None:
    cli.make_shares(2, 2)
    removed = cli.with_password("recovery", "remove")
    assert removed.returncode == 0 and b"no longer open the store" in removed.stderr
    args = [a for p in cli.share_files() for a in ("--share-file", str(p))]
    proc = cli(
        "recovery", "unlock-with", "password", *args, "--new-password-file", str(cli.new_password_file)
    )
    assert proc.returncode == 3 and b"no recovery shares" in proc.stderr
    assert cli.with_password("recovery", "remove").returncode == 3


def test_a_kms_store_whose_key_is_gone_is_recovered_with_no_aws_at_all(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """The disaster recovery shares are for: the KMS key was deleted (here: no AWS reachable)."""
    import boto3

    aws = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    kms = boto3.client(
        "kms", region_name="eu-west-1", endpoint_url=moto_endpoint,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    key = kms.create_key()["KeyMetadata"]["Arn"]
    cli = Cli(tmp_path)
    cli.env.update(aws)
    assert cli("init", "--kms-key", key).returncode == 0
    assert cli("store", "auth/DB_PASSWORD", input=VALUE).returncode == 0
    cli.make_shares(3, 2, password=False)
    no_aws = {name: None for name in aws} | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    assert cli("get", "auth/DB_PASSWORD", env=no_aws).returncode != 0
    args = [a for p in cli.share_files()[:2] for a in ("--share-file", str(p))]
    reset = cli(
        "recovery", "unlock-with", "password", *args, "--new-password-file", str(cli.new_password_file),
        "--kdf-profile", "test", env=no_aws,
    )  # fmt: skip
    assert reset.returncode == 0, reset.stderr
    got = cli("--password-file", str(cli.new_password_file), "get", "auth/DB_PASSWORD", env=no_aws)
    assert got.returncode == 0 and got.stdout.rstrip(b"\n") == VALUE
    # And back to a (new) KMS key once AWS is there again: shares piped on stdin, no password.
    new_key = kms.create_key()["KeyMetadata"]["Arn"]
    piped = "\n".join(cli.mnemonics()[1:]).encode()
    to_kms = cli("recovery", "unlock-with", "kms", new_key, input=piped)
    assert to_kms.returncode == 0, to_kms.stderr
    assert cli("get", "auth/DB_PASSWORD").stdout.rstrip(b"\n") == VALUE
    assert cli.header()["unlock"]["key_arn"] == new_key


def test_cli_unlock_with_asks_for_each_share_on_the_terminal_without_echo(cli: Cli) -> None:
    cli.make_shares(3, 2)
    mnemonics = cli.mnemonics()
    args = ["recovery", "unlock-with", "password", "--new-password-file", str(cli.new_password_file)]
    args += ["--kdf-profile", "test"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pseudo-terminal
        try:
            os.execve(str(SCRIPT), [str(SCRIPT), *args], cli.env)  # noqa: S606 (our script, fixed args)
        finally:
            os._exit(127)  # never return into pytest in the child
    seen = b""
    try:
        for answer in (mnemonics[2], mnemonics[0]):
            seen += _read_until(terminal, b": ")
            os.write(terminal, answer.encode() + b"\n")
        seen += _read_until(terminal, None)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"Recovery share 1: " in seen and b"Recovery share 2 of 2: " in seen
    assert not quotes_a_share(seen.decode(errors="replace"), mnemonics)  # never echoed
    got = cli.with_password("get", "auth/DB_PASSWORD", password=cli.new_password_file)
    assert got.returncode == 0 and got.stdout.rstrip(b"\n") == VALUE


def _read_until(fd: int, marker: bytes | None, timeout: float = 60.0) -> bytes:
    """Read the terminal until `marker` has been seen (None: until the child closes it)."""
    deadline = time.monotonic() + timeout
    data = b""
    while marker is None or marker not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} on the terminal within {timeout} s: {data!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child exited and closed the terminal
            break
        if not chunk:
            break
        data += chunk
    return data


def test_a_postgresql_store_in_production_is_recovered_and_its_shares_outlive_a_root_rotation(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    cli = Cli(tmp_path)
    url = f"{postgres_cluster.url()}?schema={postgres_cluster.new_schema()}"
    cli.env.update({"SECRETS_MANAGER_STORE": url, "SHRIVENQUANT_ENV": "production", **postgres_cluster.env()})
    for path in (cli.password_file, cli.new_password_file):
        path.chmod(0o600)  # production refuses password files others can read
    assert cli.with_password("init").returncode == 0
    assert cli.with_password("store", "auth/DB_PASSWORD", input=VALUE).returncode == 0
    made = cli(
        "--store", postgres_cluster.url(with_password=True) + url[url.index("?") :],
        "--password-file", str(cli.password_file),
        "recovery", "init", "--shares", "3", "--threshold", "2", "--out-dir", str(cli.shares_dir),
        env={"SHRIVENQUANT_ENV": "development"},  # production refuses a password in the URL
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    share_text = cli.share_files()[0].read_text()
    assert postgres_cluster.env()["PGPASSWORD"] not in share_text  # the URL's password is not copied
    assert f"for {url[: url.index('?')]}" in share_text
    assert cli.with_password("keys", "rotate", "--root").returncode == 0
    args = [a for p in cli.share_files()[1:] for a in ("--share-file", str(p))]
    weak = cli(
        "recovery",
        "unlock-with",
        "password",
        *args,
        "--new-password-file",
        str(cli.new_password_file),
        "--kdf-profile",
        "test",
    )
    assert weak.returncode != 0 and b"too weak for production" in weak.stderr
    reset = cli(
        "recovery", "unlock-with", "password", *args, "--new-password-file", str(cli.new_password_file)
    )
    assert reset.returncode == 0, reset.stderr
    got = cli.with_password("get", "auth/DB_PASSWORD", password=cli.new_password_file)
    assert got.returncode == 0 and got.stdout.rstrip(b"\n") == VALUE
    assert cli.with_password("get", "auth/DB_PASSWORD").returncode == 4
    assert cli.with_password("audit", "verify", password=cli.new_password_file).returncode == 0


def test_shares_open_a_store_whose_password_and_audit_log_are_both_lost(cli: Cli) -> None:
    """A store copied to a new host without its log, its password forgotten: the shares accept
    the log's loss (audit reset) and then set a new password."""
    cli.make_shares(2, 2)
    args = [a for p in cli.share_files() for a in ("--share-file", str(p))]
    log = cli.dir / "store.audit.jsonl"
    log.rename(cli.dir / "lost.jsonl")
    new_password = ["--new-password-file", str(cli.new_password_file), "--kdf-profile", "test"]
    stopped = cli("recovery", "unlock-with", "password", *args, *new_password)
    assert stopped.returncode == 6 and b"--share-file too if the password is lost" in stopped.stderr
    assert cli("audit", "reset", "--accept-loss").returncode == 4  # no password anywhere
    reset = cli("audit", "reset", "--accept-loss", *args)
    assert reset.returncode == 0, reset.stderr
    assert cli("recovery", "unlock-with", "password", *args, *new_password).returncode == 0
    got = cli.with_password("get", "auth/DB_PASSWORD", password=cli.new_password_file)
    assert got.returncode == 0 and got.stdout.rstrip(b"\n") == VALUE
    assert [r["operation"] for r in cli.audit()][:1] == ["audit.reset"]
    assert cli.with_password("audit", "verify", password=cli.new_password_file).returncode == 0


def test_production_refuses_a_share_directory_others_may_only_read(tmp_path: Path) -> None:
    """--out-dir must be private in production, not only closed to writers: shares written into a
    0755 directory can be read by anyone who can list it before their own 0600 is set, and each
    is a part of the key to every secret. Mutant: refuse_open_directory's `readable` mask 0o077
    -> 0o022 (the one pki's --dir uses); the test above, with a 0777 directory, still passed."""
    cli = Cli(tmp_path)
    for path in (cli.password_file, cli.new_password_file):
        path.chmod(0o600)
    cli.env["SHRIVENQUANT_ENV"] = "production"
    assert cli.with_password("init").returncode == 0
    listed = tmp_path / "listed"
    listed.mkdir()
    listed.chmod(0o755)
    refused = cli.with_password(
        "recovery", "init", "--shares", "2", "--threshold", "2", "--out-dir", str(listed)
    )
    assert refused.returncode == 2 and b"can be read or written by group or others" in refused.stderr
    assert b"chmod 700" in refused.stderr and refused.stderr.count(b"\n") == 1
    assert not list(listed.iterdir())


def test_production_refuses_share_files_and_directories_others_can_read(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    for path in (cli.password_file, cli.new_password_file):
        path.chmod(0o600)
    cli.env["SHRIVENQUANT_ENV"] = "production"
    assert cli.with_password("init").returncode == 0  # the default Argon2id profile
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    refused = cli.with_password(
        "recovery", "init", "--shares", "2", "--threshold", "2", "--out-dir", str(open_dir)
    )
    assert refused.returncode == 2 and b"chmod 700" in refused.stderr
    assert not list(open_dir.iterdir())
    cli.make_shares(2, 2)
    readable = cli.share_files()[0]
    readable.chmod(0o644)
    args = [a for p in cli.share_files() for a in ("--share-file", str(p))]
    unlock = cli(
        "recovery", "unlock-with", "password", *args, "--new-password-file", str(cli.new_password_file)
    )
    assert unlock.returncode == 2 and f"chmod 600 {readable}".encode() in unlock.stderr
    readable.chmod(0o600)
    unlock = cli(
        "recovery", "unlock-with", "password", *args, "--new-password-file", str(cli.new_password_file)
    )
    assert unlock.returncode == 0, unlock.stderr
