"""A small certificate authority for the service's mutual TLS, built on `cryptography.x509`.

Every key is EC P-256 and every signature ECDSA-SHA256. Every certificate is an X509-SVID in the
SPIFFE sense: it carries exactly one SPIFFE ID as a URI SAN — the CA `spiffe://<trust-domain>`, a
client or server `spiffe://<trust-domain>/<name>` — and its subject CN is the name. Clients get
extended key usage clientAuth only and servers serverAuth only, so neither can stand in for the
other. Validity starts five minutes in the past to absorb clock skew between machines.

Invariant: nothing here is hand-rolled ASN.1 or crypto; this module builds and signs with
`cryptography` and returns PEM bytes (keys as unencrypted PKCS#8, for files written 0600).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secrets_manager.errors import InvalidInputError

DEFAULT_TRUST_DOMAIN = "shrivenquant.local"
DEFAULT_CA_NAME = "secrets-manager CA"
CA_DAYS = 3650
CERTIFICATE_DAYS = 365
CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_SERVER_DNS = ("localhost",)
DEFAULT_SERVER_IPS = ("127.0.0.1",)

_TRUST_DOMAIN = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

PemPair = tuple[bytes, bytes]
"""(certificate PEM, private key PEM)."""


def spiffe_id(trust_domain: str, name: str | None = None) -> str:
    """`spiffe://<trust_domain>/<name>`, or the trust domain's own ID when `name` is None."""
    check_trust_domain(trust_domain)
    if name is None:
        return f"spiffe://{trust_domain}"
    check_name(name)
    return f"spiffe://{trust_domain}/{name}"


def new_ca(
    common_name: str = DEFAULT_CA_NAME,
    days: int = CA_DAYS,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    not_before: datetime | None = None,
) -> PemPair:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    if not common_name or len(common_name) > 64:
        raise InvalidInputError("the CA's common name must be 1 to 64 characters")
    start, end = _validity(not_before, days)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(trust_domain))]),
            critical=False,
        )
    )
    return _pem(builder.sign(key, hashes.SHA256()), key)


def issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    name: str,
    *,
    server: bool = False,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    days: int = CERTIFICATE_DAYS,
    trust_domain: str | None = None,
    not_before: datetime | None = None,
) -> PemPair:
    """A client (default) or server certificate for `name`, signed by the CA.

    The SPIFFE ID's trust domain is `trust_domain`, else the CA's own (from its URI SAN), else
    DEFAULT_TRUST_DOMAIN. A server certificate gets SANs for `dns` and `ips`, or for localhost
    and 127.0.0.1 when neither is given.
    """
    check_name(name)
    dns, ips = list(dns), list(ips)
    if (dns or ips) and not server:
        raise InvalidInputError("DNS names and IP addresses go in server certificates only; add --server")
    ca_cert, ca_key = load_ca(ca_cert_pem, ca_key_pem)
    domain = trust_domain or trust_domain_of(ca_cert) or DEFAULT_TRUST_DOMAIN
    start, end = _validity(not_before, days)
    ca_end = ca_cert.not_valid_after_utc
    if ca_end <= datetime.now(UTC):
        raise InvalidInputError(
            f"the CA expired on {ca_end:%Y-%m-%d}; create a new one with 'pki init --force'"
        )
    if end > ca_end:
        raise InvalidInputError(
            f"the CA expires on {ca_end:%Y-%m-%d}, before this certificate would; "
            f"give fewer days (at most {max((ca_end - start).days, 0)}) or create a new CA"
        )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(domain, name))]
    if server:
        if not dns and not ips:
            dns, ips = list(DEFAULT_SERVER_DNS), list(DEFAULT_SERVER_IPS)
        sans += [x509.DNSName(_dns_name(d)) for d in dict.fromkeys(dns)]
        sans += [x509.IPAddress(_ip_address(i)) for i in dict.fromkeys(ips)]
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    return _pem(builder.sign(ca_key, hashes.SHA256()), key)


def load_ca(cert_pem: bytes, key_pem: bytes) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Parse a CA certificate and its key; they must be a CA and belong together."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise InvalidInputError("the CA certificate is not a PEM X.509 certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (TypeError, ValueError):
        raise InvalidInputError("the CA key is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInputError("the CA key is not an EC key")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise InvalidInputError("the CA certificate is not a CA made by 'pki init'") from None
    if not constraints.ca:
        raise InvalidInputError("the CA certificate is not a CA certificate")
    if key.public_key() != cert.public_key():
        raise InvalidInputError("the CA key does not belong to the CA certificate")
    return cert, key


def trust_domain_of(cert: x509.Certificate) -> str | None:
    """The trust domain of a certificate's SPIFFE ID, if it has exactly one."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    if len(ids) != 1:
        return None
    domain = ids[0].removeprefix("spiffe://").partition("/")[0]
    return domain if _TRUST_DOMAIN.fullmatch(domain) else None


def check_trust_domain(trust_domain: str) -> str:
    if len(trust_domain) > 255 or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidInputError(
            f"invalid trust domain {trust_domain!r}: use lowercase letters, digits, '-', '_' and dots "
            "(like shrivenquant.local)"
        )
    return trust_domain


def is_name(name: str) -> bool:
    """Whether `name` is a certificate name (`check_name`'s rule): ASCII letters, digits, '_',
    '.', '-', at most 64. A CN identity must be one too (tls/identity.py)."""
    return _NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    """A certificate name: one SPIFFE path segment and a CN, also usable as a file name."""
    if not is_name(name):
        raise InvalidInputError(
            f"invalid certificate name {name!r}: use up to 64 letters, digits, '_', '.', '-', "
            "starting with a letter, digit or '_' (like market-connector)"
        )
    return name


def _validity(not_before: datetime | None, days: int) -> tuple[datetime, datetime]:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise InvalidInputError("a certificate must be valid for at least 1 day")
    if not_before is None:
        start = datetime.now(UTC) - CLOCK_SKEW
    elif not_before.tzinfo is None:
        raise InvalidInputError("not_before must be timezone-aware")
    else:
        start = not_before.astimezone(UTC)
    try:
        return start, start + timedelta(days=days)
    except OverflowError:
        raise InvalidInputError(f"{days} days is too long a validity") from None


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _dns_name(name: str) -> str:
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        raise InvalidInputError(f"invalid DNS name {name!r} (use ASCII labels like svc.example.internal)")
    return name.lower()


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidInputError(f"invalid IP address {text!r}") from None


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> PemPair:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
