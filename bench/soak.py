"""Soak: a real `serve` and an SDK client process under the churn of weeks, squeezed into minutes;
what they hold, sampled every few seconds, and how fast it grows after warm-up.

For each store (the embedded SQLite file and PostgreSQL from the tests' private cluster,
tests/postgres_cluster.py) one `secrets-manager serve` (mutual TLS, certificates made by
`secrets-manager pki init` / `pki issue`, the audit log rotated at 256 KiB through
SECRETS_MANAGER_AUDIT_MAX_BYTES) runs for the whole soak with, at once:

* one SDK client process that stays up (`Client` as `auth`, an `on_change` callback on `auth/`,
  reading `credentials("auth")` and one secret every 0.1 s): measured as serve is;
* churn: SDK clients made, read once (each opens its channel and its Watch stream) and closed, one
  after another (0.2 s apart), and an SDK client process started and killed with SIGKILL 3 s later,
  one after another (a connection that ends without a goodbye);
* `secrets-manager --server ADDR get` every 2 s, and `--server ADDR watch auth/` started and
  stopped 2 s later, by SIGTERM and SIGKILL in turn, one after another (a watch still running
  30 s after its SIGTERM is a failure: its stacks are kept, from faulthandler);
* a rotation: `writer` puts a new value of auth/DB_PASSWORD every 2 s (Watch events, the SDK
  client's refresh and its callback);
* names that come and go: `ops` makes auth/SOAK_N every second and deletes the one made three
  seconds before (the SDK client's credentials("auth") gains and loses them); `purge` erases those
  deleted over a minute before (below), so the store does not grow;
* SIGHUP every 10 s, the policy rewritten first (a reload);
* every 30 s: the server certificate renewed (`pki issue server --server --force`) then SIGHUP,
  the SDK client's own renewed (`pki issue auth --force`, taken within 5 s), and
  `audit prune --keep-files 2` of serve's log and `purge --older-than 1m auth/` (as the README's
  retention does from cron, on the store directly).

Sampled every `--interval` s: serve's and the SDK client's RSS, open descriptors
(/proc/PID/fd), threads, sockets; serve's audit log (live file, and with its rotated files), the
SQLite WAL, serve's PostgreSQL connections (its sockets to the cluster's port) and the cluster's
backends. Baseline: the mean of the first minute. Growth: the least-squares slope after warm-up
(the first third of the run, at least a minute), extrapolated to an hour, and again over the last
third only: a figure that grows early and not late has plateaued.

    python bench/soak.py              # 8 minutes (about 9 with set-up)
    python bench/soak.py --quick      # 3 minutes
    python bench/soak.py --minutes 30 --stores sqlite
    python bench/soak.py --stores sqlite --serve-env MALLOC_ARENA_MAX=2 --samples /tmp/soak.tsv
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_cluster import PostgresCluster, missing_requirements
from secrets_manager.client import Client, RemoteStore
from secrets_manager.crypto import kdf
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from service_fixtures import (
    PASSWORD,
    POLICY,
    SCRIPT,
    SEED,
    Server,
    client_environ,
    make_store,
    start_server,
    tls_files,
)

AUDIT_MAX_BYTES = 256 * 1024
SDK_CHILD = """
import signal, sys, threading, time
from secrets_manager.client import Client, RemoteStore

done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
told = [0]
client = Client()
client.on_change(lambda change: told.__setitem__(0, told[0] + 1), prefix="auth/")
reads = 0
while not done.is_set():
    client.credentials("auth")
    client.get("auth/DB_PASSWORD")
    reads += 1
    if reads % 50 == 0:
        with open(sys.argv[1], "w") as f:
            f.write(f"{reads} {told[0]}")
    done.wait(0.1)
names = sorted(thread.name for thread in threading.enumerate())
client.close()
with open(sys.argv[1], "w") as f:
    f.write(f"{reads} {told[0]} {','.join(names)}")
"""


HEAP_MAX = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit: each arena but the main one reserves this


def malloc_arenas(pid: int) -> int:
    """How many glibc malloc arenas besides the main one `pid` has: anonymous mappings that start on
    a 64 MiB boundary and, with the reserved (---p) rest that follows, span at most 64 MiB (how
    glibc's new_heap maps one). An estimate from /proc/PID/maps, not glibc's own count."""
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) > 5:  # a file or [heap], [stack]...: not an arena's heap
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        regions.append((start, end, parts[1]))
    count = 0
    for i, (start, end, perms) in enumerate(regions):
        if start % HEAP_MAX or not perms.startswith("rw"):
            continue
        span = end
        if i + 1 < len(regions) and regions[i + 1][0] == end and regions[i + 1][2] == "---p":
            span = regions[i + 1][1]
        if span - start <= HEAP_MAX:
            count += 1
    return count


def process_figures(pid: int) -> dict[str, float]:
    """RSS (MiB; and its anonymous part, the heaps), open descriptors, threads and sockets of
    `pid`, and its malloc arenas (estimated), from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
    return {
        "rss MiB": int(fields["VmRSS"].split()[0]) / 1024,
        "anonymous rss MiB": int(fields["RssAnon"].split()[0]) / 1024,
        "malloc arenas": malloc_arenas(pid),
        "fds": len(links),
        "threads": int(fields["Threads"]),
        "sockets": sum(link.startswith("socket:") for link in links),
    }


def connections_to(pid: int, port: int) -> int:
    """How many of `pid`'s TCP sockets are connected to 127.0.0.1:`port` (its PostgreSQL
    connections), matched by inode between /proc/PID/fd and /proc/PID/net/tcp."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            if remote_port == port and parts[3] == "01" and parts[9] in inodes:  # 01: ESTABLISHED
                count += 1
    return count


def file_size(path: Path) -> float:
    try:
        return path.stat().st_size / 1024
    except FileNotFoundError:
        return 0.0


@dataclass
class Target:
    """One store served under load, with what it counted and sampled."""

    label: str
    home: Path
    store: str  # the store's path or URL, as serve and the CLI are given it
    environment: dict[str, str]  # what serve and the CLI need beyond the basics (PGPASSWORD)
    pg_port: int | None = None
    serve_environment: dict[str, str] = field(default_factory=dict)  # --serve-env: serve's alone
    trace: Path | None = None  # --trace: serve under tracemalloc, its snapshots in trace/STORE
    server: Server | None = None
    sdk: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def cli_env(self, identity: str | None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "MASTER_PASSWORD": PASSWORD,
            "SECRETS_MANAGER_AUDIT_MAX_BYTES": str(AUDIT_MAX_BYTES),
            **self.environment,
        }
        if identity is not None:
            assert self.server is not None
            env.update(client_environ(self.home, identity, [self.server.address]))
            env.pop("SHRIVENQUANT_ENV")
        return env

    def cli(
        self, identity: str | None, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(SCRIPT), *args], env=self.cli_env(identity), capture_output=True, timeout=timeout,
            start_new_session=True,
        )  # fmt: skip

    def audit_file(self) -> Path:
        """serve's log: a SQLite store's one log beside it (the store keeps one anchor, for one
        log: docs/audit.md §4); a PostgreSQL store's, a file of its own (one anchor per log)."""
        return self.home / ("store.audit.jsonl" if self.pg_port is None else "serve.audit.jsonl")


def pki(home: Path, *args: str) -> None:
    subprocess.run(
        [str(SCRIPT), "pki", *args, "--dir", str(home)], check=True, capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)},
    )  # fmt: skip


def prepare(target: Target) -> None:
    """Certificates by the CLI, the store with its seed, then serve."""
    home = target.home
    pki(home, "init")
    pki(home, "issue", "server", "--server")
    for name in ("auth", "writer", "ops"):
        pki(home, "issue", name)
    if target.pg_port is None:
        make_store(home)
    else:
        (home / "policy.toml").write_text(POLICY)
        url = target.store.split("?")[0]  # its password from PGPASSWORD
        schema = target.store.split("schema=")[1]
        store = EncryptedStore.create(
            PostgresStorage(url, schema=schema, create=True), PasswordUnlock(PASSWORD, kdf.TEST)
        )
        try:
            for name, value in SEED.items():
                store.put(name, value)
        finally:
            store.close()
    wrapper: tuple[str, ...] = ()
    if target.trace is not None:
        wrapper = (sys.executable, "-X", "tracemalloc=25", str(Path(__file__).with_name("traced_serve.py")))
    target.server = start_server(
        home,
        store=target.store,
        settings=f'audit_file = "{target.audit_file().name}"\n[limits]\nrequests_per_second = 0\n',
        environment={
            "SECRETS_MANAGER_AUDIT_MAX_BYTES": str(AUDIT_MAX_BYTES),
            **target.environment,
            **target.serve_environment,
            **({"SOAK_TRACE_DIR": str(target.trace)} if target.trace is not None else {}),
        },
        wrapper=wrapper,
    )
    child = home / "sdk_child.py"
    child.write_text(SDK_CHILD)
    target.sdk = start_sdk_child(target, child, home / "sdk.status")


def start_sdk_child(target: Target, child: Path, status: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(child), str(status)],
        env=target.cli_env("auth"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def sample(target: Target, started: float, cluster: PostgresCluster | None) -> None:
    assert target.server is not None and target.sdk is not None
    figures: dict[str, float] = {}
    for who, pid in (("serve", target.server.process.pid), ("sdk client", target.sdk.pid)):
        for name, value in process_figures(pid).items():
            figures[f"{who}: {name}"] = value
    audit = target.audit_file()
    figures["audit log KiB (live)"] = file_size(audit)
    figures["audit log KiB (all files)"] = sum(file_size(p) for p in audit.parent.glob(audit.name + "*"))
    if target.pg_port is None:
        figures["SQLite WAL KiB"] = file_size(target.home / "store.db-wal")
    else:
        figures["serve: PostgreSQL connections"] = connections_to(target.server.process.pid, target.pg_port)
        if cluster is not None:
            with cluster.connect(superuser=True) as admin:
                row = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                )
                figures["PostgreSQL client backends (all)"] = float(row.fetchone()[0])  # type: ignore[index]
    target.samples.append((time.monotonic() - started, figures))


def every(
    period: float, stop: threading.Event, action: Callable[[], None], target: Target, what: str
) -> None:
    """`action` every `period` s until `stop`; a failure is counted and kept, not raised."""
    while not stop.wait(period):
        try:
            action()
            target.count(what)
        except Exception as error:  # a soak keeps going, and reports it
            target.errors.append(f"{what}: {type(error).__name__}: {str(error)[:200]}")


def load(target: Target, stop: threading.Event) -> tuple[list[threading.Thread], list[Callable[[], None]]]:
    """Start the load's threads; returns them, and what closes the clients they share once they
    have ended (closed under a call, a client fails it: the soak's own doing, not the service's)."""
    server = target.server
    assert server is not None
    writer = Client(environ=client_environ(target.home, "writer", [server.address]))
    values = itertools.count()

    def rotate() -> None:
        writer.put("auth/DB_PASSWORD", f"auth-db-pass-SOAK-{next(values)}")

    def churn_client() -> None:
        with Client(environ=client_environ(target.home, "auth", [server.address])) as client:
            client.credentials("auth")

    def cli_get() -> None:
        done = target.cli("auth", "--server", server.address, "get", "auth/JWT_KEY")
        if done.returncode != 0:
            raise RuntimeError(done.stderr.decode(errors="replace").strip())

    watches = itertools.count()

    def cli_watch() -> None:
        number = next(watches)
        stderr = target.home / f"watch-{number}.err"
        with stderr.open("wb") as sink:
            watcher = subprocess.Popen(
                [str(SCRIPT), "--server", server.address, "watch", "auth/"],
                env={**target.cli_env("auth"), "PYTHONFAULTHANDLER": "1"},
                stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True,
            )  # fmt: skip
        time.sleep(2.0)
        watcher.send_signal(signal.SIGTERM if number % 2 else signal.SIGKILL)
        try:
            watcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watcher.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack to its stderr
            watcher.wait(timeout=30)
            kept = Path(tempfile.gettempdir()) / f"soak-{target.label}-hung-watch-{number}.err"
            kept.write_bytes(stderr.read_bytes())
            raise RuntimeError(f"watch did not end within 30 s of SIGTERM (its stacks: {kept})") from None
        stderr.unlink()

    names = itertools.count()
    admin = RemoteStore(server.address, tls_files(target.home, "ops"))  # the gRPC store the CLI uses

    def name_churn() -> None:
        number = next(names)
        admin.put(f"auth/SOAK_{number}", f"short-lived-{number}".encode())
        if number >= 3:
            admin.delete(f"auth/SOAK_{number - 3}")

    def killed_client() -> None:
        child = target.home / "sdk_child.py"
        doomed = start_sdk_child(target, child, target.home / "doomed.status")
        time.sleep(3.0)
        doomed.kill()
        doomed.wait(timeout=30)

    reloads = itertools.count()

    def reload() -> None:
        (target.home / "policy.toml").write_text(POLICY + f"\n# reload {next(reloads)}\n")
        server.process.send_signal(signal.SIGHUP)

    def renew() -> None:
        pki(target.home, "issue", "server", "--server", "--force")
        server.process.send_signal(signal.SIGHUP)
        pki(target.home, "issue", "auth", "--force")

    def prune() -> None:
        for command in (("audit", "prune", "--keep-files", "2"), ("purge", "--older-than", "1m", "auth/")):
            done = target.cli(
                None, "--store", target.store, "--audit-file", str(target.audit_file()), *command
            )
            if done.returncode != 0:
                raise RuntimeError(done.stderr.decode(errors="replace").strip())

    plan: list[tuple[float, Callable[[], None], str]] = [
        (2.0, rotate, "rotation put"),
        (0.2, churn_client, "SDK client made and closed"),
        (2.0, cli_get, "cli get --server"),
        (1.0, cli_watch, "cli watch"),
        (2.0, killed_client, "SDK process killed"),
        (1.0, name_churn, "name made (and one deleted)"),
        (10.0, reload, "SIGHUP reload"),
        (30.0, renew, "certificate renewal"),
        (30.0, prune, "audit prune and purge"),
    ]
    threads = [
        threading.Thread(target=every, args=(period, stop, action, target, what), daemon=True)
        for period, action, what in plan
    ]
    for thread in threads:
        thread.start()
    return threads, [writer.close, admin.close]


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return float("nan")
    xs = [t for t, _ in points]
    ys = [v for _, v in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 3600 if var else 0.0


def figure(value: float) -> str:
    if value != value:  # nan
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def rows_of(target: Target, seconds: float) -> list[list[str]]:
    warm = max(60.0, seconds / 3)
    late = seconds * 2 / 3
    rows = []
    for name in target.samples[0][1]:
        series = [(t, s[name]) for t, s in target.samples if name in s]
        first = [v for t, v in series if t <= 60.0] or [series[0][1]]
        baseline = statistics.fmean(first)
        end = series[-1][1]
        rows.append(
            [
                target.label,
                name,
                figure(baseline),
                figure(end),
                figure(max(v for _, v in series)),
                figure(slope_per_hour([p for p in series if p[0] >= warm])),
                figure(slope_per_hour([p for p in series if p[0] >= late])),
                f"{end / baseline:.2f}" if baseline else "-",
            ]
        )
    return rows


def write_samples(path: Path, targets: list[Target]) -> None:
    with path.open("w") as out:
        for target in targets:
            names = list(target.samples[0][1]) if target.samples else []
            out.write("\t".join(["store", "seconds", *names]) + "\n")
            for t, figures in target.samples:
                values = [f"{figures[name]:g}" if name in figures else "" for name in names]
                out.write("\t".join([target.label, f"{t:.1f}", *values]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="3 minutes")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between samples")
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument(
        "--serve-env", action="append", default=[], metavar="NAME=VALUE",
        help="set in serve's environment only (e.g. MALLOC_ARENA_MAX=2); may be repeated",
    )  # fmt: skip
    parser.add_argument(
        "--trace", type=Path, metavar="DIR",
        help="run serve under tracemalloc (bench/traced_serve.py), a snapshot a minute in DIR/STORE/",
    )  # fmt: skip
    parser.add_argument(
        "--samples", type=Path, metavar="FILE",
        help="also write every sample to FILE (tab-separated: store, seconds, then each figure)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    serve_environment = dict(item.split("=", 1) for item in args.serve_env)
    seconds = (3.0 if args.quick else args.minutes) * 60
    stores = args.stores.split(",")
    cluster: PostgresCluster | None = None
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="sm-soak-") as directory:
        try:
            if "sqlite" in stores:
                home = Path(directory) / "sqlite"
                home.mkdir()
                targets.append(Target("sqlite", home, str(home / "store.db"), {}))
            if "postgres" in stores:
                missing = missing_requirements()
                if missing:
                    print(f"cannot start PostgreSQL: {missing}", file=sys.stderr)
                    return 1
                cluster = PostgresCluster().start()
                home = Path(directory) / "postgres"
                home.mkdir()
                url = f"{cluster.url()}?schema={cluster.new_schema()}"
                targets.append(Target("postgres", home, url, dict(cluster.env()), pg_port=cluster.port))
            for target in targets:
                target.serve_environment = serve_environment
                if args.trace is not None:
                    target.trace = args.trace / target.label
                    target.trace.mkdir(parents=True, exist_ok=True)
                print(f"starting {target.label}", file=sys.stderr)
                if target.pg_port is not None:
                    os.environ.update(target.environment)  # the seed's own connection
                prepare(target)
            stop = threading.Event()
            threads: list[threading.Thread] = []
            closers: list[Callable[[], None]] = []
            for target in targets:
                started_threads, closing = load(target, stop)
                threads += started_threads
                closers += closing
            started = time.monotonic()
            while (now := time.monotonic() - started) < seconds:
                for target in targets:
                    sample(target, started, cluster)
                print(f"{now:.0f} s of {seconds:.0f}", file=sys.stderr)
                time.sleep(args.interval)
            for target in targets:
                sample(target, started, cluster)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            for close in closers:
                close()
        finally:
            for target in targets:
                if target.sdk is not None:
                    target.sdk.send_signal(signal.SIGTERM)
                    target.sdk.wait(timeout=30)
                if target.server is not None:
                    target.server.stop()
            if cluster is not None:
                cluster.stop()
        rows = [row for target in targets for row in rows_of(target, seconds)]
        notes = [
            f"{seconds / 60:.1f} minutes, a sample every {args.interval:.0f} s. first minute = the mean of "
            "the first 60 s (the baseline); growth/h = least-squares slope after warm-up (the first "
            f"{max(60.0, seconds / 3):.0f} s), and over the last third, extrapolated to an hour; "
            "ratio = end / first minute."
        ]
        for target in targets:
            status = (
                (target.home / "sdk.status").read_text().split()
                if (target.home / "sdk.status").exists()
                else []
            )
            done = ", ".join(f"{what} {n}" for what, n in sorted(target.counts.items()))
            notes.append(f"{target.label}: {done}.")
            if status:
                notes.append(
                    f"{target.label}: the SDK client read {status[0]} times, told of {status[1]} changes; "
                    f"its Python threads at the end: {status[2] if len(status) > 2 else '?'}."
                )
            notes.append(
                f"{target.label}: {len(target.errors)} failed actions"
                + (": " + "; ".join(sorted(set(target.errors))[:5]) if target.errors else ".")
            )
        report.render(
            ["store", "figure", "first minute", "end", "max", "growth/h", "growth/h, last third", "ratio"],
            rows,
            f"soak: serve and an SDK client under churn, {os.cpu_count()} CPUs",
            notes,
            left_columns=2,
        )
        if args.samples is not None:
            write_samples(args.samples, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
