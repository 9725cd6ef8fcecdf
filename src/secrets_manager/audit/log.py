"""Append, rotate, read and verify the audit log (docs/audit.md).

Each record is one canonical JSON line. Its `hash` is SHA-256 over the record without `hash` and
`mac`, and includes `prev`, the previous record's hash: editing, removing or reordering any record
breaks the chain. `mac` is HMAC-SHA256 of `hash` under the store's audit key, so a chain cannot be
rebuilt by someone who can edit the file but cannot unlock the store. The store keeps an anchor
(last sequence number and hash) where the file's owner cannot forge it, so a cut tail is detected.

Writers serialise on an flock of `<file>.lock`. All sink I/O runs with a deadline: a stuck sink
fails the operation instead of hanging it. Failures raise `AuditError`; callers fail closed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import queue
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from secrets_manager.crypto.mac import record_mac, record_mac_ok, sha256_hex
from secrets_manager.crypto.mac import value_fingerprint as _value_fingerprint
from secrets_manager.errors import IntegrityError, SecretsManagerError
from secrets_manager.store.base import Anchor

GENESIS_HASH = "0" * 64
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS = 5.0
_TAIL_CHUNK = 64 * 1024
T = TypeVar("T")


class AuditError(SecretsManagerError):
    """The audit record could not be written in time; the operation must not go ahead."""

    exit_code = 1
    kind = "audit_error"

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class AuditTamperError(IntegrityError):
    """The audit chain is broken: a record was edited, removed, reordered or cut off."""


class AuditAnchor(Protocol):
    """What the audit log needs from a store: a secret key and a tamper-proof anchor."""

    def audit_key(self) -> bytes: ...

    def audit_anchor(self) -> Anchor | None: ...

    def set_audit_anchor(self, anchor: Anchor) -> None: ...


@dataclass
class AuditEvent:
    """The facts of one operation. Never a value: at most its `hmac-sha256:` fingerprint."""

    operation: str
    actor: str
    source: str = "cli"
    peer: str | None = None
    name: str | None = None
    version: int | None = None
    decision: str = "allow"
    outcome: str = "ok"
    value_hmac: str | None = None
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))


class AuditLog:
    """One audit log file (plus its rotated predecessors) and the anchor that pins its tail."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.lock_path = Path(f"{self.path}.lock")
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._clock = clock
        self._worker = _SinkWorker()

    # ---- writing -----------------------------------------------------------------------------

    def begin(self) -> PendingRecord:
        """Lock the log and open it for appending, within the deadline. Call before the operation,
        so an unwritable sink refuses the operation before anything happens."""
        return self._worker.run(self._begin, self.timeout, f"audit log {self.path}")

    def append(self, events: Sequence[AuditEvent], anchor: AuditAnchor | None) -> list[dict[str, Any]]:
        """begin() + write(): records for operations that are already decided."""
        return self.begin().write(events, anchor)

    def _begin(self) -> PendingRecord:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = _open_private(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            _flock_with_deadline(lock_fd, time.monotonic() + self.timeout)
            self._rotate_if_full()
            fd = _open_private(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        except BaseException:
            os.close(lock_fd)
            raise
        return PendingRecord(self, lock_fd, fd)

    def _rotate_if_full(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.max_bytes:
            return
        first = _first_record(self.path)
        if first is None:
            return
        self.path.rename(self._rotated_path(int(first["seq"])))

    def _rotated_path(self, first_seq: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{first_seq:012d}")

    # ---- reading -----------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """Rotated files oldest first, then the live file."""
        rotated = sorted(
            p
            for p in self.path.parent.glob(f"{self.path.name}.*")
            if p.name[len(self.path.name) + 1 :].isdigit()
        )
        return [*rotated, *([self.path] if self.path.exists() else [])]

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record in order; AuditTamperError on a line that is not a record."""
        for path in self.files():
            with path.open("rb") as handle:
                for number, line in enumerate(handle, start=1):
                    yield _parse_line(line, path, number)

    def last_record(self) -> dict[str, Any] | None:
        for path in reversed(self.files()):
            record = _last_record(path)
            if record is not None:
                return record
        return None

    def verify(self, key: bytes, anchor: Anchor | None) -> int:
        """Walk the whole chain; return the number of records, or raise AuditTamperError naming
        the first record that does not hold."""
        previous_hash, expected_seq, count = GENESIS_HASH, 1, 0
        anchor_seen = anchor is None
        for record in self.records():
            seq = record.get("seq")
            where = f"record {seq}" if isinstance(seq, int) else f"record #{count + 1}"
            if seq != expected_seq:
                raise AuditTamperError(
                    f"audit chain broken at {where}: expected record {expected_seq} "
                    "(a record was deleted, reordered or inserted)"
                )
            if record.get("prev") != previous_hash:
                raise AuditTamperError(f"audit chain broken at {where}: it does not follow record {seq - 1}")
            if record_hash(record) != record.get("hash"):
                raise AuditTamperError(f"audit record {seq} was edited (its hash does not match)")
            mac = record.get("mac")
            if mac is None:
                if not _may_be_unauthenticated(record):
                    raise AuditTamperError(f"audit record {seq} lacks its MAC")
            elif not (isinstance(mac, str) and record_mac_ok(key, record["hash"], mac)):
                raise AuditTamperError(f"audit record {seq} was forged or edited (its MAC does not match)")
            if anchor is not None and seq == anchor.seq:
                if record["hash"] != anchor.hash:
                    raise AuditTamperError(f"audit record {seq} is not the one the store anchored")
                anchor_seen = True
            previous_hash, expected_seq, count = record["hash"], expected_seq + 1, count + 1
        if not anchor_seen:
            assert anchor is not None
            raise AuditTamperError(
                f"audit log ends at record {count} but the store anchored record {anchor.seq}: "
                "records are missing at the end"
            )
        return count


class PendingRecord:
    """A locked, open audit log waiting for the outcome of one operation."""

    def __init__(self, log: AuditLog, lock_fd: int, fd: int) -> None:
        self._log = log
        self._lock_fd = lock_fd
        self._fd = fd
        self._closed = False

    def write(
        self, events: Sequence[AuditEvent], anchor: AuditAnchor | None, *, release: bool = True
    ) -> list[dict[str, Any]]:
        """Append the records (durably, in one write) and move the store's anchor. `release=False`
        keeps the log locked for a later write (a request record now, its response later).
        `anchor` is None only for a writer that could not unlock the store."""
        if self._closed:
            raise AuditError(f"audit log {self._log.path} is no longer held; the operation was refused")
        try:
            records = self._log._worker.run(
                lambda: self._write(events, anchor), self._log.timeout, f"audit log {self._log.path}"
            )
        except AuditError as exc:
            if exc.timed_out:
                # The worker may still use the descriptors: leak them rather than let a late write
                # land in whatever file reuses the numbers. The process is failing anyway.
                self._closed = True
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        if release:
            self.close()
        return records

    def _write(self, events: Sequence[AuditEvent], anchor: AuditAnchor | None) -> list[dict[str, Any]]:
        last = self._log.last_record()
        if anchor is not None:
            _check_tail_against_anchor(last, anchor.audit_anchor(), self._log.path)
        key = None if anchor is None else anchor.audit_key()
        seq = 0 if last is None else int(last["seq"])
        previous = GENESIS_HASH if last is None else str(last["hash"])
        now = datetime.fromtimestamp(self._log._clock(), tz=UTC).isoformat(timespec="microseconds")
        records = []
        for event in events:
            seq += 1
            record: dict[str, Any] = {"seq": seq, "time": now, **asdict(event), "prev": previous}
            record["hash"] = previous = record_hash(record)
            record["mac"] = None if key is None else record_mac(key, record["hash"])
            records.append(record)
        data = b"".join(_canonical(record) + b"\n" for record in records)
        size = os.fstat(self._fd).st_size
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, size)  # never leave half a record behind
            raise
        if anchor is not None and records:
            anchor.set_audit_anchor(Anchor(seq=seq, hash=previous))
        return records

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> PendingRecord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_tail_against_anchor(last: dict[str, Any] | None, anchored: Anchor | None, path: Path) -> None:
    """Refuse to extend a log that lost records the store vouched for: that would hide the loss."""
    if anchored is None:
        return
    last_seq = 0 if last is None else int(last["seq"])
    if last_seq < anchored.seq or (
        last_seq == anchored.seq and last is not None and last["hash"] != anchored.hash
    ):
        raise AuditTamperError(
            f"audit log {path} lost records the store anchored (up to record {anchored.seq}); "
            "run 'secrets-manager audit verify' and restore the log before continuing"
        )


def value_fingerprint(anchor: AuditAnchor, value: bytes) -> str:
    """`hmac-sha256:<hex>` of a value under the store's audit key (Vault's `sys/audit-hash`)."""
    return _value_fingerprint(anchor.audit_key(), value)


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a record without its `hash` and `mac`."""
    body = {k: v for k, v in record.items() if k not in ("hash", "mac")}
    return sha256_hex(_canonical(body))


def _may_be_unauthenticated(record: dict[str, Any]) -> bool:
    """Only a failed unlock is written without the audit key (the writer could not unlock)."""
    return record.get("operation") == "unlock" and record.get("decision") == "deny"


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _parse_line(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise AuditTamperError(f"{path.name} line {number} is not an audit record (damaged or truncated)")
    return record


def _first_record(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as handle:
        line = handle.readline()
    return _parse_line(line, path, 1) if line.strip() else None


def _last_record(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        if end == 0:
            return None
        start = max(0, end - _TAIL_CHUNK)
        handle.seek(start)
        chunk = handle.read()
    lines = chunk.rstrip(b"\n").split(b"\n")
    if not chunk.endswith(b"\n"):
        raise AuditError(f"audit log {path} ends in a partial record; run 'secrets-manager audit verify'")
    try:
        return _parse_line(lines[-1], path, -1)
    except AuditTamperError:
        raise AuditError(
            f"audit log {path} ends in a damaged record; run 'secrets-manager audit verify'"
        ) from None


def _open_private(path: Path, flags: int) -> int:
    """Open a regular file we own, created 0600. O_NONBLOCK so a FIFO cannot block the open."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AuditError(f"{path} is not a regular file; the audit log must be one")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _flock_with_deadline(fd: int, deadline: float) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AuditError("another process holds the audit log lock; try again") from None
            time.sleep(0.005)


class _SinkWorker:
    """One daemon thread that does an audit log's I/O, so the caller can stop waiting for it.

    A daemon thread (unlike a ThreadPoolExecutor's) cannot keep a failing process from exiting
    when the sink is stuck; it is reused across records because starting a thread per record
    costs more than the write itself.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="audit-sink", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            self._jobs.get()()

    def run(self, work: Callable[[], T], timeout: float, what: str) -> T:
        """Run sink I/O on the worker and give up after `timeout` seconds (fail closed)."""
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()

        def job() -> None:
            try:
                outcome.append((True, work()))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                done.set()

        self._jobs.put(job)
        if not done.wait(timeout):
            raise AuditError(
                f"{what} did not answer within {timeout:g} s; the operation was refused",
                timed_out=True,
            )
        ok, value = outcome[0]
        if ok:
            return value  # type: ignore[no-any-return]
        if isinstance(value, SecretsManagerError):
            raise value
        if isinstance(value, OSError):
            raise AuditError(
                f"cannot write {what}: {value.strerror or value}; the operation was refused"
            ) from None
        raise value
