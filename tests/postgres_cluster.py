"""A private PostgreSQL 15 cluster for one test session, from the Debian binaries.

`PostgresCluster.start()` runs initdb and pg_ctl from /usr/lib/postgresql/15/bin in a fresh
directory of its own: as the `postgres` user when we are root (initdb refuses root), listening on
127.0.0.1 and a free port only (no Unix socket), with scram-sha-256 password authentication for
every connection. `stop()` shuts it down and removes the directory. Passwords reach initdb through a
file and the server through SQL over the connection, never through a process's arguments.

Tests use a login role (`ROLE`) that owns one database (`DATABASE`); each test takes a schema of its
own in it (`new_schema()`), which is as good as an empty database and costs a millisecond.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

BIN_DIR = Path(os.environ.get("SECRETS_MANAGER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SYSTEM_USER = "postgres"
ROLE = "sm_test"
DATABASE = "sm_test"
START_ATTEMPTS = 3  # a free port can be taken by someone else between our probe and the server's bind


class ClusterUnavailable(Exception):
    """What is missing to start a cluster on this machine (the reason a test is skipped)."""


def missing_requirements() -> str | None:
    """Why no cluster can start here, or None if it can."""
    for tool in ("initdb", "pg_ctl"):
        if not (BIN_DIR / tool).is_file():
            return (
                f"PostgreSQL 15 server binaries not found ({BIN_DIR / tool} is missing); "
                "install them with 'apt-get install postgresql-15'"
            )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root, but there is no '{SYSTEM_USER}' user to run initdb as (it refuses root)"
        if shutil.which("runuser") is None:
            return "running as root, but 'runuser' (util-linux) is missing to run initdb as 'postgres'"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresCluster:
    """One private cluster: `start()`, then `url()` / `connect()`, then `stop()`."""

    def __init__(self) -> None:
        self.role_password = secrets.token_urlsafe(18)
        self._superuser_password = secrets.token_urlsafe(18)
        self.port = 0
        self._dir: Path | None = None
        self._as_system_user = os.geteuid() == 0

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PostgresCluster:
        reason = missing_requirements()
        if reason is not None:
            raise ClusterUnavailable(reason)
        self._dir = Path(tempfile.mkdtemp(prefix="secrets-manager-pg-"))
        try:
            self._initdb()
            for attempt in range(1, START_ATTEMPTS + 1):
                self.port = _free_port()
                try:
                    self._pg_ctl("start", "-w", "-t", "60", "-l", str(self._dir / "server.log"), "-o",
                                 f"-p {self.port}")  # fmt: skip
                    break
                except subprocess.CalledProcessError:
                    if attempt == START_ATTEMPTS:
                        raise RuntimeError(f"PostgreSQL did not start: {self.server_log()}") from None
            self._create_role_and_database()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._dir is None:
            return
        if (self._dir / "data" / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30")
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def start_standby(self) -> PostgresCluster:
        """A hot standby of this cluster (pg_basebackup -R, streaming), started on a free port of
        its own: read-only, it answers a write with "cannot execute … in a read-only transaction".
        Stop it with its own `stop()`."""
        assert self._dir is not None
        hba = self._dir / "data" / "pg_hba.conf"
        if "replication" not in hba.read_text():
            with hba.open("a") as lines:
                lines.write("host replication all 127.0.0.1/32 scram-sha-256\n")
            with self.connect(superuser=True) as admin:
                admin.execute("SELECT pg_reload_conf()")
        standby = PostgresCluster()
        standby.role_password, standby._superuser_password = self.role_password, self._superuser_password
        standby._dir = Path(tempfile.mkdtemp(prefix="secrets-manager-pg-standby-"))
        try:
            self._give_to_system_user(standby._dir)
            deadline = time.monotonic() + 30
            while True:  # until the reload above lets the replication connection in
                try:
                    standby._run(
                        str(BIN_DIR / "pg_basebackup"), "--host", "127.0.0.1", "--port", str(self.port),
                        "--username", SYSTEM_USER, "--pgdata", str(standby._dir / "data"),
                        "--write-recovery-conf", "--wal-method", "stream", "--no-sync",
                        "--checkpoint", "fast",
                        env={"PGPASSWORD": self._superuser_password},
                    )  # fmt: skip
                    break
                except subprocess.CalledProcessError:
                    if time.monotonic() > deadline:
                        raise
                    shutil.rmtree(standby._dir / "data", ignore_errors=True)
                    time.sleep(0.1)
            for attempt in range(1, START_ATTEMPTS + 1):
                standby.port = _free_port()
                try:
                    standby._pg_ctl("start", "-w", "-t", "60", "-l", str(standby._dir / "server.log"), "-o",
                                    f"-p {standby.port}")  # fmt: skip
                    break
                except subprocess.CalledProcessError:
                    if attempt == START_ATTEMPTS:
                        raise RuntimeError(f"the standby did not start: {standby.server_log()}") from None
        except BaseException:
            standby.stop()
            raise
        return standby

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every connection ends, and the server comes back on its port
        with a new postmaster (as a failover to another server looks to a client)."""
        assert self._dir is not None
        self._pg_ctl("restart", "-m", "fast", "-w", "-t", "60", "-l", str(self._dir / "server.log"))

    def _initdb(self) -> None:
        assert self._dir is not None
        password_file = self._dir / "superuser-password"
        password_file.write_text(self._superuser_password + "\n")
        password_file.chmod(0o600)
        self._give_to_system_user(self._dir, password_file)
        try:
            self._run(
                str(BIN_DIR / "initdb"),
                "--pgdata", str(self._dir / "data"),
                "--username", SYSTEM_USER,
                "--pwfile", str(password_file),
                "--auth", "scram-sha-256",
                "--encoding", "UTF8",
                "--locale", "C",
                "--no-sync",
            )  # fmt: skip
        finally:
            password_file.unlink()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",  # TCP on loopback only: password auth applies to all
            "password_encryption": "'scram-sha-256'",
            "fsync": "off",  # a throwaway cluster: durability across power cuts is not under test
            "full_page_writes": "off",
            "max_connections": "60",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
        }
        with (self._dir / "data" / "postgresql.conf").open("a") as conf:
            conf.write("\n# secrets-manager test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        hba = "host all all 127.0.0.1/32 scram-sha-256\n"
        (self._dir / "data" / "pg_hba.conf").write_text(hba)

    def _give_to_system_user(self, *paths: Path) -> None:
        if not self._as_system_user:
            return
        account = pwd.getpwnam(SYSTEM_USER)
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)

    def _pg_ctl(self, *args: str) -> None:
        assert self._dir is not None
        self._run(str(BIN_DIR / "pg_ctl"), "--pgdata", str(self._dir / "data"), *args)

    def _run(self, *command: str, env: Mapping[str, str] | None = None) -> None:
        prefix = ["runuser", "-u", SYSTEM_USER, "--"] if self._as_system_user else []
        subprocess.run(
            [*prefix, *command],
            check=True,
            capture_output=True,
            cwd=self._dir,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", **(env or {})},
            timeout=120,
        )

    def _create_role_and_database(self) -> None:
        with self.connect(superuser=True) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(self.role_password)
                )
            )
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(ROLE))
            )

    def enable_tls(self, cert_pem: bytes, key_pem: bytes) -> None:
        """`ssl = on` with this certificate (a chain) and key, by a reload: a connection made after
        this returns may use TLS (and one with sslmode=verify-full must)."""
        assert self._dir is not None
        cert, key = self._dir / "server.crt", self._dir / "server.key"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        key.chmod(0o600)  # the server refuses a key others may read
        self._give_to_system_user(cert, key)
        with self.connect(superuser=True) as admin:
            for name, value in (("ssl_cert_file", str(cert)), ("ssl_key_file", str(key)), ("ssl", "on")):
                admin.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
                )
            admin.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while True:  # the reload is asynchronous: wait until a new connection sees it
            with self.connect(superuser=True) as admin:
                if admin.execute("SHOW ssl").fetchone() == ("on",):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not turn TLS on: {self.server_log()}")
            time.sleep(0.05)

    def server_log(self, tail: int | None = 4000) -> str:
        """The server's log: its last `tail` characters (None: all of it)."""
        if self._dir is None:
            return ""
        log = self._dir / "server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return text if tail is None else text[-tail:]

    # ---- for tests ---------------------------------------------------------------------------

    def url(self, *, with_password: bool = False, database: str = DATABASE, user: str = ROLE) -> str:
        """`postgresql://sm_test@127.0.0.1:PORT/sm_test`; the password only when asked for."""
        secret = f":{self.role_password}" if with_password else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{database}"

    def env(self) -> Mapping[str, str]:
        """libpq's own variables for the test role: the password travels here, not in a URL."""
        return {"PGPASSWORD": self.role_password, "PGCONNECT_TIMEOUT": "10"}

    def connect(self, *, superuser: bool = False) -> psycopg.Connection[tuple[object, ...]]:
        if superuser:
            return psycopg.connect(
                host="127.0.0.1", port=self.port, user=SYSTEM_USER, dbname="postgres",
                password=self._superuser_password, autocommit=True, connect_timeout=10,
            )  # fmt: skip
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=ROLE, dbname=DATABASE,
            password=self.role_password, autocommit=True, connect_timeout=10,
        )  # fmt: skip

    @contextlib.contextmanager
    def commit_lock_held(self, schema: str) -> Iterator[None]:
        """Another transaction holds the store's commit lock (its counter row) until the block
        ends, as a big restore or import into the database, or a writer paused mid-commit, does."""
        with self.connect() as other:
            other.execute("BEGIN")
            query = sql.SQL("SELECT revision FROM {}.meta WHERE id = 1 FOR UPDATE")
            other.execute(query.format(sql.Identifier(schema)))
            try:
                yield
            finally:
                other.execute("ROLLBACK")

    def listeners(self) -> list[int]:
        """Backend pids of secrets-manager connections waiting on LISTEN (change listeners)."""
        with self.connect(superuser=True) as admin:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'secrets-manager' "
                "AND query LIKE 'LISTEN%%'"
            ).fetchall()
        return [int(row[0]) for row in rows]

    def new_schema(self) -> str:
        """A fresh schema name nobody has used; the store creates it."""
        return f"t_{secrets.token_hex(6)}"


def pause_once_in_a_write(monkeypatch: pytest.MonkeyPatch, before: str) -> list[str]:
    """Make this process pause 0.5 s once inside the next write transaction: before "the bump" (the
    revision counter's update) or before "COMMIT" (after the last statement, pg_notify), as a
    process that stalled past the server's idle limit would. The list it returns holds the
    statement paused at, once it was."""
    paused: list[str] = []
    execute = psycopg.Cursor.execute

    def pausing_execute(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        text = query.as_string(cursor.connection) if isinstance(query, sql.Composable) else str(query)
        if before == "the bump" and "revision = revision + 1" in text and not paused:
            paused.append(text)
            time.sleep(0.5)
        result = execute(cursor, query, *args, **kwargs)
        if before == "COMMIT" and "pg_notify" in text and not paused:  # the last before COMMIT
            paused.append(text)
            time.sleep(0.5)
        return result

    monkeypatch.setattr(psycopg.Cursor, "execute", pausing_execute)
    return paused
