"""`secrets-manager backup …` and `restore`: one encrypted file holding a whole store, and back.

    backup FILE [--backup-password-file PATH] [--force]   a consistent snapshot, 0600, written atomically
    backup verify FILE [--backup-password-file PATH] [--json]
    restore FILE [--store URL] [--backup-password-file PATH | --share-file PATH …]
            [--on-existing fail|skip|overwrite] [--name NAME …]

Without `--backup-password-file` a backup copies the store's own ciphertexts and wrapped keys: it
opens with the store's master password (as it was when the backup was taken). With it, the backup
holds the secrets in logical form under that separate password, for off-site copies and for
restoring into another kind of store. `backup` and `restore` are audited (operations `backup` and
`restore`); `backup verify` opens no store and writes no audit record. The format is
docs/backup-format.md; the work is in store/backup.py and store/restore.py. FILE is always a file:
'-' is refused, not taken as stdout/stdin (as `import -` is) nor as a file named '-'.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from secrets_manager.audit import (
    AuditEvent,
    AuditLog,
    AuditPartialRecordError,
    AuditTamperError,
    anchor_a_restored_store,
    refuse_files_of_others,
    value_fingerprint,
)
from secrets_manager.cli.app import OptionsOnceGroup, cli, kdf_profile_option, pass_session
from secrets_manager.cli.output import (
    byte_size,
    info_line,
    print_json,
    progress_bars,
    timestamp,
    warning_line,
)
from secrets_manager.cli.password import prompt_password, read_password_file, terminal_available
from secrets_manager.cli.recovery_commands import read_share_file
from secrets_manager.cli.rotate_commands import terminate_as_interrupt
from secrets_manager.cli.session import Session
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OperationInterrupted,
    Terminated,
    UnlockError,
)
from secrets_manager.store.backup import (
    KIND_STORE,
    Backup,
    BackupSecret,
    BackupSummary,
    read_backup,
    read_backup_header,
    write_backup,
)
from secrets_manager.store.base import AuditedStore
from secrets_manager.store.names import validate_name
from secrets_manager.store.recovery import root_from_shares
from secrets_manager.store.restore import OnExisting, RestoreResult, restore_into, restore_new_store
from secrets_manager.store.unlock import UnlockKey, UnlockKeyRefused, UnlockKeyUnlock
from secrets_manager.store.url import (
    display_url,
    open_store,
    open_store_with_recovery,
    remove_store_files,
    sqlite_path,
)

new_password_option = click.option(
    "--backup-password-file",
    metavar="PATH",
    help="Protect the backup with a separate password read from this file (one trailing newline "
    "dropped) instead of the store's own keys.",
)
password_file_option = click.option(
    "--backup-password-file",
    metavar="PATH",
    help="Read the password that opens FILE from this file: its backup password, or for a copy of a "
    "store the master password that store had [default: the master password sources].",
)


class _BackupGroup(OptionsOnceGroup):
    """`backup FILE` is short for `backup create FILE`; `backup verify FILE` checks a backup.

    Its --help shows `backup FILE` and create's options, the form the README and most users type,
    rather than a bare group whose options are only under `backup create --help`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["create", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "FILE [--backup-password-file PATH] [--force]")
        formatter.write_usage(ctx.command_path, "verify FILE [OPTIONS]", prefix="   or: ")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        create_command = self.commands["create"]
        create_ctx = click.Context(create_command, info_name="create", parent=ctx)
        rows = [
            row
            for param in create_command.get_params(create_ctx)
            if isinstance(param, click.Option) and (row := param.get_help_record(create_ctx)) is not None
        ]
        with formatter.section("Options of backup FILE (the same as 'backup create FILE')"):
            formatter.write_dl(rows)
        self.format_commands(ctx, formatter)


@cli.group(cls=_BackupGroup)
def backup() -> None:
    """Write a backup of the store to FILE (backup FILE), or check one (backup verify FILE).

    \b
    secrets-manager backup store.smbackup                  opens with the master password
    secrets-manager backup off-site.smbackup --backup-password-file pw.txt
    secrets-manager backup verify off-site.smbackup --backup-password-file pw.txt
    secrets-manager restore store.smbackup --store new.db  into a new (or empty) store
    """


@backup.command("create")
@click.argument("file", required=False)
@click.option("--out", metavar="FILE", help="Where to write the backup (the same as FILE).")
@new_password_option
@click.option("--force", is_flag=True, help="Replace FILE if it exists (atomically: never half-written).")
@pass_session
def create(
    session: Session, file: str | None, out: str | None, backup_password_file: str | None, force: bool
) -> None:
    """Back up every secret (all kept versions, labels, metadata, deleted ones) to FILE.

    The store is read at one instant while others keep writing. Without --backup-password-file the
    file copies the store's own ciphertexts and opens with its master password; with it, the file
    holds the secrets under that separate password and restores into any kind of store."""
    session.require_local("backup")
    if (file is None) == (out is None):
        raise InvalidInputError("give the backup file once: 'backup FILE' or 'backup --out FILE'")
    path = _file_argument(file or out or "", "backup")
    _check_destination(session, path, force=force)
    password = _read_file(session, backup_password_file, new=True) if backup_password_file else None
    if password is not None:
        session.environment.check_new_password(password, "the backup password")
    # A copy of the store needs our encrypted store; a password backup can be of any store (Vault, AWS).
    opened = session.operation if password is None else session.store_operation
    with opened("backup", mutating=True) as (store, _), progress_bars("backup") as report:
        summary = write_backup(store, path, password=password, replace=force, progress=report)
    opens = "the backup password" if password else "the store's master password (as it is now)"
    info_line(f"backed up {_counts(summary)} to {path} ({byte_size(summary.size)}); it opens with {opens}")
    if summary.not_included:
        warning_line(
            f"{len(summary.not_included)} deleted secret(s) were not backed up (first: "
            f"{summary.not_included[0]}): this store gives out no value of a deleted secret"
        )


share_file_option = click.option(
    "--share-file",
    "share_files",
    multiple=True,
    metavar="PATH",
    help="A recovery share file (repeat for each of K): open a copy-of-store backup with the store's "
    "recovery shares instead of its master password (forgotten).",
)


@backup.command("verify")
@click.argument("file")
@password_file_option
@share_file_option
@click.option("--json", "as_json", is_flag=True, help="Print the kind, time and counts as JSON.")
@pass_session
def verify(
    session: Session, file: str, backup_password_file: str | None, share_files: tuple[str, ...], as_json: bool
) -> None:
    """Check that FILE is a complete, intact backup, without restoring it: exit 0 with its counts,
    6 if it is damaged or cut short, 4 for a wrong password, 2 if a newer secrets-manager wrote it
    (upgrade to read it). A backup made without --backup-password-file opens with the master
    password the store had when it was taken, or with K of its recovery shares (--share-file)."""
    mnemonics = _share_mnemonics(session, share_files, backup_password_file)
    path = _file_argument(file, "backup verify")
    header = read_backup_header(path)
    password, root_from = _backup_opener(session, path, header.kind, backup_password_file, mnemonics)
    with progress_bars("verify") as report:
        summary = read_backup(
            path, password, environment=session.environment, progress=report, root_from=root_from
        ).summary
    if as_json:
        print_json(summary_doc(summary))
        return
    click.echo(
        f"backup {path} is intact and complete: {_counts(summary)}; {_kind(summary.kind)}, taken "
        f"{timestamp(datetime.fromtimestamp(summary.created, UTC))}"
    )


@cli.command()
@click.argument("file")
@click.option(
    "--store",
    "target",
    metavar="URL",
    help="The store to restore into [default: the global --store]. A path with no store yet gets a "
    "new one; an existing store must be empty unless --on-existing is given.",
)
@password_file_option
@click.option(
    "--on-existing",
    type=click.Choice([choice.value for choice in OnExisting]),
    help="Allow a non-empty store, and say what happens to its secrets that the backup also has: "
    "fail (refuse if there are any), skip (keep the store's), overwrite (take the backup's).",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="NAME",
    help="Restore only this secret (repeatable), into an existing store, leaving every other "
    "secret as it is: a secret purged or overwritten by mistake. Without --on-existing a NAME the "
    "store still holds is refused (fail); overwrite replaces its history with the backup's.",
)
@share_file_option
@kdf_profile_option(
    "Argon2id cost of a new store made from a password-protected backup ('test': test suites only)."
)
@pass_session
def restore(
    session: Session,
    file: str,
    target: str | None,
    backup_password_file: str | None,
    on_existing: str | None,
    names: tuple[str, ...],
    share_files: tuple[str, ...],
    kdf_profile: str,
) -> None:
    """Restore the backup FILE, all or nothing: the whole file is checked first, and a failure at any
    point leaves the target store as it was.

    \b
    Into a path with no store: a copy of the backed-up store (it opens with the backup's master
    password), or, from a password-protected backup, a new store under the master password.
    Into an existing store: the secrets are written under that store's keys; it must be empty
    unless --on-existing says what happens to names it already holds. A PostgreSQL store must
    exist first ('secrets-manager init'): restore then writes into it. With --name, only those
    secrets (each with its whole history, labels, metadata and deleted state), into an existing
    store, which may hold others.

    SIGTERM and SIGHUP (timeout, systemd stop, a closed terminal) end it as Ctrl-C does: what it
    had written is undone, and it exits 143 / 129 (130 for Ctrl-C)."""
    with terminate_as_interrupt():
        _restore(session, file, target, backup_password_file, on_existing, names, share_files, kdf_profile)


def _share_mnemonics(
    session: Session, share_files: tuple[str, ...], backup_password_file: str | None
) -> list[str]:
    """The recovery shares of --share-file; shares and a backup password are two ways to open a
    backup, never both."""
    if share_files and backup_password_file:
        raise InvalidInputError("give --share-file or --backup-password-file, not both")
    return [read_share_file(Path(p), session.environment) for p in share_files]


def _backup_opener(
    session: Session, path: Path, kind: str, backup_password_file: str | None, mnemonics: list[str]
) -> tuple[bytes | None, Callable[[dict[str, Any]], Any] | None]:
    """What opens backup `path` for read_backup: (password, None), or (None, root_from) with
    recovery shares, which open only a copy of a store (sealed to the same recovery key)."""
    if not mnemonics:
        return _backup_password(session, path, kind, backup_password_file), None
    if kind != KIND_STORE:
        raise InvalidInputError(
            f"backup {path} is protected by a backup password, which recovery shares do not "
            "open: pass --backup-password-file PATH"
        )
    return None, functools.partial(root_from_shares, mnemonics=mnemonics, what=f"backup {path}")


def _restore(
    session: Session,
    file: str,
    target: str | None,
    backup_password_file: str | None,
    on_existing: str | None,
    names: tuple[str, ...],
    share_files: tuple[str, ...],
    kdf_profile: str,
) -> None:
    session.require_local("restore")
    mnemonics = _share_mnemonics(session, share_files, backup_password_file)
    if target:
        session = dataclasses.replace(session, store_url=target)
    mode = OnExisting(on_existing) if on_existing else None
    path = _file_argument(file, "restore")
    if names:
        for name in names:  # a malformed name is a typo to fix (exit 2), not one the backup lacks
            validate_name(name)
        if _no_store_at(session.store_url):
            raise InvalidInputError(
                f"restore --name writes into an existing store, and there is none at "
                f"{sqlite_path(session.store_url)}: pass --store with the store to restore into (to "
                "look at a backup, restore it whole into a new path without --name)"
            )
        mode = mode or OnExisting.FAIL  # the store holds other secrets: that is the point
    try:  # before any write: checking the file, asking for passwords
        header = read_backup_header(path)
        password, root_from = _backup_opener(session, path, header.kind, backup_password_file, mnemonics)
        with progress_bars("check") as report:
            checked = read_backup(
                path, password, environment=session.environment, progress=report, root_from=root_from
            )
        if names:
            checked = _only_named(checked, names, path)
        new_store = _no_store_at(session.store_url)
        if new_store:
            _refuse_another_stores_log(session, checked)
            new_password = password if header.kind == KIND_STORE else session.password(confirm=True)
            if mnemonics:  # a copy: it opens with its old master password, or the same shares
                new_password = None
    except KeyboardInterrupt as exc:
        raise _interrupted(exc, NOTHING_RESTORED) from None
    if new_store:
        derived: list[UnlockKey] = []
        staged: list[Path] = []  # the new store's audit log, under its temporary name
        try:
            try:
                with progress_bars("restore") as report:
                    result = restore_new_store(
                        checked,
                        session.store_url,
                        password=new_password,
                        kdf_profile=kdf_profile,
                        environment=session.environment,
                        actor=session.actor,
                        progress=report,
                        before_publish=functools.partial(
                            _before_publish,
                            session,
                            new_password,
                            mnemonics,
                            checked.secrets,
                            derived,
                            staged,
                        ),
                    )
            finally:  # the log's temporary name and lock file (published or not, with the store)
                for temporary in staged:
                    for leftover in (temporary, Path(f"{temporary}.lock")):
                        leftover.unlink(missing_ok=True)
            if not staged:  # a log of this store survived it: continued now the store has its name
                _audit_new_store(session, new_password, mnemonics, checked.secrets, result, derived)
        except KeyboardInterrupt as exc:  # the new store's files were removed: no store appeared
            store_file = sqlite_path(session.store_url)
            left = (
                f"the new store {store_file} was linked into place but its restore is not audited: remove "
                "it and restore again"
                if store_file.exists()  # interrupted between the link and the audit record
                else "no store was created"
            )
            raise _interrupted(exc, left) from None
        where = f"a new store at {sqlite_path(session.store_url)}"
        if result.stale_removed:
            info_line(
                f"removed {len(result.stale_removed)} file(s) an interrupted restore left in "
                f"{sqlite_path(session.store_url).parent} (first: {result.stale_removed[0]})"
            )
    else:
        records: list[AuditEvent] = []
        restored: RestoreResult | None = None
        try:
            with (
                session.store_operation("restore", mutating=True, reads=records) as (store, event),
                progress_bars("restore") as report,
            ):
                try:
                    restored = restore_into(store, checked.secrets, on_existing=mode, progress=report)
                except KeyboardInterrupt as exc:  # audited as such: its outcome is "interrupted"
                    # restore_into undid what it had written (an encrypted store: its one commit
                    # was not made); an undo that failed is a StorageError naming what to check
                    raise _interrupted(exc, NOTHING_RESTORED) from None
                records += [*_secret_records(event, store, checked.secrets, restored), event]
        except KeyboardInterrupt as exc:
            if restored is not None:  # restored, then interrupted while it was audited
                raise
            raise _interrupted(exc, NOTHING_RESTORED) from None  # while the store was opened
        result = restored
        where = "the store" if session.needs_password else f"the store {display_url(session.store_url)}"
    # NAME<TAB>overwritten / NAME<TAB>skipped: in a pipe the bare token, for `cut -f2`; a
    # terminal also gets what it means.
    explained = sys.stdout.isatty()
    for name in result.overwritten:
        click.echo(f"{name}\toverwritten" + (" (its versions now are the backup's)" if explained else ""))
    for name in result.skipped:
        click.echo(f"{name}\tskipped" + (" (it exists)" if explained else ""))
    info_line(f"restored {_restored(result)} into {where}")
    if mnemonics and new_store:
        info_line(
            "it opens with the master password its store had when the backup was taken, and with "
            "these recovery shares: set a new password with 'secrets-manager recovery unlock-with "
            "password --share-file …'"
        )
    if result.overwritten:
        info_line(
            f"overwrote {len(result.overwritten)} existing secret(s) with the backup's history "
            "(--on-existing overwrite): versions written after the backup are gone"
        )
        if not result.exact:
            info_line(
                "this store numbers the overwritten secrets' versions from 1 again (it cannot erase "
                "a secret and keep counting): a version number from before this restore may now name "
                "another value"
            )
    if result.skipped:
        info_line(f"left {len(result.skipped)} existing secret(s) as they were (--on-existing skip)")
    if result.without_value:
        warning_line(
            f"{len(result.without_value)} secret(s) had no current value (every version destroyed, or "
            f"all but a pending one) and were not created (first: {result.without_value[0]}): this "
            "store cannot hold a secret without a value"
        )
    for name in result.pending_left_out:
        warning_line(
            f"{name}: its pending version (a rotation not finished at the backup) was left out, as "
            f"this store has no 'pending' label; the backup's current value is current. Rotate {name} "
            "again"
        )
    if not result.exact:
        info_line(
            "this store numbers versions itself: the kept values were written oldest first, the "
            "backup's previous and current last"
        )


def _only_named(backup: Backup, names: Sequence[str], path: Path) -> Backup:
    """The backup narrowed to the secrets `names` (restore --name); NotFoundError (exit 3), before
    any write, for a name it does not hold."""
    held = {secret.name for secret in backup.secrets}
    missing = sorted(set(names) - held)
    if missing:
        raise NotFoundError(
            f"backup {path} holds no secret named {missing[0]!r}"
            + (f" (nor {len(missing) - 1} other name(s) given)" if len(missing) > 1 else "")
            + "; nothing was restored"
        )
    wanted = set(names)
    return dataclasses.replace(backup, secrets=tuple(s for s in backup.secrets if s.name in wanted))


def summary_doc(summary: BackupSummary) -> dict[str, Any]:
    return {
        "file": str(summary.path),
        "kind": summary.kind,
        "created": timestamp(datetime.fromtimestamp(summary.created, UTC)),
        "size": summary.size,
        "secrets": summary.secrets,
        "deleted": summary.deleted,
        "versions": summary.versions,
        "entries": summary.entries,
    }


def _file_argument(file: str, command: str) -> Path:
    """FILE as a path; '-' is refused rather than taken as a file of that name (`import -` is stdin,
    so `backup -` writing ./- surprised). A backup is a file: written under a temporary name and
    renamed when complete, read twice by verify and restore (header, then the whole check), never
    a pipe: one to read (`<(cat FILE)`, /dev/stdin fed by a pipe) is refused, not found damaged."""
    if file == "-":
        stream, where = (
            ("output", "write it to a file")
            if command == "backup"
            else ("input", "save the stream to a file first")
        )
        raise InvalidInputError(
            f"'{command} -': a backup is a file, not standard {stream}; {where} (a file named '-' is ./-)"
        )
    path = Path(file)
    if command != "backup":  # read: a pipe (`<(cat FILE)`, /dev/stdin) would be empty the second time
        try:
            mode = path.stat().st_mode
        except OSError:
            return path  # missing (exit 3) or unreadable: reading it says so
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a pipe or a device)"
            raise InvalidInputError(
                f"'{command} {file}': {file} is {what}; a backup is a file, read twice (its header, "
                "then the whole check): save the stream to a file first"
            )
    return path


def _check_destination(session: Session, path: Path, *, force: bool) -> None:
    """Refuse before unlocking: an existing file (unless --force), a missing directory, the store."""
    try:
        _check_destination_path(session, path, force=force)
    except OSError as exc:  # a directory on the way this user may not search (EACCES), a loop
        raise InvalidInputError(
            f"cannot write the backup to {path}: {exc.strerror or type(exc).__name__} (a directory on "
            "the way this user may not enter?); choose a path you can write to"
        ) from None


def _check_destination_path(session: Session, path: Path, *, force: bool) -> None:
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory; give a file name for the backup")
    if not path.parent.is_dir():
        raise InvalidInputError(f"directory {path.parent} does not exist")
    if path.exists() and not path.is_file():  # a FIFO, a device, /dev/fd/N of `>(…)`: renamed over
        raise InvalidInputError(
            f"{path} is not a regular file (a pipe or a device); a backup is written under a temporary "
            "name and renamed into place: give a file path, then copy the file where it should go"
        )
    session.refuse_own_file(path, "write the backup to another file")  # before suggesting --force
    if path.exists() and not force:
        raise ConflictError(f"{path} already exists; choose another name or pass --force to replace it")


def _backup_password(session: Session, path: Path, kind: str, password_file: str | None) -> bytes:
    """What opens the file: --backup-password-file; else, for a copy of a store, its master
    password from the usual sources; else a prompt on a terminal."""
    if password_file:
        return _read_file(session, password_file)
    if kind == KIND_STORE:
        return session.password()
    if terminal_available():
        return prompt_password("Backup password", confirm=False)
    raise UnlockError(f"{path} is protected by a backup password: pass --backup-password-file PATH")


def _read_file(session: Session, password_file: str, *, new: bool = False) -> bytes:
    """The backup password in `password_file`: one that opens a backup (a missing file: exit 4,
    as any unlock), or with `new` the one a new backup is made with (exit 2: it is input)."""
    try:
        return read_password_file(Path(password_file), environment=session.environment)
    except UnlockError as exc:
        error = InvalidInputError if new else UnlockError
        raise error(str(exc).replace("password file", "backup password file", 1)) from None


def _no_store_at(url: str | None) -> bool:
    """Whether `url` names a SQLite file that does not exist yet (so restore creates it)."""
    try:
        return not sqlite_path(url).exists()
    except InvalidInputError:  # not a SQLite URL: a store that exists elsewhere (or a bad URL)
        return False


def _refuse_another_stores_log(session: Session, backup: Backup) -> None:
    """Before a new store is built: an audit log where its log would go must be the backed-up
    store's own (a copy of the store keeps its audit key, so that log goes on verifying: the case
    of a lost store file whose log survived). Another store's log, or any log for a store made
    from a password backup (a new audit key), would be refused as forged by the restore's first
    record, once the whole store had been built; ConflictError (exit 7) instead, up front."""
    if not session.audit_path.exists():
        return
    if backup.audit_keys is not None:
        try:
            session.audit_log().verify(backup.audit_keys, None)
        except AuditTamperError:
            pass  # not signed with this store's audit key: another store's log
        except AuditPartialRecordError:
            return  # every whole record is the store's; the append sets the cut one aside
        else:
            return
    raise ConflictError(
        f"the audit log {session.audit_path} of another store is where the new store's log "
        "would go; move it away or pass --audit-file"
    )


def _before_publish(
    session: Session,
    password: bytes | None,
    mnemonics: list[str],
    restored: Sequence[BackupSecret],
    derived: list[UnlockKey],
    staged: list[Path],
    url: str,
    result: RestoreResult,
) -> list[tuple[Path, Path]]:
    """On the new store under its temporary name (`url`), before it is linked into place: run
    Argon2id (keeping the unlock key in `derived`), and record the restore in the new store's log
    under a temporary name beside the log's (in `staged`), anchored in the store, which
    restore_new_store links into place right after the store. Argon2id, then the audit append of
    one record per secret, after the link was a window where a kill (SIGKILL, a timeout) left a
    store with no record of its restore, which a second restore then refused ('the target store is
    not empty'). A log that survived the store (`_refuse_another_stores_log` let it through) is
    continued once the store has its name, as before: its records must not tell of a restore that
    then found another store in its place."""
    if password is None:
        store = open_store_with_recovery(url, mnemonics, environment=session.environment, actor=session.actor)
    else:
        store = open_store(url, password, environment=session.environment, actor=session.actor)
    try:
        if store.unlock_key is not None:
            derived.append(store.unlock_key)
        final = session.audit_path
        if final.exists():
            return []
        refuse_files_of_others(final, session.files_not_for_audit())  # the store's file, say
        temporary = final.with_name(f".{final.name}.restore-{secrets.token_hex(6)}")
        staged.append(temporary)
        event = session.event("restore")
        anchor_a_restored_store(store)
        log = AuditLog(temporary, environment=session.environment, **session.audit_options())
        log.append([*_secret_records(event, store, restored, result), event], store)
        # its lock file is of no more use: gone before the links, a kill leaves none of it behind
        Path(f"{temporary}.lock").unlink(missing_ok=True)
    finally:
        store.close()
    return [(temporary, final)]


def _audit_new_store(
    session: Session,
    password: bytes | None,
    mnemonics: list[str],
    restored: Sequence[BackupSecret],
    result: RestoreResult,
    derived: Sequence[UnlockKey] = (),
) -> None:
    """Record the restore in the new store's audit log, as `init` does (one record per secret, then
    the restore's own); if that fails, the new store was never announced and is removed again. A
    copy restored with recovery shares (`mnemonics`) is opened with them."""
    store = None
    try:
        if password is None:
            store = open_store_with_recovery(
                session.store_url, mnemonics, environment=session.environment, actor=session.actor
            )
        else:
            keys = {key.header: key.material for key in derived}
            try:
                store = open_store(
                    session.store_url,
                    password,
                    environment=session.environment,
                    actor=session.actor,
                    unlock_key=UnlockKeyUnlock(keys.get) if keys else None,
                    unlock_key_derived_here=True,
                )
            except UnlockKeyRefused:  # not the header it was derived for: the password, as ever
                store = open_store(
                    session.store_url, password, environment=session.environment, actor=session.actor
                )
        event = session.event("restore")
        anchor_a_restored_store(store)  # a copy's log, where it survived the store, goes on verifying
        session.audit_log().append([*_secret_records(event, store, restored, result), event], store)
    except BaseException:
        if store is not None:
            store.close()
        remove_store_files(sqlite_path(session.store_url))
        raise
    store.close()


def _secret_records(
    event: AuditEvent, store: AuditedStore, restored: Sequence[BackupSecret], result: RestoreResult
) -> list[AuditEvent]:
    """One record per secret the restore wrote, under its request id: `restore` for a new name,
    `restore.overwrite` for one whose history it replaced; the version the target now serves as
    current (its own number where it numbers versions itself) with that value's fingerprint.
    Appended together with the restore's own record, in one durable append: the restore itself is
    one commit."""
    left_alone = {*result.skipped, *result.without_value}
    overwritten = set(result.overwritten)
    served = {name: (ours, theirs) for name, ours, theirs in result.served}
    records = []
    for secret in restored:
        if secret.name in left_alone:
            continue
        if result.exact:
            current = secret.labels.get("current")
            version = current
        else:
            current, version = served.get(secret.name, (None, None))
        value = next((v.value for v in secret.kept if v.version == current), None)
        records.append(
            replace(
                event,
                operation="restore.overwrite" if secret.name in overwritten else "restore",
                name=secret.name,
                version=version if value is not None else None,
                value_hmac=None if value is None else value_fingerprint(store, value),
            )
        )
    return records


NOTHING_RESTORED = "nothing was restored: the target store is as it was"


def _interrupted(exc: KeyboardInterrupt, what: str) -> OperationInterrupted:
    """Ctrl-C, or SIGTERM / SIGHUP (errors.Terminated, raised by terminate_as_interrupt): one
    line saying what it left, and the exit code of what interrupted it (130, 143, 129)."""
    how = str(exc) if isinstance(exc, Terminated) else "Ctrl-C"
    error = OperationInterrupted(f"restore interrupted ({how}); {what}")
    error.exit_code = getattr(exc, "exit_code", OperationInterrupted.exit_code)
    return error


def _counts(summary: BackupSummary) -> str:
    deleted = f", {summary.deleted} deleted" if summary.deleted else ""
    versions = f"{summary.versions} version{_s(summary.versions)}"
    return f"{summary.secrets} secret{_s(summary.secrets)} ({versions}{deleted})"


def _restored(result: RestoreResult) -> str:
    return f"{result.secrets} secret{_s(result.secrets)} ({result.versions} version{_s(result.versions)})"


def _kind(kind: str) -> str:
    if kind == KIND_STORE:
        return "a copy of the store (opens with its master password)"
    return "protected by a backup password"


def _s(count: int) -> str:
    return "" if count == 1 else "s"


__all__ = ["backup", "restore"]
