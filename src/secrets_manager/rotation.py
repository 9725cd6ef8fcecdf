"""Credential rotation in AWS's four steps, and the schedule that says when (DESIGN.md section 8).

    stage    a new version labelled `pending` (the store refuses it while another is in progress)
    set      the set command applies the new value at the target (e.g. ALTER ROLE on PostgreSQL;
             built in: rotators/postgres.py)
    test     the test command checks that the new value works there
    promote  the pending version becomes current, the old current previous

`rotate` runs the steps; whoever calls it provides them (`RotationSteps`) and so decides how each is
audited: the CLI on a local store, the CLI through a service, or the service's own schedule. The
commands get the new value on stdin only, never in their arguments or environment, and never the
master password variables or a Vault store's token and AppRole login.

A schedule file lists which secrets to rotate, how often, and with which commands:

    [[rotation]]
    name = "db/app"                                   # a secret that exists
    every = "30d"                                     # s, m, h or d; 1 s .. 3650 d
    set_command = "python3 set-app-password.py"       # optional; run in the file's directory
    test_command = "python3 check-app-login.py"       # optional
    # postgres_role = "app"                           # instead of the commands: ALTER ROLE, log in
    # postgres = "host=db.internal user=admin"        # its administrator (libpq; no password here)
    length = 32                                       # generated value: characters (8..4096)
    alphabet = "alnum"                                # alnum, hex, urlsafe or printable
    timeout = 60                                      # seconds per command (0 < t <= 3600)

It is operator configuration, like server.toml and unlike anything a client can write: whoever
writes it chooses commands that the service runs.
"""

from __future__ import annotations

import codecs
import contextlib
import enum
import json
import logging
import os
import re
import secrets
import shlex
import signal
import string
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from secrets_manager.environment import (
    PASSWORD_VARIABLES,
    VAULT_CREDENTIAL_VARIABLES,
    Environment,
    loose_file_problem,
    read_in_directory,
)
from secrets_manager.errors import (
    ChangeUnrecordedError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OperationInterrupted,
    RotationStepFailed,
    SecretsManagerError,
    Terminated,
    UnlockError,
    UnsupportedOperationError,
    file_not_found,
    shell_join,
)
from secrets_manager.rotators.postgres import PASSWORD_FIELD, PostgresRole, PostgresStepError
from secrets_manager.store import CURRENT, PENDING, SecretMetadata, validate_name
from secrets_manager.store.base import refuse_to_demote
from secrets_manager.values import SecretValue, read_exact_json_object, read_json_object

ALPHABETS = {
    "alnum": string.ascii_letters + string.digits,
    "hex": "0123456789abcdef",
    "urlsafe": string.ascii_letters + string.digits + "-_",
    "printable": string.ascii_letters + string.digits + string.punctuation,  # pass's default; no space
}
# Each generated password holds at least one character of each of its alphabet's classes, as AWS's
# get-random-password does by default (RequireEachIncludedType): a database's or exchange's
# password rules ("a digit and an upper-case letter") then never refuse one. A hex value is a key,
# not a password: no classes.
REQUIRED_CLASSES = {
    "alnum": (string.ascii_lowercase, string.ascii_uppercase, string.digits),
    "hex": (),
    "urlsafe": (string.ascii_lowercase, string.ascii_uppercase, string.digits),
    "printable": (string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation),
}
NAME_VARIABLE = "SECRETS_MANAGER_ROTATE_NAME"
VERSION_VARIABLE = "SECRETS_MANAGER_ROTATE_VERSION"
DEFAULT_LENGTH = 32
MIN_LENGTH, MAX_LENGTH = 8, 4096
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 3600.0
# A pending version older than this many command timeouts was left by a rotation that ended
# without finishing (killed, or its set or test failed): the schedule resumes it.
STALE_AFTER_TIMEOUTS = 3
# Who the service's schedule acts as: its audit records' actor, and the author (created_by) of the
# versions its rotations stage (those of `rotate --on-server` and of `schedule run` on a local
# store too), which alone a schedule resumes once stale (`plan`'s `stagers`).
SCHEDULE_ACTOR = "rotation-schedule"
MAX_SCHEDULE_BYTES = 1 << 20  # a schedule file larger than this is a wrong file

_log = logging.getLogger(__name__)


def generated_value(length: int = DEFAULT_LENGTH, alphabet: str = "alnum") -> SecretValue:
    """A random value from Python's `secrets`: `length` characters of ALPHABETS[alphabet], with
    one of each of its REQUIRED_CLASSES. Drawn again until it has them (not patched up), so every
    such value stays equally likely: at the shortest length, 8, 1.4 draws on average for alnum and
    2.2 for printable; at the default 32, under 1.03."""
    characters = ALPHABETS[alphabet]
    required = REQUIRED_CLASSES[alphabet]
    while True:
        value = "".join(secrets.choice(characters) for _ in range(length))
        if all(any(character in value for character in group) for group in required):
            return SecretValue(value.encode("ascii"))


def command_argv(command: str, what: str) -> tuple[str, ...]:
    """`command` split like a shell would (no shell runs it); InvalidInputError naming `what`."""
    if "\x00" in command:  # no program can receive it (a schedule file's "\u0000"): refused here,
        # where 'schedule check' sees it, not when the command starts after a version was staged
        raise InvalidInputError(f"{what} contains a NUL character, which no command line can hold")
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise InvalidInputError(f"{what}: cannot split the command ({exc})") from None
    if not argv:
        raise InvalidInputError(f"{what} is empty")
    return tuple(argv)


@dataclass(frozen=True)
class Commands:
    """The set and test commands of one rotation and how to run them."""

    set_argv: tuple[str, ...] | None
    test_argv: tuple[str, ...] | None
    timeout: float
    environ: Mapping[str, str] = field(repr=False)  # MASTER_PASSWORD, PGPASSWORD, VAULT_TOKEN, ...
    cwd: Path | None = None
    # How the rotation was invoked before `rotate`: the program and the global options given on
    # its command line (--store, --server, ...), so a suggested command acts on the same store.
    invocation: tuple[str, ...] = ("secrets-manager",)
    # A PostgreSQL role whose password the set and test steps change and log in with, in place of
    # set and test commands (a built-in rotator: rotators/postgres.py).
    postgres: PostgresRole | None = None
    # A --resume that names no target (no commands, no --postgres-role, no --promote-only), with
    # its administrator connection string ("" for libpq's defaults): refused once the pending
    # version is read, with the command that names the role it recorded. None: not such a resume.
    recorded_postgres: str | None = None

    @property
    def target(self) -> str | None:
        """What a value staged with these commands is for, recorded with the version (`stage`'s
        `target`): the PostgreSQL role; None for set and test commands, which only they know."""
        return None if self.postgres is None else self.postgres.target

    def runs(self, step: str) -> bool:
        """Whether the rotation has a `step` ("set" or "test") to run."""
        argv = self.set_argv if step == "set" else self.test_argv
        return argv is not None or self.postgres is not None

    @property
    def set_step(self) -> str:
        """What sets the value at the target, as messages name it."""
        return "set command" if self.postgres is None else f"set step (ALTER ROLE {self.postgres.role})"

    def check(self, value: SecretValue, *, field: str | None = None) -> None:
        """Refuse a value the target cannot take before it is staged (InvalidInputError). A field
        rotation's PostgreSQL password is the JSON object's "password" field, and no other."""
        if self.postgres is None:
            return
        if field is not None and field != PASSWORD_FIELD:
            raise InvalidInputError(
                f"a PostgreSQL role's password is the {PASSWORD_FIELD!r} field of a JSON object value "
                f"(as AWS keeps database credentials), not {field!r}"
            )
        self.postgres.password_of(value)

    def check_target(self, name: str) -> None:
        """Before a new value is staged: a target that cannot take it now (the PostgreSQL role
        does not exist or cannot log in, its administrator cannot connect or may not change it)
        refuses the rotation with nothing pending, instead of failing a step after the stage."""
        if self.postgres is None:
            return
        try:
            self.postgres.check_before_stage(timeout=self.timeout)
        except PostgresStepError as exc:
            refusal = NotFoundError if exc.missing else RotationStepFailed
            raise refusal(f"rotating {name}: {exc}; nothing was staged") from None
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP while the server was asked
            raise _interruption(
                exc, f"rotating {name}: interrupted ({_how(exc)}); nothing was staged"
            ) from None


def resume_command(name: str, commands: Commands, *, resume: bool = True) -> str:
    """The command line that finishes a rotation of `name` run with `commands`: the same set and
    test commands again. A resume without them would promote a value nothing has set at the
    target. Only command lines and a name, never a value (the value goes to the commands' stdin).
    `resume=False`: the command that starts a new rotation with the same commands."""
    words = [*commands.invocation, "rotate", name, *(["--resume"] if resume else [])]
    if commands.postgres is not None:
        words += commands.postgres.options
    if commands.set_argv is not None:
        words += ["--set-command", shlex.join(commands.set_argv)]  # split again by shlex.split
    if commands.test_argv is not None:
        words += ["--test-command", shlex.join(commands.test_argv)]
    if commands.timeout != DEFAULT_TIMEOUT:
        given = f"{commands.timeout:g}"  # 30 as 30, but never rounded (":g" made 1234.5678 1234.57)
        words += ["--timeout", given if float(given) == commands.timeout else repr(commands.timeout)]
    return shell_join(words)


def run_command(
    step: str,
    argv: tuple[str, ...],
    name: str,
    version: int,
    value: SecretValue,
    commands: Commands,
    *,
    scheduled: bool = False,
) -> None:
    """Run one command with the new value on stdin and its output on our stderr;
    RotationStepFailed if it does not exit 0 within the timeout, saying how to finish: the same
    command again with --resume, or for a schedule entry (`scheduled`) that the schedule will."""
    # Not what unlocks a store (ours, or a Vault store's token: the service's own, when a schedule
    # runs it), which would open every namespace to a command that sets one credential.
    withheld = (*PASSWORD_VARIABLES, *VAULT_CREDENTIAL_VARIABLES)
    env = {k: v for k, v in commands.environ.items() if k not in withheld}
    env[NAME_VARIABLE] = name
    env[VERSION_VARIABLE] = str(version)
    sys.stderr.flush()
    try:
        returncode = run_in_own_group(argv, value.reveal(), env, timeout=commands.timeout, cwd=commands.cwd)
    except subprocess.TimeoutExpired:
        failure = f"timed out after {commands.timeout:g} s"
    except OSError as exc:
        failure = f"could not start ({exc.strerror or type(exc).__name__})"
    else:
        if returncode == 0:
            return
        failure = f"exit code {returncode}"
    raise RotationStepFailed(
        f"rotating {name}: the {step} command failed ({failure}); version {version} stays pending and "
        f"current is unchanged; {_how_to_finish(name, commands, scheduled=scheduled, cause=True)}"
    )


def run_step(
    step: str, name: str, version: int, value: SecretValue, commands: Commands, *, scheduled: bool = False
) -> None:
    """The rotation's `step` ("set" or "test"): its command, or the built-in PostgreSQL rotator;
    RotationStepFailed, saying how to finish, if it fails."""
    if commands.postgres is None:
        argv = commands.set_argv if step == "set" else commands.test_argv
        assert argv is not None  # the caller runs only the steps Commands.runs
        run_command(step, argv, name, version, value, commands, scheduled=scheduled)
        return
    target = commands.postgres
    what = (
        f"ALTER ROLE {target.role} PASSWORD" if step == "set" else f"log in as PostgreSQL role {target.role}"
    )
    try:
        if step == "set":
            target.set_password(value, timeout=commands.timeout)
        else:
            target.check_login(value, timeout=commands.timeout)
    except (PostgresStepError, InvalidInputError) as exc:  # the latter: a pending value it cannot take
        raise RotationStepFailed(
            f"rotating {name}: the {step} step ({what}) failed ({exc}); version {version} stays pending "
            f"and current is unchanged; {_how_to_finish(name, commands, scheduled=scheduled, cause=True)}"
        ) from None


def _how_to_finish(
    name: str, commands: Commands, *, scheduled: bool, cause: bool = False, password: bool = False
) -> str:
    """How to finish a rotation of `name` whose version stays pending, or drop it: the same
    commands with --resume, or for a schedule entry (its commands stay in the schedule file, out
    of logs and replies) that the schedule resumes it."""
    discard = shell_join([*commands.invocation, "rotate", name, "--discard"])
    if scheduled:
        stale = commands.timeout * STALE_AFTER_TIMEOUTS
        first = "fix the cause: the schedule" if cause else "the schedule"
        return (
            f"{first} resumes it with its entry's set and test commands once it is {stale:g} s old (three "
            f"command timeouts) (or discard it: {discard})"
        )
    first = "fix the cause and run" if cause else "finish it by running"
    if password:  # the password was changed (passwd) while the rotation ran
        first = "finish it with the current master password by running"
    return (
        f"{first} the same command again with --resume: {resume_command(name, commands)} (or discard "
        f"it: {discard})"
    )


def run_in_own_group(
    argv: Sequence[str], stdin: bytes, env: Mapping[str, str], *, timeout: float, cwd: Path | None = None
) -> int:
    """Run a command in a process group of its own, its output on our stderr, and end the whole
    group if it times out (subprocess.TimeoutExpired) or we are interrupted: a `sh -c` whose child
    still runs must not go on setting a value at the target after we have reported the step failed
    (subprocess.run would kill the shell only)."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=sys.stderr.fileno(),
        stderr=sys.stderr.fileno(),
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    with _running_lock:
        _running_groups.add(process.pid)
    try:
        process.communicate(stdin, timeout=timeout)
    except BaseException:  # the timeout, or Ctrl-C / SIGTERM reaching us and not the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    finally:
        with _running_lock:
            _running_groups.discard(process.pid)
    return process.returncode


# The process groups of the commands running now, for end_running_commands.
_running_groups: set[int] = set()
_running_lock = threading.Lock()


def end_running_commands() -> int:
    """Kill the process group of every command still running (how many), as a timeout would: at
    the end of a service's shutdown grace. A command left to run on after we exit could set an
    old value at the target after a later rotation, resumed elsewhere, has set a newer one."""
    with _running_lock:
        groups = list(_running_groups)
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    return len(groups)


class RotationSteps(Protocol):
    """The store steps of a rotation, and the audit around its commands, as the caller does them."""

    def stage(
        self, name: str, value: SecretValue, *, expect_current: int | None = None, target: str | None = None
    ) -> int:
        """Stage `value` as pending; its version. `expect_current`: the version `read_current`
        returned, which must still be current (ConflictError, nothing staged, otherwise). `target`:
        what the value is for (`Commands.target`), recorded with the version."""

    def pending(self, name: str) -> tuple[int, SecretValue, str | None]:
        """The version labelled pending, its value and the target recorded with it (None: none
        recorded), to resume a rotation."""

    def promote(self, name: str, version: int) -> int | None:
        """Make `version` current; the old current."""

    def current(self, name: str) -> int | None:
        """The version labelled current now (None if unknown): read after a refused promote."""

    def read_current(self, name: str) -> tuple[int, SecretValue] | None:
        """The current version and value, to rotate one field of a JSON object or to see that it
        is one; None where the caller does not read it (a client staging through a service)."""

    def command_step(self, step: str, name: str, version: int) -> AbstractContextManager[object]:
        """Around the set or test command (audited with its outcome where there is a log)."""


class NoLongerDue(ConflictError):
    """A scheduled rotation found due on one current version (its plan) found another current
    when it came to stage: a value stored, or a rotation another runner finished, in between. That
    new value restarts the clock: nothing was staged and no command ran."""

    def __init__(self, name: str, found_due: int, current: int | None) -> None:
        now = "it has no current version now" if current is None else f"now version {current}"
        super().__init__(f"{name}: stored again since it was found due ({now}); not rotated")
        self.current = current


@dataclass(frozen=True)
class Rotated:
    name: str
    version: int  # now current
    previous: int | None  # the old current, now previous
    resumed: bool  # the version was staged by an earlier rotation that did not finish
    # Another runner that resumed this version made it current first (the value is the same):
    # the rotation took place, and `previous` is not known here.
    promoted_elsewhere: bool = False
    expires: datetime | None = None  # recorded for it after the promote (a schedule's expires_after)


def rotate(
    steps: RotationSteps,
    name: str,
    commands: Commands,
    *,
    value: SecretValue | None,
    field: str | None = None,
    generated: bool = False,
    scheduled: bool = False,
    set_ran: bool = False,
    warn: Callable[[str], None] | None = None,
    found_due: int | None = None,
) -> Rotated:
    """Stage `value` (or, if None, resume the pending version), set, test, promote. A failed
    command raises RotationStepFailed and leaves the version pending; nothing else moves.

    A promote refused because the version is current already is the rotation done, not a
    conflict: another runner (a replica, or the schedule while a person's commands ran long)
    resumed this version, set the same value and promoted it first. A pending version older than
    the current one (the secret was written after it was staged) is never promoted: a resume
    refuses it before any command runs, and promote refuses it at the end (ConflictError).

    `field`: `value` replaces that text field of the current value, a JSON object (as AWS keeps
    database credentials: {"username": …, "password": …}); the other fields stay. A `generated`
    value never replaces a JSON object whole (every field but one would be lost). Where the
    current value was read (a field rotation; a generated value, where the caller reads it), the
    stage is conditional on that version still being current: a write made between the read and
    the stage would otherwise be undone by the promote (a field rotation would bring back the
    other fields as they were read; a generated value could replace a JSON object written
    meanwhile whole). A value given whole (`--stdin`) was built from nothing read. `scheduled`: the
    rotation is a schedule entry's, so a refusal says what to change in the schedule file, and a
    failed command that the schedule resumes it.
    `set_ran`: resuming a version whose set command this runner saw exit 0 (its promote failed,
    say): the value is at the target, so only the test runs again (it is cheap and read-only, and
    checks the target still takes the value after whatever interrupted us), then promote.
    The version is staged with its target (`Commands.target`, the PostgreSQL role); a resume of a
    version that recorded a role sets that role's password only, and only named (`resumed_commands`).
    `warn`: where a warning goes (default: logged).
    `found_due`: the current version when the caller found the rotation due (a schedule's plan,
    read before this call, perhaps long before: `schedule run` reads every entry first). A new
    value is staged only if that version is still current, checked in the stage's own commit:
    a value stored meanwhile (or another runner's rotation) restarts the clock, and rotating it
    away would replace a fresh credential and run the set command for nothing. NoLongerDue
    (a ConflictError) then, nothing staged, no command run."""
    resumed = value is None
    expect_current = None
    if value is not None:
        commands.check(value, field=field)  # e.g. a password PostgreSQL cannot take: before the stage
    if value is not None and (field is not None or generated):
        read = steps.read_current(name)
        expect_current = None if read is None else read[0]
        value = new_value_for(
            name,
            None if read is None else read[1],
            value,
            field=field,
            generated=generated,
            scheduled=scheduled,
        )
    if value is None:
        version, value, target = steps.pending(name)
        commands = resumed_commands(name, version, target, commands, scheduled=scheduled, warn=warn)
        current = _current_or_none(steps, name)
        if current is not None and current > version:  # before the target is touched
            refuse_to_demote(name, version, current)
    else:
        read_version = expect_current
        if found_due is not None:
            if expect_current is not None and expect_current != found_due:
                raise NoLongerDue(name, found_due, expect_current)
            expect_current = found_due  # where nothing was read (a client through a service)
        commands.check(value, field=field)  # the whole object, now that a field rotation built it
        commands.check_target(name)
        try:
            try:
                version = steps.stage(name, value, expect_current=expect_current, target=commands.target)
            except UnsupportedOperationError:
                # A service from before StageSecretVersionIfCurrent. Where nothing was read, the
                # condition is the plan's alone, and such a service was always asked without one.
                if found_due is None or read_version is not None:
                    raise
                (warn or _log.warning)(
                    f"{name}: the service cannot stage on condition (it is older than this client), so "
                    f"the new value is staged without checking that version {found_due}, found due, "
                    "is still current"
                )
                version = steps.stage(name, value, expect_current=None, target=commands.target)
        except ConflictError as exc:
            # The store's refuse_if_changed (a plain ConflictError, over gRPC too): current moved
            # after the read. Its subclasses (a rotation in progress, a deleted secret) stay theirs.
            if found_due is None or type(exc) is not ConflictError:
                raise
            raise NoLongerDue(name, found_due, _current_or_none(steps, name)) from None
    at_target = resumed and set_ran  # the target holds the value: its set command exited 0
    promoting = False
    try:
        for step in ("set", "test"):
            if commands.runs(step) and not (step == "set" and resumed and set_ran):
                with steps.command_step(step, name, version):
                    run_step(step, name, version, value, commands, scheduled=scheduled)
                    at_target = at_target or step == "set"
        promoting = True
        previous = steps.promote(name, version)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP where the CLI turns them into it
        raise _interrupted(exc, name, version, commands, scheduled, at_target, promoting) from None
    except SecretsManagerError as exc:
        if promoting and isinstance(exc, ConflictError):
            if _is_current(steps, name, version):
                return Rotated(name, version, None, resumed=resumed, promoted_elsewhere=True)
            if at_target:
                _say_overtaken(exc, steps, name, version, commands, scheduled)
        elif at_target and not isinstance(exc, ChangeUnrecordedError):  # that one: the promote stands
            _say_set_ran(exc, name, version, commands, scheduled, promoting=promoting)
        raise
    return Rotated(name, version, previous, resumed=resumed)


def resumed_commands(
    name: str,
    version: int,
    target: str | None,
    commands: Commands,
    *,
    scheduled: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Commands:
    """The commands that resume version `version` of `name`, staged for `target` (None: none
    recorded). A PostgreSQL role recorded is the one whose password the value is: a resume naming
    another role is refused (InvalidInputError, exit 2), before any step, nothing changed. A resume
    naming no target (`Commands.recorded_postgres`) is refused too, with the command that names the
    recorded role: the role comes from whoever staged the version (anyone with the rotate
    capability may stage one, and record any role), so a password is set only for a role the
    person resuming names. A version staged by a build before targets (none recorded) is resumed
    as the commands say, with a warning: its role cannot be checked. Set and test commands are
    taken as given (what they change, only they know)."""
    recorded = PostgresRole.role_of_target(target)
    discard = shell_join([*commands.invocation, "rotate", name, "--discard"])
    if commands.recorded_postgres is not None:
        if recorded is None:
            raise InvalidInputError(
                f"version {version} of {name} records no PostgreSQL role (it was staged by set and test "
                "commands, or by an older secrets-manager), so --resume without --set-command would "
                "promote a value nothing has set at the target; give the rotation's "
                "--set-command/--test-command (or --postgres-role), or --promote-only if the target "
                "already holds the pending value (set by hand); nothing was changed (or discard it: "
                f"{discard})"
            )
        named = replace(
            commands,
            postgres=PostgresRole.parse(recorded, commands.recorded_postgres),
            recorded_postgres=None,
        )
        raise InvalidInputError(
            f"version {version} of {name} records PostgreSQL role {recorded!r} (as whoever staged it "
            f"chose): name the role whose password to set; if it is that one, run "
            f"{resume_command(name, named)}; nothing was changed (or discard it: {discard})"
        )
    if commands.postgres is None:
        return commands
    if target is None:
        (warn or _log.warning)(
            f"version {version} of {name} records no PostgreSQL role (staged by an older secrets-manager, "
            f"or by set and test commands), so which role it is for cannot be checked: resuming it as "
            f"PostgreSQL role {commands.postgres.role!r}, as given"
        )
        return commands
    if recorded != commands.postgres.role:
        belongs = (
            f"the password of PostgreSQL role {recorded!r}"
            if recorded is not None
            else "for a target other than a PostgreSQL role"
        )
        if scheduled:
            fix = (
                f"set postgres_role = {recorded!r} in its [[rotation]] entry of the schedule file"
                if recorded is not None
                else "give its entry the set and test commands of the rotation that staged it"
            )
        elif recorded is not None:
            fixed = replace(commands, postgres=replace(commands.postgres, role=recorded))
            fix = f"run {resume_command(name, fixed)}"
        else:
            fix = "resume it with the --set-command/--test-command of the rotation that staged it"
        raise InvalidInputError(
            f"the pending version {version} of {name} is {belongs}, not of {commands.postgres.role!r}: "
            f"nothing was changed; to finish it, {fix} (or discard it: {discard})"
        )
    return commands


def _say_set_ran(
    exc: SecretsManagerError, name: str, version: int, commands: Commands, scheduled: bool, *, promoting: bool
) -> None:
    """A step after the set command failed (the test command; the store, its password changed
    meanwhile; the service): the message says the target now has the pending value, and how to
    finish or drop the rotation. The error keeps its class, so its exit code."""
    if isinstance(exc, RotationStepFailed):  # its message says how to finish already
        exc.args = (
            str(exc).replace(f"rotating {name}: ", f"rotating {name}: the {commands.set_step} ran, then ", 1),
        )
        return
    finish = _how_to_finish(name, commands, scheduled=scheduled, password=isinstance(exc, UnlockError))
    if promoting:  # the promote may have been made before its error (an audit record that failed)
        history = shell_join([*commands.invocation, "history", name])
        state = f"version {version} may still be pending ('{history}' shows it); if it is, {finish}"
    else:
        state = (
            f"version {version} stays pending and current is unchanged (the target may no longer take "
            f"it): {finish}"
        )
    exc.args = (
        f"rotating {name}: the {commands.set_step} ran (the target now has version {version}'s value), "
        f"then the {'promote' if promoting else 'next step'} failed: {exc}; {state}",
    )


def _say_overtaken(
    exc: SecretsManagerError,
    steps: RotationSteps,
    name: str,
    version: int,
    commands: Commands,
    scheduled: bool,
) -> None:
    """The promote was refused after the set command ran: the version was discarded (and perhaps
    another rotation finished) or a newer one written meanwhile. The target holds this rotation's
    value, which is not current: the message says so and what sets a current value there."""
    current = _current_or_none(steps, name)
    now = "" if current is None else f" (version {current})"
    if scheduled:
        again = "rotate it again now (the schedule does only when it is next due)"
    else:
        get = shell_join([*commands.invocation, "get", name])
        run_set = (
            ""
            if commands.set_argv is None
            else f", or give the set command the current value: {get} | {shell_join(commands.set_argv)}"
        )
        again = f"rotate it again: {resume_command(name, commands, resume=False)}{run_set}"
    exc.args = (
        f"{exc}; but this rotation's {commands.set_step} had already run: the target now holds version "
        f"{version}'s value, not current's{now}. If no other rotation of {name} is running, {again}",
    )


def _interrupted(
    exc: KeyboardInterrupt,
    name: str,
    version: int,
    commands: Commands,
    scheduled: bool,
    at_target: bool,
    promoting: bool,
) -> OperationInterrupted:
    """Ctrl-C (or SIGTERM / SIGHUP, see errors.Terminated) during a rotation's steps: the running
    command's process group was ended (`run_in_own_group`); what that leaves, and how to go on.
    Exit 130 for Ctrl-C, 128 + the signal's number for the others."""
    how = _how(exc)
    if promoting:
        message = (
            f"rotating {name}: interrupted ({how}) while promoting version {version}: it may be current "
            f"or still pending ('{shell_join([*commands.invocation, 'history', name])}' shows which); "
            f"if it is pending, {_how_to_finish(name, commands, scheduled=scheduled)}"
        )
    else:
        where = (
            f"after its {commands.set_step} ran (the target has the new value)"
            if at_target
            else (
                f"while its {commands.set_step} ran (it was ended; the target may or may not have the "
                "new value)"
            )
            if commands.runs("set")
            else "while its commands ran (they were ended)"
        )
        message = (
            f"rotating {name}: interrupted ({how}) {where}; version {version} stays pending and current "
            f"is unchanged; {_how_to_finish(name, commands, scheduled=scheduled)}"
        )
    return _interruption(exc, message)


def _how(exc: KeyboardInterrupt) -> str:
    """How a rotation was interrupted, as its message says: the signal's name, or Ctrl-C."""
    return str(exc) if isinstance(exc, Terminated) else "Ctrl-C"


def _interruption(exc: KeyboardInterrupt, message: str) -> OperationInterrupted:
    """The error for an interrupted rotation, with the exit code of what interrupted it."""
    error = OperationInterrupted(message)
    error.exit_code = getattr(exc, "exit_code", OperationInterrupted.exit_code)
    return error


def new_value_for(
    name: str,
    current: SecretValue | None,
    value: SecretValue,
    *,
    field: str | None,
    generated: bool,
    scheduled: bool = False,
) -> SecretValue:
    """The value to stage: `value` itself, or the current JSON object with `field` set to it.
    `scheduled`: for a schedule entry, whose fix is a setting in the schedule file, not an option."""
    document = None if current is None else read_exact_json_object(current.reveal())
    is_object = document is not None or (current is not None and read_json_object(current.reveal())[1])
    if field is None:
        if generated and is_object:
            fields = f" (fields {', '.join(sorted(document.fields))})" if document else ""
            fix = (
                'name the field to rotate in its [[rotation]] entry of the schedule file (field = "<name>")'
                if scheduled
                else f"rotate one field ('rotate {name}#FIELD'), or give the whole new object with --stdin"
            )
            raise InvalidInputError(
                f"{name} holds a JSON object{fields}; a generated value would replace all of it: {fix}"
            )
        return value
    if current is None:
        raise InvalidInputError(
            f"rotating field {field!r} of {name} needs its current value, which was not read"
        )
    if document is None:
        if is_object:
            raise InvalidInputError(
                f"the value of {name} is a JSON object that cannot be rewritten exactly (nesting too "
                "deep): give the whole new object with --stdin"
            )
        raise InvalidInputError(f"the value of {name} is not a JSON object, so it has no field {field!r}")
    if type(document.fields.get(field)) is not str:  # a number read as its text is not a text field
        count = len(document.fields)  # the field names are part of the value: counted, not listed
        raise InvalidInputError(
            f"the value of {name} has no text field {field!r} (it has {count} field"
            f"{'' if count == 1 else 's'}; 'secrets-manager get {name}' shows them)"
        )
    try:
        document.fields[field] = value.reveal().decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"the new value of field {field!r} must be UTF-8 text") from None
    return SecretValue(_rewritten(current.reveal(), document.dumps()))


# Byte-order marks json.loads accepts before a JSON text, longest first (UTF-32-LE's starts with
# UTF-16-LE's), and the codec of the text after each.
_BOMS = (
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
)
_JSON_WHITESPACE = " \t\n\r"


def _rewritten(data: bytes, body: str) -> bytes:
    """`body`, the rewritten JSON text of `data` (a JSON object json.loads read), in `data`'s frame:
    the same byte-order mark if it had one, the same encoding (json.loads also reads UTF-16 and
    UTF-32), and the same whitespace before and after the object (a file's final newline, say)."""
    bom, codec = next(
        ((bom, codec) for bom, codec in _BOMS if data.startswith(bom)), (b"", json.detect_encoding(data))
    )
    text = data[len(bom) :].decode(codec)
    before = text[: len(text) - len(text.lstrip(_JSON_WHITESPACE))]
    after = text[len(text.rstrip(_JSON_WHITESPACE)) :]
    # json.loads reads an escaped unpaired surrogate ("\\ud800") into the string, where no UTF codec
    # can write it as is: written back as the same escape, which backslashreplace produces.
    return bom + (before + body + after).encode(codec, errors="backslashreplace")


def _is_current(steps: RotationSteps, name: str, version: int) -> bool:
    return _current_or_none(steps, name) == version


def _current_or_none(steps: RotationSteps, name: str) -> int | None:
    try:
        return steps.current(name)
    except SecretsManagerError:  # cannot tell (e.g. not allowed to describe): promote decides
        return None


# ---- the schedule ----------------------------------------------------------------------------------

_KNOWN = {
    "name",
    "every",
    "set_command",
    "test_command",
    "postgres_role",
    "postgres",
    "length",
    "alphabet",
    "timeout",
    "field",
    "expires_after",
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]+)([smhd])")  # ASCII only: \d also matches other scripts' digits
MAX_EVERY = timedelta(days=3650)


@dataclass(frozen=True)
class ScheduledRotation:
    """One entry of a schedule file: rotate `name` when its current version is `every` old."""

    name: str
    every: timedelta
    set_argv: tuple[str, ...] | None
    test_argv: tuple[str, ...] | None
    length: int
    alphabet: str
    timeout: float
    directory: Path  # the schedule file's: the commands run there
    field: str | None = None  # rotate this text field of a JSON object value (the rest stays)
    postgres: PostgresRole | None = None  # the built-in PostgreSQL rotator, in place of commands
    expires_after: timedelta | None = None  # each new value's expiry, this long after its rotation

    def expiry(self, now: datetime) -> datetime | None:
        """The expiry to record for a value this entry's rotation made current at `now`."""
        return None if self.expires_after is None else now + self.expires_after

    @property
    def stale_after(self) -> timedelta:
        return timedelta(seconds=self.timeout * STALE_AFTER_TIMEOUTS)

    def commands(self, environ: Mapping[str, str]) -> Commands:
        return Commands(
            self.set_argv, self.test_argv, self.timeout, environ, cwd=self.directory, postgres=self.postgres
        )

    def value_for(self, state: Due) -> SecretValue | None:
        """What `rotate` gets for a rotation run in `state`: None to resume the pending version
        (Due.RESUME), else a newly generated value (which the store refuses to stage while
        another rotation is in progress)."""
        return None if state is Due.RESUME else generated_value(self.length, self.alphabet)

    def run(
        self,
        steps: RotationSteps,
        environ: Mapping[str, str],
        state: Due,
        *,
        set_ran: bool = False,
        warn: Callable[[str], None] | None = None,
        found_due: int | None = None,
    ) -> Rotated:
        """This entry's rotation in `state` (resume, or a new generated value), as `rotate` does it.
        `found_due`: the current version of the plan that found it due (`Plan.current`): a new
        value is staged only while that version is current (NoLongerDue otherwise)."""
        value = self.value_for(state)
        return rotate(
            steps,
            self.name,
            self.commands(environ),
            value=value,
            field=self.field,
            generated=True,
            scheduled=True,
            set_ran=set_ran,
            warn=warn,
            found_due=found_due if state is Due.DUE else None,
        )


def parse_every(text: object, key: str = "every") -> timedelta:
    """ "30d", "12h", "15m", "90s" (one number and unit) as a timedelta of 1 s .. 3650 d.
    The bound is checked before any conversion: timedelta overflows on a huge number, and int()
    refuses one of thousands of digits."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInputError(f'{key} must be a number and a unit, e.g. "30d", "12h", "15m" or "90s"')
    digits = match[1].lstrip("0") or "0"
    seconds = int(digits) * _UNITS[match[2]] if len(digits) <= 12 else None
    if seconds is None or not 1 <= seconds <= MAX_EVERY.total_seconds():
        raise InvalidInputError(f"{key} must be between 1s and 3650d (10 years)")
    return timedelta(seconds=seconds)


def load_schedule(
    path: str | Path, *, environment: Environment, warn: Callable[[str], None] | None = None
) -> tuple[ScheduledRotation, ...]:
    """Parse and check a schedule file; InvalidInputError names the file, the entry and the problem.

    Its commands run as this user, so whoever can change the file runs commands as us: one that
    another user owns, or group or others can write (or replace: its directory), is refused in
    production (UnsafeConfigurationError) and a warning elsewhere (`warn`, default: logged). So is
    a postgres_role entry whose connection would reach another host without sslmode=verify-full
    (rotators/postgres.py's guard_tls), at once rather than when the rotation runs."""
    path = Path(path)
    try:
        data, found, folder = read_in_directory(path, MAX_SCHEDULE_BYTES)
    except FileNotFoundError:
        raise file_not_found("rotation schedule", path) from None
    except OSError as exc:
        raise InvalidInputError(
            f"rotation schedule {path}: cannot read it ({exc.strerror or type(exc).__name__})"
        ) from None
    environment.guard(loose_file_problem(path, found, "rotation schedule", folder=folder), warn)
    if len(data) > MAX_SCHEDULE_BYTES:
        raise InvalidInputError(f"rotation schedule {path} is larger than {MAX_SCHEDULE_BYTES} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidInputError(f"rotation schedule {path}: cannot read it (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"rotation schedule {path}: {exc}") from None
    if set(doc) - {"rotation"}:
        raise InvalidInputError(
            f"rotation schedule {path}: unknown table {sorted(set(doc) - {'rotation'})[0]!r}; "
            "entries are [[rotation]] tables"
        )
    entries = doc.get("rotation", [])
    if not isinstance(entries, list):
        raise InvalidInputError(f"rotation schedule {path}: entries are [[rotation]] tables")
    schedule: list[ScheduledRotation] = []
    for number, entry in enumerate(entries, start=1):
        try:
            schedule.append(_entry(entry, path.parent.resolve()))
        except InvalidInputError as exc:
            raise InvalidInputError(f"rotation schedule {path}, rotation {number}: {exc}") from None
    names = [rule.name for rule in schedule]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise InvalidInputError(f"rotation schedule {path}: {duplicate!r} is listed twice")
    for rule in schedule:
        if rule.postgres is not None:
            rule.postgres.guard_tls(
                environment, f"rotation schedule {path}, {rule.name!r}: its postgres connection"
            )
    return tuple(schedule)


def _entry(entry: Any, directory: Path) -> ScheduledRotation:
    if not isinstance(entry, dict):
        raise InvalidInputError("must be a table")
    unknown = set(entry) - _KNOWN
    if unknown:
        raise InvalidInputError(f"unknown setting {sorted(unknown)[0]!r}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise InvalidInputError("name (a secret's name) is required")
    validate_name(name)
    if "every" not in entry:
        raise InvalidInputError('every is required, e.g. every = "30d"')
    argv: dict[str, tuple[str, ...] | None] = {}
    for key in ("set_command", "test_command"):
        command = entry.get(key)
        if command is not None and not isinstance(command, str):
            raise InvalidInputError(f"{key} must be a string")
        argv[key] = None if command is None else command_argv(command, key)
    length = entry.get("length", DEFAULT_LENGTH)
    if not isinstance(length, int) or isinstance(length, bool) or not MIN_LENGTH <= length <= MAX_LENGTH:
        raise InvalidInputError(f"length must be {MIN_LENGTH}..{MAX_LENGTH}")
    alphabet = entry.get("alphabet", "alnum")
    if not isinstance(alphabet, str) or alphabet not in ALPHABETS:  # a list or table: unhashable
        raise InvalidInputError(f"alphabet must be one of {', '.join(sorted(ALPHABETS))}")
    timeout = entry.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT:
        raise InvalidInputError(f"timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    field = entry.get("field")
    if field is not None and not (isinstance(field, str) and field and field.isprintable()):
        raise InvalidInputError("field must be the name of a text field of the JSON object value")
    postgres = _postgres_entry(
        entry, commands=argv["set_command"] is not None or argv["test_command"] is not None
    )
    if postgres is not None and field not in (None, PASSWORD_FIELD):
        raise InvalidInputError(
            f"postgres_role sets the {PASSWORD_FIELD!r} field of a JSON object value, not {field!r}"
        )
    every = parse_every(entry["every"])
    expires_after = None
    if "expires_after" in entry:
        expires_after = parse_every(entry["expires_after"], "expires_after")
        if expires_after <= every:
            raise InvalidInputError(
                f"expires_after ({entry['expires_after']}) must be longer than every ({entry['every']}): "
                "each value would expire before the rotation that replaces it"
            )
    return ScheduledRotation(
        name=name,
        every=every,
        expires_after=expires_after,
        set_argv=argv["set_command"],
        test_argv=argv["test_command"],
        length=length,
        alphabet=alphabet,
        timeout=float(timeout),
        directory=directory,
        field=field,
        postgres=postgres,
    )


def _postgres_entry(entry: dict[str, Any], *, commands: bool) -> PostgresRole | None:
    """An entry's built-in PostgreSQL rotator: postgres_role, and postgres (the administrator's
    connection string, without a password: libpq's ~/.pgpass, PGPASSFILE or PGPASSWORD of the
    process that runs the schedule give it)."""
    role, conninfo = entry.get("postgres_role"), entry.get("postgres")
    if role is None:
        if conninfo is not None:
            raise InvalidInputError("postgres goes with postgres_role: the role whose password to rotate")
        return None
    if not isinstance(role, str) or not (conninfo is None or isinstance(conninfo, str)):
        raise InvalidInputError("postgres_role and postgres must be strings")
    if commands:
        raise InvalidInputError(
            "postgres_role sets and tests the password itself: drop set_command and test_command"
        )
    return PostgresRole.parse(role, conninfo or "", where="postgres")


class Due(enum.StrEnum):
    """What a scheduled rotation should do now."""

    NOT_DUE = "not due"
    DUE = "due"  # stage a new value
    IN_PROGRESS = "in progress"  # a version is pending and young: another rotation is running
    RESUME = "resume"  # a version is pending and stale: finish that rotation
    DELETED = "deleted"  # soft-deleted: nothing is rotated until it is undeleted

    @property
    def runs(self) -> bool:
        """Whether a schedule pass rotates the secret now (stages a new value, or resumes)."""
        return self in (Due.DUE, Due.RESUME)


@dataclass(frozen=True)
class Plan:
    state: Due
    last_rotated: datetime | None  # when the current version was created
    next_due: datetime | None
    pending: int | None
    # Who staged the pending version, when it is stale but not the schedule's to resume (`plan`'s
    # `stagers`): left in progress. "" where the store does not record it (AWS).
    staged_by_another: str | None = None
    # The version current when the plan was made: a rotation found due stages only while it is.
    current: int | None = None


def plan(
    rule: ScheduledRotation, meta: SecretMetadata, now: datetime, *, stagers: Collection[str] | None = None
) -> Plan:
    """Due when the current version is `every` old (any new current value restarts the clock,
    whether a rotation or a `store` made it), or when there is none. A pending version is young
    (in progress) while it was staged less than `stale_after` from `now`, before or after: one
    dated further ahead was staged while a clock was ahead (stepped back since), and waited as
    long as the step (a day, a year) with the new value perhaps at the target already.

    `stagers`: the authors (`created_by`) whose stale pending versions the runner resumes, i.e.
    sets at the target: rotations of this schedule. A version anyone else staged stays in
    progress however old (`staged_by_another`): its value is one they chose (anyone with the
    rotate capability may stage one, through the service), and a resume would set it at the
    target (a database role's password they then know). None: every stale version is resumed
    (the plan alone, as tests ask it)."""
    created = {v.version: v.created for v in meta.versions}
    authors = {v.version: v.created_by for v in meta.versions}
    current = meta.labels.get(CURRENT)
    pending = meta.labels.get(PENDING)
    last = created.get(current) if current is not None else None
    next_due = None if last is None else last + rule.every
    if meta.deleted is not None:
        state = Due.DELETED
    elif pending is not None and pending != current:
        staged = created.get(pending)
        young = staged is not None and abs(now - staged) < rule.stale_after
        state = Due.IN_PROGRESS if young else Due.RESUME
        author = authors.get(pending, "")
        if state is Due.RESUME and stagers is not None and author not in stagers:
            return Plan(Due.IN_PROGRESS, last, next_due, pending, staged_by_another=author, current=current)
    elif next_due is None or now >= next_due:
        state = Due.DUE
    else:
        state = Due.NOT_DUE
    return Plan(
        state, last, next_due, pending if state in (Due.IN_PROGRESS, Due.RESUME) else None, current=current
    )


def staged_by_another(name: str, planned: Plan, invocation: Sequence[str] = ("secrets-manager",)) -> str:
    """What a runner says of a stale pending version it leaves alone because the schedule did not
    stage it (`Plan.staged_by_another`): who did, and how a person finishes or drops it, with the
    runner's `invocation` (`secrets-manager` and its global options, Commands.invocation), so the
    commands it gives act on the same store."""
    who = (
        repr(planned.staged_by_another)
        if planned.staged_by_another
        else "a writer this store does not record per version (AWS keeps none)"
    )
    resume = shell_join([*invocation, "rotate", name, "--resume"])
    discard = shell_join([*invocation, "rotate", name, "--discard"])
    return (
        f"version {planned.pending} of {name} is pending, staged by {who}, not by a rotation of the "
        "schedule: its value is one that writer chose, so the schedule does not set it at the target "
        f"however old it is; if that rotation is meant, finish it with '{resume}' and its commands or "
        f"role, or drop it with '{discard}'"
    )


__all__ = [
    "ALPHABETS",
    "SCHEDULE_ACTOR",
    "Commands",
    "Due",
    "Plan",
    "Rotated",
    "RotationStepFailed",
    "RotationSteps",
    "ScheduledRotation",
    "command_argv",
    "end_running_commands",
    "generated_value",
    "load_schedule",
    "parse_every",
    "plan",
    "resume_command",
    "resumed_commands",
    "rotate",
    "run_command",
    "run_step",
    "staged_by_another",
]
