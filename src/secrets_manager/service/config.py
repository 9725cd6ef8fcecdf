"""`server.toml`: where the service listens, its TLS files, policy, store, audit log and unlock source.

    listen = "127.0.0.1:7443"
    store = "/var/lib/secrets-manager/secrets.db"
    policy = "policy.toml"
    audit_file = "/var/log/secrets-manager/audit.jsonl"   # default: beside the store
    password_file = "/run/secrets/master-password"        # or MASTER_PASSWORD_FILE / MASTER_PASSWORD
    metrics_listen = "127.0.0.1:9464"                     # optional Prometheus endpoint
    max_workers = 64                    # each open Watch stream holds one worker
    shutdown_grace_seconds = 10

    [tls]
    cert = "server.pem"
    key = "server-key.pem"
    client_ca = "ca.pem"

Relative paths are relative to the config file. There is no plaintext port: [tls] is required.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secrets_manager.errors import InvalidInputError, NotFoundError

_KNOWN = {
    "listen",
    "store",
    "policy",
    "audit_file",
    "password_file",
    "metrics_listen",
    "max_workers",
    "shutdown_grace_seconds",
    "tls",
}


@dataclass(frozen=True)
class ServerConfig:
    listen: str
    store: str | None
    policy: Path
    tls_cert: Path
    tls_key: Path
    tls_client_ca: Path
    audit_file: Path | None = None
    password_file: Path | None = None
    metrics_listen: str | None = None
    max_workers: int = 64
    shutdown_grace_seconds: float = 10.0


def load_config(path: str | Path) -> ServerConfig:
    """Parse and check a server config file; InvalidInputError names the file and the problem."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"server config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"server config {path}: {exc}") from None
    unknown = set(doc) - _KNOWN
    if unknown:
        raise InvalidInputError(f"server config {path}: unknown setting {sorted(unknown)[0]!r}")
    base = path.parent

    def file(value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise InvalidInputError(f"server config {path}: {what} must be a file path")
        resolved = Path(value).expanduser()
        return resolved if resolved.is_absolute() else base / resolved

    tls = doc.get("tls")
    if not isinstance(tls, dict) or not {"cert", "key", "client_ca"} <= set(tls):
        raise InvalidInputError(
            f"server config {path}: [tls] with cert, key and client_ca is required (mutual TLS only)"
        )
    store = doc.get("store")
    if store is not None and not isinstance(store, str):
        raise InvalidInputError(f"server config {path}: store must be a path or URL")
    if isinstance(store, str) and "://" not in store:
        store = str(file(store, "store"))
    listen = doc.get("listen", "127.0.0.1:7443")
    if not isinstance(listen, str) or ":" not in listen:
        raise InvalidInputError(f"server config {path}: listen must be HOST:PORT")
    workers = doc.get("max_workers", 64)
    grace = doc.get("shutdown_grace_seconds", 10)
    if not isinstance(workers, int) or not 1 <= workers <= 1024:
        raise InvalidInputError(f"server config {path}: max_workers must be 1..1024")
    if not isinstance(grace, int | float) or not 0 <= grace <= 600:
        raise InvalidInputError(f"server config {path}: shutdown_grace_seconds must be 0..600")
    metrics = doc.get("metrics_listen")
    if metrics is not None and (not isinstance(metrics, str) or ":" not in metrics):
        raise InvalidInputError(f"server config {path}: metrics_listen must be HOST:PORT")
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
        shutdown_grace_seconds=float(grace),
    )
