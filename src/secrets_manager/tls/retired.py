"""Client CAs a reload took out of the trusted bundle, and the certificates they issued.

gRPC checks a client certificate against the client CA once, in the handshake; a connection made
before a SIGHUP that replaced the CA (the usual answer to a leaked CA key) stays open for as long
as its client keeps it, and every call on it was served. The service asks `RetiredAuthorities`
per call whether the caller's certificate was issued by a CA no longer trusted: one signature
check per certificate after each reload that retired a CA (remembered), nothing at all otherwise.

Only a certificate signed directly by a retired CA is recognised: gRPC hands over the leaf alone,
not the chain the client sent, so a leaf under a retired root through an intermediate is not.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization


class RetiredAuthorities:
    """The CAs retired by reloads so far (none at start), minus any a later reload trusts again."""

    def __init__(
        self, retired: Sequence[x509.Certificate] = (), trusted: Sequence[x509.Certificate] = ()
    ) -> None:
        self._retired = tuple(retired)
        self._trusted = tuple(trusted)

    def __len__(self) -> int:
        return len(self._retired)

    def after_reload(self, before: bytes, after: bytes) -> RetiredAuthorities:
        """The retired CAs once the client CA bundle `before` is replaced by `after` (PEM): those
        it no longer holds join them, unless one it holds signed them (through any chain of
        those); those it holds (again) leave them."""
        old, new = _bundle(before), _bundle(after)
        kept = {_der(ca) for ca in new}
        retired = {_der(ca): ca for ca in (*self._retired, *old) if _der(ca) not in kept}
        # One taken out that a CA still in the bundle signed (an intermediate beside its root, the
        # root kept) is trusted still: the handshake accepts its certificates from a client that
        # sends the chain, so cutting them off per call would refuse what a new connection lets in.
        trusted, grown = list(new), True
        while grown:
            chained = [der for der, ca in retired.items() if any(_signed(ca, t) for t in trusted)]
            trusted.extend(retired.pop(der) for der in chained)
            grown = bool(chained)
        return RetiredAuthorities(list(retired.values()), new)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one instance per reload; few certificates)
    def issuer_of(self, leaf_pem: bytes | str) -> str | None:
        """The subject of the retired CA that signed `leaf_pem`, or None: not one of theirs, or
        also signed by a trusted CA's key (a CA re-issued with its old key is trusted still)."""
        if not self._retired:
            return None
        try:
            leaf = x509.load_pem_x509_certificate(
                leaf_pem.encode() if isinstance(leaf_pem, str) else leaf_pem
            )
        except ValueError:
            return None
        retired_by = next((ca for ca in self._retired if _signed(leaf, ca)), None)
        if retired_by is None or any(_signed(leaf, ca) for ca in self._trusted):
            return None
        return retired_by.subject.rfc4514_string()


def _bundle(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _signed(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    if leaf.issuer != ca.subject:
        return False
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
