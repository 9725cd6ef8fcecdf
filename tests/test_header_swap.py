"""A store header that does not belong to the store's data (store/encrypted.py `EncryptedStore.open`).

The header is not authenticated: someone who can write the store file can put in the header of
another store, or one wrapping a root key of their own under their own password or KMS key. Its
root key then unwraps, but opens none of the store's own keys. Every command refuses with exit 6
saying so (restore the store file or its header, treat it as tampering), never suggesting
`audit reset`, and nothing is written, least of all sealed under that root key. The ordinary cases
(a wrong password, a damaged audit key beside an intact keyset, a new empty store, a header
changed by a root rotation while the store is opened) keep working as before.

Real store files, through the console script (and `serve`), with moto's KMS for the KMS header."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from moto_fixtures import moto_environ, moto_kms
from secrets_manager.crypto import DataKey, kdf
from secrets_manager.crypto.aead import new_key
from secrets_manager.crypto.keyset import KeyStatus, RotationPolicy
from secrets_manager.crypto.record import record_key_id
from secrets_manager.errors import IntegrityError, UnlockError
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import AwsKmsUnlock, EncryptedStore, PasswordUnlock
from secrets_manager.store import encrypted as encrypted_module
from secrets_manager.store import recovery as rec
from secrets_manager.store.base import Anchor
from secrets_manager.store.keys import rotate_root_key, update_key_policy
from service_fixtures import POLICY, make_pki, run_script, start_server

VICTIM = "the victim's master password"
ATTACKER = "the attacker's master password"
VALUE = b"victim-SEEKRIT-value"
NEW_VALUE = b"written-after-the-swap-SEEKRIT"
REGION = "eu-west-1"
NOT_OURS = "the store header does not belong to this store's data"


class Cli:
    """The console script on one store file, with `password` as MASTER_PASSWORD."""

    def __init__(self, directory: Path, store: Path, password: str) -> None:
        self.dir = directory
        self.store = store
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(directory),
            "SECRETS_MANAGER_STORE": str(store),
            "MASTER_PASSWORD": password,
        }

    def __call__(self, *args: str, input: bytes = b"", **env: str) -> tuple[int, str]:
        proc = run_script(self.env, *args, input=input, env=env)
        return proc.returncode, proc.stderr.decode()


def _entries(path: Path) -> dict[str, bytes]:
    with sqlite3.connect(path) as db:
        return {key: bytes(value) for key, value in db.execute("SELECT key, value FROM entries")}


def _header(path: Path) -> bytes:
    return _entries(path)["core/header"]


def _write_entries(path: Path, put: dict[str, bytes], delete: tuple[str, ...] = ()) -> None:
    """What someone who may write the store file does to it, behind every store handle's back."""
    storage = SqliteStorage(path)
    try:
        for key in delete:
            entry = storage.get(key)
            if entry is not None:
                storage.delete(key, expect=entry.revision)
        for key, value in put.items():
            entry = storage.get(key)
            assert entry is not None
            storage.put(key, value, expect=entry.revision)
    finally:
        storage.close()


def _audit_files(cli: Cli) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cli.store.parent.iterdir() if ".audit" in p.name}


def _sealed_under(path: Path, root_id: int) -> list[str]:
    """The entries of the store file that are records sealed under the root key `root_id`."""
    return [
        key
        for key, value in _entries(path).items()
        if key != "core/header" and record_key_id(value) == root_id
    ]


@pytest.fixture
def victim(tmp_path: Path) -> Cli:
    """A store made and used through the CLI: secrets in two namespaces, its audit key and anchor."""
    cli = Cli(tmp_path, tmp_path / "victim" / "store.db", VICTIM)
    assert cli("init", "--kdf-profile", "test")[0] == 0
    for name in ("app/API_KEY", "db/PASSWORD"):
        code, err = cli("store", name, input=VALUE)
        assert code == 0, err
    return cli


@pytest.fixture
def attackers_header(tmp_path: Path) -> bytes:
    """The header of another store, made with another password (the attacker's own store)."""
    other = Cli(tmp_path, tmp_path / "other" / "store.db", ATTACKER)
    assert other("init", "--kdf-profile", "test")[0] == 0
    return _header(other.store)


def _assert_refused_as_not_ours(code: int, err: str) -> None:
    assert code == 6, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("secrets-manager: error: ") and NOT_OURS in lines[0], err
    assert (
        "tampering" in lines[0]
        and "restore the store file (or its core/header entry) from a backup" in lines[0]
    )
    assert "audit reset" not in err and "accept-loss" not in err
    assert VALUE.decode() not in err and NEW_VALUE.decode() not in err


def _every_command(cli: Cli) -> list[tuple[tuple[str, ...], bytes]]:
    """Every kind of command: reads, writes (into an existing and a new namespace), the audit
    log's, the key lifecycle's, the unlock source's, recovery, backup and restore."""
    (cli.dir / "new-password").write_text("a new password\n")
    (cli.dir / "backup-password").write_text("a backup password\n")
    (cli.dir / "shares").mkdir(exist_ok=True)
    backup_password = ("--backup-password-file", str(cli.dir / "backup-password"))
    new_password = ("--new-password-file", str(cli.dir / "new-password"))
    return [
        (("get", "app/API_KEY"), b""),
        (("list",), b""),
        (("history", "app/API_KEY"), b""),
        (("status",), b""),
        (("store", "app/API_KEY"), NEW_VALUE),
        (("store", "newns/TOKEN"), NEW_VALUE),
        (("metadata", "app/API_KEY", "--description", "changed"), b""),
        (("delete", "app/API_KEY"), b""),
        (("destroy", "app/API_KEY", "--all"), b""),
        (("cp", "app/API_KEY", "newns/COPY"), b""),
        (("import", "-", "--service", "newns"), b"TOKEN=" + NEW_VALUE + b"\n"),
        (("audit", "verify"), b""),
        (("audit", "reset", "--accept-loss"), b""),
        (("audit", "hash"), NEW_VALUE),
        (("keys", "status"), b""),
        (("keys", "rotate", "app"), b""),
        (("keys", "rotate", "newns"), b""),
        (("keys", "rotate", "--root"), b""),
        (("passwd", *new_password, "--kdf-profile", "test"), b""),
        (("unlock-with", "password", *new_password, "--kdf-profile", "test"), b""),
        (
            ("recovery", "init", "--shares", "3", "--threshold", "2", "--out-dir", str(cli.dir / "shares")),
            b"",
        ),
        (("backup", str(cli.dir / "copy.smbackup"), *backup_password), b""),
        (("restore", str(cli.dir / "before.smbackup"), *backup_password, "--on-existing", "overwrite"), b""),
        (("rotate", "app/API_KEY", "--generate"), b""),
    ]


@pytest.mark.parametrize("also_deleted", [(), ("core/audit-key", "core/audit-anchor")])
def test_another_stores_header_over_this_stores_data_is_refused_by_every_command(
    victim: Cli, attackers_header: bytes, also_deleted: tuple[str, ...]
) -> None:
    """The old code reported a damaged keyset or audit anchor and offered 'audit reset
    --accept-loss'; with the audit key and anchor deleted too, that reset went through and a
    store into a new namespace was then sealed under the attacker's root key."""
    (victim.dir / "backup-password").write_text("a backup password\n")
    made = victim(
        "backup",
        str(victim.dir / "before.smbackup"),
        "--backup-password-file",
        str(victim.dir / "backup-password"),
    )
    assert made[0] == 0, made[1]
    _write_entries(victim.store, {"core/header": attackers_header}, delete=also_deleted)
    before = _entries(victim.store)
    log_before = _audit_files(victim)
    attacker = Cli(victim.dir, victim.store, ATTACKER)
    for args, stdin in _every_command(attacker):
        _assert_refused_as_not_ours(*attacker(*args, input=stdin))
    assert attacker("init", "--kdf-profile", "test")[0] != 0  # never over an existing store
    assert not (victim.dir / "copy.smbackup").exists()
    assert _entries(victim.store) == before  # nothing written, nothing sealed
    assert _audit_files(victim) == log_before  # no reset, no record appended
    attackers_root = json.loads(attackers_header)["root_key_id"]
    assert _sealed_under(victim.store, attackers_root) == []
    # The victim's password no longer opens the header: that is the header's doing (exit 4, as ever).
    code, err = victim("get", "app/API_KEY")
    assert code == 4 and "wrong master password" in err


def test_restoring_the_header_brings_the_store_back(victim: Cli, attackers_header: bytes) -> None:
    own = _header(victim.store)
    _write_entries(victim.store, {"core/header": attackers_header})
    _assert_refused_as_not_ours(*Cli(victim.dir, victim.store, ATTACKER)("get", "app/API_KEY"))
    _write_entries(victim.store, {"core/header": own})
    got = run_script(victim.env, "get", "app/API_KEY")
    assert (got.returncode, got.stdout) == (0, VALUE + b"\n")
    assert victim("audit", "verify")[0] == 0


def test_a_store_whose_own_keys_were_all_deleted_is_refused_rather_than_given_new_ones(
    victim: Cli, attackers_header: bytes
) -> None:
    """The header swapped, and every entry its root key should open deleted too (every keyset, the
    audit key and anchor): nothing left to check the header against, yet the store holds
    secrets. The old code made a new audit key and keysets under the attacker's root key."""
    root_sealed = tuple(
        key for key in _entries(victim.store) if key.startswith("core/") and key != "core/header"
    )
    _write_entries(victim.store, {"core/header": attackers_header}, delete=root_sealed)
    before = _entries(victim.store)
    attacker = Cli(victim.dir, victim.store, ATTACKER)
    for args in (("store", "newns/TOKEN"), ("audit", "reset", "--accept-loss"), ("list",)):
        code, err = attacker(*args, input=NEW_VALUE)
        assert code == 6 and "holds secrets but none of its own keys" in err, err
        assert "tampering" in err and "audit reset" not in err and len(err.strip().splitlines()) == 1
    assert _entries(victim.store) == before


def test_a_header_rewrapped_under_someone_elses_kms_key_is_refused_by_cli_and_serve(
    victim: Cli, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KMS key this host's credentials may use, wrapping a root key of the attacker's own (with
    the store's root key id, so nothing but the data can tell): no password is asked, and the
    old code went on to serve and to seal under it whatever came next."""
    aws = moto_environ(moto_endpoint, REGION)
    for name, value in aws.items():
        monkeypatch.setenv(name, value)
    arn = str(moto_kms(moto_endpoint, REGION).create_key()["KeyMetadata"]["Arn"])
    header = json.loads(_header(victim.store))
    theirs = DataKey(id=header["root_key_id"], status=KeyStatus.ENABLED, created=0, material=new_key())
    header["unlock"] = AwsKmsUnlock(arn).wrap(theirs)
    _write_entries(victim.store, {"core/header": json.dumps(header).encode()})
    before = _entries(victim.store)
    (victim.dir / "new-password").write_text("a new password\n")
    for args, stdin in (
        (("get", "app/API_KEY"), b""),
        (("store", "newns/TOKEN"), NEW_VALUE),
        (("audit", "reset", "--accept-loss"), b""),
        (("keys", "rotate", "--root"), b""),
        (("unlock-with", "password", "--new-password-file", str(victim.dir / "new-password")), b""),
    ):
        _assert_refused_as_not_ours(*victim(*args, input=stdin, **aws))
    make_pki(victim.dir, ("ops",))
    (victim.dir / "policy.toml").write_text(POLICY)
    with pytest.raises(AssertionError, match=NOT_OURS):
        start_server(victim.dir, store=str(victim.store), environment=aws)
    with pytest.raises(IntegrityError, match=NOT_OURS):
        EncryptedStore.open(SqliteStorage(victim.store), AwsKmsUnlock())
    assert _entries(victim.store) == before


# ---- the ordinary cases keep working ---------------------------------------------------------------


def test_a_wrong_password_is_still_a_wrong_password(victim: Cli) -> None:
    code, err = Cli(victim.dir, victim.store, "not the password")("get", "app/API_KEY")
    assert code == 4 and "wrong master password" in err and NOT_OURS not in err


def test_a_damaged_audit_key_beside_intact_keysets_is_damage_not_a_foreign_header(
    victim: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root key opens the keysets: the header is the store's, the audit key alone is damaged
    (its own message, as before), and every secret can still be read in process."""
    entries = _entries(victim.store)
    flipped = bytearray(entries["core/audit-key"])
    flipped[-1] ^= 1
    _write_entries(victim.store, {"core/audit-key": bytes(flipped)})
    store = EncryptedStore.open(SqliteStorage(victim.store), PasswordUnlock(VICTIM, kdf.TEST))
    try:
        assert store.get("app/API_KEY").value.reveal() == VALUE
        with pytest.raises(IntegrityError, match=r"audit key \(core/audit-key\) is damaged"):
            store.audit_key()
    finally:
        store.close()
    code, err = victim("audit", "verify")
    assert code == 6 and "audit key (core/audit-key) is damaged" in err and NOT_OURS not in err


def test_a_new_store_has_nothing_to_check_its_header_against_and_opens(tmp_path: Path) -> None:
    """A store made in process has no root-sealed entry before its first write (the CLI's init
    makes the audit key at once): any header opens it. The first write then proves the header."""
    path = tmp_path / "new.db"
    EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(VICTIM, kdf.TEST)).close()
    other = tmp_path / "other.db"
    EncryptedStore.create(SqliteStorage(other, create=True), PasswordUnlock(ATTACKER, kdf.TEST)).close()
    _write_entries(path, {"core/header": _header(other)})
    store = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(ATTACKER, kdf.TEST))
    try:
        store.put("app/X", b"x")
        assert store.get("app/X").value.reveal() == b"x"
    finally:
        store.close()


def test_passwd_root_rotation_recovery_and_unlock_with_keep_the_header_the_stores(victim: Cli) -> None:
    (victim.dir / "pw2").write_text("second password\n")
    assert victim("passwd", "--new-password-file", str(victim.dir / "pw2"))[0] == 0
    second = Cli(victim.dir, victim.store, "second password")
    assert second("keys", "rotate", "--root")[0] == 0
    (victim.dir / "shares").mkdir()
    code, err = second(
        "recovery", "init", "--shares", "3", "--threshold", "2", "--out-dir", str(victim.dir / "shares")
    )
    assert code == 0, err
    (victim.dir / "pw3").write_text("third password\n")
    assert second("unlock-with", "password", "--new-password-file", str(victim.dir / "pw3"))[0] == 0
    third = Cli(victim.dir, victim.store, "third password")
    got = run_script(third.env, "get", "db/PASSWORD")
    assert (got.returncode, got.stdout) == (0, VALUE + b"\n")
    assert third("audit", "verify")[0] == 0


def test_a_root_rotation_landing_while_the_store_is_opened_is_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header read, then another process rotates the root key before the check: nothing the
    old root key opens is left, but the header changed meanwhile, so it is read again (not taken
    for a foreign one) and the store opens under the new root key."""
    path = tmp_path / "store.db"
    created = EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(VICTIM, kdf.TEST))
    created.put("app/X", b"x")
    created.audit_key()
    created.close()
    started: list[bool] = []
    rotated: list[int] = []
    real_unwrap = encrypted_module._unwrap_root

    def unwrap_then_rotate_elsewhere(unlock: Any, header: dict[str, Any]) -> DataKey:
        root = real_unwrap(unlock, header)
        if not started:
            started.append(True)
            admin = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(VICTIM, kdf.TEST))
            try:
                rotated.append(rotate_root_key(admin).new_id)
            finally:
                admin.close()
        return root

    monkeypatch.setattr(encrypted_module, "_unwrap_root", unwrap_then_rotate_elsewhere)
    # The entry read with the header is then under the old root; make it look unopened, as a
    # damaged one would, so the whole store is looked at after the rotation.
    monkeypatch.setattr(EncryptedStore, "_learn_what_the_root_seals", lambda self, sealed: False)
    store = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(VICTIM, kdf.TEST))
    try:
        assert rotated and store._root.id == rotated[0]
        assert store.get("app/X").value.reveal() == b"x"
    finally:
        store.close()


def test_the_refusal_is_not_an_unlock_error(victim: Cli, attackers_header: bytes) -> None:
    """In process: IntegrityError (exit 6), not UnlockError, and no handle is returned."""
    _write_entries(victim.store, {"core/header": attackers_header})
    storage = SqliteStorage(victim.store)
    try:
        with pytest.raises(IntegrityError, match=NOT_OURS) as caught:
            EncryptedStore.open(storage, PasswordUnlock(ATTACKER, kdf.TEST))
        assert not isinstance(caught.value, UnlockError)
    finally:
        storage.close()


def _only_a(kind: str, store: EncryptedStore) -> None:
    """Give `store` (new, nothing sealed yet) one root-sealed entry of `kind` and nothing else."""
    if kind == "key policy":
        update_key_policy(store, lambda policy: RotationPolicy(max_uses=1000))
    elif kind == "audit anchor":
        store.set_audit_anchor(Anchor(seq=0, hash="0" * 64))
    elif kind == "scoped audit anchor":
        scoped = EncryptedStore(store._storage, store._root, audit_scope="host-a")
        scoped.set_audit_anchor(Anchor(seq=0, hash="0" * 64))
    else:
        rec.install_recovery(store, rec.make_recovery_shares(threshold=2, shares=3))


@pytest.mark.parametrize("kind", ["key policy", "audit anchor", "scoped audit anchor", "recovery record"])
def test_every_kind_of_root_sealed_entry_checks_the_header(tmp_path: Path, kind: str) -> None:
    """A store whose only root-sealed entry is a key policy, an anchor (one of a shared store's
    too) or a recovery record: its own header opens it, another store's is refused."""
    path = tmp_path / "store.db"
    store = EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(VICTIM, kdf.TEST))
    try:
        _only_a(kind, store)
    finally:
        store.close()
    assert [key for key in _entries(path) if key != "core/header"] == [_KEY_OF[kind]]
    EncryptedStore.open(SqliteStorage(path), PasswordUnlock(VICTIM, kdf.TEST)).close()
    other = tmp_path / "other.db"
    EncryptedStore.create(SqliteStorage(other, create=True), PasswordUnlock(ATTACKER, kdf.TEST)).close()
    _write_entries(path, {"core/header": _header(other)})
    storage = SqliteStorage(path)
    try:
        with pytest.raises(IntegrityError, match=NOT_OURS):
            EncryptedStore.open(storage, PasswordUnlock(ATTACKER, kdf.TEST))
    finally:
        storage.close()


_KEY_OF = {
    "key policy": "core/key-policy",
    "audit anchor": "core/audit-anchor",
    "scoped audit anchor": "core/audit-anchor/host-a",
    "recovery record": "core/recovery",
}


def test_another_stores_header_on_a_postgresql_store_is_refused(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """The same on PostgreSQL, where every host's audit log has an anchor of its own."""
    schemas = [postgres_cluster.new_schema() for _ in range(2)]
    clis = []
    for schema, password in zip(schemas, (VICTIM, ATTACKER), strict=True):
        cli = Cli(tmp_path, tmp_path / "unused", password)
        cli.env.update(postgres_cluster.env())
        cli.env["SECRETS_MANAGER_STORE"] = f"{postgres_cluster.url()}?schema={schema}"
        cli.env["SECRETS_MANAGER_AUDIT_FILE"] = str(tmp_path / f"{schema}.audit.jsonl")
        assert cli("init", "--kdf-profile", "test")[0] == 0
        clis.append(cli)
    victim, attacker = clis
    assert victim("store", "app/API_KEY", input=VALUE)[0] == 0
    storages = [PostgresStorage(postgres_cluster.url(with_password=True), schema=s) for s in schemas]
    try:
        theirs, ours = storages[1].get("core/header"), storages[0].get("core/header")
        assert theirs is not None and ours is not None
        storages[0].put("core/header", theirs.value, expect=ours.revision)
        before = _all_entries(storages[0])
        assert "core/audit-anchor" not in before and any(k.startswith("core/audit-anchor/") for k in before)
        attacker.env.update(SECRETS_MANAGER_STORE=victim.env["SECRETS_MANAGER_STORE"])
        attacker.env.update(SECRETS_MANAGER_AUDIT_FILE=victim.env["SECRETS_MANAGER_AUDIT_FILE"])
        for args in (("get", "app/API_KEY"), ("store", "newns/TOKEN"), ("audit", "reset", "--accept-loss")):
            _assert_refused_as_not_ours(*attacker(*args, input=NEW_VALUE))
        assert _all_entries(storages[0]) == before
    finally:
        for storage in storages:
            storage.close()


def _all_entries(storage: PostgresStorage) -> dict[str, bytes]:
    found = {}
    for key in storage.list(""):
        entry = storage.get(key)
        if entry is not None:
            found[key] = entry.value
    return found
