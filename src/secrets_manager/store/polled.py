"""A change feed for a store that keeps no log of its changes (Vault KV v2, AWS Secrets Manager):
consecutive snapshots of its state, diffed into `SecretChange`s.

The store gives a cheap snapshot (`version_snapshot()`): for each secret, the versions the backend
lists, where its labels point, whether it is deleted, and a stamp of the rest of its metadata.
`PolledChangeFeed` reads one at most every `poll_seconds` (and at once after `poke()`: a change
made through this process; a burst of them at most every 0.5 s), compares it with the one before
(`diff_snapshots`) and numbers the differences with its own increasing revisions, kept in memory:

- the log holds the last `keep` changes; a resume from a revision before them gets RESYNC, as our
  storage's feed answers once it was trimmed;
- the revisions are this object's alone: `change_history()` is a random id per feed, so a resume
  with a revision of another process (a restarted service, another replica) starts with RESYNC
  (service/watch.py), and the client re-reads what it caches. They also start at the wall clock in
  microseconds, so a revision from an earlier process is below this one's log even if no history
  was given with it;
- the first read only takes the baseline: what changed before it is not known, and not sent;
- the interval runs from the end of a read, failed or not: a backend slower than the interval is
  not read back to back; one failing before the baseline is read (down, throttling, denying the
  listing) gives every caller of the interval that read's error, not a read each.

Events, as our encrypted store's feed sends them for the same change: a version the backend did not
list before → VERSION_ADDED (its number; 0 if the backend does not tell it without a request per
secret: AWS versions written by another tool); a secret gone → SECRET_DESTROYED; anything else that
changed (deleted or undeleted, a label moved, metadata, versions destroyed or trimmed) →
METADATA_CHANGED. One event per secret per read. Names and versions only ever pass through here,
never values.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from secrets_manager.store.changes import ChangeKind, SecretChange, SecretChanges

KEEP_CHANGES = 4096  # changes the feed keeps for resuming subscribers; before them: RESYNC
# A poke reads at once if the last read is at least this old, else when it is: a burst of writes
# through the service (an import) costs at most two snapshots a second, not one per write.
POKED_READ_GAP_SECONDS = 0.5
CURRENT = "current"


@dataclass(frozen=True)
class SecretState:
    """What a snapshot knows of one secret: no value, nothing secret."""

    versions: Mapping[
        str, int
    ]  # each version the backend lists, by the backend's id: our number (0: unknown)
    labels: Mapping[str, str] = field(default_factory=dict)  # label → the id of its version
    deleted: bool = False
    stamp: str = ""  # the rest of its metadata as compared between snapshots (updated time, tags…)

    def number_of_current(self) -> int:
        current = self.labels.get(CURRENT)
        if current is not None:
            return self.versions.get(current, 0)
        return max(self.versions.values(), default=0)


Snapshot = Mapping[str, SecretState]


def diff_snapshots(before: Snapshot, after: Snapshot, revision: int) -> SecretChanges:
    """The changes from `before` to `after`, numbered from `revision + 1` on, in name order."""
    changes: list[SecretChange] = []

    def add(kind: ChangeKind, name: str, version: int | None) -> None:
        changes.append(SecretChange(kind, name, version, revision + len(changes) + 1))

    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if new is None:
            add(ChangeKind.SECRET_DESTROYED, name, None)
        elif old is None:
            if new.deleted or not new.versions:  # appeared deleted (or empty): nothing to read
                add(ChangeKind.METADATA_CHANGED, name, None)
            else:
                add(ChangeKind.VERSION_ADDED, name, new.number_of_current())
        elif added := new.versions.keys() - old.versions.keys():
            add(ChangeKind.VERSION_ADDED, name, max(new.versions[key] for key in added))
        elif new != old:
            add(ChangeKind.METADATA_CHANGED, name, None)
    return changes


class PolledChangeFeed:
    """`changes_since` / `change_history` (service/watch.py's ChangeFeed) over `snapshot()`."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        *,
        poll_seconds: float,
        keep: int = KEEP_CHANGES,
        clock: Callable[[], float] = time.monotonic,
        start_revision: int | None = None,
    ) -> None:
        if poll_seconds <= 0 or keep < 1:
            raise ValueError("a polled change feed needs poll_seconds > 0 and keep >= 1")
        self._snapshot = snapshot
        self._poll_seconds = poll_seconds
        self._clock = clock
        self._history = secrets.token_hex(16)
        self._revision = time.time_ns() // 1000 if start_revision is None else start_revision
        self._floor = self._revision  # every change after this revision is in the log
        self._log: deque[SecretChange] = deque()
        self._keep = keep
        self._state: Snapshot | None = None  # the last snapshot read; None: none yet
        self._read_at: float | None = None  # when the last read (or failed read) ended; None: never
        # Why the last read failed while there is no baseline yet (nothing to answer with instead):
        # raised again to every caller until the interval has passed, the backend not asked again.
        self._failure: BaseException | None = None
        self._stale = False  # poked: read at the next call, whatever the interval
        self._lock = threading.Lock()
        self.reads = 0  # snapshots read (for tests and benchmarks)

    @property
    def poll_seconds(self) -> float:
        return self._poll_seconds

    def poke(self) -> None:
        """A change was made through this process: the next `changes_since` reads the backend."""
        self._stale = True

    def change_history(self) -> str | None:
        return self._history

    def changes_since(self, revision: int | None) -> tuple[SecretChanges, int]:
        """The changes after `revision` (None: none, just the head), reading the backend first if
        the interval has passed or a change was poked; RESYNC first if the log no longer goes
        back to `revision`."""
        with self._lock:
            self._read_if_due()
            head = self._revision
            if revision is None or revision >= head:
                return [], head
            if revision < self._floor:
                return [SecretChange(ChangeKind.RESYNC, "", None, head)], head
            return [change for change in self._log if change.revision > revision], head

    def _read_if_due(self) -> None:
        if self._read_at is not None:
            since = self._clock() - self._read_at
            poked = self._stale and since >= min(POKED_READ_GAP_SECONDS, self._poll_seconds)
            if not poked and since < self._poll_seconds:
                if self._state is None and self._failure is not None:
                    # No baseline, so no head to answer with: every subscriber that comes meanwhile
                    # (each SDK client reconnecting) gets the last read's error, not a read of its own.
                    raise self._failure.with_traceback(None)
                return
        self._stale = False  # a poke from here on reads again: this read may have missed its change
        self.reads += 1
        try:
            state = dict(self._snapshot())
        except Exception as exc:
            self._failure = exc
            raise
        finally:
            # The interval runs from the end of a read, failed or not: a backend slower to answer
            # than the interval is not read back to back, and a failing one is asked at most once
            # an interval.
            self._read_at = self._clock()
        self._failure = None
        if self._state is not None:
            changes = diff_snapshots(self._state, state, self._revision)
            self._log.extend(changes)
            self._revision += len(changes)
            while len(self._log) > self._keep:
                self._floor = self._log.popleft().revision
        self._state = state


__all__ = [
    "KEEP_CHANGES",
    "POKED_READ_GAP_SECONDS",
    "PolledChangeFeed",
    "SecretState",
    "Snapshot",
    "diff_snapshots",
]
