"""The audit log's sink worker: one daemon thread that writes the records callers wait for, in
batches, and runs the deferred fsyncs and anchor updates.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from secrets_manager.audit.anchor import AuditAnchor
from secrets_manager.audit.records import AuditEvent


@dataclass(eq=False)
class AppendJob:
    """Records one caller waits for; filled in by the sink worker."""

    events: list[AuditEvent]
    anchor: AuditAnchor | None
    durable: bool = True
    records: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None
    abandoned: bool = False
    done: threading.Event | None = None  # set by the worker when a caller waits for it
    deadline: float | None = None  # monotonic: when its caller stops waiting


class SinkWorker:
    """One daemon thread that does an audit log's I/O, in batches, and its deferred fsyncs.

    Callers wait with a deadline, so a stuck sink fails requests instead of hanging them; a daemon
    thread (unlike a ThreadPoolExecutor's) cannot keep a failing process from exiting. Jobs that
    arrive while a batch is being written form the next batch: group commit.
    """

    def __init__(self, write_batch: Callable[[list[AppendJob]], None], flush: Callable[[], None]) -> None:
        self._jobs: queue.SimpleQueue[AppendJob | None] = queue.SimpleQueue()
        self._write_batch = write_batch
        self._flush = flush
        self._flush_due: float | None = None
        self._due_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="audit-sink", daemon=True)
        self._thread.start()

    def submit(self, job: AppendJob) -> None:
        self._jobs.put(job)

    def flush_within(self, seconds: float) -> None:
        """Make sure a flush runs at most `seconds` from now."""
        with self._due_lock:
            if self._flush_due is not None:
                return
            self._flush_due = time.monotonic() + seconds
        self._jobs.put(None)  # wake the worker so it waits for the new deadline

    def retry_within(self, seconds: float) -> None:
        """Make sure a flush runs at most `seconds` from now, also if one is due later (a retry of
        the anchor; not on the request path, which only needs `flush_within`)."""
        due = time.monotonic() + seconds
        with self._due_lock:
            if self._flush_due is not None and self._flush_due <= due:
                return
            self._flush_due = due
        self._jobs.put(None)

    def _serve(self) -> None:
        while True:
            with self._due_lock:
                due = self._flush_due
            try:
                first = self._jobs.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:
                first = None
            batch = [] if first is None else [first]
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    batch.append(job)
            if batch:
                self._write_batch(batch)
            with self._due_lock:
                due = self._flush_due
                if due is not None and time.monotonic() >= due:
                    self._flush_due = None
                else:
                    due = None
            if due is not None:
                self._flush()
