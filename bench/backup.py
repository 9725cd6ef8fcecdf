"""Benchmark of backup and restore (issue 8), beside a raw copy of the store file in the same run.

What it measures (one process, SQLite files in a temporary directory, the real code paths):

* backup, store copy: `write_backup(store, path)` — a snapshot read of every entry, every record
  opened once to check it (a backup that could not be restored is refused), the entries sealed
  into 64 KiB AES-256-GCM chunks, written 0600, fsynced, linked into place.
* backup, password: the same with `password=` — the logical form (every value decrypted) under a
  separate backup password (Argon2id with the cheap test profile here, so it does not hide the rest;
  the default profile adds ~0.1-0.5 s once per file).
* restore, store copy: `read_backup` (every chunk and record checked) + `restore_new_store` into a
  new file: one commit of every entry, then the file linked into place.
* restore, password: `read_backup` + `restore_new_store` of the logical form: a new store, every
  value and metadata record sealed again under its keys, one commit.

Baseline: a raw copy of the store file after a WAL checkpoint (`shutil.copyfile` + fsync), i.e.
what `cp` of a quiescent store costs. Rates are secrets per second (each secret is one version: a
value record and a metadata record); ratio = ours / baseline (1.000 = as fast as copying the
file; 0.05 = twenty times slower). Medians of a few alternating runs; compare ratios, not absolute
numbers: the machines are noisy.

    python bench/backup.py            # 100k secrets, 3 runs per op
    python bench/backup.py --quick    # 10k secrets, 2 runs per op (a few seconds)
    python bench/backup.py --secrets 50k --runs 5

The table goes to stdout (rich on a terminal, plain aligned text otherwise); progress to stderr.
Temporary files are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import report
import secrets_manager
from secrets_manager.crypto import kdf
from secrets_manager.environment import Environment
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.backup import BackupSecret, BackupVersion, read_backup, write_backup
from secrets_manager.store.restore import restore_into, restore_new_store
from secrets_manager.store.url import remove_store_files

PASSWORD = "correct horse battery staple"  # noqa: S105 - throwaway stores
BACKUP_PASSWORD = b"off-site backup password"
VALUE_SIZE = 64
NAMESPACES = 8


@dataclass(frozen=True)
class Row:
    op: str
    secrets: int
    seconds: float  # median
    size: int  # bytes of the file written (backup) or read (restore)
    baseline: float  # seconds of the raw copy (median)

    @property
    def rate(self) -> float:
        return self.secrets / self.seconds

    @property
    def ratio(self) -> float:
        return self.baseline / self.seconds  # = ours/s over copy/s


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def populate(path: Path, count: int) -> float:
    """`count` secrets, one version each, written in one commit (`restore_into` of a generated
    logical form: the same records `store.put` writes, without a durable commit per secret)."""
    now = time.time()
    generated = sorted(
        (
            BackupSecret(
                name=f"ns{i % NAMESPACES}/KEY_{i:07d}",
                created=now,
                updated=now,
                created_by="bench",
                description="",
                tags={},
                max_versions=10,
                next_version=2,
                deleted=None,
                labels={"current": 1},
                versions=(
                    BackupVersion(1, now, "bench", False, base64.b64encode(os.urandom(VALUE_SIZE * 3 // 4))),
                ),
            )
            for i in range(count)
        ),
        key=lambda secret: secret.name,
    )
    store = EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(PASSWORD, kdf.TEST))
    began = time.perf_counter()
    try:
        store.audit_key()
        restore_into(store, generated)
        store._scrub()  # fold the WAL in: the copy baseline copies one file
    finally:
        store.close()
    return time.perf_counter() - began


def raw_copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(path: Path) -> EncryptedStore:
    return EncryptedStore.open(SqliteStorage(path), PasswordUnlock(PASSWORD, kdf.TEST))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k secrets, 2 runs per op")
    parser.add_argument(
        "--secrets",
        type=lambda t: report.parse_count(t, what="number of secrets"),
        help="secrets in the store (default 100k, quick 10k)",
    )
    parser.add_argument("--runs", type=int, help="runs per op (default 3, quick 2)")
    parser.add_argument("--dir", type=Path, default=None, help="directory for the temporary files")
    args = parser.parse_args(argv)
    count = args.secrets or (10_000 if args.quick else 100_000)
    runs = args.runs or (2 if args.quick else 3)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sm-bench-backup-", dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "source.db"
        _log(f"temporary files in {tmp}; populating {count:,} secrets")
        populate_seconds = populate(source, count)
        store_size = source.stat().st_size
        times: dict[str, list[float]] = {op: [] for op in OPS}
        sizes: dict[str, int] = {}
        store = open_store(source)
        try:
            for run in range(runs):
                for op in OPS if run % 2 == 0 else reversed(OPS):
                    seconds, size = measure(op, store, source, tmp, run)
                    times[op].append(seconds)
                    sizes[op] = size
                    _log(f"  run {run + 1}: {op}: {seconds:.2f} s ({count / seconds:,.0f} secrets/s)")
        finally:
            store.close()
    total = time.perf_counter() - began

    copy = statistics.median(times["raw copy"])
    rows = [Row(op, count, statistics.median(times[op]), sizes[op], copy) for op in OPS if op != "raw copy"]
    rows.append(Row("raw copy (baseline)", count, copy, store_size, copy))
    mode = "quick" if args.quick else "full"
    title = (
        f"secrets-manager {secrets_manager.__version__} backup/restore benchmark ({mode}) - "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"cryptography {version('cryptography')}, {os.cpu_count()} CPUs"
    )
    notes = [
        "ratio = ours / raw copy in secrets/s (1.000 = as fast as copying the store file; lower = slower).",
        f"Store: {count:,} secrets in {NAMESPACES} namespaces, one {VALUE_SIZE}-byte value each (2 records "
        f"per secret), {store_size / 2**20:.1f} MiB after a checkpoint. Medians of {runs} runs, alternating.",
        "backup: snapshot read + every record opened once + 64 KiB AES-GCM chunks + fsync + link. "
        "restore: every chunk and record checked, then one commit into a new file, linked into place.",
        f"Store populated by one bulk restore_into in {populate_seconds:.1f} s. "
        f"Total run time: {total:.1f} s.",
    ]
    report.render(HEADERS, [_cells(row) for row in rows], title, notes, left_columns=1)
    return 0


OPS = ("raw copy", "backup, store copy", "backup, password", "restore, store copy", "restore, password")
HEADERS = ("op", "secrets", "seconds", "secrets/s", "file MiB", "ratio")


def measure(op: str, store: EncryptedStore, source: Path, tmp: Path, run: int) -> tuple[float, int]:
    """Seconds for one run of `op`, and the size of the file it wrote or read."""
    copy_file = tmp / "copy.smbackup"
    password_file = tmp / "password.smbackup"
    if op == "raw copy":
        target = tmp / f"raw-{run}.db"
        seconds = timed(lambda: raw_copy(source, target))
        target.unlink()
        return seconds, source.stat().st_size
    if op.startswith("backup"):
        path, password = (copy_file, None) if op == "backup, store copy" else (password_file, BACKUP_PASSWORD)
        path.unlink(missing_ok=True)
        seconds = timed(lambda: write_backup(store, path, password=password, kdf=kdf.TEST))
        return seconds, path.stat().st_size
    path, password = (
        (copy_file, PASSWORD.encode()) if op == "restore, store copy" else (password_file, BACKUP_PASSWORD)
    )
    if not path.exists():  # the reversed order of odd runs restores before the first backup
        write_backup(store, path, password=None if path == copy_file else password, kdf=kdf.TEST)
    target = tmp / f"restored-{run}.db"

    def restore() -> None:
        backup = read_backup(path, password)
        restore_new_store(
            backup,
            str(target),
            password=b"new master password",
            kdf_profile="test",
            environment=Environment.DEVELOPMENT,
            actor="bench",
        )

    seconds = timed(restore)
    check = open_store(target) if path == copy_file else None
    if check is not None:
        check.close()
    remove_store_files(target)
    return seconds, path.stat().st_size


def _cells(row: Row) -> tuple[str, ...]:
    return (
        row.op,
        f"{row.secrets:,}",
        f"{row.seconds:.2f}",
        report.rate(row.rate),
        f"{row.size / 2**20:.1f}",
        f"{row.ratio:.3f}",
    )


if __name__ == "__main__":
    sys.exit(main())
