"""Mutual-TLS certificates (issue #5): a CA, client and server certificates with SPIFFE IDs, the
caller identity read back from them, the private PKI directory, the `pki` CLI, and a real grpc
mutual-TLS handshake that accepts only certificates from our CA that are in date."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from secrets_manager import tls
from secrets_manager.errors import AccessDeniedError, ConflictError, InvalidInputError, NotFoundError
from secrets_manager.tls import (
    IdentityError,
    identity_from_auth_context,
    identity_from_certificate,
    init_ca,
    issue,
    issue_certificate,
    new_ca,
)
from secrets_manager.tls.files import write_private_file

SCRIPT = Path(sys.executable).with_name("secrets-manager")
TRUST_DOMAIN = "shrivenquant.local"


@dataclass(frozen=True)
class Pair:
    cert: bytes
    key: bytes

    @property
    def x509(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert)


@pytest.fixture(scope="module")
def ca() -> Pair:
    return Pair(*new_ca())


@pytest.fixture(scope="module")
def client(ca: Pair) -> Pair:
    return Pair(*issue(ca.cert, ca.key, "auth"))


@pytest.fixture(scope="module")
def server(ca: Pair) -> Pair:
    return Pair(*issue(ca.cert, ca.key, "secrets-manager", server=True))


def verify_client(ca: Pair, leaf: Pair, *, at: datetime | None = None) -> list[x509.GeneralName]:
    builder = PolicyBuilder().store(Store([ca.x509]))
    if at is not None:
        builder = builder.time(at)
    return list(builder.build_client_verifier().verify(leaf.x509, []).subjects or [])


def verify_server(ca: Pair, leaf: Pair, subject: x509.DNSName | x509.IPAddress) -> None:
    PolicyBuilder().store(Store([ca.x509])).build_server_verifier(subject).verify(leaf.x509, [])


def extension(cert: x509.Certificate, kind: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(kind)


def self_signed(
    common_names: list[str] = (),  # type: ignore[assignment]
    uris: list[str] = (),  # type: ignore[assignment]
    extensions: list[x509.ExtensionType] = (),  # type: ignore[assignment]
) -> x509.Certificate:
    """A bare certificate with exactly the given CNs, URI SANs and other extensions, for identity
    edge cases (tests/test_policy_cli.py uses it too)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256())


# ---- the public face ----------------------------------------------------------------------------


def test_public_api_is_pinned() -> None:
    assert sorted(tls.__all__) == [
        "Caller",
        "DEFAULT_TRUST_DOMAIN",
        "IdentityError",
        "ServerTlsFiles",
        "WrittenCertificate",
        "caller_from_auth_context",
        "caller_from_certificate",
        "identity_from_auth_context",
        "identity_from_certificate",
        "init_ca",
        "issue",
        "issue_certificate",
        "new_ca",
        "read_ca",
        "read_server_tls",
        "spiffe_id",
        "unpresentable_identity",
    ]


# ---- certificates -------------------------------------------------------------------------------


def test_ca_is_a_self_signed_p256_ca_that_signs_only_end_entities(ca: Pair) -> None:
    cert = ca.x509
    cert.verify_directly_issued_by(cert)
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1"
    assert cert.subject.rfc4514_string() == "CN=secrets-manager CA"
    san = extension(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TRUST_DOMAIN}"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=3650)


def test_keys_are_unencrypted_pkcs8_p256(ca: Pair, client: Pair) -> None:
    for pem in (ca.key, client.key):
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


def test_client_certificate_chains_to_the_ca(ca: Pair, client: Pair) -> None:
    assert verify_client(ca, client) == [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/auth")]
    client.x509.verify_directly_issued_by(ca.x509)


def test_client_certificate_carries_cn_spiffe_id_and_client_auth_only(client: Pair) -> None:
    cert = client.x509
    assert cert.subject.rfc4514_string() == "CN=auth"
    sans = extension(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TRUST_DOMAIN}/auth"]
    assert sans.get_values_for_type(x509.DNSName) == []
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not extension(cert, x509.BasicConstraints).value.ca
    assert identity_from_certificate(client.cert) == f"spiffe://{TRUST_DOMAIN}/auth"


def test_server_certificate_defaults_to_localhost_and_loopback(ca: Pair, server: Pair) -> None:
    sans = extension(server.x509, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(extension(server.x509, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    verify_server(ca, server, x509.DNSName("localhost"))
    verify_server(ca, server, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def test_server_certificate_covers_the_given_dns_names_and_ips(ca: Pair) -> None:
    pair = Pair(
        *issue(
            ca.cert,
            ca.key,
            "srv",
            server=True,
            dns=["secrets.internal", "*.svc.local"],
            ips=["10.0.0.7", "::1"],
        )
    )
    sans = extension(pair.x509, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["secrets.internal", "*.svc.local"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    verify_server(ca, pair, x509.DNSName("secrets.internal"))
    verify_server(ca, pair, x509.IPAddress(ipaddress.ip_address("10.0.0.7")))
    with pytest.raises(VerificationError):
        verify_server(ca, pair, x509.DNSName("localhost"))


def test_client_and_server_certificates_cannot_stand_in_for_each_other(
    ca: Pair, client: Pair, server: Pair
) -> None:
    with pytest.raises(VerificationError, match="EKU"):
        verify_client(ca, server)
    with pytest.raises(VerificationError):
        verify_server(ca, client, x509.DNSName("localhost"))


def test_certificate_from_another_ca_does_not_verify(ca: Pair) -> None:
    other_ca = Pair(*new_ca())
    stranger = Pair(*issue(other_ca.cert, other_ca.key, "auth"))
    with pytest.raises(VerificationError):
        verify_client(ca, stranger)


def test_expired_certificate_from_not_before_and_days() -> None:
    start = datetime.now(UTC) - timedelta(days=10)
    ca = Pair(*new_ca(days=30, not_before=start - timedelta(days=1)))
    expired = Pair(*issue(ca.cert, ca.key, "auth", not_before=start, days=1))
    assert expired.x509.not_valid_before_utc == start.replace(microsecond=0)
    assert expired.x509.not_valid_after_utc < datetime.now(UTC)
    with pytest.raises(VerificationError, match="not valid at validation time"):
        verify_client(ca, expired)
    assert verify_client(ca, expired, at=start + timedelta(hours=1))  # expiry is its only fault


def test_validity_starts_slightly_in_the_past_for_clock_skew(client: Pair) -> None:
    age = datetime.now(UTC) - client.x509.not_valid_before_utc
    assert timedelta(minutes=4) < age < timedelta(minutes=6)


def test_trust_domain_comes_from_the_ca_unless_given(ca: Pair) -> None:
    other = Pair(*new_ca(trust_domain="example.org"))
    assert tls.pki.trust_domain_of(other.x509) == "example.org"
    assert identity_from_certificate(issue(other.cert, other.key, "auth")[0]) == "spiffe://example.org/auth"
    explicit = issue(ca.cert, ca.key, "auth", trust_domain="prod.example")[0]
    assert identity_from_certificate(explicit) == "spiffe://prod.example/auth"


def test_every_serial_number_is_distinct(ca: Pair) -> None:
    serials = {
        x509.load_pem_x509_certificate(issue(ca.cert, ca.key, "auth")[0]).serial_number for _ in range(5)
    }
    assert len(serials) == 5


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"name": "../auth"}, "invalid certificate name"),
        ({"name": "auth/x"}, "invalid certificate name"),
        ({"name": ""}, "invalid certificate name"),
        ({"name": "a" * 65}, "invalid certificate name"),
        ({"name": "-flag"}, "invalid certificate name"),
        ({"name": "s", "dns": ["a.example"]}, "server certificates only"),
        ({"name": "s", "server": True, "dns": ["bad name"]}, "invalid DNS name"),
        ({"name": "s", "server": True, "dns": ["\u0430.example"]}, "invalid DNS name"),
        ({"name": "s", "server": True, "ips": ["10.0.0"]}, "invalid IP address"),
        ({"name": "s", "days": 0}, "at least 1 day"),
        ({"name": "s", "days": 4000}, "the CA expires on"),
        ({"name": "s", "trust_domain": "Upper.Case"}, "invalid trust domain"),
        ({"name": "s", "not_before": datetime(2020, 1, 1)}, "timezone-aware"),
    ],
)
def test_issue_rejects_bad_input(ca: Pair, options: dict[str, Any], problem: str) -> None:
    name = options.pop("name")
    with pytest.raises(InvalidInputError, match=problem):
        issue(ca.cert, ca.key, name, **options)


def test_issue_rejects_a_key_that_is_not_the_cas(ca: Pair) -> None:
    other = Pair(*new_ca())
    with pytest.raises(InvalidInputError, match="does not belong"):
        issue(ca.cert, other.key, "auth")


def test_issue_rejects_a_non_ca_certificate_as_ca(client: Pair) -> None:
    with pytest.raises(InvalidInputError, match="not a CA"):
        issue(client.cert, client.key, "auth")


def test_issue_refuses_an_expired_ca() -> None:
    old = Pair(*new_ca(days=1, not_before=datetime.now(UTC) - timedelta(days=3)))
    with pytest.raises(InvalidInputError, match="the CA expired"):
        issue(old.cert, old.key, "auth", days=1)


# ---- identity -----------------------------------------------------------------------------------


def test_identity_prefers_the_spiffe_id_over_the_cn() -> None:
    cert = self_signed(["auth"], ["https://example.com/", "spiffe://td.example/svc/auth"])
    assert identity_from_certificate(cert) == "spiffe://td.example/svc/auth"


def test_identity_falls_back_to_the_cn() -> None:
    assert identity_from_certificate(self_signed(["market-connector"])) == "market-connector"
    assert identity_from_certificate(self_signed(["mc"], ["https://example.com/"])) == "mc"


def test_identity_accepts_pem_der_text_and_objects(client: Pair) -> None:
    der = client.x509.public_bytes(serialization.Encoding.DER)
    expected = f"spiffe://{TRUST_DOMAIN}/auth"
    for form in (client.cert, client.cert.decode("ascii"), der, client.x509):
        assert identity_from_certificate(form) == expected


@pytest.mark.parametrize(
    ("common_names", "uris", "problem"),
    [
        ([], [], "neither a SPIFFE ID"),
        ([], ["https://example.com/"], "neither a SPIFFE ID"),
        (["a", "b"], [], "more than one common name"),
        (["a\nb"], [], "control characters"),
        (["  "], [], "empty"),
        (["auth"], ["spiffe://td/a", "spiffe://td/b"], "more than one SPIFFE ID"),
        (["auth"], ["spiffe://td/../ops"], "malformed"),
        (["auth"], ["spiffe://TD/auth"], "malformed"),
        (["auth"], ["spiffe://td/a?x=1"], "malformed"),
        (["auth"], ["SPIFFE://td/auth"], "malformed"),
        (["auth"], ["spiffe://td/a%2F..%2Fops"], "malformed"),
    ],
)
def test_ambiguous_or_malformed_identities_are_refused(
    common_names: list[str], uris: list[str], problem: str
) -> None:
    with pytest.raises(IdentityError, match=problem):
        identity_from_certificate(self_signed(common_names, uris))


def test_identity_error_is_an_access_denial_of_kind_unauthenticated() -> None:
    assert issubclass(IdentityError, AccessDeniedError)
    assert IdentityError.kind == "unauthenticated"


def test_garbage_is_not_a_certificate() -> None:
    for data in (b"", b"not a cert", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        with pytest.raises(IdentityError, match=r"not a valid X\.509 certificate"):
            identity_from_certificate(data)


def test_identity_from_auth_context_uses_the_peer_certificate(client: Pair) -> None:
    context = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"auth"],
        "x509_subject_alternative_name": [f"spiffe://{TRUST_DOMAIN}/auth".encode()],
        "x509_pem_cert": [client.cert],
    }
    assert identity_from_auth_context(context) == f"spiffe://{TRUST_DOMAIN}/auth"


def test_identity_from_auth_context_without_pem_uses_cn_only_when_there_is_no_san() -> None:
    base = {"transport_security_type": [b"ssl"], "x509_common_name": [b"market-connector"]}
    assert identity_from_auth_context(base) == "market-connector"
    with pytest.raises(IdentityError):
        identity_from_auth_context({**base, "x509_subject_alternative_name": [b"spiffe://td/x"]})


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"transport_security_type": [b"insecure"], "x509_common_name": [b"ops"]},
        {"transport_security_type": [b"ssl"]},
        {"transport_security_type": [b"ssl"], "x509_common_name": [b"a", b"b"]},
    ],
)
def test_identity_from_auth_context_refuses_without_a_client_certificate(
    context: dict[str, list[bytes]],
) -> None:
    with pytest.raises(IdentityError):
        identity_from_auth_context(context)


# ---- files --------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_init_ca_writes_private_files_in_private_new_directories(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b" / "pki"
    written = init_ca(folder, trust_domain="example.org", days=30)
    assert (written.certificate, written.key) == (folder / "ca.pem", folder / "ca-key.pem")
    assert written.identity == "spiffe://example.org"
    assert {mode(p) for p in (folder, folder.parent, folder.parent.parent)} == {0o700}
    assert mode(written.certificate) == mode(written.key) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == ["ca-key.pem", "ca.pem"]  # no temporary files left


def test_init_ca_never_overwrites_without_force(tmp_path: Path) -> None:
    first = init_ca(tmp_path)
    before = first.certificate.read_bytes(), first.key.read_bytes()
    with pytest.raises(ConflictError, match="already exists"):
        init_ca(tmp_path)
    assert (first.certificate.read_bytes(), first.key.read_bytes()) == before
    (tmp_path / "ca.pem").unlink()  # half a CA is still a CA: the key alone blocks init
    with pytest.raises(ConflictError, match=r"ca-key\.pem"):
        init_ca(tmp_path)
    init_ca(tmp_path, force=True)
    assert (tmp_path / "ca-key.pem").read_bytes() != before[1]
    assert mode(tmp_path / "ca-key.pem") == 0o600


def test_issue_certificate_writes_a_pair_signed_by_the_ca_in_the_directory(tmp_path: Path) -> None:
    init_ca(tmp_path)
    written = issue_certificate(tmp_path, "market-connector")
    assert (written.certificate.name, written.key.name) == (
        "market-connector.pem",
        "market-connector-key.pem",
    )
    assert written.identity == f"spiffe://{TRUST_DOMAIN}/market-connector"
    assert mode(written.certificate) == mode(written.key) == 0o600
    ca = Pair((tmp_path / "ca.pem").read_bytes(), b"")
    verify_client(ca, Pair(written.certificate.read_bytes(), b""))
    with pytest.raises(ConflictError, match=r"market-connector\.pem already exists"):
        issue_certificate(tmp_path, "market-connector")
    renewed = issue_certificate(tmp_path, "market-connector", force=True)
    assert renewed.certificate.read_bytes() != b"" and mode(renewed.key) == 0o600


def test_issue_certificate_without_a_ca_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="pki init"):
        issue_certificate(tmp_path, "auth")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["ca", "auth-key"])
def test_issue_certificate_refuses_names_that_collide_with_other_files(tmp_path: Path, name: str) -> None:
    init_ca(tmp_path)
    before = (tmp_path / "ca-key.pem").read_bytes()
    with pytest.raises(InvalidInputError, match="collide"):
        issue_certificate(tmp_path, name, force=True)
    assert (tmp_path / "ca-key.pem").read_bytes() == before


def test_write_private_file_is_atomic_and_never_clobbers(tmp_path: Path) -> None:
    target = tmp_path / "x.pem"
    write_private_file(target, b"one", overwrite=False)
    with pytest.raises(ConflictError):
        write_private_file(target, b"two", overwrite=False)
    assert target.read_bytes() == b"one"
    os.chmod(target, 0o644)
    write_private_file(target, b"three", overwrite=True)
    assert target.read_bytes() == b"three" and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["x.pem"]


# ---- the CLI ------------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def pki(tmp_path: Path, *args: str) -> Run:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_STORE": str(tmp_path / "no-store" / "store.db"),  # must never be touched
    }
    proc = subprocess.run(
        [str(SCRIPT), "pki", *args],
        capture_output=True,
        env=env,
        input=b"",
        start_new_session=True,
        timeout=60,
    )
    run = Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "no-store").exists()
    return run


def assert_one_line(run: Run, code: int, *needles: str) -> None:
    assert run.code == code, (run.code, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    prefix = "secrets-manager: error: " if code else "secrets-manager: "
    assert lines[0].startswith(prefix)
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_issued(run: Run, *needles: str) -> tuple[str, str]:
    """`pki issue` succeeded: what it wrote on one line, then the serial and fingerprint that
    revoke it; returns those two."""
    assert run.code == 0, (run.code, run.stderr)
    wrote, numbers = run.stderr.strip().splitlines()
    for needle in needles:
        assert needle in wrote, wrote
    match = re.fullmatch(r"secrets-manager: serial ([0-9A-F]+), SHA-256 fingerprint ([0-9A-F:]{95})", numbers)
    assert match, numbers
    return match[1], match[2]


def test_cli_init_and_issue_make_a_working_set_without_a_store_or_password(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert_one_line(
        pki(tmp_path, "init", "--dir", str(certs), "--trust-domain", "example.org"), 0, "ca.pem", "ca-key.pem"
    )
    assert mode(certs) == 0o700
    serial, fingerprint = assert_issued(
        pki(tmp_path, "issue", "auth", "--dir", str(certs)), "auth.pem", "spiffe://example.org/auth"
    )
    auth = x509.load_pem_x509_certificate((certs / "auth.pem").read_bytes())
    assert int(serial, 16) == auth.serial_number and len(serial) % 2 == 0
    issued = pki(tmp_path, "issue", "ops", "--dir", str(certs))
    ops = x509.load_pem_x509_certificate((certs / "ops.pem").read_bytes())
    until = ops.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")  # as every command prints times
    assert_issued(issued, f"valid until {until}")
    assert bytes.fromhex(fingerprint.replace(":", "")) == auth.fingerprint(hashes.SHA256())
    if shutil.which("openssl"):  # the spelling openssl prints, which [revoked] takes as it is
        shown = subprocess.run(
            [
                "openssl",
                "x509",
                "-noout",
                "-serial",
                "-fingerprint",
                "-sha256",
                "-in",
                str(certs / "auth.pem"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert shown[0] == f"serial={serial}"
        assert shown[1].lower() == f"sha256 fingerprint={fingerprint}".lower()
    run = pki(
        tmp_path,
        "issue",
        "srv",
        "--dir",
        str(certs),
        "--server",
        "--dns",
        "a.internal",
        "--dns",
        "b.internal",
        "--ip",
        "10.1.2.3",
        "--days",
        "30",
    )
    assert_issued(run, "server certificate")
    assert sorted(p.name for p in certs.iterdir()) == [
        "auth-key.pem",
        "auth.pem",
        "ca-key.pem",
        "ca.pem",
        "ops-key.pem",
        "ops.pem",
        "srv-key.pem",
        "srv.pem",
    ]
    assert {mode(p) for p in certs.iterdir()} == {0o600}
    ca = Pair((certs / "ca.pem").read_bytes(), b"")
    assert verify_client(ca, Pair((certs / "auth.pem").read_bytes(), b"")) == [
        x509.UniformResourceIdentifier("spiffe://example.org/auth")
    ]
    srv = Pair((certs / "srv.pem").read_bytes(), b"")
    verify_server(ca, srv, x509.DNSName("b.internal"))
    verify_server(ca, srv, x509.IPAddress(ipaddress.ip_address("10.1.2.3")))
    assert srv.x509.not_valid_after_utc - srv.x509.not_valid_before_utc == timedelta(days=30)


def test_cli_issue_force_names_the_certificate_it_replaced_for_revocation(tmp_path: Path) -> None:
    """Renewing after a stolen key (`pki issue NAME --force`) wrote over the only file that named
    the old certificate and said nothing of it, though it stays valid until it expires: the serial
    or fingerprint to list under [revoked] was lost unless read before the renewal."""
    certs = str(tmp_path / "pki")
    assert pki(tmp_path, "init", "--dir", certs).code == 0
    first = pki(tmp_path, "issue", "market-connector", "--dir", certs)
    assert first.code == 0 and "warning" not in first.stderr, first.stderr
    old = x509.load_pem_x509_certificate((tmp_path / "pki" / "market-connector.pem").read_bytes())
    serial = (
        old.serial_number.to_bytes((old.serial_number.bit_length() + 7) // 8).hex().upper()
    )  # whole bytes
    fingerprint = old.fingerprint(hashes.SHA256()).hex(":").upper()
    renewed = pki(tmp_path, "issue", "market-connector", "--dir", certs, "--force")
    assert renewed.code == 0, renewed.stderr
    warning = renewed.stderr.splitlines()[-1]
    assert warning.startswith("secrets-manager: warning: the certificate replaced (serial ")
    assert f"serial {serial}, SHA-256 fingerprint {fingerprint})" in warning
    assert f"stays valid until {old.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}" in warning
    assert "[revoked]" in warning and "SIGHUP" in warning
    # What was there is not a certificate (a half-written renewal): nothing to name, no error.
    (tmp_path / "pki" / "market-connector.pem").write_bytes(b"not a certificate")
    again = pki(tmp_path, "issue", "market-connector", "--dir", certs, "--force")
    assert again.code == 0 and "warning" not in again.stderr, again.stderr


def test_cli_init_refuses_to_replace_a_ca_without_force(tmp_path: Path) -> None:
    assert pki(tmp_path, "init", "--dir", str(tmp_path / "c")).code == 0
    before = (tmp_path / "c" / "ca-key.pem").read_bytes()
    assert_one_line(pki(tmp_path, "init", "--dir", str(tmp_path / "c")), 7, "already exists", "--force")
    assert (tmp_path / "c" / "ca-key.pem").read_bytes() == before
    assert pki(tmp_path, "init", "--dir", str(tmp_path / "c"), "--force").code == 0
    assert (tmp_path / "c" / "ca-key.pem").read_bytes() != before


def test_cli_issue_in_another_directory_says_where_it_looked_and_that_a_new_ca_is_new(
    tmp_path: Path,
) -> None:
    """`pki issue auth --dir pki` run outside the directory holding pki/ said to run
    `pki init --dir pki` "first": a second CA, whose certificates no service of the first trusts."""
    team = tmp_path / "team"
    assert pki(tmp_path, "init", "--dir", str(team / "pki")).code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [str(SCRIPT), "pki", "issue", "auth", "--dir", "pki"],
        capture_output=True, cwd=elsewhere, timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
    )  # fmt: skip
    run = Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert_one_line(
        run, 3, f"no CA in pki ({elsewhere / 'pki'})", "give --dir the directory 'pki init' made", "new CA"
    )
    assert "first" not in run.stderr
    assert list(elsewhere.iterdir()) == []


def test_cli_issue_exit_codes(tmp_path: Path) -> None:
    certs = str(tmp_path / "certs")
    assert_one_line(pki(tmp_path, "issue", "auth", "--dir", certs), 3, "no CA", "pki init")
    assert pki(tmp_path, "init", "--dir", certs).code == 0
    assert pki(tmp_path, "issue", "auth", "--dir", certs).code == 0
    assert_one_line(pki(tmp_path, "issue", "auth", "--dir", certs), 7, "auth.pem already exists")
    assert_one_line(pki(tmp_path, "issue", "x", "--dir", certs, "--ip", "10.0.0.1"), 2, "--server")
    assert_one_line(
        pki(tmp_path, "issue", "x", "--dir", certs, "--server", "--ip", "300.1.1.1"), 2, "invalid IP"
    )
    assert_one_line(pki(tmp_path, "issue", "../x", "--dir", certs), 2, "invalid certificate name")
    assert_one_line(pki(tmp_path, "issue", "x", "--dir", certs, "--days", "0"), 2, "--days")
    assert_one_line(pki(tmp_path, "issue", "x"), 2, "--dir")
    assert_one_line(
        pki(tmp_path, "init", "--dir", certs, "--trust-domain", "Bad Domain", "--force"), 2, "trust domain"
    )
    assert sorted(p.name for p in Path(certs).iterdir()) == [
        "auth-key.pem",
        "auth.pem",
        "ca-key.pem",
        "ca.pem",
    ]


# ---- a real mutual-TLS handshake with grpc ------------------------------------------------------

METHOD = "/secrets_manager.test.Identity/WhoAmI"


@pytest.fixture(scope="module")
def mtls_server(ca: Pair, server: Pair) -> Iterator[str]:
    """A grpc server requiring client certificates from `ca`; it answers with the caller's identity."""

    def who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
        return identity_from_auth_context(context.auth_context()).encode()

    handler = grpc.unary_unary_rpc_method_handler(
        who_am_i, request_deserializer=None, response_serializer=None
    )
    service = grpc.method_handlers_generic_handler("secrets_manager.test.Identity", {"WhoAmI": handler})
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_server.add_generic_rpc_handlers([service])
    credentials = grpc.ssl_server_credentials(
        [(server.key, server.cert)], root_certificates=ca.cert, require_client_auth=True
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    yield f"127.0.0.1:{port}"
    grpc_server.stop(grace=None)


def call(address: str, credentials: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(address, credentials) as channel:
        response: bytes = channel.unary_unary(METHOD)(b"", timeout=10)
        return response


def test_mtls_caller_identity_is_its_spiffe_id(mtls_server: str, ca: Pair, client: Pair) -> None:
    response = call(mtls_server, grpc.ssl_channel_credentials(ca.cert, client.key, client.cert))
    assert response == f"spiffe://{TRUST_DOMAIN}/auth".encode()


def rejected_clients(ca: Pair, server: Pair) -> dict[str, Pair | None]:
    other_ca = Pair(*new_ca())
    return {
        "no certificate": None,
        "another CA": Pair(*issue(other_ca.cert, other_ca.key, "auth")),
        "expired": Pair(
            *issue(ca.cert, ca.key, "auth", not_before=datetime.now(UTC) - timedelta(days=10), days=1)
        ),
        "server certificate": server,
    }


@pytest.mark.parametrize("case", ["no certificate", "another CA", "expired", "server certificate"])
def test_mtls_handshake_refuses_bad_client_certificates(
    mtls_server: str, ca: Pair, server: Pair, case: str
) -> None:
    pair = rejected_clients(ca, server)[case]
    credentials = (
        grpc.ssl_channel_credentials(ca.cert)
        if pair is None
        else grpc.ssl_channel_credentials(ca.cert, pair.key, pair.cert)
    )
    with pytest.raises(grpc.RpcError) as caught:
        call(mtls_server, credentials)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_a_private_file_is_written_the_named_way_where_proc_cannot_name_an_unnamed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linking an O_TMPFILE file needs /proc/self/fd; where that fails the hidden temporary file
    beside FILE is used, as on other platforms: the file is written all the same, 0600, and an
    existing one is replaced only with `overwrite`."""
    from secrets_manager.errors import ConflictError
    from secrets_manager.tls import files

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "_name_unnamed", refused)
    target = tmp_path / "key.pem"
    files.write_private_file(target, b"first", overwrite=False)
    files.write_private_file(target, b"second", overwrite=True)
    with pytest.raises(ConflictError, match="already exists"):
        files.write_private_file(target, b"third", overwrite=False)
    assert target.read_bytes() == b"second" and target.stat().st_mode & 0o777 == 0o600
    assert [entry.name for entry in tmp_path.iterdir()] == ["key.pem"]
