"""RetiredAuthorities: which client CAs a reload of tls.client_ca retired, and whose certificates
they signed (the service refuses those per call: test_service_certificates.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secrets_manager.tls import pki
from secrets_manager.tls.retired import RetiredAuthorities


def reissued(ca_pem: bytes, ca_key_pem: bytes) -> bytes:
    """The same CA (subject and key) in a new certificate, as a CA's renewal before it expires."""
    old = x509.load_pem_x509_certificate(ca_pem)
    key = serialization.load_pem_private_key(ca_key_pem, None)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.subject)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def test_a_ca_taken_out_is_retired_with_what_it_signed_and_a_kept_or_reissued_one_is_not() -> None:
    old_ca, old_key = pki.new_ca(common_name="old CA")
    new_ca, new_key = pki.new_ca(common_name="new CA")
    old_leaf, _ = pki.issue(old_ca, old_key, "auth")
    new_leaf, _ = pki.issue(new_ca, new_key, "auth")
    nothing = RetiredAuthorities()
    assert len(nothing) == 0 and nothing.issuer_of(old_leaf) is None

    overlap = nothing.after_reload(old_ca, old_ca + new_ca)  # rotation: the new one beside the old
    assert len(overlap) == 0 and overlap.issuer_of(old_leaf) is None

    replaced = overlap.after_reload(old_ca + new_ca, new_ca)  # the old one out
    assert len(replaced) == 1
    assert replaced.issuer_of(old_leaf) == "CN=old CA"
    assert replaced.issuer_of(old_leaf.decode()) == "CN=old CA"  # as grpc may hand it over
    assert replaced.issuer_of(new_leaf) is None

    still = replaced.after_reload(new_ca, new_ca)  # a later reload (a renewed server certificate)
    assert still.issuer_of(old_leaf) == "CN=old CA"
    back = still.after_reload(new_ca, new_ca + old_ca)  # trusted again
    assert len(back) == 0 and back.issuer_of(old_leaf) is None

    renewed = nothing.after_reload(old_ca, reissued(old_ca, old_key))  # same subject, same key
    assert renewed.issuer_of(old_leaf) is None
    same_name = nothing.after_reload(old_ca, pki.new_ca(common_name="old CA")[0])  # another key
    assert same_name.issuer_of(old_leaf) == "CN=old CA"
    assert same_name.issuer_of(b"not a certificate") is None


def signed_by(issuer_pem: bytes, issuer_key_pem: bytes, common_name: str, *, ca: bool) -> tuple[bytes, bytes]:
    """A CA (`ca`) or client certificate the issuer signed (as an external PKI with an
    intermediate issues them), and its key."""
    issuer = x509.load_pem_x509_certificate(issuer_pem)
    issuer_key = serialization.load_pem_private_key(issuer_key_pem, None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def test_an_intermediate_taken_out_beside_the_root_it_chains_to_is_not_retired() -> None:
    """client_ca held the root and its intermediate; the intermediate goes, the root stays: the
    handshake still accepts the intermediate's certificates (the client sends the chain), so
    calls on connections made before must not be refused for it. With the root gone too, it is
    retired; and an intermediate under an intermediate still in the bundle is trusted still."""
    root, root_key = pki.new_ca(common_name="root CA")
    issuing, issuing_key = signed_by(root, root_key, "issuing CA", ca=True)
    leaf, _ = signed_by(issuing, issuing_key, "auth", ca=False)
    tidied = RetiredAuthorities().after_reload(root + issuing, root)
    assert len(tidied) == 0 and tidied.issuer_of(leaf) is None

    other, _ = pki.new_ca(common_name="other CA")
    replaced = RetiredAuthorities().after_reload(root + issuing, other)
    assert replaced.issuer_of(leaf) == "CN=issuing CA"

    lower, lower_key = signed_by(issuing, issuing_key, "lower CA", ca=True)
    lower_leaf, _ = signed_by(lower, lower_key, "auth", ca=False)
    chained = RetiredAuthorities().after_reload(root + issuing + lower, root)
    assert len(chained) == 0 and chained.issuer_of(lower_leaf) is None
    assert replaced.after_reload(other, other).issuer_of(leaf) == "CN=issuing CA"  # stays retired


def reissued_under(ca_pem: bytes, issuer_pem: bytes, issuer_key_pem: bytes) -> bytes:
    """The CA `ca_pem` (its subject and key) in a certificate `issuer_pem` signed: an intermediate
    moved under a new root, as when a PKI changes roots and keeps its issuing CA's key."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    issuer = x509.load_pem_x509_certificate(issuer_pem)
    issuer_key = serialization.load_pem_private_key(issuer_key_pem, None)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(issuer.subject)
        .public_key(ca.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def test_an_intermediate_moved_under_a_new_root_with_its_key_keeps_its_certificates() -> None:
    """client_ca goes from an old root and its intermediate to a new root and the same intermediate
    (same name, same key) issued again under it. The old copy of the intermediate is retired, yet
    the certificates it issued are the new copy's too (the handshake accepts them under the new
    bundle): calls on connections made before must not be refused for them. A certificate of the
    old root itself is still cut off."""
    old_root, old_root_key = pki.new_ca(common_name="old root CA")
    issuing, issuing_key = signed_by(old_root, old_root_key, "issuing CA", ca=True)
    leaf, _ = signed_by(issuing, issuing_key, "auth", ca=False)
    new_root, new_root_key = pki.new_ca(common_name="new root CA")
    moved = reissued_under(issuing, new_root, new_root_key)

    after = RetiredAuthorities().after_reload(old_root + issuing, new_root + moved)
    assert len(after) == 2  # the old root, and the intermediate's old certificate
    assert after.issuer_of(leaf) is None
    old_roots_leaf, _ = pki.issue(old_root, old_root_key, "auth")
    assert after.issuer_of(old_roots_leaf) == "CN=old root CA"
