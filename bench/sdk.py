"""SDK benchmark: the hot cached read beside aws-secretsmanager-caching, and push propagation.

1. Hot cached read, ns per call. Ours: `Client.get(name)` and `Client.credentials()[name]` on a
   warm cache, the client connected to a real `secrets-manager serve` over mutual TLS. Baseline:
   `aws_secretsmanager_caching.SecretCache.get_secret_string(name)` on a warm cache, its boto3
   client pointed at moto in process (`mock_aws`): only its cache-hit path is timed, which makes no
   call. Both read the same secret; rounds alternate; medians are shown, with
   ratio = baseline ns / ours ns (how many of our reads fit in the time of one of theirs).
2. Propagation: 20 clients subscribed to one server; the secret changes; for each client, the
   time from just before the change until that client serves the new value from its cache
   (polled every millisecond): p50, p99 and max over all clients and rounds. Three kinds of
   change: a put through the service, a rotation's promote through it (the value was staged
   0.3-0.5 s before), and a put by another handle on the store file (in this process, as the CLI
   or another replica makes one), which the service finds at its next watch poll (every 0.2 s;
   changes start at random points of it). Each client also has an `on_change` callback: the
   time until it is called is a second row per kind. Beside them, the staleness bound of the
   baseline: its default refresh interval (a cached value is served until then, whatever
   changed), which has no notification at all.
3. Log record, ns per call: `log.info(message, arg, arg)` into an in-memory StreamHandler, with
   `install_log_redaction()` at 20 and at 10,000 (the cap) remembered values, and the same call
   without redaction as the baseline, in alternating rounds; ratio = baseline ns / ours ns.

    python bench/sdk.py              # 7 rounds of 200k reads each; 20 propagation rounds
    python bench/sdk.py --quick      # 3 rounds of 50k reads (1k log calls); 5 propagation rounds
                                     # (about 15 s)
    python bench/sdk.py --postgres   # also propagation with the service on a private PostgreSQL
                                     # cluster, where another handle's commit arrives by NOTIFY

The server helpers (real certificates, policy, store) are those of tests/service_fixtures.py.
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import logging
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from aws_secretsmanager_caching import SecretCache, SecretCacheConfig
from moto import mock_aws

from secrets_manager import install_log_redaction
from secrets_manager.client import Client, RemoteStore, SecretChanged
from secrets_manager.client._logging import LIVE_VALUES, MAX_REMEMBERED_VALUES, uninstall_log_redaction
from secrets_manager.crypto import kdf
from secrets_manager.service.watch import WATCH_POLL_SECONDS
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.values import SecretValue

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
fixtures: Any = importlib.import_module("service_fixtures")

NAME = "auth/JWT_KEY"
VALUE = "v" * 64
CLIENTS = 20


def ns_per_call(function: Callable[[], object], calls: int) -> float:
    loop = itertools.repeat(None, calls)
    started = time.perf_counter_ns()
    for _ in loop:
        function()
    return (time.perf_counter_ns() - started) / calls


def hot_reads(server_dir: Path, address: str, rounds: int, calls: int) -> dict[str, float]:
    """Median ns per cached read: ours (two ways) and the AWS caching client's cache hit."""
    samples: dict[str, list[float]] = {"get": [], "credentials": [], "aws": []}
    with Client(environ=fixtures.client_environ(server_dir, "auth", [address])) as client, mock_aws():
        boto = boto3.client("secretsmanager", region_name="us-east-1")
        boto.create_secret(Name=NAME, SecretString=VALUE)
        cache = SecretCache(config=SecretCacheConfig(), client=boto)
        assert client.get(NAME).value.reveal_text() == VALUE == cache.get_secret_string(NAME)
        assert client.credentials()[NAME].reveal_text() == VALUE

        def ours_get() -> object:
            return client.get(NAME)

        def ours_credentials() -> object:
            return client.credentials()[NAME]

        def theirs() -> object:
            return cache.get_secret_string(NAME)

        for function in (ours_get, ours_credentials, theirs):
            ns_per_call(function, calls // 10)  # warm up
        for round_ in range(rounds):
            order = [("get", ours_get), ("credentials", ours_credentials), ("aws", theirs)]
            if round_ % 2:
                order.reverse()
            for label, function in order:
                samples[label].append(ns_per_call(function, calls))
            print(f"hot reads: round {round_ + 1}/{rounds}", file=sys.stderr, flush=True)
    return {label: statistics.median(values) for label, values in samples.items()}


LOG_MESSAGE = "GET /api/v1/orders?symbol=BTCUSDT&limit=100 200 OK user=%s latency_ms=%d " + "x" * 120
REMEMBERED = (20, MAX_REMEMBERED_VALUES)


def log_records(rounds: int, calls: int) -> dict[str, float]:
    """Median ns per log call without redaction ("none") and with it at each of REMEMBERED values
    remembered (random 32-character values, as many as a service that rotates them serves)."""
    log = logging.getLogger("bench.sdk.redaction")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler(io.StringIO()))

    def record() -> None:
        log.info(LOG_MESSAGE, "alice", 12)

    samples: dict[str, list[float]] = {"none": [], **{str(count): [] for count in REMEMBERED}}
    try:
        for count in REMEMBERED:
            while len(LIVE_VALUES) < count:
                LIVE_VALUES.remember(SecretValue(secrets.token_urlsafe(24).encode()))
            for round_ in range(rounds):
                for redacting in (False, True) if round_ % 2 else (True, False):
                    if redacting:
                        install_log_redaction()
                    else:
                        uninstall_log_redaction()
                    ns_per_call(record, calls // 10)  # warm up
                    samples[str(count) if redacting else "none"].append(ns_per_call(record, calls))
                print(
                    f"log records: {count} values, round {round_ + 1}/{rounds}", file=sys.stderr, flush=True
                )
    finally:
        uninstall_log_redaction()
    return {label: statistics.median(values) for label, values in samples.items()}


CHANGES = {  # how propagation() changes the secret → the row's label
    "put": "a put through the service",
    "rotate": "a rotation's promote through the service",
    "elsewhere": "a put by another store handle (as the CLI's)",
}


def propagation(
    server_dir: Path, address: str, rounds: int, how: str, open_elsewhere: Callable[[], EncryptedStore]
) -> tuple[list[float], list[float]]:
    """Seconds from a change until each of CLIENTS subscribed clients serves the new value, and
    until each one's `on_change` callback is called (the second list). The
    change (CHANGES) is a put through the service; a rotation's promote through it (the new value
    is staged first: the clients hear of a new version but must go on serving current); or a put
    by another handle on the store file, as the CLI or another replica makes one, which the
    service finds only at its next watch poll."""
    clients = [Client(environ=fixtures.client_environ(server_dir, "auth", [address])) for _ in range(CLIENTS)]
    writer = Client(environ=fixtures.client_environ(server_dir, "writer", [address]))
    rotator = RemoteStore(address, fixtures.tls_files(server_dir, "ops"))
    elsewhere = open_elsewhere()
    latencies: list[float] = []
    told: list[float] = []
    told_at: dict[int, float] = {}
    told_lock = threading.Lock()

    def callback_of(index: int) -> Callable[[SecretChanged], None]:
        def heard(change: SecretChanged) -> None:
            if change.name == NAME:
                with told_lock:
                    told_at.setdefault(index, time.monotonic())

        return heard

    rotate = how == "rotate"
    what = f"propagation ({how})"
    try:
        for index, client in enumerate(clients):
            client.credentials()
            client.on_change(callback_of(index))
        time.sleep(1.0)  # every watch stream is up
        for round_ in range(rounds):
            value = f"{what}-{round_}".encode()
            with told_lock:
                told_at.clear()
            if rotate:
                staged = rotator.stage(NAME, value).version
                # The clients refetch on the stage event (and keep serving current). A random part
                # keeps the promote from falling at the same point of the server's watch poll.
                time.sleep(0.3 + random.uniform(0, WATCH_POLL_SECONDS))
                changed_at = time.monotonic()
                rotator.promote(NAME, staged)
            elif how == "elsewhere":
                changed_at = time.monotonic()
                elsewhere.put(NAME, value)
            else:
                changed_at = time.monotonic()
                writer.put(NAME, value)
            waiting = set(range(CLIENTS))
            while waiting and time.monotonic() - changed_at < 10:
                for index in list(waiting):
                    if clients[index].credentials()[NAME].reveal() == value:
                        latencies.append(time.monotonic() - changed_at)
                        waiting.discard(index)
                time.sleep(0.001)
            if waiting:
                raise SystemExit(f"{len(waiting)} clients never served the new value")
            while len(told_at) < CLIENTS and time.monotonic() - changed_at < 10:
                time.sleep(0.001)
            with told_lock:
                if len(told_at) < CLIENTS:
                    raise SystemExit(f"{CLIENTS - len(told_at)} clients' on_change was never called")
                told.extend(at - changed_at for at in told_at.values())
            print(f"{what}: round {round_ + 1}/{rounds}", file=sys.stderr, flush=True)
            # Waiting a fixed time would lock every change to the same point of the server's watch
            # poll (the last one was seen just after a poll): the random part spreads them over it.
            time.sleep(0.3 + random.uniform(0, WATCH_POLL_SECONDS))
    finally:
        elsewhere.close()
        rotator.close()
        for client in [*clients, writer]:
            client.close()
    return latencies, told


def postgres_propagation(directory: Path, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """propagation() with the service on a store in a private PostgreSQL cluster, where a commit
    by another handle reaches the service by LISTEN/NOTIFY instead of at its next poll."""
    from postgres_cluster import PostgresCluster, missing_requirements

    missing = missing_requirements()
    if missing:
        raise SystemExit(f"--postgres: cannot start PostgreSQL: {missing}")
    cluster = PostgresCluster().start()
    try:
        schema = cluster.new_schema()
        conninfo = cluster.url(with_password=True)

        def postgres_handle(*, create: bool = False) -> EncryptedStore:
            storage = PostgresStorage(conninfo, schema=schema, create=create)
            unlock = PasswordUnlock(fixtures.PASSWORD, kdf.TEST)
            return EncryptedStore.create(storage, unlock) if create else EncryptedStore.open(storage, unlock)

        seeding = postgres_handle(create=True)
        for name, value in {NAME: VALUE.encode(), "auth/DB_PASSWORD": b"p" * 32}.items():
            seeding.put(name, value)
        seeding.close()
        url = f"{cluster.url()}?schema={schema}"
        server = fixtures.start_server(directory, "pg", store=url, environment=cluster.env())
        try:
            return {
                f"postgres {how}": propagation(directory, server.address, rounds, how, postgres_handle)
                for how in ("put", "elsewhere")
            }
        finally:
            server.stop()
    finally:
        cluster.stop()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 15 s)")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also propagation with the service on a private PostgreSQL cluster (LISTEN/NOTIFY)",
    )
    args = parser.parse_args(argv)
    rounds, calls, propagation_rounds = (3, 50_000, 5) if args.quick else (7, 200_000, 20)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sm-bench-sdk-") as tmp:
        directory = Path(tmp)
        fixtures.make_pki(directory)
        fixtures.make_store(directory, {NAME: VALUE.encode(), "auth/DB_PASSWORD": b"p" * 32})
        server = fixtures.start_server(directory)

        def sqlite_handle() -> EncryptedStore:
            return EncryptedStore.open(
                SqliteStorage(directory / "store.db"), PasswordUnlock(fixtures.PASSWORD, kdf.TEST)
            )

        try:
            reads = hot_reads(directory, server.address, rounds, calls)
            records = log_records(rounds, calls // 50)
            latencies = {
                f"sqlite {how}": propagation(
                    directory, server.address, propagation_rounds, how, sqlite_handle
                )
                for how in CHANGES
            }
        finally:
            server.stop()
        if args.postgres:
            latencies.update(postgres_propagation(directory, propagation_rounds))
    refresh_interval = SecretCacheConfig().secret_refresh_interval
    print(f"secrets-manager SDK benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs")
    print()
    table(
        [
            ("hot cached read", "ns/call", "ratio"),
            ("aws-secretsmanager-caching SecretCache.get_secret_string", f"{reads['aws']:,.0f}", "1.00"),
            ("ours Client.get(name)", f"{reads['get']:,.0f}", f"{reads['aws'] / reads['get']:.2f}"),
            (
                "ours Client.credentials()[name]",
                f"{reads['credentials']:,.0f}",
                f"{reads['aws'] / reads['credentials']:.2f}",
            ),
        ]
    )
    print()
    table(
        [
            ("log record (one %s argument, 200 characters)", "ns/call", "ratio"),
            ("without log redaction", f"{records['none']:,.0f}", "1.00"),
            *(
                (
                    f"ours, install_log_redaction(), {count:,} values remembered",
                    f"{records[str(count)]:,.0f}",
                    f"{records['none'] / records[str(count)]:.2f}",
                )
                for count in REMEMBERED
            ),
        ]
    )
    print()
    table(
        [
            (f"propagation to {CLIENTS} subscribed clients", "p50", "p99", "max"),
            *(
                (
                    f"ours, {how.split()[0]}: {CHANGES[how.split()[1]]} -> {outcome} ({len(samples)})",
                    f"{percentile(samples, 0.5) * 1e3:.0f} ms",
                    f"{percentile(samples, 0.99) * 1e3:.0f} ms",
                    f"{max(samples) * 1e3:.0f} ms",
                )
                for how, both in latencies.items()
                for outcome, samples in zip(("served", "on_change called"), both, strict=True)
            ),
            ("aws-secretsmanager-caching default refresh interval", "-", "-", f"{refresh_interval:,} s"),
        ]
    )
    print()
    print(
        f"Hot reads: medians of {rounds} alternating rounds of {calls:,} calls; ratio = baseline ns / "
        f"ours ns (higher is better). Log records: the same, {calls // 50:,} calls a round. "
        f"Propagation: {propagation_rounds} changes of each kind, the time "
        "from just before the change until each client's cache serves the new value; a rotation is "
        "timed from its promote (staged 0.3-0.5 s before). Changes through the service reach its "
        "watchers at once; on SQLite one by another store handle waits for the service's next watch "
        f"poll (every {WATCH_POLL_SECONDS:g} s; changes start at random points of it), on PostgreSQL it "
        "arrives by LISTEN/NOTIFY. "
        f"Total {time.perf_counter() - began:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
