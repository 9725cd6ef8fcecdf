"""Store URLs and opening a store: which `Storage` a URL names, production's guard rails.

Supported now: a plain path or `sqlite:///absolute/path`. Unsupported schemes fail with a message
that names what is supported. The entry points call `create_store` / `open_store` and
never see storage or crypto themselves.
"""

from __future__ import annotations

import stat
from pathlib import Path

from platformdirs import user_data_path

from secrets_manager.crypto.kdf import DEFAULT as PRODUCTION_KDF_MINIMUM
from secrets_manager.crypto.kdf import PROFILES as KDF_PROFILES
from secrets_manager.environment import Environment
from secrets_manager.errors import ConflictError, InvalidInputError, UnsafeConfigurationError
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store.encrypted import EncryptedStore
from secrets_manager.store.unlock import PasswordUnlock

SQLITE_SCHEME = "sqlite://"
DEFAULT_FILE_NAME = "secrets.db"


def default_store_path() -> Path:
    """The per-user default store file, e.g. ~/.local/share/secrets-manager/secrets.db."""
    return user_data_path("secrets-manager", appauthor=False) / DEFAULT_FILE_NAME


def sqlite_path(url: str | None) -> Path:
    """The file a store URL names; InvalidInputError for a scheme we do not support."""
    if not url:
        return default_store_path()
    if url.startswith(SQLITE_SCHEME):
        path = url[len(SQLITE_SCHEME) :]
        if not path.startswith("/") or path == "/":
            raise InvalidInputError(f"store URL {url!r}: write sqlite:///absolute/path/to/store.db")
        return Path(path)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise InvalidInputError(
            f"store URL scheme {scheme!r} is not supported; use a file path or sqlite:///path"
        )
    return Path(url).expanduser()


def default_audit_path(url: str | None) -> Path:
    """The audit log beside the store file: `store.db` → `store.audit.jsonl`."""
    path = sqlite_path(url)
    return path.with_name(f"{path.stem}.audit.jsonl")


def open_storage(url: str | None, *, create: bool, environment: Environment) -> SqliteStorage:
    """Open (or, with `create`, make) the storage a URL names, applying production's guard rails."""
    path = sqlite_path(url)
    if environment.is_production and not create and path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise UnsafeConfigurationError(
                f"store file {path} has mode {mode:04o}, which group or others can access; "
                f"run 'chmod 600 {path}' (production refuses unprotected store files)"
            )
    return SqliteStorage(path, create=create)


def create_store(
    url: str | None,
    password: bytes,
    *,
    kdf_profile: str,
    environment: Environment,
    actor: str,
) -> EncryptedStore:
    """Create a new, empty password-protected store where `url` points. Never overwrites."""
    if kdf_profile not in KDF_PROFILES:
        raise InvalidInputError(f"unknown KDF profile {kdf_profile!r}; use one of {', '.join(KDF_PROFILES)}")
    if environment.is_production and KDF_PROFILES[kdf_profile].is_weaker_than(PRODUCTION_KDF_MINIMUM):
        raise UnsafeConfigurationError(
            f"KDF profile {kdf_profile!r} is too weak for production; use the default profile"
        )
    path = sqlite_path(url)
    if path.exists():
        raise ConflictError(f"a store already exists at {path}; init never overwrites one")
    storage = open_storage(url, create=True, environment=environment)
    try:
        unlock = PasswordUnlock(password, KDF_PROFILES[kdf_profile])
        return EncryptedStore.create(storage, unlock, actor=actor)
    except BaseException:
        storage.close()
        remove_store_files(path)
        raise


def remove_store_files(path: Path) -> None:
    """Delete a store file and its SQLite companions (only for a store that was never used)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def open_store(url: str | None, password: bytes, *, environment: Environment, actor: str) -> EncryptedStore:
    """Unlock the store `url` points at with a master password."""
    storage = open_storage(url, create=False, environment=environment)
    try:
        return EncryptedStore.open(storage, _password_unlock(password, environment), actor=actor)
    except BaseException:
        storage.close()
        raise


def _password_unlock(password: bytes, environment: Environment) -> PasswordUnlock:
    minimum = PRODUCTION_KDF_MINIMUM if environment.is_production else None
    return PasswordUnlock(password, minimum=minimum)
