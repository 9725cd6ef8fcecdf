"""Two writers racing with compare-and-set (`store --expect-version N`) on the same name, on each of
the four stores: one wins, the other is refused with ConflictError (exit 7), and no version is lost.

On SQLite and PostgreSQL the check and the write are one transaction under the store's write lock.
On Vault the write is KV's `cas` (the test server checks and writes under one lock, as Vault does
under its per-key lock). AWS has no compare-and-set: ours is the fixed VersionId of the next
number, passed as ClientRequestToken, which AWS refuses to give a second version with another
value (ResourceExistsException). The tests below hold both writers just before their write
request, after each has read and checked the current version, so the backend alone decides: the
window the store's own check cannot close. AWS treats a PutSecretValue with an id it has and the
same value as a retry of the first: two writers of the identical value both succeed, with one
version written (docs/stores.md, "Version numbers on AWS"); tested as promised.

moto is not AWS here in one way: its check of a ClientRequestToken and its write of the version
are not under one lock (its server's lock covers the dispatch only), so two requests interleaved
in that window of a few microseconds could both be taken; AWS decides them atomically. So the gate
lets the two write requests through one after the other (each writer has passed its own check by
then): the backend decides the second by what the first wrote, whichever the scheduler sent first.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from secrets_manager.crypto import kdf
from secrets_manager.errors import ConflictError
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.vault import VaultStore, connect_vault, retrying_session
from store_differ import four_cli_stores
from vault_server import FakeVault

PASSWORD = "correct horse battery staple"
ROUNDS = 3
BACKENDS = ["sqlite", "postgres", "vault", "aws"]


class Gate:
    """Holds each of two writers just before its write request until both are there (or 5 s pass:
    a writer refused before it writes, by its own check, never arrives), then lets their write
    requests through one at a time (`wait` … `done`): both have passed their own check, and the
    backend decides the second by what the first wrote. Let go together, which reached the backend
    first, and whether their requests overlapped there, was up to the scheduler; moto checks a
    ClientRequestToken and writes the version in two steps its lock does not cover, so overlapping
    requests could both be taken there (never on AWS)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=5)
        self.turn = threading.Semaphore(1)
        self.held = 0

    def wait(self) -> None:
        self.held += 1
        with contextlib.suppress(threading.BrokenBarrierError):
            self.barrier.wait()
        self.turn.acquire(timeout=30)  # never a hang: past it the test fails on what it sees

    def done(self) -> None:
        self.turn.release()


def _pair(
    kind: str, tmp_path: Path, postgres_cluster: Any, fake_vault: FakeVault, moto_endpoint: str
) -> tuple[Callable[[Gate | None], Any], Callable[[], None]]:
    """A function opening a new handle on one store of `kind` (each writer its own, as two
    processes would), its write request held at the gate if one is given; and a cleanup."""
    opened: list[Any] = []
    if kind == "sqlite":
        path = tmp_path / "store.db"
        EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(PASSWORD, kdf.TEST)).close()

        def handle(gate: Gate | None) -> Any:
            store = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(PASSWORD, kdf.TEST))
            opened.append(store)
            return store

    elif kind == "postgres":
        url, schema = postgres_cluster.url(with_password=True), postgres_cluster.new_schema()
        EncryptedStore.create(
            PostgresStorage(url, schema=schema, create=True), PasswordUnlock(PASSWORD, kdf.TEST)
        ).close()

        def handle(gate: Gate | None) -> Any:
            store = EncryptedStore.open(
                PostgresStorage(url, schema=schema), PasswordUnlock(PASSWORD, kdf.TEST)
            )
            opened.append(store)
            return store

    elif kind == "vault":

        def handle(gate: Gate | None) -> Any:
            session = retrying_session(attempts=3, backoff=0.001)
            if gate is not None:
                request = session.request

                def held(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
                    if method.upper() not in ("POST", "PUT") or "/secret/data/race/" not in url:
                        return request(method, url, *args, **kwargs)
                    gate.wait()
                    try:
                        return request(method, url, *args, **kwargs)
                    finally:
                        gate.done()

                session.request = held  # type: ignore[method-assign]
            client = connect_vault(
                fake_vault.address, environ={"VAULT_TOKEN": fake_vault.root_token}, session=session
            )
            store = VaultStore(client, "secret", actor="tester")
            opened.append(store)
            return store

    else:
        prefix = f"race-{secrets.token_hex(4)}"

        def handle(gate: Gate | None) -> Any:
            client = boto3.session.Session(
                aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
            ).client("secretsmanager", endpoint_url=moto_endpoint, config=Config(retries={"max_attempts": 2}))
            if gate is not None:
                events = client.meta.events
                events.register("before-call.secretsmanager.PutSecretValue", lambda **_: gate.wait())
                for answered in ("after-call", "after-call-error"):
                    events.register(f"{answered}.secretsmanager.PutSecretValue", lambda **_: gate.done())
            store = AwsStore(client, prefix, actor="tester")
            opened.append(store)
            return store

    def close() -> None:
        for store in opened:
            store.close()

    return handle, close


@pytest.fixture(params=BACKENDS)
def store_kind(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres_cluster: Any,
    fake_vault: FakeVault,
    moto_endpoint: str,
) -> Iterator[tuple[str, Callable[[Gate | None], Any]]]:
    handle, close = _pair(request.param, tmp_path, postgres_cluster, fake_vault, moto_endpoint)
    yield request.param, handle
    close()


def _race(
    kind: str, handle: Callable[[Gate | None], Any], name: str, values: tuple[bytes, bytes], expect: int
) -> list[Any]:
    """Two writers, each with its own handle, writing `values` with --expect-version `expect`, held
    together before their write requests: each one's version number or the error it raised. On
    Vault and AWS both must have passed their own check and reached the gate (the backend alone
    decides); ours check under the write lock, with no request between check and write to hold."""
    gate = Gate()
    writers = [handle(gate), handle(gate)]

    def write(index: int) -> Any:
        try:
            return writers[index].put(name, values[index], expect_version=expect).version
        except ConflictError as error:
            return error

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(write, range(2)))
    if kind in ("vault", "aws"):
        assert gate.held == 2, f"{kind}: a writer was refused before its write request: {results}"
    return results


@pytest.mark.slow
def test_two_writers_with_the_same_expected_version_one_wins_one_is_refused(
    store_kind: tuple[str, Callable[[Gate | None], Any]],
) -> None:
    kind, handle = store_kind
    reader = handle(None)
    for round_number in range(ROUNDS):
        name = f"race/r{round_number}"
        reader.put(name, b"first")
        values = (b"writer-a-%d" % round_number, b"writer-b-%d" % round_number)
        results = _race(kind, handle, name, values, expect=1)
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, ConflictError)]
        assert won == [2] and len(lost) == 1, f"{kind} round {round_number}: {results}"
        assert lost[0].exit_code == 7 and "\n" not in str(lost[0])
        winner = values[results.index(2)]
        meta = reader.describe(name)
        assert [v.version for v in meta.versions] == [1, 2] and meta.current_version == 2, (kind, meta)
        assert reader.get(name).value.reveal() == winner, kind
        assert reader.get(name, version=1).value.reveal() == b"first", kind


@pytest.mark.slow
def test_two_writers_of_the_same_value_with_the_same_expected_version(
    store_kind: tuple[str, Callable[[Gate | None], Any]],
) -> None:
    """The one difference, AWS's (docs/stores.md): AWS takes the second PutSecretValue of version
    2's id and the same value as a retry of the first, so both writers succeed; one version is
    written, holding that value, and nothing is lost. Every other store refuses the second."""
    kind, handle = store_kind
    reader = handle(None)
    reader.put("race/same", b"first")
    results = _race(kind, handle, "race/same", (b"same", b"same"), expect=1)
    if kind == "aws":
        assert results == [2, 2], results
    else:
        assert sorted(results, key=str)[0] == 2 and isinstance(sorted(results, key=str)[1], ConflictError), (
            results
        )
    meta = reader.describe("race/same")
    assert [v.version for v in meta.versions] == [1, 2] and meta.current_version == 2, (kind, meta)
    assert reader.get("race/same").value.reveal() == b"same"


SCRIPT = Path(sys.executable).with_name("secrets-manager")


@pytest.mark.slow
def test_two_store_commands_with_the_same_expect_version_give_one_success_and_one_exit_7(
    tmp_path: Path, postgres_cluster: Any, fake_vault: FakeVault, moto_endpoint: str
) -> None:
    """The same through the CLI, two `store --expect-version 1` processes started together on each
    store: exit 0 and exit 7 (in one line), and the store holds versions 1 and the winner's 2."""
    urls, environs = four_cli_stores(
        tmp_path,
        postgres_cluster,
        fake_vault.address,
        fake_vault.root_token,
        moto_endpoint,
        password=PASSWORD,
        aws_prefix="race",
    )
    for label, url in urls.items():
        env = environs[label]

        def run(args: list[str], value: bytes, env: dict[str, str] = env, url: str = url) -> Any:
            return subprocess.run(
                [str(SCRIPT), "--store", url, *args], input=value, capture_output=True, env=env, timeout=120
            )

        assert run(["store", "race/cli"], b"first").returncode == 0
        procs = [
            subprocess.Popen(
                [str(SCRIPT), "--store", url, "store", "race/cli", "--expect-version", "1"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for _ in range(2)
        ]
        answers = [proc.communicate(b"writer-%d" % index, timeout=120) for index, proc in enumerate(procs)]
        codes = sorted(proc.returncode for proc in procs)
        assert codes == [0, 7], (label, codes, answers)
        refused = answers[[proc.returncode for proc in procs].index(7)][1].decode()
        assert len(refused.strip().splitlines()) == 1 and "Traceback" not in refused, (label, refused)
        winner = [proc.returncode for proc in procs].index(0)
        shown = run(["get", "race/cli"], b"")
        assert shown.stdout.strip() == b"writer-%d" % winner, (label, shown)
        history = run(["history", "race/cli", "--json"], b"")
        assert history.returncode == 0 and '"version": 3' not in history.stdout.decode(), (label, history)
