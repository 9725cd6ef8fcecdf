"""Benchmark of the key lifecycle (issue #3), every figure beside a baseline measured in the same run.

What it measures (one process, SQLite files in a temporary directory, the real code paths):

* rewrap: `store.keys.rewrap(store, "svc")` right after `rotate_key`, on a namespace of N records
  (default 100k: 50k secrets, each one 64-byte value record and one metadata record), in records
  per second, with the default batch size (records per commit). Baseline: a loop in memory over
  the same number of records of the same plaintext sizes and associated-data lengths, each opened
  and sealed again with AES-256-GCM (cryptography's AESGCM, a fresh random nonce), no storage.
  The ratio is the price of doing it durably and safely: a scan of the record headers first,
  reading each record again in its batch, compare-and-set commits with synchronous=FULL, and the
  keyset rewritten with every batch.
* rotate --root: `store.keys.rotate_root_key(store)` on stores with 10 and with 1,000 namespaces
  (one secret each), and on the N-record store (one namespace). Baseline: `change_unlock` of the
  same store with the same Argon2id cost, i.e. the O(1) header rewrite of `passwd`. The scaling
  line divides the 1,000-namespace time by the 10-namespace one: root rotation grows with
  namespaces, not with secrets.

Stores use the cheap `kdf.TEST` Argon2id profile, so Argon2id (one run per root rotation, the
same in the baseline) does not hide the rest; with the default profile add ~0.1-0.5 s to both.
Times include the WAL checkpoint that scrubs superseded bytes. Machines are noisy: compare
ratios, not absolute numbers; ours and the baselines alternate in the same process.

Run it from the repository root (with the package installed):

    python bench/keys.py            # 100k records, 3 rewraps, 7 root rotations per size; ~25 s on 2 cores
    python bench/keys.py --quick    # 10k records, 2 rewraps, 3 root rotations per size; ~3 s
    python bench/keys.py --records 50k --batch-size 500

The table goes to stdout (rich on a terminal, plain aligned text otherwise); progress to stderr.
Temporary files are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import platform
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import report
import secrets_manager
from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store import keys as key_lifecycle

PASSWORD = "correct horse battery staple"  # noqa: S105 - throwaway stores
VALUE_SIZE = 64
NAMESPACE_COUNTS = (10, 1_000)
PROGRESS_EVERY = 10_000
RECORD_OVERHEAD = 33  # format byte, key id, nonce, tag (docs/format.md 5.1)


@dataclass(frozen=True)
class Profile:
    records: int
    rewrap_runs: int
    root_reps: int


FULL = Profile(records=100_000, rewrap_runs=3, root_reps=7)
QUICK = Profile(records=10_000, rewrap_runs=2, root_reps=3)


@dataclass(frozen=True)
class Row:
    op: str
    size: str
    ours: float  # ops/s (median)
    baseline: float  # ops/s (median)
    unit: str  # what one op is

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def new_value() -> bytes:
    return base64.b64encode(os.urandom(VALUE_SIZE * 3 // 4))


def new_store(path: Path) -> EncryptedStore:
    return EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(PASSWORD, kdf.TEST))


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- rewrap -------------------------------------------------------------------------------------


def populate_namespace(store: EncryptedStore, records: int) -> float:
    """records // 2 secrets in namespace svc, one version each (a value and a metadata record)."""
    secrets = records // 2
    began = time.perf_counter()
    for i in range(secrets):
        store.put(f"svc/KEY_{i:07d}", new_value())
        if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == secrets:
            rate = (i + 1) / (time.perf_counter() - began)
            _log(f"  store.put: {i + 1:>7,} secrets ({rate:,.0f} puts/s)")
    return time.perf_counter() - began


class InMemoryRewrap:
    """The baseline: open and re-seal records of the given sizes with AES-256-GCM, nothing else."""

    def __init__(self, shapes: Sequence[tuple[int, int]]) -> None:
        self._old = AESGCM(AESGCM.generate_key(bit_length=256))
        self._new = AESGCM(AESGCM.generate_key(bit_length=256))
        self._records = []
        for plaintext_size, ad_size in shapes:
            ad = os.urandom(ad_size)
            nonce = os.urandom(12)
            self._records.append((nonce, self._old.encrypt(nonce, os.urandom(plaintext_size), ad), ad))

    def run(self) -> None:
        old, new, urandom = self._old, self._new, os.urandom
        for nonce, sealed, ad in self._records:
            plaintext = old.decrypt(nonce, sealed, ad)
            fresh = urandom(12)
            new.encrypt(fresh, plaintext, ad)


def record_shapes(path: Path) -> list[tuple[int, int]]:
    """(plaintext size, associated-data size) of every record of namespace svc, from the file."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT key, length(value) FROM entries WHERE key >= 'data/svc/' AND key < 'data/svc0' "
            "OR key >= 'meta/svc/' AND key < 'meta/svc0'"
        ).fetchall()
    finally:
        db.close()
    ad_fixed = len(b"secrets-manager\x00") + struct.calcsize(">BBIQ")
    shapes = []
    for key, length in rows:
        name = key.split("/", 1)[1].rpartition("#")[0] if key.startswith("data/") else key.split("/", 1)[1]
        shapes.append((length - RECORD_OVERHEAD, ad_fixed + len(name.encode())))
    return shapes


def bench_rewrap(tmp: Path, profile: Profile, batch_size: int) -> tuple[list[Row], float, float]:
    path = tmp / "rewrap.db"
    store = new_store(path)
    try:
        _log(f"populating {profile.records:,} records (namespace svc)")
        populate_seconds = populate_namespace(store, profile.records)
        shapes = record_shapes(path)
        if len(shapes) != profile.records // 2 * 2:
            raise RuntimeError(f"expected {profile.records} records, found {len(shapes)}")
        baseline = InMemoryRewrap(shapes)
        ours: list[float] = []
        base: list[float] = []
        for run in range(profile.rewrap_runs):
            key_lifecycle.rotate_key(store, "svc")
            sides: list[tuple[Callable[[], object], list[float]]] = [
                (lambda: key_lifecycle.rewrap(store, "svc", batch_size=batch_size), ours),
                (baseline.run, base),
            ]
            if run % 2:
                sides.reverse()
            for fn, seconds in sides:
                seconds.append(timed(fn))
            n = len(shapes)
            _log(f"  rewrap run {run + 1}: {n / ours[-1]:,.0f} records/s (in memory {n / base[-1]:,.0f})")
        leftover = [i for i in key_lifecycle.key_status(store, "svc") if i.state != "primary" and i.records]
        if leftover:
            raise RuntimeError("rewrap left records under old keys")
        _log("measuring root rotation on the same store (1 namespace)")
        root_row = bench_root_rotation(store, profile.root_reps, f"1 ns, {len(shapes):,} rec")
    finally:
        store.close()
    n = len(shapes)
    rewrap_row = Row(
        "rewrap", f"{n:,} records", n / statistics.median(ours), n / statistics.median(base), "record"
    )
    return [rewrap_row, root_row], populate_seconds, statistics.median(ours)


# ---- root rotation --------------------------------------------------------------------------------


def bench_root_rotation(store: EncryptedStore, reps: int, size: str) -> Row:
    """Median of `reps` root rotations, alternating with change_unlock (the O(1) baseline)."""
    ours: list[float] = []
    base: list[float] = []
    for rep in range(reps + 1):  # the first pair is a warm-up, dropped below
        sides: list[tuple[Callable[[], object], list[float]]] = [
            (lambda: key_lifecycle.rotate_root_key(store), ours),
            (lambda: store.change_unlock(PasswordUnlock(PASSWORD, kdf.TEST)), base),
        ]
        if rep % 2:
            sides.reverse()
        for fn, seconds in sides:
            seconds.append(timed(fn))
    return Row(
        "rotate --root", size, 1 / statistics.median(ours[1:]), 1 / statistics.median(base[1:]), "rotation"
    )


def bench_namespaces(tmp: Path, profile: Profile) -> list[Row]:
    rows = []
    for count in NAMESPACE_COUNTS:
        path = tmp / f"namespaces-{count}.db"
        store = new_store(path)
        try:
            _log(f"populating {count:,} namespaces (one secret each)")
            for i in range(count):
                store.put(f"ns{i:05d}/KEY", new_value())
            _log(f"measuring root rotation with {count:,} namespaces")
            rows.append(bench_root_rotation(store, profile.root_reps, f"{count:,} namespaces"))
        finally:
            store.close()
        reopened = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(PASSWORD, kdf.TEST))
        try:  # sanity, not timed: the same password opens it and every namespace reads
            if len(reopened.get(f"ns{count - 1:05d}/KEY").value) != VALUE_SIZE:
                raise RuntimeError("root rotation broke the store")
        finally:
            reopened.close()
    return rows


# ---- output -------------------------------------------------------------------------------------

HEADERS = ("op", "size", "ours/s", "base/s", "ratio", "ours per op", "base per op")


def _cells(row: Row) -> tuple[str, ...]:
    return (
        row.op,
        row.size,
        report.rate(row.ours),
        report.rate(row.baseline),
        f"{row.ratio:.3f}",
        report.per_op(row.ours, digits=2),
        report.per_op(row.baseline, digits=2),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k records, fewer repetitions")
    parser.add_argument(
        "--records",
        type=lambda t: report.parse_count(t, minimum=2, what="number of records"),
        help="records to rewrap (default 100k, quick 10k)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=key_lifecycle.DEFAULT_REWRAP_BATCH, help="records per rewrap commit"
    )
    parser.add_argument("--dir", type=Path, default=None, help="directory for the temporary files")
    args = parser.parse_args(argv)

    profile = QUICK if args.quick else FULL
    if args.records:
        profile = Profile(**{**profile.__dict__, "records": args.records})

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sm-bench-keys-", dir=args.dir) as tmp:
        _log(f"temporary files in {tmp}")
        rewrap_rows, populate_seconds, _ = bench_rewrap(Path(tmp), profile, args.batch_size)
        namespace_rows = bench_namespaces(Path(tmp), profile)
    total = time.perf_counter() - began
    rows = [rewrap_rows[0], *namespace_rows, rewrap_rows[1]]

    small, large = namespace_rows
    scaling = (1 / large.ours) / (1 / small.ours)
    mode = "quick" if args.quick else "full"
    title = (
        f"secrets-manager {secrets_manager.__version__} key lifecycle benchmark ({mode}) - "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"cryptography {version('cryptography')}, {os.cpu_count()} CPUs"
    )
    notes = [
        "ratio = ours / baseline in ops/s (1.000 = as fast as the baseline, lower = slower).",
        f"rewrap: keys.rewrap after rotate_key, batch {args.batch_size} records/commit, median of "
        f"{profile.rewrap_runs} runs  vs  AESGCM decrypt + encrypt (fresh nonce) of as many records of "
        "the same sizes, in memory.",
        f"rotate --root: keys.rotate_root_key, median of {profile.root_reps} (after a warm-up)  vs  "
        "change_unlock on the same store (same Argon2id cost, kdf.TEST): the O(1) passwd header rewrite.",
        f"root rotation scaling: {NAMESPACE_COUNTS[1]:,} namespaces take {scaling:.1f}x the time of "
        f"{NAMESPACE_COUNTS[0]:,} ({report.per_op(large.ours, 2)} vs {report.per_op(small.ours, 2)}); "
        f"the {profile.records:,}-record store, one namespace: {report.per_op(rewrap_rows[1].ours, 2)}.",
        f"Rewrap store populated through store.put: {profile.records // 2:,} secrets in "
        f"{populate_seconds:.1f} s. Total run time: {total:.1f} s.",
    ]
    report.render(HEADERS, [_cells(row) for row in rows], title, notes, left_columns=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
