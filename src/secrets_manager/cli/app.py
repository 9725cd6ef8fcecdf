"""The click group and the core verbs. Each command parses, validates input before asking for a
password, calls the store through its Session (cli/session.py), and formats; all crypto and SQL live
below `store/`."""

from __future__ import annotations

import base64
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from secrets_manager.cli.clipboard import (
    CLIP_TIME_VARIABLE,
    DEFAULT_CLIP_SECONDS,
    ClipboardFailed,
    ClipboardTool,
    ClipboardUnavailable,
    clip_seconds,
    copy_for_a_while,
    find_clipboard,
)
from secrets_manager.cli.completion import complete_secret_names
from secrets_manager.cli.output import (
    counted,
    info_line,
    output_of,
    parse_deadline,
    print_json,
    suggested,
    terminal_control,
    timestamp,
    warning_line,
)
from secrets_manager.cli.password import (
    read_bounded,
    terminal_available,
)
from secrets_manager.cli.session import (
    AUDIT_FILE_VARIABLE,
    SERVER_VARIABLE,
    STORE_VARIABLE,
    Session,
)
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SecretsManagerError,
    UnsupportedOperationError,
    restated,
)
from secrets_manager.rotation import (
    ALPHABETS,
    DEFAULT_LENGTH,
    MAX_LENGTH,
    MIN_LENGTH,
    generated_value,
    new_value_for,
)
from secrets_manager.store import (
    MAX_VALUE_SIZE,
    PREVIOUS,
    Secret,
    SecretStore,
    validate_name,
)
from secrets_manager.store.base import (
    LABELS,
    MAX_MAX_VERSIONS,
    MIN_MAX_VERSIONS,
    checked_max_versions,
)
from secrets_manager.store.names import DEFAULT_NAMESPACE
from secrets_manager.store.url import (
    KDF_PROFILE_NAMES,
)
from secrets_manager.values import SecretValue, read_exact_json_object

FIELD_SEPARATOR = "#"
# A reference to a secret, as `inject` templates and `run --env-file` values write one (1Password's
# op:// references in our scheme): sm://NAME or sm://NAME#FIELD; groups NAME and FIELD.
REFERENCE_PATTERN = r"sm://([^\s{}#]+)(?:#([^\s{}]+))?"


# How a generated value looks (`store --generate`, `rotate`): Python's `secrets`, never our own.
length_option = click.option(
    "--length",
    type=click.IntRange(min=MIN_LENGTH, max=MAX_LENGTH),
    default=DEFAULT_LENGTH,
    show_default=True,
    metavar="N",
    help="Characters in a generated value.",
)
alphabet_option = click.option(
    "--alphabet",
    type=click.Choice(sorted(ALPHABETS)),
    default="alnum",
    show_default=True,
    help="Characters of a generated value.",
)


def expires_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--expires TIME`: when the value written stops working (`store`, `edit`, `import`, `rotate`)."""
    return click.option("--expires", metavar="TIME", help=help_text)


def future_expiry(expires: str | None, name: str) -> datetime | None:
    """The moment `--expires` names, refused if already past: a value written now would count as
    expired at once (one learnt late is recorded with `metadata --expires`, which warns instead)."""
    if expires is None:
        return None
    expiry = parse_deadline(expires, "--expires")
    if expiry <= datetime.now(UTC):
        raise InvalidInputError(
            f"--expires {expires!r} is {timestamp(expiry)}, already past: a value stored now would be "
            f"expired at once; give a later time, or record an expiry learnt late with "
            f"'metadata {name} --expires TIME' after storing"
        )
    return expiry


def refuse_generator_options(without: str) -> None:
    """InvalidInputError if --length or --alphabet was typed where no value is generated: it would
    be ignored silently, and the user would believe the value has that shape."""
    context = click.get_current_context()
    given = [
        f"--{name}"
        for name in ("length", "alphabet")
        if context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        verb, them = ("shape", "them") if len(given) > 1 else ("shapes", "it")
        raise InvalidInputError(
            f"{' and '.join(given)} only {verb} a generated value; {without.format(them=them)}"
        )


def kdf_profile_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--kdf-profile: the Argon2id cost of a new password (init, unlock-with, restore)."""
    return click.option(
        "--kdf-profile",
        type=click.Choice(KDF_PROFILE_NAMES),
        default="default",
        show_default=True,
        help=help_text,
    )


_pass_session = click.make_pass_decorator(Session)
F = TypeVar("F", bound=Callable[..., Any])


# Every store's (and the service's) words for a secret name it does not hold.
_SECRET_NOT_FOUND = re.compile(r"secret '.*' not found", re.DOTALL)


def pass_session(command: F) -> F:
    """Give a command the Session as its first argument, once SHRIVENQUANT_ENV is known to be
    valid: here, when the command runs, and so after click has answered a `--help`."""

    @functools.wraps(command)
    def checked(session: Session, *args: Any, **kwargs: Any) -> Any:
        session.environment  # noqa: B018  (an invalid SHRIVENQUANT_ENV is an error here)
        try:
            return command(session, *args, **kwargs)
        except NotFoundError as exc:
            # A name no store holds, most often a typo: say where to look (with this command
            # line's --store or --server, which only the running command still knows).
            if type(exc) is NotFoundError and _SECRET_NOT_FOUND.fullmatch(str(exc)):
                raise NotFoundError(f"{exc}; check the name: '{suggested('list')}' shows them") from None
            raise

    return _pass_session(checked)  # type: ignore[return-value]


# The commands defined in modules of their own, and the module of each. Such a module is imported
# only when its command is named (or --help lists them all): a `get` does not pay for the imports of
# serve, rotate, backup or run, which were most of its start-up time.
COMMAND_MODULES = {
    "agent": "agent_commands",
    "audit": "audit_commands",
    "backup": "backup_commands",
    "restore": "backup_commands",
    "edit": "edit_command",
    "export": "export_command",
    "health": "health_command",
    "history": "metadata_commands",
    "import": "import_command",
    "init": "unlock_commands",
    "inject": "inject_command",
    "keys": "keys_commands",
    "list": "metadata_commands",
    "metadata": "metadata_commands",
    "mv": "move_commands",
    "cp": "move_commands",
    "otp": "otp_command",
    "passwd": "unlock_commands",
    "pki": "pki_commands",
    "policy": "policy_commands",
    "purge": "purge_command",
    "recovery": "recovery_commands",
    "rotate": "rotate_commands",
    "run": "run_command",
    "schedule": "schedule_commands",
    "serve": "serve_commands",
    "status": "status_command",
    "unlock-with": "unlock_commands",
    "watch": "watch_command",
}


def refuse_repeated_options(command: click.Command, ctx: click.Context, args: Sequence[str]) -> None:
    """InvalidInputError if an option that takes one value is given more than once. click keeps the
    last silently, so `--store dev … --store prod` (a line put together from two places) would act
    on prod, `--expect-version 3 --expect-version 4` would guard a write with one of two versions,
    `destroy --version 3 --version 4` destroy 4. Flags and options that take several are not
    values that one could override another."""
    if ctx.resilient_parsing:  # shell completion: a half-typed line is not refused
        return
    _, _, order = command.make_parser(ctx).parse_args(args=list(args))  # parses a copy; no callbacks
    seen: set[str] = set()
    for param in order:
        if not isinstance(param, click.Option) or param.multiple or param.count or param.is_flag:
            continue
        if param.name in seen:
            option = max(param.opts, key=len)
            raise InvalidInputError(
                f"{option} was given more than once; it takes one value: give it once "
                f"(see '{ctx.command_path} --help')"
            )
        seen.add(param.name or "")


class OptionsOnceCommand(click.Command):
    """A command whose single-value options may be given once (refuse_repeated_options)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


class OptionsOnceGroup(click.Group):
    """A group whose options, and its commands' and subgroups', may be given once each."""

    command_class = OptionsOnceCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


OptionsOnceGroup.group_class = OptionsOnceGroup  # its subgroups, and the top level's (not on demand)


class _CommandsOnDemand(OptionsOnceGroup):
    """The top-level group: a command of COMMAND_MODULES is imported when it is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            importlib.import_module(f"secrets_manager.cli.{COMMAND_MODULES[cmd_name]}")  # registers it
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_CommandsOnDemand,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="SHRIVENQUANT_ENV: development (default), staging or production; production enforces "
    "guard rails against unsafe settings (README.md, 'Environment variables').",
)
@click.option(
    "--store",
    "store_url",
    envvar=STORE_VARIABLE,
    metavar="URL",
    help=f"Store file path, sqlite:///path, postgresql://USER@HOST:PORT/DB, vault://HOST:PORT/MOUNT or "
    f"aws-secretsmanager://REGION/PREFIX [env {STORE_VARIABLE}; default: a file in your data directory].",
)
@click.option(
    "--password-file",
    metavar="PATH",
    help="Read the master password from this file [env MASTER_PASSWORD_FILE].",
)
@click.option(
    "--audit-file",
    envvar=AUDIT_FILE_VARIABLE,
    metavar="PATH",
    help=(
        f"Audit log file [env {AUDIT_FILE_VARIABLE}; default: beside a store file, its suffix made "
        ".audit.jsonl (secrets.db: secrets.audit.jsonl); README, Environment variables]."
    ),
)
@click.option(
    "--server",
    envvar=SERVER_VARIABLE,
    metavar="HOST:PORT",
    help=f"Use a secrets-manager service instead of a local store [env {SERVER_VARIABLE}]; several "
    "comma-separated: the first that answers its health check; mutual TLS from SECRETS_MANAGER_CERT, "
    "SECRETS_MANAGER_KEY, SECRETS_MANAGER_CA.",
)
@click.version_option(package_name="secrets-manager", prog_name="secrets-manager")  # read when asked
@click.pass_context
def cli(
    ctx: click.Context,
    store_url: str | None,
    password_file: str | None,
    audit_file: str | None,
    server: str | None,
) -> None:
    """Keep credentials encrypted (AES-256-GCM, Argon2id, a separate key per service).

    \b
    Master password sources, first match wins: --password-file, MASTER_PASSWORD_FILE,
    MASTER_PASSWORD, a prompt on the terminal (which a running 'agent start' spares you).
    Exit codes: 0 ok, 1 error, 2 invalid input, 3 not found, 4 unlock failed,
    5 access denied, 6 integrity failure, 7 conflict.
    """
    ctx.obj = Session(
        store_url=store_url or None,
        password_file=password_file,
        audit_file=audit_file or None,
        environ=os.environ,
        server=server or None,
    )


@cli.command("store")
@click.argument("name", shell_complete=complete_secret_names)
@click.argument("value", required=False)
@click.option("--file", "value_file", metavar="PATH", help="Read the value's exact bytes from a file.")
@click.option("--raw", is_flag=True, help="Keep stdin byte for byte (else one trailing newline is dropped).")
@click.option(
    "--generate", is_flag=True, help="Store a random value instead (shown by 'get', never printed here)."
)
@length_option
@alphabet_option
@click.option(
    "--expect-version",
    type=click.IntRange(min=0),
    metavar="N",
    help="Write only if the current version is N (0: only if the secret does not exist).",
)
@click.option("--allow-empty", is_flag=True, help="Store an empty value (refused otherwise).")
@click.option("--description", help="A note about the secret (not secret itself).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the secret (repeatable).")
@click.option(
    "--max-versions",
    type=int,
    metavar="N",
    help=f"Keep at most N versions of the secret ({MIN_MAX_VERSIONS} to {MAX_MAX_VERSIONS}; new or "
    "existing, from this write on (on Vault from the next: set once this write succeeded); labelled ones "
    "are never pruned). Default: 10, or as set before.",
)
@expires_option(
    "When this value stops working (an exchange key's 90 days, a role's VALID UNTIL): an ISO 8601 "
    "time or an age from now such as 90d. For this version only: the next one has none unless given."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--clip",
    "-c",
    is_flag=True,
    help="With --generate: copy the new value to the clipboard, as 'pass generate -c' does (taken off "
    "as for 'get --clip').",
)
@pass_session
def store_command(
    session: Session,
    name: str,
    value: str | None,
    value_file: str | None,
    raw: bool,
    generate: bool,
    length: int,
    alphabet: str,
    expect_version: int | None,
    allow_empty: bool,
    description: str | None,
    tags: tuple[str, ...],
    max_versions: int | None,
    expires: str | None,
    as_json: bool,
    clip: bool,
) -> None:
    """Store a new version of NAME. The value comes from stdin, a prompt, --file, VALUE (warns), or
    --generate (a random one, like 'pass generate': not printed; 'get' shows it).

    NAME#FIELD replaces one text field of a JSON object value (as 'vault kv patch' does) and keeps
    the others, written only if the version read is still current."""
    name, separator, field = name.partition(FIELD_SEPARATOR)
    try:
        validate_name(name)
    except InvalidInputError:
        if value is None:
            raise
        # `store 'S3cr3t!' DB_PASSWORD` (NAME and VALUE swapped): the message echoed the value.
        raise InvalidInputError(
            "the first argument is not a valid secret name (not shown: it may be the value); write "
            "'store NAME VALUE' with a NAME like 'auth/DB_PASSWORD', or better 'store NAME' and type "
            "the value at the prompt"
        ) from None
    if separator and value is not None:
        # `store 'Pa55#word' DB_PASSWORD` (swapped) would read a secret named after half the value
        # and write the other half's field: a field's new value never comes from an argument.
        raise InvalidInputError(
            "with NAME#FIELD, give the field's new value on stdin, at the prompt, with --file or with "
            "--generate, not as an argument"
        )
    parsed_tags = parse_tags(tags) if tags else None
    checked_max_versions(name, max_versions)
    expiry = future_expiry(expires, name)
    if generate and (value is not None or value_file is not None):
        raise InvalidInputError("--generate makes the value; give no VALUE or --file with it")
    if not generate:
        refuse_generator_options("give --generate too, or drop {them}")
    if separator and not field:
        raise InvalidInputError(f"'{name}{FIELD_SEPARATOR}' names no field; write NAME#FIELD")
    if clip and not generate:
        raise InvalidInputError("--clip copies a generated value: give --generate too (or use 'get --clip')")
    if clip and as_json:
        raise InvalidInputError("--clip and --json exclude each other")
    clipboard = clipboard_found_first() if clip else None
    secret = (
        generated_value(length, alphabet)
        if generate
        else read_value(value, value_file, raw=raw, allow_empty=allow_empty)
    )
    generated = secret
    if separator:
        secret, expect_version = _with_field_replaced(session, name, field, secret, expect_version)
    with session.secret_operation("store", name, mutating=True) as (store, note):
        note.value(secret.reveal())
        info = store.put(
            name,
            secret.reveal(),
            expect_version=expect_version,
            description=description,
            tags=parsed_tags,
            max_versions=max_versions,
            expires=expiry,
        )
        note.version(info.version)
    until = "" if expiry is None else f", expires {timestamp(expiry)}"
    with output_of(f"stored {name} version {info.version}{until}"):
        if as_json:
            print_json({"name": name, "version": info.version, "expires": timestamp(expiry) or None})
        else:
            click.echo(f"stored {name} version {info.version}{until}")
    if clipboard is not None:
        shown_name = f"{name}{separator}{field}"
        try:
            copy_to_clipboard(clipboard, generated.reveal(), shown_name)
        except SecretsManagerError as exc:
            raise SecretsManagerError(
                f"{exc} (it was stored: '{suggested('get', shown_name, '--clip')}' copies it)"
            ) from None


def _with_field_replaced(
    session: Session, name: str, field: str, new: SecretValue, expect_version: int | None
) -> tuple[SecretValue, int]:
    """NAME's current JSON object with `field` set to `new`, and the version it was read from
    (audited as store.read), which the write then expects: a store landing between the read and
    the write would otherwise be undone by the other fields as they were read."""
    with session.secret_operation("store.read", name) as (store, note):
        secret = store.get(name)
        note.version(secret.version)
        note.value(secret.value.reveal())
    if not secret.version:
        raise UnsupportedOperationError(
            f"the version of {name} read is not known (on AWS that needs "
            "secretsmanager:ListSecretVersionIds), so writing one field could undo a concurrent store: "
            "store the whole value instead"
        )
    if expect_version is not None and expect_version != secret.version:
        raise ConflictError(
            f"{name} is at version {secret.version}, not {expect_version} (--expect-version); "
            "nothing was stored"
        )
    return new_value_for(name, secret.value, new, field=field, generated=False), secret.version


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option("--version", "version", type=click.IntRange(min=1), metavar="N", help="A version number.")
@click.option("--label", type=click.Choice(LABELS), help="A label instead of 'current'.")
@click.option("--raw", is_flag=True, help="Write exactly the stored bytes, no newline.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print name, version, labels, expiry, rotation target and value as JSON.",
)
@click.option(
    "--clip",
    "-c",
    is_flag=True,
    help=f"Copy the value to the clipboard instead of printing it, as 'pass -c' does; taken off "
    f"after {CLIP_TIME_VARIABLE} seconds (default {DEFAULT_CLIP_SECONDS}).",
)
@pass_session
def get(
    session: Session,
    name: str,
    version: int | None,
    label: str | None,
    raw: bool,
    as_json: bool,
    clip: bool,
) -> None:
    """Print the value of NAME (its current version unless --version or --label).

    NAME#FIELD prints one field of a secret whose value is a JSON object (a Vault secret with
    several keys, an AWS secret like {"username": …, "password": …})."""
    name, selector, field = split_field_name(name)
    if raw and as_json:
        raise InvalidInputError("--raw and --json exclude each other")
    if clip and (raw or as_json):
        raise InvalidInputError(f"--clip and --{'raw' if raw else 'json'} exclude each other")
    if version is not None and label is not None:
        raise InvalidInputError("give --version or --label, not both")
    clipboard = clipboard_found_first() if clip else None
    with session.secret_operation("get", name) as (store, note):
        try:
            secret = store.get(name, version=version, label=label)
        except NotFoundError as exc:
            raise _naming_full_names(store, name, exc) from None
        note.version(secret.version)
        note.value(secret.value.reveal())
    warn_if_expired(secret)
    data = secret.value.reveal()
    if field:
        data = select_field(data, name, field)
    if raw:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if as_json:
        doc: dict[str, Any] = {
            "name": secret.name,
            "version": secret.version or None,  # 0: not known (AWS, without ListSecretVersionIds)
            "labels": list(secret.labels),
            "created": timestamp(secret.created),
            "expires": timestamp(secret.expires) or None,
            # what a rotation staged this version for (postgres-role:ROLE): where a resume sets it
            "target": secret.target,
        }
        try:
            doc["value"] = data.decode("utf-8")
        except UnicodeDecodeError:
            doc["value_base64"] = base64.b64encode(data).decode("ascii")
        print_json(doc)
        return
    text: str | None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # no text holds a NUL: a file, a key, a C string's end
        raise InvalidInputError(
            f"the value of {name} is binary ({counted(len(data), 'byte')}); use --raw or --json"
        )
    if clipboard is not None:
        copy_to_clipboard(clipboard, data, f"{name}{selector}{field}")
        return
    control = terminal_control(text) if sys.stdout.isatty() else None
    if control is not None:  # an escape sequence could retitle the window, set the clipboard…
        raise InvalidInputError(
            f"the value of {name} holds a control character ({control}) that a terminal would act "
            "on; use --raw into a file or a pipe, or --json"
        )
    # the stored bytes, not the text re-encoded in the locale's encoding (Latin-1: other bytes)
    click.echo(data)


# Full names a short name's miss lists at most (`get BINANCE_API_KEY`)
SHOWN_FULL_NAMES = 5


def _naming_full_names(store: SecretStore, name: str, missing: NotFoundError) -> NotFoundError:
    """`get BINANCE_API_KEY`, as the seed writes it, where the store holds
    market-connector/BINANCE_API_KEY: a name without '/' is in the default namespace, so it is not
    found; the full names that end in it are what was meant (the SDK's credentials take the short
    name; the CLI does not guess which secret to print). `missing` as it is when there are none,
    the name has a '/', or the names cannot be listed (a caller who may not list)."""
    if "/" in name or type(missing) is not NotFoundError or not _SECRET_NOT_FOUND.fullmatch(str(missing)):
        return missing
    try:
        meant = [meta.name for meta in store.list("") if meta.name.endswith("/" + name)]
    except SecretsManagerError:
        return missing
    if not meant:
        return missing
    more = f" and {len(meant) - SHOWN_FULL_NAMES} more" if len(meant) > SHOWN_FULL_NAMES else ""
    return NotFoundError(
        f"{missing}: a name without '/' is in the '{DEFAULT_NAMESPACE}' namespace; did you mean "
        f"{' or '.join(meant[:SHOWN_FULL_NAMES])}{more}?"
    )


def clipboard_found_first() -> tuple[ClipboardTool, int, Path]:
    """The clipboard, how long the value stays on it and where its clearer keeps its files, found
    before the secret is read or written: a read that could go nowhere is not audited as done, and
    a generated value is not stored where nobody could paste it."""
    try:
        seconds = clip_seconds(os.environ)
        tool = find_clipboard(os.environ)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    except ClipboardUnavailable as exc:
        raise SecretsManagerError(f"{exc}; run the command without --clip") from None
    from secrets_manager.agent import agent_directory, check_directory

    directory = agent_directory(os.environ)
    check_directory(directory, create=True)
    return tool, seconds, directory


def copy_to_clipboard(clipboard: tuple[ClipboardTool, int, Path], data: bytes, shown_name: str) -> None:
    from secrets_manager.cli.rotate_commands import terminate_as_interrupt  # it imports this module

    tool, seconds, directory = clipboard
    if not data:  # copying it would only empty the clipboard for a while, as pass -c refuses to
        raise InvalidInputError(f"{shown_name} is empty: there is nothing to copy to the clipboard")
    try:
        # A closed terminal (SIGHUP) or a kill (SIGTERM) during the copy ends it as Ctrl-C does,
        # taking the value off: left to their default action they left it on with no clearer.
        with terminate_as_interrupt():
            copy_for_a_while(tool, data, seconds, directory)
    except ClipboardFailed as exc:
        raise SecretsManagerError(f"could not copy {shown_name} to the clipboard: {exc}") from None
    click.echo(f"Copied {shown_name} to the clipboard ({tool.name}); it is cleared in {seconds} s.")


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option(
    "--expect-version",
    type=click.IntRange(min=1),
    metavar="N",
    help="Only if version N is still current (exit 7, nothing deleted, if another version is).",
)
@pass_session
def delete(session: Session, name: str, expect_version: int | None) -> None:
    """Soft-delete NAME: hidden from get and list until 'undelete'."""
    validate_name(name)
    with session.secret_operation("delete", name, mutating=True) as (store, note):
        if expect_version is not None:
            note.version(expect_version)
        store.delete(name, expect_version=expect_version)
    info_line(f"deleted {name} (recoverable with '{suggested('undelete', name)}')")


@cli.command()
@click.argument("name")
@pass_session
def undelete(session: Session, name: str) -> None:
    """Restore a soft-deleted NAME."""
    validate_name(name)
    with session.secret_operation("undelete", name, mutating=True) as (store, _):
        store.undelete(name)
    info_line(f"restored {name}")


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    metavar="N",
    help="The version whose value becomes current again (default: the one labelled previous).",
)
@click.option("--json", "as_json", is_flag=True, help="Print name, new version and source version as JSON.")
@pass_session
def rollback(session: Session, name: str, version: int | None, as_json: bool) -> None:
    """Make an earlier version's value current again, written as a new version (Vault's
    'kv rollback'): the history stays whole. Compare-and-set against the current version, so a
    change made meanwhile is never overwritten (exit 7)."""
    validate_name(name)
    with session.secret_operation("rollback", name, mutating=True) as (store, note):
        current = _current_version(store, name)
        if version is None:
            try:
                old = store.get(name, label=PREVIOUS)
            except NotFoundError as error:  # none labelled so, or its value destroyed: say which
                raise NotFoundError(
                    f"{name} has no previous version to roll back to ({error}); give --version N "
                    f"('{suggested('history', name)}' shows the versions)"
                ) from None
        else:
            old = store.get(name, version=version)
        if version is None and old.version == current:
            # `previous` is never on the current version: read after `current`, it is on it only
            # because a version was stored between the two reads (a conflict, not a bad request).
            raise ConflictError(
                f"{name} changed while the rollback read it (version {current} was current, and is now "
                f"labelled previous); nothing was written: run the rollback again"
            )
        if old.version == current:
            raise InvalidInputError(
                f"version {old.version} of {name} is current already; nothing to roll back"
            )
        # the same credential as that version: its expiry, if one is recorded for it, goes with it
        try:
            info = store.put(name, old.value.reveal(), expect_version=current, expires=old.expires)
        except SecretsManagerError as error:
            stored = error.stored_version
            if stored is None:
                raise
            # Vault or AWS wrote the version, then refused its expiry: the rollback is made.
            note.version(stored)
            note.value(old.value.reveal())
            raise restated(
                error,
                f"rolled back {name}: version {stored} is current, with the value of version "
                f"{old.version}, but its expiry was not recorded: "
                f"{error.metadata_error or error}; do not roll back again "
                f"('{suggested('metadata', name, '--expires')} …' sets it)",
            ) from None
        note.version(info.version)
        note.value(old.value.reveal())
    if as_json:
        print_json({"name": name, "version": info.version, "from_version": old.version})
    info_line(
        f"rolled back {name}: version {info.version} is current, with the value of version {old.version}"
    )
    warn_if_written_expired(name, info.version, old.expires, f"the value of version {old.version}")


def _current_version(store: SecretStore, name: str) -> int:
    """The current version of `name`, read with GetSecret (`read` suffices over --server); if its
    value was destroyed (`destroy --version N`), its number from DescribeSecret: rolling back is
    then the way to a readable current value again, as Vault's 'kv rollback' allows."""
    try:
        return store.get(name).version
    except NotFoundError:
        try:
            meta = store.describe(name)
        except SecretsManagerError:
            meta = None
        destroyed = {info.version for info in meta.versions if info.destroyed} if meta else set()
        if meta is None or meta.deleted is not None or meta.current_version not in destroyed:
            raise  # the get's own error: no such secret, deleted, …
        assert meta.current_version is not None
        return meta.current_version


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option(
    "--version",
    "versions",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="N",
    help="A version to erase (repeatable).",
)
@click.option("--all", "destroy_all", is_flag=True, help="Erase every version and the metadata.")
@pass_session
def destroy(session: Session, name: str, versions: tuple[int, ...], destroy_all: bool) -> None:
    """Erase versions of NAME for good (cannot be undone)."""
    session.require_local("destroy")
    validate_name(name)
    if bool(versions) == destroy_all:
        raise InvalidInputError("give --version N (repeatable) or --all")
    with session.store_operation("destroy", name, mutating=True) as (store, event):
        if not destroy_all:
            event.version = min(versions) if len(set(versions)) == 1 else None
        if destroy_all:
            store.destroy_secret(name)
        else:
            store.destroy(name, versions)
    if destroy_all:
        info_line(f"destroyed every version of {name}")
    else:
        info_line(f"destroyed version {', '.join(map(str, sorted(set(versions))))} of {name}")


def read_value(
    value: str | None,
    value_file: str | None,
    *,
    raw: bool,
    allow_empty: bool = False,
    refused: str = "nothing was stored. To store an empty value, give --allow-empty",
) -> SecretValue:
    """The value to store, from exactly one source; checked for size before any unlock. An empty
    value is refused unless `allow_empty`: it is most often a failed command feeding stdin, and
    storing it would blank a live credential. `refused` ends that refusal: what was not done and
    how to do it anyway (a command without --allow-empty says so)."""
    if value is not None and value_file is not None:
        raise InvalidInputError("give the value as an argument or with --file, not both")
    if value is not None:
        warning_line(
            "a value on the command line is visible in the process list and shell history; "
            "pipe it on stdin or use --file instead"
        )
        data = os.fsencode(value)  # the argument's own bytes, UTF-8 or not
    elif value_file is not None:
        if not value_file:
            raise InvalidInputError("--file needs a path: give the file that holds the value")
        try:
            data = read_bounded(Path(value_file), MAX_VALUE_SIZE, what="the value")
        except OSError as exc:
            raise InvalidInputError(f"cannot read {value_file}: {exc.strerror}") from None
    elif not sys.stdin.isatty():
        data = sys.stdin.buffer.read(MAX_VALUE_SIZE + 3)
        if not raw:
            data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    elif terminal_available():
        try:
            text = click.prompt(
                "Value", hide_input=True, confirmation_prompt=True, err=True, default="", show_default=False
            )
        except UnicodeDecodeError:
            raise InvalidInputError(
                "the value typed is not UTF-8 text (is the terminal set to UTF-8?); nothing was stored. "
                "To store any bytes, pipe them on stdin or use --file"
            ) from None
        data = text.encode("utf-8")
    else:
        raise InvalidInputError("no value given: pipe it on stdin, use --file PATH, or pass VALUE")
    if len(data) > MAX_VALUE_SIZE:
        raise InvalidInputError(f"the value is over {MAX_VALUE_SIZE} bytes (64 KiB); nothing was stored")
    if not data and not allow_empty:
        source = f"{value_file} is empty" if value_file is not None else "the value is empty"
        if value_file is None and value is None:
            source += " (did the command feeding stdin fail?)"
        raise InvalidInputError(f"{source}; {refused}")
    return SecretValue(data)


def _fields(count: int) -> str:
    return counted(count, "field")


def warn_if_expired(secret: Secret) -> None:
    """A value read whose expiry has passed is still given (it may work yet), with one warning
    line saying how to replace it or record its new date: get, otp, inject, run."""
    if secret.expires is None or secret.expires > datetime.now(UTC):
        return
    name = secret.name
    warning_line(
        f"version {secret.version} of {name} expired at {timestamp(secret.expires)}; store the new "
        f"credential with '{suggested('store', name, '--expires', 'TIME')}' (or, if it still works, "
        f"record its new date with '{suggested('metadata', name, '--expires', 'TIME')}')"
    )


def warn_if_written_expired(name: str, version: int, expires: datetime | None, source: str) -> None:
    """A rollback, cp or mv writes the same credential again with its expiry: one that has passed
    is written all the same (it may work yet), with one warning line, as `get` would give."""
    if expires is None or expires > datetime.now(UTC):
        return
    warning_line(
        f"version {version} of {name} holds {source}, which expired at {timestamp(expires)}; store "
        f"the new credential with '{suggested('store', name, '--expires', 'TIME')}' (or, if it still "
        f"works, record its new date with '{suggested('metadata', name, '--expires', 'TIME')}')"
    )


def split_field_name(text: str) -> tuple[str, str, str]:
    """NAME#FIELD as (NAME, "#", FIELD), or (NAME, "", "") without a field; the name checked, and
    a '#' with no field after it refused."""
    name, selector, field = text.partition(FIELD_SEPARATOR)
    validate_name(name)
    if selector and not field:
        raise InvalidInputError(f"'{name}{FIELD_SEPARATOR}' names no field; write NAME#FIELD")
    return name, selector, field


def select_field(data: bytes, name: str, field: str) -> bytes:
    """One top-level field of a JSON object value: a string as is, anything else as JSON."""
    document = read_exact_json_object(data)
    if document is None:
        raise InvalidInputError(f"the value of {name} is not a JSON object, so it has no field {field!r}")
    if field not in document.fields:
        raise NotFoundError(  # the field names are part of the value: counted, not listed
            f"the value of {name} has no field {field!r} (it has {_fields(len(document.fields))}; "
            f"'{suggested('get', name)}' shows them)"
        )
    chosen = document.fields[field]
    text = chosen if document.is_text(chosen) else document.dumps(chosen, compact=True)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"), which UTF-8 cannot hold
        raise InvalidInputError(
            f"field {field!r} of {name} holds an unpaired UTF-16 surrogate escape, which is not text; "
            f"read the whole value with 'get {name} --raw'"
        ) from None


def parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    parsed = {}
    for tag in tags:
        key, sep, val = tag.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"tag {tag!r} is not KEY=VALUE")
        if key in parsed:
            raise InvalidInputError(f"tag {key!r} is given twice; give each key once")
        parsed[key] = val
    return parsed
