"""The `Storage` protocol and the operation values `commit` takes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable


class _Absent:
    """Precondition: the key must not exist."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Final = _Absent()

# A precondition on a key: None = no condition, ABSENT = must not exist, int = must be at that revision.
Expect = int | _Absent | None


@dataclass(frozen=True)
class Entry:
    """A stored value and the revision (storage-wide change number) that wrote it."""

    value: bytes = field(repr=False)
    revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes = field(repr=False)
    expect: Expect = None


@dataclass(frozen=True)
class Delete:
    key: str
    expect: Expect = None


Operation = Put | Delete


@dataclass(frozen=True)
class Change:
    """One key written (or deleted) by the commit with this revision."""

    revision: int
    key: str
    deleted: bool


@dataclass(frozen=True)
class ChangeBatch:
    """Changes after some revision, up to `revision`; `truncated` if older ones were dropped."""

    changes: list[Change]
    revision: int
    truncated: bool = False


@runtime_checkable
class Storage(Protocol):
    """What every backend implements; `storage.testing.check_storage` is its conformance suite."""

    def get(self, key: str) -> Entry | None:
        """The entry under `key`, or None."""

    def put(self, key: str, value: bytes, *, expect: Expect = None) -> int:
        """Write one key (subject to `expect`); return the new revision."""

    def delete(self, key: str, *, expect: Expect = None) -> int:
        """Remove one key (subject to `expect`; deleting a missing key is not an error)."""

    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix` (taken literally), sorted."""

    def commit(
        self,
        operations: Sequence[Operation],
        *,
        silent: bool = False,
        durable: bool = True,
        lock_wait: float | None = None,
    ) -> int:
        """Apply all operations or none; ConflictError if any precondition fails.

        `silent`: the commit changes no logical content (records re-encrypted under another key), so
        it is left out of the change feed. `durable=False`: the backend may acknowledge before the
        commit reaches stable storage (it is still atomic); for data whose loss in a power cut is
        harmless, like the audit anchor, which then only lags. `lock_wait`: wait at most this many
        seconds for another writer (None: the backend's usual 30 s), then StoreBusyError with
        nothing written; for a commit that must not stall its caller, like a deferred anchor."""

    def changes_since(self, revision: int, *, limit: int = 10_000) -> ChangeBatch:
        """The change feed: keys changed by commits after `revision` (by any process), in order."""

    def close(self) -> None:
        """Release connections and files."""


@runtime_checkable
class MultiGet(Protocol):
    """Optional for a `Storage`: several keys in one read (one round trip to a database server).

    A secret read needs its metadata and its namespace's keyset at once; over a network that is
    one round trip instead of two. The result is what `get` of each key would return at one
    instant, with missing keys left out. Only for storage behind a network (PostgreSQL): for an
    embedded file two point reads are cheaper than one `IN (…)` query (measured: SQLite does not
    implement it)."""

    def get_many(self, keys: Sequence[str]) -> dict[str, Entry]:
        """The entries of those `keys` that exist."""


@dataclass(frozen=True)
class PointRead:
    """What `ReadAtOnce.read_at_once` found, all at one instant."""

    entries: dict[str, Entry]
    """The entries of the keys asked for that exist."""
    newest: tuple[str, Entry] | None
    """The newest entry under the prefix asked for (key, entry), if any."""
    head: int
    """The change head (`ChangeHead.change_head`) at that instant."""


@runtime_checkable
class ReadAtOnce(Protocol):
    """Optional for a `Storage`: a few keys, the newest entry under a prefix and the change head
    in one read (one statement: one round trip to a database server, and one instant).

    A secret read needs its metadata, its namespace's keyset and a value record whose key only the
    decrypted metadata names; the newest record under the secret's name is the current version's
    unless a version is staged beside it, so in one round trip the read has everything it
    needs, and the change head its read cache is tagged with, all of one instant. "Newest": the
    highest revision; among records of one commit (a rewrap), the longest key, then the greatest
    (so a numeric suffix without leading zeros orders as a number). Only for storage behind a
    network (PostgreSQL), as `MultiGet`."""

    def read_at_once(self, keys: Sequence[str], *, newest_under: str | None = None) -> PointRead:
        """The entries of those `keys` that exist, the newest entry under `newest_under` (none if
        None), and the change head, all at one instant."""


@runtime_checkable
class ChangeHead(Protocol):
    """Optional for a `Storage`: the revision of the newest change-feed entry, in one cheap read.

    It moves with every commit that is not `silent` (by any process) and with nothing else, so a
    reader can keep what it decoded for as long as it stays put: the encrypted store's read cache
    (store/encrypted.py). A silent commit changes no logical content by definition (re-encryption,
    the audit anchor), so it need not, and must not be relied on to, move it. The newest entry is
    never pruned from the feed, so the head never moves back to a value it had before, except when
    the database itself goes back in history (a failover to a standby that lacked the last commits,
    a restore of the database): a storage where that can happen under an open handle has an int
    `incarnation` that moves when it finds itself connected to another server, and readers tag
    what they keep with it too.

    A storage may also have a str `history` that names the line of history its revisions belong
    to, the same for every process reading the same database (PostgreSQL: the server's start time;
    SQLite: the file): a revision a client kept from another process (a Watch resume) means the same
    changes only under the same history. It may move without the history having diverged (a server
    restart): a reader then only re-reads more than it had to."""

    def change_head(self) -> int:
        """The newest change's revision; 0 if no commit was ever logged."""


@runtime_checkable
class Scrubbable(Protocol):
    """Optional for a `Storage`: erase the bytes of superseded and deleted values.

    A backend that keeps old copies of what it overwrote or deleted (a write-ahead log, free pages,
    dead tuples) implements it, so that destroying key material leaves no copy in its files.
    `storage.testing` checks it keeps every live value; the backend's own tests check the bytes.
    """

    def scrub(self) -> bool:
        """Erase superseded bytes now; False if it could not finish (e.g. a reader held them)."""


class StorageSnapshot(Protocol):
    """Reads of a `Storage` as it was at one instant (what `Snapshotting.snapshot` yields).

    A snapshot of a storage behind a network may also be a `MultiGet` (PostgreSQL's is): several
    keys in one round trip, at the snapshot's instant."""

    revision: int
    """The newest commit the snapshot includes."""

    def get(self, key: str) -> Entry | None:
        """The entry under `key` at the snapshot's instant, or None."""

    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix` (taken literally) at the snapshot's instant, sorted."""

    def scan(self, prefix: str) -> Iterator[tuple[str, Entry]]:
        """Every (key, entry) under `prefix` at the snapshot's instant, in key order."""


@runtime_checkable
class Snapshotting(Protocol):
    """Optional for a `Storage`: a consistent read of many keys while others keep writing.

    `with storage.snapshot() as snap:` every read through `snap` sees the storage exactly as it was
    at one instant — after some commit and before the next — whatever other handles or processes
    commit meanwhile, so a backup is never a mix of before and after a concurrent write. Commits
    through other handles go ahead during a snapshot (SQLite: one read transaction, `BEGIN` …
    `COMMIT`, in WAL mode; PostgreSQL would use `REPEATABLE READ`); the handle that holds the
    snapshot should not be used for anything else until it ends. Keep snapshots short: SQLite
    cannot checkpoint its write-ahead log past a snapshot that is still open.
    `storage.testing` checks that a snapshot does not see later commits.
    """

    def snapshot(self) -> AbstractContextManager[StorageSnapshot]:
        """Start a read-only snapshot; it ends when the context manager exits."""
