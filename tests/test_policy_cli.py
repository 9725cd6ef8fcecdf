"""`secrets-manager policy check|explain`, run in process: what the service would decide, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from secrets_manager.cli import run
from secrets_manager.tls import pki
from test_pki import self_signed

POLICY = """
[identities]
"spiffe://shrivenquant.local/auth" = ["auth-reader"]
"market-connector" = ["mc-reader"]

[roles.auth-reader]
rules = [
  { path = "auth/*", capabilities = ["read", "list"] },
  { path = "auth/admin-*", deny = ["read"] },
  { path = "auth/hidden-*", deny = ["list"] },
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
        f"secrets-manager: {policy_file}: valid: 2 identities, 3 roles, 4 rules",
    ]


def test_check_warns_of_rules_whose_path_no_secret_name_can_match(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A segment of a name starts with a letter, digit or '_', and a name has at most 256
    characters: `auth/.env`, `-x/*` and a 300-character path were taken without a word, a grant
    or deny that never applies (found by test_policy_model's review of what globs can match).
    They still load, as they did (README's upgrade promise); `policy check` now says so."""
    path = tmp_path / "unmatchable.toml"
    long = "a/" + "b" * 300
    path.write_text(
        '[identities]\n"auth" = ["r"]\n[roles.r]\nrules = [\n'
        '  { path = "auth/*", capabilities = ["read"] },\n'
        '  { path = "auth/.env", capabilities = ["read"] },\n'
        '  { path = "**/-x*", deny = ["read"] },\n'
        f'  {{ path = "{long}", capabilities = ["read"] }},\n'
        '  { path = "auth/?env*", capabilities = ["read"] },\n'
        "]\n"
    )
    assert run(["policy", "check", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"secrets-manager: warning: {path}: roles.r.rules[1]: path 'auth/.env' matches no secret name "
        "(its segment '.env' starts with '.', and no name's segment does): it grants nothing",
        f"secrets-manager: warning: {path}: roles.r.rules[2]: path '**/-x*' matches no secret name "
        "(its segment '-x*' starts with '-', and no name's segment does): it denies nothing",
        f"secrets-manager: warning: {path}: roles.r.rules[3]: path '{long}' matches no secret name "
        "(a name it matches has at least 302 characters, and names have at most 256): it grants nothing",
        f"secrets-manager: {path}: valid: 1 identity, 1 role, 5 rules",
    ]


def test_check_says_counts_of_one_in_the_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.toml"
    path.write_text(
        '[identities]\n"auth" = ["r"]\n[roles.r]\nrules = [{ path = "auth/*", capabilities = ["read"] }]\n'
        '[revoked]\nserials = ["6A390353A70857400976096098B060680B3AB1BA"]\n'
    )
    assert run(["policy", "check", str(path)]) == 0
    assert capsys.readouterr().err == (
        f"secrets-manager: {path}: valid: 1 identity, 1 role, 1 rule, 1 revoked certificate\n"
    )


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
    decided = {line.split()[0]: line.split(None, 2)[1:] for line in lines[3:-1]}
    assert decided["read"] == ["denied", "denied by role auth-reader rule 'auth/admin-*'"]
    assert decided["list"] == ["allowed", "allowed by role auth-reader rule 'auth/*'"]
    assert decided["write"] == ["denied", "no rule grants it"]
    assert sorted(decided) == ["admin", "delete", "list", "read", "rotate", "write"]


def test_explain_of_an_identity_without_roles_names_the_policys_near_spelling(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A policy whose identity is misspelt ("market-conector", a trust domain "shrivenquant.lcoal")
    passes `policy check` (valid TOML, valid identities); `explain` for the real one said only
    that every request is denied."""
    typo = tmp_path / "typo.toml"
    typo.write_text(
        POLICY.replace('"market-connector"', '"market-conector"').replace(
            f'"{AUTH}"', '"spiffe://shrivenquant.lcoal/auth"'
        )
    )
    assert run(["policy", "check", str(typo)]) == 0
    for identity, near in (
        ("market-connector", "market-conector"),
        (AUTH, "spiffe://shrivenquant.lcoal/auth"),
    ):
        capsys.readouterr()
        assert run(["policy", "explain", str(typo), identity, "auth/DB_PASSWORD"]) == 0
        assert capsys.readouterr().out.splitlines()[1] == (
            f"roles     none: every request is denied (the policy names {near}: a typo of this identity?)"
        )
    # another service's identity, which shares the trust domain, is no typo of auth's
    assert run(["policy", "explain", str(policy_file), "spiffe://shrivenquant.local/ops", "x/y"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "roles     none: every request is denied"


def test_explain_of_a_certificate_whose_cn_the_policy_names_says_to_name_its_spiffe_id(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The policy's `"market-connector" = [...]` is a CN; the certificate `pki issue
    market-connector` makes carries a SPIFFE ID, which is the identity the service reads, so
    every request was denied and `explain` said only that (the walk met it writing the policy
    from the README's words "its SPIFFE URI SAN, else its CN")."""
    ca_cert, ca_key = pki.new_ca()
    cert, _key = pki.issue(ca_cert, ca_key, "market-connector", server=False)
    (tmp_path / "mc.pem").write_bytes(cert)
    args = ["policy", "explain", str(policy_file), "--cert", str(tmp_path / "mc.pem"), "market-connector/K"]
    assert run(args) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "roles     none: every request is denied (the policy names market-connector, a CN: a "
        "certificate with a SPIFFE ID is known by it, so write "
        '"spiffe://shrivenquant.local/market-connector" there)'
    )
    assert run(["policy", "explain", str(policy_file), "market-connector", "market-connector/K"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "roles     mc-reader"  # a CN-only certificate's


def test_explain_says_where_a_name_shows_up_and_that_a_list_deny_hides_it(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = {
        (
            AUTH,
            "auth/DB",
        ): "in ListSecrets: yes; in BatchGetSecrets by prefix and Watch: yes (read allows it)",
        (AUTH, "auth/admin-token"): (
            "in ListSecrets: yes; in BatchGetSecrets by prefix and Watch: no (read is not allowed)"
        ),
        (AUTH, "auth/hidden-token"): (
            "in ListSecrets: no; in BatchGetSecrets by prefix and Watch: "
            "no (list is denied by role auth-reader rule 'auth/hidden-*')"
        ),
        # read without list: a prefix batch get or a watch still reveals the name
        ("market-connector", "market-connector/KEY"): (
            "in ListSecrets: no; in BatchGetSecrets by prefix and Watch: yes (read allows it)"
        ),
    }
    for (identity, name), line in expected.items():
        assert run(["policy", "explain", str(policy_file), identity, name]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"shown     {line}"
    assert run(["policy", "explain", str(policy_file), AUTH, "auth/hidden-token", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decisions"]["read"]["allowed"] is True
    assert doc["shown"] == {"list": False, "batch_get_and_watch": False}


def test_explain_of_an_invalid_name_exits_2_saying_the_order(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """IDENTITY and NAME swapped printed 'not a valid secret name' on every line and exited 0."""
    swapped = ["policy", "explain", str(policy_file), "auth/DB_PASSWORD", "spiffe://shrivenquant.local/auth"]
    assert run(swapped) == 2
    err = capsys.readouterr().err
    assert "invalid secret name" in err and "the arguments are IDENTITY NAME" in err


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
    assert run(["policy", "explain", str(policy_file), "auth/DB"]) == 2  # IDENTITY left out
    assert "give IDENTITY NAME, or IDENTITY alone" in capsys.readouterr().err


def test_check_and_explain_warn_of_identities_no_certificate_can_carry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd.toml"
    path.write_text(
        '[identities]\n"spiffe://Shrivenquant.local/auth" = ["r"]\n"spiffe://x/a/../b" = ["r"]\n"ok" = []\n'
        '[roles.r]\nrules = [{ path = "auth/*", capabilities = ["read"] }]\n'
    )
    assert run(["policy", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert "identity 'spiffe://Shrivenquant.local/auth' is not a SPIFFE ID a certificate can carry" in err
    assert "identity 'spiffe://x/a/../b' is not a SPIFFE ID" in err
    assert "identity 'ok' holds no role" in err
    assert run(["policy", "explain", str(path), "spiffe://Shrivenquant.local/auth", "auth/X"]) == 0
    assert "the service never sees a caller with it" in capsys.readouterr().err


def test_check_warns_of_common_names_no_certificate_can_present_and_explain_refuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cn.toml"
    path.write_text(
        '[identities]\n"<unidentified>" = ["r"]\n"\u0430uth" = ["r"]\n"o\u200bps" = ["r"]\n'
        '"svc.example" = ["r"]\n'
        '[roles.r]\nrules = [{ path = "auth/*", capabilities = ["read"] }]\n'
    )
    assert run(["policy", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert "identity '<unidentified>' is not a common name a certificate can carry" in err
    assert "identity '\u0430uth' is not a common name a certificate can carry" in err
    assert err.count("is not a common name a certificate can carry") == 3  # and the zero-width one
    assert "svc.example' is" not in err
    spoof = self_signed(["spiffe://shrivenquant.local/auth"], ["https://example.com/"])
    (tmp_path / "spoof.pem").write_bytes(spoof.public_bytes(serialization.Encoding.PEM))
    assert run(["policy", "explain", str(path), "--cert", str(tmp_path / "spoof.pem"), "auth/X"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written like a URI" in err


def test_explain_says_when_the_certificate_is_revoked_and_check_counts_revocations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_cert, ca_key = pki.new_ca()
    cert, _key = pki.issue(ca_cert, ca_key, "auth")
    (tmp_path / "auth.pem").write_bytes(cert)
    serial = x509.load_pem_x509_certificate(cert).serial_number
    path = tmp_path / "policy.toml"
    path.write_text(POLICY + f'\n[revoked]\nserials = ["serial={serial:X}", "01"]\n')
    assert run(["policy", "check", str(path)]) == 0
    assert "valid: 2 identities, 3 roles, 4 rules, 2 revoked certificates" in capsys.readouterr().err
    args = ["policy", "explain", str(path), "--cert", str(tmp_path / "auth.pem"), "auth/DB"]
    assert run([*args, "--capability", "read"]) == 5
    out, err = capsys.readouterr()
    assert "revoked   yes: every request is refused" in out and "certificate revoked" in err
    assert run([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["certificate"]["revoked"] is True and int(doc["certificate"]["serial"], 16) == serial
    assert not any(d["allowed"] for d in doc["decisions"].values())
    assert doc["decisions"]["read"]["reason"].startswith("certificate revoked")
    path.write_text(POLICY + '\n[revoked]\nserials = ["01"]\n')
    assert run([*args, "--capability", "read"]) == 0
    assert "revoked   no" in capsys.readouterr().out
    path.write_text(POLICY + '\n[revoked]\nfingerprints = ["01"]\n')
    assert run(["policy", "check", str(path)]) == 2
    assert "revoked.fingerprints[0]: '01' is not a SHA-256 fingerprint" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["/dev/zero", "fifo"])
def test_a_policy_file_that_is_not_a_regular_file_is_refused_not_read_forever(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    if where == "fifo":
        where = str(tmp_path / "fifo")
        os.mkfifo(where)
    assert run(["policy", "check", where]) == 2
    assert "is not a regular file" in capsys.readouterr().err


def test_a_policy_file_over_1_mib_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * (1024 * 1024) + "\n")
    assert run(["policy", "check", str(path)]) == 2
    assert "larger than 1048576 bytes" in capsys.readouterr().err


def test_explain_refuses_a_certificate_with_a_malformed_extension_in_one_line(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cryptography parses extensions lazily: a bad SubjectAlternativeName was an internal error."""
    bad_san = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x02\x01\x00")
    path = tmp_path / "odd.pem"
    path.write_bytes(self_signed(["auth"], extensions=[bad_san]).public_bytes(serialization.Encoding.PEM))
    assert run(["policy", "explain", str(policy_file), "--cert", str(path), "auth/X"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed or unsupported extension or subject" in err


def test_explain_reads_a_pem_with_text_before_it(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """openssl pkcs12 writes "Bag Attributes" lines before the PEM; openssl x509 reads past them."""
    ca_cert, ca_key = pki.new_ca()
    cert, _key = pki.issue(ca_cert, ca_key, "auth", server=False)
    path = tmp_path / "bag.pem"
    path.write_bytes(b"Bag Attributes\n    localKeyID: 01\nsubject=/CN=auth\n" + cert)
    assert run(["policy", "explain", str(path.parent / "policy.toml"), "--cert", str(path), "auth/DB"]) == 0
    assert f"identity  {AUTH}" in capsys.readouterr().out


def test_explain_from_an_address_shows_which_bound_roles_are_held_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bound.toml"
    path.write_text(
        POLICY.replace("[roles.auth-reader]\n", '[roles.auth-reader]\nbound_cidrs = ["10.0.1.0/24"]\n')
    )
    assert run(["policy", "explain", str(path), AUTH, "auth/DB"]) == 0
    assert "roles     auth-reader (only from 10.0.1.0/24)" in capsys.readouterr().out
    assert (
        run(["policy", "explain", str(path), AUTH, "auth/DB", "--from", "10.0.1.7", "--capability", "read"])
        == 0
    )
    out = capsys.readouterr().out
    assert "from      10.0.1.7" in out and "auth-reader (from 10.0.1.0/24, which holds 10.0.1.7)" in out
    assert (
        run(["policy", "explain", str(path), AUTH, "auth/DB", "--from", "10.0.2.7", "--capability", "read"])
        == 5
    )
    captured = capsys.readouterr()
    assert "auth-reader (not held: only from 10.0.1.0/24): none held from 10.0.2.7" in captured.out
    assert "its roles are bound to networks that do not hold 10.0.2.7" in captured.err
    assert run(["policy", "explain", str(path), AUTH, "auth/DB", "--from", "10.0.2.7", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["roles"], document["address"]) == ([], "10.0.2.7")
    assert document["bound_cidrs"] == {"auth-reader": ["10.0.1.0/24"]}
    assert run(["policy", "explain", str(path), AUTH, "auth/DB", "--from", "office"]) == 2
    assert "--from 'office' is not an IP address" in capsys.readouterr().err
