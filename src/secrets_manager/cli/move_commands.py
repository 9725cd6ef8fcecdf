"""`mv OLD NEW` and `cp OLD NEW`: give a secret another name, as `pass mv` and `pass cp` do.

OLD's current value, description, tags, version limit and expiry are written to NEW: a new secret (its
version 1), or with --force a new version of an existing NEW. The value is encrypted under NEW's
service key. `mv` then soft-deletes OLD (its history stays; `undelete OLD` brings it back), and
only if OLD is still at the version copied (a delete with expect_version, decided in the delete's
own commit): a store that landed meanwhile is never hidden.
Locally this is one audited operation (one unlock): a record for NEW's write, appended durably
as it is made, and the operation's own record for OLD. The copy and the delete are two commits: a
`mv` killed between them left NEW holding OLD's value and OLD in place, and running it again
finishes it (NEW already holding OLD's current value: nothing written to NEW, OLD deleted).
On Vault and AWS NEW's write is itself two (its version, then its metadata): a copy whose metadata
write was refused says so, and a rerun of mv sets on NEW what it lacks of OLD's description, tags,
version limit and expiry before deleting OLD.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import click

from secrets_manager.cli.app import Note, Session, cli, pass_session, warn_if_written_expired
from secrets_manager.cli.completion import complete_secret_names
from secrets_manager.cli.output import info_line, print_json, suggested
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    SecretsManagerError,
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
    """Rename OLD to NEW: its current value, description, tags, version limit and expiry go to
    NEW, then OLD is soft-deleted ('undelete OLD' brings it back). NEW must not exist unless
    --force."""
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
    soft-delete OLD if it is still at the version copied (ConflictError, OLD left, if not)."""
    secret = store.get(old)
    note.version(secret.version)
    note.value(secret.value.reveal())
    meta = store.describe(old)
    if remove and PENDING in meta.labels:
        raise ConflictError(
            f"{old} has a pending version {meta.labels[PENDING]} (a rotation not finished), which "
            f"would stay behind: finish it ('{suggested('rotate', old, '--resume')} …') or discard "
            f"it ('{suggested('rotate', old, '--discard')}') first; nothing was written"
        )
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
        copied = _copied_already(store, new, secret) if remove else None
        if copied is None:
            raise ConflictError(
                f"{new} exists already (or is deleted); nothing was written: give --force to write "
                f"{old}'s value over it as a new version, or first undelete or destroy --all a deleted {new}"
            ) from None
        # A move killed between its copy and its delete (two commits) left NEW holding OLD's value
        # and OLD in place: running it again finishes it, writing nothing to NEW's value. On Vault
        # and AWS the copy is itself two writes (the version, then its metadata): what a copy whose
        # second write failed left out is carried over now.
        _carry_metadata(store, old, new, copied.version, meta, secret)
        info, finishing = copied, True
    except SecretsManagerError as error:
        stored = error.stored_version
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
    else:
        finishing = False
        note.wrote(new, info.version, secret.value.reveal())
    if remove:
        try:  # on condition, in the delete's own commit: a store landing at any point is not hidden
            store.delete(old, expect_version=secret.version)
        except SecretsManagerError as error:  # NEW is written: the message must say so
            if type(error) is ConflictError:  # not a state error: OLD has another current version
                raise _old_changed(store, old, new, info.version, secret.version) from None
            if isinstance(error, OutcomeUnknownError) and _deleted_now(store, old):
                # the delete was made; what is unknown is said by the error (not 'may or may not')
                raise restated(
                    error,
                    f"{new} version {info.version} holds the value of version {secret.version} of "
                    f"{old}; {error}",
                ) from None
            if not isinstance(error, NotFoundError | OutcomeUnknownError) and _deleted_now(store, old):
                # Vault or AWS: a write overtook the delete, whose undo then failed (the error says so)
                raise restated(
                    error,
                    f"{new} version {info.version} holds the value of version {secret.version} of {old}, "
                    f"but {old} changed while it was moved and is deleted with its newer version: {error}",
                ) from None
            raise _half_moved(error, old, new, info.version, secret.version) from None
    return Copied(
        from_version=secret.version, version=info.version, expires=secret.expires, finishing=finishing
    )


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


def _copied_already(store: SecretStore, new: str, secret: Secret) -> VersionInfo | None:
    """NEW's current version, if it holds `secret`'s value (OLD's, as read): what a move that was
    killed after its copy of OLD and before its delete of OLD left. None otherwise, or if NEW
    cannot be read (deleted, or its current version destroyed): then NEW is another secret."""
    try:
        current = store.get(new)
    except SecretsManagerError:
        return None
    if not hmac.compare_digest(current.value.reveal(), secret.value.reveal()):
        return None
    return VersionInfo(version=current.version, created=current.created, created_by="", labels=current.labels)


def _old_changed(store: SecretStore, old: str, new: str, version: int, from_version: int) -> ConflictError:
    """The error of a move whose conditional delete of OLD was refused: a write landed on OLD
    after its value was read, so OLD stays (its newer value is not hidden) and NEW has the older."""
    try:
        now = f"now version {store.describe(old).current_version}"
    except SecretsManagerError:  # gone or unreadable meanwhile: the refusal stands, the number is unknown
        now = "now another version"
    return ConflictError(
        f"{new} version {version} holds the value of version {from_version} of {old}, but {old} changed "
        f"while it was moved ({now}) and was left in place: compare them ('{suggested('get', old)}', "
        f"'{suggested('get', new)}'), then run '{suggested('delete', old)}' to finish the move, or "
        f"store the newer value again ('{suggested('mv', old, new, '--force')}')"
    )


def _deleted_now(store: SecretStore, name: str) -> bool:
    """Whether `name` reads as deleted now (False if that cannot be read)."""
    try:
        return store.describe(name).deleted is not None
    except SecretsManagerError:
        return False


def _half_moved(
    error: SecretsManagerError, old: str, new: str, version: int, from_version: int
) -> SecretsManagerError:
    """The error of a move whose write of NEW was made and whose delete of OLD was not: the same
    class (exit code) with a message that says what stands. OLD deleted or erased meanwhile (by
    another mv, delete or destroy) is a conflict: NEW has the copy, and the change was not ours."""
    done = f"{new} version {version} holds the value of version {from_version} of {old}, but"
    if isinstance(error, NotFoundError):
        return ConflictError(
            f"{done} {old} changed while it was moved ({error}); check '{suggested('history', old)}'"
        )
    state = (
        "may or may not have been deleted" if isinstance(error, OutcomeUnknownError) else "was not deleted"
    )
    message = f"{done} {old} {state}: {error}; delete it with '{suggested('delete', old)}' to finish the move"
    return restated(error, message)
