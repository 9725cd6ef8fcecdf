"""`edit NAME`: change a secret's value in your editor, as `pass edit` does.

The current value is written to a file in a private directory in memory (/dev/shm: never on disk),
$VISUAL or $EDITOR (else vi) opens it, and what it saves becomes a new version, but only if NAME is
still at the version read: an edit takes minutes, and a `store` or a rotation landing meanwhile
must not be undone by the older text. The directory (with any swap or backup file the editor left
in it) is removed afterwards whatever happens; if `edit` is killed outright (SIGKILL), by the next
`edit`, which finds it unlocked. NAME#FIELD edits one text field of a JSON object
value. A NAME that does not exist is created (only if it still does not when the editor is done).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from secrets_manager.cli.app import (
    FIELD_SEPARATOR,
    cli,
    expires_option,
    future_expiry,
    pass_session,
    select_field,
)
from secrets_manager.cli.completion import complete_secret_names
from secrets_manager.cli.output import info_line, timestamp, warning_line
from secrets_manager.cli.rotate_commands import one_password_session, terminate_as_interrupt
from secrets_manager.cli.run_command import WITHHELD_VARIABLES, credentials_that_reached
from secrets_manager.cli.session import Session, is_remote_store
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SecretsManagerError,
    SecretStateError,
)
from secrets_manager.rotation import new_value_for
from secrets_manager.store import MAX_VALUE_SIZE, SecretStore, validate_name
from secrets_manager.values import SecretValue

# tmpfs on Linux: the value is never written to a disk. Not a shared path: mkdtemp makes a 0700
# directory of our own in it.
MEMORY_DIRECTORY = Path("/dev/shm")  # noqa: S108
DIRECTORY_PREFIX = "secrets-manager-edit-"
DEFAULT_EDITOR = "vi"
# vim and neovim, by the name of the file a command line runs once symlinks are followed (Debian's
# vi is a link to vim.basic or vim.tiny); not nvi, busybox vi or a vim installed as a file named vi.
VIM_FAMILY = re.compile(r"[gn]?vim(\.[a-z0-9]+)?|vimx")
# What keeps them from copying the value out of the private directory: no swap file (one set to a
# central `directory` lands on disk), no viminfo / shada file (its registers keep what was yanked
# or deleted, on disk), no backup or undo file (a `backupdir` or `undodir` of the user's keeps the
# old value). `-c` runs after the user's vimrc, so its settings win; `silent!` for a vim built
# without undo files (vim.tiny), which would otherwise stop at an error message.
VIM_PRIVATE_ARGUMENTS = ("-n", "-i", "NONE", "-c", "silent! set nobackup nowritebackup noundofile")


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@expires_option(
    "When the saved value stops working (ISO 8601 or an age such as 90d). An expiry belongs to one "
    "value: without this, the new version has none."
)
@pass_session
def edit(session: Session, name: str, expires: str | None) -> None:
    """Edit NAME's value in $VISUAL / $EDITOR (else vi), as 'pass edit' does; what you save is
    stored as a new version, only if NAME did not change meanwhile (exit 7 if it did). A new NAME
    is created. NAME#FIELD edits one field of a JSON object value.

    The value is written to a private file in /dev/shm (memory) for the editor and removed after;
    the editor does not get the store's credentials (MASTER_PASSWORD, VAULT_TOKEN, PGPASSWORD…).
    vim and neovim are started with no swap, viminfo/shada, backup or undo file (-n -i NONE); other
    editors' own history is yours to turn off."""
    name, separator, field = name.partition(FIELD_SEPARATOR)
    validate_name(name)
    if separator and not field:
        raise InvalidInputError(f"'{name}{FIELD_SEPARATOR}' names no field; write NAME#FIELD")
    expiry = future_expiry(expires, name)
    editor = _editor()
    session = one_password_session(session)  # the read and the write: one prompt, not two
    with session.secret_operation("edit.read", name) as (store, note):
        withheld = (*WITHHELD_VARIABLES, *credentials_that_reached(session, store))
        try:
            secret = store.get(name)
        except NotFoundError:
            if field:
                raise
            if not is_remote_store(store):  # before the editor: the write would refuse it after
                _refuse_if_deleted(store, name)
            current, version, old_expiry = None, 0, None
        else:
            current, version, old_expiry = secret.value, secret.version, secret.expires
            note.version(version)
            note.value(current.reveal())
    if current is not None and not version:
        raise InvalidInputError(
            f"the version of {name} read is not known (on AWS that needs "
            "secretsmanager:ListSecretVersionIds), so saving could undo a concurrent store: use "
            f"'store {name}' instead"
        )
    shown = b"" if current is None else current.reveal()
    if field:
        # What the write checks (a text field of a JSON object it can rewrite exactly), before the
        # editor opens: a number, an object or a missing field would be refused after it, exit 2
        # as `store NAME#FIELD` refuses them, with what was typed lost.
        new_value_for(name, current, SecretValue(b""), field=field, generated=False)
        shown = select_field(shown, name, field)
    try:
        text = shown.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(
            f"the value of {name} is not UTF-8 text, which an editor would change: write a new one "
            f"with 'store {name} --file PATH'"
        ) from None
    # SIGTERM or SIGHUP (a closed terminal, a dropped ssh session) while the editor is open ends
    # it as Ctrl-C does, so the directory holding the value is removed: left to their default
    # action they ended us alone, and the value stayed in /dev/shm until the next reboot.
    with terminate_as_interrupt():
        edited = _edited_in(editor, text, session.environment.is_production, withheld)
    if edited == text:
        info_line(
            f"{name} unchanged (version {version}); nothing was stored" if version else "nothing was stored"
        )
        return
    new = SecretValue(edited.encode("utf-8"))
    if not new.reveal():
        raise InvalidInputError(
            f"the edited value is empty; nothing was stored (to store an empty value: 'store {name} "
            "--allow-empty' with nothing on stdin; to remove the secret: 'delete')"
        )
    if len(new.reveal()) > MAX_VALUE_SIZE:
        raise InvalidInputError(
            f"the edited value is over {MAX_VALUE_SIZE} bytes (64 KiB); nothing was stored"
        )
    if field:
        new = new_value_for(name, current, new, field=field, generated=False)
    with session.secret_operation("edit", name, mutating=True) as (store, note):
        note.value(new.reveal())
        try:
            info = store.put(name, new.reveal(), expect_version=version, expires=expiry)
        except SecretStateError:  # deleted while the editor was open: say so, not "changed"
            raise
        except ConflictError:
            raise ConflictError(
                f"{name} changed while you edited it (you edited version {version}"
                f"{'' if version else ': it did not exist'}); nothing was stored: run "
                f"'edit {name}' again"
            ) from None
        note.version(info.version)
    if expiry is not None:
        info_line(f"stored {name} version {info.version}, expires {timestamp(expiry)}")
        return
    info_line(f"stored {name} version {info.version}")
    if old_expiry is not None:  # an expiry is one value's: the edited one may be another credential
        info_line(
            f"version {version} was to expire at {timestamp(old_expiry)}; version {info.version} has no "
            f"expiry: if it has one, record it with 'metadata {name} --expires TIME'"
        )


def _refuse_if_deleted(store: SecretStore, name: str) -> None:
    """SecretStateError (exit 7) if `name`, not found by a read, is a soft-deleted secret: `store`
    refuses to write to one, so the editor must not open on an empty file whose text is then lost.
    Not through --server, where the describe would need `list` (a role with read and write alone
    would be audited as denied at each new name): there the write says so."""
    try:
        deleted = store.describe(name).deleted
    except NotFoundError:
        return
    if deleted is not None:
        raise SecretStateError(
            f"secret {name!r} is deleted; run 'undelete {name}' first (then 'edit {name}'), or "
            f"'destroy {name} --all'; the editor was not opened"
        )


def _editor() -> str:
    """$VISUAL, $EDITOR or vi: a command line whose program is found (else a one-line error now,
    before anything is read, rather than the shell's own message after); vi only on a terminal."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or DEFAULT_EDITOR
    if editor == DEFAULT_EDITOR and not (sys.stdin is not None and sys.stdin.isatty()):
        # vi without a terminal (cron, a pipeline, ssh without -t) waits forever for keys: the
        # value would sit in memory files until someone killed it. Chosen editors are trusted
        # to know (a GUI editor, a script).
        raise InvalidInputError(
            f"edit opens {DEFAULT_EDITOR}, which needs a terminal, and standard input is not one: run "
            "it on a terminal, set VISUAL or EDITOR, or pipe the new value to 'store NAME' "
            "(nothing was stored)"
        )
    try:
        words = shlex.split(editor)
    except ValueError:
        words = []
    if not words or shutil.which(words[0]) is None:
        raise InvalidInputError(
            f"the editor {editor!r} was not found; set VISUAL or EDITOR to one (nothing was stored)"
        )
    return editor


def _edited_in(editor: str, text: str, production: bool, withheld: tuple[str, ...]) -> str:
    """`text` after `editor` saved it: one trailing newline is added for the editor and one
    dropped from what it saved (as `store` drops one from stdin), so a value round-trips."""
    with _private_directory(production) as directory:
        path = directory / "value.txt"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(text + "\n")
        try:
            # As git runs it: through the shell, so EDITOR="code --wait" works; the path (never the
            # value) is its argument. Files the editor makes (swap, backup) are private too.
            finished = subprocess.run(
                ["/bin/sh", "-c", f'{editor} "$@"', editor, *_private_arguments(editor), str(path)],
                umask=0o077,
                env=_editor_environment(withheld),
                check=False,
            )
        except OSError as exc:
            raise InvalidInputError(f"cannot run the editor {editor!r}: {exc.strerror}") from None
        if finished.returncode == 127:
            raise InvalidInputError(
                f"the editor {editor!r} was not found; set VISUAL or EDITOR to one (nothing was stored)"
            )
        if finished.returncode != 0:
            raise SecretsManagerError(
                f"the editor {editor!r} exited with status {finished.returncode}; nothing was stored"
            )
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InvalidInputError("the editor removed the file; nothing was stored") from None
    try:
        saved = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(
            "the editor saved text that is not UTF-8; nothing was stored (to store any bytes: "
            "'store NAME --file PATH')"
        ) from None
    # An editor that saves CRLF lines ends the file with "\r\n", both ours; but a value that ends
    # in "\r" ends its file with "\r\n" too, whose "\r" is the value's (saved unchanged: kept).
    crlf = saved.endswith("\r\n") and not text.endswith("\r")
    return saved[:-2] if crlf else saved[:-1] if saved.endswith("\n") else saved


def _private_arguments(editor: str) -> tuple[str, ...]:
    """What `editor` is given before the file so it keeps no copy of the value elsewhere: for
    vim and neovim (through a symlink such as Debian's vi), VIM_PRIVATE_ARGUMENTS; others
    nothing (their history is the user's to turn off)."""
    program = shutil.which(shlex.split(editor)[0])  # found: _editor checked it
    if program is None:
        return ()
    return VIM_PRIVATE_ARGUMENTS if VIM_FAMILY.fullmatch(Path(os.path.realpath(program)).name) else ()


def _editor_environment(withheld: tuple[str, ...]) -> dict[str, str]:
    """This environment less what unlocks or reaches a store (the master password, a Vault token,
    PGPASSWORD…, and the AWS credentials or client key this edit reached it with), as `run`
    withholds them: an editor and its plugins have no use for them."""
    return {name: value for name, value in os.environ.items() if name not in withheld}


@contextlib.contextmanager
def _private_directory(production: bool) -> Iterator[Path]:
    """A directory only we can enter, in memory where there is /dev/shm; removed with everything
    in it afterwards. Elsewhere the temporary directory (on disk: refused in production)."""
    if MEMORY_DIRECTORY.is_dir() and os.access(MEMORY_DIRECTORY, os.W_OK | os.X_OK):
        parent: str | None = str(MEMORY_DIRECTORY)
    elif production:
        raise InvalidInputError(
            f"there is no {MEMORY_DIRECTORY} here, and in production edit does not write a value to "
            "disk: pipe the new value to 'store NAME' instead"
        )
    else:
        parent = None
        try:
            temporary = tempfile.gettempdir()
        except FileNotFoundError:  # none writable: a read-only root file system
            raise InvalidInputError(
                f"there is no writable {MEMORY_DIRECTORY} nor temporary directory here (a read-only "
                "file system?) to hold the value while you edit: set TMPDIR to a private writable "
                "directory, or pipe the new value to 'store NAME' instead (nothing was stored)"
            ) from None
        warning_line(f"there is no {MEMORY_DIRECTORY}: the value is on disk in {temporary} while you edit")
    _remove_abandoned(Path(parent or tempfile.gettempdir()), on_disk=parent is None)
    directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=parent))  # mode 0700
    # Locked while this edit lives (the lock goes with the process, SIGKILL too): an unlocked
    # directory holding a file is one a killed edit left, which the next edit removes.
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits out a moment's look by another edit's _remove_abandoned
        yield directory
    finally:
        _remove(directory, on_disk=parent is None)
        os.close(lock)


def _remove(directory: Path, *, on_disk: bool) -> None:
    if on_disk:  # overwrite what can be found before it goes
        for leftover in directory.iterdir():
            with contextlib.suppress(OSError):
                size = leftover.stat().st_size
                with leftover.open("r+b") as handle:
                    handle.write(b"\0" * size)
                    handle.flush()
                    os.fsync(handle.fileno())
    shutil.rmtree(directory, ignore_errors=True)


def _remove_abandoned(parent: Path, *, on_disk: bool) -> None:
    """Remove the directories of this user's edits that were killed (SIGKILL, the OOM killer, a
    crash) with the value in them: no process holds their lock. One that is empty is left alone:
    it may be another edit's, made a moment ago and not locked yet (it holds no value)."""
    try:
        candidates = list(parent.glob(f"{DIRECTORY_PREFIX}*"))
    except OSError:
        return
    for candidate in candidates:
        try:
            descriptor = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, a symbolic link, not a directory, not ours to enter
        try:
            if os.fstat(descriptor).st_uid != os.getuid():
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # an edit running now
            if any(candidate.iterdir()):
                _remove(candidate, on_disk=on_disk)
        except OSError:
            continue
        finally:
            os.close(descriptor)
