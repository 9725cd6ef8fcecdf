"""The service on PostgreSQL, where replicas share one store: two real `secrets-manager serve`
processes on one store in a private PostgreSQL cluster, with real mutual TLS certificates.

Each replica has its own audit log (and so its own anchor in the store). A write through one
replica, or by the CLI on the database directly, must be served by the other's very next read and
reach the other's Watch streams."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from postgres_cluster import DATABASE
from secrets_manager.crypto import kdf
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.base import AUDIT_KEYS_RECHECK_SECONDS
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.wire import WATCH_REVISION_KEY, status_for
from service_fixtures import (
    PASSWORD,
    POLICY,
    SCRIPT,
    SEED,
    Server,
    assert_moved_to_the_second_audit_key,
    eventually,
    in_process_server,
    make_pki,
    start_server,
)
from tcp_proxy import AnswersStop


def create_store(conninfo: str, schema: str, seed: dict[str, bytes]) -> None:
    """A new store (cheap KDF) in `schema` holding `seed`."""
    store = EncryptedStore.create(
        PostgresStorage(conninfo, schema=schema, create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    )
    try:
        for name, value in seed.items():
            store.put(name, value)
    finally:
        store.close()


def local_cli(
    url: str, directory: Path, pg_env: Mapping[str, str], *args: str, data: bytes = b"", audit_file: str
) -> subprocess.CompletedProcess[bytes]:
    """The real console script on the PostgreSQL store itself (no service in between), with its
    audit log at `directory/audit_file`."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "MASTER_PASSWORD": PASSWORD,
        **pg_env,
    }
    return subprocess.run(
        [str(SCRIPT), "--store", url, "--audit-file", str(directory / audit_file), *args],
        input=data,
        capture_output=True,
        env=env,
        timeout=60,
    )


@dataclass
class Replicas:
    a: Server
    b: Server
    url: str  # the store URL (no password: PGPASSWORD is in `pg_env`)
    pg_env: Mapping[str, str]

    def audit_records(self, server: Server) -> list[dict[str, Any]]:
        path = server.dir / f"{self.name_of(server)}.audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def name_of(self, server: Server) -> str:
        return "replica-a" if server is self.a else "replica-b"

    def cli(self, *args: str, data: bytes = b"", audit_file: str) -> subprocess.CompletedProcess[bytes]:
        return local_cli(self.url, self.a.dir, self.pg_env, *args, data=data, audit_file=audit_file)


def start_replicas(
    servers: list[Server], directory: Path, cluster: Any, url: str, *, settings: str = ""
) -> None:
    """Start `serve` replicas "replica-a" and "replica-b" on the store at `url`, each with its own
    audit log, appending each to `servers` as it starts (the caller stops them)."""
    for name in ("replica-a", "replica-b"):
        servers.append(
            start_server(
                directory,
                name,
                store=url,
                environment=cluster.env(),
                settings=f'audit_file = "{name}.audit.jsonl"\n{settings}',
            )
        )


@pytest.fixture
def replicas(tmp_path: Path, postgres_cluster: Any) -> Iterator[Replicas]:
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    create_store(postgres_cluster.url(with_password=True), schema, SEED)
    url = f"{postgres_cluster.url()}?schema={schema}"
    servers: list[Server] = []
    try:
        start_replicas(servers, tmp_path, postgres_cluster, url)
        yield Replicas(servers[0], servers[1], url, postgres_cluster.env())
    finally:
        for server in servers:
            server.stop()


def test_sixteen_clients_each_read_their_writes_through_the_other_replica(replicas: Replicas) -> None:
    """Every write goes through one replica and is read back at once through the other: the reading
    replica's cache is checked against the store's change head on every read, so none is stale."""
    errors: list[str] = []

    def client(index: int) -> None:
        writer = (replicas.a if index % 2 else replicas.b).stub("writer")
        reader = (replicas.b if index % 2 else replicas.a).stub("writer")
        name = f"auth/load/client-{index}"
        try:
            for round_ in range(10):
                value = f"{index}:{round_}".encode()
                put = writer.PutSecret(pb.PutSecretRequest(name=name, value=value), timeout=60)
                got = reader.GetSecret(pb.GetSecretRequest(name=name), timeout=60).secret
                if (put.version, got.version, got.value) != (round_ + 1, round_ + 1, value):
                    errors.append(f"{name}: wrote v{put.version}, read {got.value!r} v{got.version}")
        except grpc.RpcError as exc:
            errors.append(f"{name}: {exc.code()} {exc.details()}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    listed = replicas.a.stub("ops").ListSecrets(pb.ListSecretsRequest(prefix="auth/load/"), timeout=30)
    assert sorted(m.name for m in listed.secrets) == sorted(f"auth/load/client-{i}" for i in range(16))
    assert {m.current_version for m in listed.secrets} == {10}


def test_compare_and_set_across_replicas_lets_exactly_one_writer_win(replicas: Replicas) -> None:
    outcomes: list[tuple[str, int]] = []
    start = threading.Barrier(8)

    def write(index: int) -> None:
        stub = (replicas.a if index % 2 else replicas.b).stub("writer")
        request = pb.PutSecretRequest(
            name="auth/DB_PASSWORD", value=f"writer-{index}".encode(), expect_version=1
        )
        start.wait()
        try:
            stub.PutSecret(request, timeout=60)
            outcomes.append(("OK", index))
        except grpc.RpcError as exc:
            outcomes.append((exc.code().name, index))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [index for outcome, index in outcomes if outcome == "OK"]
    assert len(winners) == 1, outcomes
    assert sorted(outcome for outcome, _ in outcomes) == ["ABORTED"] * 7 + ["OK"]
    for server in (replicas.a, replicas.b):
        got = server.stub("writer").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=30).secret
        assert (got.version, got.value) == (2, f"writer-{winners[0]}".encode())


def test_watch_on_one_replica_sees_writes_through_the_other_and_by_the_cli(replicas: Replicas) -> None:
    stream = replicas.b.stub("auth").Watch(pb.WatchRequest(prefix="auth/"), timeout=60)
    assert dict(stream.initial_metadata() or ()).get("secrets-manager-revision")  # live from here
    replicas.a.stub("writer").PutSecret(pb.PutSecretRequest(name="auth/JWT_KEY", value=b"via-a"), timeout=30)
    written = replicas.cli("store", "auth/DB_PASSWORD", data=b"via-the-cli", audit_file="cli.audit.jsonl")
    assert written.returncode == 0, written.stderr
    events = stream
    seen = [(event.name, event.version, event.kind) for _, event in zip(range(2), events, strict=False)]
    stream.cancel()
    assert seen == [
        ("auth/JWT_KEY", 2, pb.ChangeEvent.VERSION_ADDED),
        ("auth/DB_PASSWORD", 2, pb.ChangeEvent.VERSION_ADDED),
    ]
    got = replicas.b.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=30).secret
    assert (got.version, got.value) == (2, b"via-the-cli")


def test_each_replica_keeps_its_own_audit_log_and_both_verify(replicas: Replicas) -> None:
    replicas.a.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/JWT_KEY"), timeout=30)
    replicas.b.stub("writer").PutSecret(pb.PutSecretRequest(name="auth/new", value=b"through-b"), timeout=30)
    for server in (replicas.a, replicas.b):
        server.stop()  # flushes its log and anchors it in the store
    reads = [(r["operation"], r["name"]) for r in replicas.audit_records(replicas.a)]
    writes = [(r["operation"], r["name"]) for r in replicas.audit_records(replicas.b)]
    # pending, ok, the read, and the stop's record (SIGTERM)
    assert reads == [("serve", None), ("serve", None), ("get", "auth/JWT_KEY"), ("serve.stop", None)]
    assert ("store", "auth/new") in writes and ("get", "auth/JWT_KEY") not in writes
    for server in (replicas.a, replicas.b):
        verified = replicas.cli("audit", "verify", audit_file=f"{replicas.name_of(server)}.audit.jsonl")
        assert verified.returncode == 0, verified.stderr
    assert b"through-b" not in (replicas.a.dir / "replica-b.audit.jsonl").read_bytes()


def test_a_database_outage_is_unavailable_and_the_service_recovers_without_a_restart(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """The store's database refuses the service (its role may not log in, its connection is cut):
    calls fail with UNAVAILABLE and a one-line message, nothing else; once the database takes the
    role back, the same server process answers again and its audit log still verifies."""
    from psycopg import sql

    role = f"sm_outage_{secrets.token_hex(4)}"
    with postgres_cluster.connect(superuser=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(postgres_cluster.role_password)
            )
        )
        admin.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(DATABASE), sql.Identifier(role)
            )
        )
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    conninfo = postgres_cluster.url(user=role).replace(
        f"{role}@", f"{role}:{postgres_cluster.role_password}@"
    )
    create_store(conninfo, schema, {"auth/JWT_KEY": b"jwt-KNOWN-outage-value"})
    url = f"{postgres_cluster.url(user=role)}?schema={schema}"
    server = start_server(
        tmp_path,
        store=url,
        environment=postgres_cluster.env(),
        settings='audit_file = "outage.audit.jsonl"\n',
    )
    request = pb.GetSecretRequest(name="auth/JWT_KEY")
    stub = server.stub("auth")

    def set_login(allowed: bool) -> None:
        with postgres_cluster.connect(superuser=True) as admin:
            admin.execute(
                sql.SQL("ALTER ROLE {} {}").format(
                    sql.Identifier(role), sql.SQL("LOGIN" if allowed else "NOLOGIN")
                )
            )
            if not allowed:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
                )

    try:
        assert stub.GetSecret(request, timeout=30).secret.value == b"jwt-KNOWN-outage-value"
        set_login(False)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as failed:
                stub.GetSecret(request, timeout=30)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE, failed.value.details()
            details = failed.value.details() or ""
            assert "\n" not in details and "jwt-KNOWN" not in details
            assert postgres_cluster.role_password not in details
        wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)  # clients pass it over
        set_login(True)
        wait_for_health(server, health_pb2.HealthCheckResponse.SERVING)
        assert stub.GetSecret(request, timeout=30).secret.value == b"jwt-KNOWN-outage-value"
        put = server.stub("writer").PutSecret(
            pb.PutSecretRequest(name="auth/JWT_KEY", value=b"after"), timeout=30
        )
        assert put.version == 2
    finally:
        set_login(True)
        server.stop()
    assert server.process.returncode == 0
    assert not any("Traceback" in line for line in server.log_lines)
    verified = local_cli(
        url, tmp_path, postgres_cluster.env(), "audit", "verify", audit_file="outage.audit.jsonl"
    )
    assert verified.returncode == 0, verified.stderr
    records = [json.loads(line) for line in (tmp_path / "outage.audit.jsonl").open()]
    assert [(r["operation"], r["outcome"]) for r in records] == [
        ("serve", "pending"),
        ("serve", "ok"),
        ("get", "ok"),
        *[("get", "storage_error")] * 3,  # each refused call is on record, with why
        ("get", "ok"),
        ("store", "pending"),
        ("store", "ok"),
        ("serve.stop", "ok"),
    ]
    assert postgres_cluster.role_password not in "".join(server.log_lines)


def wait_for_health(server: Server, expected: int, seconds: float = 15) -> None:
    """Until the server's overall health check says `expected` (its store probe runs every 2 s)."""
    checker = health_pb2_grpc.HealthStub(server.channel("auth"))
    deadline = time.monotonic() + seconds
    while (status := checker.Check(health_pb2.HealthCheckRequest(), timeout=10).status) != expected:
        assert time.monotonic() < deadline, f"health stayed {status}, not {expected}"
        time.sleep(0.1)


def test_two_replicas_running_one_rotation_schedule_set_each_version_once(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """The production layout of scheduled rotation: both replicas run the same schedule on one
    PostgreSQL store. Each new version is set at the target once and made current; the target
    ends on the current value."""
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    create_store(postgres_cluster.url(with_password=True), schema, {"db/app": b"first-app-value-SEEKRIT"})
    url = f"{postgres_cluster.url()}?schema={schema}"
    setter = "sh -c 'echo $SECRETS_MANAGER_ROTATE_VERSION >> set.log; cat > target'"
    (tmp_path / "rotation.toml").write_text(
        f'[[rotation]]\nname = "db/app"\nevery = "1s"\nset_command = "{setter}"\n'
    )
    store = EncryptedStore.open(
        PostgresStorage(postgres_cluster.url(with_password=True), schema=schema),
        PasswordUnlock(PASSWORD, kdf.TEST),
    )
    servers: list[Server] = []
    try:
        schedule = 'rotation_schedule = "rotation.toml"\nrotation_check_seconds = 0.1\n'
        start_replicas(servers, tmp_path, postgres_cluster, url, settings=schedule)
        deadline = time.monotonic() + 30
        while len(store.describe("db/app").versions) < 6:
            assert time.monotonic() < deadline, "the schedule did not rotate five times in 30 s"
            time.sleep(0.05)
    finally:
        for server in servers:
            server.stop()
    assert [server.process.returncode for server in servers] == [0, 0]
    meta = store.describe("db/app")
    current = store.get("db/app").value.reveal().decode()
    store.close()
    promoted = sorted(
        int(record["version"])
        for name in ("replica-a", "replica-b")
        for line in (tmp_path / f"{name}.audit.jsonl").read_text().splitlines()
        for record in [json.loads(line)]
        if record["operation"] == "rotate.promote" and record["outcome"] == "ok"
    )
    set_versions = [int(line) for line in (tmp_path / "set.log").read_text().split()]
    assert set_versions == promoted == list(range(2, meta.labels["current"] + 1))
    assert (tmp_path / "target").read_text() == current


def test_a_postgres_role_schedule_beside_the_stores_pgpassword_is_warned_of_at_the_start(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """libpq sends PGPASSWORD (here the store's database password) before a passfile, so every
    postgres_role rotation is refused the administrator's login: said by one log line when the
    rotation first came due (30 days in, say), nothing at the start. Now said at the start;
    with the passwords in a passfile instead, nothing is."""
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    create_store(postgres_cluster.url(with_password=True), schema, {"db/app": b"app-value-SEEKRIT"})
    url = f"{postgres_cluster.url()}?schema={schema}"
    (tmp_path / "rotation.toml").write_text(
        '[[rotation]]\nname = "db/app"\nevery = "30d"\npostgres_role = "app"\n'
        'postgres = "host=127.0.0.1 dbname=postgres user=admin"\n'
    )
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_cluster.port}:*:sm_test:{postgres_cluster.role_password}\n")
    passfile.chmod(0o600)
    schedule = 'rotation_schedule = "rotation.toml"\n'
    warned = {}
    for how, environment in (
        ("PGPASSWORD", dict(postgres_cluster.env())),
        ("PGPASSFILE", {"PGPASSFILE": str(passfile), "PGCONNECT_TIMEOUT": "10"}),
    ):
        server = start_server(tmp_path, f"by-{how}", store=url, environment=environment, settings=schedule)
        try:
            lines = server.log_lines
            assert eventually(lambda lines=lines: any('"schedule.started"' in line for line in lines))
            time.sleep(0.5)  # a warning is logged right after the start line
        finally:
            server.stop()
        lines = [json.loads(line) for line in server.log_lines if line.startswith("{")]
        warned[how] = [line for line in lines if line.get("event") == "schedule.pgpassword"]
    (warning,) = warned["PGPASSWORD"]
    assert warning["level"] == "warning" and warning["secrets"] == ["db/app"]
    assert "unset PGPASSWORD" in warning["message"] and "PGPASSFILE" in warning["message"]
    assert warned["PGPASSFILE"] == []
    assert all(postgres_cluster.role_password not in line for line in server.log_lines)


def test_a_watch_hears_a_commit_by_another_process_at_once_on_postgresql(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """The store's LISTEN/NOTIFY pokes the service's watch poller: with its tick at 30 s, a Watch
    hears of a put that another handle on the database made (as another replica or the CLI does)
    within seconds. (On SQLite that change would wait for the tick.)"""
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    conninfo = postgres_cluster.url(with_password=True)
    create_store(conninfo, schema, SEED)

    def open_handle() -> EncryptedStore:
        return EncryptedStore.open(
            PostgresStorage(conninfo, schema=schema), PasswordUnlock(PASSWORD, kdf.TEST)
        )

    served, elsewhere = open_handle(), open_handle()
    try:
        with in_process_server(tmp_path, served, watch_tick=30) as (running, stub):
            watch = stub("ops").Watch(pb.WatchRequest(prefix="auth/"))
            assert any(key == WATCH_REVISION_KEY for key, _ in watch.initial_metadata())
            deadline = time.monotonic() + 10
            while running.servicer.watch_hub.polls < 1 or not postgres_cluster.listeners():
                assert time.monotonic() < deadline, "the hub did not start reading and listening"
                time.sleep(0.01)
            started = time.monotonic()
            elsewhere.put("auth/FROM_ELSEWHERE", b"v")
            event = next(watch)
            assert (event.name, time.monotonic() - started < 5) == ("auth/FROM_ELSEWHERE", True)
            watch.cancel()
    finally:
        served.close()
        elsewhere.close()


def test_reads_go_on_while_another_transaction_holds_the_stores_commit_lock(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """A big restore or import into the database holds the store's commit lock for seconds. Reads
    never need it: GetSecret keeps answering at once (the audit log's deferred anchor update does
    not wait for the lock); a PutSecret, which must anchor its record, fails UNAVAILABLE saying
    the store's lock was busy, not that the audit log did not answer."""
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    conninfo = postgres_cluster.url(with_password=True)
    create_store(conninfo, schema, SEED)
    store = EncryptedStore.open(PostgresStorage(conninfo, schema=schema), PasswordUnlock(PASSWORD, kdf.TEST))
    request = pb.GetSecretRequest(name="auth/JWT_KEY")
    try:
        with in_process_server(tmp_path, store, watch_tick=0.2, audit_timeout=1.5) as (_running, stub):
            reader = stub("auth")
            reader.GetSecret(request, timeout=30)
            with postgres_cluster.commit_lock_held(schema):
                for n in range(20):  # two seconds of reads: every one is followed by a flush
                    started = time.monotonic()
                    reader.GetSecret(request, timeout=30)
                    assert time.monotonic() - started < 1, f"read {n} waited for the store's lock"
                    time.sleep(0.1)
                with pytest.raises(grpc.RpcError) as refused:
                    stub("writer").PutSecret(pb.PutSecretRequest(name="auth/k", value=b"v"), timeout=30)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
                details = refused.value.details() or ""
                assert "held the store's lock" in details and "did not answer" not in details, details
            put = stub("writer").PutSecret(pb.PutSecretRequest(name="auth/k", value=b"v"), timeout=30)
            assert put.version == 1
    finally:
        store.close()


def _serve_through_a_proxy_that_can_stall(tmp_path: Path, postgres_cluster: Any) -> tuple[Any, AnswersStop]:
    """A serve replica on a new store whose database connection goes through `AnswersStop`."""
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    create_store(postgres_cluster.url(with_password=True), schema, SEED)
    proxy = AnswersStop("127.0.0.1", postgres_cluster.port)
    url = f"{postgres_cluster.url()}?schema={schema}".replace(f":{postgres_cluster.port}/", f":{proxy.port}/")
    server = start_server(
        tmp_path, store=url, environment=postgres_cluster.env(), settings='audit_file = "stall.audit.jsonl"\n'
    )
    return server, proxy


def test_watch_streams_end_when_the_replicas_database_stops_answering(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """A replica whose database stops answering says NOT_SERVING within seconds, and ends its Watch
    streams then (UNAVAILABLE), so an SDK moves its stream to a replica that still reads the store.
    Before, the stream stayed open and silent until the store's 30 s answer timeout, while its
    client served every value it had cached as fresh, missing the writes made through the others."""
    server, proxy = _serve_through_a_proxy_that_can_stall(tmp_path, postgres_cluster)
    try:
        stream = server.stub("auth").Watch(pb.WatchRequest(prefix="auth/"), timeout=20)
        assert dict(stream.initial_metadata() or ()).get(WATCH_REVISION_KEY)  # live from here
        proxy.stalled.set()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        waited = time.monotonic() - started
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value.details()
        assert "cannot read its store" in (ended.value.details() or "")
        # The probe's 2 s interval and 5 s timeout: about 7 s; CI under load once took 13 s. The
        # old behaviour was the store's 30 s answer timeout (the call's own deadline, 20 s, first).
        assert waited < 16, f"the stream stayed open {waited:.1f} s on a replica that cannot read its store"
        wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        server.kill()  # a graceful stop would wait for its reads of the silent database
        proxy.close()


def test_sigterm_ends_the_service_in_bounded_time_while_its_database_stops_answering(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """SIGTERM on a replica whose database stopped answering: the audit log's flush at shutdown
    waits at most its timeout (5 s) for the store, so the process exits within the grace period
    and that, saying the anchor lags. Before, it waited out the store's 30 s answer timeout (and a
    connect timeout) and exited after 32 s: past a Kubernetes pod's default grace, so killed."""
    server, proxy = _serve_through_a_proxy_that_can_stall(tmp_path, postgres_cluster)
    try:
        server.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/JWT_KEY"), timeout=30)
        proxy.stalled.set()
        # A refusal needs no store, and its record is flushed and anchored (after a read's, which
        # may have been anchored before the stall: CI saw nothing owed at shutdown, so no warning).
        with pytest.raises(grpc.RpcError) as refused:
            server.stub("auth").GetSecret(
                pb.GetSecretRequest(name="market-connector/BINANCE_SECRET"), timeout=30
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        time.sleep(0.5)  # the refusal's deferred anchor update is under way, into the silent database
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not exit within 20 s of SIGTERM")
        took = time.monotonic() - started
        assert took < 5 + 6 + 2, f"serve took {took:.1f} s to exit"  # grace, flush, slack
        assert server.process.returncode == 0
        said = "could not be flushed at shutdown"
        assert eventually(lambda: any(said in line for line in server.log_lines)), server.log_lines[-5:]
        assert "anchor lags" in next(line for line in server.log_lines if said in line)
    finally:
        server.kill()
        proxy.close()
    records = [json.loads(line) for line in (tmp_path / "stall.audit.jsonl").open()]
    outcomes = [(r["operation"], r["outcome"]) for r in records]
    # The read's record is written; the refusal's too, unless the read's anchor update was the one
    # stalled: it holds the log's lock, and the refusal (answered all the same) gave up its record.
    if outcomes[-1] == ("get", "access_denied"):
        outcomes.pop()
    assert outcomes[-1] == ("get", "ok")


def _two_replicas_the_first_one_silent(
    tmp_path: Path, postgres_cluster: Any, *, now: bool = True
) -> tuple[Any, Server, AnswersStop]:
    """Two serve replicas on one PostgreSQL store, the first reaching it through a proxy that has
    just stalled (its database silent, its health still SERVING for a few seconds); with
    `now=False` the caller stalls it (`proxy.stalled.set()`) when it wants."""
    first, proxy = _serve_through_a_proxy_that_can_stall(tmp_path, postgres_cluster)
    url = next(
        line for line in (tmp_path / "server.toml").read_text().splitlines() if line.startswith("store")
    )
    direct = url.split('"')[1].replace(f":{proxy.port}/", f":{postgres_cluster.port}/")
    second = start_server(
        tmp_path,
        "second",
        store=direct,
        environment=postgres_cluster.env(),
        settings='audit_file = "b.audit.jsonl"\n',
    )
    if now:
        proxy.stalled.set()
    return first, second, proxy


def test_with_several_addresses_a_cli_read_on_a_replica_whose_database_went_silent_is_answered_by_another(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """`get --server A,B` just after A's database stopped answering: A's health still says SERVING
    (its probe gives the store 5 s), so the command picks A, whose read gets no answer. The read
    then goes to B, which answers. Before, the command failed (exit 1, "did not answer GetSecret
    within 10 s") with B healthy beside it."""
    first, second, proxy = _two_replicas_the_first_one_silent(tmp_path, postgres_cluster, now=False)
    both = {"SECRETS_MANAGER_ADDR": f"{first.address},{second.address}"}
    try:
        assert first.cli("auth", "get", "auth/JWT_KEY", env=both).stdout == SEED["auth/JWT_KEY"] + b"\n"
        proxy.stalled.set()
        started = time.monotonic()
        read = first.cli("auth", "get", "auth/JWT_KEY", env=both)
        took = time.monotonic() - started
        assert read.returncode == 0, read.stderr
        assert read.stdout == SEED["auth/JWT_KEY"] + b"\n"
        assert took < 10 + 3 + 3, f"took {took:.1f} s"  # A's deadline, B's health check, slack
    finally:
        first.kill()
        second.stop()
        proxy.close()


def test_run_restart_on_change_with_several_addresses_moves_off_a_replica_whose_database_went_silent(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """`run --restart-on-change --server A,B` watching A when A's database stops answering: A says
    NOT_SERVING and ends its Watch streams (5-8 s in), and run opens its stream again on B,
    resuming where it stopped, so a change written through B meanwhile restarts the program with
    the new value, read through B. Before, run reopened its stream on A for good."""
    from test_run_restart import Run, through_service

    first, second, proxy = _two_replicas_the_first_one_silent(tmp_path, postgres_cluster, now=False)
    run = Run(tmp_path, through_service(tmp_path, f"{first.address},{second.address}"), "--service", "auth")
    try:
        run.wait_for_starts(1)
        proxy.stalled.set()
        stored = second.cli("writer", "store", "auth/JWT_KEY", input=b"while-a-is-silent-SEEKRIT")
        assert stored.returncode == 0, stored.stderr
        assert run.wait_for_starts(2, timeout=20)[1]["started"]["JWT_KEY"] == "while-a-is-silent-SEEKRIT"
        said = run.stderr()
        assert f"{first.address} does not answer: moving to {second.address}" in said
        assert "SEEKRIT" not in said
    finally:
        run.kill()
        first.kill()
        second.stop()
        proxy.close()


def test_run_restart_on_change_with_several_addresses_starts_while_a_replicas_database_is_silent(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """`run --restart-on-change --server A,B` started just after A's database stopped answering:
    A's health still says SERVING, so run picks A, whose Watch stream then waits for the store
    (30 s, its answer timeout). It is given up once A says NOT_SERVING and opened on B: the program
    starts within 15 s and a change through B restarts it. Before, run failed after 30 s (exit 1,
    nothing run) with B healthy."""
    from test_run_restart import Run, through_service

    first, second, proxy = _two_replicas_the_first_one_silent(tmp_path, postgres_cluster)
    run = Run(tmp_path, through_service(tmp_path, f"{first.address},{second.address}"), "--service", "auth")
    try:
        first_start = run.wait_for_starts(1, timeout=15)[0]
        assert first_start["started"]["JWT_KEY"] == SEED["auth/JWT_KEY"].decode()
        assert f"{first.address} does not answer: watching {second.address}" in run.stderr()
        stored = second.cli("writer", "store", "auth/JWT_KEY", input=b"after-a-silent-start-SEEKRIT")
        assert stored.returncode == 0, stored.stderr
        assert run.wait_for_starts(2, timeout=10)[1]["started"]["JWT_KEY"] == "after-a-silent-start-SEEKRIT"
        assert "SEEKRIT" not in run.stderr()
    finally:
        run.kill()
        first.kill()
        second.stop()
        proxy.close()


def test_the_sdk_with_several_addresses_watches_through_another_when_the_first_ones_database_is_silent(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """An SDK client started just after replica A's database stopped answering: A still says
    SERVING, so its watch stream opens there and waits for A's store. It is given up once A says
    NOT_SERVING and opened on B, so a change written through B is pushed: seen within 12 s. Before,
    the stream waited out A's 30 s store timeout, and the cached value was served as fresh."""
    from secrets_manager.client import Client
    from service_fixtures import tls_files

    first, second, proxy = _two_replicas_the_first_one_silent(tmp_path, postgres_cluster)
    client = Client([first.address, second.address], tls=tls_files(tmp_path, "auth"))
    try:
        assert client.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]
        stored = second.cli("writer", "store", "auth/JWT_KEY", input=b"pushed-through-b-SEEKRIT")
        assert stored.returncode == 0, stored.stderr
        assert eventually(
            lambda: client.get("auth/JWT_KEY").value.reveal() == b"pushed-through-b-SEEKRIT", 12
        )
    finally:
        client.close()
        first.kill()
        second.stop()
        proxy.close()


def test_a_change_whose_commit_answer_the_service_lost_reaches_its_client_as_an_unknown_outcome(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """The service's store sent COMMIT and no answer came: the change may have been made (here it
    was). Its client is told so as OutcomeUnknownError (INTERNAL, the class named in the trailing
    metadata, as for ChangeUnrecordedError), which no client retries. It was UNAVAILABLE, read
    back as a plain StorageError: a status gRPC retry policies retry (the change made twice), and
    which the SDK counts as no service answering. Found by tests/test_history.py (a promote through
    a replica whose database connection was terminated at its COMMIT)."""
    from secrets_manager.client import RemoteStore
    from secrets_manager.errors import OutcomeUnknownError
    from service_fixtures import tls_files

    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    create_store(postgres_cluster.url(with_password=True), schema, SEED)
    proxy = AnswersStop("127.0.0.1", postgres_cluster.port, b"COMMIT", after=b"data/auth/MAYBE#1")
    through = (
        f"host=127.0.0.1 port={proxy.port} dbname={DATABASE} user=sm_test "
        f"password={postgres_cluster.role_password}"
    )
    store = EncryptedStore.open(
        PostgresStorage(through, schema=schema, answer_timeout=1), PasswordUnlock(PASSWORD, kdf.TEST)
    )
    try:
        with in_process_server(tmp_path, store, watch_tick=30, audit_timeout=5) as (running, _stub):
            remote = RemoteStore(f"127.0.0.1:{running.port}", tls_files(tmp_path, "ops"), timeout=20)
            try:
                with pytest.raises(OutcomeUnknownError, match="the change may have been made") as caught:
                    remote.put("auth/MAYBE", b"made-or-not-SEEKRIT")
            finally:
                remote.close()
    finally:
        proxy.close()
        store.close()
    assert proxy.stalled.is_set()
    assert "no answer to COMMIT within 1 s" in str(caught.value) and "SEEKRIT" not in str(caught.value)
    assert status_for(caught.value) is grpc.StatusCode.INTERNAL
    direct = EncryptedStore.open(
        PostgresStorage(postgres_cluster.url(with_password=True), schema=schema),
        PasswordUnlock(PASSWORD, kdf.TEST),
    )
    try:
        assert direct.get("auth/MAYBE").value.reveal() == b"made-or-not-SEEKRIT"
    finally:
        direct.close()


def test_a_replica_whose_password_file_is_still_the_old_one_says_not_serving_after_a_root_rotation(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """The monthly drill on two replicas: a new master password (`passwd`, or `recovery
    unlock-with password`) and `keys rotate --root` while they serve. A replica whose password file
    already holds the new password adopts the new root key; one whose file still holds the old one
    fails every call (ABORTED, "put the new password in its password file"), so its health must
    say NOT_SERVING, or clients given both addresses keep choosing it. Before, its health check
    read only the change feed's head and said SERVING throughout."""
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    create_store(postgres_cluster.url(with_password=True), schema, SEED)
    url = f"{postgres_cluster.url()}?schema={schema}"
    new_password = "the new master password after the drill"
    for name, content in (("pw-a", PASSWORD), ("pw-b", PASSWORD), ("new-pw", new_password)):
        (tmp_path / name).write_text(content + "\n")
        (tmp_path / name).chmod(0o600)
    servers: list[Server] = []
    try:
        for name, password_file in (("replica-a", "pw-a"), ("replica-b", "pw-b")):
            servers.append(
                start_server(
                    tmp_path,
                    name,
                    store=url,
                    environment=postgres_cluster.env(),
                    settings=f'audit_file = "{name}.audit.jsonl"\npassword_file = "{password_file}"\n',
                )
            )
        a, b = servers
        wait_for_health(a, health_pb2.HealthCheckResponse.SERVING)
        wait_for_health(b, health_pb2.HealthCheckResponse.SERVING)
        changed = local_cli(
            url, tmp_path, postgres_cluster.env(), "passwd", "--new-password-file", str(tmp_path / "new-pw"),
            audit_file="cli.audit.jsonl",
        )  # fmt: skip
        assert changed.returncode == 0, changed.stderr
        (tmp_path / "pw-a").write_text(new_password + "\n")  # replica a's host got it first, as documented
        rotated = local_cli(
            url, tmp_path, postgres_cluster.env(), "--password-file", str(tmp_path / "new-pw"),
            "keys", "rotate", "--root", audit_file="cli.audit.jsonl",
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        wait_for_health(b, health_pb2.HealthCheckResponse.NOT_SERVING)
        wait_for_health(a, health_pb2.HealthCheckResponse.SERVING, seconds=5)
        request = pb.GetSecretRequest(name="auth/DB_PASSWORD")
        assert a.stub("auth").GetSecret(request, timeout=30).secret.value == SEED["auth/DB_PASSWORD"]
        with pytest.raises(grpc.RpcError) as refused:
            b.stub("auth").GetSecret(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.ABORTED
        assert "password file" in str(refused.value.details())
        (tmp_path / "pw-b").write_text(new_password + "\n")  # and then replica b's: it serves again
        wait_for_health(b, health_pb2.HealthCheckResponse.SERVING)
        assert b.stub("auth").GetSecret(request, timeout=30).secret.value == SEED["auth/DB_PASSWORD"]
    finally:
        for server in servers:
            server.stop()
    assert not any(new_password in line or PASSWORD in line for s in servers for line in s.log_lines)


def test_a_replica_pointed_at_a_restored_database_with_its_old_audit_log_says_the_log_is_another_stores(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """The restore drill: last night's backup restored into a new database (its own audit key,
    README "When the day comes"), and a replica's server.toml pointed at it, its `audit_file`
    unchanged. The replica must refuse to start (exit 6) saying the log is the old store's and to
    give its log another path, and leave that log as it was. Before, it said the log's last
    record was "edited or forged" and to accept the loss with `audit reset`."""
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    old_schema, new_schema = postgres_cluster.new_schema(), postgres_cluster.new_schema()
    create_store(postgres_cluster.url(with_password=True), old_schema, SEED)
    old_url = f"{postgres_cluster.url()}?schema={old_schema}"
    new_url = f"{postgres_cluster.url()}?schema={new_schema}"
    replica = start_server(
        tmp_path, "replica-a", store=old_url, environment=postgres_cluster.env(),
        settings='audit_file = "replica-a.audit.jsonl"\n',
    )  # fmt: skip
    try:
        request = pb.GetSecretRequest(name="auth/DB_PASSWORD")
        assert replica.stub("auth").GetSecret(request, timeout=30).secret.value == SEED["auth/DB_PASSWORD"]
    finally:
        replica.stop()
    env = postgres_cluster.env()
    backup = tmp_path / "secrets-night.smbackup"
    for url, args, cli_log in (
        (old_url, ("backup", str(backup)), "cli-old.audit.jsonl"),
        (new_url, ("init", "--kdf-profile", "test"), "cli-new.audit.jsonl"),
        (new_url, ("restore", str(backup), "--store", new_url), "cli-new.audit.jsonl"),
    ):
        done = local_cli(url, tmp_path, env, *args, audit_file=cli_log)
        assert done.returncode == 0, done.stderr
    log = tmp_path / "replica-a.audit.jsonl"
    before = log.read_bytes()
    config = tmp_path / "replica-a.toml"
    config.write_text(config.read_text().replace(old_url, new_url))
    started = subprocess.run(
        [str(SCRIPT), "serve", "--config", str(config)],
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
             "MASTER_PASSWORD": PASSWORD, **env},
        timeout=60,
    )  # fmt: skip
    error = started.stderr.decode()
    assert started.returncode == 6, error
    assert f"audit log {log} is another store's" in error
    assert "give this store's log another path (audit_file in server.toml" in error
    assert "forged" not in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1
    assert log.read_bytes() == before
    # The CLI given that log on the restored store says the same.
    listed = local_cli(new_url, tmp_path, env, "list", audit_file="replica-a.audit.jsonl")
    assert listed.returncode == 6
    assert "is another store's" in listed.stderr.decode()
    assert log.read_bytes() == before
    # With a log of its own the replica serves the restored secrets.
    restored = start_server(
        tmp_path, "replica-a", store=new_url, environment=env,
        settings='audit_file = "replica-a-restored.audit.jsonl"\n',
    )  # fmt: skip
    try:
        assert restored.stub("auth").GetSecret(request, timeout=30).secret.value == SEED["auth/DB_PASSWORD"]
    finally:
        restored.stop()


def test_a_witnessed_head_of_the_other_replicas_log_is_refused_naming_that_possibility(
    replicas: Replicas,
) -> None:
    """Each replica's log has its own chain, and `audit head` signs every log's heads with the
    store's one audit key, so a head shipped from replica a and checked against replica b's log
    (one tag for both heads on the log host) passes as b's. The refusal (exit 6) must say that the
    head may be another log's, not only that the log was rolled back: before, it said only that,
    a false rollback alarm on the monthly check."""
    request = pb.GetSecretRequest(name="auth/DB_PASSWORD")
    for _ in range(5):
        replicas.a.stub("auth").GetSecret(request, timeout=30)
    replicas.b.stub("auth").GetSecret(request, timeout=30)
    heads = {}
    for name in ("replica-a", "replica-b"):
        head = replicas.cli("audit", "head", audit_file=f"{name}.audit.jsonl")
        assert head.returncode == 0, head.stderr
        heads[name] = head.stdout.decode().strip()
    own = replicas.cli("audit", "verify", "--witness", heads["replica-a"], audit_file="replica-a.audit.jsonl")
    assert own.returncode == 0, own.stderr
    for log, other in (("replica-b", "replica-a"), ("replica-a", "replica-b")):
        crossed = replicas.cli("audit", "verify", "--witness", heads[other], audit_file=f"{log}.audit.jsonl")
        error = crossed.stderr.decode()
        assert crossed.returncode == 6, error
        assert "rolled back" in error
        assert "unless the head is another log's of this store" in error
        assert len(error.strip().splitlines()) == 1


def test_a_witnessed_head_of_another_log_that_this_one_pruned_past_says_it_may_be_that(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    """A head shipped from one host's log, checked against another host's log that was pruned
    past its seq, was refused saying only "give --archive DIR holding the pruned files": an auditor
    went looking for an archive, to be told then that the record did not match. The message now
    says, as the two others do, that the head may be another log's of this store."""
    schema = postgres_cluster.new_schema()
    create_store(postgres_cluster.url(with_password=True), schema, SEED)
    url = f"{postgres_cluster.url()}?schema={schema}"
    env = {**postgres_cluster.env(), "SECRETS_MANAGER_AUDIT_MAX_BYTES": "1500"}

    def cli(log: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        return local_cli(url, tmp_path, env, *args, audit_file=log)

    assert cli("host-b.audit.jsonl", "get", "auth/DB_PASSWORD").returncode == 0
    head = cli("host-b.audit.jsonl", "audit", "head")
    assert head.returncode == 0, head.stderr
    for _ in range(8):
        assert cli("host-a.audit.jsonl", "get", "auth/DB_PASSWORD").returncode == 0
    pruned = cli("host-a.audit.jsonl", "audit", "prune", "--keep-files", "0")
    assert pruned.returncode == 0, pruned.stderr
    crossed = cli("host-a.audit.jsonl", "audit", "verify", "--witness", head.stdout.decode().strip())
    error = crossed.stderr.decode()
    assert crossed.returncode == 6, error
    assert "pruned from the log" in error and "give --archive DIR" in error
    assert "unless the head is another log's of this store" in error
    assert len(error.strip().splitlines()) == 1


def test_an_audit_key_rotation_reaches_each_replicas_log_and_every_log_verifies(replicas: Replicas) -> None:
    """On PostgreSQL each host (each replica) writes a log of its own, which the CLI's rotation
    record never reaches: a replica reads the store's audit keys again every
    AUDIT_KEYS_RECHECK_SECONDS, so its next record after that begins its log's move to the new key
    (an `audit.rotate_key` record under the old one), and its reads are fingerprinted under the
    new key. Before, a replica would have gone on under the old key until restarted."""
    request = pb.GetSecretRequest(name="auth/DB_PASSWORD")
    for server in (replicas.a, replicas.b):
        server.stub("auth").GetSecret(request, timeout=30)
    rotated = replicas.cli("audit", "rotate-key", audit_file="cli.audit.jsonl")
    assert rotated.returncode == 0, rotated.stderr
    time.sleep(AUDIT_KEYS_RECHECK_SECONDS + 1)
    for server in (replicas.a, replicas.b):
        for _ in range(2):
            server.stub("auth").GetSecret(request, timeout=30)
    for server in (replicas.a, replicas.b):
        server.stop()
    candidate = replicas.cli("audit", "hash", data=SEED["auth/DB_PASSWORD"], audit_file="cli.audit.jsonl")
    assert candidate.returncode == 0, candidate.stderr
    new_fingerprint = candidate.stdout.decode().strip()
    for server in (replicas.a, replicas.b):
        records = replicas.audit_records(server)
        assert_moved_to_the_second_audit_key(records, new_fingerprint)
        verified = replicas.cli("audit", "verify", audit_file=f"{replicas.name_of(server)}.audit.jsonl")
        assert verified.returncode == 0, verified.stderr
    verified = replicas.cli("audit", "verify", audit_file="cli.audit.jsonl")
    assert verified.returncode == 0, verified.stderr
