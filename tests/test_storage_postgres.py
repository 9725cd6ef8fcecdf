"""PostgresStorage on a private PostgreSQL 15 cluster: the Storage and SecretStore conformance suites,
then what is particular to a database that several processes and replicas share: compare-and-set
and revisions across processes, the change feed seen from other connections, the schema, dropped
connections, the store URL, the CLI end to end, and the database password staying out of sight.

The cluster (tests/postgres_cluster.py, fixture `postgres_cluster` in conftest.py) is started once
per session; each test works in a fresh schema of its own.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from postgres_cluster import PostgresCluster, pause_once_in_a_write
from secrets_manager.audit import Anchor, AuditError, AuditEvent, AuditLog
from secrets_manager.audit.append import FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS
from secrets_manager.client import Client, _local
from secrets_manager.crypto import Keyset, kdf
from secrets_manager.environment import Environment, guard_postgres_tls, postgres_tls_problem
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    StorageError,
    StoreBusyError,
    UnsafeConfigurationError,
)
from secrets_manager.service.watch import ChangeHub, Subscription
from secrets_manager.storage import ABSENT, Delete, Entry, Put, Snapshotting, Storage
from secrets_manager.storage import postgres as postgres_module
from secrets_manager.storage.postgres import SCAN_PAGE, PostgresStorage
from secrets_manager.storage.testing import STORAGE_CHECKS, check_storage
from secrets_manager.store import EncryptedStore, PasswordUnlock, SecretStore, keys
from secrets_manager.store.changes import ChangeKind, SecretChange
from secrets_manager.store.testing import SECRET_STORE_CHECKS, check_secret_store, run_check
from secrets_manager.store.url import (
    create_store,
    default_audit_path,
    discard_new_store,
    needs_password,
    open_storage,
    open_store,
    postgres_location,
    sqlite_path,
    store_exists,
    store_location,
)
from service_fixtures import PASSWORD as SERVICE_PASSWORD
from service_fixtures import POLICY as SERVICE_POLICY
from service_fixtures import Server, make_pki
from tcp_proxy import AnswerCut, AnswersStop, TcpProxy
from test_store_encrypted import mv_overtaken_inside_its_delete

SCRIPT = Path(sys.executable).with_name("secrets-manager")
MASTER_PASSWORD = "correct horse battery staple"
DEV = Environment.DEVELOPMENT


@dataclass
class Place:
    """One schema of the test database: where a store lives, and how to open handles on it."""

    cluster: PostgresCluster
    schema: str

    @property
    def conninfo(self) -> str:
        """The URL libpq gets, password included (as a service's config might hold it)."""
        return self.cluster.url(with_password=True)

    @property
    def url(self) -> str:
        """The store URL an operator writes: no password (it comes from PGPASSWORD)."""
        return f"{self.cluster.url()}?schema={self.schema}"

    def open(self, *, create: bool = False, **options: Any) -> PostgresStorage:
        return PostgresStorage(self.conninfo, schema=self.schema, create=create, **options)


@pytest.fixture
def place(postgres_cluster: PostgresCluster) -> Place:
    return Place(postgres_cluster, postgres_cluster.new_schema())


@pytest.fixture
def pg_password(postgres_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test role's password in PGPASSWORD, as libpq reads it (for opening stores by URL)."""
    monkeypatch.setenv("PGPASSWORD", postgres_cluster.role_password)
    return postgres_cluster.role_password


@pytest.fixture
def make_storage(place: Place) -> Callable[[], Storage]:
    place.open(create=True).close()
    return lambda: place.open()


@pytest.fixture
def storage(place: Place) -> Iterator[PostgresStorage]:
    created = place.open(create=True)
    yield created
    created.close()


# ---- conformance --------------------------------------------------------------------------------


def test_postgres_storage_passes_the_whole_conformance_suite(make_storage: Callable[[], Storage]) -> None:
    check_storage(make_storage)


@pytest.mark.parametrize("behaviour", list(STORAGE_CHECKS))
def test_postgres_storage_conforms(behaviour: str, make_storage: Callable[[], Storage]) -> None:
    STORAGE_CHECKS[behaviour](make_storage)


def test_postgres_storage_takes_snapshots_and_does_not_claim_to_scrub(storage: PostgresStorage) -> None:
    assert isinstance(storage, Snapshotting)
    assert not hasattr(storage, "scrub")  # superseded row versions and WAL copies cannot be erased


@pytest.fixture
def make_store(place: Place) -> Callable[[], SecretStore]:
    EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST)).close()
    return lambda: EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))


def test_encrypted_store_on_postgres_passes_the_whole_secret_store_suite(
    make_store: Callable[[], SecretStore],
) -> None:
    check_secret_store(make_store)


@pytest.mark.parametrize(
    "behaviour",
    [
        "expect-version",
        "delete-expect-version",
        "delete-expect-no-pending",
        "max-versions",
        "max-versions-setting",
        "repr-redacted",
        "metadata-limits",
        "names-case-sensitive",  # the entries' COLLATE "C" keeps AUTH/KEY and auth/KEY apart
    ],
)
def test_encrypted_store_on_postgres_conforms(behaviour: str, make_store: Callable[[], SecretStore]) -> None:
    assert behaviour in SECRET_STORE_CHECKS
    run_check(make_store, behaviour)


@pytest.mark.parametrize("land", ["store", "stage"])
def test_mv_overtaken_inside_its_delete_leaves_old_in_place_on_postgres(
    make_store: Callable[[], SecretStore], land: str
) -> None:
    """The conditional delete in one PostgreSQL transaction (test_store_encrypted.py has the story)."""
    store, other = make_store(), make_store()
    try:
        assert isinstance(store, EncryptedStore)
        mv_overtaken_inside_its_delete(store, other, land)
    finally:
        store.close()
        other.close()


def test_a_list_after_another_process_rotated_the_root_key_answers_with_one_connection(
    place: Place,
) -> None:
    """list() reads in a snapshot, which holds a pooled connection; adopting the new root key read
    the header through a second one. With every connection held by such a snapshot (here the one
    a pool of 1 has) the read waited for itself for good: a service's ListSecrets and prefix
    BatchGet hung, and every call behind them."""
    EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST)).close()
    rotating = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    stale = EncryptedStore.open(place.open(max_connections=1), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    try:
        rotating.put("svc/a", b"a1")
        rotating.put("other/b", b"b1")
        assert [m.name for m in stale.list()] == ["other/b", "svc/a"]
        keys.rotate_root_key(rotating)
        listed: list[list[str]] = []
        lister = threading.Thread(target=lambda: listed.append([m.name for m in stale.list()]), daemon=True)
        lister.start()
        lister.join(20)
        assert listed == [["other/b", "svc/a"]], "list() after a root key rotation never answered"
        assert stale.get("svc/a").value.reveal() == b"a1"
    finally:
        rotating.close()
        stale.close()


def test_a_list_whose_snapshot_predates_a_root_rotation_another_thread_adopted_is_no_integrity_failure(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot holds keysets sealed under the old root key while another request thread of
    the same handle adopts the new one: the list is read again, not reported as tampering (a
    service answered DATA_LOSS to 13 of 340 lists while `keys rotate --root` ran)."""
    EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST)).close()
    rotating = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    serving = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    try:
        # A service holds the audit key (it audits): what it checks the new root key against.
        serving.audit_key()
        rotating.put("svc/a", b"a1")
        serving._keysets.clear()  # so the list decodes the keyset inside its snapshot
        original = EncryptedStore._keyset_from
        rotated: list[int] = []

        def rotate_and_adopt_meanwhile(self: EncryptedStore, *args: Any) -> Keyset:
            if self is serving and not rotated:
                rotated.append(keys.rotate_root_key(rotating).new_id)
                worker = threading.Thread(target=lambda: serving.get("svc/a"))  # adopts the new root
                worker.start()
                worker.join(20)
            return original(self, *args)

        monkeypatch.setattr(EncryptedStore, "_keyset_from", rotate_and_adopt_meanwhile)
        assert [m.name for m in serving.list()] == ["svc/a"]
        assert rotated and serving._root.id == rotated[0]
    finally:
        rotating.close()
        serving.close()


# ---- several processes at once ------------------------------------------------------------------


def _increment(args: tuple[str, str, int, float]) -> list[int]:
    """In a worker process: add 1 to the counter under `counter` `times` times by compare-and-set,
    retrying lost races; the revisions of its successful commits."""
    conninfo, schema, times, start_at = args
    storage = PostgresStorage(conninfo, schema=schema)
    won: list[int] = []
    try:
        time.sleep(max(0.0, start_at - time.time()))  # every worker connected: start together
        while len(won) < times:
            entry = storage.get("counter")
            assert entry is not None
            try:
                won.append(storage.put("counter", b"%d" % (int(entry.value) + 1), expect=entry.revision))
            except ConflictError:
                continue
    finally:
        storage.close()
    return won


def _put_distinct(args: tuple[str, str, int, float]) -> list[int]:
    """In a worker process: write `times` keys of its own, unconditionally."""
    conninfo, schema, times, start_at = args
    storage = PostgresStorage(conninfo, schema=schema)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        pid = os.getpid()
        return [storage.put(f"distinct/{pid}/{i:03d}", b"v%d" % i) for i in range(times)]
    finally:
        storage.close()


def _run_in_processes(worker: Callable[..., list[int]], place: Place, processes: int, times: int,
                      during: Callable[[], None] = lambda: None) -> list[list[int]]:  # fmt: skip
    """`worker` in `processes` fresh interpreters at once (spawn: no connection crosses a fork);
    `during` runs in this process until they are all done."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        start_at = time.time() + 1.5
        pending = pool.map_async(worker, [(place.conninfo, place.schema, times, start_at)] * processes)
        while not pending.ready():
            during()
            pending.wait(0.01)
        during()
        return pending.get(timeout=60)


def test_compare_and_set_from_four_processes_loses_no_increment(
    storage: PostgresStorage, place: Place
) -> None:
    first = storage.put("counter", b"0")
    results = _run_in_processes(_increment, place, processes=4, times=50)
    entry = storage.get("counter")
    assert entry is not None and entry.value == b"200"  # no lost update
    won = sorted(r for result in results for r in result)
    assert len(won) == len(set(won)) == 200  # no revision handed out twice
    assert won == list(range(first + 1, first + 201))  # in commit order, no gaps: refused commits burn none
    assert entry.revision == won[-1]


def test_a_watcher_sees_every_concurrent_commit_once_in_order(storage: PostgresStorage, place: Place) -> None:
    watcher = place.open()
    start = watcher.changes_since(0).revision
    seen: list[tuple[int, str]] = []
    cursor = start

    def poll() -> None:
        nonlocal cursor
        batch = watcher.changes_since(cursor)
        assert not batch.truncated
        seen.extend((c.revision, c.key) for c in batch.changes)
        cursor = batch.revision

    try:
        results = _run_in_processes(_put_distinct, place, processes=4, times=50, during=poll)
    finally:
        watcher.close()
    written = sorted(r for result in results for r in result)
    assert [revision for revision, _ in seen] == written == list(range(start + 1, start + 201))
    assert len({key for _, key in seen}) == 200
    assert storage.list("distinct/") == sorted(key for _, key in seen)


def test_threads_sharing_one_handle_lose_no_increment(storage: PostgresStorage) -> None:
    storage.put("counter", b"0")

    def work() -> None:
        done = 0
        while done < 25:
            entry = storage.get("counter")
            assert entry is not None
            try:
                storage.put("counter", b"%d" % (int(entry.value) + 1), expect=entry.revision)
                done += 1
            except ConflictError:
                continue

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entry = storage.get("counter")
    assert entry is not None and entry.value == b"100"


# ---- the change feed ----------------------------------------------------------------------------


def test_a_second_connection_sees_the_feed_and_the_values(storage: PostgresStorage, place: Place) -> None:
    other = place.open()
    try:
        start = other.changes_since(0).revision
        first = storage.commit([Put("feed/a", b"1"), Put("feed/b", b"2")])
        second = storage.commit([Delete("feed/a"), Put("feed/c", b"3")])
        batch = other.changes_since(start)
        assert [(c.revision, c.key, c.deleted) for c in batch.changes] == [
            (first, "feed/a", False),
            (first, "feed/b", False),
            (second, "feed/a", True),
            (second, "feed/c", False),
        ]
        assert batch.revision == second and not batch.truncated
        entry = other.get("feed/c")
        assert entry is not None and entry.value == b"3" and entry.revision == second
    finally:
        other.close()


def test_a_key_written_twice_in_one_commit_is_one_change_with_the_last_value(
    storage: PostgresStorage,
) -> None:
    start = storage.changes_since(0).revision
    revision = storage.commit(
        [Put("twice", b"first"), Put("twice", b"second"), Put("gone", b"x"), Delete("gone")]
    )
    entry = storage.get("twice")
    assert entry is not None and entry.value == b"second"
    assert storage.get("gone") is None
    assert [(c.key, c.deleted) for c in storage.changes_since(start).changes] == [
        ("gone", True),
        ("twice", False),
    ]
    assert storage.changes_since(start).revision == revision


def test_the_feed_says_truncated_once_it_no_longer_reaches_back(place: Place) -> None:
    writer = place.open(create=True, change_log_retained=4)
    try:
        start = writer.put("k", b"0")
        for i in range(1, 12):
            writer.put("k", b"%d" % i)
        now = writer.changes_since(0).revision
        old = writer.changes_since(start)
        assert old.truncated  # changes after `start` were dropped
        recent = writer.changes_since(now - 3)
        assert not recent.truncated and [c.revision for c in recent.changes] == [now - 2, now - 1, now]
    finally:
        writer.close()


def logged_revisions(place: Place) -> list[int]:
    """Every revision the change log still holds, read with plain SQL (not through the storage)."""
    with psycopg.connect(place.conninfo) as conn:
        query = sql.SQL("SELECT DISTINCT revision FROM {}.changes ORDER BY revision").format(
            sql.Identifier(place.schema)
        )
        return [int(row[0]) for row in conn.execute(query).fetchall()]


def test_the_prune_never_drops_the_newest_change_so_the_change_head_stays(place: Place) -> None:
    writer = place.open(create=True, change_log_retained=4)  # a prune every 4 revisions
    other = place.open()
    try:
        for i in range(4):
            writer.put("k", b"%d" % i)  # revisions 1..4, pruned below
        newest = writer.commit([Put("k", b"4"), Put("other", b"x")])  # revision 5, two rows
        assert newest == 5 and writer.change_head() == newest
        last = newest
        while last < 20:  # silent, non-durable commits (audit anchor updates) through four prunes
            last = writer.commit([Put("anchor", b"%d" % last)], silent=True, durable=False)
        assert logged_revisions(place) == [newest]  # the prunes ran and kept only the newest
        assert writer.change_head() == other.change_head() == newest
        everything = other.changes_since(0)
        assert everything.truncated  # revisions 1..4 were dropped
        assert [(c.revision, c.key) for c in everything.changes] == [(5, "k"), (5, "other")]
        assert [c.revision for c in other.changes_since(4).changes] == [5, 5]
        caught_up = other.changes_since(newest)
        assert caught_up.changes == [] and caught_up.revision == last

        later = other.put("k", b"after the prunes")
        while last < 32:  # past prunes whose horizon is above `later`: it is the newest, so it stays
            last = writer.commit([Put("anchor", b"%d" % last)], silent=True, durable=False)
        assert logged_revisions(place) == [later]
        assert writer.change_head() == other.change_head() == later
        assert [(c.revision, c.key) for c in other.changes_since(newest).changes] == [(later, "k")]
    finally:
        other.close()
        writer.close()


def test_the_prune_still_drops_changes_older_than_the_retained_window(place: Place) -> None:
    writer = place.open(create=True, change_log_retained=4)
    try:
        last = 0
        while last < 12:  # every commit logged; 4, 8 and 12 prune
            last = writer.put("k", b"%d" % last)
        assert logged_revisions(place) == [9, 10, 11, 12]
        assert writer.change_head() == 12
        assert writer.changes_since(7).truncated and not writer.changes_since(8).truncated
    finally:
        writer.close()


def test_a_full_page_of_the_feed_ends_on_a_whole_commit(storage: PostgresStorage) -> None:
    first = storage.commit([Put(f"page/{i}", b"v") for i in range(3)])
    second = storage.commit([Put(f"page/{i}", b"w") for i in range(3)])
    batch = storage.changes_since(first - 1, limit=4)
    assert [c.revision for c in batch.changes] == [first] * 3 and batch.revision == first
    rest = storage.changes_since(batch.revision, limit=4)
    assert [c.revision for c in rest.changes] == [second] * 3 and rest.revision == second


def test_asking_from_far_ahead_gives_the_current_revision(storage: PostgresStorage) -> None:
    revision = storage.put("k", b"v")
    batch = storage.changes_since(2**62)  # how EncryptedStore asks for "now"
    assert batch.changes == [] and batch.revision == revision and not batch.truncated


def test_a_refused_commit_burns_no_revision_and_logs_nothing(storage: PostgresStorage) -> None:
    before = storage.put("k", b"v")
    with pytest.raises(ConflictError):
        storage.commit([Put("new", b"x"), Put("k", b"w", expect=ABSENT)])
    assert storage.changes_since(before).changes == []
    assert storage.put("other", b"x") == before + 1


# ---- schema, opening, connections ---------------------------------------------------------------


def test_creating_twice_keeps_the_data(place: Place) -> None:
    first = place.open(create=True)
    revision = first.put("k", b"kept")
    first.close()
    again = place.open(create=True)
    try:
        entry = again.get("k")
        assert entry is not None and entry.value == b"kept" and entry.revision == revision
    finally:
        again.close()


def test_several_handles_may_create_the_same_store_at_once(place: Place) -> None:
    errors: list[BaseException] = []

    def create() -> None:
        try:
            place.open(create=True).close()
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_opening_a_schema_without_a_store_is_not_found_and_creates_nothing(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    with pytest.raises(NotFoundError, match=r"no store at postgresql://sm_test@127\.0\.0\.1") as caught:
        place.open()
    assert "create one with 'secrets-manager --store 'postgresql://sm_test@127.0.0.1:" in str(caught.value)
    with postgres_cluster.connect() as conn:
        assert (
            conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (place.schema,)).fetchone() is None
        )


def test_the_printed_init_command_keeps_the_urls_options_and_creates_that_store(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """The missing store's 'exact' init command kept only user, hosts, database and schema:
    pasted, it lost passfile (no password: refused) and sslmode (verify-full fell back to libpq's
    default). Now the URL stays whole but for a password, which is never printed."""
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_cluster.port}:*:sm_test:{postgres_cluster.role_password}\n")
    passfile.chmod(0o600)
    schema = postgres_cluster.new_schema()
    url = f"{postgres_cluster.url()}?schema={schema}&passfile={passfile}&sslmode=disable"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SECRETS_MANAGER_", "MASTER_"))}
    env |= {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), "MASTER_PASSWORD": "pw"}
    missing = subprocess.run(
        [str(SCRIPT), "--store", url, "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 3, missing.stderr
    command = missing.stderr.partition("create one with '")[2].partition("', or pass")[0]
    assert "passfile=" in command and "sslmode=disable" in command, command
    init = subprocess.run(
        [str(SCRIPT), *shlex.split(command)[1:], "--kdf-profile", "test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    with_password = subprocess.run(
        [
            str(SCRIPT),
            "--store",
            f"{url.replace(schema, postgres_cluster.new_schema())}&password={postgres_cluster.role_password}",
            "list",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert with_password.returncode == 3, with_password.stderr
    assert postgres_cluster.role_password not in with_password.stderr and "passfile=" in with_password.stderr


def test_a_database_the_server_does_not_have_is_not_found_and_says_to_create_it(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A URL naming a database the server does not have (SQLSTATE 3D000) was exit 1, "connection
    failed: ... FATAL: database ... does not exist", where a store file that is not there is
    exit 3 with what to do. It is exit 3 now, for init too, which cannot create a database: one
    line naming the database, `createdb` and the URL to correct; no password shown."""
    url = postgres_cluster.url(database="no_such_db")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SECRETS_MANAGER_", "MASTER_"))}
    env |= {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), "MASTER_PASSWORD": "pw"}
    env |= postgres_cluster.env()
    said = {}
    for command in (["list"], ["init", "--kdf-profile", "test"]):
        done = subprocess.run(
            [str(SCRIPT), "--store", url, *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 3, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert 'database "no_such_db" does not exist' in done.stderr, done.stderr
        assert "'createdb no_such_db'" in done.stderr and "correct the database name" in done.stderr
        assert postgres_cluster.role_password not in done.stderr
        said[command[0]] = done.stderr
    assert "init makes a store in a database, not the database" in said["init"], said["init"]
    assert "init makes a store" not in said["list"], said["list"]
    with postgres_cluster.connect(superuser=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'no_such_db'").fetchone()
        assert found is None  # nothing was made
    with pytest.raises(NotFoundError, match=r'database "no_such_db" does not exist'):
        PostgresStorage(postgres_cluster.url(with_password=True, database="no_such_db"))


def test_a_percent_encoded_password_option_is_never_shown(
    place: Place, postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """`?pass%77ord=PW` is `password=PW` to libpq and to our parser, which connected with it, but
    only the literal `password=` was masked: PW showed in the missing store's hint, in status's
    `store:` line and in errors."""
    password = postgres_cluster.role_password
    url = f"{place.url}&pass%77ord={password}"
    env = {k: v for k, v in postgres_cluster.env().items() if k != "PGPASSWORD"}
    cli = Cli(url, tmp_path, {**env, "MASTER_PASSWORD": MASTER_PASSWORD})
    missing = cli("list")
    assert missing.code == 3 and "init" in missing.stderr, missing.stderr
    assert cli("init", "--kdf-profile", "test").code == 0
    status = cli("status")
    assert status.code == 0 and "pass%77ord=***" in status.out, status.out
    bad = Cli(f"{url}&colour=blue", tmp_path, cli.env)("list")
    assert bad.code == 2
    for result in (missing, status, bad):
        assert password not in result.out + result.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(password not in p.read_text(errors="replace") for p in files)


def test_stores_in_different_schemas_of_one_database_are_separate(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    other = Place(postgres_cluster, postgres_cluster.new_schema())
    a, b = place.open(create=True), other.open(create=True)
    try:
        a.put("k", b"in a")
        assert b.get("k") is None and b.list("") == []
    finally:
        a.close()
        b.close()


def test_tables_that_are_not_ours_are_refused_untouched(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    with postgres_cluster.connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(place.schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {}.meta (id integer, note text)").format(sql.Identifier(place.schema))
        )
    with pytest.raises(StorageError, match="not a secrets-manager store"):
        place.open()
    with pytest.raises(StorageError, match="not a secrets-manager store"):
        place.open(create=True)


def test_a_store_from_a_newer_release_is_refused(
    storage: PostgresStorage, place: Place, postgres_cluster: PostgresCluster
) -> None:
    with postgres_cluster.connect() as conn:
        conn.execute(sql.SQL("UPDATE {}.meta SET schema_version = 99").format(sql.Identifier(place.schema)))
    with pytest.raises(StorageError, match="upgrade secrets-manager"):
        place.open()


def test_an_invalid_schema_name_is_refused(postgres_cluster: PostgresCluster) -> None:
    with pytest.raises(StorageError, match="schema name"):
        PostgresStorage(postgres_cluster.url(with_password=True), schema='x"; DROP TABLE y; --')


def _terminate_our_connections(cluster: PostgresCluster) -> None:
    """What a server restart or failover does to every open connection of ours."""
    with cluster.connect(superuser=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'secrets-manager' AND pid <> pg_backend_pid()"
        )


def _backend_pid(storage: PostgresStorage) -> int:
    """The server process of the connection the next call would use."""
    with storage._borrowed() as conn:
        return int(conn.info.backend_pid)


def test_a_dropped_connection_is_reopened(
    storage: PostgresStorage, postgres_cluster: PostgresCluster
) -> None:
    storage.put("k", b"before")
    backend = _backend_pid(storage)
    _terminate_our_connections(postgres_cluster)
    entry = storage.get("k")  # the read finds the connection gone, reconnects and retries
    assert entry is not None and entry.value == b"before"
    assert _backend_pid(storage) != backend
    _terminate_our_connections(postgres_cluster)
    later = storage.put("k", b"after")  # BEGIN fails before anything was sent: safe to run again
    entry = storage.get("k")
    assert entry is not None and entry.value == b"after" and entry.revision == later


def test_a_snapshot_after_the_connections_dropped_is_retried_on_a_new_one(
    storage: PostgresStorage, postgres_cluster: PostgresCluster
) -> None:
    """A restart or failover ends every pooled connection: the first snapshot (a list, a prefix
    BatchGet) finds its connection gone at BEGIN, drops the other idle ones and retries, as a get
    does, so no call fails for each dead connection in the pool."""
    storage.put("k", b"v")
    with storage.snapshot(), storage.snapshot(), storage.snapshot():
        pass  # three connections open, idle in the pool afterwards
    assert len(storage._idle) == 3
    _terminate_our_connections(postgres_cluster)
    for _ in range(4):
        with storage.snapshot() as snap:
            entry = snap.get("k")
            assert entry is not None and entry.value == b"v"
            assert snap.list("") == ["k"]
    assert len(storage._idle) == 1  # the dead ones were closed, not tried one by one


class StandbyCopy:
    """What an asynchronous standby holds of `place`'s tables, copied now; `fail_over()` then puts
    the database back to it and restarts the server, as a failover to that standby looks to every
    client (the commits made since are lost, and their revisions are reached again by new ones)."""

    TABLES = ("meta", "entries", "changes")

    def __init__(self, place: Place, cluster: PostgresCluster) -> None:
        self._place, self._cluster = place, cluster
        self._copy("CREATE TABLE {s}.{saved} AS SELECT * FROM {s}.{t}")

    def fail_over(self) -> None:
        self._copy("DELETE FROM {s}.{t}; INSERT INTO {s}.{t} SELECT * FROM {s}.{saved}")
        self._cluster.restart()

    def _copy(self, statement: str) -> None:
        with self._cluster.connect() as db:
            for table in self.TABLES:
                db.execute(
                    sql.SQL(statement).format(
                        s=sql.Identifier(self._place.schema),
                        saved=sql.Identifier(f"saved_{table}"),
                        t=sql.Identifier(table),
                    )
                )


def test_a_database_that_came_back_with_less_history_is_not_served_from_the_cache(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    """A failover to an asynchronous standby that lacked the last commit (or a restore of the
    database) takes the store back in history; the next commits reuse the lost revisions with other
    content. A long-lived handle (a service replica) had cached a read and a listing at the lost
    revision: after the failover, it must answer what the database holds, not what it cached then.
    Before, with the head back at that revision, it served the lost value and the old listing."""
    store = EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    store.put("auth/X", b"kept-value")
    standby = StandbyCopy(place, postgres_cluster)
    replica = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    try:
        store.put("auth/X", b"LOST-in-the-failover")  # the commit the standby never got
        assert replica.get("auth/X").value.reveal() == b"LOST-in-the-failover"  # cached
        assert [m.current_version for m in replica.list("auth/")] == [2]
        standby.fail_over()  # the clients find another server
        store.close()
        other = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
        # The same secret's version 2 again, at the lost revision, with another value and metadata.
        other.put("auth/X", b"written-after-the-failover", description="new timeline")
        other.close()
        assert replica.get("auth/X").value.reveal() == b"written-after-the-failover"
        assert replica.get("auth/X", version=1).value.reveal() == b"kept-value"
        listed = [(m.name, m.current_version, m.description) for m in replica.list("auth/")]
        assert listed == [("auth/X", 2, "new timeline")]
    finally:
        replica.close()


def test_watchers_told_to_resync_when_the_database_fails_over_to_less_history(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    """A service replica's watch streams follow the change feed by revision. After a failover to a
    standby that lacked the last commits, the new commits reuse the lost revisions: the poller, at
    the lost head, skipped every one of them (the SDK kept serving the old credential as fresh
    until that secret changed again). Now every stream gets RESYNC at the new head, then the new
    line's changes; and a stream that resumes from a revision of the old line gets RESYNC too."""
    store = EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    store.put("auth/X", b"kept-value")
    standby = StandbyCopy(place, postgres_cluster)
    replica = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    hub = ChangeHub(replica, max_subscribers=4, poll_seconds=60)  # it reads when poked
    try:
        watcher = hub.subscribe()
        old_history = watcher.history
        for i in range(3):
            store.put(f"auth/LOST{i}", b"lost")  # the commits the standby never got
        hub.poke()
        lost_head = _changes_until(watcher, lambda got: len(got) >= 3)[-1].revision
        store.close()
        standby.fail_over()  # between two reads of the poller: it reads the new server next
        writer = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
        try:
            for i in range(5):  # past the lost head: the same revisions, other changes
                writer.put(f"auth/NEW{i}", b"new")
            hub.poke()
            got = _changes_until(watcher, bool)
            assert got[0].kind is ChangeKind.RESYNC  # the new line's changes so far are in what it re-reads
            assert got[0].revision > lost_head and watcher.history not in (None, old_history)
            writer.put("auth/LATER", b"v")
            hub.poke()
            got += _changes_until(watcher, lambda more: any(c.name == "auth/LATER" for c in more))
            # After the RESYNC, each later change once, in order: the poller may have re-read the new
            # line while the five were being written (its retry after the failover's broken
            # connection need not wait for the poke), and then sends the rest of them as changes.
            after = got[1:]
            assert [c.name for c in after][-1] == "auth/LATER"
            new_names = [f"auth/NEW{i}" for i in range(5)]
            assert [c.name for c in after[:-1]] == new_names[len(new_names) - len(after) + 1 :]
            assert all(c.revision > got[0].revision for c in after)
            assert [c.revision for c in after] == sorted({c.revision for c in after})
        finally:
            writer.close()
        # A client whose stream ended in the failover resumes from a revision of the old line.
        resumed = hub.subscribe(since_revision=lost_head, since_history=old_history)
        assert [c.kind for c in _changes_until(resumed, bool)] == [ChangeKind.RESYNC]
    finally:
        hub.close()
        replica.close()


def test_an_sdk_client_picks_up_a_value_written_after_a_failover_to_less_history(
    place: Place, postgres_cluster: PostgresCluster, pg_password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the reuse of lost revisions did to a program using the SDK on the store (local mode
    here; through a replica it is the hub's job, above): the value written after the failover, at
    the revision the lost one had, never reached it; it served the lost credential as fresh until
    the TTL. Now its change feed tells it to re-read, within a poll.

    Its feed is read every 4 s here, so that the failover and the new write land between two
    reads (right after the one that brought the lost value), as a quick failover does."""
    monkeypatch.setattr(_local, "LOCAL_POLL_SECONDS", 4.0)
    store = EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    store.put("auth/X", b"kept-value")
    standby = StandbyCopy(place, postgres_cluster)
    env = {"SECRETS_MANAGER_STORE": place.url, "MASTER_PASSWORD": MASTER_PASSWORD, "PGPASSWORD": pg_password}
    with Client(environ=env, ttl=3600) as client:
        assert client.get("auth/X").value.reveal() == b"kept-value"
        store.put("auth/X", b"LOST-in-the-failover")
        store.close()
        _wait_for(lambda: client.get("auth/X").value.reveal() == b"LOST-in-the-failover")
        standby.fail_over()
        writer = EncryptedStore.open(place.open(), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
        try:
            writer.put("auth/X", b"written-after-the-failover")  # version 2 again, same revision
        finally:
            writer.close()
        _wait_for(lambda: client.get("auth/X").value.reveal() == b"written-after-the-failover", 15)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.05)


def _changes_until(
    subscription: Subscription, done: Callable[[list[SecretChange]], bool]
) -> list[SecretChange]:
    got: list[SecretChange] = []
    deadline = time.monotonic() + 30
    while not done(got):
        assert time.monotonic() < deadline, f"only {got}"
        batch = subscription.next_batch(0.1)
        assert batch is not None, f"the subscription ended: {subscription.error!r}"
        got.extend(batch)
    return got


def test_a_closed_handle_says_so(storage: PostgresStorage) -> None:
    storage.close()
    with pytest.raises(StorageError, match="is closed"):
        storage.get("k")


def test_a_non_durable_commit_changes_synchronous_commit_for_itself_only(storage: PostgresStorage) -> None:
    storage.commit([Put("anchor", b"a")], durable=False)
    with storage._borrowed() as conn:  # the connection the commit used: the only one open
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    entry = storage.get("anchor")
    assert entry is not None and entry.value == b"a"


def test_a_commit_with_a_lock_wait_gives_up_when_another_transaction_holds_the_lock(
    storage: PostgresStorage, place: Place
) -> None:
    before = storage.put("k", b"before")
    with place.cluster.commit_lock_held(place.schema):
        started = time.monotonic()
        with pytest.raises(
            StoreBusyError, match=r"another writer held the store's lock for 0\.2 s; try again"
        ):
            storage.commit([Put("k", b"after")], lock_wait=0.2)
        assert time.monotonic() - started < 2
        assert storage.get("k") == Entry(b"before", before)  # reads do not wait for the lock
    later = storage.commit([Put("k", b"after")], lock_wait=0.2)  # the limit was its own
    assert later == before + 1 and storage.get("k") == Entry(b"after", later)
    with storage._borrowed() as conn:  # the session's, ours (a direct connection's: set at connect)
        assert conn.execute("SHOW lock_timeout").fetchone() == ("30s",)


def test_the_audit_log_does_not_stall_on_a_store_whose_commit_lock_another_transaction_holds(
    place: Place, tmp_path: Path
) -> None:
    """A big restore or import into the database holds the commit lock for a long time. Reads go
    on meanwhile: the deferred flush's anchor update gives up at once and the anchor lags (every
    append would wait for it). A change's "pending" record must anchor: it is refused, saying why,
    before its caller's timeout, and the change is not made. The record of a change already made is
    not refused (that would misstate it): it is written, and the anchor lags. Once the lock is free
    the anchor catches up, the chain verifies."""
    store = EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    log = AuditLog(tmp_path / "audit.jsonl", timeout=2.0)  # flushes every 10 ms (the default)
    try:
        log.append([AuditEvent("store", "alice", name="auth/k")], store)  # durable: anchors record 1
        with place.cluster.commit_lock_held(place.schema):
            for n in range(15):  # spans a dozen deferred flushes
                started = time.monotonic()
                log.append([AuditEvent("get", "bob", name=f"auth/k{n}")], store, durable=False)
                assert time.monotonic() - started < 0.5, f"read {n} waited for the store's lock"
                time.sleep(0.05)
            anchored = store.audit_anchor()
            assert anchored is not None and anchored.seq == 1  # lags, as a failed flush may
            started = time.monotonic()
            with pytest.raises(StoreBusyError, match=r"could not be anchored.*held the store's lock") as busy:
                log.append([AuditEvent("store", "alice", name="auth/k", outcome="pending")], store)
            assert time.monotonic() - started < 2.0 and "did not answer" not in str(busy.value)
            done = log.append([AuditEvent("store", "alice", name="auth/k")], store)  # made: kept
            assert done[-1]["seq"] == 18 and store.audit_anchor() == anchored
        time.sleep(FLUSH_ANCHOR_BUSY_BACKOFF_SECONDS)
        last = log.append([AuditEvent("get", "bob", name="auth/k")], store, durable=False)[-1]
        deadline = time.monotonic() + 5
        while (anchored := store.audit_anchor()) is None or anchored.seq < last["seq"]:
            assert time.monotonic() < deadline, "the anchor did not catch up after the lock was freed"
            time.sleep(0.02)
        assert anchored.seq == last["seq"] == 19
        assert log.verify(store.audit_key(), anchored) == 19
    finally:
        store.close()


def test_an_audit_append_the_stores_table_lock_holds_up_names_the_store_not_the_log(
    place: Place, postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A session holding an ACCESS EXCLUSIVE lock on the store's table (a long migration, a stray
    `LOCK TABLE`) blocks the anchor's read that a writer new to the log makes before appending.
    The append is refused after its timeout; the error said "audit log … did not answer", sending
    the operator to the log's disk, while the log was fine and the store was waiting."""
    store = EncryptedStore.create(place.open(create=True), PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    path = tmp_path / "audit.jsonl"
    try:
        AuditLog(path, timeout=1.0).append([AuditEvent("store", "alice", name="auth/k")], store)
        with postgres_cluster.connect() as db, db.transaction():
            for table in ("entries", "meta"):
                db.execute(
                    sql.SQL("LOCK TABLE {s}.{t} IN ACCESS EXCLUSIVE MODE").format(
                        s=sql.Identifier(place.schema), t=sql.Identifier(table)
                    )
                )
            other = AuditLog(path, timeout=1.0)  # another process: checks the tail against the anchor
            with pytest.raises(
                AuditError, match=r"^the store, which keeps audit log .* did not answer within 1 s"
            ):
                other.append([AuditEvent("get", "bob", name="auth/k")], store)
    finally:
        store.close()


def _our_connections(cluster: PostgresCluster) -> int:
    with cluster.connect(superuser=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'secrets-manager'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_an_open_snapshot_does_not_hold_up_other_threads_reads_and_commits(place: Place) -> None:
    """A service's ListSecrets scans in a snapshot; its GetSecret and PutSecret calls meanwhile
    borrow other connections of the same handle instead of waiting for the scan to end."""
    storage = place.open(create=True)
    try:
        storage.commit([Put("listed", b"1"), Put("read", b"2")])
        done: dict[str, object] = {}

        def read_and_write() -> None:
            done["read"] = storage.get("read")
            done["revision"] = storage.commit([Put("written", b"3")])

        with storage.snapshot() as snap:
            other = threading.Thread(target=read_and_write)
            other.start()
            other.join(timeout=10)
            finished_inside = not other.is_alive()
            assert snap.get("written") is None  # the snapshot's instant is before that commit
        other.join(timeout=10)
        assert finished_inside, "a read and a commit waited for another thread's snapshot to end"
        read = done["read"]
        assert isinstance(read, Entry) and read.value == b"2"
        assert storage.get("written") is not None
    finally:
        storage.close()


def test_a_handle_opens_no_more_connections_than_its_limit_and_close_ends_them(place: Place) -> None:
    before = _our_connections(place.cluster)
    storage = place.open(create=True, max_connections=2)
    storage.commit([Put("k", b"v")])
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def reader() -> None:
        start.wait()
        try:
            for _ in range(50):
                with storage.snapshot() as snap:  # holds its connection across a round trip more
                    assert snap.get("k") is not None
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    # Every connection is opened by a call holding one of the 2 slots and given back after it.
    assert 1 <= len(storage._idle) <= 2
    assert _our_connections(place.cluster) - before == len(storage._idle)
    storage.close()
    assert _our_connections(place.cluster) == before
    with pytest.raises(StorageError, match="is closed"):
        storage.get("k")


def test_a_connection_lent_out_when_the_handle_closes_is_closed_when_given_back(place: Place) -> None:
    storage = place.open(create=True)
    with storage.snapshot():
        with storage._borrowed() as lent:
            storage.close()
            assert not lent.closed  # the call in progress finishes on it
        assert lent.closed
    assert storage._idle == []


def test_on_commits_hears_another_handles_commits_to_this_store_only(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    """LISTEN/NOTIFY: a commit by another handle (another process, in production) reaches the
    callback at once; a silent commit (re-encryption, not in the change feed) and a commit to
    another store in the same database do not; stopping ends the listener's connection."""
    listening, writer = place.open(create=True), place.open()
    other = Place(postgres_cluster, postgres_cluster.new_schema()).open(create=True)
    heard = threading.Event()
    before = postgres_cluster.listeners()
    stop = listening.on_commits(heard.set)
    try:
        assert heard.wait(10)  # once on connecting: whatever it may have missed
        heard.clear()
        writer.commit([Put("k", b"v1")])
        assert heard.wait(5)
        heard.clear()
        writer.commit([Put("k", b"v2")], silent=True)
        other.commit([Put("k", b"elsewhere")])
        assert not heard.wait(1.0)
        assert len(postgres_cluster.listeners()) == len(before) + 1
    finally:
        stop()
        for storage in (listening, writer, other):
            storage.close()
    wait = time.monotonic() + 10
    while len(postgres_cluster.listeners()) > len(before):
        assert time.monotonic() < wait, "the listener's connection outlived stop()"
        time.sleep(0.05)


def test_on_commits_listens_again_after_its_connection_is_cut(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    listening, writer = place.open(create=True), place.open()
    heard = threading.Event()
    before = set(postgres_cluster.listeners())
    stop = listening.on_commits(heard.set)
    try:
        assert heard.wait(10)
        (pid,) = set(postgres_cluster.listeners()) - before
        with postgres_cluster.connect(superuser=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        heard.clear()
        assert heard.wait(10)  # reconnected: told once for what it may have missed
        heard.clear()
        writer.commit([Put("k", b"after the cut")])
        assert heard.wait(5)
    finally:
        stop()
        listening.close()
        writer.close()


def test_a_snapshot_holds_its_instant_across_many_pages(storage: PostgresStorage, place: Place) -> None:
    count = SCAN_PAGE * 2 + 7
    storage.commit([Put(f"bulk/{i:05d}", b"%d" % i) for i in range(count)])
    writer = place.open()
    try:
        with storage.snapshot() as snap:
            writer.commit([Delete(f"bulk/{i:05d}") for i in range(0, count, 2)])
            scanned = [key for key, _ in snap.scan("bulk/")]
        assert scanned == [f"bulk/{i:05d}" for i in range(count)]
        assert len(storage.list("bulk/")) == count // 2
    finally:
        writer.close()


# ---- the database password stays out of sight --------------------------------------------------


def test_the_password_is_never_in_repr_or_errors(place: Place, postgres_cluster: PostgresCluster) -> None:
    password = postgres_cluster.role_password
    created = place.open(create=True)
    store = EncryptedStore.create(created, PasswordUnlock(MASTER_PASSWORD, kdf.TEST))
    try:
        assert password not in repr(created) and password not in repr(store)
        assert (
            repr(created)
            == f"PostgresStorage('postgresql://sm_test@127.0.0.1:{postgres_cluster.port}/sm_test?schema={place.schema}')"
        )
    finally:
        store.close()
    failures: list[Callable[[], object]] = [
        lambda: PostgresStorage(postgres_cluster.url(with_password=True, database="no_such_db")),
        lambda: PostgresStorage(
            postgres_cluster.url(with_password=True).replace(f":{postgres_cluster.port}/", ":1/")
        ),
        lambda: PostgresStorage(postgres_cluster.url(with_password=True, user="nobody")),
        lambda: PostgresStorage(f"host=127.0.0.1 password={password} this-is-not-conninfo"),
        lambda: PostgresStorage(postgres_cluster.url(with_password=True), schema="no_store_here"),
    ]
    for failure in failures:
        with pytest.raises((StorageError, NotFoundError)) as caught:
            failure()
        assert password not in str(caught.value), caught.value
        assert password not in repr(caught.value)
        error = caught.value  # no chained psycopg exception shows in a traceback either
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_an_error_that_quotes_the_password_has_it_masked(
    storage: PostgresStorage, postgres_cluster: PostgresCluster
) -> None:
    password = postgres_cluster.role_password
    error = storage._error(psycopg.OperationalError(f"server said: bad password {password!r}"))
    assert password not in str(error) and "***" in str(error)


# ---- store URLs ---------------------------------------------------------------------------------


def test_postgres_urls_are_parsed_without_showing_the_password() -> None:
    location = postgres_location(
        "postgresql://trader:s3cret@db.internal:5433/trading?schema=desk_a&sslmode=verify-full"
    )
    assert location is not None
    assert location.display == "postgresql://trader@db.internal:5433/trading?schema=desk_a"
    assert location.password_in_url and location.schema == "desk_a"
    assert "schema" not in location.conninfo and "sslmode=verify-full" in location.conninfo
    assert "s3cret" not in repr(location)
    assert postgres_location("postgres://trader@db:5432/trading") is not None
    assert postgres_location("sqlite:///tmp/x.db") is None and postgres_location(None) is None
    assert needs_password("postgresql://trader@db:5432/trading")
    assert (
        store_location("postgresql://trader:s3cret@db:5432/trading") == "postgresql://trader@db:5432/trading"
    )


def test_the_connection_limit_comes_from_the_url(place: Place, pg_password: str) -> None:
    location = postgres_location("postgresql://trader@db:5432/trading?max_connections=8&sslmode=require")
    assert location is not None and location.max_connections == 8
    assert "max_connections" not in location.conninfo and "sslmode=require" in location.conninfo
    plain = postgres_location("postgresql://trader@db:5432/trading")
    assert plain is not None and plain.max_connections is None
    for limit, expected in (("1", 1), (None, 4)):
        url = place.url if limit is None else f"{place.url}&max_connections={limit}"
        storage = open_storage(url, create=True, environment=DEV)
        try:
            assert isinstance(storage, PostgresStorage) and storage.max_connections == expected
        finally:
            storage.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://trader:s3cret@db:5432/trading?max_connections=0",
        "postgresql://trader:s3cret@db:5432/trading?max_connections=65",
        "postgresql://trader:s3cret@db:5432/trading?max_connections=four",
        "postgresql://trader:s3cret@db:5432/trading?schema=Bad-Name",
        "postgresql://trader:s3cret@db:5432/trading?colour=blue",
        "postgresql://trader:s3cret@db:5432/",
        "postgresql://trader:s3cret@/trading",
        "postgresql://trader:s3cret/x?y@db:5432/trading",  # unencoded: the URL splits inside it
    ],
)
def test_bad_postgres_urls_are_refused_without_showing_the_password(url: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        postgres_location(url)
    assert "s3cret" not in str(caught.value)


def test_a_postgres_url_is_not_a_store_file() -> None:
    with pytest.raises(InvalidInputError, match="names a PostgreSQL store") as caught:
        sqlite_path("postgresql://trader:s3cret@db:5432/trading")
    assert "s3cret" not in str(caught.value)


def test_the_default_audit_log_is_named_after_the_database() -> None:
    path = default_audit_path("postgresql://trader:s3cret@db.internal:5433/trading?schema=desk_a")
    assert path.name == "postgresql-db.internal-5433-trading-desk_a.audit.jsonl"
    assert "s3cret" not in str(path)


def test_a_password_in_the_url_is_warned_about(
    place: Place, postgres_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{postgres_cluster.url(with_password=True)}?schema={place.schema}"
    with caplog.at_level(logging.WARNING):
        store = create_store(url, MASTER_PASSWORD.encode(), kdf_profile="test", environment=DEV, actor="t")
    store.close()
    assert "process lists" in caplog.text and postgres_cluster.role_password not in caplog.text


def test_production_refuses_a_password_in_the_url(place: Place, postgres_cluster: PostgresCluster) -> None:
    url = f"{postgres_cluster.url(with_password=True)}?schema={place.schema}"
    with pytest.raises(UnsafeConfigurationError, match="PGPASSFILE") as caught:
        open_store(url, MASTER_PASSWORD.encode(), environment=Environment.PRODUCTION, actor="t")
    assert postgres_cluster.role_password not in str(caught.value)


def test_init_by_url_never_overwrites_a_store(place: Place, pg_password: str) -> None:
    create_store(place.url, MASTER_PASSWORD.encode(), kdf_profile="test", environment=DEV, actor="t").close()
    with pytest.raises(ConflictError, match="already exists at postgresql://"):
        create_store(place.url, b"another password", kdf_profile="test", environment=DEV, actor="t")
    open_store(place.url, MASTER_PASSWORD.encode(), environment=DEV, actor="t").close()


def test_an_init_that_was_never_announced_can_be_discarded_and_redone(place: Place, pg_password: str) -> None:
    store = create_store(place.url, MASTER_PASSWORD.encode(), kdf_profile="test", environment=DEV, actor="t")
    assert store_exists(place.url, environment=DEV)
    discard_new_store(place.url, store)
    assert not store_exists(place.url, environment=DEV)
    with pytest.raises(NotFoundError) as caught:
        open_store(place.url, MASTER_PASSWORD.encode(), environment=DEV, actor="t")
    assert f"create one with 'secrets-manager --store {shlex.quote(place.url)} init'" in str(caught.value)
    create_store(place.url, b"second try", kdf_profile="test", environment=DEV, actor="t").close()
    open_store(place.url, b"second try", environment=DEV, actor="t").close()


def test_hosts_sharing_a_store_keep_separate_audit_anchors(
    place: Place, pg_password: str, tmp_path: Path
) -> None:
    create_store(place.url, MASTER_PASSWORD.encode(), kdf_profile="test", environment=DEV, actor="t").close()
    one = open_store(
        place.url, MASTER_PASSWORD.encode(), environment=DEV, actor="t", audit_path=tmp_path / "1.jsonl"
    )
    two = open_store(
        place.url, MASTER_PASSWORD.encode(), environment=DEV, actor="t", audit_path=tmp_path / "2.jsonl"
    )
    try:
        one.set_audit_anchor(Anchor(seq=5, hash="a" * 64))
        assert two.audit_anchor() is None
    finally:
        one.close()
        two.close()


# ---- the CLI end to end -------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8")


class Cli:
    """The real console script on a PostgreSQL store URL; the database password only in PGPASSWORD."""

    def __init__(self, url: str, home: Path, env: Mapping[str, str]) -> None:
        self.url = url
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **env}

    def __call__(self, *args: str, input: bytes = b"", env: Mapping[str, str | None] | None = None) -> Result:
        full_env = dict(self.env)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        # Options before the command, e.g. cli("--password-file", PATH, "list").
        argv = [str(SCRIPT), "--store", self.url, *args]
        assert full_env.get("PGPASSWORD", "<none>") not in " ".join(argv)  # never in our own argv
        proc = subprocess.run(
            argv, input=input, capture_output=True, env=full_env, start_new_session=True, timeout=60
        )
        stderr = proc.stderr.decode("utf-8", errors="replace")
        assert "Traceback" not in stderr, stderr
        return Result(proc.returncode, proc.stdout, stderr)


@pytest.fixture
def cli(place: Place, postgres_cluster: PostgresCluster, tmp_path: Path) -> Cli:
    env = {**postgres_cluster.env(), "MASTER_PASSWORD": MASTER_PASSWORD}
    return Cli(place.url, tmp_path, env)


def test_the_cli_works_on_a_postgres_store_as_on_a_file(
    cli: Cli, postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    init = cli("init", "--kdf-profile", "test")
    assert init.code == 0, init.stderr
    assert (
        f"created an empty store at postgresql://sm_test@127.0.0.1:{postgres_cluster.port}/sm_test"
        in init.stderr
    )
    assert cli("store", "market-connector/BINANCE_API_KEY", input=b"sk-live-PG-VALUE-9d1e").code == 0
    assert cli("store", "auth/DB_PASSWORD", input=b"pg-db-pass").code == 0
    got = cli("get", "market-connector/BINANCE_API_KEY")
    assert got.code == 0 and got.out == "sk-live-PG-VALUE-9d1e\n"
    listed = cli("list")
    assert listed.code == 0
    assert [line.split("\t")[0] for line in listed.out.splitlines()] == [
        "auth/DB_PASSWORD",
        "market-connector/BINANCE_API_KEY",
    ]
    assert "sk-live-PG-VALUE" not in listed.out
    again = cli("init", "--kdf-profile", "test")
    assert again.code == 7 and "already exists" in again.stderr
    assert cli("get", "market-connector/BINANCE_API_KEY").out == "sk-live-PG-VALUE-9d1e\n"
    verified = cli("audit", "verify")
    assert verified.code == 0, verified.stderr
    logs = list(
        (tmp_path / ".local" / "share" / "secrets-manager").glob("postgresql-127.0.0.1-*.audit.jsonl")
    )
    assert len(logs) == 1 and b"sk-live-PG-VALUE" not in logs[0].read_bytes()
    wrong = cli("get", "market-connector/BINANCE_API_KEY", env={"MASTER_PASSWORD": "wrong"})
    assert wrong.code == 4


def test_a_database_password_missing_or_wrong_says_where_it_comes_from(cli: Cli) -> None:
    """A replica started without its database password stopped with libpq's "fe_sendauth: no
    password supplied", which says nothing of where the password goes. Now the one line says
    PGPASSWORD or a passfile, and never holds the password. Fails on the old code."""
    assert cli("init", "--kdf-profile", "test").code == 0
    missing = cli("status", env={"PGPASSWORD": None})
    assert missing.code == 1
    assert "no password supplied" in missing.stderr
    assert "give the database password in PGPASSWORD or a passfile (PGPASSFILE" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    wrong = cli("status", env={"PGPASSWORD": "not-the-role-password"})
    assert wrong.code == 1 and "password authentication failed" in wrong.stderr
    assert "PGPASSWORD or a passfile" in wrong.stderr and "not-the-role-password" not in wrong.stderr


def test_init_of_a_postgres_store_beside_the_log_of_its_emptied_predecessor_creates_nothing(
    cli: Cli, place: Place, pg_password: str, tmp_path: Path
) -> None:
    """The default log of a PostgreSQL store is a file in the data directory named after it: a
    store emptied there (an empty store is no store) leaves it, and a new init is refused before
    it writes anything (exit 7), as for a store file."""
    assert cli("init", "--kdf-profile", "test").code == 0
    assert cli("store", "a/b", input=b"pg-value").code == 0
    discard_new_store(place.url, open_store(place.url, MASTER_PASSWORD.encode(), environment=DEV, actor="t"))
    (log,) = (tmp_path / ".local" / "share" / "secrets-manager").glob("postgresql-*.audit.jsonl")
    before = log.read_bytes()
    refused = cli("init", "--kdf-profile", "test")
    assert refused.code == 7 and f"an audit log of another store is at {log}: move it away" in refused.stderr
    assert log.read_bytes() == before
    assert not store_exists(place.url, environment=DEV)


def test_key_destroy_on_postgres_says_what_it_cannot_erase(cli: Cli) -> None:
    """The key leaves the keyset, but PostgreSQL keeps old row versions and WAL copies that no
    client can erase: the CLI must not claim they are gone, nor ask to run it again."""
    assert cli("init", "--kdf-profile", "test").code == 0
    assert cli("store", "svc/KEY", input=b"pg-key-value").code == 0
    old = json.loads(cli("keys", "status", "svc", "--json").stdout)["keys"][0]["id"]
    assert cli("keys", "rotate", "svc").code == 0
    assert cli("keys", "rewrap", "svc").code == 0
    assert cli("keys", "disable", str(old)).code == 0
    destroyed = cli("keys", "destroy", str(old))
    assert destroyed.code == 0, destroyed.stderr
    assert "gone from the keyset" in destroyed.stderr and "no client can erase" in destroyed.stderr
    assert "erased from the store" not in destroyed.stderr and "again" not in destroyed.stderr
    root = cli("keys", "rotate", "--root")
    assert root.code == 0 and "no client can erase" in root.stderr
    assert cli("get", "svc/KEY").out == "pg-key-value\n"


def test_the_cli_reports_a_database_it_cannot_reach_in_one_line_without_the_password(
    cli: Cli, postgres_cluster: PostgresCluster
) -> None:
    result = cli("list", env={"PGPASSWORD": "not-the-password-7c1f"})
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secrets-manager: error: store postgresql://sm_test@"), (
        result.stderr
    )
    assert (
        "not-the-password-7c1f" not in result.stderr and postgres_cluster.role_password not in result.stderr
    )
    missing = cli("list")
    assert missing.code == 3 and "init" in missing.stderr


def test_a_backup_of_a_file_store_restores_into_a_postgres_store_after_init(cli: Cli, tmp_path: Path) -> None:
    """Moving from a laptop's SQLite file to PostgreSQL: backup, init there, restore."""
    laptop = tmp_path / "laptop.db"
    for args, stdin in (
        (["init", "--kdf-profile", "test"], b""),
        (["store", "auth/DB_PASSWORD"], b"from-the-laptop"),
        (["backup", str(tmp_path / "laptop.smbackup")], b""),
    ):
        done = subprocess.run(
            [str(SCRIPT), "--store", str(laptop), *args],
            input=stdin,
            capture_output=True,
            env=cli.env,
            start_new_session=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    before_init = cli("restore", str(tmp_path / "laptop.smbackup"))
    assert before_init.code == 3 and "create one with 'secrets-manager --store " in before_init.stderr
    assert " init'" in before_init.stderr
    assert len(before_init.stderr.strip().splitlines()) == 1
    assert cli("init", "--kdf-profile", "test").code == 0
    restored = cli("restore", str(tmp_path / "laptop.smbackup"))
    assert restored.code == 0, restored.stderr
    assert cli("get", "auth/DB_PASSWORD").out == "from-the-laptop\n"


def test_the_cli_refuses_a_password_in_the_url_in_production(
    place: Place, postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = f"{postgres_cluster.url(with_password=True)}?schema={place.schema}"
    password_file = tmp_path / "master"
    password_file.write_text(MASTER_PASSWORD)
    password_file.chmod(0o600)
    cli = Cli(url, tmp_path, {"SHRIVENQUANT_ENV": "production"})
    result = cli("--password-file", str(password_file), "list")
    assert result.code == 2 and "production refuses" in result.stderr
    assert postgres_cluster.role_password not in result.stderr


# ---- production: a database on another host is reached over verified TLS -------------------------


@pytest.mark.parametrize(
    ("url", "environ", "unchecked_host"),
    [
        ("postgresql://u@db.internal:5432/d", {}, "db.internal"),  # libpq's default: sslmode=prefer
        ("postgresql://u@db.internal/d?sslmode=require", {}, "db.internal"),  # encrypted, anyone's server
        ("postgresql://u@db.internal/d?sslmode=verify-ca", {}, "db.internal"),  # any name the CA signed
        ("postgresql://u@db.internal/d?sslmode=verify-full&sslrootcert=/etc/ca.pem", {}, None),
        ("postgresql://u@db.internal/d", {"PGSSLMODE": "verify-full"}, None),  # as libpq reads it
        ("postgresql://u@db.internal/d?sslmode=require", {"PGSSLMODE": "verify-full"}, "db.internal"),
        ("postgresql://u@127.0.0.1:5432/d", {}, None),  # loopback crosses no network
        ("postgresql://u@[::1]:5433/d", {}, None),
        ("postgresql://u@localhost/d?sslmode=disable", {}, None),
        ("postgresql://u@%2Fvar%2Frun%2Fpostgresql/d", {}, None),  # a Unix socket's directory
        ("postgresql://u@db.internal/d?hostaddr=127.0.0.1", {}, None),  # the address libpq connects to
        ("postgresql://u@localhost/d?hostaddr=10.0.0.5", {}, "10.0.0.5"),
        ("postgresql://u@127.0.0.1,db.internal:5433/d", {}, "db.internal"),  # every host it may try
        ("postgresql://u@[2001:db8::1]:5432/d?sslmode=require", {}, "2001:db8::1"),
    ],
)
def test_which_postgresql_urls_reach_a_server_whose_certificate_is_not_checked(
    url: str, environ: dict[str, str], unchecked_host: str | None
) -> None:
    location = postgres_location(url)
    assert location is not None
    problem = postgres_tls_problem("the store URL", dict(location.tls_options), environ)
    if unchecked_host is None:
        assert problem is None
    else:
        assert problem is not None and f"PostgreSQL at {unchecked_host} with sslmode=" in problem
        assert "add sslmode=verify-full and sslrootcert=CA.pem" in problem


@pytest.mark.parametrize(
    ("conninfo", "environ", "unchecked"),
    [
        ("", {}, False),  # libpq's default: the local Unix socket
        ("", {"PGHOST": "db.internal"}, True),
        ("host=db.internal dbname=trading sslmode=verify-full", {}, False),
        ("host=db.internal dbname=trading", {"PGSSLMODE": "verify-full"}, False),
        ("hostaddr=10.0.0.5 dbname=trading", {}, True),
        ("postgresql://admin@db.internal/trading?sslmode=require", {}, True),
        ("host=/var/run/postgresql user=admin", {}, False),
        ("service=prod dbname=trading", {}, True),  # pg_service.conf's host, not read here
        ("", {"PGSERVICE": "prod"}, True),
        ("service=prod sslmode=verify-full", {}, False),
        ("service=prod host=127.0.0.1", {}, False),  # the string's host beats the entry's
    ],
)
def test_a_rotations_connection_string_is_judged_as_libpq_reads_it(
    conninfo: str, environ: dict[str, str], unchecked: bool
) -> None:
    params = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(conninfo).items() if v is not None}
    assert (postgres_tls_problem("the rotation", params, environ) is not None) is unchecked


def test_production_refuses_a_remote_database_without_verify_full_and_staging_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = {"host": "db.internal", "sslmode": "require"}
    what = f"the store URL of {secrets.token_hex(4)}"  # not warned of yet in this process
    with pytest.raises(UnsafeConfigurationError, match=r"sslmode=require.*\(production refuses it\)$"):
        guard_postgres_tls(Environment.PRODUCTION, what, params, {})
    with caplog.at_level(logging.WARNING):
        guard_postgres_tls(Environment.DEVELOPMENT, what, params, {})
        assert caplog.records == []  # development: a database on a developer's network, no word
        for _ in range(3):
            guard_postgres_tls(Environment.STAGING, what, params, {})
    (warning,) = caplog.records  # staging, production's rehearsal: once per process
    assert "sslmode=require" in warning.getMessage()
    guard_postgres_tls(Environment.PRODUCTION, what, {**params, "sslmode": "verify-full"}, {})


def test_the_cli_in_production_refuses_a_remote_database_before_connecting(tmp_path: Path) -> None:
    """No connection is tried (the host does not resolve: libpq would say so, exit 1)."""
    password_file = tmp_path / "master"
    password_file.write_text(MASTER_PASSWORD)
    password_file.chmod(0o600)
    url = "postgresql://sm@db.example.invalid:5432/trading?sslmode=require"
    cli = Cli(url, tmp_path, {"SHRIVENQUANT_ENV": "production"})
    result = cli("--password-file", str(password_file), "list")
    assert result.code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "secrets-manager: error: the store URL postgresql://sm@db.example.invalid:5432/trading reaches "
        "PostgreSQL at db.example.invalid with sslmode=require, which does not check the server's "
        "certificate, so anyone on the network path could pose as the database; add sslmode=verify-full "
        "and sslrootcert=CA.pem (or set PGSSLMODE=verify-full) (production refuses it)"
    ]


def test_the_cli_warns_of_a_password_in_the_url_in_its_own_words(
    place: Place, postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = f"{postgres_cluster.url(with_password=True)}?schema={place.schema}"
    password_file = tmp_path / "master"
    password_file.write_text(MASTER_PASSWORD)
    result = Cli(url, tmp_path, {})("--password-file", str(password_file), "init", "--kdf-profile", "test")
    assert result.code == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if "process lists" in line]
    assert warning.startswith("secrets-manager: warning: the store URL ")
    assert postgres_cluster.role_password not in result.stderr


# ---- serve: replicas sharing one store ------------------------------------------------------------


def _serve(directory: Path, name: str, url: str, env: Mapping[str, str]) -> Server:
    """`secrets-manager serve` on `url` with its own config and audit log; returns once it listens."""
    config = directory / f"{name}.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nstore = "{url}"\npolicy = "policy.toml"\n'
        f'audit_file = "{name}.audit.jsonl"\nshutdown_grace_seconds = 5\n'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
    )
    process = subprocess.Popen(
        [str(SCRIPT), "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(directory), **env},
        start_new_session=True,
    )
    assert process.stderr is not None
    lines: list[str] = []
    while line := process.stderr.readline().decode():
        lines.append(line)
        if match := re.search(r'"port": (\d+)', line):
            reader = threading.Thread(
                target=lambda: lines.extend(r.decode() for r in process.stderr or []), daemon=True
            )
            reader.start()
            return Server(directory, process, int(match.group(1)), lines, reader=reader)
    process.kill()
    process.wait(timeout=10)
    raise AssertionError(f"server {name} did not start: {''.join(lines)}")


def test_two_serve_replicas_share_one_postgres_store(
    place: Place, postgres_cluster: PostgresCluster, pg_password: str, tmp_path: Path
) -> None:
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(SERVICE_POLICY)
    create_store(place.url, SERVICE_PASSWORD.encode(), kdf_profile="test", environment=DEV, actor="t").close()
    env = {**postgres_cluster.env(), "MASTER_PASSWORD": SERVICE_PASSWORD}
    servers: list[Server] = []
    try:
        for name in ("replica-a", "replica-b"):
            servers.append(_serve(tmp_path, name, place.url, env))
        a, b = servers
        written = a.cli("writer", "store", "auth/DB_PASSWORD", input=b"written-through-a")
        assert written.returncode == 0, written.stderr
        read = b.cli("auth", "get", "auth/DB_PASSWORD")
        assert read.returncode == 0 and read.stdout == b"written-through-a\n", read.stderr
    finally:
        for server in servers:
            server.stop()
    logs = [(tmp_path / f"{name}.audit.jsonl").read_text() for name in ("replica-a", "replica-b")]
    assert "auth/DB_PASSWORD" in logs[0] and "auth/DB_PASSWORD" in logs[1]
    assert "written-through-a" not in logs[0] + logs[1]
    assert postgres_cluster.role_password not in "".join(a.log_lines + b.log_lines)
    cli = Cli(place.url, tmp_path, env)
    for name in ("replica-a", "replica-b"):  # each log verifies against its own anchor in the store
        verified = cli("--audit-file", str(tmp_path / f"{name}.audit.jsonl"), "audit", "verify")
        assert verified.code == 0, verified.stderr


# ---- a server that stops answering, an answer lost ---------------------------------------------


def _through(proxy: TcpProxy, cluster: PostgresCluster) -> str:
    return f"host=127.0.0.1 port={proxy.port} dbname=sm_test user=sm_test password={cluster.role_password}"


def test_a_read_whose_answer_never_comes_ends_at_the_answer_timeout_without_a_retry(place: Place) -> None:
    """The server stops answering on a connection already open (connect_timeout cannot help):
    the call ends at the answer timeout with an error that names the store, and is not tried
    again on a new connection (which would wait as long again)."""
    place.open(create=True).close()
    proxy = AnswersStop("127.0.0.1", place.cluster.port, b"SELECT value, revision")
    try:
        storage = PostgresStorage(_through(proxy, place.cluster), schema=place.schema, answer_timeout=1)
        try:
            started = time.monotonic()
            with pytest.raises(StorageError) as caught:
                storage.get("k")
            took = time.monotonic() - started
        finally:
            storage.close()
    finally:
        proxy.close()
    assert proxy.stalled.is_set()
    assert type(caught.value) is StorageError
    assert str(caught.value) == (
        f"store postgresql://sm_test@127.0.0.1:{proxy.port}/sm_test?schema={place.schema}: no answer from "
        "the server within 1 s; is it up and reachable?"
    )
    assert 1 <= took < 3
    assert place.cluster.role_password not in str(caught.value)


def test_a_commit_whose_answer_never_comes_is_an_unknown_outcome(place: Place) -> None:
    """COMMIT reached the server, which committed; its answer never came. Not a plain failure:
    the change may have been made (here it was), so the caller must check before writing again."""
    direct = place.open(create=True)
    proxy = AnswersStop("127.0.0.1", place.cluster.port, b"COMMIT")
    try:
        storage = PostgresStorage(_through(proxy, place.cluster), schema=place.schema, answer_timeout=1)
        try:
            started = time.monotonic()
            with pytest.raises(OutcomeUnknownError, match=r"no answer to COMMIT within 1 s; the change may"):
                storage.put("k", b"written")
            assert time.monotonic() - started < 3
        finally:
            storage.close()
        entry = direct.get("k")
        assert entry is not None and entry.value == b"written"
    finally:
        proxy.close()
        direct.close()


def test_a_connection_reset_after_commit_reached_the_server_is_an_unknown_outcome(place: Place) -> None:
    direct = place.open(create=True)
    proxy = AnswerCut("127.0.0.1", place.cluster.port, b"COMMIT")
    try:
        storage = PostgresStorage(_through(proxy, place.cluster), schema=place.schema)
        try:
            with pytest.raises(OutcomeUnknownError) as caught:
                storage.put("k", b"written")
        finally:
            storage.close()
        assert proxy.cut
        assert str(caught.value) == (
            f"store postgresql://sm_test@127.0.0.1:{proxy.port}/sm_test?schema={place.schema}: the "
            "connection ended before the answer to COMMIT came; the change may have been made: check "
            "(history) before writing again"
        )
        entry = direct.get("k")
        assert entry is not None and entry.value == b"written"
    finally:
        proxy.close()
        direct.close()


def test_waiting_for_another_writer_is_not_cut_short_by_the_answer_timeout(place: Place) -> None:
    """The answer timeout bounds the wait for an answer beyond the commit's lock wait: a commit
    that waits 2 s for another writer's lock, with a 0.5 s answer timeout, lands."""
    storage = place.open(create=True, answer_timeout=0.5)
    try:
        storage.put("k", b"before")
        locked = threading.Event()

        def hold_the_lock() -> None:
            with place.cluster.commit_lock_held(place.schema):
                locked.set()
                time.sleep(2)

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        assert locked.wait(10)
        started = time.monotonic()
        revision = storage.put("k", b"after")
        assert time.monotonic() - started >= 1.5
        holder.join()
        assert storage.get("k") == Entry(b"after", revision)
    finally:
        storage.close()


@pytest.mark.parametrize("silent_from", [b"SET revision = revision + 1", b"INSERT INTO"])
def test_a_writer_whose_answers_stop_mid_transaction_does_not_hold_the_store_s_lock_for_others(
    place: Place, silent_from: bytes
) -> None:
    """A replica's connection goes silent once its commit holds the store's lock (the statement
    that takes it, or a later one, reached the server; nothing comes back): the server ends that
    idle transaction after 2 s, so another handle's commit lands instead of failing with "another
    writer held the store's lock". Before, the server kept the transaction until it noticed the
    connection gone (hours by TCP keepalive); and the rows were written by executemany, whose
    pipeline left the server waiting outside the idle limit's reach even with one set."""
    direct = place.open(create=True)
    proxy = AnswersStop("127.0.0.1", place.cluster.port, silent_from)
    stalled = PostgresStorage(_through(proxy, place.cluster), schema=place.schema, answer_timeout=1)
    failed: list[BaseException] = []

    def write_through_the_proxy() -> None:
        try:
            stalled.commit([Put("k", b"never")], lock_wait=1)
        except StorageError as exc:
            failed.append(exc)

    writer = threading.Thread(target=write_through_the_proxy)
    try:
        writer.start()
        assert proxy.stalled.wait(10)
        time.sleep(0.2)  # the bump has run: its row lock is held
        started = time.monotonic()
        revision = direct.commit([Put("k", b"landed")], lock_wait=10)
        took = time.monotonic() - started
        writer.join(10)
        assert direct.get("k") == Entry(b"landed", revision)
        assert took < 4, f"waited {took:.1f} s for the silent writer's lock"
        assert len(failed) == 1 and "no answer from the server within" in str(failed[0])
    finally:
        writer.join(10)
        stalled.close()
        proxy.close()
        direct.close()


@pytest.mark.parametrize("pause_before", ["the bump", "COMMIT"])
def test_a_commit_whose_own_process_paused_mid_transaction_is_made_once_on_a_new_connection(
    place: Place, monkeypatch: pytest.MonkeyPatch, pause_before: str
) -> None:
    """This process itself pauses inside a write transaction (CPU starved, swapped out) past the
    server's idle limit: the server rolls the transaction back and ends the session, whether the
    pause came before a statement or before COMMIT. That is no unknown outcome: the commit is made
    once more on a new connection, and lands once."""
    monkeypatch.setattr(postgres_module, "STALLED_TRANSACTION_TIMEOUT_MS", 100)
    storage = place.open(create=True)
    storage.put("k", b"before")
    opened = []
    open_connection = PostgresStorage._open_connection

    def counted_open(storage: PostgresStorage) -> Any:
        opened.append(1)
        return open_connection(storage)

    paused = pause_once_in_a_write(monkeypatch, pause_before)
    monkeypatch.setattr(PostgresStorage, "_open_connection", counted_open)
    try:
        before = storage.change_head()
        revision = storage.put("k", b"after")
        assert paused, "the pause was never made"
        assert len(opened) == 1, "the server did not end the paused transaction's session"
        assert storage.get("k") == Entry(b"after", revision)
        changes = storage.changes_since(before).changes
        assert [(c.key, c.revision) for c in changes] == [("k", revision)]
    finally:
        storage.close()


def test_a_commit_larger_than_one_statement_is_sent_as_several_in_its_one_transaction(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL takes at most 1 GB in one message, so a big commit (a restore) goes as
    statements of at most STATEMENT_BYTES each, still one commit: one revision, every row, every
    change logged."""
    monkeypatch.setattr(postgres_module, "STATEMENT_BYTES", 40)
    statements: list[str] = []
    execute = psycopg.Cursor.execute

    def recording_execute(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        statements.append(query.as_string(cursor.connection) if isinstance(query, sql.Composable) else query)
        return execute(cursor, query, *args, **kwargs)

    storage = place.open(create=True)
    try:
        storage.commit([Put(f"old/{n}", b"x") for n in range(10)])
        before = storage.change_head()
        monkeypatch.setattr(psycopg.Cursor, "execute", recording_execute)
        puts = [Put(f"new/{n}", bytes([n]) * 20) for n in range(10)]  # 25 bytes each: one a statement
        deletes = [Delete(f"old/{n}") for n in range(10)]
        revision = storage.commit([*puts, *deletes])
        monkeypatch.setattr(psycopg.Cursor, "execute", execute)
        assert sum("INSERT INTO" in s and ".entries" in s for s in statements) == 10
        assert sum("DELETE FROM" in s for s in statements) == 2  # 10 names of 5 characters: 8, 2
        assert sum("INSERT INTO" in s and ".changes" in s for s in statements) == 4  # 20 of 6: 6, 6, 6, 2
        assert storage.get_many([f"new/{n}" for n in range(10)]) == {
            f"new/{n}": Entry(bytes([n]) * 20, revision) for n in range(10)
        }
        assert storage.list("old/") == []
        changes = storage.changes_since(before).changes
        assert sorted((c.key, c.revision, c.deleted) for c in changes) == sorted(
            [(f"new/{n}", revision, False) for n in range(10)]
            + [(f"old/{n}", revision, True) for n in range(10)]
        )
    finally:
        storage.close()


def test_a_snapshot_may_pause_past_the_write_transactions_idle_limit(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader holds no lock a writer waits for and may pause between pages (a backup piped to a
    pager): its snapshot keeps the session's own idle limit, not the writers' short one."""
    monkeypatch.setattr(postgres_module, "STALLED_TRANSACTION_TIMEOUT_MS", 100)
    storage = place.open(create=True)
    try:
        revision = storage.put("k", b"value")
        with storage.snapshot() as snapshot:
            time.sleep(0.5)
            assert snapshot.get("k") == Entry(b"value", revision)
    finally:
        storage.close()


@pytest.mark.parametrize(
    ("options", "session", "limit"),
    [("?options=-c%20idle_in_transaction_session_timeout%3D500", "500ms", "500ms"), ("", "0", "2s")],
)
def test_a_write_transactions_idle_limit_is_ours_unless_a_shorter_one_is_set(
    place: Place, monkeypatch: pytest.MonkeyPatch, options: str, session: str, limit: str
) -> None:
    """Inside a commit the limits are ours (or the shorter one the role or URL set). On a direct
    connection they are its session's, set once at connect (per transaction, each write paid a
    statement more); a snapshot puts the session's own idle limit back for itself. (Behind a
    pooler, in test_postgres_pgbouncer.py, they are set per transaction, never for the session.)"""
    storage = PostgresStorage(f"{place.conninfo}{options}", schema=place.schema, create=True)
    shown: list[tuple[str, ...]] = []
    apply = PostgresStorage._apply

    def showing_apply(self: PostgresStorage, conn: Any, *args: Any, **kwargs: Any) -> int:
        shown.append(conn.execute("SHOW idle_in_transaction_session_timeout").fetchone())
        shown.append(conn.execute("SHOW lock_timeout").fetchone())
        return apply(self, conn, *args, **kwargs)

    monkeypatch.setattr(PostgresStorage, "_apply", showing_apply)
    try:
        storage.put("k", b"v")
        assert shown == [(limit,), ("30s",)]
        outside = storage._read(
            lambda conn: [
                conn.execute(f"SHOW {name}").fetchone()
                for name in ("idle_in_transaction_session_timeout", "lock_timeout")
            ]
        )
        assert outside == [(limit,), ("30s",)]
        with storage.snapshot() as snapshot:
            assert snapshot._conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == (session,)
    finally:
        storage.close()


def test_the_cli_ends_with_one_line_when_postgres_stops_answering(cli: Cli, place: Place) -> None:
    """`get`, then `store`, on a server that stops answering once the command is connected: each
    ends after the answer timeout (SECRETS_MANAGER_PG_ANSWER_TIMEOUT) with one line and exit 1;
    the store, whose COMMIT landed, says the change may have been made, and its audit record's
    outcome is `outcome_unknown`, not a failure."""
    assert cli("init", "--kdf-profile", "test").code == 0
    assert cli("store", "app/K", input=b"one").code == 0
    quick = {"SECRETS_MANAGER_PG_ANSWER_TIMEOUT": "1", "PGCONNECT_TIMEOUT": "2"}
    for command, trigger, after, value in (
        (("get", "app/K"), b"data/app/K", b"", b""),
        (("store", "app/K"), b"COMMIT", b"data/app/K#2", b"two"),
    ):
        proxy = AnswersStop("127.0.0.1", place.cluster.port, trigger, after=after)
        via = Cli(
            f"postgresql://sm_test@127.0.0.1:{proxy.port}/sm_test?schema={place.schema}",
            Path(cli.env["HOME"]),
            cli.env,
        )
        try:
            started = time.monotonic()
            result = via(*command, input=value, env=quick)
            took = time.monotonic() - started
        finally:
            proxy.close()
        assert proxy.stalled.is_set()
        assert result.code == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"secrets-manager: error: store postgresql://sm_test@127.0.0.1:{proxy.port}/sm_test"
        ), result.stderr
        assert took < 15, took
        if command[0] == "get":
            assert "no answer from the server within 1 s" in lines[0] and result.stdout == b""
        else:
            assert "no answer to COMMIT within 1 s; the change may have been made" in lines[0]
    assert cli("get", "app/K").out == "two\n"
    data = Path(cli.env["HOME"]) / ".local" / "share" / "secrets-manager"
    (log,) = data.glob(f"postgresql-127.0.0.1-{proxy.port}-*.audit.jsonl")  # the store's, through the proxy
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["operation"], r["outcome"]) for r in records if r["operation"] == "store"] == [
        ("store", "pending"),
        ("store", "outcome_unknown"),
    ]


def test_opening_a_store_whose_first_connection_is_ended_under_it_opens_on_a_new_one(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    """A server ending connections (a failover, pg_terminate_backend) while a process opens the
    store: its schema check on the ended connection failed the open ("terminating connection due
    to administrator command"), though every later read is retried once on a new connection. CI
    saw test_history's restarted client die of it."""
    place.open(create=True).close()
    ended: list[int] = []

    class FirstConnectionEnded(PostgresStorage):
        def _connect(self, **options: Any) -> Any:
            conn = super()._connect(**options)  # set up, and then ended before the open's schema check
            if not ended:
                ended.append(conn.info.backend_pid)
                end_backend(postgres_cluster, conn.info.backend_pid)
            return conn

    for create in (False, True):
        ended.clear()
        storage = FirstConnectionEnded(place.conninfo, schema=place.schema, create=create)
        try:
            assert ended, "the first connection was not ended"
            storage.commit([Put(f"opened-{create}", b"after the cut")])
            assert storage.get(f"opened-{create}") is not None
        finally:
            storage.close()


def test_a_new_connection_ended_in_its_set_up_query_is_opened_again(
    place: Place, postgres_cluster: PostgresCluster
) -> None:
    """The same on a new connection's own set-up query (encoding, server start time, pooler): a
    connection ended there failed the call that needed it, whatever it was."""
    place.open(create=True).close()
    ended: list[int] = []

    class EndedInSetUp(PostgresStorage):
        def _open_connection(self) -> Any:
            conn = super()._open_connection()  # connected, its set-up query not yet sent
            if not ended:
                ended.append(conn.info.backend_pid)
                end_backend(postgres_cluster, conn.info.backend_pid)
            return conn

    storage = EndedInSetUp(place.conninfo, schema=place.schema)
    try:
        assert ended, "the first connection was not ended"
        storage.commit([Put("opened", b"after the cut")])
        assert storage.get("opened") is not None
    finally:
        storage.close()


def end_backend(postgres_cluster: PostgresCluster, pid: int) -> None:
    """pg_terminate_backend(pid), returning once the backend is gone."""
    deadline = time.monotonic() + 10
    with postgres_cluster.connect(superuser=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, "the backend outlived pg_terminate_backend"
            time.sleep(0.02)
