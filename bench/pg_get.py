"""One secret read on PostgreSQL: round trips, statements and time of a single `get`, against a
bare psycopg round trip on the same server and the same get on SQLite, in the same run.

Starts the tests' private PostgreSQL cluster (tests/postgres_cluster.py: the Debian binaries on
127.0.0.1 and a free port) and fills an encrypted store of N secrets on it and on a SQLite file.
Each get is timed alone (perf_counter around the call) and the table gives the median:

* get, not cached: `EncryptedStore.get` of a random secret right after another handle committed a
  change to another secret (untimed), so the read cache (store/read_cache.py) is stale and the
  get reads the store: what the CLI's `get` does, and the service's GetSecret after any change.
* get, cached: the same with nothing committed between gets (the service's steady state).
* CLI get: `secrets-manager get NAME` run in this process (`secrets_manager.cli.run`), as a user
  runs it: open the store (header, unlock with the `test` KDF profile), read, audit (two records,
  fsynced, and the audit anchor committed to the store). The process start is left out.
* baseline (PostgreSQL): one bare psycopg `SELECT value FROM <schema>.entries WHERE key = %s`
  on a connection of its own (autocommit, as the store's), of a random secret's value row.
* baseline (SQLite): one sqlite3 `SELECT value FROM entries WHERE key = ?` on the same file.

PostgreSQL is measured twice: directly on 127.0.0.1, and through a TCP proxy in this process that
holds each chunk it forwards for DELAY_MS (time.sleep, each way: a round trip pays about twice
that, plus the proxy's own hops) to stand for a database on another host; the loopback interface
itself is not touched. The baseline goes through the same proxy in the same round.

Statements are psycopg `Cursor.execute` calls on the store's connections; round trips are waits
for the server's answer on them (`_Connection.wait`: each statement, BEGIN and COMMIT); both are
counted around each timed call, and the table gives them per call.

    python bench/pg_get.py            # 300 secrets, 3 rounds of 150 gets per row
    python bench/pg_get.py --quick    # 100 secrets, 1 round of 60
    PYTHONPATH=../old/src python bench/pg_get.py   # another version's code, same bench

ratio = ours / the baseline of the same store and network path (lower is better).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_cluster import PostgresCluster, missing_requirements
from secrets_manager.crypto import kdf
from secrets_manager.storage import postgres as pg_storage
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from tcp_proxy import TcpProxy, Verdict

PASSWORD = "bench password"  # noqa: S105 - throwaway stores
VALUE = b"v" * 64
DELAY_MS = 0.5


class DelayingProxy(TcpProxy):
    """Forwards every chunk after holding it DELAY_MS, in both directions."""

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        time.sleep(DELAY_MS / 1000)
        return Verdict.PASS


class Counter:
    """Statements and round trips on the store's psycopg connections, while `counting`."""

    def __init__(self) -> None:
        self.statements = 0
        self.round_trips = 0
        self.on = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        execute = psycopg.Cursor.execute
        wait = pg_storage._Connection.wait
        counter = self

        def counted_execute(cursor: Any, *args: Any, **kwargs: Any) -> Any:
            if counter.on and isinstance(cursor.connection, pg_storage._Connection):
                counter.statements += 1
            return execute(cursor, *args, **kwargs)

        def counted_wait(conn: Any, *args: Any, **kwargs: Any) -> Any:
            if counter.on:
                counter.round_trips += 1
            return wait(conn, *args, **kwargs)

        psycopg.Cursor.execute = counted_execute  # type: ignore[method-assign]
        pg_storage._Connection.wait = counted_wait  # type: ignore[method-assign]
        try:
            yield
        finally:
            psycopg.Cursor.execute = execute  # type: ignore[method-assign]
            pg_storage._Connection.wait = wait  # type: ignore[method-assign]


class Sample:
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.statements = 0
        self.round_trips = 0


def timed(counter: Counter, sample: Sample, call: Callable[[], object]) -> None:
    counter.statements = counter.round_trips = 0
    counter.on = True
    began = time.perf_counter()
    try:
        call()
    finally:
        sample.seconds.append(time.perf_counter() - began)
        counter.on = False
    sample.statements += counter.statements
    sample.round_trips += counter.round_trips


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def cli_get(name: str, env: dict[str, str]) -> None:
    """`secrets-manager get NAME` in this process; its value printed to a buffer."""
    from secrets_manager.cli import run

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with environment(env), contextlib.redirect_stdout(out):
        code = run(["get", name])
    if code != 0:
        raise RuntimeError(f"get {name} exit {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"cannot start PostgreSQL: {missing}", file=sys.stderr)
        return 1
    secrets, rounds, per_round = (100, 1, 60) if args.quick else (300, 3, 150)
    names = [f"market-connector/KEY_{i:04d}" for i in range(secrets)]
    rng = random.Random(7)
    counter = Counter()
    began = time.perf_counter()
    load = os.getloadavg()
    cluster = PostgresCluster().start()
    proxy = DelayingProxy("127.0.0.1", cluster.port)
    tmp = Path(tempfile.mkdtemp(prefix="sm-bench-pg-get-"))
    try:
        os.environ.update(cluster.env())
        schema = cluster.new_schema()
        unlock = PasswordUnlock(PASSWORD, kdf.TEST)
        direct_url = cluster.url()
        proxied_url = direct_url.replace(f":{cluster.port}/", f":{proxy.port}/")
        writer = EncryptedStore.create(PostgresStorage(direct_url, schema=schema, create=True), unlock)
        lite_path = tmp / "store.db"
        lite_writer = EncryptedStore.create(SqliteStorage(lite_path, create=True), unlock)
        writer.put_batch([(name, VALUE) for name in names])
        lite_writer.put_batch([(name, VALUE) for name in names])
        readers = {
            "direct": EncryptedStore.open(PostgresStorage(direct_url, schema=schema), unlock),
            "proxy": EncryptedStore.open(PostgresStorage(proxied_url, schema=schema), unlock),
        }
        lite = EncryptedStore.open(SqliteStorage(lite_path), unlock)
        raws = {path: psycopg.connect(url, autocommit=True) for path, url in
                (("direct", direct_url), ("proxy", proxied_url))}  # fmt: skip
        raw_select = sql.SQL("SELECT value FROM {}.entries WHERE key = %s").format(sql.Identifier(schema))
        lite_raw = sqlite3.connect(lite_path)
        churn = iter(range(10**9))
        home = tmp / "home"
        home.mkdir(mode=0o700)
        cli_env = {
            path: {
                "HOME": str(home),
                "SECRETS_MANAGER_STORE": f"{url}?schema={schema}",
                "SECRETS_MANAGER_AUDIT_FILE": str(tmp / f"audit-{path}.jsonl"),
                "MASTER_PASSWORD": PASSWORD,
            }
            for path, url in (("direct", direct_url), ("proxy", proxied_url))
        }

        def change(store: EncryptedStore) -> None:
            store.put("other/CHURN", str(next(churn)).encode())

        # (store, path, op) -> one measured call, and what runs untimed before it.
        rows: dict[tuple[str, str, str], tuple[Callable[[], None], Callable[[], object]]] = {}
        for path, reader in readers.items():
            raw = raws[path]
            rows[("postgres", path, "baseline: bare SELECT")] = (
                lambda: None,
                lambda raw=raw: raw.execute(raw_select, ("data/" + rng.choice(names) + "#1",)).fetchone(),
            )
            rows[("postgres", path, "get, not cached")] = (
                lambda: change(writer),
                lambda reader=reader: reader.get(rng.choice(names)),
            )
            rows[("postgres", path, "get, cached")] = (
                lambda: None,
                lambda reader=reader: reader.get(names[0]),
            )
            rows[("postgres", path, "CLI get (in-process)")] = (
                lambda: None,
                lambda path=path: cli_get(rng.choice(names), cli_env[path]),
            )
        rows[("sqlite", "file", "baseline: bare SELECT")] = (
            lambda: None,
            lambda: lite_raw.execute(
                "SELECT value FROM entries WHERE key = ?", ("data/" + rng.choice(names) + "#1",)
            ).fetchone(),
        )
        rows[("sqlite", "file", "get, not cached")] = (
            lambda: change(lite_writer),
            lambda: lite.get(rng.choice(names)),
        )
        rows[("sqlite", "file", "get, cached")] = (lambda: None, lambda: lite.get(names[0]))

        samples = {key: Sample() for key in rows}
        with counter.installed():
            for call in [reader.get for reader in readers.values()]:  # connections opened, warm
                call(names[0])
            for r in range(rounds):
                order = list(rows.items())
                order = order[r % len(order) :] + order[: r % len(order)]
                for key, (before, call) in order:
                    count = max(10, per_round // 5) if key[2].startswith("CLI") else per_round
                    for _ in range(count):
                        before()
                        timed(counter, samples[key], call)
        for reader in readers.values():
            reader.close()
        writer.close()
        lite.close()
        lite_writer.close()
        for raw in raws.values():
            raw.close()
        lite_raw.close()
    finally:
        proxy.close()
        cluster.stop()
    table = []
    for (store, path, op), sample in samples.items():
        median = statistics.median(sample.seconds)
        base = statistics.median(samples[(store, path, "baseline: bare SELECT")].seconds)
        calls = len(sample.seconds)
        counts = (
            (f"{sample.statements / calls:.1f}", f"{sample.round_trips / calls:.1f}")
            if store == "postgres" and not op.startswith("baseline")
            else ("1", "1")
            if store == "postgres"
            else ("-", "-")
        )
        table.append(
            (store, path, op, f"{median * 1000:.3f} ms", f"{median / base:.2f}", *counts, f"{calls}")
        )
    mode = "quick" if args.quick else "full"
    report.render(
        ["store", "path", "operation", "median", "ratio", "statements", "round trips", "calls"],
        table,
        f"One secret read, {mode} ({secrets} secrets of {len(VALUE)} bytes), {os.cpu_count()} CPUs",
        [
            f"ratio = median / the same store's and path's bare SELECT median (same run); "
            f"proxy: each chunk held {DELAY_MS} ms each way by a TCP proxy in this process "
            f"(a database on another host); statements and round trips per call on the store's "
            f"psycopg connections (the baseline's is one by construction). Medians of {rounds} "
            f"rotating round(s). Load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}. "
            f"Total {time.perf_counter() - began:.0f} s.",
        ],
        left_columns=3,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
