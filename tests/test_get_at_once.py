"""One `get` of an encrypted store reads its secret at one instant, and on PostgreSQL in one
statement: the metadata, the namespace's keyset, the value record and the change head (the read
cache's tag) together, where it was four (the change head, metadata and keyset, the value, the
change head again), each a network round trip to the database.

On both encrypted stores (a real SQLite file, the tests' private PostgreSQL cluster). Another
writer's commit is put at the exact moment by wrapping the storage's read methods: it lands right
after the first read that returned the secret's metadata, by whatever path reads it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from secrets_manager.crypto import kdf
from secrets_manager.errors import IntegrityError, NotFoundError
from secrets_manager.storage import postgres as pg_storage
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, keys
from test_cli import PASSWORD as CLI_PASSWORD
from test_cli import Cli

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
    damaged (exit 6). Read at one instant it is the value from before (PostgreSQL: one statement),
    or from after (SQLite: the metadata read again once the digest does not match): whole."""
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
    expected = b"old value" if place.kind == "postgres" else b"new value"
    assert (secret.version, secret.value.reveal()) == (1, expected)
    assert reader.get(NAME).value.reveal() == b"new value"  # it did land, and is read next


@pytest.mark.parametrize("change", ["data key rotated, rewrapped, disabled", "root key rotated"])
def test_a_key_rotation_right_after_the_metadata_is_read_leaves_the_get_whole(
    place: Place, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    writer = place.open()
    writer.put(NAME, b"first")
    writer.put(NAME, b"second")
    reader = place.open()
    old = writer._keyset_for_read("svc").primary_id

    def rotate() -> None:
        if change == "root key rotated":
            keys.rotate_root_key(writer)
            return
        keys.rotate_key(writer, "svc")
        assert not keys.rewrap(writer, "svc").unreadable
        keys.disable_key(writer, old, "svc")

    reader.get(NAME)  # its keyset decoded and cached under the old keys
    writer.put("other/CHANGE", b"moves the change head")  # so the next get reads the store
    landed = _land_after_the_metadata_is_read(monkeypatch, NAME, rotate)
    secret = reader.get(NAME)
    monkeypatch.undo()
    assert landed == ["landed"]
    assert (secret.version, secret.value.reveal(), secret.labels) == (2, b"second", ("current",))
    assert reader.get(NAME, version=1).value.reveal() == b"first"


class Counted:
    """Statements (psycopg `Cursor.execute`) and round trips (waits for the server's answer: each
    statement, BEGIN, COMMIT) on the store's PostgreSQL connections."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.statements: list[str] = []
        self.round_trips = 0
        execute = psycopg.Cursor.execute
        wait = pg_storage._Connection.wait

        def counted_execute(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(cursor.connection, pg_storage._Connection):
                self.statements.append(str(query))
            return execute(cursor, query, *args, **kwargs)

        def counted_wait(conn: Any, *args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            return wait(conn, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", counted_execute)
        monkeypatch.setattr(pg_storage._Connection, "wait", counted_wait)

    def reset(self) -> None:
        self.statements.clear()
        self.round_trips = 0


def test_on_postgresql_a_get_is_one_statement_and_one_round_trip(
    postgres_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get the read cache does not hold: of the current version, of a version by number, of a
    secret that does not exist, one statement each; of a secret whose current version is not its
    newest record (a version staged beside it), two. Before, each was four: the change head,
    metadata and keyset, the value, the change head again. One the cache holds: the head alone
    while nothing changed; the head, then the whole read, once something did."""
    place = _on_postgres(postgres_cluster)
    writer = place.open()
    writer.put(NAME, b"one")
    writer.put(NAME, b"two")
    writer.put("svc/ROTATING", b"current")
    writer.stage("svc/ROTATING", b"pending")
    reader = place.open()  # its connection opened by reading the header: nothing cached
    counted = Counted(monkeypatch)
    for read, statements in [
        (lambda: reader.get(NAME), 1),
        (lambda: reader.get(NAME, version=1), 1),
        (lambda: reader.get("svc/ROTATING"), 2),
        (lambda: reader.get("svc/ROTATING", label="pending"), 1),
    ]:
        writer.put("other/CHANGE", b"x")  # the change head moves
        counted.reset()
        read()
        assert (len(counted.statements), counted.round_trips) == (statements, statements), counted.statements
    counted.reset()
    with pytest.raises(NotFoundError, match="not found"):
        reader.get("svc/NEVER")
    assert (len(counted.statements), counted.round_trips) == (1, 1)
    reader.get(NAME)
    counted.reset()
    assert reader.get(NAME).value.reveal() == b"two"  # cached, nothing changed: the head alone
    assert (len(counted.statements), counted.round_trips) == (1, 1)
    assert "changes" in counted.statements[0] and "entries" not in counted.statements[0]
    writer.put(NAME, b"three")
    counted.reset()
    assert reader.get(NAME).value.reveal() == b"three"  # cached, then changed: head, whole read
    assert (len(counted.statements), counted.round_trips) == (2, 2)
    place.close()


@pytest.mark.parametrize(
    "record", ["data/svc/DB_PASSWORD#2", "meta/svc/DB_PASSWORD", "core/keyset/svc", "missing value"]
)
def test_a_damaged_record_fails_the_get_naming_it(place: Place, record: str) -> None:
    """Damage found in one read is damage: the error names the record, as before."""
    writer = place.open()
    writer.put(NAME, b"one")
    writer.put(NAME, b"two")
    raw = place.raw()
    if record == "missing value":
        raw.delete("data/svc/DB_PASSWORD#2")
        needle = "the value of version 2 of 'svc/DB_PASSWORD' is missing"
    else:
        entry = raw.get(record)
        damaged = bytearray(entry.value)
        damaged[-1] ^= 1
        raw.put(record, bytes(damaged))
        needle = {"d": "version 2 of 'svc/DB_PASSWORD' is damaged", "m": "the metadata of", "c": "keyset"}[
            record[0]
        ]
    with pytest.raises(IntegrityError, match=needle):
        place.open().get(NAME)


def test_what_a_get_refuses_it_refuses_alike_on_both_stores(place: Place) -> None:
    writer = place.open()
    writer.put(NAME, b"one")
    writer.put(NAME, b"two")
    writer.put("svc/GONE", b"x")
    writer.delete("svc/GONE")
    writer.put("svc/DESTROYED", b"x")
    writer.put("svc/DESTROYED", b"y")
    writer.destroy("svc/DESTROYED", [2])
    reader = place.open()
    refusals = {
        "svc/NEVER": "secret 'svc/NEVER' not found",
        "svc/GONE": "is deleted; 'undelete svc/GONE' restores it",
        "svc/DESTROYED": r"the current version \(2\) of 'svc/DESTROYED' was destroyed",
    }
    for name, needle in refusals.items():
        with pytest.raises(NotFoundError, match=needle):
            reader.get(name)
    with pytest.raises(NotFoundError, match="has no version 7"):
        reader.get(NAME, version=7)
    with pytest.raises(NotFoundError, match="no version labelled 'pending'"):
        reader.get(NAME, label="pending")
    previous = reader.get(NAME, label="previous")
    assert (previous.version, previous.value.reveal(), previous.labels) == (1, b"one", ("previous",))


def test_the_clis_get_on_postgresql_keeps_its_exit_codes_messages_and_audit_records(
    postgres_cluster: Any, tmp_path: Any
) -> None:
    """`secrets-manager get` (a real process) on PostgreSQL: the value and one `get` audit record
    with its version and fingerprint; not found, deleted and a destroyed current version exit 3;
    a damaged value exits 6 in one line naming it, with nothing of it printed."""
    schema = postgres_cluster.new_schema()
    url = postgres_cluster.url(with_password=True)
    unlock = PasswordUnlock(CLI_PASSWORD, kdf.TEST)
    store = EncryptedStore.create(PostgresStorage(url, schema=schema, create=True), unlock)
    store.put(NAME, b"first value")
    store.put(NAME, b"second value")
    store.put("svc/GONE", b"x")
    store.delete("svc/GONE")
    store.put("svc/DESTROYED", b"x")
    store.destroy("svc/DESTROYED", [1])
    store.put("svc/DAMAGED", b"damaged value")
    cli = Cli(tmp_path / "unused.db", tmp_path)
    cli.env.update(postgres_cluster.env())
    cli.env["SECRETS_MANAGER_STORE"] = f"{postgres_cluster.url()}?schema={schema}"
    audit = tmp_path / "audit.jsonl"
    cli.env["SECRETS_MANAGER_AUDIT_FILE"] = str(audit)
    result = cli("get", NAME)
    assert (result.code, result.stdout.strip()) == (0, b"second value"), result.stderr
    gets = [json.loads(line) for line in audit.read_text().splitlines()]
    gets = [record for record in gets if record["operation"] == "get"]
    fingerprint = store.get_with_fingerprint(NAME)[1]
    assert [(r["name"], r["version"], r["outcome"], r["value_hmac"]) for r in gets] == [
        (NAME, 2, "ok", fingerprint)
    ]
    for name, needle in [
        ("svc/NEVER", "not found"),
        ("svc/GONE", "is deleted"),
        ("svc/DESTROYED", "the current version (1) of 'svc/DESTROYED' was destroyed"),
    ]:
        result = cli("get", name)
        assert result.code == 3 and needle in result.stderr, (name, result.code, result.stderr)
    raw = PostgresStorage(url, schema=schema)
    entry = raw.get("data/svc/DAMAGED#1")
    assert entry is not None
    raw.put("data/svc/DAMAGED#1", entry.value[:-1] + bytes([entry.value[-1] ^ 1]))
    raw.close()
    result = cli("get", "svc/DAMAGED")
    lines = result.stderr.strip().splitlines()
    assert result.code == 6 and len(lines) == 1, result.stderr
    assert "version 1 of 'svc/DAMAGED' is damaged" in lines[0]
    assert result.stdout == b"" and "damaged value" not in result.stderr
    store.close()
