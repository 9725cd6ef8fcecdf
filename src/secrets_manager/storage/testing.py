"""The conformance suite every `Storage` backend passes: `check_storage(make_storage)`.

One function exercises a backend end to end, like Vault's physical-backend tests, so SQLite,
PostgreSQL and whatever comes next are held to the same contract:

    from secrets_manager.storage.testing import check_storage

    def test_sqlite_storage_conforms(tmp_path):
        path = tmp_path / "store.db"
        SqliteStorage(path, create=True).close()
        check_storage(lambda: SqliteStorage(path))

`make_storage` must return a **new handle to the same place** on every call (the same file,
database or bucket), and the place must be empty the first time. The suite opens several handles,
some at once, closes every handle it opens, and uses keys under `conformance/` only. Reopening is
how it checks durability (values and revisions survive `close`) and that handles see each other's
writes and compare-and-set preconditions.

`snapshot()` is optional too (the `Snapshotting` protocol: reads that see one instant while other
handles commit, what a consistent backup needs); its check is skipped for a backend without it.

`get_many()` is optional too (the `MultiGet` protocol: several keys in one read, one round trip
to a database server); its check is skipped for a backend without it.

`read_at_once()` is optional too (the `ReadAtOnce` protocol: a few keys, the newest entry under a
prefix and the change head in one read); its check is skipped for a backend without it.

`change_head()` is optional too (the `ChangeHead` protocol: the revision of the newest change-feed
entry, which readers' caches compare); its check is skipped for a backend without it.

`scrub()` is optional (the `Scrubbable` protocol: erase superseded bytes, so destroyed key
material leaves the backend's files); its check is skipped for a backend without it. Whether the
bytes are really gone is backend-specific and is tested beside the backend (for SQLite, by
searching the -wal and database files after a key is destroyed).

Each check is a small function, listed by name in `STORAGE_CHECKS`, so a test can run them one by
one (`check(make_storage)`) and a failure names the behaviour that broke. Failures raise
`AssertionError` explicitly (not `assert`), so the suite also runs under `python -O` and without
pytest.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise

from secrets_manager.errors import ConflictError, StorageError
from secrets_manager.storage.base import (
    ABSENT,
    ChangeHead,
    Delete,
    Entry,
    MultiGet,
    Operation,
    Put,
    ReadAtOnce,
    Scrubbable,
    Snapshotting,
    Storage,
)

MakeStorage = Callable[[], Storage]
Check = Callable[[MakeStorage], None]

ROOT = "conformance/"
MIB = 1024 * 1024


def check_storage(make_storage: MakeStorage) -> None:
    """Run every check in `STORAGE_CHECKS` against the backend `make_storage` opens.

    `make_storage()` returns a fresh handle to the same (initially empty) place on each call.
    Raises AssertionError naming the first behaviour that does not hold (an unexpected exception
    from the backend is wrapped in one, chained).
    """
    with _handle(make_storage) as storage:
        _require(storage.list("") == [], "the place passed to check_storage must start empty")
    for name, check in STORAGE_CHECKS.items():
        try:
            check(make_storage)
        except AssertionError as exc:
            raise AssertionError(f"storage conformance check {name!r} failed: {exc}") from exc
        except Exception as exc:
            raise AssertionError(
                f"storage conformance check {name!r} failed: unexpected {type(exc).__name__}: {exc}"
            ) from exc


# ---- helpers -----------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _raises_conflict(action: Callable[[], object], message: str) -> None:
    try:
        action()
    except ConflictError:
        return
    raise AssertionError(f"{message}: expected ConflictError, nothing was raised")


@contextmanager
def _handle(make_storage: MakeStorage) -> Iterator[Storage]:
    storage = make_storage()
    try:
        yield storage
    finally:
        storage.close()


def _value_of(storage: Storage, key: str) -> bytes | None:
    entry = storage.get(key)
    return None if entry is None else entry.value


def _snapshot(storage: Storage, prefix: str) -> dict[str, tuple[bytes, int]]:
    """Every key under `prefix` with its value and revision."""
    result: dict[str, tuple[bytes, int]] = {}
    for key in storage.list(prefix):
        entry = storage.get(key)
        _require(entry is not None, f"list({prefix!r}) returned {key!r} but get({key!r}) is None")
        assert entry is not None  # for the type checker; _require raised already
        result[key] = (entry.value, entry.revision)
    return result


# ---- the checks --------------------------------------------------------------------------------


def _check_get_missing_key_is_none(make_storage: MakeStorage) -> None:
    with _handle(make_storage) as storage:
        _require(storage.get(ROOT + "missing/never-written") is None, "get of a missing key is not None")
        storage.put(ROOT + "missing/other", b"x")
        _require(storage.get(ROOT + "missing/othe") is None, "get matched a key by prefix")
        _require(storage.get(ROOT + "missing/other2") is None, "get of a missing key is not None")


def _check_binary_values_round_trip(make_storage: MakeStorage) -> None:
    values = {
        "empty": b"",
        "nul": b"\x00",
        "nuls-inside": b"a\x00b\x00\x00c",
        "all-bytes": bytes(range(256)) * 4,
        "not-utf8": b"\xff\xfe\xc3\x28\x80",
        "1mib-random": os.urandom(MIB),
        "1mib-zeros": bytes(MIB),
    }
    with _handle(make_storage) as storage:
        for name, value in values.items():
            storage.put(ROOT + "binary/" + name, value)
        for name, value in values.items():
            entry = storage.get(ROOT + "binary/" + name)
            _require(entry is not None, f"value {name!r} was not stored")
            assert entry is not None
            _require(
                type(entry.value) is bytes, f"value {name!r} came back as {type(entry.value)}, not bytes"
            )
            _require(entry.value == value, f"value {name!r} ({len(value)} bytes) changed on the round trip")


def _check_put_overwrites(make_storage: MakeStorage) -> None:
    key = ROOT + "overwrite/k"
    with _handle(make_storage) as storage:
        first = storage.put(key, b"one")
        second = storage.put(key, b"two")
        entry = storage.get(key)
        _require(entry is not None and entry.value == b"two", "put without a precondition did not overwrite")
        _require(entry is not None and entry.revision == second, "get's revision is not the overwrite's")
        _require(second > first, "an overwrite did not get a higher revision")
        _require(storage.list(ROOT + "overwrite/") == [key], "an overwrite duplicated the key")


def _check_revisions_strictly_increase(make_storage: MakeStorage) -> None:
    prefix = ROOT + "revisions/"
    with _handle(make_storage) as storage:
        revisions = [storage.put(prefix + "a", b"1")]
        revisions.append(storage.put(prefix + "b", b"2"))
        revisions.append(storage.put(prefix + "a", b"3"))
        revisions.append(storage.delete(prefix + "b"))
        revisions.append(storage.commit([Put(prefix + "c", b"4"), Put(prefix + "d", b"5")]))
        revisions.append(storage.delete(prefix + "never-existed"))
        _require(
            all(isinstance(r, int) and r > 0 for r in revisions), f"revisions are not positive: {revisions}"
        )
        _require(
            all(a < b for a, b in pairwise(revisions)),
            f"revisions of successive commits do not strictly increase: {revisions}",
        )
        entry_a, entry_c, entry_d = (
            storage.get(prefix + "a"),
            storage.get(prefix + "c"),
            storage.get(prefix + "d"),
        )
        _require(
            entry_a is not None and entry_a.revision == revisions[2], "get does not report put's revision"
        )
        _require(
            entry_c is not None
            and entry_d is not None
            and entry_c.revision == entry_d.revision == revisions[4],
            "the keys one commit wrote do not share its revision",
        )
    with _handle(make_storage) as reopened:
        later = reopened.put(prefix + "e", b"6")
        _require(later > revisions[-1], "revisions went back after reopening the storage")


def _check_put_absent_conflicts_on_existing_key(make_storage: MakeStorage) -> None:
    key = ROOT + "absent/k"
    with _handle(make_storage) as storage:
        created = storage.put(key, b"original", expect=ABSENT)
        _require(storage.get(key) is not None, "put with expect=ABSENT did not create a missing key")
        _raises_conflict(
            lambda: storage.put(key, b"clobber", expect=ABSENT), "put with expect=ABSENT on an existing key"
        )
        entry = storage.get(key)
        _require(
            entry is not None and entry.value == b"original" and entry.revision == created,
            "a put refused by expect=ABSENT changed the stored entry",
        )


def _check_put_with_stale_revision_conflicts(make_storage: MakeStorage) -> None:
    key = ROOT + "stale/k"
    with _handle(make_storage) as storage:
        first = storage.put(key, b"v1")
        second = storage.put(key, b"v2", expect=first)
        _require(_value_of(storage, key) == b"v2", "put with the current revision was not applied")
        _raises_conflict(lambda: storage.put(key, b"v3", expect=first), "put with a stale revision")
        _raises_conflict(lambda: storage.put(key, b"v3", expect=second + 1000), "put with a future revision")
        _raises_conflict(
            lambda: storage.put(ROOT + "stale/missing", b"x", expect=second),
            "put expecting a revision of a missing key",
        )
        entry = storage.get(key)
        _require(
            entry is not None and entry.value == b"v2" and entry.revision == second,
            "a put refused for a stale revision changed the stored entry",
        )
        _require(storage.get(ROOT + "stale/missing") is None, "a refused put created its key")


def _check_delete_with_expect(make_storage: MakeStorage) -> None:
    key = ROOT + "delete-expect/k"
    with _handle(make_storage) as storage:
        first = storage.put(key, b"v1")
        second = storage.put(key, b"v2")
        _raises_conflict(lambda: storage.delete(key, expect=first), "delete with a stale revision")
        _raises_conflict(
            lambda: storage.delete(key, expect=ABSENT), "delete expecting ABSENT of an existing key"
        )
        _require(_value_of(storage, key) == b"v2", "a refused delete removed or changed the key")
        storage.delete(key, expect=second)
        _require(storage.get(key) is None, "delete with the current revision did not remove the key")
        _require(key not in storage.list(ROOT + "delete-expect/"), "a deleted key is still listed")
        _raises_conflict(
            lambda: storage.delete(key, expect=second), "delete expecting a revision of a key that is gone"
        )


def _check_delete_missing_key_is_not_an_error(make_storage: MakeStorage) -> None:
    prefix = ROOT + "delete-missing/"
    with _handle(make_storage) as storage:
        storage.put(prefix + "keep", b"kept")
        before = _snapshot(storage, prefix)
        storage.delete(prefix + "never-written")
        storage.delete(prefix + "never-written-either", expect=ABSENT)
        _require(storage.get(prefix + "never-written") is None, "deleting a missing key created it")
        _require(_snapshot(storage, prefix) == before, "deleting a missing key changed another key")


def _check_list_prefix_sorted_and_literal(make_storage: MakeStorage) -> None:
    base = ROOT + "list/"
    keys = [
        "a%b", "axb", "a_b", "aXb", "a", "a/", "a/b", "a/b/c", "ab", "b",
        "B", "_", "%", "a*b", "a?b", "a[b]", "a\\b", "a.b", "é", "z\U0010ffff", "z\U0010ffffz", "za",
    ]  # fmt: skip
    with _handle(make_storage) as storage:
        storage.commit([Put(base + k, k.encode("utf-8")) for k in keys])
        storage.put(ROOT + "lis", b"outside")  # shares a prefix with base without being under it

        def listed(prefix: str) -> list[str]:
            return [k[len(base) :] for k in storage.list(base + prefix)]

        everything = listed("")
        _require(everything == sorted(keys), f"list is not every key in code-point order: {everything!r}")
        cases = {
            "a%": ["a%b"],
            "a_": ["a_b"],
            "%": ["%"],
            "_": ["_"],
            "a*": ["a*b"],
            "a?": ["a?b"],
            "a[": ["a[b]"],
            "a\\": ["a\\b"],
            "a.": ["a.b"],
            "a/": ["a/", "a/b", "a/b/c"],
            "a/b": ["a/b", "a/b/c"],
            "A": [],
            "B": ["B"],
            "b": ["b"],
            "é": ["é"],
            "z": ["za", "z\U0010ffff", "z\U0010ffffz"],
            "z\U0010ffff": ["z\U0010ffff", "z\U0010ffffz"],
            "nothing-here": [],
            "a/b/c/d": [],
        }
        for prefix, expected in cases.items():
            got = listed(prefix)
            _require(got == expected, f"list({prefix!r}) under {base!r} gave {got!r}, expected {expected!r}")
        _require(
            storage.list(ROOT + "lis") == [ROOT + "lis", *(base + k for k in sorted(keys))],
            "list of a prefix did not include the key equal to it and every key below it",
        )
        for key in storage.list(base):
            _require(type(key) is str, f"list returned a {type(key)} key")


def _check_list_empty_prefix_lists_all(make_storage: MakeStorage) -> None:
    prefix = ROOT + "list-all/"
    added = [prefix + k for k in ("c", "a", "b/1", "b/0")]
    with _handle(make_storage) as storage:
        before = storage.list("")
        _require(before == sorted(before), "list('') is not sorted")
        storage.commit([Put(key, b"v") for key in added])
        after = storage.list("")
        _require(
            after == sorted(before + added), "list('') is not exactly the old keys plus the new ones, sorted"
        )
        storage.delete(added[0])
        _require(storage.list("") == sorted(before + added[1:]), "list('') still shows a deleted key")
        for key in storage.list(""):
            _require(storage.get(key) is not None, f"list('') returned {key!r}, which get cannot find")


def _check_commit_is_all_or_nothing(make_storage: MakeStorage) -> None:
    prefix = ROOT + "atomic/"
    with _handle(make_storage) as storage:
        keep_rev = storage.put(prefix + "to-delete", b"still here")
        guard_rev = storage.put(prefix + "guard", b"guard v1")
        storage.put(prefix + "guard", b"guard v2")  # guard_rev is now stale
        before = _snapshot(storage, prefix)

        failing: list[Operation] = [
            Put(prefix + "new-1", b"new"),
            Put(prefix + "to-delete", b"overwritten", expect=keep_rev),
            Delete(prefix + "to-delete"),
            Put(prefix + "new-2", b"new", expect=ABSENT),
            Put(prefix + "guard", b"guard v3", expect=guard_rev),  # the last operation fails
        ]
        _raises_conflict(lambda: storage.commit(failing), "commit whose last precondition fails")
        _require(_snapshot(storage, prefix) == before, "a failed commit applied some of its operations")

        failing_delete: list[Operation] = [
            Put(prefix + "new-3", b"new"),
            Delete(prefix + "to-delete", expect=ABSENT),
        ]
        _raises_conflict(lambda: storage.commit(failing_delete), "commit whose delete precondition fails")
        _require(_snapshot(storage, prefix) == before, "a failed commit applied some of its operations")

        revision = storage.commit(
            [Put(prefix + "new-1", b"new"), Delete(prefix + "to-delete", expect=keep_rev)]
        )
        entry = storage.get(prefix + "new-1")
        _require(
            entry is not None and entry.revision == revision and storage.get(prefix + "to-delete") is None,
            "a commit whose preconditions hold was not applied in full",
        )


def _check_commit_with_a_lock_wait_lands_when_no_writer_holds_the_lock(make_storage: MakeStorage) -> None:
    """`commit(lock_wait=…)` bounds only the wait for another writer: with none (the previous
    commit, by this or another handle, released the lock), even lock_wait=0 commits as usual.
    That it gives up on a held lock is the backend's own test (holding it is backend-specific)."""
    key = ROOT + "lock-wait/k"
    with _handle(make_storage) as first, _handle(make_storage) as second:
        revision = first.put(key, b"1")
        try:
            newer = second.commit([Put(key, b"2", expect=revision)], lock_wait=0.0)
            silent = first.commit([Put(key, b"3", expect=newer)], silent=True, durable=False, lock_wait=1.0)
        except TypeError:
            raise AssertionError("commit does not take lock_wait") from None
        except StorageError as exc:
            raise AssertionError(f"a commit with a lock_wait failed with no other writer: {exc}") from None
        entry = second.get(key)
        _require(
            newer > revision and silent > newer and entry == Entry(b"3", silent),
            "a commit with a lock_wait was not applied as a commit without one",
        )
        _raises_conflict(
            lambda: first.commit([Put(key, b"4", expect=revision)], lock_wait=1.0),
            "a stale compare-and-set with a lock_wait",
        )


def _check_values_survive_reopen(make_storage: MakeStorage) -> None:
    prefix = ROOT + "durable/"
    big = os.urandom(MIB)
    with _handle(make_storage) as storage:
        storage.put(prefix + "small", b"\x00small\x00")
        storage.put(prefix + "big", big)
        storage.put(prefix + "gone", b"deleted before close")
        storage.delete(prefix + "gone")
        before = _snapshot(storage, prefix)
    with _handle(make_storage) as reopened:
        _require(_snapshot(reopened, prefix) == before, "values or revisions changed across close and reopen")
        _require(_value_of(reopened, prefix + "big") == big, "a 1 MiB value did not survive reopening")
        _require(reopened.get(prefix + "gone") is None, "a deleted key came back after reopening")


def _check_handles_share_state(make_storage: MakeStorage) -> None:
    key = ROOT + "shared/k"
    with _handle(make_storage) as first, _handle(make_storage) as second:
        revision = first.put(key, b"from first")
        entry = second.get(key)
        _require(
            entry is not None and entry.value == b"from first" and entry.revision == revision,
            "a second handle does not see the first handle's write",
        )
        newer = second.put(key, b"from second", expect=revision)
        _raises_conflict(
            lambda: first.put(key, b"lost update", expect=revision), "compare-and-set across two handles"
        )
        entry = first.get(key)
        _require(
            entry is not None and entry.value == b"from second" and entry.revision == newer,
            "a handle does not see another handle's write",
        )
        _raises_conflict(
            lambda: first.put(key, b"clobber", expect=ABSENT), "expect=ABSENT across two handles"
        )


def _check_change_feed_lists_every_commit_in_order(make_storage: MakeStorage) -> None:
    a, b = ROOT + "feed/a", ROOT + "feed/b"
    with _handle(make_storage) as writer, _handle(make_storage) as watcher:
        start = watcher.changes_since(0).revision
        first = writer.commit([Put(a, b"1"), Put(b, b"1")])
        second = writer.delete(a)
        batch = watcher.changes_since(start)
        seen = [(c.revision, c.key, c.deleted) for c in batch.changes]
        _require(
            seen == [(first, a, False), (first, b, False), (second, a, True)],
            f"change feed after {start} is {seen}, not the two commits in order",
        )
        _require(batch.revision == second, "the feed's revision is not the newest commit's")
        _require(not watcher.changes_since(second).changes, "the feed repeats changes already read")
        _require(not batch.truncated, "a fresh feed claims to have dropped changes")
        quiet = writer.commit([Put(b, b"re-encrypted")], silent=True)
        later = writer.put(a, b"2")
        after = [(c.revision, c.key) for c in watcher.changes_since(second).changes]
        _require(after == [(later, a)], f"a silent commit ({quiet}) showed in the change feed: {after}")
        entry = watcher.get(b)
        _require(entry is not None and entry.value == b"re-encrypted", "a silent commit was not applied")
        writer.commit([Put(b, b"not fsynced")], durable=False)
        entry = watcher.get(b)
        _require(entry is not None and entry.value == b"not fsynced", "a non-durable commit was not applied")


def _check_scrub_keeps_every_value(make_storage: MakeStorage) -> None:
    """Only for backends that implement the optional `Scrubbable`: erasing superseded bytes must
    keep every live value and revision (what it erased is checked in the backend's own tests)."""
    prefix = ROOT + "scrub/"
    with _handle(make_storage) as storage:
        if not isinstance(storage, Scrubbable):
            return
        storage.put(prefix + "kept", b"kept")
        storage.put(prefix + "overwritten", b"old")
        storage.put(prefix + "overwritten", b"new")
        storage.put(prefix + "deleted", b"gone")
        storage.delete(prefix + "deleted")
        before = _snapshot(storage, prefix)
        with _handle(make_storage) as other:  # another open handle must not stop a scrub
            _require(other.get(prefix + "kept") is not None, "a second handle does not see a write")
            _require(storage.scrub() is True, "scrub() did not finish with another handle idle")
        _require(_snapshot(storage, prefix) == before, "scrub() changed a live value or revision")
    with _handle(make_storage) as reopened:
        _require(_snapshot(reopened, prefix) == before, "values changed across scrub() and reopen")


def _check_get_many_answers_as_get_does(make_storage: MakeStorage) -> None:
    """Only for backends that implement the optional `MultiGet`: the entries of the keys that
    exist, exactly as `get` returns them; missing keys left out; duplicates and no keys are fine."""
    prefix = ROOT + "many/"
    with _handle(make_storage) as storage:
        if not isinstance(storage, MultiGet):
            return
        _require(storage.get_many([]) == {}, "get_many([]) is not {}")
        keys = [f"{prefix}{i:04d}" for i in range(1200)]  # more than one statement's worth in places
        storage.commit([Put(key, key.encode() + bytes([i % 256])) for i, key in enumerate(keys)])
        storage.delete(keys[7])
        asked = [*keys, prefix + "missing", keys[3], keys[3]]
        found = storage.get_many(asked)
        _require(keys[7] not in found and prefix + "missing" not in found, "get_many returned missing keys")
        expected = {key: storage.get(key) for key in keys if key != keys[7]}
        _require(found == expected, "get_many does not return what get returns for each key")


def _check_read_at_once_answers_as_get_and_change_head_do(make_storage: MakeStorage) -> None:
    """Only for backends that implement the optional `ReadAtOnce`: the entries of the keys that
    exist as `get` returns them, the change head as `change_head` gives it, and the newest entry
    under the prefix: the highest revision, then among one commit's the longest key, then the
    greatest (`#10` after `#9`); none when no prefix is asked for or nothing is under it."""
    prefix = ROOT + "at-once/"
    with _handle(make_storage) as storage:
        if not isinstance(storage, ReadAtOnce):
            return
        storage.commit([Put(prefix + "meta", b"m"), Put(prefix + "v#1", b"1"), Put(prefix + "v#2", b"2")])
        storage.put(prefix + "v#1", b"1 again")  # the newest by revision, though not the greatest key
        found = storage.read_at_once([prefix + "meta", prefix + "missing"], newest_under=prefix + "v#")
        _require(found.entries == {prefix + "meta": storage.get(prefix + "meta")}, "read_at_once entries")
        _require(found.newest == (prefix + "v#1", storage.get(prefix + "v#1")), "newest is not by revision")
        if isinstance(storage, ChangeHead):
            _require(found.head == storage.change_head(), "read_at_once head is not change_head()")
        storage.commit([Put(prefix + f"v#{n}", str(n).encode()) for n in (2, 9, 10, 3)])
        found = storage.read_at_once([], newest_under=prefix + "v#")
        _require(found.newest is not None and found.newest[0] == prefix + "v#10", "newest of one commit")
        _require(storage.read_at_once([prefix + "meta"]).newest is None, "newest given unasked")
        _require(
            storage.read_at_once([], newest_under=prefix + "nothing#").newest is None, "newest of nothing"
        )


def _check_snapshot_sees_one_instant(make_storage: MakeStorage) -> None:
    """Only for backends that implement the optional `Snapshotting`: commits through another handle
    while a snapshot is open are invisible to it (puts, overwrites, deletes alike), and visible after."""
    prefix = ROOT + "snapshot/"
    with _handle(make_storage) as storage:
        if not isinstance(storage, Snapshotting):
            return
        storage.put(prefix + "a", b"a1")
        storage.put(prefix + "doomed", b"d")
        before = _snapshot(storage, prefix)
        with _handle(make_storage) as writer, storage.snapshot() as snap:
            first = snap.get(prefix + "a")
            _require(first is not None and first.value == b"a1", "a snapshot does not see earlier commits")
            last = writer.commit([Put(prefix + "a", b"a2"), Put(prefix + "b", b"b1")])
            writer.delete(prefix + "doomed")
            seen = {key: (entry.value, entry.revision) for key, entry in snap.scan(prefix)}
            _require(seen == before, f"a snapshot saw commits made after it began: {sorted(seen)}")
            _require(snap.list(prefix) == sorted(before), "snapshot list() saw later commits")
            entry = snap.get(prefix + "a")
            _require(entry is not None and entry.value == b"a1", "snapshot get() saw a later commit")
            _require(snap.get(prefix + "b") is None, "snapshot get() saw a key created after it began")
            if isinstance(snap, MultiGet):
                many = snap.get_many([prefix + "a", prefix + "b", prefix + "doomed"])
                _require(
                    {key: (entry.value, entry.revision) for key, entry in many.items()} == before,
                    "snapshot get_many() saw commits made after it began",
                )
            _require(snap.revision < last, "a snapshot's revision includes later commits")
        after = _snapshot(storage, prefix)
        _require(
            sorted(after) == [prefix + "a", prefix + "b"] and after[prefix + "a"][0] == b"a2",
            "after the snapshot ended, the handle does not see the commits made during it",
        )


def _check_reads_inside_a_snapshot_return(make_storage: MakeStorage) -> None:
    """Only for `Snapshotting` backends: while a snapshot is open, the same thread may still read
    through the handle itself (the store does, to adopt a root key another process rotated while
    it decodes the snapshot's keysets). It must get an answer, not wait on the snapshot forever;
    and a write tried there, landed or refused, must not hold up other handles' writes."""
    prefix = ROOT + "nested/"
    storage = make_storage()
    if not isinstance(storage, Snapshotting):
        storage.close()
        return
    storage.put(prefix + "a", b"a1")
    answers: list[object] = []

    def read_inside() -> None:
        with storage.snapshot() as snap, _handle(make_storage) as other:
            answers.append(snap.get(prefix + "a"))
            answers.append(storage.get(prefix + "a"))
            answers.append(storage.get_many([prefix + "a"]) if isinstance(storage, MultiGet) else None)
            with contextlib.suppress(StorageError):  # it may land (another connection) or be refused
                storage.put(prefix + "b", b"b1")
            started = time.monotonic()
            with contextlib.suppress(StorageError):  # "database is locked" once it gave up waiting
                other.put(prefix + "c", b"c1")
            answers.append(time.monotonic() - started)

    reader = threading.Thread(target=read_inside, daemon=True)
    reader.start()
    reader.join(60)  # longer than SQLite's busy timeout, for the timing check below
    # Not closed if the reader hangs: closing would wait for the snapshot too.
    _require(not reader.is_alive(), "a read through the handle inside its own snapshot never returned")
    storage.close()
    entry = answers[1]
    _require(isinstance(entry, Entry) and entry.value == b"a1", "a read inside a snapshot was wrong")
    _require(
        isinstance(answers[3], float) and answers[3] < 5,
        "a write attempted inside a snapshot made another handle's write wait",
    )


def _newest_logged(storage: Storage) -> int:
    """The revision of the newest change the feed holds (0 if none), read page by page."""
    newest, after = 0, 0
    while True:
        batch = storage.changes_since(after)
        if not batch.changes:
            return newest
        newest = max(newest, *(c.revision for c in batch.changes))
        if batch.revision <= after:
            raise AssertionError(f"changes_since({after}) returned changes but did not advance")
        after = batch.revision


def _check_change_head_follows_non_silent_commits(make_storage: MakeStorage) -> None:
    """Only for backends that implement the optional `ChangeHead`: the head is the newest change's
    revision (0 before any), moves with every commit that is not silent, durable or not, from any
    handle, and with nothing else (not silent commits, not refused ones), and survives reopening."""
    prefix = ROOT + "head/"
    with _handle(make_storage) as storage, _handle(make_storage) as other:
        if not isinstance(storage, ChangeHead):
            return
        _require(isinstance(other, ChangeHead), "only some handles of one backend implement change_head")
        assert isinstance(other, ChangeHead)
        start = storage.change_head()
        _require(type(start) is int and start >= 0, f"change_head() is {start!r}, not an int >= 0")
        newest = _newest_logged(storage)
        _require(
            start == newest,
            f"change_head() is {start}, not the newest change-feed revision {newest} (0 if none)",
        )

        def heads_are(expected: int, after: str) -> None:
            seen = (storage.change_head(), other.change_head())
            _require(
                seen == (expected, expected),
                f"after {after}, change_head() of the writing and of another handle is {seen}, "
                f"expected {expected} on both",
            )

        put = storage.put(prefix + "a", b"1")
        heads_are(put, "a put")
        _require(put > start, f"change_head() {start} was not below a later commit's revision {put}")
        commit = other.commit([Put(prefix + "b", b"2"), Put(prefix + "c", b"3")])
        heads_are(commit, "a commit of two puts through another handle")
        deleted = storage.delete(prefix + "a")
        heads_are(deleted, "a delete")
        _raises_conflict(lambda: storage.put(prefix + "b", b"x", expect=ABSENT), "put expecting ABSENT")
        heads_are(deleted, "a refused commit")
        quiet = storage.commit([Put(prefix + "b", b"re-encrypted")], silent=True)
        _require(quiet > deleted, "a silent commit did not get a higher revision")
        heads_are(deleted, f"a silent commit (revision {quiet})")
        quiet = other.commit([Put(prefix + "c", b"anchor")], silent=True, durable=False)
        heads_are(deleted, f"a silent, non-durable commit (revision {quiet})")
        loud = other.commit([Put(prefix + "c", b"not fsynced")], durable=False)
        heads_are(loud, "a non-durable commit that is not silent")
        _require(loud > quiet, "a commit after silent ones did not get a higher revision")
        missing = storage.delete(prefix + "never-written")
        heads_are(missing, "a delete of a missing key")
        newest = _newest_logged(other)
        _require(newest == missing, f"the feed's newest change is {newest}, change_head() is {missing}")
    with _handle(make_storage) as reopened:
        _require(isinstance(reopened, ChangeHead), "a reopened handle does not implement change_head")
        assert isinstance(reopened, ChangeHead)
        _require(reopened.change_head() == missing, "change_head() changed across close and reopen")


STORAGE_CHECKS: dict[str, Check] = {
    "get of a missing key is None": _check_get_missing_key_is_none,
    "the change feed lists every commit, from any handle, in order": (
        _check_change_feed_lists_every_commit_in_order
    ),
    "binary values round trip (NUL bytes, empty, 1 MiB)": _check_binary_values_round_trip,
    "put without a precondition overwrites": _check_put_overwrites,
    "revisions strictly increase across commits": _check_revisions_strictly_increase,
    "put expecting ABSENT conflicts on an existing key": _check_put_absent_conflicts_on_existing_key,
    "put with a stale revision conflicts": _check_put_with_stale_revision_conflicts,
    "delete honours its precondition": _check_delete_with_expect,
    "delete of a missing key is not an error": _check_delete_missing_key_is_not_an_error,
    "list(prefix) is sorted and the prefix is literal": _check_list_prefix_sorted_and_literal,
    "list('') lists every key": _check_list_empty_prefix_lists_all,
    "commit is all or nothing": _check_commit_is_all_or_nothing,
    "a commit with a lock_wait lands when no other writer holds the lock": (
        _check_commit_with_a_lock_wait_lands_when_no_writer_holds_the_lock
    ),
    "values survive close and reopen": _check_values_survive_reopen,
    "handles on the same place share state and preconditions": _check_handles_share_state,
    "scrub (optional) keeps every live value": _check_scrub_keeps_every_value,
    "snapshot (optional) sees one instant": _check_snapshot_sees_one_instant,
    "snapshot (optional) lets the same thread read through the handle": _check_reads_inside_a_snapshot_return,
    "get_many (optional) answers as get does": _check_get_many_answers_as_get_does,
    "read_at_once (optional) answers as get and change_head do": (
        _check_read_at_once_answers_as_get_and_change_head_do
    ),
    "change_head (optional) moves with every commit that is not silent, and only then": (
        _check_change_head_follows_non_silent_commits
    ),
}
"""Every check by the behaviour it verifies; `check_storage` runs them in this order."""
