"""`secrets-manager serve --config server.toml`: run the gRPC service on an unlocked store."""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from pathlib import Path

import click

from secrets_manager.audit import AuditLog, refuse_files_of_others
from secrets_manager.cli.app import Session, cli, pass_session
from secrets_manager.cli.password import read_password_file, refuse_password_variable
from secrets_manager.errors import (
    NotFoundError,
    SecretsManagerError,
    StoreNotFoundError,
    UnsupportedOperationError,
)
from secrets_manager.store.url import (
    default_audit_path,
    display_url,
    local_store_files,
    needs_password,
    open_store,
)


@cli.command()
@click.option("--config", "config_path", required=True, metavar="PATH", help="The server's TOML config file.")
@pass_session
def serve(session: Session, config_path: str) -> None:
    """Serve the store over gRPC with mutual TLS, access control and audit, until SIGTERM.

    The master password comes from the config's password_file, else the usual sources; a store
    that AWS KMS unlocks (init --kms-key, unlock-with kms) needs none. A password file is read
    again if 'passwd' and then 'keys rotate --root' ran meanwhile: put the new password in it;
    after 'unlock-with kms' and a root rotation it re-unlocks through KMS (AWS credentials). SIGHUP
    reloads the access policy and the [tls] files, e.g. a renewed certificate (while serve starts
    it is ignored); SIGTERM stops accepting calls and
    lets running ones finish. With rotation_schedule in the config it also runs due credential
    rotations (see 'schedule --help')."""
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
    if not needs_password(store_url):
        # open_store would say "opening ... with a master password is not supported", which sent
        # an operator who had just restored into Vault or AWS to look for a password to remove.
        where = f"the store setting of {config_path}" if config.store else "--store"
        raise UnsupportedOperationError(
            f"serving {display_url(store_url)} ({where}) is not supported by this store: serve runs on "
            "an encrypted store, a SQLite file or PostgreSQL, only for now; point store at one (restore "
            "a backup into it), and read Vault or AWS with the CLI (docs/stores.md)"
        )
    password_file = config.password_file

    def password() -> bytes:  # asked for only if a password unlocks the store (not AWS KMS)
        if password_file is not None:
            return read_password_file(password_file, environment=session.environment)
        return session.password()

    audit_path = config.audit_file or default_audit_path(store_url)
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
    try:
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
        # As for a change: a durable request record first (a log that cannot be written stops the
        # start), then the outcome: ok once the server listens, or why it could not start.
        event = session.event("serve", source="grpc", peer=config.listen)
        audit.append([replace(event, outcome="pending")], store)

        def listening(_port: int) -> None:
            audit.append([event], store)

        try:
            run_server(
                config,
                store,
                audit,
                ready=listening,
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
