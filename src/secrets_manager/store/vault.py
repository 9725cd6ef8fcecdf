"""`VaultStore`: secrets kept natively in HashiCorp Vault's KV version 2 engine, through `hvac`.

The mapping (docs/stores.md has it in full):

    secret NAME              MOUNT/data/NAME; its metadata at MOUNT/metadata/NAME
    a UTF-8 text value       data {"value": "<text>"}         (what `vault kv put MOUNT/NAME value=…` writes)
    any other value          data {"value_base64": "<base64>"}
    data written otherwise   read as the canonical JSON of the data object (several keys, numbers, …);
                             a JSON object written over it is written as its keys
    version N                KV version N; every write is check-and-set (`cas`) on the version it read
    current / previous       KV's current_version / the version before it; `pending` is not supported
    description, tags        custom_metadata `secrets-manager:description`, other keys are tags
    expiry                   custom_metadata `secrets-manager:expires`: `N@YYYY-MM-DDTHH:MM:SSZ`, the
                             expiry of version N (none for any other version)
    max_versions             KV's own max_versions (0, the mount's default, reads as 10); Vault prunes
                             past it at the next write
    delete / undelete        KV soft delete / undelete of every live version
    destroy / destroy_secret KV destroy of versions / delete of the metadata and every version

A version is soft-deleted once its deletion_time has passed: a time in the future is the expiry a
`delete_version_after` (the secret's or the mount's) gave it, and Vault serves the version until then.
A secret is *deleted* when every version that is not destroyed is soft-deleted. `get` without a
version returns KV's latest version, as `vault kv get` does: if another tool soft-deleted only that
version, `get` says so (NotFoundError) rather than serve an older value.

The engine is checked before the first request to the mount, as `vault kv` does: GET
sys/internal/ui/mounts/MOUNT, whose `options.version` must be "2" (any token with a capability on
the mount may read it). A KV version 1 mount is refused before anything is read or written. If that
endpoint is refused, the first data write is preceded by a probe that writes nothing on KV v2 (a
`cas` no version can match) and only a harmless marker, removed at once, on KV v1: never a value.

Transport: one `requests.Session` whose urllib3 `Retry` repeats what Vault refused without doing it
(429 rate limit, 503 sealed or standby) for every method, and other 5xx answers for reads only (a
write might have been applied); a 500 saying no active node could be found (a failover) is
repeated for any method for up to FAILOVER_WAIT_SECONDS (`_through_failover`). A request waits
READ_TIMEOUT_SECONDS (VAULT_CLIENT_TIMEOUT) for its answer and is not sent again after a timeout:
a write then has an unknown outcome
(OutcomeUnknownError), and requests in the following timeout's length fail at once
(NoAnswerError), so a command waits for a Vault that does not answer once. Errors map to our
exceptions through `_ERRORS`; each method's docstring names the endpoints it calls.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
import secrets
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NoReturn, Self

import hvac
import requests
import urllib3.exceptions
from hvac import exceptions as vault_errors
from requests.adapters import HTTPAdapter
from urllib3 import BaseHTTPResponse
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError, ReadTimeoutError
from urllib3.util.retry import Retry

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
    UnlockError,
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
    checked_value,
    destroyed_current_message,
    expiry_of,
    format_expiry,
    parse_expiry,
    refuse_expiry_without_current,
    refuse_if_unchanged,
    refuse_unless_current,
    refuse_unless_deleted_before,
    refuse_unless_still_current,
    unchecked_delete_error,
    unknown_label,
    unread_delete_error,
    updated_metadata,
    utc_text,
)
from secrets_manager.store.external import (
    AUDIT_KEY_NAME,
    AUDIT_KEY_SIZE,
    CREATED_BY_KEY,
    DEFAULT_AUDIT_SCOPE,
    DESCRIPTION_KEY,
    EXPIRES_KEY,
    RESERVED_KEY_PREFIX,
    ROTATE_AUDIT_KEY_ATTEMPTS,
    NoAnswerError,
    RecheckedAuditKeys,
    after_the_version,
    audit_anchor_name,
    checked_write,
    user_tags,
    vault_namespace_sendable,
    with_fingerprint,
)
from secrets_manager.store.names import namespace_of, validate_name, validate_namespace, validate_prefix
from secrets_manager.store.polled import SecretState
from secrets_manager.values import SecretValue

TOKEN_VARIABLE = "VAULT_TOKEN"  # noqa: S105 (a variable name)
ROLE_ID_VARIABLE = "VAULT_ROLE_ID"
SECRET_ID_VARIABLE = "VAULT_SECRET_ID"  # noqa: S105 (a variable name)
APPROLE_MOUNT_VARIABLE = "VAULT_APPROLE_MOUNT"
CACERT_VARIABLE = "VAULT_CACERT"
CAPATH_VARIABLE = "VAULT_CAPATH"  # the Vault CLI's directory of CA files: not read here (docs/stores.md)
SKIP_VERIFY_VARIABLE = "VAULT_SKIP_VERIFY"  # the Vault CLI's: never honoured, certificates are verified
NAMESPACE_VARIABLE = "VAULT_NAMESPACE"
TIMEOUT_VARIABLE = "VAULT_CLIENT_TIMEOUT"  # the Vault CLI's: seconds to wait for an answer
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 10.0  # per request; a request that times out is not sent again
TEXT_FIELD = "value"
BINARY_FIELD = "value_base64"
RETRY_DEADLINE_SECONDS = 30.0
# Watch's polled feed (store/polled.py) reads a snapshot at most this often by default. KV v2 lists
# keys only, so a snapshot is a LIST per folder and a metadata read per secret: 102 requests for 100
# secrets in one namespace (the mount's root, the folder, 100 GETs), 204 a minute per replica at
# 30 s while anyone watches. Vault bills nothing per request, but its active node serves them beside
# every other client's: 10 s would be 612 a minute, for a change made outside the service only (a
# change through the service is read at once whatever the interval).
WATCH_POLL_SECONDS = 30.0
# A token with a TTL (Vault's default for every token but root's) is renewed by a long-lived handle
# (serve, run, inject --watch), as `vault token renew` does: looked up once the handle is this old
# (a command that ends sooner costs no request), then renewed each time half its TTL has passed.
TOKEN_CHECK_AFTER_SECONDS = 60.0
TOKEN_RETRY_SECONDS = 10.0  # after a lookup or renewal that failed (Vault down, sealed)
# An AppRole login whose repeated request was refused again proved the refusal the policy's: the
# 403s that follow are not logged in again for this long, doubled each time it happens again up to
# RELOGIN_HOLD_MAX_SECONDS. Each login is a token (a lease) in Vault, and one without `default`
# cannot revoke itself: a client refused in a loop would otherwise make tokens without bound.
RELOGIN_HOLD_SECONDS = 60.0
RELOGIN_HOLD_MAX_SECONDS = 900.0
DELETE_ROUNDS = 5  # deletes of versions other writers keep adding meanwhile, before giving up
_REFUSED_STATUSES = frozenset({429, 503})  # Vault did not act on the request: safe to repeat any method
_TRANSIENT_STATUSES = frozenset({500, 502, 504})  # may have acted: repeat reads only
_READ_METHODS = frozenset({"GET", "HEAD", "LIST", "OPTIONS"})
# A standby that cannot find the active node (a leader election, the active node restarting: seconds)
# answers 500 with this error, having done nothing: any method is repeated, for this long at most.
_NO_ACTIVE_NODE = "active cluster node not found"
FAILOVER_WAIT_SECONDS = 10.0
# Clients whose token connect_vault got from an AppRole login, with how to log in again: that token
# is ours to revoke at close and to replace when Vault stops honouring it; a token the user gave is not.
_OWN_LOGINS: weakref.WeakKeyDictionary[hvac.Client, Callable[[], None]] = weakref.WeakKeyDictionary()
# Clients whose token connect_vault read from ~/.vault-token, with that file: Vault Agent (auto-auth
# with a file sink) and `vault login` replace it, so once Vault refuses the token it is read again.
_TOKEN_FILES: weakref.WeakKeyDictionary[hvac.Client, Path] = weakref.WeakKeyDictionary()
# What to do when a client's Vault presents a certificate it does not trust (from its environment).
_TLS_ADVICE: weakref.WeakKeyDictionary[hvac.Client, str] = weakref.WeakKeyDictionary()
_PROBE_NAME = ".secrets-manager/kv-version-probe"
_PROBE_CAS = 2**62  # no secret reaches this version: KV v2 refuses the write, writing nothing
_VAULT_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


# What KV v2 accepts in custom_metadata (vault-plugin-secrets-kv `validateCustomMetadata`): at most
# 64 keys; keys of 1 to 128 bytes, values of 1 to 512 bytes, both printable. Vault checks it only
# after our version is written, so `put` checks first.
CUSTOM_METADATA_KEYS = 64
CUSTOM_METADATA_KEY_BYTES = 128
CUSTOM_METADATA_VALUE_BYTES = 512
_OUR_CUSTOM_KEYS = 3  # secrets-manager:created-by, secrets-manager:description, secrets-manager:expires


def _refuse_unless_custom_metadata_holds(
    name: str, description: str | None, tags: Mapping[str, str] | None
) -> None:
    """UnsupportedOperationError if KV's custom_metadata cannot hold this description or these tags
    (already within `checked_metadata`'s limits), naming the limit and never the text."""

    def refuse(what: str, limit: str) -> NoReturn:
        raise UnsupportedOperationError(
            f"{what} of {name!r} does not fit Vault's custom_metadata ({limit}): it is not supported "
            "by this store"
        )

    if description:
        if len(description.encode("utf-8")) > CUSTOM_METADATA_VALUE_BYTES:
            refuse("the description", f"at most {CUSTOM_METADATA_VALUE_BYTES} bytes of UTF-8 per entry")
        if not description.isprintable():
            refuse("the description", "printable characters only")
    for key, value in (tags or {}).items():
        if len(key.encode("utf-8")) > CUSTOM_METADATA_KEY_BYTES or not key.isprintable():
            refuse("a tag key", f"keys are 1 to {CUSTOM_METADATA_KEY_BYTES} bytes of printable UTF-8")
        if not value or len(value.encode("utf-8")) > CUSTOM_METADATA_VALUE_BYTES or not value.isprintable():
            refuse(
                f"the value of tag {key!r}",
                f"values are 1 to {CUSTOM_METADATA_VALUE_BYTES} bytes of printable UTF-8, never empty",
            )
    if len(tags or {}) + _OUR_CUSTOM_KEYS > CUSTOM_METADATA_KEYS:
        refuse("the tags", f"at most {CUSTOM_METADATA_KEYS - _OUR_CUSTOM_KEYS} tags beside ours")


class VaultRetry(Retry):
    """urllib3's Retry, but a status retry of a write only when Vault refused it without acting,
    and no retry after a timeout: a Vault that accepts connections but does not answer (stopped,
    overloaded) would make every attempt wait the whole timeout again. A refused or reset
    connection is still retried (Vault restarting)."""

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if status_code in _REFUSED_STATUSES:
            return True
        return method.upper() in _READ_METHODS and status_code in _TRANSIENT_STATUSES

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        if isinstance(error, ReadTimeoutError):
            raise error  # requests reports it as ReadTimeout
        if isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError):
            raise MaxRetryError(_pool, url or "", error)  # type: ignore[arg-type]  # requests: ConnectTimeout
        return super().increment(method, url, response, error, _pool, _stacktrace)


def retrying_session(
    *, verify: bool | str = True, attempts: int = 4, backoff: float = 0.2
) -> requests.Session:
    """A requests session that retries connection failures and transient answers with backoff."""
    retry = VaultRetry(
        total=attempts,
        connect=attempts,
        read=attempts,
        status=attempts,
        backoff_factor=backoff,
        allowed_methods=_READ_METHODS,
        raise_on_status=False,  # the last answer goes back to hvac, which maps its status
        respect_retry_after_header=False,  # keep a command's wait bounded (a few seconds)
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = verify  # set here: hvac takes a session's verify over its own argument
    return session


def connect_vault(
    address: str,
    *,
    environ: Mapping[str, str],
    namespace: str | None = None,
    session: requests.Session | None = None,
) -> hvac.Client:
    """An authenticated hvac client for `address` (https://host:8200 or, for dev servers, http://…).

    The token, first match wins: VAULT_TOKEN; an AppRole login with VAULT_ROLE_ID and
    VAULT_SECRET_ID (at auth/VAULT_APPROLE_MOUNT, default `approle`); the Vault CLI's
    ~/.vault-token. MissingCredentialsError when there is none (UnlockError: a refused AppRole
    login). VAULT_CACERT names a CA bundle for TLS and VAULT_NAMESPACE a Vault Enterprise namespace."""
    if not namespace:
        namespace = environ.get(NAMESPACE_VARIABLE) or None
        if namespace is not None and not vault_namespace_sendable(namespace):  # as the URL's (store/url.py)
            raise InvalidInputError(
                f"{NAMESPACE_VARIABLE} is not a Vault namespace path: set it to one in printable "
                "ASCII without spaces around it, e.g. team-a/prod (or unset it)"
            )
    verify: bool | str = _ca_bundle(environ) or True
    read_timeout = _timeout(environ)
    client = hvac.Client(
        url=address,
        token="",  # never hvac's own look-up in os.environ: `environ` is the one source
        verify=verify,
        timeout=(min(CONNECT_TIMEOUT_SECONDS, read_timeout), read_timeout),
        session=session or retrying_session(verify=verify),
        namespace=namespace,
    )
    _TLS_ADVICE[client] = _tls_advice(environ)
    token = environ.get(TOKEN_VARIABLE)
    if token:
        # Sent as the X-Vault-Token header, which cannot carry a line end, spaces around it or
        # what is not Latin-1: requests' InvalidHeader quotes the header, http.client's
        # UnicodeEncodeError carries it (`.object`). Refused here without repeating it.
        if not (token.isascii() and token.isprintable() and token == token.strip()):
            client.adapter.close()
            raise InvalidInputError(
                f"{TOKEN_VARIABLE} is not a Vault token: it holds a line end, spaces around it or "
                "characters no token has; set it to the token alone"
            )
        client.token = token
        return client
    role_id, secret_id = environ.get(ROLE_ID_VARIABLE), environ.get(SECRET_ID_VARIABLE)
    if role_id and secret_id:
        mount = environ.get(APPROLE_MOUNT_VARIABLE) or "approle"

        def login() -> None:
            try:
                client.auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=mount)
            except (vault_errors.InvalidRequest, vault_errors.Forbidden, vault_errors.Unauthorized):
                raise UnlockError(
                    f"Vault refused the AppRole login at auth/{mount}; "
                    f"check {ROLE_ID_VARIABLE} and {SECRET_ID_VARIABLE}"
                ) from None
            except vault_errors.VaultError as exc:
                _raise_mapped(exc, "the AppRole login")
            except requests.exceptions.Timeout:
                raise NoAnswerError(
                    f"Vault at {address} did not answer the AppRole login within {read_timeout:g} s; "
                    f"check that it is running and reachable ({TIMEOUT_VARIABLE} sets the wait)"
                ) from None
            except requests.exceptions.RequestException as exc:
                if (refused := _certificate_refused(client, "the AppRole login", exc)) is not None:
                    raise refused from None
                raise StorageError(f"cannot reach Vault at {address} ({type(exc).__name__})") from None

        login()
        _OWN_LOGINS[client] = login
        return client
    home = environ.get("HOME")
    token_file = Path(home) / ".vault-token" if home else None
    if token_file is not None and token_file.is_file():
        token = token_file.read_text(encoding="utf-8").strip()
        if token:
            client.token = token
            _TOKEN_FILES[client] = token_file
            return client
    client.adapter.close()
    raise MissingCredentialsError(
        f"no Vault token: set {TOKEN_VARIABLE}, or {ROLE_ID_VARIABLE} and {SECRET_ID_VARIABLE} for an "
        "AppRole login, or run 'vault login'"
    )


def _ca_bundle(environ: Mapping[str, str]) -> str | None:
    """VAULT_CACERT, checked: a file that cannot be read, or holds no PEM certificate, is bad input
    (requests would fail every request with an OSError, or refuse Vault's certificate)."""
    path = environ.get(CACERT_VARIABLE)
    if not path:
        return None
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(
            f"{CACERT_VARIABLE} names {path!r}, which cannot be read ({exc.strerror or type(exc).__name__}); "
            "set it to the PEM file of the CA that signed Vault's certificate"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise InvalidInputError(
            f"{CACERT_VARIABLE} names {path!r}, which holds no PEM certificate; "
            "set it to the PEM file of the CA that signed Vault's certificate"
        )
    return path


def _tls_advice(environ: Mapping[str, str]) -> str:
    """What to do about a Vault certificate we do not trust, given the TLS variables set."""
    cacert = environ.get(CACERT_VARIABLE)
    if cacert:
        advice = (
            f"{CACERT_VARIABLE} ({cacert}) does not hold the CA that signed it; set it to the one that does"
        )
    else:
        advice = f"set {CACERT_VARIABLE} to the PEM file of the CA that signed it"
        if environ.get(CAPATH_VARIABLE):
            advice += (
                f" ({CAPATH_VARIABLE} is not read: put the CA certificates of that directory in one file)"
            )
    if (environ.get(SKIP_VERIFY_VARIABLE) or "").strip().lower() not in ("", "0", "false", "f"):
        advice += f"; {SKIP_VERIFY_VARIABLE} is not honoured: Vault's certificate is always verified"
    return advice


def _certificate_refused(client: hvac.Client, action: str, exc: BaseException) -> StorageError | None:
    """The one-line error for a request that failed because Vault's certificate is not trusted
    (unknown CA, wrong host name, expired), saying what to do; None for any other failure."""
    for error in _errors_within(exc, contexts=True):
        if isinstance(error, ssl.SSLCertVerificationError):
            reason = error.verify_message or error.reason or "verification failed"
            advice = (
                _TLS_ADVICE.get(client) or f"set {CACERT_VARIABLE} to the PEM file of the CA that signed it"
            )
            return StorageError(
                f"Vault at {client.url} presented a certificate that is not trusted ({reason}), so "
                f"nothing was sent to {action}: {advice}"
            )
    return None


def _errors_within(exc: BaseException, *, contexts: bool = False) -> Iterator[BaseException]:
    """`exc` and the errors it wraps, as requests and urllib3 nest them (first argument, `reason`,
    `__cause__`; and `__context__` with `contexts`), each once."""
    pending: list[Any] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending += [*error.args[:1], getattr(error, "reason", None), error.__cause__]
        if contexts:
            pending.append(error.__context__)


def _timeout(environ: Mapping[str, str]) -> float:
    """Seconds to wait for Vault's answer to one request: VAULT_CLIENT_TIMEOUT (as the Vault CLI
    reads it: seconds, or a Go duration such as 30s or 1m), else READ_TIMEOUT_SECONDS."""
    raw = (environ.get(TIMEOUT_VARIABLE) or "").strip()
    if not raw:
        return READ_TIMEOUT_SECONDS
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", raw)
    seconds = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)] if match else 0
    if not 0 < seconds <= 3600:
        raise InvalidInputError(f"{TIMEOUT_VARIABLE}={raw!r} is not a timeout; give seconds, e.g. 10 or 10s")
    return seconds


class _NotThere(Exception):
    """Vault answered 404; `body` is its JSON (a soft-deleted version's carries its metadata)."""

    def __init__(self, body: Any) -> None:
        super().__init__("not found")
        self.body = body


class _CasMismatch(Exception):
    """Vault refused a write because its `cas` was not the current version."""


class _NoPatch(Exception):
    """Vault answered a PATCH with 405: a Vault from before PATCH of KV v2 metadata."""


MERGE_PATCH = "application/merge-patch+json"  # the Content-Type Vault requires of a PATCH


# hvac raises one exception class per HTTP status; this table is the whole mapping to ours.
_ERRORS: tuple[tuple[type[vault_errors.VaultError], type[SecretsManagerError], str], ...] = (
    (vault_errors.Forbidden, AccessDeniedError,
     "Vault denied {action}: permission denied (check the token and its policy)"),
    (vault_errors.Unauthorized, AccessDeniedError, "Vault refused the token for {action}; log in again"),
    (vault_errors.InvalidRequest, InvalidInputError, "Vault refused {action} as invalid: {errors}"),
    (vault_errors.RateLimitExceeded, StorageError,
     "Vault kept rate-limiting {action} (429); try again later"),
    (vault_errors.VaultDown, StorageError,
     "Vault is sealed or unavailable (503) for {action}; try again once it is unsealed"),
    (vault_errors.VaultNotInitialized, StorageError,
     "Vault is not initialised (501); run 'vault operator init'"),
    (vault_errors.VaultError, StorageError, "Vault failed {action}: {errors}"),
)  # fmt: skip


@dataclass(frozen=True)
class _KvVersion:
    number: int
    created: datetime
    deleted: datetime | None  # its deletion_time, once passed: Vault no longer serves it
    expires: datetime | None  # its deletion_time while still ahead (delete_version_after)
    destroyed: bool


@dataclass(frozen=True)
class _KvMeta:
    """A secret's KV v2 metadata document, parsed."""

    created: datetime
    updated: datetime
    current: int  # KV's current_version: the latest version, whatever its state (0: none)
    custom: dict[str, str]
    versions: dict[int, _KvVersion]
    # KV's own max_versions if the secret sets one; None: 0, the mount's default, whatever that is
    own_max_versions: int | None = None

    @property
    def max_versions(self) -> int:
        """The secret's own max_versions, else (the mount's default) read as DEFAULT_MAX_VERSIONS."""
        return self.own_max_versions or DEFAULT_MAX_VERSIONS

    @property
    def deleted(self) -> datetime | None:
        """When the secret was deleted: every version that is not destroyed is soft-deleted."""
        live = [v for v in self.versions.values() if not v.destroyed]
        stamps = [v.deleted for v in live if v.deleted is not None]
        return max(stamps) if live and len(stamps) == len(live) else None

    @property
    def labels(self) -> dict[str, int]:
        labels = {}
        if self.current in self.versions:
            labels[CURRENT] = self.current
        if self.current - 1 in self.versions:
            labels[PREVIOUS] = self.current - 1
        return labels

    def labels_of(self, number: int) -> tuple[str, ...]:
        labels = self.labels
        return tuple(label for label in LABELS if labels.get(label) == number)

    def public(self, name: str) -> SecretMetadata:
        return SecretMetadata(
            name=name,
            namespace=namespace_of(name),
            created=self.created,
            updated=self.updated,
            created_by=self.custom.get(CREATED_BY_KEY, ""),
            description=self.custom.get(DESCRIPTION_KEY, ""),
            tags=user_tags(self.custom),
            current_version=self.current if self.current in self.versions else None,
            versions=tuple(
                VersionInfo(
                    version=v.number,
                    created=v.created,
                    created_by="",  # KV v2 does not record who wrote a version (Vault's audit device does)
                    labels=self.labels_of(v.number),
                    destroyed=v.destroyed,
                )
                for v in sorted(self.versions.values(), key=lambda v: v.number)
            ),
            deleted=self.deleted,
            max_versions=self.max_versions,
            labels=self.labels,
            expires=self.expiry_of(self.current if self.current in self.versions else None),
        )

    def expiry_of(self, number: int | None) -> datetime | None:
        return expiry_of(parse_expiry(self.custom.get(EXPIRES_KEY)), number)

    @classmethod
    def parse(cls, body: Any) -> _KvMeta:
        now = datetime.now(UTC)
        try:
            data = body["data"]
            versions = {}
            for key, info in (data.get("versions") or {}).items():
                number = int(key)
                deletion = _vault_time(info["deletion_time"]) if info.get("deletion_time") else None
                versions[number] = _KvVersion(
                    number=number,
                    created=_vault_time(info["created_time"]),
                    deleted=deletion if deletion is not None and deletion <= now else None,
                    expires=deletion if deletion is not None and deletion > now else None,
                    destroyed=bool(info.get("destroyed")),
                )
            custom = data.get("custom_metadata") or {}
            return cls(
                created=_vault_time(data["created_time"]),
                updated=_vault_time(data["updated_time"]),
                current=int(data.get("current_version") or 0),
                custom={str(k): str(v) for k, v in custom.items()},
                versions=versions,
                own_max_versions=int(data.get("max_versions") or 0) or None,
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StorageError(
                "Vault sent secret metadata in a shape we do not know (is it KV v2?)"
            ) from None


def _custom_of(version_metadata: Mapping[str, Any]) -> dict[str, str]:
    """The custom_metadata a data read returned with a version ({} if none or not a map)."""
    custom = version_metadata.get("custom_metadata")
    return {str(k): str(v) for k, v in custom.items()} if isinstance(custom, Mapping) else {}


def _live_versions(meta: _KvMeta) -> list[int]:
    """The versions of `meta` neither destroyed nor soft-deleted."""
    return sorted(v.number for v in meta.versions.values() if not v.destroyed and v.deleted is None)


class VaultStore:
    """A `SecretStore` on a KV v2 mount. Values stay readable by `vault kv get`, and ours by it."""

    unsupported_capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.PENDING_LABEL, Capability.METADATA_AT_LIMITS}
    )
    watch_poll_seconds: ClassVar[float] = WATCH_POLL_SECONDS

    def __init__(
        self,
        client: hvac.Client,
        mount: str,
        *,
        actor: str = "unknown",
        audit_scope: str = DEFAULT_AUDIT_SCOPE,
        max_versions: int = DEFAULT_MAX_VERSIONS,
    ) -> None:
        self._client = client
        self._mount = mount.strip("/")
        self._actor = actor
        self._anchor_name = audit_anchor_name(audit_scope)
        self._anchor_version: int | None = None
        self._max_versions = max_versions
        self._audit_keys = RecheckedAuditKeys(lambda: self._read_audit_keys()[0])
        self._engine: str | None = None  # "kv2" once known; "unknown" if the mounts endpoint refused
        # After a request Vault did not answer: until when later requests fail at once, and why.
        self._unanswered: tuple[float, str] | None = None
        # False once Vault answered a metadata PATCH with 405 (a Vault without it): every later
        # metadata write of this handle goes straight to the read-and-POST. A 403 (the policy lacks
        # `patch`, or a token that just failed to renew) is not remembered: a serve would otherwise
        # keep the POST's lost-update window for its life after one refusal.
        self._metadata_patch = True
        # The token's lease (`_keep_token_alive`): when to look at it next (None: never again, a
        # token without a TTL or one that cannot be renewed further), whether it is renewable (None:
        # not looked up yet) and when it lapses (monotonic, once known).
        self._token_lock = threading.Lock()
        self._token_check_at: float | None = time.monotonic() + TOKEN_CHECK_AFTER_SECONDS
        self._token_renewable: bool | None = None
        self._token_lapses_at: float | None = None
        # One login at a time (a serve's threads all refused with one lapsed token log in once),
        # and until when a 403 is not logged in again (RELOGIN_HOLD_SECONDS) and for how long next.
        self._login_lock = threading.Lock()
        self._relogin_hold_until = 0.0
        self._relogin_hold = 0.0

    def __repr__(self) -> str:
        return f"VaultStore({self._client.url!r}, mount={self._mount!r})"

    def close(self) -> None:
        """Revoke the token if we logged in ourselves (AppRole): left alone it would stay valid,
        with its lease, for its whole TTL (768h by default). Never a token the user gave us. A
        revoke that fails changes nothing for the caller: the token then lapses at its TTL."""
        if _OWN_LOGINS.pop(self._client, None) is not None and self._unanswered is None:
            with suppress(vault_errors.VaultError, requests.exceptions.RequestException):
                self._client.auth.token.revoke_self()
        self._client.adapter.close()

    def _login_again(self, refused_token: str | None) -> bool:
        """Log in again with the AppRole (a long `serve` outlives its token's TTL), or take the
        token now in ~/.vault-token if that is where ours came from (Vault Agent's file sink and
        `vault login` replace it): True if there is a new token to repeat the request with
        (`refused_token` is the one the refused request carried: another thread may have replaced
        it already, and then that thread's is the new one)."""
        login = _OWN_LOGINS.get(self._client)
        token_file = _TOKEN_FILES.get(self._client)
        if login is None and token_file is None:
            return False
        with self._login_lock:
            if self._client.token != refused_token:
                return True  # replaced meanwhile by another thread: repeat with that one
            # A 403 may be a policy's, with the token still valid: then it stands, and no other
            # thread's token is swapped under it.
            if self._token_still_valid():
                return False
            if login is not None and time.monotonic() < self._relogin_hold_until:
                return False  # a login did not help lately: the refusal is the policy's
            return self._replace_token(login, token_file)

    def _token_still_valid(self) -> bool:
        """Whether Vault still honours our token: it may look itself up (Vault's `default` policy
        lets every token), or, for a token without `default`, read the details of our mount
        (GET sys/internal/ui/mounts/MOUNT: an authenticated endpoint answered to any token with a
        capability on the mount, api-docs/system/internal-ui-mounts; a lapsed token is 403 there).
        False when neither tells (then a login decides, bounded by the hold in `_send`)."""
        try:
            self._client.auth.token.lookup_self()
            return True
        except (vault_errors.VaultError, requests.exceptions.RequestException):
            pass
        if self._engine == "unknown":
            return False  # the mounts endpoint is refused to this token even when valid
        try:
            self._client.adapter.get(f"/v1/sys/internal/ui/mounts/{self._mount}")
            return True
        except (vault_errors.VaultError, requests.exceptions.RequestException):
            return False

    def _relogin_refused_again(self) -> None:
        """A request repeated after an AppRole login was refused again: the new token is valid, so
        the refusal is the policy's. Later 403s are not logged in again until the hold is over,
        the hold doubling each time this happens again (one token a minute, then fewer, for a
        client refused in a loop, instead of one per request)."""
        with self._login_lock:
            self._relogin_hold = min(
                RELOGIN_HOLD_MAX_SECONDS, max(RELOGIN_HOLD_SECONDS, 2 * self._relogin_hold)
            )
            self._relogin_hold_until = time.monotonic() + self._relogin_hold

    def _replace_token(self, login: Callable[[], None] | None, token_file: Path | None) -> bool:
        """The new token of `_login_again`: the file's, or an AppRole login's."""
        if login is None:
            assert token_file is not None
            try:
                token = token_file.read_text(encoding="utf-8").strip()
            except OSError:
                return False
            if not token or token == self._client.token or not (token.isascii() and token.isprintable()):
                return False  # not replaced (yet): the refusal stands
            self._client.token = token  # never revoked: the file's owner manages it
        else:
            with suppress(vault_errors.VaultError, requests.exceptions.RequestException):
                self._client.auth.token.revoke_self()  # a token refused its own lookup: not left behind
            try:
                login()
            except SecretsManagerError:
                return False
        with self._token_lock:  # a new token: its lease is looked at afresh
            self._token_check_at = time.monotonic() + TOKEN_CHECK_AFTER_SECONDS
            self._token_renewable = self._token_lapses_at = None
        return True

    def _keep_token_alive(self) -> None:
        """Renew a renewable token before its TTL runs out (POST auth/token/renew-self once half of
        it has passed; GET auth/token/lookup-self first, once the handle is TOKEN_CHECK_AFTER_SECONDS
        old). Vault revokes a token at its TTL, so a `serve` given a periodic or other renewable
        token would otherwise be denied everything once its TTL (or period) had passed. The default
        policy grants both paths to every token. A failure here fails nothing: it is tried again."""
        check_at = self._token_check_at
        if check_at is None or time.monotonic() < check_at:
            return
        if not self._token_lock.acquire(blocking=False):
            return  # another thread is at it; this request goes on with the token as it is
        try:
            self._token_check_at = self._look_after_token()
        finally:
            self._token_lock.release()

    def _look_after_token(self) -> float | None:
        """One step of `_keep_token_alive`: when the next is due (None: never)."""
        now = time.monotonic()
        try:
            if self._token_renewable is None:
                data = self._client.auth.token.lookup_self()["data"]
                ttl, self._token_renewable = int(data.get("ttl") or 0), bool(data.get("renewable"))
            elif self._token_renewable:
                answer = self._client.auth.token.renew_self()
                ttl = int(((answer or {}).get("auth") or {}).get("lease_duration") or 0)
                if self._token_lapses_at is not None and now + ttl <= self._token_lapses_at + 1:
                    self._token_renewable = False  # not extended: it reached its max TTL
            else:  # pragma: no cover (no step is due for a token that cannot be renewed)
                return None
        except vault_errors.Forbidden:
            if self._token_renewable is None:
                # A lookup refused: a token without Vault's `default` policy (it may not look
                # itself up, nor renew itself), or one lapsed. Not asked again for this token: a
                # refused lookup every TOKEN_RETRY_SECONDS would fill Vault's audit log for the
                # handle's life. A new token (`_replace_token`) is looked at afresh.
                return None
            return now + TOKEN_RETRY_SECONDS
        except (
            vault_errors.VaultError,
            requests.exceptions.RequestException,
            KeyError,
            TypeError,
            ValueError,
        ):
            return now + TOKEN_RETRY_SECONDS
        if ttl <= 0:
            return None  # no TTL (a root token): it never lapses
        self._token_lapses_at = now + ttl
        return now + ttl / 2 if self._token_renewable else None

    def _token_lapsed(self) -> AccessDeniedError | None:
        """The error for a 403 after the token's known TTL ran out (it could not be renewed)."""
        lapses_at = self._token_lapses_at
        if lapses_at is None or time.monotonic() < lapses_at:
            return None
        why = "it cannot be renewed further" if self._token_renewable is False else "its renewals failed"
        return AccessDeniedError(
            f"Vault's token has expired (its TTL ran out and {why}): give a new "
            f"one ({TOKEN_VARIABLE}) and restart, or use an AppRole ({ROLE_ID_VARIABLE} and "
            f"{SECRET_ID_VARIABLE}), with which a long-running command logs in again"
        )

    def acting_for(self, actor: str) -> AbstractContextManager[None]:
        """Secrets created in this block, in this thread, record `actor` as their creator (KV v2
        records no writer per version; the secret's `created-by` metadata is what the CLI sets)."""
        return acting_for(actor)

    def probe(self) -> None:
        """One cheap read that proves Vault answers and accepts our token: GET the metadata of this
        log's audit anchor (absent is fine). The service's health check; nothing is kept."""
        self._read_meta(self._anchor_name, action="check that Vault answers")

    # ---- reads -----------------------------------------------------------------------------

    def get_with_fingerprint(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> tuple[Secret, str]:
        """`get`, and the value's audit fingerprint (the service audits every read with it)."""
        return with_fingerprint(self.get(name, version=version, label=label), self.audit_keys())

    def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        """GET MOUNT/data/NAME (the latest version), or MOUNT/metadata/NAME then
        MOUNT/data/NAME?version=N for a version number or the `previous` label."""
        validate_name(name)
        if version is not None and label is not None:
            raise InvalidInputError("give a version or a label, not both")
        if label is not None and label not in LABELS:
            raise unknown_label(label)
        if label == PENDING:
            raise UnsupportedOperationError(
                "the 'pending' label is not supported by this store: Vault KV v2 has no labels, "
                "only its latest version (current) and the ones before it"
            )
        if version is None and label in (None, CURRENT):
            try:
                body = self._read_data(name, None)
            except _VersionDeletedError as error:
                raise self._deleted_current_error(name, error) from None
            number = int(body["metadata"]["version"])
            return self._secret(name, number, body, (CURRENT,))
        meta = self._read_meta(name)
        if meta is None:
            raise NotFoundError(f"secret {name!r} not found")
        if meta.deleted is not None:
            raise NotFoundError(f"secret {name!r} is deleted; 'undelete {name}' restores it")
        if label is not None:
            if label not in meta.labels:
                raise NotFoundError(f"secret {name!r} has no version labelled {label!r}")
            number = meta.labels[label]
        else:
            assert version is not None
            number = version
        if number not in meta.versions:
            raise NotFoundError(f"secret {name!r} has no version {number}")
        body = self._read_data(name, number)
        return self._secret(name, number, body, meta.labels_of(number))

    def _deleted_current_error(self, name: str, error: NotFoundError) -> NotFoundError:
        """The refusal of a get whose latest version is soft-deleted (`error`): worded as every
        store words it when the whole secret is deleted (`delete`), else (another tool deleted only
        the latest, `vault kv delete`) the version's own. A metadata read the policy refuses
        (`get` needs only `read` on data) or that fails leaves the version's own words."""
        try:
            meta = self._read_meta(name)
        except SecretsManagerError:
            return error
        if meta is not None and meta.deleted is not None:
            return NotFoundError(f"secret {name!r} is deleted; 'undelete {name}' restores it")
        return error

    def describe(self, name: str) -> SecretMetadata:
        """GET MOUNT/metadata/NAME."""
        validate_name(name)
        meta = self._read_meta(name)
        if meta is None:
            raise NotFoundError(f"secret {name!r} not found")
        return meta.public(name)

    def list(self, prefix: str = "", *, include_deleted: bool = False) -> builtins.list[SecretMetadata]:
        """LIST MOUNT/metadata/FOLDER/ (recursively below the prefix), then GET each secret's
        metadata. Entries whose names are not valid secret names (ours under .secrets-manager/,
        or another tool's) are left out."""
        validate_prefix(prefix)
        result = []
        for name, meta in self._metadata_under(prefix):
            if include_deleted or meta.deleted is None:
                result.append(meta.public(name))
        return result

    def list_names(self, prefix: str = "") -> builtins.list[str]:
        """`NameLister.list_names`: LIST MOUNT/metadata/FOLDER/ (recursively below the prefix)
        alone, one request per folder, where `list` also GETs each secret's metadata."""
        validate_prefix(prefix)
        folder, _, start = prefix.rpartition("/")
        names = []
        for name in sorted(self._walk(f"{folder}/" if folder else "", start)):
            try:
                validate_name(name)
            except InvalidInputError:
                continue
            names.append(name)
        return names

    def version_snapshot(self) -> dict[str, SecretState]:
        """Every secret's versions, labels, deletion and metadata: LIST MOUNT/metadata/ (one request
        per folder) and GET each secret's metadata (one request per secret), as `list` does. For
        the service's polled change feed (store/polled.py)."""
        snapshot = {}
        for name, meta in self._metadata_under(""):
            states = sorted((v.number, v.destroyed, v.deleted is not None) for v in meta.versions.values())
            snapshot[name] = SecretState(
                versions={str(number): number for number in meta.versions},
                labels={label: str(number) for label, number in meta.labels.items()},
                deleted=meta.deleted is not None,
                stamp=repr(
                    (meta.updated.isoformat(), sorted(meta.custom.items()), states, meta.own_max_versions)
                ),
            )
        return snapshot

    def _metadata_under(self, prefix: str) -> Iterator[tuple[str, _KvMeta]]:
        """Each secret under `prefix` (valid names only) and its metadata, in name order."""
        folder, _, start = prefix.rpartition("/")
        for name in sorted(self._walk(f"{folder}/" if folder else "", start)):
            try:
                validate_name(name)
            except InvalidInputError:
                continue
            meta = self._read_meta(name)
            if meta is not None:
                yield name, meta

    def _walk(self, folder: str, start: str) -> Iterator[str]:
        try:
            body = self._send("LIST", f"metadata/{folder}", action=f"list {folder or '/'}")
        except _NotThere:
            return
        keys = (body or {}).get("data", {}).get("keys") or []
        for key in keys:
            if not isinstance(key, str) or not key.startswith(start):
                continue
            if key.endswith("/"):
                try:
                    validate_namespace(key[:-1])  # skip folders no valid name can be in (.secrets-manager/)
                except InvalidInputError:
                    continue
                yield from self._walk(folder + key, "")
            else:
                yield folder + key

    def _secret(self, name: str, number: int, body: Mapping[str, Any], labels: tuple[str, ...]) -> Secret:
        return Secret(
            name=name,
            version=number,
            value=SecretValue(_decode_data(body["data"])),
            created=_vault_time(body["metadata"]["created_time"]),
            labels=labels,
            # KV v2 (1.9 on) returns the secret's custom_metadata with each version it serves
            expires=expiry_of(parse_expiry(_custom_of(body["metadata"]).get(EXPIRES_KEY)), number),
        )

    def _read_data(self, name: str, version: int | None, *, action: str | None = None) -> dict[str, Any]:
        """GET MOUNT/data/NAME[?version=N]: the `data` and `metadata` of one readable version."""
        params = {} if version is None else {"version": version}
        try:
            body = self._send("GET", f"data/{name}", action=action or f"read {name}", params=params)
        except _NotThere as missing:
            _raise_unreadable(name, version, missing.body)
        data = (body or {}).get("data") or {}
        if not isinstance(data.get("data"), dict) or not isinstance(data.get("metadata"), dict):
            _raise_unreadable(name, version, body)
        return dict(data)

    def _read_meta(self, name: str, *, action: str | None = None) -> _KvMeta | None:
        try:
            body = self._send("GET", f"metadata/{name}", action=action or f"describe {name}")
        except _NotThere:
            return None
        return _KvMeta.parse(body)

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
        """GET MOUNT/metadata/NAME, POST MOUNT/data/NAME with `cas` = the version read, then POST
        MOUNT/metadata/NAME when the secret is new or its description, tags, max_versions or
        expiry change (a PATCH where Vault takes one, `_patch_metadata`: of a new secret, all of
        its keys, since Vault made its metadata with the version; of an existing one without
        `tags`, just the description and expiry keys). The expiry names the version
        written, so it goes after the data write too: if that write fails, the new version has
        none (`metadata NAME --expires` sets it then).

        max_versions goes after the data write: that endpoint has no compare-and-set, so sent
        before, a write refused (lost cas race, Vault error) would still have changed the limit and
        the next write, anyone's, would prune under it. So this write prunes under the old limit,
        the next one under the new.

        A secret whose current version is data of several keys (another tool's) keeps that shape:
        a JSON object written over it is written as its keys (one more GET MOUNT/data/NAME), so
        `vault kv get -field=password` still reads it after a `store NAME#password`."""
        checked_write(name, expect_version, description, tags)
        checked_max_versions(name, max_versions)
        _refuse_unless_custom_metadata_holds(name, description, tags)
        expires = checked_expiry(name, expires)
        data = _encode_data(checked_value(value))
        as_keys = _keys_of(value)
        backoff = Backoff(first=0.01, cap=0.5, deadline_seconds=RETRY_DEADLINE_SECONDS, what=repr(name))
        while True:
            meta = self._read_meta(name)
            if meta is not None and meta.deleted is not None:
                raise SecretStateError(
                    f"secret {name!r} is deleted; run 'undelete {name}' first, or 'destroy {name} --all'"
                )
            current = 0 if meta is None else meta.current
            if expect_version is not None and current != expect_version:
                raise ConflictError(
                    f"secret {name!r} is at version {current}, not {expect_version}; read it again and retry"
                )
            if as_keys is not None and current:
                written_as = as_keys if self._holds_keys(name, current) else data
            else:
                written_as = data
            try:
                written = self._write_data(name, written_as, cas=current, action=f"store {name}")
                break
            except _CasMismatch:
                if expect_version is not None:
                    raise ConflictError(
                        f"secret {name!r} changed since version {expect_version}; read it again and retry"
                    ) from None
                backoff.wait()
        number = int(written["version"])
        expiry = None if expires is None else format_expiry(number, expires)
        # An existing secret's description or expiry alone: a merge patch of just those keys, so a
        # tag another writer changes meanwhile stays (`tags` replace them all: the whole POST).
        changes: dict[str, str | None] = {} if description is None else {DESCRIPTION_KEY: description or None}
        if expiry:
            changes[EXPIRES_KEY] = expiry
        patchable = meta is not None and tags is None and bool(changes)
        try:
            if meta is None:
                # A new secret: Vault made its metadata with the version, so any key there now is
                # another writer's since (its own version's expiry, a description): a merge patch of
                # ours keeps it, where the whole POST would drop it.
                changes = {k: v for k, v in changes.items() if v is not None}
                changes[CREATED_BY_KEY] = acting_actor(self._actor)
                changes.update(tags or {})
                first_max = self._max_versions if max_versions is None else max_versions
                if not self._patch_metadata(name, changes, first_max):
                    self._write_metadata(name, meta, description, tags, max_versions, expiry=expiry)
            elif patchable and self._patch_metadata(name, changes, max_versions):
                pass  # done: the keys given, and max_versions
            elif (
                meta is None
                or description is not None
                or tags is not None
                or max_versions is not None
                or expiry
            ):
                self._write_metadata(name, meta, description, tags, max_versions, expiry=expiry)
        except SecretsManagerError as exc:
            # The version stands: a caller told only "denied" (a policy without `patch` or `update`
            # on MOUNT/metadata/) would store the value again, as a new version.
            raise after_the_version(exc, name, number) from None
        return VersionInfo(
            version=int(written["version"]),
            created=_vault_time(written["created_time"]),
            created_by="",
            labels=(CURRENT,),
        )

    def _holds_keys(self, name: str, version: int) -> bool:
        """Whether version `version` of `name` is data of several keys (another tool's: `vault kv
        put NAME username=… password=…`), not our one "value" or "value_base64" key. A version that
        cannot be read (soft-deleted, destroyed) holds none."""
        try:
            data: dict[str, Any] = self._read_data(name, version, action=f"store {name}")["data"]
        except NotFoundError:
            return False
        return _keys_of(_decode_data(data)) == data

    def _write_data(self, name: str, data: Mapping[str, Any], *, cas: int, action: str) -> dict[str, Any]:
        """POST MOUNT/data/NAME {"options": {"cas": N}, "data": …}: the new version's metadata."""
        self._check_engine()
        if self._engine == "unknown":
            self._probe_engine()
        body = self._send("POST", f"data/{name}", action=action, json={"options": {"cas": cas}, "data": data})
        try:
            written = dict((body or {})["data"])
            int(written["version"])
        except (KeyError, TypeError, ValueError):
            raise StorageError(f"Vault's answer to {action} has no version (is the mount KV v2?)") from None
        return written

    def _write_metadata(
        self,
        name: str,
        meta: _KvMeta | None,
        description: str | None,
        tags: Mapping[str, str] | None,
        max_versions: int | None,
        *,
        expiry: str | None = None,
        clear_expiry: bool = False,
    ) -> None:
        """POST MOUNT/metadata/NAME with custom_metadata if the description, tags or expiry change
        (or the secret is new), and max_versions if given (the store's default for a new secret).
        Vault keeps the fields a POST leaves out.

        KV's metadata endpoint has no compare-and-set: two writers changing the description or tags
        of one secret at the same moment can lose one change (the versions themselves cannot).
        `update_metadata` sends a merge patch instead where Vault takes one (`_patch_metadata`)."""
        body: dict[str, Any] = {}
        if meta is None or description is not None or tags is not None or expiry or clear_expiry:
            custom = self._custom_metadata(meta, description, tags)
            if expiry:
                custom[EXPIRES_KEY] = expiry
            elif clear_expiry:
                custom.pop(EXPIRES_KEY, None)
            body["custom_metadata"] = custom
        if max_versions is not None or meta is None:
            body["max_versions"] = self._max_versions if max_versions is None else max_versions
        self._send("POST", f"metadata/{name}", action=f"store metadata of {name}", json=body)

    def _custom_metadata(
        self, meta: _KvMeta | None, description: str | None, tags: Mapping[str, str] | None
    ) -> dict[str, str]:
        """The custom_metadata of a secret (`meta`, None if new) with this description and tags."""
        custom = {} if meta is None else dict(meta.custom)
        if meta is None:
            custom[CREATED_BY_KEY] = acting_actor(self._actor)
        if description is not None:
            custom[DESCRIPTION_KEY] = description
            if not description:
                del custom[DESCRIPTION_KEY]
        if tags is not None:
            custom = {k: v for k, v in custom.items() if k.startswith(RESERVED_KEY_PREFIX)}
            custom.update(tags)
        return custom

    def check_metadata_fits(
        self,
        name: str,
        *,
        description: str | None,
        tags: Mapping[str, str] | None,
        max_versions: int | None,
    ) -> None:
        """What `put` would refuse before writing because custom_metadata cannot hold it
        (`store.base.check_metadata_fits`); Vault takes every max_versions we allow."""
        _refuse_unless_custom_metadata_holds(name, description, tags)

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
        """GET MOUNT/metadata/NAME, then PATCH it (a JSON merge patch, `_patch_metadata`) with only
        the custom_metadata keys that change (the description, each tag set or removed, the
        expiry) and max_versions (if given), so a concurrent change of other keys is kept; no version
        is written, and Vault prunes past a lower max_versions only at the next write. A Vault
        without PATCH (405) or a token without the `patch` capability (403) gets today's POST of
        the whole custom_metadata instead, without compare-and-set, as `_write_metadata` says (a
        change of max_versions alone is that POST, and sends nothing else, so loses none)."""
        validate_name(name)
        expires, expiry_given = checked_expiry_change(name, expires, clear_expiry)
        setting, removing = checked_metadata_update(
            name, description, set_tags, remove_tags, max_versions, expiry_change=expiry_given
        )
        meta = self._require_meta(name)
        if meta.deleted is not None:
            raise SecretStateError(f"secret {name!r} is deleted; run 'undelete {name}' first")
        refuse_unless_still_current(name, expect_current, meta.current)  # on this read: no CAS
        current = meta.current if meta.current in meta.versions else None
        expiry: str | None = None
        if expiry_given:
            refuse_expiry_without_current(name, current)
            assert current is not None
            expiry = None if expires is None else format_expiry(current, expires)
        old_expiry = meta.custom.get(EXPIRES_KEY)
        # A clear is of the current version's: another version's (a rollback carries it) stays.
        clears_nothing = expires is None and expiry_of(parse_expiry(old_expiry), current) is None
        expiry_changes = expiry_given and expiry != old_expiry and not clears_nothing
        before = (meta.custom.get(DESCRIPTION_KEY, ""), user_tags(meta.custom), meta.own_max_versions)
        # Only what changes, key by key: a tag set or removed, the description, the expiry.
        changes: dict[str, str | None] = dict(setting) | dict.fromkeys(removing)
        if description is not None:
            changes[DESCRIPTION_KEY] = description or None
        if expiry_changes:
            changes[EXPIRES_KEY] = expiry
        if description is None and not setting and not removing:
            refuse_if_unchanged(name, before, before[:2], max_versions, expiry_changes=expiry_changes)
            if changes and self._patch_metadata(name, changes, max_versions):
                return
            self._write_metadata(
                name,
                meta,
                None,
                None,
                max_versions,
                expiry=expiry,
                clear_expiry=expiry_changes and not expiry,
            )
            return
        new_description, tags = updated_metadata(
            name,
            before[0],
            before[1],
            new_description=description,
            set_tags=setting,
            remove_tags=removing,
        )
        refuse_if_unchanged(
            name, before, (new_description, tags), max_versions, expiry_changes=expiry_changes
        )
        _refuse_unless_custom_metadata_holds(name, new_description, tags)
        if self._patch_metadata(name, changes, max_versions):
            return
        self._write_metadata(
            name,
            meta,
            new_description,
            tags,
            max_versions,
            expiry=expiry,
            clear_expiry=expiry_changes and not expiry,
        )

    def _patch_metadata(self, name: str, changes: Mapping[str, str | None], max_versions: int | None) -> bool:
        """PATCH MOUNT/metadata/NAME {"custom_metadata": changes[, "max_versions": N]}: a JSON merge
        patch (RFC 7396), so Vault sets each key given (a key with None removed) and keeps every
        other key as it is then, including one another writer set after our read. False if this
        Vault has no PATCH of metadata (405) or the token may not (403: its policy lacks `patch`):
        the caller then writes the whole metadata as before. A 405 is remembered for the handle's
        life (no PATCH is sent again: one request saved per change); a 403 is not (a token that failed
        to renew, a policy granting `patch` later), so it costs one refused PATCH per change."""
        if not self._metadata_patch:
            return False
        body: dict[str, Any] = {"custom_metadata": dict(changes)}
        if max_versions is not None:
            body["max_versions"] = max_versions
        try:
            self._send("PATCH", f"metadata/{name}", action=f"change metadata of {name}", json=body)
        except _NoPatch:
            self._metadata_patch = False
            return False
        except AccessDeniedError:
            return False
        except _NotThere:  # destroyed since our read
            raise NotFoundError(f"secret {name!r} not found") from None
        return True

    def delete(
        self, name: str, *, expect_version: int | None = None, expect_no_pending: bool = False
    ) -> None:
        """POST MOUNT/delete/NAME {"versions": every live version} (after reading the metadata),
        then read the metadata again: a version another writer added between the read and the
        delete (KV v2 has no check-and-set for deletes) is deleted too, so an acknowledged delete
        never leaves the secret readable, as if that write had come first.

        With `expect_version` that version must be current on the metadata read, and a version
        added before the POST is not deleted but refused: `_delete_if_still_current`.
        `expect_no_pending` holds always: KV v2 has no labels, so no version is ever pending here."""
        validate_name(name)
        checked_expect_version(expect_version)
        meta = self._require_meta(name)
        if meta.deleted is not None:
            raise NotFoundError(f"secret {name!r} is already deleted")
        live = _live_versions(meta)
        if not live:
            raise SecretStateError(f"secret {name!r} has no version left to delete (all are destroyed)")
        if expect_version is not None:
            self._delete_if_still_current(name, meta, live, expect_version)
            return
        for _ in range(DELETE_ROUNDS):
            self._send("POST", f"delete/{name}", action=f"delete {name}", json={"versions": live})
            try:
                live = _live_versions(self._require_meta(name))
            except NotFoundError:  # erased meanwhile (destroy --all): said as such
                raise
            except SecretsManagerError as error:  # the delete is done: not said as one that failed
                raise unread_delete_error(name, error) from None
            if not live:
                return
        raise ConflictError(
            f"secret {name!r} kept getting new versions while it was being deleted; try again"
        )

    def _delete_if_still_current(
        self, name: str, meta: _KvMeta, live: builtins.list[int], expect_version: int
    ) -> None:
        """KV v2 has no conditional delete (`cas` is for data writes only), but its delete names
        the versions it deletes: POST MOUNT/delete/NAME {"versions": the live ones read, up to
        `expect_version`}, then GET the metadata again. A version written between that read and
        the POST is not among them, so it stays readable; the POST is then undone (POST
        MOUNT/undelete/NAME of the same versions) and refused: nothing is left deleted. Until the
        undo, the older versions (`previous`) read as deleted: the window docs/stores.md names."""
        refuse_unless_current(name, expect_version, meta.labels.get(CURRENT))
        self._send("POST", f"delete/{name}", action=f"delete {name}", json={"versions": live})
        try:
            current = self._require_meta(name).labels.get(CURRENT)
        except NotFoundError:  # erased meanwhile (destroy --all): said as such
            raise
        except SecretsManagerError as error:  # the delete is done: not said as one that failed
            raise unchecked_delete_error(name, error) from None
        if current == expect_version:
            return
        try:
            self._send("POST", f"undelete/{name}", action=f"undelete {name}", json={"versions": live})
        except SecretsManagerError as error:
            versions = ", ".join(map(str, live))
            raise restated(
                error,
                f"secret {name!r} got a new version while it was being deleted, which stays, but its "
                f"versions {versions} stayed soft-deleted: {error}; 'undelete {name}' restores them",
            ) from None
        refuse_unless_current(name, expect_version, current)

    def undelete(self, name: str) -> None:
        """POST MOUNT/undelete/NAME {"versions": every soft-deleted version}. A version whose expiry
        (delete_version_after) is still ahead is not deleted, so not sent: its expiry stays."""
        validate_name(name)
        meta = self._require_meta(name)
        deleted = sorted(v.number for v in meta.versions.values() if not v.destroyed and v.deleted)
        if not deleted:
            raise SecretStateError(f"secret {name!r} is not deleted")
        self._send("POST", f"undelete/{name}", action=f"undelete {name}", json={"versions": deleted})

    def destroy(self, name: str, versions: Iterable[int]) -> None:
        """POST MOUNT/destroy/NAME {"versions": […]} (Vault ignores unknown versions; we refuse them).

        KV v2 keeps no deleted flag: a secret is deleted while every version not destroyed is
        soft-deleted, so destroying the last such versions of a deleted secret would make it read
        as live (listed, written to, refused an undelete). That is refused (SecretStateError),
        nothing destroyed: `destroy_secret` erases it, or `undelete` first."""
        validate_name(name)
        wanted = sorted(set(versions))
        if not wanted:
            raise InvalidInputError("name the versions to destroy (--version N), or use --all")
        meta = self._require_meta(name)
        missing = [v for v in wanted if v not in meta.versions]
        if missing:
            raise NotFoundError(f"secret {name!r} has no version {missing[0]}")
        undestroyed = {v.number for v in meta.versions.values() if not v.destroyed}
        if meta.deleted is not None and undestroyed <= set(wanted):
            raise SecretStateError(
                f"secret {name!r} is deleted, and destroying its last versions would make Vault show it "
                f"as live again (KV v2 keeps a deletion in its versions alone); nothing was destroyed: "
                f"'destroy {name} --all' erases it, or 'undelete {name}' first"
            )
        self._send("POST", f"destroy/{name}", action=f"destroy {name}", json={"versions": wanted})

    def destroy_secret(self, name: str, *, deleted_before: datetime | None = None) -> None:
        """DELETE MOUNT/metadata/NAME: every version and the metadata, for good. KV v2 has no
        check-and-set on that DELETE, so `deleted_before` is checked on the metadata read just
        before it: an undelete landing between the two is lost (a window of one round trip)."""
        validate_name(name)
        meta = self._require_meta(name)
        if deleted_before is not None:
            refuse_unless_deleted_before(name, meta.deleted, deleted_before)
        self._send("DELETE", f"metadata/{name}", action=f"destroy {name}")

    # ---- rotation: refused (KV v2 has no labels, so no `pending`) ------------------------------

    def stage(
        self, name: str, value: bytes, *, expect_current: int | None = None, target: str | None = None
    ) -> VersionInfo:
        raise _no_pending("stage")

    def promote(self, name: str, version: int) -> int | None:
        raise _no_pending("promote")

    def discard_pending(self, name: str) -> int:
        raise _no_pending("discard_pending")

    def _require_meta(self, name: str) -> _KvMeta:
        meta = self._read_meta(name)
        if meta is None:
            raise NotFoundError(f"secret {name!r} not found")
        return meta

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
        """Every audit key of the store, oldest first: MOUNT/data/.secrets-manager/audit-key holds
        them one after the other in base64 (32 bytes each; a store made before 0.5.0 holds one),
        created (cas=0) on first use; `audit rotate-key` appends one. Read once per handle and
        again every AUDIT_KEYS_RECHECK_SECONDS (another process's rotation reaches no log of this
        one: its writer learns of it here); `reload`: read again now."""
        return self._audit_keys.get(reload=reload)

    def _read_audit_keys(self) -> tuple[tuple[bytes, ...], int]:
        """The stored audit keys and the KV version holding them, made first if there are none."""
        for _attempt in range(3):
            try:
                body = self._read_data(AUDIT_KEY_NAME, None, action="read the audit key")
            except NotFoundError:
                fresh = {BINARY_FIELD: base64.b64encode(secrets.token_bytes(AUDIT_KEY_SIZE)).decode()}
                with suppress(_CasMismatch):  # another process created it first: use theirs
                    self._write_data(AUDIT_KEY_NAME, fresh, cas=0, action="create the audit key")
                continue
            try:
                keys = audit_keys_of(_decode_data(body["data"]))
                version = int(body["metadata"]["version"])
            except (KeyError, TypeError, ValueError):
                raise IntegrityError(f"the audit key in Vault ({AUDIT_KEY_NAME}) is damaged") from None
            self._refresh_if_expiring(AUDIT_KEY_NAME, body, what="the audit key")
            return keys, version
        raise StorageError(
            f"the audit key in Vault ({self._mount}/{AUDIT_KEY_NAME}) cannot be read: if it was "
            "deleted, 'vault kv undelete' restores it"
        )

    def rotate_audit_key(self) -> int:
        """Append a new random audit key to the stored ones (`audit rotate-key`), written with
        cas = the version read, so two rotations at once both land, one after the other; return
        its generation. The older keys stay to verify what they signed."""
        for _attempt in range(ROTATE_AUDIT_KEY_ATTEMPTS):
            keys, version = self._read_audit_keys()
            rotated = b"".join(keys) + secrets.token_bytes(AUDIT_KEY_SIZE)
            data = {BINARY_FIELD: base64.b64encode(rotated).decode()}
            try:
                self._write_data(AUDIT_KEY_NAME, data, cas=version, action="rotate the audit key")
            except _CasMismatch:  # another rotation landed first: append to it
                continue
            self.audit_keys(reload=True)  # this handle's writer moves on to the new key now
            # The generation written, not len() of that reload: a rotation landing in between
            # would make both report the later one (and their audit records name it twice).
            return len(keys) + 1
        raise ConflictError("the audit key changed under every attempt to rotate it; try again")

    def _refresh_if_expiring(self, name: str, body: Mapping[str, Any], *, what: str) -> None:
        """Write the same data again (cas = the version read) when a delete_version_after has given
        the version an expiry and half of its lifetime has gone: our bookkeeping must outlive the
        mount's retention policy, and a secret's own delete_version_after cannot lengthen the
        mount's (Vault takes the smaller), nor can undelete clear it (it applies it anew). Best
        effort: the version is still readable now, and the next use tries again."""
        metadata = body.get("metadata") or {}
        with suppress(KeyError, TypeError, ValueError, StorageError):
            if not metadata.get("deletion_time"):
                return
            created = _vault_time(metadata["created_time"])
            expires = _vault_time(metadata["deletion_time"])
            if datetime.now(UTC) < created + (expires - created) / 2:
                return
            with suppress(_CasMismatch, SecretsManagerError):  # someone else refreshed it, or may not
                self._write_data(name, body["data"], cas=int(metadata["version"]), action=f"refresh {what}")

    def audit_anchor(self) -> Anchor | None:
        """The anchor of this audit log, GET MOUNT/data/.secrets-manager/audit-anchor/SCOPE."""
        meta = self._read_meta(self._anchor_name, action="read the audit anchor")
        if meta is None:
            self._anchor_version = 0
            return None
        self._anchor_version = meta.current
        try:
            body = self._read_data(self._anchor_name, None, action="read the audit anchor")
        except NotFoundError:
            version = meta.versions.get(meta.current)
            if version is not None and version.deleted is not None and not version.destroyed:
                raise IntegrityError(
                    f"the audit anchor in Vault was deleted (version {meta.current}, at "
                    f"{utc_text(version.deleted)}); if the mount's delete_version_after expired "
                    "it (no command ran for that long), 'vault kv undelete -mount="
                    f"{self._mount} -versions={meta.current} {self._anchor_name}' restores it"
                ) from None
            raise IntegrityError("the audit anchor in Vault was deleted or destroyed") from None
        try:
            data = body["data"]
            return Anchor(seq=int(data["seq"]), hash=str(data["hash"]))
        except (KeyError, TypeError, ValueError, OverflowError):  # int() of Infinity or 1e400
            raise IntegrityError("the audit anchor in Vault is damaged") from None

    def set_audit_anchor(
        self, anchor: Anchor, *, lock_wait: float | None = None, reset: bool = False
    ) -> None:
        """POST MOUNT/data/.secrets-manager/audit-anchor/SCOPE with cas = the version last read
        (one log has one writer at a time: its file lock); max_versions 1 on creation.
        `lock_wait` is ignored: Vault has no store-wide writer lock to wait on (a check-and-set
        does not wait), and the request's own timeout bounds the call."""
        if self._anchor_version is None:
            self.audit_anchor()
        assert self._anchor_version is not None
        data = {"seq": anchor.seq, "hash": anchor.hash}
        try:
            written = self._write_data(
                self._anchor_name, data, cas=self._anchor_version, action="anchor the audit log"
            )
        except _CasMismatch:
            self._anchor_version = None
            raise ConflictError(
                "the audit anchor in Vault was changed by another writer; try again"
            ) from None
        self._anchor_version = int(written["version"])
        if self._anchor_version == 1:
            self._send(
                "POST",
                f"metadata/{self._anchor_name}",
                action="configure the audit anchor",
                json={"max_versions": 1},
            )

    # ---- which engine is at the mount ------------------------------------------------------------

    def _refuse_kv1(self) -> NoReturn:
        raise InvalidInputError(
            f"{self._mount} is a KV version 1 mount; secrets-manager needs KV version 2 "
            f"(vault kv enable-versioning {self._mount})"
        )

    def _check_engine(self) -> None:
        """GET sys/internal/ui/mounts/MOUNT (what `vault kv` asks first): refuse anything but KV v2.
        A refusal (403: a policy without it, or no such mount) leaves the engine "unknown"."""
        if self._engine is not None:
            return
        self._raise_if_unanswered()
        try:
            response = self._client.adapter.get(f"/v1/sys/internal/ui/mounts/{self._mount}")
        except (vault_errors.Forbidden, vault_errors.InvalidPath, vault_errors.InvalidRequest):
            self._engine = "unknown"
            return
        except vault_errors.VaultError as exc:
            _raise_mapped(exc, f"check the secrets engine at {self._mount!r}")
        except requests.exceptions.Timeout:
            raise self._no_answer("GET", f"check the secrets engine at {self._mount!r}", sent=True) from None
        except requests.exceptions.RequestException as exc:
            action = f"check the secrets engine at {self._mount!r}"
            if (refused := _certificate_refused(self._client, action, exc)) is not None:
                raise refused from None
            raise StorageError(
                f"cannot reach Vault at {self._client.url} ({type(exc).__name__}); "
                "check the address and that Vault is running"
            ) from None
        data = (response or {}).get("data") if isinstance(response, dict) else None
        if not isinstance(data, dict):
            self._engine = "unknown"
            return
        kind = str(data.get("type") or "")
        version = str((data.get("options") or {}).get("version") or "1")
        if kind not in ("kv", "generic"):
            raise InvalidInputError(
                f"{self._mount} is a {kind or 'non-KV'} secrets engine; secrets-manager needs KV version 2 "
                f"(vault secrets enable -path=OTHER kv-v2)"
            )
        if version != "2":
            self._refuse_kv1()
        mount_path = str(data.get("path") or "").strip("/")
        if mount_path and mount_path != self._mount:  # `…/secret/data` or `…/secret/team`: inside a mount
            raise InvalidInputError(
                f"{self._mount!r} is a path inside the KV version 2 mount {mount_path!r}, not a mount; "
                f"give the mount alone (…/{mount_path}): secrets-manager adds data/ and metadata/ itself"
            )
        self._engine = "kv2"

    def _probe_engine(self) -> None:
        """Before the first data write when the mounts endpoint was refused: POST a marker with a
        `cas` no version can match. KV v2 refuses it (nothing written); KV v1 stores it (204, no
        version), so it is deleted again and the mount refused, before any value is sent."""
        marker = {"probe": "secrets-manager checks that this mount is KV version 2"}
        try:
            answer = self._send(
                "POST",
                f"data/{_PROBE_NAME}",
                action=f"check that {self._mount!r} is a KV version 2 mount",
                json={"options": {"cas": _PROBE_CAS}, "data": marker},
            )
        except _CasMismatch:
            self._engine = "kv2"
            return
        if isinstance(answer, dict) and isinstance(answer.get("data"), dict) and "version" in answer["data"]:
            self._engine = "kv2"  # a KV v2 that took the cas (it cannot match; never seen)
            return
        with suppress(SecretsManagerError, _NotThere):
            self._send("DELETE", f"data/{_PROBE_NAME}", action="remove the KV version probe")
        self._refuse_kv1()

    # ---- transport ---------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        action: str,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """One request to /v1/MOUNT/PATH. The JSON body, or None for an empty answer (204). A PATCH
        is sent as a JSON merge patch (`MERGE_PATCH`).

        Raises _NotThere on 404 (callers decide what it means), _CasMismatch on a failed
        check-and-set, _NoPatch on a PATCH answered 405, and our exceptions for everything else
        (`_ERRORS`)."""
        if self._engine is None:
            self._check_engine()
        self._raise_if_unanswered()
        self._keep_token_alive()
        kwargs: dict[str, Any] = {}
        if json is not None:
            kwargs["json"] = json
        if params:
            kwargs["params"] = params
        send = self._client.adapter.request
        if method == "PATCH":
            kwargs["headers"] = {"Content-Type": MERGE_PATCH}
            send = self._patch

        def request(method: str, url: str, **kwargs: Any) -> Any:
            return _through_failover(lambda: send(method, url, **kwargs))

        try:
            token = self._client.token
            try:
                response = request(method, f"/v1/{self._mount}/{path}", **kwargs)
            except vault_errors.Forbidden:
                # An expired or revoked AppRole token of ours, or one ~/.vault-token held and
                # something replaced since: Vault did not act, so once logged in again (or with
                # the file's new token) the request is repeated (once; a policy denies it again).
                if not self._login_again(token):
                    if (lapsed := self._token_lapsed()) is not None:
                        raise lapsed from None
                    raise
                try:
                    response = request(method, f"/v1/{self._mount}/{path}", **kwargs)
                except vault_errors.Forbidden:
                    if _OWN_LOGINS.get(self._client) is not None:
                        self._relogin_refused_again()
                    raise
                self._relogin_hold = 0.0  # the new token helped: a later hold starts short again
        except vault_errors.InvalidPath as exc:
            body = exc.json if isinstance(exc.json, dict) else {}
            if any("no handler for route" in str(e) for e in body.get("errors") or []):
                raise NotFoundError(
                    f"Vault has no KV v2 secrets engine at {self._mount!r}; "
                    f"enable one with 'vault secrets enable -path={self._mount} kv-v2'"
                ) from None
            raise _NotThere(body) from None
        except vault_errors.InvalidRequest as exc:
            if any("check-and-set" in str(e) for e in exc.errors or []):
                raise _CasMismatch() from None
            _raise_mapped(exc, action)
        except vault_errors.VaultError as exc:
            _raise_mapped(exc, action)
        except requests.exceptions.Timeout as exc:
            raise self._no_answer(method, action, sent=not _surely_not_sent(exc)) from None
        except requests.exceptions.RequestException as exc:
            if (refused := _certificate_refused(self._client, action, exc)) is not None:
                raise refused from None
            if method.upper() not in _READ_METHODS and not _surely_not_sent(exc):
                # The request went out (the connection was made) and its answer was lost: Vault
                # may have carried it out. Said so, and not sent again.
                raise OutcomeUnknownError(
                    f"Vault at {self._client.url} did not answer {action} ({type(exc).__name__}): the "
                    "change may have been made; check (history) before writing again"
                ) from None
            raise StorageError(
                f"cannot reach Vault at {self._client.url} for {action} ({type(exc).__name__}); "
                "check the address and that Vault is running"
            ) from None
        return response if isinstance(response, dict) else None

    def _patch(self, method: str, url: str, **kwargs: Any) -> Any:
        """A PATCH through the adapter, as `_send` makes every request, but with its status seen:
        405 (hvac raises one class for every status it does not know) is _NoPatch."""
        response = self._client.adapter.request(method, url, raise_exception=False, **kwargs)
        if isinstance(response, requests.Response) and not response.ok:
            if response.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
                raise _NoPatch()
            self._client.adapter._raise_for_error(method, url, response)
        return response

    def _no_answer(self, method: str, action: str, *, sent: bool) -> StorageError:
        """The error for a request Vault did not answer in time (not sent again: each attempt would
        wait as long). A write may have been applied: its outcome is unknown. For the next
        `timeout` seconds later requests fail at once with the same cause (the audit record of this
        failure, a revoke at close), so a command waits for a Vault that does not answer once."""
        timeout = self._client.adapter._kwargs.get("timeout")
        seconds = float(timeout[1] if isinstance(timeout, tuple) else timeout or READ_TIMEOUT_SECONDS)
        cause = f"Vault at {self._client.url} did not answer within {seconds:g} s"
        self._unanswered = (time.monotonic() + seconds, cause)
        if method.upper() not in _READ_METHODS and sent:  # not if only the connect timed out
            return OutcomeUnknownError(
                f"{cause} to {action}: it may or may not have been done, so it was not sent again; "
                "check before trying again"
            )
        return NoAnswerError(
            f"{cause} ({action}); check that it is running and reachable ({TIMEOUT_VARIABLE} sets the wait)"
        )

    def _raise_if_unanswered(self) -> None:
        if self._unanswered is None:
            return
        until, cause = self._unanswered
        if time.monotonic() >= until:
            self._unanswered = None
            return
        raise NoAnswerError(f"{cause}; check that it is running and reachable")


def _through_failover(send: Callable[[], Any]) -> Any:
    """`send()`, repeated with backoff for up to FAILOVER_WAIT_SECONDS while Vault answers 500
    "local node not active but active cluster node not found": a standby with no active node to
    forward to (during a leader election or while the active node restarts) does nothing with the
    request, so a write is as safe to repeat as a read. Any other 500 is not repeated here."""
    backoff = Backoff(first=0.25, cap=2.0, deadline_seconds=FAILOVER_WAIT_SECONDS, what="Vault")
    while True:
        try:
            return send()
        except vault_errors.InternalServerError as exc:
            if not any(_NO_ACTIVE_NODE in str(e) for e in exc.errors or []) or not backoff.pause():
                raise


def _surely_not_sent(exc: BaseException) -> bool:
    """Whether a failed request surely never reached Vault: no connection could be made (refused,
    unreachable, a name not resolved, the connect timed out, a certificate we refuse) or the URL
    was unusable. Anything else (reset, closed or timed out once sent) may have been carried out."""
    return any(isinstance(error, _NOT_SENT) for error in _errors_within(exc))


_NOT_SENT = (
    requests.exceptions.ConnectTimeout,
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    urllib3.exceptions.ConnectTimeoutError,  # NewConnectionError (refused, no route, no name) too
    ssl.SSLCertVerificationError,
)


def _raise_mapped(exc: vault_errors.VaultError, action: str) -> NoReturn:
    errors = "; ".join(str(e) for e in (exc.errors or []))[:300] or f"HTTP error {type(exc).__name__}"
    for vault_type, ours, message in _ERRORS:
        if isinstance(exc, vault_type):
            raise ours(message.format(action=action, errors=errors)) from None
    raise StorageError(f"Vault failed {action}: {errors}") from None


class _VersionDeletedError(NotFoundError):
    """A read of a soft-deleted version (its 404 names a `deletion_time`)."""


def _raise_unreadable(name: str, version: int | None, body: Any) -> NoReturn:
    """NotFoundError for a 404 on a version: soft-deleted, destroyed, or simply not there."""
    metadata = (body or {}).get("data", {}) if isinstance(body, dict) else {}
    metadata = (metadata or {}).get("metadata") if isinstance(metadata, dict) else None
    which = f"version {version}" if version is not None else "the current version"
    if isinstance(metadata, dict):
        number = metadata.get("version", version)
        which = f"version {number}" if version is not None else f"the current version ({number})"
        if metadata.get("destroyed"):
            if version is None and isinstance(number, int):
                raise NotFoundError(destroyed_current_message(name, number))
            raise NotFoundError(f"{which} of {name!r} was destroyed")
        if metadata.get("deletion_time"):
            raise _VersionDeletedError(f"{which} of {name!r} is deleted; 'undelete {name}' restores it")
    if version is None:
        raise NotFoundError(f"secret {name!r} not found")
    raise NotFoundError(f"secret {name!r} has no version {version}")


def _encode_data(value: bytes) -> dict[str, str]:
    try:
        return {TEXT_FIELD: value.decode("utf-8")}
    except UnicodeDecodeError:
        return {BINARY_FIELD: base64.b64encode(value).decode("ascii")}


def _keys_of(value: bytes) -> dict[str, Any] | None:
    """A value that is a JSON object, as the KV data it reads back from unchanged (see
    _decode_data); None for any other value, or an object that would not (one "value" key)."""
    if not value.lstrip(b" \t\r\n").startswith(b"{"):
        return None  # most values: not parsed at all
    try:
        document = json.loads(value)
        if isinstance(document, dict) and json.loads(_decode_data(document)) == document:
            return document
    except (ValueError, RecursionError):  # not JSON, or {"value": "text"}: read back as the text
        pass
    return None


def _decode_data(data: Any) -> bytes:
    """Our value from a KV data object: "value" text, "value_base64" bytes, else canonical JSON."""
    if isinstance(data, dict) and len(data) == 1:
        [(key, item)] = data.items()
        if key == TEXT_FIELD and isinstance(item, str):
            return item.encode("utf-8")
        if key == BINARY_FIELD and isinstance(item, str):
            try:
                return base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                pass  # not ours after all: hand out what is there
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _vault_time(text: str) -> datetime:
    """RFC 3339 with up to nanoseconds, as Vault writes it ("2024-05-01T10:00:00.123456789Z")."""
    match = _VAULT_TIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise StorageError("Vault sent a time we cannot read")
    whole, fraction, zone = match.groups()
    micros = (fraction or "0")[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{whole}.{micros}{'+00:00' if zone == 'Z' else zone}")


def _no_pending(operation: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"'{operation}' needs the 'pending' label, which is not supported by this store: Vault KV v2 "
        "has no labels; rotate by storing the new value once it works at the target"
    )
