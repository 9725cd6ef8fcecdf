"""The conformance suites themselves: a correct reference passes, and broken implementations fail
with a message naming the behaviour that broke (so every check asserts something real).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.errors import ConflictError, NotFoundError, SecretsManagerError
from secrets_manager.storage import ABSENT, Change, ChangeBatch, Delete, Entry, Put, Storage
from secrets_manager.storage.base import Expect, Operation
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.storage.testing import STORAGE_CHECKS, check_storage
from secrets_manager.store import EncryptedStore, PasswordUnlock, SecretStore
from secrets_manager.store import base as store_base
from secrets_manager.store import encrypted as encrypted_module
from secrets_manager.store.testing import check_secret_store, run_check
from secrets_manager.values import SecretValue


class Place:
    """What a backend persists: shared by every handle to it."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        self.changes: list[Change] = []


class MemoryStorage:
    """A small correct Storage; subclasses below each break one rule."""

    def __init__(self, place: Place) -> None:
        self.place = place

    def get(self, key: str) -> Entry | None:
        return self.place.entries.get(key)

    def put(self, key: str, value: bytes, *, expect: Expect = None) -> int:
        return self.commit([Put(key, value, expect)])

    def delete(self, key: str, *, expect: Expect = None) -> int:
        return self.commit([Delete(key, expect)])

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.place.entries if k.startswith(prefix))

    def check(self, op: Operation) -> None:
        entry = self.place.entries.get(op.key)
        if op.expect is ABSENT and entry is not None:
            raise ConflictError("exists")
        if isinstance(op.expect, int) and (entry is None or entry.revision != op.expect):
            raise ConflictError("changed")

    def apply(self, op: Operation, revision: int, *, silent: bool = False) -> None:
        if not silent:
            self.place.changes.append(Change(revision, op.key, isinstance(op, Delete)))
        if isinstance(op, Put):
            self.place.entries[op.key] = Entry(bytes(op.value), revision)
        else:
            self.place.entries.pop(op.key, None)

    def commit(
        self,
        operations: Sequence[Operation],
        *,
        silent: bool = False,
        durable: bool = True,
        lock_wait: float | None = None,
    ) -> int:
        for op in operations:
            self.check(op)
        self.place.revision += 1
        for op in operations:
            self.apply(op, self.place.revision, silent=silent)
        return self.place.revision

    def changes_since(self, revision: int, *, limit: int = 10_000) -> ChangeBatch:
        changes = [c for c in self.place.changes if c.revision > revision][:limit]
        return ChangeBatch(changes=changes, revision=self.place.revision)

    def close(self) -> None:
        pass


class NotAtomic(MemoryStorage):
    def commit(
        self,
        operations: Sequence[Operation],
        *,
        silent: bool = False,
        durable: bool = True,
        lock_wait: float | None = None,
    ) -> int:
        self.place.revision += 1
        for op in operations:
            self.check(op)
            self.apply(op, self.place.revision)
        return self.place.revision


class NoLockWait(MemoryStorage):
    def commit(  # type: ignore[override]
        self, operations: Sequence[Operation], *, silent: bool = False, durable: bool = True
    ) -> int:
        return super().commit(operations, silent=silent, durable=durable)


class WildcardList(MemoryStorage):
    def list(self, prefix: str) -> list[str]:  # LIKE-style: '_' and '%' match anything
        pattern = prefix.replace("*", "[*]").replace("?", "[?]").replace("_", "?").replace("%", "*") + "*"
        return sorted(k for k in self.place.entries if fnmatch.fnmatchcase(k, pattern))


class IgnoresAbsent(MemoryStorage):
    def check(self, op: Operation) -> None:
        if op.expect is not ABSENT:
            super().check(op)


class RevisionPerKey(MemoryStorage):
    def apply(self, op: Operation, revision: int, *, silent: bool = False) -> None:
        old = self.place.entries.get(op.key)
        super().apply(op, 1 if old is None else old.revision + 1, silent=silent)


class UnsortedList(MemoryStorage):
    def list(self, prefix: str) -> list[str]:
        return [k for k in self.place.entries if k.startswith(prefix)]


class TruncatesAtNul(MemoryStorage):
    def apply(self, op: Operation, revision: int, *, silent: bool = False) -> None:
        if isinstance(op, Put):
            op = Put(op.key, op.value.split(b"\x00")[0], op.expect)
        super().apply(op, revision, silent=silent)


class DeleteMissingFails(MemoryStorage):
    def apply(self, op: Operation, revision: int, *, silent: bool = False) -> None:
        if isinstance(op, Delete):
            del self.place.entries[op.key]
        else:
            super().apply(op, revision, silent=silent)


class View:
    """What a snapshot reads from: a dict of entries (a copy, or the live one for the broken case)."""

    def __init__(self, entries: dict[str, Entry], revision: int) -> None:
        self.entries = entries
        self.revision = revision

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.entries if k.startswith(prefix))

    def scan(self, prefix: str) -> Iterator[tuple[str, Entry]]:
        for key in self.list(prefix):
            yield key, self.entries[key]


class SnapshotMemoryStorage(MemoryStorage):
    @contextlib.contextmanager
    def snapshot(self) -> Iterator[View]:
        yield View(dict(self.place.entries), self.place.revision)


class LiveSnapshot(MemoryStorage):
    @contextlib.contextmanager
    def snapshot(self) -> Iterator[View]:
        yield View(self.place.entries, self.place.revision)  # sees every later commit


class MultiGetMemoryStorage(MemoryStorage):
    def get_many(self, keys: Sequence[str]) -> dict[str, Entry]:
        return {key: entry for key in keys if (entry := self.get(key)) is not None}


class MultiGetReportsMissing(MemoryStorage):
    def get_many(self, keys: Sequence[str]) -> dict[str, Entry | None]:
        return {key: self.get(key) for key in keys}  # missing keys as None instead of left out


class ChangeHeadMemoryStorage(MemoryStorage):
    def change_head(self) -> int:
        return max((c.revision for c in self.place.changes), default=0)


class HeadCountsSilentCommits(MemoryStorage):
    def change_head(self) -> int:
        return self.place.revision  # the revision counter: silent commits move it too


class HeadOfThisHandleOnly(MemoryStorage):
    def __init__(self, place: Place) -> None:
        super().__init__(place)
        self.head = max((c.revision for c in place.changes), default=0)

    def commit(
        self,
        operations: Sequence[Operation],
        *,
        silent: bool = False,
        durable: bool = True,
        lock_wait: float | None = None,
    ) -> int:
        revision = super().commit(operations, silent=silent, durable=durable, lock_wait=lock_wait)
        if not silent:
            self.head = revision  # what this handle committed; other handles' commits unseen
        return revision

    def change_head(self) -> int:
        return self.head


class HeadMissesNonDurableCommits(ChangeHeadMemoryStorage):
    def commit(
        self,
        operations: Sequence[Operation],
        *,
        silent: bool = False,
        durable: bool = True,
        lock_wait: float | None = None,
    ) -> int:
        return super().commit(operations, silent=silent or not durable, durable=durable, lock_wait=lock_wait)


class HeadNeverMoves(MemoryStorage):
    def change_head(self) -> int:
        return 0


class HeadForgottenOnReopen(ChangeHeadMemoryStorage):
    def close(self) -> None:
        self.place.changes.clear()  # e.g. a feed kept in memory only


def test_a_storage_with_change_head_passes_check_storage() -> None:
    place = Place()
    check_storage(lambda: ChangeHeadMemoryStorage(place))


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (HeadCountsSilentCommits, r"after a silent commit \(revision \d+\)"),
        (HeadOfThisHandleOnly, r"after a put, .* is \(\d+, 0\)"),
        (HeadMissesNonDurableCommits, r"after a non-durable commit that is not silent"),
        (HeadNeverMoves, r"after a put, change_head\(\) .* is \(0, 0\)"),
        (HeadForgottenOnReopen, r"change_head\(\) changed across close and reopen"),
    ],
)
def test_the_change_head_check_rejects_a_head_that_breaks_its_rule(
    broken: type[MemoryStorage], message: str
) -> None:
    place = Place()
    behaviour = "change_head (optional) moves with every commit that is not silent, and only then"
    with pytest.raises(AssertionError, match=message):
        STORAGE_CHECKS[behaviour](lambda: broken(place))
    shared = Place()  # every other check passes: the whole suite names this one
    with pytest.raises(AssertionError, match=r"^storage conformance check 'change_head \(optional\)"):
        check_storage(lambda: broken(shared))


def test_a_storage_with_get_many_passes_check_storage() -> None:
    place = Place()
    check_storage(lambda: MultiGetMemoryStorage(place))


def test_the_get_many_check_rejects_missing_keys_in_the_answer() -> None:
    place = Place()
    with pytest.raises(AssertionError, match="get_many returned missing keys"):
        STORAGE_CHECKS["get_many (optional) answers as get does"](lambda: MultiGetReportsMissing(place))


def test_a_correct_storage_passes_check_storage() -> None:
    place = Place()
    check_storage(lambda: MemoryStorage(place))


@pytest.mark.parametrize(
    ("broken", "behaviour"),
    [
        (NotAtomic, "commit is all or nothing"),
        (NoLockWait, "a commit with a lock_wait lands when no other writer holds the lock"),
        (WildcardList, "list(prefix) is sorted and the prefix is literal"),
        (UnsortedList, "list(prefix) is sorted and the prefix is literal"),
        (IgnoresAbsent, "put expecting ABSENT conflicts on an existing key"),
        (RevisionPerKey, "revisions strictly increase across commits"),
        (TruncatesAtNul, "binary values round trip (NUL bytes, empty, 1 MiB)"),
        (DeleteMissingFails, "delete of a missing key is not an error"),
    ],
)
def test_each_storage_check_rejects_a_backend_breaking_its_rule(
    broken: type[MemoryStorage], behaviour: str
) -> None:
    place = Place()
    with pytest.raises((AssertionError, KeyError)):
        STORAGE_CHECKS[behaviour](lambda: broken(place))
    with pytest.raises(AssertionError, match=r"^storage conformance check '"):
        check_storage(lambda: broken(Place()))


def test_a_storage_with_a_true_snapshot_passes_check_storage() -> None:
    place = Place()
    check_storage(lambda: SnapshotMemoryStorage(place))


def test_the_snapshot_check_rejects_a_snapshot_that_sees_later_commits() -> None:
    place = Place()
    with pytest.raises(AssertionError, match="saw commits made after it began"):
        STORAGE_CHECKS["snapshot (optional) sees one instant"](lambda: LiveSnapshot(place))


@pytest.mark.parametrize(
    "behaviour",
    ["values survive close and reopen", "handles on the same place share state and preconditions"],
)
def test_storage_checks_reject_a_backend_that_forgets_on_close(behaviour: str) -> None:
    with pytest.raises(AssertionError):
        STORAGE_CHECKS[behaviour](lambda: MemoryStorage(Place()))


# ---- the secret store suite against deliberately broken EncryptedStores --------------------------


@pytest.fixture
def make_store(
    encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str
) -> Callable[[], SecretStore]:
    return lambda: EncryptedStore.open(
        SqliteStorage(tmp_store_path), PasswordUnlock(store_password, kdf.TEST)
    )


def test_check_secret_store_notices_missing_pruning(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encrypted_module._Meta, "prune", lambda self: [])
    with pytest.raises(AssertionError, match="'max-versions' failed"):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_leaking_repr(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SecretValue, "__repr__", lambda self: f"SecretValue({self.reveal()!r})")
    with pytest.raises(AssertionError, match="'repr-redacted' failed"):
        check_secret_store(make_store)


def test_check_secret_store_notices_an_off_by_one_size_limit(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The size check every store shares (store/base.py `checked_value`), made one byte too lax.
    monkeypatch.setattr(store_base, "MAX_VALUE_SIZE", store_base.MAX_VALUE_SIZE + 1)
    with pytest.raises(AssertionError, match="'oversize-refused' failed"):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_lax_metadata_limit(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The metadata check every store shares (store/base.py `checked_metadata`), one tag too lax.
    monkeypatch.setattr(store_base, "MAX_TAGS", store_base.MAX_TAGS + 1)
    with pytest.raises(AssertionError, match="'metadata-limits' failed: 51 tags: expected InvalidInputError"):
        check_secret_store(make_store)


def test_check_secret_store_notices_metadata_with_control_characters(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_base, "has_control_characters", lambda text: False)
    with pytest.raises(AssertionError, match=r"'metadata-limits' failed: a description with '\\x1b'"):
        check_secret_store(make_store)


def test_check_secret_store_notices_puts_to_deleted_secrets(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = encrypted_module.EncryptedStore.put

    def put_undeleting(self: EncryptedStore, name: str, value: bytes, **kwargs: object) -> object:
        with contextlib.suppress(SecretsManagerError):  # not deleted, or missing: nothing to undo
            self.undelete(name)
        return original(self, name, value, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(encrypted_module.EncryptedStore, "put", put_undeleting)
    with pytest.raises(AssertionError, match="'delete-undelete' failed"):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_metadata_update_that_writes_a_version(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    def update_by_put(self: EncryptedStore, name: str, **change: Any) -> None:
        meta = self.describe(name)
        tags = {k: v for k, v in meta.tags.items() if k not in set(change.get("remove_tags", ()))}
        self.put(
            name,
            self.get(name).value.reveal(),
            description=change.get("description"),
            tags=tags | dict(change.get("set_tags") or {}),
        )

    monkeypatch.setattr(encrypted_module.EncryptedStore, "update_metadata", update_by_put)
    with pytest.raises(AssertionError, match="'update-metadata' failed: update_metadata wrote a version"):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_metadata_update_that_drops_other_tags(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    def replacing(name: str, description: str, tags: Any, **change: Any) -> tuple[str, dict[str, str]]:
        new = change["new_description"]
        return (description if new is None else new), dict(change["set_tags"])

    monkeypatch.setattr(encrypted_module, "updated_metadata", replacing)
    with pytest.raises(AssertionError, match="'update-metadata' failed: setting a tag dropped others"):
        check_secret_store(make_store)


def test_check_secret_store_notices_pruning_that_drops_labelled_versions(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    def prune_by_count(self: Any) -> list[int]:
        pruned = sorted(self.versions)[: max(len(self.versions) - self.max_versions, 0)]
        for number in pruned:
            del self.versions[number]
        return pruned

    monkeypatch.setattr(encrypted_module._Meta, "prune", prune_by_count)
    with pytest.raises(AssertionError, match="under max_versions 2 a stage kept"):
        run_check(make_store, "max-versions-setting")


def test_check_secret_store_notices_a_lax_max_versions_bound(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_base, "MAX_MAX_VERSIONS", store_base.MAX_MAX_VERSIONS + 1)
    with pytest.raises(AssertionError, match="max_versions 101: expected InvalidInputError"):
        run_check(make_store, "max-versions-setting")


def test_check_secret_store_notices_a_put_that_resets_max_versions(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = encrypted_module.EncryptedStore.put

    def put_resetting(self: EncryptedStore, name: str, value: bytes, **kwargs: Any) -> Any:
        kwargs["max_versions"] = kwargs.get("max_versions") or store_base.DEFAULT_MAX_VERSIONS
        return original(self, name, value, **kwargs)

    monkeypatch.setattr(encrypted_module.EncryptedStore, "put", put_resetting)
    with pytest.raises(AssertionError, match="after a write under max_versions 3, kept"):
        run_check(make_store, "max-versions-setting")


def test_check_secret_store_notices_a_stage_that_moves_current(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        encrypted_module.EncryptedStore, "stage", lambda self, name, value: self.put(name, value)
    )
    with pytest.raises(AssertionError, match="'pending-rotation' failed"):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_stage_that_takes_over_a_rotation_in_progress(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = encrypted_module.EncryptedStore.stage

    def stage_over_pending(self: EncryptedStore, name: str, value: bytes) -> object:
        with contextlib.suppress(NotFoundError):  # nothing pending: nothing to take over
            self.discard_pending(name)
        return original(self, name, value)

    monkeypatch.setattr(encrypted_module.EncryptedStore, "stage", stage_over_pending)
    with pytest.raises(
        AssertionError, match="'pending-rotation' failed: a second stage while one is pending"
    ):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_promote_of_a_version_no_longer_pending(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = encrypted_module.EncryptedStore.promote

    def promote_anything(self: EncryptedStore, name: str, version: int) -> int | None:
        pending = self.describe(name).labels.get("pending")
        return original(self, name, version if pending is None else pending)

    monkeypatch.setattr(encrypted_module.EncryptedStore, "promote", promote_anything)
    with pytest.raises(
        AssertionError, match="'pending-rotation' failed: promote of a version no longer pending"
    ):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_promote_that_demotes_a_newer_current(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encrypted_module, "refuse_to_demote", lambda name, version, current: None)
    with pytest.raises(AssertionError, match="'pending-rotation' failed: promote under a newer current"):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_stage_that_ignores_expect_current(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encrypted_module, "refuse_if_changed", lambda name, expect_current, current: None)
    with pytest.raises(
        AssertionError, match="'pending-rotation' failed: a stage whose expect_current is no longer current"
    ):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_promote_that_misreports_the_old_current(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = encrypted_module.EncryptedStore.promote

    def promote_reporting_the_new_version(self: EncryptedStore, name: str, version: int) -> int | None:
        original(self, name, version)
        return version

    monkeypatch.setattr(encrypted_module.EncryptedStore, "promote", promote_reporting_the_new_version)
    with pytest.raises(AssertionError, match="'pending-rotation' failed: promote returned 4"):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_discard_that_misreports_the_version(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = encrypted_module.EncryptedStore.discard_pending

    def discard_reporting_nothing(self: EncryptedStore, name: str) -> int:
        original(self, name)
        return 0

    monkeypatch.setattr(encrypted_module.EncryptedStore, "discard_pending", discard_reporting_nothing)
    with pytest.raises(AssertionError, match="'pending-rotation' failed: discard_pending returned 0"):
        check_secret_store(make_store)


def test_check_secret_store_wraps_unexpected_errors_with_the_check_name() -> None:
    class Exploding:
        def __getattr__(self, name: str) -> object:
            raise RuntimeError("backend on fire")

    def make() -> SecretStore:
        return Exploding()  # type: ignore[return-value]

    with pytest.raises(AssertionError, match="'round-trip' failed: unexpected RuntimeError: backend on fire"):
        check_secret_store(make)


def test_storage_protocol_is_satisfied_by_the_reference() -> None:
    assert isinstance(MemoryStorage(Place()), Storage)


def test_check_secret_store_notices_a_delete_that_ignores_its_expected_version(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = encrypted_module.EncryptedStore.delete

    def delete_unconditionally(self: EncryptedStore, name: str, **kwargs: object) -> None:
        original(self, name)

    monkeypatch.setattr(encrypted_module.EncryptedStore, "delete", delete_unconditionally)
    with pytest.raises(
        AssertionError,
        match="'delete-expect-version' failed: delete with expect_version=1 while version 2 is current",
    ):
        check_secret_store(make_store)


def test_check_secret_store_notices_a_delete_that_ignores_a_pending_rotation(
    make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = encrypted_module.EncryptedStore.delete

    def delete_ignoring_pending(self: EncryptedStore, name: str, **kwargs: Any) -> None:
        kwargs.pop("expect_no_pending", None)
        original(self, name, **kwargs)

    monkeypatch.setattr(encrypted_module.EncryptedStore, "delete", delete_ignoring_pending)
    with pytest.raises(
        AssertionError,
        match=r"'delete-expect-no-pending' failed: delete with expect_no_pending \(expect_version=None\)",
    ):
        check_secret_store(make_store)
