"""The only package that touches AES-GCM and Argon2: pure functions and small immutable values.

No I/O, no names of files or services: everything in and out is bytes or frozen dataclasses.
"""

from secrets_manager.crypto.aead import KEY_SIZE, NONCE_SIZE, TAG_SIZE
from secrets_manager.crypto.kdf import KdfParams, derive_unlock_key
from secrets_manager.crypto.keyset import DataKey, Keyset, KeyStatus, RotationPolicy
from secrets_manager.crypto.record import Purpose, open_record, seal_record

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "DataKey",
    "KdfParams",
    "KeyStatus",
    "Keyset",
    "Purpose",
    "RotationPolicy",
    "derive_unlock_key",
    "open_record",
    "seal_record",
]
