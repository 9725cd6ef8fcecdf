"""AWS KMS auto-unlock: the root key wrapped by a KMS key instead of a master password.

Like Vault's `awskms` seal: a service host opens the store with its AWS credentials (an instance
role, say) and no password file lies on its disk. `wrap` is one KMS Encrypt of the 32-byte root key
and `unwrap` one Decrypt, both with an encryption context that names the root key id, so KMS
authenticates the pair. The header section (docs/format.md, "Store header") keeps the key's ARN
and region, so opening needs no configuration beyond credentials. `wrap` decrypts what it has just
encrypted before handing the section back: a host allowed kms:Encrypt but not kms:Decrypt must
not write a header nobody can open. Who may call kms:Decrypt on that
key may open the store: that is the key policy's job, and CloudTrail records every call.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from secrets_manager.crypto import KEY_SIZE, DataKey, KeyStatus
from secrets_manager.errors import (
    AccessDeniedError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    SecretsManagerError,
    StorageError,
    UnlockError,
)
from secrets_manager.store.external import aws_profile_missing

KIND = "aws-kms"
CONTEXT_PURPOSE = "secrets-manager root key"
_ARN = re.compile(r"arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):\d{12}:(key|alias)/.+")
# The key cannot be used now (disabled, pending deletion, ...) or this caller may not use it.
_REFUSED = frozenset(
    {
        "AccessDeniedException",
        "IncorrectKeyException",
        "DisabledException",
        "KMSInvalidStateException",
        "KeyUnavailableException",
        "NotFoundException",
        "InvalidKeyUsageException",
    }
)
# AWS did not accept this host's credentials at all (for either call: not the key's fault).
_BAD_CREDENTIALS = frozenset(
    {"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException"}
)

KmsClientFactory = Callable[[str | None], Any]


# A client whose endpoint setting is not a URL: botocore's ValueError ("Invalid endpoint: …",
# "Invalid IPv6 URL") as it makes the client, before any request.
BAD_AWS_ENDPOINT = (
    "the AWS endpoint setting is not a URL (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE> or "
    "endpoint_url in the AWS config file): set it to one, such as https://localhost:4566, or unset it"
)


def connect_kms(region: str | None) -> Any:
    """A KMS client: credentials, profile and endpoint come from boto3's standard configuration
    (environment, ~/.aws, AWS_PROFILE, AWS_ENDPOINT_URL…), as for the AWS store."""
    import boto3  # only stores that use KMS pay for importing boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=30)
    try:
        return boto3.session.Session().client("kms", region_name=region, config=config)
    except ValueError:
        raise InvalidInputError(BAD_AWS_ENDPOINT) from None
    except BotoCoreError as exc:
        if (missing := aws_profile_missing(exc)) is not None:
            raise missing from None
        raise InvalidInputError(
            f"cannot configure AWS KMS ({type(exc).__name__}): give the key as an ARN or set "
            "AWS_DEFAULT_REGION"
        ) from None


class AwsKmsUnlock:
    """The root key wrapped by the AWS KMS key `key_id` (an ARN, key id or alias). `unwrap` uses the
    key the store's header names and remembers it, so a root key rotation wraps under it again."""

    kind = KIND

    def __init__(self, key_id: str | None = None, *, connect: KmsClientFactory = connect_kms) -> None:
        self.key_id = key_id
        self._connect = connect

    def __repr__(self) -> str:
        return f"AwsKmsUnlock({self.key_id!r})"

    def wrap(self, root_key: DataKey) -> dict[str, Any]:
        if not self.key_id:
            raise InvalidInputError(
                "give the AWS KMS key to wrap the root key with (an ARN, key id or alias)"
            )
        match = _ARN.fullmatch(self.key_id)
        client = self._connect(match["region"] if match else None)
        response = _call(
            client,
            "Encrypt",
            self.key_id,
            KeyId=self.key_id,
            Plaintext=root_key.material,
            EncryptionContext=_context(root_key.id),
        )
        arn = str(response["KeyId"])  # the key's ARN, even when an alias or id was given
        region = _ARN.fullmatch(arn)
        section = {
            "kind": KIND,
            "key_arn": arn,
            "region": region["region"] if region else client.meta.region_name,
            "root_key_id": root_key.id,  # in the encryption context: KMS authenticates it
            "wrapped_root_key": base64.b64encode(response["CiphertextBlob"]).decode("ascii"),
        }
        self._check_round_trip(section, root_key)
        return section

    def _check_round_trip(self, section: dict[str, Any], root_key: DataKey) -> None:
        """Unwrap what was just wrapped. AWS grants kms:Encrypt and kms:Decrypt separately: a
        header written by a host that may only encrypt would lock every secret out for good, so
        nothing is written unless this host can open it again."""
        try:
            unwrapped = AwsKmsUnlock(connect=self._connect).unwrap(section, created=root_key.created)
        except UnlockError:
            raise AccessDeniedError(
                f"AWS KMS key {section['key_arn']} encrypts but does not decrypt for this host "
                "(kms:Decrypt refused): the store could never be unlocked with it; grant kms:Decrypt "
                "on the key and try again (nothing was changed)"
            ) from None
        if unwrapped.material != root_key.material or unwrapped.id != root_key.id:
            raise IntegrityError("AWS KMS returned another key than it wrapped (integrity check failed)")

    def unwrap(self, section: dict[str, Any], *, created: int) -> DataKey:
        try:
            if section["kind"] != KIND:
                raise UnlockError(f"this store is unlocked by {section['kind']!r}, not AWS KMS")
            arn, region = str(section["key_arn"]), str(section["region"])
            blob = base64.b64decode(section["wrapped_root_key"], validate=True)
            root_id = section["root_key_id"]
            if not isinstance(root_id, int) or isinstance(root_id, bool):
                raise ValueError("root_key_id")
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise IntegrityError("the store header is damaged (integrity check failed)") from None
        self.key_id = arn
        response = _call(
            self._connect(region),
            "Decrypt",
            arn,
            CiphertextBlob=blob,
            KeyId=arn,
            EncryptionContext=_context(root_id),
        )
        material = bytes(response["Plaintext"])
        if len(material) != KEY_SIZE:
            raise IntegrityError("the store header is damaged (integrity check failed)")
        return DataKey(id=root_id, status=KeyStatus.ENABLED, created=created, material=material)


def _context(root_key_id: int) -> dict[str, str]:
    return {"purpose": CONTEXT_PURPOSE, "root_key_id": str(root_key_id)}


def _call(client: Any, operation: str, key: str, **request: Any) -> dict[str, Any]:
    """One KMS call, its failures as our errors: one line naming the key, never the key material."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    method = {"Encrypt": client.encrypt, "Decrypt": client.decrypt}[operation]
    try:
        return dict(method(**request))
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "unknown"))
        raise _refusal(operation, key, code) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise UnlockError(
            f"no AWS credentials to call KMS {operation} with {key}: configure them (environment, "
            "~/.aws, an instance role) for this host"
        ) from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot reach AWS KMS for {key} ({type(exc).__name__}); try again") from None


def _refusal(operation: str, key: str, code: str) -> SecretsManagerError:
    if code in _BAD_CREDENTIALS:
        return UnlockError(
            f"AWS rejected this host's credentials for KMS {operation} with {key} ({code}): renew or "
            "fix them (environment, ~/.aws, an instance role)"
        )
    if operation == "Decrypt":
        if code == "InvalidCiphertextException":  # a changed blob or context: KMS's tag failed
            return IntegrityError("the store header is damaged (integrity check failed)")
        if code in _REFUSED:
            return UnlockError(
                f"AWS KMS refused to unwrap the root key with {key} ({code}): check that the key is "
                "enabled and that this host's AWS credentials may use it (kms:Decrypt)"
            )
    elif code == "NotFoundException":
        return NotFoundError(f"AWS KMS key {key} not found: give an existing key's ARN, id or alias")
    elif code == "AccessDeniedException":
        return AccessDeniedError(
            f"AWS KMS refused kms:{operation} on {key}: this host's credentials may not use it"
        )
    elif code in _REFUSED:
        return InvalidInputError(
            f"AWS KMS refused to encrypt with {key} ({code}): give an enabled symmetric encryption key"
        )
    return StorageError(f"AWS KMS failed {operation} with {key} ({code}); try again")
