"""Migration between kinds of store with backup and restore (issue 8): SQLite → AWS Secrets Manager
(moto's real HTTP server on 127.0.0.1) → SQLite, and SQLite → Vault KV v2 (the test server of
vault_server.py) → SQLite, keeping every value; and a backup AWS cannot hold refused up front.

The backups go through the file (write, read and check, restore), as the CLI does; the Vault and
AWS stores are opened directly (their URLs reach the CLI through store/url.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.environment import Environment
from secrets_manager.errors import InvalidInputError, UnsupportedOperationError
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, SecretStore
from secrets_manager.store.backup import BackupSecret, read_backup, write_backup
from secrets_manager.store.base import PENDING
from secrets_manager.store.restore import restore_into, restore_new_store
from vault_server import FakeVault

SCRIPT = Path(sys.executable).with_name("secrets-manager")
BACKUP_PASSWORD = b"migration backup password"
SOURCE = {
    "market-connector/BINANCE_API_KEY": [
        b"sk-live-FIRST-9c1d22",
        b"sk-live-SECOND-71aa0e",
        b"sk-live-THIRD-e5f3b8",
    ],
    "auth/DB_PASSWORD": [b"db-password-ONLY-44be19"],
    "auth/BINARY": [bytes(range(1, 256))],
    "ROOT_LEVEL": [b"root-level-VALUE-0b7d5c", b"root-level-NEWER-3a90d1"],
}


def source_store(path: Path) -> EncryptedStore:
    store = EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock("source", kdf.TEST))
    for name, values in SOURCE.items():
        for value in values:
            store.put(name, value, description=f"about {name}", tags={"team": "trading"})
    store.destroy("market-connector/BINANCE_API_KEY", [1])  # a destroyed version is not migrated
    store.update_metadata("market-connector/BINANCE_API_KEY", max_versions=50)  # its own, carried
    store.update_metadata("ROOT_LEVEL", max_versions=3)
    return store


def kept(store: SecretStore) -> dict[str, tuple[list[bytes], bytes, str, int]]:
    """Each secret's kept values oldest first, its current value, description and max_versions."""
    result = {}
    for meta in store.list(""):
        values = [
            store.get(meta.name, version=v.version).value.reveal() for v in meta.versions if not v.destroyed
        ]
        result[meta.name] = (values, store.get(meta.name).value.reveal(), meta.description, meta.max_versions)
    return result


def round_trip(source: EncryptedStore, other: SecretStore, tmp_path: Path) -> EncryptedStore:
    """source → backup file → other store → backup file → a new SQLite store."""
    write_backup(source, tmp_path / "from-sqlite.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    result = restore_into(other, read_backup(tmp_path / "from-sqlite.smbackup", BACKUP_PASSWORD).secrets)
    assert (result.secrets, result.versions, result.exact) == (len(SOURCE), 6, False)
    assert kept(other) == kept(source)
    summary = write_backup(other, tmp_path / "from-other.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    assert (summary.secrets, summary.versions, summary.not_included) == (len(SOURCE), 6, ())
    back = tmp_path / "back.db"
    restore_new_store(
        read_backup(tmp_path / "from-other.smbackup", BACKUP_PASSWORD),
        str(back),
        password=b"back",
        kdf_profile="test",
        environment=Environment.DEVELOPMENT,
        actor="t",
    )
    return EncryptedStore.open(SqliteStorage(back), PasswordUnlock("back", kdf.TEST))


# ---- AWS Secrets Manager (moto server) ------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[SecretStore]:
    aws_module = pytest.importorskip("secrets_manager.store.aws")
    for variable, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
    }.items():
        monkeypatch.setenv(variable, value)
    prefix = f"migration/{request.node.name.replace('_', '-')[:60]}"
    store = aws_module.AwsStore(aws_module.connect_aws("eu-west-1"), prefix, actor="migration-test")
    yield store
    store.close()


def test_sqlite_to_aws_and_back_keeps_every_value(aws: SecretStore, tmp_path: Path) -> None:
    source = source_store(tmp_path / "source.db")
    try:
        back = round_trip(source, aws, tmp_path)
        try:
            assert kept(back) == kept(source)
        finally:
            back.close()
    finally:
        source.close()


def test_the_cli_migrates_sqlite_to_aws_and_back(moto_endpoint: str, tmp_path: Path) -> None:
    """`restore --store aws-secretsmanager://…`, then `--store aws-secretsmanager://… backup`, then
    `restore` into a new SQLite store, through the console script."""
    source = source_store(tmp_path / "source.db")
    try:
        source_values = kept(source)
    finally:
        source.close()
    (tmp_path / "backup-password").write_bytes(BACKUP_PASSWORD)
    aws_url = "aws-secretsmanager://eu-west-1/cli-migration"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MASTER_PASSWORD": "source",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }

    def run(*args: str) -> str:
        proc = subprocess.run(
            [str(SCRIPT), *args], capture_output=True, env=env, start_new_session=True, timeout=120
        )
        assert proc.returncode == 0, (args, proc.stderr.decode())
        return proc.stderr.decode()

    password = ("--backup-password-file", str(tmp_path / "backup-password"))
    run("--store", str(tmp_path / "source.db"), "backup", str(tmp_path / "one.smbackup"), *password)
    assert "into the store aws-secretsmanager://" in run(
        "restore", str(tmp_path / "one.smbackup"), "--store", aws_url, *password
    )
    run("--store", aws_url, "backup", str(tmp_path / "two.smbackup"), *password)
    back = tmp_path / "back" / "store.db"
    run("restore", str(tmp_path / "two.smbackup"), "--store", str(back), *password, "--kdf-profile", "test")
    restored = EncryptedStore.open(SqliteStorage(back), PasswordUnlock("source", kdf.TEST))
    try:
        assert kept(restored) == source_values
    finally:
        restored.close()


def test_a_backup_aws_cannot_hold_is_refused_before_any_write(aws: SecretStore, tmp_path: Path) -> None:
    source = source_store(tmp_path / "source.db")
    try:
        source.put("auth/EMPTY", b"")
        write_backup(source, tmp_path / "b.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    finally:
        source.close()
    with pytest.raises(InvalidInputError, match="empty value"):
        restore_into(aws, read_backup(tmp_path / "b.smbackup", BACKUP_PASSWORD).secrets)
    assert aws.list("", include_deleted=True) == []


def backup_with(tmp_path: Path, name: str, **metadata: Any) -> list[BackupSecret]:
    """The secrets of a backup of `source_store` plus `name` written last with `metadata`."""
    source = source_store(tmp_path / "source.db")
    try:
        source.put(name, b"v", **metadata)
        write_backup(source, tmp_path / "b.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    finally:
        source.close()
    return list(read_backup(tmp_path / "b.smbackup", BACKUP_PASSWORD).secrets)


class CountingWrites:
    """`store`, counting every call that could write (a restore refused up front makes none)."""

    def __init__(self, store: SecretStore) -> None:
        self._store = store
        self.writes = 0

    def __getattr__(self, attribute: str) -> Any:
        found = getattr(self._store, attribute)
        if attribute in {"put", "update_metadata", "delete", "destroy", "destroy_secret", "stage"}:
            self.writes += 1
        return found


@pytest.mark.parametrize(
    ("tags", "refused"),
    [
        ({"link": "https://example.test/?q=1"}, "tag 'link' of 'zz/LAST' has a character AWS does not allow"),
        ({f"k{n}": "v" for n in range(49)}, "'zz/LAST' would have 49 tags; AWS Secrets Manager holds 50"),
    ],
)
def test_a_backup_with_tags_aws_cannot_hold_is_refused_before_any_write(
    aws: SecretStore, tmp_path: Path, tags: dict[str, str], refused: str
) -> None:
    """A tag character AWS refuses, or 49 tags (ours take two: created-by, max-versions), are fine
    on SQLite; restore refuses them before its first write, as the other metadata limits."""
    secrets = backup_with(tmp_path, "zz/LAST", tags=tags)
    counting = CountingWrites(aws)
    with pytest.raises(InvalidInputError, match=rf"{re.escape(refused)}.*nothing was restored"):
        restore_into(cast(SecretStore, counting), secrets)
    assert counting.writes == 0
    assert aws.list("", include_deleted=True) == []


# ---- Vault KV v2 (the test server) ---------------------------------------------------------------------


@pytest.fixture
def vault() -> Iterator[SecretStore]:
    vault_module = pytest.importorskip("secrets_manager.store.vault")
    server = FakeVault().start()
    client = vault_module.connect_vault(
        server.address,
        environ={"VAULT_TOKEN": server.root_token},
        session=vault_module.retrying_session(attempts=3, backoff=0.001),
    )
    store = vault_module.VaultStore(client, "secret", actor="migration-test")
    yield store
    store.close()
    server.stop()


def test_sqlite_to_vault_and_back_keeps_every_value(vault: SecretStore, tmp_path: Path) -> None:
    source = source_store(tmp_path / "source.db")
    try:
        back = round_trip(source, vault, tmp_path)
        try:
            assert kept(back) == kept(source)
        finally:
            back.close()
    finally:
        source.close()


def test_a_backup_with_metadata_vault_cannot_hold_is_refused_before_any_write(
    vault: SecretStore, tmp_path: Path
) -> None:
    """An empty tag value is fine on SQLite and AWS; Vault's custom_metadata refuses it."""
    secrets = backup_with(tmp_path, "zz/LAST", tags={"empty": ""})
    counting = CountingWrites(vault)
    with pytest.raises(UnsupportedOperationError, match=r"tag 'empty' of 'zz/LAST'.*nothing was restored"):
        restore_into(cast(SecretStore, counting), secrets)
    assert counting.writes == 0
    assert vault.list("", include_deleted=True) == []


def pending_backup(tmp_path: Path) -> list[BackupSecret]:
    """A backup of a secret whose rotation was staged and never promoted (current 2, pending 3)."""
    source = EncryptedStore.create(
        SqliteStorage(tmp_path / "pending.db", create=True), PasswordUnlock("source", kdf.TEST)
    )
    try:
        source.put("svc/DB", b"db-deployed-ONE")
        source.put("svc/DB", b"db-deployed-TWO")
        source.stage("svc/DB", b"db-STAGED-never-deployed")
        write_backup(source, tmp_path / "pending.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    finally:
        source.close()
    return list(read_backup(tmp_path / "pending.smbackup", BACKUP_PASSWORD).secrets)


def test_a_pending_rotation_stays_pending_in_aws(aws: SecretStore, tmp_path: Path) -> None:
    result = restore_into(aws, pending_backup(tmp_path))
    assert aws.get("svc/DB").value.reveal() == b"db-deployed-TWO"
    assert aws.get("svc/DB", label=PENDING).value.reveal() == b"db-STAGED-never-deployed"
    assert (result.served, result.pending_left_out) == ((("svc/DB", 2, 2),), ())


def test_a_pending_rotation_is_left_out_of_vault(vault: SecretStore, tmp_path: Path) -> None:
    result = restore_into(vault, pending_backup(tmp_path))
    assert vault.get("svc/DB").value.reveal() == b"db-deployed-TWO"
    assert [v.version for v in vault.describe("svc/DB").versions] == [1, 2]
    assert (result.served, result.pending_left_out) == ((("svc/DB", 2, 2),), ("svc/DB",))


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_a_backup_reads_again_a_secret_written_or_deleted_after_its_listing(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A backup through the protocol lists every secret's metadata, then reads each one's versions.
    Another writer stored svc/A (its max_versions of 2 pruning version 1, listed) and deleted svc/B
    after the listing: the read of version 1 was refused, and the whole backup failed, exit 3
    ("no version 1"), as svc/B's read would have. A secret whose read fails so is read again
    whole (its metadata, then its versions): svc/A is backed up as it now is, svc/B is left out as
    deleted, as if the listing had come after."""
    from secrets_manager.store.aws import AwsStore
    from secrets_manager.store.vault import VaultStore, connect_vault

    server = FakeVault().start()
    prefix = f"migration/listed-{request.node.callspec.id}"

    def handle(actor: str) -> Any:
        if kind == "aws":  # AWS hides the versions past max_versions at once (it keeps them)
            from test_store_aws import aws_client

            return AwsStore(aws_client(request.getfixturevalue("moto_endpoint")), prefix, actor=actor)
        client = connect_vault(server.address, environ={"VAULT_TOKEN": server.root_token})
        return VaultStore(client, "secret", actor=actor)

    store, other = handle("backup"), handle("other-writer")
    try:
        store.put("svc/A", b"a-1", max_versions=2)
        store.put("svc/A", b"a-2")
        store.put("svc/B", b"b-1")
        store.put("svc/C", b"c-1")
        getting = store.get
        wrote: list[str] = []

        def get_after_another_writer(name: str, **selector: Any) -> Any:
            if name == "svc/A" and not wrote:
                wrote.append(name)
                other.put("svc/A", b"a-3")  # pruned (Vault) or hidden (AWS): version 1, listed
                other.delete("svc/B")
            return getting(name, **selector)

        store.get = get_after_another_writer  # type: ignore[method-assign]
        summary = write_backup(store, tmp_path / "b.smbackup", password=b"backup pw", kdf=kdf.TEST)
        assert wrote == ["svc/A"]
        assert summary.not_included == ("svc/B",)
        backup = read_backup(tmp_path / "b.smbackup", b"backup pw")
        by_name = {s.name: s for s in backup.secrets}
        assert sorted(by_name) == ["svc/A", "svc/C"]
        a = by_name["svc/A"]
        assert [(v.version, v.value) for v in a.versions] == [(2, b"a-2"), (3, b"a-3")]
        assert a.labels["current"] == 3
    finally:
        store.close()
        other.close()
        server.stop()


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_a_restored_deleted_secret_is_deleted_only_at_the_version_the_restore_wrote(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A deleted secret of the backup is restored as its versions, then deleted. Another writer's
    store landing between the restore's last write and that delete was hidden with it: the delete
    had no condition, the restore said it was done, and the writer's acknowledged value read as
    deleted. The delete is now on condition that the version the restore wrote is current: it is
    refused, and the restore is undone but for that name, which holds the other writer's version."""
    from secrets_manager.store.aws import AwsStore
    from secrets_manager.store.vault import VaultStore, connect_vault

    server = FakeVault().start()
    prefix = f"migration/deleted-{request.node.callspec.id}"

    def handle(actor: str) -> Any:
        if kind == "aws":
            from test_store_aws import aws_client

            return AwsStore(aws_client(request.getfixturevalue("moto_endpoint")), prefix, actor=actor)
        client = connect_vault(server.address, environ={"VAULT_TOKEN": server.root_token})
        return VaultStore(client, "secret", actor=actor)

    source = EncryptedStore.create(
        SqliteStorage(tmp_path / "gone.db", create=True), PasswordUnlock("source", kdf.TEST)
    )
    try:
        source.put("svc/GONE", b"gone-ONE")
        source.delete("svc/GONE")
        write_backup(source, tmp_path / "gone.smbackup", password=BACKUP_PASSWORD, kdf=kdf.TEST)
    finally:
        source.close()
    secrets = list(read_backup(tmp_path / "gone.smbackup", BACKUP_PASSWORD).secrets)
    store, other = handle("restore"), handle("other-writer")
    try:
        deleting = store.delete
        wrote: list[object] = []

        def delete_after_another_writer(name: str, **kwargs: Any) -> None:
            if not wrote:
                wrote.append(other.put(name, b"other-WRITE"))
            deleting(name, **kwargs)

        store.delete = delete_after_another_writer  # type: ignore[method-assign]
        with pytest.raises(Exception, match="svc/GONE") as caught:
            restore_into(store, secrets)
        assert wrote
        assert "did not write" in str(caught.value), caught.value
        assert other.describe("svc/GONE").deleted is None
        assert other.get("svc/GONE").value.reveal() == b"other-WRITE"
    finally:
        store.close()
        other.close()
        server.stop()
