"""Tink-style keysets: a list of data keys with one primary, changed copy-on-write.

Encrypt with `Keyset.primary`; a ciphertext names its key id; decrypt looks that id up with
`Keyset.key_for_decryption`, which only hands out enabled keys. Key material never appears in
`repr` and refuses pickling.

Lifecycle (docs/format.md 6.1), one small pure step each, every step returning a new Keyset:
add (`with_new_key`) → promote (`with_primary`; both at once: `with_new_primary`) → [records are
rewrapped by the store] → disable (`with_status(id, DISABLED)`, undone by `with_status(id,
ENABLED)`) → destroy (`with_destroyed`, which drops the material). The primary can never be
disabled or destroyed, and only a disabled key can be destroyed, so the keyset itself never
stops decrypting what its primary wrote. `RotationPolicy` says when a primary is replaced on its
own.
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
POLICY_FORMAT = 1


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
class RotationPolicy:
    """When a primary key is replaced on its own: once it has sealed `max_uses` records, or once it
    is `max_age_seconds` old (None: no age limit). `max_uses` may be lowered, never raised above
    ROTATE_AFTER_USES, the bound that keeps random nonces safe."""

    max_uses: int = ROTATE_AFTER_USES
    max_age_seconds: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_uses, bool) or not 1 <= self.max_uses <= ROTATE_AFTER_USES:
            raise ValueError(f"max_uses must be between 1 and {ROTATE_AFTER_USES} (2^31)")
        if self.max_age_seconds is not None and (
            isinstance(self.max_age_seconds, bool) or self.max_age_seconds < 1
        ):
            raise ValueError("max_age_seconds must be at least 1, or None for no age limit")

    def is_due(self, key: DataKey, *, now: int) -> bool:
        """Whether `key`, as primary, must be replaced before it seals anything more."""
        if key.uses >= self.max_uses:
            return True
        return self.max_age_seconds is not None and now - key.created >= self.max_age_seconds

    def to_bytes(self) -> bytes:
        """Canonical JSON (docs/format.md 6.2); stored sealed under the root key."""
        doc = {"format": POLICY_FORMAT, "max_uses": self.max_uses, "max_age_seconds": self.max_age_seconds}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> RotationPolicy:
        """Parse a decrypted policy; anything malformed is an IntegrityError."""
        try:
            doc = json.loads(data)
            if doc["format"] != POLICY_FORMAT:
                raise ValueError("policy format")
            max_uses, max_age = doc["max_uses"], doc["max_age_seconds"]
            if type(max_uses) is not int or (max_age is not None and type(max_age) is not int):
                raise ValueError("policy field types")
            return cls(max_uses=max_uses, max_age_seconds=max_age)
        except (ValueError, KeyError, TypeError):
            raise IntegrityError() from None


DEFAULT_POLICY = RotationPolicy()


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

    def with_rotation_if_due(self, *, created: int, policy: RotationPolicy = DEFAULT_POLICY) -> Keyset:
        """This keyset, or one with a fresh primary (created at `created`, i.e. now) once `policy`
        says the primary is due."""
        if policy.is_due(self.primary, now=created):
            return self.with_new_primary(created=created)
        return self

    def with_new_key(self, *, created: int) -> Keyset:
        """Rotation step 1, add: a fresh enabled key that decrypts but does not encrypt yet."""
        key = DataKey.generate(key_id=new_key_id({k.id for k in self.keys}), created=created)
        return Keyset(primary_id=self.primary_id, keys=(*self.keys, key))

    def with_primary(self, key_id: int) -> Keyset:
        """Rotation step 2, promote: an enabled key becomes the one new records are sealed with."""
        if self.key(key_id).status is not KeyStatus.ENABLED:
            raise ValueError("only an enabled key can become primary")
        return replace(self, primary_id=key_id)

    def with_new_primary(self, *, created: int) -> Keyset:
        """Add a fresh key and make it primary (rotation steps 1 and 2 in one)."""
        added = self.with_new_key(created=created)
        return added.with_primary(added.keys[-1].id)

    def with_status(self, key_id: int, status: KeyStatus) -> Keyset:
        """Disable a key (it stops decrypting) or enable a disabled one again.

        KeyError for an unknown id; ValueError for the primary, a destroyed key, or DESTROYED
        (use `with_destroyed`)."""
        key = self.key(key_id)
        if status is KeyStatus.DESTROYED:
            raise ValueError("destroy a key with with_destroyed")
        if key_id == self.primary_id:
            raise ValueError("the primary key cannot be disabled")
        if key.status is KeyStatus.DESTROYED:
            raise ValueError("a destroyed key has no material left to enable or disable")
        return self._replace_key(replace(key, status=status))

    def with_destroyed(self, key_id: int) -> Keyset:
        """Rotation's last step: a disabled key loses its material for good (id and counts stay).

        KeyError for an unknown id; ValueError unless the key is disabled (so never the primary)."""
        key = self.key(key_id)
        if key.status is not KeyStatus.DISABLED:
            raise ValueError("only a disabled key can be destroyed")
        return self._replace_key(
            DataKey(id=key.id, status=KeyStatus.DESTROYED, created=key.created, uses=key.uses)
        )

    def key(self, key_id: int) -> DataKey:
        """The key with this id, whatever its status; KeyError if there is none."""
        return self._find(key_id)

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
