"""Shared fixtures: a store file in a fresh private directory, an unlocked EncryptedStore on it,
moto's AWS server for the AWS store tests, the Vault test server (tests/vault_server.py) for the
Vault ones, and a private PostgreSQL cluster for the PostgreSQL ones.

Stores here use the cheap Argon2id profile `kdf.TEST` (production refuses it), so unlocking costs
milliseconds. Keep this file generic; fixtures for one test module belong in that module.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# gRPC's fork support restarts its poller in the child of every subprocess.Popen the test process
# makes after it used gRPC (a test's own client, a fixture's health check); between fork and exec,
# with Python's close_fds having closed the epoll fd, that poller can log "epoll_wait error: Bad
# file descriptor" to the child's stderr, which a test reading the CLI's first stderr line took
# for the CLI's (grpc/grpc#43055). Every child here execs: the test process needs no fork support.
# Set before gRPC is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

if TYPE_CHECKING:
    from vault_server import FakeVault

TEST_PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def private_umask() -> Iterator[None]:
    """Files a test writes (password files, certificates, configs) are 0600, as the README asks
    of them: a looser one draws a warning outside production, which would add a line to every
    one-line error a test expects. Tests of other modes chmod their files or set a umask."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


@pytest.fixture(autouse=True, scope="session")
def no_unlock_agent_of_the_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The CLI asks the user's unlock agent (agent/, at $XDG_RUNTIME_DIR) before prompting: the
    tests' CLI processes get a runtime directory of their own, so an agent the developer runs is
    neither asked (a prompt test would not prompt) nor handed the tests' keys. Agent tests start
    their own agent in a directory they choose."""
    runtime = tmp_path_factory.mktemp("xdg-runtime")
    runtime.chmod(0o700)
    previous = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    yield
    if previous is None:
        os.environ.pop("XDG_RUNTIME_DIR", None)
    else:
        os.environ["XDG_RUNTIME_DIR"] = previous


OpenStore = Callable[..., EncryptedStore]


@pytest.fixture
def tmp_store_path(tmp_path: Path) -> Path:
    """Where a test's store file goes: inside a directory that does not exist yet."""
    return tmp_path / "store" / "secrets.db"


@pytest.fixture
def store_password() -> str:
    return TEST_PASSWORD


@pytest.fixture
def open_store(tmp_store_path: Path, store_password: str) -> Iterator[OpenStore]:
    """A factory: `open_store(password=..., **options)` opens the store at `tmp_store_path` again.

    Each call returns a new handle (its own SqliteStorage connection); all are closed at teardown.
    """
    opened: list[EncryptedStore] = []

    def _open(password: str = store_password, **options: Any) -> EncryptedStore:
        storage = SqliteStorage(tmp_store_path)
        try:
            store = EncryptedStore.open(storage, PasswordUnlock(password, kdf.TEST), **options)
        except BaseException:
            storage.close()
            raise
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def encrypted_store(tmp_store_path: Path, store_password: str) -> Iterator[EncryptedStore]:
    """A new, empty EncryptedStore on SQLite at `tmp_store_path`, unlocked with `store_password`."""
    storage = SqliteStorage(tmp_store_path, create=True)
    store = EncryptedStore.create(storage, PasswordUnlock(store_password, kdf.TEST))
    yield store
    store.close()


@pytest.fixture
def raw(encrypted_store: EncryptedStore, tmp_store_path: Path) -> Iterator[SqliteStorage]:
    """A second, plain Storage handle on the store file: the attacker's view."""
    handle = SqliteStorage(tmp_store_path)
    yield handle
    handle.close()


MadeOnce = Callable[[str, Callable[[Path], object], Path], None]


@pytest.fixture(scope="session")
def made_once(tmp_path_factory: pytest.TempPathFactory) -> MadeOnce:
    """`made_once(key, make, into)`: the first time `key` is asked for in this test process (one
    xdist worker), `make(directory)` builds in a new empty directory what a test starts from (a
    store made by the real CLI: `init`, `store`); every call then copies that directory's tree
    into `into` (file modes kept, nothing in it refers to its path), so each test still gets
    files of its own, as if made for it, without paying a CLI process per step each time."""
    made: dict[str, Path] = {}

    def copy(key: str, make: Callable[[Path], object], into: Path) -> None:
        if key not in made:
            directory = tmp_path_factory.mktemp("made-once")
            make(directory)
            made[key] = directory
        shutil.copytree(made[key], into, symlinks=True, dirs_exist_ok=True)

    return copy


@pytest.fixture
def fake_vault() -> Iterator[FakeVault]:
    """The Vault test server (it follows Vault's documented HTTP API), started for one test."""
    from vault_server import FakeVault  # here, not at the top: most test modules never need it

    vault = FakeVault().start()
    yield vault
    vault.stop()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's ThreadedMotoServer on 127.0.0.1: a real HTTP endpoint that boto3 signs requests to.

    Shared by the session: tests keep apart by using their own name prefixes. Without moto the
    tests that need it are skipped, except under CI (the `CI` variable set), where they fail."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(
                "moto[server] is not installed but CI must run the AWS tests: pip install -e '.[dev]'"
            )
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]' brings it)")
    _clear_descriptions_as_aws_does()
    _date_versions_as_aws_does()
    _keep_one_current_version_as_aws_does()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _clear_descriptions_as_aws_does() -> None:
    """moto's UpdateSecret keeps the old description when given an empty one (`description or
    secret.description`); AWS clears it (DescribeSecret then has no Description), as
    `secrets-manager metadata NAME --description ''` relies on. Patched here to AWS's behaviour."""
    from moto.secretsmanager.models import SecretsManagerBackend

    update_secret = SecretsManagerBackend.update_secret
    if getattr(update_secret, "clears_descriptions", False):
        return

    def clearing(self: Any, secret_id: str, *args: Any, **kwargs: Any) -> Any:
        result = update_secret(self, secret_id, *args, **kwargs)
        if kwargs.get("description") == "":
            self.secrets[secret_id].description = ""
        return result

    clearing.clears_descriptions = True  # type: ignore[attr-defined]
    SecretsManagerBackend.update_secret = clearing  # type: ignore[method-assign]


def _date_versions_as_aws_does() -> None:
    """moto's ListSecretVersionIds reports the time of the call as every version's CreatedDate;
    AWS reports when the version was created (`list --older-than` and `history` rely on it).
    Patched here to the creation time moto keeps with each version."""
    from moto.secretsmanager.models import SecretsManagerBackend

    list_versions = SecretsManagerBackend.list_secret_version_ids
    if getattr(list_versions, "dates_versions", False):
        return

    def dated(self: Any, secret_id: str, *args: Any, **kwargs: Any) -> Any:
        reply = json.loads(list_versions(self, secret_id, *args, **kwargs))
        versions = self.secrets[secret_id].versions
        for version in reply["Versions"]:
            version["CreatedDate"] = versions[version["VersionId"]]["createdate"]
        return json.dumps(reply)

    dated.dates_versions = True  # type: ignore[attr-defined]
    SecretsManagerBackend.list_secret_version_ids = dated  # type: ignore[method-assign]


def _keep_one_current_version_as_aws_does() -> None:
    """moto's UpdateSecretVersionStage moves AWSCURRENT's label but not the version moto's
    PutSecretValue takes for current (`default_version_id`), so the next PutSecretValue made the
    version current before the move AWSPREVIOUS and left AWSCURRENT on the promoted one too: two
    versions current, and `previous` on the wrong one. AWS keeps a stage on one version, and
    PutSecretValue moves AWSPREVIOUS to the version that held AWSCURRENT. Patched here to AWS's
    behaviour (found by tests/test_store_model.py: put, stage, promote, put)."""
    from moto.secretsmanager.models import SecretsManagerBackend

    update_stage = SecretsManagerBackend.update_secret_version_stage
    if getattr(update_stage, "keeps_one_current", False):
        return

    def moving_current(
        self: Any, secret_id: str, version_stage: str, remove_from_version_id: str, move_to_version_id: str
    ) -> Any:
        result = update_stage(self, secret_id, version_stage, remove_from_version_id, move_to_version_id)
        if version_stage == "AWSCURRENT" and move_to_version_id:
            self.secrets[secret_id].default_version_id = move_to_version_id
        return result

    moving_current.keeps_one_current = True  # type: ignore[attr-defined]
    SecretsManagerBackend.update_secret_version_stage = moving_current  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Any]:
    """A private PostgreSQL 15 cluster (tests/postgres_cluster.py) on 127.0.0.1 and a free port,
    password auth on, stopped and removed at the end of the session.

    Shared by the session: tests keep apart by using schemas of their own. Where the server
    binaries or the `postgres` user are missing the tests that need it are skipped, except under
    CI (the `CI` variable set), where they fail."""
    try:
        from postgres_cluster import ClusterUnavailable, PostgresCluster
    except ImportError as exc:  # psycopg is a runtime dependency: this is a broken install
        if os.environ.get("CI"):
            pytest.fail(f"cannot import the PostgreSQL test helpers ({exc}): pip install -e '.[dev]'")
        pytest.skip(f"cannot import the PostgreSQL test helpers ({exc}): pip install -e '.[dev]'")
    cluster = PostgresCluster()
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests, but {exc}")
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
