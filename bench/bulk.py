"""Bulk operations at a trading firm's size, on the four stores, each beside a baseline measured in
the same run.

A store of N secrets (one service namespace, 56-byte values) on each store: the embedded SQLite
file, PostgreSQL (the tests' private cluster, tests/postgres_cluster.py, with fsync turned back on
so that a commit costs what it costs a user), the Vault test server (tests/vault_server.py) and
moto's server for AWS. Every command is the installed console script, a fresh process, as a user
runs it (the `test` KDF profile). The baselines:

* import (env, json): N single `put` calls of the same store through the store API in one
  process (what a loop over `store` would cost without a process per secret), and on SQLite and
  PostgreSQL the raw database's own bulk insert of N sealed rows in one transaction.
* list, export, `get_credentials()` (the SDK through `serve` with mutual TLS, every secret of
  the namespace): the store API in one process, `list` (for list) or `list` plus `get` of each.
* backup / restore: a plain copy of as many bytes as the backup file holds, fsynced.
* keys rotate --all + keys rewrap --all (SQLite and PostgreSQL: the others have no keys of ours):
  AES-GCM decrypt + encrypt of as many records in memory (what re-encryption cannot avoid).
* history of a secret written 1,000 times (100 versions kept: the most a secret may keep): `get`
  of the same secret (one process, one read).
* audit verify of a log of ~100,000 records: reading the file and one SHA-256 per line.

    python bench/bulk.py                 # 1,000 and 5,000 secrets (Vault 500, AWS 200)
    python bench/bulk.py --quick         # 200 secrets, 200 versions, 10,000 audit records
    python bench/bulk.py --stores sqlite,postgres --sizes 1k

ratio = ours / baseline (lower is better); "per secret" is ours' time over the secrets it handled.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from moto_fixtures import moto_environ
from postgres_cluster import PostgresCluster, missing_requirements
from secrets_manager.audit import AuditEvent, AuditLog
from secrets_manager.environment import Environment
from secrets_manager.store import SecretStore
from secrets_manager.store.url import open_external_store, open_store
from service_fixtures import client_environ, make_pki, start_server
from store_differ import four_cli_stores

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "bench password"  # noqa: S105 - throwaway stores
STORES = ("sqlite", "postgres", "vault", "aws")
VALUE_SIZE = 56
PUT_SAMPLE = 300  # the puts baseline times at most this many and scales to N
GROUPS = ("import", "read", "backup", "keys", "history", "audit")
FEWER = {"vault": 500, "aws": 200}  # the full run's one size on the slower test servers


def value(i: int) -> str:
    return f"value-{i:06d}-".ljust(VALUE_SIZE, "x")


class Bench:
    """The four stores, their environments, and the rows measured so far."""

    def __init__(self, directory: Path, cluster: Any, vault: Any, moto_endpoint: str) -> None:
        self.directory = directory
        self.cluster = cluster
        self.vault = vault
        self.moto_endpoint = moto_endpoint
        self.rows: list[tuple[str, str, str, float, str, float]] = []

    def fresh(self, label: str, tag: str) -> tuple[str, dict[str, str]]:
        """A new, empty store of kind `label`: its URL and the environment a command runs with."""
        where = self.directory / f"{label}-{tag}"
        where.mkdir()
        urls, environs = four_cli_stores(
            where,
            self.cluster,
            self.vault.address,
            self.vault.root_token,
            self.moto_endpoint,
            password=PASSWORD,
            aws_prefix=f"bulk{tag}",
        )
        env = {
            **environs[label],
            "SECRETS_MANAGER_STORE": urls[label],
            "SECRETS_MANAGER_AUDIT_FILE": str(where / "audit.jsonl"),
        }
        if "PYTHONPATH" in os.environ:  # another checkout's code (as bench/cli.py allows)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return urls[label], env

    @contextlib.contextmanager
    def empty(self, label: str, tag: str) -> Iterator[dict[str, str]]:
        """A new store holding nothing (Vault: a server of its own, whose `secret` mount is
        empty), for a restore: the environment a command on it runs with."""
        if label != "vault":
            yield self.fresh(label, tag)[1]
            return
        from vault_server import FakeVault

        vault = FakeVault().start()
        try:
            _, env = self.fresh(label, tag)
            env["SECRETS_MANAGER_STORE"] = vault.address.replace("http://", "vault+http://") + "/secret"
            env["VAULT_TOKEN"] = vault.root_token
            yield env
        finally:
            vault.stop()

    def run(self, env: dict[str, str], *args: str, stdin: bytes = b"") -> float:
        """Seconds one command takes, start to exit; it must succeed."""
        began = time.perf_counter()
        done = subprocess.run([str(SCRIPT), *args], env=env, input=stdin, capture_output=True, check=False)
        seconds = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} exit {done.returncode}: {done.stderr.decode()[-400:]}")
        return seconds

    def opened(self, label: str, url: str, env: dict[str, str]) -> SecretStore:
        """The store through its Python API in this process, as the CLI opens it."""
        audit = Path(env["SECRETS_MANAGER_AUDIT_FILE"])
        if label in ("vault", "aws"):
            return open_external_store(
                url, environment=Environment.DEVELOPMENT, actor="bench", audit_path=audit, environ=env
            )
        return open_store(
            url, PASSWORD.encode(), environment=Environment.DEVELOPMENT, actor="bench", audit_path=audit
        )

    def add(self, op: str, label: str, size: str, ours: float, baseline: str, base: float) -> None:
        self.rows.append((op, label, size, ours, baseline, base))
        print(f"  {op} {label} {size}: {ours:.3f} s, {baseline} {base:.3f} s", file=sys.stderr, flush=True)


def timed(work: Callable[[], object]) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def raw_bulk_insert(bench: Bench, label: str, count: int) -> float:
    """The database's own bulk insert of `count` sealed rows, one transaction, durable."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    rows = [
        (f"data/imp/KEY_{i:06d}#1", os.urandom(12) + aead.encrypt(os.urandom(12), value(i).encode(), None))
        for i in range(count)
    ]
    if label == "postgres":
        connection = bench.cluster.connect()
        try:
            table = f"raw_{count}_{os.getpid()}_{time.monotonic_ns()}"
            connection.execute(f"CREATE TABLE {table} (key text PRIMARY KEY, value bytea NOT NULL)")
            connection.commit()
            began = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.executemany(f"INSERT INTO {table} VALUES (%s, %s)", rows)  # noqa: S608
            connection.commit()
            return time.perf_counter() - began
        finally:
            connection.close()
    import sqlite3

    path = bench.directory / f"raw-{count}-{time.monotonic_ns()}.db"
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE t (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        began = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO t VALUES (?, ?)", rows)
        connection.execute("COMMIT")
        return time.perf_counter() - began
    finally:
        connection.close()


def copy_seconds(bench: Bench, source: Path) -> float:
    """A plain copy of a file, fsynced: what writing as many bytes costs at the least."""
    target = bench.directory / f"copy-{time.monotonic_ns()}"
    began = time.perf_counter()
    shutil.copyfile(source, target)
    with target.open("rb+") as handle:
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - began
    target.unlink()
    return seconds


def read_all(store: SecretStore, prefix: str) -> int:
    listing = store.list(prefix)
    for meta in listing:
        store.get(meta.name)
    return len(listing)


def measure_secrets(bench: Bench, label: str, count: int, sdk: bool, only: set[str]) -> None:
    """import (env and json), list, export, get_credentials(), backup and restore, keys, of
    `count` secrets on a new store of kind `label` (the groups named in `only`)."""
    size = f"{count:,}"
    url, env = bench.fresh(label, f"n{count}")
    env_file = bench.directory / f"{label}-{count}.env"
    env_file.write_text("".join(f"KEY_{i:06d}={value(i)}\n" for i in range(count)))
    json_file = bench.directory / f"{label}-{count}.json"
    json_file.write_text(json.dumps({f"KEY_{i:06d}": value(i) for i in range(count)}))
    ours = bench.run(env, "import", str(env_file), "--service", "imp")
    if "import" in only:
        sample = min(count, PUT_SAMPLE)
        store = bench.opened(label, url, env)
        try:
            base = timed(lambda: [store.put(f"loop/KEY_{i:06d}", value(i).encode()) for i in range(sample)])
        finally:
            store.close()
        puts = "puts in 1 process" + ("" if sample == count else f" ({sample:,}, scaled)")
        base *= count / sample
        bench.add("import env", label, size, ours, puts, base)
        if label in ("sqlite", "postgres"):
            bench.add(
                "import env", label, size, ours, "raw bulk insert", raw_bulk_insert(bench, label, count)
            )
        ours = bench.run(env, "import", str(json_file), "--service", "jsn")
        bench.add("import json", label, size, ours, puts, base)

    if "read" in only:
        ours = bench.run(env, "list", "imp/")
        store = bench.opened(label, url, env)
        try:
            base = timed(lambda: store.list("imp/"))
            read_base = timed(lambda: read_all(store, "imp/"))
        finally:
            store.close()
        bench.add("list", label, size, ours, "list in 1 process", base)
        out = bench.directory / f"{label}-{count}.export"
        ours = bench.run(env, "export", "--service", "imp", "-o", str(out))
        bench.add("export", label, size, ours, "list+get in 1 process", read_base)
        if sdk:
            try:
                ours = sdk_seconds(bench, label, url, env)
            except RuntimeError as exc:  # reported, not fatal: the other figures still count
                print(f"  get_credentials {label} {size} failed: {exc}", file=sys.stderr, flush=True)
                ours = float("nan")
            bench.add("get_credentials", label, size, ours, "list+get in 1 process", read_base)

    if "backup" in only:
        backup = bench.directory / f"{label}-{count}.smbackup"
        password_file = bench.directory / "backup-password"
        password_file.write_text("bench backup password\n")
        password_file.chmod(0o600)
        ours = bench.run(env, "backup", str(backup), "--backup-password-file", str(password_file))
        bench.add("backup", label, size, ours, "copy of its bytes", copy_seconds(bench, backup))
        with bench.empty(label, f"r{count}") as target_env:
            ours = bench.run(target_env, "restore", str(backup), "--backup-password-file", str(password_file))
        bench.add("restore", label, size, ours, "copy of its bytes", copy_seconds(bench, backup))

    if "keys" in only and label in ("sqlite", "postgres"):
        store = bench.opened(label, url, env)
        try:
            records = 2 * len(store.list(""))  # a value and a metadata record per secret
        finally:
            store.close()
        aead, sealed = AESGCM(AESGCM.generate_key(bit_length=256)), []
        for i in range(records):
            sealed.append(aead.encrypt(b"\0" * 12, value(i).encode(), None))
        other = AESGCM(AESGCM.generate_key(bit_length=256))

        def reencrypt() -> None:
            for record in sealed:
                other.encrypt(os.urandom(12), aead.decrypt(b"\0" * 12, record, None), None)

        base = timed(reencrypt)
        ours = bench.run(env, "keys", "rotate", "--all") + bench.run(env, "keys", "rewrap", "--all")
        bench.add("keys rotate+rewrap", label, f"{records // 2:,}", ours, "AES-GCM re-encrypt", base)


def sdk_seconds(bench: Bench, label: str, url: str, env: dict[str, str]) -> float:
    """`get_credentials()` of every secret of `imp/` from a fresh SDK client (a process of its
    own) through `serve` with mutual TLS over the store."""
    server_dir = bench.directory / f"serve-{label}-{time.monotonic_ns()}"
    server_dir.mkdir()
    make_pki(server_dir, ("bench",))
    (server_dir / "policy.toml").write_text(
        '[identities]\n"spiffe://shrivenquant.local/bench" = ["reader"]\n'
        '[roles.reader]\nrules = [{ path = "imp/*", capabilities = ["read", "list"] }]\n'
    )
    server = start_server(
        server_dir,
        store=url,
        environment={
            **{key: text for key, text in env.items() if key not in ("HOME", "PATH")},
            "MASTER_PASSWORD": PASSWORD,
        },
        settings=f'audit_file = "{env["SECRETS_MANAGER_AUDIT_FILE"]}"\n'
        "[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\n",
    )
    try:
        client_env = {
            "PATH": env["PATH"],
            "HOME": str(server_dir),
            **({"PYTHONPATH": env["PYTHONPATH"]} if "PYTHONPATH" in env else {}),
            **client_environ(server_dir, "bench", [server.address]),
        }
        client_env["SHRIVENQUANT_ENV"] = "development"
        code = (
            "import time, secrets_manager as sm\n"
            "began = time.perf_counter(); creds = sm.get_credentials_sync('imp')\n"
            "print(len(creds), time.perf_counter() - began)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], env=client_env, capture_output=True, check=False, timeout=600
        )
        if done.returncode != 0:
            errors = [line for line in server.log_lines if '"level": "ERROR"' in line or "error" in line]
            raise RuntimeError(f"get_credentials: {done.stderr.decode()[-300:]}; serve said: {errors[-2:]}")
        _, seconds = done.stdout.decode().split()
        return float(seconds)
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)


def measure_history(bench: Bench, label: str, versions: int) -> None:
    url, env = bench.fresh(label, "hist")
    store = bench.opened(label, url, env)
    try:
        store.put("exchange/API_KEY", value(0).encode(), max_versions=100)
        for i in range(1, versions):
            store.put("exchange/API_KEY", value(i).encode())
    finally:
        store.close()
    ours = bench.run(env, "history", "exchange/API_KEY")
    bench.add(
        "history",
        label,
        f"{versions:,} writes",
        ours,
        "get (1 process)",
        bench.run(env, "get", "exchange/API_KEY"),
    )


def measure_audit_verify(bench: Bench, label: str, records: int) -> None:
    url, env = bench.fresh(label, "audit")
    store = bench.opened(label, url, env)
    log = AuditLog(Path(env["SECRETS_MANAGER_AUDIT_FILE"]))
    try:
        for start in range(0, records, 1000):
            events = [
                AuditEvent("get", "bench", name=f"svc/KEY_{i % 5000:05d}", version=1)
                for i in range(start, min(records, start + 1000))
            ]
            log.append(events, store)  # type: ignore[arg-type]
    finally:
        log.flush()
        store.close()
    path = Path(env["SECRETS_MANAGER_AUDIT_FILE"])
    files = sorted(path.parent.glob(path.name + "*"))

    def hash_lines() -> None:
        for file in files:
            with file.open("rb") as handle:
                for line in handle:
                    hashlib.sha256(line).digest()
                    json.loads(line)

    ours = bench.run(env, "audit", "verify")
    bench.add("audit verify", label, f"{records:,} records", ours, "read+json+sha256", timed(hash_lines))


@contextlib.contextmanager
def services(stores: list[str]) -> Iterator[tuple[Any, Any, str]]:
    from moto.server import ThreadedMotoServer

    from vault_server import FakeVault

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    missing = missing_requirements()
    if missing:
        raise SystemExit(f"cannot start PostgreSQL: {missing}")
    with contextlib.ExitStack() as stack:
        cluster = PostgresCluster().start()
        stack.callback(cluster.stop)
        superuser = cluster.connect(superuser=True)
        superuser.autocommit = True
        superuser.execute("ALTER SYSTEM SET fsync = on")
        superuser.execute("ALTER SYSTEM SET full_page_writes = on")
        superuser.close()
        cluster.restart()
        vault = FakeVault().start()
        stack.callback(vault.stop)
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        stack.callback(moto.stop)
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.update(cluster.env())
        os.environ.update(moto_environ(endpoint, "us-east-1"))
        yield cluster, vault, endpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--sizes", type=lambda text: [report.parse_count(p) for p in text.split(",")])
    parser.add_argument("--no-sdk", action="store_true", help="leave get_credentials() out")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"some of {','.join(GROUPS)} (default: all)")
    args = parser.parse_args(argv)
    stores = [s for s in args.stores.split(",") if s]
    only = {group for group in args.only.split(",") if group}
    sizes = args.sizes or ([200] if args.quick else [1_000, 5_000])
    versions, records = (200, 10_000) if args.quick else (1_000, 100_000)
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="sm-bench-run-"))
    began = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="sm-bench-bulk-") as tmp,
        services(stores) as (cluster, vault, moto),
    ):
        bench = Bench(Path(tmp), cluster, vault, moto)
        for label in stores:
            for count in sizes:
                if not args.sizes and not args.quick and label in FEWER:
                    # 3 to 15 ms a request on the test servers (AWS's backup: ~90 ms a secret):
                    # 5,000 would take minutes per op
                    if count != sizes[0]:
                        continue
                    count = FEWER[label]
                print(f"{label}, {count:,} secrets", file=sys.stderr, flush=True)
                if only & {"import", "read", "backup", "keys"}:
                    measure_secrets(bench, label, count, sdk=not args.no_sdk, only=only)
            if "history" in only:
                measure_history(bench, label, versions)
            if "audit" in only:
                measure_audit_verify(bench, label, records)
    rows = [
        [
            op,
            label,
            size,
            f"{ours:.2f} s",
            report.rate(_count(size) / ours) if _count(size) else "",
            baseline,
            f"{base:.2f} s",
            f"{ours / base:.1f}" if base > 0 else "",
        ]
        for op, label, size, ours, baseline, base in bench.rows
    ]
    report.render(
        ["op", "store", "size", "ours", "per s", "baseline", "baseline s", "ratio"],
        rows,
        f"secrets-manager bulk operations ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs",
        [
            "ours: the console script, start to exit (get_credentials: the SDK's call in its own process);"
            " per s: secrets (or records) per second; ratio = ours / baseline (lower is better).",
            "PostgreSQL with fsync on (the test cluster's fsync=off undone); Vault: the test server;"
            " AWS: moto's server. history: one secret written N times, 100 versions kept.",
            f"Total {time.perf_counter() - began:.0f} s.",
        ],
        left_columns=3,
    )
    return 0


def _count(size: str) -> int:
    head = size.split()[0].replace(",", "")
    return int(head) if head.isdigit() and "writes" not in size else 0


if __name__ == "__main__":
    sys.exit(main())
