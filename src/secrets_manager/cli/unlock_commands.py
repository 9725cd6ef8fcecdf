"""`init`, `passwd` and `unlock-with`: what unlocks the store. `init` gives a new store its master
password or AWS KMS key; `passwd` and `unlock-with` change it, rewrapping the root key only."""

from __future__ import annotations

from pathlib import Path

import click

from secrets_manager.cli.app import cli, kdf_profile_option, pass_session
from secrets_manager.cli.output import info_line, warning_line
from secrets_manager.cli.password import prompt_password, read_new_password_file
from secrets_manager.cli.session import Session
from secrets_manager.errors import InvalidInputError, UnsupportedOperationError
from secrets_manager.store import EncryptedStore
from secrets_manager.store.kms import AwsKmsUnlock
from secrets_manager.store.unlock import PasswordUnlock, UnlockSource
from secrets_manager.store.url import (
    KDF_PROFILE_NAMES,
    create_store,
    discard_new_store,
    display_url,
    new_password_unlock,
    refuse_existing_store,
    store_location,
)


@cli.command()
@kdf_profile_option(
    "Argon2id cost: 'default' is RFC 9106's t=3, 64 MiB, p=4; 'test' is cheap, for test suites only."
)
@click.option(
    "--kms-key",
    metavar="KEY",
    help="Unlock the store with this AWS KMS key (ARN, key id or alias) instead of a master password.",
)
@pass_session
def init(session: Session, kdf_profile: str, kms_key: str | None) -> None:
    """Create a new, empty store. Never overwrites an existing one.

    The store is unlocked by a master password, or with --kms-key by AWS KMS: then no password
    exists, and whoever may call kms:Decrypt with that key (with AWS credentials) may open it."""
    session.require_local("init")
    if not session.needs_password:
        raise UnsupportedOperationError(
            f"'init' is not supported by this store: {display_url(session.store_url)} needs none "
            "(its secrets live in Vault or AWS); run the other commands directly"
        )
    where = store_location(session.store_url)
    refuse_existing_store(session.store_url, environment=session.environment)
    audit = session.audit_log()
    audit.refuse_for_a_new_store()  # a deleted store's log: its records are not this store's
    password = None if kms_key else session.password(confirm=True)
    store = create_store(
        session.store_url,
        password,
        kdf_profile=kdf_profile,
        environment=session.environment,
        actor=session.actor,
        audit_path=session.audit_path,
        kms_key=kms_key,
    )
    try:
        audit.append([session.event("init")], store)
    except BaseException:
        discard_new_store(session.store_url, store)  # never announced: leave nothing behind
        raise
    store.close()
    unlocked_by = f"; AWS KMS key {kms_key} unlocks it" if kms_key else ""
    info_line(f"created an empty store at {where}{unlocked_by}")


@cli.command()
@click.option("--new-password-file", metavar="PATH", help="Read the new master password from this file.")
@click.option(
    "--kdf-profile",
    type=click.Choice(KDF_PROFILE_NAMES),
    default=None,
    help="Argon2id cost of the new password: 'default' raises a store made with 'test' in place. "
    "Without it the store's own cost stays (see 'status').",
)
@pass_session
def passwd(session: Session, new_password_file: str | None, kdf_profile: str | None) -> None:
    """Change the master password (rewraps the root key only: fast at any store size)."""
    session.require_local("passwd")
    with session.operation("passwd", mutating=True) as (store, _):
        store.require_password_unlock()  # before asking for a new one
        if new_password_file:
            new = read_new_password_file(Path(new_password_file), environment=session.environment)
        else:
            new = prompt_password("New master password", confirm=True, file_option="--new-password-file")
        if kdf_profile is None:
            scrubbed = store.change_password(session.environment.check_new_password(new))
        else:  # production refuses a profile weaker than the default
            scrubbed = store.change_unlock(
                new_password_unlock(new, kdf_profile, environment=session.environment)
            )
        can_scrub = store.can_scrub
    session.forget_in_agent()
    info_line("master password changed")
    warn_if_not_scrubbed(scrubbed, can_scrub, "password")


@cli.command("unlock-with")
@click.argument("source", type=click.Choice(["password", "kms"]))
@click.argument("kms_key", metavar="[KMS_KEY]", required=False)
@click.option("--new-password-file", metavar="PATH", help="Read the new master password from this file.")
@kdf_profile_option("Argon2id cost of the new password ('test' is for test suites only).")
@pass_session
def unlock_with(
    session: Session, source: str, kms_key: str | None, new_password_file: str | None, kdf_profile: str
) -> None:
    """Switch what unlocks the store: 'kms KMS_KEY' (an AWS KMS key's ARN, id or alias) or
    'password' (a new master password). Rewraps the root key only: no secret is re-encrypted.

    \b
    secrets-manager unlock-with kms arn:aws:kms:eu-west-1:111122223333:key/…
    secrets-manager unlock-with password --new-password-file new-password.txt"""
    session.require_local("unlock-with")
    new_password = new_unlock_arguments("unlock-with", source, kms_key, new_password_file, session)
    with session.operation("unlock-with", mutating=True) as (store, _):
        old = unlocked_by(store)
        scrubbed = store.change_unlock(new_unlock_source(session, kms_key, new_password, kdf_profile))
        can_scrub = store.can_scrub
    session.forget_in_agent()
    info_line(f"the store is now unlocked by {f'AWS KMS key {kms_key}' if kms_key else 'the new password'}")
    warn_if_not_scrubbed(scrubbed, can_scrub, old)


def unlocked_by(store: EncryptedStore) -> str:
    """What unlocks `store` now, in words: "password" or "AWS KMS key"."""
    return "password" if store.unlock_kind == PasswordUnlock.kind else "AWS KMS key"


def warn_if_not_scrubbed(scrubbed: bool, can_scrub: bool, old: str) -> None:
    """After a change of what unlocks the store: say so if the root key wrapped by the old
    `old` ("password", "AWS KMS key") may still be in the store's files."""
    if scrubbed:
        return
    if can_scrub:
        warning_line(
            f"another process had the store open, so the root key wrapped by the old {old} may stay in "
            "its write-ahead log until the next checkpoint; run 'secrets-manager keys rotate --root' "
            "when it is closed to make that copy useless"
        )
    else:
        warning_line(
            f"this store's database keeps superseded copies (old row versions, its WAL, replicas and "
            f"backups) that no client can erase: the root key wrapped by the old {old} remains there; "
            "'secrets-manager keys rotate --root' makes those copies useless"
        )


def new_unlock_arguments(
    command: str, source: str, kms_key: str | None, new_password_file: str | None, session: Session
) -> bytes | None:
    """Check `COMMAND password|kms [KMS_KEY] [--new-password-file]`; the new password if a file
    gives it (read before anything is opened, so a bad file changes nothing)."""
    if source == "kms" and not kms_key:
        raise InvalidInputError(f"give the KMS key: '{command} kms KEY' (an ARN, key id or alias)")
    if source == "kms" and new_password_file:
        raise InvalidInputError(f"--new-password-file goes with '{command} password', not with kms")
    if source == "password" and kms_key:
        raise InvalidInputError(
            f"'{command} password' takes no key: the new password comes from a prompt or file"
        )
    if new_password_file:
        return read_new_password_file(Path(new_password_file), environment=session.environment)
    return None


def new_unlock_source(
    session: Session, kms_key: str | None, new_password: bytes | None, kdf_profile: str
) -> UnlockSource:
    """The AWS KMS key `kms_key`, or else the new password (asked twice now if no file gave it)."""
    if kms_key:
        return AwsKmsUnlock(kms_key)
    if new_password is None:
        new_password = prompt_password("New master password", confirm=True, file_option="--new-password-file")
    return new_password_unlock(new_password, kdf_profile, environment=session.environment)
