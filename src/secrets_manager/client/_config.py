"""Where the SDK gets its secrets from, read from the environment (arguments override it).

    SECRETS_MANAGER_ADDR            host:port[,host:port...]: service replicas, tried in this order
    SECRETS_MANAGER_CERT, _KEY, _CA this service's client certificate, its key, the service's CA
    SHRIVENQUANT_ENV                production: an address is required (no local-store fallback)
    SECRETS_MANAGER_STORE           without an address, outside production: the local store URL
    MASTER_PASSWORD_FILE            ... and its master password (file), else MASTER_PASSWORD
    SECRETS_MANAGER_CACHE_TTL       seconds a cached value is trusted without asking (default 300)
    SECRETS_MANAGER_STALE_IF_ERROR  seconds the last good values are served while no service
                                    answers (default 300); 0 turns stale serving off
    SECRETS_MANAGER_TIMEOUT         seconds per call to one address before trying the next (default 5)

Invariant: a resolved `ClientConfig` is complete. It names addresses *and* all three TLS files, or
a local store and a password source; anything missing is an error at construction, naming the
variable to set, never a failure at the first read.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from secrets_manager.client.remote import TlsFiles
from secrets_manager.environment import (
    PASSWORD_FILE_MAX_BYTES,
    Environment,
    current_environment,
    password_variable_bytes,
)
from secrets_manager.errors import (
    InvalidInputError,
    SecretsManagerError,
    UnlockError,
    UnsafeConfigurationError,
)
from secrets_manager.store.url import store_location
from secrets_manager.values import SecretValue

log = logging.getLogger("secrets_manager.client")

ADDRESS_VARIABLE = "SECRETS_MANAGER_ADDR"
TLS_VARIABLES = ("SECRETS_MANAGER_CERT", "SECRETS_MANAGER_KEY", "SECRETS_MANAGER_CA")
STORE_VARIABLE = "SECRETS_MANAGER_STORE"
PASSWORD_FILE_VARIABLE = "MASTER_PASSWORD_FILE"  # noqa: S105 (a variable name)
PASSWORD_VARIABLE = "MASTER_PASSWORD"  # noqa: S105 (a variable name)
TTL_VARIABLE = "SECRETS_MANAGER_CACHE_TTL"
STALE_VARIABLE = "SECRETS_MANAGER_STALE_IF_ERROR"
TIMEOUT_VARIABLE = "SECRETS_MANAGER_TIMEOUT"

DEFAULT_TTL_SECONDS = 300.0
DEFAULT_STALE_IF_ERROR_SECONDS = 300.0
DEFAULT_TIMEOUT_SECONDS = 5.0
TTL_JITTER = 0.1  # a value's lifetime is drawn from [0.9, 1.0] x TTL
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class RemoteTarget:
    """The service replicas, in the order they are tried, and the client certificate for all."""

    addresses: tuple[str, ...]
    tls: TlsFiles


_NO_PASSWORD = (
    f"no service and no local store password: set {ADDRESS_VARIABLE} (with {', '.join(TLS_VARIABLES)}), "
    f"or for development {PASSWORD_FILE_VARIABLE} (or {PASSWORD_VARIABLE}) for the local store"
)


@dataclass(frozen=True)
class LocalTarget:
    """Development without a service: the local store, opened read-only by the SDK."""

    store_url: str | None = field(repr=False)  # a postgresql:// URL may hold a password
    environment: Environment
    password_file: Path | None = None
    password: SecretValue | None = None  # from MASTER_PASSWORD; redacted in repr

    def read_password(self) -> bytes:
        """The master password; asked for only if a password unlocks the store (not AWS KMS)."""
        if self.password_file is not None:
            return _read_password_file(self.password_file)
        if self.password is None:  # a store named without a password: fine if KMS unlocks it
            raise UnlockError(_NO_PASSWORD)
        return self.password.reveal()


@dataclass(frozen=True)
class ClientConfig:
    target: RemoteTarget | LocalTarget
    ttl: float = DEFAULT_TTL_SECONDS
    stale_if_error: float = DEFAULT_STALE_IF_ERROR_SECONDS
    timeout: float = DEFAULT_TIMEOUT_SECONDS

    @property
    def description(self) -> str:
        """Where values come from, for messages: the addresses, or the local store."""
        if isinstance(self.target, RemoteTarget):
            return ", ".join(self.target.addresses)
        if not self.target.store_url:
            return "local store (default path)"
        try:  # never a database password that a postgresql:// URL may carry
            return f"local store {store_location(self.target.store_url)}"
        except SecretsManagerError:
            return "local store (unsupported URL)"


def resolve_config(
    addresses: str | Sequence[str] | None = None,
    *,
    tls: TlsFiles | None = None,
    ttl: float | None = None,
    stale_if_error: float | None = None,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Arguments first, then the environment; InvalidInputError names what is missing or wrong."""
    env = os.environ if environ is None else environ
    environment = current_environment(env)
    parsed = (
        parse_addresses(env.get(ADDRESS_VARIABLE, ""))
        if addresses is None
        else parse_addresses(addresses, "addresses")
    )
    target: RemoteTarget | LocalTarget
    if parsed:
        target = RemoteTarget(parsed, tls or _tls_from(env))
    elif environment.is_production:
        raise UnsafeConfigurationError(
            f"{ADDRESS_VARIABLE} is not set and SHRIVENQUANT_ENV=production: set it to the service "
            "address(es), e.g. secrets.internal:7443 (the local-store fallback is for development)"
        )
    else:
        target = _local_target(env, environment)
    return ClientConfig(
        target=target,
        ttl=_seconds(ttl, env, TTL_VARIABLE, DEFAULT_TTL_SECONDS, minimum=0.001),
        stale_if_error=_seconds(
            stale_if_error, env, STALE_VARIABLE, DEFAULT_STALE_IF_ERROR_SECONDS, minimum=0.0
        ),
        timeout=_seconds(timeout, env, TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_SECONDS, minimum=0.001),
    )


def parse_addresses(raw: str | Sequence[str], source: str = ADDRESS_VARIABLE) -> tuple[str, ...]:
    """`"a:1, b:2"` or `["a:1", "b:2"]` → `("a:1", "b:2")`; each must be host:port. `source`:
    where they came from, as a refusal names it."""
    items = raw.split(",") if isinstance(raw, str) else list(raw) if isinstance(raw, Sequence) else None
    if items is None or not all(isinstance(item, str) for item in items):
        odd = raw if items is None else next(item for item in items if not isinstance(item, str))
        raise InvalidInputError(
            f"addresses are 'host:port' text or a list of them, not {type(odd).__name__} "
            "(e.g. 'secrets.internal:7443')"
        )
    # Each once, in the order given: an address named twice was asked twice before the next.
    addresses = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    for address in addresses:
        scheme = next((s for s in ("https://", "http://") if address.lower().startswith(s)), None)
        if scheme is not None:  # a Vault habit (VAULT_ADDR is a URL); gRPC took it as a host name
            raise InvalidInputError(
                f"{source}: {address!r} is a URL; give host:port without {scheme!r} "
                f"(e.g. {address[len(scheme) :].rstrip('/')}): the service speaks mutual TLS on that port"
            )
        host, _, port = address.rpartition(":")
        if _unbracketed_ipv6(host) or (host.startswith("[") and not _bracketed_ipv6(host)):
            # gRPC took '::1:7443' as a host name ("Misformatted domain name")
            raise InvalidInputError(
                f"{source}: {address!r} is not host:port; an IPv6 address goes in brackets, e.g. [::1]:7443"
            )
        # ASCII digits only: str.isdigit() also takes "²" (int() then fails) and "٧٤٤٣".
        spaced = not host.isprintable() or any(char.isspace() for char in host)  # gRPC cuts at a NUL
        if not host or spaced or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            raise InvalidInputError(
                f"{source}: {address!r} is not host:port; "
                "give one or more comma-separated addresses like secrets.internal:7443"
            )
    return addresses


def _bracketed_ipv6(host: str) -> bool:
    """Whether `host` is an IPv6 address in brackets, as a gRPC target writes one: '[::1]'."""
    if not (host.startswith("[") and host.endswith("]")):
        return False
    try:
        return ipaddress.ip_address(host[1:-1]).version == 6
    except ValueError:
        return False


def _unbracketed_ipv6(host: str) -> bool:
    """Whether `host` is an IPv6 address without its brackets: '::1' of '::1:7443'. (Not every
    host with a colon: a gRPC target such as 'dns:///secrets.internal:7443' stays as it was.)"""
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _tls_from(env: Mapping[str, str]) -> TlsFiles:
    missing = [name for name in TLS_VARIABLES if not env.get(name)]
    if missing:
        raise InvalidInputError(
            f"{ADDRESS_VARIABLE} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not: the service requires this service's client certificate, its key and the CA (mutual TLS)"
        )
    cert, key, ca = (Path(env[name]).expanduser() for name in TLS_VARIABLES)
    return TlsFiles(cert=cert, key=key, ca=ca)


def _local_target(env: Mapping[str, str], environment: Environment) -> LocalTarget:
    store_url = env.get(STORE_VARIABLE) or None
    if env.get(PASSWORD_FILE_VARIABLE):
        return LocalTarget(store_url, environment, password_file=Path(env[PASSWORD_FILE_VARIABLE]))
    if env.get(PASSWORD_VARIABLE):
        if environment is not Environment.DEVELOPMENT:
            log.warning("%s is unsafe outside development; use %s", PASSWORD_VARIABLE, PASSWORD_FILE_VARIABLE)
        return LocalTarget(
            store_url, environment, password=SecretValue(password_variable_bytes(env[PASSWORD_VARIABLE]))
        )
    if store_url is not None:  # its header may say AWS KMS unlocks it; if not, read_password says so
        return LocalTarget(store_url, environment)
    raise UnlockError(_NO_PASSWORD)


def _read_password_file(path: Path) -> bytes:
    """At most PASSWORD_FILE_MAX_BYTES of `path`, as the CLI reads one: a larger file (or
    /dev/zero, which never ends) is refused before it can fill memory."""
    try:
        with path.open("rb") as handle:
            data = handle.read(PASSWORD_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        raise UnlockError(f"password file {path} does not exist") from None
    except OSError as exc:
        raise UnlockError(f"cannot read password file {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > PASSWORD_FILE_MAX_BYTES:
        raise InvalidInputError(
            f"password file {path} is larger than {PASSWORD_FILE_MAX_BYTES} bytes; is {path} the right file?"
        )
    password = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    if not password:
        raise UnlockError(f"password file {path} is empty")
    return password


def _seconds(
    given: float | None, env: Mapping[str, str], variable: str, default: float, *, minimum: float
) -> float:
    if given is None:
        raw = env.get(variable, "").strip()
        if not raw:
            return default
        try:
            given = float(raw)
        except ValueError:
            raise InvalidInputError(f"{variable}={raw!r} is not a number of seconds") from None
    if not isinstance(given, int | float) or isinstance(given, bool):  # "5" failed in a comparison
        raise InvalidInputError(f"{variable} must be a number of seconds, not {type(given).__name__}")
    if not minimum <= given < float("inf"):
        raise InvalidInputError(f"{variable} must be a number of seconds, at least {minimum:g}")
    return float(given)
