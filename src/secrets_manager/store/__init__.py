"""The logical, versioned secret store every entry point talks to."""

from secrets_manager.store.base import (
    CURRENT,
    MAX_VALUE_SIZE,
    PENDING,
    PREVIOUS,
    Secret,
    SecretMetadata,
    SecretStore,
    VersionInfo,
)
from secrets_manager.store.encrypted import EncryptedStore
from secrets_manager.store.kms import AwsKmsUnlock
from secrets_manager.store.names import namespace_of, validate_name
from secrets_manager.store.unlock import PasswordUnlock, UnlockSource

__all__ = [
    "CURRENT",
    "MAX_VALUE_SIZE",
    "PENDING",
    "PREVIOUS",
    "AwsKmsUnlock",
    "EncryptedStore",
    "PasswordUnlock",
    "Secret",
    "SecretMetadata",
    "SecretStore",
    "UnlockSource",
    "VersionInfo",
    "namespace_of",
    "validate_name",
]
