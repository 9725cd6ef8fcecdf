"""RetiredAuthorities: which client CAs a reload of tls.client_ca retired, and whose certificates
they signed (the service refuses those per call: test_service_certificates.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

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
