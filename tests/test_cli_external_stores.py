"""The real `secrets-manager` console script on Vault and AWS stores (`--store vault://…`,
`--store aws-secretsmanager://…`): the same commands and exit codes as on the encrypted store, no
master password, auditing kept, and interop with plain hvac / boto3 calls both ways.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import hvac
import pytest
from botocore.config import Config

from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.backup import write_backup
from tcp_proxy import AnswerCut, SilentServer
from vault_server import FakeVault

SCRIPT = Path(sys.executable).with_name("secrets-manager")
REGION = "us-east-1"


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8")


class Cli:
    """The console script with one store URL, no master password and no terminal."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}

    def __call__(self, *args: str, input: bytes = b"", env: Mapping[str, str | None] | None = None) -> Result:
        full_env = dict(self.env)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        proc = subprocess.run(
            [str(SCRIPT), *args],
            input=input,
            capture_output=True,
            env=full_env,
            start_new_session=True,
            timeout=120,
        )
        stderr = proc.stderr.decode("utf-8", errors="replace")
        assert "Traceback" not in stderr, stderr
        return Result(proc.returncode, proc.stdout, stderr)


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    assert result.code == code, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secrets-manager: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- Vault -----------------------------------------------------------------------------------------


@pytest.fixture
def vault_cli(fake_vault: FakeVault, tmp_path: Path) -> Cli:
    return Cli(
        {
            "HOME": str(tmp_path),
            "SECRETS_MANAGER_STORE": fake_vault.address.replace("http://", "vault+http://") + "/secret",
            "VAULT_TOKEN": fake_vault.root_token,
        }
    )


@pytest.fixture
def hvac_client(fake_vault: FakeVault) -> hvac.Client:
    return hvac.Client(url=fake_vault.address, token=fake_vault.root_token)


def test_a_secret_written_with_hvac_is_read_through_the_cli(vault_cli: Cli, hvac_client: hvac.Client) -> None:
    hvac_client.secrets.kv.v2.create_or_update_secret(
        path="market-connector/BINANCE_API_KEY", secret={"value": "from-hvac"}, mount_point="secret"
    )
    assert vault_cli("get", "market-connector/BINANCE_API_KEY").out == "from-hvac\n"
    assert vault_cli("list").out == "market-connector/BINANCE_API_KEY\n"


def test_a_secret_written_through_the_cli_is_read_with_hvac(vault_cli: Cli, hvac_client: hvac.Client) -> None:
    assert vault_cli("store", "auth/DB_PASSWORD", "--description", "db", input=b"from-cli\n").code == 0
    read = hvac_client.secrets.kv.v2.read_secret_version(
        path="auth/DB_PASSWORD", mount_point="secret", raise_on_deleted_version=True
    )
    assert read["data"]["data"] == {"value": "from-cli"}
    metadata = hvac_client.secrets.kv.v2.read_secret_metadata(path="auth/DB_PASSWORD", mount_point="secret")
    assert metadata["data"]["custom_metadata"]["secrets-manager:description"] == "db"


def test_a_vault_secret_with_more_tags_than_ours_can_still_lose_some(
    vault_cli: Cli, hvac_client: hvac.Client
) -> None:
    """Vault allows 64 custom_metadata keys; another tool may set 60. Our limit of 50 stops a
    change that adds tags, not one that removes some or changes the description."""
    hvac_client.secrets.kv.v2.create_or_update_secret(
        path="ext/S", secret={"value": "v"}, mount_point="secret"
    )
    hvac_client.secrets.kv.v2.update_metadata(
        path="ext/S", custom_metadata={f"k{i:02d}": "v" for i in range(60)}, mount_point="secret"
    )
    assert vault_cli("metadata", "ext/S", "--untag", "k00", "--description", "trimmed").code == 0
    doc = json.loads(vault_cli("metadata", "ext/S", "--json").out)
    assert len(doc["tags"]) == 59 and "k00" not in doc["tags"] and doc["description"] == "trimmed"
    assert_one_line_error(
        vault_cli("metadata", "ext/S", "--tag", "new=1"), 2, "would have 60 tags; the limit is 50"
    )


def test_a_field_of_a_secret_with_several_keys_is_selected(vault_cli: Cli, hvac_client: hvac.Client) -> None:
    hvac_client.secrets.kv.v2.create_or_update_secret(
        path="db/creds", secret={"username": "app", "password": "pw-1", "port": 5432}, mount_point="secret"
    )
    assert vault_cli("get", "db/creds#password").out == "pw-1\n"
    assert vault_cli("get", "db/creds#port").out == "5432\n"
    assert json.loads(vault_cli("get", "db/creds").out) == {
        "username": "app",
        "password": "pw-1",
        "port": 5432,
    }
    missing = vault_cli("get", "db/creds#missing")
    assert_one_line_error(missing, 3, "no field 'missing' (it has 3 fields; 'secrets-manager get db/creds'")
    assert "username" not in missing.stderr and "password" not in missing.stderr  # part of the value
    assert vault_cli("store", "db/plain", input=b"not json").code == 0
    assert_one_line_error(vault_cli("get", "db/plain#x"), 2, "not a JSON object")
    # `store NAME#FIELD` writes the one key back as a Vault secret of several keys, the others kept.
    assert vault_cli("store", "db/creds#password", input=b"pw-2").code == 0
    data = hvac_client.secrets.kv.v2.read_secret_version(
        path="db/creds", mount_point="secret", raise_on_deleted_version=True
    )["data"]
    assert data["data"] == {"username": "app", "password": "pw-2", "port": 5432}
    assert data["metadata"]["version"] == 2
    # A whole object over it too; one that would not read back the same ({"value": …}) stays text.
    assert vault_cli("store", "db/creds", input=b'{"username": "app2", "password": "pw-3"}').code == 0
    data = hvac_client.secrets.kv.v2.read_secret_version(
        path="db/creds", mount_point="secret", raise_on_deleted_version=True
    )["data"]
    assert data["data"] == {"username": "app2", "password": "pw-3"}
    assert vault_cli("store", "db/creds", input=b'{"value": "x"}').code == 0
    assert vault_cli("get", "db/creds").out == '{"value": "x"}\n'
    # Over a secret of ours (one "value" key), a JSON object stays text, byte for byte.
    text = b'{ "b": 1,\n  "a": "pw-4" }'
    assert vault_cli("store", "db/ours", "--raw", input=text).code == 0
    assert vault_cli("store", "db/ours", "--raw", input=text + b" ").code == 0
    assert vault_cli("get", "db/ours", "--raw").stdout == text + b" "


def test_every_verb_works_on_vault_with_the_usual_exit_codes(vault_cli: Cli) -> None:
    for value in (b"v1", b"v2", b"v3"):
        assert vault_cli("store", "svc/K", input=value).code == 0
    assert vault_cli("get", "svc/K").out == "v3\n"
    assert vault_cli("get", "svc/K", "--label", "previous").out == "v2\n"
    assert vault_cli("get", "svc/K", "--version", "1").out == "v1\n"
    history = json.loads(vault_cli("history", "svc/K", "--json").out)
    assert [(v["version"], v["labels"]) for v in history["versions"]] == [
        (1, []),
        (2, ["previous"]),
        (3, ["current"]),
    ]
    assert_one_line_error(vault_cli("get", "svc/NOPE"), 3, "svc/NOPE")
    assert_one_line_error(vault_cli("store", "svc/K", "--expect-version", "1", input=b"x"), 7, "version 3")
    assert_one_line_error(vault_cli("get", "svc/K", "--label", "pending"), 2, "not supported by this store")
    assert_one_line_error(vault_cli("store", "bad name", input=b"x"), 2)
    assert vault_cli("delete", "svc/K").code == 0
    assert_one_line_error(vault_cli("get", "svc/K"), 3)
    assert_one_line_error(vault_cli("store", "svc/K", input=b"x"), 7, "undelete")
    assert "svc/K" in vault_cli("list", "--deleted").out
    assert vault_cli("undelete", "svc/K").code == 0
    assert vault_cli("destroy", "svc/K", "--version", "1").code == 0
    assert_one_line_error(vault_cli("get", "svc/K", "--version", "1"), 3, "destroyed")
    assert vault_cli("destroy", "svc/K", "--version", "3").code == 0  # the current one: as on our store
    refused = vault_cli("get", "svc/K")
    assert_one_line_error(refused, 3, "the current version (3) of 'svc/K' was destroyed", "'rollback svc/K")
    assert vault_cli("destroy", "svc/K", "--all").code == 0
    assert_one_line_error(vault_cli("history", "svc/K"), 3)
    assert vault_cli("store", "svc/OLD", "--description", "d", "--tag", "t=1", input=b"moved").code == 0
    assert vault_cli("mv", "svc/OLD", "other/NEW").code == 0
    assert vault_cli("get", "other/NEW").out == "moved\n"
    assert "t=1" in vault_cli("metadata", "other/NEW").out
    assert_one_line_error(vault_cli("get", "svc/OLD"), 3, "deleted")
    assert vault_cli("purge", "--older-than", "1h").code == 0
    assert "svc/OLD" in vault_cli("list", "--deleted").out  # deleted just now: kept
    purged = vault_cli("purge", "svc/", "--older-than", "0s", "--json")
    assert purged.code == 0, purged.stderr
    assert [m["name"] for m in json.loads(purged.out)["purged"]] == ["svc/OLD"]
    assert "svc/OLD" not in vault_cli("list", "--deleted").out
    assert vault_cli("get", "other/NEW").out == "moved\n"


def check_import_metadata_and_status(cli: Cli, tmp_path: Path, kind: str) -> None:
    """The commands of the encrypted store that take any store: import, metadata, status."""
    source = tmp_path / "svc.env"
    source.write_bytes(b"A=one\nB='two'\n")
    imported = cli("import", str(source), "--service", "imp")
    assert imported.code == 0, imported.stderr
    assert cli("get", "imp/B").out == "two\n"
    assert_one_line_error(cli("import", str(source), "--service", "imp"), 7, "exist already")
    assert cli("metadata", "imp/A", "--description", "from .env", "--tag", "team=t").code == 0
    doc = json.loads(cli("metadata", "imp/A", "--json").out)
    assert (doc["description"], doc["tags"], doc["current_version"]) == ("from .env", {"team": "t"}, 1)
    assert cli("list", "--tag", "team=t", "--description", "FROM").out == "imp/A\n"
    assert cli("list", "--tag", "team").out == "imp/A\n" and cli("list", "--tag", "team=u").out == ""
    # When a lower max_versions takes effect depends on the store: AWS only filters what we show.
    limited = cli("metadata", "imp/A", "--max-versions", "3")
    assert limited.code == 0, limited.stderr
    if kind == "aws-secretsmanager":
        assert "versions past it are hidden at once" in limited.stderr and "next write" not in limited.stderr
    else:
        assert "the next write prunes the oldest unlabelled versions past it" in limited.stderr
    status = json.loads(cli("status", "--json").out)
    assert (status["kind"], status["unlocked_by"], status["secrets"]) == (kind, "backend credentials", 2)
    assert status["audit_verified"] is True and status["recovery_shares"] is None


def test_import_metadata_and_status_work_on_vault(vault_cli: Cli, tmp_path: Path) -> None:
    check_import_metadata_and_status(vault_cli, tmp_path, "vault")


def test_vault_errors_reach_the_user_as_exit_codes(vault_cli: Cli, fake_vault: FakeVault) -> None:
    assert_one_line_error(vault_cli("list", env={"VAULT_TOKEN": "wrong"}), 5, "permission denied")
    assert_one_line_error(vault_cli("list", env={"VAULT_TOKEN": None}), 4, "VAULT_TOKEN")
    fake_vault.seal()
    assert_one_line_error(vault_cli("get", "svc/K"), 1, "sealed")


def test_a_rollback_whose_expiry_write_was_refused_says_it_rolled_back_and_audits_the_version(
    vault_cli: Cli, fake_vault: FakeVault, tmp_path: Path
) -> None:
    """rollback writes the old value as a new version, then that version's expiry (KV v2 metadata,
    a second request). The second refused (a policy without `patch` or `update` on metadata), the
    error was the store's "do not store the value again" and the audit record had no version: a
    rollback that was made looked like one refused. Now the one line says the rollback was made
    and only its expiry is missing, and the record names the version written."""
    vault_cli("store", "svc/K", "--expires", "2099-01-01T00:00:00Z", input=b"first")
    vault_cli("store", "svc/K", input=b"second")
    fake_vault.add_policy(
        "no-metadata",
        'path "secret/data/*" { capabilities = ["create", "read", "update"] }\n'
        'path "secret/metadata/*" { capabilities = ["read", "list"] }\n'
        'path "secret/metadata/.secrets-manager/*" { capabilities = ["create", "read", "update"] }\n',
    )
    token = fake_vault.add_token("hvs.no-metadata", policies=["no-metadata"])
    result = vault_cli("rollback", "svc/K", env={"VAULT_TOKEN": token})
    assert_one_line_error(
        result,
        5,
        "rolled back svc/K: version 3 is current, with the value of version 1",
        "denied",
        "do not roll back again",
    )
    assert vault_cli("get", "svc/K").out.rstrip("\n") == "first"
    records = [json.loads(line) for line in _audit_log(tmp_path).read_text().splitlines()]
    last = [r for r in records if r["operation"] == "rollback"][-1]
    assert (last["outcome"], last["version"]) == ("access_denied", 3), last


def _audit_log(home: Path) -> Path:
    (log,) = (home / ".local/share/secrets-manager").glob("*.audit.jsonl")
    return log


def test_commands_of_our_own_encryption_are_not_supported_on_vault(vault_cli: Cli) -> None:
    assert_one_line_error(vault_cli("init"), 2, "not supported by this store")
    assert_one_line_error(vault_cli("passwd"), 2, "not supported by this store")
    assert_one_line_error(vault_cli("keys", "status"), 2, "not supported by this store")


def test_plain_http_vault_is_refused_in_production(vault_cli: Cli) -> None:
    assert_one_line_error(vault_cli("list", env={"SHRIVENQUANT_ENV": "production"}), 2, "plain http")


def test_the_cli_audits_vault_operations_with_the_anchor_in_vault(
    vault_cli: Cli, fake_vault: FakeVault, tmp_path: Path
) -> None:
    vault_cli("store", "svc/A", input=b"audited-value")
    vault_cli("get", "svc/A")
    log = (
        tmp_path
        / ".local/share/secrets-manager"
        / f"vault-127.0.0.1-{fake_vault.address.rsplit(':', 1)[1]}-secret.audit.jsonl"
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["operation"], r["outcome"]) for r in records] == [
        ("store", "pending"),
        ("store", "ok"),
        ("get", "ok"),
    ]
    assert all(r["mac"] for r in records) and b"audited-value" not in log.read_bytes()
    anchors = [k for k in fake_vault.mounts["secret"] if k.startswith(".secrets-manager/audit-anchor/")]
    assert len(anchors) == 1
    assert vault_cli("audit", "verify").out.startswith("audit log verified: 3 records")
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:-1]))  # cut the tail
    assert_one_line_error(vault_cli("audit", "verify"), 6, "missing")


def backup_file(
    tmp_path: Path, values: Mapping[str, list[bytes]], *, staged: bytes | None = None
) -> list[str]:
    """A password backup of a new SQLite store holding `values` (`staged`: a pending value of the
    last secret), and the restore arguments that open it."""
    source = EncryptedStore.create(
        SqliteStorage(tmp_path / "source.db", create=True), PasswordUnlock("source", kdf.TEST)
    )
    try:
        for name, versions in values.items():
            for value in versions:
                source.put(name, value)
            if staged is not None:
                source.stage(name, staged)
        write_backup(source, tmp_path / "b.smbackup", password=b"backup password", kdf=kdf.TEST)
    finally:
        source.close()
    (tmp_path / "backup-password").write_bytes(b"backup password")
    return [str(tmp_path / "b.smbackup"), "--backup-password-file", str(tmp_path / "backup-password")]


def check_overwrite_numbers_from_one_again(cli: Cli, tmp_path: Path) -> None:
    """Vault and AWS destroy an overwritten secret and write it again: its numbering restarts, so a
    number from before the restore names another value after it, and the restore says so."""
    backup = backup_file(tmp_path, {"svc/K": [b"from-the-backup"]})
    for value in (b"a", b"b", b"c"):
        assert cli("store", "svc/K", input=value).code == 0
    result = cli("restore", *backup, "--on-existing", "overwrite")
    assert result.code == 0, result.stderr
    assert "numbers the overwritten secrets' versions from 1 again" in result.stderr
    assert "version number from before this restore may now name another value" in result.stderr
    assert cli("store", "svc/K", input=b"NEW").out == "stored svc/K version 2\n"


def test_an_overwriting_restore_into_vault_says_it_numbers_from_one_again(
    vault_cli: Cli, tmp_path: Path
) -> None:
    check_overwrite_numbers_from_one_again(vault_cli, tmp_path)


def test_a_restore_into_vault_leaves_a_pending_value_out_and_audits_what_vault_serves(
    vault_cli: Cli, tmp_path: Path
) -> None:
    """A backup of a secret with an unfinished rotation: Vault has no `pending`, and written last
    the staged value would be current there. It is left out with a warning naming the secret; the
    restore's record for it has Vault's version and the fingerprint of the value Vault serves."""
    backup = backup_file(tmp_path, {"svc/DB": [b"deployed-credential"]}, staged=b"staged-never-deployed")
    result = vault_cli("restore", *backup)
    assert result.code == 0, result.stderr
    assert "warning: svc/DB: its pending version" in result.stderr
    assert vault_cli("get", "svc/DB").stdout == b"deployed-credential\n"
    (log,) = (tmp_path / ".local/share/secrets-manager").glob("*.audit.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    (record,) = [r for r in records if (r["operation"], r["name"]) == ("restore", "svc/DB")]
    assert record["version"] == 1
    served = vault_cli("audit", "hash", "--raw", input=b"deployed-credential").out.strip()
    assert record["value_hmac"] == served


def files_under(home: Path) -> list[Path]:
    return sorted(home.rglob("*"))


def unused_address() -> str:
    """127.0.0.1 and a port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def audit_records(home: Path) -> list[tuple[str, str, str]]:
    (log,) = (home / ".local/share/secrets-manager").glob("*.audit.jsonl")
    return [
        (r["operation"], r["decision"], r["outcome"]) for r in map(json.loads, log.read_text().splitlines())
    ]


def test_a_vault_command_that_fails_before_doing_anything_leaves_no_audit_file(
    vault_cli: Cli, fake_vault: FakeVault, tmp_path: Path
) -> None:
    """Vault unreachable, a token it refuses, no token at all: nothing was done and nothing could
    be audited (the anchor lives in Vault), so no audit file, lock file or data directory appears."""
    before = files_under(tmp_path)
    unreachable = {"SECRETS_MANAGER_STORE": f"vault+http://{unused_address()}/secret"}
    for args, env, code, needle in (
        (("list",), unreachable, 1, "cannot reach Vault"),
        (("store", "svc/K"), unreachable, 1, "cannot reach Vault"),
        (("get", "svc/K"), {"VAULT_TOKEN": "wrong"}, 5, "permission denied"),
        (("list",), {"VAULT_TOKEN": None}, 4, "VAULT_TOKEN"),
    ):
        assert_one_line_error(vault_cli(*args, input=b"v", env=env), code, needle)
        assert files_under(tmp_path) == before, (args, env, files_under(tmp_path))
    # One that reached Vault and was refused or failed there is audited, as before.
    fake_vault.approles["role-1"] = "secret-1"
    login = {"VAULT_TOKEN": None, "VAULT_ROLE_ID": "role-1", "VAULT_SECRET_ID": "wrong"}
    assert_one_line_error(vault_cli("list", env=login), 4, "AppRole")
    assert_one_line_error(vault_cli("get", "svc/MISSING"), 3, "not found")
    read_only = fake_vault.add_token("read-only-token", readonly=True)
    assert_one_line_error(vault_cli("store", "svc/K", input=b"v", env={"VAULT_TOKEN": read_only}), 5)
    assert audit_records(tmp_path) == [
        ("unlock", "deny", "unlock_failed"),
        ("get", "allow", "not_found"),
        ("store", "allow", "pending"),
    ]


def test_a_vault_store_whose_answer_was_lost_says_it_may_have_been_made_and_audits_it_so(
    vault_cli: Cli, fake_vault: FakeVault, tmp_path: Path
) -> None:
    """Vault carried the write out and the connection was reset as its answer came back: one line,
    exit 1, saying the change may have been made (it was) and to check first, and an audit outcome
    of `outcome_unknown`, not `storage_error`."""
    assert vault_cli("store", "app/K", input=b"one").code == 0
    host, port = fake_vault.address.removeprefix("http://").split(":")
    proxy = AnswerCut(host, int(port), b"POST /v1/secret/data/app/K")
    log = tmp_path / "through-the-proxy.audit.jsonl"
    try:
        env = {
            "SECRETS_MANAGER_STORE": f"vault+http://{proxy.address}/secret",
            "SECRETS_MANAGER_AUDIT_FILE": str(log),
        }
        result = vault_cli("store", "app/K", input=b"two", env=env)
    finally:
        proxy.close()
    assert proxy.cut
    assert_one_line_error(
        result,
        1,
        f"Vault at http://{proxy.address} did not answer store app/K",
        "the change may have been made",
    )
    assert "cannot reach" not in result.stderr
    got = vault_cli("history", "app/K", "--json")
    assert got.code == 0 and [v["version"] for v in json.loads(got.stdout)["versions"]][-1] == 2
    assert vault_cli("get", "app/K").out == "two\n"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["operation"], r["outcome"]) for r in records] == [
        ("store", "pending"),
        ("store", "outcome_unknown"),
    ]


def test_a_kv_version_1_mount_is_refused_in_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    vault = FakeVault(kv1_mounts=("kv",)).start()
    try:
        vault.kv1["kv"]["auth/DB_PASSWORD"] = {"value": "existing"}
        cli = Cli(
            {
                "HOME": str(tmp_path),
                "SECRETS_MANAGER_STORE": vault.address.replace("http://", "vault+http://") + "/kv",
                "VAULT_TOKEN": vault.root_token,
            }
        )
        for args in (("get", "auth/DB_PASSWORD"), ("list",), ("store", "market/API_KEY")):
            assert_one_line_error(
                cli(*args, input=b"hunter2"),
                2,
                "kv is a KV version 1 mount; secrets-manager needs KV version 2 "
                "(vault kv enable-versioning kv)",
            )
        assert vault.kv1["kv"] == {"auth/DB_PASSWORD": {"value": "existing"}}  # no audit key, no value
    finally:
        vault.stop()


# ---- AWS -------------------------------------------------------------------------------------------


@pytest.fixture
def aws_prefix() -> str:
    return f"cli-{secrets.token_hex(4)}"


@pytest.fixture
def aws_cli(moto_endpoint: str, aws_prefix: str, tmp_path: Path) -> Cli:
    return Cli(
        {
            "HOME": str(tmp_path),
            "SECRETS_MANAGER_STORE": f"aws-secretsmanager://{REGION}/{aws_prefix}",
            "AWS_ENDPOINT_URL": moto_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )


@pytest.fixture
def boto(moto_endpoint: str) -> Any:
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    ).client("secretsmanager", endpoint_url=moto_endpoint, config=Config(retries={"mode": "standard"}))


def test_a_secret_written_with_boto3_is_read_through_the_cli(
    aws_cli: Cli, boto: Any, aws_prefix: str
) -> None:
    boto.create_secret(Name=f"{aws_prefix}/auth/DB_PASSWORD", SecretString="from-boto3")
    boto.create_secret(Name=f"{aws_prefix}/svc/BIN", SecretBinary=b"\x00\xffbin")
    assert aws_cli("get", "auth/DB_PASSWORD").out == "from-boto3\n"
    assert aws_cli("get", "svc/BIN", "--raw").stdout == b"\x00\xffbin"
    assert aws_cli("list").out.splitlines() == ["auth/DB_PASSWORD", "svc/BIN"]


def test_edit_on_aws_does_not_give_the_editor_the_aws_credentials(
    aws_cli: Cli, tmp_path: Path, boto: Any, aws_prefix: str
) -> None:
    """As `run` withholds them from its command on an AWS store: they reached the store."""
    report = tmp_path / "editor-environment.json"
    script = tmp_path / "editor.py"
    script.write_text(
        "import json, os, sys\n"
        f"json.dump(sorted(os.environ), open({str(report)!r}, 'w'))\n"
        "open(sys.argv[-1], 'w').write('edited-on-aws')\n"
    )
    aws_cli("store", "auth/EDITED", input=b"before")
    edited = aws_cli("edit", "auth/EDITED", env={"EDITOR": f"{sys.executable} {script}"})
    assert edited.code == 0, edited.stderr
    environment = json.loads(report.read_text())
    assert "AWS_SECRET_ACCESS_KEY" not in environment and "AWS_ACCESS_KEY_ID" not in environment
    assert "HOME" in environment  # the rest is the editor's
    assert boto.get_secret_value(SecretId=f"{aws_prefix}/auth/EDITED")["SecretString"] == "edited-on-aws"


def test_a_secret_written_through_the_cli_is_read_with_boto3(
    aws_cli: Cli, boto: Any, aws_prefix: str
) -> None:
    assert aws_cli("store", "market/KEY", "--tag", "team=desk1", input=b"from-cli\n").code == 0
    assert aws_cli("store", "market/KEY", input=b"second").code == 0
    reply = boto.get_secret_value(SecretId=f"{aws_prefix}/market/KEY")
    assert reply["SecretString"] == "second" and "AWSCURRENT" in reply["VersionStages"]
    previous = boto.get_secret_value(SecretId=f"{aws_prefix}/market/KEY", VersionStage="AWSPREVIOUS")
    assert previous["SecretString"] == "from-cli"
    tags = boto.describe_secret(SecretId=f"{aws_prefix}/market/KEY")["Tags"]
    assert {"Key": "team", "Value": "desk1"} in tags


def test_a_field_of_a_json_aws_secret_is_selected(aws_cli: Cli, boto: Any, aws_prefix: str) -> None:
    boto.create_secret(Name=f"{aws_prefix}/db/rds", SecretString='{"username": "app", "password": "pw-2"}')
    assert aws_cli("get", "db/rds#password").out == "pw-2\n"
    assert aws_cli("store", "db/rds#password", input=b"pw-3").code == 0
    stored = boto.get_secret_value(SecretId=f"{aws_prefix}/db/rds")["SecretString"]
    assert json.loads(stored) == {"username": "app", "password": "pw-3"}


def test_every_verb_works_on_aws_with_the_usual_exit_codes(aws_cli: Cli) -> None:
    for value in (b"v1", b"v2", b"v3"):
        assert aws_cli("store", "svc/K", input=value).code == 0
    assert aws_cli("get", "svc/K", "--label", "previous").out == "v2\n"
    assert aws_cli("get", "svc/K", "--version", "1").out == "v1\n"
    assert_one_line_error(aws_cli("get", "svc/K", "--label", "pending"), 3, "pending")
    assert_one_line_error(aws_cli("get", "svc/NOPE"), 3, "svc/NOPE")
    assert_one_line_error(aws_cli("store", "svc/K", "--expect-version", "2", input=b"x"), 7, "version 3")
    assert_one_line_error(
        aws_cli("store", "svc/EMPTY", "--allow-empty", input=b""), 2, "not supported by this store"
    )
    assert_one_line_error(aws_cli("destroy", "svc/K", "--version", "1"), 2, "not supported by this store")
    assert aws_cli("store", "svc/OLD", "--description", "d", "--tag", "t=1", input=b"moved").code == 0
    assert aws_cli("cp", "svc/OLD", "other/NEW").code == 0
    assert aws_cli("get", "other/NEW").out == aws_cli("get", "svc/OLD").out == "moved\n"
    assert "t=1" in aws_cli("metadata", "other/NEW").out
    assert aws_cli("get", "svc/K", "--version", "1").out == "v1\n"
    assert aws_cli("delete", "svc/K").code == 0
    assert_one_line_error(aws_cli("get", "svc/K"), 3, "deleted")
    assert_one_line_error(aws_cli("store", "svc/K", input=b"x"), 7, "undelete")
    assert aws_cli("undelete", "svc/K").code == 0
    assert aws_cli("get", "svc/K").out == "v3\n"
    assert aws_cli("delete", "svc/K").code == 0
    # AWS purges a deleted secret itself at the end of its recovery window.
    assert_one_line_error(aws_cli("purge", "--older-than", "0s"), 2, "recovery window")
    assert "svc/K" in aws_cli("list", "--deleted").out
    assert aws_cli("destroy", "svc/K", "--all").code == 0
    assert_one_line_error(aws_cli("history", "svc/K"), 3)


def test_import_metadata_and_status_work_on_aws(aws_cli: Cli, tmp_path: Path) -> None:
    check_import_metadata_and_status(aws_cli, tmp_path, "aws-secretsmanager")


def test_an_import_aws_cannot_hold_whole_imports_nothing(aws_cli: Cli, tmp_path: Path) -> None:
    """import checks the file before its first write, but not what AWS's put refuses: an empty
    value (--allow-empty) after a good one left the good one imported, exit 2 with "1 of 2 secret(s)
    were imported"; the encrypted store and Vault import both. Found by the differential test's
    probe of import. Refused now before the first write, in one line, as is a name too long for
    AWS under the prefix (PREFIX/NAME over 512 characters)."""
    (tmp_path / "mixed.env").write_text("GOOD=v1\nEMPTY=\n")
    refused = aws_cli("import", str(tmp_path / "mixed.env"), "--service", "svc", "--allow-empty")
    assert_one_line_error(refused, 2, "not supported by this store", "EMPTY", "nothing was imported")
    assert aws_cli("list", "--deleted").out == ""
    prefix = "p" * 248 + secrets.token_hex(4)  # 256 characters, leaving 255 for a name
    long_prefix = Cli({**aws_cli.env, "SECRETS_MANAGER_STORE": f"aws-secretsmanager://{REGION}/{prefix}"})
    (tmp_path / "long.env").write_text(f"A=v1\n{'K' * 252}=v2\n")  # svc/KKK…: 256 characters
    refused = long_prefix("import", str(tmp_path / "long.env"), "--service", "svc")
    assert_one_line_error(refused, 2, "not supported by this store", "at most 512", "nothing was imported")
    assert long_prefix("list", "--deleted").out == ""


def test_list_older_than_and_history_times_on_aws(aws_cli: Cli) -> None:
    """The version's creation time, not the time of the call (moto is patched to AWS's behaviour)."""
    assert aws_cli("store", "svc/OLD", input=b"a").code == 0
    time.sleep(1.1)
    between = datetime.now(UTC).isoformat()
    time.sleep(1.1)
    assert aws_cli("store", "svc/NEW", input=b"b").code == 0
    assert aws_cli("list", "--older-than", between).out == "svc/OLD\n"
    assert aws_cli("metadata", "svc/NEW", "--tag", "env=prod").code == 0
    assert aws_cli("metadata", "svc/OLD", "--tag", "env=dev").code == 0
    assert aws_cli("list", "--older-than", between, "--tag", "env=dev").out == "svc/OLD\n"
    assert aws_cli("list", "--older-than", between, "--tag", "env=prod").out == ""
    assert aws_cli("list", "--tag", "env").out == "svc/NEW\nsvc/OLD\n"
    [version] = json.loads(aws_cli("history", "svc/OLD", "--json").out)["versions"]
    assert version["created"] < between


def test_a_tag_aws_would_refuse_leaves_the_secret_untouched(aws_cli: Cli, boto: Any, aws_prefix: str) -> None:
    """moto accepts `v!`; AWS would refuse it, for `store` after writing the new version."""
    assert aws_cli("store", "svc/T", "--tag", "team=desk1", input=b"v1").code == 0
    before = boto.describe_secret(SecretId=f"{aws_prefix}/svc/T")
    for args in (["store", "svc/T", "--tag", "k=v!"], ["metadata", "svc/T", "--tag", "k=v!"]):
        refused = aws_cli(*args, input=b"v2")
        assert_one_line_error(refused, 2, "tag 'k' of 'svc/T'", "_ . : / = + - @")
        assert "v!" not in refused.stderr
    assert_one_line_error(aws_cli("store", "svc/T", "--tag", "k?=v", input=b"v2"), 2, "tag key 'k?'")
    after = boto.describe_secret(SecretId=f"{aws_prefix}/svc/T")
    assert (after["Tags"], after["VersionIdsToStages"]) == (before["Tags"], before["VersionIdsToStages"])
    assert aws_cli("get", "svc/T").out == "v1\n"
    assert_one_line_error(aws_cli("store", "svc/NEW", "--tag", "k=v!", input=b"v"), 2, "tag 'k'")
    assert_one_line_error(aws_cli("history", "svc/NEW"), 3)


def test_an_overwriting_restore_into_aws_says_it_numbers_from_one_again(aws_cli: Cli, tmp_path: Path) -> None:
    check_overwrite_numbers_from_one_again(aws_cli, tmp_path)


def test_get_of_another_tools_aws_secret_needs_no_list_versions_permission(
    aws_cli: Cli, boto: Any, aws_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader's policy without secretsmanager:ListSecretVersionIds (moto, in this process, answers
    it as IAM would): the value is printed; its number is unknown (null, and none in the audit)."""
    from moto.secretsmanager.exceptions import SecretsManagerClientError
    from moto.secretsmanager.models import SecretsManagerBackend

    listed = SecretsManagerBackend.list_secret_version_ids

    def denied(self: Any, secret_id: str, *args: Any, **kwargs: Any) -> Any:
        if "/.secrets-manager/" in secret_id:
            return listed(self, secret_id, *args, **kwargs)
        raise SecretsManagerClientError("AccessDeniedException", "not authorized: ListSecretVersionIds", 400)

    boto.create_secret(Name=f"{aws_prefix}/svc/FROM_TERRAFORM", SecretString="tf-value")
    monkeypatch.setattr(SecretsManagerBackend, "list_secret_version_ids", denied)
    assert aws_cli("get", "svc/FROM_TERRAFORM").out == "tf-value\n"
    doc = json.loads(aws_cli("get", "svc/FROM_TERRAFORM", "--json").out)
    assert (doc["value"], doc["version"], doc["labels"]) == ("tf-value", None, ["current"])
    assert_one_line_error(aws_cli("history", "svc/FROM_TERRAFORM"), 5, "ListSecretVersionIds")
    (log,) = (tmp_path / ".local/share/secrets-manager").glob("*.audit.jsonl")
    gets = [r for r in map(json.loads, log.read_text().splitlines()) if r["operation"] == "get"]
    assert [(r["outcome"], r.get("version")) for r in gets] == [("ok", None), ("ok", None)]


def test_no_aws_credentials_is_exit_4(aws_cli: Cli) -> None:
    """Also where to put them on a host (an IAM role), and that the instance role was not looked
    for when AWS_EC2_METADATA_DISABLED says so (the test environment's)."""
    result = aws_cli("list", env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None})
    assert_one_line_error(result, 4, "no AWS credentials", "IAM role", "AWS_EC2_METADATA_DISABLED=true")


def test_an_aws_profile_that_does_not_exist_is_named_in_one_line(aws_cli: Cli) -> None:
    """AWS_PROFILE naming a profile neither ~/.aws file has was 'cannot configure AWS Secrets
    Manager (ProfileNotFound)', exit 1, naming neither the profile nor the variable."""
    result = aws_cli(
        "list", env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": "trading-prod"}
    )
    assert_one_line_error(result, 4, "no AWS profile 'trading-prod'", "AWS_PROFILE names", "unset it")


def test_the_cli_audits_aws_operations(aws_cli: Cli, boto: Any, aws_prefix: str) -> None:
    assert aws_cli("store", "svc/A", input=b"v").code == 0
    assert aws_cli("get", "svc/A").code == 0
    assert aws_cli("audit", "verify").out.startswith("audit log verified: 3 records")
    anchors = boto.list_secrets(
        Filters=[{"Key": "name", "Values": [f"{aws_prefix}/.secrets-manager/audit-anchor/"]}]
    )
    assert len(anchors["SecretList"]) == 1


def test_a_new_hostname_or_a_moved_log_is_anchored_anew_on_aws(
    aws_cli: Cli, boto: Any, aws_prefix: str, tmp_path: Path
) -> None:
    """Each host's log has its own anchor in AWS, under a scope of the hostname and the log's
    path: a pod restarted under a new hostname with the same audit volume, or a log moved, meets
    no anchor. That is a new scope, not an anchor deleted: every command stopped with exit 6
    ('the store has no audit anchor'), and the 'audit reset' it named broke the old scope too.
    The log goes on (its chain continues) and the new scope is anchored."""

    def records(path: Path) -> int:
        return len(path.read_bytes().splitlines())

    log = tmp_path / "volume" / "audit.jsonl"
    env = {"SECRETS_MANAGER_AUDIT_FILE": str(log)}
    assert aws_cli("store", "svc/A", input=b"v", env=env).code == 0
    assert aws_cli("get", "svc/A", env=env).out == "v\n"

    def on_another_host(*args: str, input: bytes = b"") -> Result:
        """The console script on a host named otherwise (what audit_scope_for reads)."""
        code = "import socket, sys; socket.gethostname = lambda: 'another-host'; "
        code += "from secrets_manager_entry import main; sys.exit(main())"
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            input=input,
            capture_output=True,
            env={**aws_cli.env, **env},
            timeout=120,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", errors="replace"))

    got = on_another_host("get", "svc/A")
    assert got.code == 0 and got.out == "v\n", got.stderr
    assert on_another_host("store", "svc/B", input=b"w").code == 0
    verified = on_another_host("audit", "verify")
    assert verified.out.startswith(f"audit log verified: {records(log)} records"), verified.stderr
    assert json.loads(on_another_host("status", "--json").out)["audit_verified"] is True
    # The first host goes on with the same log, which has moved past its anchor: still one chain.
    assert aws_cli("get", "svc/A", env=env).code == 0
    assert aws_cli("audit", "verify", env=env).out.startswith(f"audit log verified: {records(log)} records")
    # The log moved (another path: another scope) likewise.
    (tmp_path / "volume").rename(tmp_path / "moved")
    log = tmp_path / "moved" / "audit.jsonl"
    moved = {"SECRETS_MANAGER_AUDIT_FILE": str(log)}
    assert aws_cli("get", "svc/A", env=moved).code == 0
    assert aws_cli("audit", "verify", env=moved).out.startswith(f"audit log verified: {records(log)} records")
    assert [json.loads(line)["seq"] for line in log.read_bytes().splitlines()] == list(
        range(1, records(log) + 1)
    )
    anchors = boto.list_secrets(
        Filters=[{"Key": "name", "Values": [f"{aws_prefix}/.secrets-manager/audit-anchor/"]}]
    )
    assert len(anchors["SecretList"]) == 3


def test_an_aws_command_that_fails_before_doing_anything_leaves_no_audit_file(
    aws_cli: Cli, tmp_path: Path
) -> None:
    before = files_under(tmp_path)
    for env, code, needle in (
        ({"AWS_ENDPOINT_URL": f"http://{unused_address()}"}, 1, "cannot reach AWS"),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, 4, "AWS credentials"),
    ):
        assert_one_line_error(aws_cli("list", env=env), code, needle)
        assert files_under(tmp_path) == before, (env, files_under(tmp_path))
    assert_one_line_error(aws_cli("get", "svc/MISSING"), 3, "not found")  # reached AWS: audited
    assert audit_records(tmp_path) == [("get", "allow", "not_found")]


def test_a_vault_that_never_answers_is_one_line_naming_it(tmp_path: Path) -> None:
    """A stopped Vault (it accepts connections, never answers): 'get' took 159 s and printed two
    lines, the first blaming the audit log; 'store' blamed the audit log alone. Now each command
    waits one timeout (VAULT_CLIENT_TIMEOUT) and says which Vault did not answer, exit 1."""
    silent = SilentServer()
    address = silent.url
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_STORE": address.replace("http://", "vault+http://") + "/secret",
        "VAULT_TOKEN": "t",
        "VAULT_CLIENT_TIMEOUT": "1",
    }
    try:
        for command in (["get", "app/K"], ["store", "app/K"]):
            started = time.monotonic()
            proc = subprocess.run(
                [str(SCRIPT), *command], input=b"v", capture_output=True, env=env, timeout=30
            )
            result = Result(proc.returncode, proc.stdout, proc.stderr.decode())
            assert time.monotonic() - started < 8, command
            assert_one_line_error(result, 1, f"Vault at {address} did not answer within 1 s")
            assert "audit log" not in result.stderr
    finally:
        silent.close()


@pytest.mark.parametrize("endpoint", ["not a url", "http://", "http://[::1"])
def test_an_aws_endpoint_setting_that_is_not_a_url_is_one_line_exit_2(tmp_path: Path, endpoint: str) -> None:
    """AWS_ENDPOINT_URL set to something botocore cannot read as a URL ended every command on an
    AWS store, and `init --kms-key`, in 'internal error (ValueError)', exit 1: botocore raises
    ValueError ('Invalid endpoint: …') as it makes the client. Now one line naming the settings
    that give the endpoint, exit 2, nothing created. Fails on the old code."""
    cli = Cli(
        {
            "HOME": str(tmp_path),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    store = f"aws-secretsmanager://{REGION}/trading"
    said = "the AWS endpoint setting is not a URL (AWS_ENDPOINT_URL"
    assert_one_line_error(cli("--store", store, "list"), 2, said)  # the audit log's account: STS
    named = ("--store", store, "--audit-file", str(tmp_path / "a.jsonl"))
    assert_one_line_error(cli(*named, "get", "x/Y"), 2, said)  # Secrets Manager's own client
    kms_store = tmp_path / "kms" / "store.db"
    assert_one_line_error(cli("--store", str(kms_store), "init", "--kms-key", "alias/x"), 2, said)
    assert not kms_store.exists()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "aws-secretsmanager://eu-west-1/trading?kms.Bad%20NS=alias/k",
            "a kms.NAMESPACE option names no namespace",
        ),
        ("aws-secretsmanager://eu-west-1/trading?kms.=alias/k", "option 'kms.' names no namespace"),
        ("vault://127.0.0.1:9/secret?namespace=team%0Aa", "option 'namespace' is not a Vault namespace path"),
        (
            "vault+http://127.0.0.1:9/secret?namespace=%C3%A9quipe",
            "option 'namespace' is not a Vault namespace",
        ),
    ],
    ids=["kms-namespace-with-space", "kms-empty-namespace", "vault-newline", "vault-non-ascii"],
)
def test_a_bad_store_url_option_is_named_in_one_line(tmp_path: Path, url: str, says: str) -> None:
    """kms.NAMESPACE with no valid namespace said only 'invalid namespace ...: a namespace is the
    first segment of a name', naming neither the URL nor its option; a Vault namespace= that an HTTP
    header cannot carry was 'cannot reach Vault (InvalidHeader)' or an internal error."""
    cli = Cli(
        {"HOME": str(tmp_path), "VAULT_TOKEN": "t", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    )
    assert_one_line_error(cli("--store", url, "list"), 2, "store URL ", says, "write ")


@pytest.fixture
def tls_vault(tmp_path: Path) -> Iterator[tuple[FakeVault, Path]]:
    """The test Vault over https, with a certificate from a CA of its own (tmp_path/ca.pem)."""
    from secrets_manager.tls import pki

    ca_cert, ca_key = pki.new_ca(trust_domain="vault.test")
    (tmp_path / "ca.pem").write_bytes(ca_cert)
    cert, key = pki.issue(ca_cert, ca_key, "vault", server=True)
    (tmp_path / "vault.pem").write_bytes(cert)
    (tmp_path / "vault-key.pem").write_bytes(key)
    vault = FakeVault().start(tls=(str(tmp_path / "vault.pem"), str(tmp_path / "vault-key.pem")))
    yield vault, tmp_path
    vault.stop()


def test_a_vault_certificate_that_is_not_trusted_says_to_set_vault_cacert(
    tls_vault: tuple[FakeVault, Path],
) -> None:
    """Vault behind TLS with a private CA: without VAULT_CACERT every command said 'cannot reach
    Vault (SSLError); check the address and that Vault is running', about a Vault that answered; a
    VAULT_CACERT naming a missing file was 'internal error (OSError)'. Now one line each says what
    to do (the other cases: test_store_vault.py)."""
    vault, home = tls_vault
    store = "vault://" + vault.address.removeprefix("https://") + "/secret"
    base = {"HOME": str(home), "VAULT_TOKEN": vault.root_token}
    untrusted = Cli(base)("--store", store, "list")
    assert_one_line_error(
        untrusted, 1, "presented a certificate that is not trusted", "set VAULT_CACERT to the"
    )
    missing = Cli({**base, "VAULT_CACERT": str(home / "nope.pem")})("--store", store, "list")
    assert_one_line_error(missing, 2, "VAULT_CACERT names", "cannot be read")


@pytest.mark.parametrize(
    "namespace", ["team\na", "\u00e9quipe", " team"], ids=["newline", "non-ascii", "leading-space"]
)
def test_a_bad_vault_namespace_variable_is_named_in_one_line(tmp_path: Path, namespace: str) -> None:
    """VAULT_NAMESPACE goes out as a header as the URL's namespace= does: one with a line end or a
    character that is not ASCII was 'cannot reach Vault (InvalidHeader)' or an internal error."""
    cli = Cli({"HOME": str(tmp_path), "VAULT_TOKEN": "t", "VAULT_NAMESPACE": namespace})
    result = cli("--store", "vault+http://127.0.0.1:9/secret", "list")
    assert_one_line_error(result, 2, "VAULT_NAMESPACE is not a Vault namespace path", "set it to one")
