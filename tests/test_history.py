"""Randomised, recorded histories of concurrent clients, checked as Jepsen/Elle check theirs.

Several client processes (tests/history_worker.py) run random operations on a few names for a
bounded time, on the embedded SQLite store (the Python API in several processes, and the CLI), on
PostgreSQL, and through two `serve` replicas on one PostgreSQL store (real mutual TLS), some with
faults: a client SIGKILLed mid-operation, a replica SIGKILLed, PostgreSQL connections ended by
pg_terminate_backend. tests/history_checker.py then checks the history and the state left.
Beside them an operator's client (tests/history_maintenance.py) rotates keys and the root key,
rewraps, retires keys and changes the master password through the CLI, some of it SIGKILLed
part-way, and sweeps every version by number; the other clients unlock with the password file it
rewrites (or, one of them, with the password they started with), and record which.

Each run is seeded: HISTORY_SEED=N reruns one, and a failure names its seed and the anomalies
with the operations that show them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from history_checker import FinalSecret, Op, check, ops_from_records
from secrets_manager.crypto import kdf
from secrets_manager.errors import NotFoundError
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from service_fixtures import PASSWORD, POLICY, SCRIPT, Server, make_pki, start_server

WORKER = Path(__file__).with_name("history_worker.py")
PREFIX = "hist/"
NAMES = [f"{PREFIX}{letter}" for letter in "abcde"]
MAX_VERSIONS = 100
API_WEIGHTS = {"get": 30, "get_version": 8, "put": 15, "cas": 15, "list": 4, "delete": 3, "cdelete": 3,
               "undelete": 7, "destroy": 3, "rotate": 4, "cp": 2, "mv": 2}  # fmt: skip
RPC_WEIGHTS = {kind: weight for kind, weight in API_WEIGHTS.items() if kind != "destroy"}  # not offered
CLI_WEIGHTS = {"get": 20, "get_version": 5, "put": 10, "cas": 10, "list": 4, "delete": 2, "cdelete": 2,
               "undelete": 6, "destroy": 2, "cp": 4, "mv": 3}  # fmt: skip
DURATION = float(os.environ.get("HISTORY_SECONDS", "10"))


def run_seed() -> int:
    return int(os.environ.get("HISTORY_SEED") or random.SystemRandom().randrange(1 << 32))


def create_names(store: EncryptedStore) -> None:
    for name in NAMES:
        store.put(name, f"setup-{name}".encode(), max_versions=MAX_VERSIONS)


def setup_ops() -> list[Op]:
    return [Op("setup", "put", name, -2.0, -1.0, "ok", value=f"setup-{name}", version=1) for name in NAMES]


def final_state(store: EncryptedStore) -> dict[str, FinalSecret]:
    """Every name's versions and values, read once the clients stopped (deleted ones undeleted)."""
    final: dict[str, FinalSecret] = {}
    for meta in store.list(PREFIX, include_deleted=True):
        if meta.deleted is not None:
            store.undelete(meta.name)
        versions: dict[int, str | None] = {}
        for info in meta.versions:
            try:
                versions[info.version] = store.get(meta.name, version=info.version).value.reveal().decode()
            except NotFoundError:
                versions[info.version] = None  # destroyed
        final[meta.name] = FinalSecret(meta.deleted is not None, meta.current_version, versions)
    return final


class Run:
    """The client processes of one history, each writing its own record file."""

    def __init__(self, directory: Path, seed: int) -> None:
        self.directory = directory
        self.seed = seed
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, process: str, target: dict[str, Any], weights: dict[str, int], duration: float) -> None:
        config = {
            "process": process,
            "seed": self.seed * 1000 + len(self.processes),
            "names": NAMES,
            "prefix": PREFIX,
            "weights": weights,
            "duration": duration,
            "target": target,
            "out": str(self.directory / f"history-{process}.jsonl"),
        }
        self.processes[process] = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "false"},
            start_new_session=True,  # a SIGKILL of its group ends a CLI it is waiting for too
        )

    def kill(self, process: str) -> None:
        os.killpg(self.processes[process].pid, signal.SIGKILL)

    def wait(self, timeout: float = 120) -> None:
        """Every client's end, at most `timeout` seconds from now in all; a client still running
        then (an operation that never returned) fails the run with its last records, the others
        killed, rather than leaving processes behind."""
        deadline = time.monotonic() + timeout
        for process, proc in self.processes.items():
            try:
                _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Each client still running writes its threads' stacks to its stderr (SIGUSR1,
                # history_worker.py's faulthandler) before it is killed: where it hung. Its last
                # records are read first: a client that was only slow goes on in the second
                # given to the dumps.
                running = [name for name, other in self.processes.items() if other.poll() is None]
                last: dict[str, list[str]] = {}
                for name in running:
                    records = self.directory / f"history-{name}.jsonl"
                    last[name] = records.read_text().splitlines()[-3:] if records.exists() else []
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.processes[name].pid, signal.SIGUSR1)
                time.sleep(1)
                for other in self.processes.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(other.pid, signal.SIGKILL)
                report = []
                for name in running:
                    _, err = self.processes[name].communicate()
                    report.append(
                        f"client {name}: its last records: {last[name]}; its stderr: {err.decode()[-8000:]}"
                    )
                raise AssertionError(
                    f"client {process} still running {timeout:.0f} s on (seed {self.seed}); "
                    + "\n".join(report)
                ) from None
            if proc.returncode not in (0, -signal.SIGKILL):
                raise AssertionError(f"client {process} failed (seed {self.seed}): {err.decode()[-2000:]}")

    def ops(self) -> list[Op]:
        records: list[dict[str, Any]] = []
        for path in sorted(self.directory.glob("history-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a client killed mid-write
                    continue
        return setup_ops() + ops_from_records(records)


def assert_consistent(run: Run, final: dict[str, FinalSecret]) -> list[Op]:
    ops = run.ops()
    anomalies = check(ops, final, max_versions=MAX_VERSIONS)
    assert not anomalies, f"seed {run.seed} (rerun with HISTORY_SEED={run.seed}): " + "\n".join(
        anomalies[:20]
    )
    return ops


def summary(ops: list[Op]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[f"{op.kind}:{op.status}"] = counts.get(f"{op.kind}:{op.status}", 0) + 1
    return counts


# ---- the checker can fail ----------------------------------------------------------------------


def _put(process: str, name: str, value: str, version: int, start: float, end: float, **extra: Any) -> Op:
    return Op(process, "put", name, start, end, "ok", value=value, version=version, **extra)


def test_the_checker_passes_a_history_a_serial_store_could_give() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _put("b", "x", "x2", 2, 2, 3, expect=1),
        Op("c", "get", "x", 4, 5, "ok", value="x2", version=2),
        Op("c", "put", "x", 6, 7, "fail", value="x3", expect=1, error="conflict"),
        Op("a", "delete", "x", 8, 9, "ok"),
        Op("b", "get", "x", 10, 11, "fail", error="not_found"),
    ]
    final = {"x": FinalSecret(True, 2, {1: "x1", 2: "x2"})}
    assert check(ops, final) == []


def test_the_checker_finds_a_lost_write() -> None:
    ops = [_put("a", "x", "x1", 1, 0, 1), _put("b", "x", "x2", 2, 2, 3)]
    anomalies = check(ops, {"x": FinalSecret(False, 1, {1: "x1"})})
    assert any(a.startswith("lost write: x v2") for a in anomalies), anomalies


def test_the_checker_finds_a_duplicate_version() -> None:
    ops = [_put("a", "x", "x1", 1, 0, 1), _put("b", "x", "x2", 1, 0.5, 1.5)]
    anomalies = check(ops, {"x": FinalSecret(False, 1, {1: "x2"})})
    assert any(a.startswith("duplicate version") for a in anomalies), anomalies


def test_the_checker_finds_a_write_applied_twice() -> None:
    ops = [_put("a", "x", "x1", 1, 0, 1), Op("b", "put", "x", 2, 3, "info", value="x2")]
    anomalies = check(ops, {"x": FinalSecret(False, 3, {1: "x1", 2: "x2", 3: "x2"})})
    assert any(a.startswith("write applied twice: x v2 and v3") for a in anomalies), anomalies


def test_the_checker_finds_a_stale_read() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _put("a", "x", "x2", 2, 2, 3),
        Op("b", "get", "x", 4, 5, "ok", value="x1", version=1),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 2, {1: "x1", 2: "x2"})})
    assert any(a.startswith("stale read: x v1") for a in anomalies), anomalies


def test_the_checker_finds_a_refused_compare_and_set_that_was_applied() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _put("a", "x", "x2", 2, 2, 3),
        Op("b", "put", "x", 4, 5, "fail", value="x3", expect=1, error="conflict"),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 3, {1: "x1", 2: "x2", 3: "x3"})})
    assert any(a.startswith("refused write applied") for a in anomalies), anomalies


def test_the_checker_finds_a_compare_and_set_refused_while_its_version_was_current() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        Op("b", "put", "x", 2, 3, "fail", value="x2", expect=1, error="conflict"),
        Op("b", "put", "x", 4, 5, "fail", value="x3", error="conflict"),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 1, {1: "x1"})})
    assert any(a.startswith("compare-and-set refused while v1 of x was current") for a in anomalies), (
        anomalies
    )
    assert any(a.startswith("write refused as if deleted: x") for a in anomalies), anomalies


def test_the_checker_finds_a_delete_and_an_undelete_that_found_the_wrong_state() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        Op("a", "delete", "x", 2, 3, "ok"),
        Op("b", "delete", "x", 4, 5, "ok"),
        _put("a", "y", "y1", 1, 0, 1),
        Op("b", "undelete", "y", 4, 5, "ok"),
    ]
    anomalies = check(ops, {"x": FinalSecret(True, 1, {1: "x1"}), "y": FinalSecret(False, 1, {1: "y1"})})
    assert any(a.startswith("delete of a deleted secret acknowledged: x") for a in anomalies), anomalies
    assert any(a.startswith("undelete acknowledged of a live y") for a in anomalies), anomalies


def test_the_checker_finds_a_compare_and_set_that_succeeded_on_a_stale_version() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _put("a", "x", "x2", 2, 2, 3),
        _put("b", "x", "x3", 3, 4, 5, expect=1),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 3, {1: "x1", 2: "x2", 3: "x3"})})
    assert any(a.startswith("compare-and-set on a stale version") for a in anomalies), anomalies


def test_the_checker_finds_reads_of_a_deleted_secret_a_value_never_written_and_a_destroyed_version() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        Op("a", "delete", "x", 2, 3, "ok"),
        Op("b", "get", "x", 4, 5, "ok", value="x1", version=1),
        Op("b", "get", "x", 6, 7, "ok", value="nobody-wrote-this", version=1, asked=1),
        _put("a", "y", "y1", 1, 0, 1),
        _put("a", "y", "y2", 2, 2, 3),
        Op("a", "destroy", "y", 4, 5, "ok", version=1),
        Op("b", "get", "y", 6, 7, "ok", value="y1", version=1, asked=1),
    ]
    anomalies = check(
        ops, {"x": FinalSecret(True, 1, {1: "x1"}), "y": FinalSecret(False, 2, {1: None, 2: "y2"})}
    )
    assert any(a.startswith("read of a deleted secret") for a in anomalies), anomalies
    assert any(a.startswith("read of a value never written") for a in anomalies), anomalies
    assert any(a.startswith("read of a destroyed version: y v1") for a in anomalies), anomalies


def test_the_checker_finds_a_copy_of_a_stale_version_and_a_copy_of_the_wrong_value() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _put("a", "x", "x2", 2, 2, 3),
        Op("b", "cp", "x", 4, 5, "ok", to="y", version=1, from_version=1),
        Op("b", "cp", "x", 6, 7, "ok", to="y", version=2, from_version=2),
    ]
    anomalies = check(
        ops, {"x": FinalSecret(False, 2, {1: "x1", 2: "x2"}), "y": FinalSecret(False, 2, {1: "x1", 2: "x1"})}
    )
    assert any(a.startswith("stale read: x v1") for a in anomalies), anomalies
    assert any(a.startswith("wrong copy: y v2") for a in anomalies), anomalies


def test_the_checker_finds_an_unknown_outcome_raised_as_another_error() -> None:
    said = "store …: the connection ended before the answer to COMMIT came; the change may have been made"
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        Op("a", "promote", "x", 2, 3, "info", version=1, error=f"StorageError: {said}"),
        Op("a", "promote", "x", 4, 5, "info", version=1, error=f"OutcomeUnknownError: {said}"),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 1, {1: "x1"})})
    assert [a.split(";")[0] for a in anomalies] == ["unknown outcome raised as StorageError"], anomalies


def test_an_unfinished_operation_is_of_unknown_outcome() -> None:
    records = [
        {"p": "a", "i": 1, "t": "invoke", "f": "put", "name": "x", "value": "x1", "time": 0.0},
        {"p": "a", "i": 2, "t": "invoke", "f": "put", "name": "x", "value": "x2", "time": 1.0},
        {"p": "a", "i": 1, "t": "ok", "version": 1, "time": 0.5},
    ]
    first, second = ops_from_records(records)
    assert (first.status, first.version, first.value) == ("ok", 1, "x1")
    assert (second.status, second.complete) == ("info", float("inf"))
    # Its write may have landed, or not: both final states are explainable.
    assert check([first, second], {"x": FinalSecret(False, 2, {1: "x1", 2: "x2"})}) == []
    assert check([first, second], {"x": FinalSecret(False, 1, {1: "x1"})}) == []


def _maint(kind: str, start: float, end: float, status: str = "ok", **extra: Any) -> Op:
    return Op("maint0", kind, "hist", start, end, status, extra=extra)


def _sweep(start: float, end: float, versions: dict[str, dict[str, list[Any]]], keys: list[list[Any]],
           errors: list[str] = ()) -> Op:  # type: ignore[assignment]  # fmt: skip
    return _maint("sweep", start, end, versions=versions, keys=keys, errors=list(errors))


def test_the_checker_finds_a_value_that_no_longer_decrypts_after_a_rewrap() -> None:
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _maint("keys_rotate", 2, 3, key=22),
        _maint("keys_rewrap", 4, 5),
        Op("b", "get", "x", 6, 7, "info", asked=1, error="IntegrityError: version 1 of 'x' is damaged"),
        _sweep(8, 9, {}, [], errors=["x v1: IntegrityError: version 1 of 'x' is damaged"]),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 1, {1: "x1"})})
    assert any(a.startswith("integrity error after #2 maint0 keys_rewrap") for a in anomalies), anomalies
    assert any(a.startswith("integrity error in a sweep: x v1") for a in anomalies), anomalies


def test_the_checker_finds_a_version_lost_or_changed_by_a_rewrap() -> None:
    keys = [[11, "enabled", 0], [22, "primary", 1]]
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _put("a", "x", "x2", 2, 0, 1),
        _maint("keys_rotate", 2, 3, key=22),
        _maint("keys_rewrap", 4, 5),
        _sweep(6, 7, {"x": {"2": ["x1", 22]}}, keys),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 2, {1: "x1", 2: "x2"})})
    assert any(
        a.startswith("version lost: x v1") and "after #3 maint0 keys_rewrap" in a for a in anomalies
    ), anomalies
    assert any(a.startswith("version changed: x v2 reads x1") for a in anomalies), anomalies


def test_the_checker_finds_a_write_under_an_old_key_and_a_record_a_rewrap_skipped() -> None:
    keys = [[11, "enabled", 1], [22, "primary", 1]]
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _maint("keys_rotate", 2, 3, key=22),
        _put("a", "x", "x2", 2, 4, 5),  # began after key 22 was primary, sealed by key 11 below
        _sweep(6, 7, {"x": {"1": ["x1", 22], "2": ["x2", 11]}}, keys),
        _maint("keys_rewrap", 8, 9),
        _sweep(10, 11, {"x": {"1": ["x1", 11], "2": ["x2", 22]}}, keys),
        _maint("keys_status", 12, 13, keys=keys),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 2, {1: "x1", 2: "x2"})})
    assert any(a.startswith("write acknowledged under an old key generation: x v2") for a in anomalies), (
        anomalies
    )
    assert any(a.startswith("rewrap skipped: x v1 is sealed by key 11") for a in anomalies), anomalies
    assert any(
        a.startswith("rewrap skipped: keys status counts 1 record(s) under key 11") for a in anomalies
    ), anomalies


def test_the_checker_passes_records_left_under_an_old_key_by_a_rotation_during_the_rewrap() -> None:
    keys = [[11, "enabled", 0], [22, "enabled", 1], [33, "primary", 1]]
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _maint("keys_rotate", 2, 3, key=22),
        _maint("keys_rewrap", 4, 8),
        _maint("keys_rotate", 5, 6, key=33),
        _sweep(9, 10, {"x": {"1": ["x1", 22]}}, keys),
        _maint("keys_status", 11, 12, keys=keys),
    ]
    assert check(ops, {"x": FinalSecret(False, 1, {1: "x1"})}) == []


def test_the_checker_finds_keys_status_inconsistent_with_the_key_commands() -> None:
    keys = [[11, "primary", 1], [22, "enabled", 0]]
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _maint("keys_rotate", 2, 3, key=22),
        _maint("keys_disable", 4, 5, key=11),
        _maint("keys_status", 6, 7, keys=keys),
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 1, {1: "x1"})})
    assert any(a.startswith("keys status inconsistent: key 22, made primary") for a in anomalies), anomalies
    assert any(
        a.startswith("keys status inconsistent: key 11 is primary after keys_disable") for a in anomalies
    ), anomalies


def test_the_checker_finds_a_passwd_that_leaves_a_client_unable_to_unlock() -> None:
    refused = "unlock: ConflictError: the store's root key was rotated and its master password changed"
    ops = [
        _put("a", "x", "x1", 1, 0, 1),
        _maint("passwd", 2, 3, pw=0, new_pw=1),
        # A new process with the new password, refused; one with the old while passwd ran: allowed.
        Op("c", "get", "x", 4, 5, "fail", error="unlock: exit 4: wrong master password", extra={"pw": 1}),
        Op("c", "get", "x", 2.5, 3.5, "fail", error="unlock: exit 4: wrong master password", extra={"pw": 0}),
        # A running handle after passwd alone (its root key unchanged), refused.
        Op("b", "get", "x", 6, 7, "fail", error=refused, extra={"pw": 0}),
        # A handle that reads its file again, refused long after the file held the new password.
        _maint("keys_rotate_root", 8, 9),
        Op("d", "get", "x", 20, 21, "fail", error=refused, extra={"pw": "renew"}),
        # ... and one refused just after the rotation: allowed (its file, its 5 s between tries).
        Op("d", "get", "x", 8.5, 9.5, "fail", error=refused, extra={"pw": "renew"}),
        Op("b", "get", "x", 10, 11, "fail", error=refused, extra={"pw": 0}),  # allowed: restart it
    ]
    anomalies = check(ops, {"x": FinalSecret(False, 1, {1: "x1"})})
    unlocks = sorted(a.split(";")[0] for a in anomalies)
    assert unlocks == [
        "unlock refused where the README says it works: a handle that reads its password file again",
        "unlock refused where the README says it works: a new process with password generation 1",
        "unlock refused where the README says it works: a running handle opened with password generation 0",
    ], anomalies


def test_the_checker_checks_a_long_history_in_a_bounded_cpu_time() -> None:
    """A read that found a secret deleted (or live) was checked against every write (or delete)
    before it, each against every op for one that undid it: cubic in a name's ops. A 10 s run's
    3,334 ops took 6 s of CPU, 214 s on a loaded 2-core machine, past the run's timeout. 1,500
    ops of puts, reads, deletes and undeletes took 10 s of CPU; CPU time, not wall, so load
    does not matter."""
    cycles = 300
    ops: list[Op] = []
    for cycle in range(cycles):
        t, value = cycle * 10.0, f"x{cycle}"
        ops += [
            _put("a", "x", value, cycle + 1, t, t + 1),
            Op("b", "get", "x", t + 2, t + 3, "ok", value=value, version=cycle + 1),
            Op("a", "delete", "x", t + 4, t + 5, "ok"),
            Op("b", "get", "x", t + 6, t + 7, "fail", error="not_found"),
            Op("a", "undelete", "x", t + 8, t + 9, "ok"),
        ]
    final = {"x": FinalSecret(False, cycles, {cycle + 1: f"x{cycle}" for cycle in range(cycles)})}
    started = time.process_time()
    assert check(ops, final, max_versions=cycles + 10) == []
    assert time.process_time() - started < 2.0
    # and it still finds a read of a deleted secret among them
    last = (cycles - 1) * 10.0  # its delete ended at +5, its undelete began at +8
    ops.append(Op("c", "get", "x", last + 6, last + 7, "ok", value=f"x{cycles - 1}", version=cycles))
    anomalies = check(ops, final, max_versions=cycles + 10)
    assert any(a.startswith("read of a deleted secret: x") for a in anomalies), anomalies


# ---- the embedded SQLite store -----------------------------------------------------------------


def start_api_and_cli_clients(run: Run, api: dict[str, Any], cli: dict[str, Any]) -> None:
    """Three clients of the Python store API (api0-2) and one of the CLI (cli0), for DURATION."""
    for index in range(3):
        run.start(f"api{index}", api, API_WEIGHTS, DURATION)
    run.start("cli0", cli, CLI_WEIGHTS, DURATION)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "secrets.db"
    store = EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        create_names(store)
    finally:
        store.close()
    return path


def sqlite_targets(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    api = {"kind": "sqlite", "path": str(path), "password": PASSWORD}
    cli = {
        "kind": "cli",
        "command": [str(SCRIPT), "--store", str(path)],
        "env": {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(path.parent),
            "MASTER_PASSWORD": PASSWORD,
            "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", str(path.parent)),
        },
    }
    return api, cli


def sqlite_final(path: Path) -> dict[str, FinalSecret]:
    store = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        return final_state(store)
    finally:
        store.close()


@pytest.mark.slow
def test_concurrent_api_and_cli_clients_on_sqlite_leave_a_linearizable_history(
    tmp_path: Path, sqlite_store: Path
) -> None:
    run = Run(tmp_path, run_seed())
    start_api_and_cli_clients(run, *sqlite_targets(sqlite_store))
    run.wait()
    ops = assert_consistent(run, sqlite_final(sqlite_store))
    print("sqlite", len(ops), summary(ops))
    assert sum(op.status == "ok" for op in ops) > 100


@pytest.mark.slow
def test_clients_killed_mid_operation_on_sqlite_leave_a_linearizable_history(
    tmp_path: Path, sqlite_store: Path
) -> None:
    run = Run(tmp_path, run_seed())
    start_api_and_cli_clients(run, *sqlite_targets(sqlite_store))
    rng = random.Random(run.seed)
    time.sleep(rng.uniform(1, DURATION / 2))
    run.kill("api0")
    time.sleep(rng.uniform(0.5, DURATION / 3))
    run.kill("cli0")
    run.wait()
    ops = assert_consistent(run, sqlite_final(sqlite_store))
    print("sqlite, kills", len(ops), summary(ops))
    assert sum(op.status == "ok" for op in ops) > 50


# ---- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
def postgres_store(postgres_cluster: Any) -> Iterator[tuple[str, str]]:
    schema = postgres_cluster.new_schema()
    conninfo = postgres_cluster.url(with_password=True)
    store = EncryptedStore.create(
        PostgresStorage(conninfo, schema=schema, create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    )
    try:
        create_names(store)
    finally:
        store.close()
    yield conninfo, schema


def postgres_final(conninfo: str, schema: str) -> dict[str, FinalSecret]:
    store = EncryptedStore.open(PostgresStorage(conninfo, schema=schema), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        return final_state(store)
    finally:
        store.close()


def postgres_cli(postgres_cluster: Any, schema: str, directory: Path) -> dict[str, Any]:
    return {
        "kind": "cli",
        "command": [
            str(SCRIPT),
            "--store",
            f"{postgres_cluster.url()}?schema={schema}",
            "--audit-file",
            str(directory / "cli.audit.jsonl"),
        ],
        "env": {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(directory),
            "MASTER_PASSWORD": PASSWORD,
            "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", str(directory)),
            **postgres_cluster.env(),
        },
    }


@contextlib.contextmanager
def backends_terminated(postgres_cluster: Any, seed: int) -> Iterator[list[int]]:
    """While inside, a thread ends a random busy connection (in a statement or a transaction)
    every 20 to 300 ms; yields the list of the pids it ended."""
    stop = threading.Event()
    ended: list[int] = []
    thread = threading.Thread(
        target=terminate_backends, args=(postgres_cluster, stop, random.Random(seed), ended)
    )
    thread.start()
    try:
        yield ended
    finally:
        stop.set()
        thread.join(timeout=30)


def terminate_backends(
    postgres_cluster: Any, stop: threading.Event, rng: random.Random, ended: list[int]
) -> None:
    with postgres_cluster.connect(superuser=True) as admin:
        while not stop.wait(rng.uniform(0.02, 0.3)):
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'sm_test' AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend' AND state <> 'idle'"
            ).fetchall()
            if rows:
                pid = int(rng.choice(rows)[0])
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                ended.append(pid)


@pytest.mark.slow
def test_concurrent_clients_on_postgresql_leave_a_linearizable_history(
    tmp_path: Path, postgres_cluster: Any, postgres_store: tuple[str, str]
) -> None:
    conninfo, schema = postgres_store
    run = Run(tmp_path, run_seed())
    api = {"kind": "postgres", "conninfo": conninfo, "schema": schema, "password": PASSWORD}
    start_api_and_cli_clients(run, api, postgres_cli(postgres_cluster, schema, tmp_path))
    run.wait()
    ops = assert_consistent(run, postgres_final(conninfo, schema))
    print("postgres", len(ops), summary(ops))
    assert sum(op.status == "ok" for op in ops) > 100


@pytest.mark.slow
def test_clients_whose_connections_are_terminated_on_postgresql_leave_a_linearizable_history(
    tmp_path: Path, postgres_cluster: Any, postgres_store: tuple[str, str]
) -> None:
    conninfo, schema = postgres_store
    run = Run(tmp_path, run_seed())
    api = {"kind": "postgres", "conninfo": conninfo, "schema": schema, "password": PASSWORD}
    start_api_and_cli_clients(run, api, postgres_cli(postgres_cluster, schema, tmp_path))
    rng = random.Random(run.seed + 1)
    with backends_terminated(postgres_cluster, run.seed) as ended:
        time.sleep(rng.uniform(1, DURATION / 2))
        run.kill("api1")
        run.wait()
    ops = assert_consistent(run, postgres_final(conninfo, schema))
    print("postgres, faults", len(ops), len(ended), "backends ended", summary(ops))
    assert ended
    assert sum(op.status == "ok" for op in ops) > 50


# ---- two `serve` replicas on one PostgreSQL store ------------------------------------------------


@pytest.fixture
def replicas(
    tmp_path: Path, postgres_cluster: Any, postgres_store: tuple[str, str]
) -> Iterator[list[Server]]:
    _, schema = postgres_store
    make_pki(tmp_path, clients=("ops",))
    (tmp_path / "policy.toml").write_text(POLICY)
    url = f"{postgres_cluster.url()}?schema={schema}"
    servers: list[Server] = []
    try:
        for name in ("replica-a", "replica-b"):
            servers.append(
                start_server(
                    tmp_path, name, store=url, environment=postgres_cluster.env(),
                    # no rate limit: the clients share one identity and may outrun its bucket
                    settings=f'audit_file = "{name}.audit.jsonl"\n[limits]\nrequests_per_second = 0\n',
                )
            )  # fmt: skip
        yield servers
    finally:
        for server in servers:
            server.stop()


def remote_target(server: Server, others: list[Server] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """A client of `server` that moves to one of `others` that serves after an unknown outcome."""
    return {
        "kind": "remote",
        "address": server.address,
        "replicas": [server.address, *(other.address for other in others)],
        "cert": str(server.dir / "ops.pem"),
        "key": str(server.dir / "ops-key.pem"),
        "ca": str(server.dir / "ca.pem"),
    }


def remote_cli(*servers: Server) -> dict[str, Any]:
    """The CLI with these addresses (it asks them in turn: the next when one does not answer)."""
    server = servers[0]
    return {
        "kind": "cli",
        "command": [str(SCRIPT), "--server", ",".join(s.address for s in servers)],
        "env": {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(server.dir),
            "SECRETS_MANAGER_CERT": str(server.dir / "ops.pem"),
            "SECRETS_MANAGER_KEY": str(server.dir / "ops-key.pem"),
            "SECRETS_MANAGER_CA": str(server.dir / "ca.pem"),
        },
    }


@pytest.mark.slow
def test_clients_spread_over_two_replicas_leave_a_linearizable_history(
    tmp_path: Path, postgres_store: tuple[str, str], replicas: list[Server]
) -> None:
    conninfo, schema = postgres_store
    run = Run(tmp_path, run_seed())
    for index in range(4):
        run.start(f"rpc{index}", remote_target(replicas[index % 2]), RPC_WEIGHTS, DURATION)
    run.start("cli0", remote_cli(replicas[1]), CLI_WEIGHTS, DURATION)
    api = {"kind": "postgres", "conninfo": conninfo, "schema": schema, "password": PASSWORD}
    run.start("api0", api, API_WEIGHTS, DURATION)
    run.wait()
    ops = assert_consistent(run, postgres_final(conninfo, schema))
    print("replicas", len(ops), summary(ops))
    assert sum(op.status == "ok" for op in ops) > 100


@pytest.mark.slow
def test_a_replica_killed_mid_run_and_terminated_connections_leave_a_linearizable_history(
    tmp_path: Path, postgres_cluster: Any, postgres_store: tuple[str, str], replicas: list[Server]
) -> None:
    """Clients of the killed replica move to the other; meanwhile the replicas' database
    connections are ended under them."""
    conninfo, schema = postgres_store
    run = Run(tmp_path, run_seed())
    for index in range(4):
        run.start(
            f"rpc{index}",
            remote_target(replicas[index % 2], [replicas[1 - index % 2]]),
            RPC_WEIGHTS,
            DURATION,
        )
    run.start("cli0", remote_cli(replicas[0], replicas[1]), CLI_WEIGHTS, DURATION)
    rng = random.Random(run.seed + 1)
    with backends_terminated(postgres_cluster, run.seed) as ended:
        time.sleep(rng.uniform(1, DURATION / 2))
        replicas[0].kill()
        run.wait()
    ops = assert_consistent(run, postgres_final(conninfo, schema))
    print("replicas, kill", len(ops), len(ended), "backends ended", summary(ops))
    assert sum(op.status == "ok" for op in ops) > 50


# ---- key management beside the clients (tests/history_maintenance.py) ------------------------------

NAMESPACE = PREFIX.rstrip("/")
MAINTENANCE_CAP = 90.0  # seconds the other clients run at most, waiting for the maintenance client
# Seconds each of them waits between operations: the maintenance client's round may take 30 s
# under load, and the checker's cost grows faster than the history's length.
PACE = 0.05


def password_clients(
    run: Run, api: dict[str, Any], cli: dict[str, Any], password_file: Path, *, kill: bool = False
) -> None:
    """api0 and api2 read the shared password file again when theirs stops opening the store (as
    serve and the SDK with MASTER_PASSWORD_FILE do); api1 holds the password it was started with
    (MASTER_PASSWORD) and is started again when refused; cli0 reads the file before each run; and
    maint0 runs the key commands, passwd, sweeps, keys status and audit verify. A CLI run takes
    a second or more under load, so maint0 runs each of its operations once (in a random order)
    however long that takes, and the others run until it ends (at most MAINTENANCE_CAP)."""
    stop = {"stop_file": str(run.directory / "maintenance-done"), "pace": PACE}
    for index in range(3):
        target = {**api, "password_file": str(password_file), "renew": index != 1, **stop}
        run.start(f"api{index}", target, API_WEIGHTS, MAINTENANCE_CAP)
    run.start("cli0", {**cli, "password_file": str(password_file), **stop}, CLI_WEIGHTS, MAINTENANCE_CAP)
    store = {key: value for key, value in api.items() if key in ("kind", "path", "conninfo", "schema")}
    maintenance = {
        "kind": "maint",
        "command": cli["command"],
        "env": {key: value for key, value in cli["env"].items() if key != "MASTER_PASSWORD"},
        "password_file": str(password_file),
        "namespace": NAMESPACE,
        "prefix": PREFIX,
        "store": store,
        "kill": kill,
        **stop,
    }
    run.start("maint0", maintenance, {}, DURATION)


def new_password_file(directory: Path) -> Path:
    path = directory / "master-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def maintenance_summary(run: Run, ops: list[Op]) -> str:
    """The maintenance operations' counts, and their durations (mean and max seconds)."""
    counts = {
        k: v
        for k, v in summary(ops).items()
        if k.split(":")[0].startswith(("keys_", "passwd", "sweep", "audit", "open"))
    }
    figures: dict[str, list[float]] = {}
    for path in run.directory.glob("*.figures"):
        figures = json.loads(path.read_text())
    timing = {kind: f"{sum(d) / len(d):.2f}/{max(d):.2f}" for kind, d in figures.items() if d}
    writes = [op.complete - op.invoke for op in ops if op.kind == "put" and op.status == "ok"]
    during = [
        op.complete - op.invoke
        for op in ops
        if op.kind == "put" and op.status == "ok"
        and any(m.kind == "keys_rewrap" and m.invoke < op.complete and op.invoke < m.complete for m in ops)
    ]  # fmt: skip
    latency = (
        f"writes {len(writes)}, mean {1000 * sum(writes) / max(1, len(writes)):.1f} ms; during rewraps "
        f"{len(during)}, mean {1000 * sum(during) / max(1, len(during)):.1f} ms, "
        f"max {1000 * max(during, default=0):.1f} ms"
    )
    return f"{counts} {timing} {latency}"


def audit_verified(command: list[str], env: dict[str, str], password_file: Path) -> None:
    proc = subprocess.run(
        [*command, "audit", "verify"],
        capture_output=True,
        env={**env, "MASTER_PASSWORD": password_file.read_text().strip()},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def assert_maintained(run: Run, ops: list[Op]) -> None:
    done = {op.kind for op in ops if op.status == "ok" and op.process == "maint0"}
    assert {"keys_rotate", "keys_rewrap", "sweep", "keys_status", "audit_verify"} <= done, done
    assert sum(op.status == "ok" and op.process != "maint0" for op in ops) > 50


def key_maintenance(
    tmp_path: Path,
    api: dict[str, Any],
    cli: dict[str, Any],
    storage: Callable[[], Any],
    label: str,
    *,
    kill: bool,
) -> None:
    """The maintenance client beside the API and CLI clients on one store, then the checks."""
    password_file = new_password_file(tmp_path)
    run = Run(tmp_path, run_seed())
    password_clients(run, api, cli, password_file, kill=kill)
    run.wait()
    store = EncryptedStore.open(storage(), PasswordUnlock(password_file.read_text().strip(), kdf.TEST))
    try:
        final = final_state(store)
    finally:
        store.close()
    ops = assert_consistent(run, final)
    audit_verified(cli["command"], cli["env"], password_file)
    print(label, "key maintenance", "kills" if kill else "", len(ops), maintenance_summary(run, ops))
    assert_maintained(run, ops)


def key_maintenance_on_sqlite(tmp_path: Path, store_path: Path, *, kill: bool) -> None:
    api, cli = sqlite_targets(store_path)
    key_maintenance(tmp_path, api, cli, lambda: SqliteStorage(store_path), "sqlite,", kill=kill)


@pytest.mark.slow
def test_key_rotation_rewrap_and_passwd_beside_clients_on_sqlite_leave_a_linearizable_history(
    tmp_path: Path, sqlite_store: Path
) -> None:
    key_maintenance_on_sqlite(tmp_path, sqlite_store, kill=False)


@pytest.mark.slow
def test_a_rewrap_and_a_passwd_killed_part_way_on_sqlite_leave_a_linearizable_history(
    tmp_path: Path, sqlite_store: Path
) -> None:
    key_maintenance_on_sqlite(tmp_path, sqlite_store, kill=True)


def key_maintenance_on_postgres(
    tmp_path: Path, postgres_cluster: Any, postgres_store: tuple[str, str], *, kill: bool
) -> None:
    conninfo, schema = postgres_store
    api = {"kind": "postgres", "conninfo": conninfo, "schema": schema, "password": PASSWORD}
    cli = postgres_cli(postgres_cluster, schema, tmp_path)
    key_maintenance(
        tmp_path, api, cli, lambda: PostgresStorage(conninfo, schema=schema), "postgres,", kill=kill
    )


@pytest.mark.slow
def test_key_rotation_rewrap_and_passwd_beside_clients_on_postgresql_leave_a_linearizable_history(
    tmp_path: Path, postgres_cluster: Any, postgres_store: tuple[str, str]
) -> None:
    key_maintenance_on_postgres(tmp_path, postgres_cluster, postgres_store, kill=False)


@pytest.mark.slow
def test_a_rewrap_and_a_passwd_killed_part_way_on_postgresql_leave_a_linearizable_history(
    tmp_path: Path, postgres_cluster: Any, postgres_store: tuple[str, str]
) -> None:
    key_maintenance_on_postgres(tmp_path, postgres_cluster, postgres_store, kill=True)


@pytest.mark.slow
def test_a_replica_beside_key_rotation_rewrap_and_passwd_keeps_serving_and_sealing_with_the_new_keys(
    tmp_path: Path, postgres_cluster: Any, postgres_store: tuple[str, str]
) -> None:
    """A `serve` replica whose password comes from the shared password file (MASTER_PASSWORD_FILE)
    while the maintenance client rotates keys and the root key, rewraps and changes the password:
    its clients' calls are refused only while the README says (a passwd and a root rotation, until
    it reads the file again), and its writes are sealed by the primary of their time (the sweeps)."""
    conninfo, schema = postgres_store
    password_file = new_password_file(tmp_path)
    make_pki(tmp_path, clients=("ops",))
    (tmp_path / "policy.toml").write_text(POLICY)
    server = start_server(
        tmp_path, "replica-a", store=f"{postgres_cluster.url()}?schema={schema}",
        environment={**postgres_cluster.env(), "MASTER_PASSWORD_FILE": str(password_file)},
        settings='audit_file = "replica-a.audit.jsonl"\n[limits]\nrequests_per_second = 0\n',
    )  # fmt: skip
    try:
        run = Run(tmp_path, run_seed())
        stop = {"stop_file": str(run.directory / "maintenance-done"), "pace": PACE}
        for index in range(2):
            target = {**remote_target(server), "unlock": "renew", **stop}
            run.start(f"rpc{index}", target, RPC_WEIGHTS, MAINTENANCE_CAP)
        api = {"kind": "postgres", "conninfo": conninfo, "schema": schema, "password": PASSWORD}
        password_clients(run, api, postgres_cli(postgres_cluster, schema, tmp_path), password_file)
        run.wait()
        assert server.process.poll() is None, "".join(server.log_lines[-20:])
    finally:
        server.stop()
    store = EncryptedStore.open(
        PostgresStorage(conninfo, schema=schema), PasswordUnlock(password_file.read_text().strip(), kdf.TEST)
    )
    try:
        final = final_state(store)
    finally:
        store.close()
    ops = assert_consistent(run, final)
    print("replica, key maintenance", len(ops), maintenance_summary(run, ops))
    assert_maintained(run, ops)
    assert sum(op.status == "ok" and op.process.startswith("rpc") for op in ops) > 20
