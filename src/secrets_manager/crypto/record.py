"""The encrypted record layout of docs/format.md, section "Records".

    record = format_version (1, = 1) ‖ key_id (4, BE) ‖ nonce (12) ‖ ciphertext ‖ tag (16)
    AD     = "secrets-manager" ‖ 0x00 ‖ purpose (1) ‖ format_version (1) ‖ key_id (4, BE)
             ‖ version (8, BE) ‖ name (UTF-8)

The associated data binds purpose, format, key id, name and version, so a record copied to another
name, version or purpose fails to open. Every failure is the same IntegrityError.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from secrets_manager.crypto import aead
from secrets_manager.crypto.keyset import DataKey
from secrets_manager.errors import IntegrityError

RECORD_FORMAT = 1
_HEADER = struct.Struct(">BI")
_AD_PREFIX = b"secrets-manager\x00"
MIN_RECORD_SIZE = _HEADER.size + aead.NONCE_SIZE + aead.TAG_SIZE


class Purpose(enum.IntEnum):
    """What a record holds; part of the associated data so records cannot change role."""

    SECRET_VALUE = 1
    SECRET_METADATA = 2
    KEYSET = 3
    ROOT_KEY = 4
    AUDIT_KEY = 5
    AUDIT_ANCHOR = 6
    KEY_POLICY = 7
    BACKUP_FILE_KEY = 8
    RECOVERY_KEY = 9  # the recovery public key and its share set (docs/format.md 4.6)


def associated_data(purpose: Purpose, key_id: int, name: str, version: int) -> bytes:
    return _AD_PREFIX + struct.pack(">BBIQ", purpose, RECORD_FORMAT, key_id, version) + name.encode("utf-8")


def seal_record(
    key: DataKey,
    purpose: Purpose,
    name: str,
    version: int,
    plaintext: bytes,
    *,
    nonce: bytes | None = None,
) -> bytes:
    """Encrypt `plaintext` for (purpose, name, version) under `key`."""
    ad = associated_data(purpose, key.id, name, version)
    return _HEADER.pack(RECORD_FORMAT, key.id) + aead.seal(key.cipher, plaintext, ad, nonce)


def record_key_id(record: bytes) -> int:
    """The key id a record names; IntegrityError if it is not a record of a known format."""
    if len(record) < MIN_RECORD_SIZE:
        raise IntegrityError()
    fmt, key_id = _HEADER.unpack_from(record)
    if fmt != RECORD_FORMAT:
        raise IntegrityError()
    return int(key_id)


def open_record(
    lookup: Callable[[int], DataKey],
    purpose: Purpose,
    name: str,
    version: int,
    record: bytes,
) -> bytes:
    """Decrypt a record; `lookup` maps its key id to a key or raises IntegrityError."""
    key_id = record_key_id(record)
    key = lookup(key_id)
    ad = associated_data(purpose, key_id, name, version)
    return aead.open_sealed(key.cipher, record[_HEADER.size :], ad)
