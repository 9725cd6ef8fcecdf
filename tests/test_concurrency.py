"""Several real processes on one SQLite store: no lost update, no version gap, durable acknowledgements.

Each writer is a separate Python interpreter (`python -c WORKER`) with its own connection. Writers
report every acknowledged put on stdout as "<i> <version>" after `put` returned; the test compares
those reports with what the store holds afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

WORKERS = 4
PUTS = 100
MAX_VERSIONS = 1000  # every process passes the same, so nothing is pruned in these tests
TIMEOUT = 120

WORKER = r"""
import os, sys
from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

path, mode, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
unlock = PasswordUnlock(os.environ["TEST_STORE_PASSWORD"], kdf.TEST)
store = EncryptedStore.open(SqliteStorage(path), unlock, max_versions=int(os.environ["TEST_MAX_VERSIONS"]))
print("ready", flush=True)
sys.stdin.readline()  # every writer starts at the same moment
for i in range(count):
    if mode == "distinct":
        name, value = f"dist/w{worker}-{i:03d}", f"value-{worker}-{i}".encode()
    elif mode == "shared":
        name, value = "shared/counter", f"{worker}:{i}".encode()
    else:  # "crash": distinct names, larger values, until killed
        name, value = f"crash/k{worker}-{i:06d}", f"{worker}:{i}:".encode() * 500
    info = store.put(name, value)
    print(i, info.version, flush=True)
store.close()
"""


def crash_value(worker: int, i: int) -> bytes:
    return f"{worker}:{i}:".encode() * 500


def start_writer(path: Path, password: str, mode: str, worker: int, count: int) -> subprocess.Popen[str]:
    env = dict(os.environ, TEST_STORE_PASSWORD=password, TEST_MAX_VERSIONS=str(MAX_VERSIONS))
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), mode, str(worker), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    assert ready == "ready\n", proc.communicate(timeout=TIMEOUT)[1]
    return proc


def run_writers(path: Path, password: str, mode: str) -> list[list[tuple[int, int]]]:
    """Start WORKERS writers, release them together, return each one's acknowledged (i, version)."""
    procs = [start_writer(path, password, mode, worker, PUTS) for worker in range(WORKERS)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    acks = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        acks.append([(int(i), int(v)) for i, v in (line.split() for line in out.splitlines())])
    return acks


@pytest.fixture
def store_file(encrypted_store: EncryptedStore, tmp_store_path: Path) -> Path:
    """An initialised store, closed so that only the writers hold it."""
    encrypted_store.close()
    return tmp_store_path


def open_for_checking(path: Path, password: str) -> EncryptedStore:
    return EncryptedStore.open(
        SqliteStorage(path), PasswordUnlock(password, kdf.TEST), max_versions=MAX_VERSIONS
    )


def test_concurrent_writers_to_distinct_names_lose_nothing(store_file: Path, store_password: str) -> None:
    acks = run_writers(store_file, store_password, "distinct")
    assert [len(a) for a in acks] == [PUTS] * WORKERS
    assert all(version == 1 for a in acks for _, version in a)
    store = open_for_checking(store_file, store_password)
    try:
        expected = {
            f"dist/w{w}-{i:03d}": f"value-{w}-{i}".encode() for w in range(WORKERS) for i in range(PUTS)
        }
        assert [meta.name for meta in store.list("dist/")] == sorted(expected)
        assert {name: store.get(name).value.reveal() for name in expected} == expected
        # All writers shared one namespace keyset; every put counted two encryptions on it.
        assert store._keyset_for_read("dist").primary.uses == 2 * WORKERS * PUTS
    finally:
        store.close()


def test_concurrent_writers_to_one_name_get_gapless_unique_versions(
    store_file: Path, store_password: str
) -> None:
    acks = run_writers(store_file, store_password, "shared")
    total = WORKERS * PUTS
    reported = Counter(version for a in acks for _, version in a)
    assert sorted(reported) == list(range(1, total + 1))
    assert max(reported.values()) == 1
    for worker_acks in acks:  # each writer's own versions go up in the order it wrote them
        versions = [version for _, version in worker_acks]
        assert versions == sorted(versions)
    store = open_for_checking(store_file, store_password)
    try:
        meta = store.describe("shared/counter")
        assert [info.version for info in meta.versions] == list(range(1, total + 1))
        assert meta.current_version == total
        written = {version: f"{w}:{i}".encode() for w, a in enumerate(acks) for i, version in a}
        stored = {n: store.get("shared/counter", version=n).value.reveal() for n in range(1, total + 1)}
        assert stored == written
    finally:
        store.close()


def test_writer_killed_mid_stream_loses_no_acknowledged_write(store_file: Path, store_password: str) -> None:
    acknowledged: dict[str, bytes] = {}
    for worker, kill_after in enumerate((7, 41, 113)):
        proc = start_writer(store_file, store_password, "crash", worker, 10**6)
        watchdog = threading.Timer(TIMEOUT, proc.kill)
        watchdog.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            for _ in range(kill_after):
                line = proc.stdout.readline()
                assert line, proc.communicate()[1]
                i, _version = map(int, line.split())
                acknowledged[f"crash/k{worker}-{i:06d}"] = crash_value(worker, i)
            os.kill(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=TIMEOUT)
        finally:
            watchdog.cancel()
        assert proc.returncode == -signal.SIGKILL
        for line in out.splitlines():  # acknowledged before the kill, still in the pipe
            i, _version = map(int, line.split())
            acknowledged[f"crash/k{worker}-{i:06d}"] = crash_value(worker, i)

        store = open_for_checking(store_file, store_password)
        try:
            missing = [
                name
                for name, value in acknowledged.items()
                if name not in {m.name for m in store.list("crash/")}
            ]
            assert missing == []
            assert {name: store.get(name).value.reveal() for name in acknowledged} == acknowledged
            for meta in store.list("crash/"):  # the write in flight is all there or not at all
                store.get(meta.name)
            assert store.put(f"after-kill/{worker}", b"still writable").version == 1
        finally:
            store.close()
    assert len(acknowledged) >= 7 + 41 + 113
