"""`secrets-manager schedule check|run FILE`: scheduled credential rotation without a service.

The schedule file (rotation.py has its format) lists secrets with how often to rotate them and
their set and test commands. `check` says what each entry would do now; `run` does it: every due
rotation, one after the other, each as `rotate NAME` would (audited step by step on a local store,
authorised and audited by the service with --server). Run it from cron or a systemd timer; the
service does the same on its own when server.toml names the file (`rotation_schedule`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click

from secrets_manager.cli.app import cli, pass_session
from secrets_manager.cli.output import (
    error_line,
    info_line,
    invocation,
    print_json,
    print_table,
    timestamp,
    warning_line,
)
from secrets_manager.cli.rotate_commands import (
    SessionSteps,
    one_password_session,
    record_expiry,
    report_rotated,
    terminate_as_interrupt,
)
from secrets_manager.cli.session import Session, is_remote_store
from secrets_manager.errors import (
    NotFoundError,
    OperationInterrupted,
    RotationInProgressError,
    SecretsManagerError,
)
from secrets_manager.rotation import (
    SCHEDULE_ACTOR,
    Due,
    NoLongerDue,
    Plan,
    ScheduledRotation,
    load_schedule,
    plan,
    staged_by_another,
)
from secrets_manager.store.base import acting_for

MISSING = "missing"


@dataclass
class _Entry:
    rule: ScheduledRotation
    plan: Plan | None  # None: the secret does not exist

    @property
    def state(self) -> str:
        return MISSING if self.plan is None else self.plan.state.value

    def doc(self) -> dict[str, Any]:
        return {
            "name": self.rule.name,
            "every_seconds": int(self.rule.every.total_seconds()),
            "expires_after_seconds": (
                None if self.rule.expires_after is None else int(self.rule.expires_after.total_seconds())
            ),
            "state": self.state,
            "last_rotated": None if self.plan is None else _time(self.plan.last_rotated),
            "next_due": None if self.plan is None else _time(self.plan.next_due),
            "pending": None if self.plan is None else self.plan.pending,
        }


@cli.group()
def schedule() -> None:
    """Scheduled credential rotation: check a schedule file, or run what is due.

    \b
    The file (TOML; README "Scheduled rotation") lists secrets to rotate:
      [[rotation]]
      name = "db/app"
      every = "30d"                                 # s, m, h or d
      set_command = "python3 set-app-password.py"   # optional, value on stdin
      test_command = "python3 check-app-login.py"   # optional
      # postgres_role = "app"                       # instead of the commands: ALTER ROLE,
      # postgres = "host=db.internal user=admin"    # as that administrator (no password here)
      # length = 32, alphabet = "alnum", timeout = 60: the defaults
    A secret is due when its current version is `every` old. The service runs the same file
    on its own when server.toml names it (rotation_schedule)."""


@schedule.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON on stdout.")
@pass_session
def check(session: Session, file: str, as_json: bool) -> int:
    """Check FILE and show, for each entry, when its secret was last rotated, when it is next due
    and what 'schedule run' would do now (due, not due, in progress, resume, deleted, missing).

    Exit 2 if the file is invalid, 3 if a secret it names does not exist."""
    entries = _entries(session, load_schedule(file, environment=session.environment))
    if as_json:
        print_json([entry.doc() for entry in entries])
    else:
        print_table(
            ["NAME", "EVERY", "LAST ROTATED", "NEXT DUE", "STATE"],
            [
                [
                    e.rule.name,
                    _every(e.rule),
                    "" if e.plan is None else timestamp(e.plan.last_rotated),
                    "" if e.plan is None else timestamp(e.plan.next_due),
                    e.state,
                ]
                for e in entries
            ],
        )
    for entry in entries:  # shown "in progress", but no runner will finish it
        if entry.plan is not None and entry.plan.staged_by_another is not None:
            warning_line(staged_by_another(entry.rule.name, entry.plan, invocation()))
    missing = [e.rule.name for e in entries if e.plan is None]
    if missing:
        error_line(f"secret {missing[0]!r} not found; store a first value before it can be rotated")
        return NotFoundError.exit_code
    return 0


@schedule.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON on stdout.")
@pass_session
def run(session: Session, file: str, as_json: bool) -> int:
    """Run every rotation of FILE that is due now: stage a generated value, set, test, promote
    (as 'rotate NAME'); resume one whose pending version is older than 3 command timeouts (left
    by a rotation that did not finish), if a schedule staged it (this command or the service's;
    with --server, this certificate); skip one in progress elsewhere.

    \b
    Exit 0 if every due rotation succeeded (or none was due), 1 if any failed or has a stale
    pending version another staged (each one line, saying whose; the other entries still run), 3
    if a secret it names does not exist."""
    rules = load_schedule(file, environment=session.environment)
    session = one_password_session(session)
    results: list[dict[str, Any]] = []
    exit_code = 0
    for entry in _entries(session, rules):
        result: dict[str, Any] = {"name": entry.rule.name, "state": entry.state}
        results.append(result)
        if entry.plan is None:
            error_line(f"secret {entry.rule.name!r} not found; store a first value before it can be rotated")
            exit_code = exit_code or NotFoundError.exit_code
            continue
        if entry.plan.staged_by_another is not None:  # however old: its value is not ours to set
            refused = staged_by_another(entry.rule.name, entry.plan, invocation())
            error_line(refused)
            result.update(outcome="skipped", error=refused)
            exit_code = 1
            continue
        if entry.plan.state is Due.IN_PROGRESS:
            info_line(f"{entry.rule.name}: a rotation is in progress (version {entry.plan.pending}); skipped")
        elif entry.plan.state is Due.DELETED:
            info_line(f"{entry.rule.name}: deleted; not rotated until it is undeleted")
        if not entry.plan.state.runs:
            result["outcome"] = "skipped"
            continue
        rule = entry.rule
        try:
            steps = SessionSteps(session, reading_fields=rule.field is not None)
            # SIGTERM / SIGHUP end the command, as Ctrl-C does. On a local store the versions it
            # stages are the schedule's, as the service's are (with --server, the caller's).
            with terminate_as_interrupt(), nullcontext() if session.server else acting_for(SCHEDULE_ACTOR):
                rotated = rule.run(
                    steps, session.environ, entry.plan.state, warn=warning_line, found_due=entry.plan.current
                )
        except OperationInterrupted:  # stop here: the entries after it are not started
            raise
        except NoLongerDue as exc:  # stored (or rotated elsewhere) since _entries read it
            info_line(str(exc))
            result["outcome"] = "skipped"
            continue
        except RotationInProgressError:  # another runner staged first (the store refused ours)
            info_line(f"{rule.name}: another rotation started first; skipped")
            result["outcome"] = "skipped"
            continue
        except SecretsManagerError as exc:
            error_line(str(exc))
            result.update(outcome="failed", error=str(exc))
            exit_code = 1
            continue
        result.update(outcome="rotated", version=rotated.version, previous=rotated.previous)
        expiry = None if rotated.promoted_elsewhere else rule.expiry(datetime.now(UTC))
        if expiry is not None:  # the rotation stands whatever happens here
            try:
                record_expiry(session, rotated, expiry)
            except SecretsManagerError as exc:
                error_line(str(exc))
                result["error"] = str(exc)
                exit_code = 1
                expiry = None
        result["expires"] = None if expiry is None else timestamp(expiry)
        report_rotated(rotated, expiry)
    if as_json:
        print_json(results)
    return exit_code


def _entries(session: Session, rules: tuple[ScheduledRotation, ...]) -> list[_Entry]:
    """Each rule with its plan now, from one read of the secrets' metadata (never values). A stale
    pending version is resumed only if a schedule staged it (`rotation-schedule`: the service's,
    or this command's on a local store; with --server, this certificate's identity): anyone with
    the rotate capability may stage a value of their choosing, which a resume would set at the
    target."""
    entries = []
    now = datetime.now(UTC)
    with session.secret_operation("schedule.check") as (store, _):
        runner = _runner(session, store)
        stagers = (SCHEDULE_ACTOR,) if runner is None else (SCHEDULE_ACTOR, runner)
        for rule in rules:
            try:
                meta = store.describe(rule.name)
            except NotFoundError:
                entries.append(_Entry(rule, None))
                continue
            entries.append(_Entry(rule, plan(rule, meta, now, stagers=stagers)))
    return entries


def _runner(session: Session, store: object) -> str | None:
    """Who the versions this run stages are created by besides `rotation-schedule`: the client
    certificate's identity through a service (None: locally, where they are `rotation-schedule`'s,
    not the user's, whose name a service's caller may bear as its certificate's CN; or not known)."""
    if not is_remote_store(store):
        return None
    from secrets_manager.tls.identity import identity_from_certificate

    try:
        return identity_from_certificate(session.tls_files().cert.read_bytes())
    except (OSError, ValueError, SecretsManagerError):  # read when the connection was made
        return None


def _every(rule: ScheduledRotation) -> str:
    seconds = int(rule.every.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _time(value: datetime | None) -> str | None:
    """A time in the JSON as every command prints times (`timestamp`: UTC to the second, `Z`)."""
    return None if value is None else timestamp(value)
