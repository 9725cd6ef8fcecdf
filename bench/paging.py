"""Paging benchmark: reading every secret through the service's pages against doing it locally.

A store of N secrets (64-byte values over 10 namespaces) is served by `secrets-manager serve` with
mutual TLS; one client pages through it as the CLI and the SDK do (page_size 100, each
next_page_token sent back): ListSecrets (what `list --server` does) and BatchGetSecrets by prefix
(what the SDK's get_credentials() does). The baseline, measured in the same run on the same file,
is the local equivalent in a fresh process-like handle: `EncryptedStore.list("")` for ListSecrets,
and that list plus `get` of each secret for BatchGetSecrets. ratio = service / local (1.00 = as
fast as reading the file locally; before paging cost its page, each page decrypted the whole store
and the ratio grew with N: 10k secrets took 50-130 s through the service, 0.8 s locally).
"first page" is the first page's time (it reads and decrypts the listing), "next pages" the median
of the others (the store keeps the listing while nothing changes).

    python bench/paging.py            # 1k and 10k secrets, 3 rounds (about a minute on 2 cores)
    python bench/paging.py --quick    # 1k and 3k secrets, 1 round
    python bench/paging.py --sizes 1k,50k --rounds 2
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

import report
from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.tls import pki
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc
from service import SCRIPT, start

PASSWORD = "bench password"  # noqa: S105 - throwaway store
VALUE = b"v" * 64
PAGE_SIZE = 100


def prepare(directory: Path, count: int) -> None:
    ca_cert, ca_key = pki.new_ca()
    (directory / "ca.pem").write_bytes(ca_cert)
    for name, server in (("server", True), ("bench", False)):
        cert, key = pki.issue(ca_cert, ca_key, name, server=server)
        (directory / f"{name}.pem").write_bytes(cert)
        (directory / f"{name}-key.pem").write_bytes(key)
    (directory / "policy.toml").write_text(
        '[identities]\n"spiffe://shrivenquant.local/bench" = ["reader"]\n'
        '[roles.reader]\nrules = [{ path = "**", capabilities = ["read", "list"] }]\n'
    )
    (directory / "server.toml").write_text(
        'listen = "127.0.0.1:0"\nstore = "store.db"\npolicy = "policy.toml"\n'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
    )
    store = EncryptedStore.create(
        SqliteStorage(directory / "store.db", create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    )
    try:
        for i in range(count):
            store.put(f"ns{i % 10}/KEY_{i:06d}", VALUE)
    finally:
        store.close()


def page_through(stub: pb_grpc.SecretsStub, method: str) -> tuple[int, list[float]]:
    """Every page of `method` by prefix "": the secrets it returned and each page's seconds."""
    request = pb.ListSecretsRequest if method == "ListSecrets" else pb.BatchGetSecretsRequest
    token, got, times = "", 0, []
    while True:
        began = time.perf_counter()
        reply = getattr(stub, method)(request(prefix="", page_size=PAGE_SIZE, page_token=token), timeout=600)
        times.append(time.perf_counter() - began)
        got += len(reply.secrets)
        token = reply.next_page_token
        if not token:
            return got, times


def local(directory: Path, with_values: bool) -> float:
    """A fresh handle's listing (and reads), as the local CLI command does it."""
    began = time.perf_counter()
    store = EncryptedStore.open(SqliteStorage(directory / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        for meta in store.list(""):
            if with_values:
                store.get(meta.name)
    finally:
        store.close()
    return time.perf_counter() - began


def touch(directory: Path) -> None:
    """A change by another handle, so the next listing cannot be the one the service kept."""
    store = EncryptedStore.open(SqliteStorage(directory / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        store.put("ns0/KEY_000000", VALUE)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", help="comma-separated secret counts, e.g. 1k,10k")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    sizes = [
        report.parse_count(s, what="size")
        for s in (args.sizes or ("1k,3k" if args.quick else "1k,10k")).split(",")
    ]
    rounds = args.rounds or (1 if args.quick else 3)
    began = time.perf_counter()
    rows = []
    for count in sizes:
        with tempfile.TemporaryDirectory(prefix="sm-bench-paging-") as tmp:
            directory = Path(tmp)
            print(f"{count:,} secrets: populating", file=sys.stderr, flush=True)
            prepare(directory, count)
            env = {**os.environ, "MASTER_PASSWORD": PASSWORD}
            process, port = start([str(SCRIPT), "serve", "--config", str(directory / "server.toml")], env)
            try:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=(directory / "ca.pem").read_bytes(),
                    private_key=(directory / "bench-key.pem").read_bytes(),
                    certificate_chain=(directory / "bench.pem").read_bytes(),
                )
                with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                    stub = pb_grpc.SecretsStub(channel)  # type: ignore[no-untyped-call]
                    for method, with_values in (("ListSecrets", False), ("BatchGetSecrets", True)):
                        ours, baseline, firsts, nexts = [], [], [], []
                        for r in range(rounds):
                            print(f"  {method}: round {r + 1}", file=sys.stderr, flush=True)
                            touch(directory)  # every round starts from a listing not kept
                            baseline.append(local(directory, with_values))
                            got, times = page_through(stub, method)
                            assert got == count, f"{method} returned {got} of {count} secrets"
                            ours.append(sum(times))
                            firsts.append(times[0])
                            nexts.append(statistics.median(times[1:]) if len(times) > 1 else times[0])
                        service, alone = statistics.median(ours), statistics.median(baseline)
                        rows.append(
                            (
                                f"{count:,}",
                                method,
                                f"{service:.2f} s",
                                f"{alone:.2f} s",
                                f"{service / alone:.2f}",
                                f"{statistics.median(firsts) * 1e3:.0f} ms",
                                f"{statistics.median(nexts) * 1e3:.1f} ms",
                            )
                        )
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    header = ("secrets", "paged call", "service", "local", "ratio", "first page", "next pages")
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"secrets-manager paging benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs")
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    print(
        f"Every secret read through the service's pages (page_size {PAGE_SIZE}, mutual TLS, one client) "
        "against the same locally from a fresh handle (ListSecrets: list; BatchGetSecrets: list + get "
        f"of each), medians of {rounds} round(s), each after a change by another handle; ratio = "
        f"service / local (lower is better). Total {time.perf_counter() - began:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
