"""AWS KMS auto-unlock (store/kms.py) against moto's KMS on 127.0.0.1: a store whose root key a KMS
key wraps opens with AWS credentials and no password, through the CLI, the service and the SDK's
local mode; it switches to a password and back; a wrong key, a changed header, missing credentials
and an unreachable KMS each give one line and their exit code.

Known moto divergence, not relied on: moto decrypts under a disabled key, where AWS answers
DisabledException. That error and AWS's other documented refusals are checked with botocore's
Stubber instead (the last test)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from moto_fixtures import moto_environ, moto_kms
from secrets_manager.client import Client
from secrets_manager.crypto import DataKey, kdf
from secrets_manager.crypto.aead import new_key
from secrets_manager.crypto.keyset import KeyStatus
from secrets_manager.crypto.record import record_key_id
from secrets_manager.errors import (
    AccessDeniedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StorageError,
    UnlockError,
)
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import AwsKmsUnlock, EncryptedStore, PasswordUnlock
from secrets_manager.store.encrypted import unlock_kind
from secrets_manager.store.keys import rotate_root_key
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import POLICY, make_pki, run_script, start_server

REGION = "eu-west-1"
VALUE = "kms-unlocked-SEEKRIT"
NEW_PASSWORD = "a-new-master-password"


def aws_environ(endpoint: str) -> dict[str, str]:
    return moto_environ(endpoint, REGION)


@pytest.fixture
def kms(moto_endpoint: str) -> Any:
    return moto_kms(moto_endpoint, REGION)


@pytest.fixture
def key_arn(kms: Any) -> str:
    return str(kms.create_key(Description="secrets-manager test")["KeyMetadata"]["Arn"])


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's boto3 pointed at moto (for the in-process tests)."""
    environ = aws_environ(moto_endpoint)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return environ


class Cli:
    """The console script with AWS credentials for moto and no master password anywhere."""

    def __init__(self, directory: Path, endpoint: str) -> None:
        self.dir = directory
        self.store = directory / "store.db"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(directory),
            "SECRETS_MANAGER_STORE": str(self.store),
            **aws_environ(endpoint),
        }

    def __call__(
        self, *args: str, input: bytes = b"", env: Mapping[str, str | None] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """The command with `env` over the fixture's environment (a None value unsets one)."""
        return run_script(self.env, *args, input=input, env=env)

    def header(self) -> dict[str, Any]:
        with sqlite3.connect(self.store) as db:
            (raw,) = db.execute("SELECT value FROM entries WHERE key = 'core/header'").fetchone()
        return dict(json.loads(raw))

    def edit_header(self, **unlock_fields: Any) -> None:
        header = self.header()
        header["unlock"].update(unlock_fields)
        with sqlite3.connect(self.store) as db:
            db.execute(
                "UPDATE entries SET value = ? WHERE key = 'core/header'", (json.dumps(header).encode(),)
            )


@pytest.fixture
def cli(tmp_path: Path, moto_endpoint: str, key_arn: str) -> Cli:
    c = Cli(tmp_path, moto_endpoint)
    created = c("init", "--kms-key", key_arn)
    assert created.returncode == 0, created.stderr
    assert f"AWS KMS key {key_arn} unlocks it".encode() in created.stderr
    assert c("store", "binance/API_KEY", input=VALUE.encode()).returncode == 0
    return c


def test_a_kms_store_opens_with_aws_credentials_and_no_password(cli: Cli, key_arn: str) -> None:
    got = cli("get", "binance/API_KEY")
    assert (got.returncode, got.stdout) == (0, VALUE.encode() + b"\n")
    unlock = cli.header()["unlock"]
    assert unlock["kind"] == "aws-kms" and unlock["key_arn"] == key_arn and unlock["region"] == REGION
    assert "kdf" not in unlock  # no password was ever involved
    assert cli("audit", "verify").returncode == 0


def test_names_complete_on_a_kms_store_which_asks_no_password(cli: Cli) -> None:
    completion = {
        "_SECRETS_MANAGER_COMPLETE": "bash_complete",
        "COMP_WORDS": "secrets-manager get bin",
        "COMP_CWORD": "2",
    }
    offered = cli(env=completion)
    assert (offered.returncode, offered.stdout, offered.stderr) == (0, b"plain,binance/API_KEY\n", b"")


def test_init_takes_an_alias_and_records_the_keys_arn(tmp_path: Path, moto_endpoint: str, kms: Any) -> None:
    key = kms.create_key()["KeyMetadata"]
    kms.create_alias(AliasName="alias/secrets-manager-test", TargetKeyId=key["KeyId"])
    c = Cli(tmp_path, moto_endpoint)
    assert c("init", "--kms-key", "alias/secrets-manager-test").returncode == 0
    assert c.header()["unlock"]["key_arn"] == key["Arn"]
    elsewhere = {"SECRETS_MANAGER_STORE": str(tmp_path / "b.db")}
    missing = c("init", "--kms-key", "alias/no-such-key", env=elsewhere)
    assert missing.returncode == 3 and b"AWS KMS key alias/no-such-key not found" in missing.stderr
    assert not (tmp_path / "b.db").exists()  # a refused init leaves nothing behind
    no_region = {**elsewhere, "AWS_DEFAULT_REGION": None, "AWS_CONFIG_FILE": str(tmp_path / "none")}
    unplaced = c("init", "--kms-key", "alias/secrets-manager-test", env=no_region)
    assert unplaced.returncode == 2
    assert b"give the key as an ARN or set AWS_DEFAULT_REGION" in unplaced.stderr
    assert not (tmp_path / "b.db").exists()


def test_a_header_naming_another_key_is_an_unlock_failure(cli: Cli, kms: Any) -> None:
    other = kms.create_key()["KeyMetadata"]["Arn"]
    cli.edit_header(key_arn=other)
    refused = cli("get", "binance/API_KEY")
    assert refused.returncode == 4
    assert b"AWS KMS refused to unwrap the root key with" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and VALUE.encode() not in refused.stdout + refused.stderr
    assert cli.header()["unlock"]["key_arn"] == other  # the failed unlock wrote nothing


def test_a_changed_root_key_id_fails_kmss_authentication(cli: Cli) -> None:
    cli.edit_header(root_key_id=cli.header()["unlock"]["root_key_id"] + 1)
    refused = cli("get", "binance/API_KEY")
    assert refused.returncode == 6 and b"integrity check failed" in refused.stderr


def test_an_unlock_kind_from_a_newer_version_says_upgrade_and_a_malformed_one_is_damage(cli: Cli) -> None:
    cli.edit_header(kind="shamir")
    newer = cli("get", "binance/API_KEY")
    assert newer.returncode == 1 and b"unlocked by 'shamir'" in newer.stderr and b"upgrade" in newer.stderr
    cli.edit_header(kind=7)
    assert cli("get", "binance/API_KEY").returncode == 6


def test_no_credentials_and_no_kms_each_say_what_to_do(cli: Cli, tmp_path: Path) -> None:
    no_credentials = cli(
        "get",
        "binance/API_KEY",
        env={
            "AWS_ACCESS_KEY_ID": "",
            "AWS_SECRET_ACCESS_KEY": "",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
        },
    )
    assert (
        no_credentials.returncode == 4 and b"no AWS credentials to call KMS Decrypt" in no_credentials.stderr
    )
    unreachable = cli(
        "get", "binance/API_KEY", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_MAX_ATTEMPTS": "1"}
    )
    assert unreachable.returncode == 1 and b"cannot reach AWS KMS" in unreachable.stderr


def _switch_to_password(cli: Cli) -> None:
    """`unlock-with password` to NEW_PASSWORD (test KDF profile), from a password file."""
    (cli.dir / "new-password").write_text(NEW_PASSWORD + "\n")
    switched = cli(
        "unlock-with",
        "password",
        "--new-password-file",
        str(cli.dir / "new-password"),
        "--kdf-profile",
        "test",
    )
    assert switched.returncode == 0, switched.stderr


def test_unlock_with_switches_to_a_password_and_back_without_re_encrypting(cli: Cli, key_arn: str) -> None:
    records = _records(cli)
    _switch_to_password(cli)
    assert cli.header()["unlock"]["kind"] == "password"
    assert cli("get", "binance/API_KEY").returncode == 4  # now it needs the password
    with_password = cli("get", "binance/API_KEY", env={"MASTER_PASSWORD": NEW_PASSWORD})
    assert with_password.stdout == VALUE.encode() + b"\n"
    assert _records(cli) == records  # the root key was rewrapped: no secret record changed

    back = cli("unlock-with", "kms", key_arn, env={"MASTER_PASSWORD": NEW_PASSWORD})
    assert back.returncode == 0, back.stderr
    assert cli("get", "binance/API_KEY").stdout == VALUE.encode() + b"\n"
    assert cli("get", "binance/API_KEY", env={"MASTER_PASSWORD": "wrong"}).returncode == 0  # not asked
    operations = [(r["operation"], r["outcome"]) for r in _audit(cli)]
    assert operations.count(("unlock-with", "ok")) == 2
    assert cli("audit", "verify").returncode == 0


def test_status_names_the_kms_key_that_unlocks_the_store(cli: Cli, key_arn: str) -> None:
    """`status` said "unlocked by: aws-kms" and nothing of which key, which an SRE needs to grant
    a new replica's host kms:Decrypt or to know what a recovery replaces; the header holds its
    ARN. Now the table and --json name it (kms_key; null for a password). Fails on the old code."""
    shown = cli("status")
    assert shown.returncode == 0, shown.stderr
    assert f"aws-kms ({key_arn})" in shown.stdout.decode()
    doc = json.loads(cli("status", "--json").stdout)
    assert (doc["unlocked_by"], doc["kms_key"]) == ("aws-kms", key_arn)
    _switch_to_password(cli)
    doc = json.loads(cli("status", "--json", env={"MASTER_PASSWORD": NEW_PASSWORD}).stdout)
    assert (doc["unlocked_by"], doc["kms_key"]) == ("password", None)


def test_unlock_with_refuses_bad_arguments_before_opening(cli: Cli) -> None:
    assert cli("unlock-with", "kms").returncode == 2
    both = cli("unlock-with", "password", "arn:aws:kms:eu-west-1:111122223333:key/x")
    assert both.returncode == 2 and b"takes no key" in both.stderr
    assert cli.header()["unlock"]["kind"] == "aws-kms"


def test_passwd_on_a_kms_store_says_how_to_switch_and_changes_nothing(cli: Cli) -> None:
    before = cli.header()
    refused = cli("passwd")
    assert refused.returncode == 2
    assert b"unlocked by aws-kms, not a master password" in refused.stderr
    assert b"unlock-with password" in refused.stderr
    assert cli.header() == before


def test_keys_rotate_root_keeps_the_kms_key(cli: Cli, key_arn: str) -> None:
    old_root = cli.header()["root_key_id"]
    rotated = cli("keys", "rotate", "--root")
    assert rotated.returncode == 0 and b"the AWS KMS key is unchanged" in rotated.stderr
    header = cli.header()
    assert header["root_key_id"] != old_root
    assert header["unlock"]["root_key_id"] == header["root_key_id"] and header["unlock"]["key_arn"] == key_arn
    assert cli("get", "binance/API_KEY").stdout == VALUE.encode() + b"\n"


def test_a_kms_store_is_backed_up_under_its_own_password_and_restores(cli: Cli, key_arn: str) -> None:
    copy = cli("backup", str(cli.dir / "copy.smbackup"))
    assert copy.returncode == 2 and b"give --backup-password-file" in copy.stderr
    assert not (cli.dir / "copy.smbackup").exists()
    (cli.dir / "backup-password").write_text("a-backup-password\n")
    backup_password = ("--backup-password-file", str(cli.dir / "backup-password"))
    made = cli("backup", str(cli.dir / "b.smbackup"), *backup_password)
    assert made.returncode == 0, made.stderr
    restored = cli(
        "restore",
        str(cli.dir / "b.smbackup"),
        "--store",
        str(cli.dir / "restored.db"),
        *backup_password,
        "--kdf-profile",
        "test",
        env={"MASTER_PASSWORD": NEW_PASSWORD},
    )
    assert restored.returncode == 0, restored.stderr
    got = cli(
        "--store",
        str(cli.dir / "restored.db"),
        "get",
        "binance/API_KEY",
        env={"MASTER_PASSWORD": NEW_PASSWORD},
    )
    assert got.stdout == VALUE.encode() + b"\n"
    # Into a new store that KMS unlocks: init it, then restore into it (empty, so allowed).
    kms_store = {"SECRETS_MANAGER_STORE": str(cli.dir / "kms-restored.db")}
    assert cli("init", "--kms-key", key_arn, env=kms_store).returncode == 0
    into_kms = cli("restore", str(cli.dir / "b.smbackup"), *backup_password, env=kms_store)
    assert into_kms.returncode == 0, into_kms.stderr
    assert cli("get", "binance/API_KEY", env=kms_store).stdout == VALUE.encode() + b"\n"


def test_the_service_serves_a_kms_store_without_a_password(
    tmp_path: Path, moto_endpoint: str, key_arn: str, aws_env: dict[str, str]
) -> None:
    make_pki(tmp_path, ("ops",))
    (tmp_path / "policy.toml").write_text(POLICY)  # ops administers everything
    store = EncryptedStore.create(SqliteStorage(tmp_path / "store.db", create=True), AwsKmsUnlock(key_arn))
    store.put("market-connector/API_KEY", VALUE.encode())
    store.close()
    # An empty MASTER_PASSWORD: the service must not ask for one at all.
    server = start_server(tmp_path, environment={**aws_env, "MASTER_PASSWORD": ""})
    try:
        response = server.stub("ops").GetSecret(
            pb.GetSecretRequest(name="market-connector/API_KEY"), timeout=10
        )
        assert response.secret.value == VALUE.encode()
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_production_shape_postgresql_store_unlocked_by_kms(
    tmp_path: Path, moto_endpoint: str, key_arn: str, postgres_cluster: Any
) -> None:
    """The production combination: a PostgreSQL store that KMS unlocks. init, store and get with
    the database password in PGPASSWORD and AWS credentials, and no master password anywhere."""
    c = Cli(tmp_path, moto_endpoint)
    url = f"{postgres_cluster.url()}?schema={postgres_cluster.new_schema()}"
    env = {"SECRETS_MANAGER_STORE": url, "SHRIVENQUANT_ENV": "production", **postgres_cluster.env()}
    created = c("init", "--kms-key", key_arn, env=env)
    assert created.returncode == 0, created.stderr
    assert c("store", "market-connector/API_KEY", input=VALUE.encode(), env=env).returncode == 0
    got = c("get", "market-connector/API_KEY", env=env)
    assert (got.returncode, got.stdout) == (0, VALUE.encode() + b"\n")
    assert c("audit", "verify", env=env).returncode == 0


def test_the_sdks_local_mode_reads_a_kms_store_without_a_password(
    cli: Cli, aws_env: dict[str, str], tmp_path: Path
) -> None:
    with Client(environ={"SECRETS_MANAGER_STORE": str(cli.store)}) as client:
        assert client.credentials()["binance/API_KEY"].reveal() == VALUE.encode()
    # A password store named the same way still says which password is missing, when it is opened.
    password_store = tmp_path / "password.db"
    EncryptedStore.create(SqliteStorage(password_store, create=True), PasswordUnlock("pw", kdf.TEST)).close()
    unnamed = {"SECRETS_MANAGER_STORE": str(password_store)}
    with pytest.raises(UnlockError, match="MASTER_PASSWORD_FILE"), Client(environ=unnamed) as client:
        client.credentials()


def test_the_root_key_round_trips_with_the_root_key_id_bound(key_arn: str, aws_env: dict[str, str]) -> None:
    root = DataKey(id=12345, status=KeyStatus.ENABLED, created=1, material=new_key())
    unlock = AwsKmsUnlock(key_arn)
    section = unlock.wrap(root)
    assert root.material.hex() not in json.dumps(section) and "material" not in repr(unlock)
    assert AwsKmsUnlock().unwrap(section, created=1).material == root.material
    with pytest.raises(IntegrityError):
        AwsKmsUnlock().unwrap({**section, "root_key_id": 12346}, created=1)
    with pytest.raises(IntegrityError):
        AwsKmsUnlock().unwrap({**section, "wrapped_root_key": "not base64!"}, created=1)
    with pytest.raises(UnlockError, match="not AWS KMS"):
        AwsKmsUnlock().unwrap(PasswordUnlock("pw", kdf.TEST).wrap(root), created=1)


def _records(cli: Cli) -> dict[str, bytes]:
    """The store's secret records (everything but the header and root-sealed entries)."""
    with sqlite3.connect(cli.store) as db:
        return {
            key: bytes(value)
            for key, value in db.execute("SELECT key, value FROM entries")
            if key.startswith("data/")
        }


def _audit(cli: Cli) -> list[dict[str, Any]]:
    log = cli.dir / "store.audit.jsonl"  # beside the store
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize(
    ("operation", "code", "expected"),
    [
        ("decrypt", "DisabledException", UnlockError),
        ("decrypt", "KMSInvalidStateException", UnlockError),  # e.g. pending deletion
        ("decrypt", "IncorrectKeyException", UnlockError),
        ("decrypt", "KeyUnavailableException", UnlockError),
        ("decrypt", "AccessDeniedException", UnlockError),
        ("decrypt", "InvalidCiphertextException", IntegrityError),
        ("decrypt", "KMSInternalException", StorageError),
        ("encrypt", "NotFoundException", NotFoundError),
        ("encrypt", "AccessDeniedException", AccessDeniedError),
        ("encrypt", "DisabledException", InvalidInputError),
        ("encrypt", "InvalidKeyUsageException", InvalidInputError),  # an asymmetric key
        ("encrypt", "ExpiredTokenException", UnlockError),  # the credentials, not the key
        ("decrypt", "UnrecognizedClientException", UnlockError),
    ],
)
def test_kms_refusals_moto_does_not_give_map_like_aws_documents_them(
    operation: str, code: str, expected: type[Exception]
) -> None:
    """AWS's documented errors of Encrypt and Decrypt, from botocore's Stubber (moto decrypts
    under a disabled key, for one): each is one of our errors, naming the key and no material."""
    client = boto3.client(
        "kms", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    arn = f"arn:aws:kms:{REGION}:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    root = DataKey(id=7, status=KeyStatus.ENABLED, created=1, material=new_key())
    section = {
        "kind": "aws-kms",
        "key_arn": arn,
        "region": REGION,
        "root_key_id": 7,
        "wrapped_root_key": "AAAA",
    }
    unlock = AwsKmsUnlock(arn, connect=lambda _region: client)
    with Stubber(client) as stubber:
        stubber.add_client_error(operation, service_error_code=code, http_status_code=400)
        with pytest.raises(expected) as caught:
            if operation == "decrypt":
                unlock.unwrap(section, created=1)
            else:
                unlock.wrap(root)
    message = str(caught.value)
    assert root.material.hex() not in message and len(message.splitlines()) == 1
    if expected is not IntegrityError:
        assert arn in message


# An IAM principal allowed kms:Encrypt but not kms:Decrypt (moto does not enforce IAM): loaded into
# the console script through PYTHONPATH, it makes every Decrypt of that process AccessDeniedException.
_NO_DECRYPT = """
import botocore.client
from botocore.exceptions import ClientError
_call = botocore.client.BaseClient._make_api_call
def _refusing(self, operation, params):
    if operation == "Decrypt":
        error = {"Code": "AccessDeniedException", "Message": "not authorized to perform kms:Decrypt"}
        raise ClientError({"Error": error}, operation)
    return _call(self, operation, params)
botocore.client.BaseClient._make_api_call = _refusing
"""


@pytest.fixture
def encrypt_only(tmp_path: Path) -> dict[str, str]:
    """The environment that gives a console script Encrypt without Decrypt."""
    directory = tmp_path / "encrypt-only"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(_NO_DECRYPT)
    return {"PYTHONPATH": str(directory)}


def test_unlock_with_kms_is_refused_where_kms_would_not_decrypt_and_the_password_stays(
    tmp_path: Path, moto_endpoint: str, key_arn: str, encrypt_only: dict[str, str]
) -> None:
    c = Cli(tmp_path, moto_endpoint)
    password = {"MASTER_PASSWORD": NEW_PASSWORD}
    assert c("init", "--kdf-profile", "test", env=password).returncode == 0
    assert c("store", "binance/API_KEY", input=VALUE.encode(), env=password).returncode == 0
    refused = c("unlock-with", "kms", key_arn, env={**password, **encrypt_only})
    assert refused.returncode == 5, refused.stderr
    message = refused.stderr.decode()
    assert "kms:Decrypt" in message and key_arn in message and len(message.strip().splitlines()) == 1
    assert c.header()["unlock"]["kind"] == "password"
    assert c("get", "binance/API_KEY", env=password).stdout == VALUE.encode() + b"\n"


def test_init_with_a_kms_key_this_host_cannot_decrypt_with_leaves_no_store(
    tmp_path: Path, moto_endpoint: str, key_arn: str, encrypt_only: dict[str, str]
) -> None:
    c = Cli(tmp_path, moto_endpoint)
    refused = c("init", "--kms-key", key_arn, env=encrypt_only)
    assert refused.returncode == 5 and b"kms:Decrypt" in refused.stderr
    assert not c.store.exists()


def test_wrap_unwraps_what_it_wrapped_before_handing_the_section_back() -> None:
    """A root key rotation (`keys rotate --root`) by a host that has lost kms:Decrypt must not write a
    header it cannot read back either: the round trip is in `AwsKmsUnlock.wrap`, which every writer of
    a KMS section (init, unlock-with, recovery unlock-with, keys rotate --root) calls."""
    client = boto3.client(
        "kms", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    arn = f"arn:aws:kms:{REGION}:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    root = DataKey(id=99, status=KeyStatus.ENABLED, created=1, material=new_key())
    with Stubber(client) as stubber:
        stubber.add_response("encrypt", {"KeyId": arn, "CiphertextBlob": b"wrapped"})
        stubber.add_client_error("decrypt", service_error_code="AccessDeniedException", http_status_code=400)
        with pytest.raises(AccessDeniedError, match="kms:Decrypt") as caught:
            AwsKmsUnlock(arn, connect=lambda _region: client).wrap(root)
    assert root.material.hex() not in str(caught.value)
    with Stubber(client) as stubber:  # KMS handing back other bytes than it was given
        stubber.add_response("encrypt", {"KeyId": arn, "CiphertextBlob": b"wrapped"})
        stubber.add_response("decrypt", {"KeyId": arn, "Plaintext": new_key()})
        with pytest.raises(IntegrityError):
            AwsKmsUnlock(arn, connect=lambda _region: client).wrap(root)


def test_a_password_change_from_a_handle_opened_before_a_switch_to_kms_is_refused(
    tmp_path: Path, key_arn: str, aws_env: dict[str, str]
) -> None:
    """A switches the store to KMS; B, opened before with the old password, runs passwd: B must
    fail (exit 7), not silently put a password back in place of the KMS key."""
    path = tmp_path / "store.db"
    EncryptedStore.create(
        SqliteStorage(path, create=True), PasswordUnlock("old-password-1", kdf.TEST)
    ).close()
    a = EncryptedStore.open(SqliteStorage(path), PasswordUnlock("old-password-1"))
    b = EncryptedStore.open(SqliteStorage(path), PasswordUnlock("old-password-1"))
    try:
        a.change_unlock(AwsKmsUnlock(key_arn))
        with pytest.raises(ConflictError, match="run the command again"):
            b.change_password(b"bobs-new-password")
        storage = SqliteStorage(path)
        try:
            assert unlock_kind(storage) == "aws-kms"
            EncryptedStore.open(storage, AwsKmsUnlock())
        finally:
            storage.close()
    finally:
        a.close()
        b.close()


def test_a_long_lived_password_handle_follows_a_switch_to_kms_and_a_root_rotation(
    tmp_path: Path, key_arn: str, aws_env: dict[str, str]
) -> None:
    """`serve` opened with a password file; an administrator then runs `unlock-with kms` and `keys
    rotate --root`. The header now names the KMS key, so serve re-unlocks through KMS rather than
    failing every call with "put the new password in its password file" (there is none)."""
    serve, admin = _serve_beside_a_switch_to_kms(tmp_path / "store.db", key_arn)
    try:
        assert serve.get("app/x").value.reveal() == b"v"
        assert serve.get("app/y").value.reveal() == b"w"
        serve.put("app/z", b"written by serve after the switch")
        assert admin.get("app/z").value.reveal() == b"written by serve after the switch"
    finally:
        serve.close()
        admin.close()


def test_a_handle_that_cannot_use_kms_after_the_switch_says_so(
    tmp_path: Path, key_arn: str, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve, admin = _serve_beside_a_switch_to_kms(tmp_path / "store.db", key_arn)
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")  # this process has no AWS credentials
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        with pytest.raises(ConflictError) as caught:
            serve.get("app/y")
        message = str(caught.value)
        assert "now unlocked by AWS KMS" in message and "restart serve" in message
        assert "password file" not in message
    finally:
        serve.close()
        admin.close()


def _serve_beside_a_switch_to_kms(path: Path, key_arn: str) -> tuple[EncryptedStore, EncryptedStore]:
    """A store holding app/x; a handle opened with its password as serve opens it (re-reading
    the password when the root changes), and an admin handle that then switched the store to the
    KMS key, rotated the root key and wrote app/y. Both are the caller's to close."""
    created = EncryptedStore.create(
        SqliteStorage(path, create=True), PasswordUnlock("old-password-1", kdf.TEST)
    )
    created.put("app/x", b"v")
    created.close()
    serve = EncryptedStore.open(SqliteStorage(path), PasswordUnlock("old-password-1"))
    serve.renew_unlock_with(lambda: PasswordUnlock("old-password-1"))
    admin = EncryptedStore.open(SqliteStorage(path), PasswordUnlock("old-password-1"))
    admin.change_unlock(AwsKmsUnlock(key_arn))
    rotate_root_key(admin)
    admin.put("app/y", b"w")
    return serve, admin


def _swap_in_a_root_key_of_ones_own(path: Path, key_arn: str) -> DataKey:
    """What someone who may write the store file but knows no password can do: rewrite the header
    alone to an `aws-kms` section wrapping a root key of their own (their KMS key, which the
    victim's credentials may use). Returns that root key."""
    theirs = DataKey(id=0x0BADF00D, status=KeyStatus.ENABLED, created=0, material=new_key())
    raw = SqliteStorage(path)
    try:
        entry = raw.get("core/header")
        assert entry is not None
        header = json.loads(entry.value)
        header.update(root_key_id=theirs.id, unlock=AwsKmsUnlock(key_arn).wrap(theirs))
        raw.put("core/header", json.dumps(header).encode(), expect=entry.revision)
    finally:
        raw.close()
    return theirs


def _sealed_under(path: Path, root_id: int) -> list[str]:
    """The entries of the store file that are records sealed under the root key `root_id`."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT key, value FROM entries WHERE key != 'core/header'").fetchall()
    return [key for key, value in rows if record_key_id(value) == root_id]


@pytest.mark.parametrize("holds", ["audit key", "keyset"])
def test_a_running_handle_refuses_a_root_key_put_in_the_header_by_someone_without_the_old_one(
    tmp_path: Path, key_arn: str, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, holds: str
) -> None:
    """A password-opened handle (serve's, the SDK's) used to adopt the root key the header names
    through the KMS key named there, and seal its next namespace's keyset under it: the attacker
    then read the new secret offline. The root key does not open the store's own audit key (or
    keysets), so it is refused; the handle keeps its own root key for what it can still do."""
    path = tmp_path / "store.db"
    created = EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock("pw-1", kdf.TEST))
    created.put("auth/OLD", b"old")
    if holds == "audit key":
        created.audit_key()
    created.close()
    serving = EncryptedStore.open(SqliteStorage(path), PasswordUnlock("pw-1"))
    serving.renew_unlock_with(lambda: PasswordUnlock("pw-1"))
    try:
        theirs = _swap_in_a_root_key_of_ones_own(path, key_arn)
        unwraps: list[object] = []
        original = AwsKmsUnlock.unwrap
        monkeypatch.setattr(AwsKmsUnlock, "unwrap", lambda *a, **k: unwraps.append(a) or original(*a, **k))
        for _ in range(2):
            with pytest.raises(IntegrityError) as caught:
                serving.put("payments/STRIPE_KEY", b"sk_live_victim_secret")
            message = str(caught.value)
            assert "header names a root key that does not open this store's own keys" in message
            assert "replaced or damaged" in message and "sk_live" not in message
            assert "Treat this as tampering: restore the store file (or its core/header entry)" in message
            assert "audit reset" not in message
        assert len(unwraps) == 1  # the refused header is not unwrapped (a KMS call) again each time
        assert _sealed_under(path, theirs.id) == []
        assert serving.get("auth/OLD").value.reveal() == b"old"  # still served, under its own root
        serving.put("auth/NEW", b"new")
        assert _sealed_under(path, theirs.id) == []
        assert serving._root.id != theirs.id and serving.unlock_kind == "password"
    finally:
        serving.close()
