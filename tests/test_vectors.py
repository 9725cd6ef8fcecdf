"""Replays the test-vector corpus of docs/format.md ("Test vectors") through the readers.

Each file in tests/vectors/ is one vector with an `expect` field. Record vectors go through
`open_record` with the vector's keyset; password vectors go through `PasswordUnlock.unwrap`;
recovery vectors put their header and `core/recovery` record in a SQLite store and go through
`recover_root`. A bad
vector must fail with exactly the documented error, never another exception and never a value.
The JSON is committed and read as data: if the code's format changes, these tests fail.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.crypto import DataKey, Keyset, KeyStatus, Purpose, derive_unlock_key, open_record
from secrets_manager.crypto.kdf import KdfParams
from secrets_manager.crypto.record import associated_data
from secrets_manager.errors import IntegrityError, InvalidInputError, UnlockError
from secrets_manager.storage import Put
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store.recovery import recover_root
from secrets_manager.store.unlock import PasswordUnlock

VECTORS = Path(__file__).parent / "vectors"
CORPUS = sorted(VECTORS.glob("*.json"))
ERRORS: dict[str, type[Exception]] = {
    "integrity_error": IntegrityError,
    "unlock_error": UnlockError,
    "invalid_input": InvalidInputError,
}


def keyset_of(doc: dict[str, Any]) -> Keyset:
    keys = tuple(
        DataKey(id=k["id"], status=KeyStatus(k["status"]), created=0, material=bytes.fromhex(k["material"]))
        for k in doc["keys"]
    )
    return Keyset(primary_id=doc["primary"], keys=keys)


def replay_record(vector: dict[str, Any]) -> bytes:
    return open_record(
        keyset_of(vector["keyset"]).key_for_decryption,
        Purpose(vector["purpose"]),
        vector["name"],
        vector["version"],
        bytes.fromhex(vector["record"]),
    )


def replay_unlock(vector: dict[str, Any]) -> DataKey:
    return PasswordUnlock(vector["password"]).unwrap(vector["unlock"], created=0)


def replay_recovery(vector: dict[str, Any], directory: Path) -> DataKey:
    """The root key `recover_root` gets from the vector's shares, header and record."""
    storage = SqliteStorage(directory / "vector.db", create=True)
    try:
        entries = [Put("core/header", json.dumps(vector["header"]).encode())]
        if vector["recovery_record"] is not None:
            entries.append(Put("core/recovery", bytes.fromhex(vector["recovery_record"])))
        storage.commit(entries)
        return recover_root(storage, vector["shares"])._root
    finally:
        storage.close()


def check_good(vector: dict[str, Any], directory: Path) -> None:
    if vector["kind"] == "record":
        purpose = Purpose(vector["purpose"])
        ad = associated_data(purpose, vector["key_id"], vector["name"], vector["version"])
        assert ad.hex() == vector["associated_data"]
        assert int.from_bytes(bytes.fromhex(vector["record"])[1:5], "big") == vector["key_id"]
        plaintext = replay_record(vector)
        assert plaintext.hex() == vector["plaintext"]
        if purpose is Purpose.KEYSET:  # the keyset JSON is canonical: parsing and writing it is identity
            assert Keyset.from_bytes(plaintext).to_bytes() == plaintext
    elif vector["kind"] == "recovery":
        root = replay_recovery(vector, directory)
        assert (root.id, root.material.hex()) == (vector["root_key_id"], vector["root_key"])
    else:
        kdf = vector["unlock"]["kdf"]
        params = replace(
            KdfParams(kdf["time_cost"], kdf["memory_cost_kib"], kdf["parallelism"], version=kdf["version"]),
            salt=base64.b64decode(kdf["salt"]),
        )
        assert derive_unlock_key(vector["password"].encode("utf-8"), params).hex() == vector["unlock_key"]
        root = replay_unlock(vector)
        assert root.id == vector["root_key_id"]
        assert root.material.hex() == vector["root_key"]


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_vector(path: Path, tmp_path: Path) -> None:
    vector = json.loads(path.read_text(encoding="utf-8"))
    if vector["expect"] == "ok":
        check_good(vector, tmp_path)
        return
    replays: dict[str, Any] = {
        "record": replay_record,
        "password_unwrap": replay_unlock,
        "recovery": lambda v: replay_recovery(v, tmp_path),
    }
    with pytest.raises(Exception) as caught:  # the exact type is asserted below
        replays[vector["kind"]](vector)
    assert type(caught.value) is ERRORS[vector["expect"]]
    if type(caught.value) is IntegrityError and vector["kind"] == "record":
        assert str(caught.value) == "integrity check failed"  # one opaque error, whatever went wrong


def test_corpus_covers_every_outcome() -> None:
    expects = [json.loads(p.read_text(encoding="utf-8"))["expect"] for p in CORPUS]
    assert len(CORPUS) >= 40
    assert {"ok", "integrity_error", "unlock_error", "invalid_input"} <= set(expects)
