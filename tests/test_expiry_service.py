"""Credential expiry over the gRPC service: a real `secrets-manager serve` with mutual TLS, the CLI
with --server, the SDK, the proto's new fields, and the metric of expired and expiring secrets."""

from __future__ import annotations

import json
import math
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from secrets_manager.client import Client
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import Server, client_environ, eventually, make_pki, make_store, start_server

SOON = "2031-05-06T07:08:09Z"
NAME = "auth/DB_PASSWORD"  # seeded at version 1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    make_pki(tmp_path)
    make_store(tmp_path)
    running = start_server(tmp_path, metrics=True)
    yield running
    running.stop()


def ok(result: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert result.returncode == 0, result.stderr
    return result


def remote_meta(server: Server, name: str = NAME) -> dict[str, Any]:
    return dict(json.loads(ok(server.cli("ops", "metadata", name, "--json")).stdout))


def test_the_cli_with_server_sets_shows_and_clears_the_expiry(server: Server) -> None:
    stored = ok(server.cli("ops", "store", NAME, "--expires", SOON, "--json", input=b"new-pass"))
    assert json.loads(stored.stdout) == {"name": NAME, "version": 2, "expires": SOON}
    assert remote_meta(server)["expires"] == SOON
    assert SOON in ok(server.cli("ops", "history", NAME)).stdout.decode()
    listed = json.loads(ok(server.cli("ops", "list", "--expiring", "10000d", "--json")).stdout)
    assert [(m["name"], m["expires"]) for m in listed] == [(NAME, SOON)]
    ok(server.cli("ops", "metadata", NAME, "--no-expiry"))
    assert remote_meta(server)["expires"] is None
    late = ok(server.cli("ops", "metadata", NAME, "--expires", "2020-01-02T03:04:05Z"))
    assert b"is past" in late.stderr
    got = ok(server.cli("ops", "get", NAME))
    assert got.stdout == b"new-pass\n"
    assert b"expired at 2020-01-02T03:04:05Z" in got.stderr and b"new-pass" not in got.stderr
    ok(server.cli("ops", "store", NAME, input=b"newer-pass"))  # a new value: its expiry unknown
    assert remote_meta(server)["expires"] is None
    assert ok(server.cli("ops", "get", NAME)).stderr == b""


def test_the_proto_fields_carry_the_expiry_and_a_bad_one_is_invalid(server: Server) -> None:
    stub = server.stub("ops")
    put = stub.PutSecret(
        pb.PutSecretRequest(name=NAME, value=b"v", expires="2031-05-06T09:08:09.75+02:00"), timeout=10
    )
    assert put.HasField("expires") and put.expires == "2031-05-06T07:08:09+00:00"  # as kept: UTC, seconds
    meta = stub.DescribeSecret(pb.DescribeSecretRequest(name=NAME), timeout=10).metadata
    assert meta.HasField("expires") and datetime.fromisoformat(meta.expires) == datetime.fromisoformat(SOON)
    secret = stub.GetSecret(pb.GetSecretRequest(name=NAME), timeout=10).secret
    assert datetime.fromisoformat(secret.expires) == datetime.fromisoformat(SOON)
    old = stub.GetSecret(pb.GetSecretRequest(name=NAME, version=1), timeout=10).secret
    assert not old.HasField("expires")
    cleared = stub.UpdateSecretMetadata(pb.UpdateSecretMetadataRequest(name=NAME, expires=""), timeout=10)
    assert cleared.HasField("expires") and cleared.expires == ""
    assert not stub.DescribeSecret(pb.DescribeSecretRequest(name=NAME), timeout=10).metadata.HasField(
        "expires"
    )
    for bad in ("tomorrow", "2031-05-06T07:08:09"):  # no time, no zone
        with pytest.raises(grpc.RpcError) as caught:
            stub.PutSecret(pb.PutSecretRequest(name=NAME, value=b"w", expires=bad), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    versions = stub.DescribeSecret(pb.DescribeSecretRequest(name=NAME), timeout=10).metadata.current_version
    assert versions == 2  # the refused writes wrote nothing


def test_the_sdk_writes_and_shows_the_expiry(server: Server, tmp_path: Path) -> None:
    expires = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    client = Client(environ=client_environ(tmp_path, "ops", [server.address]))
    try:
        assert client.put(NAME, "rotated", expires=expires) == 2
        assert client.describe(NAME).expires == expires
        assert client.get(NAME).expires == expires
        assert client.get(NAME, version=1).expires is None
        assert [m.expires for m in client.list("auth/") if m.name == NAME] == [expires]
    finally:
        client.close()


def test_the_metric_counts_expired_and_within_7_days_without_names(server: Server) -> None:
    soon = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def scrape() -> str:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        return str(urllib.request.urlopen(url, timeout=10).read().decode())

    assert 'secrets_manager_secrets_expiring{state="expired"} 0.0' in scrape()
    ok(server.cli("ops", "metadata", "auth/DB_PASSWORD", "--expires", "2020-01-01T00:00:00Z"))
    ok(server.cli("ops", "metadata", "auth/JWT_KEY", "--expires", soon))
    ok(server.cli("ops", "metadata", "market-connector/BINANCE_API_KEY", "--expires", "60d"))
    body = scrape()
    assert 'secrets_manager_secrets_expiring{state="expired"} 1.0' in body
    assert 'secrets_manager_secrets_expiring{state="within_7d"} 1.0' in body
    expiring = [line for line in body.splitlines() if line.startswith("secrets_manager_secrets_expiring")]
    assert not any("auth/" in line or "market-connector" in line for line in expiring), expiring
    ok(server.cli("ops", "store", "auth/DB_PASSWORD", input=b"fresh"))  # the new value: not expired
    # One scrape's two states share one count for 0.5 s: a scrape that soon after may repeat it.
    assert eventually(lambda: 'secrets_manager_secrets_expiring{state="expired"} 0.0' in scrape(), timeout=5)


def test_the_expiry_counts_are_nan_while_the_store_cannot_be_listed_and_a_listing_is_kept_a_while() -> None:
    from secrets_manager.errors import StorageError
    from secrets_manager.service.metrics import _ExpiryCounts
    from secrets_manager.store import SecretMetadata

    now = datetime.now(UTC)
    expired = SecretMetadata(
        name="a/B",
        namespace="a",
        created=now,
        updated=now,
        created_by="",
        description="",
        tags={},
        current_version=1,
        versions=(),
        expires=now - timedelta(days=1),
    )
    calls: list[int] = []
    failing = True

    def listing() -> list[SecretMetadata]:
        calls.append(1)
        if failing:
            raise StorageError("database down")
        return [expired, replace(expired, name="a/C", expires=now + timedelta(days=2))]

    clock = [0.0]
    counts = _ExpiryCounts(listing, refresh=300, clock=lambda: clock[0])
    assert all(math.isnan(n) for n in counts.now())
    failing = False
    clock[0] = 1.0
    assert counts.now() == (1.0, 1.0)
    clock[0] = 200.0
    assert counts.now() == (1.0, 1.0) and len(calls) == 2  # kept: not listed again before `refresh`


def test_a_service_from_before_expiries_is_said_to_be_so_not_already_so(server: Server) -> None:
    """Such a service drops the `expires` field: a PutSecret answers without it, and an
    UpdateSecretMetadata that gives only an expiry finds nothing to change. The client must not
    report the expiry as recorded ("already so") in either case."""
    from secrets_manager.client import RemoteStore
    from secrets_manager.errors import NothingToChangeError, UnsupportedOperationError
    from service_fixtures import tls_files

    store = RemoteStore(server.address, tls_files(server.dir, "ops"))

    def without_expires(message: Any) -> None:
        if "expires" in message.DESCRIPTOR.fields_by_name:
            message.ClearField("expires")  # what an older server's parser does with the new field
        if "metadata" in message.DESCRIPTOR.fields_by_name:
            without_expires(message.metadata)

    def old_service(method: str, request: Any, **_: Any) -> Any:
        without_expires(request)
        if method == "UpdateSecretMetadata" and not (request.HasField("description") or request.set_tags):
            raise NothingToChangeError("nothing to change for it: give a description, tags or max versions")
        response = real_call(method, request)
        without_expires(response)
        return response

    real_call = store._call
    try:
        store._call = old_service  # type: ignore[method-assign]
        with pytest.raises(UnsupportedOperationError, match="from before expiries"):
            store.update_metadata(NAME, expires=datetime(2031, 5, 6, tzinfo=UTC))
        with pytest.raises(UnsupportedOperationError, match="stored auth/DB_PASSWORD version 2"):
            store.put(NAME, b"v2", expires=datetime(2031, 5, 6, tzinfo=UTC))
        store._call = real_call  # type: ignore[method-assign]
        store.update_metadata(NAME, expires=datetime(2031, 5, 6, tzinfo=UTC))
        with pytest.raises(NothingToChangeError):  # a new service: already so, truly
            store.update_metadata(NAME, expires=datetime(2031, 5, 6, tzinfo=UTC))
    finally:
        store.close()


def test_rotate_with_expires_through_the_service_records_it_for_the_new_version(server: Server) -> None:
    ok(server.cli("ops", "store", NAME, "--expires", SOON, input=b"old-pass"))
    rotated = ok(server.cli("ops", "rotate", NAME, "--expires", "2032-01-02T03:04:05Z", "--json"))
    assert json.loads(rotated.stdout)["expires"] == "2032-01-02T03:04:05Z"
    meta = remote_meta(server)
    assert meta["current_version"] == 3 and meta["expires"] == "2032-01-02T03:04:05Z"
    on_server = server.cli("ops", "rotate", NAME, "--on-server", "--expires", "90d")
    assert on_server.returncode == 2 and b"with --on-server, record it after" in on_server.stderr
