"""`secrets-manager policy check|explain`, run in process: what the service would decide, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secrets_manager.cli import run
from secrets_manager.tls import pki

POLICY = """
[identities]
"spiffe://shrivenquant.local/auth" = ["auth-reader"]
"market-connector" = ["mc-reader"]

[roles.auth-reader]
rules = [
  { path = "auth/*", capabilities = ["read", "list"] },
  { path = "auth/admin-*", deny = ["read"] },
]

[roles.mc-reader]
rules = [{ path = "market-connector/*", capabilities = ["read"] }]

[roles.spare]
rules = []
"""
AUTH = "spiffe://shrivenquant.local/auth"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return path


def test_check_summarises_a_valid_policy_and_warns_of_roles_nobody_holds(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["policy", "check", str(policy_file)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"secrets-manager: warning: {policy_file}: role 'spare' is held by no identity",
        f"secrets-manager: {policy_file}: valid: 2 identities, 3 roles, 3 rules",
    ]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[identities]\n'x' = ['ghost']\n", "role 'ghost' is not defined"),
        ("[roles.r]\nrules = [{ path = 'a/*', capabilities = ['fly'] }]\n", "unknown capability 'fly'"),
        ("not toml at all [", "not valid TOML"),
    ],
)
def test_check_refuses_a_broken_policy_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    assert run(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.startswith("secrets-manager: error: ")


def test_explain_shows_every_capability_with_the_deciding_rule(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["policy", "explain", str(policy_file), AUTH, "auth/admin-token"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"identity  {AUTH}", "roles     auth-reader", "name      auth/admin-token"]
    decided = {line.split()[0]: line.split(None, 2)[1:] for line in lines[3:]}
    assert decided["read"] == ["denied", "denied by role auth-reader rule 'auth/admin-*'"]
    assert decided["list"] == ["allowed", "allowed by role auth-reader rule 'auth/*'"]
    assert decided["write"] == ["denied", "no rule grants it"]
    assert sorted(decided) == ["admin", "delete", "list", "read", "rotate", "write"]


def test_explain_one_capability_exits_5_when_denied(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run(
            [
                "policy",
                "explain",
                str(policy_file),
                "market-connector",
                "market-connector/KEY",
                "--capability",
                "read",
            ]
        )
        == 0
    )
    assert (
        run(["policy", "explain", str(policy_file), "market-connector", "auth/DB", "--capability", "read"])
        == 5
    )
    err = capsys.readouterr().err
    assert "market-connector may not read 'auth/DB': no rule grants it" in err
    assert run(["policy", "explain", str(policy_file), "stranger", "auth/DB", "--capability", "list"]) == 5
    assert "identity has no roles" in capsys.readouterr().err


def test_explain_takes_the_identity_from_a_certificate_as_the_service_does(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_cert, ca_key = pki.new_ca()
    cert, _key = pki.issue(ca_cert, ca_key, "auth", server=False)
    (tmp_path / "auth.pem").write_bytes(cert)
    args = ["policy", "explain", str(policy_file), "--cert", str(tmp_path / "auth.pem"), "auth/DB", "--json"]
    assert run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["identity"], doc["roles"], doc["name"]) == (AUTH, ["auth-reader"], "auth/DB")
    assert doc["decisions"]["read"] == {
        "allowed": True,
        "reason": "allowed by role auth-reader rule 'auth/*'",
        "role": "auth-reader",
    }
    (tmp_path / "not-a-cert.pem").write_text("hello")
    assert (
        run(["policy", "explain", str(policy_file), "--cert", str(tmp_path / "not-a-cert.pem"), "auth/DB"])
        == 2
    )
    assert "not a valid X.509 certificate" in capsys.readouterr().err
    assert (
        run(["policy", "explain", str(policy_file), "--cert", str(tmp_path / "auth.pem"), AUTH, "auth/DB"])
        == 2
    )
    assert "with --cert give only NAME" in capsys.readouterr().err
    assert run(["policy", "explain", str(policy_file), "auth/DB"]) == 2
    assert "give IDENTITY and NAME" in capsys.readouterr().err
