"""HMAC-SHA256 and SHA-256 for the audit log: chain links, record MACs and value fingerprints.

Each use has its own domain-separation label, so a value fingerprint can never be replayed as a
record MAC. Verification is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac

from secrets_manager.crypto.aead import KEY_SIZE

_RECORD_LABEL = b"secrets-manager/audit-record\x00"
_VALUE_LABEL = b"secrets-manager/audit-value\x00"
_PAGE_TOKEN_LABEL = b"secrets-manager/page-token\x00"
_HEAD_LABEL = b"secrets-manager/audit-head\x00"


# The standard library's one-shot OpenSSL calls: the same SHA-256 and HMAC as `cryptography`'s, at
# a fraction of the per-call cost (no hash object to build), which every audit record pays twice.


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def value_digest(value: bytes) -> str:
    """SHA-256 (hex) of a secret's value, kept in its version's sealed metadata (docs/format.md 7):
    binds the value record to the metadata that lists it."""
    return sha256_hex(value)


def value_digest_ok(value: bytes, digest: str) -> bool:
    return hmac.compare_digest(value_digest(value), digest)


def _hmac_hex(key: bytes, label: bytes, data: bytes) -> str:
    if len(key) != KEY_SIZE:
        raise ValueError("audit keys are 32 bytes")
    return hmac.digest(key, label + data, "sha256").hex()


def audit_keys_of(keyring: bytes) -> tuple[bytes, ...]:
    """The audit keys in a stored keyring (docs/format.md, purpose 5): 32 bytes each, oldest
    first, so key N (its generation, `key_id` in a record) is the N-th. ValueError if `keyring`
    is not a whole number of keys, at least one."""
    if not keyring or len(keyring) % KEY_SIZE:
        raise ValueError("an audit keyring is one or more 32-byte keys")
    return tuple(keyring[at : at + KEY_SIZE] for at in range(0, len(keyring), KEY_SIZE))


def record_mac(key: bytes, record_hash: str) -> str:
    """MAC over a record's chained hash: proves the writer held the audit key."""
    return _hmac_hex(key, _RECORD_LABEL, record_hash.encode("ascii"))


def record_mac_ok(key: bytes, record_hash: str, mac: str) -> bool:
    return hmac.compare_digest(record_mac(key, record_hash), mac)


def head_mac(key: bytes, head: str) -> str:
    """MAC over the text of an audit log's head (`audit head`), shipped off the host as a witness:
    its own label, so neither a record MAC nor a fingerprint can be passed off as one."""
    return _hmac_hex(key, _HEAD_LABEL, head.encode("utf-8"))


def head_mac_ok(key: bytes, head: str, mac: str) -> bool:
    return hmac.compare_digest(head_mac(key, head), mac)


class Fingerprint(str):
    """A value's fingerprint that knows the generation of the audit key it was made under: a
    writer that has met a newer key since leaves it out of its record rather than write one that
    the old key's holder could test guesses against (docs/audit.md §3a)."""

    generation: int

    def __new__(cls, text: str, generation: int) -> Fingerprint:
        made = super().__new__(cls, text)
        made.generation = generation
        return made


def value_fingerprint(key: bytes, value: bytes, generation: int = 1) -> Fingerprint:
    """`hmac-sha256:<hex>` of a value: identifies it later without revealing it (Vault's
    audit-hash). `generation`: which of the store's audit keys `key` is (1: the first)."""
    return Fingerprint("hmac-sha256:" + _hmac_hex(key, _VALUE_LABEL, value), generation)


def page_token_mac(key: bytes, data: bytes) -> str:
    """Hex HMAC binding a page token to the request it pages: its own label, so no token is a
    value's fingerprint (or the reverse)."""
    return _hmac_hex(key, _PAGE_TOKEN_LABEL, data)
