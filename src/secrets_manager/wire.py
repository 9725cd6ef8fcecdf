"""What crosses the wire, shared by the service and the client: one table from our exceptions to
gRPC status codes (and back), and conversions between store values and protobuf messages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc

from secrets_manager.errors import (
    AccessDeniedError,
    ChangeUnrecordedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    NothingToChangeError,
    OutcomeUnknownError,
    ResourceExhaustedError,
    RotationInProgressError,
    RotationStepFailed,
    SecretsManagerError,
    SecretStateError,
    StorageError,
    ThrottledError,
    UnlockError,
    UnsafeConfigurationError,
    UnsupportedOperationError,
    WatchUnsupportedError,
)
from secrets_manager.store import Secret, SecretMetadata, VersionInfo
from secrets_manager.store.base import DEFAULT_MAX_VERSIONS
from secrets_manager.store.names import namespace_of
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.values import SecretValue

# Watch's initial metadata: the revision (decimal) the stream starts after (proto: rpc Watch).
WATCH_REVISION_KEY = "secrets-manager-revision"
# …and the line of the store's history that revision belongs to (WatchRequest.since_history).
WATCH_HISTORY_KEY = "secrets-manager-history"

# The shortest interval between a client's HTTP/2 keepalive pings that the service accepts on a
# connection whose streams send no data (an idle watch stream): the server's
# grpc.http2.min_ping_interval_without_data_ms. A client that pings more often is answered, after
# grpc.http2.max_ping_strikes (2) pings too soon, with GOAWAY too_many_pings, which ends its streams.
MIN_PING_INTERVAL_WITHOUT_DATA_MS = 10_000

STATUS_OF_ERROR: tuple[tuple[type[SecretsManagerError], grpc.StatusCode], ...] = (
    # Before its base: a store without a change feed cannot stream; not the request's fault.
    (WatchUnsupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnlockError, grpc.StatusCode.UNAUTHENTICATED),
    (AccessDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    # Before its base: not a lost compare-and-set, which a client retries (read, modify, write
    # again) on ABORTED, but a state that a retry cannot change (deleted; for undelete, not).
    (SecretStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConflictError, grpc.StatusCode.ABORTED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # before its base, StorageError
    # Also before StorageError: the change was made and stands, only its audit record is missing.
    # UNAVAILABLE would say "refused, try again" (retry policies, another replica): made twice.
    # INTERNAL is what no client retries (an invariant of the service, every change audited,
    # broke); the trailing metadata names the class (the message says not to make it again).
    (ChangeUnrecordedError, grpc.StatusCode.INTERNAL),
    # Likewise a change the service's store sent whose answer was lost (COMMIT sent, the database
    # connection ended or went silent): it may have been made, and must not be made again elsewhere.
    (OutcomeUnknownError, grpc.StatusCode.INTERNAL),
    (StorageError, grpc.StatusCode.UNAVAILABLE),
    (RotationStepFailed, grpc.StatusCode.FAILED_PRECONDITION),  # the target refused the new value
)

# Trailing metadata of a failed call: the error's class, where its status alone does not name it
# (a refused rotation and a lost compare-and-set are both ABORTED, yet a scheduler treats them apart).
ERROR_CLASS_KEY = "secrets-manager-error"
# Classes a client raises for their status only when the metadata names them: INTERNAL without it
# is a bug of the service ("internal error"), not a change made; FAILED_PRECONDITION without it is
# a rotation's failed command (RotateSecret), as from services before SecretStateError.
_ONLY_WHEN_NAMED: frozenset[type[SecretsManagerError]] = frozenset(
    {ChangeUnrecordedError, OutcomeUnknownError, SecretStateError}
)
_REFINED_ERRORS: dict[str, type[SecretsManagerError]] = {
    cls.__name__: cls
    for cls in (
        ChangeUnrecordedError,
        NothingToChangeError,
        OutcomeUnknownError,
        RotationInProgressError,
        SecretStateError,
        ThrottledError,
        UnsafeConfigurationError,
        UnsupportedOperationError,
    )
}


def status_for(error: SecretsManagerError) -> grpc.StatusCode:
    """The status a failed request gets; anything unlisted (e.g. an audit failure) is UNAVAILABLE."""
    for error_type, code in STATUS_OF_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.UNAVAILABLE


def error_metadata(error: SecretsManagerError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that lets `error_for` raise `error`'s own class, if it needs any."""
    name = type(error).__name__
    return ((ERROR_CLASS_KEY, name),) if _REFINED_ERRORS.get(name) is type(error) else ()


def error_for(
    code: grpc.StatusCode, message: str, metadata: Sequence[tuple[str, str | bytes]] | None = ()
) -> SecretsManagerError:
    """The exception a client raises for a status (and the call's trailing metadata): the inverse
    of `status_for`. A class named in the metadata is used only if it is, or refines, a class the
    service sends that status for, so a service cannot change what a status means to the client
    (its exit code) beyond what this table allows. (ChangeUnrecordedError on UNAVAILABLE, as
    services before INTERNAL sent it, still refines StorageError.)"""
    sent_for = [error_type for error_type, mapped in STATUS_OF_ERROR if mapped is code]
    if UnlockError in sent_for:
        return AccessDeniedError(message)
    named = next((value for key, value in metadata or () if key == ERROR_CLASS_KEY), None)
    refined = _REFINED_ERRORS.get(named) if isinstance(named, str) else None
    if refined is not None and any(issubclass(refined, error_type) for error_type in sent_for):
        return refined(message)
    for error_type in sent_for:
        if error_type not in _ONLY_WHEN_NAMED:
            return error_type(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return StorageError(message)
    return SecretsManagerError(message)


def secret_message(secret: Secret) -> Any:
    return fill_secret_message(pb.SecretVersion(), secret)


def fill_secret_message(message: Any, secret: Secret) -> Any:
    """Set the fields of a SecretVersion (e.g. a response's, without building and copying one)."""
    message.name = secret.name
    message.version = secret.version
    message.value = secret.value.reveal()
    message.labels.extend(secret.labels)
    message.created = secret.created.isoformat()
    if secret.expires is not None:
        message.expires = secret.expires.isoformat()
    if secret.target is not None:
        message.target = secret.target
    return message


def secret_from_message(message: Any) -> Secret:
    return Secret(
        name=message.name,
        version=message.version,
        value=SecretValue(bytes(message.value)),
        created=datetime.fromisoformat(message.created),
        labels=tuple(message.labels),
        expires=expiry_from_text(message.expires) if message.HasField("expires") else None,
        target=(message.target or None) if message.HasField("target") else None,
    )


def metadata_message(meta: SecretMetadata) -> Any:
    return pb.SecretMetadata(
        name=meta.name,
        namespace=meta.namespace,
        created=meta.created.isoformat(),
        updated=meta.updated.isoformat(),
        created_by=meta.created_by,
        description=meta.description,
        tags=dict(meta.tags),
        current_version=meta.current_version or 0,
        versions=[
            pb.VersionInfo(
                version=v.version,
                created=v.created.isoformat(),
                created_by=v.created_by,
                labels=list(v.labels),
                destroyed=v.destroyed,
            )
            for v in meta.versions
        ],
        deleted=meta.deleted.isoformat() if meta.deleted else "",
        max_versions=meta.max_versions,
        expires=None if meta.expires is None else meta.expires.isoformat(),
    )


def metadata_from_message(message: Any) -> SecretMetadata:
    versions = tuple(
        VersionInfo(
            version=v.version,
            created=datetime.fromisoformat(v.created),
            created_by=v.created_by,
            labels=tuple(v.labels),
            destroyed=v.destroyed,
        )
        for v in message.versions
    )
    return SecretMetadata(
        name=message.name,
        namespace=message.namespace or namespace_of(message.name),
        created=datetime.fromisoformat(message.created),
        updated=datetime.fromisoformat(message.updated),
        created_by=message.created_by,
        description=message.description,
        tags=dict(message.tags),
        current_version=message.current_version or None,
        versions=versions,
        deleted=datetime.fromisoformat(message.deleted) if message.deleted else None,
        max_versions=message.max_versions or DEFAULT_MAX_VERSIONS,  # 0: a server from before it
        labels={label: v.version for v in versions for label in v.labels},
        expires=expiry_from_text(message.expires) if message.HasField("expires") else None,
    )


def expiry_from_text(text: str) -> datetime | None:
    """An `expires` field of a message: None if empty (none) or not a time with a zone (a peer
    sent nonsense: treated as none rather than failing the whole read)."""
    try:
        moment = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    return None if moment is None or moment.tzinfo is None else moment
