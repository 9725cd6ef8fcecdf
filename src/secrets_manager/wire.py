"""What crosses the wire, shared by the service and the client: one table from our exceptions to
gRPC status codes (and back), and conversions between store values and protobuf messages."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc

from secrets_manager.errors import (
    AccessDeniedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ResourceExhaustedError,
    RotationStepFailed,
    SecretsManagerError,
    StorageError,
    UnlockError,
)
from secrets_manager.store import Secret, SecretMetadata, VersionInfo
from secrets_manager.store.names import namespace_of
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.values import SecretValue

# Watch's initial metadata: the revision (decimal) the stream starts after (proto: rpc Watch).
WATCH_REVISION_KEY = "secrets-manager-revision"

STATUS_OF_ERROR: tuple[tuple[type[SecretsManagerError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnlockError, grpc.StatusCode.UNAUTHENTICATED),
    (AccessDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (ConflictError, grpc.StatusCode.ABORTED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # before its base, StorageError
    (StorageError, grpc.StatusCode.UNAVAILABLE),
    (RotationStepFailed, grpc.StatusCode.FAILED_PRECONDITION),  # the target refused the new value
)


def status_for(error: SecretsManagerError) -> grpc.StatusCode:
    """The status a failed request gets; anything unlisted (e.g. an audit failure) is UNAVAILABLE."""
    for error_type, code in STATUS_OF_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.UNAVAILABLE


def error_for(code: grpc.StatusCode, message: str) -> SecretsManagerError:
    """The exception a client raises for a status: the inverse of `status_for`."""
    for error_type, mapped in STATUS_OF_ERROR:
        if mapped is code:
            if error_type is UnlockError:
                return AccessDeniedError(message)
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
    return message


def secret_from_message(message: Any) -> Secret:
    return Secret(
        name=message.name,
        version=message.version,
        value=SecretValue(bytes(message.value)),
        created=datetime.fromisoformat(message.created),
        labels=tuple(message.labels),
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
        labels={label: v.version for v in versions for label in v.labels},
    )
