"""SqliteStorage: the Storage conformance suite, plus what is particular to one private SQLite file."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StorageError,
    StoreBusyError,
)
from secrets_manager.storage import Entry, Put, Storage
from secrets_manager.storage import sqlite as sqlite_module
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.storage.testing import STORAGE_CHECKS, check_storage
from secrets_manager.store import EncryptedStore


@pytest.fixture
def make_storage(tmp_store_path: Path) -> Callable[[], Storage]:
    """New handles to one freshly created, empty SQLite file."""
    SqliteStorage(tmp_store_path, create=True).close()
    return lambda: SqliteStorage(tmp_store_path)


@pytest.fixture
def storage(tmp_store_path: Path) -> Iterator[SqliteStorage]:
    created = SqliteStorage(tmp_store_path, create=True)
    yield created
    created.close()


def file_bytes(path: Path) -> dict[str, bytes]:
    """The store file and its -wal/-shm companions, by name."""
    return {p.name: p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def open_descriptors_to(path: Path) -> int:
    fd_dir = Path("/proc/self/fd")
    count = 0
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) == str(path):
                count += 1
        except OSError:
            continue
    return count


# ---- conformance --------------------------------------------------------------------------------


def test_sqlite_storage_passes_the_whole_conformance_suite_on_one_file(
    make_storage: Callable[[], Storage],
) -> None:
    check_storage(make_storage)


@pytest.mark.parametrize("behaviour", list(STORAGE_CHECKS))
def test_sqlite_storage_conforms(behaviour: str, make_storage: Callable[[], Storage]) -> None:
    STORAGE_CHECKS[behaviour](make_storage)


def test_conformance_suite_refuses_a_place_that_is_not_empty(make_storage: Callable[[], Storage]) -> None:
    first = make_storage()
    first.put("left/over", b"x")
    first.close()
    with pytest.raises(AssertionError, match="must start empty"):
        check_storage(make_storage)


# ---- files and permissions ----------------------------------------------------------------------


def test_a_commit_with_a_lock_wait_gives_up_when_another_process_holds_the_write_lock(
    storage: SqliteStorage, tmp_store_path: Path
) -> None:
    before = storage.put("k", b"before")
    other = sqlite3.connect(tmp_store_path, isolation_level=None)  # as another process's writer
    try:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(
            StoreBusyError, match=r"another writer held the store's lock for 0\.2 s; try again"
        ):
            storage.commit([Put("k", b"after")], lock_wait=0.2)
        assert time.monotonic() - started < 2
        assert storage.get("k") == Entry(b"before", before)
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert storage._db.execute("PRAGMA busy_timeout").fetchone() == (sqlite_module.BUSY_TIMEOUT_MS,)
    later = storage.commit([Put("k", b"after")], lock_wait=0.2)
    assert storage.get("k") == Entry(b"after", later)


def test_store_file_is_created_0600_in_a_0700_directory(storage: SqliteStorage, tmp_store_path: Path) -> None:
    assert mode(tmp_store_path) == 0o600
    assert mode(tmp_store_path.parent) == 0o700


def test_missing_ancestor_directories_are_created_0700(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "secrets.db"
    previous = os.umask(0)
    try:
        SqliteStorage(path, create=True).close()
    finally:
        os.umask(previous)
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", path.parent)] == [0o700] * 3


def test_wal_and_shm_files_are_0600_even_with_a_permissive_umask(tmp_store_path: Path) -> None:
    previous = os.umask(0)
    try:
        created = SqliteStorage(tmp_store_path, create=True)
        try:
            created.put("k", b"v")
            companions = [tmp_store_path.with_name(tmp_store_path.name + s) for s in ("-wal", "-shm")]
            assert all(p.exists() for p in companions)
            assert {p.name: mode(p) for p in companions} == {p.name: 0o600 for p in companions}
            assert mode(tmp_store_path) == 0o600
            assert mode(tmp_store_path.parent) == 0o700
        finally:
            created.close()
    finally:
        os.umask(previous)


def test_store_uses_write_ahead_logging(storage: SqliteStorage, tmp_store_path: Path) -> None:
    storage.put("k", b"v")
    db = sqlite3.connect(tmp_store_path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_init_never_overwrites_an_existing_store(storage: SqliteStorage, tmp_store_path: Path) -> None:
    storage.put("precious", b"keep me")
    storage.close()
    before = file_bytes(tmp_store_path)
    with pytest.raises(ConflictError, match="already exists"):
        SqliteStorage(tmp_store_path, create=True)
    assert file_bytes(tmp_store_path) == before
    reopened = SqliteStorage(tmp_store_path)
    try:
        entry = reopened.get("precious")
        assert entry is not None and entry.value == b"keep me"
    finally:
        reopened.close()


def test_init_never_overwrites_an_unrelated_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_bytes(b"my notes")
    with pytest.raises(ConflictError, match=r"notes\.txt is not a secrets-manager store \(not an SQLite"):
        SqliteStorage(target, create=True)
    assert target.read_bytes() == b"my notes"


def test_init_on_an_empty_file_says_it_is_an_empty_file_and_leaves_it(tmp_path: Path) -> None:
    target = tmp_path / "s.db"
    target.touch()
    with pytest.raises(ConflictError, match=r"s\.db is an empty file, not a store: .*remove it") as caught:
        SqliteStorage(target, create=True)
    assert "already exists" not in str(caught.value)
    assert target.read_bytes() == b""
    assert sorted(tmp_path.iterdir()) == [target]


def test_init_on_another_sqlite_database_says_so_and_leaves_it(tmp_path: Path) -> None:
    target = tmp_path / "app.db"
    db = sqlite3.connect(target)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    before = target.read_bytes()
    with pytest.raises(ConflictError, match=r"app\.db is not a secrets-manager store \(another SQLite"):
        SqliteStorage(target, create=True)
    assert target.read_bytes() == before


def test_init_on_a_directory_says_it_is_a_directory(tmp_path: Path) -> None:
    target = tmp_path / "dir.db"
    target.mkdir()
    with pytest.raises(InvalidInputError, match=r"dir\.db is a directory, not a store file"):
        SqliteStorage(target, create=True)
    assert list(target.iterdir()) == []


def test_opening_a_missing_file_is_not_found_and_creates_nothing(tmp_store_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no store at"):
        SqliteStorage(tmp_store_path)
    assert not tmp_store_path.exists()
    assert not tmp_store_path.parent.exists()


def test_opening_an_existing_store_writes_nothing(storage: SqliteStorage, tmp_store_path: Path) -> None:
    storage.put("k", b"v")
    storage.close()
    before = file_bytes(tmp_store_path)
    assert set(before) == {tmp_store_path.name}  # the last close checkpointed and removed the WAL
    reader = SqliteStorage(tmp_store_path)
    assert reader.get("k") is not None
    assert reader.list("") == ["k"]
    assert tmp_store_path.with_name(tmp_store_path.name + "-wal").read_bytes() == b""
    reader.close()
    assert file_bytes(tmp_store_path) == before


# ---- files that are not stores ------------------------------------------------------------------


def test_opening_a_foreign_sqlite_database_is_a_clear_error(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE entries (key TEXT, value BLOB, revision INTEGER)")
    db.commit()
    db.close()
    before = foreign.read_bytes()
    with pytest.raises(StorageError, match="is not a secrets-manager store"):
        SqliteStorage(foreign)
    assert foreign.read_bytes() == before


def test_opening_a_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, just text\n" * 200)
    before = garbage.read_bytes()
    with pytest.raises(StorageError, match=r"garbage\.db is not a secrets-manager store"):
        SqliteStorage(garbage)
    assert garbage.read_bytes() == before


def test_opening_an_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StorageError, match="is not a secrets-manager store"):
        SqliteStorage(empty)
    assert empty.read_bytes() == b""


def test_opening_a_store_from_a_newer_release_is_refused_untouched(
    storage: SqliteStorage, tmp_store_path: Path
) -> None:
    storage.close()
    db = sqlite3.connect(tmp_store_path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    before = file_bytes(tmp_store_path)
    with pytest.raises(StorageError, match="upgrade secrets-manager"):
        SqliteStorage(tmp_store_path)
    assert file_bytes(tmp_store_path) == before


def drop_the_change_log(path: Path) -> None:
    """Make a store file what the first builds wrote (commits 781de22 to 4fd4c3a^, 2026-11-28, e.g.
    5daace8's `init`): the same schema 1, tables `entries` and `counter` as now, no `changes` table
    (checked against a store 5daace8 made: sqlite_master held exactly those two tables)."""
    db = sqlite3.connect(path)
    db.execute("DROP TABLE changes")
    db.commit()
    db.close()


def test_a_store_from_before_the_change_feed_is_upgraded_when_opened_and_reads_and_writes(
    encrypted_store: EncryptedStore,
    open_store: Callable[..., EncryptedStore],
    tmp_store_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, every command on such a store failed 'no such table: changes' (exit 1)."""
    encrypted_store.put("svc/A", b"one")
    encrypted_store.put("svc/A", b"two")
    encrypted_store.close()
    drop_the_change_log(tmp_store_path)
    with caplog.at_level(logging.WARNING, logger="secrets_manager.storage.sqlite"):
        store = open_store()
    assert [r.getMessage() for r in caplog.records if "early secrets-manager" in r.getMessage()]
    assert store.get("svc/A").value.reveal() == b"two"
    assert store.get("svc/A", version=1).value.reveal() == b"one"
    store.put("svc/A", b"three")
    assert open_store().get("svc/A").value.reveal() == b"three"  # another handle sees the write
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="secrets_manager.storage.sqlite"):
        open_store()
    assert not caplog.records  # upgraded once


def test_the_upgrade_feeds_changes_and_touches_no_entry(storage: SqliteStorage, tmp_store_path: Path) -> None:
    storage.put("k", b"v")
    storage.close()
    drop_the_change_log(tmp_store_path)
    reader = sqlite3.connect(tmp_store_path)
    entries = reader.execute("SELECT key, value, revision FROM entries").fetchall()
    reader.close()
    upgraded = SqliteStorage(tmp_store_path)
    assert upgraded.change_head() == 0
    revision = upgraded.put("k2", b"v2")
    assert upgraded.change_head() == revision
    assert [c.key for c in upgraded.changes_since(0).changes] == ["k2"]
    upgraded.close()
    reader = sqlite3.connect(tmp_store_path)
    assert reader.execute("SELECT key, value, revision FROM entries WHERE key = 'k'").fetchall() == entries
    reader.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count descriptors")
def test_a_refused_file_keeps_no_descriptor_open(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database\n" * 500)
    for _ in range(3):
        with pytest.raises(StorageError):
            SqliteStorage(garbage)
    assert open_descriptors_to(garbage) == 0


def test_scrub_empties_the_wal_and_leaves_no_overwritten_or_deleted_value_in_any_file(
    storage: SqliteStorage, tmp_store_path: Path
) -> None:
    overwritten, deleted = os.urandom(48), os.urandom(48)
    storage.put("k/overwritten", overwritten)
    storage.put("k/deleted", deleted)
    storage.put("k/overwritten", b"the value that stays")
    storage.delete("k/deleted")
    before = b"".join(file_bytes(tmp_store_path).values())
    assert overwritten in before and deleted in before  # the WAL still holds the old page images
    other = SqliteStorage(tmp_store_path)  # an idle second connection does not stop it
    try:
        assert storage.scrub() is True
    finally:
        other.close()
    assert tmp_store_path.with_name(tmp_store_path.name + "-wal").stat().st_size == 0
    after = b"".join(file_bytes(tmp_store_path).values())
    assert overwritten not in after and deleted not in after
    assert b"the value that stays" in after


# ---- the change log's prune ---------------------------------------------------------------------


def logged_revisions(path: Path) -> list[int]:
    """Every revision the change log still holds, from the file (not through SqliteStorage)."""
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT DISTINCT revision FROM changes ORDER BY revision")]
    finally:
        db.close()


def test_the_prune_never_drops_the_newest_change_so_the_change_head_stays(
    storage: SqliteStorage, tmp_store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "CHANGE_LOG_RETAINED", 10)
    for i in range(4):
        storage.put("k", b"%d" % i)  # revisions 1..4, pruned below
    newest = storage.commit([Put("k", b"4"), Put("other", b"x")])  # revision 5, two rows
    assert newest == 5 and storage.change_head() == newest
    last = newest
    while last < 1030:  # silent, non-durable commits (like audit anchor updates) past a prune at 1024
        last = storage.commit([Put("anchor", b"%d" % last)], silent=True, durable=False)
    assert logged_revisions(tmp_store_path) == [newest]  # the prune ran and kept only the newest
    other = SqliteStorage(tmp_store_path)
    try:
        assert storage.change_head() == other.change_head() == newest
        everything = other.changes_since(0)
        assert everything.truncated  # revisions 1..4 were dropped
        assert [(c.revision, c.key) for c in everything.changes] == [(5, "k"), (5, "other")]
        from_before = other.changes_since(4)
        assert not from_before.truncated and [c.revision for c in from_before.changes] == [5, 5]
        caught_up = other.changes_since(newest)
        assert caught_up.changes == [] and not caught_up.truncated and caught_up.revision == last

        later = storage.put("k", b"after the prune")
        assert storage.change_head() == other.change_head() == later
        batch = other.changes_since(newest)
        assert [(c.revision, c.key) for c in batch.changes] == [(later, "k")] and not batch.truncated
    finally:
        other.close()


def test_the_prune_still_drops_changes_older_than_the_retained_window(
    storage: SqliteStorage, tmp_store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "CHANGE_LOG_RETAINED", 10)
    last = 0
    while last < 1024:  # every commit logged; the one at 1024 prunes
        last = storage.put("k", b"%d" % last)
    assert logged_revisions(tmp_store_path) == list(range(1024 - 9, 1025))
    assert storage.change_head() == 1024
    assert storage.changes_since(1013).truncated and not storage.changes_since(1014).truncated


def test_a_parent_that_is_a_file_is_named_and_nothing_is_created(tmp_path: Path) -> None:
    """mkdir's NotADirectoryError reached the user as an internal error."""
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InvalidInputError, match=r"file\.txt is not a directory"):
        SqliteStorage(tmp_path / "file.txt" / "sub" / "store.db", create=True)
    assert (tmp_path / "file.txt").read_text() == "x"


def test_a_value_stored_as_text_is_an_integrity_error_that_quotes_no_stored_bytes(
    storage: SqliteStorage, tmp_store_path: Path
) -> None:
    """A record whose SQLite type was changed to TEXT (`CAST(value AS TEXT)`) is damage: exit 6,
    and the message does not carry SQLite's "Could not decode to UTF-8 ... with text '<bytes>'"."""
    value = b"\xff\xfeSTOREDBYTES\x80"
    storage.put("ns/a", value)
    storage.put("ns/b", b"plain-text-bytes")
    db = sqlite3.connect(tmp_store_path)
    db.execute("UPDATE entries SET value = CAST(value AS TEXT)")
    db.commit()
    db.close()
    for read in (
        lambda: storage.get("ns/a"),
        lambda: storage.get("ns/b"),  # valid UTF-8: it would be a str, not bytes
        lambda: list(storage.snapshot().__enter__().scan("ns/")),
    ):
        with pytest.raises(IntegrityError, match="restore the store from a backup") as caught:
            read()
        assert "STOREDBYTES" not in str(caught.value) and "plain-text" not in str(caught.value)


def test_a_truncated_store_file_is_an_integrity_error_with_advice(tmp_store_path: Path) -> None:
    storage = SqliteStorage(tmp_store_path, create=True)
    for number in range(200):
        storage.put(f"ns/key{number}", os.urandom(500))
    assert storage.scrub()
    storage.close()
    os.truncate(tmp_store_path, tmp_store_path.stat().st_size // 2)
    with pytest.raises(IntegrityError, match=r"is damaged .*restore it from a backup"):
        SqliteStorage(tmp_store_path).list("ns/")


def test_a_full_disk_says_the_disk_holding_the_store_is_full(storage: SqliteStorage) -> None:
    """SQLite's "database or disk is full" (SQLITE_FULL, here from a page limit) says what is full."""
    storage._db.execute("PRAGMA max_page_count = 8")
    with pytest.raises(StorageError, match=r"the disk holding the store .* is full: free space"):
        for number in range(100):
            storage.put(f"ns/key{number}", os.urandom(2000))


def test_a_store_on_a_read_only_mount_is_read_and_a_write_says_why_it_is_refused(tmp_path: Path) -> None:
    """A store on a read-only mount is opened read-only (SQLite could not create its -wal and
    -shm files there, and every read failed): reads work, and a write says the store is on a
    read-only file system. The mount is a read-only bind mount in a private mount namespace
    (`unshare -m`), which refuses writes even to root."""
    directory = tmp_path / "store"
    path = directory / "s.db"
    storage = SqliteStorage(path, create=True)
    storage.put("ns/a", b"x")
    storage.close()  # the last connection: SQLite removes the -wal and -shm files
    script = (
        "import sys\n"
        "from secrets_manager.errors import StorageError\n"
        "from secrets_manager.storage.sqlite import SqliteStorage\n"
        "storage = SqliteStorage(sys.argv[1])\n"
        "print(storage.list('ns/'), storage.get('ns/a').value)\n"
        "try:\n"
        "    storage.put('ns/b', b'y')\n"
        "except StorageError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    mount = f"mount --bind '{directory}' '{directory}' && mount -o remount,ro,bind '{directory}'"
    if (
        os.geteuid() != 0
        or shutil.which("unshare") is None
        or subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True).returncode
    ):
        if os.environ.get("CI"):
            pytest.fail("CI must run this test as root with unshare and mount (util-linux)")
        pytest.skip("needs root, unshare and mount (util-linux) for a read-only bind mount")
    result = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'{mount} && exec "$0" -c "$1" "$2"',
            sys.executable,
            script,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stderr == ""
    read, refused = result.stdout.splitlines()
    assert read == "['ns/a'] b'x'"
    assert refused == (
        f"StoreReadOnlyError store {path} is read-only (it is on a read-only file system ({directory})): "
        "nothing was changed; to change it, make it writable, or copy it to a writable place and pass --store"
    )


@pytest.mark.parametrize("how", ["removed", "replaced by another file"])
def test_a_store_file_removed_or_replaced_under_an_open_handle_refuses_writes(
    tmp_store_path: Path, how: str
) -> None:
    """SQLite goes on with the file it opened: a write after `rm store.db` (or `mv other.db
    store.db`) was acknowledged and lost with the unlinked file, and the health probe saw nothing."""
    storage = SqliteStorage(tmp_store_path, create=True)
    try:
        storage.put("k", b"before")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp_store_path}{suffix}").unlink(missing_ok=True)
        if how != "removed":
            SqliteStorage(tmp_store_path, create=True).close()  # another store file at the path
        for attempt in (
            lambda: storage.put("k", b"after"),
            storage.change_head,
            lambda: storage.changes_since(0),
        ):
            with pytest.raises(StorageError, match=f"store {tmp_store_path} was {how} while this process"):
                attempt()
    finally:
        storage.close()
    if how != "removed":
        reopened = SqliteStorage(tmp_store_path)
        try:
            assert reopened.get("k") is None  # nothing went to the file that is there now
        finally:
            reopened.close()


# Root without the capabilities that let it read and write past file modes (root ignores them).
BOUND = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def _require_setpriv() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run this as root with setpriv (util-linux)")
        pytest.skip("needs root and setpriv (util-linux) to run a reader bound by file modes")


READER = """
import sys
from secrets_manager.storage.sqlite import SqliteStorage
storage = SqliteStorage(sys.argv[1])
print(storage.read_only is not None, flush=True)
for line in sys.stdin:
    entry = storage.get("ns/k")
    print(storage.change_head(), entry.value.decode() if entry else None, flush=True)
"""


def test_a_long_running_reader_of_a_read_only_store_sees_another_writers_changes(tmp_path: Path) -> None:
    """A store read without SQLite's locks (immutable: no -wal to read through) was read as it
    was when opened, for good: a program using the SDK, or serve, on a store its owner updates
    never saw the update. It is opened again when the file or its -wal changes."""
    _require_setpriv()
    path = tmp_path / "s.db"
    writer = SqliteStorage(path, create=True)
    writer.put("ns/k", b"v1")
    writer.close()  # its -wal checkpointed and removed: a reader opens the file immutable
    path.chmod(0o400)
    reader = subprocess.Popen(
        [*BOUND, sys.executable, "-c", READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert reader.stdin is not None and reader.stdout is not None
    try:
        assert reader.stdout.readline() == "True\n"  # opened read-only
        reader.stdin.write("\n")
        reader.stdin.flush()
        assert reader.stdout.readline() == "1 v1\n"
        for value, head in ((b"v2", 2), (b"v3", 3)):
            writer = SqliteStorage(path)  # root: it writes the 0400 file
            writer.put("ns/k", value)
            reader.stdin.write("\n")
            reader.stdin.flush()
            assert reader.stdout.readline() == f"{head} {value.decode()}\n"  # through its -wal
            writer.close()
        reader.stdin.write("\n")
        reader.stdin.flush()
        assert reader.stdout.readline() == "3 v3\n"
    finally:
        reader.kill()
        reader.wait()


def test_a_store_file_this_user_may_not_write_is_read_and_left_as_it_was(tmp_path: Path) -> None:
    """A 0400 store: every read failed once a write was tried ("attempt to write a readonly
    database"), and SQLite left -wal and -shm files of mode 0400 beside it, which kept the store
    read-only after `chmod 600`. It is read without them, and a write says why it is refused."""
    _require_setpriv()
    path = tmp_path / "s.db"
    writer = SqliteStorage(path, create=True)
    writer.put("ns/a", b"x")
    writer.close()
    path.chmod(0o400)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    script = (
        "import sys\n"
        "from secrets_manager.errors import StoreReadOnlyError\n"
        "from secrets_manager.storage.sqlite import SqliteStorage\n"
        "storage = SqliteStorage(sys.argv[1])\n"
        "print(storage.list('ns/'), storage.get('ns/a').value, storage.change_head())\n"
        "try:\n"
        "    storage.put('ns/b', b'y')\n"
        "except StoreReadOnlyError as exc:\n"
        "    print(exc)\n"
        "print(storage.get('ns/b'))\n"
    )
    result = subprocess.run(
        [*BOUND, sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "['ns/a'] b'x' 1",
        f"store {path} is read-only (its mode 0400 does not let this user (root) write it, owner root): "
        "nothing was changed; to change it, make it writable, or copy it to a writable place and "
        "pass --store",
        "None",
    ]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no -wal, no -shm
    path.chmod(0o600)
    again = subprocess.run(
        [*BOUND, sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert again.stderr == ""
    assert again.stdout.splitlines()[1:] == ["Entry(revision=2)"]  # writable again: the write was made


def test_a_read_only_store_with_a_wal_and_no_shm_says_why_it_cannot_be_read(tmp_path: Path) -> None:
    """A store copied with its -wal (writes not yet in the file) but not its -shm, into a place
    that cannot take one: SQLite cannot read it, and the error said the store could not be opened
    "for writing", as if a write had been asked. It says why a read cannot be made, and what to do."""
    _require_setpriv()
    live = tmp_path / "live" / "s.db"
    writer = SqliteStorage(live, create=True)
    try:
        writer.put("ns/a", b"x")  # in the -wal while this connection keeps it open
        copy = tmp_path / "copy"
        copy.mkdir()
        shutil.copy(live, copy / "s.db")
        shutil.copy(f"{live}-wal", copy / "s.db-wal")
    finally:
        writer.close()
    copy.chmod(0o500)
    script = (
        "import sys\n"
        "from secrets_manager.errors import StorageError\n"
        "from secrets_manager.storage.sqlite import SqliteStorage\n"
        "try:\n"
        "    SqliteStorage(sys.argv[1]).get('ns/a')\n"
        "except StorageError as exc:\n"
        "    print(exc)\n"
    )
    try:
        result = subprocess.run(
            [*BOUND, sys.executable, "-c", script, str(copy / "s.db")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        copy.chmod(0o700)
    assert result.stderr == ""
    assert result.stdout.startswith(
        f"cannot read the store {copy / 's.db'}: it is read-only (its directory {copy} is not writable"
    ), result.stdout
    assert "its -wal file holds writes not yet in the store file" in result.stdout
    assert sorted(p.name for p in copy.iterdir()) == ["s.db", "s.db-wal"]


def test_a_read_only_store_changed_under_a_lockless_read_says_to_try_again(
    tmp_store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store read without locks (immutable: opened read-only with no -wal) whose file another
    process rewrites during the read (the owner's checkpoint) reads as malformed pages: that was
    reported as a damaged store to restore from a backup (exit 6). It is a read to try again."""
    writer = SqliteStorage(tmp_store_path, create=True)
    writer.commit([Put(f"ns/k{i:04d}", os.urandom(500)) for i in range(200)])
    writer.close()
    monkeypatch.setattr(sqlite_module, "read_only_reason", lambda path: "its mode 0400 (a test)")
    reader = SqliteStorage(tmp_store_path)  # as a user who cannot write it: immutable
    try:
        refused = pytest.raises(StoreBusyError, match=r"changed while this process read it .*: try again")
        with refused, reader.snapshot() as snap:
            with tmp_store_path.open("r+b") as file:  # pages rewritten under the read
                file.seek(8192)
                file.write(b"\xff" * 40_000)
            list(snap.scan(""))
    finally:
        reader.close()


def test_a_store_file_this_user_may_not_read_says_so(tmp_path: Path) -> None:
    """A store file of mode 0000 (or another user's 0600) is opened read-only, as it cannot be
    written, and then cannot be read either: the error spoke of a -wal file it does not have."""
    _require_setpriv()
    path = tmp_path / "s.db"
    SqliteStorage(path, create=True).close()
    path.chmod(0o000)
    script = (
        "import sys\n"
        "from secrets_manager.errors import StorageError\n"
        "from secrets_manager.storage.sqlite import SqliteStorage\n"
        "try:\n"
        "    SqliteStorage(sys.argv[1])\n"
        "except StorageError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [*BOUND, sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.stderr == ""
    assert result.stdout == (
        f"cannot read the store {path}: its mode 0000 does not let this user (root) read it, owner root: "
        "run the command as a user who may, or have the owner give this user read access\n"
    )
