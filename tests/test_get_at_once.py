"""One `get` of an encrypted store gives a whole secret while another writer commits: never the
metadata of before with a value of after.

On both encrypted stores (a real SQLite file, the tests' private PostgreSQL cluster). Another
writer's commit is put at the exact moment by wrapping the storage's read methods: it lands right
after the first read that returned the secret's metadata, by whatever path reads it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

PASSWORD = "get at once password"
NAME = "svc/DB_PASSWORD"


class Place:
    """One encrypted store: handles on it (`open`), and its raw storage (`raw`)."""

    def __init__(self, kind: str, storage: Callable[[], Any]) -> None:
        self.kind = kind
        self._storage = storage
        self._opened: list[Any] = []

    def open(self) -> EncryptedStore:
        store = EncryptedStore.open(self._storage(), PasswordUnlock(PASSWORD, kdf.TEST))
        self._opened.append(store)
        return store

    def raw(self) -> Any:
        handle = self._storage()
        self._opened.append(handle)
        return handle

    def close(self) -> None:
        for opened in self._opened:
            opened.close()


@pytest.fixture(params=["sqlite", "postgres"])
def place(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Place]:
    if request.param == "sqlite":
        path = tmp_path / "store.db"
        EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(PASSWORD, kdf.TEST)).close()

        def storage() -> Any:
            return SqliteStorage(path)

        made = Place("sqlite", storage)
    else:
        made = _on_postgres(request.getfixturevalue("postgres_cluster"))
    yield made
    made.close()


def _on_postgres(cluster: Any) -> Place:
    schema = cluster.new_schema()
    url = cluster.url(with_password=True)
    EncryptedStore.create(
        PostgresStorage(url, schema=schema, create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    ).close()
    return Place("postgres", lambda: PostgresStorage(url, schema=schema))


def _land_after_the_metadata_is_read(
    monkeypatch: pytest.MonkeyPatch, name: str, write: Callable[[], None]
) -> list[str]:
    """Patch every storage read that can return `name`'s metadata record (a point read, a
    multi-read, a read at once; SQLite or PostgreSQL) so that `write` runs once, right after the
    first of them that returned it. Returns a list that holds "landed" once it has."""
    landed: list[str] = []
    wanted = "meta/" + name

    def after(found_keys: Any) -> None:
        if not landed and wanted in found_keys:
            landed.append("landed")
            write()

    def wrapped(cls: type, method: str) -> None:
        original = getattr(cls, method)

        def reading(self: Any, arg: Any, *args: Any, **kwargs: Any) -> Any:
            found = original(self, arg, *args, **kwargs)
            if method == "get":
                after([arg] if found is not None else [])
            elif isinstance(found, dict):
                after(found.keys())
            else:
                after(found.entries.keys())
            return found

        monkeypatch.setattr(cls, method, reading)

    for cls in (SqliteStorage, PostgresStorage):
        for method in ("get", "get_many", "read_at_once"):
            if hasattr(cls, method):
                wrapped(cls, method)
    return landed


def test_a_namesake_written_right_after_the_metadata_is_read_is_no_integrity_failure(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`destroy --all` then a new `store` of the same name, landing after the reader read the
    metadata: the new secret's version 1 is another value under the same name, version and key.
    Read with the old metadata (a mixed view) its digest does not match, and the get failed as
    damaged (exit 6). The metadata is now read again once the digest does not match: a newer
    record means another writer, and the get reads again, whole."""
    writer = place.open()
    writer.put(NAME, b"old value")
    reader = place.open()

    def replace() -> None:
        writer.destroy_secret(NAME)
        writer.put(NAME, b"new value")

    landed = _land_after_the_metadata_is_read(monkeypatch, NAME, replace)
    secret = reader.get(NAME)
    monkeypatch.undo()
    assert landed == ["landed"]
    assert (secret.version, secret.value.reveal()) == (1, b"new value")
    assert reader.get(NAME).value.reveal() == b"new value"  # it did land, and is read next
