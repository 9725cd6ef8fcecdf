"""Unlock sources: a one-method pair that wraps the root key and unwraps it again.

The header stores what `wrap` returned; `unwrap` gets it back. A password source runs Argon2id
(docs/format.md, "Store header"); AWS KMS auto-unlock is `store/kms.py`. Other sources (Shamir
shares) would plug in with the same two methods, and a `kind` of their own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from secrets_manager.crypto import DataKey, KdfParams, KeyStatus, Purpose, derive_unlock_key
from secrets_manager.crypto import kdf as kdf_module
from secrets_manager.crypto.aead import KEY_SIZE
from secrets_manager.crypto.record import open_record, record_key_id, seal_record
from secrets_manager.errors import (
    IntegrityError,
    InvalidInputError,
    UnlockError,
    UnsafeConfigurationError,
)


class UnlockSource(Protocol):
    def wrap(self, root_key: DataKey) -> dict[str, Any]:
        """A JSON-able header section from which `unwrap` recovers `root_key`."""

    def unwrap(self, section: dict[str, Any], *, created: int) -> DataKey:
        """The root key; UnlockError if this source is not the one that wrapped it."""


class PasswordUnlock:
    """Master password → Argon2id → unlock key → AES-256-GCM-wrapped root key."""

    kind = "password"

    def __init__(
        self,
        password: str | bytes,
        params: KdfParams = kdf_module.DEFAULT,
        *,
        minimum: KdfParams | None = None,
    ) -> None:
        self._password = password.encode("utf-8") if isinstance(password, str) else password
        self._params = params
        self._minimum = minimum
        self._unlock_key: UnlockKey | None = None

    def __repr__(self) -> str:
        return "PasswordUnlock(<password>)"

    @property
    def params(self) -> KdfParams:
        """The Argon2id costs in use: as given, or as read from the header after `unwrap`."""
        return self._params

    @property
    def unlock_key(self) -> UnlockKey | None:
        """The unlock key Argon2id derived for the header the last `unwrap` opened (None before
        one succeeded): what `UnlockKeyUnlock` opens that header with again, without the password."""
        return self._unlock_key

    def wrap(self, root_key: DataKey) -> dict[str, Any]:
        params = self._params.with_new_salt()
        self._check_strength(params)
        kdf_doc = _kdf_to_doc(params)
        wrapping = _unlock_key(self._password, params, root_key.id)
        sealed = seal_record(wrapping, Purpose.ROOT_KEY, _canonical(kdf_doc), 0, root_key.material)
        return {"kind": self.kind, "kdf": kdf_doc, "wrapped_root_key": _b64(sealed)}

    def unwrap(self, section: dict[str, Any], *, created: int) -> DataKey:
        try:
            if section["kind"] != self.kind:
                raise UnlockError(f"this store is unlocked by {section['kind']!r}, not a password")
            kdf_doc = section["kdf"]
            params = _kdf_from_doc(kdf_doc)
            sealed = base64.b64decode(section["wrapped_root_key"], validate=True)
            root_id = record_key_id(sealed)
        except (KeyError, TypeError, ValueError, OverflowError, IntegrityError):
            raise IntegrityError("the store header is damaged (integrity check failed)") from None
        self._check_strength(params)
        wrapping = _unlock_key(self._password, params, root_id)
        try:
            material = open_record(lambda _id: wrapping, Purpose.ROOT_KEY, _canonical(kdf_doc), 0, sealed)
        except IntegrityError:
            raise UnlockError("wrong master password") from None
        self._params = params
        self._unlock_key = UnlockKey(header=_canonical(kdf_doc), material=wrapping.material)
        return DataKey(id=root_id, status=KeyStatus.ENABLED, created=created, material=material)

    def _check_strength(self, params: KdfParams) -> None:
        if self._minimum is not None and params.is_weaker_than(self._minimum):
            raise UnsafeConfigurationError(
                "the store's Argon2id parameters are below the production minimum "
                f"(t={self._minimum.time_cost}, m={self._minimum.memory_cost_kib} KiB, "
                f"p={self._minimum.parallelism}); raise them in place with 'secrets-manager recovery "
                "unlock-with password' (recovery shares), or outside production with 'secrets-manager "
                "passwd --kdf-profile default'"
            )


@dataclass(frozen=True, repr=False, eq=False)
class UnlockKey:
    """An unlock key Argon2id derived from the master password, and the header it opens.

    `header` is the password header's KDF section as canonical JSON (algorithm, costs and salt:
    not secret, see `unlock_key_header`): a new password or a new root key gets a new salt, so a
    key kept for the old header is simply not asked for. `material` opens this store's root key
    and nothing else, unlike the password it came from (which may open other things too)."""

    header: str
    material: bytes

    def __repr__(self) -> str:
        return "UnlockKey(<key>)"


class UnlockKeyRefused(UnlockError):
    """No unlock key was found for this header, or the one found does not open it: not a wrong
    password (nobody typed one). The caller asks for the password instead; not audited as a
    refused unlock."""


def unlock_key_header(section: dict[str, Any]) -> str:
    """The `UnlockKey.header` a password header section's unlock key is kept under (IntegrityError
    if the section is damaged; UnlockKeyRefused if no password unlocks the store)."""
    if not isinstance(section, dict) or section.get("kind") != PasswordUnlock.kind:
        raise UnlockKeyRefused("this store is not unlocked by a master password")
    try:
        doc = section["kdf"]
        _kdf_from_doc(doc)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise IntegrityError("the store header is damaged (integrity check failed)") from None
    return _canonical(doc)


class UnlockKeyUnlock:
    """Unwraps the root key with an unlock key derived earlier (`PasswordUnlock.unlock_key`):
    no password asked, no Argon2id run. `find(header)` returns the key kept for that header
    (`unlock_key_header`), or None; asked at every unwrap, so a header rewritten meanwhile (a
    `passwd` or a root rotation in another process: a new salt) is looked up afresh.

    It cannot wrap: a new wrapping gets a new salt, which needs the password."""

    kind = PasswordUnlock.kind

    def __init__(self, find: Callable[[str], bytes | None]) -> None:
        self._find = find
        self._params: KdfParams | None = None

    def __repr__(self) -> str:
        return "UnlockKeyUnlock(<key>)"

    @property
    def params(self) -> KdfParams | None:
        """The Argon2id costs of the header the last `unwrap` opened (None before one did)."""
        return self._params

    def wrap(self, root_key: DataKey) -> dict[str, Any]:
        raise InvalidInputError(
            "a new wrapping of the root key needs the master password itself, not a cached unlock key"
        )

    def unwrap(self, section: dict[str, Any], *, created: int) -> DataKey:
        header = unlock_key_header(section)
        try:
            params = _kdf_from_doc(section["kdf"])
            sealed = base64.b64decode(section["wrapped_root_key"], validate=True)
            root_id = record_key_id(sealed)
        except (KeyError, TypeError, ValueError, OverflowError, IntegrityError):
            raise IntegrityError("the store header is damaged (integrity check failed)") from None
        material = self._find(header)
        if material is None or len(material) != KEY_SIZE:
            raise UnlockKeyRefused("no unlock key is kept for this store's header")
        wrapping = DataKey(id=root_id, status=KeyStatus.ENABLED, created=0, material=material)
        try:
            root = open_record(lambda _id: wrapping, Purpose.ROOT_KEY, header, 0, sealed)
        except IntegrityError:
            raise UnlockKeyRefused("the unlock key kept for this store no longer opens it") from None
        self._params = params
        return DataKey(id=root_id, status=KeyStatus.ENABLED, created=created, material=root)


def _unlock_key(password: bytes, params: KdfParams, root_id: int) -> DataKey:
    return DataKey(
        id=root_id, status=KeyStatus.ENABLED, created=0, material=derive_unlock_key(password, params)
    )


def _kdf_to_doc(params: KdfParams) -> dict[str, Any]:
    return {
        "algorithm": "argon2id",
        "version": params.version,
        "time_cost": params.time_cost,
        "memory_cost_kib": params.memory_cost_kib,
        "parallelism": params.parallelism,
        "salt": _b64(params.salt),
    }


def _kdf_from_doc(doc: dict[str, Any]) -> KdfParams:
    if doc["algorithm"] != "argon2id":
        raise ValueError("unknown KDF")
    params = KdfParams(
        time_cost=int(doc["time_cost"]),
        memory_cost_kib=int(doc["memory_cost_kib"]),
        parallelism=int(doc["parallelism"]),
        salt=base64.b64decode(doc["salt"], validate=True),
        version=int(doc["version"]),
    )
    params.validate()
    return params


def _canonical(doc: dict[str, Any]) -> str:
    """The KDF section as canonical JSON: bound into the root key's associated data."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
