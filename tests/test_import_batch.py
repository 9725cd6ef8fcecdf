"""`import` into our encrypted store is one commit (`EncryptedStore.put_batch`): all of the file's
secrets or none, on SQLite and on PostgreSQL, with a record of each appended once it landed; a
writer that changes one of its names meanwhile is neither clobbered nor lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.errors import SecretStateError, StorageError
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.base import BatchWriter, SecretExistsError

PASSWORD = "batch test password"
SCRIPT = Path(sys.executable).with_name("secrets-manager")

StoreMaker = Callable[[], tuple[EncryptedStore, Callable[[], EncryptedStore]]]


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreMaker]:
    """A new encrypted store on SQLite or PostgreSQL, and a way to open another handle on it."""
    handles: list[EncryptedStore] = []
    if request.param == "sqlite":
        path = tmp_path / "store.db"

        def storage(create: bool) -> Any:
            return SqliteStorage(path, create=create)

    else:
        cluster = request.getfixturevalue("postgres_cluster")
        schema = cluster.new_schema()

        def storage(create: bool) -> Any:
            return PostgresStorage(cluster.url(with_password=True), schema=schema, create=create)

    def make() -> tuple[EncryptedStore, Callable[[], EncryptedStore]]:
        store = EncryptedStore.create(storage(True), PasswordUnlock(PASSWORD, kdf.TEST))
        handles.append(store)

        def another() -> EncryptedStore:
            other = EncryptedStore.open(storage(False), PasswordUnlock(PASSWORD, kdf.TEST))
            handles.append(other)
            return other

        return store, another

    yield make
    for handle in handles:
        handle.close()


def test_put_batch_writes_every_secret_in_one_commit(stores: StoreMaker) -> None:
    store, _ = stores()
    assert isinstance(store, BatchWriter)
    head = store._storage.change_head()  # type: ignore[attr-defined]
    infos = store.put_batch([(f"imp/K{i}", f"v{i}".encode()) for i in range(50)])
    assert [info.version if info else None for info in infos] == [1] * 50
    assert store._storage.change_head() == head + 1  # type: ignore[attr-defined]
    assert len(store.list("imp/")) == 50
    assert store.get("imp/K49").value.reveal() == b"v49"


def test_put_batch_meeting_an_existing_name_writes_none_of_them(stores: StoreMaker) -> None:
    store, _ = stores()
    store.put("imp/K3", b"there already")
    with pytest.raises(SecretExistsError) as raised:
        store.put_batch([(f"imp/K{i}", b"new") for i in range(6)])
    assert raised.value.name == "imp/K3"
    assert [meta.name for meta in store.list("imp/")] == ["imp/K3"]
    assert store.get("imp/K3").value.reveal() == b"there already"


def test_put_batch_skips_or_overwrites_existing_names_as_told(stores: StoreMaker) -> None:
    store, _ = stores()
    store.put("imp/A", b"old")
    skipped = store.put_batch([("imp/A", b"new"), ("imp/B", b"b")], if_exists="skip")
    assert skipped[0] is None and skipped[1] is not None and skipped[1].version == 1
    assert store.get("imp/A").value.reveal() == b"old"
    overwritten = store.put_batch([("imp/A", b"new"), ("imp/B", b"b2")], if_exists="overwrite")
    assert [info.version if info else None for info in overwritten] == [2, 2]
    assert store.get("imp/A", label="previous").value.reveal() == b"old"
    store.delete("imp/B")
    with pytest.raises(SecretStateError):
        store.put_batch([("imp/A", b"x"), ("imp/B", b"y")], if_exists="overwrite")
    assert store.get("imp/A").version == 2


def test_a_write_landing_during_a_batch_is_kept_and_the_batch_retried(
    stores: StoreMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another handle writes a name of the batch after the batch read it: the batch's commit loses
    the race (compare-and-set on that metadata) and reads again, so the other value stays as
    `previous` under an overwrite, and a create-only batch refuses, writing nothing."""
    store, another = stores()
    other = another()
    storage = store._storage  # type: ignore[attr-defined]
    commit = type(storage).commit
    meddled: list[str] = []
    target = ["imp/K2"]

    def meddling_commit(self: Any, operations: Any, **options: Any) -> int:
        if self is storage and not meddled and any(op.key == f"meta/{target[0]}" for op in operations):
            meddled.append(target[0])
            other.put(target[0], b"from the other writer")
        return commit(self, operations, **options)

    monkeypatch.setattr(type(storage), "commit", meddling_commit)
    infos = store.put_batch([(f"imp/K{i}", b"batch") for i in range(4)], if_exists="overwrite")
    assert meddled == ["imp/K2"]
    assert [info.version if info else None for info in infos] == [1, 1, 2, 1]
    assert store.get("imp/K2", label="previous").value.reveal() == b"from the other writer"

    meddled.clear()
    target[0] = "imp/N2"
    with pytest.raises(SecretExistsError) as raised:
        store.put_batch([(f"imp/N{i}", b"batch") for i in range(4)], if_exists="fail")
    monkeypatch.undo()
    assert meddled == ["imp/N2"] and raised.value.name == "imp/N2"
    assert [meta.name for meta in store.list("imp/N")] == ["imp/N2"]
    assert store.get("imp/N2").value.reveal() == b"from the other writer"


def test_an_import_on_postgresql_whose_commit_fails_writes_nothing(
    postgres_cluster: Any, tmp_path: Path
) -> None:
    """The real console script on a PostgreSQL store, its server refusing the write of the third
    secret's metadata (a trigger): nothing imported (before, the two before it were), the log has
    the import's pending record and its failure; once the trigger is gone the same file imports."""
    schema = postgres_cluster.new_schema()
    EncryptedStore.create(
        PostgresStorage(postgres_cluster.url(with_password=True), schema=schema, create=True),
        PasswordUnlock(PASSWORD, kdf.TEST),
    ).close()
    admin = postgres_cluster.connect()
    admin.autocommit = True
    table = f'"{schema}".entries'  # the storage's one table of keys and values
    function = f'"{schema}".refuse_three'
    admin.execute(
        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.key = 'meta/svc/THREE' THEN RAISE EXCEPTION 'refused by a trigger'; END IF; "
        "RETURN NEW; END $$"
    )
    admin.execute(
        f"CREATE TRIGGER refuse_three BEFORE INSERT OR UPDATE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {function}()"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MASTER_PASSWORD": PASSWORD,
        "SECRETS_MANAGER_STORE": f"{postgres_cluster.url()}?schema={schema}",
        "SECRETS_MANAGER_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
        **postgres_cluster.env(),
    }
    source = tmp_path / "three.env"
    source.write_text("ONE=1\nTWO=2\nTHREE=3\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    try:
        failed = run("import", str(source), "--service", "svc")
        assert failed.returncode == 1, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        assert run("list", "svc/").stdout == ""
        records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        imports = [(r["name"], r["outcome"]) for r in records if r["operation"] == "import"]
        assert imports == [("svc/", "pending"), ("svc/", "storage_error")], imports
    finally:
        admin.execute(f"DROP TRIGGER refuse_three ON {table}")
        admin.execute(f"DROP FUNCTION {function}()")
        admin.close()
    assert run("import", str(source), "--service", "svc").returncode == 0
    assert run("list", "svc/").stdout == "svc/ONE\nsvc/THREE\nsvc/TWO\n"
    assert run("audit", "verify").returncode == 0


def test_a_failed_batch_leaves_the_store_as_it_was(
    stores: StoreMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails (not a lost race) leaves every secret of the batch unwritten."""
    store, _ = stores()
    storage = store._storage  # type: ignore[attr-defined]

    def broken(self: Any, operations: Any, **options: Any) -> int:
        raise StorageError("the disk went away")

    monkeypatch.setattr(type(storage), "commit", broken)
    with pytest.raises(StorageError):
        store.put_batch([(f"imp/K{i}", b"v") for i in range(3)])
    monkeypatch.undo()
    assert store.list("imp/") == []
