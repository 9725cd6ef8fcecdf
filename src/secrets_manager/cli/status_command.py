"""`secrets-manager status`: the store at a glance, as `vault status` is for a Vault server.

One audited read: where the store is and what kind, what unlocks it, how many secrets in which
namespaces, the oldest current value (the credential longest without a rotation), whether the
audit log verifies, and the recovery shares. Exit 6 when the audit log does not verify, or a value
is stored that its secret's metadata does not list (a `meta/` row rolled back or deleted).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import click

from secrets_manager.audit.anchor import with_fresh_keys
from secrets_manager.cli.app import cli, pass_session
from secrets_manager.cli.metadata_commands import current_value_time
from secrets_manager.cli.output import byte_size, counted, print_json, printable, suggested, timestamp
from secrets_manager.cli.session import Session
from secrets_manager.errors import IntegrityError, SecretsManagerError
from secrets_manager.store import EncryptedStore
from secrets_manager.store.base import expiry_counts
from secrets_manager.store.names import namespace_of
from secrets_manager.store.recovery import recovery_header_problem, recovery_setup
from secrets_manager.store.url import (
    AwsLocation,
    VaultLocation,
    display_url,
    external_location,
    postgres_location,
    sqlite_path,
)


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@pass_session
def status(session: Session, as_json: bool) -> None:
    """Show the store at a glance: kind, unlock, secrets, oldest value, audit log, recovery shares.
    Exit 6 if the audit log does not verify, or a stored value is not listed by its metadata."""
    session.require_local("status")
    doc: dict[str, Any] = {
        "store": _where(session.store_url),
        "kind": _kind(session.store_url),
        "environment": session.environment.value,
        "audit_file": str(session.audit_path),
    }
    audit_problem: str | None = None
    with session.store_operation("status") as (store, _):
        doc["unlocked_by"] = store.unlock_kind if isinstance(store, EncryptedStore) else "backend credentials"
        # Which KMS key: "aws-kms" alone left an operator granting a new replica's host
        # kms:Decrypt, or finding the key a recovery replaces, to read the header by hand.
        doc["kms_key"] = store.kms_key if isinstance(store, EncryptedStore) else None
        refused = store.read_only_error() if isinstance(store, EncryptedStore) else None
        doc["read_only"] = refused is not None
        params = store.kdf_params if isinstance(store, EncryptedStore) else None
        doc["kdf"] = (
            None
            if params is None
            else {
                "algorithm": "argon2id",
                "memory_kib": params.memory_cost_kib,
                "iterations": params.time_cost,
                "lanes": params.parallelism,
            }
        )
        secrets = store.list("", include_deleted=True)
        live = [meta for meta in secrets if meta.deleted is None]
        doc["secrets"] = len(live)
        doc["deleted_secrets"] = len(secrets) - len(live)
        deleted = sorted((meta.deleted, meta.name) for meta in secrets if meta.deleted is not None)
        doc["oldest_deleted"] = (
            {
                "name": deleted[0][1],
                "deleted": timestamp(deleted[0][0]),
                "days": _days_since(deleted[0][0]),
            }
            if deleted
            else None
        )
        doc["namespaces"] = sorted({namespace_of(meta.name) for meta in live})
        doc["expired"], doc["expiring_14d"] = expiry_counts(live, datetime.now(UTC), timedelta(days=14))
        # Values the metadata does not list (a meta/ row rolled back or deleted): keys only.
        doc["unlisted_values"] = store.unlisted_values(secrets) if isinstance(store, EncryptedStore) else None
        stored = sorted((t, meta.name) for meta in live if (t := current_value_time(meta)) is not None)
        doc["oldest_value"] = (
            {
                "name": stored[0][1],
                "stored": timestamp(stored[0][0]),
                "days": _days_since(stored[0][0]),
            }
            if stored
            else None
        )
        log = session.audit_log()
        try:
            anchor = store.audit_anchor()
            doc["audit_records"] = with_fresh_keys(
                store, lambda keys: log.verify(keys, anchor, anchor_required=not store.audit_anchor_scoped)
            )
        except IntegrityError as exc:
            audit_problem = str(exc)
            doc["audit_records"] = None
        files = log.files()
        doc["audit_files"] = len(files)
        doc["audit_bytes"] = sum(path.stat().st_size for path in files if path.exists())
        doc["audit_first_record"] = log.first_seq() if audit_problem is None else None
        doc["audit_verified"] = audit_problem is None
        doc["recovery_shares"] = _recovery(store) if isinstance(store, EncryptedStore) else None
    if as_json:
        print_json(doc)
    else:
        _print(doc, audit_problem)
    if audit_problem is not None:
        raise IntegrityError(f"the audit log does not verify: {audit_problem}")
    if doc["unlisted_values"]:
        name, versions = next(iter(doc["unlisted_values"].items()))
        numbers = ", ".join(map(str, versions))
        more = len(doc["unlisted_values"]) - 1
        raise IntegrityError(
            f"secret {name!r} has stored values its metadata does not list (version {numbers})"
            + (f", and {more} other secret(s) too" if more else "")
            + ": its metadata was rolled back to an older copy or deleted, so 'get' may serve an "
            "older value; check it against a backup, and to go on erase those values with "
            f"'{suggested('destroy', name, *(w for n in versions for w in ('--version', str(n))))}'"
        )


def _where(url: str | None) -> str:
    """Where the store is: a store file's absolute path (the default store's too), else its URL
    without secrets."""
    if _kind(url) == "sqlite":
        return str(sqlite_path(url).absolute())
    return display_url(url)


def _kind(url: str | None) -> str:
    external = external_location(url)
    if isinstance(external, VaultLocation):
        return "vault"
    if isinstance(external, AwsLocation):
        return "aws-secretsmanager"
    return "postgresql" if postgres_location(url) is not None else "sqlite"


def _recovery(store: EncryptedStore) -> dict[str, Any] | None:
    setup = recovery_setup(store)
    if setup is None:
        return None
    try:
        problem = recovery_header_problem(store, setup)
    except SecretsManagerError as exc:
        problem = str(exc)
    return {"threshold": setup.threshold, "shares": setup.shares, "problem": problem}


def _print(doc: dict[str, Any], audit_problem: str | None) -> None:
    oldest = doc["oldest_value"]
    recovery = doc["recovery_shares"]
    lines = [
        ("store", f"{doc['store']} ({doc['kind']}{', read-only' if doc['read_only'] else ''})"),
        ("environment", doc["environment"]),
        ("unlocked by", doc["unlocked_by"] + (f" ({doc['kms_key']})" if doc["kms_key"] else "")),
        *(
            []
            if doc["kdf"] is None
            else [
                (
                    "password KDF",
                    ", ".join(
                        (
                            "Argon2id",
                            f"{doc['kdf']['memory_kib']} KiB",
                            counted(doc["kdf"]["iterations"], "iteration"),
                            counted(doc["kdf"]["lanes"], "lane"),
                        )
                    ),
                )
            ]
        ),
        (
            "secrets",
            f"{doc['secrets']} in {len(doc['namespaces'])} namespace(s)"
            + (f" ({', '.join(doc['namespaces'])})" if doc["namespaces"] else "")
            + (f", {doc['deleted_secrets']} deleted" if doc["deleted_secrets"] else ""),
        ),
        *(
            []
            if doc["oldest_deleted"] is None
            else [
                (
                    "oldest deletion",
                    f"{doc['oldest_deleted']['name']}, deleted {doc['oldest_deleted']['deleted']} "
                    f"({counted(doc['oldest_deleted']['days'], 'day')} ago; "
                    "'purge --older-than' erases them)",
                )
            ]
        ),
        (
            "expiry",
            f"{doc['expired']} expired, {doc['expiring_14d']} "
            f"{'expires' if doc['expiring_14d'] == 1 else 'expire'} within 14 days"
            + (" ('list --expiring 14d -l' names them)" if doc["expired"] or doc["expiring_14d"] else ""),
        ),
        (
            "oldest value",
            "-"
            if oldest is None
            else f"{oldest['name']}, stored {oldest['stored']} ({counted(oldest['days'], 'day')} ago)",
        ),
        (
            "stored values",
            "n/a (the backend keeps its own)"
            if doc["unlisted_values"] is None
            else "all listed by their metadata"
            if not doc["unlisted_values"]
            else "; ".join(
                f"{name} version {', '.join(map(str, versions))} not listed by its metadata"
                for name, versions in doc["unlisted_values"].items()
            ),
        ),
        (
            "audit log",
            f"{doc['audit_file']}: "
            + (
                f"{counted(doc['audit_records'], 'record')} in {counted(doc['audit_files'], 'file')}, "
                f"{byte_size(doc['audit_bytes'])}, verified"
                + (
                    f" (from record {doc['audit_first_record']}; earlier ones pruned)"
                    if (doc["audit_first_record"] or 1) > 1
                    else ""
                )
                if audit_problem is None
                else "DOES NOT VERIFY"
            ),
        ),
        (
            "recovery shares",
            "n/a (the backend keeps its own)"
            if doc["kind"] in ("vault", "aws-secretsmanager")
            else "none"
            if recovery is None
            else f"{recovery['threshold']} of {recovery['shares']}"
            + (f"; {recovery['problem']}" if recovery["problem"] else ""),
        ),
    ]
    for field_name, value in lines:
        click.echo(f"{field_name + ':':<17}{printable(str(value))}")


def _days_since(moment: datetime) -> int:
    """Whole days from `moment` to now; 0 for a moment ahead of this clock (written by a host whose
    clock is ahead, or before this one was stepped back), which was "-1 days ago"."""
    return max(0, (datetime.now(UTC) - moment).days)
