"""EncryptedStore on PostgreSQL: get and put against raw psycopg baselines and the SQLite store.

Starts a private PostgreSQL 15 cluster (tests/postgres_cluster.py: the Debian binaries, 127.0.0.1,
a free port), fills a store of N secrets through `store.put`, then measures in alternating rounds
in the same run:

* get: `EncryptedStore.get` of a random secret on PostgreSQL. Baselines: one raw psycopg
  `SELECT value FROM t WHERE key = %s` plus one AES-256-GCM decrypt of a record of the same size
  (the round-trip floor), and `EncryptedStore.get` on a SQLite file (what the embedded store costs).
* list: `EncryptedStore.list()` of every secret (names and metadata). Baselines: one raw psycopg
  SELECT of every row with an AES-GCM decrypt each, and `EncryptedStore.list()` on SQLite.
* put: `EncryptedStore.put` of a new version of a random secret. Baselines: a raw psycopg
  transaction of one AES-GCM encrypt and one INSERT … ON CONFLICT UPDATE (synchronous_commit on),
  and `EncryptedStore.put` on SQLite.

    python bench/postgres.py            # 1,000 secrets, 3 rounds of 1 s per op
    python bench/postgres.py --quick    # 200 secrets, 1 round of 0.5 s
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_cluster import PostgresCluster, missing_requirements
from secrets_manager.crypto import kdf
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

PASSWORD = "bench password"  # noqa: S105 - throwaway store
VALUE = b"v" * 64
RECORD = 1 + 4 + 12 + len(VALUE) + 16  # what a sealed 64-byte value weighs


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Operations per second over about `seconds`."""
    done, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        operation()
        done += 1
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"cannot start PostgreSQL: {missing}", file=sys.stderr)
        return 1
    secrets, rounds, seconds = (200, 1, 0.5) if args.quick else (1_000, 3, 1.0)
    names = [f"market-connector/KEY_{i:05d}" for i in range(secrets)]
    rng = random.Random(7)
    began = time.perf_counter()
    cluster = PostgresCluster().start()
    try:
        os.environ.update(cluster.env())
        pg = EncryptedStore.create(
            PostgresStorage(cluster.url(), schema=cluster.new_schema(), create=True),
            PasswordUnlock(PASSWORD, kdf.TEST),
        )
        tmp = tempfile.mkdtemp(prefix="sm-bench-pg-")
        lite = EncryptedStore.create(
            SqliteStorage(Path(tmp) / "store.db", create=True), PasswordUnlock(PASSWORD, kdf.TEST)
        )
        for name in names:
            pg.put(name, VALUE)
            lite.put(name, VALUE)
        raw = cluster.connect()
        raw.execute("CREATE TABLE bench (key text PRIMARY KEY, value bytea NOT NULL)")
        aead, nonce = AESGCM(AESGCM.generate_key(bit_length=256)), os.urandom(12)
        sealed = aead.encrypt(nonce, VALUE, None)
        with raw.transaction():
            for name in names:
                raw.execute(
                    "INSERT INTO bench VALUES (%s, %s)", (name, b"\0" * (RECORD - len(sealed)) + sealed)
                )
        raw.commit()

        def raw_get() -> None:
            row = raw.execute("SELECT value FROM bench WHERE key = %s", (rng.choice(names),)).fetchone()
            assert row is not None
            aead.decrypt(nonce, bytes(row[0])[-len(sealed) :], None)

        def raw_put() -> None:
            with raw.transaction():
                raw.execute(
                    "INSERT INTO bench VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (rng.choice(names), aead.encrypt(os.urandom(12), VALUE, None)),
                )

        def raw_list() -> None:
            for _key, value in raw.execute("SELECT key, value FROM bench ORDER BY key").fetchall():
                aead.decrypt(nonce, bytes(value)[-len(sealed) :], None)

        ops: dict[str, dict[str, Callable[[], object]]] = {
            "get": {
                "postgres": lambda: pg.get(rng.choice(names)),
                "raw psycopg": raw_get,
                "sqlite": lambda: lite.get(rng.choice(names)),
            },
            "list": {
                "postgres": lambda: pg.list(),
                "raw psycopg": raw_list,
                "sqlite": lambda: lite.list(),
            },
            "put": {
                "postgres": lambda: pg.put(rng.choice(names), VALUE),
                "raw psycopg": raw_put,
                "sqlite": lambda: lite.put(rng.choice(names), VALUE),
            },
        }
        results: dict[str, dict[str, float]] = {}
        for op, variants in ops.items():
            samples: dict[str, list[float]] = {label: [] for label in variants}
            for r in range(rounds):
                order = list(variants.items())
                order = order[r % len(order) :] + order[: r % len(order)]
                for label, run in order:
                    samples[label].append(rate(run, seconds))
            results[op] = {label: statistics.median(values) for label, values in samples.items()}
        pg.close()
        lite.close()
        raw.close()
    finally:
        cluster.stop()
    mode = "quick" if args.quick else "full"
    print(f"secrets-manager PostgreSQL benchmark ({mode}), {os.cpu_count()} CPUs")
    print("op    postgres op/s  raw psycopg  ratio  sqlite op/s  pg/sqlite")
    for op, by in results.items():
        pg_rate, raw_rate, lite_rate = by["postgres"], by["raw psycopg"], by["sqlite"]
        print(
            f"{op:4}  {pg_rate:13,.0f}  {raw_rate:11,.0f}  {pg_rate / raw_rate:5.2f}"
            f"  {lite_rate:11,.0f}  {pg_rate / lite_rate:9.2f}"
        )
    print(
        f"{secrets:,} secrets of 64 bytes; medians of {rounds} rotating round(s) of {seconds:g} s; "
        "ratio = EncryptedStore on PostgreSQL / raw psycopg on the same server (one connection, "
        f"127.0.0.1). Total {time.perf_counter() - began:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
