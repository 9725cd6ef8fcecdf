"""Randomised, recorded histories of concurrent clients, checked as Jepsen/Elle check theirs.

Several client processes (tests/history_worker.py) run random operations on a few names for a
bounded time, on the embedded SQLite store (the Python API in several processes, and the CLI), on
PostgreSQL, and through two `serve` replicas on one PostgreSQL store (real mutual TLS), some with
faults: a client SIGKILLed mid-operation, a replica SIGKILLed, PostgreSQL connections ended by
pg_terminate_backend. tests/history_checker.py then checks the history and the state left.

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
from collections.abc import Iterator
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
                for other in self.processes.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(other.pid, signal.SIGKILL)
                _, err = proc.communicate()
                records = self.directory / f"history-{process}.jsonl"
                last = records.read_text().splitlines()[-3:] if records.exists() else []
                raise AssertionError(
                    f"client {process} still running {timeout:.0f} s on (seed {self.seed}); its last "
                    f"records: {last}; its stderr: {err.decode()[-2000:]}"
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
