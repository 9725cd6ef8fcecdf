"""The PostgreSQL store as a DBA sets it up: roles with only the privileges docs/stores.md names,
TLS to the database with a certificate the test makes, and the limits a DBA sets on the role.

Each CLI run is the real console script; the database password travels in PGPASSWORD only."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from postgres_cluster import DATABASE, PostgresCluster
from secrets_manager.crypto import kdf
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.tls import pki

SCRIPT = Path(sys.executable).with_name("secrets-manager")
MASTER_PASSWORD = "correct horse battery staple"
Cli = Callable[..., subprocess.CompletedProcess[str]]


def _cli(url: str, password: str, home: Path) -> Cli:
    def run(*args: str, input: str = "") -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(SCRIPT), "--store", url, *args],
            input=input,
            capture_output=True,
            text=True,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(home),
                "PGPASSWORD": password,
                "PGCONNECT_TIMEOUT": "10",
                "MASTER_PASSWORD": MASTER_PASSWORD,
            },
            timeout=60,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        assert password not in proc.stderr + proc.stdout
        return proc

    return run


@pytest.fixture
def new_role(postgres_cluster: PostgresCluster) -> Iterator[Callable[[], tuple[str, str]]]:
    """Login roles made for one test (name, password), dropped with what they own afterwards."""
    made: list[str] = []

    def make() -> tuple[str, str]:
        name, password = f"r_{secrets.token_hex(5)}", secrets.token_urlsafe(16)
        with postgres_cluster.connect(superuser=True) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )
        made.append(name)
        return name, password

    yield make
    for name in made:  # what it owns and was granted in the test database, then the role
        _as_superuser_in_database(
            postgres_cluster, sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name))
        )
        with postgres_cluster.connect(superuser=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


class PostgresClusterDatabase:
    """A superuser connection to one database of the cluster (DROP OWNED works per database)."""

    def __init__(self, cluster: PostgresCluster, database: str) -> None:
        self._conn = psycopg.connect(
            host="127.0.0.1", port=cluster.port, user="postgres", dbname=database,
            password=cluster._superuser_password, autocommit=True, connect_timeout=10,
        )  # fmt: skip

    def __enter__(self) -> PostgresClusterDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()

    def execute(self, statement: sql.Composable) -> None:
        self._conn.execute(statement)


def _as_superuser_in_database(cluster: PostgresCluster, *statements: sql.Composable) -> None:
    with PostgresClusterDatabase(cluster, DATABASE) as db:
        for statement in statements:
            db.execute(statement)


def _url(cluster: PostgresCluster, user: str, schema: str) -> str:
    return f"postgresql://{user}@127.0.0.1:{cluster.port}/{DATABASE}?schema={schema}"


def test_a_role_granted_only_dml_by_the_owner_runs_every_command_init_was_done_by_another(
    postgres_cluster: PostgresCluster, new_role: Callable[[], tuple[str, str]], tmp_path: Path
) -> None:
    """The owner (who had CREATE) runs init; a role given USAGE on the schema and SELECT, INSERT,
    UPDATE, DELETE on its tables, as docs/stores.md says, then stores, reads, lists, rotates keys
    and backs up."""
    schema = postgres_cluster.new_schema()
    owner = _cli(_url(postgres_cluster, "sm_test", schema), postgres_cluster.role_password, tmp_path)
    assert owner("init", "--kdf-profile", "test").returncode == 0
    name, password = new_role()
    with postgres_cluster.connect() as conn:  # the owner grants, as docs/stores.md shows
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(name)
            )
        )
    app = _cli(_url(postgres_cluster, name, schema), password, tmp_path)
    for args, input in [
        (("store", "auth/DB_PASSWORD"), "dml-only-value"),
        (("get", "auth/DB_PASSWORD"), ""),
        (("list",), ""),
        (("keys", "rotate", "auth"), ""),
        (("backup", str(tmp_path / "b.smbackup")), ""),
        (("audit", "verify"), ""),
    ]:
        done = app(*args, input=input)
        assert done.returncode == 0, (args, done.stderr)
    assert app("get", "auth/DB_PASSWORD").stdout == "dml-only-value\n"


def test_a_missing_privilege_is_one_line_naming_it_and_the_grant(
    postgres_cluster: PostgresCluster, new_role: Callable[[], tuple[str, str]], tmp_path: Path
) -> None:
    """No CREATE on the database: init says so; USAGE but SELECT alone: every command (reads too,
    which write their audit anchor) names INSERT, UPDATE, DELETE; nothing on the schema: USAGE."""
    schema = postgres_cluster.new_schema()
    owner = _cli(_url(postgres_cluster, "sm_test", schema), postgres_cluster.role_password, tmp_path)
    assert owner("init", "--kdf-profile", "test").returncode == 0
    assert owner("store", "auth/K", input="v").returncode == 0
    name, password = new_role()

    def run(schema_of: str, *args: str) -> str:
        done = _cli(_url(postgres_cluster, name, schema_of), password, tmp_path / name)(*args)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    (tmp_path / name).mkdir()
    refused = run(postgres_cluster.new_schema(), "init", "--kdf-profile", "test")
    assert f"GRANT CREATE ON DATABASE {DATABASE} TO {name}" in refused
    refused = run(schema, "get", "auth/K")
    assert (
        f"needs USAGE on schema {schema}" in refused and f"GRANT USAGE, CREATE ON SCHEMA {schema}" in refused
    )
    with postgres_cluster.connect() as conn:
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(name)
            )
        )
    refused = run(schema, "get", "auth/K")
    assert "needs SELECT, INSERT, UPDATE and DELETE" in refused
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {name}" in refused
    assert owner("get", "auth/K").stdout == "v\n"  # untouched


def test_init_into_a_schema_the_dba_made_with_create_granted(
    postgres_cluster: PostgresCluster, new_role: Callable[[], tuple[str, str]], tmp_path: Path
) -> None:
    """A DBA creates the schema and grants the role USAGE and CREATE on it (no CREATE on the
    database): init makes the tables there, and the store works."""
    schema = postgres_cluster.new_schema()
    name, password = new_role()
    _as_superuser_in_database(
        postgres_cluster,
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)),
        sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(
            sql.Identifier(schema), sql.Identifier(name)
        ),
    )
    app = _cli(_url(postgres_cluster, name, schema), password, tmp_path)
    init = app("init", "--kdf-profile", "test")
    assert init.returncode == 0, init.stderr
    assert app("store", "auth/K", input="v").returncode == 0
    assert app("get", "auth/K").stdout == "v\n"
    _as_superuser_in_database(
        postgres_cluster, sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema))
    )


# ---- TLS to the database ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(
    postgres_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PostgresCluster, Path]]:
    """A cluster of its own with `ssl = on` and a server certificate for `localhost` and
    `db.internal` (no IP address), signed by a CA the test makes (`ca.pem` in the directory
    returned); `other-ca.pem` signed nothing of it. (Skipped where the session cluster is.)"""
    directory = tmp_path_factory.mktemp("pg-tls")
    ca_cert, ca_key = pki.new_ca()
    (directory / "ca.pem").write_bytes(ca_cert)
    (directory / "other-ca.pem").write_bytes(pki.new_ca()[0])
    cert, key = pki.issue(ca_cert, ca_key, "db", server=True, dns=["localhost", "db.internal"])
    cluster = PostgresCluster().start()
    try:
        cluster.enable_tls(cert, key)
        yield cluster, directory
    finally:
        cluster.stop()


def _tls_url(cluster: PostgresCluster, host: str, schema: str, rootcert: Path) -> str:
    return (
        f"postgresql://sm_test@{host}:{cluster.port}/{DATABASE}?schema={schema}"
        f"&sslmode=verify-full&sslrootcert={rootcert}"
    )


def test_verify_full_with_the_servers_ca_works(
    tls_cluster: tuple[PostgresCluster, Path], tmp_path: Path
) -> None:
    cluster, directory = tls_cluster
    cli = _cli(
        _tls_url(cluster, "localhost", cluster.new_schema(), directory / "ca.pem"),
        cluster.role_password,
        tmp_path,
    )
    init = cli("init", "--kdf-profile", "test")
    assert init.returncode == 0, init.stderr
    assert cli("store", "auth/K", input="over-tls").returncode == 0
    assert cli("get", "auth/K").stdout == "over-tls\n"


def test_verify_full_against_a_dns_name_while_connecting_to_a_fixed_address(
    tls_cluster: tuple[PostgresCluster, Path], tmp_path: Path
) -> None:
    """libpq's `hostaddr` (connect to this address, verify the certificate against the URL's host
    name) and `ssl_min_protocol_version`, as production URLs carry them: accepted, and the name
    checked is the URL's (a certificate for another name is refused)."""
    cluster, directory = tls_cluster
    schema = cluster.new_schema()
    options = "&hostaddr=127.0.0.1&ssl_min_protocol_version=TLSv1.3"
    cli = _cli(
        _tls_url(cluster, "db.internal", schema, directory / "ca.pem") + options,
        cluster.role_password,
        tmp_path,
    )
    init = cli("init", "--kdf-profile", "test")
    assert init.returncode == 0, init.stderr
    assert f"postgresql://sm_test@db.internal:{cluster.port}/{DATABASE}" in init.stderr
    assert cli("store", "auth/K", input="by-address").returncode == 0
    assert cli("get", "auth/K").stdout == "by-address\n"
    other = _cli(
        _tls_url(cluster, "db.example", schema, directory / "ca.pem") + options,
        cluster.role_password,
        tmp_path,
    )
    refused = other("get", "auth/K")
    assert refused.returncode == 1 and 'does not match host name "db.example"' in refused.stderr, (
        refused.stderr
    )


@pytest.mark.parametrize(
    ("host", "rootcert", "says"),
    [
        (
            "localhost",
            "other-ca.pem",
            "certificate verify failed; check that sslrootcert names the CA that signed",
        ),
        ("127.0.0.1", "ca.pem", 'does not match host name "127.0.0.1"'),
        ("localhost", "missing.pem", "root certificate file"),
    ],
)
def test_a_certificate_that_does_not_verify_is_one_line_saying_what_to_check(
    tls_cluster: tuple[PostgresCluster, Path], tmp_path: Path, host: str, rootcert: str, says: str
) -> None:
    """A root certificate that did not sign the server's, a host name the certificate does not
    hold, a root certificate file that is not there: exit 1 (a storage failure), one line, what to
    check, never the password."""
    cluster, directory = tls_cluster
    cli = _cli(
        _tls_url(cluster, host, cluster.new_schema(), directory / rootcert), cluster.role_password, tmp_path
    )
    for args in (("init", "--kdf-profile", "test"), ("get", "auth/K")):
        done = cli(*args)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and says in lines[0], lines


# ---- several hosts, one a hot standby ----------------------------------------------------------


def test_with_a_standby_listed_first_target_session_attrs_read_write_finds_the_primary(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """`postgresql://user@STANDBY,PRIMARY/db?target_session_attrs=read-write` (libpq's multi-host):
    a CLI write and read land on the primary. The standby alone refuses every command, reads too
    (each writes its audit anchor), in one line that says to give the primary or read-write."""
    schema = postgres_cluster.new_schema()
    primary = f"127.0.0.1:{postgres_cluster.port}"
    owner = _cli(
        f"postgresql://sm_test@{primary}/{DATABASE}?schema={schema}", postgres_cluster.role_password, tmp_path
    )
    assert owner("init", "--kdf-profile", "test").returncode == 0
    assert owner("store", "auth/K", input="before").returncode == 0
    standby = postgres_cluster.start_standby()
    try:
        both = f"postgresql://sm_test@127.0.0.1:{standby.port},{primary}/{DATABASE}?schema={schema}"
        cli = _cli(f"{both}&target_session_attrs=read-write", postgres_cluster.role_password, tmp_path)
        stored = cli("store", "auth/K", input="written-to-the-primary")
        assert stored.returncode == 0, stored.stderr
        assert cli("get", "auth/K").stdout == "written-to-the-primary\n"
        assert owner("get", "auth/K").stdout == "written-to-the-primary\n"
        alone = _cli(
            f"postgresql://sm_test@127.0.0.1:{standby.port}/{DATABASE}?schema={schema}",
            postgres_cluster.role_password,
            tmp_path,
        )
        for args, input in ((("store", "auth/K"), "to-the-standby"), (("get", "auth/K"), "")):
            refused = alone(*args, input=input)
            assert refused.returncode == 1, refused.stderr
            lines = refused.stderr.splitlines()
            assert len(lines) == 1 and "target_session_attrs=read-write" in lines[0], lines
        assert owner("get", "auth/K").stdout == "written-to-the-primary\n"
    finally:
        standby.stop()


# ---- limits a DBA sets on the role ------------------------------------------------------------


def _dml_role(
    cluster: PostgresCluster, new_role: Callable[[], tuple[str, str]], schema: str
) -> tuple[str, str]:
    name, password = new_role()
    with cluster.connect() as conn:
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(name)
            )
        )
    return name, password


def test_a_roles_statement_timeout_below_a_lock_wait_is_one_line_naming_it(
    postgres_cluster: PostgresCluster, new_role: Callable[[], tuple[str, str]], tmp_path: Path
) -> None:
    """The DBA set statement_timeout = 300ms on the role; a store waiting for another writer's lock
    is cut by it: one line that names statement_timeout, nothing stored; once the lock is free the
    same command works."""
    schema = postgres_cluster.new_schema()
    owner = _cli(_url(postgres_cluster, "sm_test", schema), postgres_cluster.role_password, tmp_path)
    assert owner("init", "--kdf-profile", "test").returncode == 0
    assert owner("store", "auth/K", input="before").returncode == 0
    name, password = _dml_role(postgres_cluster, new_role, schema)
    with postgres_cluster.connect(superuser=True) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = '300ms'").format(sql.Identifier(name)))
    app = _cli(_url(postgres_cluster, name, schema), password, tmp_path)
    with postgres_cluster.commit_lock_held(schema):
        refused = app("store", "auth/K", input="after")
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and "statement_timeout set for the store's role or database" in lines[0], lines
    assert owner("get", "auth/K").stdout == "before\n"
    assert app("store", "auth/K", input="after").returncode == 0
    assert owner("get", "auth/K").stdout == "after\n"


def test_a_role_at_its_connection_limit_is_one_line_saying_what_to_lower_or_raise(
    postgres_cluster: PostgresCluster, new_role: Callable[[], tuple[str, str]], tmp_path: Path
) -> None:
    """The server has no connection left for the role (here its CONNECTION LIMIT 1, held by
    another client; the server's max_connections reads alike): one line, exit 1."""
    schema = postgres_cluster.new_schema()
    owner = _cli(_url(postgres_cluster, "sm_test", schema), postgres_cluster.role_password, tmp_path)
    assert owner("init", "--kdf-profile", "test").returncode == 0
    name, password = _dml_role(postgres_cluster, new_role, schema)
    with postgres_cluster.connect(superuser=True) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 1").format(sql.Identifier(name)))
    app = _cli(_url(postgres_cluster, name, schema), password, tmp_path)
    held = psycopg.connect(
        host="127.0.0.1", port=postgres_cluster.port, user=name, dbname=DATABASE, password=password,
        autocommit=True, connect_timeout=10,
    )  # fmt: skip
    try:
        refused = app("list")
    finally:
        held.close()
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and "lower ?max_connections= in the store URL" in lines[0], lines
    assert app("list").returncode == 0


def test_a_long_lived_handle_outlives_idle_session_timeout_and_pg_terminate_backend(
    postgres_cluster: PostgresCluster, new_role: Callable[[], tuple[str, str]]
) -> None:
    """A serve replica or an SDK process keeps its store open for days. The DBA's
    idle_session_timeout (here 300 ms on the role) ends its idle connections, and
    pg_terminate_backend ends them between calls: every next read and write is answered (retried
    on a new connection), and each acknowledged write is there."""
    schema = postgres_cluster.new_schema()
    EncryptedStore.create(
        PostgresStorage(postgres_cluster.url(with_password=True), schema=schema, create=True),
        PasswordUnlock(MASTER_PASSWORD, kdf.TEST),
    ).close()
    name, password = _dml_role(postgres_cluster, new_role, schema)
    with postgres_cluster.connect(superuser=True) as admin:
        admin.execute(
            sql.SQL("ALTER ROLE {} SET idle_session_timeout = '300ms'").format(sql.Identifier(name))
        )
    conninfo = (
        f"host=127.0.0.1 port={postgres_cluster.port} dbname={DATABASE} user={name} password={password}"
    )
    store = EncryptedStore.open(
        PostgresStorage(conninfo, schema=schema), PasswordUnlock(MASTER_PASSWORD, kdf.TEST)
    )

    def sessions() -> int:
        with postgres_cluster.connect(superuser=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (name,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    try:
        for round in range(3):
            assert store.put("auth/K", b"value-%d" % round).version == round + 1
            assert sessions() > 0
            if round == 1:  # the DBA ends them (a failover script, a cleanup)
                with postgres_cluster.connect(superuser=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,)
                    )
            deadline = time.monotonic() + 15
            while sessions():  # ended by the server: the handle's connections are all dead now
                assert time.monotonic() < deadline, "the server kept the idle sessions"
                time.sleep(0.05)
            assert store.get("auth/K").value.reveal() == b"value-%d" % round
            assert [m.name for m in store.list("auth/")] == ["auth/K"]
    finally:
        store.close()
