"""Argon2id (RFC 9106) from a master password to a 256-bit unlock key.

Parameters live in the store header so they can be raised later without breaking old stores.
`DEFAULT` is RFC 9106's second recommended option (t=3, 64 MiB, p=4); `TEST` is a documented
cheap profile for test suites only, which production refuses (see `KdfParams.is_weaker_than`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from argon2.exceptions import HashingError
from argon2.low_level import ARGON2_VERSION, Type, hash_secret_raw

from secrets_manager.crypto.aead import KEY_SIZE
from secrets_manager.errors import StorageError

SALT_SIZE = 16


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters plus the store's salt (not secret)."""

    time_cost: int
    memory_cost_kib: int
    parallelism: int
    salt: bytes = b""
    version: int = ARGON2_VERSION

    def with_new_salt(self) -> KdfParams:
        return replace(self, salt=os.urandom(SALT_SIZE))

    def is_weaker_than(self, other: KdfParams) -> bool:
        return (
            self.time_cost < other.time_cost
            or self.memory_cost_kib < other.memory_cost_kib
            or self.parallelism < other.parallelism
        )

    def validate(self) -> None:
        """Reject parameters no honest writer produces (a reader MUST NOT run them).

        The upper bounds keep a doctored header (anyone who can write the store's storage, e.g. a
        database administrator, can edit it) from making every reader allocate gigabytes and
        spend minutes before the password is even checked: at most 1 GiB, 16 passes, 16 lanes,
        well above every profile we write (the default is 64 MiB, 3 passes, 4 lanes)."""
        if len(self.salt) != SALT_SIZE:
            raise ValueError("Argon2 salt must be 16 bytes")
        if not (1 <= self.time_cost <= MAX_TIME_COST and 1 <= self.parallelism <= MAX_PARALLELISM):
            raise ValueError("Argon2 time cost and parallelism must be between 1 and 16")
        if not (8 * self.parallelism <= self.memory_cost_kib <= MAX_MEMORY_KIB):
            raise ValueError("Argon2 memory cost must be between 8*p KiB and 1 GiB")
        if self.version != ARGON2_VERSION:
            raise ValueError("unsupported Argon2 version")


MAX_TIME_COST = 16
MAX_PARALLELISM = 16
MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB
DEFAULT = KdfParams(time_cost=3, memory_cost_kib=64 * 1024, parallelism=4)
TEST = KdfParams(time_cost=1, memory_cost_kib=1024, parallelism=1)
PROFILES: dict[str, KdfParams] = {"default": DEFAULT, "test": TEST}


def derive_unlock_key(password: bytes, params: KdfParams) -> bytes:
    """Argon2id(password, salt) → 32-byte unlock key. Slow on purpose.

    StorageError (exit 1, one line saying what to do) when Argon2id cannot run with these
    parameters: within the bounds of `validate`, a header may still ask for more memory than the
    process may have (a container's limit, `ulimit -v`), which argon2 reports as a HashingError."""
    params.validate()
    try:
        return hash_secret_raw(
            secret=password,
            salt=params.salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_cost_kib,
            parallelism=params.parallelism,
            hash_len=KEY_SIZE,
            type=Type.ID,
            version=params.version,
        )
    except HashingError:
        raise StorageError(
            f"Argon2id could not run with the parameters it was given (t={params.time_cost}, "
            f"m={params.memory_cost_kib} KiB, p={params.parallelism}): this process may not have "
            f"{params.memory_cost_kib // 1024} MiB; raise its memory limit, or, if these are not "
            "the parameters the store or backup was written with, its header was edited: restore "
            "it from a backup"
        ) from None
