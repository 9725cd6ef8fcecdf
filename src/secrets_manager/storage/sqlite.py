"""SQLite storage: one file, mode 0600 in a 0700 directory, WAL, safe with several processes.

Each `commit` is one `BEGIN IMMEDIATE` transaction, so writers from several processes serialise
on SQLite's lock and preconditions are checked under it. `synchronous=FULL` makes a commit durable
before it is acknowledged; `secure_delete` zeroes freed space in the database file, and `scrub`
checkpoints and truncates the WAL, whose frames still hold superseded page images: after both,
erased key material has left every file of the store.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import sqlite3
import stat
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from secrets_manager.durable import fsync_directory
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    SecretsManagerError,
    StorageError,
    StoreBusyError,
    StoreClosedError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnsafeConfigurationError,
)
from secrets_manager.storage.base import (
    ABSENT,
    Change,
    ChangeBatch,
    Delete,
    Entry,
    Expect,
    Operation,
    Put,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000
CHANGE_LOG_RETAINED = 100_000  # revisions of change history kept for watchers
_APPLICATION_ID = 0x534D4731  # "SMG1": marks the file as ours for `file(1)` and for us

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counter (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT OR IGNORE INTO counter (id, revision) VALUES (1, 0);
"""
# The change feed's log. Schema 1 is older than it: stores made by the first builds of 2026-11-28
# (before the change feed, commit 4fd4c3a) have every other table and get this one when opened.
_CHANGES_TABLE = """
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER NOT NULL,
    key TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    PRIMARY KEY (revision, key)
) WITHOUT ROWID
"""
# A value is read as bytes whatever its SQLite type, with the type beside it: a value that is not a
# BLOB (the file was edited: `UPDATE entries SET value = CAST(value AS TEXT)`) is refused by
# `_entry` instead of being decoded as text, whose error message would quote the stored bytes.
_GET = "SELECT CAST(value AS BLOB), revision, typeof(value) FROM entries WHERE key = ?"


class SqliteStorage:
    """`Storage` over one SQLite file. Thread-safe: one connection behind a lock."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        self._where = self.path.absolute()  # the same file if the process changes directory
        if create:
            _create_private_file(self.path)
        elif not self.path.exists():
            raise StoreNotFoundError(str(self.path), str(self.path.absolute()))
        # Reentrant: a read by the thread that holds a snapshot or a transaction of this handle
        # runs inside it (the store adopts a rotated root key while decoding a snapshot).
        self._lock = threading.RLock()
        try:
            self._connect(create)
        except BaseException:
            if create:  # the file is ours (O_EXCL) and empty: an empty file would block the next init
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(OSError):
                        os.unlink(f"{self.path}{suffix}")
            raise

    def _connect(self, create: bool) -> None:
        if self.path.is_dir():
            raise InvalidInputError(f"store {self.path} is a directory; give the store file's path")
        _refuse_companions_of_others(self._where)
        # A store this process cannot write (its mode, its directory, a read-only file system) is
        # opened read-only: reads work, and every write is refused saying why (StoreReadOnlyError).
        self.read_only = None if create else read_only_reason(self._where)
        try:
            self._db = self._open_connection()
        except sqlite3.DatabaseError as exc:
            raise self._read_only_open_error(exc) or _sqlite_error(self.path, exc) from None
        self._file = _file_identity(self._where)
        try:
            self._configure(create)
        except BaseException as exc:
            self._db.close()  # a file we refuse must not keep a connection (and descriptors) open
            if isinstance(exc, sqlite3.DatabaseError) and "file is not a database" in str(exc):
                raise StorageError(
                    f"{self.path} is not a secrets-manager store (not an SQLite database): check --store "
                    "or SECRETS_MANAGER_STORE"
                ) from None
            if isinstance(exc, sqlite3.Error):
                raise self._read_only_open_error(exc) or _sqlite_error(self.path, exc) from None
            raise

    def _read_only_open_error(self, exc: sqlite3.Error) -> StorageError | None:
        """Why a store opened read-only cannot be read, where SQLite's error would say it cannot
        be opened for writing: a -wal file beside it (writes not yet copied into the store file)
        and no -shm file, which SQLite must create to read through the -wal and the read-only
        place cannot take. Reading the file alone would miss those writes."""
        code = getattr(exc, "sqlite_errorcode", None)
        if self.read_only is None or code is None or code & 0xFF not in _CANNOT_WRITE:
            return None
        if not os.access(self._where, os.R_OK, effective_ids=True):
            mode = stat.S_IMODE(self._where.stat().st_mode)
            return StorageError(
                f"cannot read the store {self.path}: its mode {mode:04o} does not let this user "
                f"({_user()}) read it, owner {_owner(self._where)}: run the command as a user who may, "
                "or have the owner give this user read access"
            )
        if not Path(f"{self._where}-wal").exists():
            return None
        return StorageError(
            f"cannot read the store {self.path}: it is read-only ({self.read_only}), and its -wal file "
            "holds writes not yet in the store file, which SQLite reads only with a -shm file beside "
            "it that cannot be made there: copy the store file with its -wal to a writable place and "
            "pass --store (or open it once where it can be written, which folds the -wal in)"
        )

    def _open_connection(self) -> sqlite3.Connection:
        """A connection to the file: read-write, or read-only when `read_only` says why.

        Read-only without a -wal beside the file, which then holds every committed write:
        `immutable`, which reads it without creating -wal and -shm files (SQLite would otherwise
        make them beside it with the file's own mode, 0400 say, which kept the store read-only
        once it was made writable again, and this user as their owner; a read-only directory
        cannot take them at all). Immutable means no locks and no change detection, so
        `_reopen_if_changed` opens it again when the file or its -wal changes (another writer).
        With a -wal (a writer has the store open elsewhere), `mode=ro` reads through it."""
        self._immutable_as: tuple[tuple[int, int, int] | None, tuple[int, int, int] | None] | None = None
        if self.read_only is None:
            return sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
            )
        stamp = self._stamp()
        target = f"file:{urllib.parse.quote(str(self._where))}?mode=ro"
        if stamp[1] is None:
            target += "&immutable=1"
            self._immutable_as = stamp
        db = sqlite3.connect(
            target, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000, uri=True
        )
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return db

    def _stamp(self) -> tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]:
        """What changes when another process writes the store: its file's and its -wal's
        inode, size and modification time (None for a -wal that is not there)."""
        return _file_stamp(self._where), _file_stamp(Path(f"{self._where}-wal"))

    def _reopen_if_changed(self) -> None:
        """Holding the lock, before a read: an immutable connection whose file (or -wal) another
        process changed since it was opened is opened again, so a long-running reader (serve,
        the SDK, `run --restart-on-change`) sees changes. (A read that overlaps such a change can
        still fail, without locks; the next one opens the file again.) Not inside this handle's
        own read transaction (a snapshot), and not onto another file renamed over the path (a
        restore): as a writable handle does, this one goes on with its file, and `history` and
        the change feed say it was replaced."""
        if self._immutable_as is None or self._db.in_transaction:
            return
        now = self._stamp()
        if now == self._immutable_as or now[0] is None or now[0][0] != (self._file or (0, 0))[1]:
            return
        self._db.close()
        self._db = self._open_connection()

    def _read_error(self, exc: sqlite3.Error) -> SecretsManagerError:
        """A read's SQLite error as ours. On an immutable connection (no locks) whose file
        another process changed during the read (a checkpoint rewrote pages under it), SQLite
        sees a malformed database: that is a read to try again, not a damaged store."""
        code = getattr(exc, "sqlite_errorcode", None)
        if (
            self._immutable_as is not None
            and code is not None
            and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
            and self._stamp() != self._immutable_as
        ):
            return StoreBusyError(
                f"store {self.path} changed while this process read it (it reads the store without "
                f"locks, as it cannot write it: {self.read_only}): try again"
            )
        return _sqlite_error(self.path, exc)

    def _configure(self, create: bool) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not self.read_only:
            db.execute("PRAGMA secure_delete = ON")
            db.execute("PRAGMA synchronous = FULL")
        if create:
            db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StorageError(f"cannot switch {self.path} to WAL mode")
            with self._transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute(_CHANGES_TABLE)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        # Opening must not write: a read-only command leaves the file's bytes as they were.
        if db.execute("PRAGMA application_id").fetchone()[0] != _APPLICATION_ID:
            raise StorageError(f"{self.path} is not a secrets-manager store")
        schema = db.execute("PRAGMA user_version").fetchone()[0]
        if schema > SCHEMA_VERSION:
            raise StorageError(f"{self.path} has storage schema {schema}; upgrade secrets-manager to open it")
        if schema != SCHEMA_VERSION:
            raise StorageError(f"{self.path} is not a secrets-manager store (schema {schema})")
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changes'").fetchone():
            self._add_change_log()

    def _add_change_log(self) -> None:
        """Upgrade a store made before the change feed (its `changes` table) in place: the one
        write an open may make, as Vault upgrades its storage on unseal. Nothing else differs, no
        entry is touched, and the builds that made such a store ignore the table. Every reader
        needs it (the change head is read before a cached read is trusted), so it is added here
        rather than by the first write; two processes opening the store at once both may try,
        and the second finds it made."""
        with self._transaction():
            self._db.execute(_CHANGES_TABLE)
        log.warning(
            "store %s was made by an early secrets-manager (before 2026-11-28's change feed): added the "
            "change log it lacked; its secrets are untouched and it needs nothing more",
            self.path,
        )

    @contextmanager
    def _transaction(
        self, *, durable: bool = True, lock_wait: float | None = None
    ) -> Iterator[sqlite3.Connection]:
        wait_ms = BUSY_TIMEOUT_MS if lock_wait is None else max(0, round(lock_wait * 1000))
        with self._lock:
            try:
                in_snapshot = self._db.in_transaction  # this thread's own (the lock is reentrant)
            except sqlite3.Error as exc:  # closed
                raise _sqlite_error(self.path, exc) from None
            refused = self.read_only_error()
            if refused is not None:
                raise refused
            if in_snapshot:
                # Refused before BEGIN IMMEDIATE, which would fail but still leave the snapshot's
                # read transaction holding the write lock: every other writer would wait it out.
                raise StorageError(f"store {self.path}: a write inside a read snapshot of the same handle")
            try:
                if not durable:  # WAL + NORMAL: atomic and crash-safe, not fsynced at commit
                    self._db.execute("PRAGMA synchronous = NORMAL")
                try:
                    self._begin_immediate(wait_ms)
                    try:
                        self._check_same_file()  # holding the write lock: before anything is written
                        yield self._db
                    except BaseException:
                        # SQLite may have rolled back already (SQLITE_FULL, some I/O errors): a
                        # second ROLLBACK would fail and hide the error that says what happened.
                        if self._db.in_transaction:
                            self._db.execute("ROLLBACK")
                        raise
                    self._db.execute("COMMIT")
                finally:
                    if not durable:
                        self._db.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from None

    def read_only_error(self) -> StoreReadOnlyError | None:
        """What a write to this store, opened read-only, is refused with (None: it is not)."""
        if self.read_only is None:
            return None
        return StoreReadOnlyError(
            f"store {self.path} is read-only ({self.read_only}): nothing was changed; to change it, "
            "make it writable, or copy it to a writable place and pass --store"
        )

    @property
    def history(self) -> str:
        """The line of history this store's revisions are on (ChangeHead): the file's device and
        inode, which every process on the same file reads alike and a restore (a new file renamed
        into place) moves."""
        device, inode = self._file or (0, 0)
        return f"sqlite:{device}:{inode}"

    def _check_same_file(self) -> None:
        """StorageError if the store's path no longer names the file this handle opened: removed,
        or another file renamed over it. SQLite goes on using the open file, so a write would be
        acknowledged and then lost with it, and reads (and health) would see a store nobody else does."""
        now = _file_identity(self._where)
        if now != self._file:
            what = "removed" if now is None else "replaced by another file"
            raise StorageError(
                f"store {self.path} was {what} while this process had it open; nothing was written: "
                "restart the process (serve, or the program using the SDK) so that it opens the store "
                "file there now"
            )

    def _begin_immediate(self, wait_ms: int) -> None:
        """Take the write lock, waiting at most `wait_ms` for another writer (StoreBusyError)."""
        if wait_ms != BUSY_TIMEOUT_MS:
            self._db.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            raise StoreBusyError(
                f"store {self.path}: another writer held the store's lock for "
                f"{wait_ms / 1000:.2g} s; try again"
            ) from None
        finally:
            if wait_ms != BUSY_TIMEOUT_MS:
                self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def get(self, key: str) -> Entry | None:
        try:
            with self._lock:
                self._reopen_if_changed()
                row = self._db.execute(_GET, (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self._read_error(exc) from None
        return None if row is None else _entry(self.path, key, *row)

    def change_head(self) -> int:
        """`ChangeHead`: the newest change's revision (the last key of the feed's primary key)."""
        self._check_same_file()
        try:
            with self._lock:
                self._reopen_if_changed()
                row = self._db.execute("SELECT max(revision) FROM changes").fetchone()
        except sqlite3.Error as exc:
            raise self._read_error(exc) from None
        return int(row[0] or 0)

    def put(self, key: str, value: bytes, *, expect: Expect = None) -> int:
        return self.commit([Put(key, value, expect)])

    def delete(self, key: str, *, expect: Expect = None) -> int:
        return self.commit([Delete(key, expect)])

    def list(self, prefix: str) -> list[str]:
        # Range scan instead of LIKE, so '%' and '_' in a prefix are literal.
        end = _prefix_end(prefix)
        try:
            with self._lock:
                self._reopen_if_changed()
                if end is not None:
                    rows = self._db.execute(
                        "SELECT key FROM entries WHERE key >= ? AND key < ? ORDER BY key",
                        (prefix, end),
                    ).fetchall()
                else:
                    rows = self._db.execute(
                        "SELECT key FROM entries WHERE key >= ? ORDER BY key", (prefix,)
                    ).fetchall()
        except sqlite3.Error as exc:
            raise self._read_error(exc) from None
        return [row[0] for row in rows if row[0].startswith(prefix)]

    def commit(
        self,
        operations: Sequence[Operation],
        *,
        silent: bool = False,
        durable: bool = True,
        lock_wait: float | None = None,
    ) -> int:
        with self._transaction(durable=durable, lock_wait=lock_wait) as db:
            for op in operations:
                _check_precondition(db, op.key, op.expect)
            revision = int(db.execute("SELECT revision FROM counter WHERE id = 1").fetchone()[0]) + 1
            db.execute("UPDATE counter SET revision = ? WHERE id = 1", (revision,))
            for op in operations:
                if not silent:
                    db.execute(
                        "INSERT OR REPLACE INTO changes (revision, key, deleted) VALUES (?, ?, ?)",
                        (revision, op.key, isinstance(op, Delete)),
                    )
                if isinstance(op, Put):
                    db.execute(
                        "INSERT INTO entries (key, value, revision) VALUES (?, ?, ?) ON CONFLICT (key) "
                        "DO UPDATE SET value = excluded.value, revision = excluded.revision",
                        (op.key, op.value, revision),
                    )
                elif isinstance(op, Delete):
                    db.execute("DELETE FROM entries WHERE key = ?", (op.key,))
            if revision % 1024 == 0:  # keep the change log bounded; watchers that fall behind resync
                # ... but never its newest entry: that is the change head readers' caches compare.
                db.execute(
                    "DELETE FROM changes WHERE revision <= ? "
                    "AND revision < (SELECT max(revision) FROM changes)",
                    (revision - CHANGE_LOG_RETAINED,),
                )
            return revision

    def changes_since(self, revision: int, *, limit: int = 10_000) -> ChangeBatch:
        """Keys changed after `revision`, oldest first, and whether older changes were dropped.
        Also the service's health probe: a store file removed or replaced under it is an error."""
        self._check_same_file()
        try:
            with self._lock:
                self._reopen_if_changed()
                current = int(self._db.execute("SELECT revision FROM counter WHERE id = 1").fetchone()[0])
                oldest = self._db.execute("SELECT min(revision) FROM changes").fetchone()[0]
                rows = self._db.execute(
                    "SELECT revision, key, deleted FROM changes WHERE revision > ? "
                    "ORDER BY revision, key LIMIT ?",
                    (revision, limit),
                ).fetchall()
        except sqlite3.Error as exc:
            raise self._read_error(exc) from None
        truncated = revision < current and oldest is not None and oldest > revision + 1
        changes = [Change(revision=r, key=k, deleted=bool(d)) for r, k, d in rows]
        if len(changes) < limit:
            return ChangeBatch(changes=changes, revision=current, truncated=truncated)
        # A full page: end it on a whole commit, so the next call resumes without a gap.
        last = changes[-1].revision
        complete = [c for c in changes if c.revision < last]
        if complete:
            return ChangeBatch(changes=complete, revision=last - 1, truncated=truncated)
        return ChangeBatch(changes=changes, revision=last, truncated=True)

    @contextmanager
    def snapshot(self) -> Iterator[SqliteSnapshot]:
        """Reads that all see one instant (`Snapshotting`): one read transaction, `BEGIN` … `COMMIT`.

        In WAL mode SQLite fixes a reader's view at its first read, so the counter read right after
        `BEGIN` pins the snapshot; writers in other connections and processes commit meanwhile,
        unseen. This handle's lock is held throughout, so its other methods wait until the
        snapshot ends in other threads; the snapshot's own thread reads inside it, seeing its
        instant. Other handles do not wait. So only read inside it, and work on what was read
        after it ends (the encrypted store's listing decrypts its rows after the snapshot)."""
        with self._lock:
            try:
                self._reopen_if_changed()
                self._db.execute("BEGIN")
                try:
                    revision = int(
                        self._db.execute("SELECT revision FROM counter WHERE id = 1").fetchone()[0]
                    )
                    yield SqliteSnapshot(self._db, self.path, revision, self._read_error)
                finally:
                    self._db.execute("COMMIT")  # read only: ends the transaction, writes nothing
            except sqlite3.Error as exc:
                raise self._read_error(exc) from None

    def scrub(self) -> bool:
        """Copy every WAL frame into the database file and truncate the WAL to zero bytes.

        With `secure_delete` on, the database file then holds no superseded value, and the WAL no
        old page image. Waits up to the busy timeout for other connections' writes and reads to
        finish; False if one still held an old snapshot, so the WAL could not be emptied."""
        try:
            with self._lock:
                busy, _frames, _copied = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            raise _sqlite_error(self.path, exc) from None
        return bool(busy == 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"SqliteStorage({str(self.path)!r})"


def read_only_reason(path: Path) -> str | None:
    """Why this process cannot write the store file `path` (None: it can): a read-only file
    system, the file's mode, or a directory that cannot take SQLite's -wal and -shm files.
    Asked of the kernel for this process's effective ids and capabilities (root writes a 0400
    file; a root without CAP_DAC_OVERRIDE does not)."""
    directory = path.parent
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"it is on a read-only file system ({directory})"
    except OSError:
        return None  # SQLite says what is wrong with it
    if path.exists() and not os.access(path, os.W_OK, effective_ids=True):
        mode = stat.S_IMODE(path.stat().st_mode)
        return f"its mode {mode:04o} does not let this user ({_user()}) write it, owner {_owner(path)}"
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        return (
            f"its directory {directory} is not writable by this user ({_user()}), and SQLite keeps the "
            "store's -wal and -shm files there"
        )
    return None


def _refuse_companions_of_others(path: Path) -> None:
    """UnsafeConfigurationError if a -wal or -shm file beside this user's store file `path` is a
    symbolic link or another user's (root's are fine): SQLite opens an existing one as it finds
    it, so a user who may write the store's directory (/tmp, a 0777 share) could make one before a
    command runs and get the store's pages written into their file (its header, to guess the
    master password offline, and every ciphertext), or through a link into a file of ours. A
    store file of another user (read through its group) has that user's companions: not checked."""
    me = os.geteuid()
    try:
        if os.lstat(path).st_uid not in (0, me):
            return
    except OSError:
        pass  # no store file yet (init), or none: SqliteStorage says so
    for suffix in ("-wal", "-shm"):
        companion = Path(f"{path}{suffix}")
        try:
            found = os.lstat(companion)
        except OSError:
            continue
        if stat.S_ISLNK(found.st_mode):
            problem = "is a symbolic link"
        elif found.st_uid not in (0, me):
            try:
                problem = f"belongs to {pwd.getpwuid(found.st_uid).pw_name}"
            except KeyError:
                problem = f"belongs to uid {found.st_uid}"
        else:
            continue
        raise UnsafeConfigurationError(
            f"the store's {suffix} file {companion} {problem}, not to you: SQLite would write the "
            f"store's pages into it; nothing was read or written. Remove it, and keep the store in a "
            f"directory of your own (whoever may write {path.parent} can make such a file)"
        )


def _user() -> str:
    uid = os.geteuid()
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(uid).pw_name
    return f"uid {uid}"


def _owner(path: Path) -> str:
    uid = path.stat().st_uid
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(uid).pw_name
    return f"uid {uid}"


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written: its inode, size and modification time."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None if there is none (or it cannot be seen)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class SqliteSnapshot:
    """The `StorageSnapshot` of `SqliteStorage.snapshot`: reads inside its read transaction."""

    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        revision: int,
        error: Callable[[sqlite3.Error], SecretsManagerError],
    ) -> None:
        self._db = db
        self._path = path
        self.revision = revision
        self._error = error  # its storage's, which knows whether the file changed under the read

    def get(self, key: str) -> Entry | None:
        try:
            row = self._db.execute(_GET, (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return None if row is None else _entry(self._path, key, *row)

    def list(self, prefix: str) -> list[str]:
        return [key for key, _ in self.scan(prefix)]

    def scan(self, prefix: str) -> Iterator[tuple[str, Entry]]:
        end = _prefix_end(prefix)
        query, args = (
            (
                "SELECT key, CAST(value AS BLOB), revision, typeof(value) FROM entries "
                "WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, end),
            )
            if end is not None
            else (
                "SELECT key, CAST(value AS BLOB), revision, typeof(value) FROM entries "
                "WHERE key >= ? ORDER BY key",
                (prefix,),
            )
        )
        try:
            for key, value, revision, kind in self._db.execute(query, args):
                if key.startswith(prefix):
                    yield key, _entry(self._path, key, value, revision, kind)
        except sqlite3.Error as exc:
            raise self._error(exc) from None


def _entry(path: Path, key: str, value: bytes, revision: int, kind: str) -> Entry:
    if kind != "blob":
        raise IntegrityError(
            f"store {path} is damaged: the record {key!r} is stored as {kind}, not as bytes (the file "
            "was changed outside secrets-manager); restore the store from a backup"
        )
    return Entry(value=bytes(value), revision=revision)


def _sqlite_error(path: Path, exc: sqlite3.Error) -> SecretsManagerError:
    """An error of SQLite as one of ours that says what to do. Never SQLite's text alone: some of
    its messages quote stored bytes (a TEXT value that is not UTF-8), so only known codes are
    named, by SQLite's fixed wording for them."""
    if isinstance(exc, sqlite3.ProgrammingError) and "closed database" in str(exc):
        return StoreClosedError(f"store {path} is closed")  # this handle: not the file's fault
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    directory = path.absolute().parent
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return IntegrityError(
            f"store {path} is damaged (SQLite: database disk image is malformed; a cut or overwritten "
            "file): restore it from a backup ('secrets-manager restore FILE --store PATH')"
        )
    if primary == sqlite3.SQLITE_FULL or (primary == sqlite3.SQLITE_IOERR and _disk_full(directory)):
        return StorageError(
            f"the disk holding the store {path} ({directory}) is full: free space there and try again"
        )
    if primary == sqlite3.SQLITE_IOERR:
        return StorageError(
            f"store {path}: the disk holding it ({directory}) failed to read or write (disk I/O error): "
            "check that disk (is it full, unmounted or failing?) and try again"
        )
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        if not os.access(directory, os.W_OK):
            where = (
                f"its directory {directory} is not writable (SQLite keeps the store's -wal and -shm "
                "files there)"
            )
        elif path.exists() and not os.access(path, os.W_OK):
            where = f"{path} is not writable"
        else:
            where = f"it or its directory {directory} is read-only"
        return StorageError(
            f"cannot open the store {path} for writing: {where}; on a read-only mount or directory, "
            "copy the store to a writable place and pass --store, or make it writable"
        )
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreBusyError(f"store {path}: another process holds the store's lock; try again")
    if code is not None:  # a known SQLite error: its message is SQLite's fixed text for the code
        return StorageError(f"store {path}: {exc}")
    return StorageError(f"store {path}: {type(exc).__name__} from SQLite; the store file may be damaged")


_CANNOT_WRITE = (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM)


def _disk_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail == 0 or stats.f_favail == 0


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix`, or None if there is none.

    SQLite's BINARY collation compares UTF-8 bytes, which is code-point order, so this is `prefix`
    with its last character incremented (dropping trailing U+10FFFF, skipping the surrogates).
    Appending U+10FFFF instead would miss keys that continue with U+10FFFF.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            following = 0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1
            return "".join(chars) + chr(following)
    return None


def _check_precondition(db: sqlite3.Connection, key: str, expect: Expect) -> None:
    if expect is None:
        return
    row = db.execute("SELECT revision FROM entries WHERE key = ?", (key,)).fetchone()
    if expect is ABSENT:
        if row is not None:
            raise ConflictError(f"storage key {key!r} already exists")
    elif row is None or row[0] != expect:
        raise ConflictError(f"storage key {key!r} changed concurrently")


def _create_private_file(path: Path) -> None:
    """Create the store file 0600 (and missing parent directories 0700); never overwrite."""
    create_private_directories(path)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise occupied_path_error(path) from None
    except OSError as exc:
        raise StorageError(f"cannot create store {path}: {exc.strerror}{_elsewhere(exc)}") from None
    os.close(fd)


def _elsewhere(error: OSError) -> str:
    """What to do when this user may not create the store there (another user's directory, a
    HOME of /nonexistent as for `nobody`, a read-only file system, a HOME under /proc where no
    directory can be made)."""
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        return ""
    return "; pass --store (or set SECRETS_MANAGER_STORE) with a path this user can write"


def occupied_path_error(path: Path) -> SecretsManagerError:
    """What is at `path`, where init would create a store, named with what to do. A file is an
    existing target (exit 7, whatever it holds: init never overwrites); a directory is a wrong
    path (exit 2, as `list` says of it). Reads at most the file's header."""
    elsewhere = "init never overwrites a file: remove it if it is not needed, or choose another path"
    if path.is_dir():
        return InvalidInputError(
            f"{path} is a directory, not a store file: choose a file's path (e.g. {path / 'secrets.db'})"
        )
    try:
        with path.open("rb") as file:
            header = file.read(100)
    except OSError as exc:
        return ConflictError(f"{path} exists and cannot be read ({exc.strerror}): {elsewhere}")
    if not header:
        return ConflictError(f"{path} is an empty file, not a store: {elsewhere}")
    kind = sqlite_file_kind(header)
    if kind is None:
        return ConflictError(f"{path} is not a secrets-manager store (not an SQLite database): {elsewhere}")
    if kind == "sqlite":
        return ConflictError(f"{path} is not a secrets-manager store (another SQLite database): {elsewhere}")
    return ConflictError(f"a store already exists at {path}; init never overwrites one")


def sqlite_file_kind(header: bytes) -> Literal["store", "sqlite"] | None:
    """What a file whose first bytes (at least 72 of them, if it has them) are `header` is: a
    secrets-manager store ('store', by the application id in its SQLite header), another SQLite
    database ('sqlite'), or neither (None)."""
    if header[:16] != b"SQLite format 3\x00" or len(header) < 72:
        return None
    return "store" if int.from_bytes(header[68:72], "big") == _APPLICATION_ID else "sqlite"


def create_private_directories(path: Path) -> None:
    """Create the missing parent directories of the store file `path`, 0700. A parent that is a
    file, or one we may not create, is one line naming it (not an OSError)."""
    missing: list[Path] = []
    try:
        for directory in (path.parent, *path.parent.parents):
            if directory.is_dir():
                break
            if directory.exists():
                raise InvalidInputError(f"cannot create store {path}: {directory} is not a directory")
            missing.append(directory)
        for directory in reversed(missing):  # mkdir(parents=True) would give ancestors the umask's mode
            directory.mkdir(mode=0o700, exist_ok=True)
        # Each new directory's name made durable in its parent (outermost first): SQLite fsyncs the
        # store's own directory, never its parents, so a power cut could otherwise take the store
        # away with every write it acknowledged.
        for directory in reversed(missing):
            fsync_directory(directory.parent)
    except OSError as exc:
        raise StorageError(
            f"cannot create store {path}: {exc.strerror or type(exc).__name__}{_elsewhere(exc)}"
        ) from None
