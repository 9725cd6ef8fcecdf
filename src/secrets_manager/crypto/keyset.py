"""Tink-style keysets: a list of data keys with one primary, changed copy-on-write.

Encrypt with `Keyset.primary`; a ciphertext names its key id; decrypt looks that id up with
`Keyset.key_for_decryption`, which only hands out enabled keys. Key material never appears in
`repr` and refuses pickling.
"""

from __future__ import annotations

import base64
import enum
import json
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secrets_manager.crypto.aead import KEY_SIZE, cipher_for, new_key
from secrets_manager.errors import IntegrityError

KEYSET_FORMAT = 1
# NIST SP 800-38D, section 8.3: at most 2^32 encryptions with random 96-bit nonces per key.
# The primary is replaced at half of that, leaving a wide margin for uncounted retries.
ROTATE_AFTER_USES = 2**31


class KeyStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class DataKey:
    """One AES-256 key with its id, status, creation time (Unix seconds) and encryption count."""

    id: int
    status: KeyStatus
    created: int
    uses: int = 0
    material: bytes = field(default=b"", repr=False)
    _cipher: AESGCM | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.id < 2**32:
            raise ValueError("key ids are non-zero 32-bit integers")
        if self.status is KeyStatus.DESTROYED:
            if self.material:
                raise ValueError("a destroyed key keeps no material")
        elif len(self.material) != KEY_SIZE:
            raise ValueError("a live key has 32 bytes of material")
        if self._cipher is None and self.material:
            object.__setattr__(self, "_cipher", cipher_for(self.material))

    @classmethod
    def generate(cls, *, key_id: int, created: int) -> DataKey:
        return cls(id=key_id, status=KeyStatus.ENABLED, created=created, material=new_key())

    @property
    def cipher(self) -> AESGCM:
        if self._cipher is None:
            raise IntegrityError()
        return self._cipher

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")


@dataclass(frozen=True)
class Keyset:
    """An immutable keyring; every change returns a new Keyset to swap in whole."""

    primary_id: int
    keys: tuple[DataKey, ...]

    def __post_init__(self) -> None:
        ids = [k.id for k in self.keys]
        if len(ids) != len(set(ids)):
            raise ValueError("duplicate key id in keyset")
        if self.primary_id not in ids or self._find(self.primary_id).status is not KeyStatus.ENABLED:
            raise ValueError("the primary key must be present and enabled")

    @classmethod
    def generate(cls, *, created: int) -> Keyset:
        key = DataKey.generate(key_id=new_key_id(set()), created=created)
        return cls(primary_id=key.id, keys=(key,))

    @property
    def primary(self) -> DataKey:
        return self._find(self.primary_id)

    def key_for_decryption(self, key_id: int) -> DataKey:
        """The enabled key with this id; any other case is the same opaque IntegrityError."""
        for key in self.keys:
            if key.id == key_id and key.status is KeyStatus.ENABLED:
                return key
        raise IntegrityError()

    def with_uses(self, count: int) -> Keyset:
        """Record `count` more encryptions under the primary key."""
        primary = self.primary
        return self._replace_key(replace(primary, uses=primary.uses + count))

    def with_rotation_if_due(self, *, created: int) -> Keyset:
        """This keyset, or one with a fresh primary once the primary reached ROTATE_AFTER_USES."""
        if self.primary.uses >= ROTATE_AFTER_USES:
            return self.with_new_primary(created=created)
        return self

    def with_new_primary(self, *, created: int) -> Keyset:
        """Add a fresh key and make it primary (rotation steps 1 and 2 in one)."""
        key = DataKey.generate(key_id=new_key_id({k.id for k in self.keys}), created=created)
        return Keyset(primary_id=key.id, keys=(*self.keys, key))

    def _find(self, key_id: int) -> DataKey:
        for key in self.keys:
            if key.id == key_id:
                return key
        raise KeyError(key_id)

    def _replace_key(self, new: DataKey) -> Keyset:
        return replace(self, keys=tuple(new if k.id == new.id else k for k in self.keys))

    def to_bytes(self) -> bytes:
        """Canonical JSON of the keyset, key material included: only ever stored encrypted."""
        doc: dict[str, Any] = {
            "format": KEYSET_FORMAT,
            "primary": self.primary_id,
            "keys": [
                {
                    "id": k.id,
                    "status": k.status.value,
                    "created": k.created,
                    "uses": k.uses,
                    "material": base64.b64encode(k.material).decode("ascii"),
                }
                for k in self.keys
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Keyset:
        """Parse a decrypted keyset; anything malformed is an IntegrityError."""
        try:
            doc = json.loads(data)
            if doc["format"] != KEYSET_FORMAT:
                raise ValueError("keyset format")
            keys = tuple(
                DataKey(
                    id=int(k["id"]),
                    status=KeyStatus(k["status"]),
                    created=int(k["created"]),
                    uses=int(k["uses"]),
                    material=base64.b64decode(k["material"], validate=True),
                )
                for k in doc["keys"]
            )
            return cls(primary_id=int(doc["primary"]), keys=keys)
        except (ValueError, KeyError, TypeError):
            raise IntegrityError() from None

    def __reduce__(self) -> NoReturn:
        raise TypeError("keysets cannot be pickled")


def new_key_id(taken: set[int]) -> int:
    """A random non-zero 32-bit key id not in `taken` (ids are random, as in Tink)."""
    while True:
        key_id = secrets.randbits(32)
        if key_id and key_id not in taken:
            return key_id
