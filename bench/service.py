"""Service benchmark: `secrets-manager serve` against a bare gRPC server, with the same mutual TLS.

The bare server answers GetSecret from a dict — the same message shapes, the same TLS credentials,
the same synchronous gRPC server with a thread pool — so it is the transport ceiling. Ours
authenticates the certificate, checks the policy, reads and decrypts from the embedded SQLite store
and writes a chained, MAC'd audit record before answering: "ours" with the default `audit_sync =
"interval"` (written before the response, fsynced within 10 ms), "ours-always" with `audit_sync =
"always"` (fsynced before the response). For 1 and for 8 concurrent callers (separate processes, so
the load is not bound by one interpreter's GIL) it prints requests per second, p50/p99 latency and
the server process's CPU time per request of each server, and the ratios to the bare server, from
rotating rounds in the same run. A second bare server, the same code in another process
("bare-again"), shows how far two identical servers land apart in the same run: the noise floor
of every ratio. "bare+handler" is the bare server that also spends, per request, as much pure
Python CPU time as ours' GetSecret handler takes in process with no transport (measured first in
the same run: authenticate, authorise, read and decrypt, audit, metrics): what any per-request
Python of that cost does to a CPython gRPC server, transport held equal. With --postgres a
private PostgreSQL 15 cluster (tests/postgres_cluster.py) is started and "ours-pg" serves the same
secrets from it; its cpu/req counts the service process only, not the PostgreSQL backend's (which
runs on the same cores).

    python bench/service.py                   # 3 rounds of 3 s per server and caller count
    python bench/service.py --quick           # 1 round of 1.5 s
    python bench/service.py --max-workers 4   # every server with 4 call threads (default 256)
    python bench/service.py --postgres        # also "ours-pg": the service on a private PostgreSQL
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from secrets_manager.crypto import kdf
from secrets_manager.service.config import DEFAULT_MAX_WORKERS, Limits
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.tls import pki
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc

PASSWORD = "bench password"  # noqa: S105 - throwaway store
SECRETS = 100
VALUE = b"v" * 64
SCRIPT = Path(sys.executable).with_name("secrets-manager")
SERVERS = {"ours": "interval", "ours-always": "always"}  # label → audit_sync


def names() -> list[str]:
    return [f"market-connector/KEY_{i:03d}" for i in range(SECRETS)]


# ---- the bare server (run as a child process: python bench/service.py --bare DIR) -------------


class BareSecrets(pb_grpc.SecretsServicer):  # type: ignore[misc]
    def __init__(self, work_seconds: float = 0.0) -> None:
        self.values = {name: VALUE for name in names()}
        self.work_seconds = work_seconds  # "bare+handler": CPU spent in Python per request

    def GetSecret(self, request: pb.GetSecretRequest, context: grpc.ServicerContext) -> pb.GetSecretResponse:
        if self.work_seconds:
            started = time.thread_time()
            while time.thread_time() - started < self.work_seconds:  # holds the GIL, as handler code does
                pass
        value = self.values.get(request.name)
        if value is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        return pb.GetSecretResponse(
            secret=pb.SecretVersion(name=request.name, version=1, value=value, labels=["current"], created="")
        )


def run_bare(directory: Path, max_workers: int, work_seconds: float = 0.0) -> None:
    credentials = grpc.ssl_server_credentials(
        [((directory / "server-key.pem").read_bytes(), (directory / "server.pem").read_bytes())],
        root_certificates=(directory / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    pb_grpc.add_SecretsServicer_to_server(BareSecrets(work_seconds), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    print(f'"port": {port}', file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM})
    server.stop(1).wait()


# ---- load --------------------------------------------------------------------------------------


def caller(args: tuple[str, str, float, int]) -> list[float]:
    """One client process: GetSecret of random names for `seconds`; returns latencies (s)."""
    address, directory, seconds, seed = args
    d = Path(directory)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(d / "ca.pem").read_bytes(),
        private_key=(d / "bench-key.pem").read_bytes(),
        certificate_chain=(d / "bench.pem").read_bytes(),
    )
    channel = grpc.secure_channel(address, credentials)
    stub = pb_grpc.SecretsStub(channel)
    rng = random.Random(seed)
    pool = names()
    for _ in range(20):  # warm up the connection
        stub.GetSecret(pb.GetSecretRequest(name=pool[0]), timeout=10)
    latencies = []
    deadline = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        if started >= deadline:
            break
        stub.GetSecret(pb.GetSecretRequest(name=rng.choice(pool)), timeout=10)
        latencies.append(time.perf_counter() - started)
    channel.close()
    return latencies


@dataclass
class Sample:
    rps: float
    p50: float
    p99: float
    cpu: float  # the server process's CPU seconds (user + system) per request; nan without /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), or nan elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    address: str, directory: Path, callers: int, seconds: float, pool: multiprocessing.pool.Pool, pid: int
) -> Sample:
    jobs = [(address, str(directory), seconds, random.randrange(2**32)) for _ in range(callers)]
    before = cpu_seconds(pid)
    results = pool.map(caller, jobs)
    used = cpu_seconds(pid) - before  # includes the callers' connection set-up and warm-up: small
    latencies = sorted(x for r in results for x in r)
    return Sample(
        rps=len(latencies) / seconds,
        p50=latencies[len(latencies) // 2],
        p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        cpu=used / len(latencies),
    )


def start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline().decode()
        match = re.search(r'"port": (\d+)', line)
        if match:
            return process, int(match.group(1))
        if not line:
            break
    process.kill()
    raise RuntimeError(f"server did not start: {command}")


# One identity calls as fast as it can: a rate it never reaches, so every request still pays for
# the per-identity check (service/limits.py) and none is throttled.
UNTHROTTLED = "[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\n"


def prepare(directory: Path, max_workers: int = DEFAULT_MAX_WORKERS) -> None:
    ca_cert, ca_key = pki.new_ca()
    (directory / "ca.pem").write_bytes(ca_cert)
    for name, server in (("server", True), ("bench", False)):
        cert, key = pki.issue(ca_cert, ca_key, name, server=server)
        (directory / f"{name}.pem").write_bytes(cert)
        (directory / f"{name}-key.pem").write_bytes(key)
    (directory / "policy.toml").write_text(
        '[identities]\n"spiffe://shrivenquant.local/bench" = ["reader"]\n'
        '[roles.reader]\nrules = [{ path = "market-connector/*", capabilities = ["read"] }]\n'
    )
    for server, sync in SERVERS.items():
        (directory / f"{server}.toml").write_text(
            f'listen = "127.0.0.1:0"\nstore = "{server}.db"\npolicy = "policy.toml"\n'
            f'audit_sync = "{sync}"\nmax_workers = {max_workers}\n'
            '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
            f"{UNTHROTTLED}"
        )
        # One store (and so one audit log and anchor) per server.
        store = EncryptedStore.create(
            SqliteStorage(directory / f"{server}.db", create=True), PasswordUnlock(PASSWORD, kdf.TEST)
        )
        for name in names():
            store.put(name, VALUE)
        store.close()


class _InProcessContext:
    """What the servicer asks of a gRPC context, for a call made in process (handler_cost)."""

    def __init__(self, certificate: bytes) -> None:
        self._auth = {"transport_security_type": [b"ssl"], "x509_pem_cert": [certificate]}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def handler_cost(directory: Path, calls: int = 4000) -> float:
    """CPU seconds per call of ours' GetSecret handler called in process, no gRPC: the same
    servicer, policy, SQLite store, audit log (audit_sync "interval") and metrics serve runs."""
    from secrets_manager.audit import AuditLog
    from secrets_manager.service.metrics import Metrics
    from secrets_manager.service.server import PolicyHolder, SecretsServicer

    store = EncryptedStore.create(
        SqliteStorage(directory / "in-process.db", create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    )
    for name in names():
        store.put(name, VALUE)
    audit = AuditLog(directory / "in-process.audit.jsonl")
    unthrottled = Limits(requests_per_second=1_000_000, request_burst=1_000_000)  # as UNTHROTTLED
    servicer = SecretsServicer(
        store, PolicyHolder(directory / "policy.toml"), audit, Metrics(None), limits=unthrottled
    )
    context = _InProcessContext((directory / "bench.pem").read_bytes())
    rng = random.Random(7)
    requests = [pb.GetSecretRequest(name=rng.choice(names())) for _ in range(calls)]
    for request in requests[:200]:  # warm: certificate parsed, keyset opened, read cache filled
        servicer.GetSecret(request, context)
    before = time.process_time()  # every thread: the audit log's deferred fsync and anchor too
    for request in requests:
        servicer.GetSecret(request, context)
    used = time.process_time() - before
    audit.flush()
    servicer.watch_hub.close()
    store.close()
    return used / calls


def prepare_postgres(directory: Path, cluster: Any, max_workers: int) -> None:
    """A store of the same secrets in a new schema of `cluster`, and `ours-pg.toml` serving it."""
    schema = cluster.new_schema()
    store = EncryptedStore.create(
        PostgresStorage(cluster.url(with_password=True), schema=schema, create=True),
        PasswordUnlock(PASSWORD, kdf.TEST),
    )
    for name in names():
        store.put(name, VALUE)
    store.close()
    (directory / "ours-pg.toml").write_text(
        f'listen = "127.0.0.1:0"\nstore = "{cluster.url()}?schema={schema}"\npolicy = "policy.toml"\n'
        f'audit_file = "ours-pg.audit.jsonl"\nmax_workers = {max_workers}\n'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
        f"{UNTHROTTLED}"
    )


def start_postgres() -> Any:
    """The private PostgreSQL cluster of the tests (tests/postgres_cluster.py), started."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from postgres_cluster import PostgresCluster, missing_requirements

    missing = missing_requirements()
    if missing:
        raise SystemExit(f"--postgres: cannot start PostgreSQL: {missing}")
    return PostgresCluster().start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        help=f"call threads of every server (ours' max_workers; default {DEFAULT_MAX_WORKERS})",
    )
    parser.add_argument(
        "--postgres", action="store_true", help="also serve from a private PostgreSQL cluster (ours-pg)"
    )
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-us", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        run_bare(args.bare, args.max_workers, args.work_us / 1e6)
        return 0
    rounds, seconds = (1, 1.5) if args.quick else (3, 3.0)
    began = time.perf_counter()
    cluster = start_postgres() if args.postgres else None
    with tempfile.TemporaryDirectory(prefix="sm-bench-service-") as tmp, contextlib.ExitStack() as cleanup:
        if cluster is not None:
            cleanup.callback(cluster.stop)
        directory = Path(tmp)
        prepare(directory, args.max_workers)
        env = {**os.environ, "MASTER_PASSWORD": PASSWORD}
        ours = list(SERVERS)
        if cluster is not None:
            prepare_postgres(directory, cluster, args.max_workers)
            env.update(cluster.env())
            ours.append("ours-pg")
        bare_command = [
            sys.executable,
            __file__,
            "--bare",
            str(directory),
            "--max-workers",
            str(args.max_workers),
        ]
        handler = handler_cost(directory)
        print(f"ours' GetSecret handler in process: {handler * 1e6:.0f} us CPU per call", file=sys.stderr)
        servers = {
            "bare": start(bare_command, env),
            "bare-again": start(bare_command, env),
            "bare+handler": start([*bare_command, "--work-us", f"{handler * 1e6:.1f}"], env),
        }
        for label in ours:
            servers[label] = start([str(SCRIPT), "serve", "--config", str(directory / f"{label}.toml")], env)
        results: dict[int, dict[str, Sample]] = {}
        try:
            with multiprocessing.get_context("spawn").Pool(8) as pool:
                for callers in (1, 8):
                    samples: dict[str, list[Sample]] = {label: [] for label in servers}
                    for r in range(rounds):
                        order = list(servers.items())
                        order = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
                        for label, (process, port) in order:
                            print(f"{label}: {callers} caller(s), round {r + 1}", file=sys.stderr, flush=True)
                            samples[label].append(
                                measure(f"127.0.0.1:{port}", directory, callers, seconds, pool, process.pid)
                            )
                    results[callers] = {
                        label: Sample(
                            *(
                                statistics.median(getattr(s, f) for s in runs)
                                for f in ("rps", "p50", "p99", "cpu")
                            )
                        )
                        for label, runs in samples.items()
                    }
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        audited = {  # the live file and the ones rotated away by size (`<file>.<first seq>`)
            label: sum(sum(1 for _ in path.open()) for path in directory.glob(f"{label}.audit.jsonl*"))
            for label in ours
        }
    total = time.perf_counter() - began
    header = ("callers", "server", "req/s", "ratio", "p50", "ratio", "p99", "ratio", "cpu/req", "ratio")
    lines = [header]
    for callers, by_server in results.items():
        bare = by_server["bare"]
        for label, sample in by_server.items():
            lines.append(
                (
                    str(callers),
                    label,
                    f"{sample.rps:,.0f}",
                    f"{sample.rps / bare.rps:.2f}",
                    f"{sample.p50 * 1e3:.2f} ms",
                    f"{sample.p50 / bare.p50:.2f}",
                    f"{sample.p99 * 1e3:.2f} ms",
                    f"{sample.p99 / bare.p99:.2f}",
                    f"{sample.cpu * 1e6:.0f} us",
                    f"{sample.cpu / bare.cpu:.2f}",
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"secrets-manager service benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs")
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    print(
        f"GetSecret of a random one of {SECRETS} secrets, mutual TLS (EC P-256), medians of {rounds} "
        f"rotating round(s) of {seconds:g} s, {args.max_workers} call threads per server; ratio = "
        "server / bare in the same run (throughput: higher is better, latency and CPU: lower is "
        "better); cpu/req = the server process's user + system CPU "
        "time per request. bare-again = the bare server's code in a second process (the noise floor: "
        "identical servers differ this much). bare+handler = the bare server spending, per request, "
        f"{handler * 1e6:.0f} us of Python CPU time: what ours' GetSecret handler takes called in "
        'process, no transport (measured in this run). ours = audit_sync "interval" (the default), '
        'ours-always = audit_sync "always"'
        + (", ours-pg = ours on PostgreSQL (cpu/req: the service process only)" if args.postgres else "")
        + ". Audit records written: "
        + ", ".join(f"{label} {count:,}" for label, count in audited.items())
        + f". Total {total:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
