"""`otp NAME`: the current TOTP code of a stored seed, as `pass otp` prints it.

The seed is read as `get` reads a value (audited as `otp`, through `--server` with `read`); the
code is made here (`otp.py`) and printed, or copied to the clipboard with `--clip`.
"""

from __future__ import annotations

import math

import click

from secrets_manager.cli.app import (
    cli,
    clipboard_found_first,
    copy_to_clipboard,
    pass_session,
    select_field,
    split_field_name,
    warn_if_expired,
)
from secrets_manager.cli.completion import complete_secret_names
from secrets_manager.cli.output import print_json
from secrets_manager.cli.session import Session
from secrets_manager.errors import InvalidInputError


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option("--clip", "-c", is_flag=True, help="Copy the code to the clipboard instead of printing it.")
@click.option("--json", "as_json", is_flag=True, help="Print name, code and seconds it stays valid as JSON.")
@pass_session
def otp(session: Session, name: str, clip: bool, as_json: bool) -> None:
    """Print the current TOTP code (RFC 6238) of NAME, whose value is an otpauth://totp/ URI or a
    base32 setup key, as 'pass otp' does. NAME#FIELD: the seed is one field of a JSON object."""
    from secrets_manager.otp import one_time_code  # pyotp: imported by this command only

    name, selector, field = split_field_name(name)
    if clip and as_json:
        raise InvalidInputError("--clip and --json exclude each other")
    clipboard = clipboard_found_first() if clip else None
    with session.secret_operation("otp", name) as (store, note):
        secret = store.get(name)
        note.version(secret.version)
        note.value(secret.value.reveal())
    warn_if_expired(secret)
    seed = select_field(secret.value.reveal(), name, field) if field else secret.value.reveal()
    shown_name = f"{name}{selector}{field}"
    code = one_time_code(seed, name=shown_name)
    if clipboard is not None:
        copy_to_clipboard(clipboard, code.reveal().encode(), f"the code of {shown_name}")
    elif as_json:
        print_json({"name": shown_name, "code": code.reveal(), "valid_for": math.ceil(code.valid_for)})
    else:
        click.echo(code.reveal())
