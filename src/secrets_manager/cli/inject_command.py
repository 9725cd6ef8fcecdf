"""`inject -i TEMPLATE [-o FILE]`: a configuration file with its secrets filled in, as 1Password's
`op inject` does, for programs that read a file (a market connector's YAML, pgbouncer's
userlist.txt) rather than their environment (`run`).

A reference is `{{ sm://NAME }}` or `{{ sm://NAME#FIELD }}`. Every reference is checked and every
secret read (one audited operation, each read recorded) before anything is written: a missing or
denied secret, a malformed reference, a binary value: nothing is written. `-o FILE` is written
0600, atomically and durably; an existing FILE only with `--force`.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import click

from secrets_manager.cli.app import (
    FIELD_SEPARATOR,
    REFERENCE_PATTERN,
    Session,
    cli,
    pass_session,
    select_field,
    warn_if_expired,
)
from secrets_manager.cli.output import counted
from secrets_manager.cli.password import read_bounded
from secrets_manager.cli.rotate_commands import terminate_as_interrupt
from secrets_manager.errors import InvalidInputError, NotFoundError
from secrets_manager.store.names import validate_name
from secrets_manager.tls.files import write_private_file

MAX_TEMPLATE_BYTES = 1024 * 1024
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
REFERENCE = re.compile(r"\{\{[ \t]*" + REFERENCE_PATTERN + r"[ \t]*\}\}")  # on one line
# "sm:" as a word inside one pair of braces: not "{{ .Values.x }}  # SASL mechanism: PLAIN" later on
# the line, which is copied unchanged as the README promises.
LOOKS_LIKE_A_REFERENCE = re.compile(r"\{\{[^{}\n]*\bsm:")


@cli.command()
@click.option(
    "--in-file", "-i", "template", required=True, metavar="TEMPLATE", help="The template ('-': stdin)."
)
@click.option("--out-file", "-o", "output", metavar="FILE", help="Write here (0600) instead of stdout.")
@click.option("--force", "-f", is_flag=True, help="Replace FILE if it exists.")
@pass_session
def inject(session: Session, template: str, output: str | None, force: bool) -> None:
    """Copy TEMPLATE with each {{ sm://NAME }} or {{ sm://NAME#FIELD }} replaced by that
    secret's value, as 'op inject' does: for programs that read a configuration file rather
    than their environment. Nothing is written unless every reference resolves."""
    text = _template_text(template)
    references = _references(text)
    if output is not None:
        _check_out_file(output)  # before any secret is read (and audited) for a FILE never written
    values: dict[tuple[str, str], str] = {}
    with session.secret_operation("inject") as (store, note):
        secrets = {}
        for name in dict.fromkeys(name for name, _ in references):
            secret = store.get(name)
            note.read(secret)
            warn_if_expired(secret)
            secrets[name] = secret
    for name, field in references:
        data = secrets[name].value.reveal()
        if field:
            data = select_field(data, name, field)
        try:
            values[(name, field)] = data.decode("utf-8")
        except UnicodeDecodeError:
            shown = f"{name}{FIELD_SEPARATOR}{field}" if field else name
            raise InvalidInputError(
                f"the value of {shown} is binary, so it cannot go into a text file; nothing was written"
            ) from None
    size = len(text.encode("utf-8")) + sum(
        len(values[(match[1], match[2] or "")].encode("utf-8")) for match in REFERENCE.finditer(text)
    )
    if size > MAX_OUTPUT_BYTES:  # a 1 MiB template of one 64 KiB secret 100,000 times: 6 GB in memory
        raise InvalidInputError(
            f"the filled-in template would be larger than {MAX_OUTPUT_BYTES // (1024 * 1024)} MiB "
            "(a large secret referred to many times?); nothing was written"
        )
    rendered = REFERENCE.sub(lambda match: values[(match[1], match[2] or "")], text).encode("utf-8")
    if output is None:
        sys.stdout.buffer.write(rendered)
        sys.stdout.buffer.flush()
        return
    # SIGTERM or SIGHUP while it is written end the command as Ctrl-C does, so the temporary file
    # holding the secrets is removed: their default action left it beside FILE.
    with terminate_as_interrupt():
        write_private_file(Path(output), rendered, overwrite=force)
    click.echo(f"wrote {output} with {counted(len(values), 'secret value')}", err=True)


def _check_out_file(output: str) -> None:
    """FILE's directory must exist (said so, with what to do). A named pipe or a device at FILE
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
            validate_name(name)
            references.append((name, match[2] or ""))
    if not references:
        raise InvalidInputError("the template refers to no secret ({{ sm://NAME }}); nothing was written")
    return references
