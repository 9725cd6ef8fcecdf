"""Local benchmark of `EncryptedStore` over `SqliteStorage`, every figure relative to a raw baseline.

What it measures (one process, one SQLite file in a temporary directory, the real code paths):

* get: `EncryptedStore.get(name)` of a random secret, in a store holding N secrets (default 1k, 10k,
  100k; values of 64 bytes spread over the namespaces auth/, market-connector/, exchange/, db/ and
  default). Baseline: a raw `sqlite3` SELECT by primary key plus one AES-256-GCM decrypt
  (cryptography's AESGCM) of a record of the same size, from a table of N rows.
* put: `EncryptedStore.put(name, value)` writing a new version of a random existing secret. Baseline:
  one AES-256-GCM encrypt plus a raw INSERT committed on its own (BEGIN IMMEDIATE ... COMMIT), with
  SqliteStorage's pragmas (WAL, synchronous=FULL, secure_delete=ON, busy_timeout).
* passwd: `EncryptedStore.change_unlock(PasswordUnlock(..., kdf.DEFAULT))` (real Argon2id, t=3,
  m=64 MiB, p=4) on a store holding 1 and 10k secrets. Baseline: one bare `derive_unlock_key` with
  the same parameters. The ratio should stay near 1.0 at both sizes: passwd rewraps the root key
  only, whatever the number of secrets.

Machines are noisy, so nothing is reported in absolute terms alone: ours and the baseline run in
alternating rounds in the same process, on the same file system, and the table shows the median
ops/s of each and ratio = ours / baseline (1.00 = as fast as the baseline, 0.25 = four times
slower). Each op runs for a fixed number of iterations or about `--seconds` in all, whichever comes
first. Stores are created with the cheap `kdf.TEST` profile: unlocking is not what is measured.
Stores are populated through `store.put`, one secret at a time, and grown from one size to the next.

Run it from the repository root (with the package installed):

    python bench/local.py            # sizes 1k, 10k, 100k; about a minute on 2 cores
    python bench/local.py --quick    # sizes 1k, 10k, fewer iterations; about 15 s
    python bench/local.py --sizes 1k,50k --seconds 5

The table goes to stdout (drawn with rich on a terminal, plain aligned text otherwise); progress goes
to stderr. Temporary files are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import gc
import itertools
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import report
import secrets_manager
from secrets_manager.audit import AuditEvent, AuditLog, value_fingerprint
from secrets_manager.crypto import kdf
from secrets_manager.crypto.kdf import derive_unlock_key
from secrets_manager.storage.sqlite import BUSY_TIMEOUT_MS, SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

NAMESPACES = ("auth", "market-connector", "exchange", "db", "default")
VALUE_SIZE = 64
PASSWD_SIZES = (1, 10_000)
PASSWORD = "correct horse battery staple"  # noqa: S105 - throwaway stores
PROGRESS_EVERY = 10_000


@dataclass(frozen=True)
class Profile:
    """How long each measurement may run."""

    sizes: tuple[int, ...]
    seconds: float  # per op and per side (ours, baseline), all rounds together
    rounds: int  # ours and baseline alternate this many times; the median round counts
    get_iters: int  # iteration caps per op and per side, all rounds together
    put_iters: int
    passwd_reps: int


FULL = Profile(
    sizes=(1_000, 10_000, 100_000), seconds=2.5, rounds=5, get_iters=100_000, put_iters=15_000, passwd_reps=15
)
QUICK = Profile(
    sizes=(1_000, 10_000), seconds=1.0, rounds=3, get_iters=20_000, put_iters=3_000, passwd_reps=7
)


@dataclass(frozen=True)
class Row:
    op: str
    secrets: int
    ours: float  # ops/s (median round)
    baseline: float  # ops/s (median round)

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline


# ---- measuring ----------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed_round(op: Callable[[int], object], max_iters: int, seconds: float) -> float:
    """Call op(0), op(1), ... until `max_iters` calls or `seconds` have passed; return calls/s."""
    gc.collect()
    perf = time.perf_counter
    start = perf()
    deadline = start + seconds
    done = 0
    while done < max_iters:
        op(done)
        done += 1
        if not done & 7 and perf() >= deadline:
            break
    return done / (perf() - start)


def compare(
    ours: Callable[[int], object],
    baseline: Callable[[int], object],
    *,
    max_iters: int,
    seconds: float,
    rounds: int,
    before_round: Callable[[], None] = lambda: None,
    after_baseline_round: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """Median ops/s of `ours` and `baseline`, run in alternating rounds (order flips each round)."""
    per_round_iters = max(1, max_iters // rounds)
    per_round_seconds = seconds / rounds
    warmup = min(200, per_round_iters)
    before_round()
    timed_round(ours, warmup, per_round_seconds)
    timed_round(baseline, warmup, per_round_seconds)
    after_baseline_round()
    ours_rates: list[float] = []
    base_rates: list[float] = []
    for r in range(rounds):
        before_round()
        sides = [(ours, ours_rates), (baseline, base_rates)]
        if r % 2:
            sides.reverse()
        for op, rates in sides:
            rates.append(timed_round(op, per_round_iters, per_round_seconds))
        after_baseline_round()
    return statistics.median(ours_rates), statistics.median(base_rates)


# ---- data ---------------------------------------------------------------------------------------


def secret_name(i: int) -> str:
    ns = NAMESPACES[i % len(NAMESPACES)]
    return f"KEY_{i:06d}" if ns == "default" else f"{ns}/KEY_{i:06d}"


def new_value() -> bytes:
    """64 printable bytes, like an API token."""
    return base64.b64encode(os.urandom(VALUE_SIZE * 3 // 4))


def populate(store: EncryptedStore, names: Sequence[str], start: int, stop: int, what: str) -> float:
    """Put names[start:stop] one by one through `store.put`; return the seconds it took."""
    began = time.perf_counter()
    for i in range(start, stop):
        store.put(names[i], new_value())
        if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == stop:
            elapsed = time.perf_counter() - began
            _log(f"  {what}: {i + 1:>7,} secrets ({(i + 1 - start) / elapsed:,.0f} puts/s)")
    return time.perf_counter() - began


def new_store(path: Path) -> EncryptedStore:
    storage = SqliteStorage(path, create=True)
    return EncryptedStore.create(storage, PasswordUnlock(PASSWORD, kdf.TEST), actor="bench")


class RawBaseline:
    """One `sqlite3` table with SqliteStorage's pragmas, and AES-256-GCM records of the same size."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA secure_delete = ON")
        self._db.execute("PRAGMA synchronous = FULL")
        if self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise RuntimeError("baseline database: cannot switch to WAL")
        self._db.execute(
            "CREATE TABLE entries (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID"
        )
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._fresh = itertools.count()
        self.rows = 0

    def _seal(self, key: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, key.encode("utf-8"))

    def fill(self, names: Sequence[str], start: int, stop: int) -> None:
        """Insert names[start:stop] with encrypted 64-byte values, in one transaction (not timed)."""
        rows = ((names[i], self._seal(names[i], new_value())) for i in range(start, stop))
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("INSERT INTO entries (key, value) VALUES (?, ?)", rows)
        self._db.execute("COMMIT")
        self.rows += stop - start

    def get(self, key: str) -> bytes:
        row = self._db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        record = row[0]
        return self._aead.decrypt(record[:12], record[12:], key.encode("utf-8"))

    def put(self, plaintext: bytes) -> None:
        key = f"zz-put/KEY_{next(self._fresh):08d}"
        record = self._seal(key, plaintext)
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("INSERT INTO entries (key, value) VALUES (?, ?)", (key, record))
        self._db.execute("COMMIT")

    def drop_put_rows(self) -> None:
        """Remove what `put` inserted, so the table holds N rows again (not timed)."""
        self._db.execute("DELETE FROM entries WHERE key >= 'zz-put/' AND key < 'zz-put0'")

    def close(self) -> None:
        self._db.close()


# ---- the benchmark ------------------------------------------------------------------------------


def bench_sizes(tmp: Path, profile: Profile, rng: random.Random) -> tuple[list[Row], dict[int, float]]:
    """get and put at each size, growing one store (and one baseline table) from size to size."""
    sizes = sorted(set(profile.sizes))
    names = [secret_name(i) for i in range(sizes[-1])]
    store = new_store(tmp / "store.db")
    raw = RawBaseline(tmp / "baseline.db")
    rows: list[Row] = []
    populate_seconds: dict[int, float] = {}
    held = 0
    try:
        for size in sizes:
            _log(f"populating {size:,} secrets")
            populate_seconds[size] = populate(store, names, held, size, "store.put")
            raw.fill(names, held, size)
            held = size
            rows += measure_size(store, raw, names[:size], profile, rng)
    finally:
        store.close()
        raw.close()
    return rows, populate_seconds


def measure_size(
    store: EncryptedStore, raw: RawBaseline, names: Sequence[str], profile: Profile, rng: random.Random
) -> list[Row]:
    """get and put on a store (and a baseline table) holding `names`, with randomly chosen names."""
    size = len(names)
    probe = rng.choice(names)
    if len(store.get(probe).value) != VALUE_SIZE or len(raw.get(probe)) != VALUE_SIZE:
        raise RuntimeError("populated values have the wrong size")
    values = [new_value() for _ in range(1024)]
    picks: list[str] = []

    def pick_names(max_iters: int) -> None:
        """Fresh random names for a round; ours and the baseline read the same ones."""
        picks[:] = rng.choices(names, k=max(1, max_iters // profile.rounds))

    _log(f"measuring get at {size:,} secrets")
    ours_get, base_get = compare(
        lambda i: store.get(picks[i]),
        lambda i: raw.get(picks[i]),
        max_iters=profile.get_iters,
        seconds=profile.seconds,
        rounds=profile.rounds,
        before_round=lambda: pick_names(profile.get_iters),
    )
    _log(f"measuring put at {size:,} secrets")
    ours_put, base_put = compare(
        lambda i: store.put(picks[i], values[i & 1023]),
        lambda i: raw.put(values[i & 1023]),
        max_iters=profile.put_iters,
        seconds=profile.seconds,
        rounds=profile.rounds,
        before_round=lambda: pick_names(profile.put_iters),
        after_baseline_round=raw.drop_put_rows,
    )
    return [
        Row("get", size, ours_get, base_get),
        Row("put", size, ours_put, base_put),
    ]


def bench_audit(tmp: Path, profile: Profile, rng: random.Random) -> list[Row]:
    """get and put with the audit log on (as the CLI and service run them) against the same
    operations with it off, on one store of the smallest size."""
    size = min(profile.sizes)
    names = [secret_name(i) for i in range(size)]
    store = new_store(tmp / "audit-store.db")
    log = AuditLog(tmp / "audit-store.audit.jsonl")
    values = [new_value() for _ in range(1024)]
    picks: list[str] = []

    def pick_names(max_iters: int) -> None:
        picks[:] = rng.choices(names, k=max(1, max_iters // profile.rounds))

    def audited_get(i: int) -> None:
        secret = store.get(picks[i])
        event = AuditEvent("get", actor="bench", name=secret.name, version=secret.version)
        event.value_hmac = value_fingerprint(store, secret.value.reveal())
        log.append([event], store)

    def audited_put(i: int) -> None:
        value = values[i & 1023]
        event = AuditEvent("store", actor="bench", name=picks[i])
        event.value_hmac = value_fingerprint(store, value)
        log.append([replace(event, outcome="pending")], store)
        event.version = store.put(picks[i], value).version
        log.append([event], store)

    try:
        populate(store, names, 0, size, "store.put")
        _log(f"measuring get with and without auditing at {size:,} secrets")
        audit_get, plain_get = compare(
            audited_get,
            lambda i: store.get(picks[i]),
            max_iters=profile.get_iters,
            seconds=profile.seconds,
            rounds=profile.rounds,
            before_round=lambda: pick_names(profile.get_iters),
        )
        _log(f"measuring put with and without auditing at {size:,} secrets")
        audit_put, plain_put = compare(
            audited_put,
            lambda i: store.put(picks[i], values[i & 1023]),
            max_iters=profile.put_iters,
            seconds=profile.seconds,
            rounds=profile.rounds,
            before_round=lambda: pick_names(profile.put_iters),
        )
        audited = sum(1 for _ in log.records())
        if log.verify(store.audit_key(), store.audit_anchor()) != audited:
            raise RuntimeError("the benchmark's audit log does not verify")
    finally:
        store.close()
    return [
        Row("get+audit", size, audit_get, plain_get),
        Row("put+audit", size, audit_put, plain_put),
    ]


def bench_passwd(tmp: Path, profile: Profile) -> list[Row]:
    """change_unlock with the DEFAULT Argon2id profile, beside one bare derive_unlock_key."""
    names = [secret_name(i) for i in range(max(PASSWD_SIZES))]
    return [passwd_at(tmp / f"passwd-{size}.db", names[:size], profile) for size in PASSWD_SIZES]


def passwd_at(path: Path, names: Sequence[str], profile: Profile) -> Row:
    """Time `passwd` on a store holding `names`, alternating with bare Argon2id derivations."""
    size = len(names)
    _log(f"populating {size:,} secret(s) for passwd")
    store = new_store(path)
    ours: list[float] = []
    base: list[float] = []
    password = PASSWORD
    try:
        populate(store, names, 0, size, "store.put")
        _log(f"measuring passwd at {size:,} secret(s) (Argon2id t=3 m=64MiB p=4)")
        for r in range(profile.passwd_reps + 1):  # the first pair is a warm-up, dropped below
            password = f"{PASSWORD} #{size}-{r}"
            unlock = PasswordUnlock(password, kdf.DEFAULT)
            secret = password.encode("utf-8")
            params = kdf.DEFAULT.with_new_salt()
            sides = [
                (lambda u=unlock: store.change_unlock(u), ours),
                (lambda s=secret, p=params: derive_unlock_key(s, p), base),
            ]
            if r % 2:
                sides.reverse()
            for fn, seconds in sides:
                gc.collect()
                start = time.perf_counter()
                fn()
                seconds.append(time.perf_counter() - start)
    finally:
        store.close()
    # sanity, not timed: the last password really is the one that unlocks the store now
    reopened = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(password))
    try:
        if len(reopened.get(names[-1]).value) != VALUE_SIZE:
            raise RuntimeError("passwd broke the store")
    finally:
        reopened.close()
    return Row(
        "passwd",
        size,
        1 / statistics.median(ours[1:]),
        1 / statistics.median(base[1:]),
    )


# ---- output -------------------------------------------------------------------------------------

HEADERS = ("op", "secrets", "ours op/s", "base op/s", "ratio", "ours/op", "base/op")


def _cells(row: Row) -> tuple[str, ...]:
    return (
        row.op,
        f"{row.secrets:,}",
        report.rate(row.ours),
        report.rate(row.baseline),
        f"{row.ratio:.2f}",
        report.per_op(row.ours),
        report.per_op(row.baseline),
    )


# ---- command line -------------------------------------------------------------------------------


def parse_sizes(text: str) -> tuple[int, ...]:
    """'1k,10k,100k' or '1000,5000' → (1000, 10000, 100000)."""
    sizes = tuple(report.parse_count(p, what="size") for p in text.split(",") if p.strip())
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1k and 10k, fewer iterations")
    parser.add_argument("--sizes", type=parse_sizes, help="numbers of secrets, e.g. 1k,10k,100k")
    parser.add_argument("--seconds", type=float, help="time per op and side (default 2.5, quick 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the random choice of names")
    parser.add_argument("--dir", type=Path, default=None, help="directory for the temporary files")
    args = parser.parse_args(argv)

    profile = QUICK if args.quick else FULL
    if args.sizes:
        profile = Profile(**{**profile.__dict__, "sizes": args.sizes})
    if args.seconds:
        profile = Profile(**{**profile.__dict__, "seconds": args.seconds})
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sm-bench-", dir=args.dir) as tmp:
        _log(f"temporary files in {tmp}")
        rows, populate_seconds = bench_sizes(Path(tmp), profile, rng)
        rows += bench_audit(Path(tmp), profile, rng)
        rows += bench_passwd(Path(tmp), profile)
    total = time.perf_counter() - began

    mode = "quick" if args.quick else "full"
    title = (
        f"secrets-manager {secrets_manager.__version__} local benchmark ({mode}; seed {seed}) - "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"cryptography {version('cryptography')}, argon2-cffi {version('argon2-cffi')}, "
        f"{os.cpu_count()} CPUs"
    )
    populated = ", ".join(
        f"{n:,} in {s:.1f} s ({(n - prev) / s:,.0f} puts/s)"
        for prev, (n, s) in zip([0, *populate_seconds], populate_seconds.items(), strict=False)
    )
    notes = [
        "ratio = ours / baseline in ops/s (1.00 = as fast as the baseline, lower = slower); medians of "
        f"{profile.rounds} alternating rounds of up to {profile.seconds / profile.rounds:g} s "
        f"(passwd: of {profile.passwd_reps} alternating runs).",
        "get:    EncryptedStore.get of a random existing name  vs  sqlite3 SELECT by primary key "
        "+ AESGCM.decrypt of a 64-byte value, table of as many rows.",
        "put:    EncryptedStore.put, new version of a random existing secret  vs  AESGCM.encrypt "
        "+ INSERT of a new row, BEGIN IMMEDIATE/COMMIT each; both WAL, synchronous=FULL.",
        "get+audit / put+audit: the same get / put with its audit record written durably (flock, "
        "append, fsync, anchor update; put writes a request and a response record), one caller  vs  "
        "auditing off.",
        "passwd: EncryptedStore.change_unlock(PasswordUnlock(kdf.DEFAULT))  vs  one derive_unlock_key "
        "(Argon2id t=3, m=64 MiB, p=4).",
        f"Store populated through store.put one by one, grown size to size: {populated}.",
        f"Total run time: {total:.1f} s.",
    ]
    report.render(HEADERS, [_cells(row) for row in rows], title, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
