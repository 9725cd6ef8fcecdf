"""A real pgbouncer in front of the private PostgreSQL cluster (tests/postgres_cluster.py).

`PgBouncer(cluster, pool_mode=...).start()` writes an ini file and a userlist (the test role's
password, in a file only its owner reads: never in a process's arguments) into a directory of its
own, and runs Debian's `pgbouncer` on 127.0.0.1 and a free port: as the `postgres` user when we are
root (pgbouncer refuses to run as root), else as ourselves. `stop()` ends it (by its own process id)
and removes the directory. `missing_requirements()` says why none can start here (no binary).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from postgres_cluster import DATABASE, ROLE, SYSTEM_USER, PostgresCluster, _free_port

START_SECONDS = 20.0


def binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.isfile(path)), None
    )


def missing_requirements() -> str | None:
    """Why no pgbouncer can start here, or None if it can."""
    if binary() is None:
        return "pgbouncer is not installed; install it with 'apt-get install pgbouncer'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return (
                f"running as root, but there is no '{SYSTEM_USER}' user to run pgbouncer as (it refuses root)"
            )
        if shutil.which("runuser") is None:
            return "running as root, but 'runuser' (util-linux) is missing to run pgbouncer as 'postgres'"
    return None


class PgBouncer:
    """One pgbouncer for the cluster's test database: `start()`, `url()`, `stop()`."""

    def __init__(
        self,
        cluster: PostgresCluster,
        *,
        pool_mode: str,
        pool_size: int = 4,
        users: dict[str, str] | None = None,
    ) -> None:
        """`users`: login roles (name → password) it lets in besides the cluster's test role."""
        self.cluster = cluster
        self.users = {ROLE: cluster.role_password, **(users or {})}
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        self._dir = Path(tempfile.mkdtemp(prefix="secrets-manager-pgbouncer-"))
        try:
            userlist = self._dir / "userlist.txt"
            userlist.write_text("".join(f'"{name}" "{password}"\n' for name, password in self.users.items()))
            userlist.chmod(0o600)
            self.port = _free_port()
            (self._dir / "pgbouncer.ini").write_text(
                "[databases]\n"
                f"{DATABASE} = host=127.0.0.1 port={self.cluster.port} dbname={DATABASE}\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                f"auth_type = scram-sha-256\nauth_file = {userlist}\n"
                f"pool_mode = {self.pool_mode}\ndefault_pool_size = {self.pool_size}\n"
                "max_client_conn = 200\n"
                # After a failed login to the server (a restart under way), try again within 1 s,
                # not pgbouncer's 15 s, so a test's next call after the restart finds it back.
                "server_login_retry = 1\n"
                f"logfile = {self._dir / 'pgbouncer.log'}\n"
            )
            prefix: list[str] = []
            if os.geteuid() == 0:
                account = pwd.getpwnam(SYSTEM_USER)
                for path in (self._dir, *self._dir.iterdir()):
                    os.chown(path, account.pw_uid, account.pw_gid)
                prefix = ["runuser", "-u", SYSTEM_USER, "--"]
            command = [*prefix, str(binary()), str(self._dir / "pgbouncer.ini")]
            self._process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            deadline = time.monotonic() + START_SECONDS
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"pgbouncer did not start: {self.log()}") from None
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def url(self) -> str:
        """`postgresql://sm_test@127.0.0.1:PORT/sm_test` through pgbouncer (password: PGPASSWORD)."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def conninfo(self) -> str:
        """libpq's key=value form, password included (as a service's config might hold it)."""
        password = self.cluster.role_password
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={ROLE} password={password}"

    def log(self) -> str:
        path = None if self._dir is None else self._dir / "pgbouncer.log"
        return path.read_text(errors="replace")[-4000:] if path is not None and path.exists() else ""

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()  # our own process (runuser passes SIGTERM on)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
