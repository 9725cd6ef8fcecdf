"""`keys rewrap` (and `keys status`'s counts) on PostgreSQL read the records in one pass of a
snapshot and each batch in one query, not one round trip per record: with 15,000 secrets that was
60,000 round trips and 92 s of a 5,000-secret benchmark's `keys rotate --all` + `rewrap --all`."""

from __future__ import annotations

from typing import Any

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.crypto.record import record_key_id
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, keys

PASSWORD = "rewrap test password"
SECRETS = 120


@pytest.fixture
def filled(postgres_cluster: Any) -> Any:
    storage = PostgresStorage(
        postgres_cluster.url(with_password=True), schema=postgres_cluster.new_schema(), create=True
    )
    store = EncryptedStore.create(storage, PasswordUnlock(PASSWORD, kdf.TEST))
    store.put_batch([(f"svc/K{i:03d}", f"value {i}".encode()) for i in range(SECRETS)])
    for i in range(0, SECRETS, 3):
        store.put(f"svc/K{i:03d}", f"second {i}".encode())
    yield store
    store.close()


def test_rewrap_on_postgresql_moves_every_record_reading_each_batch_at_once(
    filled: EncryptedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = filled._keyset_for_read("svc").primary_id
    new = keys.rotate_key(filled, "svc")
    gets: list[str] = []
    get = PostgresStorage.get

    def counted(self: PostgresStorage, key: str) -> Any:
        gets.append(key)
        return get(self, key)

    monkeypatch.setattr(PostgresStorage, "get", counted)
    result = keys.rewrap(filled, "svc", batch_size=50)
    monkeypatch.undo()
    records = SECRETS + SECRETS + SECRETS // 3  # metadata, first versions, second versions
    assert result.rewrapped == records and not result.unreadable
    record_reads = [key for key in gets if key.startswith(("meta/", "data/"))]
    assert len(record_reads) < 10, len(record_reads)  # it was two per record
    primary = result.primary_id
    assert primary == new != old
    gets.clear()
    monkeypatch.setattr(PostgresStorage, "get", counted)
    status = {info.id: info.records for info in keys.key_status(filled, "svc")}
    monkeypatch.undo()
    assert status[primary] == records and status[old] == 0
    assert len([key for key in gets if key.startswith(("meta/", "data/"))]) == 0
    with filled._storage.snapshot() as snapshot:  # type: ignore[attr-defined]
        ids = {
            record_key_id(entry.value)
            for prefix in ("meta/svc/", "data/svc/")
            for _, entry in snapshot.scan(prefix)
        }
    assert ids == {primary}
    for i in range(SECRETS):
        expected = f"second {i}" if i % 3 == 0 else f"value {i}"
        assert filled.get(f"svc/K{i:03d}").value.reveal() == expected.encode()
