"""`purge --older-than TIME [PREFIX]`: destroy for good the secrets deleted before TIME.

`delete` is soft: a deleted secret keeps its values (encrypted) until someone destroys it, which
for a leaked or retired credential may be never. AWS Secrets Manager ends a deletion's recovery
window by erasing the secret; this is that step, run from cron or by hand. Each secret goes only
if it is still deleted, since before TIME, when it is erased (one undeleted meanwhile stays), and
each erasure has its own audit record, appended as it is made.
"""

from __future__ import annotations

import click

from secrets_manager.cli.app import cli, pass_session
from secrets_manager.cli.output import (
    info_line,
    parse_cutoff,
    print_json,
    print_table,
    timestamp,
    warning_line,
)
from secrets_manager.cli.session import Session
from secrets_manager.errors import (
    NotFoundError,
    SecretsManagerError,
    SecretStateError,
    UnsupportedOperationError,
    restated,
)
from secrets_manager.store.base import Capability, SecretMetadata, unsupported_capabilities
from secrets_manager.store.names import validate_prefix


@cli.command()
@click.argument("prefix", required=False, default="")
@click.option(
    "--older-than",
    required=True,
    metavar="TIME",
    help="Only secrets deleted before TIME: an age (30d, 12h) or an ISO 8601 time.",
)
@click.option("--dry-run", is_flag=True, help="List what would be destroyed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_session
def purge(session: Session, prefix: str, older_than: str, dry_run: bool, as_json: bool) -> None:
    """Destroy for good every deleted secret (under PREFIX) deleted before TIME, as AWS ends a
    recovery window. Live secrets are never touched; cannot be undone."""
    session.require_local("purge")
    validate_prefix(prefix)
    cutoff = parse_cutoff(older_than, "--older-than", "give the age a deleted secret may reach, e.g. 30d")
    with session.secret_operation("purge", prefix or None, mutating=not dry_run) as (store, note):
        if Capability.PURGE_DELETED in unsupported_capabilities(store):
            raise UnsupportedOperationError(
                "purge is not supported by this store: AWS Secrets Manager purges a deleted secret "
                "itself at the end of its recovery window; 'destroy NAME --all' ends it early"
            )
        due = [
            meta
            for meta in store.list(prefix, include_deleted=True)
            if meta.deleted is not None and meta.deleted < cutoff
        ]
        _warn_of_names_beyond_the_prefix(prefix, [m.name for m in due], dry_run)
        purged: list[SecretMetadata] = []
        kept: list[str] = []  # undeleted (or deleted again) meanwhile: still there
        gone: list[str] = []  # erased meanwhile by another purge or destroy --all: not there
        for meta in due if not dry_run else ():
            try:
                store.destroy_secret(meta.name, deleted_before=cutoff)
            except SecretStateError:
                kept.append(meta.name)
                continue
            except NotFoundError:
                gone.append(meta.name)
                continue
            except SecretsManagerError as error:
                if not purged:
                    raise
                raise _partly_done(error, [m.name for m in purged], meta.name) from None
            note.erased(meta.name)
            purged.append(meta)
    shown = due if dry_run else purged
    if as_json:
        print_json(
            {
                "dry_run": dry_run,
                "purged": [{"name": m.name, "deleted": timestamp(m.deleted)} for m in shown],
                "left": kept,
                "erased_meanwhile": gone,
            }
        )
        return
    if shown:
        print_table(["NAME", "DELETED"], [[m.name, timestamp(m.deleted)] for m in shown])
    verb = "would destroy" if dry_run else "destroyed"
    info_line(
        f"{verb} {len(shown)} secret{'s' if len(shown) != 1 else ''} deleted before {timestamp(cutoff)}"
    )
    if kept:
        info_line(f"left {', '.join(kept)}: undeleted or changed meanwhile")
    if gone:
        info_line(f"{', '.join(gone)}: erased meanwhile by another purge or destroy --all")


def _warn_of_names_beyond_the_prefix(prefix: str, names: list[str], dry_run: bool) -> None:
    """PREFIX is a plain string prefix, as for `list`: `purge auth` matches `authz/OLD` too. Said
    before anything is erased (and in a dry run), naming those matches, so a namespace meant
    without its '/' does not erase another's secrets unnoticed."""
    if not prefix or prefix.endswith("/"):
        return
    beyond = [name for name in names if name != prefix and name[len(prefix)] != "/"]
    if not beyond:
        return
    shown = ", ".join(beyond[:10]) + (f" and {len(beyond) - 10} more" if len(beyond) > 10 else "")
    verb = "would also destroy" if dry_run else "also destroys"
    warning_line(
        f"'{prefix}' is a plain string prefix: this purge {verb} {shown}, whose names go on past "
        f"'{prefix}' without a '/'; to purge only the secrets under {prefix}/, give '{prefix}/'"
    )


def _partly_done(error: SecretsManagerError, purged: list[str], failed: str) -> SecretsManagerError:
    """The error of a purge that erased some secrets before one failed: the same class (exit
    code), saying which are gone for good, so the message does not read as if nothing was."""
    names = ", ".join(purged[:10]) + (f" and {len(purged) - 10} more" if len(purged) > 10 else "")
    message = (
        f"destroyed {len(purged)} secret{'s' if len(purged) != 1 else ''} ({names}), then "
        f"{failed} failed: {error}; run the same purge again for the rest"
    )
    return restated(error, message)


__all__ = ["purge"]
