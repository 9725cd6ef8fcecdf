"""The Python SDK of issue #6 against real `secrets-manager serve` processes: mutual TLS with real
certificates, a real policy, a real SQLite store (shared by two servers in the failover test)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from secrets_manager import get_credentials_sync
from secrets_manager.client import (
    AsyncClient,
    Client,
    RemoteStore,
    SecretChanged,
    _cache,
    _client,
    _replicas,
    close_default_client,
)
from secrets_manager.client import remote as remote_module
from secrets_manager.client._renewal import CertificateFiles
from secrets_manager.crypto import Purpose, kdf
from secrets_manager.errors import (
    AccessDeniedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    StorageError,
)
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store import encrypted as encrypted_module
from secrets_manager.store.keys import rotate_root_key
from secrets_manager.tls import pki
from secrets_manager.tls.files import write_private_file
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.values import SecretValue
from service_fixtures import (
    PASSWORD,
    SEED,
    TD,
    Server,
    SilentListener,
    client_environ,
    free_address,
    make_pki,
    make_store,
    run_script,
    start_server,
    tls_files,
)
from tcp_proxy import TcpProxy, Verdict

AUTH = {name: value for name, value in SEED.items() if name.startswith("auth/")}
MARKET = {name: value for name, value in SEED.items() if name.startswith("market-connector/")}
ClientFactory = Callable[..., Client]


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    make_pki(tmp_path)
    make_store(tmp_path)
    return tmp_path


@pytest.fixture
def server(service_dir: Path) -> Iterator[Server]:
    running = start_server(service_dir)
    yield running
    running.stop()


@pytest.fixture
def make_client(service_dir: Path) -> Iterator[ClientFactory]:
    """`make_client("auth", [addresses], **options)`: a Client with that identity's certificate."""
    made: list[Client] = []

    def make(identity: str, addresses: list[str], **options: Any) -> Client:
        client = Client(environ=client_environ(service_dir, identity, addresses), **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture(autouse=True)
def _fresh_default_client() -> Iterator[None]:
    yield
    close_default_client()


def revealed(mapping: Any) -> dict[str, bytes]:
    return {name: value.reveal() for name, value in mapping.items()}


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.005) -> float:
    """Seconds until `condition()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


# ---- what the caller may read ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "expected"),
    [("auth", AUTH), ("market-connector", MARKET), ("ops", SEED)],
)
def test_get_credentials_returns_exactly_what_the_policy_allows(
    server: Server,
    service_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    identity: str,
    expected: dict[str, bytes],
) -> None:
    for variable, value in client_environ(service_dir, identity, [server.address]).items():
        monkeypatch.setenv(variable, value)
    creds = get_credentials_sync()
    assert revealed(creds) == expected
    assert not creds.stale


def test_a_namespace_view_is_keyed_by_the_names_inside_it(server: Server, make_client: ClientFactory) -> None:
    client = make_client("market-connector", [server.address])
    creds = client.credentials("market-connector")
    assert creds["BINANCE_API_KEY"].reveal() == SEED["market-connector/BINANCE_API_KEY"]
    assert sorted(creds) == ["BINANCE_API_KEY", "BINANCE_SECRET"]
    assert dict(client.credentials("auth")) == {}
    with pytest.raises(InvalidInputError):
        client.credentials("not/a-namespace")


def test_a_namespace_is_fetched_by_its_prefix_and_no_other_secret_is_read(
    server: Server, make_client: ClientFactory
) -> None:
    """credentials('auth') of a client that may read everything asks the service for 'auth/'
    alone: no secret of another namespace is read (nor audited as read), however many it holds.
    Before, every secret the client may read was fetched and all but auth's thrown away."""
    client = make_client("ops", [server.address])
    assert revealed(client.credentials("auth")) == {
        name.removeprefix("auth/"): value for name, value in AUTH.items()
    }
    reads = {
        r["name"]
        for r in server_audit(server)
        if r["actor"] == f"spiffe://{TD}/ops" and r["operation"] == "get"
    }
    assert reads == set(AUTH)
    assert revealed(client.credentials()) == SEED  # everything: a listing of its own
    assert revealed(client.credentials("market-connector")) == {
        name.removeprefix("market-connector/"): value for name, value in MARKET.items()
    }


def test_a_re_read_of_everything_fetches_the_full_listing_alone_not_each_namespace_again(
    server: Server, make_client: ClientFactory
) -> None:
    """With every secret's listing cached beside a namespace's, a re-read of everything (RESYNC,
    a stream that could not resume) fetches the full listing once; the namespace's names and
    values come with it."""
    client = make_client("ops", [server.address])
    assert sorted(client.credentials("auth")) == ["DB_PASSWORD", "JWT_KEY"]  # its own listing
    assert revealed(client.credentials()) == SEED
    backend = client._backend
    assert backend is not None
    fetch_all, prefixes = backend.fetch_all, []

    def counted(prefix: str = "") -> Any:
        prefixes.append(prefix)
        return fetch_all(prefix)

    backend.fetch_all = counted  # type: ignore[method-assign]
    client._refresh_everything()
    assert prefixes == [""]
    assert sorted(client.credentials("auth")) == ["DB_PASSWORD", "JWT_KEY"]


def test_one_secret_a_version_and_its_history(server: Server, make_client: ClientFactory) -> None:
    writer = make_client("writer", [server.address])
    assert writer.put("auth/DB_PASSWORD", "rotated-db-pass-SEEKRIT") == 2
    assert writer.get("auth/DB_PASSWORD").value.reveal() == b"rotated-db-pass-SEEKRIT"  # reads its write
    assert writer.get("auth/DB_PASSWORD", version=1).value.reveal() == SEED["auth/DB_PASSWORD"]
    assert writer.get("auth/DB_PASSWORD", label="previous").version == 1
    assert [v.version for v in writer.describe("auth/DB_PASSWORD").versions] == [1, 2]
    assert [m.name for m in writer.list("auth/")] == ["auth/DB_PASSWORD", "auth/JWT_KEY"]


def test_arguments_of_the_wrong_type_are_refused_before_anything_is_sent(
    server: Server, make_client: ClientFactory
) -> None:
    """Found by fuzzing the SDK: a name given as bytes was written (protobuf takes bytes for a
    string field) before put failed on it (TypeError); a version and a label together returned the
    label's version, not the one asked for; other odd types failed with Python's own words
    ('bad argument type for built-in operation', "'NoneType' object has no attribute 'encode'")."""
    writer = make_client("writer", [server.address])
    before = writer.describe("auth/DB_PASSWORD").versions
    refused: list[tuple[Callable[[], object], str]] = [
        (lambda: writer.put(b"auth/DB_PASSWORD", b"v"), "the secret name must be text (str), not bytes"),  # type: ignore[arg-type]
        (lambda: writer.put(123, b"v"), "the secret name must be text (str), not int"),  # type: ignore[arg-type]
        (lambda: writer.get(["auth/JWT_KEY"]), "the secret name must be text (str), not list"),  # type: ignore[arg-type]
        (lambda: writer.describe(b"auth/JWT_KEY"), "not bytes"),  # type: ignore[arg-type]
        (lambda: writer.list(b"auth/"), "the name prefix must be text (str), not bytes"),  # type: ignore[arg-type]
        (
            lambda: writer.get("auth/DB_PASSWORD", version=1, label="current"),
            "a version or a label, not both",
        ),
        (lambda: writer.get("auth/DB_PASSWORD", version=-1), "a version is a whole number"),
        (lambda: writer.get("auth/DB_PASSWORD", version=True), "a version is a whole number"),
        (lambda: writer.get("auth/DB_PASSWORD", label=1), "the label must be text (str), not int"),  # type: ignore[arg-type]
        (lambda: writer.put("auth/DB_PASSWORD", None), "must be bytes, str or SecretValue, not NoneType"),  # type: ignore[arg-type]
        (lambda: writer.put("auth/DB_PASSWORD", b"v", expect_version=-1), "expect_version is a whole number"),
    ]
    for call, message in refused:
        with pytest.raises(InvalidInputError) as caught:
            call()
        assert message in str(caught.value)
    assert writer.describe("auth/DB_PASSWORD").versions == before  # nothing was written
    assert writer.put("auth/DB_PASSWORD", bytearray(b"bytes-like-SEEKRIT")) == 2  # bytes-like: written
    assert writer.get("auth/DB_PASSWORD").value.reveal() == b"bytes-like-SEEKRIT"


def test_denied_and_missing_secrets_raise_the_documented_errors(
    server: Server, make_client: ClientFactory
) -> None:
    auth = make_client("auth", [server.address])
    with pytest.raises(AccessDeniedError):
        auth.get("market-connector/BINANCE_API_KEY")
    with pytest.raises(AccessDeniedError):
        auth.put("auth/DB_PASSWORD", b"the auth role may only read")
    with pytest.raises(NotFoundError):
        make_client("ops", [server.address]).get("auth/NOPE")
    with pytest.raises(AccessDeniedError, match="holds no role"):  # not an empty mapping
        make_client("nobody", [server.address]).credentials()


# ---- push refresh ---------------------------------------------------------------------------------


def test_a_value_changed_on_the_server_reaches_20_subscribed_clients_within_a_second(
    server: Server, make_client: ClientFactory
) -> None:
    clients = [make_client("auth", [server.address]) for _ in range(20)]
    for client in clients:
        assert revealed(client.credentials()) == AUTH
    # The second is counted from the put to when each client has cached the new value (its
    # on_change callback, on its own thread, comes after that): not the writer's start (its
    # channel and handshake: a change made first serves as warm-up), nor this thread's polling
    # of 20 clients, which a loaded machine schedules late.
    heard: dict[int, dict[int | None, float]] = {index: {} for index in range(len(clients))}
    for index, client in enumerate(clients):
        client.on_change(
            lambda change, index=index: heard[index].setdefault(change.version, time.monotonic()),
            "auth/JWT_KEY",
        )
    writer = make_client("writer", [server.address])
    warm_up = b"jwt-key-ROTATED-first"
    writer.put("auth/JWT_KEY", warm_up)  # also: every client's watch stream is up once it is heard
    wait_until(lambda: all(c.credentials()["auth/JWT_KEY"].reveal() == warm_up for c in clients), 20.0)
    new_value = b"jwt-key-ROTATED-within-a-second"
    put_at = time.monotonic()
    version = writer.put("auth/JWT_KEY", new_value)
    late = wait_until(lambda: all(version in versions for versions in heard.values()), 20.0, 0.05)
    for client in clients:
        assert client.credentials()["auth/JWT_KEY"].reveal() == new_value
    slowest = max(versions[version] for versions in heard.values()) - put_at
    assert slowest < 1.0, f"the slowest client cached the new value after {slowest:.3f} s (seen {late:.3f} s)"


def test_a_new_secret_the_caller_may_read_appears_and_a_deleted_one_disappears(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    reader = make_client("auth", [server.address])
    assert set(reader.credentials()) == set(AUTH)
    time.sleep(1.0)
    ops = RemoteStore(server.address, tls_files(service_dir, "ops"))
    try:
        ops.put("auth/NEW_TOKEN", b"new-token-SEEKRIT")
        ops.put("market-connector/NOT_FOR_AUTH", b"other-namespace-SEEKRIT")
        wait_until(lambda: "auth/NEW_TOKEN" in reader.credentials(), timeout=2.0)
        ops.delete("auth/NEW_TOKEN")
        wait_until(lambda: "auth/NEW_TOKEN" not in reader.credentials(), timeout=2.0)
    finally:
        ops.close()
    assert set(reader.credentials()) == set(AUTH)


def test_names_created_and_deleted_leave_no_per_name_marker_behind(
    server: Server, service_dir: Path, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each change event left a marker for its name in the cache (fetches that started before it
    are refused), and a deleted name one more, never removed: a long-running service that sees
    many names created and deleted grew by one or two entries per name for good. A marker matters
    only to fetches in flight when it was set, so the cache now drops those older than every fetch
    in flight once there are enough of them (256; 8 here)."""
    monkeypatch.setattr(_cache, "MARKERS_BEFORE_PRUNE", 8, raising=False)
    reader = make_client("auth", [server.address])
    assert set(reader.credentials()) == set(AUTH)
    wait_until(lambda: reader._live_since is not None, timeout=5.0)
    ops = RemoteStore(server.address, tls_files(service_dir, "ops"))
    names = [f"auth/SHORT_LIVED_{index}" for index in range(40)]
    try:
        for name in names:
            ops.put(name, b"short-lived-SEEKRIT")
        wait_until(lambda: set(names) <= set(reader.credentials()), timeout=20.0, interval=0.05)
        for name in names:
            ops.delete(name)
        wait_until(lambda: set(reader.credentials()) == set(AUTH), timeout=20.0, interval=0.05)
    finally:
        ops.close()
    cache = reader._secrets

    def markers() -> int:
        return len(cache._floors) + len(cache._removed)

    time.sleep(1.0)  # the refresher's last fetches land
    assert markers() < 16, markers()  # 80 and more before
    assert revealed(reader.credentials()) == AUTH


def _destroy(service_dir: Path, name: str) -> None:
    """Destroy `name` on the server's store (the service offers no destroy)."""
    store = EncryptedStore.open(SqliteStorage(service_dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        store.destroy_secret(name)
    finally:
        store.close()


class _HeldFetch:
    """Patched into a client: its first fetch of `name` reads the service, then waits for
    `release()` before returning, so the answer lands after whatever the test does meanwhile."""

    def __init__(self, client: Client, name: str) -> None:
        self.fetched, self._release = threading.Event(), threading.Event()
        self.landed = threading.Event()  # the cache was offered the held answer
        backend, store_secret = client._backend, client._store_secret
        assert backend is not None
        fetch = backend.fetch

        def held_fetch(wanted: str, **options: Any) -> Any:
            secret = fetch(wanted, **options)
            if wanted == name and not self.fetched.is_set():
                self.fetched.set()
                self._release.wait(10)
            return secret

        def store(secret: Any, started: float, **options: Any) -> None:
            store_secret(secret, started, **options)
            if secret.name == name:
                self.landed.set()

        backend.fetch = held_fetch  # type: ignore[method-assign]
        client._store_secret = store  # type: ignore[method-assign]

    def release(self) -> None:
        self._release.set()


def _settled_backend(client: Client) -> Any:
    """The client's backend once its watch stream is live and its settle re-read is done: from
    here only what a test does brings news."""
    wait_until(lambda: client._live_since is not None, timeout=5.0)
    time.sleep(_client.SETTLE_SECONDS + 0.5)
    backend = client._backend
    assert backend is not None
    return backend


def _rotate_while_listed(server: Server, service_dir: Path, handled: list[tuple[str, str]]) -> None:
    """Another client stores a new BINANCE_SECRET; returns once the client has handled its event."""
    ops = RemoteStore(server.address, tls_files(service_dir, "ops"))
    try:
        ops.put("market-connector/BINANCE_SECRET", b"rotated-while-listed")
    finally:
        ops.close()
    wait_until(lambda: ("version_added", "market-connector/BINANCE_SECRET") in handled, timeout=5.0)


def _handled_changes(client: Client) -> list[tuple[str, str]]:
    """(kind, name) of every change event the client has handled from now on."""
    handled: list[tuple[str, str]] = []
    on_change = client._on_change

    def record(change: Any) -> None:
        on_change(change)
        handled.append((change.kind.value, change.name))

    client._on_change = record  # type: ignore[method-assign]
    return handled


@pytest.mark.parametrize("removal", ["destroyed", "deleted"])
def test_a_value_fetched_before_its_secret_was_removed_never_comes_back(
    server: Server, service_dir: Path, make_client: ClientFactory, removal: str
) -> None:
    """A push refresh in flight when the secret is destroyed (or deleted) must not store its
    answer afterwards: it would be served as fresh, stale=False, until the TTL ended."""
    client = make_client("auth", [server.address])
    assert revealed(client.credentials()) == AUTH
    time.sleep(1.0)  # the stream is live and its settle re-read done
    handled = _handled_changes(client)
    held = _HeldFetch(client, "auth/JWT_KEY")
    ops = RemoteStore(server.address, tls_files(service_dir, "ops"))
    try:
        ops.put("auth/JWT_KEY", b"read-before-its-removal")  # the refresher fetches it, held
        assert held.fetched.wait(5)
        if removal == "destroyed":
            _destroy(service_dir, "auth/JWT_KEY")
        else:
            ops.delete("auth/JWT_KEY")
        kind = "secret_destroyed" if removal == "destroyed" else "metadata_changed"
        wait_until(lambda: (kind, "auth/JWT_KEY") in handled, timeout=5.0)
    finally:
        held.release()
        ops.close()
    assert held.landed.wait(5)
    wait_until(lambda: "auth/JWT_KEY" not in client.credentials(), timeout=3.0)
    time.sleep(0.5)  # and it stays gone
    creds = client.credentials()
    assert sorted(creds) == ["auth/DB_PASSWORD"] and not creds.stale
    with pytest.raises(NotFoundError):
        client.get("auth/JWT_KEY")


@pytest.mark.parametrize("change", ["destroyed", "rotated"])
def test_a_first_read_in_flight_when_its_secret_changes_is_not_cached_as_fresh(
    server: Server, service_dir: Path, make_client: ClientFactory, change: str
) -> None:
    """The same race for a name not cached yet, by a client that never listed (get() only)."""
    client = make_client("auth", [server.address])
    assert client.get("auth/DB_PASSWORD").value.reveal() == SEED["auth/DB_PASSWORD"]
    time.sleep(1.0)
    handled = _handled_changes(client)
    held = _HeldFetch(client, "auth/JWT_KEY")
    first_read = threading.Thread(target=client.get, args=("auth/JWT_KEY",))
    first_read.start()
    try:
        assert held.fetched.wait(5)
        if change == "destroyed":
            _destroy(service_dir, "auth/JWT_KEY")
        else:
            ops = RemoteStore(server.address, tls_files(service_dir, "ops"))
            try:
                ops.put("auth/JWT_KEY", b"rotated-while-read")
            finally:
                ops.close()
        wait_until(lambda: any(name == "auth/JWT_KEY" for _, name in handled), timeout=5.0)
    finally:
        held.release()
        first_read.join(10)
    assert held.landed.is_set()
    if change == "destroyed":
        with pytest.raises(NotFoundError):
            client.get("auth/JWT_KEY")
    else:
        assert client.get("auth/JWT_KEY").value.reveal() == b"rotated-while-read"


def test_a_policy_reload_reaches_a_running_client_at_once(
    server: Server, service_dir: Path, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """No change event says what a reload granted or took: the service sends RESYNC, and the
    client reads again (it kept serving the old set as fresh until the TTL, 300 s). The names it
    no longer gets are said in the log (they went silently)."""
    caplog.set_level(logging.INFO, logger="secrets_manager.client")
    client = make_client("auth", [server.address])
    assert sorted(client.credentials()) == ["auth/DB_PASSWORD", "auth/JWT_KEY"]
    time.sleep(1.5)  # past the re-read the client makes once its watch stream has settled
    reads = [r for r in server.audit_records() if r["operation"] in ("get", "batch_get")]
    server.process.send_signal(signal.SIGHUP)  # the same policy (a renewed certificate, say): no re-read
    time.sleep(1.5)
    assert [r for r in server.audit_records() if r["operation"] in ("get", "batch_get")] == reads
    policy = service_dir / "policy.toml"
    policy.write_text(
        policy.read_text().replace(
            '[roles.auth-reader]\nrules = [{ path = "auth/*", capabilities = ["read", "list"] }]',
            '[roles.auth-reader]\nrules = [{ path = "auth/DB_PASSWORD", capabilities = ["read", "list"] }, '
            '{ path = "market-connector/*", capabilities = ["read", "list"] }]',
        )
    )
    server.process.send_signal(signal.SIGHUP)
    expected = ["auth/DB_PASSWORD", "market-connector/BINANCE_API_KEY", "market-connector/BINANCE_SECRET"]
    wait_until(lambda: sorted(client.credentials()) == expected, timeout=5)
    assert not client.stale
    # The line follows the cache's swap (the refresher's thread logs it once the swap is made).
    wait_until(
        lambda: any(
            "the secrets no longer include (deleted, or no longer readable by this identity), dropped "
            "from the cache: auth/JWT_KEY" in record.getMessage()
            for record in caplog.records
        ),
        timeout=5,
    )


# The auth identity's role, as POLICY has it, and as two tests reload it: a second namespace's key
# and a secret outside any namespace granted, then the whole namespace and not that secret.
_AUTH_READER = '[roles.auth-reader]\nrules = [{ path = "auth/*", capabilities = ["read", "list"] }]'
_AUTH_READER_BEFORE = (
    '[roles.auth-reader]\nrules = [{ path = "auth/*", capabilities = ["read", "list"] }, '
    '{ path = "market-connector/BINANCE_API_KEY", capabilities = ["read", "list"] }, '
    '{ path = "SHARED_TOKEN", capabilities = ["read"] }]'
)
_AUTH_READER_AFTER = (
    '[roles.auth-reader]\nrules = [{ path = "auth/*", capabilities = ["read", "list"] }, '
    '{ path = "market-connector/*", capabilities = ["read", "list"] }]'
)


def test_a_re_read_after_resync_that_fails_part_way_still_re_reads_the_rest(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """A policy reload (RESYNC) whose re-read of the first cached listing fails (the service
    answers that it cannot read its store, once): the other listing and the secret read by name
    must still be read again. They were skipped, and served as fresh until their TTL (300 s): a
    namespace granted by the reload stayed invisible, a secret it revoked went on being served."""
    policy = service_dir / "policy.toml"
    before, after = _AUTH_READER_BEFORE, _AUTH_READER_AFTER
    policy.write_text(policy.read_text().replace(_AUTH_READER, before))
    assert server.cli("ops", "store", "SHARED_TOKEN", input=b"shared-token-SEEKRIT-5").returncode == 0
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: server.cli("auth", "get", "SHARED_TOKEN").returncode == 0, timeout=10, interval=0.2)
    client = make_client("auth", [server.address], ttl=300, timeout=2.0)
    assert client.get("SHARED_TOKEN").value.reveal() == b"shared-token-SEEKRIT-5"
    assert sorted(client.credentials("auth")) == ["DB_PASSWORD", "JWT_KEY"]
    assert sorted(client.credentials("market-connector")) == ["BINANCE_API_KEY"]
    backend = _settled_backend(client)
    fetch_all = backend.fetch_all
    refused: list[str] = []

    def refused_once(prefix: str = "") -> Any:
        if not refused:  # the first re-read after the RESYNC, whichever listing it is
            refused.append(prefix)
            raise ConflictError("the store changed under the service: restart it")
        return fetch_all(prefix)

    backend.fetch_all = refused_once  # type: ignore[method-assign]
    policy.write_text(policy.read_text().replace(before, after))
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "BINANCE_SECRET" in client.credentials("market-connector"), timeout=10)

    def revoked() -> bool:
        try:
            client.get("SHARED_TOKEN")
        except AccessDeniedError:
            return True
        return False

    wait_until(revoked, timeout=10)
    assert refused == ["auth/"]
    wait_until(lambda: not client.stale, timeout=10)
    assert sorted(client.credentials("auth")) == ["DB_PASSWORD", "JWT_KEY"]


def test_while_the_re_read_of_everything_fails_a_namespace_listed_apart_is_served_stale(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """A client holding get_credentials() and get_credentials("market-connector"): after a RESYNC
    (a policy reload) only the listing of everything is read again (it updates the namespace's
    names too). While that re-read fails, credentials() were served stale, but the namespace's
    were served as fresh (stale=False), though just as unknown (here: missing a granted key)."""
    policy = service_dir / "policy.toml"
    policy.write_text(policy.read_text().replace(_AUTH_READER, _AUTH_READER_BEFORE))
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: server.cli("auth", "get", "SHARED_TOKEN").returncode == 3, timeout=10, interval=0.2)
    client = make_client("auth", [server.address], ttl=300, timeout=2.0, stale_if_error=120)
    assert sorted(client.credentials("market-connector")) == ["BINANCE_API_KEY"]  # listed first, apart
    assert sorted(client.credentials()) == [
        "auth/DB_PASSWORD",
        "auth/JWT_KEY",
        "market-connector/BINANCE_API_KEY",
    ]
    backend = _settled_backend(client)
    fetch_all = backend.fetch_all
    locked = threading.Event()
    locked.set()

    def refused_while_locked(prefix: str = "") -> Any:
        if locked.is_set():
            raise ConflictError("the store changed under the service: restart it")
        return fetch_all(prefix)

    backend.fetch_all = refused_while_locked  # type: ignore[method-assign]
    policy.write_text(policy.read_text().replace(_AUTH_READER_BEFORE, _AUTH_READER_AFTER))
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: client.credentials().stale, timeout=10)
    assert client.credentials("market-connector").stale
    locked.clear()
    wait_until(lambda: "BINANCE_SECRET" in client.credentials("market-connector"), timeout=10)
    wait_until(lambda: not client.stale, timeout=10)
    assert not client.credentials("market-connector").stale and not client.credentials().stale


def _take_auth_role_and_wait_for_refusal(server: Server, service_dir: Path, client: Client) -> None:
    """Take the `auth` identity's role out of the policy, SIGHUP the server, and wait until
    `client.credentials()` is refused."""
    policy = service_dir / "policy.toml"
    policy.write_text(policy.read_text().replace(f'"spiffe://{TD}/auth" = ["auth-reader"]\n', ""))
    server.process.send_signal(signal.SIGHUP)

    def refused() -> bool:
        try:
            client.credentials()
        except AccessDeniedError:
            return True
        return False

    wait_until(refused, timeout=10, interval=0.05)


def test_a_namespace_whose_retry_came_with_a_re_read_of_everything_is_not_left_stale(
    server: Server, service_dir: Path, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry of a namespace's failed read comes due together with a re-read of everything (a
    RESYNC; during an outage the refresher's probes): the refresher ran only the re-read, which
    refreshed the namespace's names yet left its debt unpaid and no retry of it scheduled, so the
    client stayed stale (`Client.stale`) until that namespace was read again, or for good."""
    monkeypatch.setattr(_client, "TLS_CHECK_SECONDS", 0.2)  # the refresher's own step, held below
    policy = service_dir / "policy.toml"
    policy.write_text(policy.read_text().replace(_AUTH_READER, _AUTH_READER_BEFORE))
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: server.cli("auth", "get", "SHARED_TOKEN").returncode == 3, timeout=10, interval=0.2)
    client = make_client("auth", [server.address], ttl=1.0, timeout=2.0, stale_if_error=120)
    assert sorted(client.credentials("market-connector")) == ["BINANCE_API_KEY"]  # listed apart
    assert len(client.credentials()) == 3
    backend = _settled_backend(client)
    handled = _handled_changes(client)
    fetch_all, renew_tls = backend.fetch_all, backend.renew_tls
    locked, holding, held = threading.Event(), threading.Event(), threading.Event()

    def refused_while_locked(prefix: str = "") -> Any:
        if locked.is_set():
            raise ConflictError("the store changed under the service: restart it")
        return fetch_all(prefix)

    def held_renewal() -> None:
        if holding.is_set():
            held.set()
            while holding.is_set():
                time.sleep(0.01)
        renew_tls()

    backend.fetch_all = refused_while_locked  # type: ignore[method-assign]
    backend.renew_tls = held_renewal  # type: ignore[method-assign]
    locked.set()
    holding.set()
    try:
        assert held.wait(5)  # the refresher is held: what comes due now is taken together
        time.sleep(1.1)  # past the TTL
        assert client.credentials("market-connector").stale  # its read failed: owed, retried soon
        policy.write_text(policy.read_text().replace(_AUTH_READER_BEFORE, _AUTH_READER_AFTER))
        server.process.send_signal(signal.SIGHUP)  # RESYNC: a re-read of everything
        wait_until(lambda: ("resync", "") in handled, timeout=10)
        time.sleep(0.3)  # the namespace's retry is due too
        locked.clear()
    finally:
        holding.clear()
    # (Not a read of the namespace: one past its TTL fetches it, and that paid the debt.)
    wait_until(lambda: "market-connector/BINANCE_SECRET" in client.credentials(), timeout=10)
    wait_until(lambda: not client.stale, timeout=10)


def test_a_reload_that_takes_the_last_role_stops_the_cached_values_being_served(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """A policy reload takes the identity's last role: the service ends its watch stream (denied,
    no RESYNC) and refuses every call. The client went on serving what it had cached as fresh
    until the TTL (300 s), though get_credentials() is documented to raise AccessDeniedError for
    an identity without a role. It now reads again what it caches, as after a RESYNC: the names
    go (callbacks told), reads raise AccessDeniedError, and the refusals are not retried."""
    client = make_client("auth", [server.address], ttl=300)
    assert sorted(client.credentials("auth")) == ["DB_PASSWORD", "JWT_KEY"]  # listed apart
    assert revealed(client.credentials()) == AUTH
    heard = listening(client)
    wait_until(lambda: client._live_since is not None, timeout=5.0)
    time.sleep(_client.SETTLE_SECONDS + 0.5)
    _take_auth_role_and_wait_for_refusal(server, service_dir, client)
    for read in (lambda: client.credentials("auth"), lambda: client.get("auth/JWT_KEY")):
        with pytest.raises(AccessDeniedError):
            read()
    told = {heard.get(timeout=5)[0] for _ in AUTH}
    assert told == {SecretChanged(name, None, 1) for name in AUTH}
    assert not client.stale
    denied = len([r for r in server.audit_records() if r["decision"] == "deny"])
    time.sleep(3)  # nothing asks again meanwhile (the watch stream: once a minute)
    assert len([r for r in server.audit_records() if r["decision"] == "deny"]) == denied


def test_a_client_resuming_on_a_store_put_back_from_an_older_copy_reads_again(
    service_dir: Path, make_client: ClientFactory
) -> None:
    """The service's store is put back from a copy older than what a client has seen (a restore
    of an older backup), and changes made on it since have passed the client's revision again: the
    client must end up with the new value, not its cached one (TTL 1 h here). Two things see to it:
    the stream names its line of history, so the restarted service answers the resume with RESYNC
    (the store file is another), and the SDK re-reads what it served stale during the outage. The
    second alone passed this before the history existed; the service's part without an outage (a
    PostgreSQL failover under a running replica) is test_storage_postgres.py's."""
    store_path = service_dir / "store.db"
    older = service_dir / "older-copy.db"
    with sqlite3.connect(store_path) as source, sqlite3.connect(older) as copy:
        source.backup(copy)  # the copy taken before the changes below
    server = start_server(service_dir)
    try:
        client = make_client("ops", [server.address], ttl=3600)
        assert client.get("auth/DB_PASSWORD").value.reveal() == b"auth-db-pass-SEEKRIT-1"
        for index in range(3):  # the client hears of these: its revision moves past the copy's
            server.cli("ops", "store", f"auth/SEEN_{index}", input=b"v")
        wait_until(lambda: "SEEN_2" in client.credentials("auth"), timeout=10)
        port = server.port
    finally:
        server.stop()
    os.replace(older, store_path)  # the store put back from the older copy
    writer = EncryptedStore.open(SqliteStorage(store_path), PasswordUnlock(PASSWORD, kdf.TEST))
    try:  # changes on the restored store, past the client's revision again
        writer.put("auth/DB_PASSWORD", b"changed-after-the-restore")
        for index in range(20):
            writer.put(f"auth/AFTER_{index}", b"v")
    finally:
        writer.close()
    again = start_server(service_dir, port=port)
    try:
        wait_until(
            lambda: client.get("auth/DB_PASSWORD").value.reveal() == b"changed-after-the-restore", timeout=20
        )
    finally:
        again.stop()


# ---- failover -------------------------------------------------------------------------------------


def test_two_servers_on_one_store_clients_keep_working_when_one_is_killed(
    service_dir: Path, make_client: ClientFactory
) -> None:
    first = start_server(service_dir, "server-a")
    second = start_server(service_dir, "server-b")
    try:
        addresses = [first.address, second.address]
        clients = [make_client("auth", addresses) for _ in range(5)]
        writer = make_client("writer", addresses)
        for client in clients:
            assert revealed(client.credentials()) == AUTH
        time.sleep(1.0)
        first.kill()
        for client in clients:  # cached reads go on
            assert revealed(client.credentials()) == AUTH
        assert writer.put("auth/JWT_KEY", b"written-through-the-survivor") == 2
        new_value = b"written-through-the-survivor"
        elapsed = wait_until(
            lambda: all(c.get("auth/JWT_KEY").value.reveal() == new_value for c in clients), timeout=5.0
        )
        assert elapsed < 2.0  # the watch streams moved to the survivor and pushed the change
        for client in clients:  # an uncached read goes to the survivor
            assert client.get("auth/JWT_KEY", version=1).value.reveal() == SEED["auth/JWT_KEY"]
            assert not client.stale
    finally:
        first.kill()
        second.stop()


class AnswerDroppingProxy(TcpProxy):
    """A TCP proxy to `target` that, once armed, closes the client's connection instead of passing
    on the server's first bytes after `committed()` holds: a replica that commits a request and
    dies before its answer arrives, as the client sees it (its connection ends mid-call)."""

    def __init__(self, target: str, committed: Callable[[], bool]) -> None:
        host, _, port = target.rpartition(":")
        super().__init__(host, int(port))
        self._committed = committed
        self.armed = threading.Event()
        self.dropped = threading.Event()

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        if not from_client and self.armed.is_set() and self._committed():
            self.dropped.set()
            return Verdict.CUT
        return Verdict.PASS


@contextlib.contextmanager
def _answers_lost_at_the_first_replica(
    service_dir: Path, make_client: ClientFactory, *others: str
) -> Iterator[tuple[AnswerDroppingProxy, Client]]:
    """A replica of `service_dir`'s store behind a proxy that drops the answer to the first call
    that changes the store once `proxy.armed` is set, and a client "writer" of it, then `others`,
    connected through the proxy."""
    first = start_server(service_dir, "server-a")
    head = SqliteStorage(service_dir / "store.db").change_head()
    proxy = AnswerDroppingProxy(
        first.address, lambda: SqliteStorage(service_dir / "store.db").change_head() > head
    )
    try:
        writer = make_client("writer", [proxy.address, *others])
        assert writer.describe("auth/JWT_KEY").current_version == 1  # connected through the proxy
        yield proxy, writer
    finally:
        proxy.close()
        first.stop()


def test_a_put_whose_answer_was_lost_is_not_made_again_at_the_next_replica(
    service_dir: Path, make_client: ClientFactory
) -> None:
    """The first replica commits the put and its answer never arrives (the connection ends
    mid-call): sent again to the next replica it would be made twice, two versions of one value,
    and `previous` would no longer hold the credential it replaced. The client says the outcome is
    unknown instead; a replica that could not be reached at all is still failed over (the
    test above), and so is a put with expect_version (a second try is refused, not doubled)."""
    second = start_server(service_dir, "server-b")
    try:
        with _answers_lost_at_the_first_replica(service_dir, make_client, second.address) as (proxy, writer):
            proxy.armed.set()
            with pytest.raises(OutcomeUnknownError) as caught:
                writer.put("auth/JWT_KEY", b"put-once-SEEKRIT")
            assert proxy.dropped.is_set()
            message = str(caught.value)
            assert proxy.address in message and "may have been made" in message
            assert "SEEKRIT" not in message
            reader = make_client("writer", [second.address])
            assert reader.describe("auth/JWT_KEY").current_version == 2  # made once, by the first replica
            assert reader.get("auth/JWT_KEY", label="previous").value.reveal() == SEED["auth/JWT_KEY"]
    finally:
        second.stop()


def test_a_compare_and_set_whose_answer_was_lost_is_not_reported_as_a_conflict_by_the_next_replica(
    service_dir: Path, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A put with expect_version that the first replica commits and whose answer is lost is sent
    to the next replica, which refuses it (the version moved: by this very put). That refusal was
    raised as ConflictError, "someone else won", though this client's write stands: a
    read-modify-write loop would then apply its change a second time. The outcome is unknown to
    the client, and it says so."""
    second = start_server(service_dir, "server-b")
    try:
        with _answers_lost_at_the_first_replica(service_dir, make_client, second.address) as (proxy, writer):
            proxy.armed.set()
            with pytest.raises(OutcomeUnknownError) as caught:
                writer.put("auth/JWT_KEY", b"cas-once-SEEKRIT", expect_version=1)
            assert proxy.dropped.is_set()
            message = str(caught.value)
            assert proxy.address in message and second.address in message and "may have been made" in message
            assert "SEEKRIT" not in message
            # The second replica answered: no outage, so nothing read is marked stale or warned of.
            assert not writer.stale
            assert "no secrets-manager service answered" not in caplog.text
            reader = make_client("writer", [second.address])
            assert reader.describe("auth/JWT_KEY").current_version == 2  # made once, by the first replica
            with pytest.raises(ConflictError):  # a conflict met at the first try is one
                reader.put("auth/JWT_KEY", b"stale-SEEKRIT", expect_version=1)
    finally:
        second.stop()


def test_a_compare_and_set_whose_answer_was_lost_and_that_no_other_replica_took_is_an_unknown_outcome(
    service_dir: Path, make_client: ClientFactory
) -> None:
    """A put with expect_version that the first replica made (its answer lost) and that found the
    next replica down failed as a plain StorageError joining both failures: a caller that handles
    OutcomeUnknownError (read the history before writing again) took it for a put never made."""
    down = free_address()
    with _answers_lost_at_the_first_replica(service_dir, make_client, down) as (proxy, writer):
        proxy.armed.set()
        with pytest.raises(OutcomeUnknownError) as caught:
            writer.put("auth/JWT_KEY", b"cas-once-SEEKRIT", expect_version=1)
        message = str(caught.value)
        assert proxy.address in message and down in message and "may have been made" in message
        assert "SEEKRIT" not in message
        with pytest.raises(StorageError) as read:  # a read that no replica answers is no change
            make_client("writer", [down]).get("auth/JWT_KEY", version=1)
        assert not isinstance(read.value, OutcomeUnknownError)


def test_a_compare_and_set_tried_again_after_a_certificate_renewal_still_knows_its_first_try(
    service_dir: Path, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the next replica refused the handshake, so the client found renewed
    certificate files and sent the put again to every replica: the first, which had made it,
    refused it as a conflict, and that was raised as ConflictError (the first try forgotten)."""
    other = service_dir / "other"
    other.mkdir()
    make_pki(other)
    make_store(other)
    foreign = start_server(other, "foreign")  # its certificate is from a CA this client does not trust
    try:
        with _answers_lost_at_the_first_replica(service_dir, make_client, foreign.address) as (proxy, writer):
            backend = writer._backend
            assert isinstance(backend, _replicas._ServiceReplicas)

            def renewed(*, refused_on: object = None) -> bool:  # as if renewed files were found
                proxy.armed.clear()  # answers pass again
                return True

            monkeypatch.setattr(backend, "_renew", renewed)
            proxy.armed.set()
            with pytest.raises(OutcomeUnknownError) as caught:
                writer.put("auth/JWT_KEY", b"cas-once-SEEKRIT", expect_version=1)
            assert proxy.dropped.is_set() and "may have been made" in str(caught.value)
            assert "SEEKRIT" not in str(caught.value)
    finally:
        foreign.stop()


def test_a_replica_that_hangs_under_the_watch_stream_is_left_within_seconds(
    service_dir: Path, make_client: ClientFactory
) -> None:
    """A replica that hangs (SIGSTOP: its connections stay open, nothing answers) while it holds the
    watch stream: the keepalive ping goes unanswered, the stream fails, and the watcher moves to the
    other replica, so rotations made through it are pushed, not seen at the TTL (300 s). Without
    keepalive the stream waits on the hung replica for good."""
    first = start_server(service_dir, "server-a")
    second = start_server(service_dir, "server-b")
    try:
        client = make_client("auth", [first.address, second.address], ttl=300, timeout=1.0)
        assert revealed(client.credentials()) == AUTH
        wait_until(lambda: client._live_since is not None, timeout=5.0)
        assert isinstance(client._backend, _replicas._ServiceReplicas)
        assert client._backend._watching == 0  # the stream is on `first`
        writer = make_client("writer", [second.address])
        time.sleep(_client.SETTLE_SECONDS + 0.5)  # its settle re-read done: only an event brings news
        first.process.send_signal(signal.SIGSTOP)
        try:
            writer.put("auth/JWT_KEY", b"rotated-while-a-hangs")
            bound = (_replicas.KEEPALIVE_TIME_MS + _replicas.KEEPALIVE_TIMEOUT_MS) / 1000 + 5
            took = wait_until(
                lambda: client.credentials()["auth/JWT_KEY"].reveal() == b"rotated-while-a-hangs", bound, 0.05
            )
            assert took < 20
            writer.put("auth/JWT_KEY", b"rotated-again")  # the watcher is on `second` now: pushed
            wait_until(lambda: client.credentials()["auth/JWT_KEY"].reveal() == b"rotated-again", 3.0, 0.05)
            assert not client.credentials().stale
        finally:
            first.process.send_signal(signal.SIGCONT)
    finally:
        first.stop()
        second.stop()


def test_an_address_that_refuses_connections_is_skipped(server: Server, make_client: ClientFactory) -> None:
    client = make_client("auth", [free_address(), server.address])
    assert revealed(client.credentials()) == AUTH
    assert not client.stale


def test_an_address_that_hangs_is_passed_over(server: Server, make_client: ClientFactory) -> None:
    """After its head start (client/remote.first_serving), not its whole timeout."""
    silent = SilentListener()
    try:
        client = make_client("auth", [silent.address, server.address], timeout=3.0)
        started = time.monotonic()
        assert revealed(client.credentials()) == AUTH
        assert time.monotonic() - started < 2.0
    finally:
        silent.close()


def test_reads_against_hung_addresses_end_within_the_documented_bound(make_client: ClientFactory) -> None:
    """README (The Python SDK): with N addresses that all hang, a read fails within N timeouts and
    a client's first within one (its watch stream's health checks ask them all at once)."""
    silent = [SilentListener(), SilentListener()]
    try:
        client = make_client("auth", [listener.address for listener in silent], timeout=1.0)
        for bound in (1.75, 2):  # the first read (the timeout and a head start), then a later one
            started = time.monotonic()
            with pytest.raises(StorageError):
                client.credentials()
            assert time.monotonic() - started < bound + 0.5
    finally:
        for listener in silent:
            listener.close()


def test_a_first_read_with_every_replica_stopped_fails_after_one_timeout_not_one_per_replica_and_one_more(
    service_dir: Path, make_client: ClientFactory
) -> None:
    """Three real replicas, SIGSTOPped (each accepts a connection and never answers). A client's
    first read waited the timeout for its watch stream, whose health checks found none serving,
    then asked each replica again for a timeout each: 4 timeouts (20 s with the default 5 s). The
    stream's checks asked them all at once, so the read now fails with their answer: one timeout
    (and the head starts), naming each replica."""
    servers = [start_server(service_dir, f"replica{index}") for index in range(3)]
    try:
        for each in servers:
            each.process.send_signal(signal.SIGSTOP)
        client = make_client("auth", [each.address for each in servers], timeout=1.0)
        started = time.monotonic()
        with pytest.raises(StorageError) as failure:
            client.credentials()
        assert time.monotonic() - started < 1.0 + 2 * 0.25 + 1.5  # 4 s and more before
        message = str(failure.value)
        assert "nothing is cached for this read" in message and "\n" not in message
        for each in servers:
            assert f"{each.address} did not answer its health check within 1 s" in message
    finally:
        for each in servers:
            each.process.send_signal(signal.SIGCONT)
            each.kill()


def test_an_address_that_hangs_is_named_and_a_change_sent_to_it_is_said_to_be_unknown(
    make_client: ClientFactory,
) -> None:
    """gRPC says only "Deadline Exceeded"."""
    silent = SilentListener()
    try:
        client = make_client("writer", [silent.address], timeout=0.5)
        with pytest.raises(
            StorageError, match=f"{silent.address} did not answer its health check within 0.5 s"
        ):
            client.get("auth/DB_PASSWORD")  # the first read: its watch stream's health check said so
        with pytest.raises(StorageError) as read:
            client.get("auth/DB_PASSWORD")
        assert f"{silent.address} did not answer GetSecret within 0.5 s: is the service up" in str(read.value)
        with pytest.raises(OutcomeUnknownError) as write:
            client.put("auth/DB_PASSWORD", b"new-value-SEEKRIT")
        assert (
            f"{silent.address} did not answer PutSecret within 0.5 s; the change may have been made"
            in str(write.value)
        )
        assert "SEEKRIT" not in str(write.value)
    finally:
        silent.close()


# ---- stale-if-error -------------------------------------------------------------------------------


def test_server_stopped_cached_values_are_served_until_the_bound_then_a_clear_error(
    server: Server, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client("auth", [server.address], stale_if_error=2.0)
    assert revealed(client.credentials()) == AUTH
    caplog.set_level(logging.INFO, logger="secrets_manager.client")
    # The bound counts from the client's first failure, after this. The test does not wait for
    # the service to end (graceful, its log read to the end: seconds on a loaded machine, which
    # would be gone from the bound before a look).
    stopped_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: client.stale, timeout=10.0)
    stale = client.credentials()
    assert stale.stale and revealed(stale) == AUTH
    assert client.get("auth/DB_PASSWORD").value.reveal() == SEED["auth/DB_PASSWORD"]
    assert any("serving cached values, marked stale, for up to 2 s" in r.getMessage() for r in caplog.records)
    while time.monotonic() - stopped_at < 1.9:  # served throughout the bound
        assert revealed(client.credentials()) == AUTH
        time.sleep(0.05)
    with pytest.raises(StorageError) as failure:  # the bound ends 2 s after the stale marking
        while time.monotonic() - stopped_at < 15.0:
            client.credentials()
            time.sleep(0.05)
    assert time.monotonic() - stopped_at >= 2.0
    server.stop()  # it has ended, or ends now
    message = str(failure.value)
    assert "no secrets-manager service answered" in message
    assert "stale-if-error bound of 2 s" in message and "\n" not in message
    with pytest.raises(StorageError, match="stale-if-error bound"):
        client.get("auth/JWT_KEY")


def test_values_served_stale_say_which_they_are_and_for_how_long(
    server: Server, make_client: ClientFactory
) -> None:
    """`Credentials.stale` said only that something was stale. Now `stale_names` says which values
    and `staleness(name)` for how many seconds (None while fresh); neither is in the repr."""
    client = make_client("auth", [server.address], stale_if_error=60.0)
    fresh = client.credentials()
    assert fresh.stale_names == frozenset() and fresh.staleness("auth/JWT_KEY") is None
    server.kill()
    wait_until(lambda: client.stale, timeout=30.0, interval=0.05)
    stale = client.credentials()
    assert stale.stale and stale.stale_names == frozenset(AUTH)
    first = stale.staleness("JWT_KEY")  # a short name, as creds["JWT_KEY"]
    assert first is not None and 0 <= first < 30
    time.sleep(0.3)
    later = stale.staleness("auth/JWT_KEY")
    assert later is not None and later >= first + 0.25
    namespace = client.credentials("auth")
    assert namespace.stale_names == {"DB_PASSWORD", "JWT_KEY"}
    with pytest.raises(KeyError):
        stale.staleness("auth/NOT_HERE")
    assert "SEEKRIT" not in repr(stale) and "SEEKRIT" not in str(namespace)


def test_a_value_whose_re_fetch_fails_is_the_one_named_stale_not_those_beside_it(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """One secret changes and its re-fetch fails (the service answers that it cannot now): that
    value alone is served stale; `stale_names` and `staleness` say so of it, not of the others."""
    client = make_client("auth", [server.address], stale_if_error=60.0)
    assert revealed(client.credentials()) == AUTH
    backend = _settled_backend(client)
    fetch = backend.fetch

    def refused_for_jwt(name: str, **kwargs: Any) -> Any:
        if name == "auth/JWT_KEY":
            raise ConflictError("the store changed under the service: restart it")
        return fetch(name, **kwargs)

    backend.fetch = refused_for_jwt  # type: ignore[method-assign]
    ops = RemoteStore(server.address, tls_files(service_dir, "ops"))
    try:
        ops.put("auth/JWT_KEY", b"rotated-jwt-SEEKRIT")
    finally:
        ops.close()
    wait_until(lambda: client.credentials().stale, timeout=10)
    creds = client.credentials()
    assert creds.stale_names == {"auth/JWT_KEY"}
    assert creds.staleness("DB_PASSWORD") is None
    staleness = creds.staleness("JWT_KEY")
    assert staleness is not None and 0 <= staleness < 30
    backend.fetch = fetch  # type: ignore[method-assign]
    wait_until(lambda: not client.credentials().stale, timeout=15)
    assert client.credentials().stale_names == frozenset()
    assert client.credentials()["JWT_KEY"].reveal() == b"rotated-jwt-SEEKRIT"


def test_with_stale_serving_off_the_outage_warning_does_not_promise_stale_values(
    server: Server, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client("auth", [server.address], stale_if_error=0)
    assert revealed(client.credentials()) == AUTH
    server.stop()
    with caplog.at_level(logging.WARNING, logger="secrets_manager.client"), pytest.raises(StorageError):
        client.get("auth/JWT_KEY", version=1)  # never cached: asks the service
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("serving stale values is turned off (stale_if_error=0)" in w for w in warnings), warnings
    assert not any("for up to 0 s" in w for w in warnings), warnings
    with pytest.raises(StorageError, match="turned off"):  # and indeed it serves none
        client.credentials()


def test_nothing_cached_and_no_service_is_a_clear_error_at_once(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """And the outage's warning does not say cached values are being served (it did, at a
    service's start with the secrets service down, which sent whoever read the log astray)."""
    caplog.set_level(logging.WARNING, logger="secrets_manager.client")
    client = make_client("auth", [free_address()])
    started = time.monotonic()
    with pytest.raises(StorageError, match="nothing is cached"):
        client.credentials()
    assert time.monotonic() - started < 3.0

    def said() -> list[str]:  # by the watcher's thread, maybe a moment after the read failed
        return [
            message for message in warnings_of(caplog) if "no secrets-manager service answered" in message
        ]

    wait_until(lambda: bool(said()), timeout=5.0)
    (warning,) = said()
    assert "serving cached values" not in warning and "nothing is cached yet" in warning


# ---- the certificate files ----------------------------------------------------------------------

_CHILD_SDK = """
import sys
from secrets_manager.client import Client
from secrets_manager.errors import SecretsManagerError
try:
    Client().credentials()
except SecretsManagerError as exc:
    print(exc, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("variable", ["SECRETS_MANAGER_CERT", "SECRETS_MANAGER_KEY", "SECRETS_MANAGER_CA"])
@pytest.mark.parametrize("entry", ["cli", "sdk"])
def test_an_empty_certificate_file_is_a_one_line_error_not_an_abort(
    service_dir: Path, variable: str, entry: str
) -> None:
    """gRPC's C core aborts the process (SIGABRT) when given an empty certificate or key, so each
    is tried in a child process."""
    empty = service_dir / "empty.pem"
    empty.write_bytes(b"")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(service_dir),
        **client_environ(service_dir, "auth", [free_address()]),
        variable: str(empty),
    }
    if entry == "cli":
        result = run_script(env, "list")
    else:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD_SDK], capture_output=True, env=env, timeout=60, check=False
        )
    stderr = result.stderr.decode()
    assert result.returncode == InvalidInputError.exit_code, stderr
    assert f"TLS file {empty} ({variable}) is empty; point {variable} at a readable PEM file" in stderr
    assert stderr.count("\n") == 1, stderr


def test_an_expired_client_certificate_is_named_with_its_date_before_any_connection(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """The server refuses an expired certificate by closing the connection, which looked like an
    outage ("Socket closed") and put the SDK in stale mode."""
    env = {
        **client_environ(service_dir, "auth", [server.address]),
        "SECRETS_MANAGER_CERT": str(service_dir / "expired.pem"),
        "SECRETS_MANAGER_KEY": str(service_dir / "expired-key.pem"),
    }
    client = Client(environ=env)
    try:
        with pytest.raises(InvalidInputError) as failure:
            client.credentials()
        assert not client.stale
    finally:
        client.close()
    message = str(failure.value)
    assert message.startswith(f"the client certificate {service_dir / 'expired.pem'} (SECRETS_MANAGER_CERT) ")
    assert re.search(r"expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC: issue a new one", message), message
    assert "secrets-manager pki issue auth --force" in message and "\n" not in message
    cli = run_script(
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(service_dir), **env}, "list"
    )
    assert cli.returncode == 2 and "expired on" in cli.stderr.decode() and cli.stderr.count(b"\n") == 1


def test_a_server_certificate_as_the_client_certificate_is_named_before_any_connection(
    server: Server, service_dir: Path
) -> None:
    """The service refuses a certificate without clientAuth in the handshake: the client said
    'Socket closed … another CA, or expired?', neither of which it was."""
    env = {
        **client_environ(service_dir, "auth", [server.address]),
        "SECRETS_MANAGER_CERT": str(service_dir / "server.pem"),
        "SECRETS_MANAGER_KEY": str(service_dir / "server-key.pem"),
    }
    cli = run_script(
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(service_dir), **env}, "list"
    )
    assert cli.returncode == 2
    assert cli.stderr.decode().splitlines() == [
        f"secrets-manager: error: the client certificate {service_dir / 'server.pem'} (SECRETS_MANAGER_CERT) "
        "is not for clients (its extended key usage has no clientAuth), so the service would refuse it: "
        "issue a client certificate with 'secrets-manager pki issue server --dir CA-DIR' (without --server)"
    ]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"CERT": "policy.toml"}, "policy.toml (SECRETS_MANAGER_CERT) is not a PEM certificate"),
        ({"KEY": "ops-key.pem"}, "ops-key.pem (SECRETS_MANAGER_KEY) does not match the certificate"),
        ({"KEY": "auth.pem"}, "auth.pem (SECRETS_MANAGER_KEY) is not an unencrypted PEM private key"),
        ({"CA": "policy.toml"}, "policy.toml (SECRETS_MANAGER_CA) is not a PEM certificate"),
    ],
)
def test_certificate_files_that_cannot_work_are_named_before_any_connection(
    service_dir: Path, make_client: ClientFactory, files: dict[str, str], message: str
) -> None:
    """Each was a failed TLS handshake, "check the certificate files", and stale mode."""
    env = client_environ(service_dir, "auth", [free_address()])
    env.update({f"SECRETS_MANAGER_{kind}": str(service_dir / name) for kind, name in files.items()})
    client = Client(environ=env)
    try:
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            client.credentials()
        assert not client.stale
    finally:
        client.close()


def test_a_certificate_the_server_refuses_says_it_may_have_been_refused(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    env = {
        **client_environ(service_dir, "ops", [server.address]),
        "SECRETS_MANAGER_CERT": str(service_dir / "foreign.pem"),  # from another CA
        "SECRETS_MANAGER_KEY": str(service_dir / "foreign-key.pem"),
    }
    client = Client(environ=env, stale_if_error=0)
    try:
        with pytest.raises(StorageError) as failure:
            client.credentials()
    finally:
        client.close()
    message = str(failure.value)
    assert f"it may have refused the client certificate {service_dir / 'foreign.pem'}" in message, message
    assert "another CA" in message and "\n" not in message


# ---- a renewed certificate ------------------------------------------------------------------------


def renew(service_dir: Path, pair: tuple[bytes, bytes], *, key: bool = True) -> None:
    """What a renewal job does to auth's files: each written whole, then renamed over the old one
    (`key=False`: the certificate only, as a job caught between its two files leaves them)."""
    write_private_file(service_dir / "auth.pem", pair[0], overwrite=True)
    if key:
        write_private_file(service_dir / "auth-key.pem", pair[1], overwrite=True)


def pair_of(service_dir: Path, identity: str) -> tuple[bytes, bytes]:
    return (service_dir / f"{identity}.pem").read_bytes(), (service_dir / f"{identity}-key.pem").read_bytes()


def readable(client: Client, name: str) -> bool:
    """Whether the service lets this client's certificate read `name` now (asked every time)."""
    try:
        client.get(name, version=1)
    except AccessDeniedError:
        return False
    return True


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_renewed_certificate_is_used_within_the_check_interval_stream_included(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """auth's files are replaced by market-connector's (a renewal that changes the identity makes
    the change visible): the service sees the new certificate without a restart."""
    client = make_client("auth", [server.address])
    assert revealed(client.credentials()) == AUTH
    assert not readable(client, "market-connector/BINANCE_API_KEY")
    renew(service_dir, pair_of(service_dir, "market-connector"))
    elapsed = wait_until(
        lambda: readable(client, "market-connector/BINANCE_API_KEY"),
        timeout=_client.TLS_CHECK_SECONDS + 3,
        interval=0.1,
    )
    assert elapsed < _client.TLS_CHECK_SECONDS + 1.5
    reads = [r for r in server.audit_records() if r["name"] == "market-connector/BINANCE_API_KEY"]
    assert reads[-1]["actor"] == f"spiffe://{TD}/market-connector" and reads[-1]["decision"] == "allow"
    assert reads[0]["actor"] == f"spiffe://{TD}/auth" and reads[0]["decision"] == "deny"
    # The watch stream moved too: a change only the new identity may see is pushed (TTL is 300 s).
    assert (
        client.get("market-connector/BINANCE_SECRET").value.reveal()
        == SEED["market-connector/BINANCE_SECRET"]
    )
    make_client("ops", [server.address]).put("market-connector/BINANCE_SECRET", b"pushed-after-renewal")
    wait_until(
        lambda: client.get("market-connector/BINANCE_SECRET").value.reveal() == b"pushed-after-renewal",
        timeout=2.0,
    )
    assert not client.stale


@pytest.mark.parametrize("noticed", ["by-the-check", "when-refused"])
def test_a_certificate_renewed_before_it_expires_keeps_the_client_working_after_it_expired(
    service_dir: Path,
    make_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    noticed: str,
) -> None:
    """A short-lived certificate (an SVID) renewed on disk: once the old one expired, a server the
    client connects to anew refuses it, so the old code went stale ("Socket closed"). The renewal
    is noticed by the periodic check before the expiry, or (no check in time) when a call is
    refused as an expired certificate is: then the files are checked at once and the call retried."""
    if noticed == "when-refused":
        monkeypatch.setattr(_client, "TLS_CHECK_SECONDS", 3600.0)
    first = start_server(service_dir, "server-a")
    second = start_server(service_dir, "server-b")
    try:
        ca = (service_dir / "ca.pem").read_bytes(), (service_dir / "ca-key.pem").read_bytes()
        expires = (datetime.now(UTC) + timedelta(seconds=8)).replace(microsecond=0)
        renew(service_dir, pki.issue(*ca, "auth", days=1, not_before=expires - timedelta(days=1)))
        caplog.set_level(logging.INFO, logger="secrets_manager.client")
        client = make_client("auth", [first.address, second.address])
        assert revealed(client.credentials()) == AUTH
        renew(service_dir, pki.issue(*ca, "auth"))  # the renewal job, before the expiry
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.0)
        first.kill()  # from now on every connection is new: the survivor sees a new handshake
        assert client.get("auth/JWT_KEY", version=1).value.reveal() == SEED["auth/JWT_KEY"]
        creds = client.credentials()
        assert revealed(creds) == AUTH and not creds.stale and not client.stale
    finally:
        first.kill()
        second.stop()
    expiring = [w for w in warnings_of(caplog) if "expires on" in w]
    assert expiring == [
        f"the client certificate {service_dir / 'auth.pem'} (SECRETS_MANAGER_CERT) expires on "
        f"{expires:%Y-%m-%d %H:%M:%S} UTC and no renewal has appeared; the service refuses it from "
        "then on: check the job that renews it"
    ]


def test_calls_refused_at_once_are_all_retried_on_the_renewed_certificate(
    server: Server, service_dir: Path, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight calls refused together (a certificate the service does not accept, its renewal on
    disk): the first to check the files swapped the channels, and the others, finding the files
    unchanged since, failed ("Socket closed", 7 of 8) although the new channels were in place."""
    monkeypatch.setattr(_client, "TLS_CHECK_SECONDS", 3600.0)  # only a refusal looks at the files
    renewal = pair_of(service_dir, "auth")
    renew(service_dir, pair_of(service_dir, "foreign"))  # another CA's: refused in the handshake
    client = make_client("auth", [server.address])
    client._started_backend()  # the refused files are loaded; nothing is contacted yet
    renew(service_dir, renewal)
    barrier = threading.Barrier(8)
    failures: list[str] = []

    def call() -> None:
        barrier.wait()
        try:
            client.get("auth/JWT_KEY", version=1)  # uncached: asks the service
        except StorageError as exc:
            failures.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@pytest.mark.parametrize("half", ["certificate-only", "empty-key"])
def test_a_half_written_renewal_is_not_used_until_it_is_complete(
    server: Server,
    service_dir: Path,
    make_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    half: str,
) -> None:
    monkeypatch.setattr(_client, "TLS_CHECK_SECONDS", 0.1)
    client = make_client("auth", [server.address])
    assert revealed(client.credentials()) == AUTH
    caplog.set_level(logging.INFO, logger="secrets_manager.client")
    new_cert, new_key = pair_of(service_dir, "market-connector")
    old_key = (service_dir / "auth-key.pem").read_bytes()
    if half == "certificate-only":  # the new certificate beside the old key
        renew(service_dir, (new_cert, b""), key=False)
        expected = "(SECRETS_MANAGER_KEY) does not match the certificate"
    else:  # a job that truncates the key file before it writes it
        renew(service_dir, (new_cert, b""))
        expected = "(SECRETS_MANAGER_KEY) is empty"
    time.sleep(1.0)  # ten checks
    assert readable(client, "auth/JWT_KEY")  # still auth's working channels
    assert not readable(client, "market-connector/BINANCE_API_KEY")
    assert not client.stale
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    assert "cannot be used yet" in warnings[0] and expected in warnings[0], warnings[0]
    assert str(service_dir / "auth-key.pem") in warnings[0]
    for material in (old_key, new_key, new_cert):
        assert material.decode().splitlines()[1] not in warnings[0]
    assert "BEGIN" not in warnings[0]
    # The key arrives (only it: rewriting the certificate too gave the checks a moment with a
    # changed certificate beside the empty key, said again: a flaky second warning under load)
    write_private_file(service_dir / "auth-key.pem", new_key, overwrite=True)
    wait_until(lambda: readable(client, "market-connector/BINANCE_API_KEY"), timeout=2.0, interval=0.05)
    assert len(warnings_of(caplog)) == 1
    assert any("renewed" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_renewal_not_valid_yet_is_used_once_it_is_valid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewed certificate valid from 1-2 s ahead (an issuer that does not backdate, or this
    machine's clock a little behind the issuer's) was read once, judged half-written, and never
    read again, although nothing else would change the files until the next renewal."""
    make_pki(tmp_path)
    files = CertificateFiles(tls_files(tmp_path, "auth"))
    ca = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca-key.pem").read_bytes()
    starts = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    renew(tmp_path, pki.issue(*ca, "auth", days=30, not_before=starts))
    caplog.set_level(logging.INFO, logger="secrets_manager.client")
    assert files.renewed() is None and files.renewed() is None  # not valid yet: the old one stays
    [warning] = warnings_of(caplog)
    assert (
        "cannot be used yet" in warning and "read again once the new certificate is valid, in " in warning
    ), warning
    assert f"is not valid before {starts:%Y-%m-%d %H:%M:%S} UTC" in warning, warning
    wait_until(lambda: files.renewed() is not None, timeout=4.0, interval=0.05)
    assert files.loaded.not_before == starts and len(warnings_of(caplog)) == 1


def test_twenty_renewals_leave_no_channel_or_thread_behind(
    server: Server, service_dir: Path, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_client, "TLS_CHECK_SECONDS", 0.05)
    made: list[RemoteStore] = []
    closed: set[int] = set()

    class Tracked(RemoteStore):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def close(self) -> None:
            closed.add(id(self))
            super().close()

    monkeypatch.setattr(_replicas, "RemoteStore", Tracked)
    client = make_client("auth", [server.address])
    assert revealed(client.credentials()) == AUTH
    wait_until(lambda: client._live_since is not None, timeout=5.0)  # the watch stream is up
    threads = threading.active_count()
    turns = [
        (pair_of(service_dir, "market-connector"), "market-connector/BINANCE_API_KEY"),
        (pair_of(service_dir, "auth"), "auth/JWT_KEY"),
    ]
    for turn in range(20):
        pair, name = turns[turn % 2]
        renew(service_dir, pair)
        wait_until(lambda: readable(client, name), timeout=3.0, interval=0.02)  # noqa: B023
    wait_until(lambda: len(made) - len(closed) == 1, timeout=5.0)  # only the newest channel is open
    assert len(made) == 21 and id(made[-1]) not in closed
    wait_until(lambda: client._live_since is not None, timeout=5.0)
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]
    # The watch stream lives on the newest channel: a change is pushed.
    assert client.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]
    make_client("writer", [server.address]).put("auth/JWT_KEY", b"pushed-after-twenty-renewals")
    wait_until(lambda: client.get("auth/JWT_KEY").value.reveal() == b"pushed-after-twenty-renewals", 2.0)


# ---- fork() --------------------------------------------------------------------------------------

_FORKING_SERVICE = """
import os, select, signal, sys, time
from pathlib import Path
from secrets_manager import get_credentials_sync
from secrets_manager.client import RemoteStore, TlsFiles, default_client

def value():
    return get_credentials_sync()["auth/JWT_KEY"].reveal()

def wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True

assert value() == b"auth-jwt-key-SEEKRIT-2"
parent = default_client()
assert wait_for(lambda: parent._live_since is not None, 5)  # the parent's stream is up
time.sleep(0.6)  # and its settle re-read done
parent_backend = parent._backend
ready_read, ready_write = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        child = default_client()
        assert value() == b"auth-jwt-key-SEEKRIT-2"
        own = child._backend is not parent_backend
        print("child uses", "its own channels" if own else "the parent's channels", flush=True)
        wait_for(lambda: child._live_since is not None, 5)
        time.sleep(0.6)
        os.write(ready_write, b"r")
        seen = wait_for(lambda: value() == b"rotated-after-the-fork", 3)
        print("child", "saw the rotation" if seen else "never saw the rotation",
              "stale" if get_credentials_sync().stale else "fresh", flush=True)
        os._exit(0 if seen and own else 1)
    except BaseException as exc:
        print("child failed:", repr(exc), flush=True)
        os._exit(2)
ended = []

def child_ended():
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        ended.append(os.waitstatus_to_exitcode(status))
    return bool(ended)

try:  # never leave the child behind: it holds the test's output pipes open, hiding the failure
    assert select.select([ready_read], [], [], 20)[0], "the child did not get ready"
    env = os.environ
    ops = RemoteStore(env["SECRETS_MANAGER_ADDR"], TlsFiles(
        cert=Path(env["OPS_CERT"]), key=Path(env["OPS_KEY"]), ca=Path(env["SECRETS_MANAGER_CA"])))
    ops.put("auth/JWT_KEY", b"rotated-after-the-fork")
    ops.close()
    rotated = wait_for(lambda: value() == b"rotated-after-the-fork", 3)
    print("parent", "saw the rotation" if rotated else "never saw the rotation", flush=True)
    assert wait_for(child_ended, 20), "the child did not end"
finally:
    if not ended:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("child killed", flush=True)
sys.exit(ended[0])
"""


def _forking_client_env(
    server: Server, service_dir: Path, *, grpc_fork_support: bool = True
) -> dict[str, str]:
    """The environment of a script that reads as `auth` and forks: with `grpc_fork_support`, what
    gRPC's fork_support.md asks of a process that forks after using it."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(service_dir),
        **client_environ(service_dir, "auth", [server.address]),
    }
    if grpc_fork_support:
        env.update(GRPC_ENABLE_FORK_SUPPORT="true", GRPC_POLL_STRATEGY="poll")
    return env


@pytest.mark.parametrize("grpc_fork_support", [False, True], ids=["default", "grpc-fork-support"])
def test_a_forked_child_gets_its_own_watcher_and_channels(
    server: Server, service_dir: Path, grpc_fork_support: bool
) -> None:
    """gunicorn --preload and Celery prefork fork after the SDK has read: the child must still be
    pushed a rotation (the TTL is 300 s), through channels of its own. In a child process, which
    itself forks (forking the test runner would fork its gRPC state too)."""
    env = _forking_client_env(server, service_dir, grpc_fork_support=grpc_fork_support)
    env.update(OPS_CERT=str(service_dir / "ops.pem"), OPS_KEY=str(service_dir / "ops-key.pem"))
    result = subprocess.run(
        [sys.executable, "-c", _FORKING_SERVICE], capture_output=True, env=env, timeout=90, check=False
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "child uses its own channels" in output, output
    assert "child saw the rotation fresh" in output and "parent saw the rotation" in output, output


_FORKING_AT_ONCE = """
import os, signal, sys, time
from secrets_manager import get_credentials_sync

def value():
    return get_credentials_sync()["auth/JWT_KEY"].reveal()

hung = 0
for round in range(3):  # fork right after a read, as gunicorn --preload does: the watcher is starting
    assert value() == b"auth-jwt-key-SEEKRIT-2"
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os._exit(0 if value() == b"auth-jwt-key-SEEKRIT-2" else 1)
        children.append(pid)
    deadline = time.monotonic() + 15
    for pid in children:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0, status
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                hung += 1
                break
            time.sleep(0.05)
    time.sleep(0.2 * round)
print("children hung:", hung, flush=True)
assert value() == b"auth-jwt-key-SEEKRIT-2"
sys.exit(1 if hung else 0)
"""


_FORKING_WITH_A_CLOSED_CLIENT = """
import os, sys
from secrets_manager.client import Client

used = Client()
assert used.get("auth/JWT_KEY").value.reveal() == b"auth-jwt-key-SEEKRIT-2"
used.close()  # closed, still referenced
unused = Client()  # never used: no backend
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("forked", flush=True)
"""


def test_a_process_holding_a_closed_or_unused_client_can_fork(server: Server, service_dir: Path) -> None:
    """Before a fork the SDK pauses every client; a closed one, or one never used, took its own
    start lock a second time while holding it: fork() (os.fork, subprocess with preexec_fn) hung
    for good in any process that kept such a client once one had read through a service."""
    env = _forking_client_env(server, service_dir, grpc_fork_support=False)
    result = subprocess.run(
        [sys.executable, "-c", _FORKING_WITH_A_CLOSED_CLIENT],
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and b"forked" in result.stdout, result.stdout + result.stderr


def test_children_forked_right_after_a_read_under_grpc_fork_support_do_not_hang(
    server: Server, service_dir: Path
) -> None:
    """With GRPC_ENABLE_FORK_SUPPORT=true and GRPC_POLL_STRATEGY=poll (what the README asks of a
    process that forks after using gRPC), a fork while the SDK's threads were inside gRPC calls
    left children stuck for good in gRPC's post-fork handler. Forks in a child process, bounded."""
    env = _forking_client_env(server, service_dir)
    result = subprocess.run(
        [sys.executable, "-c", _FORKING_AT_ONCE], capture_output=True, env=env, timeout=120, check=False
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()[-3000:]
    assert "children hung: 0" in output


_FORKING_AFTER_CLOSE_HOOK = """
import os, sys, threading, time
from secrets_manager import get_credentials_sync
from secrets_manager.client import RemoteStore, _replicas, default_client

made, closed = [], set()

class Tracked(RemoteStore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(self)

    def close(self):
        closed.add(id(self))
        super().close()

_replicas.RemoteStore = Tracked
at_fork = {}

def last_before_fork():  # registered first, so it runs after the SDK's and gRPC's before-hooks
    at_fork["closed"] = sum(id(channel) in closed for channel in made)
    at_fork["threads"] = [t.name for t in threading.enumerate() if t.name.startswith("secrets-manager")]

os.register_at_fork(before=last_before_fork)
assert get_credentials_sync()["auth/JWT_KEY"].reveal() == b"auth-jwt-key-SEEKRIT-2"
parent = default_client()
deadline = time.monotonic() + 5
while parent._live_since is None and time.monotonic() < deadline:
    time.sleep(0.01)
before = list(made)
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("channels closed at the fork:", at_fork["closed"], flush=True)
print("client threads at the fork:", at_fork["threads"], flush=True)
print("old channels closed after:", all(id(channel) in closed for channel in before), flush=True)
print("new channels:", len(made) - len(before), flush=True)
"""


def test_the_channels_are_closed_after_the_fork_not_before_it(server: Server, service_dir: Path) -> None:
    """Closing the channels sets gRPC's own threads tearing them down (and, for a process's last
    channels, shutting gRPC down) in the background. A child forked while they do inherits the
    locks they hold: its first channel then waited for good (about 1 fork in 25 under CPU load,
    GRPC_ENABLE_FORK_SUPPORT=true). So before a fork the client stops its threads but leaves its
    channels open and idle, and closes them in the parent right after. In a child process."""
    env = _forking_client_env(server, service_dir)
    result = subprocess.run(
        [sys.executable, "-c", _FORKING_AFTER_CLOSE_HOOK],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()[-3000:]
    assert "channels closed at the fork: 0" in output, output
    assert "client threads at the fork: []" in output, output
    assert "old channels closed after: True" in output and "new channels: 1" in output, output


# ---- development fallback -------------------------------------------------------------------------


@pytest.fixture
def local_store(tmp_path: Path) -> Path:
    path = tmp_path / "local" / "store.db"
    path.parent.mkdir(mode=0o700)
    store = EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(PASSWORD, kdf.TEST))
    for name, value in SEED.items():
        store.put(name, value)
    store.close()
    return path


def test_development_without_an_address_reads_the_local_store_and_sees_its_changes(local_store: Path) -> None:
    env = {
        "SHRIVENQUANT_ENV": "development",
        "SECRETS_MANAGER_STORE": str(local_store),
        "MASTER_PASSWORD": PASSWORD,
    }
    with Client(environ=env) as client:
        assert revealed(client.credentials()) == SEED
        time.sleep(0.5)
        writer = EncryptedStore.open(SqliteStorage(local_store), PasswordUnlock(PASSWORD, kdf.TEST))
        try:
            writer.put("auth/JWT_KEY", b"changed-by-the-cli")
        finally:
            writer.close()
        wait_until(
            lambda: client.credentials()["auth/JWT_KEY"].reveal() == b"changed-by-the-cli", timeout=1.0
        )
        with pytest.raises(InvalidInputError, match="only reads the local store"):
            client.put("auth/JWT_KEY", b"no")


def test_development_fallback_reads_only_the_namespace_asked_for(
    local_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """credentials('auth') on a local store decrypts auth's secrets only, not the store's others
    (here 300 of another namespace); before, it read all of them and filtered. (Every record it
    opens is counted, metadata and values: the secrets are read at once, not by `get`.)"""
    store = EncryptedStore.open(SqliteStorage(local_store), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        for index in range(300):
            store.put(f"bulk/KEY_{index:03d}", b"bulk-value-%03d" % index)
    finally:
        store.close()
    read: list[str] = []
    opened = encrypted_module.open_record

    def counted(lookup: Any, purpose: Purpose, name: str, *args: Any) -> Any:
        if purpose in (Purpose.SECRET_VALUE, Purpose.SECRET_METADATA):
            read.append(name)
        return opened(lookup, purpose, name, *args)

    monkeypatch.setattr(encrypted_module, "open_record", counted)
    env = {
        "SHRIVENQUANT_ENV": "development",
        "SECRETS_MANAGER_STORE": str(local_store),
        "MASTER_PASSWORD": PASSWORD,
    }
    with Client(environ=env) as client:
        creds = client.credentials("auth")
        assert revealed(creds) == {name.removeprefix("auth/"): value for name, value in AUTH.items()}
        assert set(read) == set(AUTH)


def test_development_fallback_with_a_password_file(local_store: Path, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    env = {"SECRETS_MANAGER_STORE": str(local_store), "MASTER_PASSWORD_FILE": str(password_file)}
    with Client(environ=env) as client:
        assert (
            client.get("market-connector/BINANCE_SECRET").value.reveal()
            == SEED["market-connector/BINANCE_SECRET"]
        )


def test_development_fallback_fails_on_a_secret_whose_value_row_is_gone(local_store: Path) -> None:
    """Not the credentials less the damaged one: a service would start without its password."""
    db = sqlite3.connect(local_store)
    db.execute("DELETE FROM entries WHERE key = 'data/auth/DB_PASSWORD#1'")
    db.commit()
    db.close()
    env = {"SECRETS_MANAGER_STORE": str(local_store), "MASTER_PASSWORD": PASSWORD}
    with Client(environ=env) as client, pytest.raises(IntegrityError, match="'auth/DB_PASSWORD' is missing"):
        client.credentials()


def test_development_fallback_recovers_from_passwd_and_a_root_rotation_once_its_password_file_has_it(
    local_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`passwd` then `keys rotate --root` on the local store: the SDK reading it with a password
    file serves what it has (marked stale) and, once the file holds the new password, reads the
    store again without a restart, as `serve` does."""
    monkeypatch.setattr(encrypted_module, "RENEW_RETRY_SECONDS", 0.2)  # a failed re-read is spaced
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    env = {
        "SHRIVENQUANT_ENV": "development",
        "SECRETS_MANAGER_STORE": str(local_store),
        "MASTER_PASSWORD_FILE": str(password_file),
    }
    with Client(environ=env) as client:
        assert revealed(client.credentials()) == SEED
        time.sleep(0.5)  # the change feed is being polled
        admin = EncryptedStore.open(SqliteStorage(local_store), PasswordUnlock(PASSWORD, kdf.TEST))
        try:
            admin.change_unlock(PasswordUnlock("a new master password", kdf.TEST))
            rotate_root_key(admin)
            admin.put("auth/JWT_KEY", b"written-under-the-new-root-key")
        finally:
            admin.close()
        wait_until(lambda: client.stale, timeout=5.0)  # the change seen, its value not readable
        assert revealed(client.credentials()) == SEED
        password_file.write_text("a new master password\n")
        wait_until(
            lambda: client.credentials()["auth/JWT_KEY"].reveal() == b"written-under-the-new-root-key",
            timeout=10.0,
            interval=0.05,
        )
        assert not client.credentials().stale
        assert client.get("auth/DB_PASSWORD").value.reveal() == SEED["auth/DB_PASSWORD"]


def test_production_without_an_address_is_an_error(
    monkeypatch: pytest.MonkeyPatch, local_store: Path
) -> None:
    for variable in ("SECRETS_MANAGER_ADDR", "MASTER_PASSWORD_FILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SHRIVENQUANT_ENV", "production")
    monkeypatch.setenv("SECRETS_MANAGER_STORE", str(local_store))
    monkeypatch.setenv("MASTER_PASSWORD", PASSWORD)
    with pytest.raises(
        InvalidInputError, match="SECRETS_MANAGER_ADDR is not set and SHRIVENQUANT_ENV=production"
    ):
        get_credentials_sync()


# ---- what an error carries out of the SDK ---------------------------------------------------------


def _values_in_sdk_frames(error: BaseException) -> list[str]:
    """Each local of an SDK frame in the tracebacks of `error` and of every exception chained to
    it (suppressed context included) whose repr holds a value: what an error tracker that shows
    locals (Sentry's default) would send."""
    found, seen, pending = [], set(), [error]
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        for frame, _ in traceback.walk_tb(link.__traceback__):
            if "/secrets_manager/" in frame.f_code.co_filename:
                found += [
                    f"{frame.f_code.co_name}: {key}"
                    for key, local in frame.f_locals.items()
                    if "SEEKRIT" in repr(local)
                ]
        pending += [link.__cause__, link.__context__]
    return found


def test_an_error_on_a_later_page_carries_no_frame_holding_the_pages_before(
    service_dir: Path, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BatchGetSecrets pages: the first page's values were in the paging loop's locals when the
    second page failed (a damaged record: DATA_LOSS)."""
    storage = sqlite3.connect(service_dir / "store.db")
    (sealed,) = storage.execute("SELECT value FROM entries WHERE key = 'data/auth/JWT_KEY#1'").fetchone()
    storage.execute(
        "UPDATE entries SET value = ? WHERE key = 'data/auth/JWT_KEY#1'",
        (sealed[:-1] + bytes([sealed[-1] ^ 1]),),
    )
    storage.commit()
    storage.close()
    monkeypatch.setattr(remote_module, "PAGE_SIZE", 1)  # two secrets, two pages
    running = start_server(service_dir)
    try:
        client = make_client("auth", [running.address])
        with pytest.raises(IntegrityError) as caught:
            client.credentials()
        with pytest.raises(IntegrityError) as caught_async:
            asyncio.run(AsyncClient(client=make_client("auth", [running.address])).credentials())
    finally:
        running.stop()
    assert _values_in_sdk_frames(caught.value) == []
    assert _values_in_sdk_frames(caught_async.value) == []
    shown = "".join(traceback.TracebackException.from_exception(caught.value, capture_locals=True).format())
    assert "SEEKRIT" not in shown and "integrity" in shown


def test_a_failed_put_carries_no_frame_holding_its_value(server: Server, make_client: ClientFactory) -> None:
    client = make_client("auth", [server.address])  # auth may read auth/*, not write it
    for value in (SecretValue(b"put-value-SEEKRIT"), b"put-value-SEEKRIT"):
        with pytest.raises(AccessDeniedError) as caught:
            client.put("auth/DB_PASSWORD", value)
        assert _values_in_sdk_frames(caught.value) == []
        with pytest.raises(AccessDeniedError) as caught:
            asyncio.run(AsyncClient(client=client).put("auth/DB_PASSWORD", value))
        assert _values_in_sdk_frames(caught.value) == []
    with pytest.raises(InvalidInputError, match="a lone surrogate") as refused:
        client.put("auth/DB_PASSWORD", "put-value-SEEKRIT\ud800")
    assert "SEEKRIT" not in repr(refused.value) and refused.value.__context__ is None
    assert client.get("auth/DB_PASSWORD").value.reveal() == SEED["auth/DB_PASSWORD"]


def test_an_identity_the_policy_does_not_know_asks_for_a_watch_stream_once_a_minute(
    server: Server, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Its watcher retried every few seconds: a denied audit record and a warning each time."""
    caplog.set_level(logging.DEBUG, logger="secrets_manager.client")
    client = make_client("nobody", [server.address])
    with pytest.raises(AccessDeniedError):
        client.credentials()
    time.sleep(4)
    denied = [r for r in server.audit_records() if r["operation"] == "watch"]
    assert len(denied) == 1 and denied[0]["decision"] == "deny"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "may not watch for changes" in warnings[0], warnings


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's CLOCK_BOOTTIME")
def test_a_watch_stream_refused_before_an_hour_asleep_is_asked_for_again_on_waking(
    server: Server, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher's waits between attempts (a minute after a refusal, its backoff) counted on the
    monotonic clock, which stops during a suspend: a minute begun before an hour's sleep was still
    nearly a minute away on waking. Here CLOCK_BOOTTIME gains an hour the monotonic clock never
    sees, as it does across a suspend; the next attempt comes within seconds of it."""
    slept = [0.0]
    real = time.clock_gettime

    def clock_gettime(clock: int) -> float:
        return real(clock) + (slept[0] if clock == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    client = make_client("nobody", [server.address])
    with pytest.raises(AccessDeniedError):
        client.credentials()

    def watch_attempts() -> int:
        return sum(1 for record in server.audit_records() if record["operation"] == "watch")

    wait_until(lambda: watch_attempts() == 1, timeout=5.0)
    time.sleep(1.5)
    assert watch_attempts() == 1  # awake: the next attempt is a minute away
    slept[0] = 3600.0
    wait_until(lambda: watch_attempts() == 2, timeout=5.0)


def test_closing_a_client_with_refreshes_queued_warns_of_nothing(
    server: Server, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Each queued refresh failed as 'this client is closed' and was warned of as served stale."""
    client = make_client("auth", [server.address])
    client.credentials()
    ops = server.stub("ops")
    for started in [
        ops.PutSecret.future(pb.PutSecretRequest(name=f"auth/BULK_{i}", value=b"v")) for i in range(200)
    ]:
        started.result(timeout=60)
    caplog.set_level(logging.WARNING, logger="secrets_manager.client")
    client.close()
    assert [r.getMessage() for r in caplog.records if "closed" in r.getMessage()] == []


# ---- threads ---------------------------------------------------------------------------------------


def test_many_threads_share_one_client_and_one_fetch(server: Server, make_client: ClientFactory) -> None:
    client = make_client("ops", [server.address])
    results: list[dict[str, bytes]] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(50):
                results.append(revealed(client.credentials()))
                client.get("auth/DB_PASSWORD")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == [] and len(results) == 16 * 50
    assert all(result == SEED for result in results)
    batch_reads = {
        r["request_id"]
        for r in server_audit(server)
        if r["actor"] == f"spiffe://{TD}/ops" and r["operation"] == "get"
    }
    assert len(batch_reads) == 1  # one read-path fetch (it waited for the stream: no re-read)


@pytest.mark.parametrize("first", ["credentials", "get"])
def test_a_client_start_reads_and_audits_each_secret_once(
    server: Server, make_client: ClientFactory, first: str
) -> None:
    """A first read waits for the watch stream to go live, so it needs no re-read: each secret is
    read (and audited by the service) once per start. Before, once the stream was live the client
    read everything it had cached again (and again SETTLE_SECONDS later), so every start of a
    client that may read 10,000 secrets cost the service 20,000 per-secret audit records."""
    client = make_client("ops", [server.address])
    if first == "credentials":
        assert revealed(client.credentials()) == SEED
    else:
        assert client.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]
    wait_until(lambda: client._live_since is not None, timeout=5.0)
    time.sleep(_client.SETTLE_SECONDS + 1.0)  # when the re-reads came
    reads = [
        r["name"]
        for r in server_audit(server)
        if r["actor"] == f"spiffe://{TD}/ops" and r["operation"] == "get"
    ]
    assert sorted(reads) == (sorted(SEED) if first == "credentials" else ["auth/JWT_KEY"])
    # And the stream it waited for pushes changes: nothing was missed by not reading again.
    writer = RemoteStore(server.address, tls_files(server.dir, "ops"))
    try:
        writer.put("auth/JWT_KEY", b"rotated-after-start")
    finally:
        writer.close()
    wait_until(lambda: client.get("auth/JWT_KEY").value.reveal() == b"rotated-after-start", timeout=5.0)


def test_a_listing_fetched_while_one_of_its_secrets_changes_serves_the_new_value(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """A namespace's first fetch is in flight when one of its secrets changes: the change event
    outdates that name's answer, which is not cached; the listing must not then lack the secret
    (it did, until the TTL, once no re-read of everything followed the first stream)."""
    client = make_client("ops", [server.address])
    assert client.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]  # the stream is started
    backend = _settled_backend(client)  # long settled: only what the change does counts
    handled = _handled_changes(client)
    fetch_all, fetched, release = backend.fetch_all, threading.Event(), threading.Event()

    def held_fetch_all(prefix: str = "") -> Any:
        secrets = fetch_all(prefix)
        fetched.set()
        release.wait(10)
        return secrets

    backend.fetch_all = held_fetch_all  # type: ignore[method-assign]
    results: list[Any] = []
    first_read = threading.Thread(target=lambda: results.append(client.credentials("market-connector")))
    first_read.start()
    try:
        assert fetched.wait(5)
        _rotate_while_listed(server, service_dir, handled)
    finally:
        release.set()
        first_read.join(10)
    assert results
    wait_until(
        lambda: (
            revealed(client.credentials("market-connector"))
            == {
                "BINANCE_API_KEY": SEED["market-connector/BINANCE_API_KEY"],
                "BINANCE_SECRET": b"rotated-while-listed",
            }
        ),
        timeout=5.0,
    )


def test_a_first_read_whose_listing_changes_in_flight_holds_every_secret_of_it(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """A service starts (its first credentials()) while one of its secrets is rotated: the change
    event outdates that name's answer, which is not cached, and the Credentials returned (and
    those of every caller that waited on the same fetch) lacked the secret: creds["BINANCE_SECRET"]
    was a KeyError until the re-fetch landed, and for good in the object the caller kept."""
    client = make_client("ops", [server.address])
    assert client.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]  # the stream is started
    backend = _settled_backend(client)
    handled = _handled_changes(client)
    fetch_all, fetch = backend.fetch_all, backend.fetch
    fetched, release, refetched = threading.Event(), threading.Event(), threading.Event()

    def held_fetch_all(prefix: str = "") -> Any:
        secrets = fetch_all(prefix)
        fetched.set()
        release.wait(10)
        return secrets

    def held_fetch(name: str, **options: Any) -> Any:
        refetched.wait(10)  # the re-fetch of the changed name lands only once the readers have read
        return fetch(name, **options)

    backend.fetch_all = held_fetch_all  # type: ignore[method-assign]
    backend.fetch = held_fetch  # type: ignore[method-assign]
    results: list[Any] = []
    readers = [
        threading.Thread(target=lambda: results.append(client.credentials("market-connector")))
        for _ in range(3)
    ]
    try:
        for reader in readers:
            reader.start()
        assert fetched.wait(5)
        _rotate_while_listed(server, service_dir, handled)
        release.set()
        for reader in readers:
            reader.join(10)
        results.append(client.credentials("market-connector"))  # a hit before the re-fetch lands
    finally:
        release.set()
        refetched.set()
    assert len(results) == 4
    for creds in results:
        assert sorted(creds) == ["BINANCE_API_KEY", "BINANCE_SECRET"]
        assert creds["BINANCE_SECRET"].reveal() in (
            SEED["market-connector/BINANCE_SECRET"],
            b"rotated-while-listed",
        )
    wait_until(
        lambda: client.credentials("market-connector")["BINANCE_SECRET"].reveal() == b"rotated-while-listed",
        timeout=5.0,
    )
    assert client.get("market-connector/BINANCE_SECRET").value.reveal() == b"rotated-while-listed"


def test_names_asked_for_leave_no_single_flight_state_behind(local_store: Path) -> None:
    """Every distinct name read (5,000 missing ones, say) once kept a lock in the client for good."""
    env = {
        "SHRIVENQUANT_ENV": "development",
        "SECRETS_MANAGER_STORE": str(local_store),
        "MASTER_PASSWORD": PASSWORD,
    }
    with Client(environ=env) as client:
        assert client.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]
        for index in range(200):
            with pytest.raises(NotFoundError):
                client.get(f"auth/missing-{index}")
        assert revealed(client.credentials()) == SEED
        assert client._flights == {}

        def read() -> None:
            for index in range(50):
                with contextlib.suppress(NotFoundError):
                    client.get(f"auth/missing-{index % 5}")

        threads = [threading.Thread(target=read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert client._flights == {}


def server_audit(server: Server) -> list[dict[str, Any]]:
    import json

    path = server.dir / "store.audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_hung_server_is_served_stale_and_the_client_recovers_when_it_answers_again(
    server: Server, make_client: ClientFactory
) -> None:
    client = make_client("auth", [server.address], ttl=0.3, timeout=0.5, stale_if_error=30)
    assert revealed(client.credentials()) == AUTH
    time.sleep(1.0)  # the stream is up, its settle re-read done, and the cached values expired
    server.process.send_signal(signal.SIGSTOP)  # connections stay open; nothing answers
    try:
        stale = client.credentials()  # the re-fetch times out: the last good values, marked stale
        assert stale.stale and revealed(stale) == AUTH and client.stale
    finally:
        server.process.send_signal(signal.SIGCONT)
    wait_until(lambda: not client.stale, timeout=5.0)
    assert not client.credentials().stale


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's CLOCK_BOOTTIME")
def test_a_value_cached_before_an_hour_asleep_is_fetched_again_on_waking(
    server: Server, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TTL counted on the monotonic clock, which stops while a VM is suspended or a laptop
    closed: a value cached just before an hour's sleep was served as fresh for the rest of its
    five minutes after the wake-up. Here CLOCK_BOOTTIME gains an hour the monotonic clock never
    sees, as it does across a suspend."""
    slept = [0.0]
    real = time.clock_gettime

    def clock_gettime(clock: int) -> float:
        return real(clock) + (slept[0] if clock == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    client = make_client("auth", [server.address], ttl=300, timeout=1.0)
    name = "auth/JWT_KEY"
    assert client.get(name).value.reveal() == AUTH[name]
    backend = _settled_backend(client)  # the settle re-read done
    fetch, fetched = backend.fetch, []

    def counted_fetch(name: str, **options: Any) -> Any:
        fetched.append(name)
        return fetch(name, **options)

    backend.fetch = counted_fetch  # type: ignore[method-assign]
    assert client.get(name).value.reveal() == AUTH[name]
    assert fetched == []  # awake: served from the cache
    slept[0] = 3600.0
    assert client.get(name).value.reveal() == AUTH[name]
    assert name in fetched


def _reads_failing(client: Client) -> tuple[threading.Event, list[float]]:
    """Every read of `client`'s backend fails as a service whose store does not answer (its watch
    stream stays up) while the returned event is set; the times of the failed reads."""
    backend = client._backend
    assert backend is not None
    fetch_all, fetch = backend.fetch_all, backend.fetch
    failing, failed = threading.Event(), []

    def unavailable(read: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **options: Any) -> Any:
            if failing.is_set():
                failed.append(time.monotonic())
                raise StorageError("the service's store is not answering")
            return read(*args, **options)

        return call

    backend.fetch_all, backend.fetch = unavailable(fetch_all), unavailable(fetch)  # type: ignore[method-assign]
    failing.set()
    return failing, failed


def test_an_outage_with_the_stream_up_is_probed_by_one_chain_of_retries_not_a_growing_swarm(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """Reads fail (the service's store does not answer) while its watch stream stays up, after
    events for several secrets: each failed retry scheduled another re-read of everything beside
    those already pending, and each re-read another retry of each debt, so the retries grew into
    hundreds per second (measured: about 800 reads in 10 s, 500 re-reads pending), and within
    seconds a debt's count of failures overflowed its backoff (2 ** 1024) and killed the
    refresher thread: no refresh, retry or certificate check ever again."""
    client = make_client("ops", [server.address], ttl=300, stale_if_error=600)
    assert revealed(client.credentials()) == SEED
    wait_until(lambda: client._live_since is not None, timeout=5.0)
    time.sleep(_client.SETTLE_SECONDS + 0.5)
    failing, failed = _reads_failing(client)
    for name in AUTH:
        assert server.cli("ops", "store", name, input=b"changed-in-the-outage").returncode == 0
    wait_until(lambda: client.stale, timeout=5.0)
    time.sleep(3.0)  # the outage settles into its retries
    before = len(failed)
    time.sleep(8.0)
    retries = len(failed) - before
    assert retries <= 3 * 8, retries  # each chain's retries back off to one per 2.5 to 5 s
    assert all(thread.is_alive() for thread in client._threads)
    failing.clear()
    wait_until(lambda: not client.stale, timeout=15.0)
    assert revealed(client.credentials("auth")) == dict.fromkeys(
        ["DB_PASSWORD", "JWT_KEY"], b"changed-in-the-outage"
    )


def test_a_debt_retried_for_hours_keeps_its_backoff_and_the_refresher_alive(
    server: Server, service_dir: Path, make_client: ClientFactory
) -> None:
    """A re-fetch owed through a long outage (one retry every 5 s: 1024 of them in 85 minutes)
    computed its backoff as 0.1 * 2 ** failures: OverflowError, and the refresher thread died
    with it, so nothing was refreshed again and the client stayed stale for good."""
    client = make_client("auth", [server.address], ttl=300, stale_if_error=3600)
    assert revealed(client.credentials()) == AUTH
    wait_until(lambda: client._live_since is not None, timeout=5.0)
    time.sleep(_client.SETTLE_SECONDS + 0.5)
    failing, failed = _reads_failing(client)
    writer = make_client("writer", [server.address])
    writer.put("auth/JWT_KEY", b"changed-in-a-long-outage")
    wait_until(lambda: "auth/JWT_KEY" in client._owed, timeout=5.0)
    since, _ = client._owed["auth/JWT_KEY"]
    client._owed = {**client._owed, "auth/JWT_KEY": (since, 1100)}  # as after about 90 minutes
    count = len(failed)
    wait_until(lambda: len(failed) > count + 1, timeout=15.0)  # retried, and retried again
    assert all(thread.is_alive() for thread in client._threads)
    failing.clear()
    wait_until(lambda: not client.stale, timeout=15.0)
    assert client.get("auth/JWT_KEY").value.reveal() == b"changed-in-a-long-outage"


def test_a_refresh_that_failed_is_retried_after_a_resumed_stream_ends_the_outage(
    service_dir: Path, make_client: ClientFactory
) -> None:
    """A change event arrives, the service is killed before the re-fetch it asks for, and comes back
    at the same address: the watcher's stream resumes (nothing to replay: the event was delivered),
    so only a retry of the failed re-fetch brings the new value; until then the old one is served
    marked stale, never as fresh. (The race a put followed at once by SIGKILL runs into.)"""
    server = start_server(service_dir)
    port = server.port
    try:
        client = make_client("auth", [server.address], ttl=300, timeout=1.0, stale_if_error=60)
        assert revealed(client.credentials()) == AUTH
        backend = _settled_backend(client)  # the settle re-read done
        fetch = backend.fetch
        killed = threading.Event()
        put_answered = threading.Event()

        def fetch_after_the_kill(name: str, **options: Any) -> Any:
            if name == "auth/JWT_KEY" and not killed.is_set():
                # The event can overtake the put's own answer: kill only once the put is answered.
                assert put_answered.wait(5.0)
                server.kill()  # between the event and its re-fetch
                killed.set()
                wait_until(lambda: client._live_since is None, timeout=5.0)  # the stream broke
            return fetch(name, **options)

        backend.fetch = fetch_after_the_kill  # type: ignore[method-assign]
        writer = RemoteStore(server.address, tls_files(service_dir, "writer"))
        try:
            writer.put("auth/JWT_KEY", b"put-just-before-the-kill")
            put_answered.set()
        finally:
            writer.close()
        assert killed.wait(5.0)
        wait_until(lambda: client.stale, timeout=5.0)
        server = start_server(service_dir, port=port)
        wait_until(lambda: client._live_since is not None, timeout=10.0)  # resumed: the outage is over
        served: list[tuple[bytes, bool]] = []

        def served_new() -> bool:
            creds = client.credentials()
            served.append((creds["auth/JWT_KEY"].reveal(), creds.stale))
            return served[-1][0] == b"put-just-before-the-kill"

        wait_until(served_new, timeout=10.0, interval=0.05)
        assert all(stale for value, stale in served if value != b"put-just-before-the-kill"), served
        assert not client.credentials().stale
        assert client.get("auth/JWT_KEY").value.reveal() == b"put-just-before-the-kill"
    finally:
        server.stop()


def test_a_service_that_cannot_read_its_store_gets_cached_values_served_stale_by_get_and_credentials(
    server: Server, service_dir: Path, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A service whose store changed under it (`passwd` then `keys rotate --root` elsewhere) answers
    every read ABORTED until it is given the new password. Meanwhile the re-fetch of a changed value
    and reads past the TTL both serve the cached value marked stale (get() and credentials() alike,
    never raising ConflictError, never stale=False), and the SDK keeps asking until it is answered."""
    client = make_client("auth", [server.address], ttl=1.0, timeout=1.0, stale_if_error=60)
    assert revealed(client.credentials()) == AUTH
    assert client.get("auth/DB_PASSWORD").value.reveal() == AUTH["auth/DB_PASSWORD"]
    backend = _settled_backend(client)
    fetch, fetch_all = backend.fetch, backend.fetch_all
    locked = threading.Event()
    locked.set()

    def refuse(call: Callable[..., Any]) -> Callable[..., Any]:
        def refused(*args: Any, **options: Any) -> Any:
            if locked.is_set():  # what the service answers with a store it cannot decrypt
                raise ConflictError("the store changed under the service: restart it")
            return call(*args, **options)

        return refused

    backend.fetch, backend.fetch_all = refuse(fetch), refuse(fetch_all)  # type: ignore[method-assign]
    writer = RemoteStore(server.address, tls_files(service_dir, "writer"))
    try:
        writer.put("auth/JWT_KEY", b"rotated-while-locked")
    finally:
        writer.close()
    wait_until(lambda: client.credentials().stale, timeout=5.0)  # the event's re-fetch failed
    time.sleep(1.2)  # and every cached value is past its TTL
    creds = client.credentials()
    assert creds.stale and revealed(creds) == AUTH
    assert client.get("auth/JWT_KEY").value.reveal() == AUTH["auth/JWT_KEY"]
    assert client.get("auth/DB_PASSWORD").value.reveal() == AUTH["auth/DB_PASSWORD"]
    assert client.stale
    assert any("could not give" in message for message in warnings_of(caplog))
    locked.clear()  # the service has its new password: answered again, with no read needed
    wait_until(lambda: not client.stale, timeout=10.0, interval=0.05)
    creds = client.credentials()
    assert not creds.stale and creds["auth/JWT_KEY"].reveal() == b"rotated-while-locked"
    assert client.get("auth/JWT_KEY").value.reveal() == b"rotated-while-locked"


def test_a_reconnect_resumes_the_stream_so_a_change_made_while_disconnected_is_pushed(
    service_dir: Path, make_client: ClientFactory
) -> None:
    first = start_server(service_dir, "server-a")
    second = start_server(service_dir, "server-b")
    try:
        client = make_client("auth", [first.address, second.address], ttl=300, timeout=0.5)
        events: list[tuple[str, int | None]] = []
        on_change = client._on_change

        def record(change: Any) -> None:
            events.append((change.name, change.version))
            on_change(change)

        client._on_change = record  # type: ignore[method-assign]
        assert revealed(client.credentials()) == AUTH
        writer = make_client("writer", [first.address])
        writer.put("auth/JWT_KEY", b"seen-while-connected")
        wait_until(lambda: ("auth/JWT_KEY", 2) in events, timeout=5.0)  # the stream is up, on `first`
        second.process.send_signal(signal.SIGSTOP)  # hangs: the watcher cannot reconnect there yet
        try:
            first.kill()
            store = EncryptedStore.open(
                SqliteStorage(service_dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST)
            )
            try:
                assert store.put("auth/JWT_KEY", b"written-while-disconnected").version == 3
            finally:
                store.close()
        finally:
            second.process.send_signal(signal.SIGCONT)
        # The watcher reconnects to `second`, resuming after the last revision it saw: the change
        # made while it had no stream is replayed as an event (a fresh stream would not carry it).
        wait_until(lambda: ("auth/JWT_KEY", 3) in events, timeout=15.0)
        wait_until(lambda: client.get("auth/JWT_KEY").value.reveal() == b"written-while-disconnected", 5.0)
    finally:
        first.kill()
        second.stop()


# ---- on_change: the application hears of a changed secret ----------------------------------------


Heard = queue.Queue[tuple[SecretChanged, bytes | None]]


def listening(client: Client, prefix: str = "") -> Heard:
    """Callbacks that note each change and the value the client serves when it is told."""
    heard: Heard = queue.Queue()

    def note(change: SecretChanged) -> None:
        heard.put((change, client.get(change.name).value.reveal() if change.version else None))

    client.on_change(note, prefix)
    return heard


def test_a_change_is_told_after_its_value_is_cached_and_first_reads_are_not(
    make_client: ClientFactory, server: Server, service_dir: Path
) -> None:
    reader = make_client("auth", [server.address])
    reader.credentials("auth")  # follows the namespace auth/: its changes, additions, removals
    heard = listening(reader, "auth/")
    time.sleep(1.0)  # the watch stream is up
    writer = make_client("writer", [server.address])
    version = writer.put("auth/JWT_KEY", b"jwt-key-ROTATED")
    change, served = heard.get(timeout=10)
    assert (change, served) == (SecretChanged("auth/JWT_KEY", version, 1), b"jwt-key-ROTATED")
    assert "ROTATED" not in repr(change)
    writer.put("auth/NEW_TOKEN", b"new-token-SEEKRIT")
    assert heard.get(timeout=10) == (SecretChanged("auth/NEW_TOKEN", 1, None), b"new-token-SEEKRIT")
    ops = RemoteStore(server.address, tls_files(service_dir, "ops"))
    try:
        ops.delete("auth/NEW_TOKEN")
    finally:
        ops.close()
    assert heard.get(timeout=10) == (SecretChanged("auth/NEW_TOKEN", None, 1), None)
    time.sleep(0.5)
    assert heard.empty(), heard.get_nowait()  # nothing else: the first reads were not changes


def test_a_change_a_read_finds_first_is_told_too_once(server: Server, make_client: ClientFactory) -> None:
    """The client's own put, read back at once: the read cached the new version before the watch
    event's refresh came, which then found nothing new, so no callback ever heard of it."""
    client = make_client("writer", [server.address])
    assert client.get("auth/JWT_KEY").version == 1
    heard = listening(client)
    time.sleep(1.0)  # the watch stream is up
    version = client.put("auth/JWT_KEY", b"written-and-read-back-SEEKRIT")
    assert client.get("auth/JWT_KEY").value.reveal() == b"written-and-read-back-SEEKRIT"
    assert heard.get(timeout=10) == (
        SecretChanged("auth/JWT_KEY", version, 1),
        b"written-and-read-back-SEEKRIT",
    )
    time.sleep(1.0)
    assert heard.empty(), heard.get_nowait()  # once, not again when the refresh comes


def test_a_failing_callback_is_logged_the_others_run_and_cancel_stops_one(
    make_client: ClientFactory, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    reader = make_client("auth", [server.address])
    reader.get("auth/DB_PASSWORD")  # followed by name
    calls: list[str] = []

    def failing(change: SecretChanged) -> None:
        raise RuntimeError("the application's own bug")

    reader.on_change(failing)
    stopped = reader.on_change(lambda change: calls.append(f"stopped {change.version}"))
    heard = listening(reader)
    time.sleep(1.0)
    writer = make_client("writer", [server.address])
    with caplog.at_level(logging.ERROR, logger="secrets_manager.client"):
        writer.put("auth/DB_PASSWORD", b"db-password-ROTATED-1")
        assert heard.get(timeout=10)[0].version == 2
    assert calls == ["stopped 2"]
    assert any("on_change callback" in r.getMessage() and "failing" in r.getMessage() for r in caplog.records)
    stopped.cancel()
    writer.put("auth/DB_PASSWORD", b"db-password-ROTATED-2")
    assert heard.get(timeout=10)[0].version == 3
    assert calls == ["stopped 2"]


def test_async_callbacks_run_in_the_event_loop(
    service_dir: Path, server: Server, make_client: ClientFactory
) -> None:
    async def scenario() -> tuple[SecretChanged, bool, bytes]:
        client = AsyncClient(environ=client_environ(service_dir, "auth", [server.address]))
        loop_thread = threading.get_ident()
        told: asyncio.Queue[tuple[SecretChanged, bool, bytes]] = asyncio.Queue()

        async def on_change(change: SecretChanged) -> None:
            secret = await client.get(change.name)
            await told.put((change, threading.get_ident() == loop_thread, secret.value.reveal()))

        try:
            await client.credentials("auth")
            client.on_change(on_change, "auth/")
            await asyncio.sleep(1.0)
            writer = make_client("writer", [server.address])
            await asyncio.to_thread(writer.put, "auth/JWT_KEY", b"jwt-ASYNC-ROTATED")
            return await asyncio.wait_for(told.get(), timeout=10)
        finally:
            await client.close()

    change, in_loop_thread, value = asyncio.run(scenario())
    assert change.name == "auth/JWT_KEY" and change.previous_version == 1
    assert in_loop_thread and value == b"jwt-ASYNC-ROTATED"


def test_on_change_refuses_what_it_cannot_call(service_dir: Path) -> None:
    client = Client(environ=client_environ(service_dir, "auth", ["127.0.0.1:1"]))
    try:
        with pytest.raises(InvalidInputError, match="callable"):
            client.on_change("not a function")  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="from a coroutine"):
            AsyncClient(client=client).on_change(lambda change: None)
    finally:
        client.close()


def test_async_callbacks_of_a_closed_loop_are_dropped_and_async_callable_objects_are_awaited(
    service_dir: Path, server: Server, make_client: ClientFactory
) -> None:
    """One Client, used by AsyncClients in several `asyncio.run`s: the subscription of a loop
    that has closed kept that loop (and everything its callback holds) alive for the client's
    life, one per run. An object whose `__call__` is a coroutine function was called as a plain
    function: its coroutine was never awaited (a RuntimeWarning) and it never ran."""
    client = make_client("auth", [server.address])
    client.get("auth/JWT_KEY")
    ran: list[str] = []

    class Handler:
        async def __call__(self, change: SecretChanged) -> None:
            ran.append(change.name)
            told.set()

    told = threading.Event()
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def subscribe() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        AsyncClient(client=client).on_change(lambda change: None)

    asyncio.run(subscribe())  # its loop closes at once

    async def handled() -> None:
        AsyncClient(client=client).on_change(Handler())
        writer = make_client("writer", [server.address])
        await asyncio.to_thread(writer.put, "auth/JWT_KEY", b"jwt-key-ROTATED")
        await asyncio.to_thread(told.wait, 10)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(handled())
    assert ran == ["auth/JWT_KEY"]
    gc.collect()
    assert loops[0]() is None, "the closed loop is still referenced by its subscription"


def test_a_refresh_due_after_the_machine_slept_is_taken_soon_after_waking() -> None:
    """The refresher waited on a thread condition, which counts on the monotonic clock: a retry
    due in a minute on the clock that runs through a suspend, with the machine asleep for an
    hour meanwhile, was taken only after the minute's wait ended, a minute after waking. Here
    the clock jumps an hour, as CLOCK_BOOTTIME does across a suspend, and the monotonic wait
    does not see it."""
    slept = [0.0]
    queue = _client._RefreshQueue(lambda: time.monotonic() + slept[0])
    queue.schedule("auth/JWT_KEY", time.monotonic() + 60.0)
    taken: list[set[str]] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take_due()), daemon=True)
    taker.start()
    time.sleep(0.3)
    slept[0] = 3600.0
    taker.join(timeout=3.0)
    queue.wake()
    assert taken == [{"auth/JWT_KEY"}]


def test_a_read_refused_after_a_reload_drops_the_cached_values_and_a_later_outage_serves_none(
    service_dir: Path,
    make_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no watch stream (the service at its stream limit), a reload that takes the identity's
    last role is learnt by the next read past the TTL: refused, AccessDeniedError. That read kept
    the listing and its values cached, and an outage after it served them, marked stale, though
    the service had refused them. Now the refusal drops them (as the refresher's does) and names
    them in a warning; the outage then has nothing to serve."""
    monkeypatch.setattr(_client, "BACKOFF_INITIAL_SECONDS", 60.0)  # the refused watcher asks again
    monkeypatch.setattr(_client, "BACKOFF_MAX_SECONDS", 60.0)  # only after the test: no race
    server = start_server(service_dir, settings="max_watch_streams = 1\n")
    try:
        ops = make_client("ops", [server.address])
        ops.credentials()
        wait_until(lambda: ops._live_since is not None, timeout=10)  # it holds the one stream
        client = make_client("auth", [server.address], ttl=1.0, stale_if_error=60.0)
        assert revealed(client.credentials()) == AUTH
        assert client._live_since is None
        caplog.set_level(logging.WARNING, logger="secrets_manager.client")
        _take_auth_role_and_wait_for_refusal(server, service_dir, client)
        assert any(
            "refused this identity the secrets; no longer served, cached copies dropped: "
            "auth/DB_PASSWORD, auth/JWT_KEY" in message
            for message in warnings_of(caplog)
        )
        server.kill()
        for read in (client.credentials, lambda: client.get("auth/JWT_KEY")):
            with pytest.raises(StorageError, match="nothing is cached for this read"):
                read()
    finally:
        server.kill()
