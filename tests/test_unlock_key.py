"""UnlockKeyUnlock: a store opened again with the unlock key its password derived, without the
password and without Argon2id (what the CLI's agent keeps, cli/agent.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from secrets_manager.environment import Environment
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    UnlockError,
    UnsafeConfigurationError,
)
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, keys
from secrets_manager.store import unlock as unlock_module
from secrets_manager.store.unlock import (
    UnlockKey,
    UnlockKeyRefused,
    UnlockKeyUnlock,
    unlock_key_header,
)
from secrets_manager.store.url import open_store as open_store_url

OpenStore = Callable[..., EncryptedStore]


def _key_of(open_store: OpenStore) -> UnlockKey:
    store = open_store()
    key = store.unlock_key
    store.close()
    assert key is not None
    return key


def _open_with(path: Path, find: Callable[[str], bytes | None]) -> EncryptedStore:
    storage = SqliteStorage(path)
    try:
        return EncryptedStore.open(storage, UnlockKeyUnlock(find))
    except BaseException:
        storage.close()
        raise


def test_the_derived_key_opens_the_store_with_no_password_and_no_argon2(
    encrypted_store: EncryptedStore,
    open_store: OpenStore,
    tmp_store_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encrypted_store.put("svc/API_KEY", b"sk-live-value")
    key = _key_of(open_store)
    asked: list[str] = []

    def find(header: str) -> bytes | None:
        asked.append(header)
        return key.material if header == key.header else None

    def no_argon2(*_args: object) -> bytes:
        raise AssertionError("Argon2id ran")

    monkeypatch.setattr(unlock_module, "derive_unlock_key", no_argon2)
    store = _open_with(tmp_store_path, find)
    try:
        assert store.get("svc/API_KEY").value.reveal() == b"sk-live-value"
        assert store.kdf_params is not None and store.kdf_params.time_cost == 1  # status shows it
        assert store.unlock_key is None  # nothing derived here: nothing new to give the agent
    finally:
        store.close()
    assert asked == [key.header]


def test_the_key_is_kept_under_the_headers_salt_and_costs_and_never_shown(
    encrypted_store: EncryptedStore, open_store: OpenStore
) -> None:
    key = _key_of(open_store)
    assert '"salt":' in key.header and '"time_cost":1' in key.header
    assert len(key.material) == 32
    assert key.material.hex() not in repr(key) and "<key>" in repr(key)
    assert repr(UnlockKeyUnlock(lambda _h: key.material)) == "UnlockKeyUnlock(<key>)"


def test_no_key_or_a_wrong_key_is_refused_as_not_found_not_as_a_wrong_password(
    encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    for found in (None, b"\x00" * 32, b"short"):
        with pytest.raises(UnlockKeyRefused) as caught:
            _open_with(tmp_store_path, lambda _h, found=found: found)  # type: ignore[misc]
        assert isinstance(caught.value, UnlockError)
        assert "wrong master password" not in str(caught.value)


def test_after_passwd_the_old_key_is_not_asked_for_and_does_not_open_it(
    encrypted_store: EncryptedStore, open_store: OpenStore, tmp_store_path: Path
) -> None:
    old = _key_of(open_store)
    encrypted_store.change_password(b"a new master password")
    storage = SqliteStorage(tmp_store_path)
    entry = storage.get("core/header")
    storage.close()
    assert entry is not None
    new_header = unlock_key_header(json.loads(entry.value)["unlock"])
    assert new_header != old.header  # a new salt: the old key is not found
    with pytest.raises(UnlockKeyRefused):
        _open_with(tmp_store_path, lambda header: old.material if header == old.header else None)
    with pytest.raises(UnlockKeyRefused):  # even if handed out for the new header
        _open_with(tmp_store_path, lambda _header: old.material)


def test_a_root_rotation_gives_a_new_salt_too(
    encrypted_store: EncryptedStore, open_store: OpenStore, tmp_store_path: Path
) -> None:
    old = _key_of(open_store)
    keys.rotate_root_key(encrypted_store)
    with pytest.raises(UnlockKeyRefused):
        _open_with(tmp_store_path, lambda header: old.material if header == old.header else None)
    assert _key_of(open_store).header != old.header


def test_a_handle_opened_with_a_kept_key_says_how_to_go_on_after_a_root_rotation(
    encrypted_store: EncryptedStore, open_store: OpenStore, tmp_store_path: Path
) -> None:
    """A long-running command the agent unlocked (run, watch, inject --watch) holds no password: it
    cannot wrap-open the new header after `keys rotate --root` elsewhere (a new salt). The master
    password did not change; the next prompted command gives the agent the new header's key, and
    the handle goes on with it."""
    encrypted_store.put("svc/API_KEY", b"sk-live-value")
    kept = {}
    old = _key_of(open_store)
    kept[old.header] = old.material
    handle = _open_with(tmp_store_path, kept.get)
    try:
        assert handle.get("svc/API_KEY").value.reveal() == b"sk-live-value"
        keys.rotate_root_key(encrypted_store)  # another process; the password stays the same
        with pytest.raises(ConflictError) as refused:
            handle.get("svc/API_KEY")
        message = str(refused.value)
        assert "and its master password changed" not in message  # it did not
        assert "agent" in message and "asks for the master password" in message
        new = _key_of(open_store)  # a prompted command: the CLI gives the agent this key
        kept[new.header] = new.material
        assert handle.get("svc/API_KEY").value.reveal() == b"sk-live-value"
    finally:
        handle.close()


def test_it_cannot_wrap_a_new_root_key(encrypted_store: EncryptedStore, open_store: OpenStore) -> None:
    key = _key_of(open_store)
    with pytest.raises(InvalidInputError, match="needs the master password"):
        encrypted_store.change_unlock(UnlockKeyUnlock(lambda _h: key.material))


def test_open_store_takes_it_outside_production_only(
    encrypted_store: EncryptedStore, open_store: OpenStore, tmp_store_path: Path
) -> None:
    encrypted_store.put("svc/X", b"x")
    key = _key_of(open_store)

    def no_password() -> bytes:
        raise AssertionError("the password was asked for")

    source = UnlockKeyUnlock(lambda _h: key.material)
    store = open_store_url(
        str(tmp_store_path), no_password, environment=Environment.DEVELOPMENT, actor="me", unlock_key=source
    )
    try:
        assert store.get("svc/X").value.reveal() == b"x"
    finally:
        store.close()
    with pytest.raises(UnsafeConfigurationError, match="production"):
        open_store_url(
            str(tmp_store_path),
            no_password,
            environment=Environment.PRODUCTION,
            actor="me",
            unlock_key=source,
        )


def test_a_damaged_header_is_an_integrity_error_not_a_miss() -> None:
    with pytest.raises(IntegrityError):
        unlock_key_header({"kind": "password", "kdf": {"algorithm": "argon2id"}})
    with pytest.raises(UnlockKeyRefused):
        unlock_key_header({"kind": "aws-kms"})


def test_a_password_source_has_no_key_before_it_opened_a_header() -> None:
    assert PasswordUnlock("pw").unlock_key is None
