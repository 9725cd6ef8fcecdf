"""`export --service NAME`: a namespace's secrets out as a .env file or a JSON object, the inverse
of `import` (as `chamber export` is of `chamber import`).

Each secret NAME/KEY under the namespace that the caller may read becomes the binding KEY, with
its current value: `import FILE --service NAME` reads the file back to the same names and values
(a .env value quoted as python-dotenv reads it, and so that a shell sourcing the file, as
`set -a; . ./FILE` does, runs nothing of it; JSON holds text). Every secret is read (one audited
operation, a record per secret) before anything is written: a binary value, which neither format
holds as text, writes nothing. `-o FILE` is written 0600, atomically and durably; an existing FILE
only with `--force`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from secrets_manager.cli.app import cli, pass_session, warn_if_expired
from secrets_manager.cli.inject_command import Permissions, check_out_file
from secrets_manager.cli.output import counted, info_line, warning_line
from secrets_manager.cli.rotate_commands import terminate_as_interrupt
from secrets_manager.cli.run_command import read_namespace
from secrets_manager.cli.session import Session
from secrets_manager.errors import InvalidInputError, NotFoundError
from secrets_manager.store import Secret
from secrets_manager.store.names import DEFAULT_NAMESPACE, validate_namespace

FORMATS = ("env", "json")


@cli.command("export")
@click.option(
    "--service",
    required=True,
    metavar="NAME",
    help="The namespace to export: NAME/KEY becomes KEY ('import FILE --service NAME' reads it back).",
)
@click.option(
    "--format",
    "file_format",
    type=click.Choice(FORMATS),
    default="env",
    show_default=True,
    help="env: KEY='value' lines, as python-dotenv reads them; json: one object of text values.",
)
@click.option("--out-file", "-o", "output", metavar="FILE", help="Write here (0600) instead of stdout.")
@click.option("--force", "-f", is_flag=True, help="Replace FILE if it exists.")
@pass_session
def export_command(session: Session, service: str, file_format: str, output: str | None, force: bool) -> None:
    """Write the current value of every secret under NAME/ that you may read, as a .env file
    (KEY='value') or a JSON object: the way back out of 'import'. The values are in plain text:
    keep FILE private and delete it once it has been read. Nothing is written unless every
    value is text."""
    validate_namespace(service)
    if output is not None:
        # Before any secret is read (and audited) for a FILE never written
        session.refuse_own_file(Path(output), "give -o another file; nothing was written")
        check_out_file(output, force)
    with session.secret_operation("export", f"{service}/") as (store, note):
        secrets = sorted(read_namespace(store, service), key=lambda secret: secret.name)
        if not secrets:
            unslashed = (
                " (names without '/' are under no NAMESPACE/: read them with 'get NAME')"
                if service == DEFAULT_NAMESPACE
                else ""
            )
            raise NotFoundError(
                f"no secret under '{service}/' that you may read; nothing was written{unslashed}"
            )
        for secret in secrets:
            note.read(secret)
            warn_if_expired(secret)
        rendered = _rendered(secrets, service, file_format)
    where = "standard output" if output is None else output
    if output is None:
        sys.stdout.buffer.write(rendered)
        sys.stdout.buffer.flush()
    else:
        # SIGTERM or SIGHUP while it is written end the command as Ctrl-C does, so the temporary
        # file holding the values is removed
        with terminate_as_interrupt():
            Permissions().write(Path(output), rendered, overwrite=force)
    info_line(f"exported {counted(len(secrets), 'secret')} under {service}/ to {where}")
    if output is not None:
        warning_line(f"{output} holds these values in plain text: delete it once nothing reads it")


def _rendered(secrets: list[Secret], service: str, file_format: str) -> bytes:
    """The file: KEY='value' lines, or a JSON object, in name order. InvalidInputError for a value
    that is not UTF-8 text (nothing is written)."""
    values: dict[str, str] = {}
    for secret in secrets:
        try:
            text = secret.value.reveal().decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"the value of {secret.name} is binary, so it cannot go into a text file; nothing "
                f"was written (read it with 'get {secret.name} --raw', or keep it in a 'backup')"
            ) from None
        values[secret.name[len(service) + 1 :]] = text
    if file_format == "json":
        return (json.dumps(values, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return "".join(f"{key}={_quoted(f'{service}/{key}', text)}\n" for key, text in values.items()).encode(
        "utf-8"
    )


def _quoted(name: str, text: str) -> str:
    """`text` quoted so that python-dotenv (and `import`) read it back exactly, and a POSIX shell
    sourcing the file reads it as one word and runs nothing of it: a .env file is sourced as often
    as it is parsed, and a value (a service's own, a generated one) is not ours to trust there.

    Single quotes where the value has no `'` or `\\` (both read it as written); else double
    quotes with `\\` and `"` escaped (both read those escapes alike) where it has no `$` or
    backtick, which a shell expands between double quotes; else single quotes with `\\` escaped,
    where it has no `'` (a shell reads its backslashes doubled, but runs nothing). A value with
    `'` and `$` or a backtick fits no such form: InvalidInputError (nothing is written)."""
    if "'" not in text and "\\" not in text:
        return f"'{text}'"
    if "$" not in text and "`" not in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if "'" not in text:
        return "'" + text.replace("\\", "\\\\") + "'"
    raise InvalidInputError(
        f"the value of {name} holds both ' and $ or `: no KEY=value line both python-dotenv and a "
        "shell sourcing the file read as that text (a shell would run part of it); nothing was "
        "written (use --format json)"
    )
