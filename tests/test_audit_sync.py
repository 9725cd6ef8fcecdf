"""Non-durable audit appends (the service's reads): written before the call returns, fsynced and
anchored within the flush interval, one chain with every other writer, failures fail closed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secrets_manager.audit import Anchor, AuditError, AuditEvent, AuditLog, AuditTamperError
from secrets_manager.audit.append import FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS
from secrets_manager.audit.files import flock_with_deadline
from secrets_manager.crypto import kdf
from secrets_manager.errors import StorageError
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

PASSWORD = "audit sync test password"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EncryptedStore]:
    opened = EncryptedStore.create(
        SqliteStorage(tmp_path / "store.db", create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    )
    yield opened
    opened.close()


def read(n: int) -> AuditEvent:
    return AuditEvent("get", "spiffe://test/reader", "grpc", "ipv4:127.0.0.1:1", f"auth/KEY_{n}", version=1)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def anchored_seq(store: EncryptedStore) -> int:
    anchor = store.audit_anchor()
    return 0 if anchor is None else anchor.seq


def test_a_non_durable_record_is_in_the_file_when_append_returns(
    tmp_path: Path, store: EncryptedStore
) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", flush_interval=60)  # no flush during the test
    for n in range(1, 6):
        written = log.append([read(n)], store, durable=False)
        on_disk = lines(tmp_path / "audit.jsonl")
        assert on_disk[-1] == written[0] and on_disk[-1]["seq"] == n
    assert log.verify(store.audit_key(), store.audit_anchor()) == 5


def test_the_flush_fsyncs_and_anchors_within_the_interval(
    tmp_path: Path, store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, flush_interval=0.3)
    for n in range(1, 4):
        log.append([read(n)], store, durable=False)
    assert synced == [] and anchored_seq(store) == 0  # deferred: nothing yet
    assert wait_for(lambda: anchored_seq(store) == 3)
    # one fsync for the three records, and one of the directory for the new file's name
    assert synced == [path.stat().st_ino, tmp_path.stat().st_ino]
    assert store.audit_anchor().hash == lines(path)[-1]["hash"]  # type: ignore[union-attr]


def test_durable_and_non_durable_writers_share_one_chain(tmp_path: Path, store: EncryptedStore) -> None:
    """Two logs on one file stand for two processes (each has its own locks and tail cache)."""
    path = tmp_path / "audit.jsonl"
    service, cli = AuditLog(path, flush_interval=60), AuditLog(path)
    service.append([read(1), read(2)], store, durable=False)
    cli.append([AuditEvent("store", "alice", name="auth/KEY_9")], store)  # durable: anchors seq 3
    service.append([read(3)], store, durable=False)  # must chain onto the CLI's record
    cli.append([AuditEvent("get", "alice", name="auth/KEY_9")], store)
    service.append([read(4)], store, durable=False)
    service.flush()
    assert [r["seq"] for r in lines(path)] == [1, 2, 3, 4, 5, 6]
    assert service.verify(store.audit_key(), store.audit_anchor()) == 6
    assert anchored_seq(store) == 6


def test_a_flush_never_moves_the_anchor_backwards(tmp_path: Path, store: EncryptedStore) -> None:
    path = tmp_path / "audit.jsonl"
    service, cli = AuditLog(path, flush_interval=60), AuditLog(path)
    service.append([read(1), read(2)], store, durable=False)
    cli.append([AuditEvent("store", "alice", name="auth/KEY_9")], store)
    assert anchored_seq(store) == 3
    service.flush()  # its records (1, 2) are older than the anchored tail
    assert anchored_seq(store) == 3
    assert service.verify(store.audit_key(), store.audit_anchor()) == 3


def test_a_cut_tail_is_still_detected(tmp_path: Path, store: EncryptedStore) -> None:
    """The tail cache must not skip the anchor check once the file is not as we left it."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, flush_interval=60)
    log.append([read(1), read(2), read(3)], store, durable=False)
    log.flush()
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1])  # drop record 3
    with pytest.raises(AuditTamperError, match="lost records"):
        log.append([read(4)], store, durable=False)


def test_rotation_keeps_one_chain_and_syncs_the_rotated_file(tmp_path: Path, store: EncryptedStore) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1500, flush_interval=60)
    for n in range(1, 31):
        log.append([read(n)], store, durable=False)
    log.flush()
    assert len(log.files()) > 2
    assert log.verify(store.audit_key(), store.audit_anchor()) == 30
    assert anchored_seq(store) == 30


def test_a_failed_fsync_refuses_every_later_append(
    tmp_path: Path, store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from fsync cannot be produced on demand here; the injected error is what Linux returns
    when writeback of the log's pages failed (they may be gone)."""
    log = AuditLog(tmp_path / "audit.jsonl", flush_interval=60)
    log.append([read(1)], store, durable=False)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(AuditError, match="could not be synced"):
        log.flush()
    monkeypatch.undo()
    for durable in (False, True):
        with pytest.raises(AuditError, match="records may be lost"):
            log.append([read(2)], store, durable=durable)
    assert len(lines(tmp_path / "audit.jsonl")) == 1


CRASHING_WRITER = """
import os, sys
from secrets_manager.audit import AuditEvent, AuditLog
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
store = EncryptedStore.open(SqliteStorage(sys.argv[1]), PasswordUnlock(sys.argv[3]))
log = AuditLog(sys.argv[2], flush_interval=60)
for n in range(200):
    log.append([AuditEvent("get", "svc", "grpc", None, f"auth/K{n}")], store, durable=False)
print("appended", flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_crashed_writer_loses_no_record(tmp_path: Path, store: EncryptedStore) -> None:
    """SIGKILL right after the appends, before any flush: the records are the kernel's by then."""
    store.audit_key()  # created by this process, so the child only reads the store
    path = tmp_path / "audit.jsonl"
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(tmp_path / "store.db"), str(path), PASSWORD],
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -9 and child.stdout == b"appended\n", child.stderr
    assert [r["seq"] for r in lines(path)] == list(range(1, 201))
    log = AuditLog(path)
    assert log.verify(store.audit_key(), store.audit_anchor()) == 200  # the anchor lags; that is allowed
    log.append([read(201)], store)  # and the next writer carries on from the crashed one's tail
    assert log.verify(store.audit_key(), store.audit_anchor()) == 201


ROTATING_WRITER = """
import sys, time
from secrets_manager.audit import AuditEvent, AuditLog
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
store = EncryptedStore.open(SqliteStorage(sys.argv[1]), PasswordUnlock(sys.argv[3]))
log = AuditLog(sys.argv[2], max_bytes=2000)
print("ready", flush=True)
end, n = time.monotonic() + float(sys.argv[4]), 0
while time.monotonic() < end:
    log.append([AuditEvent("get", "svc", "grpc", None, f"auth/K{n}")], store, durable=n % 3 != 0)
    n += 1
log.flush()
print(n, flush=True)
"""


def test_verify_and_reset_raise_no_false_alarm_while_a_writer_rotates_the_log(
    tmp_path: Path, store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify listed the files, then opened each by name: a rotation in between had it read the
    new live file in the rotated one's place ('chain broken at record 1047: expected record
    1027', 'ends at record 2050 but the store anchored record 2051'), so a cron verify alerted
    at each rotation, and 'audit reset --accept-loss' could set a good log aside."""
    from secrets_manager.cli import run

    store.audit_key()  # created here, so the writer only reads the store
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append([read(0)], store)
    for key, value in {
        "SECRETS_MANAGER_STORE": str(tmp_path / "store.db"),
        "SECRETS_MANAGER_AUDIT_FILE": str(path),
        "MASTER_PASSWORD": PASSWORD,
        "HOME": str(tmp_path),
    }.items():
        monkeypatch.setenv(key, value)
    writer = subprocess.Popen(
        [sys.executable, "-c", ROTATING_WRITER, str(tmp_path / "store.db"), str(path), PASSWORD, "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    problems: list[str] = []
    verified = resets_refused = 0
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        while writer.poll() is None and not problems:
            try:
                log.verify(store.audit_key(), store.audit_anchor())
                verified += 1
            except (AuditError, AuditTamperError) as exc:
                problems.append(str(exc))
            if verified % 4 == 3:  # the CLI's reset, in this process: refused, the log verifies
                if run(["audit", "reset", "--accept-loss"]) != 2:
                    problems.append("audit reset set the log aside")
                resets_refused += 1
        out, err = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert problems == [], problems
    assert writer.returncode == 0, err
    assert verified >= 5 and resets_refused >= 1, (verified, resets_refused)
    assert len(log.files()) > 20  # it rotated all along
    assert log.verify(store.audit_key(), store.audit_anchor()) == int(out) + 1


def test_a_write_under_way_is_not_taken_for_a_partial_record(tmp_path: Path, store: EncryptedStore) -> None:
    """A reader can see a write's first bytes before its last: verify took that for a partial
    record a crash left (exit 1). It reads such a line again once it holds the writers' lock."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append([read(1), read(2)], store)
    whole = path.read_bytes()
    *_, last = whole.splitlines(keepends=True)
    path.write_bytes(whole[: -len(last)])
    writer = AuditLog(path)
    assert writer._flock(deadline=None)  # a writer at work: its record half written
    with path.open("ab") as handle:
        handle.write(last[:50])
    outcome: list[object] = []
    reader = threading.Thread(target=lambda: outcome.append(log.verify(store.audit_key(), None)))
    reader.start()
    time.sleep(0.3)
    assert reader.is_alive()  # waiting for the lock, not reporting a partial record
    with path.open("ab") as handle:
        handle.write(last[50:])
    writer._unflock()
    reader.join(10)
    assert outcome == [2]


# ---- the deferred fsync runs outside the in-process lock -------------------------------------


def watch_anchors(store: EncryptedStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The seq of every anchor the store is given, in order."""
    given: list[int] = []
    real = store.set_audit_anchor

    def spy(anchor: Anchor, *, lock_wait: float | None = None, reset: bool = False) -> None:
        given.append(anchor.seq)
        real(anchor, lock_wait=lock_wait, reset=reset)

    monkeypatch.setattr(store, "set_audit_anchor", spy)
    return given


def slow_fsync(monkeypatch: pytest.MonkeyPatch, seconds: float) -> threading.Event:
    """Make os.fsync (as the audit log calls it) take `seconds`; the event is set once one starts."""
    real_fsync = os.fsync
    started = threading.Event()

    def slow(fd: int) -> None:
        started.set()
        time.sleep(seconds)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow)
    return started


def test_appends_go_on_while_a_deferred_fsync_runs(
    tmp_path: Path, store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holding the lock through the fsync (as _flush once did) would stall these appends ~0.3 s."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, flush_interval=60)  # only the flushes below
    given = watch_anchors(store, monkeypatch)
    for n in range(1, 4):
        log.append([read(n)], store, durable=False)
    real_fsync = os.fsync
    syncing = slow_fsync(monkeypatch, 0.3)
    failures: list[BaseException] = []

    def flush() -> None:
        try:
            log.flush()
        except BaseException as exc:
            failures.append(exc)

    flusher = threading.Thread(target=flush)
    flusher.start()
    assert syncing.wait(5)
    took = []
    for n in range(4, 7):
        started = time.monotonic()
        log.append([read(n)], store, durable=False)
        took.append(time.monotonic() - started)
    assert sum(took) < 0.15, took
    assert flusher.is_alive()  # the three appends ran while the fsync slept
    flusher.join(5)
    assert not flusher.is_alive() and failures == []
    # The flush anchors what was written before its fsync began: 3, not the 4-6 it may not cover.
    assert anchored_seq(store) == 3
    monkeypatch.setattr(os, "fsync", real_fsync)
    log.flush()  # the next flush covers 4-6
    assert anchored_seq(store) == 6 and given == [0, 3, 6]  # 0: the empty chain, before record 1
    assert store.audit_anchor().hash == lines(path)[-1]["hash"]  # type: ignore[union-attr]
    assert log.verify(store.audit_key(), store.audit_anchor()) == 6


def test_flush_waits_for_a_deferred_flush_already_running(
    tmp_path: Path, store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flush() promises the records are fsynced and anchored when it returns (the service calls
    it at shutdown); a flush the worker began just before must not make it return early."""
    log = AuditLog(tmp_path / "audit.jsonl", flush_interval=0)  # the worker flushes at once
    syncing = slow_fsync(monkeypatch, 0.3)
    log.append([read(1)], store, durable=False)
    assert syncing.wait(5)  # the worker is inside its fsync
    try:
        log.flush()
        assert anchored_seq(store) == 1
    finally:
        wait_for(lambda: anchored_seq(store) == 1)  # the worker is done before the store closes


def test_the_anchor_advances_under_continuous_appends(
    tmp_path: Path, store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads append without stop while the worker anchors every 10 ms: the anchor moves
    all along (seen at three places), never backwards, and ends on the last record."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, flush_interval=0.01)
    given = watch_anchors(store, monkeypatch)
    stop = threading.Event()
    written = [0] * 4
    failures: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            while not stop.is_set():
                log.append([read(i)], store, durable=False)
                written[i] += 1
                time.sleep(0.0002)  # keeps the file (and the final verify) small
        except BaseException as exc:
            failures.append(exc)
            stop.set()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    seen: list[int] = []
    # Until the anchor has been seen at three places (not for a fixed second: how far a loaded
    # machine's writers and flusher get in one second is up to its scheduler); 30 s at most.
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and not stop.is_set() and len({seq for seq in seen if seq}) < 3:
        seen.append(anchored_seq(store))
        time.sleep(0.02)
    stop.set()
    for thread in threads:
        thread.join(5)
    assert failures == []
    assert seen == sorted(seen) and given == sorted(given)  # never backwards
    assert len({seq for seq in seen if seq}) >= 3, seen  # moving all along, not stuck at its first
    total = sum(written)
    assert len(lines(path)) == total
    log.flush()
    # flush() alone may return while the worker's own flush of the last records is still running
    # (test_flush_waits_for_a_deferred_flush_already_running): wait for that one too.
    assert wait_for(lambda: anchored_seq(store) == total), (anchored_seq(store), total)
    assert log.verify(store.audit_key(), store.audit_anchor()) == total


# ---- an anchor that could not be moved is owed, and retried until it moves -------------------


@contextlib.contextmanager
def store_write_lock_held(store_path: Path) -> Iterator[None]:
    """Another writer holding the store's commit lock (a long import or restore), on a connection
    of its own: the store's own connection gets SQLITE_BUSY until it is released."""
    other = sqlite3.connect(store_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_the_anchor_catches_up_once_the_store_is_free_without_another_append(
    tmp_path: Path, store: EncryptedStore
) -> None:
    """Reads answered while another writer held the store's lock: every flush then failed to
    anchor (or skipped it, in the backoff after) and nothing tried again, so once the service was
    idle the anchor stayed at the record before the burst for good, and those acknowledged reads
    could be cut from the log undetected. The anchor is owed now, and retried after the backoff."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)  # flushes every 10 ms (the default)
    log.append([AuditEvent("store", "alice", name="auth/KEY_0")], store)  # durable: anchors record 1
    with store_write_lock_held(tmp_path / "store.db"):
        for n in range(1, 13):
            started = time.monotonic()
            log.append([read(n)], store, durable=False)
            assert time.monotonic() - started < 0.5, f"read {n} waited for the store's lock"
            time.sleep(0.03)
        time.sleep(0.2)  # the last flush ran (and failed, or left the anchor alone in the backoff)
        assert anchored_seq(store) == 1
    last = lines(path)[-1]
    assert last["seq"] == 13
    # Nothing is appended from here on: only a retry can move the anchor (the backoff is 1 s).
    assert wait_for(lambda: anchored_seq(store) == 13, FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS + 1.5), anchored_seq(
        store
    )
    assert store.audit_anchor() == Anchor(seq=13, hash=str(last["hash"]))
    assert lines(path)[-1] == last  # the retry wrote nothing
    assert log.verify(store.audit_key(), store.audit_anchor()) == 13
    cut = b"".join(path.read_bytes().splitlines(keepends=True)[:1])
    path.write_bytes(cut)  # the reads cut from the log: now seen
    with pytest.raises(AuditTamperError, match="records are missing at the end"):
        log.verify(store.audit_key(), store.audit_anchor())


def test_the_anchor_catches_up_when_another_process_held_the_log_during_the_flush(
    tmp_path: Path, store: EncryptedStore
) -> None:
    """A flush that finds another writer holding the log's flock cannot anchor; it tries again soon,
    not only at the next flush (which waits for a new read)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, flush_interval=0.2)
    for n in range(1, 4):
        log.append([read(n)], store, durable=False)
    other = AuditLog(path)  # another process: a lock of its own
    assert other._flock(deadline=None)
    try:
        time.sleep(0.5)  # the flush ran meanwhile: fsynced, but the anchor could not move
        assert anchored_seq(store) == 0
    finally:
        other._unflock()
    assert wait_for(lambda: anchored_seq(store) == 3, 1.0), anchored_seq(store)
    assert log.verify(store.audit_key(), store.audit_anchor()) == 3


def test_flush_anchors_what_an_earlier_flush_could_not(tmp_path: Path, store: EncryptedStore) -> None:
    """At shutdown the service's flush() must anchor every record, also those a flush already
    fsynced but could not anchor (nothing is unsynced any more by then), backoff or not."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, flush_interval=60)
    for n in range(1, 4):
        log.append([read(n)], store, durable=False)
    with store_write_lock_held(tmp_path / "store.db"):
        log._flush(deferred=True)  # the worker's flush: fsynced, the store busy
        assert anchored_seq(store) == 0
    log.flush()  # at once: within the backoff a deferred flush would keep
    assert anchored_seq(store) == 3
    assert log.verify(store.audit_key(), store.audit_anchor()) == 3


def test_an_owed_anchor_is_dropped_once_an_audit_reset_set_its_file_aside(
    tmp_path: Path, store: EncryptedStore
) -> None:
    """Records of the old chain are never anchored over the new one an `audit reset` began."""
    path = tmp_path / "audit.jsonl"
    service, cli = AuditLog(path), AuditLog(path)
    for n in range(1, 6):
        service.append([read(n)], store, durable=False)
    with store_write_lock_held(tmp_path / "store.db"):
        assert wait_for(lambda: service.anchor_lag_seconds > 0)  # flushed, not anchored: owed
        assert anchored_seq(store) == 0
    cli.restart(store, AuditEvent("audit.reset", "operator"))  # within the service's backoff
    assert anchored_seq(store) == 1
    # The retry ran (the debt is gone) and found nothing to do.
    assert wait_for(lambda: service.anchor_lag_seconds == 0, FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS + 5)
    assert anchored_seq(store) == 1
    assert AuditLog(path).verify(store.audit_key(), store.audit_anchor()) == 1


def test_an_anchor_owed_to_a_store_closed_meanwhile_is_given_up_and_the_log_goes_on(
    tmp_path: Path,
) -> None:
    """Reads flushed while the store was busy owe its anchor, and the store is closed before the
    retry (a command ends, a test's store fixture). The retry hit SQLite's "Cannot operate on a
    closed database" (not an error of ours) and the log's one worker thread died: every later
    append through that log then waited out its timeout. Now the closed store is an error of ours
    (as on PostgreSQL), the owed anchor is given up (nothing can move it through that handle), and
    the log goes on with another store."""
    first = EncryptedStore.create(
        SqliteStorage(tmp_path / "store.db", create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    )
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append([AuditEvent("store", "alice", name="auth/KEY_0")], first)  # anchors record 1
    with store_write_lock_held(tmp_path / "store.db"):
        for n in range(1, 4):
            log.append([read(n)], first, durable=False)
        assert wait_for(lambda: log.anchor_lag_seconds > 0)  # flushed, the anchor not moved: owed
        assert anchored_seq(first) == 1
    first.close()
    with pytest.raises(StorageError, match="is closed"):
        first.audit_anchor()
    # Only the retry (after the backoff) gives it up, and only if it met the closed store and lived.
    assert wait_for(lambda: log.anchor_lag_seconds == 0, FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS + 5)
    assert log._worker._thread.is_alive()
    again = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        started = time.monotonic()
        log.append([read(4)], again, durable=False)
        log.flush()
        assert time.monotonic() - started < 1.0
        assert anchored_seq(again) == 5
        assert log.verify(again.audit_key(), again.audit_anchor()) == 5
    finally:
        again.close()


def test_a_lock_wait_past_its_deadline_is_a_timeout(tmp_path: Path) -> None:
    """The sink worker waits for another process's flock until its caller's deadline, and can give
    up a moment before the caller does: its error is then the one the caller raises. It was not
    marked timed_out, so the service, refused by the stuck log after one audit timeout, tried to
    record the refusal and waited a second one (CI on 889333a: test_service_operability's
    stuck-audit-log test answered after 3.0 s with a 1.5 s timeout). Fails on the old code."""
    lock_path = tmp_path / "held.lock"
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    waiter = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(AuditError) as refused:
            flock_with_deadline(waiter, time.monotonic() + 0.05)
        assert refused.value.timed_out
    finally:
        os.close(waiter)
        os.close(holder)
