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
_TAIL_CHUNK = 4096
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
        self._worker = _SinkWorker(self._write_batch)

    # ---- writing -----------------------------------------------------------------------------

    def append(self, events: Sequence[AuditEvent], anchor: AuditAnchor | None) -> list[dict[str, Any]]:
        """Append records durably and move the store's anchor; return them once they are on disk.

        Concurrent callers are group-committed: the sink worker writes every waiting record with
        one lock, one write, one fsync and one anchor update. Raises AuditError if that does not
        happen within `timeout` seconds. `anchor` is None only for a writer that could not unlock
        the store (a denied unlock): such records carry no MAC and do not move the anchor.
        """
        job = _AppendJob(list(events), anchor)
        self._worker.submit(job)
        if not job.done.wait(self.timeout):
            job.abandoned = True
            raise AuditError(
                f"audit log {self.path} did not answer within {self.timeout:g} s; the operation was refused",
                timed_out=True,
            )
        if job.error is not None:
            if isinstance(job.error, SecretsManagerError):
                raise job.error
            if isinstance(job.error, OSError):
                reason = job.error.strerror or str(job.error)
                raise AuditError(
                    f"cannot write audit log {self.path}: {reason}; the operation was refused"
                ) from None
            raise job.error
        return job.records

    def _write_batch(self, jobs: list[_AppendJob]) -> None:
        """On the worker: write runs of jobs that share an anchor together."""
        live = [job for job in jobs if not job.abandoned]
        while live:
            size = next((i for i, job in enumerate(live) if job.anchor is not live[0].anchor), len(live))
            group = live[:size]
            live = live[len(group) :]
            try:
                self._write_group(group)
            except BaseException as exc:
                for job in group:
                    job.error = exc
            finally:
                for job in group:
                    job.done.set()

    def _write_group(self, jobs: list[_AppendJob]) -> None:
        anchor = jobs[0].anchor
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = _open_private(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            _flock_with_deadline(lock_fd, time.monotonic() + self.timeout)
            self._rotate_if_full()
            fd = _open_private(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            try:
                self._append_records(fd, jobs, anchor)
            finally:
                os.close(fd)
        finally:
            os.close(lock_fd)  # releases the flock

    def _append_records(self, fd: int, jobs: list[_AppendJob], anchor: AuditAnchor | None) -> None:
        last = self.last_record()
        if anchor is not None:
            _check_tail_against_anchor(last, anchor.audit_anchor(), self.path)
        key = None if anchor is None else anchor.audit_key()
        seq = 0 if last is None else int(last["seq"])
        previous = GENESIS_HASH if last is None else str(last["hash"])
        now = datetime.fromtimestamp(self._clock(), tz=UTC).isoformat(timespec="microseconds")
        lines = []
        for job in jobs:
            for event in job.events:
                seq += 1
                record: dict[str, Any] = {"seq": seq, "time": now, **asdict(event), "prev": previous}
                record["hash"] = previous = record_hash(record)
                record["mac"] = None if key is None else record_mac(key, record["hash"])
                job.records.append(record)
                lines.append(_canonical(record) + b"\n")
        data = b"".join(lines)
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # never leave half a record behind
            raise
        if anchor is not None and seq > (0 if last is None else int(last["seq"])):
            anchor.set_audit_anchor(Anchor(seq=seq, hash=previous))

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
        if self.path.exists():  # the common case: no need to look for rotated files
            record = _last_record(self.path)
            if record is not None:
                return record
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


@dataclass(eq=False)
class _AppendJob:
    """Records one caller waits for; filled in by the sink worker."""

    events: list[AuditEvent]
    anchor: AuditAnchor | None
    records: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None
    abandoned: bool = False
    done: threading.Event = field(default_factory=threading.Event)


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
    """The file's last record, reading backwards only as far as its start."""
    with path.open("rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end == 0:
            return None
        chunk_size = _TAIL_CHUNK
        while True:
            start = max(0, end - chunk_size)
            handle.seek(start)
            chunk = handle.read()
            body = chunk.rstrip(b"\n")
            if b"\n" in body or start == 0:
                break
            chunk_size *= 4
    if not chunk.endswith(b"\n"):
        raise AuditError(f"audit log {path} ends in a partial record; run 'secrets-manager audit verify'")
    try:
        return _parse_line(body.rsplit(b"\n", 1)[-1], path, -1)
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
    """One daemon thread that does an audit log's I/O, in batches.

    Callers wait with a deadline, so a stuck sink fails requests instead of hanging them; a daemon
    thread (unlike a ThreadPoolExecutor's) cannot keep a failing process from exiting. Jobs that
    arrive while a batch is being written form the next batch: group commit.
    """

    def __init__(self, write_batch: Callable[[list[_AppendJob]], None]) -> None:
        self._jobs: queue.SimpleQueue[_AppendJob] = queue.SimpleQueue()
        self._write_batch = write_batch
        self._thread = threading.Thread(target=self._serve, name="audit-sink", daemon=True)
        self._thread.start()

    def submit(self, job: _AppendJob) -> None:
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while True:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._write_batch(batch)
