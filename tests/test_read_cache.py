"""The encrypted store's read cache (store/read_cache.py, `EncryptedStore.get`) on real SQLite files.

A read that finds the storage's change head where it was when the cache was filled is answered
from the cached metadata and the still-sealed value record: no storage read but the head's. Every
change by another handle moves the head, so the next read must answer exactly as an uncached read
does (a handle whose storage has no `change_head`, so no cache). The cache never holds a plaintext
value, and a key destroyed elsewhere is never used from it.
"""

from __future__ import annotations

import gc
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from secrets_manager import audit
from secrets_manager.crypto import DataKey, kdf
from secrets_manager.crypto.record import record_key_id
from secrets_manager.errors import NotFoundError, SecretsManagerError
from secrets_manager.storage import ChangeBatch, ChangeHead, Entry
from secrets_manager.storage.base import Expect, Operation
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, keys
from secrets_manager.store.base import Anchor
from secrets_manager.store.read_cache import ReadCache

VALUE = b"sk-live-READ-CACHE-PLAINTEXT-4f9c2a71"
OTHER_VALUE = b"db-password-READ-CACHE-OTHER-0be6d3"


class Forwarding:
    """A Storage that forwards to a real SqliteStorage and counts `get` calls. No `change_head`,
    so an EncryptedStore on it has no read cache: every read goes to storage (the reference)."""

    def __init__(self, inner: SqliteStorage) -> None:
        self.inner = inner
        self.gets = 0

    def get(self, key: str) -> Entry | None:
        self.gets += 1
        return self.inner.get(key)

    def put(self, key: str, value: bytes, *, expect: Expect = None) -> int:
        return self.inner.put(key, value, expect=expect)

    def delete(self, key: str, *, expect: Expect = None) -> int:
        return self.inner.delete(key, expect=expect)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def commit(
        self,
        operations: Sequence[Operation],
        *,
        silent: bool = False,
        durable: bool = True,
        lock_wait: float | None = None,
    ) -> int:
        return self.inner.commit(operations, silent=silent, durable=durable, lock_wait=lock_wait)

    def changes_since(self, revision: int, *, limit: int = 10_000) -> ChangeBatch:
        return self.inner.changes_since(revision, limit=limit)

    def scrub(self) -> bool:
        return self.inner.scrub()

    def close(self) -> None:
        self.inner.close()


class Counting(Forwarding):
    """The same, with `change_head`: the store sees `ChangeHead` and caches. `during_value_read`,
    if set, runs once just before the next read of a value record (after the metadata's)."""

    during_value_read: Callable[[], object] | None = None

    def get(self, key: str) -> Entry | None:
        hook, self.during_value_read = self.during_value_read, None
        if hook is not None and key.startswith("data/"):
            hook()
        elif hook is not None:
            self.during_value_read = hook
        return super().get(key)

    def change_head(self) -> int:
        return self.inner.change_head()


@dataclass
class Handle:
    store: EncryptedStore
    storage: Forwarding


OpenHandle = Callable[..., Handle]


@pytest.fixture
def open_handle(
    encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str
) -> Iterator[OpenHandle]:
    """`open_handle(cached=True)`: a new EncryptedStore handle (its own SQLite connection) on the
    store file, through a counting proxy; `cached=False` gives one without a read cache."""
    opened: list[EncryptedStore] = []

    def open_(*, cached: bool = True) -> Handle:
        inner = SqliteStorage(tmp_store_path)
        proxy = Counting(inner) if cached else Forwarding(inner)
        store = EncryptedStore.open(proxy, PasswordUnlock(store_password, kdf.TEST))
        assert (store._change_head is not None) is cached
        opened.append(store)
        return Handle(store, proxy)

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def raw(encrypted_store: EncryptedStore, tmp_store_path: Path) -> Iterator[SqliteStorage]:
    handle = SqliteStorage(tmp_store_path)
    yield handle
    handle.close()


Outcome = tuple[Any, ...]


def outcome(store: EncryptedStore, name: str, **how: Any) -> Outcome:
    """Everything a read answers: the secret's fields, or the error's type and message."""
    try:
        secret = store.get(name, **how)
    except SecretsManagerError as exc:
        return (type(exc).__name__, str(exc))
    return ("ok", secret.name, secret.version, secret.value.reveal(), secret.labels, secret.created)


QUERIES: list[dict[str, Any]] = [
    {},
    {"label": "current"},
    {"label": "previous"},
    {"label": "pending"},
    *({"version": n} for n in range(1, 7)),
]


def sealed_value(raw: SqliteStorage, key: str) -> bytes:
    entry = raw.get(key)
    assert entry is not None, key
    return entry.value


def reachable(root: object, limit: int = 200_000) -> list[object]:
    """Every object reachable from `root` through references, not into classes, modules or code."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
            types.CodeType, types.FrameType)  # fmt: skip
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        assert len(seen) < limit, "the walk reached far more than a cache holds"
        if not isinstance(obj, skip):
            stack.extend(gc.get_referents(obj))
    return list(seen.values())


def holds(objects: list[object], needle: bytes) -> bool:
    text = needle.decode()
    for obj in objects:
        if isinstance(obj, bytes | bytearray) and needle in obj:
            return True
        if isinstance(obj, memoryview) and needle in obj.tobytes():
            return True
        if isinstance(obj, str) and text in obj:
            return True
    return False


# ---- hits ----------------------------------------------------------------------------------------


def test_a_second_read_of_a_secret_reads_nothing_but_the_change_head(open_handle: OpenHandle) -> None:
    handle = open_handle()
    store = handle.store
    assert isinstance(handle.storage, ChangeHead)
    store.put("svc/token", VALUE)
    handle.storage.gets = 0
    first = store.get("svc/token")
    assert handle.storage.gets > 0  # metadata, keyset and value record: the miss reads storage
    handle.storage.gets = 0
    second = store.get("svc/token")
    assert handle.storage.gets == 0
    assert second == first and second.value.reveal() == VALUE
    store.put("svc/token", OTHER_VALUE)  # moves the head: the next read goes to storage again
    handle.storage.gets = 0
    assert store.get("svc/token").value.reveal() == OTHER_VALUE
    assert handle.storage.gets > 0


def test_version_and_label_reads_through_the_cache_are_right_after_several_puts(
    open_handle: OpenHandle,
) -> None:
    handle, reference = open_handle(), open_handle(cached=False)
    store = handle.store
    written = {}
    for n in range(1, 13):  # max_versions is 10: versions 1 and 2 are pruned
        written[n] = b"value %d " % n + VALUE
        assert store.put("svc/multi", written[n]).version == n
    expected = {
        "current": ("ok", 12, written[12], ("current",)),
        "previous": ("ok", 11, written[11], ("previous",)),
        **{f"v{n}": ("ok", n, written[n], ()) for n in range(3, 11)},
        "v11": ("ok", 11, written[11], ("previous",)),
        "v12": ("ok", 12, written[12], ("current",)),
    }
    queries: dict[str, dict[str, Any]] = {"current": {"label": "current"}, "previous": {"label": "previous"}}
    queries.update({f"v{n}": {"version": n} for n in range(1, 15)})
    for round_ in ("miss", "hit"):
        handle.storage.gets = 0
        for what, how in queries.items():
            got = outcome(store, "svc/multi", **how)
            assert got == outcome(reference.store, "svc/multi", **how), (round_, what)
            if what in expected:
                assert (got[0], *got[2:5]) == expected[what], (round_, what)
            else:
                assert got[0] == "NotFoundError", (round_, what)
        assert outcome(store, "svc/multi", label="pending")[0] == "NotFoundError"
        if round_ == "hit":
            assert handle.storage.gets == 0  # every answer, errors included, came from the cache


def test_a_read_that_a_change_overtook_is_not_kept(open_handle: OpenHandle) -> None:
    handle, writer = open_handle(), open_handle().store
    assert isinstance(handle.storage, Counting)
    writer.put("svc/race", b"one")
    handle.storage.during_value_read = lambda: writer.put("svc/race", b"two")
    assert handle.store.get("svc/race").value.reveal() == b"one"  # it read the metadata before
    assert len(handle.store._read_cache) == 0  # the head moved during the read: nothing kept
    handle.storage.gets = 0
    assert handle.store.get("svc/race").value.reveal() == b"two"
    assert handle.storage.gets > 0


def test_a_read_that_only_a_silent_commit_overtook_is_kept(open_handle: OpenHandle) -> None:
    handle, writer = open_handle(), open_handle().store
    assert isinstance(handle.storage, Counting)
    writer.put("svc/quiet", b"one")
    handle.storage.during_value_read = lambda: writer.set_audit_anchor(Anchor(seq=1, hash="0" * 64))
    assert handle.store.get("svc/quiet").value.reveal() == b"one"
    assert writer.audit_anchor() == Anchor(seq=1, hash="0" * 64)  # the silent commit happened
    handle.storage.gets = 0
    assert handle.store.get("svc/quiet").value.reveal() == b"one"
    assert handle.storage.gets == 0


# ---- no staleness --------------------------------------------------------------------------------


def test_every_change_by_another_handle_is_seen_by_the_next_cached_read(open_handle: OpenHandle) -> None:
    name = "svc/rotating"
    writer = open_handle().store
    reference = open_handle(cached=False).store
    everything = open_handle()  # reads every query, so its one cache entry holds every version
    one_each = {i: open_handle() for i in range(len(QUERIES))}  # one query each: its very next read
    steps: list[tuple[str, Callable[[], object]]] = [
        ("first put", lambda: writer.put(name, b"one")),
        ("second put", lambda: writer.put(name, b"two")),
        ("third put with a description", lambda: writer.put(name, b"three", description="d")),
        ("delete", lambda: writer.delete(name)),
        ("undelete", lambda: writer.undelete(name)),
        ("destroy the previous version", lambda: writer.destroy(name, [2])),
        ("stage", lambda: writer.stage(name, b"four")),
        ("discard the pending label", lambda: writer.discard_pending(name)),
        ("stage again", lambda: writer.stage(name, b"five")),
        ("promote", lambda: writer.promote(name, 5)),
        ("put the same value again", lambda: writer.put(name, b"five")),
        ("destroy two versions", lambda: writer.destroy(name, [3, 4])),
        ("destroy the secret", lambda: writer.destroy_secret(name)),
        ("put it anew: version 1 again, another value", lambda: writer.put(name, b"reborn")),
        ("put version 2 anew", lambda: writer.put(name, b"reborn two")),
        ("tags only", lambda: writer.put(name, b"reborn three", tags={"k": "v"})),
    ]

    def read_all(after: str) -> None:
        for i, how in enumerate(QUERIES):
            expected = outcome(reference, name, **how)
            assert outcome(one_each[i].store, name, **how) == expected, (after, how)
            assert outcome(everything.store, name, **how) == expected, (after, how)

    read_all("nothing yet")
    for what, step in steps:
        # The readers answer from their caches now (each whose query found a version, and the one
        # that read everything), so the step below is a real test of what they do next.
        filled = [one_each[i] for i, how in enumerate(QUERIES) if outcome(reference, name, **how)[0] == "ok"]
        if filled:
            filled.append(everything)
        for handle in (everything, *one_each.values()):
            handle.storage.gets = 0
        read_all(f"{what}: read again before it")
        assert [h.storage.gets for h in filled] == [0] * len(filled), what
        step()
        read_all(what)


def test_a_key_destroyed_by_another_handle_is_never_used_from_the_cache(
    open_handle: OpenHandle, raw: SqliteStorage
) -> None:
    writer = open_handle().store
    reference = open_handle(cached=False).store
    early, late = open_handle(), open_handle()
    writer.put("svc/a", b"a1")
    writer.put("svc/a", b"a2")
    writer.put("other/b", b"b1")
    old = writer._keyset_for_read("svc").primary_id
    stale = sealed_value(raw, "data/svc/a#1")  # sealed under the key about to be destroyed
    for how in ({"version": 1}, {}):
        assert outcome(early.store, "svc/a", **how)[0] == "ok"  # cached, with the old key
    early.storage.gets = 0
    assert early.store.get("svc/a", version=1).value.reveal() == b"a1"
    assert early.storage.gets == 0

    keys.rotate_key(writer, "svc")
    keys.rewrap(writer, "svc")
    keys.disable_key(writer, old)
    assert keys.destroy_key(writer, old).scrubbed  # the proxy forwards scrub()

    for how in ({"version": 1}, {}):  # every record was rewrapped: still readable, the same way
        assert outcome(late.store, "svc/a", **how) == outcome(reference, "svc/a", **how)
        assert outcome(late.store, "svc/a", **how)[3] in (b"a1", b"a2")
    cached_keys = [o for o in reachable(late.store._read_cache._entries) if isinstance(o, DataKey)]
    assert cached_keys and old not in [key.id for key in cached_keys]

    raw.put("data/svc/a#1", stale)  # an old backup restored over it: names the destroyed key
    expected = outcome(reference, "svc/a", version=1)
    assert expected[0] == "IntegrityError"
    assert outcome(early.store, "svc/a", version=1) == expected  # cached before the destroy
    assert outcome(late.store, "svc/a", version=1) == expected  # cached after the destroy
    assert outcome(early.store, "svc/a") == outcome(reference, "svc/a")
    assert outcome(early.store, "svc/a")[3] == b"a2"


def test_a_silent_rewrap_by_another_handle_leaves_cached_reads_right(
    open_handle: OpenHandle, raw: SqliteStorage
) -> None:
    writer = open_handle().store
    reference = open_handle(cached=False).store
    reader = open_handle()
    for value in (b"x1", b"x2", b"x3"):
        writer.put("svc/x", value)
    old = writer._keyset_for_read("svc").primary_id
    new = keys.rotate_key(writer, "svc")  # moves the head; the records stay under the old key
    assert reader.store.get("svc/x").value.reveal() == b"x3"
    assert reader.store.get("svc/x", version=2).value.reveal() == b"x2"
    head = raw.change_head()

    result = keys.rewrap(writer, "svc")

    assert result.rewrapped == 4  # three values and the metadata
    assert raw.change_head() == head  # silent: the cache filled before it stays valid
    assert {record_key_id(sealed_value(raw, k)) for k in raw.list("data/svc/x#")} == {new}
    reader.storage.gets = 0
    assert reader.store.get("svc/x").value.reveal() == b"x3"
    assert reader.store.get("svc/x", version=2).value.reveal() == b"x2"
    assert reader.storage.gets == 0  # answered from the cache: old sealed records, old key
    assert reader.store.get("svc/x", version=1).value.reveal() == b"x1"  # not cached: the new record
    assert reader.storage.gets > 0
    reader.storage.gets = 0
    assert reader.store.get("svc/x", label="previous").value.reveal() == b"x2"
    assert reader.store.get("svc/x", version=1).value.reveal() == b"x1"
    assert reader.storage.gets == 0

    keys.disable_key(writer, old)  # refused if a record still used it; moves the head
    for how in QUERIES:
        assert outcome(reader.store, "svc/x", **how) == outcome(reference, "svc/x", **how), how
    assert outcome(reader.store, "svc/x", version=1)[3] == b"x1"


# ---- fingerprints and plaintext --------------------------------------------------------------------


def test_get_with_fingerprint_gives_the_audit_fingerprint_on_a_miss_and_on_a_hit(
    open_handle: OpenHandle,
) -> None:
    handle, writer = open_handle(), open_handle().store
    store = handle.store
    writer.put("svc/f", VALUE)
    expected = audit.value_fingerprint(store, VALUE)  # creates the audit key (a commit) first
    secret, fingerprint = store.get_with_fingerprint("svc/f")  # miss
    assert secret.value.reveal() == VALUE and fingerprint == expected
    handle.storage.gets = 0
    secret, fingerprint = store.get_with_fingerprint("svc/f")  # hit
    assert handle.storage.gets == 0
    assert secret.value.reveal() == VALUE and fingerprint == expected
    assert store.get("svc/f").value.reveal() == VALUE

    writer.put("svc/f", OTHER_VALUE)
    other = audit.value_fingerprint(store, OTHER_VALUE)
    assert other != expected
    assert store.get("svc/f").value.reveal() == OTHER_VALUE  # a plain get fills the entry ...
    handle.storage.gets = 0
    secret, fingerprint = store.get_with_fingerprint("svc/f")  # ... and a hit computes the print
    assert handle.storage.gets == 0
    assert secret.value.reveal() == OTHER_VALUE and fingerprint == other
    assert store.get_with_fingerprint("svc/f", version=1)[1] == expected  # miss on that version
    assert store.get_with_fingerprint("svc/f", label="previous")[1] == expected  # hit
    assert store.get_with_fingerprint("svc/f", version=2)[1] == other
    assert handle.storage.gets > 0


def test_the_cache_holds_no_plaintext_value(open_handle: OpenHandle, raw: SqliteStorage) -> None:
    handle = open_handle()
    store = handle.store
    store.audit_key()  # made now: its creation is a commit, which would empty the cache below
    store.put("svc/plain", VALUE)
    store.put("svc/plain", OTHER_VALUE, description="described")
    read = [store.get("svc/plain"), store.get("svc/plain", version=1)]
    read += [store.get_with_fingerprint("svc/plain", label="previous")[0]]
    read += [store.get_with_fingerprint("svc/plain")[0], store.get("svc/plain")]  # hits
    assert [s.value.reveal() for s in read] == [OTHER_VALUE, VALUE, VALUE, OTHER_VALUE, OTHER_VALUE]

    objects = reachable(store._read_cache._entries)
    # The walk does reach what the cache keeps: both sealed records, the metadata, the fingerprint.
    sealed = {sealed_value(raw, "data/svc/plain#1"), sealed_value(raw, "data/svc/plain#2")}
    assert sealed <= {o for o in objects if isinstance(o, bytes)}
    assert "described" in objects
    assert audit.value_fingerprint(store, VALUE) in objects
    # ... and would find a plaintext held the way a Secret holds it.
    assert holds(reachable(read), VALUE) and holds(reachable(read), OTHER_VALUE)
    assert not holds(objects, VALUE)
    assert not holds(objects, OTHER_VALUE)


# ---- concurrency ---------------------------------------------------------------------------------


def test_concurrent_readers_see_only_written_values_never_going_back(open_handle: OpenHandle) -> None:
    name = "svc/counter"
    writes = 150
    reader, writer = open_handle().store, open_handle().store
    writer.put(name, b"0")  # version 1
    done = threading.Event()
    seen: dict[int, list[tuple[int, int]]] = {}
    last: dict[int, tuple[int, int]] = {}
    errors: list[BaseException] = []

    def read(index: int) -> None:
        values = seen[index] = []
        try:
            while True:
                finished = done.is_set()
                secret = reader.get(name)
                got = (int(secret.value.reveal()), secret.version)
                values.append(got)
                if finished:  # the writer had returned from its last put before this read began
                    last[index] = got
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for n in range(1, writes + 1):
        writer.put(name, b"%d" % n)
    done.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    for index, values in seen.items():
        assert all(0 <= value <= writes and version == value + 1 for value, version in values), index
        assert values == sorted(values), f"reader {index} saw a value go back"
        assert last[index] == (writes, writes + 1), index
    assert len({value for values in seen.values() for value, _ in values}) > 2  # they did overlap


# ---- ReadCache itself ------------------------------------------------------------------------------


def test_read_cache_keeps_an_entry_for_the_head_it_was_read_at() -> None:
    # (An entry read across a change is never offered: EncryptedStore reads the head again after
    # reading, see test_a_read_that_a_change_overtook_is_not_kept.)
    cache: ReadCache[str] = ReadCache()
    assert cache.get(6, "a") is None
    cache.put(6, "a", "entry")
    assert cache.get(6, "a") == "entry" and cache.get(6, "b") is None
    assert cache.get(7, "a") is None and len(cache) == 0


def test_read_cache_empties_when_a_read_finds_a_newer_head() -> None:
    cache: ReadCache[str] = ReadCache()
    cache.put(3, "a", "A")
    cache.put(3, "b", "B")
    assert cache.get(3, "a") == "A" and len(cache) == 2
    assert cache.get(4, "b") is None
    assert len(cache) == 0
    assert cache.get(3, "a") is None  # an older head (a reader that read it earlier) gets nothing


def test_read_cache_drops_an_entry_tagged_with_an_older_head() -> None:
    cache: ReadCache[str] = ReadCache()
    cache.put(7, "a", "new")
    cache.put(6, "b", "read before the head moved to 7")
    assert cache.get(7, "b") is None
    assert cache.get(7, "a") == "new"
    cache.put(6, "a", "old")  # does not replace the newer entry either
    assert cache.get(7, "a") == "new" and len(cache) == 1
    cache.put(8, "c", "newer")  # a put with a newer head moves the cache on
    assert cache.get(8, "a") is None and cache.get(8, "c") == "newer"


def test_read_cache_past_its_limit_drops_the_oldest_entry() -> None:
    cache: ReadCache[int] = ReadCache(limit=3)
    for i in range(3):
        cache.put(1, f"k{i}", i)
    assert len(cache) == 3 and [cache.get(1, f"k{i}") for i in range(3)] == [0, 1, 2]
    cache.put(1, "k1", 10)  # replacing a kept entry drops nothing
    assert len(cache) == 3 and [cache.get(1, f"k{i}") for i in range(3)] == [0, 10, 2]
    cache.put(1, "k3", 3)
    assert len(cache) == 3
    assert [cache.get(1, f"k{i}") for i in range(4)] == [None, 10, 2, 3]
    cache.clear()
    assert len(cache) == 0 and cache.get(1, "k3") is None


def test_a_store_on_storage_without_change_head_does_not_cache(open_handle: OpenHandle) -> None:
    handle = open_handle(cached=False)
    handle.store.put("svc/u", VALUE)
    handle.storage.gets = 0
    for _ in range(2):
        assert handle.store.get("svc/u").value.reveal() == VALUE
    assert handle.storage.gets >= 6 and len(handle.store._read_cache) == 0


def test_not_found_is_not_cached(open_handle: OpenHandle) -> None:
    reader, writer = open_handle(), open_handle().store
    with pytest.raises(NotFoundError):
        reader.store.get("svc/later")
    assert len(reader.store._read_cache) == 0
    writer.put("svc/later", VALUE)
    assert reader.store.get("svc/later").value.reveal() == VALUE
