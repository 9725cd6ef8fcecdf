"""Who is calling: the identity in a peer's client certificate.

The identity is the certificate's SPIFFE ID (its one `spiffe://` URI SAN) if it has one, else its
subject common name. It is the key the access policy's [identities] table is looked up by.

Invariant: a certificate whose identity is ambiguous or malformed (two SPIFFE IDs, a SPIFFE ID
that is not `spiffe://<trust-domain>/<path>`, several CNs, a CN that is not a certificate name)
yields an IdentityError, never a guess; in particular a bad SPIFFE ID does not fall back to the CN.
A CN identity follows `pki.check_name`'s rule (ASCII letters, digits, '_', '.', '-', at most 64):
so a CN can never pass for a SPIFFE ID or a URI, the audit log's `<unidentified>`, a name with
spaces, invisible or control characters, or a look-alike in another script. `unpresentable_identity`
applies the same rules to the identities a policy names.
This module takes plain values and does not import grpc.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from secrets_manager.errors import AccessDeniedError
from secrets_manager.tls.pki import is_name

_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9_-]+(?:\.[a-z0-9_-]+)*(?:/[A-Za-z0-9._-]+)*")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp"})  # control, format (zero-width, bidi), separators
_CN_RULE = "a CN identity is 1 to 64 ASCII letters, digits, '_', '.', '-', as 'pki issue' names"


class IdentityError(AccessDeniedError):
    """The peer presented no certificate, or one that names no usable identity. `serial`: the
    refused certificate's serial number, where it has one (the audit record names it, so an
    operator can tell which certificate was refused, and revoke it)."""

    kind = "unauthenticated"

    def __init__(self, message: str, *, serial: int | None = None) -> None:
        super().__init__(message)
        self.serial = serial


@dataclass(frozen=True)
class Caller:
    """A client certificate's identity, and what tells it apart from the identity's other
    certificates: its serial number and the SHA-256 of its DER (what `[revoked]` lists).
    Both None when grpc did not hand over the certificate itself."""

    identity: str
    serial: int | None = None
    fingerprint: bytes | None = None
    not_valid_after: float | None = None  # the certificate's end, Unix time (expiry warnings)

    @property
    def serial_text(self) -> str | None:
        return None if self.serial is None else serial_text(self.serial)

    @property
    def fingerprint_text(self) -> str | None:
        return None if self.fingerprint is None else fingerprint_text(self.fingerprint)


def serial_text(serial: int) -> str:
    """A serial number as `openssl x509 -serial` prints it: upper-case hex, whole bytes."""
    digits = f"{serial:X}"
    return digits.zfill(len(digits) + len(digits) % 2)


def fingerprint_text(fingerprint: bytes) -> str:
    """A fingerprint as `openssl x509 -fingerprint` prints it: upper-case hex bytes and colons."""
    return fingerprint.hex(":").upper()


def identity_from_certificate(certificate: bytes | str | x509.Certificate) -> str:
    """The SPIFFE ID of a certificate (PEM or DER), else its subject CN. IdentityError if it names
    none, or if its extensions or subject cannot be parsed (cryptography parses them lazily)."""
    return caller_from_certificate(certificate).identity


def caller_from_certificate(certificate: bytes | str | x509.Certificate) -> Caller:
    """`identity_from_certificate` with the certificate's serial number and fingerprint."""
    cert = _load(certificate)
    serial = cert.serial_number
    try:
        return Caller(
            _identity_of(cert),
            serial,
            cert.fingerprint(hashes.SHA256()),
            cert.not_valid_after_utc.timestamp(),
        )
    except IdentityError as exc:
        exc.serial = serial
        raise
    # cryptography parses extensions lazily, and raises for some that it cannot represent (an
    # x400Address or EDIPartyName SAN, an extension given twice) exceptions that are no ValueError.
    except (ValueError, x509.UnsupportedGeneralNameType, x509.DuplicateExtension):
        raise IdentityError(
            "the client certificate has a malformed or unsupported extension or subject", serial=serial
        ) from None


def _identity_of(cert: x509.Certificate) -> str:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise IdentityError(
            "the client certificate is a CA certificate (BasicConstraints CA:TRUE); "
            "present a client certificate the CA issued, e.g. with 'pki issue NAME'"
        )
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    spiffe_ids = [uri for uri in uris if uri.lower().startswith("spiffe:")]
    if len(spiffe_ids) > 1:
        raise IdentityError("the client certificate has more than one SPIFFE ID")
    if spiffe_ids:
        spiffe_id = spiffe_ids[0]
        problem = _spiffe_id_problem(spiffe_id)
        if problem is not None:
            raise IdentityError(f"the client certificate's SPIFFE ID {spiffe_id!r} is {problem}")
        return spiffe_id
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise IdentityError("the client certificate has neither a SPIFFE ID (URI SAN) nor a common name")
    if len(names) > 1:
        raise IdentityError("the client certificate has more than one common name")
    common_name = names[0].value
    if isinstance(common_name, bytes):
        common_name = common_name.decode("utf-8", errors="replace")
    problem = _common_name_problem(common_name)
    if problem is not None:
        shown = repr(common_name) if len(common_name) <= 80 else repr(common_name[:80]) + "..."
        raise IdentityError(
            f"the client certificate's common name {shown} {problem}; {_CN_RULE} "
            "(or give the certificate a SPIFFE ID as a URI SAN)"
        )
    return common_name


def identity_from_auth_context(auth_context: Mapping[str, Iterable[bytes | str]]) -> str:
    """The caller's identity from a grpc ServicerContext's `auth_context()` (`caller_from_auth_context`)."""
    return caller_from_auth_context(auth_context).identity


def caller_from_auth_context(auth_context: Mapping[str, Iterable[bytes | str]]) -> Caller:
    """The caller (identity, certificate serial and fingerprint) from a grpc ServicerContext's
    `auth_context()`.

    grpc (core's SSL security connector) fills that dict, str → list of bytes, for a TLS peer
    (as seen with grpcio 1.85): `transport_security_type` [b"ssl"], `security_level`,
    `ssl_session_reused`, `ssl_tls_version`; and when the peer sent a verified certificate
    `x509_pem_cert` [its PEM], `x509_subject` [b"CN=auth"], `x509_common_name` [b"auth"],
    `x509_subject_alternative_name` [each SAN as text], `peer_uri` and `peer_spiffe_id`
    [b"spiffe://…"]. An insecure channel has no `transport_security_type` of "ssl".

    The certificate itself is authoritative and goes through `identity_from_certificate`, so one
    rule decides identities. Without it (older grpc), the CN is used only if grpc reports no SAN
    at all, so a SPIFFE ID is never silently ignored.
    """
    if _values(auth_context, "transport_security_type") != ["ssl"]:
        raise IdentityError("the connection is not TLS; mutual TLS is required")
    pem = auth_context.get("x509_pem_cert")
    if pem:
        return _caller_from_pem(next(iter(pem)))
    common_names = _values(auth_context, "x509_common_name")
    has_san = bool(_values(auth_context, "x509_subject_alternative_name"))
    if len(common_names) == 1 and not has_san and _common_name_problem(common_names[0]) is None:
        return Caller(common_names[0])
    raise IdentityError("the caller presented no usable client certificate; mutual TLS is required")


@functools.lru_cache(maxsize=1024)
def _caller_from_pem(pem: bytes | str) -> Caller:
    """`caller_from_certificate` remembered per certificate: a connection presents the same
    certificate on every call, and parsing it was a fifth of a GetSecret. A pure function of
    the bytes, so caching cannot change an answer; errors are not cached."""
    return caller_from_certificate(pem)


def unpresentable_identity(identity: str) -> str | None:
    """Why no client certificate can ever present `identity` to the service (a policy naming it
    grants nothing), or None if one can: the rules `identity_from_certificate` applies."""
    if identity.lower().startswith("spiffe:"):
        problem = _spiffe_id_problem(identity)
        if problem is not None:
            return f"not a SPIFFE ID a certificate can carry (it is {problem})"
        return None
    problem = _common_name_problem(identity)
    if problem is not None:
        return f"not a common name a certificate can carry (it {problem}; {_CN_RULE})"
    return None


def _spiffe_id_problem(spiffe_id: str) -> str | None:
    """Why `spiffe_id` is no caller's SPIFFE ID, or None."""
    if not _SPIFFE_ID.fullmatch(spiffe_id) or any(
        s in (".", "..") for s in spiffe_id.removeprefix("spiffe://").split("/")[1:]
    ):
        return (
            "malformed: spiffe://trust-domain/path, a lower-case trust domain, path segments of "
            "letters, digits, '.', '_', '-'"
        )
    if "/" not in spiffe_id.removeprefix("spiffe://"):
        return "a trust domain alone, which names no workload (a CA's own ID); it needs a path"
    return None


# rotation.SCHEDULE_ACTOR (a sibling layer): a certificate with this CN would write versions the
# schedule takes for its own, and audit records that read as the schedule's.
_SCHEDULE_ACTOR = "rotation-schedule"


def _common_name_problem(name: str) -> str | None:
    """Why `name` is not usable as a CN identity, or None. The last test alone decides; the ones
    before it only say more precisely what is wrong."""
    if any(unicodedata.category(c) in _INVISIBLE for c in name):
        return "has control characters or invisible ones"
    if not name.strip() or name != name.strip():
        return "is empty or has spaces at an end"
    if name.lower().startswith("spiffe:") or "://" in name or _URI_SCHEME.match(name):
        return "is written like a URI (a SPIFFE ID counts only as a URI SAN, never as the CN)"
    if name.startswith("<") and name.endswith(">"):
        return "is written like the audit log's marker for a caller without an identity"
    if name == _SCHEDULE_ACTOR:
        return (
            "is the name the service's rotation schedule acts as (its audit records, and the author "
            "of the versions it stages, which it alone resumes)"
        )
    if not is_name(name):
        return "has characters other than ASCII letters, digits, '_', '.', '-', or more than 64"
    return None


def _values(auth_context: Mapping[str, Iterable[bytes | str]], key: str) -> list[str]:
    return [
        value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
        for value in auth_context.get(key, ())
    ]


def _load(certificate: bytes | str | x509.Certificate) -> x509.Certificate:
    if isinstance(certificate, x509.Certificate):
        return certificate
    data = certificate.encode("ascii", errors="replace") if isinstance(certificate, str) else certificate
    begin = data.find(b"-----BEGIN")
    try:
        if begin >= 0:  # text before it (openssl's "Bag Attributes") is no part of the certificate
            return x509.load_pem_x509_certificate(data[begin:])
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise IdentityError("the client certificate is not a valid X.509 certificate") from None
