"""`secrets-manager backup`, `backup verify` and `restore` through the real console script: round
trips, the documented exit codes with one-line errors for damaged, cut, wrong-password and newer
files (the target's bytes unchanged), existing stores, the file's mode, audit records, and quiet
output in a pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "backup cli test password"
BACKUP_PASSWORD = "a separate off-site password"
TIMEOUT = 120
SECRETS = {
    "svc/API_KEY": [b"sk-live-ONE-5b21c9", b"sk-live-TWO-a4e017"],
    "svc/DB": [b"db-password-7f0c3d"],
    "other/TOKEN": [b"token-VALUE-e81b44"],
}


@dataclass
class Result:
    code: int
    out: str
    stderr: str


class Cli:
    """Runs the console script against one store, detached from any terminal."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.store = tmp_path / "vault" / "store.db"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "SECRETS_MANAGER_STORE": str(self.store),
            "MASTER_PASSWORD": PASSWORD,
        }
        self.backup_password = tmp_path / "backup-password"
        self.backup_password.write_text(BACKUP_PASSWORD + "\n")

    def __call__(self, *args: str, env: Mapping[str, str | None] | None = None) -> Result:
        """The console script with this store's environment, changed by `env` (None: unset)."""
        merged = {**self.env, **(env or {})}
        proc = subprocess.run(
            [str(SCRIPT), *args],
            input=b"",
            capture_output=True,
            env={key: value for key, value in merged.items() if value is not None},
            start_new_session=True,
            timeout=TIMEOUT,
        )
        stderr = proc.stderr.decode("utf-8", errors="replace")
        assert "Traceback" not in stderr, stderr
        return Result(proc.returncode, proc.stdout.decode("utf-8"), stderr)

    def ok(self, *args: str) -> Result:
        result = self(*args)
        assert result.code == 0, (args, result.stderr)
        return result


def files_of(store: Path) -> dict[str, bytes]:
    """The store file and its companions (-wal, -shm, audit log), byte for byte."""
    if not store.parent.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(store.parent.iterdir())}


def entries(store: Path) -> dict[str, bytes]:
    """What a store holds, except the audit anchor, which every audited command moves."""
    db = sqlite3.connect(store)
    try:
        rows = db.execute("SELECT key, value FROM entries WHERE key != 'core/audit-anchor'").fetchall()
    finally:
        db.close()
    return {key: bytes(value) for key, value in rows}


def values_of(cli: Cli, store: Path) -> dict[str, list[str]]:
    """Every version's value of every secret, as `get --version` prints them."""
    found = {}
    for name in json.loads(cli.ok("--store", str(store), "list", "--json").out):
        history = json.loads(cli.ok("--store", str(store), "history", name["name"], "--json").out)
        found[name["name"]] = [
            cli.ok("--store", str(store), "get", name["name"], "--version", str(v["version"])).out
            for v in history["versions"]
        ]
    return found


def audit_operations(log: Path) -> list[tuple[str, str]]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [(r["operation"], r["outcome"]) for r in records]


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    assert result.code == code, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("secrets-manager: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A store (cheap Argon2id) with secrets in two namespaces, one of them with two versions."""
    cli = Cli(tmp_path)
    store = EncryptedStore.create(SqliteStorage(cli.store, create=True), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        store.audit_key()  # as init's audit record would
        for name, values in SECRETS.items():
            for value in values:
                store.put(name, value, description=f"about {name}")
    finally:
        store.close()
    return cli


@pytest.fixture
def copy_file(cli: Cli) -> Path:
    path = cli.tmp / "copy.smbackup"
    cli.ok("backup", str(path))
    return path


@pytest.fixture
def password_file(cli: Cli) -> Path:
    path = cli.tmp / "off-site.smbackup"
    cli.ok("backup", str(path), "--backup-password-file", str(cli.backup_password))
    return path


# ---- round trips -----------------------------------------------------------------------------------


def test_a_store_copy_restores_into_a_new_store_with_every_version(cli: Cli, copy_file: Path) -> None:
    target = cli.tmp / "restored" / "store.db"
    result = cli.ok("restore", str(copy_file), "--store", str(target))
    assert "restored 3 secrets (4 versions) into a new store" in result.stderr
    assert values_of(cli, target) == values_of(cli, cli.store)
    assert target.stat().st_mode & 0o777 == 0o600
    assert cli.ok("--store", str(target), "audit", "verify").out.startswith("audit log verified")


def test_a_password_backup_restores_into_a_new_store_under_the_master_password(
    cli: Cli, password_file: Path
) -> None:
    target = cli.tmp / "elsewhere" / "store.db"
    cli.ok(
        "restore",
        str(password_file),
        "--store",
        str(target),
        "--backup-password-file",
        str(cli.backup_password),
        "--kdf-profile",
        "test",
    )
    assert values_of(cli, target) == values_of(cli, cli.store)
    wrong = cli("--store", str(target), "get", "svc/DB", env={"MASTER_PASSWORD": BACKUP_PASSWORD})
    assert wrong.code == 4  # the backup password is not the new store's master password


def test_a_restore_into_an_initialised_empty_store_keeps_its_master_password(
    cli: Cli, copy_file: Path
) -> None:
    target = cli.tmp / "empty" / "store.db"
    own = {"MASTER_PASSWORD": "the empty store's own password"}
    assert cli("--store", str(target), "init", "--kdf-profile", "test", env=own).code == 0
    (cli.tmp / "source-password").write_text(PASSWORD)  # what opens the copy: its store's password
    args = (
        "restore",
        str(copy_file),
        "--store",
        str(target),
        "--backup-password-file",
        str(cli.tmp / "source-password"),
    )
    restored = cli(*args, env=own)
    assert restored.code == 0, restored.stderr
    assert "into the store" in restored.stderr
    got = cli("--store", str(target), "get", "svc/API_KEY", "--version", "1", env=own)
    assert got.out == "sk-live-ONE-5b21c9\n"


def test_a_missing_backup_password_file_exits_4_or_2_for_a_new_backup(cli: Cli, copy_file: Path) -> None:
    """Opening a backup with it is an unlock (4); making one with it, input (2: it was 4)."""
    result = cli("backup", "verify", str(copy_file), "--backup-password-file", str(cli.tmp / "nowhere"))
    assert_one_line_error(result, 4, "backup password file", "does not exist")
    made = cli("backup", str(cli.tmp / "new.smbackup"), "--backup-password-file", str(cli.tmp / "nowhere"))
    assert_one_line_error(made, 2, "backup password file", "does not exist")
    assert not (cli.tmp / "new.smbackup").exists()


def test_backup_help_shows_how_to_back_up(tmp_path: Path) -> None:
    """`backup --help` is where a user looks for `backup FILE`'s options, not `backup create --help`."""
    shown = Cli(tmp_path).ok("backup", "--help").out
    assert "Usage: secrets-manager backup FILE [--backup-password-file PATH] [--force]" in shown
    assert "secrets-manager backup verify FILE" in shown
    for option in ("--backup-password-file PATH", "--force", "--out FILE"):
        assert option in shown


def test_backup_out_is_the_same_as_file(cli: Cli) -> None:
    cli.ok("backup", "--out", str(cli.tmp / "out.smbackup"))
    assert "3 secrets" in cli.ok("backup", "verify", str(cli.tmp / "out.smbackup")).out


def test_verify_prints_the_counts_and_json(cli: Cli, copy_file: Path, password_file: Path) -> None:
    line = cli.ok("backup", "verify", str(copy_file)).out
    assert line.startswith(f"backup {copy_file} is intact and complete: 3 secrets (4 versions);")
    doc = json.loads(
        cli.ok(
            "backup",
            "verify",
            str(password_file),
            "--backup-password-file",
            str(cli.backup_password),
            "--json",
        ).out
    )
    assert (doc["kind"], doc["secrets"], doc["versions"], doc["deleted"]) == ("password", 3, 4, 0)


# ---- refused files: clear one-line errors, documented exit codes, target unchanged -------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flipped byte":
        middle = len(data) - 100
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :])
    elif how == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif how == "newer version":
        path.write_bytes(data.replace(b"secrets-manager-backup/v1\n", b"secrets-manager-backup/v4\n", 1))


REFUSALS = [
    ("flipped byte", 6, "is damaged: integrity check failed"),
    ("truncated", 6, "is damaged"),
    ("newer version", 2, "upgrade secrets-manager"),
]


@pytest.mark.parametrize(("how", "code", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_file_leaves_an_existing_target_unchanged(
    cli: Cli, copy_file: Path, how: str, code: int, message: str
) -> None:
    target = cli.tmp / "target" / "store.db"
    cli.ok("restore", str(copy_file), "--store", str(target))
    damage(copy_file, how)
    before = files_of(target)
    assert_one_line_error(
        cli("restore", str(copy_file), "--store", str(target), "--on-existing", "overwrite"), code, message
    )
    assert files_of(target) == before
    assert_one_line_error(cli("backup", "verify", str(copy_file)), code, message)


@pytest.mark.parametrize(("how", "code", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_file_creates_no_store(
    cli: Cli, password_file: Path, how: str, code: int, message: str
) -> None:
    damage(password_file, how)
    target = cli.tmp / "never" / "store.db"
    result = cli(
        "restore",
        str(password_file),
        "--store",
        str(target),
        "--backup-password-file",
        str(cli.backup_password),
    )
    assert_one_line_error(result, code, message)
    assert files_of(target) == {}


def test_a_store_given_as_the_backup_is_named_a_store_not_a_damaged_backup(cli: Cli) -> None:
    """The store itself (or another SQLite database) given to restore or backup verify was 'backup
    ... is damaged ... (use another copy)', exit 6: no copy of a backup was given at all."""
    other = cli.tmp / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()
    target = cli.tmp / "target" / "store.db"
    before = files_of(cli.store)
    store_says = (
        f"{cli.store} is a secrets-manager store, not a backup: give a file made by `secrets-manager backup`"
    )
    for args in (["backup", "verify", str(cli.store)], ["restore", str(cli.store), "--store", str(target)]):
        assert_one_line_error(cli(*args), 2, store_says)
    assert_one_line_error(
        cli("restore", str(cli.store), "--on-existing", "overwrite"),
        2,
        "is a secrets-manager store, not a backup",
    )
    assert_one_line_error(
        cli("backup", "verify", str(other)),
        2,
        f"{other} is an SQLite database, not a backup: give a file made by",
    )
    assert files_of(cli.store) == before
    assert files_of(target) == {}


def test_a_restore_under_a_regular_file_is_refused_naming_it(cli: Cli, copy_file: Path) -> None:
    """The parent is a file: the cleanup of the temporary store raised NotADirectoryError (an
    internal error) over the real problem."""
    blocker = cli.tmp / "file.txt"
    blocker.write_text("not a directory")
    target = blocker / "store.db"
    result = cli("restore", str(copy_file), "--store", str(target))
    assert_one_line_error(result, 2, f"cannot restore to {target}: {blocker} is not a directory")
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("kind", ["store copy", "backup password"])
def test_a_wrong_backup_password_exits_4_and_changes_nothing(
    cli: Cli, copy_file: Path, password_file: Path, kind: str
) -> None:
    wrong = cli.tmp / "wrong"
    wrong.write_text("not it")
    file = copy_file if kind == "store copy" else password_file
    before = files_of(cli.store)
    result = cli("restore", str(file), "--on-existing", "overwrite", "--backup-password-file", str(wrong))
    assert_one_line_error(result, 4, "wrong", "password")
    assert files_of(cli.store) == before
    assert_one_line_error(
        cli("backup", "verify", str(file), "--backup-password-file", str(wrong)), 4, "wrong"
    )


def test_a_password_backup_without_a_password_source_exits_4(cli: Cli, password_file: Path) -> None:
    result = cli("backup", "verify", str(password_file))
    assert_one_line_error(result, 4, "--backup-password-file")


def test_a_missing_file_exits_3(cli: Cli) -> None:
    assert_one_line_error(cli("backup", "verify", str(cli.tmp / "nothing")), 3, "no backup file")


# ---- existing stores and files ----------------------------------------------------------------------


def test_a_non_empty_store_is_refused_without_on_existing(cli: Cli, copy_file: Path) -> None:
    before = entries(cli.store)
    assert_one_line_error(cli("restore", str(copy_file)), 7, "not empty", "--on-existing")
    assert entries(cli.store) == before


def test_on_existing_fail_names_the_shared_names_in_good_english(cli: Cli, copy_file: Path) -> None:
    """The refusal said "1 name of the backup already exist in the target store" (a drill's
    restore into a store holding one of the backup's names); one name exists, two exist."""
    other = cli.tmp / "other" / "store.db"
    cli.ok("--store", str(other), "init", "--kdf-profile", "test")
    cli.ok("--store", str(other), "store", "svc/DB", "theirs")
    one = cli("restore", str(copy_file), "--store", str(other), "--on-existing", "fail")
    assert_one_line_error(one, 7, "1 name of the backup already exists in the target store (first: svc/DB)")
    cli.ok("--store", str(other), "store", "svc/API_KEY", "theirs too")
    two = cli("restore", str(copy_file), "--store", str(other), "--on-existing", "fail")
    assert_one_line_error(
        two, 7, "2 names of the backup already exist in the target store (first: svc/API_KEY)"
    )
    assert cli.ok("--store", str(other), "get", "svc/DB").out == "theirs\n"
    assert cli("--store", str(other), "get", "other/TOKEN").code == 3  # nothing restored


def test_on_existing_skip_restores_only_missing_names(cli: Cli, copy_file: Path) -> None:
    cli.ok("destroy", "svc/DB", "--all")
    cli.ok("store", "svc/API_KEY", "kept-NEWER")
    cli.ok("restore", str(copy_file), "--on-existing", "skip")
    assert cli.ok("get", "svc/DB").out == "db-password-7f0c3d\n"
    assert cli.ok("get", "svc/API_KEY").out == "kept-NEWER\n"


# ---- restore --name: one secret back from a backup, the rest of the store as it is --------------


def test_restore_name_brings_back_one_purged_secret_and_leaves_the_rest(cli: Cli, copy_file: Path) -> None:
    """What `git checkout BACKUP -- FILE` gives a `pass` user: a secret purged by mistake comes back
    with its whole history from last night's backup; a secret changed since keeps its new value, and
    a name purged on purpose since the backup stays purged (unlike `--on-existing skip`, which
    brings back every name the store no longer holds)."""
    cli.ok("store", "svc/API_KEY", "kept-NEWER")
    cli.ok("destroy", "svc/DB", "--all")
    cli.ok("destroy", "other/TOKEN", "--all")
    result = cli.ok("restore", str(copy_file), "--name", "svc/DB")
    assert "restored 1 secret (1 version)" in result.stderr
    records = audit_records(cli.store.with_name("store.audit.jsonl"))
    assert [(r["operation"], r["name"]) for r in records[-2:]] == [("restore", "svc/DB"), ("restore", None)]
    assert cli.ok("get", "svc/DB").out == "db-password-7f0c3d\n"
    assert json.loads(cli.ok("metadata", "svc/DB", "--json").out)["description"] == "about svc/DB"
    assert cli.ok("get", "svc/API_KEY").out == "kept-NEWER\n"
    assert cli("get", "other/TOKEN").code == 3


def test_restore_name_refuses_a_name_the_store_holds_unless_overwrite(cli: Cli, copy_file: Path) -> None:
    """An overwritten value: without --on-existing the name the store still holds is refused (exit
    7, nothing written); `--on-existing overwrite` puts that one secret back as the backup had it,
    and the other secrets keep what was written after the backup."""
    cli.ok("store", "svc/API_KEY", "OVERWRITTEN-by-mistake")
    cli.ok("store", "svc/DB", "rotated-after-the-backup")
    before = entries(cli.store)
    assert_one_line_error(
        cli("restore", str(copy_file), "--name", "svc/API_KEY"), 7, "svc/API_KEY", "--on-existing"
    )
    assert entries(cli.store) == before
    result = cli.ok("restore", str(copy_file), "--name", "svc/API_KEY", "--on-existing", "overwrite")
    assert result.out == "svc/API_KEY\toverwritten\n"
    assert cli.ok("get", "svc/API_KEY").out == "sk-live-TWO-a4e017\n"
    assert cli.ok("get", "svc/API_KEY", "--label", "previous").out == "sk-live-ONE-5b21c9\n"
    assert cli.ok("get", "svc/DB").out == "rotated-after-the-backup\n"
    assert cli.ok("get", "other/TOKEN").out == "token-VALUE-e81b44\n"


def test_restore_name_refuses_a_name_the_backup_lacks_and_a_missing_store(
    cli: Cli, password_file: Path
) -> None:
    """Mistyped names are exit 3 before anything is written, naming the name (a malformed one is
    exit 2, as everywhere); --name into a path with no store is exit 2 (it restores into an
    existing store) and creates nothing."""
    cli.ok("destroy", "svc/DB", "--all")
    before = entries(cli.store)
    pw = ("--backup-password-file", str(cli.backup_password))
    assert_one_line_error(
        cli("restore", str(password_file), *pw, "--name", "svc/DB", "--name", "svc/NOPE"),
        3,
        "no secret named 'svc/NOPE'",
        "nothing was restored",
    )
    assert entries(cli.store) == before
    for malformed in ("svc//DB", "svc/DB/", "../svc/DB"):  # a typo to fix, not a name it lacks
        assert_one_line_error(
            cli("restore", str(password_file), *pw, "--name", malformed), 2, "invalid secret name"
        )
    assert entries(cli.store) == before
    elsewhere = cli.tmp / "new" / "store.db"
    assert_one_line_error(
        cli("restore", str(password_file), *pw, "--store", str(elsewhere), "--name", "svc/DB"),
        2,
        "existing store",
    )
    assert not elsewhere.exists()
    cli.ok("restore", str(password_file), *pw, "--name", "svc/DB")  # a password backup too
    assert cli.ok("get", "svc/DB").out == "db-password-7f0c3d\n"
    assert entries(cli.store).keys() - before.keys() >= {"meta/svc/DB"}


# ---- restore --share-file: the master password forgotten and the store lost --------------------


def shares_of(cli: Cli, out_dir: Path) -> list[Path]:
    cli.ok("recovery", "init", "--shares", "3", "--threshold", "2", "--out-dir", str(out_dir))
    return sorted(out_dir.glob("recovery-share-*.txt"))


def test_a_copy_of_store_backup_restores_with_recovery_shares(cli: Cli) -> None:
    """The shares exist for the day the password is forgotten; if the store is lost that day too,
    a copy-of-store backup (which seals the same root key to the same recovery key) opened only
    with its master password, and so was lost with it. Now K shares open it; the copy keeps the
    shares, which then set a new password."""
    shares = shares_of(cli, cli.tmp / "shares")
    backup = cli.tmp / "night.smbackup"
    cli.ok("backup", str(backup))
    before = values_of(cli, cli.store)
    target = cli.tmp / "new-machine" / "store.db"
    forgotten = {"MASTER_PASSWORD": None}
    share_args = ("--share-file", str(shares[0]), "--share-file", str(shares[2]))
    result = cli("--store", str(target), "restore", str(backup), *share_args, env=forgotten)
    assert result.code == 0, result.stderr
    assert "recovery unlock-with password" in result.stderr
    new_password = cli.tmp / "new-password"
    new_password.write_text("a new password after the loss\n")
    cli.ok(
        "--store", str(target), "recovery", "unlock-with", "password", "--share-file", str(shares[1]),
        "--share-file", str(shares[0]), "--new-password-file", str(new_password), "--kdf-profile", "test",
    )  # fmt: skip
    cli.env["MASTER_PASSWORD"] = "a new password after the loss"
    assert values_of(cli, target) == before
    log = target.with_name("store.audit.jsonl")
    assert ("restore", "ok") in audit_operations(log)
    assert cli.ok("--store", str(target), "audit", "verify").code == 0


def test_restore_with_shares_refuses_a_password_backup_and_another_sets_shares(
    cli: Cli, password_file: Path, tmp_path: Path
) -> None:
    """A password backup is not sealed to the shares (exit 2); shares of another store are a
    wrong unlock (exit 4); neither creates anything."""
    shares = shares_of(cli, cli.tmp / "shares")
    target = cli.tmp / "new-machine" / "store.db"
    forgotten = {"MASTER_PASSWORD": None}
    share_args = ("--share-file", str(shares[0]), "--share-file", str(shares[1]))
    result = cli("--store", str(target), "restore", str(password_file), *share_args, env=forgotten)
    assert_one_line_error(result, 2, "recovery shares do not open", "--backup-password-file")
    (tmp_path / "other").mkdir()
    other = Cli(tmp_path / "other")
    other.ok("init", "--kdf-profile", "test")
    other_shares = shares_of(other, tmp_path / "other" / "shares")
    backup = cli.tmp / "night.smbackup"
    cli.ok("backup", str(backup))
    other_args = ("--share-file", str(other_shares[0]), "--share-file", str(other_shares[1]))
    result = cli("--store", str(target), "restore", str(backup), *other_args, env=forgotten)
    assert_one_line_error(result, 4, "recovery shares are of set")
    assert not target.parent.exists() or not any(target.parent.iterdir())


def test_backup_verify_checks_a_copy_of_store_backup_with_recovery_shares(
    cli: Cli, password_file: Path, tmp_path: Path
) -> None:
    """An operator holding only the shares (the password forgotten) could restore a copy-of-store
    backup with them but not check it first: `backup verify` asked for the master password. K
    shares now verify it; a password backup is not sealed to them (exit 2), another store's shares
    are a wrong unlock (exit 4), a damaged file is exit 6, as with the password."""
    shares = shares_of(cli, cli.tmp / "shares")
    backup = cli.tmp / "night.smbackup"
    cli.ok("backup", str(backup))
    forgotten = {"MASTER_PASSWORD": None}
    share_args = ("--share-file", str(shares[2]), "--share-file", str(shares[0]))
    result = cli("backup", "verify", str(backup), *share_args, env=forgotten)
    assert result.code == 0, result.stderr
    assert "is intact and complete" in result.out
    result = cli("backup", "verify", str(password_file), *share_args, env=forgotten)
    assert_one_line_error(result, 2, "recovery shares do not open", "--backup-password-file")
    (tmp_path / "other").mkdir()
    other = Cli(tmp_path / "other")
    other.ok("init", "--kdf-profile", "test")
    other_shares = shares_of(other, tmp_path / "other" / "shares")
    other_args = ("--share-file", str(other_shares[0]), "--share-file", str(other_shares[1]))
    assert_one_line_error(
        cli("backup", "verify", str(backup), *other_args, env=forgotten), 4, "recovery shares are of set"
    )
    damaged = cli.tmp / "damaged.smbackup"
    data = bytearray(backup.read_bytes())
    data[-40] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert cli("backup", "verify", str(damaged), *share_args, env=forgotten).code == 6


def test_backup_never_replaces_a_file_without_force(cli: Cli, copy_file: Path) -> None:
    before = copy_file.read_bytes()
    assert_one_line_error(cli("backup", str(copy_file)), 7, "already exists", "--force")
    assert copy_file.read_bytes() == before
    cli.ok("backup", str(copy_file), "--force")
    assert copy_file.read_bytes() != before
    assert copy_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("args", "stream"),
    [
        (("backup", "-"), "output"),
        (("backup", "--out", "-"), "output"),
        (("backup", "verify", "-"), "input"),
        (("restore", "-"), "input"),
    ],
)
def test_a_dash_is_refused_not_taken_as_a_file_named_dash(
    cli: Cli, copy_file: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], stream: str
) -> None:
    """`import -` reads stdin, so `backup -` must not quietly write ./-; a backup is a file
    (written atomically, read twice), so '-' is refused with what to do instead."""
    monkeypatch.chdir(cli.tmp)
    (cli.tmp / "-").unlink(missing_ok=True)
    before = files_of(cli.store)
    assert_one_line_error(cli(*args), 2, f"not standard {stream}", "./-")
    assert not (cli.tmp / "-").exists()
    assert files_of(cli.store) == before


def test_backup_refuses_to_write_over_the_store_itself(cli: Cli) -> None:
    before = files_of(cli.store)
    assert_one_line_error(cli("backup", str(cli.store), "--force"), 2, "is the store itself")
    assert files_of(cli.store) == before


def test_backup_refuses_to_write_over_the_master_passwords_file(cli: Cli) -> None:
    """`backup master-password --force` read the password from the file, then replaced it with the
    backup: the one password that opens both was gone. Fails on the old code (exit 0)."""
    password_file = cli.tmp / "master-password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    for given in (("--password-file", str(password_file)),):
        result = cli(*given, "backup", str(password_file), "--force")
        assert_one_line_error(result, 2, f"{password_file} is the master password's file; write the backup")
    result = cli("backup", str(password_file), "--force", env={"MASTER_PASSWORD_FILE": str(password_file)})
    assert_one_line_error(result, 2, "is the master password's file")
    assert password_file.read_text() == PASSWORD


# A restore into a new store that stops right after its commit (the new store's records in its
# -wal, not yet published) until its stdin closes: the point where a kill -9 leaves the most behind.
HELD_RESTORE = """
import sys
from secrets_manager.cli import main
from secrets_manager.storage.sqlite import SqliteStorage

original = SqliteStorage.commit

def commit(self, *args, **kwargs):
    revision = original(self, *args, **kwargs)
    if ".restore-" in self.path.name:
        print("committed", flush=True)
        sys.stdin.read()
    return revision

SqliteStorage.commit = commit
main(sys.argv[1:])
"""


def test_a_killed_restore_leaves_files_that_the_next_restore_removes(cli: Cli, copy_file: Path) -> None:
    """kill -9 mid-restore leaves .NAME.restore-* (and a -wal sealed under the source's keys):
    a restore running beside it leaves them alone, the next restore once it is dead removes them."""
    directory = cli.tmp / "restores"
    held = subprocess.Popen(
        [sys.executable, "-c", HELD_RESTORE, "restore", str(copy_file), "--store", str(directory / "a.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env,
        start_new_session=True,
    )
    try:
        assert held.stdout is not None and held.stdout.readline() == b"committed\n"
        leftovers = sorted(p.name for p in directory.iterdir())
        assert any(name.endswith("-wal") for name in leftovers), leftovers
        assert all(name.startswith(".a.db.restore-") for name in leftovers), leftovers
        beside = cli.ok("restore", str(copy_file), "--store", str(directory / "b.db"))
        assert "interrupted" not in beside.stderr  # a running restore's files are not leftovers
        assert set(leftovers) <= {p.name for p in directory.iterdir()}
    finally:
        held.kill()  # SIGKILL: no cleanup of its own runs
        held.communicate(timeout=TIMEOUT)
    assert held.returncode == -9
    assert set(leftovers) <= {p.name for p in directory.iterdir()}
    result = cli.ok("restore", str(copy_file), "--store", str(directory / "a.db"))
    assert f"removed {len(leftovers)} file(s) an interrupted restore left in {directory}" in result.stderr
    assert not [p.name for p in directory.iterdir() if ".restore-" in p.name]
    assert values_of(cli, directory / "a.db") == values_of(cli, cli.store)


def test_a_production_restore_into_a_directory_others_may_write_leaves_nothing_there(tmp_path: Path) -> None:
    """Refused before anything is written: it used to exit 2 and leave the complete new store
    (every secret, no audit log) behind, as the refusal came only when the store was reopened to
    audit the restore."""
    cli = Cli(tmp_path)
    store = EncryptedStore.create(
        SqliteStorage(cli.store, create=True), PasswordUnlock(PASSWORD, kdf.DEFAULT)
    )
    try:
        store.audit_key()
        store.put("svc/DB", b"db-password-7f0c3d")
    finally:
        store.close()
    backup = tmp_path / "copy.smbackup"
    cli.ok("backup", str(backup))
    password_file = tmp_path / "master-password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    production = {
        "SHRIVENQUANT_ENV": "production",
        "MASTER_PASSWORD": None,  # production refuses the variable, even empty
        "MASTER_PASSWORD_FILE": str(password_file),
    }
    refused = cli("restore", str(backup), "--store", str(shared / "new.db"), env=production)
    assert_one_line_error(refused, 2, f"the store's directory {shared} has mode 0777")
    assert list(shared.iterdir()) == []  # no store, no .new.db.restore-* file
    # a directory the restore makes is its own (0700): it goes ahead there
    deeper = cli("restore", str(backup), "--store", str(shared / "deeper" / "new.db"), env=production)
    assert deeper.code == 0, deeper.stderr
    shared.chmod(0o700)
    restored = cli("restore", str(backup), "--store", str(shared / "new.db"), env=production)
    assert restored.code == 0, restored.stderr


def test_production_refuses_a_backup_with_test_costs_saying_what_to_do_with_the_backup(
    cli: Cli, copy_file: Path
) -> None:
    """The refusal spoke of the store's parameters and offered `passwd` or `recovery unlock-with`,
    neither of which changes a backup."""
    from secrets_manager.store.backup import write_backup

    locked = cli.tmp / "locked.smbackup"
    store = EncryptedStore.open(SqliteStorage(cli.store), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        write_backup(store, locked, password=BACKUP_PASSWORD.encode(), kdf=kdf.TEST)
    finally:
        store.close()
    password_file = cli.tmp / "master-password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    cli.backup_password.chmod(0o600)
    production = {
        "SHRIVENQUANT_ENV": "production",
        "MASTER_PASSWORD": None,  # production refuses the variable, even empty
        "MASTER_PASSWORD_FILE": str(password_file),
    }
    target = cli.tmp / "new" / "store.db"
    for file, what in (
        (copy_file, f"backup {copy_file} holds a store whose Argon2id parameters are below"),
        (locked, f"backup {locked} is locked by a backup password whose Argon2id parameters are below"),
    ):
        options = [] if file == copy_file else ["--backup-password-file", str(cli.backup_password)]
        for command in (["backup", "verify"], ["restore", "--store", str(target)]):
            result = cli(*command, str(file), *options, env=production)
            assert_one_line_error(result, 2, what, "make a new backup", "restore this one outside production")
            assert "recovery unlock-with" not in result.stderr
        assert not target.parent.exists()


# ---- the file, the audit log, the terminal ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["store copy", "backup password"])
def test_the_backup_file_is_0600_and_holds_no_value(
    cli: Cli, copy_file: Path, password_file: Path, kind: str
) -> None:
    file = copy_file if kind == "store copy" else password_file
    assert file.stat().st_mode & 0o777 == 0o600
    data = file.read_bytes()
    for values in SECRETS.values():
        for value in values:
            assert value not in data


def test_backup_and_restore_are_audited(cli: Cli, copy_file: Path) -> None:
    assert audit_operations(cli.store.with_name("store.audit.jsonl"))[-3:] == [
        ("unlock", "ok"),
        ("backup", "pending"),
        ("backup", "ok"),
    ]
    target = cli.tmp / "restored" / "store.db"
    cli.ok("restore", str(copy_file), "--store", str(target))
    log = target.with_name("store.audit.jsonl")
    new_store = [(r["operation"], r["name"], r["version"], r["outcome"]) for r in audit_records(log)]
    assert new_store[-1] == ("restore", None, None, "ok")  # the restore's own record comes last
    assert sorted(new_store[:-1]) == [
        ("restore", "other/TOKEN", 1, "ok"),
        ("restore", "svc/API_KEY", 2, "ok"),
        ("restore", "svc/DB", 1, "ok"),
    ]
    assert len({r["request_id"] for r in audit_records(log)}) == 1
    cli.ok("restore", str(copy_file), "--store", str(target), "--on-existing", "overwrite")
    assert audit_operations(log)[-6:] == [
        ("unlock", "ok"),
        ("restore", "pending"),
        *[("restore.overwrite", "ok")] * 3,
        ("restore", "ok"),
    ]
    assert cli.ok("--store", str(target), "audit", "verify").out.startswith("audit log verified")


def audit_records(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_an_overwriting_restore_names_and_audits_what_it_replaced(cli: Cli, copy_file: Path) -> None:
    """Versions written after the backup are gone after `--on-existing overwrite`: the output names
    each secret replaced, and the audit log has a record per secret with its restored version and
    that value's fingerprint (the one `audit hash` gives)."""
    for value in ("new-THREE", "new-FOUR", "new-FIVE"):
        cli.ok("store", "svc/API_KEY", value)
    cli.ok("store", "svc/EXTRA", "not-in-the-backup")
    log = cli.store.with_name("store.audit.jsonl")
    before = len(audit_records(log))
    result = cli.ok("restore", str(copy_file), "--on-existing", "overwrite")
    # In a pipe the bare token the README promises, for `cut -f2`.
    assert sorted(result.out.splitlines()) == [f"{name}\toverwritten" for name in sorted(SECRETS)]
    assert "overwrote 3 existing secret(s)" in result.stderr
    assert "versions written after the backup are gone" in result.stderr
    records = audit_records(log)[before:]
    assert [(r["operation"], r["outcome"]) for r in records[:2]] == [("unlock", "ok"), ("restore", "pending")]
    per_secret = {r["name"]: r for r in records[2:-1]}
    assert set(per_secret) == set(SECRETS)  # svc/EXTRA was not touched
    assert {r["operation"] for r in per_secret.values()} == {"restore.overwrite"}
    api_key = per_secret["svc/API_KEY"]
    assert api_key["version"] == 2
    assert api_key["value_hmac"] == fingerprint(cli, b"sk-live-TWO-a4e017")
    assert (records[-1]["operation"], records[-1]["name"], records[-1]["outcome"]) == ("restore", None, "ok")
    assert len({r["request_id"] for r in records[1:]}) == 1
    for value in SECRETS["svc/API_KEY"] + SECRETS["svc/DB"]:  # never a value in a record
        assert value.decode() not in log.read_text()
    skipped = cli.ok("restore", str(copy_file), "--on-existing", "skip")
    assert sorted(skipped.out.splitlines()) == [f"{name}\tskipped" for name in sorted(SECRETS)]
    assert audit_operations(log)[-2:] == [("restore", "pending"), ("restore", "ok")]  # nothing changed


def fingerprint(cli: Cli, value: bytes) -> str:
    proc = subprocess.run(
        [str(SCRIPT), "audit", "hash", "--raw"],
        input=value,
        capture_output=True,
        env=cli.env,
        start_new_session=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode().strip()


def test_backup_and_restore_are_quiet_in_a_pipe(cli: Cli) -> None:
    backup = cli.ok("backup", str(cli.tmp / "quiet.smbackup"))
    restore = cli.ok("restore", str(cli.tmp / "quiet.smbackup"), "--store", str(cli.tmp / "q" / "s.db"))
    for result in (backup, restore):
        assert result.out == ""
        assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["secrets-manager"]


def test_backup_against_a_server_is_refused(cli: Cli) -> None:
    result = cli("--server", "127.0.0.1:1", "backup", str(cli.tmp / "b"))
    assert_one_line_error(result, 2, "local store only")


def test_backup_draws_a_progress_bar_on_a_terminal(cli: Cli) -> None:
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [str(SCRIPT), "backup", str(cli.tmp / "tty.smbackup")],
            input=b"",
            stdout=subprocess.PIPE,
            stderr=secondary,
            env={**cli.env, "TERM": "xterm", "COLUMNS": "100"},
            start_new_session=True,
            timeout=TIMEOUT,
        )
        os.close(secondary)
        secondary = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the other side is closed and everything was read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    assert proc.returncode == 0
    text = drawn.decode("utf-8", errors="replace")
    assert "backup writing" in text and "10/10" in text


def test_backup_refuses_to_write_over_the_audit_log_and_its_rotated_files(cli: Cli) -> None:
    """`backup AUDIT_LOG --force` replaced the log with the backup: every command then exited 6
    (a broken chain) until `audit reset`."""
    cli.ok("backup", str(cli.tmp / "first.smbackup"))  # an audited command: the log exists
    log = cli.store.with_name("store.audit.jsonl")
    alias = cli.tmp / "alias"
    alias.symlink_to(log.parent)
    before = files_of(cli.store)
    assert log.name in before
    for target in (log, log.with_name(f"{log.name}.000000000001"), alias / log.name):
        assert_one_line_error(cli("backup", str(target), "--force"), 2, "audit log", "another file")
        assert files_of(cli.store) == before
    cli.ok("audit", "verify")


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_restore_beside_a_removed_stores_leftover_files_is_refused_before_writing(
    cli: Cli, copy_file: Path, suffix: str
) -> None:
    """A store file removed but not its -wal (a writer killed before its checkpoint): SQLite
    replayed that old log into the restored store, which then failed its checks (exit 6, advice to
    run the same restore), left its audit records behind and locked out every later restore there
    ("audit log edited or forged"). Refused first, naming the files, and nothing is written."""
    target = cli.tmp / "lost" / "store.db"
    target.parent.mkdir(mode=0o700)
    db = sqlite3.connect(target)
    try:
        db.execute("PRAGMA journal_mode=wal")
        db.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, value BLOB)")
        db.execute("INSERT INTO entries VALUES ('core/header', x'00')")
        db.commit()
        stale_wal = Path(f"{target}-wal").read_bytes()  # as a kill -9 leaves it: not checkpointed
    finally:
        db.close()
    target.unlink()
    leftover = Path(f"{target}{suffix}")
    leftover.write_bytes(stale_wal if suffix == "-wal" else b"\0" * 4096)
    before = files_of(target)
    result = cli("restore", str(copy_file), "--store", str(target))
    assert_one_line_error(result, 7, f"({target.name}{suffix})", "remove them")
    assert files_of(target) == before


@pytest.mark.parametrize("kind", ["store copy", "backup password"])
def test_a_restore_where_another_stores_audit_log_lies_is_refused_before_writing(
    cli: Cli, copy_file: Path, password_file: Path, kind: str
) -> None:
    """The log at the new store's log path is another store's (its store file moved away): a copy
    of a store was built whole, refused at its first audit record (exit 6) and removed, with
    advice to 'audit reset --accept-loss' that would set a good log aside. Refused first, as a
    password backup already was (exit 7), and that log is left as it is."""
    target = cli.tmp / "reused" / "store.db"
    cli.ok("--store", str(target), "init", "--kdf-profile", "test")
    cli.ok("--store", str(target), "list")
    target.rename(target.with_name("moved-away.db"))
    before = files_of(target)
    args = [str(copy_file)] if kind == "store copy" else [str(password_file), "--backup-password-file"]
    if kind == "backup password":
        args.append(str(cli.backup_password))
    result = cli("restore", *args, "--store", str(target))
    assert_one_line_error(
        result, 7, f"the audit log {target.with_name('store.audit.jsonl')} of another store", "--audit-file"
    )
    assert files_of(target) == before


def test_a_copy_of_a_lost_store_continues_its_surviving_audit_log(cli: Cli, copy_file: Path) -> None:
    """The case the check above must let through: the store file lost, its log kept (written
    after the backup too): the restored copy has the store's audit key and continues that log."""
    cli.ok("get", "svc/DB")
    cli.store.unlink()
    cli.ok("restore", str(copy_file), "--store", str(cli.store))
    operations = audit_operations(cli.store.with_name("store.audit.jsonl"))
    assert ("get", "ok") in operations and operations[-1] == ("restore", "ok")
    assert cli.ok("get", "svc/DB").out == "db-password-7f0c3d\n"
    assert cli.ok("audit", "verify").out.startswith("audit log verified")


@pytest.mark.parametrize("kind", ["store copy", "backup password"])
@pytest.mark.parametrize("command", ["verify", "restore"])
def test_a_backup_through_a_pipe_is_refused_not_called_damaged(
    cli: Cli, copy_file: Path, password_file: Path, kind: str, command: str
) -> None:
    """`cat FILE | restore /dev/stdin`, `backup verify <(cat FILE)`: the second read (after the
    header) found the stream consumed, and an intact backup was reported damaged ('use another
    copy', exit 6). Refused as `restore -` is (exit 2), saying to save the stream to a file."""
    backup = copy_file if kind == "store copy" else password_file
    args = ["backup", "verify", "/dev/stdin"] if command == "verify" else ["restore", "/dev/stdin"]
    if kind == "backup password":
        args += ["--backup-password-file", str(cli.backup_password)]
    target = cli.tmp / "piped" / "store.db"
    proc = subprocess.run(
        [str(SCRIPT), "--store", str(target), *args],
        input=backup.read_bytes(),
        capture_output=True,
        env=cli.env,
        start_new_session=True,
        timeout=TIMEOUT,
    )
    result = Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert_one_line_error(result, 2, "/dev/stdin is not a regular file", "save the stream to a file first")
    assert files_of(target) == {}


@pytest.mark.parametrize("force", [(), ("--force",)], ids=["plain", "force"])
def test_a_pipe_as_the_backup_destination_is_refused(cli: Cli, force: tuple[str, ...]) -> None:
    """A FIFO was renamed over with --force (the reader never saw a byte) and called 'already
    exists' without it."""
    fifo = cli.tmp / "to-gzip"
    os.mkfifo(fifo)
    assert_one_line_error(cli("backup", str(fifo), *force), 2, "is not a regular file", "give a file path")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_directory_given_as_the_backup_is_refused(cli: Cli) -> None:
    assert_one_line_error(cli("backup", "verify", str(cli.tmp)), 2, f"{cli.tmp} is a directory")


@pytest.mark.parametrize("command", ["verify", "restore"])
def test_a_backup_file_whose_read_fails_is_named_not_an_internal_error(cli: Cli, command: str) -> None:
    """Found by fuzzing file arguments: a file that opens but whose read fails (EIO, as a bad disk
    gives; /proc/self/mem gives it at offset 0) was 'internal error (OSError)'."""
    target = cli.tmp / "eio" / "store.db"
    args = ["backup", "verify", "/proc/self/mem"] if command == "verify" else ["restore", "/proc/self/mem"]
    result = cli("--store", str(target), *args)
    assert_one_line_error(result, 1, "cannot read /proc/self/mem: Input/output error")
    assert files_of(target) == {}
