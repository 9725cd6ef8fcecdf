"""What the service asks of a Vault or AWS store (service/served.py `ServedStore`), on the KV v2
test server and moto: a read with its audit fingerprint, writes attributed to the service's
caller, and a health probe that needs no change feed."""

from __future__ import annotations

import json
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from secrets_manager.audit import value_fingerprint
from secrets_manager.errors import AccessDeniedError, StorageError
from secrets_manager.service.served import ServedStore, change_feed, store_probe
from secrets_manager.service.watch import ChangeFeed
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.polled import PolledChangeFeed
from secrets_manager.store.vault import VaultStore, connect_vault, retrying_session
from tcp_proxy import TcpProxy
from vault_server import FakeVault

REGION = "us-east-1"
CALLER = "spiffe://shrivenquant.local/ops"


def aws_client(endpoint: str) -> Any:
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    ).client(
        "secretsmanager",
        endpoint_url=endpoint,
        config=Config(retries={"mode": "standard", "max_attempts": 2}),
    )


def unused_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def vault_store(vault: FakeVault, token: str | None = None, address: str | None = None) -> VaultStore:
    environ = {"VAULT_TOKEN": vault.root_token if token is None else token}
    session = retrying_session(attempts=1, backoff=0.001)
    client = connect_vault(address or vault.address, environ=environ, session=session)
    return VaultStore(client, "secret", actor="local-user")


@pytest.fixture(params=["vault", "aws"])
def store(request: pytest.FixtureRequest) -> Iterator[ServedStore]:
    opened: ServedStore
    if request.param == "vault":
        opened = vault_store(request.getfixturevalue("fake_vault"))
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        opened = AwsStore(aws_client(endpoint), f"served-{secrets.token_hex(4)}", actor="local-user")
    yield opened
    opened.close()


def test_a_read_carries_the_fingerprint_the_cli_records(store: ServedStore) -> None:
    """The service audits a read with this fingerprint; the CLI's audited read of the same value
    records audit.value_fingerprint, so `audit verify --value` matches both. (No such method
    before: the service could not read these stores.)"""
    store.put("svc/K", b"first")
    store.put("svc/K", b"second")
    secret, fingerprint = store.get_with_fingerprint("svc/K")
    assert (secret.value.reveal(), secret.version) == (b"second", 2)
    assert fingerprint == value_fingerprint(store, b"second")
    older, older_fingerprint = store.get_with_fingerprint("svc/K", version=1)
    assert older.value.reveal() == b"first" and older_fingerprint == value_fingerprint(store, b"first")
    assert b"second" not in fingerprint.encode()


def test_secrets_created_for_a_caller_name_it_and_only_in_its_thread(store: ServedStore) -> None:
    """A secret the service creates for a caller records the caller (as the CLI records the local
    user), while another thread's write at the same moment keeps the store's own actor."""
    inside = threading.Event()
    done = threading.Event()

    def other_thread() -> None:
        inside.wait(10)
        store.put("svc/OTHER", b"x")
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with store.acting_for(CALLER):
        inside.set()
        store.put("svc/MINE", b"x")
        assert done.wait(10)
    thread.join(10)
    store.put("svc/AFTER", b"x")
    assert store.describe("svc/MINE").created_by == CALLER
    assert store.describe("svc/OTHER").created_by == "local-user"
    assert store.describe("svc/AFTER").created_by == "local-user"


def test_the_health_probe_needs_no_change_feed(store: ServedStore) -> None:
    """Vault and AWS have no change feed of their own (the probe read one before): the store check
    is the store's own cheap read, which writes nothing, not a snapshot of the polled feed."""
    assert not isinstance(store, ChangeFeed)
    assert isinstance(change_feed(store), PolledChangeFeed)
    assert change_feed(store, poll_seconds=0) is None  # watch_poll_seconds = 0: no Watch
    assert store_probe(store) == store.probe  # type: ignore[attr-defined]
    probe: Callable[[], object] = store_probe(store)
    probe()
    assert store.list() == []


def test_the_vault_probe_fails_when_vault_goes_or_refuses_the_token(fake_vault: FakeVault) -> None:
    refused = vault_store(fake_vault, token="not-a-token")
    with pytest.raises(AccessDeniedError):
        store_probe(refused)()
    refused.close()
    proxy = TcpProxy("127.0.0.1", int(fake_vault.address.rsplit(":", 1)[1]))
    store = vault_store(fake_vault, address=f"http://{proxy.address}")
    store_probe(store)()
    fake_vault.stop()  # Vault is gone: it takes no new connection,
    proxy.close()  # and the ones its client kept alive are cut
    with pytest.raises(StorageError):
        store_probe(store)()
    store.close()


def test_the_aws_probe_fails_when_aws_does_not_answer() -> None:
    store = AwsStore(aws_client(unused_endpoint()), "served", actor="local-user")
    with pytest.raises(StorageError):
        store_probe(store)()
    store.close()


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_a_snapshot_of_100_secrets_is_one_listsecrets_on_aws_and_a_read_per_secret_on_vault(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """What one read of Watch's polled feed costs at 100 secrets, counted where the requests
    arrive: AWS one ListSecrets (a page holds 100), Vault a LIST per folder and a metadata GET per
    secret. At the default intervals (10 s, 30 s): 6 and 204 requests a minute while anyone
    watches. (No snapshot before: Watch was refused on these stores.)"""
    names = [f"svc/K{index:03d}" for index in range(100)]
    if kind == "vault":
        vault: FakeVault = request.getfixturevalue("fake_vault")
        opened: ServedStore = vault_store(vault)
    else:
        actions: list[str] = []
        client = aws_client(request.getfixturevalue("moto_endpoint"))
        client.meta.events.register(
            "before-call.secrets-manager", lambda model, **_: actions.append(model.name)
        )
        opened = AwsStore(client, f"served-{secrets.token_hex(4)}", actor="local-user")
    try:
        for name in names:
            opened.put(name, b"v")
        opened.delete(names[0])
        if kind == "aws":  # its writes are described until AWS's listing shows them: here at once
            opened.version_snapshot()  # type: ignore[attr-defined]
        before = len(vault.requests) if kind == "vault" else len(actions)
        snapshot = opened.version_snapshot()  # type: ignore[attr-defined]
        if kind == "vault":
            requests = vault.requests[before:]
            assert [m for m, _ in requests].count("LIST") == 2  # the mount's root and svc/
            assert len(requests) == 102
        else:
            assert actions[before:] == ["ListSecrets"]
        assert sorted(snapshot) == names
        assert snapshot[names[0]].deleted and not snapshot[names[1]].deleted
        assert snapshot[names[1]].number_of_current() == 1
    finally:
        opened.close()


def test_an_aws_snapshot_shows_this_stores_writes_though_listsecrets_lags(moto_endpoint: str) -> None:
    """AWS's ListSecrets "might not reflect changes from the last five minutes": a change through
    serve pokes its feed, whose snapshot (ListSecrets alone) still showed the secret as before, so
    its watchers heard of it when AWS's listing caught up, up to minutes later, not in a second.
    The secrets this store wrote are described (DescribeSecret is up to date) until the listing
    shows them. Here the listing after the writes is AWS's from before them (moto's never lags).
    Fails on the old code (version 1 still current, the destroyed secret still there)."""
    actions: list[str] = []
    client = aws_client(moto_endpoint)
    client.meta.events.register("before-call.secrets-manager", lambda model, **_: actions.append(model.name))
    store = AwsStore(client, f"lag-{secrets.token_hex(4)}", actor="local-user")
    behind: list[Any] = []
    lagging = [True]

    def listing(parsed: dict[str, Any], **_: Any) -> None:
        if not behind:
            behind.append(json.loads(json.dumps(parsed["SecretList"], default=str)))
        elif lagging[0]:
            parsed["SecretList"] = behind[0]

    try:
        store.put("svc/KEY", b"v1")
        store.put("svc/GONE", b"g")
        store.put("svc/SAME", b"s")
        client.meta.events.register("after-call.secrets-manager.ListSecrets", listing)
        now = [0.0]
        feed = PolledChangeFeed(store.version_snapshot, poll_seconds=60, clock=lambda: now[0])
        _, head = feed.changes_since(None)  # the baseline (the listing AWS will keep giving)
        store.put("svc/KEY", b"v2")
        store.destroy_secret("svc/GONE")
        feed.poke()  # as the service does after each write
        now[0] += 1
        changes, _ = feed.changes_since(head)
        assert sorted((c.kind.name, c.name, c.version) for c in changes) == [
            ("SECRET_DESTROYED", "svc/GONE", None),
            ("VERSION_ADDED", "svc/KEY", 2),
        ]
        # Once AWS's listing shows the writes, they are no longer described.
        lagging[0] = False
        store.version_snapshot()
        actions.clear()
        snapshot = store.version_snapshot()
        assert actions == ["ListSecrets"]
        assert snapshot["svc/KEY"].number_of_current() == 2 and "svc/GONE" not in snapshot
    finally:
        store.close()


def test_an_aws_snapshot_takes_the_listing_for_a_written_secret_it_may_not_describe(
    moto_endpoint: str,
) -> None:
    """A resource policy may let the service write a secret but not describe it: its snapshot (and
    so every Watch stream) failed for LIST_LAG_SECONDS after each write. The listing's entry
    stands for it then. Fails on the previous commit (AccessDeniedError)."""
    client = aws_client(moto_endpoint)
    store = AwsStore(client, f"deny-{secrets.token_hex(4)}", actor="local-user")

    def deny(**_: Any) -> tuple[Any, dict[str, Any]]:
        error = {"Code": "AccessDeniedException", "Message": "not authorized to DescribeSecret"}
        return AWSResponse("https://secretsmanager", 400, {}, None), {
            "Error": error,
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }

    try:
        store.put("svc/KEY", b"v1")
        client.meta.events.register("before-call.secrets-manager.DescribeSecret", deny)
        snapshot = store.version_snapshot()
        assert snapshot["svc/KEY"].number_of_current() == 1
    finally:
        store.close()
