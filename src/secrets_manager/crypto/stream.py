"""Chunked AES-256-GCM for long payloads (backup files, docs/backup-format.md section 6).

A payload is cut into chunks of `CHUNK_SIZE` bytes (the last one shorter, never empty) and each
chunk is sealed on its own, as in the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár,
2015) that age uses:

    sealed chunk i = nonce (12, random) ‖ AES-256-GCM(file key, nonce, chunk i, AD_i) with tag (16)
    AD_i           = "secrets-manager-backup" ‖ 0x00 ‖ context (32) ‖ i (8, big-endian) ‖ final (1)

`context` binds every chunk to one file (the SHA-256 of its header), `i` to its place, `final` (1 on
the last chunk, else 0) to the end: chunks cannot be moved between files, reordered, dropped,
or cut off after a full chunk without a tag failing. A fresh random key per file (`aead.new_key`)
keeps the random-nonce bound of SP 800-38D far away. Every failure is the opaque IntegrityError.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from cryptography.hazmat.primitives import hashes

from secrets_manager.crypto import aead
from secrets_manager.errors import IntegrityError

CHUNK_SIZE = 64 * 1024
SEALED_CHUNK_SIZE = aead.NONCE_SIZE + CHUNK_SIZE + aead.TAG_SIZE
MIN_SEALED_CHUNK_SIZE = aead.NONCE_SIZE + 1 + aead.TAG_SIZE
CONTEXT_SIZE = 32
_AD_PREFIX = b"secrets-manager-backup\x00"


def payload_context(header: bytes) -> bytes:
    """The 32-byte context that binds a payload's chunks to its file: SHA-256 of the file's header."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(header)
    return digest.finalize()


def chunk_associated_data(context: bytes, index: int, final: bool) -> bytes:
    if len(context) != CONTEXT_SIZE:
        raise ValueError("a chunk context is 32 bytes")
    return _AD_PREFIX + context + struct.pack(">QB", index, 1 if final else 0)


def open_chunk(key: bytes, context: bytes, index: int, final: bool, sealed: bytes) -> bytes:
    """Open one sealed chunk; IntegrityError for any mismatch (including a wrong length)."""
    plaintext = aead.open_sealed(aead.cipher_for(key), sealed, chunk_associated_data(context, index, final))
    if not plaintext or (not final and len(plaintext) != CHUNK_SIZE):
        raise IntegrityError()
    return plaintext


class ChunkSealer:
    """Seals a payload chunk by chunk as it is written: feed bytes with `write`, end with `close`,
    which seals the final chunk. Keeps at most one chunk of plaintext."""

    def __init__(self, key: bytes, context: bytes, *, nonces: Iterator[bytes] | None = None) -> None:
        """`nonces` is for test vectors only (a fixed nonce per chunk); production passes None."""
        self._cipher = aead.cipher_for(key)
        self._nonces = nonces
        self._context = context
        self._buffer = bytearray()
        self._index = 0
        self._closed = False

    def write(self, data: bytes) -> list[bytes]:
        """Sealed chunks that are complete now; an empty list while less than a chunk is buffered.
        A full buffer is held back until more data arrives, since only then is it known not to be
        the final chunk."""
        if self._closed:
            raise ValueError("the payload is already closed")
        self._buffer += data
        sealed = []
        while len(self._buffer) > CHUNK_SIZE:
            sealed.append(self._seal(bytes(self._buffer[:CHUNK_SIZE]), final=False))
            del self._buffer[:CHUNK_SIZE]
        return sealed

    def close(self) -> bytes:
        """The final chunk (1 to CHUNK_SIZE bytes of plaintext: a payload is never empty)."""
        if self._closed or not self._buffer:
            raise ValueError("a payload is at least one byte and is closed once")
        self._closed = True
        return self._seal(bytes(self._buffer), final=True)

    def _seal(self, plaintext: bytes, *, final: bool) -> bytes:
        ad = chunk_associated_data(self._context, self._index, final)
        self._index += 1
        return aead.seal(self._cipher, plaintext, ad, None if self._nonces is None else next(self._nonces))
