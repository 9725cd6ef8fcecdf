"""Unlock sources: a one-method pair that wraps the root key and unwraps it again.

The header stores what `wrap` returned; `unwrap` gets it back. A password source runs Argon2id
(docs/format.md, "Store header"); AWS KMS auto-unlock is `store/kms.py`. Other sources (Shamir
shares) would plug in with the same two methods, and a `kind` of their own.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Protocol

from secrets_manager.crypto import DataKey, KdfParams, KeyStatus, Purpose, derive_unlock_key
from secrets_manager.crypto import kdf as kdf_module
from secrets_manager.crypto.record import open_record, record_key_id, seal_record
from secrets_manager.errors import IntegrityError, UnlockError, UnsafeConfigurationError


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

    def __repr__(self) -> str:
        return "PasswordUnlock(<password>)"

    @property
    def params(self) -> KdfParams:
        """The Argon2id costs in use: as given, or as read from the header after `unwrap`."""
        return self._params

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
        except (KeyError, TypeError, ValueError, IntegrityError):
            raise IntegrityError("the store header is damaged (integrity check failed)") from None
        self._check_strength(params)
        wrapping = _unlock_key(self._password, params, root_id)
        try:
            material = open_record(lambda _id: wrapping, Purpose.ROOT_KEY, _canonical(kdf_doc), 0, sealed)
        except IntegrityError:
            raise UnlockError("wrong master password") from None
        self._params = params
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
