"""Store URLs and opening a store: which store a URL names, production's guard rails.

    path/to/store.db, sqlite:///abs/path     EncryptedStore on a SQLite file (needs a master password)
    postgresql://USER@HOST[:PORT]/DB[?schema=NAME&max_connections=N&sslmode=…]
                                              EncryptedStore on PostgreSQL (also postgres://; needs a
                                              master password); the database password comes from
                                              libpq's PGPASSWORD or PGPASSFILE, not the URL
    vault://HOST[:PORT]/MOUNT[?namespace=NS]  VaultStore on a KV v2 mount, over https (port 8200)
    vault+http://HOST[:PORT]/MOUNT            the same over plain http (dev servers; refused in production)
    aws-secretsmanager://REGION[/PREFIX][?kms=KEY&kms.NAMESPACE=KEY&recovery_window_days=N]
                                              AwsStore: secret NAME is the AWS secret PREFIX/NAME

A password in a PostgreSQL URL works but is visible in process lists and shell history: it is
logged as a warning, and production refuses it; no message shows it. Other schemes fail with a
message that names what is supported. The entry points call `create_store` / `open_store`
(encrypted stores) or `open_external_store` (Vault, AWS; no master password) and never see storage
or crypto themselves.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, quote, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

from platformdirs import user_data_path

from secrets_manager.crypto.kdf import DEFAULT as PRODUCTION_KDF_MINIMUM
from secrets_manager.crypto.kdf import PROFILES as KDF_PROFILES
from secrets_manager.environment import Environment, guard_postgres_tls, owner_problem
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    StorageError,
    StoreNotFoundError,
    UnsafeConfigurationError,
    UnsupportedOperationError,
)
from secrets_manager.storage import Delete, Storage
from secrets_manager.storage.sqlite import SqliteStorage, occupied_path_error
from secrets_manager.store.base import AuditedStore
from secrets_manager.store.encrypted import HEADER_KEY, EncryptedStore, unlock_kind
from secrets_manager.store.external import (
    DEFAULT_AUDIT_SCOPE,
    DEFAULT_RECOVERY_WINDOW_DAYS,
    audit_scope_for,
    vault_namespace_sendable,
)
from secrets_manager.store.kms import AwsKmsUnlock
from secrets_manager.store.names import validate_name, validate_namespace
from secrets_manager.store.unlock import PasswordUnlock, UnlockKeyUnlock, UnlockSource

SQLITE_SCHEME = "sqlite://"
POSTGRES_SCHEMES = ("postgresql", "postgres")
POSTGRES_DEFAULT_SCHEMA = "secrets_manager"  # storage/postgres.py's DEFAULT_SCHEMA
VAULT_SCHEMES = {"vault": "https", "vault+https": "https", "vault+http": "http"}
AWS_SCHEME = "aws-secretsmanager"
DEFAULT_VAULT_PORT = 8200
VAULT_NAMESPACE_VARIABLE = (
    "VAULT_NAMESPACE"  # store/vault.py's NAMESPACE_VARIABLE (hvac loads only when used)
)
DEFAULT_FILE_NAME = "secrets.db"
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d+")
_MOUNT = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")
_PG_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
MAX_PG_CONNECTIONS = 64  # `max_connections=N`: connections one store handle may hold at once
# What a postgresql:// URL may carry besides our `schema`: libpq's own connection options.
_PG_OPTIONS = frozenset(
    {
        "application_name",
        "channel_binding",
        "connect_timeout",
        "gssencmode",
        "gsslib",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "options",
        "passfile",
        "require_auth",
        "requirepeer",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslmode",
        "sslnegotiation",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
    }
)  # fmt: skip (not sslpassword: a credential, refused as a password in the URL would be; nor service,
# whose pg_service.conf entry may name another host than the store is shown as)
SUPPORTED_URLS = (
    "a file path, sqlite:///path, postgresql://USER@HOST:PORT/DB, vault://HOST:PORT/MOUNT or "
    "aws-secretsmanager://REGION/PREFIX"
)
log = logging.getLogger(__name__)
_warned_password_urls: set[str] = set()

KDF_PROFILE_NAMES: tuple[str, ...] = tuple(KDF_PROFILES)  # what `--kdf-profile` accepts


@dataclass(frozen=True)
class VaultLocation:
    """A `vault://` URL, parsed: the server address, the KV v2 mount, an optional namespace."""

    address: str
    mount: str
    namespace: str | None = None

    @property
    def plain_http(self) -> bool:
        return self.address.startswith("http://")


@dataclass(frozen=True)
class PostgresLocation:
    """A `postgresql://` URL, parsed. `conninfo` is what libpq gets (the URL without our options)
    and may hold a password, so it is left out of `repr`; `display` never holds one."""

    conninfo: str = field(repr=False)
    display: str
    hosts: str
    port: str
    dbname: str
    schema: str = POSTGRES_DEFAULT_SCHEMA
    password_in_url: bool = False
    max_connections: int | None = None  # None: the storage's default
    user: str = ""
    # libpq's host, hostaddr and sslmode as the URL gives them ("": not given), for the guard
    # against a connection that crosses a network unchecked (environment.postgres_tls_problem).
    tls_options: tuple[tuple[str, str], ...] = ()

    @property
    def identity(self) -> str:
        """The store as one name whatever the URL's spelling (`postgres://` or `postgresql://`,
        the host's case, the default port 5432 written or not, options): `display` otherwise."""
        hosts, port = self.hosts, self.port
        if not port and re.fullmatch(r"\[[^\]]+\]:\d+", hosts):  # one IPv6 address with a port
            hosts, port = hosts.rsplit(":", 1)
        hosts = hosts if hosts.startswith(("/", "%2F", "%2f")) else hosts.lower()
        port = "" if port in ("", "5432") else f":{port}"
        user = f"{self.user}@" if self.user else ""
        schema = "" if self.schema == POSTGRES_DEFAULT_SCHEMA else f"?schema={self.schema}"
        return f"postgresql://{user}{hosts}{port}/{self.dbname}{schema}"


@dataclass(frozen=True)
class AwsLocation:
    """An `aws-secretsmanager://` URL, parsed."""

    region: str
    prefix: str
    kms_keys: Mapping[str, str] = field(default_factory=dict)
    default_kms_key: str | None = None
    recovery_window_days: int = DEFAULT_RECOVERY_WINDOW_DAYS


def external_location(url: str | None) -> VaultLocation | AwsLocation | None:
    """The Vault or AWS store a URL names; None for a SQLite store (a path or sqlite:// URL)."""
    if not url or "://" not in url:
        return None
    scheme = url.split("://", 1)[0].lower()
    if scheme in VAULT_SCHEMES:
        return _vault_location(url, VAULT_SCHEMES[scheme])
    if scheme == AWS_SCHEME:
        return _aws_location(url)
    return None


def needs_password(url: str | None) -> bool:
    """Whether the store needs a master password: only our encrypted stores (SQLite, PostgreSQL) do."""
    return external_location(url) is None


def postgres_location(url: str | None) -> PostgresLocation | None:
    """The PostgreSQL store a URL names; None for any other URL or path."""
    if not url or "://" not in url or url.split("://", 1)[0].lower() not in POSTGRES_SCHEMES:
        return None
    usage = (
        "write postgresql://USER@HOST:PORT/DATABASE[?schema=NAME] with the password in PGPASSWORD or "
        "PGPASSFILE"
    )
    userinfo = url.split("://", 1)[1].rpartition("@")[0]
    if any(c in userinfo for c in "/?#[]"):  # it would split the URL elsewhere, maybe in a password
        raise InvalidInputError(
            "the PostgreSQL store URL has '/', '?', '#', '[' or ']' in its user or password part; "
            "percent-encode them, or better, keep the password in PGPASSFILE or PGPASSWORD"
        )
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced [ of an IPv6 address
        raise InvalidInputError(f"store URL {_redacted(url)!r}: {usage}") from None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, has_colon, password = userinfo.partition(":")
    options = _query_options(parts.query)
    schema = POSTGRES_DEFAULT_SCHEMA
    max_connections = None
    passed: list[tuple[str, str]] = []
    password_in_url = bool(has_colon and password)
    for key, value, has_value in options:
        if key == "schema":
            if not _PG_SCHEMA.fullmatch(value):
                raise InvalidInputError(
                    f"store URL {_redacted(url)!r}: schema {value!r} is not valid; use lower-case "
                    "letters, digits and _"
                )
            schema = value
        elif key == "max_connections":
            if not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_PG_CONNECTIONS):
                raise InvalidInputError(
                    f"store URL {_redacted(url)!r}: max_connections must be 1..{MAX_PG_CONNECTIONS}"
                )
            max_connections = int(value)
        elif key == "password":
            password_in_url = password_in_url or bool(value)
            passed.append((key, value))
        elif key in _PG_OPTIONS:
            passed.append((key, value))
        else:
            raise InvalidInputError(
                f"store URL {_redacted(url)!r}: unknown option {option_label(key, has_value=has_value)}; "
                "options are schema=NAME, "
                "max_connections=N and libpq's (sslmode, sslrootcert, connect_timeout, "
                "target_session_attrs, …)"
            )
    dbname = unquote(parts.path.lstrip("/"))
    if not hosts or not dbname or "/" in dbname or parts.fragment:
        raise InvalidInputError(f"store URL {_redacted(url)!r}: {usage}")
    port = ""
    if re.fullmatch(r"[^,\[\]]+:\d+", hosts):  # one host with a port (several stay as libpq reads them)
        hosts, port = hosts.rsplit(":", 1)
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(passed, quote_via=quote), ""))
    shown_user = f"{unquote(user)}@" if user else ""
    display = f"postgresql://{shown_user}{hosts}{':' + port if port else ''}/{dbname}"
    if schema != POSTGRES_DEFAULT_SCHEMA:
        display += f"?schema={schema}"
    tls_options = (
        ("host", _host_names(hosts)),
        *((key, value) for key, value in passed if key in ("hostaddr", "sslmode")),
    )
    return PostgresLocation(
        conninfo,
        display,
        hosts,
        port,
        dbname,
        schema,
        password_in_url,
        max_connections,
        unquote(user),
        tls_options,
    )


def _host_names(netloc_hosts: str) -> str:
    """The host part of a postgresql:// URL (`h1:5432,h2`, `[::1]:5433`, `%2Fvar%2Frun`) as libpq's
    `host` option: names or addresses without ports, comma-separated, percent-decoded."""
    names = []
    for piece in netloc_hosts.split(","):
        if piece.startswith("["):
            names.append(piece[1 : piece.find("]")] if "]" in piece else piece[1:])
        else:
            names.append(unquote(re.sub(r":\d*$", "", piece)))
    return ",".join(names)


# Query parameters whose value may be a credential, whatever the scheme: compared after
# percent-decoding and case-folded (libpq decodes `pass%77ord` to `password`, and clients take
# `X-Vault-Token` or `TOKEN` as readily as `token`). Any name containing one of _CREDENTIAL_WORDS
# counts too (sslpassword, aws_session_token, client_secret, x-amz-credential, ...).
_CREDENTIAL_OPTIONS = frozenset(
    {
        "password", "passwd", "pwd", "pass", "sslpassword", "token", "x-vault-token", "vault_token",
        "secret_id", "role_id", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
        "key", "apikey", "api_key", "auth", "authorization", "signature", "sig",
    }
)  # fmt: skip
_CREDENTIAL_WORDS = ("password", "passphrase", "secret", "token", "credential", "access_key", "signature")
MASK = "***"


def _known_options(scheme: str) -> Callable[[str], bool] | None:
    """Which options a URL of `scheme` may carry (those its parser accepts), or None for a URL
    that is not one of ours with options (a SQLite path: everything after sqlite:// is the path)."""
    scheme = scheme.lower()
    if scheme in POSTGRES_SCHEMES:
        return lambda key: key in _PG_OPTIONS or key in ("schema", "max_connections")
    if scheme in VAULT_SCHEMES:
        return lambda key: key == "namespace"
    if scheme == AWS_SCHEME:
        return lambda key: key in ("kms", "recovery_window_days") or key.startswith("kms.")
    return None


def _is_credential(key: str) -> bool:
    folded = unquote_plus(key).casefold()
    return folded in _CREDENTIAL_OPTIONS or any(word in folded for word in _CREDENTIAL_WORDS)


def _without_secrets(url: str, *, drop: bool) -> str:
    """`url` with every part that may hold a secret masked as *** (or, with `drop`, left out):
    the password of its user part (for any scheme but PostgreSQL's, the whole user part: a Vault
    token or AWS key may sit there), the value of every option that names a credential, and, for
    our own schemes, every option the store does not know (an unknown option is where a secret
    goes by mistake) and the fragment.

    Everything up to the last '@' counts as the user part, so an unencoded '/', '?' or '@' in a
    password cannot make part of it show."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url  # a file path
    known = _known_options(scheme)
    userinfo, at, tail = rest.rpartition("@")
    if at:
        user = userinfo.split(":", 1)[0]
        if scheme.lower() not in POSTGRES_SCHEMES or any(c in userinfo for c in "/?#"):
            rest = tail if drop else f"{MASK}@{tail}"
        elif ":" in userinfo:
            rest = f"{user}@{tail}" if drop else f"{user}:{MASK}@{tail}"
    if known is None:
        before, fragment = rest, ""
        hostpath, question, query = before.partition("?")
    else:
        before, hash_, fragment = rest.partition("#")
        fragment = "" if not hash_ or drop else f"#{MASK}"
        hostpath, question, query = before.partition("?")
    kept: list[str] = []
    for item in query.split("&") if question else []:
        key, equals, _value = item.partition("=")
        if not item:
            continue
        secret = _is_credential(key) or (known is not None and not known(unquote_plus(key)))
        if not secret:
            kept.append(item)
        elif not drop:
            kept.append(f"{key}={MASK}" if equals and _plain(key) else MASK)
    return f"{scheme}://{hostpath}{'?' if kept else ''}{'&'.join(kept)}{fragment}"


def _plain(key: str) -> bool:
    """Whether an option's name may be shown: a short name, not something a secret was pasted as."""
    return re.fullmatch(r"[A-Za-z][A-Za-z0-9_.%\-]{0,39}", key) is not None


def option_label(key: str, *, has_value: bool = True) -> str:
    """An option's (decoded) name for a message: quoted, or *** if it may be a secret itself
    (given without '=', long or odd)."""
    return repr(key) if has_value and _plain(key) else repr(MASK)


def _query_options(query: str) -> list[tuple[str, str, bool]]:
    """The options of a URL's query as (name, value, whether '=' was there), decoded as
    urllib's parse_qsl decodes them (and libpq: `pass%77ord` is `password`)."""
    options = []
    for item in query.split("&"):
        if item:
            key, equals, value = item.partition("=")
            options.append((unquote_plus(key), unquote_plus(value), bool(equals)))
    return options


def _redacted(url: str) -> str:
    """`url` for a message: see `_without_secrets`."""
    return _without_secrets(url, drop=False)


def url_without_password(url: str) -> str:
    """`url` as the user gave it minus any password, token or key (the user part's, and every
    option that names a credential), for a command line we print: the rest (sslmode, passfile,
    schema, ...) stays, so it connects as the user's did, with the password from where it should
    come (PGPASSFILE, PGPASSWORD)."""
    return _without_secrets(url, drop=True)


def display_url(url: str | None) -> str:
    """A store URL for messages: never with a password, token or key in it."""
    return "the default store" if url is None else _redacted(url)


def _split(url: str, usage: str) -> SplitResult:
    """urlsplit, whose ValueError (an unbalanced '[' of an IPv6 address) was an internal error."""
    try:
        return urlsplit(url)
    except ValueError:
        raise InvalidInputError(f"store URL {display_url(url)!r}: {usage}") from None


def _vault_location(url: str, http_scheme: str) -> VaultLocation:
    usage = "write vault://HOST:PORT/MOUNT (or vault+http://… for a dev server without TLS)"
    parts = _split(url, usage)
    try:
        host, port = parts.hostname, parts.port or DEFAULT_VAULT_PORT
    except ValueError:
        raise InvalidInputError(f"store URL {display_url(url)!r}: bad port; {usage}") from None
    mount = parts.path.strip("/")
    if "@" in parts.netloc:
        raise InvalidInputError(
            f"store URL {display_url(url)!r}: a token does not belong in the URL; set VAULT_TOKEN"
        )
    if not host or not _MOUNT.fullmatch(mount) or parts.fragment:
        raise InvalidInputError(f"store URL {display_url(url)!r}: {usage}")
    options = {key: (value, has_value) for key, value, has_value in _query_options(parts.query)}
    namespace = options.pop("namespace", ("", True))[0]
    if namespace and not vault_namespace_sendable(namespace):
        raise InvalidInputError(
            f"store URL {display_url(url)!r}: option 'namespace' is not a Vault namespace path; write "
            "namespace=NS with NS printable ASCII without spaces around it, e.g. namespace=team-a/prod"
        )
    if options:
        key, (_, has_value) = next(iter(options.items()))
        raise InvalidInputError(
            f"store URL {display_url(url)!r}: unknown option {option_label(key, has_value=has_value)}; "
            "only namespace=NS"
        )
    netloc = f"[{host}]" if ":" in host else host
    return VaultLocation(address=f"{http_scheme}://{netloc}:{port}", mount=mount, namespace=namespace or None)


def _aws_location(url: str) -> AwsLocation:
    usage = "write aws-secretsmanager://REGION/PREFIX, e.g. aws-secretsmanager://eu-west-1/trading"
    parts = _split(url, usage)
    if "@" in parts.netloc:
        raise InvalidInputError(
            f"store URL {display_url(url)!r}: credentials do not belong in the URL; boto3 reads them "
            "from the environment, ~/.aws or an instance role"
        )
    region = parts.netloc.lower()
    if parts.fragment:
        raise InvalidInputError(f"store URL {display_url(url)!r}: {usage}")
    if not _REGION.fullmatch(region):
        raise InvalidInputError(f"store URL {display_url(url)!r}: {region!r} is not an AWS region; {usage}")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            validate_name(prefix)
        except InvalidInputError:
            raise InvalidInputError(
                f"store URL {display_url(url)!r}: the prefix {prefix!r} is not a valid path; {usage}"
            ) from None
    kms_keys: dict[str, str] = {}
    default_kms_key = None
    recovery = DEFAULT_RECOVERY_WINDOW_DAYS
    for key, value, has_value in _query_options(parts.query):
        if key == "kms" and value:
            default_kms_key = value
        elif key.startswith("kms.") and value:
            try:
                kms_keys[validate_namespace(key[len("kms.") :])] = value
            except InvalidInputError:
                label = option_label(key)
                which = f"option {label}" if label != repr(MASK) else "a kms.NAMESPACE option"
                raise InvalidInputError(
                    f"store URL {display_url(url)!r}: {which} names no namespace; "
                    "write kms.NAMESPACE=KEY with NAMESPACE the first segment of the names the key "
                    "encrypts, e.g. kms.auth=alias/auth for auth/DB_PASSWORD"
                ) from None
        elif key == "recovery_window_days" and value.isdigit() and 7 <= int(value) <= 30:
            recovery = int(value)
        else:
            raise InvalidInputError(
                f"store URL {display_url(url)!r}: bad option {option_label(key, has_value=has_value)}; "
                "options are kms=KEY, "
                "kms.NAMESPACE=KEY, recovery_window_days=7..30"
            )
    return AwsLocation(region, prefix, kms_keys, default_kms_key, recovery)


def default_store_path() -> Path:
    """The per-user default store file, e.g. ~/.local/share/secrets-manager/secrets.db.
    InvalidInputError where this user has no home directory to be had: a container run as a user
    ID the password database does not name (`docker run --user 12345`, OpenShift) with HOME unset,
    where platformdirs 4.14 raises RuntimeError and 4.0 gives "~/.local/share" unexpanded (a path
    relative to the working directory)."""
    try:
        directory = user_data_path("secrets-manager", appauthor=False)
    except RuntimeError:
        directory = None
    if directory is None or not directory.is_absolute():
        raise InvalidInputError(
            "no home directory for secrets-manager's default files (the store file, and the audit log "
            f"of a PostgreSQL, Vault or AWS store): HOME is unset and user ID {os.getuid()} has none in "
            "the password database; pass --store (and --audit-file), or set HOME or XDG_DATA_HOME"
        )
    return directory / DEFAULT_FILE_NAME


def sqlite_path(url: str | None) -> Path:
    """The file a store URL names; InvalidInputError for a scheme we do not support."""
    if postgres_location(url) is not None:
        raise InvalidInputError(
            f"store URL {_redacted(str(url))!r} names a PostgreSQL store, not a store file"
        )
    if not url:
        return default_store_path()
    if url.startswith(SQLITE_SCHEME):
        path = url[len(SQLITE_SCHEME) :]
        if not path.startswith("/") or path == "/":
            raise InvalidInputError(
                f"store URL {display_url(url)!r}: write sqlite:///absolute/path/to/store.db"
            )
        _check_store_path(Path(path))
        return Path(path)
    if external_location(url) is not None:
        raise InvalidInputError(
            f"store URL {display_url(url)!r} names a Vault or AWS store, not a store file"
        )
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise InvalidInputError(f"store URL scheme {scheme!r} is not supported; use {SUPPORTED_URLS}")
    try:
        expanded = Path(url).expanduser()
    except RuntimeError:  # "~nouser/x.db": no such user, or no home directory to expand
        raise InvalidInputError(
            f"store path {url!r}: cannot expand {url.split('/', 1)[0]!r} (no such user or home "
            "directory); give the full path"
        ) from None
    _check_store_path(expanded)
    return expanded


# What `Path.exists()` takes for "no such file"; any other error of stat() it raises.
_ABSENT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP}


def _check_store_path(path: Path) -> None:
    """Stat the store file and its longest companion once, here, so that a path no file can have (a
    name too long) or one we may not look at fails in one line naming it, rather than as an
    OSError from whichever `exists()` or `open()` meets it first."""
    for candidate in (str(path), f"{path}-journal"):  # the longest name SQLite gives a companion
        try:
            os.stat(candidate)
        except OSError as exc:
            if exc.errno in _ABSENT_ERRNOS:
                continue
            if exc.errno == errno.ENAMETOOLONG:
                raise InvalidInputError(
                    f"store path {path}: {exc.strerror}; choose a shorter file name"
                ) from None
            raise StorageError(f"store path {path}: {exc.strerror or type(exc).__name__}") from None


def default_audit_path(url: str | None, *, environ: Mapping[str, str] | None = None) -> Path:
    """The audit log beside the store file (`store.db` → `store.audit.jsonl`); for a PostgreSQL,
    Vault or AWS store, a file named after it in the user data directory.

    The log must map one to one to where its audit key and anchor live: for Vault, the address,
    namespace (`?namespace=`, else VAULT_NAMESPACE) and mount; for AWS, the account (asked of STS
    once per process: `store.aws.aws_account`), region, endpoint (if not AWS's own) and prefix.
    A namespace or endpoint, free text, is followed by a short hash of the whole identity, so two
    stores never share a name. A name longer than MAX_AUDIT_FILE_NAME (a long prefix, mount or
    store file name) keeps its start and ends in a hash of the whole name instead."""
    location: VaultLocation | AwsLocation | PostgresLocation | None = postgres_location(url)
    location = location or external_location(url)
    environ = os.environ if environ is None else environ
    if isinstance(location, PostgresLocation):
        slug = f"postgresql-{location.hosts}-{location.port or 'default'}-{location.dbname}"
        if location.schema != POSTGRES_DEFAULT_SCHEMA:
            slug += f"-{location.schema}"
    elif isinstance(location, VaultLocation):
        host = location.address.split("://", 1)[1]
        namespace = (location.namespace or environ.get(VAULT_NAMESPACE_VARIABLE) or "").strip("/")
        slug = f"vault-{host}-{location.mount}"
        if namespace:
            slug = (
                f"vault-{host}-{namespace}-{location.mount}-{_identity_hash(host, namespace, location.mount)}"
            )
    elif isinstance(location, AwsLocation):
        from secrets_manager.store.aws import aws_account  # boto3 loads only for an AWS store

        where = aws_account(location.region)
        slug = f"aws-{where.account}-{location.region}"
        if where.endpoint is not None:
            endpoint = where.endpoint.split("://", 1)[-1]
            slug += f"-{endpoint}-{location.prefix}-"
            slug += _identity_hash(where.account, location.region, where.endpoint, location.prefix)
        else:
            slug = f"{slug}-{location.prefix}".rstrip("-")
    else:
        path = sqlite_path(url)
        if path.is_symlink():  # the log belongs to the real file, whatever name reaches it
            path = path.resolve()
        return path.with_name(_bounded_log_name(path.stem, path.name))
    return _data_file(slug)


def legacy_audit_path(url: str | None) -> Path | None:
    """The default audit log a Vault or AWS store had before it was named after the Vault namespace
    and the AWS account (`vault-HOST-PORT-MOUNT`, `aws-REGION-PREFIX`), to be adopted by the store
    it belongs to; None for other stores."""
    location = external_location(url)
    if isinstance(location, VaultLocation):
        return _data_file(f"vault-{location.address.split('://', 1)[1]}-{location.mount}")
    if isinstance(location, AwsLocation):
        return _data_file(f"aws-{location.region}-{location.prefix}".rstrip("-"))
    return None


# The longest name a default audit log gets: NAME_MAX (255 bytes on Linux, macOS and the BSDs)
# less room for the longest name the log gives a file beside it (`NAME.partial-STAMP-N`, 28+).
MAX_AUDIT_FILE_NAME = 255 - 32
AUDIT_SUFFIX = ".audit.jsonl"


def _bounded_log_name(stem: str, identity: str) -> str:
    """`STEM.audit.jsonl`, or, if that is longer than MAX_AUDIT_FILE_NAME bytes, the start of
    STEM, 16 hex digits of a hash of `identity` (whatever tells this log from others: the store's
    whole name) and the suffix. Names that fit stay as they always were, so no store's log moves
    (but for a name of 224 to 255 bytes, which worked until the log set a file aside)."""
    name = f"{stem}{AUDIT_SUFFIX}"
    if len(os.fsencode(name)) <= MAX_AUDIT_FILE_NAME:
        return name
    digest = hashlib.sha256(os.fsencode(identity)).hexdigest()[:16]
    room = MAX_AUDIT_FILE_NAME - len(AUDIT_SUFFIX) - len(digest) - 1
    readable = os.fsencode(stem)[:room].decode("utf-8", "ignore").rstrip("-.")
    return f"{readable}-{digest}{AUDIT_SUFFIX}"


def _data_file(slug: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", slug).strip("-")
    return default_store_path().parent / _bounded_log_name(stem, slug)


def _identity_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:8]


def open_external_store(
    url: str,
    *,
    environment: Environment,
    actor: str,
    audit_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> AuditedStore:
    """Open the Vault or AWS store `url` names (credentials from the environment, no password).

    `audit_path` is the audit log this process writes: its anchor is kept in the backend under an
    id derived from it (store/external.py)."""
    location = external_location(url)
    environ = os.environ if environ is None else environ
    scope = audit_scope_for(audit_path) if audit_path is not None else DEFAULT_AUDIT_SCOPE
    if isinstance(location, VaultLocation):
        if location.plain_http and environment.is_production:
            raise UnsafeConfigurationError(
                f"store URL {display_url(url)!r} uses plain http, which production refuses; use "
                "vault://… (https)"
            )
        from secrets_manager.store.vault import VaultStore, connect_vault

        client = connect_vault(location.address, environ=environ, namespace=location.namespace)
        return VaultStore(client, location.mount, actor=actor, audit_scope=scope)
    if isinstance(location, AwsLocation):
        from secrets_manager.store.aws import AwsStore, connect_aws

        return AwsStore(
            connect_aws(location.region),
            location.prefix,
            kms_keys=location.kms_keys,
            default_kms_key=location.default_kms_key,
            recovery_window_days=location.recovery_window_days,
            actor=actor,
            audit_scope=scope,
        )
    raise InvalidInputError(f"store URL {display_url(url)!r} names neither a Vault nor an AWS store")


def store_location(url: str | None) -> str:
    """Where the store a URL names is, for messages: the file, or the URL without any password."""
    location = postgres_location(url)
    return location.display if location is not None else str(sqlite_path(url))


def store_identity(url: str | None) -> str:
    """The store a URL names as one name whatever its spelling: a store file's real path (a
    relative path, `..`, `~`, `sqlite:///` or a symbolic link to it give the same), a PostgreSQL
    store's `PostgresLocation.identity`. Never holds a password."""
    location = postgres_location(url)
    return location.identity if location is not None else os.path.realpath(sqlite_path(url))


def open_storage(url: str | None, *, create: bool, environment: Environment) -> Storage:
    """Open (or, with `create`, make) the storage a URL names, applying production's guard rails.

    PostgreSQL: `create` makes the schema and tables if missing (idempotent: whether a *store*
    exists there is EncryptedStore's header, which `create` never overwrites)."""
    location = postgres_location(url)
    if location is not None:
        try:
            return _open_postgres(location, create=create, environment=environment)
        except StoreNotFoundError as exc:  # the command to create it keeps the URL's options
            raise StoreNotFoundError(exc.location, url_without_password(url or "")) from None
    path = sqlite_path(url)
    if path.parent.is_dir():
        problem = _unprotected_store_problem(path, create=create, production=environment.is_production)
        if problem is not None and (environment.is_production or problem not in _warned_store_problems):
            _warned_store_problems.add(problem)  # once per process: the SDK may open it again
            environment.guard(problem)
    try:
        return SqliteStorage(path, create=create)
    except StoreNotFoundError as exc:
        if url is not None:
            raise
        raise StoreNotFoundError(exc.location, None) from None  # the default: a bare `init` makes it


# The problems of store files already warned of outside production (once per process each).
_warned_store_problems: set[str] = set()


def _unprotected_store_problem(path: Path, *, create: bool, production: bool) -> str | None:
    """Why a store file is not safe from other users, or None: it and its directory must be this
    user's (or root's), the file unreadable and the directory unwritable by group or others (who
    may write the directory may put a -wal file of theirs beside the store before SQLite makes
    one, and SQLite then writes the store's pages, its header included, into their file).
    Production refuses it; elsewhere it is a warning (`Environment.guard`), except for a store
    file another user owns (theirs, read through its group: theirs to protect, not this user's).
    Checked with fstat of the directory as opened and of the file opened in it, not by stat of
    their paths (which may name other files a moment later)."""
    try:
        folder_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None  # SqliteStorage reports what is wrong with it
    try:
        folder = os.fstat(folder_fd)
        found: os.stat_result | None = None
        if not create:
            try:
                fd = os.open(path.name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder_fd)
            except OSError:
                pass  # missing, a directory, ...: SqliteStorage says so
            else:
                try:
                    found = os.fstat(fd)
                finally:
                    os.close(fd)
    finally:
        os.close(folder_fd)
    if found is not None:
        problem = owner_problem(path, found, "store file")
        if problem is not None:
            return problem if production else None
        mode = stat.S_IMODE(found.st_mode)
        if mode & 0o077:
            return (
                f"store file {path} has mode {mode:04o}, which group or others can access; "
                f"run 'chmod 600 {path}'"
            )
    # Who may write the directory may replace the store file (or its -wal) with one of theirs.
    directory = path.absolute().parent  # a relative store's is '.', which says nothing in a message
    problem = owner_problem(directory, folder, "the store's directory")
    if problem is not None:
        return problem
    if stat.S_IMODE(folder.st_mode) & 0o022:
        return (
            f"the store's directory {directory} has mode {stat.S_IMODE(folder.st_mode):04o}, which "
            f"lets group or others replace the store file or read its writes; run 'chmod 700 {directory}'"
        )
    return None


def _open_postgres(location: PostgresLocation, *, create: bool, environment: Environment) -> Storage:
    guard_postgres_tls(
        environment, f"the store URL {location.display}", dict(location.tls_options), os.environ
    )
    if location.password_in_url:
        if environment.is_production:
            raise UnsafeConfigurationError(
                f"store URL {location.display} carries a database password, which process lists and "
                "shell history show; production refuses it: put it in PGPASSFILE (~/.pgpass) or PGPASSWORD"
            )
        if location.display not in _warned_password_urls:  # once per process, not per connection
            _warned_password_urls.add(location.display)
            log.warning(
                "the store URL %s carries a database password, which process lists and shell "
                "history show; put it in PGPASSFILE (~/.pgpass) or PGPASSWORD instead",
                location.display,
                extra={"event": "store.password_in_url"},
            )
    from secrets_manager.storage.postgres import PostgresStorage  # psycopg loads only when used

    pool = {} if location.max_connections is None else {"max_connections": location.max_connections}
    return PostgresStorage(location.conninfo, schema=location.schema, create=create, **pool)


def store_exists(url: str | None, *, environment: Environment) -> bool:
    """Whether an initialised store is where `url` points (init refuses to go on if so)."""
    if postgres_location(url) is None:
        return sqlite_path(url).exists()
    try:
        storage = open_storage(url, create=False, environment=environment)
    except NotFoundError:
        return False
    try:
        return storage.get(HEADER_KEY) is not None
    finally:
        storage.close()


def refuse_existing_store(url: str | None, *, environment: Environment) -> None:
    """For init: the error to give if something is where `url` points; a store (exit 7), or, for
    a file path, whatever else is there, named (an empty file, another file, a directory)."""
    if postgres_location(url) is None:
        path = sqlite_path(url)
        if path.exists() or path.is_symlink():
            raise occupied_path_error(path)
        return
    if store_exists(url, environment=environment):
        raise ConflictError(f"a store already exists at {store_location(url)}; init never overwrites one")


def discard_new_store(url: str | None, store: EncryptedStore) -> None:
    """Undo an `init` that was never announced (its audit record failed): close the new store and
    remove what it wrote. On PostgreSQL, each entry goes only if nobody changed it since, and the
    schema and tables stay (an empty store there is no store)."""
    if postgres_location(url) is None:
        store.close()
        remove_store_files(sqlite_path(url))
        return
    storage = store._storage
    try:
        entries = [(key, storage.get(key)) for key in storage.list("")]
        storage.commit([Delete(key, expect=e.revision) for key, e in entries if e is not None])
    finally:
        store.close()


def create_store(
    url: str | None,
    password: bytes | None,
    *,
    kdf_profile: str,
    environment: Environment,
    actor: str,
    audit_path: Path | None = None,
    kms_key: str | None = None,
) -> EncryptedStore:
    """Create a new, empty store where `url` points, unlocked by `password` or, with `kms_key`, by
    that AWS KMS key (no password). Never overwrites.

    `audit_path`: the audit log this process writes (see `open_store`)."""
    unlock: UnlockSource
    if kms_key is not None:
        unlock = AwsKmsUnlock(kms_key)
    elif password is not None:
        unlock = new_password_unlock(password, kdf_profile, environment=environment)
    else:
        raise InvalidInputError("a new store needs a master password or an AWS KMS key")
    options: dict[str, str] = {"actor": actor, **_store_options(url, audit_path)}
    postgres = postgres_location(url) is not None
    path = None if postgres else sqlite_path(url)
    if path is not None and path.exists():
        raise occupied_path_error(path)
    # Argon2id (or AWS KMS) before the store exists: a store without its header (for the second
    # that takes, or for good if the process is killed then) opens for nobody, and init does not
    # replace it. Its header now follows its creation at once.
    new_root = EncryptedStore.new_root(unlock)
    if postgres:
        storage = open_storage(url, create=True, environment=environment)
        try:  # EncryptedStore.create writes the header only if there is none: never overwrites
            return EncryptedStore.create(storage, unlock, new_root=new_root, **options)
        except ConflictError:
            storage.close()
            raise ConflictError(
                f"a store already exists at {store_location(url)}; init never overwrites one"
            ) from None
        except BaseException:
            storage.close()
            raise
    assert path is not None
    storage = open_storage(url, create=True, environment=environment)
    try:
        return EncryptedStore.create(storage, unlock, new_root=new_root, **options)
    except BaseException:
        storage.close()
        remove_store_files(path)
        raise


def new_password_unlock(password: bytes, kdf_profile: str, *, environment: Environment) -> PasswordUnlock:
    """A password unlock with the named Argon2id profile, for a new store or a new password;
    production refuses a profile weaker than the default."""
    if kdf_profile not in KDF_PROFILES:
        raise InvalidInputError(f"unknown KDF profile {kdf_profile!r}; use one of {', '.join(KDF_PROFILES)}")
    environment.check_new_password(password)
    if environment.is_production and KDF_PROFILES[kdf_profile].is_weaker_than(PRODUCTION_KDF_MINIMUM):
        raise UnsafeConfigurationError(
            f"KDF profile {kdf_profile!r} is too weak for production; use the default profile"
        )
    return PasswordUnlock(password, KDF_PROFILES[kdf_profile])


def local_store_files(url: str | None) -> list[Path]:
    """The files of a store kept in a local SQLite file (the file, then its -wal, -shm and
    -journal companions, whether or not they exist); none for a PostgreSQL, Vault or AWS store."""
    if postgres_location(url) is not None or external_location(url) is not None:
        return []
    path = sqlite_path(url)
    return [path, *(Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))]


def remove_store_files(path: Path) -> None:
    """Delete a store file and its SQLite companions (only for a store that was never used).
    A path where no file can be (a parent that is a file, a name too long) has nothing to delete:
    this runs while another error is reported, which must not become an OSError of its own."""
    for suffix in ("", "-wal", "-shm"):
        try:
            Path(f"{path}{suffix}").unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise StorageError(
                    f"cannot remove {path}{suffix}: {exc.strerror}; remove it by hand"
                ) from None


def open_store(
    url: str | None,
    password: bytes | Callable[[], bytes],
    *,
    environment: Environment,
    actor: str,
    audit_path: Path | None = None,
    password_rereadable: bool = False,
    unlock_key: UnlockKeyUnlock | None = None,
    unlock_key_derived_here: bool = False,
) -> EncryptedStore:
    """Unlock the store `url` points at: with its master password, or through AWS KMS if its
    header says so. `password` may be a function, called only for a password store (so a store
    that KMS unlocks never prompts). `password_rereadable`: the function may be called again
    while the store is open (it reads a file, not a prompt), when another process has changed the
    password and rotated the root key (EncryptedStore.renew_unlock_with). `unlock_key`: a password
    store is opened with the unlock key it finds instead of the password (UnlockKeyRefused if
    it has none that opens it); a store that KMS unlocks is opened as ever. A key kept by the
    agent is refused in production; `unlock_key_derived_here`: this process derived it from
    `password` moments ago (a new store opened under its temporary name), not a cached one.

    `audit_path` is the audit log this process writes (default: `default_audit_path(url)`). A
    PostgreSQL store is shared by hosts that each keep their own log, so there every log gets its
    own anchor, under an id derived from the host and this path; a SQLite file has one."""
    if not needs_password(url):
        raise UnsupportedOperationError(
            f"opening {display_url(url)} with a master password is not supported by this store: "
            "Vault and AWS stores have none (this entry point works on encrypted store files only)"
        )
    if unlock_key is not None and environment.is_production and not unlock_key_derived_here:
        # the CLI never asks its agent there
        raise UnsafeConfigurationError("a cached unlock key is refused in production: use the password")
    options = {**_store_options(url, audit_path), "actor": actor}
    store = _open_encrypted(
        url,
        environment,
        lambda storage, kind: EncryptedStore.open(
            storage,
            unlock_key
            if unlock_key is not None and kind == PasswordUnlock.kind
            else _unlock_for(kind, password, environment),
            **options,
        ),
    )
    if password_rereadable and callable(password):
        store.renew_unlock_with(lambda: _password_unlock(password(), environment))
    return store


def open_store_with_recovery(
    url: str | None,
    mnemonics: list[str],
    *,
    environment: Environment,
    actor: str,
    audit_path: Path | None = None,
) -> EncryptedStore:
    """Open the store `url` points at with recovery shares (store/recovery.py) instead of its
    password or KMS key, to give it a new one. The store returned has no unlock source until
    `change_unlock`."""
    if not needs_password(url):
        raise UnsupportedOperationError(
            f"recovery shares are not supported by this store: {display_url(url)} keeps no keys of "
            "ours (Vault and AWS encrypt with their own)"
        )
    from secrets_manager.store.recovery import recover_root  # HPKE, SLIP-0039: a rare command's

    options = {**_store_options(url, audit_path), "actor": actor}
    return _open_encrypted(
        url, environment, lambda storage, _kind: recover_root(storage, mnemonics, **options)
    )


def _open_encrypted(
    url: str | None, environment: Environment, open_with: Callable[[Storage, str], EncryptedStore]
) -> EncryptedStore:
    """`open_with(storage, unlock kind)` on the storage at `url`, closed again if that fails."""
    storage = open_storage(url, create=False, environment=environment)
    try:
        try:
            kind = unlock_kind(storage)
        except NotFoundError:
            location = postgres_location(url)
            if location is None:
                raise
            # The tables are there (an interrupted init?) but no store header.
            raise StoreNotFoundError(location.display, url_without_password(url or "")) from None
        return open_with(storage, kind)
    except BaseException:
        storage.close()
        raise


def _store_options(url: str | None, audit_path: Path | None) -> dict[str, str]:
    if postgres_location(url) is None:
        return {}
    return {"audit_scope": audit_scope_for(audit_path or default_audit_path(url))}


def _unlock_for(kind: str, password: bytes | Callable[[], bytes], environment: Environment) -> UnlockSource:
    """The unlock source for a store whose header names `kind`."""
    if kind == AwsKmsUnlock.kind:
        return AwsKmsUnlock()
    if kind == PasswordUnlock.kind:
        return _password_unlock(password() if callable(password) else password, environment)
    raise StorageError(
        f"the store is unlocked by {kind!r}, which this secrets-manager does not know; upgrade it"
    )


def _password_unlock(password: bytes, environment: Environment) -> PasswordUnlock:
    minimum = PRODUCTION_KDF_MINIMUM if environment.is_production else None
    return PasswordUnlock(password, minimum=minimum)
