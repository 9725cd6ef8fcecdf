"""`inject -i TEMPLATE [-o FILE]`: a configuration file with its secrets filled in, as 1Password's
`op inject` does, for programs that read a file (a market connector's YAML, pgbouncer's
userlist.txt) rather than their environment (`run`).

A reference is `{{ sm://NAME }}` or `{{ sm://NAME#FIELD }}`. Every reference is checked and every
secret read (one audited operation, each read recorded) before anything is written: a missing or
denied secret, a malformed reference, a binary value: nothing is written. `-o FILE` is written
0600 (or `--file-mode`'s, for a program of FILE's group), atomically and durably; an existing FILE
only with `--force`. With `--watch` FILE is
written again when a secret it refers to changes (as consul-template and Vault Agent's templates
do), and `--on-change` runs after each write that changed it.
"""

from __future__ import annotations

import contextlib
import grp
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from secrets_manager.cli.app import (
    FIELD_SEPARATOR,
    REFERENCE_PATTERN,
    cli,
    pass_session,
    select_field,
    warn_if_expired,
)
from secrets_manager.cli.output import counted, info_line, warning_line
from secrets_manager.cli.password import read_bounded
from secrets_manager.cli.rotate_commands import terminate_as_interrupt
from secrets_manager.cli.run_command import WITHHELD_VARIABLES, credentials_that_reached
from secrets_manager.cli.run_supervisor import (
    SETTLE_SECONDS,
    SHELL,
    TICK_SECONDS,
    ReadAgain,
    differences,
)
from secrets_manager.cli.session import Note, Session
from secrets_manager.cli.watch_command import change_source
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SecretsManagerError,
    StorageError,
    Terminated,
    restated,
)
from secrets_manager.rotation import run_in_own_group
from secrets_manager.store import Secret, SecretStore
from secrets_manager.store.base import BulkReader
from secrets_manager.store.changes import ChangeKind, SecretChange
from secrets_manager.store.names import validate_name
from secrets_manager.tls.files import write_private_file
from secrets_manager.values import SecretValue

MAX_TEMPLATE_BYTES = 1024 * 1024
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
MAX_GID = 2**32 - 1  # (gid_t)-1, and all above it, is no group
ON_CHANGE_TIMEOUT_SECONDS = 30.0  # as consul-template's command_timeout
REFERENCE = re.compile(r"\{\{[ \t]*" + REFERENCE_PATTERN + r"[ \t]*\}\}")  # on one line
# "sm:" as a word inside one pair of braces: not "{{ .Values.x }}  # SASL mechanism: PLAIN" later on
# the line, which is copied unchanged as the README promises.
LOOKS_LIKE_A_REFERENCE = re.compile(r"\{\{[^{}\n]*\bsm:")


@cli.command()
@click.option(
    "--in-file", "-i", "template", required=True, metavar="TEMPLATE", help="The template ('-': stdin)."
)
@click.option(
    "--out-file",
    "-o",
    "output",
    metavar="FILE",
    help="Write here (0600 unless --file-mode) instead of stdout.",
)
@click.option("--force", "-f", is_flag=True, help="Replace FILE if it exists.")
@click.option(
    "--file-mode",
    metavar="MODE",
    help="FILE's permissions in octal (default 0600), for a program that runs as another user of "
    "FILE's group: 0640 or 0440. Never readable by other users.",
)
@click.option(
    "--file-group",
    metavar="GROUP",
    help="FILE's group (a name or number; you must belong to it, or be root), as with --file-mode 0640.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running, and write FILE again when a secret it refers to changes (as consul-template "
    "and Vault Agent's templates do), until Ctrl-C, SIGTERM or SIGHUP (exit 0). Needs -o.",
)
@click.option(
    "--on-change",
    metavar="COMMAND",
    help=f"With --watch: run COMMAND with /bin/sh after each write that changed FILE (the first "
    f"included), e.g. 'systemctl reload pgbouncer'; ended after {ON_CHANGE_TIMEOUT_SECONDS:.0f} s.",
)
@pass_session
def inject(
    session: Session,
    template: str,
    output: str | None,
    force: bool,
    file_mode: str | None,
    file_group: str | None,
    watch: bool,
    on_change: str | None,
) -> None:
    """Copy TEMPLATE with each {{ sm://NAME }} or {{ sm://NAME#FIELD }} replaced by that
    secret's value, as 'op inject' does: for programs that read a configuration file rather
    than their environment. Nothing is written unless every reference resolves."""
    if watch and output is None:
        raise InvalidInputError("--watch writes FILE again on a change: give -o FILE")
    if on_change is not None and not watch:
        raise InvalidInputError("--on-change runs after a change: give --watch too")
    if output is None and (file_mode is not None or file_group is not None):
        raise InvalidInputError("--file-mode and --file-group are FILE's: give -o FILE")
    permissions = Permissions(_file_mode(file_mode), _file_group(file_group))
    if permissions.group is not None and not permissions.mode & 0o040:
        raise InvalidInputError(
            f"--file-group {file_group}: with mode {permissions.mode:04o} the group may not read FILE; "
            "add --file-mode 0640 (or 0440)"
        )
    text = _template_text(template)
    references = _references(text)
    if output is not None:
        # Before any secret is read (and audited) for a FILE never written; the store's own files
        # first, so that a refusal does not suggest --force.
        session.refuse_own_file(Path(output), "give -o another file; nothing was written")
        check_out_file(output, force)
    if watch:
        assert output is not None
        # Ctrl-C, SIGTERM or SIGHUP (a closed terminal), at any point: exit 0, with --on-change's
        # process group ended (SIGHUP's default action ended inject alone, COMMAND running on)
        ending = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        with contextlib.suppress(Terminated), terminate_as_interrupt(ending):
            _inject_and_watch(session, text, references, Path(output), force, permissions, on_change)
        return
    with session.secret_operation("inject") as (store, note):
        filled = _fill(text, references, _read(store, note, references, text))
    if output is None:
        sys.stdout.buffer.write(filled.rendered)
        sys.stdout.buffer.flush()
        return
    # SIGTERM or SIGHUP while it is written end the command as Ctrl-C does, so the temporary file
    # holding the secrets is removed: their default action left it beside FILE.
    with terminate_as_interrupt():
        permissions.write(Path(output), filled.rendered, overwrite=force)
    info_line(f"wrote {output} with {counted(len(filled.values), 'secret value')}")


@dataclass(frozen=True)
class Permissions:
    """FILE's mode and group (--file-mode, --file-group)."""

    mode: int = 0o600
    group: int | None = None

    def write(self, path: Path, data: bytes, *, overwrite: bool) -> None:
        write_private_file(path, data, overwrite=overwrite, mode=self.mode, group=self.group)


def _file_mode(text: str | None) -> int:
    """--file-mode's octal MODE: within 0660 (the owner's and the group's read and write), read by
    its owner (inject compares FILE with what it would write), no execute or special bits."""
    if text is None:
        return 0o600
    # octal digits alone, as chmod takes them: int() also took "+640", " 640", "0640\n", "6_4_0",
    # "0o0o640" and full-width digits, none of which chmod would
    digits = re.fullmatch(r"(?:0o)?([0-7]{1,6})", text, re.ASCII)
    mode = int(digits[1], 8) if digits else -1
    if mode < 0 or mode & ~0o660 or not mode & 0o400:
        raise InvalidInputError(
            f"--file-mode {text[:20]!r}: give an octal mode its owner reads and no other user may, "
            "e.g. 0600, 0640 or 0440"
        )
    return mode


def _file_group(text: str | None) -> int | None:
    """--file-group's GROUP, by name or number, as a group id."""
    if text is None:
        return None
    try:
        gid = grp.getgrnam(text).gr_gid
    except KeyError:
        # ASCII digits within a gid_t, (gid_t)-1 excepted (fchown's "leave the group as it is"):
        # str.isdigit() let "²" through to int() (a traceback), and a number past 2**32 through
        # to the fchown at the write, after the secrets were read (a traceback as root)
        if re.fullmatch(r"[0-9]{1,10}", text, re.ASCII) is None or int(text) >= MAX_GID:
            raise InvalidInputError(
                f"--file-group {text[:40]!r}: no such group on this machine (see getent group)"
            ) from None
        gid = int(text)
    if os.geteuid() != 0 and gid not in {os.getegid(), *os.getgroups()}:  # said before any read
        raise InvalidInputError(
            f"--file-group {text[:40]!r}: you do not belong to it (belong to it, or run as root)"
        )
    return gid


@dataclass(frozen=True)
class Filled:
    """A template filled in: its text, and what each reference (NAME or NAME#FIELD) gave it."""

    rendered: bytes = field(repr=False)
    values: dict[str, Secret]  # a NAME#FIELD one holds the field


def _read(store: SecretStore, note: Note, references: list[tuple[str, str]], text: str) -> dict[str, Secret]:
    """Each secret the template refers to, read once, recorded, and warned of if expired. A read
    refused (not found, denied) says the line of `text` that refers to it."""
    secrets = {}
    names = list(dict.fromkeys(name for name, _ in references))
    # Our encrypted store reads them all at one instant, in a few reads; elsewhere each is a `get`,
    # and the reads stop at the first that fails, as they did (a service audits each read).
    ahead = {read.name: read for read in store.read_current(names)} if isinstance(store, BulkReader) else {}
    for name in names:
        try:
            read = ahead.get(name)
            if read is None:
                secret = store.get(name)
            elif read.error is not None:
                raise read.error
            else:
                assert read.secret is not None
                secret = read.secret
        except SecretsManagerError as exc:
            raise restated(
                exc, f"{exc} (the reference on line {_line_of(text, name)} of the template)"
            ) from None
        note.read(secret)
        warn_if_expired(secret)
        secrets[name] = secret
    return secrets


def _fill(text: str, references: list[tuple[str, str]], secrets: dict[str, Secret]) -> Filled:
    """`text` with its references replaced; InvalidInputError for a binary value or a result too
    large (nothing is written)."""
    values: dict[str, Secret] = {}
    for name, field_name in references:
        shown = f"{name}{FIELD_SEPARATOR}{field_name}" if field_name else name
        data = secrets[name].value.reveal()
        if field_name:
            data = select_field(data, name, field_name)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"the value of {shown} is binary, so it cannot go into a text file; nothing was written"
            ) from None
        values[shown] = replace(secrets[name], value=SecretValue(data))

    def value_of(match: re.Match[str]) -> str:
        shown = f"{match[1]}{FIELD_SEPARATOR}{match[2]}" if match[2] else match[1]
        return values[shown].value.reveal().decode("utf-8")

    size = len(text.encode("utf-8")) + sum(
        len(value_of(match).encode("utf-8")) for match in REFERENCE.finditer(text)
    )
    if size > MAX_OUTPUT_BYTES:  # a 1 MiB template of one 64 KiB secret 100,000 times: 6 GB in memory
        raise InvalidInputError(
            f"the filled-in template would be larger than {MAX_OUTPUT_BYTES // (1024 * 1024)} MiB "
            "(a large secret referred to many times?); nothing was written"
        )
    return Filled(REFERENCE.sub(value_of, text).encode("utf-8"), values)


def _inject_and_watch(
    session: Session,
    text: str,
    references: list[tuple[str, str]],
    output: Path,
    force: bool,
    permissions: Permissions,
    on_change: str | None,
) -> None:
    """`inject --watch`: FILE written now, then again (atomically) each time a secret it refers to
    changes and what it would hold differs, with `on_change` run after each such write. A reading
    or write that fails after a change leaves FILE as it was, with a warning; tried again every
    RETRY_SECONDS while the store does not answer (the reading) or FILE cannot be written (the
    write alone, with what was read), else at the next change."""
    names = frozenset(name for name, _ in references)
    with session.held_secret_store("inject") as (store, audited):
        source = change_source(store, "", "inject --watch", "run inject again when you need the file")
        withheld = (*WITHHELD_VARIABLES, *credentials_that_reached(session, store))

        def read() -> Filled:
            with audited() as note:
                return _fill(text, references, _read(store, note, references, text))

        filled = read()
        before = _content_of(output)
        permissions.write(output, filled.rendered, overwrite=force)
        info_line(f"wrote {output} with {counted(len(filled.values), 'secret value')}; watching for changes")
        if on_change is not None and before != filled.rendered:
            _run_on_change(on_change, withheld)
        changes: queue.SimpleQueue[SecretChange] = queue.SimpleQueue()
        stop = threading.Event()
        failed: list[BaseException] = []

        def follow() -> None:
            try:
                source.follow(
                    lambda change: (
                        changes.put(change)
                        if change.kind is ChangeKind.RESYNC or change.name in names
                        else None
                    ),
                    stop,
                )
            except BaseException as exc:  # said by the main thread, which ends on it
                failed.append(exc)

        follower = threading.Thread(target=follow, name="inject-changes", daemon=True)
        follower.start()
        changed: set[str] = set()
        last_change = 0.0
        again = ReadAgain()
        unwritten: tuple[Filled, set[str]] | None = None  # read, not in FILE yet; what changed
        try:
            while True:
                with contextlib.suppress(queue.Empty):
                    change = changes.get(timeout=TICK_SECONDS)
                    changed.add(change.name or "the secrets (changes were missed)")
                    last_change = time.monotonic()
                    again.changed()
                if not follower.is_alive():
                    raise failed[0] if failed else InvalidInputError("stopped following the changes")
                now = time.monotonic()
                if now < again.at or (changed and now - last_change < SETTLE_SECONDS):
                    continue
                if changed:
                    changed |= set() if unwritten is None else unwritten[1]
                    try:
                        unwritten = (read(), set(changed))
                    except SecretsManagerError as exc:
                        again.failed(
                            exc,
                            now,
                            f"{', '.join(sorted(changed))} changed, but could not be read ({exc}); "
                            f"{_as_it_was(output)}",
                        )
                        continue
                    changed.clear()
                if unwritten is None:
                    continue
                reading, what = unwritten[0], ", ".join(sorted(unwritten[1]))
                # compared with what FILE holds, as consul-template does: one removed or replaced
                # meanwhile (a clean-up of /run, a deploy) is written again
                held = _content_of(output)
                if reading.rendered != held:
                    try:
                        permissions.write(output, reading.rendered, overwrite=True)
                    except SecretsManagerError as exc:
                        # a full disk, a directory gone: the write alone is tried again, not the
                        # reading (a day of full disk is not thousands of reads in the audit log)
                        again.failed(
                            StorageError(str(exc)),
                            now,
                            f"{what} changed, but {output} could not be written again ({exc}); "
                            f"{_as_it_was(output)}",
                        )
                        continue
                unwritten = None
                if again.succeeded():
                    info_line(f"{output} is up to date again")
                if reading.rendered == held:  # a new version of the same value, a tag
                    filled = reading
                    continue
                said = differences(filled.values, reading.values)
                if reading.rendered == filled.rendered:
                    said = [f"{output} no longer held what was written (removed or changed meanwhile)"]
                filled = reading
                info_line(f"{'; '.join(said) or 'the secrets changed'}: wrote {output} again")
                if on_change is not None:
                    _run_on_change(on_change, withheld)
        finally:
            stop.set()
            source.cancel()
            owed = changed | (set() if unwritten is None else unwritten[1])
            if owed:  # ended (a signal, a failure) with a change not in FILE: say it is behind
                behind = "; it holds the values from before the change" if output.is_file() else ""
                warning_line(
                    f"ended before {output} was written again after {', '.join(sorted(owed))} changed{behind}"
                )


def _as_it_was(output: Path) -> str:
    """What a failed reading or write leaves: FILE as it was, or (removed meanwhile, something
    else in its place) no values at all until a write succeeds."""
    return f"{output} keeps what it had" if output.is_file() else f"{output} holds no values meanwhile"


def _content_of(path: Path) -> bytes | None:
    """What FILE holds now (None: nothing, or not readable), to tell whether a write changed it."""
    try:
        return read_bounded(path, MAX_OUTPUT_BYTES, what=str(path))
    except (OSError, SecretsManagerError):
        return None


def _run_on_change(command: str, withheld: tuple[str, ...]) -> None:
    """--on-change's COMMAND, by /bin/sh, in a process group of its own (ended with it after
    ON_CHANGE_TIMEOUT_SECONDS or on Ctrl-C), without the store's credentials; a failure is said,
    and the watch goes on."""
    environment = {key: value for key, value in os.environ.items() if key not in withheld}
    try:
        status = run_in_own_group([SHELL, "-c", command], b"", environment, timeout=ON_CHANGE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        warning_line(f"--on-change did not end within {ON_CHANGE_TIMEOUT_SECONDS:.0f} s and was killed")
        return
    except OSError as exc:
        warning_line(f"--on-change could not start ({exc.strerror or type(exc).__name__})")
        return
    if status != 0:
        warning_line(f"--on-change exited {status}")
    else:
        info_line("--on-change ran (exit 0)")


def check_out_file(output: str, force: bool) -> None:
    """FILE's directory must exist (said so, with what to do), and FILE must not, unless `force`
    (write_private_file checks again as it writes). A named pipe or a device at FILE
    (or where its symbolic link leads: /dev/stdout) would be replaced by a regular file, on disk,
    holding the secrets (--force), where whoever made the pipe meant them never to touch a disk;
    a directory is named as one."""
    try:
        found = os.stat(output)
    except FileNotFoundError:
        parent = Path(output).parent
        if not parent.is_dir():  # else: a dangling link or nothing there, which is written
            raise InvalidInputError(
                f"-o {output}: the directory {parent} does not exist; create it first (a private "
                "one: mkdir -m 0700); nothing was written"
            ) from None
        return
    except OSError:  # write_private_file says what is wrong
        return
    if stat.S_ISDIR(found.st_mode):
        raise InvalidInputError(
            f"{output} is a directory; give -o the path of a file in it; nothing was written"
        )
    if not stat.S_ISREG(found.st_mode):
        raise InvalidInputError(
            f"{output} is not a regular file (a named pipe or a device), which -o would replace by "
            "a file on disk; leave -o out and redirect the output to it instead; nothing was written"
        )
    if not force:
        raise ConflictError(f"{output} already exists; add --force to replace it")


def _template_text(template: str) -> str:
    if template == "-":
        data = sys.stdin.buffer.read(MAX_TEMPLATE_BYTES + 1)
        if len(data) > MAX_TEMPLATE_BYTES:
            raise InvalidInputError(f"the template on stdin is larger than {MAX_TEMPLATE_BYTES} bytes")
    else:
        try:
            data = read_bounded(Path(template), MAX_TEMPLATE_BYTES, what="the template")
        except FileNotFoundError:
            raise NotFoundError(f"no template at {template}") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise InvalidInputError(f"cannot read the template {template}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("the template is not UTF-8 text") from None


def _line_of(text: str, name: str) -> int:
    """The number of the first line of `text` that refers to `name`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if any(match[1] == name for match in REFERENCE.finditer(line)):
            return number
    raise AssertionError(f"no reference to {name!r}")  # the references came from this text


def _references(text: str) -> list[tuple[str, str]]:
    """Every (NAME, FIELD) the template refers to; InvalidInputError, with its line, for a
    reference that is malformed (it would otherwise be copied as it is, secret missing)."""
    references = []
    for number, line in enumerate(text.splitlines(), start=1):
        remainder = REFERENCE.sub("", line)
        if LOOKS_LIKE_A_REFERENCE.search(remainder):
            raise InvalidInputError(
                f"line {number} of the template has a malformed reference; write {{{{ sm://NAME }}}} "
                "or {{ sm://NAME#FIELD }}; nothing was written"
            )
        for match in REFERENCE.finditer(line):
            name = match[1]
            try:
                validate_name(name)
            except InvalidInputError as exc:
                raise InvalidInputError(
                    f"line {number} of the template: {exc}; nothing was written"
                ) from None
            references.append((name, match[2] or ""))
    if not references:
        raise InvalidInputError("the template refers to no secret ({{ sm://NAME }}); nothing was written")
    return references
