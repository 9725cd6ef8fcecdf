"""`mv OLD NEW` and `cp OLD NEW`: give a secret another name, as `pass mv` and `pass cp` do.

OLD's current value, description, tags, version limit and expiry are written to NEW: a new secret (its
version 1), or with --force a new version of an existing NEW. The value is encrypted under NEW's
service key. `mv` soft-deletes OLD (its history stays; `undelete OLD` brings it back) first, and
only while OLD is as mv read it: the version read still current and no rotation staged (a delete
with expect_version and expect_no_pending, decided in the delete's own commit): a store or a stage
that landed meanwhile is never hidden, and as NEW is not written yet, a refused mv leaves NEW as it
was (nothing of NEW ever needs undoing; writing NEW first, a refusal would leave a copy in NEW that
no store can take back exactly: not a --force version, nor, through a service, a new secret).
Then NEW is written; if that fails, OLD is undeleted. Locally this is one audited operation (one
unlock): a record for NEW's write, appended durably as it is made, and the operation's own record
for OLD. The delete and the copy are two commits: a `mv` killed between them leaves OLD deleted
(its value kept) and NEW unwritten; `undelete OLD` and the same mv finish it. NEW holding OLD's
current value already (a copy made by a mv that copied first, or by cp) is not written again: OLD
is deleted and NEW given what it lacks of OLD's description, tags, version limit and expiry (on
Vault and AWS NEW's write is itself two, its version then its metadata: a copy whose metadata
write was refused says so, OLD is undeleted, and a rerun finishes it this way).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import click

from secrets_manager.cli.app import cli, pass_session, warn_if_written_expired
from secrets_manager.cli.completion import complete_secret_names
from secrets_manager.cli.output import info_line, print_json, suggested, warning_line
from secrets_manager.cli.session import Note, Session
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    SecretsManagerError,
    UnsupportedOperationError,
    restated,
)
from secrets_manager.store import PENDING, SecretStore, validate_name
from secrets_manager.store.base import DEFAULT_MAX_VERSIONS, Secret, SecretMetadata, VersionInfo

F = TypeVar("F", bound=Callable[..., Any])


def _old_new_force_json(command: F) -> F:
    """The arguments and options mv and cp share."""
    for decorator in (
        pass_session,
        click.option("--json", "as_json", is_flag=True, help="Print both names and versions as JSON."),
        click.option(
            "--force",
            "-f",
            is_flag=True,
            help="Write over an existing NEW (as a new version of it; its history stays).",
        ),
        click.argument("new"),
        click.argument("old", shell_complete=complete_secret_names),
    ):
        command = decorator(command)
    return command


@cli.command("mv")
@_old_new_force_json
def move(session: Session, old: str, new: str, force: bool, as_json: bool) -> None:
    """Rename OLD to NEW: OLD is soft-deleted ('undelete OLD' brings it back) while it is as read,
    then its current value, description, tags, version limit and expiry go to NEW. NEW must not
    exist unless --force."""
    _copy(session, "mv", old, new, force=force, as_json=as_json, remove=True)


@cli.command("cp")
@_old_new_force_json
def copy(session: Session, old: str, new: str, force: bool, as_json: bool) -> None:
    """Copy OLD's current value, description, tags, version limit and expiry to NEW. NEW must not
    exist unless --force."""
    _copy(session, "cp", old, new, force=force, as_json=as_json, remove=False)


def _copy(
    session: Session, operation: str, old: str, new: str, *, force: bool, as_json: bool, remove: bool
) -> None:
    validate_name(old)
    validate_name(new)
    if old == new:
        raise InvalidInputError(f"OLD and NEW are both {old}: give another name")
    with session.secret_operation(operation, old, mutating=True) as (store, note):
        copied = copy_secret(store, note, old, new, force=force, remove=remove)
    if as_json:
        print_json({"from": old, "from_version": copied.from_version, "name": new, "version": copied.version})
    if remove and copied.finishing:
        info_line(
            f"{new} version {copied.version} held the value of version {copied.from_version} of {old} "
            f"already (a move interrupted after its copy): its value was not written again; {old} is now "
            f"deleted, which finishes the move (recoverable with '{suggested('undelete', old)}')"
        )
    elif remove:
        info_line(
            f"moved {old} (version {copied.from_version}) to {new} version {copied.version}; {old} is "
            f"deleted (recoverable with '{suggested('undelete', old)}')"
        )
    else:
        info_line(f"copied {old} (version {copied.from_version}) to {new} version {copied.version}")
    warn_if_written_expired(
        new, copied.version, copied.expires, f"the value of version {copied.from_version} of {old}"
    )


@dataclass(frozen=True)
class Copied:
    from_version: int  # OLD's version whose value was copied
    version: int  # the version of NEW written
    expires: datetime | None  # the expiry it was written with (OLD's version's)
    finishing: bool = False  # NEW held the value already (a move killed after its copy): not written


def copy_secret(store: SecretStore, note: Note, old: str, new: str, *, force: bool, remove: bool) -> Copied:
    """Write OLD's current value, description, tags, version limit and expiry to NEW; with `remove`,
    first soft-delete OLD on condition that it is still as read (ConflictError, nothing written, if
    not), then write NEW (OLD undeleted if that fails)."""
    secret = store.get(old)
    note.version(secret.version)
    note.value(secret.value.reveal())
    meta = store.describe(old)
    if not remove:
        info = _write_new(store, note, old, new, secret, meta, force=force, remove=False)
        return Copied(from_version=secret.version, version=info.version, expires=secret.expires)
    if PENDING in meta.labels:
        raise ConflictError(
            f"{old} has a pending version {meta.labels[PENDING]} (a rotation not finished), which "
            f"would stay behind: finish it ('{suggested('rotate', old, '--resume')} …') or discard "
            f"it ('{suggested('rotate', old, '--discard')}') first; nothing was written"
        )
    # Known before anything changes: NEW another secret (refused), or holding OLD's value already
    # (a move killed after its copy, by a version that copied first; or a copy whose metadata
    # write failed on Vault or AWS): then only what it lacks of OLD's metadata is written.
    held = None if force else _held_by_new(store, old, new, secret)
    # OLD goes first, on condition that it is as read: current still the version copied and no
    # rotation staged since the check above (decided in the delete's own commit on our stores,
    # by DeleteSecretIfUnchanged through a service; Vault and AWS check around theirs). Refused,
    # nothing was written anywhere: NEW is as it was. Only then is NEW written, so nothing of it
    # ever needs undoing; what may need undoing is OLD's delete, an undelete, if NEW's write fails.
    _delete_old(store, old, new, secret.version)
    try:
        if held is not None:
            _carry_metadata(store, old, new, held.version, meta, secret)
            info, finishing = held, True
        else:
            info, finishing = _write_new(store, note, old, new, secret, meta, force=force, remove=True), False
    except SecretsManagerError as error:
        raise _undeleted(store, old, new, error) from None
    return Copied(
        from_version=secret.version, version=info.version, expires=secret.expires, finishing=finishing
    )


def _write_new(
    store: SecretStore,
    note: Note,
    old: str,
    new: str,
    secret: Secret,
    meta: SecretMetadata,
    *,
    force: bool,
    remove: bool,
) -> VersionInfo:
    """NEW's version holding OLD's value, with OLD's description, tags, version limit and expiry;
    on condition that NEW does not exist unless `force`. Its errors say what stands of NEW."""
    try:
        info = store.put(
            new,
            secret.value.reveal(),
            expect_version=None if force else 0,
            description=meta.description or None,
            tags=dict(meta.tags) or None,
            max_versions=None if meta.max_versions == DEFAULT_MAX_VERSIONS else meta.max_versions,
            expires=secret.expires,  # the same credential: its expiry goes with it
        )
    except ConflictError:
        if force:
            raise
        raise _new_exists(old, new) from None
    except SecretsManagerError as error:
        stored = error.stored_version
        if stored is None and remove and isinstance(error, OutcomeUnknownError):
            raise restated(
                error, f"{error}; {old} was left in place: run the same mv again (it finishes a copy made)"
            ) from None
        if stored is None and remove:
            raise restated(error, f"{error}; nothing was renamed: {old} was left in place") from None
        if stored is None:
            raise
        # Vault or AWS stored NEW's version, then refused its metadata: say what stands, in mv's
        # or cp's words (the store's own says "do not store the value again", and nothing of OLD).
        note.wrote(new, stored, secret.value.reveal())
        done = (
            f"{new} version {stored} holds the value of version {secret.version} of {old}, but not its "
            f"description, tags, version limit or expiry: {error.metadata_error or error}; "
        )
        if remove:
            then = f"{old} was left in place: run the same mv again to finish it once that is allowed"
        else:
            then = f"do not copy it again: '{suggested('metadata', new)} …' sets them"
        raise restated(error, done + then) from None
    note.wrote(new, info.version, secret.value.reveal())
    return info


def _new_exists(old: str, new: str) -> ConflictError:
    return ConflictError(
        f"{new} exists already (or is deleted); nothing was written: give --force to write "
        f"{old}'s value over it as a new version, or first undelete or destroy --all a deleted {new}"
    )


def _held_by_new(store: SecretStore, old: str, new: str, secret: Secret) -> VersionInfo | None:
    """Before a move changes anything: NEW's current version if it holds OLD's value already (a
    move that was killed after its copy), None if NEW cannot be read (absent, deleted, or not
    readable by this caller: the write decides then), ConflictError if it holds another value."""
    try:
        current = store.get(new)
    except SecretsManagerError:
        return None
    if not hmac.compare_digest(current.value.reveal(), secret.value.reveal()):
        raise _new_exists(old, new)
    return VersionInfo(version=current.version, created=current.created, created_by="", labels=current.labels)


def _delete_old(store: SecretStore, old: str, new: str, version: int) -> None:
    """Soft-delete OLD on condition that `version` is still current and no rotation was staged:
    its refusals say that nothing was renamed (NEW is not written yet)."""
    try:
        store.delete(old, expect_version=version, expect_no_pending=True)
    except UnsupportedOperationError:
        # A service from before DeleteSecretIfUnchanged: delete on the version read alone, as such
        # a service always was asked, and say the pending check was mv's own read only. A service
        # from before DeleteSecretIfCurrent too is refused again (nothing renamed).
        try:
            store.delete(old, expect_version=version)
        except SecretsManagerError as error:
            raise _not_renamed(store, old, new, version, error) from None
        warning_line(
            f"the service cannot delete on condition that no rotation was staged (it is older than this "
            f"client), so {old} was deleted on condition that version {version} was still current; a "
            f"rotation staged after mv read {old} would be deleted with it ('history {old}' shows one)"
        )
    except SecretsManagerError as error:
        raise _not_renamed(store, old, new, version, error) from None


def _not_renamed(
    store: SecretStore, old: str, new: str, version: int, error: SecretsManagerError
) -> SecretsManagerError:
    """The error of a move whose conditional delete of OLD failed: nothing was written to NEW."""
    if type(error) is ConflictError:  # the condition, not a state error: OLD changed since read
        return ConflictError(
            f"{old} changed since mv read it ({_what_changed(store, old, version)}); nothing was "
            f"renamed and {new} was not written: run the same mv again"
        )
    if isinstance(error, NotFoundError):  # deleted or erased meanwhile (another mv, a delete)
        return ConflictError(
            f"{old} changed since mv read it ({error}); nothing was renamed and {new} was not written: "
            f"check '{suggested('history', old)}'"
        )
    if isinstance(error, OutcomeUnknownError):
        return restated(
            error,
            f"{error}; {new} was not written: if {old} is deleted ('{suggested('history', old)}'), "
            f"'{suggested('undelete', old)}' and run the same mv again",
        )
    return restated(error, f"{error}; nothing was renamed and {new} was not written")


def _what_changed(store: SecretStore, old: str, version: int) -> str:
    """What a refused conditional delete of OLD found, read again: another current version, or a
    rotation staged (mv checked for none when it read OLD)."""
    try:
        now = store.describe(old)
    except SecretsManagerError:  # gone or unreadable meanwhile: the refusal stands
        return "a write or a rotation landed"
    if now.current_version != version:
        current = "no current version" if now.current_version is None else f"version {now.current_version}"
        return f"now {current}, not {version}"
    if PENDING in now.labels:
        return f"a rotation was staged: version {now.labels[PENDING]} is pending; finish or discard it first"
    return "a rotation was staged and has finished or been discarded since"


def _undeleted(store: SecretStore, old: str, new: str, error: SecretsManagerError) -> SecretsManagerError:
    """NEW's write failed after OLD's delete: undelete OLD, so the move leaves both as they were,
    and give `error` (which says OLD was left in place where it matters); if the undelete fails
    too, say so and what to run."""
    try:
        store.undelete(old)
    except SecretsManagerError as undo:
        return restated(
            error,
            f"{error}; {old} was deleted before {new} was to be written, and could not be undeleted "
            f"({undo}): run '{suggested('undelete', old)}'",
        )
    return error


def _carry_metadata(
    store: SecretStore, old: str, new: str, version: int, meta: SecretMetadata, secret: Secret
) -> None:
    """Before a rerun of mv deletes OLD: set on NEW what of OLD's description, tags, version
    limit and expiry it lacks (a copy whose metadata write failed), on condition that `version`
    is still NEW's current. Nothing is sent when NEW has them all (a move killed between its two
    commits, on our own store). NEW's other tags stay."""
    try:
        now = store.describe(new)
    except SecretsManagerError:
        return  # NEW read a moment ago: the delete of OLD goes on, and says what fails
    # What the copy's put sends, as it sends it: an empty description and the default limit are
    # not sent (NEW's own stay, as with --force).
    description = meta.description if meta.description and meta.description != now.description else None
    tags = {k: v for k, v in meta.tags.items() if now.tags.get(k) != v}
    max_versions = (
        meta.max_versions if meta.max_versions not in (now.max_versions, DEFAULT_MAX_VERSIONS) else None
    )
    expires = secret.expires if secret.expires is not None and secret.expires != now.expires else None
    if description is None and not tags and max_versions is None and expires is None:
        return
    try:
        store.update_metadata(
            new,
            description=description,
            set_tags=tags or None,
            max_versions=max_versions,
            expires=expires,
            expect_current=version,
        )
    except SecretsManagerError as error:
        raise restated(
            error,
            f"{new} version {version} holds the value of {old} already, but its description, tags, "
            f"version limit or expiry could not be set: {error}; {old} was left in place",
        ) from None
