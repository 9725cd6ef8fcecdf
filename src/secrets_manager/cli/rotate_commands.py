"""`secrets-manager rotate NAME`: credential rotation in AWS's four steps (DESIGN.md section 8).

    stage    a new version labelled `pending` (current and previous do not move)
    set      --set-command applies the new value at the target (e.g. ALTER ROLE on PostgreSQL)
    test     --test-command checks that the new value works there
    promote  the pending version becomes current, the old current previous

On a local store each step is its own audited operation ("rotate.stage", "rotate.resume",
"rotate.set", "rotate.test", "rotate.promote", "rotate.discard"); a failed set or test is recorded
with the outcome "rotation_step_failed". With --server the store steps are RPCs
(StageSecretVersion, GetSecret of the pending label for --resume, PromoteSecretVersion,
DiscardPendingVersion) that the service authorises (capability "rotate") and audits in its own log;
set and test still run here, where the client has no audit log, so they are not audited: a failed
one shows in the service's log as a staged version that was never promoted. No store write is in
progress while the user's commands run. The commands get the new value on stdin only, never in
their arguments or environment; their output goes to our stderr. If set or test fails, current is
untouched and the new version stays pending for --resume (or --discard).
"""

from __future__ import annotations

import secrets
import shlex
import string
import subprocess
import sys
from dataclasses import dataclass, fields
from typing import Any

import click

from secrets_manager.cli.app import Session, cli, pass_session, read_value
from secrets_manager.cli.output import info_line, print_json
from secrets_manager.cli.password import PASSWORD_FILE_VARIABLE, PASSWORD_VARIABLE
from secrets_manager.errors import InvalidInputError, SecretsManagerError
from secrets_manager.store import PENDING, validate_name
from secrets_manager.values import SecretValue

ALPHABETS = {
    "alnum": string.ascii_letters + string.digits,
    "hex": "0123456789abcdef",
    "urlsafe": string.ascii_letters + string.digits + "-_",
}
NAME_VARIABLE = "SECRETS_MANAGER_ROTATE_NAME"
VERSION_VARIABLE = "SECRETS_MANAGER_ROTATE_VERSION"
DEFAULT_LENGTH = 32
DEFAULT_TIMEOUT = 60.0


class RotationStepFailed(SecretsManagerError):
    """The set or test command failed: nothing was promoted, the new version stays pending."""

    exit_code = 1
    kind = "rotation_step_failed"


@dataclass
class _OnePasswordSession(Session):
    """A session that asks for the master password once for all the steps of one rotation."""

    cached_password: bytes | None = None

    def password(self, *, confirm: bool = False) -> bytes:
        if self.cached_password is None:
            self.cached_password = super().password(confirm=confirm)
        return self.cached_password


@cli.command()
@click.argument("name")
@click.option("--generate", is_flag=True, help="Generate a random new value (the default).")
@click.option(
    "--length",
    type=click.IntRange(min=8, max=4096),
    default=DEFAULT_LENGTH,
    show_default=True,
    metavar="N",
    help="Characters in a generated value.",
)
@click.option(
    "--alphabet",
    type=click.Choice(sorted(ALPHABETS)),
    default="alnum",
    show_default=True,
    help="Characters of a generated value.",
)
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the new value from stdin, as 'store' does.")
@click.option("--raw", is_flag=True, help="With --stdin: keep stdin byte for byte (no newline dropped).")
@click.option("--resume", is_flag=True, help="Reuse the version already labelled pending (after a failure).")
@click.option("--discard", is_flag=True, help="Remove the pending label and stop (the version stays).")
@click.option("--set-command", metavar="CMD", help="Apply the new value at the target (value on stdin).")
@click.option("--test-command", metavar="CMD", help="Check that the new value works (value on stdin).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=3600),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Time limit for each command.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@pass_session
def rotate(
    session: Session,
    name: str,
    generate: bool,
    length: int,
    alphabet: str,
    from_stdin: bool,
    raw: bool,
    resume: bool,
    discard: bool,
    set_command: str | None,
    test_command: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Rotate NAME: stage a new value as 'pending', set it at the target, test it, promote it.

    \b
    The new value is generated (--generate, the default: --length, --alphabet from Python's
    `secrets`) or read from stdin (--stdin). --set-command and --test-command are split like a
    shell would (no shell runs them) and get the new value on their stdin, never in their
    arguments or environment; they also get SECRETS_MANAGER_ROTATE_NAME and
    SECRETS_MANAGER_ROTATE_VERSION (the master password variables are removed). Their output goes
    to stderr. If either fails (non-zero exit, timeout, cannot start), current is untouched and the
    new version stays pending: fix the cause and run 'rotate NAME --resume', or 'rotate NAME
    --discard'. On success the pending version becomes current and the old current previous.
    One rotation at a time: while a version is pending, a new rotation exits 7 before it stages
    or runs anything; exit 7 after the commands means the pending version was discarded meanwhile.

    \b
    Audit: on a local store every step is recorded in its audit log (rotate.stage, rotate.resume,
    rotate.set, rotate.test, rotate.promote, rotate.discard; fingerprints, never the value).
    With --server the service checks the 'rotate' capability (--resume also needs 'read') and
    audits stage, promote and discard (and --resume's read) in its log; the set and test commands
    still run on this machine and are not audited anywhere.

    \b
    Example (scripts that read the new password on stdin; README "Credential rotation"):
      secrets-manager rotate db/app --set-command "python3 set-app-password.py" \\
          --test-command "python3 check-app-login.py"
    """
    validate_name(name)
    set_argv = _command_argv(set_command, "--set-command")
    test_argv = _command_argv(test_command, "--test-command")
    if generate and from_stdin:
        raise InvalidInputError("give --generate or --stdin, not both")
    if raw and not from_stdin:
        raise InvalidInputError("--raw applies to --stdin only")
    if discard and (resume or generate or from_stdin or set_argv or test_argv):
        raise InvalidInputError("--discard takes no other rotation option")
    if resume and (generate or from_stdin):
        raise InvalidInputError("--resume reuses the pending value; drop --generate / --stdin")
    session = _OnePasswordSession(**{f.name: getattr(session, f.name) for f in fields(session)})

    if discard:
        _discard(session, name, as_json=as_json)
        return
    if resume:
        version, value = _resume(session, name)
    else:
        value = read_value(None, None, raw=raw) if from_stdin else _generated(length, ALPHABETS[alphabet])
        version = _stage(session, name, value)

    for step, argv in (("set", set_argv), ("test", test_argv)):
        if argv is None:
            continue
        if session.server:
            # No store and no audit log on this side; the service audited the stage (and will the
            # promote), so a failed step shows there as a version staged and never promoted.
            _run_step(step, argv, name, version, value, timeout, session)
            continue
        # Audited with its outcome (ok, or rotation_step_failed), so a failed step leaves a trace.
        with session.store_operation(f"rotate.{step}", name) as (_, event):
            event.version = version
            _run_step(step, argv, name, version, value, timeout, session)

    current, previous = _promote(session, name, version)
    if as_json:
        print_json({"name": name, "version": current, "previous": previous})
    shown = "none" if previous is None else str(previous)
    info_line(f"rotated {name}: version {current} is current (previous: {shown})")


def _command_argv(command: str | None, option: str) -> list[str] | None:
    if command is None:
        return None
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise InvalidInputError(f"{option}: cannot split the command ({exc})") from None
    if not argv:
        raise InvalidInputError(f"{option} is empty")
    return argv


def _generated(length: int, alphabet: str) -> SecretValue:
    return SecretValue("".join(secrets.choice(alphabet) for _ in range(length)).encode("ascii"))


# Each store step is one `secret_operation`: on a local store opened and audited here, with
# --server one RPC that the service authorises and audits.


def _stage(session: Session, name: str, value: SecretValue) -> int:
    with session.secret_operation("rotate.stage", name, mutating=True) as (store, note):
        note.value(value.reveal())
        info = store.stage(name, value.reveal())
        note.version(info.version)
    return info.version


def _resume(session: Session, name: str) -> tuple[int, SecretValue]:
    with session.secret_operation("rotate.resume", name) as (store, note):
        secret = store.get(name, label=PENDING)
        note.version(secret.version)
        note.value(secret.value.reveal())
    return secret.version, secret.value


def _promote(session: Session, name: str, version: int) -> tuple[int, int | None]:
    with session.secret_operation("rotate.promote", name, mutating=True) as (store, note):
        note.version(version)
        previous = store.promote(name, version)
    return version, previous


def _discard(session: Session, name: str, *, as_json: bool) -> None:
    with session.secret_operation("rotate.discard", name, mutating=True) as (store, note):
        discarded = store.discard_pending(name)
        note.version(discarded)
    if as_json:
        print_json({"name": name, "discarded": discarded})
    info_line(f"discarded the pending version {discarded} of {name}; current is unchanged")


def _run_step(
    step: str, argv: list[str], name: str, version: int, value: SecretValue, timeout: float, session: Session
) -> None:
    """Run one user command with the new value on stdin; RotationStepFailed if it does not succeed."""
    env = {k: v for k, v in session.environ.items() if k not in (PASSWORD_VARIABLE, PASSWORD_FILE_VARIABLE)}
    env[NAME_VARIABLE] = name
    env[VERSION_VARIABLE] = str(version)
    options: dict[str, Any] = {"env": env, "stdout": sys.stderr.fileno(), "stderr": sys.stderr.fileno()}
    sys.stderr.flush()
    try:
        proc = subprocess.run(argv, input=value.reveal(), timeout=timeout, check=False, **options)
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout:g} s"
    except OSError as exc:
        failure = f"could not start ({exc.strerror or type(exc).__name__})"
    else:
        if proc.returncode == 0:
            return
        failure = f"exit code {proc.returncode}"
    raise RotationStepFailed(
        f"rotating {name}: the {step} command failed ({failure}); version {version} stays pending and "
        f"current is unchanged; fix it and run 'secrets-manager rotate {name} --resume' "
        f"(or discard with 'secrets-manager rotate {name} --discard')"
    )
