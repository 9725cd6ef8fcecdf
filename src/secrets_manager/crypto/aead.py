"""AES-256-GCM with a fresh random 96-bit nonce per message (NIST SP 800-38D, section 8.2.2).

Every failure to open is the same opaque `IntegrityError`: callers never learn whether the tag,
the nonce or the associated data was wrong.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secrets_manager.errors import IntegrityError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16


def new_key() -> bytes:
    """A random 256-bit key from the OS CSPRNG."""
    return os.urandom(KEY_SIZE)


def cipher_for(key: bytes) -> AESGCM:
    """An AES-256-GCM instance; refuses any key that is not exactly 256 bits."""
    if len(key) != KEY_SIZE:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    return AESGCM(key)


def seal(cipher: AESGCM, plaintext: bytes, associated_data: bytes, nonce: bytes | None = None) -> bytes:
    """Return nonce ‖ ciphertext ‖ tag. `nonce` is for test vectors only; production passes None."""
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise ValueError("nonce must be 12 bytes")
    return nonce + cipher.encrypt(nonce, plaintext, associated_data)


def open_sealed(cipher: AESGCM, sealed: bytes, associated_data: bytes) -> bytes:
    """Inverse of `seal`; raises IntegrityError on any mismatch or malformed input."""
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise IntegrityError()
    try:
        return cipher.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated_data)
    except InvalidTag:
        raise IntegrityError() from None
