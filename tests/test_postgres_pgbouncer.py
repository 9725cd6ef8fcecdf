"""The PostgreSQL store behind a real pgbouncer (tests/pgbouncer.py), in transaction pooling and in
session pooling, as deployments run it.

Transaction pooling hands each transaction (each statement, in autocommit) whichever server
connection is free, so the store must not rely on anything that lives in a server session:
server-side prepared statements (psycopg prepares a query after its 5th execution on a
connection; pgbouncer before 1.21 does not carry them over: "prepared statement "_pg3_0" does not
exist", or "already exists" on a server connection another client prepared), session settings
(`SET` leaks to the next client of that server connection and is missing from ours), and
LISTEN/NOTIFY (a notification cannot reach a client that holds no server connection: watchers then
rely on the 0.2 s poll of the change feed).

Where pgbouncer is not installed the tests are skipped, except when `CI` is set, where they fail.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgbouncer import PgBouncer, missing_requirements
from postgres_cluster import DATABASE, PostgresCluster, pause_once_in_a_write
from secrets_manager.crypto import kdf
from secrets_manager.errors import OutcomeUnknownError
from secrets_manager.rotators.postgres import PostgresRole
from secrets_manager.service.watch import ChangeHub
from secrets_manager.storage import Entry
from secrets_manager.storage import postgres as postgres_module
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.changes import ChangeKind
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.values import SecretValue
from service_fixtures import PASSWORD, POLICY, Server, make_pki, start_server
from test_storage_postgres import MASTER_PASSWORD, Place, StandbyCopy, _changes_until

SCRIPT = Path(sys.executable).with_name("secrets-manager")


@pytest.fixture(scope="module")
def bouncers(postgres_cluster: PostgresCluster) -> Iterator[dict[str, PgBouncer]]:
    """One pgbouncer per pool mode, each with a pool of 2 server connections."""
    _require_pgbouncer()
    started: dict[str, PgBouncer] = {}
    try:
        for mode in ("transaction", "session"):
            started[mode] = PgBouncer(postgres_cluster, pool_mode=mode, pool_size=2).start()
        yield started
    finally:
        for bouncer in started.values():
            bouncer.stop()


def _require_pgbouncer() -> None:
    """Skip where pgbouncer cannot run, saying why; fail instead under CI (`CI` set)."""
    reason = missing_requirements()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the pgbouncer tests, but {reason}")
        pytest.skip(reason)


def _cli(url: str, env: Mapping[str, str], home: Path) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    def run(*args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [str(SCRIPT), "--store", url, *args],
            input=input,
            capture_output=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **env},
            timeout=60,
        )
        assert b"Traceback" not in proc.stderr, proc.stderr.decode()
        return proc

    return run


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_one_handle_reads_and_writes_many_times_through_pgbouncer(
    bouncers: dict[str, PgBouncer], postgres_cluster: PostgresCluster, mode: str
) -> None:
    """More than psycopg's prepare threshold (5) of each statement on one handle, whose one
    connection meets both of pgbouncer's server connections in transaction mode."""
    schema = postgres_cluster.new_schema()
    conninfo = bouncers[mode].conninfo()
    storage = PostgresStorage(conninfo, schema=schema, create=True, max_connections=1)
    other = PostgresStorage(conninfo, schema=schema, max_connections=1)
    try:
        for n in range(12):
            revision = storage.put(f"k{n % 3}", b"value %d" % n)
            assert storage.get(f"k{n % 3}") == Entry(b"value %d" % n, revision)
            assert other.get(f"k{n % 3}") == Entry(b"value %d" % n, revision)
            assert storage.list("k") == [f"k{i}" for i in range(min(n + 1, 3))]
            assert other.changes_since(revision - 1).revision == revision
            with other.snapshot() as snapshot:
                assert snapshot.revision == revision
    finally:
        storage.close()
        other.close()


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_the_cli_works_through_pgbouncer(
    bouncers: dict[str, PgBouncer], postgres_cluster: PostgresCluster, mode: str, tmp_path: Path
) -> None:
    """init, then store/get/list, each a new process (a new client of pgbouncer that may be given
    a server connection an earlier one used)."""
    url = f"{bouncers[mode].url()}?schema={postgres_cluster.new_schema()}"
    cli = _cli(url, {**postgres_cluster.env(), "MASTER_PASSWORD": MASTER_PASSWORD}, tmp_path)
    init = cli("init", "--kdf-profile", "test")
    assert init.returncode == 0, init.stderr.decode()
    for n in range(6):
        stored = cli("store", f"auth/K{n}", input=b"value-%d" % n)
        assert stored.returncode == 0, stored.stderr.decode()
    got = cli("get", "auth/K3")
    assert (got.returncode, got.stdout) == (0, b"value-3\n"), got.stderr.decode()
    listed = cli("list")
    assert listed.returncode == 0, listed.stderr.decode()
    assert [line.split(b"\t")[0] for line in listed.stdout.splitlines()] == [
        b"auth/K%d" % n for n in range(6)
    ]
    for args in (
        ("keys", "rotate", "auth"),
        ("keys", "rewrap", "auth"),
        ("backup", str(tmp_path / "b.smbackup")),
    ):
        done = cli(*args)
        assert done.returncode == 0, (args, done.stderr.decode())
    restored_url = f"{bouncers[mode].url()}?schema={postgres_cluster.new_schema()}"
    other = _cli(restored_url, {**postgres_cluster.env(), "MASTER_PASSWORD": MASTER_PASSWORD}, tmp_path)
    assert other("init", "--kdf-profile", "test").returncode == 0
    restored = other("restore", str(tmp_path / "b.smbackup"))
    assert restored.returncode == 0, restored.stderr.decode()
    assert other("get", "auth/K5").stdout == b"value-5\n"


def test_a_url_option_pgbouncer_refuses_is_one_line_saying_what_to_do(
    bouncers: dict[str, PgBouncer], postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """`?options=-c …` is a startup parameter pgbouncer refuses unless told to ignore it."""
    options = "options=-c%20statement_timeout%3D5000"
    url = f"{bouncers['session'].url()}?schema={postgres_cluster.new_schema()}&{options}"
    cli = _cli(url, {**postgres_cluster.env(), "MASTER_PASSWORD": MASTER_PASSWORD}, tmp_path)
    refused = cli("init", "--kdf-profile", "test")
    lines = refused.stderr.decode().splitlines()
    assert refused.returncode == 1 and len(lines) == 1, lines
    assert "unsupported startup parameter" in lines[0] and "ignore_startup_parameters" in lines[0]


def test_the_stores_settings_stay_in_its_own_transactions_through_transaction_pooling(
    postgres_cluster: PostgresCluster,
) -> None:
    """In transaction pooling a session `SET` stays on the server connection for whoever gets it
    next (another client would have its idle transactions ended after 2 s), and is missing from the
    connection our next transaction gets. With a pool of one server connection, the next client
    sees what we left there."""
    _require_pgbouncer()
    bouncer = PgBouncer(postgres_cluster, pool_mode="transaction", pool_size=1).start()
    try:
        storage = PostgresStorage(bouncer.conninfo(), schema=postgres_cluster.new_schema(), create=True)
        try:
            storage.put("k", b"v")
            with psycopg.connect(bouncer.conninfo(), autocommit=True) as neighbour:
                shown = [
                    neighbour.execute(f"SHOW {name}").fetchone()
                    for name in ("idle_in_transaction_session_timeout", "lock_timeout")
                ]
            assert shown == [("0",), ("0",)]
        finally:
            storage.close()
    finally:
        bouncer.stop()


def test_serve_replicas_under_load_and_their_watchers_through_transaction_pooling(
    bouncers: dict[str, PgBouncer], postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """Two `serve` replicas on one store through pgbouncer in transaction mode: clients writing
    and reading their own writes through both at once, and a Watch on one replica that hears of
    changes made through the other and by the CLI (another process). NOTIFY cannot reach a listener
    through transaction pooling; the replica's 0.2 s poll of the change feed brings them."""
    bouncer = bouncers["transaction"]
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    schema = postgres_cluster.new_schema()
    EncryptedStore.create(
        PostgresStorage(bouncer.conninfo(), schema=schema, create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    ).close()
    url = f"{bouncer.url()}?schema={schema}"
    servers: list[Server] = []
    try:
        for name in ("replica-a", "replica-b"):
            servers.append(
                start_server(
                    tmp_path, name, store=url, environment=postgres_cluster.env(),
                    settings=f'audit_file = "{name}.audit.jsonl"\n',
                )
            )  # fmt: skip
        a, b = servers
        failures: list[str] = []

        def client(n: int) -> None:
            writer, reader = (a, b) if n % 2 else (b, a)
            put, get = writer.stub("writer"), reader.stub("writer")
            try:
                for i in range(6):
                    value = b"load-%d-%d" % (n, i)
                    put.PutSecret(pb.PutSecretRequest(name=f"auth/load/K{n}", value=value), timeout=30)
                    got = get.GetSecret(pb.GetSecretRequest(name=f"auth/load/K{n}"), timeout=30).secret
                    if got.value != value:
                        failures.append(f"client {n} read {got.version} after writing {i + 1}")
            except Exception as exc:  # reported below, with the others
                failures.append(f"client {n}: {exc}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert failures == []

        stream = b.stub("ops").Watch(pb.WatchRequest(prefix="auth/"), timeout=60)
        assert dict(stream.initial_metadata() or ()).get("secrets-manager-revision")  # live from here
        a.stub("writer").PutSecret(pb.PutSecretRequest(name="auth/JWT_KEY", value=b"via-a"), timeout=30)
        started = time.monotonic()
        first = next(stream)
        assert (first.name, first.version) == ("auth/JWT_KEY", 1)
        assert time.monotonic() - started < 5
        cli = _cli(url, {**postgres_cluster.env(), "MASTER_PASSWORD": PASSWORD}, tmp_path)
        written = cli("--audit-file", str(tmp_path / "cli.audit.jsonl"), "store", "auth/DB", input=b"via-cli")
        assert written.returncode == 0, written.stderr.decode()
        started = time.monotonic()
        second = next(stream)
        assert (second.name, second.version) == ("auth/DB", 1)
        assert time.monotonic() - started < 5
        stream.cancel()
        for server in servers:
            assert not [line for line in server.log_lines if "Traceback" in line]
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("pause_before", ["the bump", "COMMIT"])
def test_a_commit_whose_process_paused_past_the_idle_limit_behind_pgbouncer_is_retried_or_unknown(
    bouncers: dict[str, PgBouncer], postgres_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch,
    pause_before: str,
) -> None:  # fmt: skip
    """This process pauses inside a write transaction past the server's idle limit, behind
    pgbouncer in transaction mode: the server ends the session and rolls back. Paused before the
    bump, the commit is made once more and lands once. Paused before COMMIT, pgbouncer's answer to
    COMMIT (psycopg: "received 2 results from command 'COMMIT'") cannot say whether it landed: the
    outcome is unknown, never a failure that claims nothing changed."""
    monkeypatch.setattr(postgres_module, "STALLED_TRANSACTION_TIMEOUT_MS", 100)
    storage = PostgresStorage(
        bouncers["transaction"].conninfo(), schema=postgres_cluster.new_schema(), create=True
    )
    try:
        before = storage.put("k", b"before")
        paused = pause_once_in_a_write(monkeypatch, pause_before)
        if pause_before == "the bump":
            revision = storage.put("k", b"after")
            assert storage.get("k") == Entry(b"after", revision)
            assert [c.revision for c in storage.changes_since(before).changes] == [revision]
        else:
            with pytest.raises(OutcomeUnknownError, match="the change may have been made"):
                storage.put("k", b"after")
            entry = storage.get("k")
            assert entry is not None and entry.value in (b"before", b"after")
        assert paused, "the pause was never made"
    finally:
        storage.close()


def test_a_failover_behind_transaction_pooling_is_not_served_from_the_cache(
    bouncers: dict[str, PgBouncer], postgres_cluster: PostgresCluster
) -> None:
    """Behind pgbouncer in transaction mode a client's connection outlives the server: pgbouncer
    opens new server connections after a restart or a failover, and the client never reconnects.
    A replica that had cached a value at a revision the failover lost must still not serve it once
    the new server reaches that revision with other content (as without a pooler: the storage
    notices the server changed at its next change-head read, not only on a new connection), and
    its watchers are told to resync."""
    place = Place(postgres_cluster, postgres_cluster.new_schema())
    store = EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    store.put("auth/X", b"kept-value")
    standby = StandbyCopy(place, postgres_cluster)
    through_pooler = PostgresStorage(
        bouncers["transaction"].conninfo(), schema=place.schema, max_connections=1
    )
    replica = EncryptedStore.open(through_pooler, PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    hub = ChangeHub(replica, max_subscribers=4, poll_seconds=60)  # it reads when poked
    try:
        watcher = hub.subscribe()
        store.put("auth/X", b"LOST-in-the-failover")  # the commit the standby never got
        assert replica.get("auth/X").value.reveal() == b"LOST-in-the-failover"  # cached
        hub.poke()
        _changes_until(watcher, bool)
        store.close()
        standby.fail_over()  # the server restarts; pgbouncer keeps our client connection
        writer = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
        try:
            writer.put("auth/X", b"written-after-the-failover")  # version 2 again, same revision
        finally:
            writer.close()
        assert replica.get("auth/X").value.reveal() == b"written-after-the-failover"
        hub.poke()
        assert [c.kind for c in _changes_until(watcher, bool)] == [ChangeKind.RESYNC]
    finally:
        hub.close()
        replica.close()


def test_no_listen_through_a_pooler_and_pgbouncer_is_not_sent_notifications_for_nobody(
    postgres_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A LISTEN through transaction pooling stays on a pooled server connection: the notification
    of every commit then reaches pgbouncer while that connection serves no client ("got packet 'A'
    from server when not linked", a warning each; once seen to leave the pool answering nobody),
    and never the listener. Behind a pooler the store does not LISTEN; its watchers poll."""
    _require_pgbouncer()
    bouncer = PgBouncer(postgres_cluster, pool_mode="transaction", pool_size=2).start()
    schema = postgres_cluster.new_schema()
    storage = PostgresStorage(bouncer.conninfo(), schema=schema, create=True)
    writer = PostgresStorage(postgres_cluster.url(with_password=True), schema=schema)
    try:
        caplog.set_level(logging.INFO, logger=postgres_module.__name__)
        stop = storage.on_commits(lambda: None)
        try:
            deadline = time.monotonic() + 15  # until the listener decided: it listens, or says not
            while not _listening_backends(postgres_cluster) and not any(
                getattr(r, "event", None) == "store.listener_off" for r in caplog.records
            ):
                assert time.monotonic() < deadline, "the listener neither listened nor said why not"
                time.sleep(0.05)
            for n in range(5):
                writer.put("k", b"%d" % n)
            assert _listening_backends(postgres_cluster) == 0
        finally:
            stop()
        assert storage.pooled and not writer.pooled
        assert storage.get("k") == writer.get("k")
        assert "not linked" not in bouncer.log()
    finally:
        storage.close()
        writer.close()
        bouncer.stop()


def test_statements_are_prepared_on_a_direct_connection_only(
    bouncers: dict[str, PgBouncer], postgres_cluster: PostgresCluster
) -> None:
    """psycopg's server-side prepared statements save a parse and plan per statement: kept on a
    direct connection, off behind a pooler (in either mode: which one cannot be told)."""
    schema = postgres_cluster.new_schema()
    for conninfo, prepared in (
        (postgres_cluster.url(with_password=True), True),
        (bouncers["session"].conninfo(), False),
    ):
        storage = PostgresStorage(conninfo, schema=schema, create=True, max_connections=1)
        try:
            for _ in range(8):
                storage.get("k")
            count = storage._read(
                lambda conn: conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
            )
            assert (count is not None and count[0] > 0) == prepared
        finally:
            storage.close()


def _listening_backends(cluster: PostgresCluster) -> int:
    with cluster.connect(superuser=True) as admin:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'").fetchone()
    return 0 if row is None else int(row[0])


def test_the_postgres_rotator_leaves_no_statement_timeout_on_a_pooled_server_connection(
    postgres_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rotate --postgres-role` with the administrator's connection through pgbouncer in
    transaction mode: its statement_timeout for ALTER ROLE was a session setting, left on the
    server connection for the administrator's next client (a DBA's psql then had its statements
    cut at the rotation's timeout). With a pool of one, that next client sees what it left."""
    _require_pgbouncer()
    admin_name, admin_password = f"adm_{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    app_name = f"app_{secrets.token_hex(4)}"
    with postgres_cluster.connect(superuser=True) as superuser:
        superuser.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
                sql.Identifier(admin_name), sql.Literal(admin_password)
            )
        )
        superuser.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(app_name)))
    bouncer = PgBouncer(
        postgres_cluster, pool_mode="transaction", pool_size=1, users={admin_name: admin_password}
    ).start()
    try:
        admin = f"host=127.0.0.1 port={bouncer.port} dbname={DATABASE} user={admin_name}"
        monkeypatch.setenv("PGPASSWORD", admin_password)  # the rotator takes it from libpq's places
        role = PostgresRole.parse(app_name, admin)
        role.check_before_stage(timeout=7)
        role.set_password(SecretValue(b"new-app-password-1"), timeout=7)
        with psycopg.connect(admin, autocommit=True) as next_client:
            assert next_client.execute("SHOW statement_timeout").fetchone() == ("0",)
        with postgres_cluster.connect(superuser=True) as superuser:  # and the password was set
            row = superuser.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (app_name,)
            ).fetchone()
        assert row is not None and str(row[0]).startswith("SCRAM-SHA-256$")
    finally:
        bouncer.stop()
        with postgres_cluster.connect(superuser=True) as superuser:
            for name in (app_name, admin_name):
                superuser.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
