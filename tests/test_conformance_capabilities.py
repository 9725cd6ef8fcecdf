"""The conformance suite and the capabilities a store declares it lacks: a declared capability is
never a silent skip. The operation must fail with UnsupportedOperationError saying "not supported by
this store", and change nothing; a store that declares a lack and then does something else fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.errors import InvalidInputError, UnsupportedOperationError
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, Secret, SecretStore
from secrets_manager.store.base import PENDING, Capability, unsupported_capabilities
from secrets_manager.store.testing import check_secret_store, run_check

MakeStore = Callable[[], SecretStore]


class CannotDestroyVersions(EncryptedStore):
    unsupported_capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.DESTROY_VERSION})

    def destroy(self, name: str, versions: Iterable[int]) -> None:
        raise UnsupportedOperationError("destroying single versions is not supported by this store")


class ClaimsButDestroys(EncryptedStore):
    unsupported_capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.DESTROY_VERSION})


class RefusesVaguely(EncryptedStore):
    unsupported_capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.DESTROY_VERSION})

    def destroy(self, name: str, versions: Iterable[int]) -> None:
        raise InvalidInputError("no")


class NoPendingLabel(EncryptedStore):
    unsupported_capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.PENDING_LABEL})

    def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        if label == PENDING:
            raise UnsupportedOperationError("the pending label is not supported by this store")
        return super().get(name, version=version, label=label)


class ClaimsNoPendingButLooks(EncryptedStore):
    unsupported_capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.PENDING_LABEL})


class NoEmptyValues(EncryptedStore):
    unsupported_capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EMPTY_VALUE})

    def put(self, name: str, value: bytes, **options: object) -> object:  # type: ignore[override]
        if value == b"":
            raise UnsupportedOperationError("an empty value is not supported by this store")
        return super().put(name, value, **options)  # type: ignore[arg-type]


class UnknownCapability(EncryptedStore):
    unsupported_capabilities: ClassVar[frozenset[str]] = frozenset({"time-travel"})  # type: ignore[assignment]


@pytest.fixture
def make(
    encrypted_store: EncryptedStore, tmp_store_path: Path, store_password: str
) -> Callable[[type[EncryptedStore]], MakeStore]:
    def factory(cls: type[EncryptedStore]) -> MakeStore:
        return lambda: cls.open(SqliteStorage(tmp_store_path), PasswordUnlock(store_password, kdf.TEST))

    return factory


def test_a_store_that_lacks_a_capability_and_says_so_passes(make: Callable[..., MakeStore]) -> None:
    for cls in (CannotDestroyVersions, NoPendingLabel, NoEmptyValues):
        check_secret_store(make(cls))


def test_the_reference_store_lacks_nothing(encrypted_store: EncryptedStore) -> None:
    assert unsupported_capabilities(encrypted_store) == frozenset()


def test_declaring_a_lack_and_doing_it_anyway_fails(make: Callable[..., MakeStore]) -> None:
    with pytest.raises(
        AssertionError, match=r"destroy of one version \(declared unsupported\): expected Unsupported"
    ):
        run_check(make(ClaimsButDestroys), "destroy-versions")
    with pytest.raises(AssertionError, match="get of the pending label"):
        run_check(make(ClaimsNoPendingButLooks), "get-version-label")


def test_a_refusal_must_say_not_supported_by_this_store(make: Callable[..., MakeStore]) -> None:
    with pytest.raises(AssertionError, match="expected UnsupportedOperationError, got InvalidInputError"):
        run_check(make(RefusesVaguely), "destroy-versions")


def test_an_unknown_capability_is_refused(make: Callable[..., MakeStore]) -> None:
    with pytest.raises(AssertionError, match="time-travel"):
        check_secret_store(make(UnknownCapability))


def test_unsupported_is_invalid_input_with_exit_code_2() -> None:
    assert issubclass(UnsupportedOperationError, InvalidInputError)
    assert UnsupportedOperationError.exit_code == 2
