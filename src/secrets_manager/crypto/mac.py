"""HMAC-SHA256 and SHA-256 for the audit log: chain links, record MACs and value fingerprints.

Each use has its own domain-separation label, so a value fingerprint can never be replayed as a
record MAC. Verification is constant-time.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from secrets_manager.crypto.aead import KEY_SIZE

_RECORD_LABEL = b"secrets-manager/audit-record\x00"
_VALUE_LABEL = b"secrets-manager/audit-value\x00"


def sha256_hex(data: bytes) -> str:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize().hex()


def _hmac_hex(key: bytes, label: bytes, data: bytes) -> str:
    if len(key) != KEY_SIZE:
        raise ValueError("audit keys are 32 bytes")
    mac = HMAC(key, hashes.SHA256())
    mac.update(label + data)
    return mac.finalize().hex()


def record_mac(key: bytes, record_hash: str) -> str:
    """MAC over a record's chained hash: proves the writer held the audit key."""
    return _hmac_hex(key, _RECORD_LABEL, record_hash.encode("ascii"))


def record_mac_ok(key: bytes, record_hash: str, mac: str) -> bool:
    return hmac.compare_digest(record_mac(key, record_hash), mac)


def value_fingerprint(key: bytes, value: bytes) -> str:
    """`hmac-sha256:<hex>` of a value: identifies it later without revealing it (Vault's audit-hash)."""
    return "hmac-sha256:" + _hmac_hex(key, _VALUE_LABEL, value)
