"""Store URLs: which `Storage` a URL names, and the file guard rails of production.

Supported now: a plain path or `sqlite:///absolute/path`. Unsupported schemes fail with a message
that names what is supported.
"""

from __future__ import annotations

import stat
from pathlib import Path

from platformdirs import user_data_path

from secrets_manager.environment import Environment
from secrets_manager.errors import InvalidInputError, UnsafeConfigurationError
from secrets_manager.storage.sqlite import SqliteStorage

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
