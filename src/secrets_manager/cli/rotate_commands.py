"""`secrets-manager rotate NAME`: credential rotation in AWS's four steps (DESIGN.md section 8).

    stage    a new version labelled `pending` (current and previous do not move)
    set      --set-command applies the new value at the target (e.g. ALTER ROLE on PostgreSQL)
    test     --test-command checks that the new value works there
    promote  the pending version becomes current, the old current previous

On a local store each step is its own audited operation ("rotate.stage", "rotate.resume",
"rotate.set", "rotate.test", "rotate.promote", "rotate.discard"); a failed set or test is recorded
with the outcome "rotation_step_failed". With --server the store steps are RPCs
(StageSecretVersion, or StageSecretVersionIfCurrent for a stage on condition that the version read
is still current; GetSecret of the pending label for --resume, PromoteSecretVersion,
DiscardPendingVersion) that the service authorises (capability "rotate") and audits in its own log;
set and test still run here, where the client has no audit log, so they are not audited: a failed
one shows in the service's log as a staged version that was never promoted. No store write is in
progress while the user's commands run. The commands get the new value on stdin only, never in
their arguments or environment; their output goes to our stderr. If set or test fails, current is
untouched and the new version stays pending for --resume (or --discard).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from datetime import datetime
from types import FrameType

import click

from secrets_manager.cli.app import (
    FIELD_SEPARATOR,
    alphabet_option,
    cli,
    expires_option,
    future_expiry,
    length_option,
    pass_session,
    read_value,
    refuse_generator_options,
)
from secrets_manager.cli.completion import complete_secret_names
from secrets_manager.cli.output import (
    Seconds,
    info_line,
    invocation,
    print_json,
    timestamp,
    warning_line,
)
from secrets_manager.cli.session import Session
from secrets_manager.errors import ConflictError, InvalidInputError, SecretsManagerError, Terminated
from secrets_manager.rotation import (
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    Commands,
    Rotated,
    command_argv,
    generated_value,
)
from secrets_manager.rotation import (
    rotate as run_rotation,
)
from secrets_manager.rotators.postgres import PostgresRole
from secrets_manager.store import CURRENT, PENDING, validate_name
from secrets_manager.values import SecretValue

# An empty --stdin: no rotation takes an empty credential (rotate has no --allow-empty).
EMPTY_ROTATION_REFUSED = (
    "nothing was staged and no command ran; pipe the new value on stdin (or drop --stdin)"
)


@dataclass(repr=False)  # Session's: never the cached password
class _OnePasswordSession(Session):
    """A session that asks for the master password once for all the steps of one rotation."""

    cached_password: bytes | None = None

    def password(self, *, confirm: bool = False) -> bytes:
        if self.cached_password is None:
            self.cached_password = super().password(confirm=confirm)
        return self.cached_password


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option("--generate", is_flag=True, help="Generate a random new value (the default).")
@length_option
@alphabet_option
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the new value from stdin, as 'store' does.")
@click.option("--raw", is_flag=True, help="With --stdin: keep stdin byte for byte (no newline dropped).")
@click.option(
    "--resume",
    is_flag=True,
    help="Finish the rotation whose version is pending: give it the same --set-command/--test-command.",
)
@click.option(
    "--promote-only",
    is_flag=True,
    help="With --resume: promote without running any command (the target already holds the value).",
)
@click.option("--discard", is_flag=True, help="Remove the pending label and stop (the version stays).")
@click.option("--set-command", metavar="CMD", help="Apply the new value at the target (value on stdin).")
@click.option("--test-command", metavar="CMD", help="Check that the new value works (value on stdin).")
@click.option(
    "--postgres-role",
    metavar="ROLE",
    help="Set and test: ALTER ROLE ROLE PASSWORD (only its SCRAM verifier is sent), then log in as ROLE.",
)
@click.option(
    "--postgres",
    "postgres_conninfo",
    metavar="CONNINFO",
    help="With --postgres-role (or --resume): the administrator's libpq connection string or URL, no "
    "password in it (~/.pgpass, PGPASSFILE, PGPASSWORD give it) [default: libpq's PGHOST, PGUSER, ...].",
)
@click.option(
    "--timeout",
    type=Seconds(MAX_TIMEOUT),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Time limit for each command (or --postgres-role step).",
)
@click.option(
    "--on-server",
    is_flag=True,
    help="With --server: the service runs the rotation its schedule configures for NAME (commands there).",
)
@expires_option(
    "When the new value stops working (an exchange key's 90 days, a role's VALID UNTIL): ISO 8601 or "
    "an age such as 90d, recorded for the new version once it is current."
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
    promote_only: bool,
    discard: bool,
    set_command: str | None,
    test_command: str | None,
    postgres_role: str | None,
    postgres_conninfo: str | None,
    timeout: float,
    on_server: bool,
    expires: str | None,
    as_json: bool,
) -> None:
    """Rotate NAME: stage a new value as 'pending', set it at the target, test it, promote it.

    \b
    The new value is generated (--generate, the default: --length, --alphabet from Python's
    `secrets`) or read from stdin (--stdin). --set-command and --test-command are split like a shell
    would (no shell runs them) and get the new value on their stdin, never in their arguments or
    environment; they also get SECRETS_MANAGER_ROTATE_NAME and SECRETS_MANAGER_ROTATE_VERSION (the
    master password variables and VAULT_TOKEN, VAULT_ROLE_ID, VAULT_SECRET_ID are removed). Their
    output goes to stderr. If either fails (non-zero exit, timeout, cannot start), current is
    untouched and the new version stays pending: fix the cause and run the same command again with
    --resume (its --set-command and --test-command too, as the error shows: the pending value is set
    and tested again), or 'rotate NAME --discard'. --resume without --set-command, --test-command or
    --postgres-role is refused (exit 2): if the pending version records a PostgreSQL role, with the
    command that names it (a password is set only for a role you name); if it records none, as it
    would promote a value nothing has set at the target, and every reader of the credential would
    break; '--resume --promote-only' promotes without running a command, when
    the target already holds the pending value (set by hand). On success the pending version becomes
    current and the old current previous. One rotation at a time: while a version is pending, a new
    rotation exits 7 before it stages or runs anything; exit 7 after the commands means the pending
    version was discarded meanwhile.

    \b
    Audit: on a local store every step is recorded in its audit log (rotate.stage, rotate.resume,
    rotate.set, rotate.test, rotate.promote, rotate.discard; fingerprints, never the value).
    With --server the service checks the 'rotate' capability (--resume also needs 'read') and
    audits stage, promote and discard (and --resume's read) in its log; the set and test commands
    still run on this machine and are not audited anywhere. With --server and --on-server the
    service runs the rotation its schedule configures for NAME (RotateSecret; its set and test
    commands run on the service's host) and audits every step, under this client's identity.

    \b
    Example (scripts that read the new password on stdin; README "Credential rotation"):
      secrets-manager rotate db/app --set-command "python3 set-app-password.py" \\
          --test-command "python3 check-app-login.py"

    \b
    A PostgreSQL role's password, with no script: --postgres-role ROLE sets it as an administrator
    (--postgres CONNINFO, else libpq's PGHOST, PGUSER, ...; its password from ~/.pgpass, PGPASSFILE or
    PGPASSWORD, never the command line), sending only the SCRAM-SHA-256 verifier, then logs in as
    ROLE with it. The pending version records ROLE: a --resume naming another role, or none, is
    refused (exit 2), saying the command that names ROLE. The value is the password, or a JSON
    object's "password" field
    (NAME#password):
      secrets-manager rotate db/app --postgres-role app \\
          --postgres "host=db.internal dbname=trading user=admin"
    """
    name, separator, field_text = name.partition(FIELD_SEPARATOR)
    validate_name(name)
    field = field_text if separator else None
    if separator and not field_text:
        raise InvalidInputError(f"give the field after '#': 'rotate {name}#password'")
    if field is not None and (resume or discard or on_server):
        raise InvalidInputError(
            "NAME#FIELD goes with a new value: drop it with --resume, --discard or --on-server"
        )
    set_argv = None if set_command is None else command_argv(set_command, "--set-command")
    test_argv = None if test_command is None else command_argv(test_command, "--test-command")
    postgres = _postgres_target(
        postgres_role, postgres_conninfo, commands=bool(set_argv or test_argv), resume=resume
    )
    if generate and from_stdin:
        raise InvalidInputError("give --generate or --stdin, not both")
    if from_stdin or resume or discard or on_server:
        refuse_generator_options("drop {them} with --stdin, --resume, --discard or --on-server")
    if raw and not from_stdin:
        raise InvalidInputError("--raw applies to --stdin only")
    if discard and (resume or generate or from_stdin or set_argv or test_argv or postgres):
        raise InvalidInputError("--discard takes no other rotation option")
    if resume and (generate or from_stdin):
        raise InvalidInputError("--resume reuses the pending value; drop --generate / --stdin")
    _check_resume_commands(
        resume=resume,
        promote_only=promote_only,
        commands=bool(set_argv or test_argv or postgres or postgres_conninfo),
    )
    # A --resume that names no target: refused once the pending version is read, with the command
    # that names the role it recorded (rotation.resumed_commands), through --postgres if given.
    recorded_postgres = (
        (postgres_conninfo or "")
        if resume and not (set_argv or test_argv or postgres or promote_only)
        else None
    )
    expiry = future_expiry(expires, name)
    if expiry is not None and (discard or on_server):
        raise InvalidInputError(
            "--expires goes with a new value: drop it with --discard; with --on-server, record it after "
            f"with 'metadata {name} --expires TIME'"
        )
    if on_server:
        if resume or discard or generate or from_stdin or raw or set_argv or test_argv or postgres:
            raise InvalidInputError(
                "--on-server runs the rotation the service's schedule configures; drop --generate, "
                "--stdin, --resume, --discard, --set-command, --test-command and --postgres-role"
            )
        _rotate_on_server(session, name, as_json=as_json)
        return
    session = one_password_session(session)
    if discard:
        _discard(session, name, as_json=as_json)
        return
    value = None
    if not resume:
        value = (
            read_value(None, None, raw=raw, refused=EMPTY_ROTATION_REFUSED)
            if from_stdin
            else generated_value(length, alphabet)
        )
    with terminate_as_interrupt():
        rotated = run_rotation(
            SessionSteps(session, reading_fields=field is not None),
            name,
            Commands(
                set_argv,
                test_argv,
                timeout,
                session.environ,
                invocation=invocation(),
                postgres=postgres,
                recorded_postgres=recorded_postgres,
            ),
            value=value,
            field=field,
            generated=not from_stdin,
            warn=warning_line,
        )
    if expiry is not None:
        record_expiry(session, rotated, expiry)
    _report(rotated, as_json=as_json, expiry=expiry)


def _postgres_target(
    role: str | None, conninfo: str | None, *, commands: bool, resume: bool
) -> PostgresRole | None:
    """The built-in PostgreSQL rotator of --postgres-role (and --postgres), checked before any store
    is opened; it replaces the set and test commands. `--resume --postgres CONNINFO` alone sets
    nothing: it is refused once the pending version is read, with the command that names the role
    the version records, through CONNINFO (checked here as a connection string only)."""
    if role is None:
        if conninfo is not None and not resume:
            raise InvalidInputError(
                "--postgres goes with --postgres-role ROLE: the role whose password to rotate"
            )
        if conninfo is not None:
            if commands:
                raise InvalidInputError(
                    "--postgres goes with the built-in PostgreSQL rotator: drop --set-command and "
                    "--test-command"
                )
            PostgresRole.parse("role", conninfo)  # a password in it, or one libpq cannot read
        return None
    if commands:
        raise InvalidInputError(
            "--postgres-role sets and tests the password itself: drop --set-command and --test-command"
        )
    return PostgresRole.parse(role, conninfo or "")


def _check_resume_commands(*, resume: bool, promote_only: bool, commands: bool) -> None:
    """A resume runs the rotation's commands again, or is told the target holds the value already:
    promoting a pending value nothing has set at the target breaks every reader of the credential
    (the database still has the old one). A resume with neither is refused once the pending
    version is read, saying the role it recorded if any (`resumed_commands`)."""
    if promote_only and not resume:
        raise InvalidInputError("--promote-only goes with --resume: 'rotate NAME --resume --promote-only'")
    if promote_only and commands:
        raise InvalidInputError(
            "--promote-only runs no command; drop --set-command/--test-command (and --postgres-role, "
            "--postgres), or drop --promote-only"
        )


def record_expiry(session: Session, rotated: Rotated, expiry: datetime) -> None:
    """`--expires` for the version the rotation made current. A store keeps the expiry of its
    current version, so this follows the promote: if that step fails, the rotation still stands
    and the error says how to record the expiry. It is recorded only if the
    version is still current (a write landing meanwhile has an expiry of its own, or none),
    decided in the update's own commit on our stores, locally or through a service."""
    name, version = rotated.name, rotated.version
    try:
        with session.secret_operation("rotate.expiry", name, mutating=True) as (store, note):
            note.version(version)
            # Through a service: UpdateSecretMetadataIfCurrent, checked in the service's store commit.
            store.update_metadata(name, expires=expiry, expect_current=version)
    except SecretsManagerError as exc:
        if type(exc) is ConflictError:  # another version is current (a deleted secret: SecretStateError)
            exc.args = (
                f"rotated {name} to version {version}, but another version was stored after it, so the "
                f"rotation's expiry was not recorded (the newer version keeps its own): {exc}",
            )
            raise
        exc.args = (
            f"rotated {name}: version {version} is current, but its expiry was not recorded: {exc}; "
            f"record it with 'metadata {name} --expires {timestamp(expiry)}'",
        )
        raise


def _report(rotated: Rotated, *, as_json: bool, expiry: datetime | None = None) -> None:
    if as_json:
        print_json(
            {
                "name": rotated.name,
                "version": rotated.version,
                "previous": rotated.previous,
                "resumed": rotated.resumed,
                "promoted_elsewhere": rotated.promoted_elsewhere,
                "expires": timestamp(expiry) if expiry is not None else None,
            }
        )
    report_rotated(rotated, expiry)


def report_rotated(rotated: Rotated, expiry: datetime | None = None) -> None:
    """The one line on stderr that says a rotation finished (`rotate`, `schedule run`)."""
    how = "resumed and rotated" if rotated.resumed else "rotated"
    until = "" if expiry is None else f", expires {timestamp(expiry)}"
    if rotated.promoted_elsewhere:
        info_line(
            f"{how} {rotated.name}: version {rotated.version} is current{until} "
            "(another runner that resumed it promoted it first)"
        )
        return
    shown = "none" if rotated.previous is None else str(rotated.previous)
    info_line(f"{how} {rotated.name}: version {rotated.version} is current{until} (previous: {shown})")


def _rotate_on_server(session: Session, name: str, *, as_json: bool) -> None:
    """RotateSecret: the service stages, runs its configured set and test commands, promotes, and
    audits every step under this client's certificate identity."""
    if not session.server:
        raise InvalidInputError(
            "--on-server needs --server HOST:PORT (or SECRETS_MANAGER_ADDR): it asks that service to "
            "run the rotation its schedule configures"
        )
    remote = session.remote_store()
    try:
        rotated = remote.rotate_on_service(name)
        _report(rotated, as_json=as_json, expiry=rotated.expires)
    finally:
        remote.close()


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def terminate_as_interrupt(signals: tuple[signal.Signals, ...] = TERMINATING_SIGNALS) -> Iterator[None]:
    """SIGTERM and SIGHUP (timeout, systemd stop, cron's kill, a closed terminal) end a rotation
    as Ctrl-C does: their handler raises Terminated, a KeyboardInterrupt, so the running set or
    test command's process group is ended (it runs in a session of its own, which these signals
    never reach) and the error says what stays pending. Left to their default action they ended
    us alone, and the set command went on to change the target after we had exited. A signal
    ignored when we started (nohup) stays ignored; only the first signal of the two is acted on."""
    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def interrupt(signum: int, frame: FrameType | None) -> None:
        for other in previous:  # the interrupt is under way: a second signal must not cut it short
            signal.signal(other, signal.SIG_IGN)
        raise Terminated(signum)

    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def one_password_session(session: Session) -> _OnePasswordSession:
    """`session`, asking for the master password at most once for all the steps."""
    return _OnePasswordSession(**{f.name: getattr(session, f.name) for f in fields(session)})


@dataclass
class SessionSteps:
    """The store steps as `secret_operation`s: on a local store each opened and audited here
    (the set and test commands too, with their outcome), with --server each one RPC that the
    service authorises and audits (the commands run here, where there is no audit log)."""

    session: Session
    reading_fields: bool = False  # a field rotation: the current value must be read

    def stage(
        self, name: str, value: SecretValue, *, expect_current: int | None = None, target: str | None = None
    ) -> int:
        with self.session.secret_operation("rotate.stage", name, mutating=True) as (store, note):
            note.value(value.reveal())
            info = store.stage(name, value.reveal(), expect_current=expect_current, target=target)
            note.version(info.version)
        return info.version

    def pending(self, name: str) -> tuple[int, SecretValue, str | None]:
        with self.session.secret_operation("rotate.resume", name) as (store, note):
            secret = store.get(name, label=PENDING)
            note.version(secret.version)
            note.value(secret.value.reveal())
        return secret.version, secret.value, secret.target

    def promote(self, name: str, version: int) -> int | None:
        with self.session.secret_operation("rotate.promote", name, mutating=True) as (store, note):
            note.version(version)
            return store.promote(name, version)

    def current(self, name: str) -> int | None:
        with self.session.secret_operation("rotate.check", name) as (store, note):
            current = store.describe(name).labels.get(CURRENT)
            if current is not None:
                note.version(current)
            return current

    def read_current(self, name: str) -> tuple[int, SecretValue] | None:
        """Read (audited as rotate.read) for a field rotation always; to see whether the value is
        a JSON object, only on a local store: through a service that would need `read`, which a
        rotation by an identity with only `rotate` does not have (the service checks its own)."""
        if self.session.server and not self.reading_fields:
            return None
        with self.session.secret_operation("rotate.read", name) as (store, note):
            secret = store.get(name)
            note.version(secret.version)
            note.value(secret.value.reveal())
        return secret.version, secret.value

    def command_step(self, step: str, name: str, version: int) -> AbstractContextManager[object]:
        if self.session.server:
            return nullcontext()
        return self._audited_step(step, name, version)

    @contextmanager
    def _audited_step(self, step: str, name: str, version: int) -> Iterator[None]:
        # Audited with its outcome (ok, or rotation_step_failed), so a failed step leaves a trace.
        # The set command changes the target: like a change, a durable "pending" record goes
        # first, so a log that ends there (the process was killed) shows the set may have run.
        with self.session.store_operation(f"rotate.{step}", name, mutating=step == "set") as (_, event):
            event.version = version
            yield


def _discard(session: Session, name: str, *, as_json: bool) -> None:
    with session.secret_operation("rotate.discard", name, mutating=True) as (store, note):
        discarded = store.discard_pending(name)
        note.version(discarded)
    if as_json:
        print_json({"name": name, "discarded": discarded})
    info_line(f"discarded the pending version {discarded} of {name}; current is unchanged")
