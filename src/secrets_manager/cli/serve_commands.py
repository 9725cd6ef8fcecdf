"""`secrets-manager serve --config server.toml`: run the gRPC service on an unlocked store."""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from secrets_manager.audit import AuditLog, refuse_files_of_others
from secrets_manager.cli.app import cli, pass_session
from secrets_manager.cli.password import read_password_file, refuse_password_variable
from secrets_manager.cli.session import Session
from secrets_manager.errors import (
    NotFoundError,
    SecretsManagerError,
    StoreNotFoundError,
    UnsupportedOperationError,
)
from secrets_manager.store.base import Capability, unsupported_capabilities
from secrets_manager.store.url import (
    default_audit_path,
    display_url,
    local_store_files,
    needs_password,
    open_external_store,
    open_store,
)

if TYPE_CHECKING:
    from secrets_manager.service.served import ServedStore


@cli.command()
@click.option("--config", "config_path", required=True, metavar="PATH", help="The server's TOML config file.")
@pass_session
def serve(session: Session, config_path: str) -> None:
    """Serve the store over gRPC with mutual TLS, access control and audit, until SIGTERM.

    It serves the config's store (a file, or a postgresql://… URL; --store and SECRETS_MANAGER_STORE
    only when the config names none). Relative paths in the config (store, policy, password_file,
    audit_file, rotation_schedule, the [tls] files) are relative to the config file's directory,
    wherever serve runs.

    The master password comes from the config's password_file, else the usual sources; a store
    that AWS KMS unlocks (init --kms-key, unlock-with kms) needs none, nor does a Vault or AWS
    store (vault://…, aws-secretsmanager://…: credentials from VAULT_TOKEN or an AppRole, the AWS
    credential chain; password_file is refused there). Vault and AWS keep no change feed: for
    Watch the service polls them, at most every watch_poll_seconds (default 30 s on Vault, 10 s
    on AWS; 0: Watch refused, clients refresh by their cache's TTL) while a stream is open, and at
    once after a change made through it. A password file is read again if 'passwd' and then 'keys rotate
    --root' ran meanwhile: put the new password in it; after 'unlock-with kms' and a root
    rotation it re-unlocks through KMS (AWS credentials). SIGHUP
    reloads the access policy and the [tls] files, e.g. a renewed certificate, at the paths it
    started with (server.toml's own settings need a restart; while serve starts it is ignored);
    SIGTERM stops accepting calls and lets running ones finish. With rotation_schedule in the
    config it also runs due credential rotations (see 'schedule --help')."""
    # gRPC's core writes plain lines of its own (not JSON, naming no peer), and clients could make
    # one per connection or request: a failed TLS handshake at INFO (900 lines a second from one
    # client without a certificate), a request with many headers at ERROR (hpack_encoder.cc
    # "Ignoring key value pair"). None by default; set before the import below starts the core,
    # and an explicit GRPC_VERBOSITY stays (INFO shows why a client's handshake fails).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from secrets_manager.service import load_config, run_server  # gRPC: only for this command
    from secrets_manager.service.server import configure_logging

    # SIGHUP's default ends the process: until run_server makes it reload the policy, a SIGHUP sent
    # while we start (a deploy tool's reload, a closed terminal) is ignored; the policy is read after.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # JSON lines from the start: a warning while the config, policy or store is read (a file
    # others may write, a password in a store URL) was a plain line a log pipeline dropped.
    configure_logging(sys.stderr)
    session.require_local("serve")
    refuse_password_variable(session.environment, session.environ)  # even beside password_file
    config = load_config(Path(config_path), environment=session.environment)
    store_url = config.store or session.store_url
    external = not needs_password(store_url)
    where = f"the store setting of {config_path}" if config.store else "--store"
    if external:
        # Vault and AWS take their credentials from the environment (VAULT_TOKEN or AppRole, the
        # AWS credential chain): a password setting would be ignored, so it is refused instead.
        given = "password_file in " + config_path if config.password_file is not None else None
        if given is None and session.password_file:
            given = "--password-file"
        if given is not None:
            raise UnsupportedOperationError(
                f"{given} is not supported by this store: {display_url(store_url)} ({where}) has no "
                "master password (Vault takes VAULT_TOKEN or an AppRole, AWS its credential chain); "
                "remove it"
            )
    password_file = config.password_file

    def password() -> bytes:  # asked for only if a password unlocks the store (not AWS KMS)
        if password_file is not None:
            return read_password_file(password_file, environment=session.environment)
        return session.password()

    audit_path = config.audit_file or default_audit_path(store_url, environ=session.environ)
    others = [(path, "the store's file") for path in local_store_files(store_url)]
    if password_file is not None:
        others.append((password_file, "the password file"))
    refuse_files_of_others(audit_path, [*others, *session.files_not_for_audit()])
    audit = AuditLog(
        audit_path,
        flush_interval=config.audit_sync_interval_ms / 1000,
        environment=session.environment,
        **session.audit_options(),  # SECRETS_MANAGER_AUDIT_TIMEOUT and _MAX_BYTES, as for every command
    )
    store: ServedStore
    try:
        if external:
            # As the CLI opens it (production refuses plain-http Vault); its audit anchor is kept
            # in the backend under this log's scope.
            store = cast(  # a VaultStore or AwsStore, which serve all the service asks
                "ServedStore",
                open_external_store(
                    str(store_url),
                    environment=session.environment,
                    actor=session.actor,
                    audit_path=audit.path,
                    environ=session.environ,
                ),
            )
        else:
            store = open_store(
                store_url,
                password,
                environment=session.environment,
                actor=session.actor,
                audit_path=audit.path,
                # A file is read again after another process ran passwd and 'keys rotate --root'.
                password_rereadable=password_file is not None or session.password_from_file,
            )
    except StoreNotFoundError as exc:
        if config.store is None:
            raise
        # --store cannot help here: the config's store wins over it.
        raise NotFoundError(
            f"no store at {exc.location} (the store setting of {config_path}); create one with "
            f"'{exc.init_command}', or set store in {config_path} to the store you meant"
        ) from None
    try:
        if config.rotation_schedule is not None and Capability.PENDING_LABEL in unsupported_capabilities(
            store
        ):
            # Every scheduled rotation would fail at its stage: refused now, not once per check.
            raise UnsupportedOperationError(
                f"rotation_schedule (in {config_path}) is not supported by this store: "
                f"{display_url(store_url)} has no 'pending' label (Vault KV v2), so no rotation can be "
                "staged; remove rotation_schedule, and rotate by writing new versions ('store')"
            )
        # As for a change: a durable request record first (a log that cannot be written stops the
        # start), then the outcome: ok once the server listens, or why it could not start.
        event = session.event("serve", source="grpc", peer=config.listen)
        audit.append([replace(event, outcome="pending")], store)

        def listening(_port: int, policy_sha256: str) -> None:
            audit.append([replace(event, policy_sha256=policy_sha256)], store)

        def stopped(summary: dict[str, object]) -> None:
            # The clean stop's record, under the start's request id (docs/audit.md: serve.stop):
            # a start with none after it ended in a crash, a kill or a cut log. In the file when
            # this returns; the shutdown's flush fsyncs it and then anchors it in the store within
            # its bound, so a store that stopped answering does not hold the exit a second time.
            try:
                audit.append([replace(event, operation="serve.stop", stopped=summary)], store, durable=False)
            except SecretsManagerError as exc:  # stopping anyway: said in the service's log
                logging.getLogger("secrets_manager.service").error(
                    "the stop's audit record could not be written",
                    extra={"event": "audit.write_failed", "operation": "serve.stop", "error": str(exc)},
                )

        try:
            run_server(
                config,
                store,
                audit,
                ready=listening,
                stopped=stopped,
                environment=session.environment,
                config_path=Path(config_path).resolve(),
                store_url=store_url,
            )
        except SecretsManagerError as exc:
            if exc.kind != "audit_error":
                audit.append([replace(event, outcome=exc.kind)], store)
            raise
    finally:
        store.close()
