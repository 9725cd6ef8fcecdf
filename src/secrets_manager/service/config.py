"""`server.toml`: where the service listens, its TLS files, policy, store, audit log and unlock source.

    listen = "127.0.0.1:7443"                             # HOST:PORT; port 0..65535 (0: any free)
    store = "/var/lib/secrets-manager/secrets.db"
    policy = "policy.toml"
    audit_file = "/var/log/secrets-manager/audit.jsonl"   # default: beside the store
    password_file = "/run/secrets/master-password"        # or MASTER_PASSWORD_FILE / MASTER_PASSWORD
    metrics_listen = "127.0.0.1:9464"                     # optional Prometheus endpoint
    max_workers = 256                   # threads for calls; each open Watch stream holds one
    max_watch_streams = 240             # default: max_workers - 16 (at least 1)
    shutdown_grace_seconds = 10
    audit_sync = "interval"             # or "always"; see below
    audit_sync_interval_ms = 10
    rotation_schedule = "rotation.toml"  # optional: due credential rotations (service/schedule.py)
    rotation_check_seconds = 60          # how often the schedule is read and checked
    watch_poll_seconds = 10              # Vault/AWS stores: how often Watch reads the backend

    [tls]
    cert = "server.pem"
    key = "server-key.pem"
    client_ca = "ca.pem"

    [limits]                            # per certificate identity; reloaded on SIGHUP
    requests_per_second = 100           # sustained rate; 0: no rate limit
    request_burst = 500                 # requests at once above the rate (the bucket's size)
    watch_streams_per_identity = 120    # default: half of max_watch_streams (at least 1)
    throttled_summary_seconds = 60      # how often throttled requests are summed up in the audit log

Relative paths are relative to the config file. There is no plaintext port: [tls] is required.

Watch streams. Each open Watch stream (every SDK client holds one) occupies one of the
`max_workers` threads for as long as it is open, waiting for changes (one poller reads the store's
change feed for all of them). `max_watch_streams` caps them below `max_workers` so that other calls
always find a free thread; a Watch beyond the cap is refused with RESOURCE_EXHAUSTED (the SDK keeps
serving from its cache and retries with backoff). It must be 1..max_workers-1 (1 if max_workers is
1); the default leaves 16 threads for other calls. Waiting threads are cheap, so to serve more
clients raise both settings.

Per-identity limits ([limits], service/limits.py). Each client certificate identity has a token
bucket: `request_burst` requests at once, refilled at `requests_per_second`. A request past it is
refused at once with RESOURCE_EXHAUSTED ("throttled; retry later"), before the policy is asked or
the store read; the SDK retries it with backoff, the CLI says the service is throttling its
identity (exit 1). Throttled requests are not audited one by one (Vault's rate limit quotas are
not either, by default): every `throttled_summary_seconds` one record per throttled identity
(operation `throttled`) gives their count by method, so a client refused 1,400 times a second no
longer writes 780 KB/s of audit log (docs/audit.md). The defaults are far above a normal client
(the SDK reads once and then follows its Watch stream; a fleet starting at once sharing one
identity takes the burst) and far below what one runaway client sends (a loop with no sleep: a
few thousand a second). `watch_streams_per_identity` keeps one identity from holding every Watch
slot: by default half of `max_watch_streams`. The section is read again on SIGHUP (the rest of
server.toml is not); a section that no longer loads keeps the limits in force.

Watch on a Vault or AWS store. Neither keeps a log of its changes, so the service polls them for
its Watch streams: one snapshot of the store (AWS: ListSecrets, one request per 100 secrets; Vault:
a LIST per folder and a metadata read per secret) at most every `watch_poll_seconds` (default 10 s
on AWS, 30 s on Vault: 6 and 204 requests a minute at 100 secrets), only while a stream is open,
and at once after a change made through the service. 0 turns Watch off on such a store (clients
then refresh by TTL). Our own stores have a change feed and ignore the setting.

Audit durability. Every request's audit record is written to the audit file before the response
is sent; a change (put, delete, undelete) also has its records fsynced before and after it
happens, always. For reads, `audit_sync = "interval"` (the default) fsyncs the records of every
read answered in the last `audit_sync_interval_ms` together, so a crash of the service loses no
record and a power cut at most that many milliseconds of read records (Vault's file audit device
never fsyncs); `audit_sync = "always"` fsyncs before every response, at about 1.5 times the
latency (bench/service.py).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeGuard

from secrets_manager.environment import Environment, loose_file_problem, read_in_directory
from secrets_manager.errors import InvalidInputError, file_not_found

_KNOWN = {
    "listen",
    "store",
    "policy",
    "audit_file",
    "password_file",
    "metrics_listen",
    "max_workers",
    "max_watch_streams",
    "shutdown_grace_seconds",
    "tls",
    "audit_sync",
    "audit_sync_interval_ms",
    "rotation_schedule",
    "rotation_check_seconds",
    "watch_poll_seconds",
    "limits",
}
_LIMITS_KNOWN = {
    "requests_per_second",
    "request_burst",
    "watch_streams_per_identity",
    "throttled_summary_seconds",
}
DEFAULT_REQUESTS_PER_SECOND = 100.0
DEFAULT_REQUEST_BURST = 500
DEFAULT_THROTTLED_SUMMARY_SECONDS = 60.0
_TLS_KNOWN = {"cert", "key", "client_ca"}
MAX_CONFIG_BYTES = 1 << 20  # a server config larger than this is a wrong file
AUDIT_SYNC_MODES = ("interval", "always")
DEFAULT_MAX_WORKERS = 256
WORKERS_KEPT_FROM_WATCH = 16  # default max_watch_streams: max_workers minus this, at least 1
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Limits:
    """server.toml's [limits]: per certificate identity (service/limits.py)."""

    requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND  # 0: no rate limit
    request_burst: int = DEFAULT_REQUEST_BURST
    watch_streams_per_identity: int | None = None  # None: half the Watch stream limit, at least 1
    throttled_summary_seconds: float = DEFAULT_THROTTLED_SUMMARY_SECONDS

    def watch_streams_of(self, watch_stream_limit: int) -> int:
        """How many Watch streams one identity may hold: the setting, by default half of all."""
        if self.watch_streams_per_identity is not None:
            return self.watch_streams_per_identity
        return max(1, watch_stream_limit // 2)


@dataclass(frozen=True)
class ServerConfig:
    listen: str
    store: str | None = field(repr=False)  # a postgresql:// URL may hold a password
    policy: Path
    tls_cert: Path
    tls_key: Path
    tls_client_ca: Path
    audit_file: Path | None = None
    password_file: Path | None = None
    metrics_listen: str | None = None
    max_workers: int = DEFAULT_MAX_WORKERS
    max_watch_streams: int | None = None  # None: `watch_stream_limit`'s default
    shutdown_grace_seconds: float = 10.0
    audit_sync: str = "interval"
    audit_sync_interval_ms: int = 10
    rotation_schedule: Path | None = None
    rotation_check_seconds: float = 60.0
    watch_poll_seconds: float | None = None  # None: the store's default (Vault 30 s, AWS 10 s)
    limits: Limits = field(default_factory=Limits)  # taken again at SIGHUP

    @property
    def watch_stream_limit(self) -> int:
        """How many Watch streams may be open at once: `max_watch_streams`, by default
        `max_workers` - 16 (at least 1)."""
        if self.max_watch_streams is not None:
            return self.max_watch_streams
        return max(1, self.max_workers - WORKERS_KEPT_FROM_WATCH)


def load_config(path: str | Path, *, environment: Environment | None = None) -> ServerConfig:
    """Parse and check a server config file; InvalidInputError names the file and the problem.

    With `environment` (serve's), a file whose writer could point the service at a policy, CA or
    schedule of their own (another user's, writable by group or others, in a directory they may
    write) is refused in production and a warning elsewhere (`Environment.guard`)."""
    path = Path(path)
    try:
        data, found, folder = read_in_directory(path, MAX_CONFIG_BYTES)
        if environment is not None:
            environment.guard(loose_file_problem(path, found, "server config", folder=folder))
        if len(data) > MAX_CONFIG_BYTES:
            raise InvalidInputError(f"server config {path} is larger than {MAX_CONFIG_BYTES} bytes")
        doc = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise file_not_found("server config", path) from None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, unreadable, not UTF-8
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidInputError(f"server config {path}: cannot read it ({reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"server config {path}: {exc}") from None
    unknown = set(doc) - _KNOWN
    if unknown:
        setting = sorted(unknown)[0]
        # A table's setting written above its table (throttled_summary_seconds at the top, as
        # docs/audit.md named it without its table): say where it goes, not only that it is unknown.
        table = "limits" if setting in _LIMITS_KNOWN else "tls" if setting in _TLS_KNOWN else None
        where = f"; it is a [{table}] setting: put it under the [{table}] line" if table else ""
        raise InvalidInputError(f"server config {path}: unknown setting {setting!r}{where}")
    # Absolute, so what the start line and errors name is the file whatever serve's directory is
    # (`--config server.toml` logged "audit_file": "log/audit.jsonl", relative to a directory it
    # did not name: no path a log shipper could follow).
    base = path.absolute().parent

    def file(value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise InvalidInputError(f"server config {path}: {what} must be a file path")
        if "\x00" in value:  # a "\u0000": no file has it (open() raised ValueError, an internal error)
            raise InvalidInputError(
                f"server config {path}: {what} contains a NUL character, which no path can hold"
            )
        resolved = Path(value).expanduser()
        return resolved if resolved.is_absolute() else base / resolved

    tls = doc.get("tls")
    if not isinstance(tls, dict) or not _TLS_KNOWN.issubset(tls):
        raise InvalidInputError(
            f"server config {path}: [tls] with cert, key and client_ca is required (mutual TLS only)"
        )
    unknown = set(tls) - _TLS_KNOWN
    if unknown:  # a typo (verify_client = false) must not pass for a setting in force
        raise InvalidInputError(
            f"server config {path}: unknown setting {'tls.' + sorted(unknown)[0]!r}; [tls] has only "
            "cert, key and client_ca (client certificates are always required)"
        )
    store = doc.get("store")
    if store is not None and not isinstance(store, str):
        raise InvalidInputError(f"server config {path}: store must be a path or URL")
    if isinstance(store, str) and "\x00" in store:
        raise InvalidInputError(
            f"server config {path}: store contains a NUL character, which no path or URL can hold"
        )
    if isinstance(store, str) and "://" not in store:
        store = str(file(store, "store"))
    listen = doc.get("listen", "127.0.0.1:7443")
    if not _is_host_port(listen, lowest_port=0):
        raise InvalidInputError(
            f"server config {path}: listen must be HOST:PORT with a port of 0..65535 (0: any free port)"
        )
    workers = doc.get("max_workers", DEFAULT_MAX_WORKERS)
    grace = doc.get("shutdown_grace_seconds", 10)
    if not _is_int(workers) or not 1 <= workers <= 1024:
        raise InvalidInputError(f"server config {path}: max_workers must be 1..1024")
    watch_streams = doc.get("max_watch_streams")
    watch_upper = max(1, workers - 1)
    if watch_streams is not None and (not _is_int(watch_streams) or not 1 <= watch_streams <= watch_upper):
        raise InvalidInputError(
            f"server config {path}: max_watch_streams must be 1..{watch_upper} "
            "(below max_workers, so other calls always find a free worker)"
        )
    if not _is_number(grace) or not 0 <= grace <= 600:
        raise InvalidInputError(f"server config {path}: shutdown_grace_seconds must be 0..600")
    audit_sync = doc.get("audit_sync", "interval")
    if audit_sync not in AUDIT_SYNC_MODES:
        raise InvalidInputError(f'server config {path}: audit_sync must be "interval" or "always"')
    interval = doc.get("audit_sync_interval_ms", 10)
    if not _is_int(interval) or not 1 <= interval <= 1000:
        raise InvalidInputError(f"server config {path}: audit_sync_interval_ms must be 1..1000")
    check = doc.get("rotation_check_seconds", 60)
    if not _is_number(check) or not 0.1 <= check <= 86400:
        raise InvalidInputError(f"server config {path}: rotation_check_seconds must be 0.1..86400")
    watch_poll = doc.get("watch_poll_seconds")
    if watch_poll is not None and (
        not _is_number(watch_poll) or not (watch_poll == 0 or 0.2 <= watch_poll <= 3600)
    ):
        raise InvalidInputError(
            f"server config {path}: watch_poll_seconds must be 0 (no Watch on a Vault or AWS store) "
            "or 0.2..3600"
        )
    metrics = doc.get("metrics_listen")
    if metrics is not None and not _is_host_port(metrics, lowest_port=1):
        raise InvalidInputError(
            f"server config {path}: metrics_listen must be HOST:PORT with a port of 1..65535"
        )
    limits = _limits(doc.get("limits", {}), path, watch_upper)
    return ServerConfig(
        listen=listen,
        store=store,
        policy=file(doc.get("policy"), "policy"),
        tls_cert=file(tls["cert"], "tls.cert"),
        tls_key=file(tls["key"], "tls.key"),
        tls_client_ca=file(tls["client_ca"], "tls.client_ca"),
        audit_file=file(doc["audit_file"], "audit_file") if "audit_file" in doc else None,
        password_file=file(doc["password_file"], "password_file") if "password_file" in doc else None,
        metrics_listen=metrics,
        max_workers=workers,
        max_watch_streams=watch_streams,
        shutdown_grace_seconds=float(grace),
        audit_sync=audit_sync,
        audit_sync_interval_ms=interval,
        rotation_schedule=(
            file(doc["rotation_schedule"], "rotation_schedule") if "rotation_schedule" in doc else None
        ),
        rotation_check_seconds=float(check),
        watch_poll_seconds=None if watch_poll is None else float(watch_poll),
        limits=limits,
    )


def _limits(section: object, path: Path, watch_upper: int) -> Limits:
    """[limits], checked: InvalidInputError names the setting and its range."""
    if not isinstance(section, dict):
        raise InvalidInputError(f"server config {path}: limits must be a table ([limits])")
    unknown = set(section) - _LIMITS_KNOWN
    if unknown:
        raise InvalidInputError(
            f"server config {path}: unknown setting {'limits.' + sorted(unknown)[0]!r}; [limits] has "
            + ", ".join(sorted(_LIMITS_KNOWN))
        )
    rate = section.get("requests_per_second", DEFAULT_REQUESTS_PER_SECOND)
    if not _is_number(rate) or not (rate == 0 or 0.01 <= rate <= 1_000_000):
        raise InvalidInputError(
            f"server config {path}: limits.requests_per_second must be 0 (no limit) or 0.01..1000000"
        )
    burst = section.get("request_burst", DEFAULT_REQUEST_BURST)
    if not _is_int(burst) or not 1 <= burst <= 1_000_000:
        raise InvalidInputError(f"server config {path}: limits.request_burst must be 1..1000000")
    watch = section.get("watch_streams_per_identity")
    if watch is not None and (not _is_int(watch) or not 1 <= watch <= watch_upper):
        raise InvalidInputError(
            f"server config {path}: limits.watch_streams_per_identity must be 1..{watch_upper}"
        )
    summary = section.get("throttled_summary_seconds", DEFAULT_THROTTLED_SUMMARY_SECONDS)
    if not _is_number(summary) or not 1 <= summary <= 3600:
        raise InvalidInputError(f"server config {path}: limits.throttled_summary_seconds must be 1..3600")
    return Limits(float(rate), burst, watch, float(summary))


_TOML_NAMES = {"tls_cert": "tls.cert", "tls_key": "tls.key", "tls_client_ca": "tls.client_ca"}


def changed_settings(before: ServerConfig, after: ServerConfig) -> list[str]:
    """The settings (as server.toml names them: `listen`, `tls.client_ca`) whose value differs
    between two loads of one config file, but for [limits], which SIGHUP takes; never the values
    (a store URL may hold a password)."""
    return [
        _TOML_NAMES.get(each.name, each.name)
        for each in fields(ServerConfig)
        if each.name not in RELOADED_SETTINGS and getattr(before, each.name) != getattr(after, each.name)
    ]


RELOADED_SETTINGS = frozenset({"limits"})  # taken at SIGHUP: not a change that needs a restart


def _is_int(value: object) -> TypeGuard[int]:
    """An integer setting: a TOML integer, not a boolean (bool is an int in Python: true passed as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    """A number of seconds: an integer or a float, not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_host_port(value: object, *, lowest_port: int) -> bool:
    """HOST:PORT with an ASCII decimal port in range: gRPC takes "127.0.0.1:70000" and silently
    listens on another port (70000 mod 65536)."""
    if not isinstance(value, str):
        return False
    host, _, port = value.rpartition(":")
    if not host.isprintable() or any(char.isspace() for char in host):  # gRPC cut "127.0.0.1\x00x" short
        return False
    return bool(host) and _PORT.fullmatch(port) is not None and lowest_port <= int(port) <= 65535
