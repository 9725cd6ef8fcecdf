"""The audit log of issue #4: every operation recorded, tampering detected, failures fail closed."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import math
import os
import pwd
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import secrets_manager.audit as audit_package
from mounts import tmpfs
from secrets_manager.audit import (
    GENESIS_HASH,
    AuditError,
    AuditEvent,
    AuditLog,
    AuditTamperError,
    local_actor,
)
from secrets_manager.audit import log as audit_log
from secrets_manager.audit import records as audit_records
from secrets_manager.audit import verify as audit_verify
from secrets_manager.cli import audit_commands
from secrets_manager.crypto import kdf
from secrets_manager.crypto.mac import sha256_hex
from secrets_manager.environment import Environment
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.base import Anchor
from secrets_manager.store.url import open_store

if TYPE_CHECKING:
    from conftest import MadeOnce

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "audit test password"
KNOWN_VALUE = "sk-live-AUDIT-KNOWN-VALUE-9d3e"


class Cli:
    def __init__(self, tmp_path: Path) -> None:
        self.store = tmp_path / "vault" / "store.db"
        self.audit = tmp_path / "vault" / "store.audit.jsonl"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "SECRETS_MANAGER_STORE": str(self.store),
            "MASTER_PASSWORD": PASSWORD,
        }

    def __call__(
        self,
        *args: str,
        input: bytes = b"",
        env: Mapping[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        timeout: float = 60,
        prefix: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [*prefix, str(SCRIPT), *args],
            input=input,
            capture_output=True,
            env={**self.env, **(env or {})},
            start_new_session=True,
            timeout=timeout,
            preexec_fn=preexec_fn,
        )
        assert b"Traceback" not in proc.stderr, proc.stderr
        return proc

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def records_of_every_file(self) -> list[dict[str, object]]:
        """The records of the rotated files and the live one, in order."""
        return list(AuditLog(self.audit).records())

    def store_bytes(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in self.store.parent.glob(self.store.name + "*")}


def initialised(home: Path) -> Cli:
    c = Cli(home)
    assert c("init", "--kdf-profile", "test").returncode == 0
    return c


@pytest.fixture
def cli(tmp_path: Path, made_once: MadeOnce) -> Cli:
    """A new store made by `init` (once per worker, then copied with its log): its `init` record
    is older than the test, by up to the worker's run so far (`new_cli` where that matters)."""
    made_once("test_audit cli", initialised, tmp_path)
    return Cli(tmp_path)


@pytest.fixture
def new_cli(tmp_path: Path) -> Cli:
    """A store made by `init` in this test: every record of its log is as young as the test."""
    return initialised(tmp_path)


def busy_session(cli: Cli) -> None:
    """A short session that leaves 10+ records: init, writes, reads, a list, a miss."""
    assert cli("store", "market-connector/BINANCE_API_KEY", input=KNOWN_VALUE.encode()).returncode == 0
    assert cli("store", "auth/DB_PASSWORD", input=b"db-pass").returncode == 0
    assert cli("get", "market-connector/BINANCE_API_KEY").returncode == 0
    assert cli("list").returncode == 0
    assert cli("get", "auth/NOPE").returncode == 3


def verify(cli: Cli) -> subprocess.CompletedProcess[bytes]:
    return cli("audit", "verify")


# ---- what is recorded ----------------------------------------------------------------------


def test_every_operation_appends_records_with_the_documented_fields(cli: Cli) -> None:
    busy_session(cli)
    records = cli.records()
    ops = [(r["operation"], r["name"], r["outcome"]) for r in records]
    assert ops == [
        ("init", None, "ok"),
        ("unlock", None, "ok"),
        ("store", "market-connector/BINANCE_API_KEY", "pending"),
        ("store", "market-connector/BINANCE_API_KEY", "ok"),
        ("unlock", None, "ok"),
        ("store", "auth/DB_PASSWORD", "pending"),
        ("store", "auth/DB_PASSWORD", "ok"),
        ("unlock", None, "ok"),
        ("get", "market-connector/BINANCE_API_KEY", "ok"),
        ("unlock", None, "ok"),
        ("list", None, "ok"),
        ("unlock", None, "ok"),
        ("get", "auth/NOPE", "not_found"),
    ]
    for record in records:
        assert set(record) >= {
            "seq",
            "time",
            "actor",
            "source",
            "peer",
            "operation",
            "name",
            "version",
            "decision",
            "outcome",
            "request_id",
            "value_hmac",
            "prev",
            "hash",
            "mac",
        }
        assert record["source"] == "cli" and record["decision"] == "allow"
        assert str(record["time"]).endswith("+00:00")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    store_request, store_response = records[2], records[3]
    assert store_request["request_id"] == store_response["request_id"] == records[1]["request_id"]
    assert store_response["version"] == 1
    assert cli.audit.stat().st_mode & 0o777 == 0o600


def test_known_value_appears_nowhere_in_the_audit_file(cli: Cli) -> None:
    busy_session(cli)
    cli("store", "market-connector/BINANCE_API_KEY", KNOWN_VALUE)  # the warned command-line form
    cli("get", "market-connector/BINANCE_API_KEY", "--json")
    cli("store", "bad name", input=KNOWN_VALUE.encode())
    raw = cli.audit.read_bytes()
    assert KNOWN_VALUE.encode() not in raw
    assert KNOWN_VALUE.encode().hex().encode() not in raw


def test_audit_hash_identifies_a_recorded_value(cli: Cli) -> None:
    busy_session(cli)
    fingerprint = cli("audit", "hash", input=KNOWN_VALUE.encode() + b"\n")
    assert fingerprint.returncode == 0
    line = fingerprint.stdout.decode().strip()
    assert line.startswith("hmac-sha256:") and len(line) == len("hmac-sha256:") + 64
    get_record = next(r for r in cli.records() if r["operation"] == "get" and r["outcome"] == "ok")
    assert get_record["value_hmac"] == line
    other = cli("audit", "hash", input=b"some other value").stdout.decode().strip()
    assert other != line


def test_audit_hash_is_recorded_without_the_candidate_or_its_fingerprint(cli: Cli) -> None:
    """'audit hash' tests a guessed value against a record's fingerprint with the audit key, and it
    left no record. It is recorded as any operation is (unlock, then 'audit.hash', no name), and
    neither the candidate nor its fingerprint is in the log. 'audit verify' only reads (documented
    as not recorded)."""
    busy_session(cli)
    before = len(cli.records())
    guess = b"sk-live-GUESSED-VALUE-5b7a"
    hashed = cli("audit", "hash", input=guess)
    assert hashed.returncode == 0, hashed.stderr
    fingerprint = hashed.stdout.decode().strip()
    assert fingerprint.startswith("hmac-sha256:")
    added = cli.records()[before:]
    assert [(r["operation"], r["name"], r["version"], r["value_hmac"], r["outcome"]) for r in added] == [
        ("unlock", None, None, None, "ok"),
        ("audit.hash", None, None, None, "ok"),
    ]
    assert added[0]["request_id"] == added[1]["request_id"]
    raw = cli.audit.read_bytes()
    assert guess not in raw and guess.hex().encode() not in raw
    assert fingerprint.split(":", 1)[1].encode() not in raw
    unchanged = cli.audit.read_bytes()
    assert verify(cli).returncode == 0
    assert cli.audit.read_bytes() == unchanged


def test_wrong_password_is_recorded_as_denied_unlock(cli: Cli) -> None:
    assert cli("get", "auth/X", env={"MASTER_PASSWORD": "wrong"}).returncode == 4
    last = cli.records()[-1]
    assert (last["operation"], last["decision"], last["outcome"]) == ("unlock", "deny", "unlock_failed")
    assert last["mac"] is None  # the writer could not unlock: nothing to sign with
    assert verify(cli).returncode == 0  # and the chain still holds


def test_a_wrong_password_on_a_damaged_log_is_still_a_wrong_password(cli: Cli) -> None:
    """The denial cannot be recorded (the log ends in a damaged line): the user must still hear
    that the password was wrong (exit 4, first), then that it was not audited and why. It was an
    integrity error (exit 6) that never mentioned the password."""
    assert cli("list").returncode == 0
    with cli.audit.open("ab") as log:
        log.write(b"garbage\n")
    damaged = cli.audit.read_bytes()
    got = cli("list", env={"MASTER_PASSWORD": "wrong"})
    assert got.returncode == 4 and got.stdout == b""
    error, note = got.stderr.decode().splitlines()
    assert error == "secrets-manager: error: wrong master password"
    assert note.startswith(
        "secrets-manager: warning: the failed unlock could not be audited because the audit log is damaged"
    )
    assert cli.audit.read_bytes() == damaged  # nothing appended past the damage
    assert cli("list").returncode == 6  # the right password: still refused, fail closed


def test_the_cli_actor_is_the_effective_user_not_a_name_from_the_environment(cli: Cli) -> None:
    """getpass.getuser() read LOGNAME, USER, LNAME and USERNAME first: anyone could record any
    name, and a name that is not UTF-8 made a wrong password an internal error with no record."""
    real = pwd.getpwuid(os.geteuid()).pw_name
    claimed = {variable: f"mallory-not-{real}" for variable in ("LOGNAME", "USER", "LNAME", "USERNAME")}
    assert cli("list", env=claimed).returncode == 0
    assert cli.records()[-1]["actor"] == real
    undecodable = {"LOGNAME": b"\xff", "USER": b"\xff"}
    for _ in range(2):  # each guess is answered as one, and recorded
        guess = cli("list", env={**undecodable, "MASTER_PASSWORD": "wrong"})
        assert guess.returncode == 4, guess.stderr
        assert guess.stderr.decode() == "secrets-manager: error: wrong master password\n"
        last = cli.records()[-1]
        assert (last["operation"], last["decision"], last["actor"]) == ("unlock", "deny", real)
    assert verify(cli).returncode == 0


def test_the_actor_is_uid_n_for_a_user_without_a_usable_name(monkeypatch: pytest.MonkeyPatch) -> None:
    uid = os.geteuid()

    def named(name: str) -> Callable[[int], object]:
        return lambda _uid: pwd.struct_passwd((name, "x", uid, uid, "", "/", "/bin/sh"))

    monkeypatch.setattr(pwd, "getpwuid", named("trader"))
    assert local_actor() == "trader"
    monkeypatch.setattr(pwd, "getpwuid", named(b"tr\xffder".decode("utf-8", "surrogateescape")))
    assert local_actor() == f"uid:{uid}"  # a canonical (UTF-8) audit line could not hold it
    monkeypatch.setattr(pwd, "getpwuid", named(""))
    assert local_actor() == f"uid:{uid}"

    def missing(_uid: int) -> object:
        raise KeyError(_uid)

    monkeypatch.setattr(pwd, "getpwuid", missing)
    assert local_actor() == f"uid:{uid}"


def test_a_wrong_password_is_reported_as_one_whatever_breaks_its_audit_record(cli: Cli) -> None:
    """Writing the denied unlock's record failed with something other than an audit error (here a
    line nested too deep for the JSON parser): the wrong password became 'internal error', exit 1."""
    assert cli("list").returncode == 0
    with cli.audit.open("a") as log:
        log.write("[" * 200_000 + "]" * 200_000 + "\n")
    got = cli("list", env={"MASTER_PASSWORD": "wrong"})
    assert got.returncode == 4 and got.stdout == b""
    error, note = got.stderr.decode().splitlines()
    assert error == "secrets-manager: error: wrong master password"
    assert note.startswith("secrets-manager: warning: the failed unlock ") and "audited" in note


def test_audit_show_filters_and_prints_json(new_cli: Cli) -> None:
    cli = new_cli  # `--since 1h` shows every record, init's too
    busy_session(cli)
    shown = cli("audit", "show", "--name", "auth/", "--json")
    assert shown.returncode == 0
    records = json.loads(shown.stdout)
    assert records and all(str(r["name"]).startswith("auth/") for r in records)
    assert cli("audit", "show", "--actor", "nobody-at-all", "--json").stdout.strip() == b"[]"
    assert json.loads(cli("audit", "show", "--since", "1h", "--json").stdout) == cli.records()
    future = cli("audit", "show", "--since", "2999-01-01T00:00:00", "--json")
    assert json.loads(future.stdout) == []
    table = cli("audit", "show").stdout.decode().splitlines()
    assert len(table) == len(cli.records()) and table[0].split("\t")[4] == "init"
    assert cli("audit", "show", "--since", "yesterday").returncode == 2
    # An age before year 1 overflowed datetime: an internal error before.
    too_far = cli("audit", "show", "--since", "999999999d")
    assert too_far.returncode == 2 and too_far.stdout == b""
    assert too_far.stderr.decode().count("\n") == 1 and b"before year 1" in too_far.stderr


def test_audit_show_of_a_log_that_is_not_there_says_so(cli: Cli, tmp_path: Path) -> None:
    """A mistyped --store or --audit-file made `audit show` print nothing and exit 0 (`--json`:
    `[]`), as if the log were empty; every other command says there is no store there."""
    busy_session(cli)
    for args in (
        ("--store", str(tmp_path / "vault" / "stor.db")),
        ("--audit-file", str(tmp_path / "nope.jsonl")),
    ):
        for json_flag in ((), ("--json",)):
            shown = cli(*args, "audit", "show", *json_flag)
            assert shown.returncode == 3 and shown.stdout == b"", shown.stderr
            (line,) = shown.stderr.decode().splitlines()
            assert line.startswith("secrets-manager: error: no audit log at ") and "--audit-file" in line, (
                line
            )
    assert not (tmp_path / "nope.jsonl").exists() and not (tmp_path / "vault" / "stor.db").exists()
    assert len(json.loads(cli("audit", "show", "--json").stdout)) == len(cli.records())


def test_audit_show_selects_by_operation_denial_failure_request_and_last(cli: Cli) -> None:
    busy_session(cli)
    assert cli("get", "auth/X", env={"MASTER_PASSWORD": "wrong"}).returncode == 4

    def shown(*args: str) -> list[dict[str, object]]:
        result = cli("audit", "show", *args, "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    everything = cli.records()
    assert [r["operation"] for r in shown("--operation", "get")] == [
        r["operation"] for r in everything if r["operation"] == "get"
    ]
    assert {r["operation"] for r in shown("--operation", "st*", "--operation", "list")} == {"store", "list"}
    denied = shown("--denied")
    assert [(r["operation"], r["outcome"]) for r in denied] == [("unlock", "unlock_failed")]
    failed = shown("--failed")
    assert [(r["operation"], r["outcome"]) for r in failed] == [
        ("get", "not_found"),
        ("unlock", "unlock_failed"),
    ]
    miss = next(r for r in everything if r["outcome"] == "not_found")
    one_request = shown("--request-id", str(miss["request_id"]))
    assert one_request and all(r["request_id"] == miss["request_id"] for r in one_request)
    assert shown("--last", "2") == everything[-2:]
    assert shown("--operation", "get", "--last", "1") == [
        [r for r in everything if r["operation"] == "get"][-1]
    ]
    assert cli("audit", "show", "--last", "0").returncode == 2
    # More than a C ssize_t holds (found by fuzzing): 'internal error (OverflowError)' before.
    records = cli.records()
    assert shown("--last", "9" * 25) == records  # all of them


def test_audit_show_read_answers_who_read_a_secret_and_until_ends_the_time_range(
    cli: Cli, tmp_path: Path
) -> None:
    """The incident question "who read market-connector/BINANCE_API_KEY since T" took seven
    --operation globs (get, otp, run, inject and the reads before a write) and still listed the
    refused and failed ones; there was no end to a time range (--since only)."""
    busy_session(cli)
    name = "market-connector/BINANCE_API_KEY"
    assert cli("run", "--secret", name, "--", "true").returncode == 0
    template = tmp_path / "app.tmpl"
    template.write_text(f"key = {{{{ sm://{name} }}}}\n")
    assert cli("inject", "-i", str(template)).returncode == 0
    assert cli("get", "market-connector/NOPE").returncode == 3
    assert cli("get", name, env={"MASTER_PASSWORD": "wrong"}).returncode == 4

    def shown(*args: str) -> list[dict[str, object]]:
        result = cli("audit", "show", *args, "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    reads = shown("--read", "--name", name, "--since", "1h")
    assert [r["operation"] for r in reads] == ["get", "run", "inject"]
    assert all(r["decision"] == "allow" and r["outcome"] == "ok" and r["version"] == 1 for r in reads)
    everything = cli.records()
    assert [r for r in shown("--read") if r["name"] != name] == [], "the miss and the store are not reads"
    # --until: records at or before the time given, combined with --since as a range.
    middle = str(everything[len(everything) // 2]["time"])
    until = shown("--until", middle)
    assert until and until == [r for r in everything if str(r["time"]) <= middle]
    assert shown("--since", middle, "--until", middle) == [r for r in everything if r["time"] == middle]
    for args, why in (
        (("--since", "1h", "--until", "2h"), "is before --since"),
        (("--until", "1h", "--follow"), "give one of them"),
        (("--until", "tomorrow"), "give an ISO 8601 time"),
    ):
        refused = cli("audit", "show", *args)
        assert refused.returncode == 2 and refused.stdout == b"", args
        assert refused.stderr.decode().count("\n") == 1 and why in refused.stderr.decode(), refused.stderr


def test_audit_show_exact_selects_one_name_and_not_the_names_it_begins(cli: Cli) -> None:
    """ "Who read market-connector/BINANCE_API_KEY" with `--read --name` (a prefix, as documented)
    also listed every read of market-connector/BINANCE_API_KEY_TESTNET: an auditor was handed
    another secret's readers, and no option selected one name alone."""
    name = "market-connector/BINANCE_API_KEY"
    for secret in (name, name + "_TESTNET", name + "/old"):
        assert cli("store", secret, input=KNOWN_VALUE.encode()).returncode == 0
        assert cli("get", secret).returncode == 0

    def shown(*args: str) -> list[dict[str, object]]:
        result = cli("audit", "show", "--read", *args, "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    assert [r["name"] for r in shown("--name", name)] == [name, name + "_TESTNET", name + "/old"]
    exact = shown("--name", name, "--exact")
    assert [(r["operation"], r["name"]) for r in exact] == [("get", name)]
    refused = cli("audit", "show", "--exact")
    assert refused.returncode == 2 and refused.stdout == b""
    assert refused.stderr.decode().count("\n") == 1 and "give --name NAME" in refused.stderr.decode()


def test_audit_show_until_a_time_printed_to_the_second_keeps_that_seconds_records(cli: Cli) -> None:
    """Records keep microseconds and the table prints them to the second: a record of
    23:59:59.407 shows as 23:59:59Z, and `--until` that time, copied from the table (or a day's
    end, `--until 2026-03-20T23:59:59Z`), left it out: the last records of a range were lost."""
    busy_session(cli)
    records = cli.records()
    record = next(r for r in records if datetime.fromisoformat(str(r["time"])).microsecond)
    second = datetime.fromisoformat(str(record["time"])).replace(microsecond=0)
    printed = cli("audit", "show", "--request-id", str(record["request_id"]))
    assert printed.returncode == 0 and second.strftime("%Y-%m-%dT%H:%M:%SZ") in printed.stdout.decode()

    def shown(*args: str) -> list[dict[str, object]]:
        result = cli("audit", "show", *args, "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def through(end: datetime) -> list[dict[str, object]]:
        return [r for r in records if datetime.fromisoformat(str(r["time"])) <= end]

    end_of_second = second.replace(microsecond=999_999)
    for until in (
        second.strftime("%Y-%m-%dT%H:%M:%SZ"),
        second.isoformat(),
        second.strftime("%Y-%m-%dT%H:%M:%S"),
    ):
        kept = shown("--until", until)
        assert record in kept and kept == through(end_of_second), until
    # Given with a fraction, a time is exact, as before.
    exact = shown("--until", str(record["time"]))
    assert exact == through(datetime.fromisoformat(str(record["time"])))
    assert shown("--until", second.strftime("%Y-%m-%dT%H:%M:%S.000000Z")) == through(second)


def test_audit_show_json_lines_exports_each_record_as_the_log_holds_it(cli: Cli) -> None:
    """A period exported to a SIEM needs one record per line: --json printed one indented array
    (a record over 20 lines), and only --follow gave lines, never ending. --json-lines prints
    each record selected on a line of its own, the very line the log holds, so the export can
    be checked against the log line for line."""
    busy_session(cli)
    lines = cli.audit.read_bytes().splitlines()
    every = cli("audit", "show", "--json-lines")
    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines() == lines
    reads = cli("audit", "show", "--json-lines", "--read", "--name", "market-connector/BINANCE_API_KEY")
    assert reads.returncode == 0 and reads.stdout
    assert all(line in lines for line in reads.stdout.splitlines())
    assert [json.loads(line)["operation"] for line in reads.stdout.splitlines()] == ["get"]
    summary = cli("audit", "show", "--json-lines", "--read", "--summary")
    assert [json.loads(line)["count"] for line in summary.stdout.splitlines()] == [1]
    both = cli("audit", "show", "--json-lines", "--json")
    assert both.returncode == 2 and both.stdout == b"" and b"give one of them" in both.stderr


def test_audit_show_actor_names_the_service_identity_a_short_name_meant(
    cli: Cli, encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """`--actor market-connector` on a service's log selected nothing and said nothing (exit 0,
    `[]`): the service records spiffe://…/market-connector, and an empty answer read as "this
    identity read nothing"."""
    path = tmp_path / "serve.audit.jsonl"
    identity = "spiffe://shrivenquant.local/market-connector"
    AuditLog(path).append(
        [AuditEvent(operation="get", actor=identity, source="grpc", name="market-connector/KEY", version=1)],
        encrypted_store,
    )
    short = cli("--audit-file", str(path), "audit", "show", "--actor", "market-connector", "--json")
    assert short.returncode == 0 and json.loads(short.stdout) == []
    (line,) = short.stderr.decode().splitlines()
    assert line == (
        "secrets-manager: warning: no record has actor 'market-connector'; the service records a "
        f"client certificate's whole identity: --actor {identity}"
    )
    whole = cli("--audit-file", str(path), "audit", "show", "--actor", identity, "--json")
    assert [r["actor"] for r in json.loads(whole.stdout)] == [identity] and whole.stderr == b""
    nobody = cli("--audit-file", str(path), "audit", "show", "--actor", "nobody", "--json")
    assert json.loads(nobody.stdout) == [] and nobody.stderr == b"", "no identity ends with it: no note"


def test_audit_show_summary_gives_who_read_what_from_where_in_a_row_each(
    cli: Cli, encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A fleet reads a secret at every start and change: "who read it in the last 7 days" was one
    line per read (thousands), to be counted by hand. --summary gives one row per actor, secret
    and version: how many, first and last, and from which addresses (ports dropped)."""
    path = tmp_path / "serve.audit.jsonl"
    mc, ops = "spiffe://shrivenquant.local/market-connector", "spiffe://shrivenquant.local/ops"
    name = "market-connector/BINANCE_API_KEY"
    reads = [
        (mc, "ipv4:10.0.1.5:51000", 1),
        (mc, "ipv4:10.0.1.5:51002", 1),
        (mc, "ipv6:[fd00::7]:40000", 1),
        (ops, "ipv4:10.0.9.9:3000", 1),
        (mc, "ipv4:10.0.1.5:51003", 2),
    ]
    log = AuditLog(path)
    for actor, peer, version in reads:
        event = AuditEvent(operation="get", actor=actor, source="grpc", peer=peer, name=name, version=version)
        log.append([event], encrypted_store)
    log.append(
        [
            AuditEvent(
                operation="get", actor=mc, source="grpc", name=name, decision="deny", outcome="access_denied"
            )
        ],
        encrypted_store,
    )
    shown = cli("--audit-file", str(path), "audit", "show", "--read", "--summary", "--json")
    assert shown.returncode == 0, shown.stderr
    groups = json.loads(shown.stdout)
    times = [r["time"] for r in log.records()]
    assert [(g["actor"], g["version"], g["count"], g["peers"]) for g in groups] == [
        (mc, 1, 3, ["ipv4:10.0.1.5", "ipv6:[fd00::7]"]),
        (ops, 1, 1, ["ipv4:10.0.9.9"]),
        (mc, 2, 1, ["ipv4:10.0.1.5"]),
    ]
    assert (groups[0]["first"], groups[0]["last"]) == (times[0], times[2])
    assert all(g["name"] == name and g["source"] == "grpc" for g in groups)
    table = cli("--audit-file", str(path), "audit", "show", "--read", "--summary").stdout.decode()
    assert table.splitlines()[0].split("\t")[:5] == [mc, "grpc", name, "1", "3"]
    refused = cli("--audit-file", str(path), "audit", "show", "--summary", "--follow")
    assert refused.returncode == 2 and "give one of them" in refused.stderr.decode()


def test_audit_show_summary_tells_a_revoked_certificates_reads_from_its_renewed_ones(
    cli: Cli, encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """ "Who read NAME, with which certificate": --summary put every read of one identity in one
    row, so the reads made with a certificate later revoked (its key leaked) were counted with
    those of its renewed one; the serial is part of the row now."""
    path = tmp_path / "serve.audit.jsonl"
    mc, name = "spiffe://shrivenquant.local/market-connector", "market-connector/BINANCE_API_KEY"
    stolen, renewed = "0A1B2C3D4E5F60718293A4B5C6D7E8F901234567", "7EF2296E887340B433257F4579A9E605CD49B906"
    log = AuditLog(path)
    for serial in (stolen, renewed, stolen):
        event = AuditEvent(
            operation="get", actor=mc, source="grpc", name=name, version=1, certificate_serial=serial
        )
        log.append([event], encrypted_store)
    log.append([AuditEvent(operation="get", actor="alice", name=name, version=1)], encrypted_store)
    shown = cli("--audit-file", str(path), "audit", "show", "--read", "--summary", "--json")
    assert shown.returncode == 0, shown.stderr
    groups = json.loads(shown.stdout)
    assert [(g["actor"], g["certificate_serial"], g["count"]) for g in groups] == [
        (mc, stolen, 2),
        (mc, renewed, 1),
        ("alice", None, 1),
    ]
    table = cli("--audit-file", str(path), "audit", "show", "--read", "--summary").stdout.decode()
    assert [line.split("\t")[-1] for line in table.splitlines()] == [stolen, renewed, ""]


def test_audit_show_serial_selects_the_requests_of_one_certificate(
    cli: Cli, encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A stolen certificate and its renewal share one identity: what the stolen one did took
    --json and a script over certificate_serial. --serial takes the serial as pki issue, openssl
    (`serial=`, colons) or a policy's [revoked] write it."""
    path = tmp_path / "serve.audit.jsonl"
    ops = "spiffe://shrivenquant.local/ops"
    stolen, renewed = "0A1B2C3D4E5F60718293A4B5C6D7E8F901234567", "7EF2296E887340B433257F4579A9E605CD49B906"
    log = AuditLog(path)
    for serial, name in ((stolen, "auth/A"), (renewed, "auth/B"), (stolen, "auth/C")):
        event = AuditEvent(operation="get", actor=ops, source="grpc", name=name, certificate_serial=serial)
        log.append([event], encrypted_store)
    log.append([AuditEvent(operation="get", actor="alice", name="auth/D")], encrypted_store)

    def names(spelling: str) -> list[object]:
        shown = cli("--audit-file", str(path), "audit", "show", "--serial", spelling, "--json")
        assert shown.returncode == 0, shown.stderr
        return [r["name"] for r in json.loads(shown.stdout)]

    assert names(stolen) == ["auth/A", "auth/C"]
    assert names("serial=" + stolen.lower().lstrip("0")) == ["auth/A", "auth/C"]
    assert names(":".join(renewed[i : i + 2] for i in range(0, 40, 2))) == ["auth/B"]
    assert names("ABCDEF") == []
    bad = cli("--audit-file", str(path), "audit", "show", "--serial", "not-a-serial")
    assert bad.returncode == 2 and bad.stdout == b""
    assert (
        bad.stderr.decode().count("\n") == 1 and "is not a certificate serial number" in bad.stderr.decode()
    )


def test_audit_show_follow_prints_each_new_record_once_across_rotations(cli: Cli) -> None:
    """As `tail -F`: the records selected, then each matching one as it is written, none twice
    and none lost while the writers rotate the live file under it; SIGTERM ends it with exit 0."""
    busy_session(cli)
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "1500"}  # a rotation every two commands or so
    follower = subprocess.Popen(
        [str(SCRIPT), "audit", "show", "--follow", "--json", "--operation", "get", "--last", "1"],
        env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())  # the last get before it started
        assert (first["operation"], first["name"]) == ("get", "auth/NOPE")
        for i in range(8):
            assert cli("get", "auth/DB_PASSWORD", env=small).returncode == 0
            assert cli("list", env=small).returncode == 0  # not a get: not shown
            shown = json.loads(follower.stdout.readline())
            assert (shown["operation"], shown["name"], shown["outcome"]) == (
                "get",
                "auth/DB_PASSWORD",
                "ok",
            ), i
        assert len(AuditLog(cli.audit).files()) >= 4  # it did follow rotations
    finally:
        follower.terminate()
        out, err = follower.communicate(timeout=20)
    assert follower.returncode == 0, err
    assert out == b"" and err == b""  # nothing more: each record once
    gets = [r["seq"] for r in cli.records_of_every_file() if r["operation"] == "get"]
    assert first["seq"] == gets[-9]


def test_audit_show_follow_says_the_partial_record_a_crash_left_as_show_does(cli: Cli) -> None:
    """`audit show` warns of a crash's partial last record; --follow waited on it in silence, so
    during an incident a cut record went unmentioned until the next writer set it aside."""
    busy_session(cli)
    with cli.audit.open("ab") as handle:
        handle.write(b'{"actor":"svc","name":"auth/DB_PA')
    follower = subprocess.Popen(
        [str(SCRIPT), "audit", "show", "--follow", "--last", "1"],
        env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    ended = threading.Timer(10.0, follower.terminate)  # silent: ended, and nothing was said
    ended.start()
    try:
        assert follower.stderr is not None
        said = follower.stderr.readline().decode()
    finally:
        ended.cancel()
        follower.terminate()
        out, err = follower.communicate(timeout=20)
    assert follower.returncode == 0, err
    assert "is a partial record (not shown)" in said, said
    assert said.count("\n") == 1 and err == b""  # one line, said once
    assert b"auth/DB_PA" not in out


def test_audit_show_follow_ended_as_it_prints_shows_nothing_twice(cli: Cli) -> None:
    """SIGTERM landing in the write of a record (just after its bytes went out) left them in
    Python's buffer, written again as it exited: the record shown twice (1 time in 3 here)."""
    busy_session(cli)
    for attempt in range(10):
        follower = subprocess.Popen(
            [str(SCRIPT), "audit", "show", "--follow", "--last", "1"],
            env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert follower.stdout is not None
        first = follower.stdout.readline()
        follower.terminate()  # at once: often still inside the write
        out, err = follower.communicate(timeout=20)
        assert follower.returncode == 0, err
        assert b"auth/NOPE" in first and (out, err) == (b"", b""), attempt


def test_follow_keeps_no_rotated_file_open_once_read(encrypted_store: EncryptedStore, tmp_path: Path) -> None:
    """The rotated files read at the start stayed open for as long as the follow ran: days of
    `audit show -f` kept the disk space of every file `audit prune` removed meanwhile."""
    path = tmp_path / "store.audit.jsonl"
    log = AuditLog(path, max_bytes=800)
    for i in range(6):
        log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
    rotated = {str(p) for p in log.files() if p != path}
    assert len(rotated) >= 2
    stop = threading.Event()
    batches = log.follow(stop, poll=0.01)
    try:
        assert len(list(next(batches))) == 6
        fds = Path("/proc/self/fd")
        held = set()
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                held.add(os.readlink(fd))
        assert not rotated & held
    finally:
        stop.set()
        batches.close()


def test_follow_refuses_a_last_line_no_write_could_leave(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """Over a mebibyte without a newline is no record a write cut short (as an append judges
    it): the follower took it for one under way and read it all again every 0.2 s, for ever."""
    path = tmp_path / "store.audit.jsonl"
    log = AuditLog(path)
    log.append([AuditEvent(operation="get", actor="svc", name="a/1")], encrypted_store)
    with path.open("ab") as handle:
        handle.write(b'{"actor":"' + b"x" * (2 << 20))
    stop = threading.Event()
    batches = log.follow(stop, poll=0.01)
    try:
        with pytest.raises(AuditTamperError, match="line 2 is not an audit record"):
            list(next(batches))
    finally:
        stop.set()
        batches.close()


def test_follow_reads_a_record_only_once_it_is_whole(encrypted_store: EncryptedStore, tmp_path: Path) -> None:
    """A last line without its newline is a write under way: the follower waits for the rest
    rather than failing on half a record or skipping it."""
    path = tmp_path / "store.audit.jsonl"
    log = AuditLog(path)
    log.append([AuditEvent(operation="get", actor="svc", name="a/1")], encrypted_store)
    stop = threading.Event()
    batches = log.follow(stop, poll=0.01)
    found: list[dict[str, object]] = []
    reader = threading.Thread(target=lambda: found.extend(next(batches, [])), daemon=True)
    try:
        assert [r["name"] for r in next(batches)] == ["a/1"]
        record = json.dumps({"actor": "svc", "name": "a/2", "operation": "get", "seq": 2}).encode()
        with path.open("ab") as handle:
            handle.write(record[:20])
            handle.flush()
            reader.start()
            reader.join(0.3)
            assert reader.is_alive() and found == []  # half a record: not yet
            handle.write(record[20:] + b"\n")
        reader.join(5)
        assert [r["name"] for r in found] == ["a/2"]
    finally:
        stop.set()
        if reader.ident is not None:
            reader.join(5)
        batches.close()


def test_follow_loses_no_file_when_the_log_rotates_twice_between_two_reads(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A busy log (several CLIs and a service writing) can rotate the live file twice between two
    of the follower's reads: it read the renamed file to its end, then opened the new live file,
    and the file rotated between the two (never open in the follower) was skipped whole."""
    path = tmp_path / "store.audit.jsonl"
    log = AuditLog(path, max_bytes=800)  # a rotation every two records or so
    log.append([AuditEvent(operation="get", actor="svc", name="a/0")], encrypted_store)
    stop = threading.Event()
    batches = log.follow(stop, poll=0.01)
    try:
        assert [r["name"] for r in next(batches)] == ["a/0"]
        before = len(log.files())
        for i in range(1, 9):
            log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
        assert len(log.files()) >= before + 3  # rotated at least three times since the read
        assert [r["name"] for r in next(batches)] == [f"a/{i}" for i in range(1, 9)]
    finally:
        stop.set()
        batches.close()


@pytest.mark.parametrize("suffix", ["\u00b2", "\u0663"], ids=["superscript two", "arabic-indic three"])
def test_a_file_named_with_other_digits_is_no_rotated_file(
    encrypted_store: EncryptedStore, tmp_path: Path, suffix: str
) -> None:
    """str.isdigit() took 'store.audit.jsonl.²' for a rotated file: a follower that saw a rotation
    then ended in int('²') (ValueError, an internal error), and verify counted it as a file."""
    path = tmp_path / "store.audit.jsonl"
    log = AuditLog(path, max_bytes=800)
    log.append([AuditEvent(operation="get", actor="svc", name="a/0")], encrypted_store)
    path.with_name(f"{path.name}.{suffix}").write_bytes(b"")
    assert log.files() == [path]
    stop = threading.Event()
    batches = log.follow(stop, poll=0.01)
    try:
        assert [r["name"] for r in next(batches)] == ["a/0"]
        for i in range(1, 6):
            log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
        assert len(log.files()) >= 3
        assert [r["name"] for r in next(batches)] == [f"a/{i}" for i in range(1, 6)]
    finally:
        stop.set()
        batches.close()
    assert log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) == 6


def test_follow_streams_the_records_before_it_rather_than_holding_them(tmp_path: Path) -> None:
    """`audit show --follow --last 5` on a long log: the first batch was one list of every
    record, the whole log in memory to show five (what --last's deque avoids without --follow)."""
    path = tmp_path / "store.audit.jsonl"
    line = {"actor": "svc", "operation": "get", "outcome": "ok", "decision": "allow", "hash": "0" * 64}
    with path.with_name(f"{path.name}.{1:012d}").open("w") as rotated:
        for seq in range(1, 20_001):
            rotated.write(json.dumps({**line, "name": f"a/{seq}", "seq": seq}) + "\n")
    path.write_text(json.dumps({**line, "name": "a/20001", "seq": 20_001}) + "\n")
    stop = threading.Event()
    batches = AuditLog(path).follow(stop, poll=0.01)
    tracemalloc.start()
    try:
        last = collections.deque(next(batches), maxlen=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        stop.set()
        batches.close()
    assert [r["seq"] for r in last] == list(range(19_997, 20_002))
    assert peak < 2_000_000, peak  # 20,000 records held: about 20 MB


# ---- tamper evidence -----------------------------------------------------------------------


def test_untouched_log_verifies_with_its_count(cli: Cli) -> None:
    busy_session(cli)
    result = verify(cli)
    assert result.returncode == 0
    assert f"{len(cli.records())} records" in result.stdout.decode()


def _edit_field(lines: list[str]) -> list[str]:
    record = json.loads(lines[3])
    record["name"] = "auth/SOMETHING_ELSE"
    return [*lines[:3], json.dumps(record, sort_keys=True, separators=(",", ":")), *lines[4:]]


def _edit_field_and_rehash(lines: list[str]) -> list[str]:
    """A forger who knows the format recomputes the hash, but cannot recompute the MAC."""
    record = json.loads(lines[3])
    record["actor"] = "someone-else"
    record["hash"] = audit_records.record_hash(record)
    return [*lines[:3], json.dumps(record, sort_keys=True, separators=(",", ":")), *lines[4:]]


def _give_a_key_twice(lines: list[str]) -> list[str]:
    """The record as Python's json reads it (the last of two values) is unchanged, so its hash and
    MAC hold; a reader that takes the first (Fluent Bit's record accessor, say) sees another actor."""
    assert lines[3].startswith('{"actor":"')
    return [*lines[:3], '{"actor":"someone-else",' + lines[3][1:], *lines[4:]]


TAMPERINGS: dict[str, Callable[[list[str]], list[str]]] = {
    "give a key twice": _give_a_key_twice,
    "add spacing": lambda lines: [*lines[:3], lines[3].replace(",", ", "), *lines[4:]],
    "edit a field": _edit_field,
    "edit a field and recompute its hash": _edit_field_and_rehash,
    "delete a middle record": lambda lines: lines[:4] + lines[5:],
    "swap two records": lambda lines: [*lines[:4], lines[5], lines[4], *lines[6:]],
    "truncate the tail": lambda lines: lines[:-2],
    "delete the whole file": lambda lines: [],
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS), ids=list(TAMPERINGS))
def test_tampering_is_detected_by_verify_with_exit_6(cli: Cli, tampering: str) -> None:
    busy_session(cli)
    lines = cli.audit.read_text().splitlines()
    changed = TAMPERINGS[tampering](lines)
    if changed:
        cli.audit.write_text("\n".join(changed) + "\n")
    else:
        cli.audit.unlink()
    result = verify(cli)
    assert result.returncode == 6, result
    message = result.stderr.decode().strip()
    assert message.startswith("secrets-manager: error: audit") and "\n" not in message


def test_a_log_that_lost_anchored_records_is_not_extended(cli: Cli) -> None:
    busy_session(cli)
    lines = cli.audit.read_text().splitlines()
    cli.audit.write_text("\n".join(lines[:-2]) + "\n")
    result = cli("get", "auth/DB_PASSWORD")
    assert result.returncode == 6 and result.stdout == b""
    assert len(cli.audit.read_text().splitlines()) == len(lines) - 2


@pytest.mark.parametrize("tampering", ["last record cut", "last record replaced by a denied unlock"])
def test_a_log_one_record_off_its_anchor_is_not_extended(cli: Cli, tampering: str) -> None:
    """The writer's own check of the tail against the anchor, at its edge: the test above cuts
    two records, which a check off by one still refused. Mutants of check_tail_against_anchor,
    each with every audit test passing: `last_seq < anchored.seq` -> `last_seq < anchored.seq - 1`
    (the anchored record cut alone went unseen, and the next record took its seq), and the
    same-seq-another-hash clause removed (a denied unlock, which carries no MAC, so anyone who may
    write the log can forge one, put in the anchored record's place). Only `audit verify` said so
    afterwards; the commands in between chained onto the forged tail and hid where it began."""
    busy_session(cli)
    lines = cli.audit.read_bytes().splitlines(keepends=True)
    if tampering == "last record cut":
        tampered = b"".join(lines[:-1])
    else:
        last = json.loads(lines[-1])
        forged = {k: v for k, v in last.items() if k not in ("hash", "mac", "key_id", "value_hmac")}
        forged.update(operation="unlock", decision="deny", outcome="unlock_failed", name=None, version=None)
        forged["hash"] = audit_records.record_hash(forged)
        forged["mac"] = None
        assert forged["seq"] == last["seq"] and forged["prev"] == last["prev"]
        tampered = b"".join(lines[:-1]) + audit_records.canonical(forged) + b"\n"
    cli.audit.write_bytes(tampered)
    result = cli("get", "auth/DB_PASSWORD")
    assert result.returncode == 6 and result.stdout == b"", result.stderr
    assert b"lost records the store anchored" in result.stderr and result.stderr.count(b"\n") == 1
    assert cli.audit.read_bytes() == tampered  # nothing chained onto it


def test_an_older_longer_chain_put_back_after_a_reset_is_not_extended(cli: Cli) -> None:
    """After 'audit reset' the old chain (.lost-*, MAC'd under the same key) is longer than the new
    one. Copied back as the log, its last record verified and its seq passed the anchor's, so the
    next ordinary command extended it and moved the anchor onto it: verify then passed, and the
    reset and everything after it were gone. Its record at the anchor's seq is another one."""
    busy_session(cli)
    cut = b"".join(cli.audit.read_bytes().splitlines(keepends=True)[:-3])
    cli.audit.write_bytes(cut)
    assert cli("audit", "reset", "--accept-loss").returncode == 0
    assert cli("store", "ns/b", input=b"new value").returncode == 0
    assert cli("get", "ns/b").returncode == 0
    (lost,) = cli.audit.parent.glob(cli.audit.name + ".lost-*")
    assert len(lost.read_bytes().splitlines()) > len(cli.audit.read_bytes().splitlines())
    cli.audit.write_bytes(lost.read_bytes())
    swapped = cli.audit.read_bytes()
    for command in (("list",), ("get", "ns/b"), ("store", "ns/c")):
        refused = cli(*command, input=b"v")
        assert refused.returncode == 6, (command, refused.stderr)
        assert b"is not the chain the store anchored" in refused.stderr and refused.stderr.count(b"\n") == 1
    assert cli.audit.read_bytes() == swapped  # nothing chained onto it
    assert verify(cli).returncode == 6


def test_a_partial_last_record_is_set_aside_and_the_repair_recorded(cli: Cli) -> None:
    """A write a crash cut short (never acknowledged) must not stop every later command."""
    busy_session(cli)
    whole = cli.audit.read_bytes()
    torn = b'{"actor":"root","decision":"al'
    cli.audit.write_bytes(whole + torn)
    result = verify(cli)
    assert result.returncode == 1 and b"ends in a partial record" in result.stderr
    assert cli("get", "auth/DB_PASSWORD").stdout == b"db-pass\n"
    (aside,) = cli.audit.parent.glob(cli.audit.name + ".partial-*")
    assert aside.read_bytes() == torn and aside.stat().st_mode & 0o777 == 0o600
    records = cli.records()
    assert cli.audit.read_bytes().startswith(whole)
    assert [r["operation"] for r in records[-3:]] == ["audit.repair", "unlock", "get"]
    assert records[-3]["outcome"] == "partial_set_aside" and records[-3]["mac"]
    assert verify(cli).returncode == 0


def test_a_crashs_partial_record_neither_blocks_show_nor_makes_reset_discard_the_chain(cli: Cli) -> None:
    """'audit show' printed nothing (exit 1), and 'audit reset --accept-loss' set the whole valid
    chain aside as .lost-*, though the docs say a partial record is set aside on its own."""
    busy_session(cli)
    whole = cli.audit.read_bytes()
    complete = cli.records()
    torn = b'{"actor":"root","decision":"al'
    cli.audit.write_bytes(whole + torn)
    shown = cli("audit", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == complete
    warning = shown.stderr.decode()
    assert warning.count("\n") == 1 and "partial record" in warning and str(cli.audit) in warning
    reset = cli("audit", "reset", "--accept-loss")
    assert reset.returncode == 0, reset.stderr
    assert b"set aside" in reset.stderr and b"no new chain" in reset.stderr
    assert not list(cli.audit.parent.glob(cli.audit.name + ".lost-*"))
    (aside,) = cli.audit.parent.glob(cli.audit.name + ".partial-*")
    assert aside.read_bytes() == torn
    records = cli.records()
    assert records[: len(complete)] == complete  # the chain is kept
    assert [(r["operation"], r["outcome"]) for r in records[len(complete) :]] == [
        ("audit.repair", "partial_set_aside")
    ]
    assert verify(cli).returncode == 0
    assert cli("audit", "reset", "--accept-loss").returncode == 2  # nothing left to reset


def test_a_tail_cut_through_an_anchored_record_is_tampering_not_a_crash(cli: Cli) -> None:
    """Three anchored records cut off, half of one left: verify said 'a write cut short by a
    crash?' (exit 1), and the next command set the half record aside before it refused."""
    busy_session(cli)
    lines = cli.audit.read_bytes().splitlines(keepends=True)
    cli.audit.write_bytes(b"".join(lines[:-3]) + lines[-3][:100])

    def audit_files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in cli.audit.parent.glob(cli.audit.name + "*")}

    cut = audit_files()
    for command in (("audit", "verify"), ("status",), ("get", "auth/DB_PASSWORD"), ("list",)):
        result = cli(*command)
        assert result.returncode == 6, (command, result.stderr)
        assert b"crash" not in result.stderr.replace(b"a crash never", b"")
        assert b"audit reset --accept-loss" in result.stderr
    assert b"records are missing at the end" in verify(cli).stderr
    assert verify(cli).stderr.decode().count("\n") == 1
    assert audit_files() == cut  # refused without setting anything aside
    assert cli("audit", "reset", "--accept-loss").returncode == 0
    assert cli("get", "auth/DB_PASSWORD").stdout == b"db-pass\n"


def test_a_partial_record_in_a_full_log_is_set_aside_not_rotated_with_it(cli: Cli) -> None:
    """A rotated file is never written again, so a partial record rotated into it would stop
    every later command for good."""
    busy_session(cli)
    cli.audit.write_bytes(cli.audit.read_bytes() + b'{"actor":"root","dec')
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "2000"}  # the log is over it: the next append rotates
    assert cli("get", "auth/DB_PASSWORD", env=small).stdout == b"db-pass\n"
    assert cli("get", "auth/DB_PASSWORD", env=small).stdout == b"db-pass\n"
    assert len(list(cli.audit.parent.glob(cli.audit.name + ".partial-*"))) == 1
    assert len(AuditLog(cli.audit).files()) >= 2  # it did rotate, one append later
    assert verify(cli).returncode == 0


def _edit_last_record(cli: Cli) -> None:
    lines = cli.audit.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[-1])
    record["actor"] = "someone-else"
    lines[-1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    cli.audit.write_bytes(b"".join(lines))


def _cut_anchored_records(cli: Cli) -> None:
    cli.audit.write_bytes(b"".join(cli.audit.read_bytes().splitlines(keepends=True)[:-2]))


@pytest.mark.parametrize("damage", [_edit_last_record, _cut_anchored_records], ids=["edited", "cut"])
def test_a_full_log_whose_tail_does_not_hold_is_refused_as_it_is_not_rotated_first(
    cli: Cli, damage: Callable[[Cli], None]
) -> None:
    """A writer renamed a full live file (and made a new, empty one) before it checked the tail,
    then refused: the refusal changed the log it refused, which §1 forbids."""
    busy_session(cli)
    damage(cli)
    before = {path.name: path.read_bytes() for path in cli.audit.parent.iterdir() if path.is_file()}
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "1000"}  # the log is over it: the append would rotate
    refused = cli("get", "auth/DB_PASSWORD", env=small)
    assert refused.returncode == 6 and refused.stdout == b"", refused.stderr
    assert refused.stderr.count(b"\n") == 1
    after = {path.name: path.read_bytes() for path in cli.audit.parent.iterdir() if path.is_file()}
    assert after == before


def test_a_line_longer_than_any_record_is_named_without_being_read_whole(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A forged line of gigabytes was read whole by verify, show, status and every writer: their
    memory grew with it, and ran out as 'internal error (MemoryError)', exit 1, not exit 6."""
    path = tmp_path / "lib.audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 40)
    for i in range(3):
        log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
    huge = b'{"actor":"' + b"a" * (32 << 20) + b'"}'
    for where, ending in (
        ("middle", b"\n" + path.read_bytes().splitlines(keepends=True)[-1]),
        ("end", b"\n"),
    ):
        good = path.read_bytes()
        lines = good.splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:-1]) + huge + ending if where == "middle" else good + huge + ending)
        tracemalloc.start()
        try:
            with pytest.raises(
                AuditTamperError, match=r"line \d+ is not an audit record \(over 1048576 bytes"
            ):
                log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor())
            with pytest.raises(AuditTamperError, match="over 1048576 bytes"):
                list(AuditLog(path).records())
            stop = threading.Event()
            batches = AuditLog(path).follow(stop, poll=0.01)
            try:
                with pytest.raises(AuditTamperError, match="over 1048576 bytes"):
                    list(next(batches))
            finally:
                stop.set()
                batches.close()
            if where == "end":
                with pytest.raises(AuditTamperError, match="over 1048576 bytes"):
                    AuditLog(path).append([AuditEvent(operation="get", actor="svc")], encrypted_store)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, (where, peak)
        path.write_bytes(good)


def test_a_reset_is_not_undone_by_another_process_anchoring_the_old_chain(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A service's deferred flush used to anchor its last record of the old chain after a reset
    by the CLI, and every command then saw a log that 'lost records'."""
    path = tmp_path / "shared.audit.jsonl"
    service, cli = AuditLog(path, flush_interval=60), AuditLog(path)
    for i in range(5):
        service.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
    service.append([AuditEvent(operation="get", actor="svc", name="a/late")], encrypted_store, durable=False)
    cli.restart(encrypted_store, AuditEvent(operation="audit.reset", actor="operator"))
    service.flush()  # its unsynced record is in the file the reset set aside
    anchor = encrypted_store.audit_anchor()
    assert anchor is not None and anchor.seq == 1
    AuditLog(path).append([AuditEvent(operation="get", actor="cli", name="a/0")], encrypted_store)
    assert AuditLog(path).verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) == 2


@pytest.mark.parametrize("offset", [4, -1], ids=["its-root-key-id", "its-tag"])
def test_a_damaged_anchor_is_named_and_audit_reset_replaces_it(cli: Cli, tmp_path: Path, offset: int) -> None:
    """One byte of the sealed core/audit-anchor row flipped: every command said only "integrity
    check failed" (exit 6), and so did the documented way out, 'audit reset --accept-loss', which
    read the anchor it is there to replace."""
    assert cli("store", "svc/A", input=KNOWN_VALUE.encode()).returncode == 0
    db = sqlite3.connect(cli.store)
    try:
        (sealed,) = db.execute("SELECT value FROM entries WHERE key = 'core/audit-anchor'").fetchone()
        damaged = bytearray(sealed)
        damaged[offset] ^= 0x01
        db.execute("UPDATE entries SET value = ? WHERE key = 'core/audit-anchor'", (bytes(damaged),))
        db.commit()
    finally:
        db.close()
    for command in (
        ("get", "svc/A"),
        ("list",),
        ("audit", "verify"),
        ("backup", str(tmp_path / "b.smbackup")),
    ):
        stopped = cli(*command)
        assert stopped.returncode == 6 and stopped.stdout == b"", command
        message = stopped.stderr.decode()
        assert message.count("\n") == 1 and KNOWN_VALUE not in message
        assert "audit anchor (core/audit-anchor) is damaged" in message, message
        assert "'secrets-manager audit reset --accept-loss'" in message and "backup" in message
    reset = cli("audit", "reset", "--accept-loss")
    assert reset.returncode == 0, reset.stderr
    assert b"audit anchor (core/audit-anchor) is damaged" in reset.stderr  # what was wrong
    assert cli("get", "svc/A").stdout == KNOWN_VALUE.encode() + b"\n"
    assert [r["operation"] for r in cli.records()] == ["audit.reset", "unlock", "get"]
    assert verify(cli).returncode == 0
    assert cli("audit", "reset", "--accept-loss").returncode == 2  # sound again: nothing to reset


def _anchor_row(cli: Cli) -> bytes | None:
    db = sqlite3.connect(cli.store)
    try:
        row = db.execute("SELECT value FROM entries WHERE key = 'core/audit-anchor'").fetchone()
    finally:
        db.close()
    return None if row is None else bytes(row[0])


def test_a_deleted_anchor_does_not_hide_a_cut_log_and_is_not_recreated(cli: Cli, tmp_path: Path) -> None:
    """The log's last records cut and the core/audit-anchor row deleted too: 'audit verify' passed,
    and the next command wrote a new anchor over the evidence. A log with signed records and no
    anchor is now tampering (exit 6) for verify, status and every command that would anchor it,
    and 'audit reset --accept-loss', which the message names, is the way on."""
    busy_session(cli)
    lines = cli.audit.read_bytes().splitlines(keepends=True)
    cli.audit.write_bytes(b"".join(lines[:-4]))
    db = sqlite3.connect(cli.store)
    try:
        db.execute("DELETE FROM entries WHERE key = 'core/audit-anchor'")
        db.commit()
    finally:
        db.close()
    cut = cli.audit.read_bytes()
    for command in (("audit", "verify"), ("status",), ("get", "auth/DB_PASSWORD"), ("list",)):
        stopped = cli(*command)
        assert stopped.returncode == 6 and stopped.stdout == b"", command
        message = stopped.stderr.decode()
        assert message.count("\n") == 1 and KNOWN_VALUE not in message
        assert "has no audit anchor" in message and "signed with the store's audit key" in message, message
        assert "'secrets-manager audit reset --accept-loss'" in message
        assert _anchor_row(cli) is None, command  # not recreated over the evidence
    assert cli.audit.read_bytes() == cut
    reset = cli("audit", "reset", "--accept-loss")
    assert reset.returncode == 0, reset.stderr
    assert b"has no audit anchor" in reset.stderr
    assert cli("get", "auth/DB_PASSWORD").stdout == b"db-pass\n"
    assert verify(cli).returncode == 0 and _anchor_row(cli) is not None


def test_a_missing_anchor_is_seen_past_denied_unlocks_and_a_new_log_is_anchored_before_its_first_record(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """The writer's tail check reads back past the unsigned records of denied unlocks to a signed
    one. A log's first append anchors the empty chain (seq 0) before it writes, so an anchor that
    could not move after that first record never looks deleted; verify without a store's anchor
    to hold it to (a key alone, as restore checks a surviving log) still passes."""
    path = tmp_path / "audit.jsonl"
    anchors: list[int] = []
    real = encrypted_store.set_audit_anchor

    def spy(anchor: Anchor, *, lock_wait: float | None = None, reset: bool = False) -> None:
        anchors.append(anchor.seq)
        real(anchor, lock_wait=lock_wait, reset=reset)

    encrypted_store.set_audit_anchor = spy  # type: ignore[method-assign]
    log = AuditLog(path)
    log.append([AuditEvent(operation="get", actor="cli", name="a/1")], encrypted_store)
    assert anchors == [0, 1]
    AuditLog(path).append([AuditEvent(operation="unlock", actor="cli", decision="deny")], None)
    AuditLog(path).append([AuditEvent(operation="unlock", actor="cli", decision="deny")], None)
    encrypted_store._storage.delete("core/audit-anchor")
    with pytest.raises(AuditTamperError, match="has no audit anchor"):
        AuditLog(path).append([AuditEvent(operation="get", actor="cli", name="a/1")], encrypted_store)
    key = encrypted_store.audit_key()
    with pytest.raises(AuditTamperError, match="has no audit anchor"):
        AuditLog(path).verify(key, None, anchor_required=True)
    assert AuditLog(path).verify(key, None) == 3
    assert encrypted_store.audit_anchor() is None and len(path.read_bytes().splitlines()) == 3


def test_a_scoped_anchor_missing_is_a_new_scope_and_the_log_is_anchored_anew(
    encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str, tmp_path: Path
) -> None:
    """A store several hosts share keeps one anchor per host and log path (a scope): a new
    hostname or a moved log meets none, which is not the anchor deleted. The log goes on and the
    new scope is anchored at its tail (no seq-0 anchor first), as verify then requires; only the
    store's one unscoped anchor (core/audit-anchor) missing is tampering."""
    assert not encrypted_store.audit_anchor_scoped
    path = tmp_path / "audit.jsonl"

    def scoped(scope: str) -> EncryptedStore:
        storage = SqliteStorage(tmp_store_path)
        return EncryptedStore.open(storage, PasswordUnlock(store_password, kdf.TEST), audit_scope=scope)

    first, second = scoped("host-a"), scoped("host-b")
    try:
        assert first.audit_anchor_scoped and second.audit_anchor_scoped
        AuditLog(path).append([AuditEvent(operation="get", actor="cli", name="a/1")], first)
        anchored = first.audit_anchor()
        assert anchored is not None and anchored.seq == 1
        anchors: list[int] = []
        real = second.set_audit_anchor

        def spy(anchor: Anchor, *, lock_wait: float | None = None, reset: bool = False) -> None:
            anchors.append(anchor.seq)
            real(anchor, lock_wait=lock_wait, reset=reset)

        second.set_audit_anchor = spy  # type: ignore[method-assign]
        assert second.audit_anchor() is None
        AuditLog(path).append([AuditEvent(operation="get", actor="cli", name="a/1")], second)
        assert anchors == [2]
        key = second.audit_key()
        assert AuditLog(path).verify(key, second.audit_anchor(), anchor_required=True) == 2
        assert AuditLog(path).verify(key, first.audit_anchor(), anchor_required=True) == 2
        assert encrypted_store.audit_anchor() is None  # the unscoped anchor is none of theirs
    finally:
        first.close()
        second.close()


def test_audit_reset_starts_a_new_chain_after_a_loss_and_keeps_the_old_files(cli: Cli) -> None:
    """A store copied without its log stops every command (fail closed) until an operator accepts
    the loss; the old files are kept, and the new chain says it was reset."""
    busy_session(cli)
    refused = cli("audit", "reset", "--accept-loss")
    assert refused.returncode == 2 and b"verifies" in refused.stderr  # nothing lost: nothing to reset
    old = cli.audit.read_bytes()
    cli.audit.write_bytes(b"\n".join(old.splitlines()[:-2]) + b"\n")  # the last records are lost
    stopped = cli("get", "auth/DB_PASSWORD")
    assert stopped.returncode == 6 and b"audit reset --accept-loss" in stopped.stderr
    assert cli("audit", "reset").returncode == 2  # the loss must be accepted in so many words
    reset = cli("audit", "reset", "--accept-loss")
    assert reset.returncode == 0, reset.stderr
    assert b"records are missing at the end" in reset.stderr
    (kept,) = cli.audit.parent.glob(cli.audit.name + ".lost-*")
    assert kept.read_bytes() == b"\n".join(old.splitlines()[:-2]) + b"\n"
    assert cli("get", "auth/DB_PASSWORD").stdout == b"db-pass\n"
    assert [r["operation"] for r in cli.records()] == ["audit.reset", "unlock", "get"]
    assert verify(cli).returncode == 0
    cli.audit.unlink()  # the whole log gone (a store file copied alone): the same way back
    gone = cli("list")
    assert gone.returncode == 6 and b"holds no records, but the store anchored record" in gone.stderr
    assert b"--audit-file" in gone.stderr and b"audit reset --accept-loss" in gone.stderr
    assert not cli.audit.exists()  # refused before an empty log was created
    assert cli("audit", "reset", "--accept-loss").returncode == 0
    assert cli("list").returncode == 0 and verify(cli).returncode == 0


@pytest.mark.parametrize(
    "forged",
    [
        b'{"seq": 99}',
        b'{"hash": "00"}',
        b'{"seq": true, "hash": "x"}',
        b"[1, 2]",
        b'{"seq": "5", "hash": "x"}',
    ],
)
def test_a_forged_last_line_that_is_json_but_no_record_is_reported_not_a_crash(
    cli: Cli, forged: bytes
) -> None:
    """It was an internal error (KeyError 'hash') on every command."""
    busy_session(cli)
    with cli.audit.open("ab") as log:
        log.write(forged + b"\n")
    stopped = cli("get", "auth/DB_PASSWORD")
    assert stopped.returncode == 6 and stopped.stdout == b""
    assert stopped.stderr.decode().count("\n") == 1 and b"ends in a damaged record" in stopped.stderr
    assert b"audit reset --accept-loss" in stopped.stderr
    assert b"internal error" not in stopped.stderr
    assert verify(cli).returncode == 6
    assert cli("audit", "reset", "--accept-loss").returncode == 0
    assert cli("get", "auth/DB_PASSWORD").stdout == b"db-pass\n"


def test_audit_show_prints_times_as_every_command_does_and_json_the_records_as_stored(cli: Cli) -> None:
    """The TIME column was the stored `2026-11-30T18:55:12.345678+00:00`; every other command
    prints UTC to the second with `Z`. The log (docs/audit.md) and `--json` keep what is stored."""
    busy_session(cli)
    stored = cli.audit.read_bytes()
    with cli.audit.open("ab") as log:  # forged: a time without a zone, and one that is no time
        log.write(b'{"seq": 98, "time": "2026-01-02T03:04:05"}\n{"seq": 99, "time": "yesterday"}\n')
    records = cli.records()
    table = cli("audit", "show")
    assert table.returncode == 0, table.stderr
    times = [line.split("\t")[1] for line in table.stdout.decode().splitlines()]
    assert times[-2:] == ["2026-01-02T03:04:05", "yesterday"]  # shown as written
    assert len(times) == len(records) and times[:-2] == [
        datetime.fromisoformat(str(r["time"])).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for r in records[:-2]
    ]
    assert all(
        str(r["time"]).endswith("+00:00") and "." in str(r["time"]) for r in records[:-2]
    )  # stored as before
    assert json.loads(cli("audit", "show", "--json").stdout) == records
    assert cli.audit.read_bytes().startswith(stored)


def test_audit_show_escapes_lone_surrogates_of_a_forged_line(cli: Cli) -> None:
    """UTF-8 cannot write them: printing one was an internal error (UnicodeEncodeError)."""
    busy_session(cli)
    with cli.audit.open("ab") as log:
        log.write(b'{"seq": 99, "hash": "\\ud800", "name": "\\udc00x"}\n')
    table = cli("audit", "show")
    assert table.returncode == 0 and b"\\udc00x" in table.stdout, table.stderr
    shown = cli("audit", "show", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)[-1]["name"] == "\udc00x"


def _nested_line(cli: Cli) -> str:
    with cli.audit.open("a") as log:
        log.write("[" * 200_000 + "]" * 200_000 + "\n")  # json.loads: RecursionError
    return "damaged"


def _lone_surrogate(cli: Cli) -> str:
    """The next record in the chain (right seq and prev) whose name UTF-8 cannot encode."""
    last = cli.records()[-1]
    forged = dict(last, seq=last["seq"] + 1, prev=last["hash"], name="x\udcff")  # type: ignore[operator]
    with cli.audit.open("a") as log:
        log.write(json.dumps(forged) + "\n")  # ensure_ascii: the surrogate as a \\udcff escape
    return "edited"


def _directory_as_rotated_file(cli: Cli) -> str:
    Path(f"{cli.audit}.000000000005").mkdir()
    return "not a regular file"


def _fifo_as_rotated_file(cli: Cli) -> str:
    os.mkfifo(f"{cli.audit}.000000000005")
    return "not a regular file"


def _fifo_as_live_file(cli: Cli) -> str:
    cli.audit.rename(f"{cli.audit}.000000000001")  # its records, as a rotated file
    os.mkfifo(cli.audit)
    return "not a regular file"


DAMAGES: dict[str, Callable[[Cli], str]] = {
    "a line nested 200000 arrays deep": _nested_line,
    "a chained record with a lone surrogate": _lone_surrogate,
    "a directory named like a rotated file": _directory_as_rotated_file,
    "a FIFO named like a rotated file": _fifo_as_rotated_file,
    "a FIFO as the live file": _fifo_as_live_file,
}


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_a_damaged_or_forged_log_is_reported_as_such_never_a_crash_or_a_hang(cli: Cli, damage: str) -> None:
    """Each was an internal error (RecursionError, UnicodeEncodeError, IsADirectoryError) or hung
    verify, status, show and reset for good; reset, the documented way back, must still work."""
    busy_session(cli)
    needle = DAMAGES[damage](cli)
    commands = [("audit", "verify"), ("status",), ("audit", "show")]
    if damage == "a chained record with a lone surrogate":
        assert cli("audit", "show", timeout=20).returncode == 0  # it is JSON: show prints it escaped
        commands.pop()
    if damage == "a FIFO as the live file":  # status writes a record first: writers refuse it (exit 1)
        refused = cli("status", timeout=20)
        assert refused.returncode == 1 and b"not a regular file" in refused.stderr
        commands.remove(("status",))
    for command in commands:
        result = cli(*command, timeout=20)
        message = result.stderr.decode()
        assert result.returncode == 6, (command, message)
        assert message.startswith("secrets-manager: error: ") and message.count("\n") == 1, message
        assert needle in message and ".audit.jsonl" in message and "audit reset --accept-loss" in message
    if damage in ("a line nested 200000 arrays deep", "a chained record with a lone surrogate"):
        assert cli("list", timeout=20).returncode == 6  # writers check the tail too

    reset = cli("audit", "reset", "--accept-loss", timeout=20)
    assert reset.returncode == 0, reset.stderr
    assert cli("get", "auth/DB_PASSWORD").stdout == b"db-pass\n"
    assert verify(cli).returncode == 0


def test_audit_show_since_passes_over_a_record_whose_time_has_no_timezone(cli: Cli) -> None:
    """It was an internal error (TypeError: a naive time compared with the aware cutoff)."""
    busy_session(cli)
    with cli.audit.open("a") as log:
        log.write(json.dumps(dict(cli.records()[-1], seq=99, time="2020-01-01T00:00:00")) + "\n")
    since = cli("audit", "show", "--since", "2000-01-01", "--json")
    assert since.returncode == 0, since.stderr
    assert [r["seq"] for r in json.loads(since.stdout)] == list(range(1, 14))  # not the forged one
    everything = cli("audit", "show", "--json")
    assert json.loads(everything.stdout)[-1]["seq"] == 99


def test_a_forged_last_record_with_a_high_seq_does_not_pass_for_a_log_that_grew(cli: Cli) -> None:
    """Records lost at the end, then a forged line with a large seq: it must not satisfy the check
    against the store's anchor (its hash and MAC do not verify)."""
    busy_session(cli)
    cut = b"".join(cli.audit.read_bytes().splitlines(keepends=True)[:-3])
    cli.audit.write_bytes(cut + b'{"seq": 1000000, "hash": "x", "mac": "y"}\n')
    stopped = cli("list")
    assert stopped.returncode == 6 and stopped.stderr.decode().count("\n") == 1
    assert b"does not verify (edited or forged)" in stopped.stderr
    assert b"1000001" not in cli.audit.read_bytes()  # nothing was chained onto it


def test_a_wrong_audit_file_that_is_no_log_says_so_and_leaves_no_lock_file(cli: Cli, tmp_path: Path) -> None:
    busy_session(cli)
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\n")
    result = cli("--audit-file", str(notes), "list")
    assert result.returncode == 6 and b"is not an audit log" in result.stderr
    assert notes.read_text() == "shopping list\n"
    directory = tmp_path / "a-directory"
    directory.mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(cli.audit)
    assert b"symbolic link" in cli("--audit-file", str(link), "list").stderr
    assert cli("--audit-file", str(directory), "list").returncode != 0
    leftovers = sorted(p.name for p in tmp_path.glob("*.lock"))
    assert leftovers == [], leftovers


@pytest.mark.parametrize("content", [b"a\nb\nlast line", b"no newline at all", b"a\nb\n"])
def test_a_new_store_never_cuts_a_file_that_is_no_audit_log(tmp_path: Path, content: bytes) -> None:
    """A new store has no anchor to check a tail against: its first writer set the end of a
    wrong --audit-file aside as a 'partial record' (a file with no newline was cut to 0 bytes,
    moved to notes.txt.partial-*) and chained its records onto it. It is refused as it is."""
    cli = Cli(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    refused = cli("--audit-file", str(notes), "init", "--kdf-profile", "test")
    assert refused.returncode == 6 and b"is not an audit log" in refused.stderr, refused.stderr
    assert refused.stderr.count(b"\n") == 1
    assert notes.read_bytes() == content
    # the refused init left no store behind, nor its directory (it is refused before creating any)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_init_beside_the_log_of_a_deleted_store_refuses_and_creates_nothing(tmp_path: Path) -> None:
    """A store deleted without its log (live or rotated files): a new init there chained its
    first record onto that store's log and failed as 'does not verify (edited or forged)' (exit 6),
    pointing to 'audit verify' and 'audit reset', which said 'no store' (exit 3). It is refused
    before anything is created, with what to do (exit 7); another --audit-file works."""
    cli = Cli(tmp_path)
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "400"}  # so the old log has rotated files
    assert cli("init", "--kdf-profile", "test", env=small).returncode == 0
    for value in (b"v1", b"v2", b"v3"):
        assert cli("store", "a/b", input=value, env=small).returncode == 0
    assert len(AuditLog(cli.audit).files()) > 2
    cli.store.unlink()
    expected = f"an audit log of another store is at {cli.audit}"
    remedy = ": move it away (it is that store's record), or give --audit-file another path"
    for args, env in (
        ((), {}),
        (("--audit-file", str(cli.audit)), {}),
        ((), {"SECRETS_MANAGER_AUDIT_FILE": str(cli.audit)}),
    ):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        refused = cli(*args, "init", "--kdf-profile", "test", env=env)
        message = refused.stderr.decode()
        assert refused.returncode == 7 and message.count("\n") == 1, message
        assert f"{expected} (with " in message and f"rotated files store.audit.jsonl.*){remedy}" in message
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
        assert not cli.store.exists()
    cli.audit.unlink()  # the rotated files alone are that store's record too
    refused = cli("init", "--kdf-profile", "test")
    assert (
        refused.returncode == 7
        and f"{expected} (" in refused.stderr.decode()
        and remedy in refused.stderr.decode()
    )
    assert b"; no live file)" in refused.stderr and not cli.store.exists()
    other = tmp_path / "vault" / "new.audit.jsonl"
    assert cli("--audit-file", str(other), "init", "--kdf-profile", "test").returncode == 0
    assert cli("--audit-file", str(other), "audit", "verify").returncode == 0


def test_an_audit_file_that_is_the_store_or_the_password_file_is_refused_untouched(
    cli: Cli, tmp_path: Path
) -> None:
    """--audit-file naming the store file cut its end off (a partial record set aside), the
    password file was emptied the same way, and 'audit reset --accept-loss' renamed the store to
    store.db.lost-* and wrote a new chain into store.db. Each is refused (exit 2) and untouched."""
    busy_session(cli)
    before = cli.store_bytes()
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    hard_link = tmp_path / "link-to-store"
    os.link(cli.store, hard_link)
    attempts = [
        ("--audit-file", str(cli.store), "get", "auth/DB_PASSWORD"),
        ("--audit-file", str(hard_link), "list"),
        ("--audit-file", f"{cli.store}-wal", "list"),
        ("--audit-file", str(cli.store), "audit", "reset", "--accept-loss"),
        (
            "--audit-file",
            str(password_file),
            "--password-file",
            str(password_file),
            "get",
            "auth/DB_PASSWORD",
        ),
        (
            "--audit-file",
            str(password_file),
            "--password-file",
            str(password_file),
            "audit",
            "reset",
            "--accept-loss",
        ),
    ]
    for args in attempts:
        refused = cli(*args)
        message = refused.stderr.decode()
        assert refused.returncode == 2 and message.count("\n") == 1, (args, message)
        assert "give the audit log a file of its own" in message, message
    refused = cli("get", "auth/DB_PASSWORD", env={"SECRETS_MANAGER_AUDIT_FILE": str(cli.store)})
    assert refused.returncode == 2
    assert password_file.read_text() == PASSWORD
    assert cli.store_bytes() == before
    assert not list(tmp_path.rglob("*.lost-*")) and not list(tmp_path.rglob("*.partial-*"))
    assert cli("get", "auth/DB_PASSWORD").stdout == b"db-pass\n"
    assert verify(cli).returncode == 0


def test_audit_reset_refuses_a_file_that_is_no_audit_log(cli: Cli, tmp_path: Path) -> None:
    """Reset renamed whatever the path named to <file>.lost-* and began a chain there."""
    busy_session(cli)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"shopping list\nmilk")
    refused = cli("--audit-file", str(notes), "audit", "reset", "--accept-loss")
    assert refused.returncode == 6 and b"is not an audit log" in refused.stderr, refused.stderr
    assert notes.read_bytes() == b"shopping list\nmilk"
    assert not list(tmp_path.glob("notes.txt.*"))
    assert verify(cli).returncode == 0


@pytest.mark.parametrize("where", ["typo.audit.jsonl", "no/such/dir/store.audit.jsonl"])
def test_a_wrong_audit_file_is_refused_leaving_nothing_at_its_path(
    cli: Cli, tmp_path: Path, where: str
) -> None:
    """A mistyped --audit-file (no log there, while the store anchored records) is refused, and
    leaves no log, no lock file and no directory behind."""
    busy_session(cli)
    before = sorted(tmp_path.rglob("*"))
    wrong = tmp_path / "vault" / where
    for args in (
        ("--audit-file", str(wrong), "list"),
        ("--audit-file", str(wrong), "get", "auth/DB_PASSWORD"),
    ):
        refused = cli(*args)
        assert refused.returncode == 6 and b"holds no records, but the store anchored" in refused.stderr
        assert sorted(tmp_path.rglob("*")) == before, "the refusal left files behind"
    assert cli("list").returncode == 0 and verify(cli).returncode == 0  # the right log still works
    assert Path(f"{cli.audit}.lock").exists()


def test_a_lock_file_deleted_while_a_writer_waits_for_it_is_not_shared_by_two_writers(tmp_path: Path) -> None:
    """A refused writer removes the lock file it created: a writer that was waiting on that file
    must then lock the one at the path, as a writer that opens it afresh does."""
    path = tmp_path / "audit.jsonl"
    first, waiting, later = AuditLog(path), AuditLog(path), AuditLog(path)
    assert first._flock(deadline=None)
    waiter = threading.Thread(target=waiting._flock, kwargs={"deadline": time.monotonic() + 10})
    waiter.start()
    time.sleep(0.2)  # `waiting` has the lock file open and waits for it
    Path(f"{path}.lock").unlink()
    first._unflock()
    waiter.join(10)
    assert not waiter.is_alive()
    assert later._flock(deadline=None) is False  # `waiting` holds the lock at the path
    waiting._unflock()
    assert later._flock(deadline=None)
    later._unflock()


_APPENDER = """
import sys, time
from pathlib import Path
from typing import TYPE_CHECKING
from secrets_manager.audit import AuditEvent, AuditLog
from secrets_manager.environment import Environment
from secrets_manager.store.url import open_store
store_path, audit_path, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
store = open_store(str(store_path), sys.argv[4].encode(), environment=Environment.DEVELOPMENT,
                   actor="w", audit_path=audit_path)
log, stop = AuditLog(audit_path), time.monotonic() + seconds
while time.monotonic() < stop:
    log.append([AuditEvent("get", "w", name="ns/x")], store)
store.close()
"""


def test_a_lock_file_deleted_while_writers_hold_it_does_not_fork_the_chain(cli: Cli) -> None:
    """The st_nlink check covers a lock file deleted while a writer waits, not one deleted while
    a writer holds it: a second writer then locked a new file and appended at once (review
    lockdel2.sh: a duplicate seq, verify exit 6). Writers lock the live file too."""
    lock = Path(f"{cli.audit}.lock")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _APPENDER, str(cli.store), str(cli.audit), "4", PASSWORD],
            env={**os.environ, **cli.env},
        )
        for _ in range(3)
    ]
    try:
        while any(w.poll() is None for w in writers):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            time.sleep(0.0005)
    finally:
        for w in writers:
            w.wait(60)
    assert all(w.returncode == 0 for w in writers)
    seqs = [record["seq"] for record in cli.records()]
    assert len(seqs) > 100 and len(set(seqs)) == len(seqs)
    assert verify(cli).returncode == 0


def test_a_log_of_one_record_is_said_in_the_singular(cli: Cli) -> None:
    """A new store's log holds its 'init' record only: "1 record", not "1 records"."""
    assert len(cli.records()) == 1
    verified = verify(cli)
    assert verified.returncode == 0 and verified.stdout.decode() == "audit log verified: 1 record in 1 file\n"
    refused = cli("audit", "reset", "--accept-loss")
    assert refused.returncode == 2 and b"the audit log verifies (1 record): there is nothing to reset" in (
        refused.stderr
    )


def test_rotated_files_verify_as_one_continuous_chain(cli: Cli) -> None:
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "1500"}
    for i in range(8):
        assert cli("store", f"svc/K{i}", input=b"v", env=small).returncode == 0
    files = AuditLog(cli.audit).files()
    assert len(files) >= 3
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    result = verify(cli)
    assert result.returncode == 0
    total = sum(len(p.read_text().splitlines()) for p in files)
    assert f"{total} records in {len(files)} files" in result.stdout.decode()
    files[1].unlink()  # a whole rotated file goes missing
    assert verify(cli).returncode == 6


# ---- retention: audit prune -----------------------------------------------------------------


def _rotated_log(cli: Cli, stores: int = 10) -> list[Path]:
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "1500"}
    for i in range(stores):
        assert cli("store", f"svc/K{i}", input=b"v", env=small).returncode == 0
    files = AuditLog(cli.audit).files()
    assert len(files) >= 5
    return files


def test_audit_prune_removes_the_oldest_rotated_files_and_the_log_still_verifies(cli: Cli) -> None:
    """Before, the only way to bound the log was deleting rotated files, and then `audit verify`
    and `status` failed (exit 6) for ever: retention was impossible."""
    files = _rotated_log(cli)
    rotated = files[:-1]
    dry = cli("audit", "prune", "--keep-files", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert AuditLog(cli.audit).files() == files  # a dry run changes nothing
    assert b"would remove" in dry.stdout
    pruned = cli("audit", "prune", "--keep-files", "2", "--json")
    assert pruned.returncode == 0, pruned.stderr
    result = json.loads(pruned.stdout)
    gone = [Path(entry["file"]) for entry in result["files"]]
    assert gone == rotated[:-2] and not any(path.exists() for path in gone)
    assert all(path.exists() for path in rotated[-2:])
    first_kept = json.loads(rotated[-2].read_text().splitlines()[0])
    assert result["chain_begins_at"] == first_kept["seq"] > 1
    # The prune is recorded, authenticated, with where the chain now begins.
    record = [r for r in AuditLog(cli.audit).records() if r["operation"] == "audit.prune"][-1]
    assert record["pruned_before"] == {"seq": first_kept["seq"], "prev": first_kept["prev"]}
    assert record["mac"] is not None and record["actor"] == pwd.getpwuid(os.geteuid()).pw_name
    checked = verify(cli)
    assert checked.returncode == 0, checked.stderr
    assert f"records {first_kept['seq']} on; those before were pruned".encode() in checked.stdout
    assert cli("status").returncode == 0
    # The log goes on: new records chain onto it, and it verifies again.
    assert cli("store", "svc/AFTER", input=b"v").returncode == 0
    assert verify(cli).returncode == 0


def test_a_rotated_file_deleted_by_hand_after_a_prune_is_still_caught(cli: Cli) -> None:
    """Only what an authenticated audit.prune record names may be missing from the start."""
    files = _rotated_log(cli)
    assert cli("audit", "prune", "--keep-files", "3").returncode == 0
    kept = AuditLog(cli.audit).files()
    kept[0].unlink()  # the oldest file the prune kept: records it did not vouch for
    checked = verify(cli)
    assert checked.returncode == 6
    first = json.loads(kept[1].read_text().splitlines()[0])["seq"]
    assert f"begins at record {first}".encode() in checked.stderr
    assert b"no audit.prune record says they were pruned" in checked.stderr
    assert cli("status").returncode == 6
    assert files[0] not in kept


def test_deleting_the_oldest_rotated_file_by_hand_is_reported_with_the_way_to_prune(cli: Cli) -> None:
    files = _rotated_log(cli)
    files[0].unlink()
    checked = verify(cli)
    assert checked.returncode == 6
    assert b"records 1 to" in checked.stderr and b"secrets-manager audit prune" in checked.stderr


def test_audit_prune_by_age_keeps_files_with_newer_records(new_cli: Cli) -> None:
    cli = new_cli  # `--older-than 1h` prunes nothing: init's record is the test's age too
    files = _rotated_log(cli)
    nothing = cli("audit", "prune", "--older-than", "1h")
    assert nothing.returncode == 0 and b"nothing to prune" in nothing.stdout
    assert AuditLog(cli.audit).files() == files
    newest_of_second = json.loads(files[1].read_text().splitlines()[-1])["time"]
    cutoff = datetime.fromisoformat(newest_of_second).timestamp() + 0.000001
    # Every file whose newest record is before the cutoff: the first two, and no later one.
    pruned = cli("audit", "prune", "--older-than", datetime.fromtimestamp(cutoff, UTC).isoformat())
    assert pruned.returncode == 0, pruned.stderr
    assert [p.exists() for p in files[:3]] == [False, False, True]
    assert verify(cli).returncode == 0


def test_audit_prune_archives_into_a_directory_and_never_overwrites(cli: Cli, tmp_path: Path) -> None:
    files = _rotated_log(cli)
    contents = {path.name: path.read_bytes() for path in files[:2]}
    archive = tmp_path / "archive"
    missing = cli("audit", "prune", "--keep-files", "0", "--archive", str(archive))
    assert missing.returncode == 2 and b"does not exist" in missing.stderr
    archive.mkdir()
    (archive / files[1].name).write_bytes(b"an earlier archive")
    before = [r["seq"] for r in AuditLog(cli.audit).records()]
    taken = cli("audit", "prune", "--keep-files", "0", "--archive", str(archive))
    assert taken.returncode == 7 and b"never overwritten" in taken.stderr
    dry = cli("audit", "prune", "--keep-files", "0", "--archive", str(archive), "--dry-run")
    assert dry.returncode == 7  # a dry run says so too
    # Refused before anything was written or removed.
    assert AuditLog(cli.audit).files() == files
    assert [r["seq"] for r in AuditLog(cli.audit).records()] == before
    (archive / files[1].name).unlink()
    moved = cli("audit", "prune", "--keep-files", "0", "--archive", str(archive))
    assert moved.returncode == 0, moved.stderr
    assert {p.name: p.read_bytes() for p in archive.iterdir() if p.name in contents} == contents
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in archive.iterdir())
    assert not any(path.exists() for path in files[:-1])
    assert sorted(p.name for p in archive.iterdir()) == sorted(p.name for p in files[:-1])
    assert verify(cli).returncode == 0


def _prune_archiving_killed_at(cli: Cli, archive: Path, path: Path, syscalls: str) -> None:
    """`audit prune --keep-files 0 --archive ARCHIVE`, SIGKILLed (by strace) at its first call of
    one of `syscalls` (comma-separated) on `path`."""
    kill = ("-P", str(path), "-e", f"trace={syscalls}", "-e", f"inject={syscalls}:signal=KILL")
    killed = cli(
        "audit",
        "prune",
        "--keep-files",
        "0",
        "--archive",
        str(archive),
        prefix=("strace", "-f", "-qq", *kill),
    )
    assert killed.returncode == -signal.SIGKILL or killed.returncode == 128 + signal.SIGKILL, killed.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace kills the prune at one system call")
def test_a_prune_killed_after_archiving_a_file_is_finished_by_the_next_one(cli: Cli, tmp_path: Path) -> None:
    """A prune killed (SIGKILL, here as it removes the first file it archived) between copying a
    file into --archive and removing it from the log left the complete copy there, and every later
    prune with the same --archive refused for ever ('already exists: an archive is never
    overwritten'): a nightly cron job failed each night until someone moved the copy by hand. The
    copy is the file's exact bytes: the next prune takes it as archived, and goes on."""
    files = _rotated_log(cli)
    contents = {path.name: path.read_bytes() for path in files[:-1]}
    archive = tmp_path / "archive"
    archive.mkdir()
    # strace kills it at its first unlink of the oldest file: once that file is archived.
    _prune_archiving_killed_at(cli, archive, files[0], "unlink,unlinkat")
    assert files[0].exists() and (archive / files[0].name).read_bytes() == contents[files[0].name]
    assert verify(cli).returncode == 0
    again = cli("audit", "prune", "--keep-files", "0", "--archive", str(archive))
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in archive.iterdir()} == contents
    assert not any(path.exists() for path in files[:-1])
    assert verify(cli).returncode == 0
    # A different file of that name there is still never overwritten.
    more = _rotated_log(cli, stores=6)[:-1]
    (archive / more[0].name).write_bytes(more[0].read_bytes() + b"\n")
    taken = cli("audit", "prune", "--keep-files", "0", "--archive", str(archive))
    assert taken.returncode == 7 and b"never overwritten" in taken.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace kills the prune at one system call")
def test_a_prune_killed_while_archiving_leaves_no_hidden_copy_for_good(cli: Cli, tmp_path: Path) -> None:
    """A file is copied into --archive under a hidden temporary name, `.NAME.partial-<pid>`, then
    linked to its name. A prune killed before the link (SIGKILL, here at it) left that copy, and the
    next prune, another pid, made its own and never removed it: the archive directory kept a hidden
    copy of the log's records for good, which a script rotating archives off the host never saw.
    The next prune removes it (none of a prune still running: it holds its copy's lock)."""
    files = _rotated_log(cli)
    contents = {path.name: path.read_bytes() for path in files[:-1]}
    archive = tmp_path / "archive"
    archive.mkdir()
    _prune_archiving_killed_at(cli, archive, archive / files[0].name, "link,linkat")
    left = [p.name for p in archive.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{files[0].name}.partial-"), left
    assert verify(cli).returncode == 0
    again = cli("audit", "prune", "--keep-files", "0", "--archive", str(archive))
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in archive.iterdir()} == contents  # nothing hidden beside them
    assert not any(path.exists() for path in files[:-1])
    assert verify(cli).returncode == 0


def test_audit_show_archive_shows_the_records_pruned_into_it_in_their_place(cli: Cli, tmp_path: Path) -> None:
    """`audit prune --archive DIR` moved a month's files out of the log, and `audit show` read
    the log alone: "who read NAME in March" had no answer once March was pruned (only
    `audit verify --archive` read DIR). `--archive DIR` shows them, before the log's own."""
    assert cli("store", "svc/K0", input=b"v").returncode == 0
    assert cli("get", "svc/K0").returncode == 0
    _rotated_log(cli)
    before = cli.records_of_every_file()
    archive = tmp_path / "archive"
    archive.mkdir()
    assert cli("audit", "prune", "--keep-files", "0", "--archive", str(archive)).returncode == 0
    after = cli.records_of_every_file()
    assert after[0]["seq"] != 1 and after[-1]["operation"] == "audit.prune"

    def shown(*args: str) -> list[dict[str, object]]:
        result = cli("audit", "show", *args, "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    assert shown() == after, "without --archive: the log alone, as before"
    everything = shown("--archive", str(archive))
    assert [r["seq"] for r in everything] == list(range(1, len(everything) + 1))
    assert everything[: len(before)] == before and everything[len(before) :] == after[-1:]
    reads = shown("--archive", str(archive), "--read", "--name", "svc/K0", "--exact")
    assert [r["operation"] for r in reads] == ["get"]
    assert reads[0]["seq"] < after[0]["seq"], "the read was pruned from the log"
    for args, why in (
        (("--archive", str(tmp_path / "nope")), "does not exist"),
        (("--archive", str(archive), "--follow"), "give one of them"),
    ):
        refused = cli("audit", "show", *args)
        assert refused.returncode == 2 and refused.stdout == b"", args
        assert refused.stderr.decode().count("\n") == 1 and why in refused.stderr.decode(), refused.stderr


def test_a_prune_never_takes_the_log_file_itself_for_its_archived_copy(cli: Cli, tmp_path: Path) -> None:
    """Since a file of the archive's name holding the file's bytes counts as archived (0e2cbb8),
    `--archive` naming the log's own directory (or holding another name of the log's file, a hard
    link) found each file "archived" in itself and deleted it: the records went with no copy
    anywhere, where the prune refused before ('already exists'). Only a copy of this user's that
    is not the file itself counts; the prune is refused and nothing is removed."""
    files = _rotated_log(cli)
    contents = {path.name: path.read_bytes() for path in files[:-1]}
    itself = cli("audit", "prune", "--keep-files", "0", "--archive", str(cli.audit.parent))
    assert itself.returncode == 7 and b"never overwritten" in itself.stderr, itself.stderr
    assert {path.name: path.read_bytes() for path in files[:-1] if path.exists()} == contents
    archive = tmp_path / "linked-archive"
    archive.mkdir()
    os.link(files[0], archive / files[0].name)  # the same file under a second name
    linked = cli("audit", "prune", "--keep-files", "0", "--archive", str(archive))
    assert linked.returncode == 7 and b"never overwritten" in linked.stderr, linked.stderr
    assert {path.name: path.read_bytes() for path in files[:-1] if path.exists()} == contents
    assert verify(cli).returncode == 0


def test_audit_prune_refuses_a_log_that_does_not_verify_and_removes_nothing(cli: Cli) -> None:
    files = _rotated_log(cli)
    lines = files[1].read_text().splitlines(keepends=True)
    files[1].write_text("".join(_edit_field(lines)))
    before = cli.audit.read_bytes()
    refused = cli("audit", "prune", "--keep-files", "0")
    assert refused.returncode == 6
    assert AuditLog(cli.audit).files() == files and cli.audit.read_bytes() == before


def test_a_missing_archive_directory_is_refused_even_when_no_file_is_due(cli: Cli, tmp_path: Path) -> None:
    """`audit prune --keep-files 5 --archive DIR` with DIR mistyped or not mounted said nothing
    and exited 0 while no rotated file was due, so a nightly job's mistake showed only once files
    were due (or never, with --dry-run). It is refused at once, as when files would go. Fails on
    the old code (exit 0)."""
    before = cli.audit.read_bytes()
    for extra in ([], ["--dry-run"]):
        refused = cli("audit", "prune", "--keep-files", "5", "--archive", str(tmp_path / "nowhere"), *extra)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.decode() == (
            f"secrets-manager: error: archive directory {tmp_path / 'nowhere'} does not exist: "
            "create it, or leave --archive out\n"
        )
    assert cli.audit.read_bytes() == before


def test_audit_prune_needs_a_rule(cli: Cli) -> None:
    before = cli.audit.read_bytes()
    refused = cli("audit", "prune")
    assert refused.returncode == 2 and b"--older-than" in refused.stderr
    assert cli.audit.read_bytes() == before


def test_a_prune_interrupted_while_removing_files_leaves_a_log_that_verifies(
    encrypted_store: EncryptedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit.prune record is written (and anchored) before any file goes: a prune that fails
    or is killed part-way leaves a log that begins at or before the record it names."""
    log = AuditLog(tmp_path / "lib.audit.jsonl", max_bytes=800)
    for i in range(30):
        log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
    files = log.files()
    assert len(files) >= 5
    real_unlink = Path.unlink
    removed: list[Path] = []

    def unlink_once(self: Path, missing_ok: bool = False) -> None:
        if self in files and removed:
            raise OSError(errno.EIO, "Input/output error", str(self))
        real_unlink(self, missing_ok=missing_ok)
        removed.append(self)

    monkeypatch.setattr(Path, "unlink", unlink_once)
    event = AuditEvent(operation="audit.prune", actor="ops")
    with pytest.raises(AuditError, match="removed 1 of 3 files"):
        log.prune(encrypted_store, event, keep_files=len(files) - 4)
    monkeypatch.undo()
    assert removed == [files[0]]
    key, anchor = encrypted_store.audit_key(), encrypted_store.audit_anchor()
    assert log.verify(key, anchor) > 0
    done = log.prune(encrypted_store, event, keep_files=len(log.files()) - 3)  # the two left of three
    assert [found.path for found in done.files] == files[1:3]
    assert log.files()[0] == files[3]
    assert log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) > 0


def test_audit_prune_verifies_without_holding_the_writers_lock(
    encrypted_store: EncryptedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk over a long log takes seconds; held under the writers' lock, it made a running
    service's appends wait past their timeout (its requests refused). Another writer appends
    during the walk; a file changed after the walk read it is not pruned."""
    path = tmp_path / "lib.audit.jsonl"
    log = AuditLog(path, max_bytes=800)
    for i in range(12):
        log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
    files = log.files()
    real_walk = audit_verify.walk_chain

    def walk_while_another_writer_appends(*args: object, **kwargs: object) -> object:
        walked = real_walk(*args, **kwargs)  # type: ignore[arg-type]
        other = AuditLog(path, max_bytes=800, timeout=0.5)
        other.append([AuditEvent(operation="get", actor="service", name="during")], encrypted_store)
        with files[1].open("ab") as handle:  # the second file changes after the walk read it
            handle.write(b"")
        os.utime(files[1], ns=(0, 0))
        return walked

    # Patched where AuditLog.prune (log.py) looks it up at call time, not where verify.py defines it.
    monkeypatch.setattr(audit_log, "walk_chain", walk_while_another_writer_appends)
    pruned = log.prune(encrypted_store, AuditEvent(operation="audit.prune", actor="ops"), keep_files=0)
    assert [found.path for found in pruned.files] == files[:1]
    assert any(record.get("name") == "during" for record in AuditLog(path).records())


def test_audit_prune_leaves_files_whose_records_are_not_anchored(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    log = AuditLog(tmp_path / "lib.audit.jsonl", max_bytes=800)
    for i in range(12):
        log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
    anchor = encrypted_store.audit_anchor()
    assert anchor is not None
    files = log.files()
    unanchored = [path for path in files[:-1] if json.loads(path.read_text().splitlines()[-1])["seq"] > 3]
    # The store vouches only for records up to 3 (as if a process wrote the rest and died before
    # its flush anchored them): a file with later records stays.
    encrypted_store.set_audit_anchor(Anchor(seq=0, hash=GENESIS_HASH), reset=True)
    third = next(record for record in log.records() if record["seq"] == 3)
    encrypted_store.set_audit_anchor(Anchor(seq=3, hash=third["hash"]))
    event = AuditEvent(operation="audit.prune", actor="ops")
    pruned = log.prune(encrypted_store, event, keep_files=0, dry_run=True)
    assert pruned.files and all(found.path not in unanchored for found in pruned.files)
    assert all(found.last_seq <= 3 for found in pruned.files)


def traced_file_events(
    cli: Cli,
    trace: Path,
    directory: Path,
    *args: str,
    input: bytes = b"",
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Run the CLI under strace; return, in order, its renames of files in `directory` ("rename
    NAME"), its opens that may create one ("create NAME"), its fsyncs of them ("fsync NAME": of a
    descriptor opened under that name) and of `directory` itself ("fsync dir")."""
    strace = ("strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat,rename,renameat,renameat2,fsync")
    proc = cli(*args, input=input, env=env, prefix=strace)
    assert proc.returncode == 0, proc.stderr
    opened: dict[str, str] = {}  # descriptor -> the path it was opened with
    events = []
    for line in trace.read_text().splitlines():
        call = line.partition(" ")[2].strip()
        quoted = call.split('"')
        if call.startswith("openat(") and len(quoted) > 2:
            result = call.rsplit(" = ", 1)[-1].split()[0]
            if result.isdigit():
                opened[result] = quoted[1]
                if quoted[1].startswith(f"{directory}/") and "O_CREAT" in call:
                    events.append(f"create {Path(quoted[1]).name}")
        elif call.startswith("rename") and call.endswith(" = 0") and quoted[1].startswith(f"{directory}/"):
            events.append(f"rename {Path(quoted[1]).name}")
        elif call.startswith("fsync(") and call.endswith(" = 0"):
            path = opened.get(call[len("fsync(") :].split(")")[0], "")
            if path == str(directory):
                events.append("fsync dir")
            elif path.startswith(f"{directory}/"):
                events.append(f"fsync {Path(path).name}")
    return events


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace shows the renames, creates and fsyncs")
def test_a_rotated_or_new_log_file_has_a_durable_name_before_its_records_are_acknowledged(
    tmp_path: Path,
) -> None:
    """A record's fsync keeps its bytes, not the directory entries of the file holding it: a
    rotation renames the live file and creates a new one, and until the directory is fsynced a
    power cut can lose either name, and with it records already fsynced and anchored (verify then
    fails on a log nothing tampered with). The log here has a directory of its own, which SQLite's
    own directory syncs (of the store's directory) do not reach."""
    cli = Cli(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    cli.audit = logs / "audit.jsonl"
    cli.env["SECRETS_MANAGER_AUDIT_FILE"] = str(cli.audit)
    trace = tmp_path / "trace"
    # The log's first file: created by init, named durably before init says it is done.
    events = traced_file_events(cli, trace, logs, "init", "--kdf-profile", "test")
    assert "create audit.jsonl" in events, events
    assert "fsync dir" in events[events.index("create audit.jsonl") :], events
    # A rotation: the full live file renamed, a new one created, both made durable.
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "400"}
    events = traced_file_events(cli, trace, logs, "store", "auth/K", input=b"v", env=small)
    assert "rename audit.jsonl" in events, events
    after = events[events.index("rename audit.jsonl") :]
    assert "create audit.jsonl" in after and "fsync dir" in after[after.index("create audit.jsonl") :], events
    assert len(AuditLog(cli.audit).files()) >= 2
    assert verify(cli).returncode == 0


UNSYNCED_WRITER = """
import os, sys
from secrets_manager.audit import AuditEvent, AuditLog
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
store = EncryptedStore.open(SqliteStorage(sys.argv[1]), PasswordUnlock(sys.argv[3]))
log = AuditLog(sys.argv[2], flush_interval=60)
for n in range(20):
    log.append([AuditEvent("get", "svc", "grpc", None, f"auth/K{n}")], store, durable=False)
os.kill(os.getpid(), 9)  # before its flush: the records are written, and no one fsynced them
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace shows the fsyncs and renames")
def test_a_rotation_fsyncs_the_records_another_writer_left_unsynced_in_the_file_it_renames(
    tmp_path: Path,
) -> None:
    """The service writes its reads' records without fsync and syncs them within its flush interval;
    a durable append of another process fsyncs them too when it writes to the same file. A rotation
    by that process, though, renames the file and fsyncs only the new one, so the service's records
    in the renamed file (never fsynced if the service was killed, or is in its interval) could be
    lost by a power cut while the records after them survive and the anchor vouches for them: a
    chain with a hole, which verify reports as records lost."""
    cli = Cli(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    cli.audit = logs / "audit.jsonl"
    cli.env["SECRETS_MANAGER_AUDIT_FILE"] = str(cli.audit)
    assert cli("init", "--kdf-profile", "test").returncode == 0
    writer = subprocess.run(
        [sys.executable, "-c", UNSYNCED_WRITER, str(cli.store), str(cli.audit), PASSWORD],
        capture_output=True,
        timeout=60,
    )
    assert writer.returncode == -9, writer.stderr
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "2000"}  # the log is over it: the next append rotates
    events = traced_file_events(cli, tmp_path / "trace", logs, "store", "auth/K", input=b"v", env=small)
    assert "rename audit.jsonl" in events, events
    before = events[: events.index("rename audit.jsonl")]
    assert "fsync audit.jsonl" in before, events
    assert verify(cli).returncode == 0


# ---- failure behaviour ---------------------------------------------------------------------


def test_unwritable_audit_log_refuses_get_and_store(cli: Cli, tmp_path: Path) -> None:
    assert cli("store", "svc/SAFE", input=KNOWN_VALUE.encode()).returncode == 0
    before = cli.store_bytes()
    mount_point = tmp_path / "readonly"
    mount_point.mkdir()
    shutil.copy(cli.audit, mount_point / "audit.jsonl")
    if not _mount_readonly_tmpfs_with(mount_point, cli.audit):
        if os.environ.get("CI"):
            pytest.fail("CI must be able to mount a read-only tmpfs (runs as root)")
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        env = {"SECRETS_MANAGER_AUDIT_FILE": str(mount_point / "audit.jsonl")}
        got = cli("get", "svc/SAFE", env=env)
        assert got.returncode != 0 and got.stdout == b""
        assert KNOWN_VALUE.encode() not in got.stderr
        assert "audit" in got.stderr.decode()
        stored = cli("store", "svc/SAFE", input=b"new value", env=env)
        assert stored.returncode != 0
        assert cli.store_bytes() == before
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    assert cli("get", "svc/SAFE").stdout == KNOWN_VALUE.encode() + b"\n"


def _mount_readonly_tmpfs_with(mount_point: Path, source: Path) -> bool:
    """Mount a tmpfs holding a copy of the audit log (and its anchor-matching tail), read-only."""
    staging = mount_point.parent / "staging"
    staging.mkdir()
    shutil.copy(source, staging / "audit.jsonl")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        return False
    shutil.copy(staging / "audit.jsonl", mount_point / "audit.jsonl")
    (mount_point / "audit.jsonl").chmod(0o600)
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
    return True


def test_full_disk_refuses_get_and_store(cli: Cli) -> None:
    assert cli("store", "svc/FULL", input=KNOWN_VALUE.encode()).returncode == 0
    _grow_audit_log(cli, records=300)  # past SQLite's own files, so only the audit log hits the limit
    before = cli.store_bytes()
    limit = cli.audit.stat().st_size  # any write past the current end fails with EFBIG

    def no_room() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    got = cli("get", "svc/FULL", preexec_fn=no_room)
    assert got.returncode == 1 and got.stdout == b""
    assert "audit" in got.stderr.decode()
    stored = cli("store", "svc/FULL", input=b"never stored", preexec_fn=no_room)
    assert stored.returncode == 1
    assert cli.store_bytes() == before
    assert cli.audit.stat().st_size == limit  # no half-written record left behind
    assert verify(cli).returncode == 0


PAGE = 4096  # tmpfs allocates whole pages: a file can grow into the rest of its last one


@pytest.fixture
def log_on_small_tmpfs(tmp_path: Path) -> Iterator[Cli]:
    """A store whose audit log is on a small tmpfs of its own (mounted as root), to be filled."""
    with tmpfs(tmp_path / "small", "256k") as mount_point:
        c = Cli(tmp_path)
        c.audit = mount_point / "store.audit.jsonl"
        c.env["SECRETS_MANAGER_AUDIT_FILE"] = str(c.audit)
        assert c("init", "--kdf-profile", "test").returncode == 0
        yield c


def _fill_leaving(cli: Cli, room: int) -> Path:
    """Pad the log with verifiable records until exactly `room` bytes are left in its last page,
    then fill the rest of its file system: the next `room` bytes of records fit, no more."""
    store = open_store(str(cli.store), PASSWORD.encode(), environment=Environment.DEVELOPMENT, actor="filler")
    log = AuditLog(cli.audit)
    try:
        for _ in range(5):
            if -cli.audit.stat().st_size % PAGE == room:
                break
            before = cli.audit.stat().st_size
            log.append([AuditEvent(operation="list", actor="filler", name="x")], store)
            probe = cli.audit.stat().st_size - before  # a record whose name is one character
            add = (-cli.audit.stat().st_size % PAGE - room) % PAGE
            add += PAGE if add < probe else 0
            log.append([AuditEvent(operation="list", actor="filler", name="x" * (add - probe + 1))], store)
        assert -cli.audit.stat().st_size % PAGE == room
    finally:
        store.close()
        for fd in (log._file[0] if log._file else None, log._lock_fd):  # AuditLog has no close():
            if fd is not None:  # its files on the tmpfs would keep it from being unmounted
                os.close(fd)
    fill = cli.audit.with_name("fill")
    fd = os.open(fill, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(65536))
    except OSError:
        pass
    finally:
        os.close(fd)
    return fill


def _line_sizes(cli: Cli, count: int) -> list[int]:
    return [len(line) for line in cli.audit.read_bytes().splitlines(keepends=True)[-count:]]


def test_a_change_whose_last_record_cannot_be_written_is_reported_as_made(log_on_small_tmpfs: Cli) -> None:
    """Room for the request record only: the store is changed, then its record fails. The CLI said
    "the operation was refused", so a user retried and made a second version."""
    cli = log_on_small_tmpfs
    assert cli("store", "svc/FULL", input=b"first value").returncode == 0
    unlock, pending, done = _line_sizes(cli, 3)
    fill = _fill_leaving(cli, unlock + pending + done // 2)
    stored = cli("store", "svc/FULL", input=b"second value")
    assert stored.returncode == 1 and stored.stdout == b""
    message = stored.stderr.decode()
    assert message.count("\n") == 1 and "refused" not in message
    assert message.startswith("secrets-manager: error: the change was made (store svc/FULL, version 2), ")
    assert f"its audit record could not be written (cannot write audit log {cli.audit}: " in message
    assert "do not make the change again" in message and "'secrets-manager audit verify'" in message
    assert b"second value" not in stored.stderr
    last = cli.records()[-1]
    assert (last["operation"], last["outcome"], last["version"]) == ("store", "pending", None)
    fill.unlink()
    assert cli("get", "svc/FULL").stdout == b"second value\n"  # the change stands
    assert verify(cli).returncode == 0


def test_an_import_whose_records_fail_says_its_secrets_were_written(
    log_on_small_tmpfs: Cli,
) -> None:
    """An import into our store is one commit, then one append of a record per secret: when they
    cannot be written (the log's disk full), every secret is in the store all the same, and the
    message says the change was made, naming the first and last and how many, never "refused"."""
    cli = log_on_small_tmpfs
    env_file = cli.store.parent / "creds.env"
    env_file.write_text("K1=one\nK2=two\nK3=three\nK4=four\n")
    assert cli("import", str(env_file), "--service", "smp").returncode == 0  # same sizes as below
    unlock, pending, first, *_ = _line_sizes(cli, 7)
    fill = _fill_leaving(cli, unlock + pending + first + first // 2)
    imported = cli("import", str(env_file), "--service", "imp")
    assert imported.returncode == 1 and imported.stdout == b""
    message = imported.stderr.decode()
    assert message.count("\n") == 1 and "refused" not in message
    assert message.startswith(
        "secrets-manager: error: the change was made (import imp/K1 … imp/K4 (4 secrets)), but its "
        "audit record could not be written (cannot write audit log "
    ), message
    assert [r["name"] for r in cli.records()[-1:]] == ["imp/"]
    fill.unlink()
    assert cli("list", "imp/").stdout.decode().split() == ["imp/K1", "imp/K2", "imp/K3", "imp/K4"]
    assert verify(cli).returncode == 0


def _grow_audit_log(cli: Cli, records: int) -> None:
    store = open_store(str(cli.store), PASSWORD.encode(), environment=Environment.DEVELOPMENT, actor="filler")
    try:
        AuditLog(cli.audit).append(
            [AuditEvent(operation="list", actor="filler") for _ in range(records)], store
        )
    finally:
        store.close()


def test_stuck_audit_sink_fails_the_request_in_bounded_time(cli: Cli) -> None:
    assert cli("store", "svc/STUCK", input=KNOWN_VALUE.encode()).returncode == 0
    lock = os.open(f"{cli.audit}.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another writer hangs while holding the log
    try:
        started = time.monotonic()
        got = cli("get", "svc/STUCK", env={"SECRETS_MANAGER_AUDIT_TIMEOUT": "1"})
        elapsed = time.monotonic() - started
    finally:
        os.close(lock)
    assert got.returncode == 1 and got.stdout == b""
    assert elapsed < 10
    assert "audit" in got.stderr.decode()


# ---- library level -------------------------------------------------------------------------


def test_the_audit_packages_names_are_pinned_and_log_py_exports_only_its_own() -> None:
    """The SDK, CLI and service import `secrets_manager.audit`'s names: they change only on purpose.
    log.py re-exported every name it held before it was split; callers now import a part's names
    from the module that defines it (or the package), and log.py exports what it defines."""
    assert sorted(audit_package.__all__) == [
        "Anchor",
        "AuditAnchor",
        "AuditError",
        "AuditEvent",
        "AuditLog",
        "AuditPartialRecordError",
        "AuditTamperError",
        "GENESIS_HASH",
        "Head",
        "Pruned",
        "PrunedFile",
        "adopt_log",
        "anchor_a_restored_store",
        "discard_adopted_lock",
        "local_actor",
        "page_token_mac",
        "page_token_macs",
        "read_witness",
        "refuse_files_of_others",
        "value_fingerprint",
        "value_fingerprints",
    ]
    assert all(hasattr(audit_package, name) for name in audit_package.__all__)
    assert audit_log.__all__ == ["AuditLog", "Reset"]
    assert all(getattr(audit_log, name).__module__ == audit_log.__name__ for name in audit_log.__all__)


def test_library_records_chain_and_verify(encrypted_store: EncryptedStore, tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "lib.audit.jsonl")
    for i in range(5):
        log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
    assert log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) == 5
    anchor = encrypted_store.audit_anchor()
    assert anchor is not None and anchor.seq == 5


def test_the_anchor_never_moves_back_except_by_a_reset(encrypted_store: EncryptedStore) -> None:
    """set_audit_anchor had no 'only if newer' check inside its compare-and-set: a writer that
    read an older anchor (a lock shared by mistake, a slow flush) moved it backwards."""
    encrypted_store.set_audit_anchor(Anchor(seq=5, hash="a" * 64))
    encrypted_store.set_audit_anchor(Anchor(seq=3, hash="b" * 64))
    encrypted_store.set_audit_anchor(Anchor(seq=5, hash="c" * 64))
    assert encrypted_store.audit_anchor() == Anchor(seq=5, hash="a" * 64)
    encrypted_store.set_audit_anchor(Anchor(seq=6, hash="d" * 64))
    assert encrypted_store.audit_anchor() == Anchor(seq=6, hash="d" * 64)
    encrypted_store.set_audit_anchor(Anchor(seq=0, hash="0" * 64), reset=True)
    assert encrypted_store.audit_anchor() == Anchor(seq=0, hash="0" * 64)


def test_verify_with_another_stores_key_fails(encrypted_store: EncryptedStore, tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "lib.audit.jsonl")
    log.append([AuditEvent(operation="get", actor="svc")], encrypted_store)
    with pytest.raises(AuditTamperError):
        log.verify(os.urandom(32), encrypted_store.audit_anchor())


def _rewrite_record(path: Path, index: int, edit: Callable[[dict[str, Any]], None], *, rehash: bool) -> None:
    """Record `index` of the log at `path` edited in place as anyone who may write the file could:
    `edit` changes the parsed record, the hash recomputed if `rehash` (the MAC left as written)."""
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[index])
    edit(record)
    if rehash:
        record["hash"] = audit_records.record_hash(record)
    lines[index] = audit_records.canonical(record) + b"\n"
    path.write_bytes(b"".join(lines))


def test_a_record_naming_an_audit_key_the_store_does_not_hold_is_tampering_not_a_crash(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """`key_id` names the audit key a record's MAC is under (1: the store's first). One the store
    does not hold (here 2, on a store never rotated) is a forged or another store's record, said so
    before any MAC is checked: it must not index past the store's keys."""
    path = tmp_path / "lib.audit.jsonl"
    log = AuditLog(path)
    log.append([AuditEvent(operation="get", actor="svc", name="a/1")], encrypted_store)
    assert len(encrypted_store.audit_keys()) == 1
    _rewrite_record(path, 0, lambda record: record.update(key_id=2), rehash=True)
    with pytest.raises(AuditTamperError, match="audit record 1 names an audit key this store does not hold"):
        log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor())


def test_a_record_whose_mac_was_taken_off_is_refused_though_its_hash_and_links_hold(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A record's hash leaves out its MAC, so a MAC set to null leaves hash, chain and anchor as they
    were: only the rule that no record but a denied unlock goes without one catches it. Without it,
    a record after the anchor could be rewritten (and its hash recomputed) by anyone who may write
    the file."""
    path = tmp_path / "lib.audit.jsonl"
    log = AuditLog(path)
    for name in ("a/1", "a/2"):
        log.append([AuditEvent(operation="get", actor="svc", name=name)], encrypted_store)

    def strip_the_mac(record: dict[str, Any]) -> None:
        assert isinstance(record["mac"], str)
        record["mac"] = None

    _rewrite_record(path, 1, strip_the_mac, rehash=False)
    with pytest.raises(AuditTamperError, match="audit record 2 lacks its MAC"):
        log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor())


def test_an_allowed_unlock_whose_mac_was_taken_off_is_refused(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """Only a denied unlock may go without a MAC (its writer could not unlock the store); an
    allowed one was written holding the audit key, as every other record. Mutant: the rule
    `operation == "unlock" and decision == "deny"` without its decision half, so any unlock
    record could lack its MAC; every audit test passed, the MAC'd records they strip being gets.
    The last record here, so the next record's `prev` does not catch it, and the anchor names its
    hash, which a MAC set to null leaves as it was."""
    path = tmp_path / "lib.audit.jsonl"
    log = AuditLog(path)
    log.append([AuditEvent(operation="get", actor="svc", name="a/1")], encrypted_store)
    log.append([AuditEvent(operation="unlock", actor="svc")], encrypted_store)

    def strip_the_mac(record: dict[str, Any]) -> None:
        assert record["decision"] == "allow" and isinstance(record["mac"], str)
        record["mac"] = None

    _rewrite_record(path, 1, strip_the_mac, rehash=False)
    with pytest.raises(AuditTamperError, match="audit record 2 lacks its MAC"):
        log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor())


def test_a_denied_unlock_rewritten_with_its_hash_recomputed_breaks_the_chain_at_the_next_record(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A denied unlock is written without a MAC (its writer could not unlock the store), so anyone
    who may write the file can rewrite it and recompute its hash. Only the next record's `prev`,
    which its MAC covers, still names the record as written: verify must follow that link."""
    path = tmp_path / "lib.audit.jsonl"
    log = AuditLog(path)
    log.append([AuditEvent(operation="get", actor="svc", name="a/1")], encrypted_store)
    log.append(
        [AuditEvent(operation="unlock", actor="intruder", decision="deny", outcome="unlock_failed")], None
    )
    log.append([AuditEvent(operation="get", actor="svc", name="a/2")], encrypted_store)
    assert log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) == 3

    def make_it_look_like_anothers(record: dict[str, Any]) -> None:
        assert record["mac"] is None and record["actor"] == "intruder"
        record["actor"] = "svc"

    _rewrite_record(path, 1, make_it_look_like_anothers, rehash=True)
    with pytest.raises(AuditTamperError, match="audit chain broken at record 3: it does not follow record 2"):
        log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor())


# ---- the one encoding of a record (records.with_hash_and_mac) -------------------------------

# Strings that could fool a splice that looks for `,"name":` in the body: quotes, backslashes, the
# key itself, the fields it inserts, JSON syntax, line breaks, control and non-ASCII characters.
HOSTILE = [
    "",
    '"',
    "\\",
    '\\"',
    '\\\\",',
    ',"name":',
    '","name":"',
    '"mac":',
    ',"mac":null,"name":',
    ',"hash":"' + "0" * 64 + '","mac":null',
    "}",
    '{"name":"x"}',
    "\n",
    "\r\n",
    "\u2028\u2029",
    "\x00\x1f\x7f",
    "ünïcödé ☃ 𝄞 名前",
    "name",
    " , : ",
]


def _hostile_event(pick: Callable[[], str | None], version: int | None) -> AuditEvent:
    return AuditEvent(
        operation=pick() or "get",
        actor=pick() or "",
        source=pick() or "grpc",
        peer=pick(),
        name=pick(),
        version=version,
        decision=pick() or "deny",
        outcome=pick() or "ok",
        value_hmac=pick(),
        request_id=pick() or "r",
    )


def _uniform_event(value: str | None) -> AuditEvent:
    """Every field that can hold `value` holds it."""
    return _hostile_event(lambda: value, None)


def _hostile_events(count: int, seed: int) -> list[AuditEvent]:
    rng = random.Random(seed)

    def pick() -> str | None:
        if rng.random() < 0.2:
            return None
        return "".join(rng.choice(HOSTILE) for _ in range(rng.randint(1, 4)))

    versions = [None, 0, 1, -1, 2**63, 10**30]
    return [_hostile_event(pick, rng.choice(versions)) for _ in range(count)]


def _body_like_write_locked(seq: int, event: AuditEvent, prev: str) -> dict[str, object]:
    """The record as AuditLog._write_locked builds it, before `hash` and `mac`."""
    return {"seq": seq, "time": "2024-02-29T23:59:59.999999+00:00", **vars(event), "prev": prev}


def test_every_record_field_sorts_outside_the_spliced_hash_and_mac() -> None:
    """The splice is only right if no field of a record sorts between "hash" and "mac"."""
    fields = {"seq", "time", "prev", *AuditEvent.__dataclass_fields__}
    assert all(not ("hash" <= key <= "mac") for key in fields)
    first_after_mac = min(k for k in fields if k > "mac")
    assert f',"{first_after_mac}":'.encode() == audit_records._SPLICE_AT


@pytest.mark.parametrize("mac", [None, "f" * 64], ids=["no mac", "mac"])
def test_spliced_line_is_the_canonical_encoding_of_the_whole_record(mac: str | None) -> None:
    events = [_uniform_event(value) for value in [*HOSTILE, None]]
    events += _hostile_events(2000, seed=4)
    previous = GENESIS_HASH
    for seq, event in enumerate(events, start=1):
        body = _body_like_write_locked(seq, event, previous)
        encoded = audit_records.canonical(body)
        record_hash = sha256_hex(encoded)
        line = audit_records.with_hash_and_mac(encoded, record_hash, mac)
        whole = {**body, "hash": record_hash, "mac": mac}
        assert line == audit_records.canonical(whole) + b"\n", (seq, event)
        assert json.loads(line) == whole and line.count(b"\n") == 1
        assert audit_records.record_hash(json.loads(line)) == record_hash
        previous = record_hash


def test_hostile_events_are_written_canonically_and_verify(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    path = tmp_path / "hostile.audit.jsonl"
    log = AuditLog(path, flush_interval=60)
    events = [_uniform_event(value) for value in HOSTILE]
    events += _hostile_events(300, seed=7)
    returned: list[dict[str, object]] = []
    for start in range(0, len(events), 25):
        batch = events[start : start + 25]
        returned += log.append(batch, encrypted_store, durable=start % 50 == 0)
    returned += log.append([AuditEvent("unlock", '"\\\n', decision="deny", outcome="unlock_failed")], None)
    log.flush()
    lines = path.read_bytes().split(b"\n")
    assert lines.pop() == b"" and len(lines) == len(events) + 1
    for line, record in zip(lines, returned, strict=True):
        parsed = json.loads(line)
        assert parsed == record
        assert line == audit_records.canonical(parsed)  # what encoding the whole record gives
    assert log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) == len(events) + 1


# ---- timestamps (AuditLog._timestamp) -------------------------------------------------------


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="microseconds")


def _near(epoch: float, steps: int = 3) -> list[float]:
    """`epoch` and its float neighbours: rounding to the microsecond turns on the last bit."""
    around = [epoch]
    down = up = epoch
    for _ in range(steps):
        down, up = math.nextafter(down, -math.inf), math.nextafter(up, math.inf)
        around += [down, up]
    return around


TIMESTAMP_EDGES = [
    0.0,
    0.0000005,
    0.0000015,
    0.9999994,
    0.9999995,
    1.0,
    59.9999995,
    86399.9999995,  # the end of a day
    951868799.9999995,  # 2000-02-29T23:59:59.9999995: a leap day ends
    1704067199.9999995,  # the end of 2023
    1700000000.0,
    1700000000.0000005,
    1700000000.4999995,
    1700000000.5,
    1700000000.9999994,
    1700000000.9999995,
    1700000000.9999996,
    2147483647.9999995,  # 32-bit time_t's last second
    4102444799.9999995,  # the end of 2099
    253402300798.9999995,  # near the end of year 9999
]


def test_timestamp_is_datetime_isoformat_at_the_edges(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for edge in TIMESTAMP_EDGES:
        for epoch in _near(edge):
            assert log._timestamp(epoch) == _iso(epoch), repr(epoch)
    for edge in reversed(TIMESTAMP_EDGES):  # the other way round: each call changes the cached second
        for epoch in _near(edge):
            assert log._timestamp(epoch) == _iso(epoch), repr(epoch)


def test_timestamp_is_datetime_isoformat_for_random_times(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    rng = random.Random(1)
    for _ in range(20_000):
        epoch = rng.uniform(0, 4.2e9)
        assert log._timestamp(epoch) == _iso(epoch), repr(epoch)
    now = 1_718_000_000
    for _ in range(20_000):  # clustered, as a clock gives them: the cache is hit and missed
        epoch = now + rng.randrange(5) + rng.randrange(1_000_000) / 1e6 + rng.choice([0, 5e-7, -5e-7, 1e-9])
        assert log._timestamp(epoch) == _iso(epoch), repr(epoch)


def test_timestamp_never_serves_a_stale_second(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    second = 1_700_000_000
    assert log._timestamp(second + 0.9999994) == "2023-11-14T22:13:20.999999+00:00"  # caches :20
    assert log._timestamp(second + 0.9999996) == "2023-11-14T22:13:21.000000+00:00"  # rounds into :21
    assert log._timestamp(second + 1.25) == "2023-11-14T22:13:21.250000+00:00"
    assert log._timestamp(second + 0.5) == "2023-11-14T22:13:20.500000+00:00"  # a clock stepped back
    assert log._timestamp(second + 86_400.0) == "2023-11-15T22:13:20.000000+00:00"
    epoch = second + 0.99999
    while epoch < second + 1.00001:  # through the boundary in steps smaller than a microsecond
        assert log._timestamp(epoch) == _iso(epoch), repr(epoch)
        epoch += 3e-7


def test_records_carry_the_clocks_time_across_a_second_boundary(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    ticks = iter([1_700_000_000.9999990, 1_700_000_000.9999996, 1_700_000_001.0000004, 1_700_000_001.5])
    times: list[float] = []

    def clock() -> float:
        times.append(next(ticks))
        return times[-1]

    log = AuditLog(tmp_path / "lib.audit.jsonl", clock=clock)
    written = [log.append([AuditEvent("get", "svc")], encrypted_store)[0] for _ in range(4)]
    assert [r["time"] for r in written] == [_iso(t) for t in times]
    assert [r["time"] for r in written] == [
        "2023-11-14T22:13:20.999999+00:00",
        "2023-11-14T22:13:21.000000+00:00",
        "2023-11-14T22:13:21.000000+00:00",
        "2023-11-14T22:13:21.500000+00:00",
    ]
    assert log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) == 4


# ---- request ids (records.new_request_id) ---------------------------------------------------


def _is_random_uuid(text: str) -> bool:
    parsed = uuid.UUID(text)
    return parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_request_ids_are_unique_random_uuids() -> None:
    ids = [audit_records.new_request_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(_is_random_uuid(text) for text in ids)
    assert len({text[:2] for text in ids}) == 256  # the random bits vary (the first byte, here)
    assert AuditEvent.__dataclass_fields__["request_id"].default_factory is audit_records.new_request_id
    assert AuditEvent("get", "a").request_id != AuditEvent("get", "a").request_id


def test_request_ids_from_many_threads_are_unique() -> None:
    chunks: list[list[str]] = [[] for _ in range(4)]

    def take(chunk: list[str]) -> None:
        chunk.extend(audit_records.new_request_id() for _ in range(10_000))

    threads = [threading.Thread(target=take, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [text for chunk in chunks for text in chunk]
    assert len(ids) == 40_000 and len(set(ids)) == 40_000


def test_a_forked_child_never_hands_out_the_parents_request_ids() -> None:
    audit_records.new_request_id()  # a buffer is in use, so the child inherits one
    count = 600  # more than one buffer (256 ids)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os-level calls, and always os._exit
        code = 1
        try:
            os.close(read_end)
            data = "\n".join(audit_records.new_request_id() for _ in range(count)).encode()
            while data:
                data = data[os.write(write_end, data) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    parents = [audit_records.new_request_id() for _ in range(count)]
    with os.fdopen(read_end, "rb") as pipe:
        childs = pipe.read().decode().split("\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(childs) == count and all(_is_random_uuid(text) for text in childs)
    assert not set(parents) & set(childs)


def test_a_read_waits_one_timeout_in_all_while_the_log_is_stuck_and_this_process_busy_with_it(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A read's record waited the timeout for this process's lock (held by the worker, whose
    flush waited on a stuck writer), then as long again for the worker: a service answered after
    twice its audit timeout (CI: 3.0 s with 1.5 s). One deadline covers both now."""
    path = tmp_path / "stuck.audit.jsonl"
    log = AuditLog(path, timeout=1.0)
    log.append([AuditEvent(operation="get", actor="svc", name="a/1")], encrypted_store)
    lock = os.open(tmp_path / "stuck.audit.jsonl.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another writer hangs while holding the log
    held = threading.Event()

    def busy() -> None:  # as the worker does for a flush: this process's lock, for 0.8 s
        with log._lock:
            held.set()
            time.sleep(0.8)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        held.wait(5)
        started = time.monotonic()
        with pytest.raises(AuditError) as refused:
            log.append([AuditEvent(operation="get", actor="svc", name="a/2")], encrypted_store, durable=False)
        waited = time.monotonic() - started
        assert refused.value.timed_out
        assert waited < 1.4, f"refused after {waited:.2f} s with a 1 s audit timeout"
    finally:
        worker.join()
        os.close(lock)


def test_audit_prune_removes_nothing_while_the_store_cannot_anchor_its_record(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """The prune record is to be anchored before any file goes (docs/audit.md §5a). With another
    writer holding the store's lock, the anchor update gave up and the record was owed, but the
    prune went on deleting files: a record cut from the end then left a chain beginning after
    them with nothing to say why. It is refused instead, every file left in place."""
    log = AuditLog(tmp_path / "lib.audit.jsonl", max_bytes=800, timeout=1)
    for i in range(12):
        log.append([AuditEvent(operation="get", actor="svc", name=f"a/{i}")], encrypted_store)
    before = {path: path.read_bytes() for path in log.files() if path != log.path}
    assert len(before) >= 2
    holder = sqlite3.connect(encrypted_store._storage.path, isolation_level=None)  # type: ignore[attr-defined]
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the store's lock
    try:
        with pytest.raises(AuditError, match="audit prune removed nothing: its record could not be"):
            log.prune(encrypted_store, AuditEvent(operation="audit.prune", actor="ops"), keep_files=0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert {path: path.read_bytes() for path in before} == before  # every rotated file still there
    pruned = log.prune(encrypted_store, AuditEvent(operation="audit.prune", actor="ops"), keep_files=0)
    assert pruned.files  # the store free again: the prune goes ahead
    assert log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) > 0


# ---- archives and a witness off the host -----------------------------------------------------


def test_verify_with_archive_walks_the_pruned_files_and_the_log_as_one_chain(
    cli: Cli, tmp_path: Path
) -> None:
    """`audit prune --archive DIR` kept the pruned files, but nothing checked them: an auditor
    could not show that DIR and the log form one chain from record 1, or that an archived file
    was altered. `audit verify --archive DIR` walks DIR's files of the log first."""
    files = _rotated_log(cli)
    archive = tmp_path / "archive"
    archive.mkdir()
    assert cli("audit", "prune", "--keep-files", "1", "--archive", str(archive)).returncode == 0
    archived = sorted(archive.iterdir())
    assert len(archived) == len(files) - 2
    total = len(list(AuditLog(cli.audit).records())) + sum(len(p.read_text().splitlines()) for p in archived)
    walked = cli("audit", "verify", "--archive", str(archive))
    assert walked.returncode == 0, walked.stderr
    in_log = len(AuditLog(cli.audit).files())
    assert walked.stdout.decode() == (
        f"audit log verified: {total} records in {in_log + len(archived)} files "
        f"({len(archived)} files of them from {archive})\n"
    )
    # An archived record edited, or an archived file gone, is reported as in the log itself.
    original = archived[1].read_bytes()
    lines = original.decode().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["actor"] = "someone-else"
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    archived[1].write_text("".join(lines))
    edited = cli("audit", "verify", "--archive", str(archive))
    assert (
        edited.returncode == 6
        and b"was edited" in edited.stderr
        and archived[1].name.encode() in edited.stderr
    )
    assert edited.stderr.count(b"\n") == 1
    archived[1].unlink()
    gone = cli("audit", "verify", "--archive", str(archive))
    assert gone.returncode == 6 and b"audit chain broken" in gone.stderr, gone.stderr
    archived[1].write_bytes(original)
    archived[0].unlink()  # the first file: records 1 on
    first = json.loads(archived[1].read_text().splitlines()[0])["seq"]
    begins = cli("audit", "verify", "--archive", str(archive))
    assert begins.returncode == 6
    assert f"records 1 to {first - 1} are in neither {archive} nor the log".encode() in begins.stderr
    assert verify(cli).returncode == 0  # without --archive the prune record vouches for the start


def test_verify_with_archive_checks_a_copy_a_killed_prune_left_beside_the_file(
    cli: Cli, tmp_path: Path
) -> None:
    """A file still in the log and in the archive (a prune killed between copying and removing
    it) is walked once, from the log; a copy that differs from it is reported."""
    files = _rotated_log(cli)
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copyfile(files[0], archive / files[0].name)
    both = cli("audit", "verify", "--archive", str(archive))
    assert both.returncode == 0, both.stderr
    assert f"in {len(files)} files (0 files of them from".encode() in both.stdout
    (archive / files[0].name).write_bytes(files[0].read_bytes().replace(b'"svc/K0"', b'"svc/KX"'))
    differs = cli("audit", "verify", "--archive", str(archive))
    assert differs.returncode == 6 and b"is not a copy of the log's" in differs.stderr, differs.stderr


def test_verify_with_archive_refuses_a_directory_that_is_not_there(cli: Cli, tmp_path: Path) -> None:
    missing = cli("audit", "verify", "--archive", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.count(b"\n") == 1
    assert b"archive directory" in missing.stderr and b"does not exist" in missing.stderr


HEAD_LINE = r"secrets-manager-audit-head/1 seq=(\d+) time=(\S+) hash=([0-9a-f]{64}) mac=([0-9a-f]{64})"


def _head(cli: Cli) -> str:
    printed = cli("audit", "head")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.count(b"\n") == 1
    return printed.stdout.decode().strip()


def test_a_witnessed_head_catches_the_store_and_its_log_rolled_back_together(
    cli: Cli, tmp_path: Path
) -> None:
    """docs/audit.md §7: a store restored together with its log (an older copy of both, a VM
    snapshot reverted) verifies, and the records written since are gone without a trace. A head
    `audit head` printed and shipped off the host names the newest record; `audit verify
    --witness` fails (exit 6) once the log no longer holds it, and passes while the log grows."""
    import re

    busy_session(cli)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(cli.store.parent, snapshot)
    assert cli("store", "auth/LATER", input=b"v").returncode == 0
    before = cli.audit.read_bytes()
    line = _head(cli)
    assert cli.audit.read_bytes() == before  # `audit head` only reads: not itself recorded
    found = re.fullmatch(HEAD_LINE, line)
    assert found is not None, line
    last = cli.records()[-1]
    assert (int(found[1]), found[2], found[3]) == (last["seq"], last["time"], last["hash"])
    assert KNOWN_VALUE not in line
    assert cli("get", "auth/LATER").returncode == 0  # the log grows past the head
    grown = cli("audit", "verify", "--witness", line)
    assert grown.returncode == 0, grown.stderr
    assert f"it holds the witnessed head, record {last['seq']}".encode() in grown.stdout
    # Store and log rolled back together: everything local still verifies.
    shutil.rmtree(cli.store.parent)
    shutil.copytree(snapshot, cli.store.parent)
    assert verify(cli).returncode == 0 and cli("status").returncode == 0
    rolled = cli("audit", "verify", "--witness", line)
    assert rolled.returncode == 6 and rolled.stderr.count(b"\n") == 1
    assert f"the witnessed head is record {last['seq']}".encode() in rolled.stderr
    assert b"rolled back or cut" in rolled.stderr
    # Written again past that seq after the rollback: the record there is another one.
    for i in range(3):
        assert cli("store", f"auth/AFTER{i}", input=b"v").returncode == 0
    forked = cli("audit", "verify", "--witness", line)
    assert (
        forked.returncode == 6
        and f"audit record {last['seq']} is not the one the witnessed head".encode() in (forked.stderr)
    )


def test_a_witness_file_counts_its_last_head_and_bad_heads_are_refused(cli: Cli, tmp_path: Path) -> None:
    """--witness FILE: the file cron appends heads to (or syslog's, with its prefixes); the last
    head line counts. A head edited, or another store's, is exit 6; no head at all is exit 2."""
    first = _head(cli)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(cli.store.parent, snapshot)
    assert cli("store", "auth/X", input=b"v").returncode == 0
    second = _head(cli)
    witness = tmp_path / "heads.log"
    witness.write_text(
        f"Dec  1 12:00:01 host sm-head: {first}\nunrelated line\nDec  1 12:05:01 host sm-head: {second}\n"
    )
    assert cli("audit", "verify", "--witness", str(witness)).returncode == 0
    seq = int(second.split(" seq=")[1].split()[0])
    live = tmp_path / "live"
    cli.store.parent.rename(live)
    shutil.copytree(snapshot, cli.store.parent)  # the state of the first head: it verifies
    assert cli("audit", "verify", "--witness", first).returncode == 0
    cut = cli("audit", "verify", "--witness", str(witness))
    assert cut.returncode == 6 and f"witnessed head is record {seq}".encode() in cut.stderr, cut.stderr
    shutil.rmtree(cli.store.parent)
    live.rename(cli.store.parent)
    mac = second.rsplit("mac=", 1)[1]
    forged = second.replace(f"seq={seq} ", f"seq={seq - 1} ")
    edited = cli("audit", "verify", "--witness", forged)
    assert edited.returncode == 6 and b"was not made with this store's audit key" in edited.stderr
    other = Cli(tmp_path / "other")
    assert other("init", "--kdf-profile", "test").returncode == 0
    foreign = cli("audit", "verify", "--witness", _head(other))
    assert foreign.returncode == 6 and b"another store's head" in foreign.stderr
    for bad, says in [
        (second.replace(mac, mac[:-1]), b"does not hold a whole audit head"),
        (str(tmp_path / "no-such-file"), b"No such file or directory"),
        (str(cli.audit), b"holds no audit head"),
        (str(tmp_path), b"not a regular file"),
    ]:
        refused = cli("audit", "verify", "--witness", bad)
        assert refused.returncode == 2 and says in refused.stderr and refused.stderr.count(b"\n") == 1, (
            bad,
            refused.stderr,
        )


def test_a_witnessed_head_that_was_pruned_is_checked_in_the_archive(cli: Cli, tmp_path: Path) -> None:
    line = _head(cli)
    _rotated_log(cli)
    archive = tmp_path / "archive"
    archive.mkdir()
    assert cli("audit", "prune", "--keep-files", "0", "--archive", str(archive)).returncode == 0
    pruned = cli("audit", "verify", "--witness", line)
    assert (
        pruned.returncode == 6 and b"pruned from the log" in pruned.stderr and b"--archive" in pruned.stderr
    )
    found = cli("audit", "verify", "--witness", line, "--archive", str(archive))
    assert found.returncode == 0, found.stderr


def test_audit_head_prints_no_head_for_a_log_that_does_not_verify(cli: Cli) -> None:
    """docs/audit.md §7a: a head vouches for the chain before it, so a damaged log gets none."""
    busy_session(cli)
    lines = cli.audit.read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["actor"] = "someone-else"
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    cli.audit.write_text("".join(lines))
    refused = cli("audit", "head")
    assert refused.returncode == 6 and refused.stdout == b"" and b"was edited" in refused.stderr
    assert refused.stderr.count(b"\n") == 1


@pytest.mark.parametrize(
    ("text", "through_the_second"),
    [
        ("2026-03-20T23:59:59Z", True),
        ("2026-03-20T23:59:59+01:00", True),
        ("20260320T235959Z", True),
        ("2026-03-21", False),  # a date is its midnight, not its first second
        ("2026-03-20T23:59Z", False),
        ("2026-03-20T23:59:59.5Z", False),
        ("2026-03-20T23:59:59,000Z", False),
        ("7d", False),
    ],
)
def test_audit_show_until_widens_only_a_time_written_to_the_second(
    text: str, through_the_second: bool
) -> None:
    """Only a time written to the second, as the table prints one, covers that whole second: a date
    alone, `--until 2026-03-21`, once kept the records of that day's first second as well."""
    moment = datetime(2026, 3, 21, tzinfo=UTC)
    widened = audit_commands._through_its_second(text, moment)
    assert widened == (moment.replace(microsecond=999_999) if through_the_second else moment)
