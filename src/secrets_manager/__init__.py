"""secrets-manager: an encrypted credential store for trading-platform services.

The public API is the short `__all__` below; everything else is internal and may change.
"""

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

__version__ = "0.1.0"

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
