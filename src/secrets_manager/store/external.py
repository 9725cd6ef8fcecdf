"""What `VaultStore` and `AwsStore` share: checks on values and tags, the names we reserve in a
backend that is also used by other tools, and where the audit key and anchors live there.

Both stores keep values natively, so other tools read what we write and we read what they write.
Our own bookkeeping in the backend is kept out of the way of both:

    .secrets-manager/audit-key             the audit log's HMAC key (32 random bytes)
    .secrets-manager/audit-anchor/<scope>  the anchor of one audit log (one per log file and host)

A name whose segment starts with '.' is not a valid secret name (store/names.py), so these entries
can never be read, written or listed through the `SecretStore` API. Metadata keys and tags that
start with `secrets-manager:` are ours too (e.g. `secrets-manager:created-by`); a user's tag may not
use that prefix.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from secrets_manager.crypto.mac import value_fingerprint
from secrets_manager.errors import (
    InvalidInputError,
    MissingCredentialsError,
    SecretsManagerError,
    StorageError,
    restated,
)
from secrets_manager.store.base import (
    AUDIT_KEYS_RECHECK_SECONDS,
    RESERVED_TAG_PREFIX,
    Secret,
    checked_metadata,
)
from secrets_manager.store.names import validate_name


class NoAnswerError(StorageError):
    """The backend (Vault, AWS) accepted the request, or never let us connect, and did not answer
    within the client's timeout: not sent again, as each attempt would wait as long."""


RESERVED_FOLDER = ".secrets-manager"
AUDIT_KEY_NAME = f"{RESERVED_FOLDER}/audit-key"
AUDIT_ANCHOR_FOLDER = f"{RESERVED_FOLDER}/audit-anchor"
RESERVED_KEY_PREFIX = RESERVED_TAG_PREFIX
CREATED_BY_KEY = f"{RESERVED_KEY_PREFIX}created-by"
DESCRIPTION_KEY = f"{RESERVED_KEY_PREFIX}description"
MAX_VERSIONS_KEY = f"{RESERVED_KEY_PREFIX}max-versions"  # AWS: a secret's own max_versions (a tag)
# Vault custom_metadata / AWS tag: the (version, time) expiry, `store.base.format_expiry`
EXPIRES_KEY = f"{RESERVED_KEY_PREFIX}expires"
# AWS tag: the rotation target of the version staged last, `store.base.format_target`
TARGET_KEY = f"{RESERVED_KEY_PREFIX}pending-target"
AUDIT_KEY_SIZE = 32
ROTATE_AUDIT_KEY_ATTEMPTS = 10  # `audit rotate-key` tries again after losing its compare-and-set
DEFAULT_AUDIT_SCOPE = "default"
DEFAULT_RECOVERY_WINDOW_DAYS = 30  # AWS's own default for DeleteSecret
_SCOPE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RecheckedAuditKeys:
    """The audit keys a Vault or AWS handle read, read again every AUDIT_KEYS_RECHECK_SECONDS
    (another host's `audit rotate-key` reaches no log of this one: its writer learns of it here),
    the same objects kept while they are unchanged (fingerprints are cached by key identity)."""

    def __init__(self, read: Callable[[], tuple[bytes, ...]]) -> None:
        self._read = read
        self._keys: tuple[bytes, ...] | None = None
        self._read_at = 0.0  # time.monotonic() of the last read

    def get(self, *, reload: bool = False) -> tuple[bytes, ...]:
        """The keys, oldest first; `reload`: read them again now."""
        keys = self._keys
        if keys is None or reload or time.monotonic() - self._read_at >= AUDIT_KEYS_RECHECK_SECONDS:
            read = self._read()
            if keys is None or read != keys:
                keys = self._keys = read
            self._read_at = time.monotonic()
        return keys


def with_fingerprint(secret: Secret, audit_keys: tuple[bytes, ...]) -> tuple[Secret, str]:
    """`secret` and its value's audit fingerprint under the store's newest audit key (its
    generation the number of keys): what the CLI's audited reads record for these stores
    (audit.value_fingerprint), so the service's records of a value match the CLI's."""
    return secret, value_fingerprint(audit_keys[-1], secret.value.reveal(), len(audit_keys))


def after_the_version(exc: SecretsManagerError, name: str, number: int) -> SecretsManagerError:
    """`exc` (of the same class, so the same exit code) saying that version `number` of `name` was
    stored before the metadata write it reports failed (Vault's POST or PATCH of MOUNT/metadata/,
    AWS's UpdateSecret, TagResource or UntagResource after PutSecretValue): told only "denied",
    a user would store the value again, as one more version."""
    told = restated(
        exc,
        f"version {number} of {name!r} was stored, but not its metadata (description, tags, expiry, "
        f"max versions): {exc}; do not store the value again ('metadata {name} …' sets them)",
    )
    # For a caller that writes on the user's behalf (mv, cp) and says it in its own words.
    told.stored_version, told.metadata_error = number, str(exc)
    return told


def audit_anchor_name(scope: str) -> str:
    """Where the anchor of the audit log `scope` lives in the backend."""
    if not _SCOPE.fullmatch(scope):
        raise InvalidInputError(f"invalid audit scope {scope!r}")
    return f"{AUDIT_ANCHOR_FOLDER}/{scope}"


def audit_scope_for(log_path: Path) -> str:
    """A stable id for one audit log file on this host.

    Many hosts and users share one Vault mount or AWS prefix, each with its own local audit log, so
    every log needs its own anchor: a store-wide one would be moved by every other log."""
    identity = f"{socket.gethostname()}:{log_path.expanduser().resolve()}"
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def checked_write(
    name: str, expect_version: int | None, description: str | None, tags: Mapping[str, str] | None
) -> None:
    """Name, compare-and-set, description and tag checks of `put` (the tag prefix
    `secrets-manager:` is refused there), made before the backend is asked anything."""
    validate_name(name)
    if expect_version is not None and expect_version < 0:
        raise InvalidInputError("--expect-version must be 0 (create only) or a version number")
    checked_metadata(name, description, tags)


def user_tags(metadata: Mapping[str, str]) -> dict[str, str]:
    """The user's tags among a backend's key/value metadata (without our reserved keys)."""
    return {k: v for k, v in metadata.items() if not k.startswith(RESERVED_KEY_PREFIX)}


def as_text(value: bytes) -> str | None:
    """The value as text if it is UTF-8, else None (then it is kept as binary)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def vault_namespace_sendable(namespace: str) -> bool:
    """Whether a Vault namespace can go out as the X-Vault-Namespace header (printable ASCII, no
    spaces around it): one that cannot was 'cannot reach Vault (InvalidHeader)' or an internal
    error (UnicodeEncodeError), from the URL's namespace= and VAULT_NAMESPACE alike."""
    return namespace.isascii() and namespace.isprintable() and namespace == namespace.strip()


def aws_profile_missing(exc: BaseException) -> MissingCredentialsError | None:
    """The one-line error for botocore's ProfileNotFound (AWS_PROFILE, or a profile's
    source_profile, naming a profile neither AWS file has), for the Secrets Manager store and KMS
    alike; None for any other exception. Checked by name: KMS does not import botocore up front."""
    if type(exc).__name__ != "ProfileNotFound":
        return None
    profile = str((getattr(exc, "kwargs", None) or {}).get("profile") or "")
    return MissingCredentialsError(
        f"no AWS profile {profile!r} in ~/.aws/config or ~/.aws/credentials (AWS_CONFIG_FILE, "
        "AWS_SHARED_CREDENTIALS_FILE), which AWS_PROFILE names: set AWS_PROFILE to a profile there, or "
        "unset it to use the other sources (AWS_ACCESS_KEY_ID, an instance or task role)"
    )


def utc(moment: datetime) -> datetime:
    """`moment` in UTC (a naive one is taken to be UTC already)."""
    return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
