"""secrets-manager: an encrypted credential store for trading-platform services.

The public API is the short `__all__` below; everything else is internal and may change. The names
are imported on first use (PEP 562), so `import secrets_manager.errors` (and the CLI, for a local
command) does not pay for the SDK's gRPC and asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secrets_manager.client import (
        AsyncClient,
        Client,
        Credentials,
        get_credentials,
        get_credentials_sync,
        install_log_redaction,
    )
    from secrets_manager.errors import (
        AccessDeniedError,
        ConflictError,
        IntegrityError,
        InvalidInputError,
        NotFoundError,
        SecretsManagerError,
        StorageError,
        UnlockError,
    )
    from secrets_manager.store import EncryptedStore, PasswordUnlock, Secret, SecretMetadata, SecretStore
    from secrets_manager.values import SecretValue

__version__ = "0.8.0"

_WHERE = {
    **dict.fromkeys(
        (
            "AsyncClient",
            "Client",
            "Credentials",
            "get_credentials",
            "get_credentials_sync",
            "install_log_redaction",
        ),
        "secrets_manager.client",
    ),
    **dict.fromkeys(
        (
            "AccessDeniedError",
            "ConflictError",
            "IntegrityError",
            "InvalidInputError",
            "NotFoundError",
            "SecretsManagerError",
            "StorageError",
            "UnlockError",
        ),
        "secrets_manager.errors",
    ),
    **dict.fromkeys(
        ("EncryptedStore", "PasswordUnlock", "Secret", "SecretMetadata", "SecretStore"),
        "secrets_manager.store",
    ),
    "SecretValue": "secrets_manager.values",
}


def __getattr__(name: str) -> Any:
    """The public names, imported from their modules on first use (and kept here after)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'secrets_manager' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__all__ = [
    "AccessDeniedError",
    "AsyncClient",
    "Client",
    "ConflictError",
    "Credentials",
    "EncryptedStore",
    "IntegrityError",
    "InvalidInputError",
    "NotFoundError",
    "PasswordUnlock",
    "Secret",
    "SecretMetadata",
    "SecretStore",
    "SecretValue",
    "SecretsManagerError",
    "StorageError",
    "UnlockError",
    "__version__",
    "get_credentials",
    "get_credentials_sync",
    "install_log_redaction",
]
