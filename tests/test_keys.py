"""The key lifecycle of issue #3 on a real SQLite store (store/keys.py): status, rotate, rewrap,
disable, enable, destroy, the key policy and automatic rotation, and root key rotation.

What an attacker with the store's files could see is checked on the files' bytes (database, -wal
and -shm together), after the operation and with the store still open.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.crypto import keyset as keyset_module
from secrets_manager.crypto.record import record_key_id
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnlockError,
)
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, keys
from secrets_manager.store.base import Anchor

OpenStore = Callable[..., EncryptedStore]


@pytest.fixture
def raw(encrypted_store: EncryptedStore, tmp_store_path: Path) -> Iterator[SqliteStorage]:
    """A second, plain Storage handle on the store file."""
    handle = SqliteStorage(tmp_store_path)
    yield handle
    handle.close()


def all_bytes(path: Path) -> bytes:
    """The store file and its -wal/-shm companions."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.iterdir()) if p.name.startswith(path.name))


def spellings(material: bytes) -> list[bytes]:
    return [material, material.hex().encode(), base64.b64encode(material)]


def entry_value(storage: SqliteStorage, key: str) -> bytes:
    entry = storage.get(key)
    assert entry is not None, key
    return entry.value


def revisions(storage: SqliteStorage) -> dict[str, int]:
    result = {}
    for key in storage.list(""):
        entry = storage.get(key)
        assert entry is not None
        result[key] = entry.revision
    return result


def values(store: EncryptedStore, prefix: str = "") -> dict[tuple[str, int], bytes]:
    """Every stored version's value, by (name, version)."""
    return {
        (meta.name, info.version): store.get(meta.name, version=info.version).value.reveal()
        for meta in store.list(prefix, include_deleted=True)
        if meta.deleted is None
        for info in meta.versions
        if not info.destroyed
    }


def state_of(store: EncryptedStore, namespace: str) -> dict[int, tuple[str, int]]:
    """key id → (state, records) for one namespace."""
    return {info.id: (info.state, info.records) for info in keys.key_status(store, namespace)}


@pytest.fixture
def filled(encrypted_store: EncryptedStore) -> EncryptedStore:
    """Two namespaces: svc with three secrets (two with two versions, one soft-deleted), other with one."""
    store = encrypted_store
    store.put("svc/a", b"a1", description="first", tags={"owner": "desk"})
    store.put("svc/a", b"a2")
    store.put("svc/b", b"b1")
    store.put("svc/b", b"b2")
    store.put("svc/c", b"c1")
    store.delete("svc/c")
    store.put("other/x", b"x1")
    return store


# ---- status ----------------------------------------------------------------------------------------


def test_status_counts_values_and_metadata_records_per_key(filled: EncryptedStore) -> None:
    infos = keys.key_status(filled)
    assert [(i.namespace, i.state, i.records) for i in infos] == [
        ("other", "primary", 2),
        ("svc", "primary", 8),
    ]
    svc = infos[1]
    assert svc.id == filled._keyset_for_read("svc").primary_id
    assert svc.uses == 2 * 5 + 1  # five puts (value + metadata) and one soft delete (metadata)
    assert [i.namespace for i in keys.key_status(filled, "svc")] == ["svc"]


def test_status_counts_names_without_a_slash_in_the_default_namespace(
    encrypted_store: EncryptedStore,
) -> None:
    encrypted_store.put("PLAIN", b"p")
    encrypted_store.put("default/x", b"d")
    encrypted_store.put("defaultish/y", b"n")
    assert state_of(encrypted_store, "default") == {
        encrypted_store._keyset_for_read("default").primary_id: ("primary", 4)
    }


def test_status_of_an_unknown_namespace_is_not_found(filled: EncryptedStore) -> None:
    with pytest.raises(NotFoundError, match="nothing was ever stored"):
        keys.key_status(filled, "nope")
    with pytest.raises(InvalidInputError):
        keys.key_status(filled, "svc/a")


# ---- rotate and rewrap -----------------------------------------------------------------------------


def test_rotation_adds_a_primary_and_everything_written_before_stays_readable(filled: EncryptedStore) -> None:
    before = values(filled)
    old = filled._keyset_for_read("svc").primary_id
    new = keys.rotate_key(filled, "svc")
    assert new != old
    assert state_of(filled, "svc") == {old: ("enabled", 8), new: ("primary", 0)}
    assert values(filled) == before
    filled.put("svc/a", b"a3")
    assert state_of(filled, "svc") == {old: ("enabled", 7), new: ("primary", 2)}


def test_rotating_an_unknown_namespace_is_not_found(filled: EncryptedStore) -> None:
    with pytest.raises(NotFoundError):
        keys.rotate_key(filled, "nope")


def test_rewrap_moves_every_record_to_the_primary_keeping_versions_labels_and_metadata(
    filled: EncryptedStore,
) -> None:
    before_values = values(filled)
    before_meta = {m.name: m for m in filled.list("svc/", include_deleted=True)}
    old = filled._keyset_for_read("svc").primary_id
    new = keys.rotate_key(filled, "svc")
    result = keys.rewrap(filled, "svc", batch_size=3)
    assert (result.rewrapped, result.primary_id, result.unreadable) == (8, new, ())
    assert state_of(filled, "svc") == {old: ("enabled", 0), new: ("primary", 8)}
    assert values(filled) == before_values
    assert {m.name: m for m in filled.list("svc/", include_deleted=True)} == before_meta
    assert filled.get("svc/a", label="previous").value.reveal() == b"a1"
    assert filled.describe("svc/c").deleted is not None


def test_rewrap_counts_its_encryptions_on_the_new_primary(filled: EncryptedStore) -> None:
    new = keys.rotate_key(filled, "svc")
    keys.rewrap(filled, "svc", batch_size=2)
    assert [(i.uses, i.records) for i in keys.key_status(filled, "svc") if i.id == new] == [(8, 8)]


def test_rewrap_touches_only_its_namespace_and_a_second_run_changes_nothing(
    filled: EncryptedStore, raw: SqliteStorage
) -> None:
    keys.rotate_key(filled, "svc")
    other = revisions(raw)
    keys.rewrap(filled, "svc")
    after = revisions(raw)
    assert {k for k in after if after[k] != other.get(k)} == {
        "core/keyset/svc",
        *(k for k in after if k.startswith(("data/svc/", "meta/svc/"))),
    }
    assert keys.rewrap(filled, "svc").rewrapped == 0
    assert revisions(raw) == after


def test_rewrap_reports_progress_up_to_the_total(filled: EncryptedStore) -> None:
    keys.rotate_key(filled, "svc")
    seen: list[tuple[str, int, int]] = []
    keys.rewrap(filled, "svc", batch_size=3, progress=lambda *args: seen.append(args))
    assert seen == [("svc", 0, 8), ("svc", 3, 8), ("svc", 6, 8), ("svc", 8, 8)]


def test_a_rotation_during_a_rewrap_is_caught_up_by_another_pass(
    filled: EncryptedStore, open_store: OpenStore
) -> None:
    before = values(filled)
    keys.rotate_key(filled, "svc")
    other = open_store()
    rotated: list[object] = []

    def rotate_midway(namespace: str, done: int, total: int) -> None:
        if done and not rotated:
            rotated.append(keys.rotate_key(other, namespace))

    result = keys.rewrap(filled, "svc", batch_size=3, progress=rotate_midway)
    assert result.primary_id == rotated[0]
    assert [(i.state, i.records) for i in keys.key_status(filled, "svc")] == [
        ("enabled", 0),
        ("enabled", 0),
        ("primary", 8),
    ]
    assert values(filled) == before


def test_a_rewrap_outrun_by_rotations_says_what_it_left_under_older_keys(
    filled: EncryptedStore, open_store: OpenStore
) -> None:
    """Another process (or the key policy, at other writers' writes) rotating the primary during
    every pass: after its last pass, the records written meanwhile under the keys it rotated away
    are not under the primary, and the result says how many, not that every record is."""
    keys.rotate_key(filled, "svc")
    other = open_store()
    rotated_at: set[int] = set()

    def rotate_and_write_each_pass(namespace: str, done: int, total: int) -> None:
        if done == total and total not in rotated_at:  # the end of a pass
            rotated_at.add(total)
            other.put("svc/written-meanwhile", str(total).encode())
            keys.rotate_key(other, namespace)

    result = keys.rewrap(filled, "svc", batch_size=3, progress=rotate_and_write_each_pass)
    under_older = sum(i.records for i in keys.key_status(filled, "svc") if i.state != "primary")
    assert under_older > 0  # the rotations outran it
    assert result.left == under_older
    assert result.primary_id == filled._keyset_for_read("svc").primary_id
    assert keys.rewrap(filled, "svc").left == 0  # run again (nothing rotating): done
    assert sum(i.records for i in keys.key_status(filled, "svc") if i.state != "primary") == 0


def test_rewrap_leaves_a_damaged_record_alone_and_reports_it(
    filled: EncryptedStore, raw: SqliteStorage
) -> None:
    keys.rotate_key(filled, "svc")
    damaged = bytearray(entry_value(raw, "data/svc/b#1"))
    damaged[-1] ^= 1
    raw.put("data/svc/b#1", bytes(damaged))
    result = keys.rewrap(filled, "svc")
    assert result.rewrapped == 7
    [bad] = result.unreadable
    assert (bad.name, bad.version, bad.key_id) == ("svc/b", 1, record_key_id(bytes(damaged)))
    assert entry_value(raw, "data/svc/b#1") == bytes(damaged)
    assert filled.get("svc/b").value.reveal() == b"b2"


@pytest.mark.parametrize("stray", ["data/svc/a#x", "data/svc/a", "data/svc/a#01", "meta/svc/bad name"])
def test_a_stray_entry_is_an_integrity_error_naming_it_and_nothing_is_rewrapped(
    stray: str, filled: EncryptedStore, raw: SqliteStorage
) -> None:
    keys.rotate_key(filled, "svc")
    raw.put(stray, entry_value(raw, "data/svc/a#1"))
    before = revisions(raw)
    for operation in (keys.key_status, keys.rewrap):
        with pytest.raises(IntegrityError) as caught:
            operation(filled, "svc")
        assert f"the entry {stray!r} is not part of the store layout" in str(caught.value)
        assert "restore it from a backup" in str(caught.value)
    with pytest.raises(IntegrityError, match="not part of the store layout"):
        keys.key_status(filled)
    assert revisions(raw) == before
    assert state_of(filled, "other")  # another namespace's rows are listed apart


def test_rewrap_beside_a_concurrent_writer_loses_nothing(
    filled: EncryptedStore, open_store: OpenStore
) -> None:
    for i in range(200):
        filled.put(f"svc/bulk{i:03d}", f"bulk {i}".encode())
    keys.rotate_key(filled, "svc")
    writer = open_store()
    written: dict[tuple[str, int], bytes] = {}
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set() and i < 500:
            name = f"svc/live{i % 7}"
            value = f"live {i}".encode()
            written[name, writer.put(name, value).version] = value
            i += 1

    before = values(filled)
    thread = threading.Thread(target=write)
    thread.start()
    try:
        keys.rewrap(filled, "svc", batch_size=5)
    finally:
        stop.set()
        thread.join()
    old_keys = [i for i in keys.key_status(filled, "svc") if i.state != "primary"]
    assert [i.records for i in old_keys] == [0]
    now = values(filled)
    assert {k: now[k] for k in before} == before
    assert {k: now[k] for k in written if k in now} == {k: v for k, v in written.items() if k in now}


def test_a_low_use_threshold_cannot_keep_rewrap_from_finishing(filled: EncryptedStore) -> None:
    for i in range(40):
        filled.put(f"svc/n{i}", b"v")
    keys.update_key_policy(filled, lambda p: replace(p, max_uses=3))
    result = keys.rewrap(filled, "svc", batch_size=4)
    assert (result.rewrapped, result.unreadable) == (88, ())
    infos = keys.key_status(filled, "svc")
    assert [(i.state, i.records) for i in infos] == [("enabled", 0), ("primary", 88)]
    assert infos[-1].uses == 88  # far past the policy's 3: within a rewrap only the hard limit rotates


# ---- disable, enable, destroy ------------------------------------------------------------------------


def test_disable_is_refused_while_records_use_the_key(filled: EncryptedStore, raw: SqliteStorage) -> None:
    old = filled._keyset_for_read("svc").primary_id
    keys.rotate_key(filled, "svc")
    before = revisions(raw)
    with pytest.raises(ConflictError, match=r"still encrypts 8 records .*'secrets-manager keys rewrap svc'"):
        keys.disable_key(filled, old)
    assert revisions(raw) == before
    assert state_of(filled, "svc")[old] == ("enabled", 8)


def test_the_primary_key_cannot_be_disabled_or_destroyed(filled: EncryptedStore) -> None:
    primary = filled._keyset_for_read("svc").primary_id
    with pytest.raises(ConflictError, match="primary"):
        keys.disable_key(filled, primary)
    with pytest.raises(ConflictError, match="primary"):
        keys.destroy_key(filled, primary)


def test_after_rewrap_a_disabled_key_leaves_every_secret_readable_and_can_be_enabled(
    filled: EncryptedStore, open_store: OpenStore
) -> None:
    before = values(filled)
    old = filled._keyset_for_read("svc").primary_id
    keys.rotate_key(filled, "svc")
    keys.rewrap(filled, "svc")
    assert keys.disable_key(filled, old) == "svc"
    assert state_of(filled, "svc")[old] == ("disabled", 0)
    assert values(open_store()) == before
    assert keys.enable_key(filled, old) == "svc"
    assert state_of(filled, "svc")[old] == ("enabled", 0)


def test_destroy_requires_a_disabled_key(filled: EncryptedStore) -> None:
    old = filled._keyset_for_read("svc").primary_id
    keys.rotate_key(filled, "svc")
    keys.rewrap(filled, "svc")
    with pytest.raises(ConflictError, match="disable it first"):
        keys.destroy_key(filled, old)


def test_destroy_refuses_a_disabled_key_that_a_restored_record_still_names(
    filled: EncryptedStore, raw: SqliteStorage
) -> None:
    old = filled._keyset_for_read("svc").primary_id
    stale = entry_value(raw, "data/svc/a#1")
    keys.rotate_key(filled, "svc")
    keys.rewrap(filled, "svc")
    keys.disable_key(filled, old)
    raw.put("data/svc/a#1", stale)  # e.g. an old backup restored over it
    with pytest.raises(ConflictError, match=r"still has 1 record .*keys enable"):
        keys.destroy_key(filled, old)
    assert state_of(filled, "svc")[old] == ("disabled", 1)


def test_destroyed_key_material_is_gone_from_the_store_files(
    filled: EncryptedStore, raw: SqliteStorage, tmp_store_path: Path
) -> None:
    old = filled._keyset_for_read("svc").primary_id
    material = filled._keyset_for_read("svc").key(old).material
    sealed_keysets = {entry_value(raw, "core/keyset/svc")}  # every sealed keyset that held the material
    keys.rotate_key(filled, "svc")
    sealed_keysets.add(entry_value(raw, "core/keyset/svc"))
    for version_name in ("svc/a", "svc/b"):
        filled.put(version_name, b"written under the new key")
        sealed_keysets.add(entry_value(raw, "core/keyset/svc"))
    keys.rewrap(filled, "svc", batch_size=1)
    sealed_keysets.add(entry_value(raw, "core/keyset/svc"))
    keys.disable_key(filled, old)
    latest = entry_value(raw, "core/keyset/svc")
    sealed_keysets.add(latest)
    assert latest in all_bytes(tmp_store_path)  # the search does find a sealed keyset that is there

    result = keys.destroy_key(filled, old)

    assert result == keys.DestroyResult(namespace="svc", scrubbed=True)
    files = all_bytes(tmp_store_path)
    assert [blob for blob in sealed_keysets if blob in files] == []
    assert [form for form in spellings(material) if form in files] == []
    assert state_of(filled, "svc")[old] == ("destroyed", 0)
    assert filled._keyset_for_read("svc").key(old).material == b""
    assert filled.get("svc/a", version=1).value.reveal() == b"a1"


def test_unknown_key_ids_are_not_found(filled: EncryptedStore) -> None:
    unknown = filled._keyset_for_read("svc").primary_id ^ 1
    for step in (keys.disable_key, keys.enable_key, keys.destroy_key):
        with pytest.raises(NotFoundError, match=str(unknown)):
            step(filled, unknown)
    with pytest.raises(NotFoundError):
        keys.disable_key(filled, filled._keyset_for_read("svc").primary_id, "other")
    with pytest.raises(InvalidInputError):
        keys.disable_key(filled, 0)


def test_a_key_id_found_in_two_namespaces_needs_the_namespace(
    encrypted_store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = keyset_module.new_key_id
    monkeypatch.setattr(keyset_module, "new_key_id", lambda taken: 4242 if 4242 not in taken else real(taken))
    encrypted_store.put("alpha/x", b"1")
    encrypted_store.put("beta/x", b"2")
    keys.rotate_key(encrypted_store, "alpha")
    keys.rewrap(encrypted_store, "alpha")
    with pytest.raises(InvalidInputError, match=r"alpha, beta; say which with --namespace"):
        keys.disable_key(encrypted_store, 4242)
    assert keys.disable_key(encrypted_store, 4242, "alpha") == "alpha"
    assert state_of(encrypted_store, "beta")[4242] == ("primary", 2)


# ---- policy and automatic rotation -------------------------------------------------------------------


def test_a_lowered_use_threshold_rotates_the_primary_on_its_own(
    encrypted_store: EncryptedStore, open_store: OpenStore
) -> None:
    keys.update_key_policy(encrypted_store, lambda p: replace(p, max_uses=4))
    writer = open_store()  # another handle: the policy is read from the store, not kept in memory
    written = {}
    for i in range(1, 7):
        writer.put("svc/k", f"value {i}".encode())
        written["svc/k", i] = f"value {i}".encode()
    infos = keys.key_status(encrypted_store, "svc")
    assert [(i.state, i.uses) for i in infos] == [("enabled", 4), ("enabled", 4), ("primary", 4)]
    assert values(open_store()) == written
    assert len({record_key_id(r) for r in _value_records(encrypted_store, "svc/k")}) == 3


def _value_records(store: EncryptedStore, name: str) -> list[bytes]:
    return [
        entry.value
        for info in store.describe(name).versions
        if (entry := store._storage.get(f"data/{name}#{info.version}")) is not None
    ]


def test_a_maximum_age_rotates_the_primary_at_the_first_write_after_it(
    encrypted_store: EncryptedStore, open_store: OpenStore
) -> None:
    now = [1_800_000_000.0]
    store = open_store(clock=lambda: now[0])
    keys.update_key_policy(store, lambda p: replace(p, max_age_seconds=86_400))
    store.put("svc/k", b"day 0")
    first = store._keyset_for_read("svc").primary_id
    now[0] += 86_399
    store.put("svc/k", b"almost a day later")
    assert store._keyset_for_read("svc").primary_id == first
    now[0] += 1
    store.put("svc/k", b"a day later")
    rotated = store._keyset_for_read("svc").primary
    assert rotated.id != first and rotated.created == int(now[0])
    assert values(store) == {
        ("svc/k", 1): b"day 0",
        ("svc/k", 2): b"almost a day later",
        ("svc/k", 3): b"a day later",
    }


def test_the_key_policy_is_stored_sealed_and_survives_reopening(
    encrypted_store: EncryptedStore, raw: SqliteStorage, open_store: OpenStore
) -> None:
    assert encrypted_store.key_policy() == keys.DEFAULT_POLICY
    keys.update_key_policy(encrypted_store, lambda p: replace(p, max_uses=1000, max_age_seconds=7 * 86_400))
    assert open_store().key_policy() == keys.RotationPolicy(max_uses=1000, max_age_seconds=7 * 86_400)
    assert b"max_uses" not in entry_value(raw, "core/key-policy")


def test_an_invalid_policy_is_refused_and_nothing_is_written(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    for max_uses in (0, keys.ROTATE_AFTER_USES + 1):
        with pytest.raises(InvalidInputError, match="max_uses"):
            keys.update_key_policy(encrypted_store, lambda p, n=max_uses: replace(p, max_uses=n))
    assert raw.get("core/key-policy") is None


def test_a_tampered_policy_fails_integrity_check(encrypted_store: EncryptedStore, raw: SqliteStorage) -> None:
    encrypted_store.put("svc/old", b"v")
    keys.update_key_policy(encrypted_store, lambda p: replace(p, max_uses=1000))
    damaged = bytearray(entry_value(raw, "core/key-policy"))
    damaged[-1] ^= 1
    raw.put("core/key-policy", bytes(damaged))
    with pytest.raises(IntegrityError):
        encrypted_store.put("svc/new", b"must not be written under an unknown policy")
    assert raw.get("data/svc/new#1") is None
    with pytest.raises(IntegrityError):
        encrypted_store.key_policy()


def test_a_damaged_keyset_or_policy_is_named_by_root_rotation_and_policy_change(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", b"v")
    keys.update_key_policy(encrypted_store, lambda p: replace(p, max_uses=1000))
    for key, named in (
        ("core/keyset/svc", "the keyset of namespace 'svc' (core/keyset/svc) is damaged"),
        ("core/key-policy", "the store's key policy (core/key-policy) is damaged"),
    ):
        saved = entry_value(raw, key)
        damaged = bytearray(saved)
        damaged[-1] ^= 1
        raw.put(key, bytes(damaged))
        before = revisions(raw)
        operations = [lambda: keys.rotate_root_key(encrypted_store)]
        if key == "core/key-policy":
            operations.append(lambda: keys.update_key_policy(encrypted_store, lambda p: p))
        for operation in operations:
            with pytest.raises(IntegrityError) as caught:
                operation()
            assert named in str(caught.value) and "restore the store from a backup" in str(caught.value)
        assert revisions(raw) == before
        raw.put(key, saved)


# ---- the root key --------------------------------------------------------------------------------------


def _root_sealed(raw: SqliteStorage) -> dict[str, bytes]:
    keys_ = [*raw.list("core/keyset/"), "core/audit-key", "core/audit-anchor", "core/key-policy"]
    return {key: entry_value(raw, key) for key in keys_ if raw.get(key) is not None}


@pytest.fixture
def audited(filled: EncryptedStore) -> EncryptedStore:
    """`filled` with the root-sealed entries the audit log and the policy add."""
    filled.audit_key()
    filled.set_audit_anchor(Anchor(seq=3, hash="ab" * 32))
    keys.update_key_policy(filled, lambda p: replace(p, max_uses=10_000))
    return filled


def test_root_rotation_keeps_everything_readable_with_the_same_password(
    audited: EncryptedStore, open_store: OpenStore
) -> None:
    before = values(audited)
    audit_key = audited.audit_key()
    result = keys.rotate_root_key(audited)
    assert (result.namespaces, result.scrubbed) == (2, True)
    reopened = open_store()  # the same password
    assert reopened._root.id == result.new_id != result.old_id
    assert values(reopened) == before
    assert reopened.audit_key() == audit_key
    assert reopened.audit_anchor() == Anchor(seq=3, hash="ab" * 32)
    assert reopened.key_policy().max_uses == 10_000
    reopened.put("svc/a", b"after rotation")
    assert audited.get("svc/a").value.reveal() == b"after rotation"


def test_root_rotation_rewrites_the_header_and_root_sealed_entries_only(
    audited: EncryptedStore, raw: SqliteStorage
) -> None:
    before = revisions(raw)
    before_values = {key: entry_value(raw, key) for key in before}
    keys.rotate_root_key(audited)
    after = revisions(raw)
    changed = {key for key in after if after[key] != before.get(key)}
    assert set(after) == set(before)
    assert changed == {"core/header", *_root_sealed(raw)}
    assert len(changed) == 2 + 3 + 1  # two keysets, audit key, anchor, policy, header: O(namespaces)
    assert all(entry_value(raw, key) == before_values[key] for key in after if key not in changed)


def test_root_rotation_erases_the_old_root_keys_sealed_entries_from_the_files(
    audited: EncryptedStore, raw: SqliteStorage, tmp_store_path: Path
) -> None:
    old_root = audited._root.material
    old_blobs = _root_sealed(raw)
    old_wrapped = entry_value(raw, "core/header").split(b'"wrapped_root_key":"')[1].split(b'"')[0]
    assert old_wrapped in all_bytes(tmp_store_path)
    keys.rotate_root_key(audited)
    files = all_bytes(tmp_store_path)
    assert [key for key, blob in old_blobs.items() if blob in files] == []
    assert old_wrapped not in files
    assert [form for form in spellings(old_root) if form in files] == []


def test_a_password_change_erases_the_old_wrapped_root_key_from_the_files(
    audited: EncryptedStore,
    raw: SqliteStorage,
    tmp_store_path: Path,
    open_store: OpenStore,
    store_password: str,
) -> None:
    """A copy of the store's files taken after `passwd` must not open with the old password."""
    old_wrapped = entry_value(raw, "core/header").split(b'"wrapped_root_key":"')[1].split(b'"')[0]
    assert old_wrapped in all_bytes(tmp_store_path)
    assert audited.change_password(b"a new password") is True
    assert old_wrapped not in all_bytes(tmp_store_path)
    copy = tmp_store_path.with_name("copy.db")
    copy.write_bytes(tmp_store_path.read_bytes())  # the WAL was emptied into it
    storage = SqliteStorage(copy)
    try:
        with pytest.raises(UnlockError):
            EncryptedStore.open(storage, PasswordUnlock(store_password, kdf.TEST))
    finally:
        storage.close()
    assert values(open_store(password="a new password")) == values(audited)


def test_a_password_change_says_when_a_reader_kept_the_old_wrapping_in_the_wal(
    audited: EncryptedStore, open_store: OpenStore
) -> None:
    reader = open_store()
    assert isinstance(reader._storage, SqliteStorage) and isinstance(audited._storage, SqliteStorage)
    audited._storage._db.execute("PRAGMA busy_timeout = 200")  # not the 30 s a CLI waits for the reader
    with reader._storage.snapshot():  # a read transaction pins the WAL
        assert audited.change_password(b"a new password") is False


def test_each_audit_scope_has_its_own_anchor_and_root_rotation_keeps_them(
    audited: EncryptedStore, open_store: OpenStore, raw: SqliteStorage
) -> None:
    """Several hosts serving one shared store each keep their own audit log, so each needs its own
    anchor; the unscoped one (a single local log) is unaffected by them."""
    replica_a, replica_b = open_store(audit_scope="replica-a"), open_store(audit_scope="replica-b")
    assert replica_a.audit_anchor() is None
    replica_a.set_audit_anchor(Anchor(seq=7, hash="aa" * 32))
    replica_b.set_audit_anchor(Anchor(seq=2, hash="bb" * 32))
    assert raw.list("core/audit-anchor/") == ["core/audit-anchor/replica-a", "core/audit-anchor/replica-b"]
    keys.rotate_root_key(audited)
    assert open_store(audit_scope="replica-a").audit_anchor() == Anchor(seq=7, hash="aa" * 32)
    assert open_store(audit_scope="replica-b").audit_anchor() == Anchor(seq=2, hash="bb" * 32)
    assert open_store().audit_anchor() == Anchor(seq=3, hash="ab" * 32)
    with pytest.raises(InvalidInputError, match="audit scope"):
        open_store(audit_scope="../header")


def test_a_handle_opened_before_a_root_rotation_keeps_reading_and_writing(
    audited: EncryptedStore, open_store: OpenStore
) -> None:
    stale = open_store()
    stale.get("svc/a")  # keysets cached under the old root
    keys.rotate_root_key(audited)
    assert stale.get("svc/b").value.reveal() == b"b2"
    stale.put("svc/a", b"written by the stale handle")
    stale.put("brand-new/x", b"a namespace created by the stale handle")
    stale.set_audit_anchor(Anchor(seq=4, hash="cd" * 32))
    fresh = open_store()
    assert fresh.get("svc/a").value.reveal() == b"written by the stale handle"
    assert fresh.get("brand-new/x").value.reveal() == b"a namespace created by the stale handle"
    assert fresh.audit_anchor() == Anchor(seq=4, hash="cd" * 32)


def test_a_handle_lists_after_another_rotated_the_root_key(
    audited: EncryptedStore, open_store: OpenStore
) -> None:
    """list() decodes keysets inside a storage snapshot; adopting the new root key there reads the
    header through the same handle. That deadlocked on SQLite (a service's ListSecrets hung, and
    every call after it) until the handle's lock became reentrant."""
    stale = open_store()
    before = [meta.name for meta in stale.list()]
    keys.rotate_root_key(audited)
    listed: list[list[str]] = []
    lister = threading.Thread(target=lambda: listed.append([m.name for m in stale.list()]), daemon=True)
    lister.start()
    lister.join(10)
    assert listed == [before], "list() after a root key rotation never returned"


def test_a_new_namespace_cannot_be_sealed_under_a_root_key_rotated_away_meanwhile(
    audited: EncryptedStore, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the header guard closes: a writer decides to create a keyset, then the root key
    is rotated before its commit lands."""
    stale = open_store()
    original = EncryptedStore._keyset_for_write
    rotated = []

    def rotate_in_between(self: EncryptedStore, namespace: str, policy: object = None) -> object:
        result = original(self, namespace, policy)  # type: ignore[arg-type]
        if self is stale and not rotated:
            rotated.append(keys.rotate_root_key(audited))
        return result

    monkeypatch.setattr(EncryptedStore, "_keyset_for_write", rotate_in_between)
    stale.put("racing/x", b"created while the root key changed")
    assert rotated
    fresh = open_store()
    assert fresh.get("racing/x").value.reveal() == b"created while the root key changed"
    assert record_key_id(fresh._storage.get("core/keyset/racing").value) == rotated[0].new_id  # type: ignore[union-attr]


def test_a_password_change_from_a_handle_opened_before_a_root_rotation_keeps_the_new_root(
    audited: EncryptedStore, open_store: OpenStore
) -> None:
    stale = open_store()
    before = values(audited)
    keys.rotate_root_key(audited)
    stale.change_password(b"a new password")
    store = open_store(password="a new password")
    assert values(store) == before
    with pytest.raises(UnlockError):
        open_store()


def test_of_two_password_changes_from_handles_opened_together_the_second_is_refused(
    encrypted_store: EncryptedStore, open_store: OpenStore
) -> None:
    """Two `passwd` at once (two administrators): each process opened the store with the same
    password; the one that writes second must fail rather than both say "master password changed"
    while only one password opens the store."""
    alice, bob = open_store(), open_store()
    alice.change_password(b"alices new password")
    with pytest.raises(ConflictError, match="another process changed what unlocks the store"):
        bob.change_password(b"bobs new password")
    assert open_store(password="alices new password")
    with pytest.raises(UnlockError):
        open_store(password="bobs new password")
    alice.change_password(b"alice again")  # the winner's handle knows the header it wrote
    assert open_store(password="alice again")


def test_a_handle_reads_its_password_again_after_passwd_then_a_root_rotation(
    audited: EncryptedStore, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve` holds the store open for weeks. Another process runs `passwd`, then `keys rotate
    --root`: the password the service holds no longer opens the header. With renew_unlock_with
    (serve's password file) it reads the password again; without, it says to open the store again."""
    password_file = ["store test password"]  # what the service's password file holds
    serving, plain = open_store(), open_store()
    serving.renew_unlock_with(lambda: PasswordUnlock(password_file[0], kdf.TEST))
    before = values(audited)
    audited.change_password(b"a new password")
    keys.rotate_root_key(audited)
    with pytest.raises(ConflictError, match=r"open the store again$"):
        plain.get("svc/a")
    with pytest.raises(ConflictError, match="put the new password in its password file"):
        serving.get("svc/a")  # the file still holds the old password
    password_file[0] = "a new password"
    with pytest.raises(ConflictError, match="password file"):
        serving.get("svc/a")  # a failed attempt is not repeated at once (each costs an Argon2id run)
    monkeypatch.setattr("secrets_manager.store.encrypted.RENEW_RETRY_SECONDS", 0.0)
    assert values(serving) == before
    serving.put("svc/a", b"written after the renewal")
    assert open_store(password="a new password").get("svc/a").value.reveal() == b"written after the renewal"


def test_a_handle_refuses_an_earlier_header_put_back_after_a_root_rotation(
    audited: EncryptedStore, open_store: OpenStore, raw: SqliteStorage
) -> None:
    """The header is not authenticated: storage can put back the one from before `keys rotate
    --root`, which the same password opens. The handle adopted that root key again and sealed its
    next namespace's keyset under it (a root key the rotation meant to retire); now the old root
    does not open the audit key the rotation re-sealed, and is refused."""
    earlier = entry_value(raw, "core/header")
    old_id = audited._root.id
    serving = open_store()
    keys.rotate_root_key(audited)
    assert serving.get("svc/a").value.reveal() == b"a2"  # the rotation itself is adopted
    current = raw.get("core/header")
    assert current is not None
    raw.put("core/header", earlier, expect=current.revision)
    with pytest.raises(IntegrityError, match="header names a root key that does not open this store's own"):
        serving.put("brand-new/x", b"would be sealed under the old root")
    assert raw.get("core/keyset/brand-new") is None
    assert serving._root.id != old_id
    assert serving.get("svc/b").value.reveal() == b"b2"


def test_a_handle_that_read_nothing_under_its_root_key_does_not_adopt_another(
    encrypted_store: EncryptedStore, open_store: OpenStore
) -> None:
    """An empty store without an audit key: a handle opened on it holds nothing to check a new
    root key against, so after a rotation it says to open the store again rather than trust the
    header; a handle opened afterwards works."""
    idle = open_store()
    keys.rotate_root_key(encrypted_store)
    with pytest.raises(ConflictError, match=r"nothing it read under the old one .* open the store again"):
        idle.put("svc/x", b"x")
    reopened = open_store()
    reopened.put("svc/x", b"x")
    assert encrypted_store.get("svc/x").value.reveal() == b"x"


def test_a_handle_opened_while_the_root_key_rotates_adopts_the_new_one(
    audited: EncryptedStore, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rotation commits while open() runs Argon2id on the old header: open() then read the
    audit key already re-sealed under the new root, learned nothing, and every later call said
    'holds nothing it read under the old one … restart' (12 CLI calls in 20 rotations; a serve
    started during one exited). The audit key is now read with the header it goes with."""
    from secrets_manager.store import encrypted

    unwrap = encrypted._unwrap_root
    rotated: list[object] = []

    def rotating_meanwhile(unlock: object, header: object) -> object:
        root = unwrap(unlock, header)  # type: ignore[arg-type]
        if not rotated:
            rotated.append(keys.rotate_root_key(audited))
        return root

    monkeypatch.setattr(encrypted, "_unwrap_root", rotating_meanwhile)
    opened = open_store()
    monkeypatch.setattr(encrypted, "_unwrap_root", unwrap)
    assert rotated
    opened.put("brand-new/x", b"x")  # a new namespace: sealed under the new root, adopted
    assert opened._root.id == audited._root.id
    assert open_store().get("brand-new/x").value.reveal() == b"x"


def test_root_rotation_refuses_to_undo_a_password_change_made_meanwhile(
    audited: EncryptedStore, open_store: OpenStore
) -> None:
    other = open_store()
    other.change_password(b"changed by someone else")
    with pytest.raises(ConflictError, match="run the command again"):
        keys.rotate_root_key(audited)
    assert values(open_store(password="changed by someone else"))


def test_root_rotation_of_a_store_opened_from_its_parts_needs_an_unlock_source(
    audited: EncryptedStore,
) -> None:
    bare = EncryptedStore(audited._storage, audited._root)
    with pytest.raises(InvalidInputError, match="unlock source"):
        keys.rotate_root_key(bare)


def test_the_same_password_opens_the_store_after_several_root_rotations(
    audited: EncryptedStore, tmp_store_path: Path, store_password: str
) -> None:
    for _ in range(3):
        keys.rotate_root_key(audited)
    storage = SqliteStorage(tmp_store_path)
    try:
        store = EncryptedStore.open(storage, PasswordUnlock(store_password, kdf.TEST))
        assert store.get("other/x").value.reveal() == b"x1"
    finally:
        storage.close()


def test_rewrap_is_invisible_to_watchers_but_new_versions_are_not(encrypted_store: EncryptedStore) -> None:
    for i in range(5):
        encrypted_store.put(f"auth/K{i}", b"v")
    _, revision = encrypted_store.changes_since(None)
    keys.rotate_key(encrypted_store, "auth")
    keys.rewrap(encrypted_store, "auth")
    changes, revision = encrypted_store.changes_since(revision)
    assert changes == []
    encrypted_store.put("auth/K0", b"w")
    changes, _ = encrypted_store.changes_since(revision)
    assert [(c.kind.value, c.name, c.version) for c in changes] == [("version_added", "auth/K0", 2)]


class _PausingStorage(SqliteStorage):
    """A SQLite storage handle that runs `between` once, just before its next read of `key` (or
    just after it, with `after`): another process's commits landing between two reads of one
    operation."""

    def __init__(self, path: Path, key: str, *, after: bool = False) -> None:
        super().__init__(path)
        self.key = key
        self.after = after
        self.between: Callable[[], None] | None = None

    def get(self, key: str):  # type: ignore[no-untyped-def]
        if key != self.key or self.between is None:
            return super().get(key)
        between, self.between = self.between, None
        if not self.after:
            between()
            return super().get(key)
        entry = super().get(key)
        between()
        return entry


@pytest.mark.parametrize("operation", ["get", "put", "describe"])
def test_a_read_whose_metadata_key_is_rewrapped_and_disabled_between_its_reads_is_no_integrity_error(
    filled: EncryptedStore, tmp_store_path: Path, store_password: str, operation: str
) -> None:
    """On SQLite a read takes a secret's metadata, then its namespace's keyset, in two reads. A
    `keys rewrap` and `keys disable` of the old key landing between them (another process's
    maintenance under load) left the metadata read under a key the keyset read says is disabled:
    the read failed as 'metadata of svc/a is damaged (integrity check failed)', exit 6, and so did
    writes, with nothing damaged at all."""
    old = filled._keyset_for_read("svc").primary_id
    keys.rotate_key(filled, "svc")
    storage = _PausingStorage(tmp_store_path, "core/keyset/svc")
    reader = EncryptedStore.open(storage, PasswordUnlock(store_password, kdf.TEST))
    try:

        def maintenance() -> None:
            keys.rewrap(filled, "svc")
            keys.disable_key(filled, old)

        storage.between = maintenance
        if operation == "get":
            assert reader.get("svc/a").value.reveal() == b"a2"
        elif operation == "put":
            assert reader.put("svc/a", b"a3").version == 3
        else:
            assert reader.describe("svc/a").current_version == 2
        assert storage.between is None  # the interleaving happened
        assert state_of(filled, "svc")[old] == ("disabled", 0)
    finally:
        reader.close()


def test_a_value_read_under_a_key_another_thread_then_saw_disabled_is_read_again(
    filled: EncryptedStore, tmp_store_path: Path, store_password: str
) -> None:
    """A handle shared by threads (serve, the SDK): one thread read a value's record under the
    old key; a `keys rewrap` and `keys disable` landed, and another thread's read put the keyset
    with the key disabled in the handle's cache before the first decrypted. It failed as 'version
    2 of svc/a is damaged (integrity check failed): restore the secret from a backup', exit 6 /
    DATA_LOSS, on an intact store; the record, re-sealed meanwhile, is now read again."""
    old = filled._keyset_for_read("svc").primary_id
    keys.rotate_key(filled, "svc")
    storage = _PausingStorage(tmp_store_path, "data/svc/a#2", after=True)
    reader = EncryptedStore.open(storage, PasswordUnlock(store_password, kdf.TEST))
    try:

        def maintenance_and_another_thread() -> None:
            keys.rewrap(filled, "svc")
            keys.disable_key(filled, old)
            reader._keyset_for_read("svc")  # what another thread's read leaves in the cache

        storage.between = maintenance_and_another_thread
        assert reader.get("svc/a").value.reveal() == b"a2"
        assert storage.between is None  # the interleaving happened
        assert state_of(filled, "svc")[old] == ("disabled", 0)
    finally:
        reader.close()
