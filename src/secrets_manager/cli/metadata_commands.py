"""`list`, `history` and `metadata`: what the store knows about secrets (names, versions, labels,
descriptions, tags, expiry), never their values; `metadata` also changes it without a new version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from secrets_manager.cli.app import cli, parse_tags, pass_session
from secrets_manager.cli.completion import complete_secret_names
from secrets_manager.cli.output import (
    expiry_text,
    info_line,
    parse_cutoff,
    parse_deadline,
    print_json,
    print_table,
    printable,
    suggested,
    timestamp,
    warning_line,
)
from secrets_manager.cli.session import Session, is_remote_store
from secrets_manager.errors import InvalidInputError, NothingToChangeError
from secrets_manager.store import SecretMetadata, SecretStore, validate_name
from secrets_manager.store.base import (
    MAX_MAX_VERSIONS,
    MIN_MAX_VERSIONS,
    checked_max_versions,
    checked_metadata_update,
    max_versions_hide_at_once,
)
from secrets_manager.store.names import validate_prefix


@cli.command("list")
@click.argument("prefix", required=False, default="")
@click.option(
    "--long",
    "-l",
    "long_format",
    is_flag=True,
    help="Show version, update time, state (active or deleted) and description.",
)
@click.option("--deleted", is_flag=True, help="Include soft-deleted secrets.")
@click.option(
    "--older-than",
    metavar="TIME",
    help="Only secrets whose current value was stored before TIME (ISO 8601, or an age such as 90d): "
    "the ones not rotated since.",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="KEY[=VALUE]",
    help="Only secrets with this tag (KEY), or with it set to exactly VALUE (KEY=VALUE); repeatable, "
    "all must hold.",
)
@click.option(
    "--description",
    "description_text",
    metavar="TEXT",
    help="Only secrets whose description contains TEXT, ignoring case.",
)
@click.option(
    "--expiring",
    metavar="WITHIN",
    help="Only secrets whose current version expires within WITHIN (an age such as 14d, or an ISO 8601 "
    "time) or has expired; with -l, their expiry.",
)
@click.option("--json", "as_json", is_flag=True, help="Print metadata as JSON (never values).")
@pass_session
def list_command(
    session: Session,
    prefix: str,
    long_format: bool,
    deleted: bool,
    older_than: str | None,
    tags: tuple[str, ...],
    description_text: str | None,
    expiring: str | None,
    as_json: bool,
) -> None:
    """List secret names (never values), optionally only those starting with PREFIX.

    --tag and --description filter like the tag-key, tag-value and description filters of AWS's
    list-secrets; all filters given must hold."""
    validate_prefix(prefix)
    cutoff = (
        parse_cutoff(older_than, "--older-than", "leave --older-than out to list every secret")
        if older_than
        else None
    )
    wanted_tags = parse_tag_filters(tags)
    horizon = None if expiring is None else parse_deadline(expiring, "--expiring")
    if description_text == "":
        raise InvalidInputError("--description '' would match every secret; give some text to look for")
    with session.secret_operation("list", prefix or None) as (store, _):
        secrets = store.list(prefix, include_deleted=deleted)
    # Filtered here, on what every store (and ListSecrets over --server) returns: the same on all.
    if cutoff is not None:
        secrets = [
            meta for meta in secrets if (stored := current_value_time(meta)) is not None and stored < cutoff
        ]
    if wanted_tags:
        secrets = [meta for meta in secrets if has_tags(meta, wanted_tags)]
    if description_text is not None:
        needle = description_text.casefold()
        secrets = [meta for meta in secrets if needle in meta.description.casefold()]
    if horizon is not None:
        secrets = sorted(
            (meta for meta in secrets if meta.expires is not None and meta.expires <= horizon),
            key=lambda meta: (meta.expires, meta.name),
        )
    if as_json:
        print_json([metadata_doc(meta) for meta in secrets])
    elif long_format:
        now = datetime.now(UTC)
        print_table(
            ["NAME", "VERSION", "UPDATED", "STATE", "DESCRIPTION", *(["EXPIRES"] if horizon else [])],
            [
                [
                    meta.name,
                    str(meta.current_version or "-"),
                    timestamp(meta.updated),
                    "deleted" if meta.deleted else "active",
                    meta.description,
                    *([expiry_text(meta.expires, now)] if horizon else []),
                ]
                for meta in secrets
            ],
            free_text=["DESCRIPTION"],
        )
    else:
        for meta in secrets:
            click.echo(meta.name)


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option("--json", "as_json", is_flag=True, help="Print metadata and versions as JSON.")
@pass_session
def history(session: Session, name: str, as_json: bool) -> None:
    """Show the versions of NAME: when, by whom, labels, destroyed or not (never values)."""
    validate_name(name)
    with session.secret_operation("history", name) as (store, _):
        meta = store.describe(name)
    if as_json:
        print_json(metadata_doc(meta))
        return
    now = datetime.now(UTC)
    print_table(
        ["VERSION", "CREATED", "CREATED BY", "LABELS", "STATE", "EXPIRES"],
        [
            [
                str(v.version),
                timestamp(v.created),
                v.created_by,
                ",".join(v.labels),
                "destroyed" if v.destroyed else "stored",
                expiry_text(meta.expires, now) if v.version == meta.current_version else "",
            ]
            for v in meta.versions
        ],
        free_text=["CREATED BY"],
    )


@cli.command("metadata")
@click.argument("name", shell_complete=complete_secret_names)
@click.option("--description", metavar="TEXT", help="Set the description ('' clears it).")
@click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Add or change a tag (repeatable); others stay."
)
@click.option("--untag", "untags", multiple=True, metavar="KEY", help="Remove a tag (repeatable).")
@click.option(
    "--max-versions",
    type=int,
    metavar="N",
    help=f"Keep at most N versions ({MIN_MAX_VERSIONS} to {MAX_MAX_VERSIONS}); if fewer than are kept now, "
    "the oldest unlabelled ones go at the next write (on AWS they are hidden at once).",
)
@click.option(
    "--expires",
    metavar="TIME",
    help="When the current version stops working: an ISO 8601 time or an age from now such as 90d (a past "
    "time records an expiry learnt late).",
)
@click.option("--no-expiry", is_flag=True, help="Forget the current version's expiry.")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON (never values).")
@pass_session
def metadata_command(
    session: Session,
    name: str,
    description: str | None,
    tags: tuple[str, ...],
    untags: tuple[str, ...],
    max_versions: int | None,
    expires: str | None,
    no_expiry: bool,
    as_json: bool,
) -> None:
    """Show NAME's description, tags, max versions, expiry and state; or change them with
    --description, --tag, --untag, --max-versions, --expires and --no-expiry without writing a new
    version (like AWS's update-secret and tag-resource, and Vault's 'kv metadata put')."""
    validate_name(name)
    if expires is not None and no_expiry:
        raise InvalidInputError("give --expires or --no-expiry, not both")
    expiry = None if expires is None else parse_deadline(expires, "--expires")
    expiry_given = expiry is not None or no_expiry
    if description is None and not tags and not untags and max_versions is None and not expiry_given:
        with session.secret_operation("history", name) as (store, _):
            meta = store.describe(name)
        if as_json:
            print_json(metadata_doc(meta))
        else:
            print_metadata(meta)
        return
    if as_json:
        raise InvalidInputError(
            "--json shows the metadata; give it without --description, --tag, --untag, --max-versions, "
            "--expires or --no-expiry"
        )
    set_tags = parse_tags(tags)
    checked_max_versions(name, max_versions)
    absent: list[str] | None = None  # the --untag keys the secret did not have; None: not known
    unchanged = False  # the store refused the update as one that changes nothing
    with session.secret_operation("metadata", name, mutating=True) as (store, _):
        if untags and not is_remote_store(store):  # a service's describe needs `list`
            tags_before = store.describe(name).tags
            absent = sorted({key for key in untags if key not in tags_before})
        nothing_to_do = (
            absent is not None
            and len(absent) == len(set(untags))
            and description is None
            and not set_tags
            and max_versions is None
            and not expiry_given
        )
        if nothing_to_do:  # removing only tags it does not have changes nothing, `updated` included
            checked_metadata_update(name, description, set_tags, untags, max_versions)  # as the store would
        else:
            try:
                store.update_metadata(
                    name,
                    description=description,
                    set_tags=set_tags,
                    remove_tags=untags,
                    max_versions=max_versions,
                    expires=expiry,
                    clear_expiry=no_expiry,
                )
            except NothingToChangeError:  # already as asked (the store or service checked): said below
                absent = sorted(set(untags))  # a tag it had would have been a change
                unchanged = True
    removed = len(set(untags)) - len(absent or [])
    already = " (already so)" if unchanged else ""
    changed = [
        *(
            []
            if description is None
            else [("description cleared" if not description else "description set") + already]
        ),
        *([f"{len(set_tags)} tag(s) set{already}"] if set_tags else []),
        *([f"{removed} tag(s) removed"] if removed else []),
        *([f"no tag {', '.join(map(repr, absent))} to remove (it was not there)"] if absent else []),
        *(["a tag not set is ignored"] if untags and absent is None else []),
        *([] if max_versions is None else [f"max versions set to {max_versions}{already}"]),
        *([] if expiry is None else [f"expiry set to {timestamp(expiry)}{already}"]),
        *(["expiry cleared" + already] if no_expiry else []),
    ]
    pruning = "" if unchanged else _pruning(store, max_versions)
    info_line(f"updated the metadata of {name}: {', '.join(changed)} (no new version{pruning})")
    if expiry is not None and expiry <= datetime.now(UTC):
        warning_line(
            f"{timestamp(expiry)} is past: the current version of {name} counts as expired; store "
            f"the new credential with '{suggested('store', name, '--expires', 'TIME')}'"
        )


def _pruning(store: SecretStore, max_versions: int | None) -> str:
    """When a new max_versions takes effect, which depends on the store."""
    if max_versions is None:
        return ""
    if max_versions_hide_at_once(store):
        return "; versions past it are hidden at once (AWS keeps them: a higher limit shows them again)"
    at_next_write = "; the next write prunes the oldest unlabelled versions past it"
    if is_remote_store(store):  # the service's store is not known here
        return f"{at_next_write} (a service on AWS hides them at once)"
    return at_next_write


def parse_tag_filters(tags: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """`list --tag` arguments as (key, value) pairs: the value None for a bare KEY (the tag is set,
    whatever its value). The first '=' ends the key, as in `store --tag`."""
    wanted: list[tuple[str, str | None]] = []
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not key:
            raise InvalidInputError(f"--tag {tag!r} names no tag key; write --tag KEY or --tag KEY=VALUE")
        wanted.append((key, value if sep else None))
    return wanted


def has_tags(meta: SecretMetadata, wanted: list[tuple[str, str | None]]) -> bool:
    """Whether `meta` has every tag in `wanted` (with exactly that value where one is given)."""
    return all(key in meta.tags and value in (None, meta.tags[key]) for key, value in wanted)


def current_value_time(meta: SecretMetadata) -> datetime | None:
    """When the current version was stored (None without one): what a rotation moves, unlike
    `updated`, which a metadata change moves too."""
    return next((v.created for v in meta.versions if v.version == meta.current_version), None)


def print_metadata(meta: SecretMetadata) -> None:
    """One 'field: value' line each, tags one per line, escaped for the terminal."""
    created_by = f" by {meta.created_by}" if meta.created_by else ""
    lines = [
        ("name", meta.name),
        ("description", meta.description),
        *(("tag", f"{key}={value}") for key, value in sorted(meta.tags.items())),
        ("current version", str(meta.current_version or "-")),
        ("versions", str(len(meta.versions))),
        ("max versions", str(meta.max_versions)),
        ("expires", expiry_text(meta.expires) or "-"),
        ("created", timestamp(meta.created) + created_by),
        ("updated", timestamp(meta.updated)),
        ("state", f"deleted {timestamp(meta.deleted)}" if meta.deleted else "active"),
    ]
    for field_name, value in lines:
        click.echo(f"{field_name + ':':<17}{printable(value)}")


def metadata_doc(meta: SecretMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "namespace": meta.namespace,
        "current_version": meta.current_version,
        "created": timestamp(meta.created),
        "updated": timestamp(meta.updated),
        "created_by": meta.created_by,
        "description": meta.description,
        "tags": dict(meta.tags),
        "deleted": timestamp(meta.deleted) or None,
        "labels": dict(meta.labels),
        "max_versions": meta.max_versions,
        "expires": timestamp(meta.expires) or None,
        "versions": [
            {
                "version": v.version,
                "created": timestamp(v.created),
                "created_by": v.created_by,
                "labels": list(v.labels),
                "destroyed": v.destroyed,
            }
            for v in meta.versions
        ],
    }
