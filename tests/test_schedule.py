"""Scheduled credential rotation: the schedule file, what is due when, `secrets-manager schedule
check|run` through the real console script, and the service running its schedule (real server
processes, one of them a pair of replicas on one store)."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from cryptography import x509

from secrets_manager.audit import AuditLog
from secrets_manager.audit.actor import local_actor
from secrets_manager.cli import run as run_cli
from secrets_manager.cli import schedule_commands
from secrets_manager.client import Client, RemoteStore
from secrets_manager.crypto import kdf
from secrets_manager.environment import Environment
from secrets_manager.errors import InvalidInputError, NotFoundError, UnsafeConfigurationError
from secrets_manager.rotation import Due, load_schedule, parse_every, plan
from secrets_manager.service.schedule import RotationScheduler, _Ledger
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import CURRENT, EncryptedStore, PasswordUnlock
from secrets_manager.tls.identity import serial_text, unpresentable_identity
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import PASSWORD as SERVICE_PASSWORD
from service_fixtures import (
    SEED,
    TD,
    Server,
    client_environ,
    make_odd_client,
    make_pki,
    make_store,
    start_server,
    tls_files,
)

if TYPE_CHECKING:
    from conftest import MadeOnce

SCRIPT = Path(sys.executable).with_name("secrets-manager")
DEV = Environment.DEVELOPMENT
PASSWORD = "schedule test password"
# Writes the new value (stdin) to ./target; the test command checks ./target holds it.
SET_TARGET = "sh -c 'cat > target'"
TEST_TARGET = "sh -c 'cmp -s - target'"
# The audit records of one rotation's steps (a change has a request record before it); the read
# first sees whether the current value is a JSON object a generated value must not replace whole.
STEP_RECORDS = [
    ("rotate.read", "ok"),
    ("rotate.stage", "pending"),
    ("rotate.stage", "ok"),
    ("rotate.set", "pending"),
    ("rotate.set", "ok"),
    ("rotate.test", "ok"),
    ("rotate.promote", "pending"),
    ("rotate.promote", "ok"),
]


def write_schedule(path: Path, *entries: dict[str, object]) -> Path:
    lines = []
    for entry in entries:
        lines.append("[[rotation]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the schedule file ----------------------------------------------------------------------------


def scheduler_for(
    cli: Cli, schedule: Path, store: EncryptedStore, *, environment: Environment = DEV, **options: Any
) -> RotationScheduler:
    """The service's scheduler on `store` and the store's audit log (in `cli.dir`), checking once
    a minute (tests call `run_due` themselves), its commands run with a minimal environment."""
    return RotationScheduler(
        schedule,
        store,
        AuditLog(cli.dir / "store.audit.jsonl"),
        check_seconds=60,
        environ={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cli.dir)},
        environment=environment,
        **options,
    )


def test_a_schedule_file_is_read_with_its_settings_and_defaults(tmp_path: Path) -> None:
    path = write_schedule(
        tmp_path / "rotation.toml",
        {
            "name": "db/app",
            "every": "30d",
            "set_command": "python3 'set password.py' --role app",
            "test_command": "./check",
            "length": 48,
            "alphabet": "hex",
            "timeout": 5,
        },
        {"name": "exchange/KEY", "every": "90s"},
    )
    first, second = load_schedule(path, environment=DEV)
    assert (first.name, first.every, first.length, first.alphabet, first.timeout) == (
        "db/app",
        timedelta(days=30),
        48,
        "hex",
        5.0,
    )
    assert first.set_argv == ("python3", "set password.py", "--role", "app")
    assert first.test_argv == ("./check",)
    assert first.directory == tmp_path.resolve()
    assert first.stale_after == timedelta(seconds=15)
    assert (second.every, second.set_argv, second.test_argv) == (timedelta(seconds=90), None, None)
    assert (second.length, second.alphabet, second.timeout) == (32, "alnum", 60.0)
    assert [parse_every(text) for text in ("1s", "15m", "12h", "3650d")] == [
        timedelta(seconds=1),
        timedelta(minutes=15),
        timedelta(hours=12),
        timedelta(days=3650),
    ]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            '[[rotation]]\nname = "db/app"\nevery = "1d"\ncolour = "red"\n',
            "rotation 1: unknown setting 'colour'",
        ),
        ('[[rotation]]\nevery = "1d"\n', "rotation 1: name (a secret's name) is required"),
        ('[[rotation]]\nname = "../etc"\nevery = "1d"\n', "rotation 1:"),
        ('[[rotation]]\nname = "db/app"\n', "rotation 1: every is required"),
        ('[[rotation]]\nname = "db/app"\nevery = "30"\n', "every must be a number and a unit"),
        ('[[rotation]]\nname = "db/app"\nevery = "0s"\n', "every must be between 1s and 3650d"),
        ('[[rotation]]\nname = "db/app"\nevery = "3651d"\n', "every must be between 1s and 3650d"),
        # Past what timedelta (or int()) can hold: an OverflowError ("internal error") before.
        (
            '[[rotation]]\nname = "db/app"\nevery = "99999999999999999999d"\n',
            "between 1s and 3650d (10 years)",
        ),
        (f'[[rotation]]\nname = "db/app"\nevery = "{"9" * 5000}s"\n', "between 1s and 3650d (10 years)"),
        # An Arabic-Indic one: \d matched it and it read as "1d".
        ('[[rotation]]\nname = "db/app"\nevery = "\u0661d"\n', "every must be a number and a unit"),
        ('[[rotation]]\nname = "db/app"\nevery = 30\n', "every must be a number and a unit"),
        ('[[rotation]]\nname = "db/app"\nevery = "1d"\nalphabet = "emoji"\n', "alphabet must be one of"),
        # A list or a table: 'internal error (TypeError)', unhashable, at check, run and serve.
        ('[[rotation]]\nname = "db/app"\nevery = "1d"\nalphabet = ["hex"]\n', "alphabet must be one of"),
        ('[[rotation]]\nname = "db/app"\nevery = "1d"\nalphabet = {}\n', "alphabet must be one of"),
        ('[[rotation]]\nname = "db/app"\nevery = "1d"\nlength = 7\n', "length must be 8..4096"),
        ('[[rotation]]\nname = "db/app"\nevery = "1d"\ntimeout = 0\n', "timeout must be more than 0"),
        ('[[rotation]]\nname = "db/app"\nevery = "1d"\nset_command = ""\n', "set_command is empty"),
        (
            '[[rotation]]\nname = "db/app"\nevery = "1d"\ntest_command = "sh -c \'x"\n',
            "test_command: cannot split the command",
        ),
        (
            '[[rotation]]\nname = "db/app"\nevery = "1d"\n[[rotation]]\nname = "db/app"\nevery = "2d"\n',
            "'db/app' is listed twice",
        ),
        # A "\u0000" in a command: accepted by 'schedule check', it failed 'schedule run' as an
        # internal error (ValueError: embedded null byte) after a new version had been staged.
        (
            '[[rotation]]\nname = "db/app"\nevery = "1d"\nset_command = "true\\u0000x"\n',
            "set_command contains a NUL character",
        ),
        (
            '[[rotation]]\nname = "db/app"\nevery = "1d"\ntest_command = "\\u0000"\n',
            "test_command contains a NUL character",
        ),
        (
            '[[rotation]]\nname = "db/app"\nevery = "30d"\nexpires_after = "30d"\n',
            "expires_after (30d) must be longer than every (30d): each value would expire before",
        ),
        ('[[rotation]]\nname = "db/app"\nevery = "30d"\nexpires_after = "soon"\n', "expires_after must be a"),
        ('[[rotation]]\nname = "db/app"\nevery = "30d"\nexpires_after = 45\n', "expires_after must be a"),
        ('[rotations]\nname = "db/app"\n', "unknown table 'rotations'"),
        ('rotation = "db/app"\n', "entries are [[rotation]] tables"),
        ("[[rotation]\n", "rotation.toml:"),
    ],
)
def test_a_bad_schedule_file_is_refused_with_what_is_wrong_where(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "rotation.toml"
    path.write_text(content)
    with pytest.raises(InvalidInputError) as caught:
        load_schedule(path, environment=DEV)
    message = str(caught.value)
    assert message.startswith(f"rotation schedule {path}") and problem in message
    assert "\n" not in message


def test_production_refuses_a_schedule_whose_postgres_connection_is_unchecked_when_it_loads(
    tmp_path: Path,
) -> None:
    """A postgres_role entry whose administrator connection would reach another host without
    sslmode=verify-full: the rotation refuses it when it runs (19a4a54); the schedule refuses it
    as it loads, so a production serve or 'schedule check' says so at once, not 30 days later."""
    path = tmp_path / "rotation.toml"
    entry = '[[rotation]]\nname = "db/app"\nevery = "30d"\npostgres_role = "app"\npostgres = "{}"\n'
    path.write_text(entry.format("host=db.internal dbname=trading sslmode=require"))
    path.chmod(0o600)
    with pytest.raises(UnsafeConfigurationError) as caught:
        load_schedule(path, environment=Environment.PRODUCTION)
    assert str(caught.value) == (
        f"rotation schedule {path}, 'db/app': its postgres connection reaches PostgreSQL at db.internal "
        "with sslmode=require, which does not check the server's certificate, so anyone on the network "
        "path could pose as the database; add sslmode=verify-full and sslrootcert=CA.pem (or set "
        "PGSSLMODE=verify-full) (production refuses it)"
    )
    assert load_schedule(path, environment=DEV)[0].name == "db/app"  # development: no word
    path.write_text(entry.format("host=db.internal dbname=trading sslmode=verify-full"))
    assert load_schedule(path, environment=Environment.PRODUCTION)[0].name == "db/app"
    path.write_text(entry.format("host=/var/run/postgresql dbname=trading"))  # a Unix socket
    assert load_schedule(path, environment=Environment.PRODUCTION)[0].name == "db/app"


def test_a_missing_schedule_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_schedule(tmp_path / "nowhere.toml", environment=DEV)


def test_a_missing_relative_file_names_the_directory_it_was_looked_for_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`schedule check rotation.toml` or `policy check policy.toml` run from another directory than
    the file's said only "rotation schedule rotation.toml does not exist", as serve's config did
    before it named the current directory: all three name it now (an absolute path: as given)."""
    monkeypatch.chdir(tmp_path)
    for args, what in (
        (["schedule", "check", "rotation.toml"], "rotation schedule rotation.toml"),
        (["policy", "check", "policy.toml"], "policy file policy.toml"),
        (["policy", "check", str(tmp_path / "policy.toml")], f"policy file {tmp_path / 'policy.toml'}"),
    ):
        result = subprocess.run(
            [str(Path(sys.executable).with_name("secrets-manager")), *args],
            capture_output=True,
            text=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
            timeout=60,
        )
        looked = "" if args[-1].startswith("/") else f" in {tmp_path} (the current directory)"
        assert (result.returncode, result.stderr) == (
            3,
            f"secrets-manager: error: {what} does not exist{looked}\n",
        ), result.stderr
    # Run in a directory removed under it (getcwd fails): still one line, exit 3, not a traceback
    script = str(Path(sys.executable).with_name("secrets-manager"))
    gone = subprocess.run(
        ["sh", "-c", f'mkdir gone && cd gone && rmdir ../gone && exec "{script}" policy check policy.toml'],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        timeout=60,
    )
    assert (gone.returncode, gone.stderr) == (
        3,
        "secrets-manager: error: policy file policy.toml does not exist (the current directory no longer "
        "exists)\n",
    ), gone.stderr


def test_what_is_due_follows_the_current_version_and_the_pending_label(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    (rule,) = load_schedule(
        write_schedule(tmp_path / "r.toml", {"name": "db/app", "every": "1h", "timeout": 10}),
        environment=DEV,
    )
    encrypted_store.put("db/app", b"one")
    meta = encrypted_store.describe("db/app")
    created = meta.versions[-1].created
    before = plan(rule, meta, created + timedelta(minutes=59))
    assert (before.state, before.last_rotated, before.next_due) == (
        Due.NOT_DUE,
        created,
        created + timedelta(hours=1),
    )
    assert plan(rule, meta, created + timedelta(hours=1)).state is Due.DUE

    staged = encrypted_store.stage("db/app", b"two")
    meta = encrypted_store.describe("db/app")
    young = plan(rule, meta, staged.created + timedelta(seconds=29))
    assert (young.state, young.pending) == (Due.IN_PROGRESS, 2)
    stale = plan(rule, meta, staged.created + timedelta(seconds=30))  # three timeouts of 10 s
    assert (stale.state, stale.pending) == (Due.RESUME, 2)

    encrypted_store.promote("db/app", 2)
    meta = encrypted_store.describe("db/app")
    assert (
        plan(rule, meta, staged.created + timedelta(minutes=59)).state is Due.NOT_DUE
    )  # the clock restarted
    encrypted_store.delete("db/app")
    assert (
        plan(rule, encrypted_store.describe("db/app"), staged.created + timedelta(days=9)).state
        is Due.DELETED
    )


# ---- `secrets-manager schedule` ------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@dataclass
class Cli:
    dir: Path

    @property
    def environ(self) -> dict[str, str]:
        """The environment the console script runs with: this directory's store and password."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "MASTER_PASSWORD": PASSWORD,
            "SECRETS_MANAGER_STORE": str(self.dir / "store.db"),
        }

    def __call__(self, *args: str, input: bytes = b"", env: Mapping[str, str] | None = None) -> Result:
        env = {**self.environ, **(env or {})}
        proc = subprocess.run(
            [str(SCRIPT), *args], input=input, capture_output=True, env=env, cwd=self.dir, timeout=120
        )
        stderr = proc.stderr.decode()
        assert "Traceback" not in stderr, stderr
        return Result(proc.returncode, proc.stdout.decode(), stderr)

    def value(self, name: str, *args: str) -> str:
        result = self("get", name, *args)
        assert result.code == 0, result.stderr
        return result.stdout.rstrip("\n")

    def history(self, name: str) -> dict[str, object]:
        result = self("history", name, "--json")
        assert result.code == 0, result.stderr
        doc: dict[str, object] = json.loads(result.stdout)
        return doc


@pytest.fixture
def cli(tmp_path: Path, made_once: MadeOnce) -> Cli:
    """A store holding db/app and db/other, made by the CLI (once per worker, then copied). Their
    versions are then older than the test, by up to the worker's run so far: every test here makes
    them due with `every = "1s"` (after sleeping 1.1 s, for the first copy), checks an entry of
    30 days as not due, or stages and ages what it checks itself (a pending version's staleness)."""

    def make(home: Path) -> None:
        cli = Cli(home)
        assert cli("init", "--kdf-profile", "test").code == 0
        for name in ("db/app", "db/other"):
            assert cli("store", name, input=f"{name} FIRST-VALUE".encode()).code == 0

    made_once("test_schedule cli", make, tmp_path)
    return Cli(tmp_path)


def test_a_schedule_entry_can_rotate_one_field_of_a_json_object(cli: Cli) -> None:
    credentials = {"host": "db.internal", "password": "FIRST-PASSWORD", "username": "app"}
    assert cli("store", "db/json", input=json.dumps(credentials).encode()).code == 0
    whole = write_schedule(cli.dir / "whole.toml", {"name": "db/json", "every": "1s"})
    field = write_schedule(cli.dir / "field.toml", {"name": "db/json", "every": "1s", "field": "password"})
    time.sleep(1.1)
    refused = cli("schedule", "run", str(whole))
    message = refused.stderr
    assert refused.code == 1 and "db/json holds a JSON object (fields host, password, username)" in message
    # The fix is a setting of the entry, not an option of 'rotate': the message says that.
    assert 'in its [[rotation]] entry of the schedule file (field = "<name>")' in message, message
    assert "#FIELD" not in message and "--stdin" not in message and "FIRST-PASSWORD" not in message
    result = cli("schedule", "run", str(field), "--json")
    assert result.code == 0, result.stderr
    rotated = json.loads(cli.value("db/json"))
    assert rotated["username"] == "app" and rotated["host"] == "db.internal"
    assert rotated["password"] != "FIRST-PASSWORD" and len(rotated["password"]) == 32


def test_schedule_check_json_prints_times_as_every_command_does(cli: Cli) -> None:
    """`last_rotated` and `next_due` were `2026-11-30T18:55:12.345678+00:00`, where every other
    command prints UTC to the second with `Z` (as `metadata --json` prints the same creation)."""
    schedule = write_schedule(cli.dir / "rotation.toml", {"name": "db/app", "every": "30d"})
    checked = cli("schedule", "check", str(schedule), "--json")
    assert checked.code == 0, checked.stderr
    (entry,) = json.loads(checked.stdout)
    z_form = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
    assert z_form.fullmatch(entry["last_rotated"]) and z_form.fullmatch(entry["next_due"]), entry
    created = json.loads(cli("metadata", "db/app", "--json").stdout)["versions"][-1]["created"]
    assert entry["last_rotated"] == created
    last, due = (
        datetime.fromisoformat(entry[k].replace("Z", "+00:00")) for k in ("last_rotated", "next_due")
    )
    assert due - last == timedelta(days=30)


def test_schedule_run_rotates_what_is_due_and_leaves_the_rest(cli: Cli) -> None:
    schedule = write_schedule(
        cli.dir / "rotation.toml",
        {"name": "db/app", "every": "1s", "set_command": SET_TARGET, "test_command": TEST_TARGET},
        {"name": "db/other", "every": "30d", "set_command": "sh -c 'touch other-was-set'"},
    )
    time.sleep(1.1)
    checked = cli("schedule", "check", str(schedule), "--json")
    assert checked.code == 0, checked.stderr
    assert [(e["name"], e["state"]) for e in json.loads(checked.stdout)] == [
        ("db/app", "due"),
        ("db/other", "not due"),
    ]

    result = cli("schedule", "run", str(schedule), "--json")
    assert result.code == 0, result.stderr
    assert "rotated db/app: version 2 is current (previous: 1)" in result.stderr
    assert [(r["name"], r["outcome"]) for r in json.loads(result.stdout)] == [
        ("db/app", "rotated"),
        ("db/other", "skipped"),
    ]
    new_value = cli.value("db/app")
    assert new_value != "db/app FIRST-VALUE" and len(new_value) == 32
    assert (cli.dir / "target").read_text() == new_value
    assert cli.value("db/other") == "db/other FIRST-VALUE" and not (cli.dir / "other-was-set").exists()
    audit = (cli.dir / "store.audit.jsonl").read_text()
    assert new_value not in audit
    steps = [
        (r["operation"], r["outcome"]) for r in map(json.loads, audit.splitlines()) if r["name"] == "db/app"
    ]
    assert [s for s in steps if s[1] == "ok" and s[0].startswith("rotate.")] == [
        ("rotate.read", "ok"),
        ("rotate.stage", "ok"),
        ("rotate.set", "ok"),
        ("rotate.test", "ok"),
        ("rotate.promote", "ok"),
    ]
    assert cli("audit", "verify").code == 0


def test_a_failed_rotation_is_retried_by_a_later_run_once_it_is_stale(cli: Cli) -> None:
    """The set command fails: exit 1, the version stays pending, the other entry still rotates.
    A run right after skips it (in progress, perhaps elsewhere); one after three command timeouts
    resumes it with the same value. (The timeout is 2 s, the pending version stale at 6 s: with
    1 s, the 3 s between the stage and the run "right after" were once spent by a loaded machine's
    CLI start-ups, and that run resumed it.)"""
    set_unless_broken = "sh -c 'test ! -e broken && cat > target'"
    schedule = write_schedule(
        cli.dir / "rotation.toml",
        {"name": "db/app", "every": "1s", "set_command": set_unless_broken, "timeout": 2},
        {"name": "db/other", "every": "1s"},
    )
    (cli.dir / "broken").touch()
    time.sleep(1.1)
    failed = cli("schedule", "run", str(schedule))
    staged_by = time.monotonic()  # the pending version is at least this old, and at most this run
    (cli.dir / "broken").unlink()
    young = cli("schedule", "run", str(schedule), "--json")
    assert failed.code == 1
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "the set command failed (exit code 1)" in errors[0]
    # A bare 'rotate db/app --resume' would promote a value nothing set; the schedule sets it again.
    assert "the schedule resumes it with its entry's set and test commands once it is 6 s old" in errors[0]
    assert "--resume" not in errors[0] and "broken" not in errors[0]  # no command line from the file
    assert "rotated db/other: version 2" in failed.stderr
    assert young.code == 0, young.stderr
    assert "db/app: a rotation is in progress (version 2); skipped" in young.stderr
    assert cli.history("db/app")["labels"] == {"current": 1, "pending": 2}
    staged_value = cli.value("db/app", "--label", "pending")

    time.sleep(max(0.0, staged_by + 6.1 - time.monotonic()))  # three timeouts of 2 s since the stage
    resumed = cli("schedule", "run", str(schedule), "--json")
    assert resumed.code == 0, resumed.stderr
    assert "resumed and rotated db/app: version 2 is current (previous: 1)" in resumed.stderr
    assert cli.value("db/app") == staged_value == (cli.dir / "target").read_text()


def test_an_entry_with_expires_after_gives_each_value_it_rotates_that_expiry(cli: Cli) -> None:
    schedule = write_schedule(
        cli.dir / "rotation.toml", {"name": "db/app", "every": "1s", "expires_after": "45d"}
    )
    time.sleep(1.1)
    checked = cli("schedule", "check", str(schedule), "--json")
    assert json.loads(checked.stdout)[0]["expires_after_seconds"] == 45 * 86400
    before = datetime.now(UTC)
    result = cli("schedule", "run", str(schedule), "--json")
    after = datetime.now(UTC)
    assert result.code == 0, result.stderr
    outcome = json.loads(result.stdout)[0]
    assert outcome["outcome"] == "rotated" and outcome["version"] == 2
    expires = datetime.fromisoformat(outcome["expires"].replace("Z", "+00:00"))
    assert before + timedelta(days=45) - timedelta(seconds=1) <= expires <= after + timedelta(days=45)
    shown = cli("metadata", "db/app", "--json")
    assert shown.code == 0, shown.stderr
    assert datetime.fromisoformat(json.loads(shown.stdout)["expires"].replace("Z", "+00:00")) == expires
    assert ", expires " in result.stderr  # the report line says it
    records = [json.loads(line) for line in (cli.dir / "store.audit.jsonl").read_text().splitlines()]
    assert [
        (r["operation"], r["outcome"], r["version"]) for r in records if r["operation"] == "rotate.expiry"
    ] == [
        ("rotate.expiry", "pending", None),
        ("rotate.expiry", "ok", 2),
    ]


def test_the_service_schedule_records_expires_after_for_each_value_it_rotates(tmp_path: Path) -> None:
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": b"first-app-value-SEEKRIT"})
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {"name": "db/app", "every": "1s", "expires_after": "2h", "set_command": "true"},
    )
    before = datetime.now(UTC)
    server = _serve_with_schedule(tmp_path, "server", schedule)

    def expiry_of_current() -> datetime | None:
        store = _open_service_store(tmp_path)
        try:
            meta = store.describe("db/app")
            return meta.expires if meta.labels.get(CURRENT, 1) > 1 else None
        finally:
            store.close()

    try:
        _wait_for(lambda: expiry_of_current() is not None)
    finally:
        server.stop()
    expires = expiry_of_current()
    assert expires is not None and before + timedelta(hours=2) <= expires <= datetime.now(UTC) + timedelta(
        hours=2
    )
    steps = [
        (r["operation"], r["outcome"]) for r in server.audit_records() if r["actor"] == "rotation-schedule"
    ]
    assert ("rotate.expiry", "ok") in steps


def test_schedule_names_a_missing_secret_and_refuses_a_bad_file(cli: Cli) -> None:
    schedule = write_schedule(
        cli.dir / "rotation.toml", {"name": "db/missing", "every": "1d"}, {"name": "db/app", "every": "1s"}
    )
    time.sleep(1.1)
    checked = cli("schedule", "check", str(schedule))
    assert checked.code == 3
    assert checked.stdout.splitlines()[0].split("\t") == ["db/missing", "1d", "", "", "missing"]
    assert checked.stderr.strip().endswith(
        "secret 'db/missing' not found; store a first value before it can be rotated"
    )
    ran = cli("schedule", "run", str(schedule))
    assert ran.code == 3 and "rotated db/app: version 2" in ran.stderr  # the rest still ran

    (cli.dir / "bad.toml").write_text('[[rotation]]\nname = "db/app"\nevery = "soon"\n')
    before = cli.history("db/app")
    for command in ("check", "run"):
        bad = cli("schedule", command, str(cli.dir / "bad.toml"))
        assert (
            bad.code == 2
            and bad.stderr.count("\n") == 1
            and "every must be a number and a unit" in bad.stderr
        )
    assert cli.history("db/app") == before
    (cli.dir / "huge.toml").write_text('[[rotation]]\nname = "db/app"\nevery = "99999999999999999999d"\n')
    for command in ("check", "run"):
        huge = cli("schedule", command, str(cli.dir / "huge.toml"))
        assert huge.code == 2 and huge.stderr.count("\n") == 1, huge.stderr
        assert "every must be between 1s and 3650d (10 years)" in huge.stderr
    assert cli.history("db/app") == before
    # A NUL in a command: 'run' staged a version, then failed as an internal error.
    (cli.dir / "nul.toml").write_text(
        '[[rotation]]\nname = "db/app"\nevery = "1s"\nset_command = "true\\u0000x"\n'
    )
    for command in ("check", "run"):
        nul = cli("schedule", command, str(cli.dir / "nul.toml"))
        assert nul.code == 2 and nul.stderr.count("\n") == 1, nul.stderr
        assert "set_command contains a NUL character" in nul.stderr
    assert cli.history("db/app") == before


# ---- the service runs its schedule ----------------------------------------------------------------


def _serve_with_schedule(
    directory: Path, name: str, schedule: Path, check_seconds: float = 0.2, *, metrics: bool = False
) -> Server:
    return start_server(
        directory,
        name,
        metrics=metrics,
        settings=f'rotation_schedule = "{schedule.name}"\nrotation_check_seconds = {check_seconds}\n',
    )


def _open_service_store(directory: Path) -> EncryptedStore:
    """The store file a test service serves, opened beside it (SQLite lets both)."""
    return EncryptedStore.open(
        SqliteStorage(directory / "store.db"), PasswordUnlock(SERVICE_PASSWORD, kdf.TEST)
    )


def _store_values(directory: Path, name: str) -> tuple[str, dict[int, bytes], list[str]]:
    """(current value, every version's value, each version's author) read from the store file."""
    store = _open_service_store(directory)
    try:
        meta = store.describe(name)
        values = {v.version: store.get(name, version=v.version).value.reveal() for v in meta.versions}
        current = values[meta.labels[CURRENT]].decode()
        return current, values, [v.created_by for v in meta.versions]
    finally:
        store.close()


def _wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_rotation_counts_start_at_zero_when_a_schedule_is_in_force(tmp_path: Path) -> None:
    """Without a series until the first rotation, an absent() alert fired for weeks."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": b"first-app-value-SEEKRIT"})
    schedule = write_schedule(
        tmp_path / "rotation.toml", {"name": "db/app", "every": "30d", "set_command": "true"}
    )
    server = _serve_with_schedule(tmp_path, "server", schedule, metrics=True)
    try:
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
    finally:
        server.stop()
    for outcome in ("rotated", "resumed", "failed"):
        assert f'secrets_manager_scheduled_rotations_total{{outcome="{outcome}"}} 0.0'.encode() in metrics


def test_the_service_rotates_on_its_schedule_and_audits_every_step(tmp_path: Path) -> None:
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": b"first-app-value-SEEKRIT"})
    setter = "sh -c 'env > set-env.txt; cat > target'"
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {"name": "db/app", "every": "1s", "set_command": setter, "test_command": TEST_TARGET},
    )
    server = _serve_with_schedule(tmp_path, "server", schedule, metrics=True)

    def rotations_counted() -> float:
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
        rotated = re.search(rb'secrets_manager_scheduled_rotations_total\{outcome="rotated"\} (\d+)', metrics)
        return 0.0 if rotated is None else float(rotated[1])

    try:
        # A version staged is not yet a rotation counted: wait for the count itself.
        _wait_for(lambda: (tmp_path / "target").exists() and rotations_counted() >= 2)
    finally:
        server.stop()
    assert server.process.returncode == 0
    current, values, authors = _store_values(tmp_path, "db/app")
    assert (tmp_path / "target").read_text() == current
    assert authors[1:] == ["rotation-schedule"] * (len(authors) - 1)
    set_env = (tmp_path / "set-env.txt").read_text()
    assert "SECRETS_MANAGER_ROTATE_NAME=db/app" in set_env and "MASTER_PASSWORD" not in set_env

    records = server.audit_records()
    steps = [(r["operation"], r["outcome"]) for r in records if r["actor"] == "rotation-schedule"]
    assert steps[: len(STEP_RECORDS)] == STEP_RECORDS
    assert {r["source"] for r in records if r["actor"] == "rotation-schedule"} == {"schedule"}
    logged = (tmp_path / "store.audit.jsonl").read_text() + "".join(server.log_lines)
    assert not [v for v in values.values() if v.decode() in logged]
    assert any('"scheduled rotation finished"' in line for line in server.log_lines)
    verify = subprocess.run(
        [str(SCRIPT), "--store", str(tmp_path / "store.db"), "audit", "verify"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MASTER_PASSWORD": SERVICE_PASSWORD},
        capture_output=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr


def test_two_replicas_running_one_schedule_set_each_version_once(tmp_path: Path) -> None:
    """Both replicas find the secret due at about the same moment, every second. The store lets
    one of them stage; the other skips, so no version is set at the target that is not then made
    current, and the target ends on the current value."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": b"first-app-value-SEEKRIT"})
    setter = f"sh -c {shlex.quote('echo $SECRETS_MANAGER_ROTATE_VERSION >> set.log; cat > target')}"
    schedule = write_schedule(
        tmp_path / "rotation.toml", {"name": "db/app", "every": "1s", "set_command": setter}
    )
    replicas = [_serve_with_schedule(tmp_path, name, schedule, check_seconds=0.1) for name in ("a", "b")]
    try:
        _wait_for(lambda: len(_store_values(tmp_path, "db/app")[1]) >= 8, seconds=30)
    finally:
        for replica in replicas:
            replica.stop()
    assert [replica.process.returncode for replica in replicas] == [0, 0]
    current, values, _ = _store_values(tmp_path, "db/app")
    set_versions = [int(line) for line in (tmp_path / "set.log").read_text().split()]
    promoted = [
        r["version"]
        for r in replicas[0].audit_records()  # the replicas share the store's audit log
        if r["operation"] == "rotate.promote" and r["outcome"] == "ok"
    ]
    # Every version set at the target was made current, once, and every new one was set, in order.
    # (The replicas' audit records of their promotes may land out of version order: each appends
    # its own after its commit.)
    assert set_versions == sorted(promoted) == sorted(values)[1:]
    assert (tmp_path / "target").read_text() == current


def test_a_schedule_file_that_stops_parsing_is_rejected_and_the_old_one_stays(tmp_path: Path) -> None:
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": b"first-app-value-SEEKRIT"})
    schedule = write_schedule(tmp_path / "rotation.toml", {"name": "db/app", "every": "1s"})
    server = _serve_with_schedule(tmp_path, "server", schedule)
    try:
        _wait_for(lambda: len(_store_values(tmp_path, "db/app")[1]) >= 2)
        schedule.write_text('[[rotation]]\nname = "db/app"\nevery = "whenever"\n')
        _wait_for(lambda: any("rotation schedule rejected" in line for line in server.log_lines))
        rotated_before = len(_store_values(tmp_path, "db/app")[1])
        _wait_for(lambda: len(_store_values(tmp_path, "db/app")[1]) > rotated_before)  # the old one runs
        time.sleep(0.5)  # passes on the same broken file do not log it again
        write_schedule(schedule, {"name": "db/app", "every": "3650d"})
        time.sleep(0.5)  # taken: a later breakage is news again
        schedule.write_text('[[rotation]]\nname = "db/app"\nevery = "whenever"\n')
        _wait_for(lambda: sum("rotation schedule rejected" in line for line in server.log_lines) == 2)
    finally:
        server.stop()
    assert server.process.returncode == 0
    rejected = [line for line in server.log_lines if "rotation schedule rejected" in line]
    assert len(rejected) == 2 and all("every must be a number and a unit" in line for line in rejected)


def test_a_bad_schedule_file_stops_the_service_from_starting(tmp_path: Path) -> None:
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path)
    (tmp_path / "rotation.toml").write_text('[[rotation]]\nname = "db/app"\n')
    with pytest.raises(AssertionError, match="every is required") as caught:
        _serve_with_schedule(tmp_path, "server", tmp_path / "rotation.toml")
    assert "Traceback" not in str(caught.value)


def _service_with_a_due_entry(tmp_path: Path, clients: tuple[str, ...]) -> tuple[Path, Server]:
    """A service on a new store, clients' certificates, and a schedule whose one entry
    (auth/DB_PASSWORD, set and test on ./target) is due by the time this returns."""
    make_pki(tmp_path, clients)
    make_store(tmp_path)
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {"name": "auth/DB_PASSWORD", "every": "1s", "set_command": SET_TARGET, "test_command": TEST_TARGET},
    )
    server = start_server(tmp_path)
    time.sleep(1.1)  # the current version is older than `every`
    return schedule, server


def test_schedule_run_through_the_service_is_authorised_and_audited_there(tmp_path: Path) -> None:
    """With --server the store steps are the service's RPCs under the caller's identity; the
    commands run on the client."""
    schedule, server = _service_with_a_due_entry(tmp_path, ("ops", "auth"))
    try:
        denied = server.cli("auth", "schedule", "run", str(schedule))
        assert denied.returncode == 1 and b"may not rotate" in denied.stderr  # auth may only read
        assert not (tmp_path / "target").exists()
        ran = server.cli("ops", "schedule", "run", str(schedule))
        assert ran.returncode == 0, ran.stderr
        assert b"rotated auth/DB_PASSWORD: version 2 is current (previous: 1)" in ran.stderr
        current = server.cli("ops", "get", "auth/DB_PASSWORD").stdout.decode().rstrip("\n")
    finally:
        server.stop()
    assert (tmp_path / "target").read_text() == current
    ops = f"spiffe://{TD}/ops"
    steps = [(r["operation"], r["outcome"]) for r in server.audit_records() if r["actor"] == ops]
    assert ("rotate.stage", "ok") in steps and ("rotate.promote", "ok") in steps
    assert ("history", "ok") in steps  # what is due is read with DescribeSecret


def test_schedule_run_through_the_service_skips_an_entry_another_runner_staged_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Between `schedule run` reading what is due and staging, another runner stages: the service
    refuses ours with ABORTED, and the class it names (RotationInProgressError, not a lost
    compare-and-set) reaches the client, so the entry is skipped, not failed. In process, so the
    other runner can act in exactly that window."""
    schedule, server = _service_with_a_due_entry(tmp_path, ("ops",))
    try:
        read_what_is_due = schedule_commands._entries

        def another_runner_stages_after_the_plan(session: Any, rules: Any) -> Any:
            planned = read_what_is_due(session, rules)
            other = RemoteStore(server.address, tls_files(tmp_path, "ops"))
            try:
                other.stage("auth/DB_PASSWORD", b"the-other-runner's-value")
            finally:
                other.close()
            return planned

        monkeypatch.setattr(schedule_commands, "_entries", another_runner_stages_after_the_plan)
        for key, value in client_environ(tmp_path, "ops", [server.address]).items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)
        code = run_cli(["schedule", "run", str(schedule), "--json"])
        out, err = capsys.readouterr()
    finally:
        server.stop()
    assert code == 0, err
    assert "auth/DB_PASSWORD: another rotation started first; skipped" in err
    assert json.loads(out) == [{"name": "auth/DB_PASSWORD", "state": "due", "outcome": "skipped"}]
    assert not (tmp_path / "target").exists()  # ours never reached its set command


def _readme_script(first_line: str) -> str:
    """The README's Python example that starts with `first_line` (so the README stays true)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    (script,) = [block for block in blocks if block.startswith(first_line)]
    return script


def test_the_readme_scripts_rotate_a_postgresql_role_password_on_a_schedule(
    cli: Cli, postgres_cluster: Any
) -> None:
    """The README's set-app-password.py and check-app-login.py, run by `schedule run` against the
    private PostgreSQL cluster: afterwards the role logs in with the new current value only, and
    the server, logging every statement of the admin role, logged the verifier, not the value."""
    from psycopg import OperationalError, sql

    admin_password = secrets.token_urlsafe(16)
    first = "first-app-password-SEEKRIT"
    with postgres_cluster.connect(superuser=True) as superuser:
        superuser.execute("DROP ROLE IF EXISTS app")
        superuser.execute("DROP ROLE IF EXISTS sm_rotator")
        superuser.execute(sql.SQL("CREATE ROLE app LOGIN PASSWORD {}").format(sql.Literal(first)))
        superuser.execute(
            sql.SQL("CREATE ROLE sm_rotator LOGIN CREATEROLE PASSWORD {}").format(sql.Literal(admin_password))
        )
        superuser.execute("ALTER ROLE sm_rotator SET log_statement = 'all'")
    try:
        (cli.dir / "set-app-password.py").write_text(_readme_script("# set-app-password.py"))
        (cli.dir / "check-app-login.py").write_text(_readme_script("# check-app-login.py"))
        python = shlex.quote(sys.executable)
        schedule = write_schedule(
            cli.dir / "rotation.toml",
            {
                "name": "db/pg-app",
                "every": "1s",
                "set_command": f"{python} set-app-password.py",
                "test_command": f"{python} check-app-login.py",
            },
        )
        assert cli("store", "db/pg-app", input=first.encode()).code == 0
        libpq = {  # what the scripts' connections read: the admin role for set, the host for both
            "PGHOST": "127.0.0.1",
            "PGPORT": str(postgres_cluster.port),
            "PGDATABASE": "postgres",
            "PGUSER": "sm_rotator",
            "PGPASSWORD": admin_password,
        }
        time.sleep(1.1)
        result = cli("schedule", "run", str(schedule), env=libpq)
        assert result.code == 0, result.stderr
        assert "rotated db/pg-app: version 2 is current (previous: 1)" in result.stderr
        new = cli.value("db/pg-app")

        def login(password: str) -> None:
            psycopg.connect(
                host="127.0.0.1", port=postgres_cluster.port, dbname="postgres", user="app",
                password=password, connect_timeout=10,
            ).close()  # fmt: skip

        login(new)
        with pytest.raises(OperationalError, match="password authentication failed"):
            login(first)
        server_log = postgres_cluster.server_log(tail=None)
        assert "ALTER ROLE app PASSWORD 'SCRAM-SHA-256$" in server_log  # statements were logged
        assert new not in server_log
    finally:
        with postgres_cluster.connect(superuser=True) as superuser:
            superuser.execute("DROP ROLE IF EXISTS app")
            superuser.execute("DROP ROLE IF EXISTS sm_rotator")


# ---- RotateSecret: the service runs a configured rotation on request ---------------------------


def test_rotate_on_server_runs_the_configured_rotation_there_and_audits_each_step(tmp_path: Path) -> None:
    make_pki(tmp_path, ("ops", "writer"))
    make_store(tmp_path)
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {
            "name": "auth/DB_PASSWORD",
            "every": "3650d",
            "set_command": SET_TARGET,
            "test_command": TEST_TARGET,
        },
        {"name": "auth/JWT_KEY", "every": "3650d", "set_command": "false", "timeout": 30},
    )
    server = _serve_with_schedule(tmp_path, "server", schedule)
    try:
        denied = server.cli("writer", "rotate", "auth/DB_PASSWORD", "--on-server")
        assert denied.returncode == 5, denied.stderr  # writer may write but not rotate
        assert not (tmp_path / "target").exists()

        done = server.cli("ops", "rotate", "auth/DB_PASSWORD", "--on-server", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "name": "auth/DB_PASSWORD",
            "version": 2,
            "previous": 1,
            "resumed": False,
            "promoted_elsewhere": False,
            "expires": None,
        }
        assert b"rotated auth/DB_PASSWORD: version 2 is current (previous: 1)" in done.stderr
        current = server.cli("ops", "get", "auth/DB_PASSWORD").stdout.decode().rstrip("\n")
        assert (tmp_path / "target").read_text() == current  # the set command ran on the service

        failed = server.cli("ops", "rotate", "auth/JWT_KEY", "--on-server")
        assert failed.returncode == 1
        assert failed.stderr.count(b"\n") == 1 and b"the set command failed (exit code 1)" in failed.stderr
        assert b"the schedule resumes it with its entry's set and test commands once it is 90 s" in (
            failed.stderr
        )
        assert b"--resume" not in failed.stderr
        busy = server.cli("ops", "rotate", "auth/JWT_KEY", "--on-server")
        assert busy.returncode == 7 and b"is in progress (version 2 is pending)" in busy.stderr

        unscheduled = server.cli("ops", "rotate", "market-connector/BINANCE_API_KEY", "--on-server")
        assert (
            unscheduled.returncode == 3
            and b"has no entry for 'market-connector/BINANCE_API_KEY'" in unscheduled.stderr
        )
        history = server.cli("ops", "history", "auth/JWT_KEY", "--json")
        assert json.loads(history.stdout)["labels"] == {"current": 1, "pending": 2}
    finally:
        server.stop()
    _, _, authors = _store_values(tmp_path, "auth/DB_PASSWORD")
    # The value is the schedule's, so is the version (a stale one is resumed only if so); the
    # audit log names the caller who asked for it (below).
    assert authors[-1] == "rotation-schedule"
    records = server.audit_records()
    (outer,) = [r for r in records if r["operation"] == "rotate" and r["outcome"] == "ok"]
    assert (outer["actor"], outer["source"], outer["version"]) == (f"spiffe://{TD}/ops", "grpc", 2)
    steps = [(r["operation"], r["outcome"]) for r in records if r["request_id"] == outer["request_id"]]
    assert steps == [("rotate", "pending"), *STEP_RECORDS, ("rotate", "ok")]
    # Each step names the certificate the request came with, as the request's own records do: a
    # stolen certificate's rotate.read (a read of the value) is found by `audit show --serial`.
    ops_serial = serial_text(
        x509.load_pem_x509_certificate((tmp_path / "ops.pem").read_bytes()).serial_number
    )
    assert {r.get("certificate_serial") for r in records if r["request_id"] == outer["request_id"]} == {
        ops_serial
    }
    assert [
        r["outcome"] for r in records if r["operation"] == "rotate" and r["actor"] == f"spiffe://{TD}/writer"
    ] == ["access_denied"]
    failed_steps = [(r["operation"], r["outcome"]) for r in records if r["name"] == "auth/JWT_KEY"]
    assert ("rotate.set", "rotation_step_failed") in failed_steps and (
        "rotate",
        "rotation_step_failed",
    ) in failed_steps
    assert current not in (tmp_path / "store.audit.jsonl").read_text() + "".join(server.log_lines)


def test_rotate_on_server_records_and_answers_the_entrys_expiry(tmp_path: Path) -> None:
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path)
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {"name": "auth/DB_PASSWORD", "every": "3000d", "expires_after": "3650d", "set_command": "true"},
    )
    server = _serve_with_schedule(tmp_path, "server", schedule)
    try:
        before = datetime.now(UTC)
        done = server.cli("ops", "rotate", "auth/DB_PASSWORD", "--on-server", "--json")
        assert done.returncode == 0, done.stderr
        answered = json.loads(done.stdout)
        expires = datetime.fromisoformat(answered["expires"].replace("Z", "+00:00"))
        assert before + timedelta(days=3650) - timedelta(seconds=1) <= expires
        assert expires <= datetime.now(UTC) + timedelta(days=3650)
        shown = server.cli("ops", "metadata", "auth/DB_PASSWORD", "--json")
        assert json.loads(shown.stdout)["expires"] == answered["expires"]
    finally:
        server.stop()
    records = [r for r in server.audit_records() if r["operation"] == "rotate.expiry"]
    assert [(r["outcome"], r["version"], r["actor"]) for r in records][-1] == ("ok", 2, f"spiffe://{TD}/ops")


def test_rotate_on_server_that_another_runner_finishes_first_answers_ok(tmp_path: Path) -> None:
    """RotateSecret's test command plays another runner: it resumes the pending version on the
    service's store and promotes it. The service's refused promote is the rotation done."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path)
    other_runner = (  # on the service's store, writing to the service's audit log (flock-shared)
        f"MASTER_PASSWORD={shlex.quote(SERVICE_PASSWORD)} {shlex.quote(str(SCRIPT))} "
        f"--store {shlex.quote(str(tmp_path / 'store.db'))} rotate auth/DB_PASSWORD --resume --promote-only"
    )
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {
            "name": "auth/DB_PASSWORD",
            "every": "3650d",
            "set_command": SET_TARGET,
            "test_command": f"sh -c {shlex.quote('cat >/dev/null; ' + other_runner)}",
        },
    )
    server = _serve_with_schedule(tmp_path, "server", schedule)
    try:
        done = server.cli("ops", "rotate", "auth/DB_PASSWORD", "--on-server", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "name": "auth/DB_PASSWORD",
            "version": 2,
            "previous": None,
            "resumed": False,
            "promoted_elsewhere": True,
            "expires": None,
        }
        assert b"another runner that resumed it promoted it first" in done.stderr
        current = server.cli("ops", "get", "auth/DB_PASSWORD").stdout.decode().rstrip("\n")
    finally:
        server.stop()
    assert (tmp_path / "target").read_text() == current
    promotes = [
        (r["outcome"], r["version"]) for r in server.audit_records() if r["operation"] == "rotate.promote"
    ]
    assert promotes[-1] == ("conflict", 2)  # audited as what it was; answered as what it means


def test_rotate_on_server_needs_a_schedule_and_a_server(tmp_path: Path, cli: Cli) -> None:
    alone = cli("rotate", "db/app", "--on-server")
    assert alone.code == 2 and "--on-server needs --server" in alone.stderr
    mixed = cli("rotate", "db/app", "--on-server", "--stdin")
    assert mixed.code == 2 and "drop --generate, --stdin" in mixed.stderr
    service_dir = tmp_path / "service"
    service_dir.mkdir()
    make_pki(service_dir, ("ops",))
    make_store(service_dir)
    server = start_server(service_dir)
    try:
        result = server.cli("ops", "rotate", "auth/DB_PASSWORD", "--on-server")
    finally:
        server.stop()
    assert result.returncode == 3 and b"this service has no rotation schedule" in result.stderr


def test_a_running_sdk_client_serves_the_old_value_while_pending_and_the_new_one_once_promoted(
    tmp_path: Path,
) -> None:
    """The product's promise end to end: the service rotates on its schedule, and a client that
    has the secret cached picks up the new current value by push, within seconds, without ever
    serving the staged value before it is promoted (the set command holds the rotation pending
    for a second)."""
    make_pki(tmp_path, ("auth", "ops"))
    make_store(tmp_path)
    name = "auth/DB_PASSWORD"
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {"name": name, "every": "2s", "set_command": "sh -c 'cat >/dev/null; sleep 1'"},
    )
    server = _serve_with_schedule(tmp_path, "server", schedule, check_seconds=0.1)
    try:
        with Client(environ=client_environ(tmp_path, "auth", [server.address])) as client:
            old = client.get(name).value.reveal()
            assert old == SEED[name]

            def pending_now() -> bool:
                store = _open_service_store(tmp_path)
                try:
                    return "pending" in store.describe(name).labels
                finally:
                    store.close()

            _wait_for(pending_now)  # staged: the client heard of a new version, and refetched
            time.sleep(0.3)
            assert client.get(name).value.reveal() == old  # current has not moved yet
            _wait_for(lambda: not pending_now())
            promoted_at = time.monotonic()
            new = _store_values(tmp_path, name)[0].encode()
            _wait_for(lambda: client.get(name).value.reveal() != old, seconds=5)
            picked_up = time.monotonic() - promoted_at
            assert client.get(name).value.reveal() in (new, *_store_values(tmp_path, name)[1].values())
    finally:
        server.stop()
    assert picked_up < 5


def test_runners_resuming_one_stale_version_together_do_not_report_a_failure(cli: Cli) -> None:
    """After a failed rotation every replica finds the same stale pending version and resumes it.
    They set the same value, and all but one find their promote refused: that is the rotation
    done, not a failure. Here the set command itself plays the other replica, resuming first."""
    store = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        with store.acting_for("rotation-schedule"):  # a failed rotation of the schedule's
            staged = store.stage("db/app", b"staged-by-a-failed-rotation")
        other_runner = (
            f"MASTER_PASSWORD={shlex.quote(PASSWORD)} {shlex.quote(str(SCRIPT))} "
            f"--store {shlex.quote(str(cli.dir / 'store.db'))} rotate db/app --resume --promote-only"
        )
        schedule = write_schedule(
            cli.dir / "rotation.toml",
            {
                "name": "db/app",
                "every": "1s",
                "timeout": 5,
                "set_command": f"sh -c {shlex.quote('cat >/dev/null; ' + other_runner)}",
            },
        )
        scheduler = scheduler_for(
            cli, schedule, store, clock=lambda: datetime.now(UTC) + timedelta(hours=1)
        )  # the pending version is stale
        assert scheduler.run_due()["db/app"] == "resumed elsewhere"
        assert store.describe("db/app").labels == {CURRENT: staged.version, "previous": 1}
        assert store.get("db/app").value.reveal() == b"staged-by-a-failed-rotation"
    finally:
        store.close()


def test_a_rotation_whose_set_ran_but_whose_promote_failed_is_retried_from_the_test_on(cli: Cli) -> None:
    """The set command applies the value, then the promote fails (here the audit log cannot be
    written: its path became a directory, as an outage would refuse it). This replica knows the
    value is at the target, so it retries after a short backoff, not three timeouts later, and
    runs the test again but not the set."""
    audit_path = cli.dir / "store.audit.jsonl"  # the one the store anchors
    break_audit = f"mv {audit_path.name} aside.jsonl; mkdir {audit_path.name}"
    setter = f"sh -c {shlex.quote('cat > target; echo set >> set.log; ' + break_audit)}"
    tester = f"sh -c {shlex.quote('cmp -s - target && echo test >> test.log')}"
    schedule = write_schedule(
        cli.dir / "rotation.toml",
        {"name": "db/app", "every": "1s", "timeout": 60, "set_command": setter, "test_command": tester},
    )
    time.sleep(1.1)
    store = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        scheduler = scheduler_for(cli, schedule, store)
        assert scheduler.run_due()["db/app"] == "failed"
        assert store.describe("db/app").labels == {CURRENT: 1, "pending": 2}
        assert scheduler.run_due()["db/app"] == "in progress"  # backing off
        audit_path.rmdir()
        (cli.dir / "aside.jsonl").rename(audit_path)
        time.sleep(1.1)
        assert scheduler.run_due()["db/app"] == "resumed"
        assert store.describe("db/app").labels == {CURRENT: 2, "previous": 1}
        assert store.get("db/app").value.reveal() == (cli.dir / "target").read_bytes()
        scheduler.join(1)
    finally:
        store.close()
    assert (cli.dir / "set.log").read_text().split() == ["set"]
    # The set's own outcome record failed already, so the first run never reached the test.
    assert (cli.dir / "test.log").read_text().split() == ["test"]
    steps = [(r["operation"], r["outcome"]) for r in map(json.loads, audit_path.read_text().splitlines())]
    # The log shows the set started before it ran; the retry reads the pending value, tests, promotes.
    assert ("rotate.set", "pending") in steps
    assert steps[-4:] == [
        ("rotate.resume", "ok"),
        ("rotate.test", "ok"),
        ("rotate.promote", "pending"),
        ("rotate.promote", "ok"),
    ]
    assert not list(cli.dir.glob("store.audit.jsonl.rotating.*"))  # nothing left to resume


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_rotation_cut_short_by_a_stop_is_resumed_at_the_next_start(tmp_path: Path) -> None:
    """SIGTERM while the set command runs: the command is ended at the end of the grace period
    (left running it could set an old value after a newer one) and its step is audited as failed
    after the set's durable "pending" record, and the next start of this replica finds the pending
    version in its marker file (closed cleanly) and resumes it at once, not three command timeouts
    (here 3 min) later."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": b"first-app-value-SEEKRIT"})
    slow = f"sh -c {shlex.quote('echo $$ > set.pid; sleep 60; cat > target')}"
    schedule = write_schedule(
        tmp_path / "rotation.toml", {"name": "db/app", "every": "1s", "timeout": 60, "set_command": slow}
    )
    server = _serve_with_schedule(tmp_path, "server", schedule)
    try:
        _wait_for(lambda: (tmp_path / "set.pid").exists() and bool((tmp_path / "set.pid").read_text()))
        server.stop()
    finally:
        server.kill()
    assert server.process.returncode == 0
    assert not _running(int((tmp_path / "set.pid").read_text()))
    assert not (tmp_path / "target").exists()
    steps = [(r["operation"], r["outcome"]) for r in server.audit_records() if r["name"] == "db/app"]
    # The command was ended before the stop finished: its step is on record as failed (cut short).
    assert steps[-2:] == [("rotate.set", "pending"), ("rotate.set", "rotation_step_failed")]
    store = _open_service_store(tmp_path)
    try:
        pending = store.describe("db/app").labels["pending"]
        staged = store.get("db/app", label="pending").value.reveal()
    finally:
        store.close()

    fast = f"sh -c {shlex.quote('cat > target; echo $SECRETS_MANAGER_ROTATE_VERSION >> set.log')}"
    write_schedule(
        tmp_path / "rotation.toml", {"name": "db/app", "every": "1d", "timeout": 60, "set_command": fast}
    )
    started = time.monotonic()
    server = _serve_with_schedule(tmp_path, "server", schedule)
    try:
        _wait_for(lambda: (tmp_path / "target").exists() and (tmp_path / "target").read_bytes() == staged)
        _wait_for(lambda: _store_values(tmp_path, "db/app")[0].encode() == staged)
        assert time.monotonic() - started < 30
    finally:
        server.stop()
    assert (tmp_path / "set.log").read_text().split() == [str(pending)]
    found = [line for line in server.log_lines if "left unfinished when it stopped" in line]
    assert len(found) == 1 and f'"version": {pending}' in found[0]
    assert staged.decode() not in "".join(server.log_lines)
    assert not list(tmp_path.glob("store.audit.jsonl.rotating.*"))  # a clean stop leaves no marker


def test_only_a_marker_closed_at_a_clean_stop_is_resumed_at_once(tmp_path: Path) -> None:
    """A marker whose process stopped cleanly (its commands ended) is taken over and resumed at
    the next start; one left by a crash is taken over but not resumed early, since its set command
    (a session of its own) may still be running: two at once could leave the older value at the
    target. A marker appears only once its process holds the lock on it."""
    audit_path = tmp_path / "store.audit.jsonl"
    clean, crashed = (tmp_path / f"store.audit.jsonl.rotating.{pid}" for pid in (101, 102))
    clean.write_text(json.dumps({"owed": {"db/clean": 3}, "clean": True}))
    crashed.write_text(json.dumps({"owed": {"db/crashed": 5}, "clean": False}))
    ledger = _Ledger(audit_path)
    try:
        assert ledger.owed("db/clean", 3) is not None
        assert ledger.owed("db/crashed", 5) is None  # resumed once stale, as any replica's
        assert not clean.exists() and not crashed.exists()  # taken over
        mine = list(tmp_path.glob("store.audit.jsonl.rotating*"))
        assert len(mine) == 1 and mine[0].name.startswith(f"store.audit.jsonl.rotating.{os.getpid()}-")
        ledger.started("db/next", 7)
        ledger.stopping()
        ledger.failed("db/next")  # its command was ended by the stop: still owed
    finally:
        ledger.close()
    left = json.loads(mine[0].read_text())
    assert left == {"owed": {"db/clean": 3, "db/next": 7}, "clean": True}


def test_two_processes_with_one_pid_keep_their_own_markers(tmp_path: Path) -> None:
    """Two `serve` processes in containers (both PID 1) sharing the audit log's directory: each
    keeps its own marker. Named by pid alone, the second start renamed its marker over the first's
    live one, so what the first owed was lost. Two ledgers of this process have one pid too."""
    audit_path = tmp_path / "store.audit.jsonl"
    first = _Ledger(audit_path)
    second: _Ledger | None = None
    try:
        first.started("db/first", 3)
        second = _Ledger(audit_path)
        second.started("db/second", 5)
        markers = sorted(tmp_path.glob("store.audit.jsonl.rotating.*"))
        owed = [json.loads(path.read_text())["owed"] for path in markers]
        assert sorted(owed, key=str) == [{"db/first": 3}, {"db/second": 5}]
        first.stopping()
        first.failed("db/first")  # cut short by the stop: still owed
        second.done("db/second")
    finally:
        first.close()
        if second is not None:
            second.close()
    assert len(list(tmp_path.glob("store.audit.jsonl.rotating.*"))) == 1  # the second's is gone
    later = _Ledger(audit_path)
    try:
        assert later.owed("db/first", 3) is not None  # the clean marker, resumed at once
    finally:
        later.close()


def test_a_marker_another_user_could_have_written_is_not_taken_over(tmp_path: Path) -> None:
    """A clean marker's versions are resumed at once, set command included, whoever staged them:
    one planted beside the audit log (by a user who may write there, naming a version they
    staged with a value of their choosing) had that value set at the target at the next start.
    Only a regular file of this user's that group and others may not write is taken over."""
    audit_path = tmp_path / "store.audit.jsonl"
    doc = json.dumps({"owed": {"db/app": 3}, "clean": True})
    writable = tmp_path / "store.audit.jsonl.rotating.101"
    writable.write_text(doc)
    writable.chmod(0o666)
    (tmp_path / "elsewhere").write_text(doc)
    (tmp_path / "store.audit.jsonl.rotating.102").symlink_to(tmp_path / "elsewhere")
    others = tmp_path / "store.audit.jsonl.rotating.103"
    others.write_text(doc)
    if os.geteuid() == 0:  # as root, also a file of another user's
        os.chown(others, 65534, 65534)
    else:
        others.chmod(0o646)
    ledger = _Ledger(audit_path)
    try:
        assert ledger.owed("db/app", 3) is None  # nothing taken over
    finally:
        ledger.close()
    assert writable.exists() and others.exists()  # left for a person to look at
    ours = tmp_path / "store.audit.jsonl.rotating.104"
    ours.write_text(doc)
    ours.chmod(0o600)
    ledger = _Ledger(audit_path)
    try:
        assert ledger.owed("db/app", 3) is not None  # as before
    finally:
        ledger.close()


# ---- a schedule file others could change: its commands run as us -------------------------------


def test_production_refuses_a_schedule_file_others_could_change(cli: Cli) -> None:
    """Whoever can write the schedule runs commands as its runner: a file group or others can
    write, another user's file, or one in a directory others can write (no sticky bit) is refused
    in production with what to run; elsewhere it is a warning and still runs."""
    folder = cli.dir / "sched"
    folder.mkdir()
    schedule = write_schedule(
        folder / "rotation.toml", {"name": "db/app", "every": "1s", "set_command": "sh -c 'cat > ran'"}
    )
    time.sleep(1.1)
    prod = {"SHRIVENQUANT_ENV": "production"}
    schedule.chmod(0o666)
    for command in ("run", "check"):
        refused = cli("schedule", command, str(schedule), env=prod)
        assert refused.code == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"chmod go-w {schedule}" in refused.stderr
    schedule.chmod(0o644)
    os.chown(schedule, pwd.getpwnam("nobody").pw_uid, -1)
    refused = cli("schedule", "run", str(schedule), env=prod)
    assert refused.code == 2 and "belongs to nobody" in refused.stderr
    os.chown(schedule, 0, -1)
    folder.chmod(0o777)
    refused = cli("schedule", "run", str(schedule), env=prod)
    assert refused.code == 2 and f"chmod go-w {folder}" in refused.stderr
    assert not (cli.dir / "ran").exists()
    folder.chmod(0o1777)  # sticky, like /tmp: others cannot replace our file
    assert "chmod" not in cli("schedule", "check", str(schedule), env=prod).stderr
    folder.chmod(0o777)
    ran = cli("schedule", "run", str(schedule))  # development: a warning, and it runs
    assert (
        ran.code == 0 and "warning: rotation schedule" in ran.stderr and f"chmod go-w {folder}" in ran.stderr
    )
    assert (cli.dir / "sched" / "ran").exists() or (cli.dir / "ran").exists()


def test_the_service_keeps_its_schedule_and_runs_nothing_from_a_file_made_writable(
    cli: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    """In production a schedule re-read after it became writable by others is rejected: the one
    in force stays, the error names the file, and no command of the loose file runs."""
    schedule = write_schedule(cli.dir / "rotation.toml", {"name": "db/app", "every": "3650d"})
    store = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        scheduler = scheduler_for(cli, schedule, store, environment=Environment.PRODUCTION)
        marker = cli.dir / "pwned"
        write_schedule(schedule, {"name": "db/app", "every": "1s", "set_command": f"sh -c 'cat > {marker}'"})
        schedule.chmod(0o666)
        time.sleep(1.1)
        with caplog.at_level("ERROR", logger="secrets_manager.service.schedule"):
            assert scheduler.run_due()["db/app"] == "not due"  # the old entry, every 3650d
        assert not marker.exists()
        assert scheduler.rules[0].every == timedelta(days=3650)
        (record,) = [r for r in caplog.records if "rotation schedule rejected" in r.getMessage()]
        assert str(schedule) in record.error and "chmod go-w" in record.error  # type: ignore[attr-defined]
        schedule.chmod(0o600)
        scheduler.run_due()
        assert marker.exists()  # once safe again, it is taken
    finally:
        store.close()
    # At start, the same file stops the service from starting (run_server builds this first).
    schedule.chmod(0o666)
    store = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        with pytest.raises(UnsafeConfigurationError, match="production refuses it"):
            RotationScheduler(
                schedule,
                store,
                AuditLog(cli.dir / "store.audit.jsonl"),
                check_seconds=60,
                environ={},
                environment=Environment.PRODUCTION,
            )
    finally:
        store.close()


def test_the_service_schedule_never_undoes_a_store_made_between_its_read_and_its_stage(cli: Cli) -> None:
    """A schedule entry with `field =` read version 1 of a JSON object, a client stored version 2
    (a new host), and the rotation staged and promoted version 3 built from version 1: the new
    host was lost. The stage is now conditional on the version read: nothing is staged, no command
    runs, and the stored value stays current; being a new current value, it is not due (the pass
    says so, rather than a failure to back off from)."""
    credentials = {"host": "db-old.internal", "password": "FIRST-PASSWORD", "username": "app"}
    assert cli("store", "db/json", input=json.dumps(credentials).encode()).code == 0
    schedule = write_schedule(
        cli.dir / "rotation.toml",
        {"name": "db/json", "every": "1s", "field": "password", "set_command": "sh -c 'cat > set.out'"},
    )
    time.sleep(1.1)
    store = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    other = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    changed = json.dumps({**credentials, "host": "db-NEW.internal"}).encode()
    real_get = store.get

    def get_then_another_writer_stores(name: str, **selector: Any) -> Any:
        store.get = real_get  # type: ignore[method-assign]
        secret = real_get(name, **selector)  # the rotation's read of the current value
        other.put(name, changed)
        return secret

    store.get = get_then_another_writer_stores  # type: ignore[method-assign]
    try:
        scheduler = scheduler_for(cli, schedule, store)
        assert scheduler.run_due()["db/json"] == "not due"
        assert store.describe("db/json").labels == {CURRENT: 2, "previous": 1}
        assert store.get("db/json").value.reveal() == changed
        scheduler.join(1)
    finally:
        store.close()
        other.close()
    assert not (cli.dir / "set.out").exists()
    stage = [r for r in map(json.loads, (cli.dir / "store.audit.jsonl").read_text().splitlines())]
    assert [r["outcome"] for r in stage if r["operation"] == "rotate.stage"] == ["pending", "conflict"]


def test_schedule_run_stopped_by_sigterm_ends_the_running_command_and_the_run(cli: Cli) -> None:
    """`schedule run` from cron or a systemd timer is stopped with SIGTERM while a set command
    runs: that command (in a session of its own) used to go on and change the target after
    `schedule run` had exited. It is ended as on Ctrl-C, the run stops (the next entry does not
    start) and exits 143, saying the version stays pending and that the schedule resumes it."""
    slow_set = "cat > new; touch started; sleep 3; cp new target"
    schedule = write_schedule(
        cli.dir / "rotation.toml",
        {"name": "db/app", "every": "1s", "timeout": 30, "set_command": f"sh -c {shlex.quote(slow_set)}"},
        {"name": "db/other", "every": "1s", "set_command": "sh -c 'cat > other-target'"},
    )
    time.sleep(1.1)
    run = subprocess.Popen(
        [str(SCRIPT), "schedule", "run", str(schedule)],
        env=cli.environ, cwd=cli.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (cli.dir / "started").exists())
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    stderr = err.decode()
    assert "Traceback" not in stderr, stderr
    assert run.returncode == 143, stderr
    assert "rotating db/app: interrupted (SIGTERM) while its set command ran" in stderr
    assert "version 2 stays pending" in stderr and "the schedule resumes it" in stderr
    time.sleep(4)
    assert not (cli.dir / "target").exists()  # the set command was ended with rotate
    assert not (cli.dir / "other-target").exists()  # the next entry never started
    assert cli.history("db/app")["labels"] == {"current": 1, "pending": 2}
    assert cli.history("db/other")["labels"] == {"current": 1}


def test_an_entry_that_fails_before_staging_is_tried_again_with_a_growing_backoff(
    cli: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing pending tells the service to wait, so a rotation that fails before its stage (here a
    JSON object with no field named; in production a PostgreSQL administrator's wrong password) was
    tried at every pass: the same error logged, and a failed database login, every minute all day.
    It is tried again after one check interval, then twice as long each time; fixed, it rotates."""
    assert cli("store", "db/app", input=json.dumps({"password": "FIRST-PASSWORD"}).encode()).code == 0
    schedule = write_schedule(cli.dir / "rotation.toml", {"name": "db/app", "every": "1s"})
    time.sleep(1.1)
    store = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        scheduler = RotationScheduler(
            schedule,
            store,
            AuditLog(cli.dir / "store.audit.jsonl"),
            check_seconds=0.5,
            environ={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            environment=DEV,
        )
        with caplog.at_level("ERROR", logger="secrets_manager.service.schedule"):
            assert scheduler.run_due()["db/app"] == "failed"
            assert scheduler.run_due()["db/app"] == "backing off"
            time.sleep(0.6)  # past the first backoff (one check interval)
            assert scheduler.run_due()["db/app"] == "failed"
            time.sleep(0.6)  # not past the second (two intervals)
            assert scheduler.run_due()["db/app"] == "backing off"
        failures = [r for r in caplog.records if r.getMessage() == "scheduled rotation failed"]
        assert [getattr(r, "next_try_seconds", None) for r in failures] == [0.5, 1.0]
        assert cli("store", "db/app", input=b"a plain value again").code == 0  # the entry can work now
        time.sleep(1.1)
        assert scheduler.run_due()["db/app"] == "rotated"
        time.sleep(1.1)
        assert scheduler.run_due()["db/app"] == "rotated"  # no backoff left once it worked
        scheduler.join(1)
    finally:
        store.close()


def test_a_pass_of_the_schedule_leaves_a_rotation_that_rotate_on_server_is_running_alone(
    tmp_path: Path,
) -> None:
    """RotateSecret's rotation is in the ledger from its set command on; a schedule pass meanwhile
    (every 0.2 s here) took that entry for one to resume and ran the test command (and promote) a
    second time beside it. Found as a flaky test: the second runner promoted first."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path)
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {
            "name": "auth/DB_PASSWORD",
            "every": "3650d",
            "set_command": f"sh -c {shlex.quote('cat > target; echo set >> set.log')}",
            "test_command": f"sh -c {shlex.quote('cmp -s - target; echo test >> test.log; sleep 1.5')}",
        },
    )
    server = _serve_with_schedule(tmp_path, "server", schedule)
    try:
        done = server.cli("ops", "rotate", "auth/DB_PASSWORD", "--on-server", "--json")
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["promoted_elsewhere"] is False
    assert (tmp_path / "set.log").read_text().split() == ["set"]
    assert (tmp_path / "test.log").read_text().split() == ["test"]


STAGER_POLICY = f"""
[identities]
"spiffe://{TD}/ops" = ["admin"]
"spiffe://{TD}/stager" = ["stager"]

[roles.admin]
rules = [{{ path = "**", capabilities = ["admin"] }}]

[roles.stager]
rules = [{{ path = "auth/DB_PASSWORD", capabilities = ["rotate"] }}]
"""


def test_the_commands_a_run_gives_for_another_stagers_version_act_on_the_runs_store(cli: Cli) -> None:
    """`schedule run` and `schedule check` name the `rotate NAME --resume` and `--discard` that
    finish or drop a stale version another staged; they said a bare 'secrets-manager rotate …',
    which for a run given --store acts on another store (here the environment's), where `rotate`
    itself gives its own command line. Pasted as given, the discard must act on this store."""
    store = str(cli.dir / "store.db")
    assert cli("rotate", "db/app", "--set-command", "false").code != 0  # version 2 pending, the user's
    schedule = write_schedule(
        cli.dir / "rotation.toml", {"name": "db/app", "every": "3650d", "set_command": "true", "timeout": 1}
    )
    time.sleep(3.1)  # stale: three timeouts of 1 s
    elsewhere = {"SECRETS_MANAGER_STORE": str(cli.dir / "elsewhere.db")}
    run = cli("--store", store, "schedule", "run", str(schedule), env=elsewhere)
    check = cli("--store", store, "schedule", "check", str(schedule), env=elsewhere)
    assert run.code == 1 and check.code == 0, run.stderr + check.stderr
    for said in (run.stderr, check.stderr):
        assert f"finish it with 'secrets-manager --store {store} rotate db/app --resume'" in said, said
    discard = run.stderr.split("drop it with '", 1)[1].split("'", 1)[0]
    words = shlex.split(discard)
    assert words[0] == "secrets-manager"
    dropped = cli(*words[1:], env=elsewhere)
    assert dropped.code == 0, dropped.stderr
    assert cli.history("db/app")["labels"] == {"current": 1}


def test_an_entry_blocked_by_another_stagers_version_stops_counting_failing_once_it_is_gone(
    cli: Cli,
) -> None:
    """An entry whose stale pending version another staged counts as failing (df3f190) until a
    person finishes or discards that version. Destroying the secret ends it too (the entry is
    then `missing`, which is no failure), but the entry stayed counted: the failing gauge read 1
    for as long as the service ran."""
    assert cli("rotate", "db/app", "--set-command", "false").code != 0  # version 2 pending, the user's
    schedule = write_schedule(
        cli.dir / "rotation.toml", {"name": "db/app", "every": "3650d", "set_command": "true", "timeout": 1}
    )
    time.sleep(3.1)  # stale: three timeouts of 1 s
    store = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    failing: list[int] = []
    try:
        scheduler = scheduler_for(cli, schedule, store)
        scheduler._on_pass = failing.append
        assert scheduler.run_due()["db/app"] == Due.IN_PROGRESS.value
        store.destroy_secret("db/app")
        assert scheduler.run_due()["db/app"] == "missing"
        scheduler.join(1)
    finally:
        store.close()
    assert failing == [1, 0]


def test_a_value_a_caller_staged_is_never_set_at_the_target_by_the_schedule_or_rotate_on_server(
    tmp_path: Path,
) -> None:
    """`rotate` (without `read`) lets a caller stage a pending version with a value of its choosing.
    The schedule resumed any stale pending version, so three command timeouts later its pass (or
    the caller's own `rotate --on-server`) ran the set command with that value (ALTER ROLE … for a
    postgres_role entry) and promoted it: the caller then knew the credential at the target. Only
    versions a rotation of the schedule staged are resumed; the caller's stays pending, untouched."""
    make_pki(tmp_path, ("ops", "stager"))
    make_store(tmp_path, policy=STAGER_POLICY)
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {
            "name": "auth/DB_PASSWORD",
            "every": "3650d",
            "set_command": SET_TARGET,
            "test_command": TEST_TARGET,
            "timeout": 1,
        },
    )
    server = _serve_with_schedule(tmp_path, "server", schedule, metrics=True)
    chosen = b"a-password-the-stager-KNOWS"
    try:
        staged = server.stub("stager").StageSecretVersion(
            pb.StageSecretVersionRequest(name="auth/DB_PASSWORD", value=chosen), timeout=10
        )
        time.sleep(3.5)  # stale (three timeouts of 1 s); the schedule passes every 0.2 s
        refused = server.cli("stager", "rotate", "auth/DB_PASSWORD", "--on-server")
        time.sleep(0.5)  # more passes
        described = server.cli("ops", "history", "auth/DB_PASSWORD", "--json")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
        # Rotated no more until a person acts: alerted on as a failing entry.
        assert b"\nsecrets_manager_scheduled_rotations_failing 1.0\n" in metrics.read()
    finally:
        server.stop()
    assert not (tmp_path / "target").exists()  # the set command never ran
    assert json.loads(described.stdout)["labels"] == {"current": 1, "pending": staged.version}
    assert refused.returncode == 7, refused.stderr
    assert f"staged by 'spiffe://{TD}/stager', not by a rotation of the schedule".encode() in refused.stderr
    assert b"rotate auth/DB_PASSWORD --discard" in refused.stderr
    warnings = [line for line in server.log_lines if "not by a rotation of the schedule" in line]
    assert len(warnings) == 1  # logged once, not at every pass
    assert chosen.decode() not in "".join(server.log_lines) + refused.stderr.decode()


def test_schedule_run_never_sets_at_the_target_a_value_another_caller_staged(tmp_path: Path) -> None:
    """The same through `schedule run` from cron: on the service's store file and through the
    service (as ops), a stale pending version the stager staged was resumed, its value set at the
    target. Each run now says whose it is and how to finish or drop it (exit 1), and leaves it."""
    make_pki(tmp_path, ("ops", "stager"))
    make_store(tmp_path, policy=STAGER_POLICY)
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {"name": "auth/DB_PASSWORD", "every": "3650d", "set_command": SET_TARGET, "timeout": 1},
    )
    server = start_server(tmp_path)  # serving the store, without a schedule of its own
    try:
        server.stub("stager").StageSecretVersion(
            pb.StageSecretVersionRequest(name="auth/DB_PASSWORD", value=b"a-password-the-stager-KNOWS"),
            timeout=10,
        )
        time.sleep(3.1)  # stale: three timeouts of 1 s
        remote = server.cli("ops", "schedule", "run", str(schedule), "--json")
        local = subprocess.run(
            [str(SCRIPT), "--store", str(tmp_path / "store.db"), "schedule", "run", str(schedule)],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MASTER_PASSWORD": SERVICE_PASSWORD},
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
        )
        check = server.cli("ops", "schedule", "check", str(schedule), "--json")
    finally:
        server.stop()
    assert not (tmp_path / "target").exists()
    for run in (remote, local):
        assert run.returncode == 1, run.stderr
        assert f"version 2 of auth/DB_PASSWORD is pending, staged by 'spiffe://{TD}/stager'".encode() in (
            run.stderr
        )
        assert b"Traceback" not in run.stderr and b"KNOWS" not in run.stderr
    assert json.loads(remote.stdout)[0]["outcome"] == "skipped"
    assert json.loads(check.stdout)[0]["state"] == "in progress"
    assert check.returncode == 0 and b"staged by 'spiffe://" in check.stderr  # and left alone
    _, values, _ = _store_values(tmp_path, "auth/DB_PASSWORD")
    assert _store_values(tmp_path, "auth/DB_PASSWORD")[0] == SEED["auth/DB_PASSWORD"].decode()
    assert len(values) == 2  # the stager's version, still pending; nothing promoted


def test_schedule_run_on_a_local_store_trusts_no_caller_that_bears_its_users_name(tmp_path: Path) -> None:
    """A local `schedule run` resumed the versions its own user had staged, by `created_by`; a
    service's caller is recorded by its certificate's identity, which for a CN may be that same
    name (a CI job's `deploy`, cron's `deploy`). So such a caller, with `rotate`, had its value set
    at the target by the local run. Local runs now stage as `rotation-schedule` and resume only
    that author's versions."""
    user = local_actor()
    if unpresentable_identity(user) is not None:
        pytest.skip(f"this user's name {user!r} is no certificate's CN")
    make_pki(tmp_path, ("ops",))
    make_odd_client(tmp_path, "namesake", cn=user)
    make_store(tmp_path, policy=STAGER_POLICY.replace(f'"spiffe://{TD}/stager"', json.dumps(user)))
    schedule = write_schedule(
        tmp_path / "rotation.toml",
        {"name": "auth/DB_PASSWORD", "every": "1s", "set_command": SET_TARGET, "timeout": 1},
        {"name": "auth/JWT_KEY", "every": "1s", "set_command": "false", "timeout": 1},
    )
    local_run = [str(SCRIPT), "--store", str(tmp_path / "store.db"), "schedule", "run", str(schedule)]
    local_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MASTER_PASSWORD": SERVICE_PASSWORD}
    server = start_server(tmp_path)
    try:
        server.stub("namesake").StageSecretVersion(
            pb.StageSecretVersionRequest(name="auth/DB_PASSWORD", value=b"a-password-the-namesake-KNOWS"),
            timeout=10,
        )
        time.sleep(1.1)  # JWT_KEY's current version is older than `every`: due
        first = subprocess.run(local_run, env=local_env, cwd=tmp_path, capture_output=True, timeout=60)
        time.sleep(3.1)  # both pending versions stale: the namesake's, and the failed JWT_KEY's
        (tmp_path / "rotation.toml").write_text(
            schedule.read_text().replace('set_command = "false"', 'set_command = "true"')
        )
        local = subprocess.run(local_run, env=local_env, cwd=tmp_path, capture_output=True, timeout=60)
    finally:
        server.stop()
    assert first.returncode == 1 and b"the set command failed" in first.stderr  # JWT_KEY's
    assert not (tmp_path / "target").exists()
    assert local.returncode == 1, local.stderr
    assert f"staged by {user!r}, not by a rotation of the schedule".encode() in local.stderr
    assert b"resumed and rotated auth/JWT_KEY" in local.stderr  # its own failed rotation is resumed
    _, _, authors = _store_values(tmp_path, "auth/JWT_KEY")
    assert authors[-1] == "rotation-schedule"


# ---- a rotation found due, then made meanwhile by another runner ------------------------------------


def test_the_service_schedule_does_not_rotate_a_secret_stored_again_after_it_found_it_due(
    cli: Cli,
) -> None:
    """The pass reads db/app's metadata (version 1, due); another process stores version 2 before
    the rotation reads the current value. Version 2 restarts the clock: the pass must not rotate
    it away (nor run the set command with a new value), it is no longer due."""
    schedule = write_schedule(
        cli.dir / "rotation.toml",
        {"name": "db/app", "every": "1h", "set_command": SET_TARGET, "test_command": TEST_TARGET},
    )
    store = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    other = EncryptedStore.open(SqliteStorage(cli.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        getting = store.get

        def get_after_another_store(name: str, **kwargs: Any) -> Any:
            if name == "db/app" and other.describe("db/app").current_version == 1:
                other.put("db/app", b"stored-by-another-process")  # after the pass found it due
            return getting(name, **kwargs)

        store.get = get_after_another_store  # type: ignore[method-assign]
        later = datetime.now(UTC) + timedelta(hours=2)  # version 1 is due, version 2 is not
        scheduler = scheduler_for(cli, schedule, store, clock=lambda: later)
        assert scheduler.run_due()["db/app"] == "not due"
        meta = other.describe("db/app")
        assert meta.labels == {CURRENT: 2, "previous": 1} and [v.version for v in meta.versions] == [1, 2]
        assert other.get("db/app").value.reveal() == b"stored-by-another-process"
        assert not (cli.dir / "target").exists()  # no set command ran
    finally:
        store.close()
        other.close()


_STORED_AGAIN_BEFORE_THE_READ = """
import os
from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
_get = EncryptedStore.get
def _get_after_another_store(self, name, **kwargs):
    if name == "db/app" and not os.path.exists("stored-again"):
        open("stored-again", "w").close()
        other = EncryptedStore.open(
            SqliteStorage(os.environ["SECRETS_MANAGER_STORE"]),
            PasswordUnlock(os.environ["MASTER_PASSWORD"], kdf.TEST),
        )
        try:
            other.put("db/app", b"stored-by-another-process")
        finally:
            other.close()
    return _get(self, name, **kwargs)
EncryptedStore.get = _get_after_another_store
"""


def test_schedule_run_does_not_rotate_a_secret_stored_again_after_it_found_it_due(cli: Cli) -> None:
    """`schedule run` reads every entry's metadata first, then rotates them one by one (each may
    take its commands' time): a value stored after that read and before the rotation of its entry
    restarts the clock, and is not rotated away. Another process stores it as the rotation reads
    the current value (a sitecustomize holds it there)."""
    schedule = write_schedule(
        cli.dir / "rotation.toml",
        {"name": "db/app", "every": "1s", "set_command": SET_TARGET, "test_command": TEST_TARGET},
        {"name": "db/other", "every": "1s", "set_command": "sh -c 'cat > other-target'"},
    )
    hook = cli.dir / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_STORED_AGAIN_BEFORE_THE_READ)
    time.sleep(1.1)
    result = cli("schedule", "run", str(schedule), "--json", env={"PYTHONPATH": str(hook)})
    assert result.code == 0, result.stderr
    assert (cli.dir / "stored-again").exists()
    outcomes = {r["name"]: r["outcome"] for r in json.loads(result.stdout)}
    assert outcomes == {"db/app": "skipped", "db/other": "rotated"}, result.stderr
    assert "db/app: stored again since it was found due (now version 2); not rotated" in result.stderr
    assert cli.history("db/app")["labels"] == {"current": 2, "previous": 1}
    assert cli.value("db/app") == "stored-by-another-process"
    assert not (cli.dir / "target").exists() and (cli.dir / "other-target").exists()
