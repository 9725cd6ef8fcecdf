"""A cryptographer's review of the format (docs/format.md), as an attacker who can read and write
the storage but does not know the master password: what such a person can and cannot do to
records, the header's KDF parameters, and the keys, against real store files."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sqlite3
import subprocess
from pathlib import Path

import pytest

from postgres_cluster import PostgresCluster
from secrets_manager.crypto import Purpose, kdf, open_record, seal_record
from secrets_manager.crypto.stream import SEALED_CHUNK_SIZE
from secrets_manager.errors import IntegrityError, NotFoundError
from secrets_manager.storage import Storage
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.backup import BackupDamagedError, read_backup, write_backup
from service_fixtures import SCRIPT

PASSWORD = "the master password"
VALUE = b"review-SEEKRIT-value"


def _cli_env(directory: Path, store: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "SECRETS_MANAGER_STORE": str(store),
        "MASTER_PASSWORD": PASSWORD,
    }


def _run(
    env: dict[str, str], *args: str, input: bytes = b"", address_space: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    def limit() -> None:
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    proc = subprocess.run(
        [str(SCRIPT), *args], input=input, capture_output=True, env=env, preexec_fn=limit, timeout=120
    )
    assert b"Traceback" not in proc.stderr, proc.stderr
    return proc


def _entries(path: Path) -> dict[str, bytes]:
    with sqlite3.connect(path) as db:
        return {key: bytes(value) for key, value in db.execute("SELECT key, value FROM entries")}


def _edit_header_kdf(path: Path, **kdf: int) -> None:
    """What someone who may write the store file does to the header's (unencrypted) KDF object."""
    header = json.loads(_entries(path)["core/header"])
    header["unlock"]["kdf"].update(kdf)
    doc = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET value = ? WHERE key = 'core/header'", (doc,))


def test_a_header_asking_argon2id_for_more_memory_than_the_process_has_is_a_one_line_error(
    tmp_path: Path,
) -> None:
    """Within the bounds a reader accepts (1 GiB), a doctored header can still ask for more memory
    than a process may take (a container's limit): argon2 then raises HashingError, which the old
    code let through as "internal error (HashingError) ... report it". Now: exit 1, one line
    naming the parameters and what to do, the store untouched."""
    store = tmp_path / "store.db"
    env = _cli_env(tmp_path, store)
    assert _run(env, "init", "--kdf-profile", "test").returncode == 0
    assert _run(env, "store", "svc/a", input=VALUE).returncode == 0
    _edit_header_kdf(store, memory_cost_kib=1024 * 1024, time_cost=1, parallelism=1)
    before = _entries(store)
    proc = _run(env, "get", "svc/a", address_space=768 * 1024 * 1024)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "internal error" not in err
    assert "Argon2id could not run with the parameters it was given (t=1, m=1048576 KiB, p=1)" in err
    assert "restore it from a backup" in err
    assert len(err.strip().splitlines()) == 1, err
    assert VALUE.decode() not in err and PASSWORD not in err
    assert _entries(store) == before


# ---- moving and replaying records (docs/format.md 5.2, 13) ------------------------------------


def _value(storage: Storage, key: str) -> bytes:
    entry = storage.get(key)
    assert entry is not None, key
    return entry.value


def test_a_metadata_record_moved_into_a_value_row_and_back_does_not_open(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    """Same key, same name: only the purpose (and version) in the associated data tell them apart."""
    encrypted_store.put("svc/a", VALUE)
    meta, data = _value(raw, "meta/svc/a"), _value(raw, "data/svc/a#1")
    raw.put("data/svc/a#1", meta)
    with pytest.raises(IntegrityError, match="integrity check failed"):
        encrypted_store.get("svc/a")
    raw.put("data/svc/a#1", data)
    raw.put("meta/svc/a", data)
    with pytest.raises(IntegrityError, match="integrity check failed"):
        encrypted_store.describe("svc/a")


def test_a_record_of_another_store_does_not_open_under_the_same_name(
    encrypted_store: EncryptedStore, raw: SqliteStorage, tmp_path: Path
) -> None:
    """Another store (its own root key, keysets): same name, version and namespace, no key in common."""
    other_storage = SqliteStorage(tmp_path / "other.db", create=True)
    other = EncryptedStore.create(other_storage, PasswordUnlock("the master password", kdf.TEST))
    try:
        other.put("svc/a", b"the other store's value")
        encrypted_store.put("svc/a", VALUE)
        raw.put("data/svc/a#1", _value(other_storage, "data/svc/a#1"))
        with pytest.raises(IntegrityError, match="integrity check failed"):
            encrypted_store.get("svc/a")
        raw.put("meta/svc/a", _value(other_storage, "meta/svc/a"))
        with pytest.raises(IntegrityError, match="integrity check failed"):
            encrypted_store.describe("svc/a")
    finally:
        other.close()


def test_a_destroyed_version_put_back_is_not_served(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    """Its metadata says destroyed: the row is never read, whatever the storage puts there."""
    encrypted_store.put("svc/a", b"old value")
    encrypted_store.put("svc/a", VALUE)
    saved = _value(raw, "data/svc/a#1")
    encrypted_store.destroy("svc/a", [1])
    raw.put("data/svc/a#1", saved)
    with pytest.raises(NotFoundError, match="version 1 of 'svc/a' was destroyed"):
        encrypted_store.get("svc/a", version=1)
    assert encrypted_store.get("svc/a").value.reveal() == VALUE


def _replay_an_erased_namesake(store: EncryptedStore, raw: Storage) -> None:
    """`destroy --all` forgets a secret's metadata, so the name starts again at version 1, under the
    same namespace key: the old `data/svc/a#1` has the very (purpose, name, version, key) the new one
    has, and opened as the new current value on the old code, silently. Each version's metadata
    now carries the SHA-256 of its value (format.md 7), and a value that does not match is damage."""
    store.put("svc/a", b"the revoked credential")
    saved = _value(raw, "data/svc/a#1")
    store.destroy_secret("svc/a")
    store.put("svc/a", VALUE)
    entry = raw.get("data/svc/a#1")
    assert entry is not None
    raw.put("data/svc/a#1", saved, expect=entry.revision)
    with pytest.raises(IntegrityError, match=r"version 1 of 'svc/a'.*integrity check failed"):
        store.get("svc/a")
    with pytest.raises(IntegrityError, match=r"version 1 of 'svc/a'.*integrity check failed"):
        store.get("svc/a", version=1)


def test_a_value_of_a_purged_secret_replayed_into_its_recreated_namesake_is_refused(
    encrypted_store: EncryptedStore, raw: SqliteStorage, tmp_path: Path
) -> None:
    _replay_an_erased_namesake(encrypted_store, raw)
    with pytest.raises(IntegrityError):  # and a backup refuses to carry it
        write_backup(encrypted_store, tmp_path / "backup.smb")
    assert not (tmp_path / "backup.smb").exists()


def test_the_same_replay_on_postgresql_is_refused(postgres_cluster: PostgresCluster) -> None:
    """The attacker as the database administrator: the same rows, in a PostgreSQL schema."""
    schema = postgres_cluster.new_schema()
    url = postgres_cluster.url(with_password=True)
    store = EncryptedStore.create(
        PostgresStorage(url, schema=schema, create=True), PasswordUnlock(PASSWORD, kdf.TEST)
    )
    raw = PostgresStorage(url, schema=schema)
    try:
        _replay_an_erased_namesake(store, raw)
    finally:
        raw.close()
        store.close()


# ---- backups (docs/backup-format.md 6) -----------------------------------------------------------


def _split_backup(data: bytes) -> tuple[bytes, list[bytes]]:
    """The version and header lines, and the sealed chunks after them."""
    cut = data.index(b"\n", data.index(b"\n") + 1) + 1
    payload = data[cut:]
    return data[:cut], [payload[i : i + SEALED_CHUNK_SIZE] for i in range(0, len(payload), SEALED_CHUNK_SIZE)]


@pytest.mark.parametrize("password", [None, b"a backup password"], ids=["store", "password"])
def test_a_chunk_of_another_backup_of_the_same_store_does_not_open(
    password: bytes | None, encrypted_store: EncryptedStore, store_password: str, tmp_path: Path
) -> None:
    """Two backups of one store, taken one after the other: same root key, same content. Each has
    its own file key and header (hence AD), so a chunk spliced from one into the other fails, at
    the same place or any other, as does the first backup's header over the second's chunks."""
    for n in range(3):
        encrypted_store.put(f"svc/big{n}", bytes([n]) * 60000)
    first, second = tmp_path / "first.smb", tmp_path / "second.smb"
    for path in (first, second):
        write_backup(encrypted_store, path, password=password, kdf=kdf.TEST)
    opener = store_password.encode() if password is None else password
    assert len(read_backup(first, opener).secrets) == 3
    head_a, chunks_a = _split_backup(first.read_bytes())
    _, chunks_b = _split_backup(second.read_bytes())
    assert len(chunks_a) == len(chunks_b) >= 3
    spliced = tmp_path / "spliced.smb"
    for forged in (
        head_a + chunks_b[0] + b"".join(chunks_a[1:]),
        head_a + b"".join(chunks_a[:-1]) + chunks_b[-1],
        head_a + b"".join(chunks_b),
    ):
        spliced.write_bytes(forged)
        with pytest.raises(BackupDamagedError):
            read_backup(spliced, opener)


def test_a_version_written_before_value_digests_still_reads(
    encrypted_store: EncryptedStore, raw: SqliteStorage
) -> None:
    """Metadata of an older build has no `sha256` for its versions (format.md 7): nothing to check."""
    encrypted_store.put("svc/a", VALUE)
    keyset = encrypted_store._keyset_for_read("svc")
    doc = json.loads(
        open_record(keyset.key_for_decryption, Purpose.SECRET_METADATA, "svc/a", 0, _value(raw, "meta/svc/a"))
    )
    assert set(doc["versions"]["1"]) == {"created", "created_by", "destroyed", "sha256"}
    del doc["versions"]["1"]["sha256"]
    older = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    raw.put("meta/svc/a", seal_record(keyset.primary, Purpose.SECRET_METADATA, "svc/a", 0, older))
    assert encrypted_store.get("svc/a").value.reveal() == VALUE


def test_the_value_digest_is_never_shown(encrypted_store: EncryptedStore) -> None:
    """A SHA-256 of a value tests guesses of it: not in the metadata the store hands out, nor in
    the repr of its metadata document (which an assertion or a debug log could print)."""
    encrypted_store.put("svc/a", VALUE)
    digest = hashlib.sha256(VALUE).hexdigest()
    _, meta = encrypted_store._read_meta("svc/a")
    assert meta is not None and meta.versions[1]["sha256"] == digest
    assert digest not in repr(meta)
    assert digest not in repr(encrypted_store.describe("svc/a"))


def _rewrite_header_text(path: Path, old: bytes, new: bytes) -> None:
    header = _entries(path)["core/header"]
    assert old in header
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET value = ? WHERE key = 'core/header'", (header.replace(old, new, 1),))


@pytest.mark.parametrize("number", [b"Infinity", b"NaN", b"1e400"])
@pytest.mark.parametrize("field", [b"memory_cost_kib", b"time_cost", b"root_key_id", b"created"])
def test_a_header_number_python_reads_as_infinite_is_damage_not_an_internal_error(
    field: bytes, number: bytes, tmp_path: Path
) -> None:
    """JSON has no NaN or Infinity, and 1e400 is no float; Python's reader took them, and int() of
    them raised OverflowError: 'internal error ... report it' on the old code (exit 1). Now the
    header is damaged (exit 6), before any password is asked for or Argon2id is run."""
    store = tmp_path / "store.db"
    env = _cli_env(tmp_path, store)
    assert _run(env, "init", "--kdf-profile", "test").returncode == 0
    assert _run(env, "store", "svc/a", input=VALUE).returncode == 0
    header = _entries(store)["core/header"]
    start = header.index(b'"' + field + b'":') + len(field) + 3
    end = start
    while header[end : end + 1].isdigit():
        end += 1
    _rewrite_header_text(store, header[start - len(field) - 3 : end], b'"' + field + b'":' + number)
    before = _entries(store)
    for args in (("get", "svc/a"), ("status",)):
        proc = _run(env, *args)
        err = proc.stderr.decode()
        assert proc.returncode == 6, err
        assert "internal error" not in err and "integrity check failed" in err
    assert _entries(store) == before


def test_a_backup_header_number_python_reads_as_infinite_is_damage(tmp_path: Path) -> None:
    """The backup header must be canonical JSON, which json.dumps(inf) ('Infinity') passed."""
    store = tmp_path / "store.db"
    env = _cli_env(tmp_path, store)
    (tmp_path / "backup-password").write_text("a backup password")
    (tmp_path / "backup-password").chmod(0o600)
    assert _run(env, "init", "--kdf-profile", "test").returncode == 0
    assert _run(env, "store", "svc/a", input=VALUE).returncode == 0
    backup = tmp_path / "b.smb"
    assert (
        _run(
            env, "backup", str(backup), "--backup-password-file", str(tmp_path / "backup-password")
        ).returncode
        == 0
    )
    data = backup.read_bytes()
    start = data.index(b'"time_cost":')
    end = data.index(b",", start)
    backup.write_bytes(data[:start] + b'"time_cost":Infinity' + data[end:])
    proc = _run(
        env, "backup", "verify", str(backup), "--backup-password-file", str(tmp_path / "backup-password")
    )
    err = proc.stderr.decode()
    assert proc.returncode == 6, err
    assert "internal error" not in err and f"backup {backup} is damaged" in err


def test_a_header_nested_deeper_than_the_parser_recurses_is_damage(tmp_path: Path) -> None:
    """'[[[[…' in the header made json raise RecursionError: 'internal error' on the old code."""
    store = tmp_path / "store.db"
    env = _cli_env(tmp_path, store)
    assert _run(env, "init", "--kdf-profile", "test").returncode == 0
    assert _run(env, "store", "svc/a", input=VALUE).returncode == 0
    with sqlite3.connect(store) as db:
        deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        db.execute("UPDATE entries SET value = ? WHERE key = 'core/header'", (deep,))
    for args in (("get", "svc/a"), ("status",)):
        proc = _run(env, *args)
        err = proc.stderr.decode()
        assert proc.returncode == 6, err
        assert "internal error" not in err and "integrity check failed" in err
