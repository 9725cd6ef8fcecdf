"""EncryptedStore on SQLite: the SecretStore conformance suite, then what only our barrier promises:
ciphertext only in the file, per-namespace keys, records bound to their place, O(1) password change.

Tampering goes through the Storage API on a second handle to the same file, as an attacker with
write access to the file would (the backend is untrusted).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.crypto.record import record_key_id
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    UnlockError,
)
from secrets_manager.storage import Entry
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, SecretStore, keys
from secrets_manager.store.testing import SECRET_STORE_CHECKS, check_secret_store, run_check

VALUE = b"sk-live-KNOWN-TEST-VALUE-9b1e77c4"
OTHER_VALUE = b"db-password-OTHER-VALUE-5d02aa"

OpenStore = Callable[..., EncryptedStore]  # the `open_store` fixture of conftest.py


@pytest.fixture
def make_store(
    encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str
) -> Callable[[], SecretStore]:
    """New EncryptedStore handles (each with its own connection) on one initialised file."""
    return lambda: EncryptedStore.open(
        SqliteStorage(tmp_store_path), PasswordUnlock(store_password, kdf.TEST)
    )


def mv_overtaken_inside_its_delete(store: EncryptedStore, other: SecretStore, land: str = "store") -> None:
    """mv of svc/OLD to svc/NEW, whose delete of OLD (before NEW is written) `other`'s store of OLD
    (`land` "store") or stage of a rotation of it ("stage") lands into: after the delete read the
    metadata, before its commit. The commit is conditional on that read, so it fails, is tried
    again, and refuses: OLD stays with the newer or staged value, nothing deleted, NEW not written.
    (With a check before an unconditional delete, the retry deleted OLD and hid that value; with
    a delete conditional on the current version alone, it hid the staged one.)"""
    from secrets_manager.cli.move_commands import copy_secret
    from secrets_manager.cli.session import Note

    store.put("svc/OLD", b"KNOWN-1")
    commit, delete = store._commit_with_keyset, store.delete
    deleting: list[str] = []

    def commit_after_another_write(*args: Any, **kwargs: Any) -> None:
        if deleting:
            deleting.clear()
            if land == "store":
                other.put("svc/OLD", b"KNOWN-2")
            else:
                other.stage("svc/OLD", b"KNOWN-2")
        commit(*args, **kwargs)

    def delete_and_watch(name: str, **kwargs: Any) -> None:
        deleting.append(name)
        delete(name, **kwargs)

    store._commit_with_keyset = commit_after_another_write  # type: ignore[method-assign]
    store.delete = delete_and_watch  # type: ignore[method-assign]
    changed = "now version 2, not 1" if land == "store" else "a rotation was staged: version 2 is pending"
    with pytest.raises(ConflictError, match=re.escape(f"svc/OLD changed since mv read it ({changed}")):
        copy_secret(store, Note(), "svc/OLD", "svc/NEW", force=False, remove=True)
    assert other.describe("svc/OLD").deleted is None
    label = "current" if land == "store" else "pending"
    assert other.get("svc/OLD", label=label).value.reveal() == b"KNOWN-2"
    with pytest.raises(NotFoundError):
        other.get("svc/NEW")
    if land == "store":
        with pytest.raises(
            ConflictError, match="is not at version 1 \\(now version 2\\); nothing was deleted"
        ):
            other.delete("svc/OLD", expect_version=1)
    else:
        with pytest.raises(ConflictError, match="has a pending version 2 now"):
            other.delete("svc/OLD", expect_version=1, expect_no_pending=True)


@pytest.mark.parametrize("land", ["store", "stage"])
def test_mv_overtaken_inside_its_delete_leaves_old_in_place(
    make_store: Callable[[], SecretStore], land: str
) -> None:
    store, other = make_store(), make_store()
    try:
        assert isinstance(store, EncryptedStore)
        mv_overtaken_inside_its_delete(store, other, land)
    finally:
        store.close()
        other.close()


def file_bytes(path: Path) -> dict[str, bytes]:
    """The store file and its -wal/-shm companions, by name."""
    return {p.name: p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name)}


def all_bytes(path: Path) -> bytes:
    return b"".join(file_bytes(path).values())


def entry_value(storage: SqliteStorage, key: str) -> bytes:
    entry = storage.get(key)
    assert entry is not None, key
    return entry.value


def copy_entry(storage: SqliteStorage, source: str, target: str) -> None:
    storage.put(target, entry_value(storage, source))


def flip_bit(storage: SqliteStorage, key: str, offset: int) -> None:
    data = bytearray(entry_value(storage, key))
    data[offset] ^= 0x01
    storage.put(key, bytes(data))


def revisions(storage: SqliteStorage) -> dict[str, int]:
    result = {}
    for key in storage.list(""):
        entry = storage.get(key)
        assert entry is not None
        result[key] = entry.revision
    return result


def spellings(material: bytes) -> list[bytes]:
    """Raw, hex and base64 forms of key material, as they might land in a file."""
    return [material, material.hex().encode(), base64.b64encode(material)]


# ---- conformance --------------------------------------------------------------------------------


def test_encrypted_store_passes_the_whole_conformance_suite(make_store: Callable[[], SecretStore]) -> None:
    check_secret_store(make_store)


@pytest.mark.parametrize("behaviour", list(SECRET_STORE_CHECKS))
def test_encrypted_store_conforms(behaviour: str, make_store: Callable[[], SecretStore]) -> None:
    run_check(make_store, behaviour)


def test_encrypted_store_satisfies_the_secret_store_protocol(encrypted_store: EncryptedStore) -> None:
    assert isinstance(encrypted_store, SecretStore)


# ---- what reaches the file ----------------------------------------------------------------------


def test_store_file_holds_no_plaintext_value_and_no_key_material(
    encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str
) -> None:
    encrypted_store.put("market-connector/BINANCE_API_KEY", VALUE)
    encrypted_store.put("auth/DB_PASSWORD", OTHER_VALUE)
    encrypted_store.put("auth/DB_PASSWORD", OTHER_VALUE + b"-rotated")
    big = VALUE * (60_000 // len(VALUE))
    encrypted_store.put("auth/BIG", big)
    root = encrypted_store._root.material
    data_keys = [
        key.material
        for ns in ("market-connector", "auth")
        for key in encrypted_store._keyset_for_read(ns).keys
    ]
    forbidden = [VALUE, OTHER_VALUE, store_password.encode(), *spellings(root)]
    forbidden += [form for material in data_keys for form in spellings(material)]

    while_open = all_bytes(tmp_store_path)
    assert b"market-connector/BINANCE_API_KEY" in while_open  # names are not secret: we read the right bytes
    assert [needle for needle in forbidden if needle in while_open] == []

    encrypted_store.close()  # checkpoints the WAL into the main file
    after_close = all_bytes(tmp_store_path)
    assert b"auth/DB_PASSWORD" in after_close
    assert [needle for needle in forbidden if needle in after_close] == []


def test_wrong_password_is_an_unlock_error_and_leaves_the_file_unchanged(
    encrypted_store: EncryptedStore, tmp_store_path: Path, open_store: OpenStore
) -> None:
    encrypted_store.put("svc/key", VALUE)
    encrypted_store.close()
    before = file_bytes(tmp_store_path)
    for _ in range(2):
        with pytest.raises(UnlockError, match="wrong master password"):
            open_store(password="not the password")
    assert file_bytes(tmp_store_path) == before
    assert open_store().get("svc/key").value.reveal() == VALUE


def test_each_namespace_has_its_own_keyset(encrypted_store: EncryptedStore, raw: SqliteStorage) -> None:
    for name in ("alpha/x", "beta/x", "plain"):
        encrypted_store.put(name, VALUE)
    keysets = {ns: encrypted_store._keyset_for_read(ns) for ns in ("alpha", "beta", "default")}
    assert raw.list("core/keyset/") == ["core/keyset/alpha", "core/keyset/beta", "core/keyset/default"]
    assert len({ks.primary_id for ks in keysets.values()}) == 3
    assert len({ks.primary.material for ks in keysets.values()}) == 3
    assert encrypted_store._root.material not in {ks.primary.material for ks in keysets.values()}
    for ns, name in (("alpha", "alpha/x"), ("beta", "beta/x"), ("default", "plain")):
        assert record_key_id(entry_value(raw, f"data/{name}#1")) == keysets[ns].primary_id


# ---- records bound to their place ---------------------------------------------------------------


def test_swapped_record_fails_integrity_check(encrypted_store: EncryptedStore, raw: SqliteStorage) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("svc/b", OTHER_VALUE)
    encrypted_store.put("other/c", OTHER_VALUE)
    copy_entry(raw, "data/svc/a#1", "data/svc/b#1")
    with pytest.raises(IntegrityError, match="integrity check failed"):
        encrypted_store.get("svc/b")
    assert encrypted_store.get("svc/a").value.reveal() == VALUE
    assert encrypted_store.get("other/c").value.reveal() == OTHER_VALUE


def test_record_copied_to_another_version_fails_integrity_check(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", b"old value")
    encrypted_store.put("svc/a", VALUE)
    copy_entry(raw, "data/svc/a#1", "data/svc/a#2")
    with pytest.raises(IntegrityError):
        encrypted_store.get("svc/a")
    assert encrypted_store.get("svc/a", version=1).value.reveal() == b"old value"


def test_record_moved_to_another_namespace_fails_integrity_check(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("alpha/key", VALUE)
    encrypted_store.put("beta/key", OTHER_VALUE)
    copy_entry(raw, "data/alpha/key#1", "data/beta/key#1")
    with pytest.raises(IntegrityError):
        encrypted_store.get("beta/key")
    assert encrypted_store.get("alpha/key").value.reveal() == VALUE


@pytest.mark.parametrize(
    ("part", "offset"),
    [("format byte", 0), ("key id", 2), ("nonce", 8), ("ciphertext", 20), ("tag", -1)],
)
def test_flipped_bit_in_a_value_record_fails_integrity_check(
    part: str, offset: int, encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("svc/b", OTHER_VALUE)
    flip_bit(raw, "data/svc/a#1", offset)
    with pytest.raises(IntegrityError):
        encrypted_store.get("svc/a")
    assert encrypted_store.get("svc/b").value.reveal() == OTHER_VALUE


def test_truncated_record_fails_integrity_check(encrypted_store: EncryptedStore, raw: SqliteStorage) -> None:
    encrypted_store.put("svc/a", VALUE)
    record = entry_value(raw, "data/svc/a#1")
    for length in (0, 5, 32, len(record) - 1):
        raw.put("data/svc/a#1", record[:length])
        with pytest.raises(IntegrityError):
            encrypted_store.get("svc/a")


def test_tampered_metadata_fails_integrity_check(encrypted_store: EncryptedStore, raw: SqliteStorage) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("svc/b", OTHER_VALUE)
    flip_bit(raw, "meta/svc/a", 30)
    with pytest.raises(IntegrityError):
        encrypted_store.get("svc/a")
    with pytest.raises(IntegrityError):
        encrypted_store.describe("svc/a")
    assert encrypted_store.get("svc/b").value.reveal() == OTHER_VALUE


def test_metadata_swapped_between_secrets_fails_integrity_check(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("svc/b", OTHER_VALUE)
    encrypted_store.put("svc/b", OTHER_VALUE + b"2")
    copy_entry(raw, "meta/svc/a", "meta/svc/b")
    with pytest.raises(IntegrityError):
        encrypted_store.describe("svc/b")
    assert encrypted_store.get("svc/a").value.reveal() == VALUE


def test_tampered_keyset_fails_integrity_check(encrypted_store: EncryptedStore, raw: SqliteStorage) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("other/b", OTHER_VALUE)
    flip_bit(raw, "core/keyset/svc", 40)
    with pytest.raises(IntegrityError):
        encrypted_store.get("svc/a")
    with pytest.raises(IntegrityError):
        encrypted_store.put("svc/new", b"must not be written under a damaged keyset")
    assert raw.get("data/svc/new#1") is None
    assert encrypted_store.get("other/b").value.reveal() == OTHER_VALUE


def test_keyset_swapped_between_namespaces_fails_integrity_check(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("alpha/a", VALUE)
    encrypted_store.put("beta/b", OTHER_VALUE)
    copy_entry(raw, "core/keyset/alpha", "core/keyset/beta")
    with pytest.raises(IntegrityError):
        encrypted_store.get("beta/b")
    assert encrypted_store.get("alpha/a").value.reveal() == VALUE


def test_missing_keyset_fails_integrity_check(encrypted_store: EncryptedStore, raw: SqliteStorage) -> None:
    encrypted_store.put("svc/a", VALUE)
    raw.delete("core/keyset/svc")
    with pytest.raises(IntegrityError):
        encrypted_store.get("svc/a")


@pytest.mark.parametrize(("old", "new"), [("svc/a", "svc/new"), ("PLAIN", "default/new")])
def test_a_lost_keyset_is_not_replaced_by_the_next_write(
    old: str, new: str, encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put(old, VALUE)
    namespace = "svc" if old.startswith("svc/") else "default"
    saved = entry_value(raw, f"core/keyset/{namespace}")
    raw.delete(f"core/keyset/{namespace}")
    before = revisions(raw)
    for write in (
        lambda: encrypted_store.put(new, OTHER_VALUE),
        lambda: encrypted_store.put(old, OTHER_VALUE),
        lambda: encrypted_store.delete(old),
    ):
        with pytest.raises(IntegrityError) as caught:
            write()
        message = str(caught.value)
        assert f"keyset of namespace {namespace!r}" in message and "is missing" in message
        assert "restore the store from a backup" in message
    assert revisions(raw) == before  # nothing written: no fresh keyset hides the loss
    raw.put(f"core/keyset/{namespace}", saved)  # put back (from a backup): all is as it was
    assert encrypted_store.get(old).value.reveal() == VALUE
    encrypted_store.put(new, OTHER_VALUE)
    assert encrypted_store.get(new).value.reveal() == OTHER_VALUE


def test_another_handle_making_the_namespace_meanwhile_is_no_lost_keyset(
    encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str
) -> None:
    """A writer finds no keyset for a new namespace, and before it looks for the namespace's
    records another handle commits the namespace's first secret (and keyset): it retries on that
    keyset instead of taking the other's secret for a namespace whose keyset was lost."""

    class Raced(SqliteStorage):
        def get(self, key: str) -> Entry | None:
            entry = super().get(key)
            if key == "core/keyset/race" and entry is None and not raced:
                raced.append(True)
                encrypted_store.put("race/theirs", OTHER_VALUE)
            return entry

    raced: list[bool] = []
    mine = EncryptedStore.open(Raced(tmp_store_path), PasswordUnlock(store_password, kdf.TEST))
    try:
        mine.put("race/mine", VALUE)
        assert raced
        assert mine.get("race/theirs").value.reveal() == OTHER_VALUE
        assert encrypted_store.get("race/mine").value.reveal() == VALUE
    finally:
        mine.close()


def test_a_missing_value_of_a_kept_version_is_an_integrity_error_naming_it(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("svc/a", OTHER_VALUE)
    raw.delete("data/svc/a#2")
    for read in (lambda: encrypted_store.get("svc/a"), lambda: encrypted_store.get("svc/a", version=2)):
        with pytest.raises(IntegrityError) as caught:
            read()
        message = str(caught.value)
        assert "version 2 of 'svc/a' is missing" in message
        assert "secrets-manager destroy svc/a --version 2" in message
        assert OTHER_VALUE.decode() not in message
    assert encrypted_store.get("svc/a", version=1).value.reveal() == VALUE
    encrypted_store.destroy("svc/a", [2])  # the way out the message names
    with pytest.raises(NotFoundError, match="was destroyed"):
        encrypted_store.get("svc/a")


@pytest.mark.parametrize("change", ["destroy", "destroy_secret", "prune"])
def test_a_value_destroyed_or_pruned_between_the_two_reads_is_not_found_not_damage(
    change: str, encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str
) -> None:
    """The metadata says version 1 is kept; before its value is read another handle destroys or
    prunes it: that is the genuine NotFoundError of a version gone, not an integrity error."""
    encrypted_store.put("svc/a", VALUE, max_versions=2)
    encrypted_store.put("svc/a", OTHER_VALUE)
    changes: dict[str, Callable[[], object]] = {
        "destroy": lambda: encrypted_store.destroy("svc/a", [1]),
        "destroy_secret": lambda: encrypted_store.destroy_secret("svc/a"),
        "prune": lambda: encrypted_store.put("svc/a", b"v3"),  # max 2 versions: version 1 goes
    }

    class Raced(SqliteStorage):
        def get(self, key: str) -> Entry | None:
            if key == "data/svc/a#1" and not raced:
                raced.append(True)
                changes[change]()
            return super().get(key)

    raced: list[bool] = []
    reader = EncryptedStore.open(Raced(tmp_store_path), PasswordUnlock(store_password, kdf.TEST))
    try:
        with pytest.raises(NotFoundError):
            reader.get("svc/a", version=1)
        assert raced
    finally:
        reader.close()


def message_of(operation: Callable[[], object]) -> str:
    with pytest.raises(IntegrityError) as caught:
        operation()
    message = str(caught.value)
    assert "integrity check failed" in message
    assert VALUE.decode() not in message and OTHER_VALUE.decode() not in message
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__
    return message


def test_a_damaged_value_is_named_with_its_version_and_the_way_out(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.get("svc/a")  # the next read finds it in the read cache: the record is read again
    flip_bit(raw, "data/svc/a#1", -1)
    message = message_of(lambda: encrypted_store.get("svc/a"))
    assert message.startswith("version 1 of 'svc/a' is damaged")
    assert "restore the secret from a backup" in message
    assert "secrets-manager destroy svc/a --version 1" in message


def test_damaged_metadata_is_named_by_every_read_that_meets_it(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("svc/b", OTHER_VALUE)
    flip_bit(raw, "meta/svc/b", -1)
    for read in (
        lambda: encrypted_store.get("svc/b"),
        lambda: encrypted_store.describe("svc/b"),
        lambda: encrypted_store.list("svc/"),
        lambda: encrypted_store.put("svc/b", VALUE),
    ):
        message = message_of(read)
        assert message.startswith("the metadata of 'svc/b' is damaged")
        assert "restore the secret from a backup" in message
    assert encrypted_store.get("svc/a").value.reveal() == VALUE


@pytest.mark.parametrize(("part", "offset"), [("key id", 2), ("tag", -1)])
def test_a_damaged_keyset_is_named_by_its_namespace(
    part: str, offset: int, encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("other/b", OTHER_VALUE)
    flip_bit(raw, "core/keyset/svc", offset)
    reader = EncryptedStore(SqliteStorage(raw.path), encrypted_store._root)  # no keyset cached
    try:
        for read in (
            lambda: reader.get("svc/a"),
            lambda: reader.list(),
            lambda: reader.put("svc/new", VALUE),
        ):
            message = message_of(read)
            assert message.startswith("the keyset of namespace 'svc' (core/keyset/svc) is damaged")
            assert "restore the store from a backup" in message
        assert reader.get("other/b").value.reveal() == OTHER_VALUE
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("key", "read"),
    [
        ("core/audit-key", lambda store: store.audit_key()),
        ("core/key-policy", lambda store: store.key_policy()),
    ],
)
def test_a_damaged_core_record_is_named(
    key: str, read: Callable[[EncryptedStore], object], encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.audit_key()
    keys.update_key_policy(encrypted_store, lambda policy: policy)
    flip_bit(raw, key, -1)
    reader = EncryptedStore(SqliteStorage(raw.path), encrypted_store._root)
    try:
        message = message_of(lambda: read(reader))
        assert message.startswith("the store's ") and f"({key}) is damaged" in message
        assert "restore the store from a backup" in message
    finally:
        reader.close()


def test_integrity_errors_are_opaque_and_show_no_value(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("svc/a", VALUE)
    encrypted_store.put("svc/b", OTHER_VALUE)
    copy_entry(raw, "data/svc/a#1", "data/svc/b#1")
    with pytest.raises(IntegrityError) as caught:
        encrypted_store.get("svc/b")
    message = str(caught.value)
    assert "integrity check failed" in message
    assert VALUE.decode() not in message and OTHER_VALUE.decode() not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# ---- the header ---------------------------------------------------------------------------------


def rewrite_header(raw: SqliteStorage, change: Callable[[dict[str, object]], None]) -> None:
    header = json.loads(entry_value(raw, "core/header"))
    change(header)
    raw.put("core/header", json.dumps(header).encode())


def test_header_with_another_root_key_id_fails_integrity_check(
    encrypted_store: EncryptedStore, raw: SqliteStorage, open_store: OpenStore
) -> None:
    rewrite_header(raw, lambda h: h.update(root_key_id=int(str(h["root_key_id"])) ^ 1))
    with pytest.raises(IntegrityError):
        open_store()


def test_header_that_is_not_json_fails_integrity_check(
    encrypted_store: EncryptedStore, raw: SqliteStorage, open_store: OpenStore
) -> None:
    raw.put("core/header", b"\x00garbage")
    with pytest.raises(IntegrityError):
        open_store()


def test_weakened_kdf_parameters_in_the_header_are_refused(
    encrypted_store: EncryptedStore, raw: SqliteStorage, open_store: OpenStore
) -> None:
    def weaken(header: dict[str, object]) -> None:
        unlock = header["unlock"]
        assert isinstance(unlock, dict)
        unlock["kdf"]["memory_cost_kib"] = 8

    rewrite_header(raw, weaken)
    with pytest.raises((UnlockError, IntegrityError)):
        open_store()


def test_flipped_bit_in_the_wrapped_root_key_is_refused(
    encrypted_store: EncryptedStore, raw: SqliteStorage, open_store: OpenStore
) -> None:
    def flip(header: dict[str, object]) -> None:
        unlock = header["unlock"]
        assert isinstance(unlock, dict)
        sealed = bytearray(base64.b64decode(unlock["wrapped_root_key"]))
        sealed[-3] ^= 0x80
        unlock["wrapped_root_key"] = base64.b64encode(bytes(sealed)).decode()

    rewrite_header(raw, flip)
    with pytest.raises((UnlockError, IntegrityError)):
        open_store()


def test_storage_without_a_header_is_not_found(tmp_store_path: Path) -> None:
    SqliteStorage(tmp_store_path, create=True).close()
    storage = SqliteStorage(tmp_store_path)
    try:
        with pytest.raises(NotFoundError, match="not initialised"):
            EncryptedStore.open(storage, PasswordUnlock("whatever", kdf.TEST))
    finally:
        storage.close()


def test_create_never_overwrites_an_initialised_store(
    encrypted_store: EncryptedStore, tmp_store_path: Path, open_store: OpenStore
) -> None:
    encrypted_store.put("svc/a", VALUE)
    storage = SqliteStorage(tmp_store_path)
    try:
        before = storage.get("core/header")
        with pytest.raises(ConflictError, match="already initialised"):
            EncryptedStore.create(storage, PasswordUnlock("another password", kdf.TEST))
        assert storage.get("core/header") == before
    finally:
        storage.close()
    assert open_store().get("svc/a").value.reveal() == VALUE


# ---- changing the password ----------------------------------------------------------------------


@pytest.fixture
def changed(encrypted_store: EncryptedStore) -> EncryptedStore:
    """A store with secrets in two namespaces whose password was then changed to 'new password'."""
    encrypted_store.put("alpha/a", VALUE)
    encrypted_store.put("alpha/a", VALUE + b"-2")
    encrypted_store.put("beta/b", OTHER_VALUE)
    encrypted_store.change_unlock(PasswordUnlock("new password", kdf.TEST))
    return encrypted_store


def test_password_change_keeps_every_secret_readable_with_the_new_password(
    changed: EncryptedStore, open_store: OpenStore
) -> None:
    store = open_store(password="new password")
    assert store.get("alpha/a").value.reveal() == VALUE + b"-2"
    assert store.get("alpha/a", version=1).value.reveal() == VALUE
    assert store.get("beta/b").value.reveal() == OTHER_VALUE
    assert store.put("beta/b", b"written after the change").version == 2


def test_password_change_rejects_the_old_password(
    changed: EncryptedStore, open_store: OpenStore, store_password: str
) -> None:
    with pytest.raises(UnlockError):
        open_store(password=store_password)


def test_password_change_rewrites_only_the_header(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    encrypted_store.put("alpha/a", VALUE)
    encrypted_store.put("beta/b", OTHER_VALUE)
    before = revisions(raw)
    values_before = {key: entry_value(raw, key) for key in before}
    encrypted_store.change_unlock(PasswordUnlock("new password", kdf.TEST))
    after = revisions(raw)
    assert set(after) == set(before)
    assert [key for key in before if after[key] != before[key]] == ["core/header"]
    assert {key: entry_value(raw, key) for key in before if key != "core/header"} == {
        key: value for key, value in values_before.items() if key != "core/header"
    }
    assert entry_value(raw, "core/header") != values_before["core/header"]


def test_password_change_keeps_the_root_key(encrypted_store: EncryptedStore, open_store: OpenStore) -> None:
    encrypted_store.change_unlock(PasswordUnlock("new password", kdf.TEST))
    assert open_store(password="new password")._root.material == encrypted_store._root.material


def test_acting_for_records_the_actor_of_writes_in_its_block_and_thread(
    encrypted_store: EncryptedStore,
) -> None:
    """What the service uses so versions are `created_by` its caller: only inside the block, only
    in that thread, and every other write keeps the store's own actor."""
    encrypted_store.put("acting/default", VALUE)
    seen: dict[str, str] = {}
    inside = threading.Event()
    other_done = threading.Event()

    def other_thread() -> None:
        inside.wait(5)  # write while the main thread is inside its block
        encrypted_store.put("acting/other-thread", VALUE)
        other_done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with encrypted_store.acting_for("spiffe://example.org/caller"):
        encrypted_store.put("acting/caller", VALUE)
        encrypted_store.stage("acting/caller", OTHER_VALUE)
        inside.set()
        assert other_done.wait(5)
    worker.join(5)
    encrypted_store.put("acting/after", VALUE)
    for name in ("acting/default", "acting/other-thread", "acting/caller", "acting/after"):
        seen[name] = ",".join(v.created_by for v in encrypted_store.history(name))
    default = seen["acting/default"]
    assert default and default != "spiffe://example.org/caller"
    assert seen == {
        "acting/default": default,
        "acting/other-thread": default,
        "acting/caller": "spiffe://example.org/caller,spiffe://example.org/caller",
        "acting/after": default,
    }
    assert encrypted_store.describe("acting/caller").created_by == "spiffe://example.org/caller"


def test_unlisted_values_never_counts_a_write_that_lands_while_it_checks(
    encrypted_store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status read a suspect's metadata, then scanned its rows: a version committed in between was
    reported as left by rolled-back metadata, with a hint to destroy it (a live version)."""
    encrypted_store.put("ns/S1", b"v1")
    listed = encrypted_store.list(include_deleted=True)
    encrypted_store.put("ns/S1", b"v2")  # after the list: ns/S1 becomes a suspect
    read_meta = encrypted_store._read_meta
    written: list[int] = []

    def then_a_write(name: str) -> tuple[object, object]:
        answer = read_meta(name)
        if not written:
            written.append(0)  # the put reads the metadata too: write once
            written[0] = encrypted_store.put("ns/S1", b"v3").version  # between the read and the scan
        return answer

    monkeypatch.setattr(encrypted_store, "_read_meta", then_a_write)
    assert encrypted_store.unlisted_values(listed) == {}
    assert written == [3]


def test_a_write_onto_rolled_back_metadata_is_an_integrity_error_at_once(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    """An older `meta/<name>` put back (after v3 and a delete) leaves data/<name>#3 orphaned: the
    next write of version 3 collides with it. That is no race (the metadata did not move), so it
    fails at once, naming the secret and a command that works, and writes nothing; it used to be
    retried for 30 s and reported as too many concurrent writes."""
    encrypted_store.put("auth/DB_PASS", b"v1")
    encrypted_store.put("auth/DB_PASS", b"v2")
    at_v2 = entry_value(raw, "meta/auth/DB_PASS")
    encrypted_store.put("auth/DB_PASS", OTHER_VALUE)
    encrypted_store.delete("auth/DB_PASS")
    raw.put("meta/auth/DB_PASS", at_v2)
    before = revisions(raw)
    started = time.monotonic()
    with pytest.raises(IntegrityError) as caught:
        encrypted_store.put("auth/DB_PASS", b"v4")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "'auth/DB_PASS'" in message and "rolled back" in message
    assert "secrets-manager destroy auth/DB_PASS --version 3" in message
    assert revisions(raw) == before
    # The command the message names works: the orphan goes, the metadata stays, writes go on.
    encrypted_store.destroy("auth/DB_PASS", [3])
    assert raw.get("data/auth/DB_PASS#3") is None
    assert [v.version for v in encrypted_store.history("auth/DB_PASS")] == [1, 2]
    assert encrypted_store.put("auth/DB_PASS", b"v4").version == 3
    assert encrypted_store.get("auth/DB_PASS").value.reveal() == b"v4"
    with pytest.raises(NotFoundError):  # a number neither listed nor stored is still not found
        encrypted_store.destroy("auth/DB_PASS", [9])


def test_a_write_onto_deleted_metadata_is_an_integrity_error_and_destroy_all_clears_it(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    """`meta/<name>` deleted with its values left: the next write of version 1 collides with
    data/<name>#1. IntegrityError at once; 'destroy --all', which it names, erases the orphans."""
    encrypted_store.put("auth/GONE", VALUE)
    encrypted_store.put("auth/GONE", OTHER_VALUE)
    raw.delete("meta/auth/GONE")
    started = time.monotonic()
    with pytest.raises(IntegrityError, match=r"destroy auth/GONE --all") as caught:
        encrypted_store.put("auth/GONE", b"new")
    assert time.monotonic() - started < 5
    assert "version 1, 2" in str(caught.value) and "no metadata" in str(caught.value)
    encrypted_store.destroy_secret("auth/GONE")
    assert raw.list("data/auth/GONE#") == []
    assert encrypted_store.put("auth/GONE", b"new").version == 1
    with pytest.raises(NotFoundError):
        encrypted_store.destroy_secret("auth/NEVER")


def test_a_version_another_writer_committed_first_is_still_a_race_retried(
    encrypted_store: EncryptedStore, make_store: Callable[[], SecretStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data row of our version present after a lost commit is a rollback only if the metadata
    did not move: another writer's version (data row and metadata together) is retried."""
    encrypted_store.put("race/X", VALUE)
    other = make_store()
    real_commit = encrypted_store._storage.commit
    raced = []

    def commit_after_another_writer(*args: object, **kwargs: object) -> int:
        if not raced:
            raced.append(other.put("race/X", OTHER_VALUE).version)  # takes version 2 first
        return real_commit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(encrypted_store._storage, "commit", commit_after_another_writer)
    assert encrypted_store.put("race/X", b"mine").version == 3
    assert raced == [2]
    other.close()


# ---- listings: kept while nothing changes, decrypted outside the storage's lock ----------------


def test_a_kept_listing_never_shows_metadata_older_than_another_handles_write(
    encrypted_store: EncryptedStore, make_store: Callable[[], SecretStore]
) -> None:
    """The listing is kept while the change head stays put: a change by another handle (another
    connection, as another process's) moves it, so the next list shows that change at once."""
    for index in range(5):
        encrypted_store.put(f"app/K{index}", VALUE, description="first")
    assert [m.description for m in encrypted_store.list("app/")] == ["first"] * 5
    other = make_store()
    try:
        other.update_metadata("app/K2", description="second")
        other.delete("app/K3")
        other.put("app/K9", VALUE)
        listed = {m.name: m for m in encrypted_store.list("app/")}
        assert listed["app/K2"].description == "second"
        assert "app/K3" not in listed and "app/K9" in listed
        assert encrypted_store.list("app/", include_deleted=True)[3].deleted is not None
        other.undelete("app/K3")
        assert "app/K3" in {m.name for m in encrypted_store.list("app/")}
    finally:
        other.close()
    assert [m.name for m in encrypted_store.list("app/")] == sorted(
        m.name for m in encrypted_store.list("app/")
    )


def test_a_listing_after_a_change_decrypts_only_the_changed_rows(
    encrypted_store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metadata decrypted for a listing is kept by its row's revision: every page of the service
    decrypted every secret under the prefix again (O(N) per page, O(N^2) per listing). Fails on
    the previous commit (6 and 6 decryptions, not 0 and 1)."""
    from secrets_manager.store import encrypted

    for index in range(6):
        encrypted_store.put(f"app/K{index}", VALUE)
    encrypted_store.list("app/")
    opened: list[str] = []
    real_open_meta = encrypted._open_meta
    monkeypatch.setattr(
        encrypted,
        "_open_meta",
        lambda keyset, name, record: opened.append(name) or real_open_meta(keyset, name, record),
    )
    assert len(encrypted_store.list("app/")) == 6
    assert opened == []  # nothing changed: the listing kept
    encrypted_store.update_metadata("app/K4", description="changed")
    opened.clear()  # the update's own read
    assert [m.description for m in encrypted_store.list("app/")][4] == "changed"
    assert opened == ["app/K4"]


def test_the_metadata_a_listing_keeps_goes_with_the_secrets_purged_since(
    encrypted_store: EncryptedStore, make_store: Callable[[], SecretStore]
) -> None:
    """The metadata decrypted for listings was kept by row until 200,000 rows: each name that
    came and went (made, deleted, purged by another process, as `purge` from cron) stayed, about
    2 KB a name, and serve's memory grew by megabytes an hour under the soak's names made and
    purged every second (bench/soak.py). A scan drops the rows under its prefix it no longer
    finds. Fails on the previous commit (301 rows kept, not 1: its flat dict of 3-tuples counts
    903 here)."""
    encrypted_store.put("app/KEPT", VALUE)
    encrypted_store.put("other/KEPT", VALUE)
    encrypted_store.put("TOP", VALUE)  # the default namespace: reached by a prefix without '/'
    purger = make_store()  # another process's handle
    try:
        for index in range(300):
            encrypted_store.put(f"app/GONE_{index}", VALUE)
            encrypted_store.list("app/")
            encrypted_store.delete(f"app/GONE_{index}")
            assert len(encrypted_store.list("app/", include_deleted=True)) == 2
            purger.destroy_secret(f"app/GONE_{index}")
        assert [m.name for m in encrypted_store.list("app/")] == ["app/KEPT"]
        kept = encrypted_store._decoded_meta
        assert sum(len(rows) for rows in kept.values()) == 1  # app/KEPT's
        encrypted_store.put("TOP_GONE", VALUE)
        encrypted_store.list("")
        purger.destroy_secret("TOP_GONE")
        assert [m.name for m in encrypted_store.list("")] == ["TOP", "app/KEPT", "other/KEPT"]
        assert sum(len(rows) for rows in kept.values()) == 3
    finally:
        purger.close()


def test_a_listing_decrypts_outside_the_storage_handles_lock(
    encrypted_store: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite snapshot holds its handle's lock: while a listing decrypted every row inside it,
    every other read of the handle (the service's GetSecret, its health probe, the audit anchor)
    waited. The rows are read in the snapshot and decrypted after it. Fails on the previous commit
    (the get waits until the listing ends)."""
    from secrets_manager.store import encrypted

    for index in range(3):
        encrypted_store.put(f"app/K{index}", VALUE)
    encrypted_store.put("other/X", OTHER_VALUE)
    encrypted_store.update_metadata("app/K0", description="moved the head: nothing kept")
    decrypting, release = threading.Event(), threading.Event()
    real_open_meta = encrypted._open_meta

    def slow_open_meta(keyset, name, record):  # type: ignore[no-untyped-def]
        if name.startswith("app/"):  # the listing's rows, not the read's
            decrypting.set()
            release.wait(10)
        return real_open_meta(keyset, name, record)

    monkeypatch.setattr(encrypted, "_open_meta", slow_open_meta)
    listed: list[int] = []
    lister = threading.Thread(target=lambda: listed.append(len(encrypted_store.list("app/"))))
    lister.start()
    try:
        assert decrypting.wait(10)
        read: list[bytes] = []
        reader = threading.Thread(target=lambda: read.append(encrypted_store.get("other/X").value.reveal()))
        reader.start()
        reader.join(5)
        assert read == [OTHER_VALUE], "a read waited for another thread's listing to decrypt"
    finally:
        release.set()
        lister.join(10)
    assert listed == [3]
