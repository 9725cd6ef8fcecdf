"""The built-in PostgreSQL rotator (`rotate NAME --postgres-role ROLE`, a schedule's
`postgres_role`) against the private PostgreSQL cluster: the role's password really changes, only
its SCRAM verifier reaches the server, and every failure leaves the version pending with a command
that finishes it."""

from __future__ import annotations

import codecs
import contextlib
import json
import secrets
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.values import SecretValue
from service_fixtures import Server, make_pki, make_store, start_server
from tcp_proxy import TcpProxy, Verdict
from test_rotate import OLD_VALUE, PASSWORD, SCRIPT, Cli


@dataclass
class Roles:
    """An administrator (CREATEROLE) and the application role it rotates, fresh for one test."""

    cluster: Any
    admin: str
    admin_password: str
    app: str

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.cluster.port} dbname=postgres user={self.admin}"

    @property
    def env(self) -> dict[str, str]:
        """The administrator's password where libpq reads it (never in the connection string)."""
        return {"PGPASSWORD": self.admin_password, "PGCONNECT_TIMEOUT": "10"}

    def logs_in(self, password: str, *, role: str | None = None) -> bool:
        """Whether `role` (the rotated one unless given) logs in with `password`."""
        try:
            psycopg.connect(
                host="127.0.0.1", port=self.cluster.port, dbname="postgres", user=role or self.app,
                password=password, connect_timeout=10,
            ).close()  # fmt: skip
        except psycopg.OperationalError as exc:
            assert "password authentication failed" in str(exc), exc
            return False
        return True

    def stored_verifier(self) -> str:
        with self.cluster.connect(superuser=True) as conn:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (self.app,)).fetchone()
        assert row is not None
        return str(row[0])


@pytest.fixture
def roles(postgres_cluster: Any) -> Iterator[Roles]:
    suffix = secrets.token_hex(4)
    made = Roles(postgres_cluster, f"rot_admin_{suffix}", secrets.token_urlsafe(16), f"app_{suffix}")
    with postgres_cluster.connect(superuser=True) as conn:
        for statement, role, password in (
            ("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}", made.admin, made.admin_password),
            ("CREATE ROLE {} LOGIN PASSWORD {}", made.app, OLD_VALUE),
        ):
            conn.execute(sql.SQL(statement).format(sql.Identifier(role), sql.Literal(password)))
        # Every statement the administrator sends lands in the server's log: the password must not.
        conn.execute(sql.SQL("ALTER ROLE {} SET log_statement = 'all'").format(sql.Identifier(made.admin)))
    yield made
    with postgres_cluster.connect(superuser=True) as conn:
        for role in (made.app, made.admin):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
def cli(tmp_path: Path, roles: Roles) -> Cli:
    cli = Cli(tmp_path)
    cli.env.update(roles.env)
    assert cli("init", "--kdf-profile", "test").code == 0
    assert cli("store", "db/app", input=OLD_VALUE.encode()).code == 0
    return cli


def _rotate(cli: Cli, roles: Roles, *extra: str, name: str = "db/app", **kwargs: Any) -> Any:
    return cli(*_rotate_args(roles, name), *extra, **kwargs)


def _rotate_args(roles: Roles, name: str = "db/app") -> tuple[str, ...]:
    return ("rotate", name, "--postgres-role", roles.app, "--postgres", roles.conninfo)


def test_rotate_sets_the_roles_password_and_logs_in_with_it(cli: Cli, roles: Roles) -> None:
    assert roles.logs_in(OLD_VALUE)
    result = _rotate(cli, roles)
    assert result.code == 0, result.stderr
    assert "rotated db/app: version 2 is current (previous: 1)" in result.stderr
    new = cli.value()
    assert new != OLD_VALUE and len(new) == 32
    assert roles.logs_in(new) and not roles.logs_in(OLD_VALUE)
    # Only the SCRAM verifier reached the server: not in its log (log_statement = all), not stored.
    assert roles.stored_verifier().startswith("SCRAM-SHA-256$")
    log = roles.cluster.server_log(tail=None)
    assert f'ALTER ROLE "{roles.app}" PASSWORD' in log
    assert new not in log
    assert new not in result.stderr + result.stdout
    records = [json.loads(line) for line in cli.audit.read_text().splitlines()]
    steps = [
        (r["operation"], r["outcome"]) for r in records if r["operation"] in ("rotate.set", "rotate.test")
    ]
    assert steps == [("rotate.set", "pending"), ("rotate.set", "ok"), ("rotate.test", "ok")]
    assert new not in cli.audit.read_text()


def test_a_json_value_has_its_password_field_rotated_and_the_rest_kept(cli: Cli, roles: Roles) -> None:
    """AWS keeps database credentials as a JSON object; NAME#password rotates that field."""
    document = {"engine": "postgres", "host": "127.0.0.1", "username": roles.app, "password": OLD_VALUE}
    assert cli("store", "db/app", input=json.dumps(document).encode()).code == 0
    result = _rotate(cli, roles, name="db/app#password")
    assert result.code == 0, result.stderr
    rotated = json.loads(cli.value())
    assert {k: v for k, v in rotated.items() if k != "password"} == {
        k: v for k, v in document.items() if k != "password"
    }
    assert rotated["password"] != OLD_VALUE
    assert roles.logs_in(rotated["password"]) and not roles.logs_in(OLD_VALUE)


def test_a_json_value_of_another_role_is_refused_before_it_is_staged(cli: Cli, roles: Roles) -> None:
    """Its "username" (AWS's format) says whose password it is: another role's is not set."""
    document = {"username": "someone_else_1f3a", "password": OLD_VALUE}
    assert cli("store", "db/app", input=json.dumps(document).encode()).code == 0
    history = cli("history", "db/app", "--json").stdout
    refused = _rotate(cli, roles, name="db/app#password")
    assert refused.code == 2, refused.stderr
    assert f'the value\'s "username" field names another role than {roles.app!r}' in refused.stderr
    assert "someone_else_1f3a" not in refused.stderr  # part of the value: not quoted
    assert cli("history", "db/app", "--json").stdout == history
    assert roles.logs_in(OLD_VALUE)


def test_a_resume_naming_another_role_does_not_set_its_password(cli: Cli, roles: Roles) -> None:
    """The pending value's "username" names the role it was staged for: a --resume that names
    another role fails its set step and leaves that role's password alone."""
    document = {"username": roles.app, "password": OLD_VALUE}
    assert cli("store", "db/app", input=json.dumps(document).encode()).code == 0
    with _role_locked(roles):  # the set step fails: version 3 stays pending
        assert _rotate(cli, roles, "--timeout", "2", name="db/app#password").code == 1
    assert cli.labels() == {"previous": 1, "current": 2, "pending": 3}
    other, other_password = f"{roles.app}_other", "other-role-password"
    with roles.cluster.connect(superuser=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(other), sql.Literal(other_password)
            )
        )
    try:
        wrong = cli("rotate", "db/app", "--resume", "--postgres-role", other, "--postgres", roles.conninfo)
        assert wrong.code == 2, wrong.stderr  # the role the version records is not this one
        assert f"the password of PostgreSQL role {roles.app!r}, not of {other!r}" in wrong.stderr
        assert cli.labels() == {"previous": 1, "current": 2, "pending": 3}
        psycopg.connect(
            host="127.0.0.1", port=roles.cluster.port, dbname="postgres", user=other,
            password=other_password, connect_timeout=10,
        ).close()  # fmt: skip
        resumed = _rotate(cli, roles, "--resume")
        assert resumed.code == 0, resumed.stderr
        assert roles.logs_in(json.loads(cli.value())["password"])
    finally:
        with roles.cluster.connect(superuser=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(other)))


@contextlib.contextmanager
def _other_role(roles: Roles, password: str) -> Iterator[str]:
    """Another login role on the cluster, with `password`; dropped at the end."""
    other = f"{roles.app}_other"
    with roles.cluster.connect(superuser=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(other), sql.Literal(password))
        )
    try:
        yield other
    finally:
        with roles.cluster.connect(superuser=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(other)))


def test_a_resume_naming_another_role_is_refused_and_the_recorded_role_named_finishes_it(
    cli: Cli, roles: Roles
) -> None:
    """The pending version records the role it was staged for. A --resume naming another role
    used to set that role's password to the pending value (a plain value has no "username" to
    tell): it is refused (exit 2, one line saying whose the value is and what to run), with neither
    role nor the store changed. Naming the recorded role finishes it."""
    with _role_locked(roles):  # the set step fails: version 2 stays pending
        assert _rotate(cli, roles, "--timeout", "2").code == 1
    assert cli.labels() == {"current": 1, "pending": 2}
    history = cli("history", "db/app", "--json").stdout
    with _other_role(roles, "other-role-password") as other:
        wrong = cli("rotate", "db/app", "--resume", "--postgres-role", other, "--postgres", roles.conninfo)
        assert wrong.code == 2, wrong.stderr
        assert wrong.stderr.count("\n") == 1, wrong.stderr
        assert (
            f"the pending version 2 of db/app is the password of PostgreSQL role {roles.app!r}, not of "
            f"{other!r}: nothing was changed"
        ) in wrong.stderr
        resume = ("rotate", "db/app", "--resume", "--postgres-role", roles.app, "--postgres", roles.conninfo)
        run = shlex.join(["secrets-manager", *resume])
        assert f"to finish it, run {run} (or discard it: " in wrong.stderr
        assert roles.logs_in("other-role-password", role=other)  # its password is untouched
        assert cli("history", "db/app", "--json").stdout == history
        assert cli.value("--label", "pending") not in wrong.stderr
        assert not [r for r in cli.audit.read_text().splitlines() if '"rotate.set"' in r and other in r]
        resumed = cli(*resume)
        assert resumed.code == 0, resumed.stderr
        assert "resumed and rotated db/app: version 2 is current" in resumed.stderr
        assert roles.logs_in(cli.value()) and not roles.logs_in(OLD_VALUE)
        assert roles.logs_in("other-role-password", role=other)


def test_a_bare_resume_sets_no_password_and_names_the_role_the_version_records(
    cli: Cli, roles: Roles
) -> None:
    """A --resume naming no role set the password of the role the pending version records, which
    whoever staged it chose (anyone with the rotate capability may stage one, with any role, e.g.
    through the SDK's stage(target=...)): an operator's bare --resume could set another role's
    password to a value the stager knows. It is refused (exit 2, nothing changed) with the command
    that names the recorded role, for the operator to run if that is the role. Fails on the old
    code (it rotated)."""
    with _role_locked(roles):  # the set step fails: version 2 stays pending
        assert _rotate(cli, roles, "--timeout", "2").code == 1
    history = cli("history", "db/app", "--json").stdout
    bare = cli("rotate", "db/app", "--resume", "--postgres", roles.conninfo)
    assert bare.code == 2 and bare.stderr.count("\n") == 1, bare.stderr
    named = ("rotate", "db/app", "--resume", "--postgres-role", roles.app, "--postgres", roles.conninfo)
    assert (
        f"version 2 of db/app records PostgreSQL role {roles.app!r} (as whoever staged it chose): name "
        f"the role whose password to set; if it is that one, run {shlex.join(['secrets-manager', *named])}; "
        "nothing was changed"
    ) in bare.stderr, bare.stderr
    assert cli("history", "db/app", "--json").stdout == history
    assert roles.logs_in(OLD_VALUE) and cli.value("--label", "pending") not in bare.stderr
    assert not [r for r in cli.audit.read_text().splitlines() if '"rotate.set"' in r and '"ok"' in r]
    resumed = cli(*named)
    assert resumed.code == 0, resumed.stderr
    assert roles.logs_in(cli.value())


def test_a_pending_version_that_records_no_role_is_resumed_as_given_with_a_warning(
    cli: Cli, roles: Roles
) -> None:
    """A version staged by an older build (or by set and test commands) records no role: a
    resume naming one goes on as before, and says on one line that the role could not be
    checked. A bare --resume of it is refused: nothing says where to set it."""
    assert cli("rotate", "db/app", "--set-command", "false").code == 1  # staged with no role recorded
    assert cli.labels() == {"current": 1, "pending": 2}
    bare = cli("rotate", "db/app", "--resume", "--postgres", roles.conninfo)
    assert bare.code == 2 and "version 2 of db/app records no PostgreSQL role" in bare.stderr, bare.stderr
    assert cli.labels() == {"current": 1, "pending": 2} and roles.logs_in(OLD_VALUE)
    resumed = _rotate(cli, roles, "--resume")
    assert resumed.code == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if "warning:" in line]
    assert warnings == [
        f"secrets-manager: warning: version 2 of db/app records no PostgreSQL role (staged by an older "
        f"secrets-manager, or by set and test commands), so which role it is for cannot be checked: "
        f"resuming it as PostgreSQL role {roles.app!r}, as given"
    ], resumed.stderr
    assert roles.logs_in(cli.value())


def test_a_role_or_administrator_that_cannot_be_reached_refuses_the_rotation_before_the_stage(
    cli: Cli, roles: Roles
) -> None:
    history = cli("history", "db/app", "--json").stdout
    refused = _rotate(cli, roles, env={"PGPASSWORD": "not-the-admins-password"})
    assert refused.code == 1
    assert "cannot connect to PostgreSQL as its administrator (" in refused.stderr
    assert f'password authentication failed for user "{roles.admin}"' in refused.stderr
    assert "nothing was staged" in refused.stderr
    missing = cli("rotate", "db/app", "--postgres-role", "no_such_role", "--postgres", roles.conninfo)
    assert missing.code == 3
    assert (
        "PostgreSQL role 'no_such_role' does not exist on that server; nothing was staged" in missing.stderr
    )
    assert cli("history", "db/app", "--json").stdout == history


def test_production_refuses_an_administrator_connection_whose_certificate_is_not_checked(
    roles: Roles, tmp_path: Path
) -> None:
    """The built-in rotator's connection gets the store URL's guard rail: a server on another host
    is reached with sslmode=verify-full, or not at all (before anything is staged or connected to:
    the host does not even resolve)."""
    cli = Cli(tmp_path)  # a store production opens: the default Argon2id parameters
    cli.env.update(roles.env)
    assert cli("init", "--kdf-profile", "default").code == 0
    assert cli("store", "db/app", input=OLD_VALUE.encode()).code == 0
    password_file = tmp_path / "master"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    del cli.env["MASTER_PASSWORD"]  # production refuses it: the file instead
    cli.env.update({"MASTER_PASSWORD_FILE": str(password_file), "SHRIVENQUANT_ENV": "production"})
    history = cli("history", "db/app", "--json").stdout
    refused = cli(
        "rotate",
        "db/app",
        "--postgres-role",
        roles.app,
        "--postgres",
        "host=db.example.invalid dbname=trading sslmode=require",
    )
    assert refused.code == 2, refused.stderr
    assert (
        "the rotation's PostgreSQL connection reaches PostgreSQL at db.example.invalid with "
        "sslmode=require, which does not check the server's certificate" in refused.stderr
    )
    assert "(production refuses it)" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert cli("history", "db/app", "--json").stdout == history
    # On this host's loopback address (the test cluster's) there is no network to cross: it runs.
    done = cli(*_rotate_args(roles))
    assert done.code == 0, done.stderr


def test_pgpassword_of_another_role_is_named_when_the_administrator_is_refused(
    cli: Cli, roles: Roles, tmp_path: Path
) -> None:
    """A service or host on a PostgreSQL store has the store role's password in PGPASSWORD (the
    README's store example), and the administrator's in a passfile: libpq sends PGPASSWORD first,
    so the administrator was refused with nothing that said why. The error now names PGPASSWORD
    and the way out (both passwords in a passfile), which then rotates."""
    history = cli("history", "db/app", "--json").stdout
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{roles.cluster.port}:*:{roles.admin}:{roles.admin_password}\n")
    passfile.chmod(0o600)
    store_role = {"PGPASSWORD": roles.cluster.role_password, "PGPASSFILE": str(passfile)}
    refused = _rotate(cli, roles, env=store_role)
    assert refused.code == 1
    assert f'password authentication failed for user "{roles.admin}"' in refused.stderr
    assert "PGPASSWORD is set in this environment" in refused.stderr
    assert "put both passwords in a passfile (PGPASSFILE" in refused.stderr
    assert "nothing was staged" in refused.stderr
    assert roles.cluster.role_password not in refused.stderr
    assert cli("history", "db/app", "--json").stdout == history
    # What it says to do works: PGPASSWORD unset, the passfile gives the administrator's.
    cli.env.pop("PGPASSWORD", None)
    done = _rotate(cli, roles, env={"PGPASSFILE": str(passfile)})
    assert done.code == 0, done.stderr
    assert roles.logs_in(cli.value())


def test_a_failed_set_step_leaves_the_version_pending_and_its_resume_command_finishes_it(
    cli: Cli, roles: Roles
) -> None:
    with _role_locked(roles):  # ALTER ROLE waits past --timeout: the set step fails
        result = _rotate(cli, roles, "--timeout", "2")
    assert result.code == 1
    assert f"the set step (ALTER ROLE {roles.app} PASSWORD) failed (canceling statement" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert cli.labels() == {"current": 1, "pending": 2}
    assert roles.logs_in(OLD_VALUE)  # the role is untouched
    suggested = result.stderr.split("--resume: ", 1)[1].split(" (or discard it", 1)[0]
    words = shlex.split(suggested)
    assert words[:3] == ["secrets-manager", "rotate", "db/app"]
    assert "--resume" in words and words[words.index("--postgres-role") + 1] == roles.app
    assert words[words.index("--postgres") + 1] == roles.conninfo
    assert words[words.index("--timeout") + 1] == "2"
    resumed = cli(*words[1:])
    assert resumed.code == 0, resumed.stderr
    assert "resumed and rotated db/app: version 2 is current" in resumed.stderr
    assert roles.logs_in(cli.value())


def test_a_failed_test_step_says_the_password_was_set_and_promotes_nothing(cli: Cli, roles: Roles) -> None:
    with roles.cluster.connect(superuser=True) as conn:  # no session of it may start: the test fails
        conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 0").format(sql.Identifier(roles.app)))
    result = _rotate(cli, roles)
    assert result.code == 1
    assert f"the set step (ALTER ROLE {roles.app}) ran, then the test step" in result.stderr
    assert "too many connections for role" in result.stderr
    assert cli.labels() == {"current": 1, "pending": 2}
    pending = cli.value("--label", "pending")
    assert pending not in result.stderr
    with roles.cluster.connect(superuser=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT -1").format(sql.Identifier(roles.app)))
    assert roles.logs_in(pending)  # the set step did set it


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--postgres-role", "app", "--postgres", "host=127.0.0.1 password=hunter2"],
            "must not hold a password",
        ),
        (
            ["--postgres-role", "app", "--postgres", "postgresql://admin:hunter2@127.0.0.1/db"],
            "must not hold",
        ),
        (["--postgres", "host=127.0.0.1"], "--postgres goes with --postgres-role"),
        (["--postgres-role", "app", "--set-command", "true"], "drop --set-command and --test-command"),
        (["--postgres-role", "r" * 64], "longer than 63 bytes"),
        # A non-UTF-8 byte in argv: 'internal error (UnicodeEncodeError)', exit 1.
        (["--postgres-role", "app\udcff"], "the PostgreSQL role name is not UTF-8 text"),
        (
            ["--postgres-role", "app", "--postgres", "host='unterminated"],
            "not a connection string libpq can read",
        ),
        (["--postgres-role", "app", "--discard"], "--discard takes no other rotation option"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(
    cli: Cli, roles: Roles, arguments: list[str], message: str
) -> None:
    history = cli("history", "db/app", "--json").stdout
    result = cli("rotate", "db/app", *arguments)
    assert result.code == 2, result.stderr
    assert message in result.stderr
    assert "hunter2" not in result.stderr
    assert cli("history", "db/app", "--json").stdout == history


def test_a_value_postgres_cannot_take_or_another_field_is_refused_before_it_is_staged(
    cli: Cli, roles: Roles
) -> None:
    history = cli("history", "db/app", "--json").stdout
    refused = _rotate(cli, roles, "--stdin", "--raw", input=b"with\x00nul")
    assert refused.code == 2 and "without NUL characters" in refused.stderr
    refused = _rotate(cli, roles, "--stdin", input=b"\xff\xfe not text")
    assert refused.code == 2 and "must be UTF-8 text" in refused.stderr
    # JSON's "\ud800" is a lone surrogate, which no UTF-8 text holds: it was staged, then the set
    # step failed to encode it, an internal error (a UnicodeEncodeError, which carries the password)
    surrogate = json.dumps({"username": roles.app, "password": "\ud800hunter2"}, ensure_ascii=True)
    refused = _rotate(cli, roles, "--stdin", input=surrogate.encode())
    assert refused.code == 2 and "must be UTF-8 text" in refused.stderr, refused.stderr
    assert "hunter2" not in refused.stderr
    assert cli("history", "db/app", "--json").stdout == history
    document = json.dumps({"username": roles.app, "password": OLD_VALUE, "pw": "x"})
    assert cli("store", "db/app", input=document.encode()).code == 0
    history = cli("history", "db/app", "--json").stdout
    refused = _rotate(cli, roles, name="db/app#pw")
    assert refused.code == 2 and "'password' field of a JSON object value" in refused.stderr
    assert cli("history", "db/app", "--json").stdout == history
    assert roles.logs_in(OLD_VALUE)


def test_a_schedule_entry_rotates_the_role(cli: Cli, roles: Roles, tmp_path: Path) -> None:
    schedule = tmp_path / "rotation.toml"
    schedule.write_text(
        f'[[rotation]]\nname = "db/app"\nevery = "1s"\npostgres_role = "{roles.app}"\n'
        f'postgres = "{roles.conninfo}"\ntimeout = 20\n'
    )
    schedule.chmod(0o600)
    time.sleep(1.1)  # the value stored by the fixture is now older than `every`: due
    result = cli("schedule", "run", str(schedule))
    assert result.code == 0, result.stderr
    assert "rotated db/app: version 2 is current (previous: 1)" in result.stderr
    assert roles.logs_in(cli.value()) and not roles.logs_in(OLD_VALUE)


def test_a_schedule_entry_whose_role_changed_does_not_resume_the_other_roles_pending_value(
    cli: Cli, roles: Roles, tmp_path: Path
) -> None:
    """A schedule resumes a stale pending version (one a schedule staged) with its entry's
    postgres_role: an entry edited to name another role since the version was staged is refused,
    that role's password untouched, and the error says which role the value is for and what to
    change."""
    schedule = tmp_path / "rotation.toml"

    def entry(role: str) -> str:
        return (
            f'[[rotation]]\nname = "db/app"\nevery = "1s"\npostgres_role = "{role}"\n'
            f'postgres = "{roles.conninfo}"\ntimeout = 1\n'
        )

    schedule.write_text(entry(roles.app))
    schedule.chmod(0o600)
    time.sleep(1.1)  # the value stored by the fixture is now older than `every`: due
    with _role_locked(roles):
        assert cli("schedule", "run", str(schedule)).code == 1
    assert cli.labels() == {"current": 1, "pending": 2}
    with _other_role(roles, "other-role-password") as other:
        schedule.write_text(entry(other))
        time.sleep(3.2)  # three timeouts: the pending version is stale, so the schedule resumes it
        result = cli("schedule", "run", str(schedule))
        assert result.code == 1, result.stderr
        assert (
            f"the pending version 2 of db/app is the password of PostgreSQL role {roles.app!r}"
            in result.stderr
        )
        assert f"set postgres_role = {roles.app!r} in its [[rotation]] entry" in result.stderr
        assert roles.logs_in("other-role-password", role=other)
        assert cli.labels() == {"current": 1, "pending": 2} and roles.logs_in(OLD_VALUE)


def test_a_schedule_entry_with_both_commands_and_a_role_is_refused(cli: Cli, tmp_path: Path) -> None:
    schedule = tmp_path / "rotation.toml"
    schedule.write_text(
        '[[rotation]]\nname = "db/app"\nevery = "1d"\npostgres_role = "app"\nset_command = "true"\n'
    )
    schedule.chmod(0o600)
    result = cli("schedule", "check", str(schedule))
    assert result.code == 2
    assert "rotation 1: postgres_role sets and tests the password itself: drop set_command" in result.stderr


def test_the_service_runs_a_postgres_role_entry_on_request_and_audits_it(
    tmp_path: Path, roles: Roles
) -> None:
    """`rotate NAME --on-server`: the service's own schedule entry, run on its host with the
    administrator's password from the service's environment (libpq's PGPASSWORD)."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"auth/DB_PASSWORD": OLD_VALUE.encode()})
    schedule = tmp_path / "rotation.toml"
    schedule.write_text(
        f'[[rotation]]\nname = "auth/DB_PASSWORD"\nevery = "3650d"\npostgres_role = "{roles.app}"\n'
        f'postgres = "{roles.conninfo}"\ntimeout = 20\n'
    )
    server = start_server(
        tmp_path,
        "server",
        settings=f'rotation_schedule = "{schedule.name}"\n',
        environment=roles.env,
    )
    try:
        done = server.cli("ops", "rotate", "auth/DB_PASSWORD", "--on-server")
        assert done.returncode == 0, done.stderr
        new = server.cli("ops", "get", "auth/DB_PASSWORD").stdout.decode().rstrip("\n")
    finally:
        server.stop()
    assert new != OLD_VALUE
    assert roles.logs_in(new) and not roles.logs_in(OLD_VALUE)
    records = server.audit_records()
    steps = [(r["operation"], r["outcome"]) for r in records if r["operation"].startswith("rotate.")]
    assert ("rotate.set", "ok") in steps and ("rotate.test", "ok") in steps
    assert new not in (tmp_path / "store.audit.jsonl").read_text() + "".join(server.log_lines)


@contextlib.contextmanager
def _role_locked(roles: Roles) -> Iterator[None]:
    """Another transaction changes the role and does not commit: ALTER ROLE waits for it."""
    with roles.cluster.connect(superuser=True) as other:
        other.execute("BEGIN")
        other.execute(sql.SQL("ALTER ROLE {} VALID UNTIL 'infinity'").format(sql.Identifier(roles.app)))
        try:
            yield
        finally:
            other.execute("ROLLBACK")


@contextlib.contextmanager
def _rotation_running(cli: Cli, role: str, conninfo: str) -> Iterator[subprocess.Popen[bytes]]:
    """`rotate db/app --postgres-role ROLE --postgres CONNINFO` started and running; killed at the
    end of the block if it has not ended."""
    rotation = subprocess.Popen(
        [str(SCRIPT), "rotate", "db/app", "--postgres-role", role, "--postgres", conninfo],
        env=cli.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield rotation
    finally:
        if rotation.poll() is None:
            rotation.kill()
            rotation.wait()


def _waiting_alters(roles: Roles) -> int:
    with roles.cluster.connect(superuser=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'secrets-manager-rotate' "
            "AND wait_event_type = 'Lock' AND query LIKE 'ALTER ROLE%%'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_set_step_that_waits_for_a_lock_gives_up_at_the_timeout(cli: Cli, roles: Roles) -> None:
    with _role_locked(roles):
        started = time.monotonic()
        result = _rotate(cli, roles, "--timeout", "2")
        took = time.monotonic() - started
    assert result.code == 1, result.stderr
    assert "canceling statement due to statement timeout" in result.stderr
    assert took < 30
    assert cli.labels() == {"current": 1, "pending": 2}
    assert roles.logs_in(OLD_VALUE)


def test_sigterm_during_the_set_step_cancels_it_and_says_what_stays_pending(cli: Cli, roles: Roles) -> None:
    with _role_locked(roles), _rotation_running(cli, roles.app, roles.conninfo) as rotation:
        deadline = time.monotonic() + 30
        while _waiting_alters(roles) == 0:
            assert rotation.poll() is None and time.monotonic() < deadline, "ALTER ROLE never waited"
            time.sleep(0.05)
        rotation.send_signal(signal.SIGTERM)
        _, stderr = rotation.communicate(timeout=30)
        assert _waiting_alters(roles) == 0  # cancelled, not left waiting to change the role later
    assert rotation.returncode == 143, stderr
    message = stderr.decode()
    assert f"interrupted (SIGTERM) while its set step (ALTER ROLE {roles.app}) ran" in message
    assert "version 2 stays pending" in message and "--postgres-role" in message
    assert cli.labels() == {"current": 1, "pending": 2}
    assert roles.logs_in(OLD_VALUE)


class StallingProxy(TcpProxy):
    """A TCP proxy to the cluster that stops passing anything on, for good, once the client sends
    `marker` (its connections stay open): a server or network that stopped answering mid-step."""

    def __init__(self, port: int, marker: bytes) -> None:
        super().__init__("127.0.0.1", port)
        self._marker = marker
        self.stalled = threading.Event()

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        if from_client and self._marker in data:
            self.stalled.set()
        return Verdict.SWALLOW if self.stalled.is_set() else Verdict.PASS


def test_a_server_that_stops_answering_mid_step_is_given_up_at_the_timeout(cli: Cli, roles: Roles) -> None:
    """statement_timeout cannot end a step whose statement never reached the server: our own
    deadline shuts the connection down."""
    proxy = StallingProxy(roles.cluster.port, b"SCRAM-SHA-256$")  # the set step's ALTER ROLE only
    try:
        conninfo = f"host=127.0.0.1 port={proxy.port} dbname=postgres user={roles.admin}"
        started = time.monotonic()
        result = cli(
            "rotate", "db/app", "--postgres-role", roles.app, "--postgres", conninfo, "--timeout", "2"
        )
        took = time.monotonic() - started
    finally:
        proxy.close()
    assert proxy.stalled.is_set()
    assert result.code == 1, result.stderr
    assert (
        f"the set step (ALTER ROLE {roles.app} PASSWORD) failed (no answer from the server within 4 s)"
        in (result.stderr)
    )
    assert took < 20
    assert cli.labels() == {"current": 1, "pending": 2}


@pytest.mark.parametrize(
    "make_role_unusable",
    [
        ("ALTER ROLE {app} NOLOGIN", "cannot log in (NOLOGIN)"),
        ("ALTER ROLE {app} SUPERUSER", "may not change the password of PostgreSQL role"),
        (
            "GRANT CONNECT ON DATABASE postgres TO {admin}; REVOKE CONNECT ON DATABASE postgres FROM PUBLIC",
            "may not connect to database 'postgres'",
        ),
        ("ALTER ROLE {admin} SET default_transaction_read_only = on", "read-only transaction"),
    ],
    ids=["nologin", "superuser", "no-connect", "read-only"],
)
def test_what_would_fail_after_the_stage_is_found_before_it(
    cli: Cli, roles: Roles, make_role_unusable: tuple[str, str]
) -> None:
    """The role cannot log in, or may not connect where the test step logs in (the worst: its
    password would change and the test fail, locking the application out), or the administrator
    may not change it: refused with nothing staged, and the role's password untouched."""
    statement, message = make_role_unusable
    history = cli("history", "db/app", "--json").stdout
    with roles.cluster.connect(superuser=True) as conn:
        conn.execute(statement.format(app=f'"{roles.app}"', admin=f'"{roles.admin}"'))
    try:
        result = _rotate(cli, roles)
    finally:
        with roles.cluster.connect(superuser=True) as conn:
            conn.execute("GRANT CONNECT ON DATABASE postgres TO PUBLIC")
            conn.execute(
                sql.SQL("REVOKE CONNECT ON DATABASE postgres FROM {}").format(sql.Identifier(roles.admin))
            )
            conn.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER LOGIN").format(sql.Identifier(roles.app)))
            conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(sql.Identifier(roles.admin)))
    assert result.code == 1, result.stderr
    assert message in result.stderr and "nothing was staged" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert cli("history", "db/app", "--json").stdout == history
    assert roles.logs_in(OLD_VALUE)


def test_a_json_value_with_a_byte_order_mark_has_its_password_field_set(cli: Cli, roles: Roles) -> None:
    """The object was taken for a plain password (its whole text set as the role's password) when
    it began with a byte-order mark; an object too deep to read is refused."""
    document = {"username": roles.app, "password": OLD_VALUE, "port": "5432"}
    assert cli("store", "db/app", input=codecs.BOM_UTF8 + json.dumps(document).encode()).code == 0
    result = _rotate(cli, roles, name="db/app#password")
    assert result.code == 0, result.stderr
    stored = cli("get", "db/app", "--raw").stdout.encode()
    assert stored.startswith(codecs.BOM_UTF8)
    new = json.loads(stored)["password"]
    assert roles.logs_in(new) and not roles.logs_in(OLD_VALUE)
    history = cli("history", "db/app", "--json").stdout
    deep = b'{"password": "deep-one-1234", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    refused = _rotate(cli, roles, "--stdin", input=deep)
    assert refused.code == 2 and "a JSON object that cannot be read" in refused.stderr
    assert cli("history", "db/app", "--json").stdout == history


def test_a_connection_string_libpq_cannot_read_is_not_echoed(cli: Cli, roles: Roles) -> None:
    """libpq quotes what it could not parse: a URL after a tab went by as one word, password and all."""
    for conninfo in ("\tpostgresql://admin:Hunter2Secret@127.0.0.1/postgres", "host='Hunter2Secret"):
        result = cli("rotate", "db/app", "--postgres-role", roles.app, "--postgres", conninfo)
        assert result.code == 2, result.stderr
        assert "not a connection string libpq can read" in result.stderr
        assert "Hunter2" not in result.stderr
    # A word that merely contains "password" is no password.
    conninfo = f"{roles.conninfo} application_name=password_rotator"
    named = cli("rotate", "db/app", "--postgres-role", roles.app, "--postgres", conninfo)
    assert named.code == 0, named.stderr


def test_sigterm_while_the_server_is_asked_before_the_stage_says_nothing_was_staged(cli: Cli) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # a server that never answers
    conninfo = f"host=127.0.0.1 port={silent.getsockname()[1]} dbname=postgres user=admin"
    with silent, _rotation_running(cli, "app", conninfo) as rotation:
        silent.settimeout(30)
        connection, _ = silent.accept()  # the rotation is asking the server, before any stage
        with connection:  # held open, unanswered
            rotation.send_signal(signal.SIGTERM)
            _, stderr = rotation.communicate(timeout=30)
    assert rotation.returncode == 143, stderr
    assert "rotating db/app: interrupted (SIGTERM); nothing was staged" in stderr.decode()
    assert cli.labels() == {"current": 1}


def _served_with_pgpass(tmp_path: Path, roles: Roles, *, user: str) -> Server:
    """A serve of db/app (OLD_VALUE) for `ops`, and a ~/.pgpass (Server.cli's HOME) giving `user`
    (or "*": every role) the administrator's password, for the CLI's PostgreSQL steps."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": OLD_VALUE.encode()})
    pgpass = tmp_path / ".pgpass"
    pgpass.write_text(f"127.0.0.1:{roles.cluster.port}:*:{user}:{roles.admin_password}\n")
    pgpass.chmod(0o600)
    return start_server(tmp_path, "server")


def test_rotate_through_the_service_sets_the_role_from_this_machine(tmp_path: Path, roles: Roles) -> None:
    """With --server the store steps are the service's RPCs and the PostgreSQL steps run here, with
    this machine's libpq credentials (~/.pgpass); the service never sees the administrator's."""
    server = _served_with_pgpass(tmp_path, roles, user=roles.admin)
    try:
        done = server.cli(
            "ops", "rotate", "db/app", "--postgres-role", roles.app, "--postgres", roles.conninfo
        )
        assert done.returncode == 0, done.stderr
        assert b"rotated db/app: version 2 is current (previous: 1)" in done.stderr
        new = server.cli("ops", "get", "db/app").stdout.decode().rstrip("\n")
    finally:
        server.stop()
    assert roles.logs_in(new) and not roles.logs_in(OLD_VALUE)
    stages = [r for r in server.audit_records() if r["operation"] == "rotate.stage"]
    assert [r["outcome"] for r in stages] == ["pending", "ok"] and stages[-1]["version"] == 2
    assert new not in (tmp_path / "store.audit.jsonl").read_text() + "".join(server.log_lines)


def test_through_the_service_a_pending_version_records_its_role_and_a_resume_naming_another_is_refused(
    tmp_path: Path, roles: Roles
) -> None:
    """StageSecretVersion carries the role to the service's store and GetSecret of the pending
    version brings it back: a --resume naming another role is refused (exit 2) with nothing
    changed, and so is a bare --resume (it names the recorded role); naming it finishes it."""
    server = _served_with_pgpass(tmp_path, roles, user="*")
    try:
        with _role_locked(roles):
            failed = server.cli(
                "ops", "rotate", "db/app", "--postgres-role", roles.app, "--postgres", roles.conninfo,
                "--timeout", "2",
            )  # fmt: skip
        assert failed.returncode == 1, failed.stderr
        pending = server.stub("ops").GetSecret(
            pb.GetSecretRequest(name="db/app", label="pending"), timeout=10
        )
        assert pending.secret.version == 2 and pending.secret.target == f"postgres-role:{roles.app}"
        with _other_role(roles, "other-role-password") as other:
            wrong = server.cli(
                "ops", "rotate", "db/app", "--resume", "--postgres-role", other, "--postgres", roles.conninfo
            )
            assert wrong.returncode == 2, wrong.stderr
            assert f"the password of PostgreSQL role {roles.app!r}, not of {other!r}".encode() in wrong.stderr
            assert roles.logs_in("other-role-password", role=other)
            again = server.stub("ops").GetSecret(
                pb.GetSecretRequest(name="db/app", label="pending"), timeout=10
            )
            assert again.secret.version == 2
            bare = server.cli("ops", "rotate", "db/app", "--resume", "--postgres", roles.conninfo)
            assert bare.returncode == 2 and f"records PostgreSQL role {roles.app!r}".encode() in bare.stderr
            resumed = server.cli(
                "ops",
                "rotate",
                "db/app",
                "--resume",
                "--postgres-role",
                roles.app,
                "--postgres",
                roles.conninfo,
            )
            assert resumed.returncode == 0, resumed.stderr
            new = server.cli("ops", "get", "db/app").stdout.decode().rstrip("\n")
            assert roles.logs_in(new) and roles.logs_in("other-role-password", role=other)
    finally:
        server.stop()


def test_a_password_in_a_libpq_error_is_redacted_also_with_runs_of_spaces_or_line_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The error was put on one line (runs of whitespace made one space) before the password was
    replaced: one with two spaces or a line end in it was then not found, and stayed."""
    from secrets_manager.rotators import postgres

    password = "hunter2  with\nline"

    def refuse(*args: object, **kwargs: object) -> None:
        raise psycopg.OperationalError(f"connection failed: FATAL:  password {password!s} is wrong")

    monkeypatch.setattr(psycopg, "connect", refuse)
    with pytest.raises(postgres.PostgresStepError) as failed:
        postgres.PostgresRole("app").check_login(SecretValue(password.encode()), timeout=5)
    message = str(failed.value)
    assert "hunter2" not in message and "<password>" in message, message
    assert "\n" not in message
