"""`AwsStore`: secrets kept natively in AWS Secrets Manager, through `boto3`.

The mapping (docs/stores.md has it in full):

    secret NAME              the AWS secret PREFIX/NAME (just NAME with an empty prefix)
    a UTF-8 text value       SecretString; any other value: SecretBinary
    version N                the AWS version whose VersionId is `secrets-manager-version-NNNNNNNNNN`
                             (we pass it as ClientRequestToken). Versions written by other tools
                             (UUID ids) are numbered in creation order after the ones before them.
    current/previous/pending the staging labels AWSCURRENT / AWSPREVIOUS / AWSPENDING
    stage / promote          PutSecretValue with VersionStages=[AWSPENDING] / UpdateSecretVersionStage
    description, tags        the secret's Description and Tags (tag `secrets-manager:created-by` is ours)
    max_versions             our tag `secrets-manager:max-versions` (AWS has no such setting); absent:
                             the store's default (10)
    expiry                   our tag `secrets-manager:expires`: `N@YYYY-MM-DDTHH:MM:SSZ`, the expiry
                             of version N (none for any other version)
    rotation target          our tag `secrets-manager:pending-target`: `N@` and the target in base64,
                             the target a stage recorded for version N (none for any other version)
    delete / undelete        DeleteSecret with a recovery window / RestoreSecret
    destroy_secret           DeleteSecret with ForceDeleteWithoutRecovery
    KMS key                  per namespace, given when a secret is created (`?kms.NAMESPACE=KEY`)

Compare-and-set: the VersionId of version N is fixed, and AWS refuses a second version with an id
it already has (ResourceExistsException), so two secrets-manager writers racing for version N with
different values cannot both win. With the identical value AWS takes the second PutSecretValue for
a retry of the first: both succeed, one version is written (docs/stores.md, "Version numbers on
AWS"). Other tools do not take part in this.

Not supported (UnsupportedOperationError): destroying single versions (AWS cannot erase one
version), empty values (AWS needs a non-empty SecretString or SecretBinary) and names whose
PREFIX/NAME is longer than AWS's 512 characters. AWS keeps older,
unlabelled versions itself (it removes them past its own limit); we show and read only the newest
`max_versions` of them, plus any version that carries a label. So a lower max_versions hides the
older versions at once, and a higher one shows them again while AWS still keeps them.

Transport: boto3 with the standard retry mode (throttling and transient errors are retried with
backoff, ATTEMPTS in all; a throttled call up to THROTTLED_ATTEMPTS); error codes map to our
exceptions through `_ERRORS`. Each method's docstring names the API calls it makes.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import random
import re
import secrets
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from secrets_manager.crypto.mac import audit_keys_of
from secrets_manager.errors import (
    AccessDeniedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    MissingCredentialsError,
    NotFoundError,
    OutcomeUnknownError,
    SecretsManagerError,
    SecretStateError,
    StorageError,
    UnsupportedOperationError,
    restated,
)
from secrets_manager.store.backoff import Backoff
from secrets_manager.store.base import (
    CURRENT,
    DEFAULT_MAX_VERSIONS,
    LABELS,
    PENDING,
    PREVIOUS,
    Anchor,
    Capability,
    Secret,
    SecretMetadata,
    VersionInfo,
    acting_actor,
    acting_for,
    checked_expect_version,
    checked_expiry,
    checked_expiry_change,
    checked_max_versions,
    checked_metadata_update,
    checked_target,
    checked_value,
    expiry_of,
    format_expiry,
    format_target,
    not_current_error,
    parse_expiry,
    parse_target,
    refuse_expiry_without_current,
    refuse_if_changed,
    refuse_if_rotating,
    refuse_if_staged,
    refuse_if_unchanged,
    refuse_to_demote,
    refuse_unless_current,
    refuse_unless_still_current,
    unchecked_delete_error,
    unknown_label,
    updated_metadata,
)
from secrets_manager.store.external import (
    AUDIT_KEY_NAME,
    AUDIT_KEY_SIZE,
    CREATED_BY_KEY,
    DEFAULT_AUDIT_SCOPE,
    DEFAULT_RECOVERY_WINDOW_DAYS,
    EXPIRES_KEY,
    MAX_VERSIONS_KEY,
    RESERVED_KEY_PREFIX,
    ROTATE_AUDIT_KEY_ATTEMPTS,
    TARGET_KEY,
    NoAnswerError,
    RecheckedAuditKeys,
    after_the_version,
    audit_anchor_name,
    aws_profile_missing,
    checked_write,
    user_tags,
    utc,
    with_fingerprint,
)
from secrets_manager.store.kms import BAD_AWS_ENDPOINT
from secrets_manager.store.names import namespace_of, validate_name, validate_prefix
from secrets_manager.store.polled import SecretState
from secrets_manager.values import SecretValue

STAGE_OF_LABEL = {CURRENT: "AWSCURRENT", PREVIOUS: "AWSPREVIOUS", PENDING: "AWSPENDING"}
LABEL_OF_STAGE = {stage: label for label, stage in STAGE_OF_LABEL.items()}
VERSION_ID_PREFIX = "secrets-manager-version-"
LIST_PAGE_SIZE = 100  # ListSecrets' most per page: a snapshot of 100 secrets is one request
# Watch's polled feed (store/polled.py) reads a snapshot at most this often by default: one
# ListSecrets per 100 secrets, so 6 requests a minute per replica for 100 secrets while anyone
# watches (AWS bills $0.05 per 10,000 calls: about $1.30 a month; ListSecrets' quota is 100 a
# second per account and Region, shared with every other tool, so 0.1 a second leaves it alone).
WATCH_POLL_SECONDS = 10.0
# AWS's API reference: ListSecrets "might not reflect changes from the last five minutes" (use
# DescribeSecret for a secret's latest). A snapshot describes the secrets this store wrote within
# this long, until the listing shows what DescribeSecret does, so that a change through the
# service reaches its watchers at once rather than when AWS's listing catches up.
LIST_LAG_SECONDS = 300.0
RECENT_WRITES_DESCRIBED = 100  # at most this many per snapshot (the latest); the rest: the listing
UNKNOWN_VERSION = 0  # the number of a version read without the right to list the versions
RETRY_DEADLINE_SECONDS = 30.0
_OUR_VERSION_ID = re.compile(re.escape(VERSION_ID_PREFIX) + r"(\d{10})")
MAX_AWS_TAGS = 50  # per secret, ours included (TagResource)
MAX_AWS_NAME_LENGTH = 512  # an AWS secret's Name, our prefix and '/' included (CreateSecret)
# The characters AWS allows in tag keys and values. Secrets Manager's TagResource reference
# (docs.aws.amazon.com/secretsmanager/latest/apireference/API_TagResource.html) lists them as
# "letters, spaces, and numbers representable in UTF-8, plus the following special characters:
# + - = . _ : / @"; its Tag shape (and botocore's model) gives only the lengths, 1-128 and 0-256,
# which base.checked_metadata checks. AWS's tagging APIs publish the set as the pattern
# ^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$ (the Tag shapes of EFS, FSx, Service Quotas; their
# ValidationException names it), which we apply: refusing a tag AWS would take costs another
# spelling, letting through one it refuses costs a version written without its tags.
# \p{L}\p{Z}\p{N} are the Unicode categories L*, Z*, N*.
_TAG_SYMBOLS = frozenset("_.:/=+-@")
_TAG_CHARACTERS = "letters, digits, spaces and _ . : / = + - @"

# AWS error codes → our exceptions. InvalidRequestException ("the secret is scheduled for deletion",
# mostly) depends on the call, so the call says what it means (`state_error`).
_ERRORS: tuple[tuple[frozenset[str], type[SecretsManagerError], str], ...] = (
    (frozenset({"ResourceNotFoundException"}), NotFoundError, "{what} not found"),
    (
        frozenset({"AccessDeniedException", "AccessDenied", "UnrecognizedClientException",
                   "InvalidSignatureException", "ExpiredTokenException", "InvalidClientTokenId"}),
        AccessDeniedError,
        "AWS denied {action}: {message}",
    ),
    (
        frozenset({"DecryptionFailure", "EncryptionFailure", "KMSAccessDeniedException"}),
        AccessDeniedError,
        "AWS KMS refused {action}: {message} (check the KMS key and its policy)",
    ),
    (
        frozenset({"ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded"}),
        StorageError,
        "AWS kept throttling {action} ({code}); try again later",
    ),
    (  # a quota (e.g. versions per secret), not a rate: waiting does not help
        frozenset({"LimitExceededException"}),
        StorageError,
        "AWS refused {action}: a quota is reached ({code}: {message})",
    ),
    (
        frozenset({"InvalidParameterException", "ValidationException", "MalformedPolicyDocumentException"}),
        InvalidInputError,
        "AWS refused {action} as invalid ({code}: {message})",
    ),
    (frozenset({"ResourceExistsException"}), ConflictError, "{what} already exists"),
    (frozenset({"InternalServiceError", "ServiceUnavailable"}), StorageError, "AWS failed {action} ({code})"),
)  # fmt: skip


def _no_credentials() -> str:
    """Where boto3 looked for credentials, including the role a host or container is given (found
    through the instance metadata service, which AWS_EC2_METADATA_DISABLED turns off)."""
    message = (
        "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
        "configure ~/.aws, or give this host an IAM role (instance profile, ECS task role, EKS "
        "service account); boto3 found none of them"
    )
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true":
        message += " (AWS_EC2_METADATA_DISABLED=true: an instance role is not looked for)"
    return message


# One call's bound: boto3's standard retry mode sends a call again after a timeout as after
# throttling, so an endpoint that accepts connections but does not answer costs every attempt's
# whole timeout (30 s x 5 attempts was 91 s per command). Two attempts of 5 s: about 11 s at most.
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 5
ATTEMPTS = 2
# Throttling is not a timeout: AWS answered at once that the account's rate quota for the call is
# used up (ListSecrets 100 a second, PutSecretValue and UpdateSecret 50 together, TagResource and
# UntagResource 50: docs.aws.amazon.com/secretsmanager/latest/userguide/reference_limits.html),
# shared with every other tool in the account and Region. ATTEMPTS bounds the wait on an endpoint
# that does not answer; a throttled call gets up to THROTTLED_ATTEMPTS in all, with the retry
# mode's full-jitter backoff (each wait up to 2^n s, at most THROTTLED_BACKOFF_CAP: about 7 s of
# waiting at worst).
THROTTLED_ATTEMPTS = 5
THROTTLED_BACKOFF_CAP = 2.0
_THROTTLING_CODES = frozenset(
    {
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "Throttling",
        "ThrottledException",
    }
)
# Calls that change nothing: one that timed out is a read whose answer never came, not a change
# whose outcome is unknown.
_READ_OPERATIONS = frozenset(
    {"GetSecretValue", "DescribeSecret", "ListSecrets", "ListSecretVersionIds", "BatchGetSecretValue"}
)


# How long an expiry tag seen on a secret (DescribeSecret) stands in for another DescribeSecret
# when a long-lived process (serve) reads the same version again. A write through this store
# forgets it at once (and an answer asked for before that write is not kept); a new version
# written by another process is read with a DescribeSecret at once; an expiry set or cleared by
# another process on the same version shows within this long. Not from ListSecrets: AWS's listing
# "might not reflect changes from the last five minutes", so it would bring back a tag from
# before a write (the polled Watch feed lists every 10 s).
EXPIRY_SEEN_SECONDS = 60.0
# The expiry tags seen and the writes begun, per SecretId, past which those older than
# EXPIRY_SEEN_SECONDS are dropped (then at twice what is left): kept, every name a long-lived
# process (serve) ever read or wrote stayed noted.
EXPIRY_NOTES_BEFORE_PRUNE = 4096
_WRITTEN = "secrets_manager_written"  # in a botocore call's context: the secrets it may change


def _bounded_config(attempts: int = ATTEMPTS, read_timeout: float = READ_TIMEOUT_SECONDS) -> Config:
    return Config(
        retries={"mode": "standard", "total_max_attempts": attempts},  # max_attempts counts retries
        connect_timeout=min(CONNECT_TIMEOUT_SECONDS, read_timeout),
        read_timeout=read_timeout,
    )


def _retry_throttling(attempts: int, response: Any = None, **_: Any) -> float | None:
    """botocore's needs-retry handler, after the retry mode's own (the first to give a delay wins):
    a call AWS throttled is sent again up to THROTTLED_ATTEMPTS times in all, past ATTEMPTS."""
    if not isinstance(response, tuple) or len(response) != 2 or not isinstance(response[1], dict):
        return None  # no answer (a timeout, a reset): ATTEMPTS alone bounds those
    code = str((response[1].get("Error") or {}).get("Code") or "")
    if code not in _THROTTLING_CODES or attempts >= THROTTLED_ATTEMPTS:
        return None
    return random.uniform(0, min(2.0 ** (attempts - 1), THROTTLED_BACKOFF_CAP))  # noqa: S311 (jitter)


def connect_aws(region: str, *, attempts: int = ATTEMPTS, read_timeout: float = READ_TIMEOUT_SECONDS) -> Any:
    """A Secrets Manager client for `region`: credentials, profile and endpoint come from boto3's
    standard configuration (environment, ~/.aws, AWS_PROFILE, AWS_ENDPOINT_URL…); the standard
    retry mode retries throttling and transient errors with backoff, `attempts` times in all,
    each waiting at most `read_timeout` seconds for an answer."""
    config = _bounded_config(attempts, read_timeout)
    try:
        return _client(region, "secretsmanager", config)
    except BotoCoreError as exc:
        if (missing := aws_profile_missing(exc)) is not None:
            raise missing from None
        raise StorageError(f"cannot configure AWS Secrets Manager ({type(exc).__name__})") from None


_sessions: dict[tuple[str, tuple[tuple[str, str], ...]], boto3.session.Session] = {}
_sessions_lock = threading.Lock()  # a boto3 session is not thread-safe; its clients are


def _session(region: str) -> boto3.session.Session:
    """This process's boto3 session for `region` and the AWS_* environment; hold _sessions_lock.

    Clients made from one session share its resolved credentials, so a role (a profile with
    role_arn, perhaps with an MFA prompt) is assumed once for the store and for the account its
    audit log is named after, not once per client. Its region is the store's, which the role's
    sts:AssumeRole uses when the profile names none."""
    key = (region, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if key not in _sessions:
        _sessions[key] = boto3.session.Session(region_name=region)
    return _sessions[key]


def _client(region: str, service: str, config: Config) -> Any:
    with _sessions_lock:
        try:
            return _session(region).client(service, region_name=region, config=config)
        except ValueError:
            raise InvalidInputError(BAD_AWS_ENDPOINT) from None


@dataclass(frozen=True)
class AwsAccount:
    """Where an AWS store's audit key and anchors live, besides its region and prefix: the account
    the credentials act in, and the Secrets Manager endpoint unless it is AWS's own."""

    account: str
    endpoint: str | None = None


_AWS_DOMAINS = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")
_accounts: dict[tuple[str, str, str], AwsAccount] = {}


def aws_account(region: str) -> AwsAccount:
    """The account of boto3's standard credentials (sts:GetCallerIdentity, which needs no IAM
    permission), asked once per process for each region, endpoint and access key, with the
    credentials the store's own client uses (`_session`).

    A failure is one line naming what to do: missing credentials as everywhere (exit 4), refused
    ones exit 5, an STS that cannot be reached (a network with a Secrets Manager endpoint only)
    suggests naming the audit log, which then needs no account; so does a configuration boto3
    cannot use, named as such."""
    client = connect_aws(region)
    try:
        endpoint = str(client.meta.endpoint_url)
        host = (urlsplit(endpoint).hostname or "").lower()
        ours = None if host.endswith(_AWS_DOMAINS) else endpoint
        with _sessions_lock:
            credentials = _session(region).get_credentials()
        if credentials is None:
            raise NoCredentialsError()
        cache_key = (region, endpoint, str(credentials.access_key))
        if cache_key not in _accounts:
            reply = _client(region, "sts", _bounded_config()).get_caller_identity()
            _accounts[cache_key] = AwsAccount(str(reply["Account"]), ours)
        return _accounts[cache_key]
    except ClientError as exc:
        message = str(exc.response.get("Error", {}).get("Message", ""))[:300]
        error = AccessDeniedError if _code(exc) in _ERRORS[1][0] else StorageError
        raise error(
            f"AWS refused sts:GetCallerIdentity ({_code(exc)}: {message}); the audit log is named after "
            "the account: check the credentials, or name the log with --audit-file"
        ) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise MissingCredentialsError(_no_credentials()) from None
    except (BotoConnectionError, HTTPClientError) as exc:  # no answer: timeouts included
        raise StorageError(
            f"cannot reach AWS STS to learn the account the audit log is named after "
            f"({type(exc).__name__}); if only Secrets Manager is reachable from here, name the log "
            "with --audit-file or SECRETS_MANAGER_AUDIT_FILE"
        ) from None
    except BotoCoreError as exc:
        if (missing := aws_profile_missing(exc)) is not None:
            raise missing from None
        raise StorageError(
            f"boto3 cannot ask AWS STS for the account the audit log is named after: its configuration "
            f"is incomplete or invalid ({type(exc).__name__}); fix it (AWS_PROFILE, ~/.aws/config), "
            "or name the log with --audit-file or SECRETS_MANAGER_AUDIT_FILE"
        ) from None
    finally:
        client.close()


@dataclass(frozen=True)
class _AwsVersion:
    number: int
    version_id: str
    labels: tuple[str, ...]
    created: datetime


class AwsStore:
    """A `SecretStore` on AWS Secrets Manager; values stay readable by `aws secretsmanager`."""

    unsupported_capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.DESTROY_VERSION,
            Capability.EMPTY_VALUE,
            Capability.METADATA_AT_LIMITS,
            Capability.PURGE_DELETED,
        }
    )
    # AWS keeps old versions itself; max_versions only filters what we show (see the module docstring).
    max_versions_hide_at_once: ClassVar[bool] = True
    watch_poll_seconds: ClassVar[float] = WATCH_POLL_SECONDS

    def __init__(
        self,
        client: Any,
        prefix: str = "",
        *,
        kms_keys: Mapping[str, str] | None = None,
        default_kms_key: str | None = None,
        recovery_window_days: int = DEFAULT_RECOVERY_WINDOW_DAYS,
        actor: str = "unknown",
        audit_scope: str = DEFAULT_AUDIT_SCOPE,
        max_versions: int = DEFAULT_MAX_VERSIONS,
    ) -> None:
        prefix = prefix.strip("/")
        if prefix:
            validate_name(prefix)
        if not 7 <= recovery_window_days <= 30:
            raise InvalidInputError("the recovery window is 7 to 30 days (AWS's limits)")
        self._client = client
        # Once per client (a store may share its client): see THROTTLED_ATTEMPTS.
        events = client.meta.events
        events.register(
            "needs-retry.secrets-manager", _retry_throttling, unique_id="secrets-manager-throttled"
        )
        self._prefix = prefix
        self._kms_keys = dict(kms_keys or {})
        self._default_kms_key = default_kms_key
        self._recovery_window_days = recovery_window_days
        self._actor = actor
        self._anchor_name = audit_anchor_name(audit_scope)
        self._max_versions = max_versions
        self._audit_keys = RecheckedAuditKeys(lambda: self._read_audit_keys())
        # After a call AWS did not answer: until when later calls fail at once, and why.
        self._unanswered: tuple[float, str] | None = None
        self._calls = threading.local()  # the operation in flight on this thread
        # SecretId → (when asked, the current version then (None: not ours), its expiry tag): see
        # EXPIRY_SEEN_SECONDS. SecretId → when this store last began to write it: an answer asked
        # for before then is not kept. Dict operations are atomic under the GIL; the service reads
        # from many threads.
        self._expiries_seen: dict[str, tuple[float, int | None, tuple[int, datetime] | None]] = {}
        self._written_at: dict[str, float] = {}
        # Writes noted in _written_at and dropped since (_prune_expiry_notes): the latest of them
        # stands for every SecretId not in it, so a read asked for before it is not kept.
        self._written_floor = float("-inf")
        self._notes_lock = threading.Lock()  # _written_at's changes and the pruning
        self._notes_left = 0  # how many notes the last pruning left
        # SecretId → [writes in flight, when the last began, when the last ended] for the secrets
        # this store wrote in the last LIST_LAG_SECONDS (version_snapshot describes them).
        self._recent_writes: dict[str, list[float]] = {}
        self._recent_lock = threading.Lock()
        client.meta.events.register("before-call.secrets-manager", self._note_operation)
        client.meta.events.register("before-parameter-build.secrets-manager", self._forget_written)
        client.meta.events.register("after-call.secrets-manager", self._forget_written_again)
        client.meta.events.register("after-call-error.secrets-manager", self._forget_written_again)

    def _note_operation(self, model: Any = None, **_: Any) -> None:
        self._calls.operation = getattr(model, "name", None)

    def _forget_written(self, params: Any = None, model: Any = None, context: Any = None, **_: Any) -> None:
        """Before a call that may change a secret (its tags among them): forget its expiry seen,
        and note the secret in the call's context, for `_forget_written_again` once it is done."""
        if getattr(model, "name", None) in _READ_OPERATIONS or not isinstance(params, Mapping):
            return
        written = [str(params[key]) for key in ("SecretId", "Name") if key in params]
        if isinstance(context, dict):
            context[_WRITTEN] = written
        self._forget(written)
        now = time.monotonic()
        with self._recent_lock:
            for secret_id in written:
                record = self._recent_writes.setdefault(secret_id, [0, now, now])
                record[0] += 1
                record[1] = now

    def _forget_written_again(self, context: Any = None, **_: Any) -> None:
        """After that call, answered or not: a read answered while it was in flight may hold the
        tag from before it, and was noted meanwhile; forgotten again, and not noted after."""
        if not isinstance(context, dict):
            return
        written = context.pop(_WRITTEN, None) or ()
        self._forget(written)
        now = time.monotonic()
        with self._recent_lock:
            for secret_id in written:
                record = self._recent_writes.get(secret_id)
                if record is not None:
                    record[0] = max(0, record[0] - 1)
                    record[2] = now

    def _forget(self, secret_ids: Iterable[str]) -> None:
        with self._notes_lock:
            for secret_id in secret_ids:
                self._written_at[secret_id] = time.monotonic()
                self._expiries_seen.pop(secret_id, None)
        self._prune_expiry_notes()

    def _saw(self, secret_id: str, entry: Mapping[str, Any], asked_at: float) -> tuple[int, datetime] | None:
        """Note the expiry tag of a DescribeSecret answer asked for at `asked_at`
        (unless this store began a write of the secret since: the answer may predate it); return it."""
        expiry = _own_expiry(entry)
        if self._written_at.get(secret_id, self._written_floor) < asked_at:
            self._expiries_seen[secret_id] = (asked_at, _current_number(entry), expiry)
            self._prune_expiry_notes()
        return expiry

    def _prune_expiry_notes(self) -> None:
        """Once the notes pass EXPIRY_NOTES_BEFORE_PRUNE (or twice what the last pruning left),
        drop those older than EXPIRY_SEEN_SECONDS: a tag seen that long ago is asked for again
        anyway, and a write begun that long ago is stood for by `_written_floor`."""
        if len(self._written_at) + len(self._expiries_seen) < max(
            EXPIRY_NOTES_BEFORE_PRUNE, 2 * self._notes_left
        ):
            return
        with self._notes_lock:
            now = time.monotonic()
            horizon = now - EXPIRY_SEEN_SECONDS
            written = builtins.list(self._written_at.items())
            self._written_floor = max([self._written_floor, *(at for _, at in written if at < horizon)])
            self._written_at = {secret_id: at for secret_id, at in written if at >= horizon}
            seen = builtins.list(self._expiries_seen.items())  # _saw adds to it without the lock
            self._expiries_seen = {secret_id: note for secret_id, note in seen if note[0] >= horizon}
            self._notes_left = len(self._written_at) + len(self._expiries_seen)

    def __repr__(self) -> str:
        return f"AwsStore(region={self._client.meta.region_name!r}, prefix={self._prefix!r})"

    def close(self) -> None:
        self._client.close()

    def aws_name(self, name: str) -> str:
        """The AWS secret name of our secret `name`."""
        return f"{self._prefix}/{name}" if self._prefix else name

    def _refuse_unless_name_fits(self, name: str) -> None:
        """AWS takes names of at most 512 characters, the prefix and its '/' included, and ours of
        up to 256 under a prefix of up to 256 could be longer: refused before anything is written
        (moto takes longer ones; AWS would refuse the CreateSecret)."""
        length = len(self.aws_name(name))
        if length > MAX_AWS_NAME_LENGTH:
            room = MAX_AWS_NAME_LENGTH - len(self._prefix) - 1
            raise UnsupportedOperationError(
                f"a secret name of {len(name)} characters is not supported by this store: AWS takes "
                f"names of at most {MAX_AWS_NAME_LENGTH} characters, and the prefix ({len(self._prefix)} "
                f"characters) and its '/' leave {room}; use a shorter name, or a shorter prefix"
            )

    def kms_key_for(self, name: str) -> str | None:
        """The KMS key new secrets of `name`'s namespace are encrypted with (None: AWS's default)."""
        return self._kms_keys.get(namespace_of(name), self._default_kms_key)

    def acting_for(self, actor: str) -> AbstractContextManager[None]:
        """Secrets created in this block, in this thread, record `actor` as their creator (the
        `secrets-manager:created-by` tag the CLI sets; AWS records no writer per version)."""
        return acting_for(actor)

    def probe(self) -> None:
        """One cheap read that proves AWS answers and accepts our credentials: DescribeSecret of
        this log's audit anchor (absent is fine). The service's health check; nothing is kept."""
        with self._aws("check that AWS answers", None, state_error=IntegrityError):
            self._describe_or_none(self.aws_name(self._anchor_name))

    # ---- reads -----------------------------------------------------------------------------

    def get_with_fingerprint(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> tuple[Secret, str]:
        """`get`, and the value's audit fingerprint (the service audits every read with it)."""
        return with_fingerprint(self.get(name, version=version, label=label), self.audit_keys())

    def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        """`_get_with_expiry`; a read of the pending version also makes a DescribeSecret for its
        rotation target (our tag `secrets-manager:pending-target`; a caller not allowed that gets
        the value without it)."""
        secret = self._get_with_expiry(name, version=version, label=label)
        if label != PENDING or not secret.version or secret.target is not None:
            return secret
        try:
            with self._aws(f"read {name}", name, state_error=NotFoundError):
                described = self._client.describe_secret(SecretId=self.aws_name(name))
        except (AccessDeniedError, NotFoundError):
            return secret
        return replace(secret, target=_own_target(described, secret.version))

    def _get_with_expiry(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        """GetSecretValue by staging label; for a version number, DescribeSecret and
        ListSecretVersionIds first (to find the VersionId of our number). A label's version that
        another tool wrote is numbered with ListSecretVersionIds; if the caller may not call it,
        the value is returned with version UNKNOWN_VERSION (0) rather than refused. The version's
        expiry is our tag, which GetSecretValue does not return: a read by label makes a
        DescribeSecret for it too, unless this store saw the tag within EXPIRY_SEEN_SECONDS (a
        long-lived process reading again), and a caller not allowed that gets the value without it."""
        secret = self._get(name, version, label)
        if secret.expires is not None or not secret.version or version is not None:
            return secret
        secret_id = self.aws_name(name)
        seen = self._expiries_seen.get(secret_id)
        if (
            seen is not None
            and time.monotonic() - seen[0] < EXPIRY_SEEN_SECONDS
            # A version of ours written since (by another process): its tag is asked for. Another
            # tool's version has no number in the listing: the tag seen stands for it.
            and seen[1] in (None, secret.version)
            # Only the current version's read can tell a write since: `previous` (or `pending`)
            # is the version that was current when the tag was seen, once another process wrote
            # a new one, and that tag (now the new version's) would be served for it.
            and (label or CURRENT) == CURRENT
        ):
            expiry = seen[2]
        else:
            asked_at = time.monotonic()
            try:
                with self._aws(f"read {name}", name, state_error=NotFoundError):
                    described = self._client.describe_secret(SecretId=secret_id)
            except (AccessDeniedError, NotFoundError):
                return secret
            expiry = self._saw(secret_id, described, asked_at)
        expires = expiry_of(expiry, secret.version)
        return secret if expires is None else replace(secret, expires=expires)

    def _refuse_if_valueless(self, name: str, secret_id: str) -> None:
        """After GetSecretValue found no current version: NotFoundError saying so if the secret
        exists without any version (created by another tool with no value, e.g. Terraform's
        aws_secretsmanager_secret without a secret version), which `list` shows; else nothing
        (the secret is missing, or DescribeSecret is not allowed: the caller's 'not found' stands)."""
        try:
            described = self._client.describe_secret(SecretId=secret_id)
        except ClientError:
            return
        if not described.get("DeletedDate") and not described.get("VersionIdsToStages"):
            raise NotFoundError(
                f"secret {name!r} has no value yet: it was created without one (by another tool); "
                f"'store {name}' gives it its first"
            )

    def _get(self, name: str, version: int | None, label: str | None) -> Secret:
        validate_name(name)
        if version is not None and label is not None:
            raise InvalidInputError("give a version or a label, not both")
        if label is not None and label not in LABELS:
            raise unknown_label(label)
        secret_id = self.aws_name(name)
        if version is None:
            wanted = label or CURRENT
            with self._aws(f"read {name}", name, state_error=NotFoundError):
                try:
                    reply = self._client.get_secret_value(
                        SecretId=secret_id, VersionStage=STAGE_OF_LABEL[wanted]
                    )
                except ClientError as exc:
                    if _code(exc) != "ResourceNotFoundException":
                        raise
                    if wanted == CURRENT:
                        self._refuse_if_valueless(name, secret_id)
                        raise
                    self._client.describe_secret(SecretId=secret_id)  # NotFound if the secret is missing
                    raise NotFoundError(f"secret {name!r} has no version labelled {wanted!r}") from None
            number = _our_number(reply["VersionId"])
            if number is None:  # another tool's version: its number comes from the whole history
                try:
                    versions = self._versions(name)
                except AccessDeniedError:
                    # A reader's policy often grants GetSecretValue alone: the value is ours to
                    # give, only its number is not known (UNKNOWN_VERSION; `history` needs the call).
                    return self._secret(name, UNKNOWN_VERSION, reply)
                numbers = [v.number for v in versions if v.version_id == reply["VersionId"]]
                if not numbers:
                    raise NotFoundError(f"secret {name!r} changed while it was read; try again")
                number = numbers[0]
            return self._secret(name, number, reply)
        with self._aws(f"read {name}", name, state_error=NotFoundError):
            described = self._client.describe_secret(SecretId=secret_id)
            if described.get("DeletedDate"):
                raise NotFoundError(f"secret {name!r} is deleted; 'undelete {name}' restores it")
        limit = self._max_versions_of(described)
        visible = {v.number: v for v in _visible(self._versions(name), limit)}
        if version not in visible:
            raise NotFoundError(f"secret {name!r} has no version {version}")
        with self._aws(f"read {name}", name, state_error=NotFoundError):
            reply = self._client.get_secret_value(SecretId=secret_id, VersionId=visible[version].version_id)
        return replace(
            self._secret(name, version, reply),
            expires=expiry_of(_own_expiry(described), version),
            target=_own_target(described, version),
        )

    def describe(self, name: str) -> SecretMetadata:
        """DescribeSecret and ListSecretVersionIds."""
        validate_name(name)
        with self._aws(f"describe {name}", name):
            description = self._client.describe_secret(SecretId=self.aws_name(name))
        return self._public(name, description, self._versions(name))

    def list(self, prefix: str = "", *, include_deleted: bool = False) -> builtins.list[SecretMetadata]:
        """ListSecrets (name filter on PREFIX/prefix), then ListSecretVersionIds for each secret.
        Secrets whose names are not valid secret names (ours under .secrets-manager/) are left out."""
        validate_prefix(prefix)
        result = []
        for name, entry in self._listed(prefix, include_deleted=include_deleted):
            if entry.get("DeletedDate") and not include_deleted:
                continue
            try:
                result.append(self._public(name, entry, self._versions(name)))
            except NotFoundError:
                continue  # destroyed since ListSecrets answered
        return sorted(result, key=lambda meta: meta.name)

    def list_names(self, prefix: str = "") -> builtins.list[str]:
        """`NameLister.list_names`: ListSecrets alone (one request per 100 secrets), where `list`
        also asks ListSecretVersionIds of each secret."""
        validate_prefix(prefix)
        names = (
            name
            for name, entry in self._listed(prefix, include_deleted=False)
            if not entry.get("DeletedDate")
        )
        return sorted(names)

    def version_snapshot(self) -> dict[str, SecretState]:
        """Every secret's versions (those with a staging label), labels, deletion and metadata, from
        ListSecrets: one request per 100 secrets (the service's polled change feed,
        store/polled.py), and a DescribeSecret for each secret this store wrote until the listing
        shows its write (LIST_LAG_SECONDS). A version another tool wrote has number 0 here (its
        number needs ListSecretVersionIds); ours carry theirs in their id."""
        snapshot = {
            name: _state_of(entry)
            for name, entry in self._listed("", include_deleted=True, page_size=LIST_PAGE_SIZE)
        }
        self._describe_recent_writes(snapshot)
        return snapshot

    def _describe_recent_writes(self, snapshot: dict[str, SecretState]) -> None:
        """Put in `snapshot` what DescribeSecret says of each secret this store wrote within
        LIST_LAG_SECONDS (the latest RECENT_WRITES_DESCRIBED): the listing may not show those
        writes yet. A secret is no longer described once the listing, read after its last write
        ended, shows what DescribeSecret does."""
        now = time.monotonic()
        strip = f"{self._prefix}/" if self._prefix else ""
        pending: list[tuple[float, str, str]] = []
        with self._recent_lock:
            for secret_id, (in_flight, began, ended) in list(self._recent_writes.items()):
                name = secret_id[len(strip) :] if secret_id.startswith(strip) else ""
                try:
                    validate_name(name)
                except InvalidInputError:  # the audit anchor, or not ours
                    del self._recent_writes[secret_id]
                    continue
                if now - ended >= LIST_LAG_SECONDS and not (in_flight and now - began < LIST_LAG_SECONDS):
                    del self._recent_writes[secret_id]
                    continue
                pending.append((max(began, ended), secret_id, name))
        for _, secret_id, name in sorted(pending, reverse=True)[:RECENT_WRITES_DESCRIBED]:
            asked_at = time.monotonic()
            try:
                with self._aws(f"describe {name}", name):
                    described = self._describe_or_none(secret_id)
            except AccessDeniedError:  # a resource policy that lets us write but not describe
                continue  # the listing's, as before
            state = None if described is None else _state_of(described)
            with self._recent_lock:
                record = self._recent_writes.get(secret_id)
                caught_up = snapshot.get(name) == state
                if caught_up and record is not None and not record[0] and record[2] < asked_at:
                    del self._recent_writes[secret_id]  # the listing shows it: no longer described
            if state is None:
                snapshot.pop(name, None)  # destroyed (ForceDeleteWithoutRecovery)
            else:
                snapshot[name] = state

    def _listed(
        self, prefix: str, *, include_deleted: bool, page_size: int | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """ListSecrets' entries under PREFIX/prefix, by our name (not valid names left out)."""
        wanted = self.aws_name(prefix) if prefix else (f"{self._prefix}/" if self._prefix else "")
        arguments: dict[str, Any] = {"IncludePlannedDeletion": include_deleted}
        if wanted:
            arguments["Filters"] = [{"Key": "name", "Values": [wanted]}]
        if page_size is not None:
            arguments["PaginationConfig"] = {"PageSize": page_size}
        strip = len(self._prefix) + 1 if self._prefix else 0
        with self._aws("list secrets", None):
            pages = list(self._client.get_paginator("list_secrets").paginate(**arguments))
        for page in pages:
            for entry in page.get("SecretList", []):
                aws_name = str(entry.get("Name", ""))
                if not aws_name.startswith(wanted):  # AWS's name filter ignores case
                    continue
                name = aws_name[strip:]
                try:
                    validate_name(name)
                except InvalidInputError:
                    continue
                yield name, entry

    def _versions(self, name: str) -> builtins.list[_AwsVersion]:
        """ListSecretVersionIds (with deprecated versions), numbered; oldest first."""
        raw: list[dict[str, Any]] = []
        with self._aws(f"list the versions of {name}", name, state_error=NotFoundError):
            arguments: dict[str, Any] = {"SecretId": self.aws_name(name), "IncludeDeprecated": True}
            while True:
                page = self._client.list_secret_version_ids(**arguments)
                raw.extend(page.get("Versions", []))
                if not page.get("NextToken"):
                    break
                arguments["NextToken"] = page["NextToken"]
        return _numbered(raw)

    def _max_versions_of(self, entry: Mapping[str, Any]) -> int:
        """The secret's own max_versions (our tag on its DescribeSecret or ListSecrets entry),
        else the store's default; a tag that another tool spoilt counts as absent."""
        own = _own_max_versions(entry)
        return self._max_versions if own is None else own

    def _secret(self, name: str, number: int, reply: Mapping[str, Any]) -> Secret:
        if reply.get("SecretString") is not None:
            value = str(reply["SecretString"]).encode("utf-8")
        elif reply.get("SecretBinary") is not None:
            value = bytes(reply["SecretBinary"])
        else:
            raise NotFoundError(f"version {number} of {name!r} has no value")
        return Secret(
            name=name,
            version=number,
            value=SecretValue(value),
            created=utc(reply["CreatedDate"]),
            labels=_labels(reply.get("VersionStages", [])),
        )

    def _public(
        self, name: str, entry: Mapping[str, Any], versions: builtins.list[_AwsVersion]
    ) -> SecretMetadata:
        tags = {str(t["Key"]): str(t["Value"]) for t in entry.get("Tags") or []}
        created = utc(entry.get("CreatedDate") or datetime.now(UTC))
        max_versions = self._max_versions_of(entry)
        visible = _visible(versions, max_versions)
        labels = {label: v.number for v in visible for label in v.labels}
        deleted = entry.get("DeletedDate")
        return SecretMetadata(
            name=name,
            namespace=namespace_of(name),
            created=created,
            updated=utc(entry.get("LastChangedDate") or created),
            created_by=tags.get(CREATED_BY_KEY, ""),
            description=str(entry.get("Description") or ""),
            tags=user_tags(tags),
            current_version=labels.get(CURRENT),
            versions=tuple(
                VersionInfo(
                    version=v.number, created=v.created, created_by="", labels=v.labels, destroyed=False
                )
                for v in visible
            ),
            deleted=None if deleted is None else utc(deleted),
            max_versions=max_versions,
            labels=labels,
            expires=expiry_of(parse_expiry(tags.get(EXPIRES_KEY)), labels.get(CURRENT)),
        )

    # ---- writes ----------------------------------------------------------------------------

    def put(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        max_versions: int | None = None,
        expires: datetime | None = None,
    ) -> VersionInfo:
        """DescribeSecret, then CreateSecret (a new secret) or ListSecretVersionIds and
        PutSecretValue with ClientRequestToken = the next version's id; then UpdateSecret,
        TagResource, UntagResource as the description, tags, max_versions and expiry require (the
        expiry tag names the version written: if TagResource fails, that version has none)."""
        checked_write(name, expect_version, description, tags)
        expires = checked_expiry(name, expires)
        _refuse_tags_aws_refuses(name, tags)
        checked_max_versions(name, max_versions)
        payload = _payload(checked_value(value, empty_supported=False))
        self._refuse_unless_name_fits(name)
        secret_id = self.aws_name(name)
        backoff = Backoff(first=0.05, cap=1.0, deadline_seconds=RETRY_DEADLINE_SECONDS, what=repr(name))
        while True:
            with self._aws(f"store {name}", name):
                existing = self._describe_or_none(secret_id)
            _refuse_unless_tags_fit(name, existing, tags, max_versions, expiry=expires is not None)
            try:
                if existing is None:
                    if expect_version not in (None, 0):
                        raise ConflictError(
                            f"secret {name!r} is at version 0, not {expect_version}; read it again and retry"
                        )
                    self._create(name, payload, description, tags, max_versions, expires)
                    return VersionInfo(version=1, created=datetime.now(UTC), created_by="", labels=(CURRENT,))
                number = self._put_version(name, existing, payload, expect_version)
                break
            except _LostRace:
                backoff.wait()
        expiry = None if expires is None else format_expiry(number, expires)
        try:
            self._update_metadata(name, existing, description, tags, max_versions, expiry)
        except SecretsManagerError as exc:
            # The version stands: a caller told only "denied" (a policy granting PutSecretValue but
            # not TagResource or UpdateSecret) would store the value again, as a new version.
            raise after_the_version(exc, name, number) from None
        return VersionInfo(version=number, created=datetime.now(UTC), created_by="", labels=(CURRENT,))

    def check_metadata_fits(
        self,
        name: str,
        *,
        description: str | None,
        tags: Mapping[str, str] | None,
        max_versions: int | None,
    ) -> None:
        """What `put` creating `name` would refuse before writing: a tag character AWS does not
        allow, more tags than fit beside ours (`store.base.check_metadata_fits`), a name longer
        than AWS takes under the prefix."""
        self._refuse_unless_name_fits(name)
        _refuse_tags_aws_refuses(name, tags)
        _refuse_unless_tags_fit(name, None, tags, max_versions)

    def _create(
        self,
        name: str,
        payload: Mapping[str, Any],
        description: str | None,
        tags: Mapping[str, str] | None,
        max_versions: int | None,
        expires: datetime | None = None,
    ) -> None:
        ours = {CREATED_BY_KEY: _tag_value(acting_actor(self._actor))}
        if max_versions is not None:
            ours[MAX_VERSIONS_KEY] = str(max_versions)
        if expires is not None:
            ours[EXPIRES_KEY] = format_expiry(1, expires)
        arguments: dict[str, Any] = {
            "Name": self.aws_name(name),
            "ClientRequestToken": _version_id(1),
            "Tags": [{"Key": k, "Value": v} for k, v in (ours | dict(tags or {})).items()],
            **payload,
        }
        if description:
            arguments["Description"] = description
        kms_key = self.kms_key_for(name)
        if kms_key:
            arguments["KmsKeyId"] = kms_key
        with self._aws(f"store {name}", name):
            try:
                self._client.create_secret(**arguments)
            except ClientError as exc:
                # Created meanwhile, or the name is still being freed after a forced delete (AWS
                # takes a moment): the next round sees the secret, or the name free. Any other
                # InvalidRequestException (a disabled KMS key…) is no race: reported at once.
                message = str(exc.response.get("Error", {}).get("Message", ""))
                freeing = _code(exc) == "InvalidRequestException" and "delet" in message.lower()
                if _code(exc) == "ResourceExistsException" or freeing:
                    raise _LostRace() from None
                raise

    def _put_version(
        self, name: str, existing: Mapping[str, Any], payload: Mapping[str, Any], expect_version: int | None
    ) -> int:
        if existing.get("DeletedDate"):
            raise SecretStateError(
                f"secret {name!r} is deleted; run 'undelete {name}' first, or 'destroy {name} --all'"
            )
        versions = self._versions(name)
        current = next((v.number for v in reversed(versions) if CURRENT in v.labels), 0)
        if expect_version is not None and current != expect_version:
            raise ConflictError(
                f"secret {name!r} is at version {current}, not {expect_version}; read it again and retry"
            )
        number = (versions[-1].number if versions else 0) + 1
        with self._aws(f"store {name}", name):
            try:
                self._client.put_secret_value(
                    SecretId=self.aws_name(name), ClientRequestToken=_version_id(number), **payload
                )
            except ClientError as exc:
                if _code(exc) != "ResourceExistsException":
                    raise
                # Another writer took version `number` (with another value): compare-and-set lost.
                if expect_version is not None:
                    raise ConflictError(
                        f"secret {name!r} changed since version {expect_version}; read it again and retry"
                    ) from None
                raise _LostRace() from None
        return number

    # ---- rotation: AWS's own staging labels ----------------------------------------------------

    def stage(
        self, name: str, value: bytes, *, expect_current: int | None = None, target: str | None = None
    ) -> VersionInfo:
        """DescribeSecret, ListSecretVersionIds, then PutSecretValue with VersionStages=[AWSPENDING]
        (AWSCURRENT stays where it is). Refused while AWSPENDING is on a version that is not
        AWSCURRENT, as RotateSecret is. Two stagers that read the same versions ask for the same
        ClientRequestToken, so the second is refused by AWS and sees the first's AWSPENDING; so does
        a stage after a write that took its version number, which then sees `expect_current` gone.
        `target`: then TagResource, our tag `secrets-manager:pending-target` (`N@` and the target in
        base64, which AWS's tag characters hold) naming the version staged. AWS has no per-version
        metadata, and the tag goes after the version it names exists: if TagResource fails, the
        version is staged without a target (a resume treats it as one staged by an older build).
        Refused before anything is written if the secret's tags leave no room for it."""
        validate_name(name)
        payload = _payload(checked_value(value, empty_supported=False))
        target = checked_target(name, target)
        backoff = Backoff(first=0.05, cap=1.0, deadline_seconds=RETRY_DEADLINE_SECONDS, what=repr(name))
        while True:
            existing = self._require_live(name)
            if target is not None:
                _refuse_unless_target_fits(name, existing)
            versions = self._versions(name)
            current = next((v.number for v in reversed(versions) if CURRENT in v.labels), None)
            refuse_if_rotating(name, next((v.number for v in versions if PENDING in v.labels), None), current)
            refuse_if_changed(name, expect_current, current)
            number = (versions[-1].number if versions else 0) + 1
            with self._aws(f"stage a new version of {name}", name):
                try:
                    self._client.put_secret_value(
                        SecretId=self.aws_name(name),
                        ClientRequestToken=_version_id(number),
                        VersionStages=[STAGE_OF_LABEL[PENDING]],
                        **payload,
                    )
                    break
                except ClientError as exc:
                    if _code(exc) != "ResourceExistsException":
                        raise
            backoff.wait()  # another writer took version `number`: read again
        if target is not None:
            tag = {"Key": TARGET_KEY, "Value": format_target(number, target)}
            # Not raised: the version is staged and the rotation goes on; only a resume of it
            # would lack the target, and says so.
            with (
                contextlib.suppress(SecretsManagerError),
                self._aws(f"record the rotation target of {name}", name),
            ):
                self._client.tag_resource(SecretId=self.aws_name(name), Tags=[tag])
        return VersionInfo(version=number, created=datetime.now(UTC), created_by="", labels=(PENDING,))

    def promote(self, name: str, version: int) -> int | None:
        """ListSecretVersionIds, then UpdateSecretVersionStage moving AWSCURRENT to the pending
        version (AWS moves AWSPREVIOUS to the old current itself), then one removing AWSPENDING.
        AWS has no multi-label transaction: between the two calls the new current version still
        carries AWSPENDING too (as after AWS's own rotation Lambdas); the second call removes it.
        Returns the old current, the version the move named in RemoveFromVersionId."""
        validate_name(name)
        self._require_live(name, writes_a_version=False)
        versions = self._versions(name)
        pending = next((v for v in versions if PENDING in v.labels), None)
        if pending is None or pending.number != version:
            now_pending = "no version is" if pending is None else f"version {pending.number} is"
            raise ConflictError(
                f"version {version} of {name!r} is not pending ({now_pending}); nothing was promoted"
            )
        # The newest holder of AWSCURRENT: AWS keeps a stage on one version, but moto can leave it on
        # two after PutSecretValue follows UpdateSecretVersionStage (docs/stores.md); describe
        # reports the newest too.
        current = next((v for v in reversed(versions) if CURRENT in v.labels), None)
        refuse_to_demote(name, version, None if current is None else current.number)
        secret_id = self.aws_name(name)
        if current is not None and current.number == version:
            # A promote whose second call failed: AWSCURRENT is there already, only AWSPENDING is
            # left to remove; the old current is the one AWS labelled AWSPREVIOUS then.
            previous = next((v.number for v in versions if PREVIOUS in v.labels), None)
        else:
            previous = None if current is None else current.number
            with self._aws(f"promote version {version} of {name}", name):
                arguments: dict[str, Any] = {
                    "SecretId": secret_id,
                    "VersionStage": STAGE_OF_LABEL[CURRENT],
                    "MoveToVersionId": pending.version_id,
                }
                if current is not None:
                    arguments["RemoveFromVersionId"] = current.version_id
                self._client.update_secret_version_stage(**arguments)
        try:
            with self._aws(f"promote version {version} of {name}", name):
                self._client.update_secret_version_stage(
                    SecretId=secret_id,
                    VersionStage=STAGE_OF_LABEL[PENDING],
                    RemoveFromVersionId=pending.version_id,
                )
        except SecretsManagerError as error:
            if self._promoted_unlabelled(name, pending.version_id):
                return previous  # another call removed AWSPENDING first (a discard): promoted
            # AWSCURRENT moved: told only "denied promote", a caller would take it for undone.
            was = "" if previous is None else f", {previous} previous"
            raise restated(
                error,
                f"version {version} of {name!r} was promoted (current{was}), but is still labelled "
                f"'pending': {error}; promote it again to remove that label ('rotate {name} --resume "
                "--promote-only')",
            ) from None
        return previous

    def _promoted_unlabelled(self, name: str, version_id: str) -> bool:
        """Whether the version `version_id` carries AWSCURRENT and no longer AWSPENDING (False if
        that cannot be read)."""
        try:
            now = next((v for v in self._versions(name) if v.version_id == version_id), None)
        except SecretsManagerError:
            return False
        return now is not None and CURRENT in now.labels and PENDING not in now.labels

    def discard_pending(self, name: str) -> int:
        """ListSecretVersionIds, then UpdateSecretVersionStage removing AWSPENDING from the version
        that carried it, which is returned. A version that carries AWSCURRENT too is one a promote
        moved there and has yet to (or failed to) remove AWSPENDING from: nothing to discard
        (ConflictError; a promote run again removes the label). AWS has no compare-and-set on
        labels: a promote whose first call lands between the read and the removal makes the
        removal its second call's work, which is read back and said (ConflictError, nothing
        discarded); a concurrent stage in between is a race this backend cannot close."""
        validate_name(name)
        self._require_live(name, writes_a_version=False)
        pending = next((v for v in self._versions(name) if PENDING in v.labels), None)
        if pending is None:
            raise NotFoundError(f"secret {name!r} has no version labelled {PENDING!r}")
        if CURRENT in pending.labels:
            raise _promoted_not_discarded(name, pending.number)
        try:
            with self._aws(f"discard the pending version of {name}", name):
                self._client.update_secret_version_stage(
                    SecretId=self.aws_name(name),
                    VersionStage=STAGE_OF_LABEL[PENDING],
                    RemoveFromVersionId=pending.version_id,
                )
        except SecretsManagerError:
            if self._promoted_unlabelled(name, pending.version_id):  # its promote finished first
                raise _promoted_not_discarded(name, pending.number) from None
            raise
        if self._promoted_unlabelled(name, pending.version_id):
            raise _promoted_not_discarded(name, pending.number)
        return pending.number

    def _require_live(self, name: str, *, writes_a_version: bool = True) -> Mapping[str, Any]:
        """DescribeSecret: NotFoundError if the secret is missing, SecretStateError if it is deleted;
        else its answer. The refusal words are the encrypted store's: a write of a version (stage)
        may also start anew after 'destroy --all'; promote and discard only after 'undelete'."""
        with self._aws(f"read {name}", name):
            existing = self._describe_or_none(self.aws_name(name))
        if existing is None:
            raise NotFoundError(f"secret {name!r} not found")
        if existing.get("DeletedDate"):
            also = f", or 'destroy {name} --all'" if writes_a_version else ""
            raise SecretStateError(f"secret {name!r} is deleted; run 'undelete {name}' first{also}")
        return existing

    def _update_metadata(
        self,
        name: str,
        existing: Mapping[str, Any],
        description: str | None,
        tags: Mapping[str, str] | None,
        max_versions: int | None,
        expiry: str | None = None,
    ) -> None:
        secret_id = self.aws_name(name)
        setting = dict(tags or {})
        if max_versions is not None:
            setting[MAX_VERSIONS_KEY] = str(max_versions)
        if expiry is not None:
            setting[EXPIRES_KEY] = expiry
        with self._aws(f"store the metadata of {name}", name, state_error=SecretStateError):
            if description is not None and description != (existing.get("Description") or ""):
                self._client.update_secret(SecretId=secret_id, Description=description)
            if tags is not None:
                old = user_tags({str(t["Key"]): str(t["Value"]) for t in existing.get("Tags") or []})
                gone = [k for k in old if k not in tags]
                if gone:
                    self._client.untag_resource(SecretId=secret_id, TagKeys=gone)
            if setting:
                self._client.tag_resource(
                    SecretId=secret_id, Tags=[{"Key": k, "Value": v} for k, v in setting.items()]
                )

    def update_metadata(
        self,
        name: str,
        *,
        description: str | None = None,
        set_tags: Mapping[str, str] | None = None,
        remove_tags: Iterable[str] = (),
        max_versions: int | None = None,
        expires: datetime | None = None,
        clear_expiry: bool = False,
        expect_current: int | None = None,
    ) -> None:
        """DescribeSecret, then UpdateSecret with only a Description (AWS writes no version for
        it), UntagResource and TagResource with only the keys given (max_versions and the expiry
        are our tags), so a concurrent change of other tags is kept. An expiry also needs
        ListSecretVersionIds, for the current version."""
        validate_name(name)
        expires, expiry_given = checked_expiry_change(name, expires, clear_expiry)
        setting, removing = checked_metadata_update(
            name, description, set_tags, remove_tags, max_versions, expiry_change=expiry_given
        )
        _refuse_tags_aws_refuses(name, setting)  # a key to remove that AWS could not hold is absent
        secret_id = self.aws_name(name)
        with self._aws(f"read {name}", name):
            existing = self._describe_or_none(secret_id)
        if existing is None:
            raise NotFoundError(f"secret {name!r} not found")
        if existing.get("DeletedDate"):
            raise SecretStateError(f"secret {name!r} is deleted; run 'undelete {name}' first")
        old_tags = user_tags({str(t["Key"]): str(t["Value"]) for t in existing.get("Tags") or []})
        old_description = str(existing.get("Description") or "")
        new_description, tags = updated_metadata(
            name,
            old_description,
            old_tags,
            new_description=description,
            set_tags=setting,
            remove_tags=removing,
        )
        # Its own max_versions only if our tag holds it: without, the store's default counts, and
        # another AwsStore's may differ, so setting it is a change.
        own_max = _own_max_versions(existing)
        old_expiry = _tag_of(existing, EXPIRES_KEY)
        expiry: str | None = None
        current: int | None = None
        if expiry_given or expect_current is not None:
            versions = self._versions(name)
            current = next((v.number for v in reversed(versions) if CURRENT in v.labels), None)
            refuse_unless_still_current(name, expect_current, current)  # on this read: no CAS
        if expiry_given:
            refuse_expiry_without_current(name, current)
            assert current is not None
            expiry = None if expires is None else format_expiry(current, expires)
        # A clear is of the current version's: another version's (a rollback carries it) stays.
        clears_nothing = expires is None and expiry_of(parse_expiry(old_expiry), current) is None
        expiry_changes = expiry_given and expiry != old_expiry and not clears_nothing
        refuse_if_unchanged(
            name,
            # no tag is the store's default (what describe shows): setting it is no change, as on ours
            (old_description, old_tags, self._max_versions if own_max is None else own_max),
            (new_description, tags),
            max_versions,
            expiry_changes=expiry_changes,
        )
        _refuse_unless_tags_fit(name, existing, tags, max_versions, expiry=expiry is not None)
        gone = sorted(removing & old_tags.keys())
        if expiry_changes and expiry is None:
            gone.append(EXPIRES_KEY)
        if max_versions is not None:
            setting[MAX_VERSIONS_KEY] = str(max_versions)
        if expiry_changes and expiry is not None:
            setting[EXPIRES_KEY] = expiry
        done: builtins.list[str] = []  # what was changed, for an error after it
        left = [*(["the tags removed"] if gone else []), *(["the tags set"] if setting else [])]
        try:
            with self._aws(f"store the metadata of {name}", name, state_error=SecretStateError):
                if description is not None:
                    self._client.update_secret(SecretId=secret_id, Description=description)
                    done.append("the description")
                if gone:
                    self._client.untag_resource(SecretId=secret_id, TagKeys=gone)
                    done.append(left.pop(0))
                if setting:
                    self._client.tag_resource(
                        SecretId=secret_id, Tags=[{"Key": k, "Value": v} for k, v in setting.items()]
                    )
        except SecretsManagerError as error:
            if not done:
                raise
            # Up to three calls, each its own change: say which were made (a rerun makes the rest).
            raise restated(
                error,
                f"{' and '.join(done)} of {name!r} {'was' if len(done) == 1 else 'were'} changed, but "
                f"not {' and '.join(left)}: {error}; run the same change again once that is allowed",
            ) from None

    def delete(
        self, name: str, *, expect_version: int | None = None, expect_no_pending: bool = False
    ) -> None:
        """DescribeSecret, then DeleteSecret with RecoveryWindowInDays.

        DeleteSecret has no condition (only SecretId and the recovery window), so `expect_version`
        and `expect_no_pending` are checked around it: ListSecretVersionIds before (that version
        must carry AWSCURRENT; no other may carry AWSPENDING), DescribeSecret after. A version made
        current or pending between the two (a PutSecretValue landing just before the DeleteSecret)
        is deleted with the secret until RestoreSecret undoes the delete, which is then refused: the
        window docs/stores.md names. After the DeleteSecret, AWS refuses any new version."""
        validate_name(name)
        checked_expect_version(expect_version)
        conditional = expect_version is not None or expect_no_pending
        checked_id = None
        with self._aws(f"delete {name}", name, state_error=NotFoundError):
            existing = self._client.describe_secret(SecretId=self.aws_name(name))
            if existing.get("DeletedDate"):
                raise NotFoundError(f"secret {name!r} is already deleted")
            if conditional:
                versions = self._versions(name)
                current = next((v for v in reversed(versions) if CURRENT in v.labels), None)
                pending = next((v for v in reversed(versions) if PENDING in v.labels), None)
                current_number = None if current is None else current.number
                refuse_unless_current(name, expect_version, current_number)
                refuse_if_staged(
                    name, expect_no_pending, None if pending is None else pending.number, current_number
                )
                checked_id = None if current is None else current.version_id
            self._client.delete_secret(
                SecretId=self.aws_name(name), RecoveryWindowInDays=self._recovery_window_days
            )
        if conditional:
            self._undelete_unless_unchanged(name, expect_version, expect_no_pending, checked_id)

    def _undelete_unless_unchanged(
        self, name: str, expect_version: int | None, expect_no_pending: bool, checked_id: str | None
    ) -> None:
        """After a conditional delete: DescribeSecret; if AWSCURRENT moved off the version checked
        (with `expect_version`), or AWSPENDING is on another version than AWSCURRENT (with
        `expect_no_pending`: a stage landed before the delete), RestoreSecret and ConflictError
        (nothing is left deleted)."""
        try:
            with self._aws(f"delete {name}", name, state_error=NotFoundError):
                after = self._client.describe_secret(SecretId=self.aws_name(name))
        except SecretsManagerError as error:  # the delete is done: not said as one that failed
            raise unchecked_delete_error(name, error) from None
        stages = after.get("VersionIdsToStages") or {}
        now_id = next((i for i, s in stages.items() if STAGE_OF_LABEL[CURRENT] in s), None)
        pending_id = next((i for i, s in stages.items() if STAGE_OF_LABEL[PENDING] in s), None)
        moved = expect_version is not None and now_id != checked_id
        staged = expect_no_pending and pending_id is not None and pending_id != now_id
        if not moved and not staged:
            return
        try:
            with self._aws(f"undelete {name}", name, state_error=SecretStateError):
                self._client.restore_secret(SecretId=self.aws_name(name))
        except SecretsManagerError as error:
            what = "a new version" if moved else "a pending version (a rotation was staged)"
            raise restated(
                error,
                f"secret {name!r} got {what} while it was being deleted, and the delete could "
                f"not be undone: {error}; 'undelete {name}' restores it with that version",
            ) from None
        versions = self._versions(name)
        current = next((v.number for v in reversed(versions) if CURRENT in v.labels), None)
        if moved:
            assert expect_version is not None
            raise not_current_error(name, expect_version, current)
        pending = next((v.number for v in reversed(versions) if PENDING in v.labels), None)
        refuse_if_staged(name, True, pending, current)
        raise ConflictError(  # the rotation ended between the restore and this read: it was there
            f"secret {name!r} got a pending version while it was being deleted (a rotation was staged "
            "after it was read); nothing was deleted: read it again and retry"
        )

    def undelete(self, name: str) -> None:
        """DescribeSecret, then RestoreSecret."""
        validate_name(name)
        with self._aws(f"undelete {name}", name, state_error=SecretStateError):
            existing = self._client.describe_secret(SecretId=self.aws_name(name))
            if not existing.get("DeletedDate"):
                raise SecretStateError(f"secret {name!r} is not deleted")
            self._client.restore_secret(SecretId=self.aws_name(name))

    def destroy(self, name: str, versions: Iterable[int]) -> None:
        """Not supported: AWS Secrets Manager has no call that erases one version."""
        validate_name(name)
        raise UnsupportedOperationError(
            "destroying single versions is not supported by this store: AWS Secrets Manager cannot "
            f"erase one version; 'destroy {name} --all' erases the whole secret"
        )

    def destroy_secret(self, name: str, *, deleted_before: datetime | None = None) -> None:
        """DescribeSecret, then DeleteSecret with ForceDeleteWithoutRecovery (a secret already
        scheduled for deletion is restored first, which AWS requires before a forced delete).
        `deleted_before` (`purge`) is not supported: AWS purges a deleted secret itself at the end
        of its recovery window (RecoveryWindowInDays), and DescribeSecret's DeletedDate is that
        end, not when the secret was deleted."""
        validate_name(name)
        if deleted_before is not None:
            raise UnsupportedOperationError(
                "purge is not supported by this store: AWS Secrets Manager purges a deleted secret "
                "itself at the end of its recovery window; 'destroy NAME --all' ends it early"
            )
        secret_id = self.aws_name(name)
        with self._aws(f"destroy {name}", name, state_error=SecretStateError):
            self._client.describe_secret(SecretId=secret_id)
            try:
                self._client.delete_secret(SecretId=secret_id, ForceDeleteWithoutRecovery=True)
                return
            except ClientError as exc:
                if _code(exc) != "InvalidRequestException":
                    raise
                self._client.restore_secret(SecretId=secret_id)
        try:
            with self._aws(f"destroy {name}", name, state_error=SecretStateError):
                self._client.delete_secret(SecretId=secret_id, ForceDeleteWithoutRecovery=True)
        except SecretsManagerError as error:
            # Restored, but not destroyed: a secret deleted before would be live again, unnoticed.
            raise self._deleted_again(name, error) from None

    def _deleted_again(self, name: str, error: SecretsManagerError) -> SecretsManagerError:
        """The error of a destroy whose RestoreSecret (AWS's condition for a forced delete of a
        secret scheduled for deletion) succeeded and whose forced DeleteSecret failed: the secret
        is deleted again with the store's recovery window, as it was, and the error says so; if
        that fails too, that it is live now."""
        try:
            with self._aws(f"delete {name} again", name, state_error=SecretStateError):
                self._client.delete_secret(
                    SecretId=self.aws_name(name), RecoveryWindowInDays=self._recovery_window_days
                )
        except SecretsManagerError:
            return restated(
                error,
                f"secret {name!r} was not destroyed and is no longer deleted (AWS needs it restored "
                f"before a forced delete, and the delete after that failed): {error}; run "
                f"'delete {name}' to delete it again",
            )
        return restated(
            error,
            f"secret {name!r} was not destroyed: {error}; it is deleted again (recoverable for "
            f"{self._recovery_window_days} days from now)",
        )

    def _describe_or_none(self, secret_id: str) -> dict[str, Any] | None:
        try:
            return dict(self._client.describe_secret(SecretId=secret_id))
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return None
            raise

    # ---- audit support (the `AuditAnchor` protocol of audit/) -----------------------------------

    @property
    def audit_anchor_scoped(self) -> bool:
        """Always: each log's anchor is kept under its own scope (store/external.py), so a new
        hostname or log path meets none and is anchored anew."""
        return True

    def audit_key(self) -> bytes:
        """The store's audit HMAC key (the newest of `audit_keys`), created on first use."""
        return self.audit_keys()[-1]

    def audit_keys(self, *, reload: bool = False) -> tuple[bytes, ...]:
        """Every audit key of the store, oldest first: the SecretBinary of
        PREFIX/.secrets-manager/audit-key holds them one after the other (32 bytes each; a store
        made before 0.5.0 holds one), made by CreateSecret on first use (if another process wins
        that race, theirs is used); `audit rotate-key` appends one. Read once per handle and again
        every AUDIT_KEYS_RECHECK_SECONDS (another process's rotation reaches no log of this one:
        its writer learns of it here); `reload`: read again now."""
        return self._audit_keys.get(reload=reload)

    def _read_audit_keys(self) -> tuple[bytes, ...]:
        """The stored audit keys (GetSecretValue of AWSCURRENT), made first if there are none."""
        secret_id = self.aws_name(AUDIT_KEY_NAME)
        with self._aws("read the audit key", None, state_error=IntegrityError):
            try:
                reply = self._client.get_secret_value(SecretId=secret_id)
            except ClientError as exc:
                if _code(exc) != "ResourceNotFoundException":
                    raise
                arguments: dict[str, Any] = {
                    "Name": secret_id,
                    "SecretBinary": secrets.token_bytes(AUDIT_KEY_SIZE),
                    "Description": "secrets-manager: the audit log's HMAC key",
                }
                if self._default_kms_key:
                    arguments["KmsKeyId"] = self._default_kms_key
                try:
                    self._client.create_secret(**arguments)
                except ClientError as create_exc:
                    if _code(create_exc) != "ResourceExistsException":
                        raise
                reply = self._client.get_secret_value(SecretId=secret_id)
        keyring = reply.get("SecretBinary")
        try:
            if not isinstance(keyring, bytes):
                raise ValueError("not binary")
            return audit_keys_of(keyring)
        except ValueError:
            raise IntegrityError(f"the audit key in AWS ({secret_id}) is damaged") from None

    def rotate_audit_key(self) -> int:
        """Append a new random audit key to the stored ones (`audit rotate-key`) and return its
        generation: PutSecretValue with ClientRequestToken = `_version_id(generation)`, so of two
        rotations at once from the same keys the second is refused by AWS (that version id is
        taken, with another value) and appends to the first's. The older keys stay to verify what
        they signed."""
        secret_id = self.aws_name(AUDIT_KEY_NAME)
        for _attempt in range(ROTATE_AUDIT_KEY_ATTEMPTS):
            keys = self._read_audit_keys()
            generation = len(keys) + 1
            rotated = b"".join(keys) + secrets.token_bytes(AUDIT_KEY_SIZE)
            with self._aws("rotate the audit key", None, state_error=IntegrityError):
                try:
                    self._client.put_secret_value(
                        SecretId=secret_id, ClientRequestToken=_version_id(generation), SecretBinary=rotated
                    )
                except ClientError as exc:
                    if _code(exc) != "ResourceExistsException":
                        raise
                    continue  # another rotation took this generation first: append to it
            self.audit_keys(reload=True)  # this handle's writer moves on to the new key now
            return generation  # not len() of that reload: a rotation may land in between
        raise ConflictError("the audit key changed under every attempt to rotate it; try again")

    def audit_anchor(self) -> Anchor | None:
        """DescribeSecret of PREFIX/.secrets-manager/audit-anchor/SCOPE: the anchor is its
        Description (a JSON object), so moving it creates no secret versions (AWS caps those)."""
        with self._aws("read the audit anchor", None, state_error=IntegrityError):
            existing = self._describe_or_none(self.aws_name(self._anchor_name))
        if existing is None:
            return None
        try:
            doc = json.loads(existing.get("Description") or "")
            return Anchor(seq=int(doc["seq"]), hash=str(doc["hash"]))
        # OverflowError: int() of Infinity or 1e400; RecursionError: '[[[[…' nested too deep.
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            raise IntegrityError("the audit anchor in AWS is damaged") from None

    def set_audit_anchor(
        self, anchor: Anchor, *, lock_wait: float | None = None, reset: bool = False
    ) -> None:
        """UpdateSecret(Description=anchor), or CreateSecret the first time. `lock_wait` is
        ignored: AWS has no store-wide writer lock to wait on; the request's timeout bounds it."""
        secret_id = self.aws_name(self._anchor_name)
        doc = json.dumps({"seq": anchor.seq, "hash": anchor.hash}, separators=(",", ":"))
        with self._aws("anchor the audit log", None, state_error=IntegrityError):
            try:
                self._client.update_secret(SecretId=secret_id, Description=doc)
            except ClientError as exc:
                if _code(exc) != "ResourceNotFoundException":
                    raise
                arguments: dict[str, Any] = {"Name": secret_id, "Description": doc, "SecretString": "{}"}
                if self._default_kms_key:
                    arguments["KmsKeyId"] = self._default_kms_key
                self._client.create_secret(**arguments)

    # ---- transport ---------------------------------------------------------------------------

    @contextmanager
    def _aws(
        self, action: str, name: str | None, *, state_error: type[Exception] = SecretStateError
    ) -> Iterator[None]:
        """Map what boto3 raises inside the block to our exceptions (`_ERRORS`).

        `state_error` is what InvalidRequestException means for this call: AWS uses it for a secret
        scheduled for deletion (a read of it is NotFound, a write a Conflict)."""
        what = f"secret {name!r}" if name else "the secret"
        if self._unanswered is not None:
            until, cause = self._unanswered
            if time.monotonic() < until:
                raise NoAnswerError(f"{cause}; check the endpoint and the network")
            self._unanswered = None
        self._calls.operation = None
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            message = str(exc.response.get("Error", {}).get("Message", ""))[:300]
            if code == "InvalidRequestException":
                if "deleted" in message or "deletion" in message:
                    hint = f"; 'undelete {name}' restores it" if name else " (scheduled for deletion in AWS)"
                    raise state_error(f"{what} is deleted{hint}") from None
                raise state_error(f"AWS refused {action} in the secret's current state: {message}") from None
            for codes, ours, template in _ERRORS:
                if code in codes:
                    raise ours(
                        template.format(what=what, action=action, code=code, message=message)
                    ) from None
            raise StorageError(f"AWS failed {action} ({code})") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise MissingCredentialsError(_no_credentials()) from None
        except ParamValidationError:
            raise InvalidInputError(f"AWS refused {action}: a parameter is invalid") from None
        except (ReadTimeoutError, ConnectTimeoutError):
            raise self._no_answer(action) from None
        except BotoCoreError as exc:
            raise StorageError(
                f"cannot reach AWS Secrets Manager for {action} ({type(exc).__name__})"
            ) from None

    def _no_answer(self, action: str) -> StorageError:
        """The error for a call AWS did not answer within the client's timeout, on every attempt.
        A change may have been made. For the next timeout's length later calls fail at once with
        the same cause (the audit record of this failure), so a command waits for it once."""
        config = self._client.meta.config
        timeout = float(config.read_timeout)
        attempts = (config.retries or {}).get("total_max_attempts") or 1
        tries = f", {attempts} attempts" if attempts > 1 else ""
        cause = (
            f"AWS Secrets Manager at {self._client.meta.endpoint_url} did not answer within "
            f"{timeout:g} s{tries}"
        )
        self._unanswered = (time.monotonic() + timeout, cause)
        operation = getattr(self._calls, "operation", None)
        if operation is not None and operation not in _READ_OPERATIONS:
            return OutcomeUnknownError(
                f"{cause} to {action} ({operation}): it may or may not have been done; check before "
                "trying again"
            )
        return NoAnswerError(f"{cause} ({action}); check the endpoint and the network")


class _LostRace(Exception):
    """Another writer created the secret or took the version number first: read again, retry."""


def _promoted_not_discarded(name: str, number: int) -> ConflictError:
    """A discard that found its pending version made current by a promote (before its read, or
    between its read and its removal of AWSPENDING)."""
    return ConflictError(
        f"version {number} of {name!r} is current: a promote made it so while it was pending, so "
        f"nothing was discarded (if it is still labelled 'pending', 'rotate {name} --resume "
        "--promote-only' removes that label)"
    )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _version_id(number: int) -> str:
    """The VersionId (ClientRequestToken, 32 to 64 characters) of our version `number`."""
    return f"{VERSION_ID_PREFIX}{number:010d}"


def _our_number(version_id: str) -> int | None:
    match = _OUR_VERSION_ID.fullmatch(version_id)
    return int(match.group(1)) if match else None


def _labels(stages: Iterable[str]) -> tuple[str, ...]:
    present = {LABEL_OF_STAGE[s] for s in stages if s in LABEL_OF_STAGE}
    return tuple(label for label in LABELS if label in present)


_STAGE_ORDER = {"AWSPREVIOUS": 1, "AWSCURRENT": 2, "AWSPENDING": 3}


def _numbered(raw: Iterable[Mapping[str, Any]]) -> list[_AwsVersion]:
    """Our version numbers for AWS's versions, oldest first.

    Ours carry their number in their id. Another tool's version (a UUID) is numbered one above the
    version before it in creation order (ties, as in a second-resolution clock, are broken by the
    staging label: previous before current before pending). Within one such tie, ours keep the
    order of their numbers whatever their labels (a version staged and then replaced has none
    left). If a version of ours claims a number not above the one before it (another tool wrote in
    between), it moves up."""

    def order(item: Mapping[str, Any]) -> tuple[datetime, int, int, str]:
        stages = item.get("VersionStages") or []
        rank = max((_STAGE_ORDER.get(s, 0) for s in stages), default=0)
        ours = _our_number(str(item["VersionId"]))
        return (utc(item["CreatedDate"]), rank, ours or 0, str(item["VersionId"]))

    items = sorted(raw, key=order)
    # Put ours back in number order within each tie, in the places ours hold there.
    for created in {utc(item["CreatedDate"]) for item in items}:
        places = [
            i
            for i, item in enumerate(items)
            if utc(item["CreatedDate"]) == created and _our_number(str(item["VersionId"])) is not None
        ]
        ours_in_order = sorted(
            (items[i] for i in places), key=lambda item: _our_number(str(item["VersionId"])) or 0
        )
        for place, item in zip(places, ours_in_order, strict=True):
            items[place] = item
    numbered = []
    last = 0
    for item in items:
        ours = _our_number(str(item["VersionId"]))
        number = ours if ours is not None and ours > last else last + 1
        last = number
        numbered.append(
            _AwsVersion(
                number=number,
                version_id=str(item["VersionId"]),
                labels=_labels(item.get("VersionStages") or []),
                created=utc(item["CreatedDate"]),
            )
        )
    return numbered


def _visible(versions: list[_AwsVersion], max_versions: int) -> list[_AwsVersion]:
    """The newest `max_versions` versions, and any older one that still carries a label."""
    newest = {v.number for v in versions[-max_versions:]}
    return [v for v in versions if v.number in newest or v.labels]


def _payload(value: bytes) -> dict[str, Any]:
    try:
        return {"SecretString": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"SecretBinary": value}


def _refuse_unless_tags_fit(
    name: str,
    existing: Mapping[str, Any] | None,
    tags: Mapping[str, str] | None,
    max_versions: int | None,
    *,
    expiry: bool = False,
) -> None:
    """UnsupportedOperationError if AWS's 50 tags per secret cannot hold these tags (None: the
    secret's own) beside ours (`secrets-manager:created-by`, set when we create a secret, and
    `secrets-manager:max-versions` once one is set, `secrets-manager:expires` once an expiry is
    (`expiry`: one is being set)): AWS would refuse them only after the new version is written."""
    keys = {str(t["Key"]) for t in (existing or {}).get("Tags") or []}
    adds_max = max_versions is not None and MAX_VERSIONS_KEY not in keys
    adds_expiry = expiry and EXPIRES_KEY not in keys
    if tags is None:
        if not adds_max and not adds_expiry:
            return  # no tag is added
        tags = user_tags({key: "" for key in keys})
    ours = 1 if existing is None else sum(1 for key in keys if key.startswith(RESERVED_KEY_PREFIX))
    ours += int(adds_max) + int(adds_expiry)
    if len(tags) + ours > MAX_AWS_TAGS:
        raise UnsupportedOperationError(
            f"{name!r} would have {len(tags)} tags; AWS Secrets Manager holds {MAX_AWS_TAGS} per secret "
            f"and secrets-manager keeps {ours} of its own there, so more than {MAX_AWS_TAGS - ours} is "
            "not supported by this store"
        )


def _aws_tag_character(char: str) -> bool:
    return char in _TAG_SYMBOLS or unicodedata.category(char)[0] in "LNZ"


def _refuse_tags_aws_refuses(name: str, tags: Mapping[str, str] | None) -> None:
    """InvalidInputError, before anything is written, for a tag whose key or value has a character
    AWS does not allow in tags: moto takes them, and AWS's ValidationException would come, for
    `put`, after the new version is written. Names the tag's key (escaped by repr), never its value."""
    for key, value in (tags or {}).items():
        if not all(map(_aws_tag_character, key)):
            raise InvalidInputError(
                f"tag key {key!r} of {name!r} has a character AWS does not allow in tags; "
                f"use {_TAG_CHARACTERS}"
            )
        if not all(map(_aws_tag_character, value)):
            raise InvalidInputError(
                f"the value of tag {key!r} of {name!r} has a character AWS does not allow in tags; "
                f"use {_TAG_CHARACTERS}"
            )


def _tag_value(text: str) -> str:
    """`text` within AWS's tag value character set and length (others become '_')."""
    return "".join(c if _aws_tag_character(c) else "_" for c in text)[:256]


def _tag_of(entry: Mapping[str, Any], key: str) -> str | None:
    """The value of tag `key` on a DescribeSecret or ListSecrets entry (None without it)."""
    return next((str(t.get("Value", "")) for t in entry.get("Tags") or [] if t.get("Key") == key), None)


def _state_of(entry: Mapping[str, Any]) -> SecretState:
    """A secret's SecretState from its ListSecrets entry or its DescribeSecret answer (the same
    fields, but for the name of the map of versions to stages)."""
    stages = entry.get("SecretVersionsToStages") or entry.get("VersionIdsToStages") or {}
    tags = sorted((str(t.get("Key")), str(t.get("Value"))) for t in entry.get("Tags") or [])
    return SecretState(
        versions={str(vid): _our_number(str(vid)) or 0 for vid in stages},
        labels={
            LABEL_OF_STAGE[stage]: str(vid)
            for vid, names in stages.items()
            for stage in names or ()
            if stage in LABEL_OF_STAGE
        },
        deleted=bool(entry.get("DeletedDate")),
        stamp=repr((str(entry.get("LastChangedDate")), str(entry.get("Description") or ""), tags)),
    )


def _current_number(entry: Mapping[str, Any]) -> int | None:
    """Our number of the version AWSCURRENT is on in a DescribeSecret (VersionIdsToStages) or
    ListSecrets (SecretVersionsToStages) entry; None if it is another tool's or not said."""
    stages = entry.get("VersionIdsToStages") or entry.get("SecretVersionsToStages") or {}
    for version_id, names in stages.items():
        if STAGE_OF_LABEL[CURRENT] in (names or ()):
            return _our_number(str(version_id))
    return None


def _own_expiry(entry: Mapping[str, Any]) -> tuple[int, datetime] | None:
    """The (version, time) expiry our tag on a DescribeSecret entry holds (None without one)."""
    return parse_expiry(_tag_of(entry, EXPIRES_KEY))


def _own_target(entry: Mapping[str, Any], version: int) -> str | None:
    """The rotation target our tag on a DescribeSecret entry records for `version` (None if it
    names another version, or there is none)."""
    pair = parse_target(_tag_of(entry, TARGET_KEY))
    return pair[1] if pair is not None and pair[0] == version else None


def _refuse_unless_target_fits(name: str, existing: Mapping[str, Any]) -> None:
    """UnsupportedOperationError, before a stage writes anything, if the secret's tags leave no
    room for our rotation target tag."""
    keys = {str(t["Key"]) for t in existing.get("Tags") or []}
    if TARGET_KEY not in keys and len(keys) >= MAX_AWS_TAGS:
        raise UnsupportedOperationError(
            f"{name!r} has {len(keys)} tags, AWS Secrets Manager's limit, so a rotation's target "
            f"({TARGET_KEY}) cannot be recorded beside them; nothing was staged: remove one of its tags "
            f"('metadata {name} --remove-tag KEY') and rotate again"
        )


def _own_max_versions(entry: Mapping[str, Any]) -> int | None:
    """The max_versions our tag on a DescribeSecret or ListSecrets entry holds; None without one
    (or one another tool spoilt)."""
    for tag in entry.get("Tags") or []:
        if tag.get("Key") == MAX_VERSIONS_KEY:
            text = str(tag.get("Value", ""))
            if text.isascii() and text.isdigit() and int(text) > 0:
                return int(text)
    return None
