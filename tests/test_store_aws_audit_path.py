"""Where an AWS store's default audit log lives: one file per account, region, endpoint and prefix,
as its audit key and anchor are per account. Two accounts (staging and prod credentials with the
same URL) used to share `aws-REGION-PREFIX.audit.jsonl`, and the second failed as forged (exit 6).
A log kept under that old name is adopted by the account it belongs to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from secrets_manager.errors import StorageError
from secrets_manager.store import aws as aws_module
from secrets_manager.store.aws import AwsAccount
from secrets_manager.store.url import default_audit_path, legacy_audit_path
from test_cli_external_stores import REGION, Cli, assert_one_line_error, aws_cli, aws_prefix, unused_address

SHARED_FIXTURES = (aws_cli, aws_prefix)  # pytest finds them here by name

PROD_ACCOUNT = "111111111111"


@pytest.fixture
def staging(aws_cli: Cli) -> Cli:
    """moto's default account, 123456789012."""
    return aws_cli


@pytest.fixture
def prod(aws_cli: Cli, moto_endpoint: str) -> Cli:
    """The same store URL and home directory with credentials of another account."""
    sts = boto3.client(
        "sts",
        endpoint_url=moto_endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    role = f"arn:aws:iam::{PROD_ACCOUNT}:role/ops"
    credentials = sts.assume_role(RoleArn=role, RoleSessionName="ops")["Credentials"]
    return Cli(
        {
            **aws_cli.env,
            "AWS_ACCESS_KEY_ID": credentials["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": credentials["SecretAccessKey"],
            "AWS_SESSION_TOKEN": credentials["SessionToken"],
        }
    )


def logs(home: Path) -> list[str]:
    return sorted(p.name for p in (home / ".local/share/secrets-manager").glob("*.audit.jsonl"))


def test_two_accounts_with_one_url_keep_two_logs(staging: Cli, prod: Cli, tmp_path: Path) -> None:
    assert staging("store", "auth/DB_PASSWORD", input=b"staging-pw").code == 0
    assert prod("store", "auth/DB_PASSWORD", input=b"prod-pw").code == 0
    assert prod("get", "auth/DB_PASSWORD").out == "prod-pw\n"
    assert staging("get", "auth/DB_PASSWORD").out == "staging-pw\n"
    assert staging("audit", "verify").out.startswith("audit log verified: 3 records")
    assert prod("audit", "verify").out.startswith("audit log verified: 3 records")
    names = logs(tmp_path)
    assert len(names) == 2
    assert [n.split("-")[1] for n in names] == [PROD_ACCOUNT, "123456789012"]


def test_a_log_under_the_old_name_is_adopted_by_its_own_account_only(
    staging: Cli, prod: Cli, tmp_path: Path, aws_prefix: str
) -> None:
    old = tmp_path / ".local/share/secrets-manager" / f"aws-{REGION}-{aws_prefix}.audit.jsonl"
    # What the old default wrote: staging's log (and its anchor) under the shared name.
    assert staging("--audit-file", str(old), "store", "svc/A", input=b"v1").code == 0
    assert staging("--audit-file", str(old), "get", "svc/A").code == 0
    before = old.read_bytes()
    # prod's log never was this one: prod starts its own and leaves it.
    first = prod("store", "svc/A", input=b"p1")
    assert first.code == 0 and "audit log" not in first.stderr
    assert old.read_bytes() == before
    # staging's next command moves it, anchor and all, and the chain goes on.
    moved = staging("get", "svc/A")
    assert moved.code == 0 and moved.out == "v1\n"
    assert f"the audit log {old} of this store is now" in moved.stderr
    assert not old.exists()
    assert staging("audit", "verify").out.startswith("audit log verified: 4 records")
    assert prod("audit", "verify").out.startswith("audit log verified: 2 records")
    assert staging("get", "svc/A").stderr == ""  # once only
    [ours] = [n for n in logs(tmp_path) if "-123456789012-" in n]
    text = (tmp_path / ".local/share/secrets-manager" / ours).read_text()
    assert [json.loads(line)["seq"] for line in text.splitlines()] == [1, 2, 3, 4, 5]


def test_an_unreachable_sts_is_one_line_that_says_to_name_the_log(staging: Cli, tmp_path: Path) -> None:
    unreachable = {"AWS_ENDPOINT_URL_STS": f"http://{unused_address()}"}
    result = staging("list", env=unreachable)
    assert_one_line_error(result, 1, "cannot reach AWS STS", "--audit-file")
    assert staging("--audit-file", str(tmp_path / "named.jsonl"), "list", env=unreachable).code == 0


def test_the_account_is_asked_once_per_process(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from moto.sts.models import STSBackend

    for variable, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "once-per-process",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(variable, value)
    calls: list[str] = []
    asked = STSBackend.get_caller_identity

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append("GetCallerIdentity")
        return asked(self, *args, **kwargs)

    monkeypatch.setattr(STSBackend, "get_caller_identity", counted)
    url = f"aws-secretsmanager://{REGION}/trading"
    paths = {default_audit_path(url) for _ in range(3)}
    assert len(paths) == 1 and calls == ["GetCallerIdentity"]
    assert default_audit_path(url + "/other") != paths.pop() and len(calls) == 1


def test_the_name_holds_the_account_and_an_endpoint_only_if_not_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    where = {
        "eu-west-1": AwsAccount("123456789012"),
        "us-east-1": AwsAccount("123456789012", "http://h:4566"),
    }
    monkeypatch.setattr(aws_module, "aws_account", lambda region: where[region])
    path = default_audit_path("aws-secretsmanager://eu-west-1/trading")
    assert path.name == "aws-123456789012-eu-west-1-trading.audit.jsonl"
    assert path.parent.name == "secrets-manager"
    local = default_audit_path("aws-secretsmanager://us-east-1/trading").name
    assert local.startswith("aws-123456789012-us-east-1-h-4566-trading-") and len(local) == len(
        "aws-123456789012-us-east-1-h-4566-trading-12345678.audit.jsonl"
    )
    assert legacy_audit_path("aws-secretsmanager://eu-west-1/trading") == path.with_name(
        "aws-eu-west-1-trading.audit.jsonl"
    )


def test_sts_refusing_the_credentials_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A StorageError for what is not a refusal (AWS's throttling, a 5xx) names the way out too."""
    from botocore.exceptions import ClientError

    class Refusing:
        def get_caller_identity(self) -> Any:
            raise ClientError(
                {"Error": {"Code": "Throttling", "Message": "Rate exceeded"}}, "GetCallerIdentity"
            )

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "refused-here")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(aws_module.boto3.session.Session, "client", lambda self, *a, **k: Refusing())
    monkeypatch.setattr(aws_module, "connect_aws", lambda region: _FakeSecretsManager())
    with pytest.raises(StorageError, match=r"sts:GetCallerIdentity \(Throttling.*--audit-file"):
        aws_module.aws_account("eu-central-1")


class _FakeSecretsManager:
    class meta:  # boto3's attribute name
        endpoint_url = "https://secretsmanager.eu-central-1.amazonaws.com"

    def close(self) -> None:
        pass


@pytest.fixture
def sts_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The STS actions moto's server (in this process) answers, in order."""
    from moto.sts.models import STSBackend

    calls: list[str] = []
    for action in ("assume_role", "get_caller_identity"):
        answer = getattr(STSBackend, action)

        def counted(
            self: Any, *args: Any, _answer: Any = answer, _action: str = action, **kwargs: Any
        ) -> Any:
            calls.append(_action)
            return _answer(self, *args, **kwargs)

        monkeypatch.setattr(STSBackend, action, counted)
    return calls


def role_profile(aws_cli: Cli, home: Path, *, region: str | None) -> Cli:
    """aws_cli with no keys of its own: AWS_PROFILE assumes a role in PROD_ACCOUNT with the keys of
    a source profile (the usual way to reach a prod account; with mfa_serial, one prompt per
    AssumeRole)."""
    where = f"region = {region}\n" if region else ""
    (home / "aws-config").write_text(
        f"[profile base]\n{where}"
        f"[profile prod]\n{where}role_arn = arn:aws:iam::{PROD_ACCOUNT}:role/ops\nsource_profile = base\n"
    )
    (home / "aws-credentials").write_text(
        "[base]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    env = {k: v for k, v in aws_cli.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    return Cli(
        {
            **env,
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "AWS_PROFILE": "prod",
        }
    )


def test_a_command_assumes_the_role_of_its_profile_once(
    aws_cli: Cli, tmp_path: Path, sts_calls: list[str]
) -> None:
    """The default log needs the account: it is asked with the credentials the store uses, not
    with fresh ones (each fresh boto3 session assumed the role again: 7 AssumeRole per command)."""
    prod = role_profile(aws_cli, tmp_path, region=REGION)
    assert prod("--audit-file", str(tmp_path / "named.jsonl"), "store", "svc/A", input=b"v").code == 0
    assert sts_calls == ["assume_role"]
    for args in (("store", "svc/B"), ("get", "svc/B"), ("audit", "verify")):
        sts_calls.clear()
        result = prod(*args, input=b"v")
        assert result.code == 0, result.stderr
        assert sts_calls == ["assume_role", "get_caller_identity"], args
    assert [n.split("-")[1] for n in logs(tmp_path)] == [PROD_ACCOUNT]


def test_a_role_profile_without_a_region_uses_the_store_urls(aws_cli: Cli, tmp_path: Path) -> None:
    """The region is in the store URL only: STS (and the AssumeRole before it) is asked there too,
    as the store's own calls are; it failed 'cannot reach AWS STS (NoRegionError)'."""
    prod = role_profile(aws_cli, tmp_path, region=None)
    assert prod("--audit-file", str(tmp_path / "named.jsonl"), "store", "svc/A", input=b"v").code == 0
    result = prod("get", "svc/A")
    assert result.code == 0 and result.out == "v\n", result.stderr
    assert [n.split("-")[1] for n in logs(tmp_path)] == [PROD_ACCOUNT]


def test_a_configuration_problem_is_not_called_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import NoRegionError

    class Unconfigured:
        def get_caller_identity(self) -> Any:
            raise NoRegionError()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unconfigured-here")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(aws_module.boto3.session.Session, "client", lambda self, *a, **k: Unconfigured())
    monkeypatch.setattr(aws_module, "connect_aws", lambda region: _FakeSecretsManager())
    with pytest.raises(StorageError) as raised:
        aws_module.aws_account("eu-central-1")
    assert "cannot reach" not in str(raised.value)
    assert "NoRegionError" in str(raised.value) and "--audit-file" in str(raised.value)


def test_a_long_prefix_gets_a_default_log_name_the_file_system_takes(aws_cli: Cli, tmp_path: Path) -> None:
    """A valid 256-character prefix made the default log's name pass NAME_MAX (255 bytes): every
    command failed, with "internal error (OSError)" or "File name too long". Now the name is cut
    and ends in a hash of the whole name, so two long prefixes still keep two logs."""
    names = []
    for last in "ab":
        prefix = "p" * 255 + last
        long = Cli({**aws_cli.env, "SECRETS_MANAGER_STORE": f"aws-secretsmanager://{REGION}/{prefix}"})
        stored = long("store", "svc/K", input=last.encode())
        assert stored.code == 0, stored.stderr
        assert long("get", "svc/K").out == f"{last}\n"
        assert long("audit", "verify").out.startswith("audit log verified: 3 records")
        (name,) = set(logs(tmp_path)) - set(names)
        names.append(name)
    assert all(len(name) <= 223 and name.startswith("aws-123456789012-us-east-1-") for name in names)
    assert names[0] != names[1]
