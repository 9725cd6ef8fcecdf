"""Reading many current values at once (`read_current`): `export`, `run --service`, `inject` and
the service's BatchGetSecrets read an encrypted store's secrets in a few reads of one snapshot
(SQLite: one read transaction; PostgreSQL: one REPEATABLE READ transaction) instead of a `get`
each, which on PostgreSQL was four round trips per secret. Each secret still gets every check of
`get`, and a prefix is read at one instant: never half before and half after another writer.

On both encrypted stores (a real SQLite file, the tests' private PostgreSQL cluster). The other
writer's commit is put at the exact moment by wrapping the storage's read methods: it lands right
after the first value record of the prefix is read, by whatever path reads it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from secrets_manager.crypto import kdf
from secrets_manager.errors import IntegrityError, NotFoundError
from secrets_manager.storage.postgres import PostgresSnapshot, PostgresStorage
from secrets_manager.storage.sqlite import SqliteSnapshot, SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock, keys
from secrets_manager.store.base import read_current
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import PASSWORD as SERVICE_PASSWORD
from service_fixtures import POLICY, SEED, TD, eventually, in_process_server, make_pki, make_store
from test_cli import PASSWORD, Cli, run_in_process

PAST = datetime(2024, 1, 1, tzinfo=UTC)
NAMES = [f"svc/K{i:02d}" for i in range(8)]


class Place:
    """One encrypted store, as the CLI (`cli`) and the store API (`open()`, a new handle) reach it."""

    def __init__(self, cli: Cli, storage: Callable[[], Any]) -> None:
        self.cli = cli
        self._storage = storage
        self._opened: list[EncryptedStore] = []

    def open(self) -> EncryptedStore:
        store = EncryptedStore.open(self._storage(), PasswordUnlock(PASSWORD, kdf.TEST))
        self._opened.append(store)
        return store

    def raw(self) -> Any:
        """A plain Storage handle on the store: the attacker's (or a broken disk's) view."""
        handle = self._storage()
        self._opened.append(handle)
        return handle

    def close(self) -> None:
        for opened in self._opened:
            opened.close()


@pytest.fixture(params=["sqlite", "postgres"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    cli = Cli(tmp_path / "vault" / "store.db", tmp_path)
    cli.env["SECRETS_MANAGER_AUDIT_FILE"] = str(tmp_path / "audit.jsonl")
    if request.param == "sqlite":
        assert cli("init", "--kdf-profile", "test").code == 0

        def storage() -> Any:
            return SqliteStorage(cli.store)

    else:
        cluster = request.getfixturevalue("postgres_cluster")
        schema = cluster.new_schema()
        EncryptedStore.create(
            PostgresStorage(cluster.url(with_password=True), schema=schema, create=True),
            PasswordUnlock(PASSWORD, kdf.TEST),
        ).close()
        cli.env.update(cluster.env())
        cli.env["SECRETS_MANAGER_STORE"] = f"{cluster.url()}?schema={schema}"

        def storage() -> Any:
            return PostgresStorage(cluster.url(with_password=True), schema=schema)

    made = Place(cli, storage)
    yield made
    made.close()


def mixed(store: EncryptedStore) -> None:
    """A prefix with every case a read of it meets: several versions, a deleted secret, an
    expired one, labels (a pending version beside current), a destroyed current version, a
    secret outside the prefix, and plain ones."""
    store.put_batch([(name, f"first {name}".encode()) for name in NAMES])
    store.put("svc/K01", b"second K01")
    store.put("svc/K01", b"third K01")
    store.delete("svc/K02")
    store.put("svc/K03", b"expired K03", expires=PAST)
    store.stage("svc/K04", b"pending K04")
    store.put("svc/K05", b"second K05")
    store.destroy("svc/K05", [2])  # its current version destroyed: no value to give
    store.put("other/OUTSIDE", b"not under svc/")


def by_get(store: EncryptedStore, names: list[str]) -> list[tuple[str, Any]]:
    """What `get` of each name gives: (name, (version, value, labels, expires)) or the error text."""
    found: list[tuple[str, Any]] = []
    for name in names:
        try:
            secret = store.get(name)
        except NotFoundError as exc:
            found.append((name, str(exc)))
            continue
        found.append((name, (secret.version, secret.value.reveal(), secret.labels, secret.expires)))
    return found


def as_got(reads: list[Any]) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for read in reads:
        if read.error is not None:
            assert read.secret is None
            found.append((read.name, str(read.error)))
            continue
        secret = read.secret
        found.append((read.name, (secret.version, secret.value.reveal(), secret.labels, secret.expires)))
    return found


def test_a_prefix_read_at_once_gives_what_get_gives_for_each_secret(place: Place) -> None:
    store = place.open()
    mixed(store)
    listed = [meta.name for meta in store.list("svc/")]
    assert "svc/K02" not in listed  # deleted: neither listed nor read
    reader = place.open()
    assert as_got(read_current(reader, prefix="svc/")) == by_get(store, listed)
    got = dict(as_got(read_current(reader, prefix="svc/")))
    assert got["svc/K01"][:2] == (3, b"third K01")
    assert got["svc/K03"][3] == PAST  # expired: given, with its expiry, as get gives it
    assert got["svc/K04"][2] == ("current",)
    assert "destroyed" in got["svc/K05"]


def test_names_read_at_once_give_what_get_gives_and_its_errors(place: Place) -> None:
    store = place.open()
    mixed(store)
    names = [*NAMES, "svc/NEVER", "other/OUTSIDE", "svc/K01"]
    reads = read_current(place.open(), names)
    assert [read.name for read in reads] == names
    assert as_got(reads) == by_get(store, names)
    errors = {read.name: str(read.error) for read in reads if read.error is not None}
    assert "undelete" in errors["svc/K02"] and "not found" in errors["svc/NEVER"]


def test_fingerprints_are_those_the_service_audits_a_get_with(place: Place) -> None:
    store = place.open()
    mixed(store)
    for read in read_current(place.open(), NAMES, fingerprints=True):
        if read.error is None:
            assert read.fingerprint == store.get_with_fingerprint(read.name)[1]


def audit_records(place: Place) -> list[dict[str, Any]]:
    path = Path(place.cli.env["SECRETS_MANAGER_AUDIT_FILE"])
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_of_a_mixed_prefix_gives_the_values_and_audit_records_of_a_get_each(
    place: Place, tmp_path: Path
) -> None:
    store = place.open()
    mixed(store)
    out = tmp_path / "svc.json"
    result = place.cli("export", "--service", "svc", "--format", "json", "-o", str(out))
    assert result.code == 0, result.stderr
    readable = [(name, got) for name, got in by_get(store, [m.name for m in store.list("svc/")])]
    readable = [(name, got) for name, got in readable if not isinstance(got, str)]
    assert json.loads(out.read_text()) == {
        name.removeprefix("svc/"): got[1].decode() for name, got in readable
    }
    assert "version 2 of svc/K03 expired" in result.stderr  # warned of, as a get warns of it
    records = [r for r in audit_records(place) if r["operation"] == "export"]
    assert [(r["name"], r["version"], r["outcome"]) for r in records] == [
        (name, got[0], "ok") for name, got in readable
    ]
    for record, (name, _) in zip(records, readable, strict=True):
        assert record["value_hmac"] == store.get_with_fingerprint(name)[1]
    assert not any("first" in line or "third" in line for line in map(json.dumps, audit_records(place)))


@pytest.mark.parametrize("record", ["data/svc/K06#1", "meta/svc/K06"])
def test_a_damaged_record_fails_the_export_naming_it_and_nothing_of_its_value(
    place: Place, record: str
) -> None:
    store = place.open()
    mixed(store)
    raw = place.raw()
    entry = raw.get(record)
    damaged = bytearray(entry.value)
    damaged[-1] ^= 1
    raw.put(record, bytes(damaged))
    result = place.cli("export", "--service", "svc")
    assert result.code == 6, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "svc/K06" in lines[0] and "integrity check failed" in lines[0]
    assert result.stdout == b""
    assert "first" not in result.stderr
    with pytest.raises(IntegrityError, match="svc/K06"):
        store.get("svc/K06")  # as a get of it says


def _land_after_first_value(
    monkeypatch: pytest.MonkeyPatch, prefix: str, write: Callable[[], None]
) -> list[str]:
    """Patch every storage read that can return a value record (a point read or a multi-read,
    in a snapshot or not, SQLite or PostgreSQL) so that `write` runs once, right after the first
    value record under `prefix` is read, by whatever path the reader takes. Returns a list that
    holds "landed" once it has."""
    landed: list[str] = []

    def after(found: Any) -> None:
        keys = found.keys() if isinstance(found, dict) else [] if found is None else [None]
        if landed or not any(key is None or key.startswith("data/" + prefix) for key in keys):
            return
        landed.append("landed")
        write()

    def wrapped(cls: type, method: str, is_get: bool) -> None:
        original = getattr(cls, method)

        def reading(self: Any, arg: Any) -> Any:
            found = original(self, arg)
            if is_get:
                if found is not None and isinstance(arg, str) and arg.startswith("data/" + prefix):
                    after({arg: found})
            else:
                after(found)
            return found

        monkeypatch.setattr(cls, method, reading)

    for cls in (SqliteStorage, SqliteSnapshot, PostgresStorage, PostgresSnapshot):
        wrapped(cls, "get", True)
        if hasattr(cls, "get_many"):
            wrapped(cls, "get_many", False)
    return landed


def test_an_export_is_one_instant_while_another_writer_replaces_every_value(
    place: Place, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other writer's one commit lands after the export read its first value: the file holds
    every value from before it (list then a get each gave the first from before, the rest after)."""
    writer = place.open()
    writer.put_batch([(name, f"before {name}".encode()) for name in NAMES])
    landed = _land_after_first_value(
        monkeypatch,
        "svc/",
        lambda: writer.put_batch([(name, f"after {name}".encode()) for name in NAMES], if_exists="overwrite"),
    )
    out = tmp_path / "svc.json"
    code = run_in_process(
        place.cli, monkeypatch, "export", "--service", "svc", "--format", "json", "-o", str(out)
    )
    assert code == 0
    assert landed == ["landed"]
    exported = json.loads(out.read_text())
    assert exported == {name.removeprefix("svc/"): f"before {name}" for name in NAMES}, exported
    assert writer.get(NAMES[-1]).value.reveal() == f"after {NAMES[-1]}".encode()  # it did land


def test_a_rename_during_the_read_shows_the_secret_once_under_one_name(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A move (new name written, old one deleted, one commit here) landing mid-read: the old name
    alone, as at the instant the read began; never neither (listed as old, read once deleted)."""
    writer = place.open()
    writer.put_batch([(name, f"value {name}".encode()) for name in NAMES])

    def move() -> None:
        writer.put_batch([("svc/Z_MOVED", b"value svc/K05")])
        writer.delete("svc/K05")

    _land_after_first_value(monkeypatch, "svc/", move)
    reads = read_current(place.open(), prefix="svc/")
    assert [read.name for read in reads] == NAMES
    assert all(read.error is None for read in reads)


@pytest.mark.parametrize("when", ["before the snapshot", "mid-read"])
def test_a_root_key_rotation_by_another_process_is_adopted_and_the_read_made_whole(
    place: Place, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """`keys rotate --root` by another handle after the reader opened: landing just before the
    reader's snapshot, the keysets it reads are sealed under a root key it does not hold yet (it
    adopts the header's and reads again); landing mid-read, the snapshot still sees the old one."""
    writer = place.open()
    writer.put_batch([(name, f"value {name}".encode()) for name in NAMES])
    reader = place.open()
    reader.get(NAMES[0])  # its keyset decoded under the old root key
    rotated: list[int] = []

    def rotate() -> None:
        rotated.append(keys.rotate_root_key(writer).new_id)

    if when == "mid-read":
        _land_after_first_value(monkeypatch, "svc/", rotate)
    else:
        cls = type(reader._storage)
        original = cls.snapshot

        def snapshot(self: Any) -> AbstractContextManager[Any]:
            if not rotated:
                rotate()
            return original(self)

        monkeypatch.setattr(cls, "snapshot", snapshot)
    reads = read_current(reader, prefix="svc/")
    monkeypatch.undo()
    assert len(rotated) == 1
    assert [(read.name, read.secret and read.secret.value.reveal()) for read in reads] == [
        (name, f"value {name}".encode()) for name in NAMES
    ]
    assert reader.get(NAMES[1]).value.reveal() == f"value {NAMES[1]}".encode()


def test_a_data_key_rotation_rewrap_and_disable_mid_read_leave_the_read_whole(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The namespace's key rotated, every record rewrapped under the new one and the old key
    disabled, all after the reader read its first value: the snapshot's keyset and records agree."""
    writer = place.open()
    writer.put_batch([(name, f"value {name}".encode()) for name in NAMES])
    old = writer._keyset_for_read("svc").primary_id

    def rotate() -> None:
        keys.rotate_key(writer, "svc")
        assert not keys.rewrap(writer, "svc").unreadable
        keys.disable_key(writer, old, "svc")

    landed = _land_after_first_value(monkeypatch, "svc/", rotate)
    reads = read_current(place.open(), prefix="svc/")
    monkeypatch.undo()
    assert landed == ["landed"]
    assert [(read.name, read.secret and read.secret.value.reveal()) for read in reads] == [
        (name, f"value {name}".encode()) for name in NAMES
    ]


def test_on_postgresql_an_export_is_a_few_statements_not_several_per_secret(
    postgres_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """120 secrets: a `get` each was four statements each (480); one snapshot reads them in a
    handful (its scan, the keyset, the values), whatever the prefix's size."""
    schema = postgres_cluster.new_schema()
    store = EncryptedStore.create(
        PostgresStorage(postgres_cluster.url(with_password=True), schema=schema, create=True),
        PasswordUnlock(PASSWORD, kdf.TEST),
    )
    store.put_batch([(f"svc/K{i:03d}", f"value {i}".encode()) for i in range(120)])
    store.close()
    cli = Cli(tmp_path / "unused.db", tmp_path)
    cli.env.update(postgres_cluster.env())
    cli.env["SECRETS_MANAGER_STORE"] = f"{postgres_cluster.url()}?schema={schema}"
    cli.env["SECRETS_MANAGER_AUDIT_FILE"] = str(tmp_path / "audit.jsonl")
    statements: list[str] = []
    execute = psycopg.Connection.execute

    def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        statements.append(str(query))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", counted)
    out = tmp_path / "svc.env"
    assert run_in_process(cli, monkeypatch, "export", "--service", "svc", "-o", str(out)) == 0
    assert len(out.read_text().splitlines()) == 120
    assert len(statements) < 60, len(statements)


def test_a_batch_get_page_is_one_instant_filtered_by_policy_and_audited_per_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BatchGetSecrets of everything the caller may read (no prefix, as `get_credentials()` of
    every namespace asks): auth's secrets only (the policy's filter), deleted and destroyed ones
    left out, the expired one given, all from the instant before another writer's one commit that
    lands after the first value is read; one `get` record per secret sent, with its version and
    fingerprint, as a `get` of each recorded."""
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    unlock = PasswordUnlock(SERVICE_PASSWORD, kdf.TEST)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), unlock)
    writer = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), unlock)
    try:
        writer.put("auth/DB_PASSWORD", b"auth-db-pass-second")
        writer.put("auth/OLD", b"deleted")
        writer.delete("auth/OLD")
        writer.put("auth/EXPIRED", b"expired value", expires=PAST)
        writer.put("auth/GONE", b"one")
        writer.put("auth/GONE", b"two")
        writer.destroy("auth/GONE", [2])
        sent = {"auth/DB_PASSWORD", "auth/EXPIRED", "auth/JWT_KEY"}
        before = {name: writer.get_with_fingerprint(name) for name in sent}
        landed = _land_after_first_value(
            monkeypatch,
            "auth/",
            lambda: writer.put_batch([(name, b"after") for name in sorted(sent)], if_exists="overwrite"),
        )
        with in_process_server(tmp_path, store, watch_tick=30) as (_running, stub):
            answer = stub("auth").BatchGetSecrets(pb.BatchGetSecretsRequest(page_size=100), timeout=30)
            audit = tmp_path / "in-process.audit.jsonl"
            assert eventually(lambda: '"get"' in audit.read_text().replace('":"', '": "'))
            records = [json.loads(line) for line in audit.read_text().splitlines()]
        monkeypatch.undo()
        assert landed == ["landed"]
        got = {secret.name: (secret.version, secret.value) for secret in answer.secrets}
        assert got == {name: (secret.version, secret.value.reveal()) for name, (secret, _) in before.items()}
        gets = [r for r in records if r.get("operation") == "get"]
        assert sorted((r["name"], r["version"], r["value_hmac"]) for r in gets) == sorted(
            (name, secret.version, fingerprint) for name, (secret, fingerprint) in before.items()
        )
        assert {r["actor"] for r in gets} == {f"spiffe://{TD}/auth"}
        assert not [r for r in records if r.get("operation") == "batch_get"]  # its gets stand for it
    finally:
        store.close()
        writer.close()


@pytest.mark.parametrize("command", ["inject", "run"])
def test_secrets_named_in_a_template_or_to_run_are_read_at_one_instant(
    place: Place, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """`inject`'s references and `run --secret`s, named one by one, are read together: another
    writer's commit after the first value is read does not make the file or the environment half
    old, half new. (`run`'s exec is caught with the environment it was given, and fails as a
    command not found would, so this process goes on.)"""
    writer = place.open()
    writer.put_batch([(name, f"before {name}".encode()) for name in NAMES])
    _land_after_first_value(
        monkeypatch,
        "svc/",
        lambda: writer.put_batch([(name, f"after {name}".encode()) for name in NAMES], if_exists="overwrite"),
    )
    out = tmp_path / "out.txt"
    given: list[bytes] = []
    if command == "inject":
        template = tmp_path / "template"
        template.write_text("".join(f"{{{{ sm://{name} }}}}\n" for name in NAMES))
        assert run_in_process(place.cli, monkeypatch, "inject", "-i", str(template), "-o", str(out)) == 0
        given = out.read_bytes().splitlines()
    else:

        def execve(path: str, argv: list[str], environment: dict[bytes, bytes]) -> None:
            given.extend(environment[f"K{name[-2:]}".encode()] for name in NAMES)
            raise FileNotFoundError(path)

        monkeypatch.setattr(os, "execve", execve)
        secrets = [f"--secret={name}=K{name[-2:]}" for name in NAMES]
        run_in_process(place.cli, monkeypatch, "run", *secrets, "--", sys.executable)
    assert given == [f"before {name}".encode() for name in NAMES]
