"""The gRPC service of issue #5, tested against a real `secrets-manager serve` process with real
mutual TLS certificates, a real SQLite store and its audit log."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secrets_manager.audit import local_actor
from secrets_manager.client import RemoteStore
from secrets_manager.crypto import kdf
from secrets_manager.environment import Environment
from secrets_manager.errors import InvalidInputError, NotFoundError
from secrets_manager.service import server as server_module
from secrets_manager.service.certificates import ServerCertificates
from secrets_manager.service.config import load_config
from secrets_manager.service.server import PolicyHolder
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.encrypted import RENEW_RETRY_SECONDS
from secrets_manager.tls import pki
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import (
    PASSWORD,
    SCRIPT,
    TD,
    Server,
    eventually,
    free_address,
    in_process_server,
    make_odd_client,
    make_pki,
    make_store,
    run_script,
    start_server,
    tls_files,
)

SEED = {
    "auth/DB_PASSWORD": b"auth-db-pass",
    "auth/JWT_KEY": b"auth-jwt-key",
    "market-connector/BINANCE_API_KEY": b"binance-key-KNOWN-VALUE",
    "market-connector/BINANCE_SECRET": b"binance-secret",
}
POLICY = f"""
[identities]
"spiffe://{TD}/auth" = ["auth-reader"]
"market-connector" = ["mc-reader"]
"spiffe://{TD}/ops" = ["admin"]
"spiffe://{TD}/writer" = ["writer"]

[roles.auth-reader]
rules = [{{ path = "auth/*", capabilities = ["read", "list"] }}]

[roles.mc-reader]
rules = [{{ path = "market-connector/*", capabilities = ["read", "list"] }}]

[roles.writer]
rules = [
  {{ path = "load/**", capabilities = ["read", "write", "list"] }},
  {{ path = "drop/*", capabilities = ["write"] }},
  {{ path = "rw/*", capabilities = ["read", "write"] }},
]

[roles.admin]
rules = [{{ path = "**", capabilities = ["admin"] }}]
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    running = start_server(tmp_path, metrics=True)
    yield running
    running.stop()


@pytest.fixture
def unlimited_server(tmp_path: Path) -> Iterator[Server]:
    """`server` without a per-identity request rate ([limits]): for load that one identity sends
    in a loop on purpose, which the default rate would throttle."""
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    running = start_server(tmp_path, metrics=True, settings="[limits]\nrequests_per_second = 0\n")
    yield running
    running.stop()


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()


# ---- identity and TLS ----------------------------------------------------------------------


def test_caller_with_a_role_reads_its_own_secrets(server: Server) -> None:
    reply = server.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
    assert reply.secret.value == b"auth-db-pass" and reply.secret.version == 1
    assert list(reply.secret.labels) == ["current"]


@pytest.mark.parametrize("client", [None, "foreign", "expired"], ids=["no-cert", "other-ca", "expired"])
def test_handshake_rejects_clients_without_a_valid_certificate(server: Server, client: str | None) -> None:
    stub = server.stub(client)
    assert code_of(lambda: stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)) is (
        grpc.StatusCode.UNAVAILABLE
    )
    assert not any(r.get("actor") == f"spiffe://{TD}/ops" for r in server.audit_records())


def test_a_common_name_written_like_ops_spiffe_id_is_unauthenticated_not_ops(server: Server) -> None:
    """A CA whose requesters choose their CN could sign `CN=spiffe://…/ops`: it was ops (admin)."""
    make_odd_client(server.dir, "cn-spoof", cn=f"spiffe://{TD}/ops")
    make_odd_client(server.dir, "cn-spoof-https", cn=f"spiffe://{TD}/ops", uris=("https://example.com/x",))
    make_odd_client(server.dir, "cn-cyrillic", cn="\u0430uth")
    # The service's schedule's name: its records, and the versions only the schedule resumes.
    make_odd_client(server.dir, "cn-schedule", cn="rotation-schedule")
    for client in ("cn-spoof", "cn-spoof-https", "cn-cyrillic", "cn-schedule"):
        stub = server.stub(client)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert "common name" in caught.value.details()  # type: ignore[attr-defined]
        last = server.audit_records()[-1]
        assert (last["actor"], last["decision"], last["outcome"]) == (
            "<unidentified>",
            "deny",
            "unauthenticated",
        )
    assert not any(
        r["actor"] in (f"spiffe://{TD}/ops", "\u0430uth", "rotation-schedule") for r in server.audit_records()
    )


def test_a_certificate_whose_san_cryptography_cannot_represent_is_unauthenticated_and_audited(
    server: Server,
) -> None:
    """An x400Address SAN (DER `30 02 a3 00`): OpenSSL accepts the certificate, cryptography
    raises UnsupportedGeneralNameType (no ValueError) when asked for the SANs. The call ended
    INTERNAL with no audit record; now it is refused like any certificate that names no identity,
    and the record names the certificate's serial, so the operator can find and revoke it."""
    odd = make_odd_client(server.dir, "x400", cn="auth", raw_san=bytes.fromhex("3002a300"))
    stub = server.stub("x400")
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert "unsupported extension" in caught.value.details()  # type: ignore[attr-defined]
    last = server.audit_records()[-1]
    assert (last["actor"], last["decision"], last["outcome"]) == ("<unidentified>", "deny", "unauthenticated")
    assert int(str(last["certificate_serial"]), 16) == odd.serial_number


def test_a_refused_certificate_that_names_no_identity_is_named_by_its_serial(server: Server) -> None:
    """Refusals of certificates without a usable identity (`CN=bad/cn`) recorded only
    `<unidentified>`: nothing told which certificate probed the service."""
    odd = make_odd_client(server.dir, "bad-cn", cn="bad/cn")
    assert (
        code_of(lambda: server.stub("bad-cn").ListSecrets(pb.ListSecretsRequest(), timeout=10))
        is grpc.StatusCode.UNAUTHENTICATED
    )
    last = server.audit_records()[-1]
    assert last["actor"] == "<unidentified>"
    assert int(str(last["certificate_serial"]), 16) == odd.serial_number


def test_a_huge_name_from_a_caller_without_a_role_writes_a_short_record(server: Server) -> None:
    """A request's name is recorded before it is checked (a refusal names what was refused): a
    3.9 MB name from a caller without a role, or an unidentified one, wrote a 3.9 MB record, ten
    of them in under a second. Now the record holds the first 256 characters and the length."""
    log = server.dir / "store.audit.jsonl"
    before = log.stat().st_size
    make_odd_client(server.dir, "bad-cn", cn="bad/cn")
    huge = "n" * 3_900_000
    for client in ("nobody", "bad-cn"):
        stub = server.stub(client)
        assert code_of(lambda stub=stub: stub.GetSecret(pb.GetSecretRequest(name=huge), timeout=10)) in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.UNAUTHENTICATED,
        )
        last = server.audit_records()[-1]
        assert last["name"] == "n" * 256 + "...[3900000 characters]" and last["decision"] == "deny"
    with pytest.raises(grpc.RpcError) as caught:
        server.stub("ops").ListSecrets(pb.ListSecretsRequest(prefix="auth/" + "\u00e9" * 5000), timeout=10)
    # INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: the message no longer echoes 10 kB of prefix
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "longer than 256" in caught.value.details()  # type: ignore[attr-defined]
    assert log.stat().st_size - before < 10_000


def test_the_ca_certificate_presented_as_a_client_is_unauthenticated(server: Server) -> None:
    """ca.pem and ca-key.pem as the client pair were the caller spiffe://TD, the trust domain."""
    (server.dir / "the-ca.pem").write_bytes((server.dir / "ca.pem").read_bytes())
    (server.dir / "the-ca-key.pem").write_bytes((server.dir / "ca-key.pem").read_bytes())
    make_odd_client(server.dir, "sub-ca", cn="ops", uris=(f"spiffe://{TD}/ops",), ca=True)
    make_odd_client(server.dir, "no-path", cn="ops", uris=(f"spiffe://{TD}",))
    for client, problem in (("the-ca", "CA certificate"), ("sub-ca", "CA certificate"), ("no-path", "alone")):
        stub = server.stub(client)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListSecrets(pb.ListSecretsRequest(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, client  # type: ignore[attr-defined]
        assert problem in caught.value.details()  # type: ignore[attr-defined]
    assert {r["actor"] for r in server.audit_records() if r["operation"] == "list"} == {"<unidentified>"}


def test_identity_without_a_role_is_denied_and_audited(server: Server) -> None:
    stub = server.stub("nobody")
    assert code_of(lambda: stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)) is (
        grpc.StatusCode.PERMISSION_DENIED
    )
    last = server.audit_records()[-1]
    assert last["actor"] == f"spiffe://{TD}/nobody" and last["decision"] == "deny"
    assert last["source"] == "grpc" and str(last["peer"]).startswith("ipv4:127.0.0.1:")
    assert last["outcome"] == "access_denied" and last["name"] == "auth/DB_PASSWORD"


def test_role_without_the_capability_is_denied_and_audited(server: Server) -> None:
    stub = server.stub("auth")
    request = pb.PutSecretRequest(name="auth/DB_PASSWORD", value=b"overwrite")
    assert code_of(lambda: stub.PutSecret(request, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
    assert server.audit_records()[-1]["operation"] == "store"
    assert server.audit_records()[-1]["decision"] == "deny"
    reply = server.stub("ops").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
    assert reply.secret.value == b"auth-db-pass"


def test_a_name_without_a_namespace_is_refused_saying_to_give_the_full_name(server: Server) -> None:
    """The seed's short names (`get DB_PASSWORD`, `run --secret DB_PASSWORD`) through the service
    by a client whose policy grants auth/*: refused "may not read 'DB_PASSWORD'", as if the policy
    were wrong; the name is in the default namespace, which nothing said."""
    for args in (("get", "DB_PASSWORD"), ("run", "--secret", "DB_PASSWORD", "--", "true")):
        refused = server.cli("auth", *args)
        assert refused.returncode == 5, refused.stderr
        lines = refused.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert "may not read 'DB_PASSWORD'" in lines[0]
        assert "'default' namespace" in lines[0] and "NAMESPACE/DB_PASSWORD" in lines[0]
    assert server.cli("auth", "get", "auth/DB_PASSWORD").stdout == b"auth-db-pass\n"
    other = server.cli("auth", "get", "market-connector/BINANCE_API_KEY")
    assert other.returncode == 5 and b"namespace" not in other.stderr  # a full name needs no hint


@pytest.mark.parametrize(
    "name",
    [
        "auth/../market-connector/BINANCE_API_KEY",
        "auth/%2e%2e/market-connector/BINANCE_API_KEY",
        "auth/./../market-connector/BINANCE_API_KEY",
        "auth/DB_PASSWORD/",
        "auth//DB_PASSWORD",
        "auth/DB\x00PASSWORD",
        "\u0430uth/DB_PASSWORD",  # a Cyrillic look-alike of "auth"
        "/auth/DB_PASSWORD",
    ],
)
def test_names_that_try_to_escape_a_glob_are_rejected_and_audited(server: Server, name: str) -> None:
    stub = server.stub("auth")
    assert code_of(lambda: stub.GetSecret(pb.GetSecretRequest(name=name), timeout=10)) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    last = server.audit_records()[-1]
    assert (last["name"], last["decision"], last["outcome"]) == (name, "deny", "invalid_input")


def test_refusals_before_the_policy_allowed_are_denials_naming_what_was_refused(server: Server) -> None:
    """An auditor counting `decision: deny` sees every probe, and the record names the secret the
    caller was refused; a request the policy allowed that then fails stays `allow`."""
    nobody, auth = server.stub("nobody"), server.stub("auth")
    for name in ("../etc/passwd", "auth//X", "-rf"):
        request = pb.GetSecretRequest(name=name)
        assert code_of(lambda r=request: nobody.GetSecret(r, timeout=10)) is grpc.StatusCode.INVALID_ARGUMENT
    probes = [(r["name"], r["decision"], r["outcome"]) for r in server.audit_records()[-3:]]
    assert probes == [(n, "deny", "invalid_input") for n in ("../etc/passwd", "auth//X", "-rf")]

    def batch_get(stub: object, names: list[str], prefix: str = "") -> tuple[object, ...]:
        request = pb.BatchGetSecretsRequest(names=names, prefix=prefix)
        code = code_of(lambda: stub.BatchGetSecrets(request, timeout=10))  # type: ignore[attr-defined]
        last = server.audit_records()[-1]
        return code, last["operation"], last["name"], last["decision"], last["outcome"]

    denied = grpc.StatusCode.PERMISSION_DENIED
    assert batch_get(nobody, ["auth/DB_PASSWORD", "market-connector/BINANCE_SECRET"]) == (
        denied,
        "batch_get",
        "auth/DB_PASSWORD",
        "deny",
        "access_denied",
    )
    assert batch_get(auth, ["auth/DB_PASSWORD", "market-connector/BINANCE_SECRET"], prefix="auth/") == (
        denied,
        "batch_get",
        "market-connector/BINANCE_SECRET",
        "deny",
        "access_denied",
    )
    assert batch_get(auth, ["auth/DB_PASSWORD", "auth//X"], prefix="auth/") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch_get",
        "auth//X",
        "deny",
        "invalid_input",
    )
    assert batch_get(auth, ["auth/DB_PASSWORD", "auth/GONE"]) == (
        grpc.StatusCode.NOT_FOUND,
        "batch_get",
        "auth/GONE",
        "allow",
        "not_found",
    )
    get = pb.GetSecretRequest(name="auth/GONE")
    assert code_of(lambda: auth.GetSecret(get, timeout=10)) is grpc.StatusCode.NOT_FOUND
    last = server.audit_records()[-1]
    assert (last["name"], last["decision"], last["outcome"]) == ("auth/GONE", "allow", "not_found")


def test_list_returns_only_names_the_caller_may_list(server: Server) -> None:
    names = [m.name for m in server.stub("auth").ListSecrets(pb.ListSecretsRequest(), timeout=10).secrets]
    assert names == ["auth/DB_PASSWORD", "auth/JWT_KEY"]
    every = [m.name for m in server.stub("ops").ListSecrets(pb.ListSecretsRequest(), timeout=10).secrets]
    assert every == sorted(SEED)


def test_batch_get_of_everything_returns_what_the_caller_may_read(server: Server) -> None:
    reply = server.stub("auth").BatchGetSecrets(pb.BatchGetSecretsRequest(), timeout=10)
    assert {s.name: s.value for s in reply.secrets} == {
        "auth/DB_PASSWORD": b"auth-db-pass",
        "auth/JWT_KEY": b"auth-jwt-key",
    }
    explicit = pb.BatchGetSecretsRequest(names=["auth/DB_PASSWORD", "market-connector/BINANCE_SECRET"])
    stub = server.stub("auth")
    assert code_of(lambda: stub.BatchGetSecrets(explicit, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED


def test_batch_get_returns_and_audits_a_name_given_twice_once(server: Server) -> None:
    """Found by fuzzing the API: a name listed n times came back, and was audited as read, n times
    (5000 times a 16-byte name: 5000 audit records from one request). Pages of such a list too."""
    stub = server.stub("auth")
    names = ["auth/JWT_KEY", *["auth/DB_PASSWORD"] * 50, "auth/JWT_KEY"]
    before = len(server.audit_records())
    reply = stub.BatchGetSecrets(pb.BatchGetSecretsRequest(names=names), timeout=10)
    assert [s.name for s in reply.secrets] == ["auth/JWT_KEY", "auth/DB_PASSWORD"]
    gets = [r["name"] for r in server.audit_records()[before:] if r["operation"] == "get"]
    assert gets == ["auth/JWT_KEY", "auth/DB_PASSWORD"]
    request = pb.BatchGetSecretsRequest(names=names, page_size=1)
    paged: list[str] = []
    while True:
        response = stub.BatchGetSecrets(request, timeout=10)
        paged += [s.name for s in response.secrets]
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    assert paged == ["auth/JWT_KEY", "auth/DB_PASSWORD"]


def test_batch_get_fails_with_data_loss_on_a_secret_whose_value_row_is_gone(
    server: Server, tmp_path: Path
) -> None:
    """Not the secrets less the damaged one, as for one deleted between list and get."""
    db = sqlite3.connect(tmp_path / "store.db")
    db.execute("DELETE FROM entries WHERE key = 'data/auth/DB_PASSWORD#1'")
    db.commit()
    db.close()
    stub = server.stub("auth")
    with pytest.raises(grpc.RpcError) as caught:
        stub.BatchGetSecrets(pb.BatchGetSecretsRequest(prefix="auth/"), timeout=10)
    assert caught.value.code() is grpc.StatusCode.DATA_LOSS
    assert "'auth/DB_PASSWORD' is missing" in (caught.value.details() or "")


HIDDEN_POLICY = f"""
[identities]
"spiffe://{TD}/auth" = ["reader"]
"spiffe://{TD}/ops" = ["admin"]

[roles.reader]
rules = [
  {{ path = "**", capabilities = ["read", "list"] }},
  {{ path = "hidden/*", deny = ["list"] }},
]

[roles.admin]
rules = [{{ path = "**", capabilities = ["admin"] }}]
"""


def test_a_list_deny_hides_names_from_batch_get_by_prefix_and_watch(tmp_path: Path) -> None:
    make_pki(tmp_path)
    make_store(tmp_path, {**SEED, "hidden/ROOT_TOKEN": b"root-token"}, HIDDEN_POLICY)
    running = start_server(tmp_path)
    try:
        auth, ops = running.stub("auth"), running.stub("ops")
        listed = [m.name for m in auth.ListSecrets(pb.ListSecretsRequest(), timeout=10).secrets]
        assert listed == sorted(SEED)
        for prefix in ("hidden/", ""):
            reply = auth.BatchGetSecrets(pb.BatchGetSecretsRequest(prefix=prefix), timeout=10)
            assert sorted(s.name for s in reply.secrets) == (sorted(SEED) if prefix == "" else [])
        # read is not denied: asked for by name, it is still served
        named = auth.GetSecret(pb.GetSecretRequest(name="hidden/ROOT_TOKEN"), timeout=10)
        assert named.secret.value == b"root-token"
        stream = auth.Watch(pb.WatchRequest(prefix=""), timeout=30)
        assert dict(stream.initial_metadata())  # live: it sees every change after this
        ops.PutSecret(pb.PutSecretRequest(name="hidden/NEW_ONE", value=b"x"), timeout=10)
        ops.PutSecret(pb.PutSecretRequest(name="auth/VISIBLE", value=b"y"), timeout=10)
        assert next(iter(stream)).name == "auth/VISIBLE"  # hidden/NEW_ONE, changed first, never came
        stream.cancel()
    finally:
        running.stop()


def test_an_identity_without_a_role_may_not_list_batch_get_or_watch(tmp_path: Path) -> None:
    """The calls that filter by policy themselves still need a role: a certificate the policy does
    not name must not scan the store nor hold watch streams (three filled max_watch_streams = 3)."""
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    running = start_server(tmp_path, settings="max_watch_streams = 1\n")
    try:
        nobody = running.stub("nobody")
        calls = {
            "list": lambda: nobody.ListSecrets(pb.ListSecretsRequest(), timeout=10),
            "batch_get": lambda: nobody.BatchGetSecrets(pb.BatchGetSecretsRequest(), timeout=10),
            "watch": lambda: next(iter(nobody.Watch(pb.WatchRequest(), timeout=5))),
        }
        for operation, call in calls.items():
            assert code_of(call) is grpc.StatusCode.PERMISSION_DENIED, operation
            last = running.audit_records()[-1]
            assert (last["operation"], last["actor"], last["decision"], last["outcome"]) == (
                operation,
                f"spiffe://{TD}/nobody",
                "deny",
                "access_denied",
            )
        stream = running.stub("ops").Watch(pb.WatchRequest(), timeout=30)
        assert dict(stream.initial_metadata())  # the one watch slot was left free
        stream.cancel()
    finally:
        running.stop()


def test_a_role_bound_to_other_networks_is_not_held_and_a_reload_that_binds_it_here_grants_it(
    tmp_path: Path,
) -> None:
    """bound_cidrs (as Vault's certificate roles): auth's certificate used from 127.0.0.1, where its
    role is not bound, gets nothing: not a get, a list, a batch get or a watch; audited as denied
    with its address. Bound to 127.0.0.0/8 by a SIGHUP reload, the same connection reads."""
    elsewhere = POLICY.replace(
        "[roles.auth-reader]\n", '[roles.auth-reader]\nbound_cidrs = ["10.0.0.0/8", "fd00::/8"]\n'
    )
    assert elsewhere != POLICY
    make_pki(tmp_path)
    make_store(tmp_path, SEED, elsewhere)
    running = start_server(tmp_path)
    try:
        auth = running.stub("auth")
        calls = {
            "get": lambda: auth.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10),
            "list": lambda: auth.ListSecrets(pb.ListSecretsRequest(), timeout=10),
            "batch_get": lambda: auth.BatchGetSecrets(pb.BatchGetSecretsRequest(prefix="auth/"), timeout=10),
            "watch": lambda: next(iter(auth.Watch(pb.WatchRequest(), timeout=5))),
        }
        for operation, call in calls.items():
            assert code_of(call) is grpc.StatusCode.PERMISSION_DENIED, operation
            last = running.audit_records()[-1]
            assert (last["operation"], last["decision"], last["outcome"]) == (
                operation,
                "deny",
                "access_denied",
            )
            assert str(last["peer"]).startswith("ipv4:127.0.0.1:")
        ops = running.stub("ops")  # an unbound role is held from anywhere
        assert ops.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10).secret.version == 1
        (tmp_path / "policy.toml").write_text(elsewhere.replace('"10.0.0.0/8"', '"127.0.0.0/8"'))
        running.process.send_signal(signal.SIGHUP)
        assert eventually(lambda: any('"message": "policy reloaded"' in line for line in running.log_lines))
        secret = auth.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10).secret
        assert secret.value == SEED["auth/DB_PASSWORD"]
        listed = auth.ListSecrets(pb.ListSecretsRequest(), timeout=10).secrets
        assert [m.name for m in listed] == sorted(n for n in SEED if n.startswith("auth/"))
    finally:
        running.stop()


def test_a_role_bound_elsewhere_grants_nothing_beside_a_role_held_here(tmp_path: Path) -> None:
    """An identity holding one role from anywhere and another bound to other networks: from here
    it may read only what the first grants. Named in a batch get, a name only the bound role grants
    is refused as a get of it is (the whole batch, naming it); by prefix, and in a list, it is not
    shown. (The caller holds a role here, so it is each name's check that must use its address.)"""
    split = POLICY.replace(
        f'"spiffe://{TD}/auth" = ["auth-reader"]', f'"spiffe://{TD}/auth" = ["auth-reader", "mc-reader"]'
    ).replace("[roles.mc-reader]\n", '[roles.mc-reader]\nbound_cidrs = ["10.0.0.0/8"]\n')
    assert split.count("bound_cidrs") == 1 and '["auth-reader", "mc-reader"]' in split
    make_pki(tmp_path)
    make_store(tmp_path, SEED, split)
    running = start_server(tmp_path)
    try:
        auth = running.stub("auth")
        bound_only = "market-connector/BINANCE_SECRET"
        get = pb.GetSecretRequest(name=bound_only)
        assert code_of(lambda: auth.GetSecret(get, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
        named = pb.BatchGetSecretsRequest(names=["auth/DB_PASSWORD", bound_only])
        assert code_of(lambda: auth.BatchGetSecrets(named, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
        last = running.audit_records()[-1]
        assert (last["operation"], last["name"], last["decision"]) == ("batch_get", bound_only, "deny")
        mine = auth.BatchGetSecrets(pb.BatchGetSecretsRequest(names=["auth/DB_PASSWORD"]), timeout=10)
        assert [s.value for s in mine.secrets] == [SEED["auth/DB_PASSWORD"]]
        everything = auth.BatchGetSecrets(pb.BatchGetSecretsRequest(), timeout=10).secrets
        listed = auth.ListSecrets(pb.ListSecretsRequest(), timeout=10).secrets
        own = sorted(n for n in SEED if n.startswith("auth/"))
        assert sorted(s.name for s in everything) == own
        assert [m.name for m in listed] == own
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.1.5:51234", "10.0.1.5"),
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:%5B::1%5D:51234", "::1"),  # as some gRPC versions write it
        ("ipv6:[::ffff:10.0.1.5]:443", "::ffff:a00:105"),  # Python writes a mapped IPv4 so
        ("unix:/run/secrets-manager.sock", None),
        ("ipv4:not-an-address:1", None),
        ("", None),
    ],
)
def test_the_callers_address_is_read_from_grpcs_peer_string(peer: str, address: str | None) -> None:
    from secrets_manager.service.server import peer_address

    found = peer_address(peer)
    assert (None if found is None else str(found)) == address


def test_compare_and_set_conflict_is_aborted(server: Server) -> None:
    stub = server.stub("ops")
    stale = pb.PutSecretRequest(name="auth/DB_PASSWORD", value=b"x", expect_version=7)
    assert code_of(lambda: stub.PutSecret(stale, timeout=10)) is grpc.StatusCode.ABORTED
    fresh = pb.PutSecretRequest(name="auth/DB_PASSWORD", value=b"rotated", expect_version=1)
    assert stub.PutSecret(fresh, timeout=10).version == 2


def test_missing_secret_is_not_found(server: Server) -> None:
    stub = server.stub("ops")
    assert code_of(lambda: stub.GetSecret(pb.GetSecretRequest(name="auth/NOPE"), timeout=10)) is (
        grpc.StatusCode.NOT_FOUND
    )


def test_sixteen_concurrent_clients_read_and_write_correct_values(server: Server) -> None:
    errors: list[str] = []

    def client(index: int) -> None:
        stub = server.stub("writer")
        name = f"load/client-{index}"
        try:
            for round_ in range(15):
                value = f"{index}:{round_}".encode()
                stub.PutSecret(pb.PutSecretRequest(name=name, value=value), timeout=30)
                got = stub.GetSecret(pb.GetSecretRequest(name=name), timeout=30).secret
                if got.value != value or got.version != round_ + 1:
                    errors.append(f"{name}: {got.value!r} v{got.version}, wanted {value!r} v{round_ + 1}")
        except grpc.RpcError as exc:
            errors.append(f"{name}: {exc.code()} {exc.details()}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    names = [
        m.name
        for m in server.stub("ops").ListSecrets(pb.ListSecretsRequest(prefix="load/"), timeout=10).secrets
    ]
    assert len(names) == 16


# ---- audit, values, logs ------------------------------------------------------------------------


def test_known_value_never_reaches_logs_or_audit(server: Server) -> None:
    stub = server.stub("ops")
    stub.GetSecret(pb.GetSecretRequest(name="market-connector/BINANCE_API_KEY"), timeout=10)
    stub.PutSecret(
        pb.PutSecretRequest(name="market-connector/BINANCE_API_KEY", value=b"NEW-KNOWN-VALUE"), timeout=10
    )
    denied = server.stub("auth")
    code_of(
        lambda: denied.GetSecret(pb.GetSecretRequest(name="market-connector/BINANCE_API_KEY"), timeout=10)
    )
    audit = (server.dir / "store.audit.jsonl").read_bytes()
    logs = "".join(server.log_lines)
    for value in (b"binance-key-KNOWN-VALUE", b"NEW-KNOWN-VALUE"):
        assert value not in audit
        assert value.decode() not in logs
    reads = [r for r in server.audit_records() if r["operation"] == "get" and r["outcome"] == "ok"]
    assert reads and all(str(r["value_hmac"]).startswith("hmac-sha256:") for r in reads)


def local_audit_verify(directory: Path) -> subprocess.CompletedProcess[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "SECRETS_MANAGER_STORE": str(directory / "store.db"),
        "MASTER_PASSWORD": PASSWORD,
    }
    return subprocess.run(
        [str(SCRIPT), "audit", "verify"], capture_output=True, env=env, timeout=60, start_new_session=True
    )


def test_reads_are_audited_before_the_response_and_survive_a_crash(server: Server) -> None:
    """The default audit_sync = "interval": the record of a read is in the file when the caller
    gets the value, so SIGKILL of the service right after loses none of them."""
    stub = server.stub("auth")
    for n in range(30):
        name = ("auth/DB_PASSWORD", "auth/JWT_KEY")[n % 2]
        reply = stub.GetSecret(pb.GetSecretRequest(name=name), timeout=10)
        last = server.audit_records()[-1]
        assert (last["operation"], last["name"], last["outcome"]) == ("get", name, "ok")
        assert last["version"] == reply.secret.version
    server.process.kill()
    server.process.wait(timeout=10)
    reads = [r for r in server.audit_records() if r["operation"] == "get"]
    assert len(reads) == 30
    verified = local_audit_verify(server.dir)
    assert verified.returncode == 0, verified.stderr


def test_audit_sync_always_and_a_bad_setting(tmp_path: Path) -> None:
    make_pki(tmp_path)
    make_store(tmp_path, {"auth/DB_PASSWORD": b"auth-db-pass"}, POLICY)
    with pytest.raises(AssertionError, match="audit_sync must be"):
        start_server(tmp_path, settings='audit_sync = "sometimes"\n')
    running = start_server(tmp_path, settings='audit_sync = "always"\n')
    try:
        reply = running.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        assert reply.secret.value == b"auth-db-pass"
        assert running.audit_records()[-1]["operation"] == "get"
    finally:
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=30) == 0
    assert local_audit_verify(tmp_path).returncode == 0


_TLS = {"cert": "server.pem", "key": "server-key.pem", "client_ca": "ca.pem"}


@pytest.mark.parametrize(
    ("settings", "tls", "code", "message"),
    [
        # gRPC took it and listened on 70000 mod 65536.
        ('listen = "127.0.0.1:70000"', {}, 2, "listen must be HOST:PORT with a port of 0..65535"),
        ('metrics_listen = "127.0.0.1:99999"', {}, 2, "metrics_listen must be HOST:PORT"),
        # gRPC's RuntimeError "failed to bind", and lines of its own on stderr.
        ('listen = "{busy}"', {}, 1, "cannot listen on {busy} (in use, or not an address of this host)"),
        ('listen = "256.1.1.1:1"', {}, 1, "cannot listen on 256.1.1.1:1 (in use"),
        ("", {"key": "auth-key.pem"}, 2, "(tls.key) does not match the certificate"),
        ("", {"cert": "policy.toml"}, 2, "policy.toml (tls.cert) is not a PEM certificate"),
        ("", {"client_ca": "server-key.pem"}, 2, "(tls.client_ca) is not a PEM certificate"),
        # A client's certificate as the client CA: it served, and refused every client.
        ("", {"client_ca": "auth.pem"}, 2, "auth.pem (tls.client_ca) holds no CA certificate"),
        ("", {"key": "policy.toml"}, 2, "(tls.key) is not an unencrypted PEM private key"),
        # IsADirectoryError before.
        ("", {"cert": "."}, 2, "(tls.cert): Is a directory"),
        # An empty file: said so, rather than "not a PEM ..." (gRPC's C core would abort on it).
        ("", {"cert": "empty.pem"}, 2, "empty.pem (tls.cert) is empty"),
        ("", {"key": "empty.pem"}, 2, "empty.pem (tls.key) is empty"),
        ("", {"client_ca": "empty.pem"}, 2, "empty.pem (tls.client_ca) is empty"),
        # prometheus_client's OSError.
        ('metrics_listen = "{busy}"', {}, 1, "cannot listen on {busy} for metrics (metrics_listen)"),
    ],
)
def test_a_server_that_cannot_start_says_why_in_one_line(
    tmp_path: Path, settings: str, tls: dict[str, str], code: int, message: str
) -> None:
    make_pki(tmp_path)
    make_store(tmp_path, {"auth/DB_PASSWORD": b"auth-db-pass"}, POLICY)
    (tmp_path / "empty.pem").write_bytes(b"")
    for given_as_key in ("empty.pem", "policy.toml"):  # a key others can read is warned of first
        (tmp_path / given_as_key).chmod(0o600)
    with socket.socket() as busy_socket:
        busy_socket.bind(("127.0.0.1", 0))
        busy_socket.listen()
        busy = f"127.0.0.1:{busy_socket.getsockname()[1]}"
        tls_table = "".join(f'{key} = "{value}"\n' for key, value in {**_TLS, **tls}.items())
        listen = "" if "listen =" in settings.replace("metrics_listen", "") else 'listen = "127.0.0.1:0"\n'
        config = tmp_path / "bad.toml"
        config.write_text(
            f'{listen}{settings.format(busy=busy)}\nstore = "store.db"\npolicy = "policy.toml"\n'
            f"[tls]\n{tls_table}"
        )
        result = _serve(tmp_path, config)
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("secrets-manager: error: "), stderr
    assert message.format(busy=busy) in stderr and "internal error" not in stderr
    if code == 1:  # the start was recorded, and so is why it failed
        records = [json.loads(line) for line in (tmp_path / "store.audit.jsonl").read_text().splitlines()]
        serve = [(r["operation"], r["outcome"]) for r in records if r["operation"] == "serve"]
        assert serve == [("serve", "pending"), ("serve", "storage_error")]


def test_serve_on_a_missing_store_names_the_config_setting_and_the_init_command(tmp_path: Path) -> None:
    """--store cannot help (the config's store wins over it), and a bare init creates another store."""
    make_pki(tmp_path)
    make_store(tmp_path, {"auth/DB_PASSWORD": b"auth-db-pass"}, POLICY)
    tls_table = "".join(f'{key} = "{value}"\n' for key, value in _TLS.items())
    config = tmp_path / "server.toml"
    config.write_text(f'listen = "127.0.0.1:0"\nstore = "new.db"\npolicy = "policy.toml"\n[tls]\n{tls_table}')
    result = _serve(tmp_path, config)
    stderr = result.stderr.decode()
    assert result.returncode == 3 and stderr.count("\n") == 1, stderr
    assert f"no store at {tmp_path / 'new.db'} (the store setting of {config})" in stderr
    assert f"'secrets-manager --store {tmp_path / 'new.db'} init'" in stderr
    assert f"or set store in {config}" in stderr and "--store with" not in stderr


def test_serve_run_in_another_directory_says_where_it_looked_for_the_config(tmp_path: Path) -> None:
    """`serve --config server.toml` from another directory than the config's said only "server
    config server.toml does not exist", with nothing to say where it had looked."""
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    result = subprocess.run(
        [str(SCRIPT), "serve", "--config", "server.toml"],
        capture_output=True, cwd=elsewhere, timeout=30,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
    )  # fmt: skip
    stderr = result.stderr.decode()
    assert result.returncode == 3 and stderr.count("\n") == 1, stderr
    assert f"server config server.toml does not exist in {elsewhere} (the current directory)" in stderr


def test_serve_help_says_the_configs_paths_are_relative_to_the_config_and_whose_store_it_serves() -> None:
    """`serve --help` said neither (the README did): a newcomer who ran serve from another
    directory, or passed --store beside a config naming its store, had to guess."""
    shown = subprocess.run([str(SCRIPT), "serve", "--help"], capture_output=True, text=True, timeout=30)
    said = " ".join(shown.stdout.split())
    assert "relative to the config file's directory, wherever serve runs" in said
    assert "--store and SECRETS_MANAGER_STORE only when the config names none" in said


def test_a_server_config_that_is_a_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    result = _serve(tmp_path, tmp_path)  # IsADirectoryError before
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr.count("\n") == 1, stderr
    assert f"server config {tmp_path}: cannot read it (Is a directory)" in stderr


def _serve(
    directory: Path, config: Path, extra: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`serve` expected to stop at once: a server that starts after all is killed at the timeout.
    `extra` is added to its environment (None: unset)."""
    merged = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "MASTER_PASSWORD": PASSWORD,
        **(extra or {}),
    }
    env = {key: value for key, value in merged.items() if value is not None}
    result = subprocess.run(
        [str(SCRIPT), "serve", "--config", str(config)],
        capture_output=True,
        env=env,
        timeout=30,
        start_new_session=True,
    )
    assert b"Traceback" not in result.stderr, result.stderr
    return result


def test_a_sighup_while_serve_starts_does_not_end_it(tmp_path: Path) -> None:
    """SIGHUP's default action ends a process: one sent while serve waits for its password (here a
    FIFO nobody has written yet, so the moment is certain) must not, and it serves after."""
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    fifo = tmp_path / "password.fifo"
    os.mkfifo(fifo, 0o600)
    tls_table = "".join(f'{key} = "{value}"\n' for key, value in _TLS.items())
    config = tmp_path / "server.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nstore = "store.db"\npolicy = "policy.toml"\npassword_file = "{fifo}"\n'
        f"[tls]\n{tls_table}"
    )
    process = subprocess.Popen(
        [str(SCRIPT), "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # opening a FIFO's write end without blocking works once serve reads it
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        process.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert process.poll() is None, "SIGHUP ended serve while it started"
        os.write(writer, PASSWORD.encode())
        os.close(writer)
        assert process.stderr is not None
        assert '"message": "serving"' in process.stderr.readline().decode()
        process.send_signal(signal.SIGHUP)  # now it reloads the policy
        assert '"message": "policy reloaded"' in process.stderr.readline().decode()
    finally:
        process.terminate()
        process.wait(30)
    assert process.returncode == 0


# ---- operations --------------------------------------------------------------------------------


def test_health_reflection_and_metrics(server: Server) -> None:
    health = health_pb2_grpc.HealthStub(server.channel("auth"))
    status = health.Check(health_pb2.HealthCheckRequest(service="secrets_manager.v1.Secrets"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(server.channel("auth"))
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "secrets_manager.v1.Secrets" in services
    server.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)

    def scrape() -> str:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        return str(urllib.request.urlopen(url, timeout=10).read().decode())

    body = scrape()
    assert 'secrets_manager_requests_total{code="OK",method="GetSecret"}' in body
    assert "secrets_manager_request_seconds_bucket" in body
    assert "secrets_manager_watch_streams 0.0" in body
    stream = server.stub("auth").Watch(pb.WatchRequest(prefix="auth/"), timeout=30)
    stream.initial_metadata()  # the stream is live
    assert "secrets_manager_watch_streams 1.0" in scrape()
    stream.cancel()
    deadline = time.monotonic() + 10
    while "secrets_manager_watch_streams 0.0" not in scrape() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "secrets_manager_watch_streams 0.0" in scrape()


def test_reflection_streams_are_capped_and_leave_threads_for_every_other_call(tmp_path: Path) -> None:
    """A reflection stream the client never half-closes holds a worker thread: any certificate the
    CA signed (one with no role too) opened `max_workers` of them, and every other call, an admin's
    GetSecret and the health check included, waited until its deadline. Past a few open streams one
    more is refused at once with RESOURCE_EXHAUSTED; a stream closed frees its place."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    workers = 8
    server = start_server(tmp_path, max_workers=workers)
    done = threading.Event()

    def never_half_closed() -> Iterator[object]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        done.wait(30)

    reflect = reflection_pb2_grpc.ServerReflectionStub(server.channel("nobody"))
    opened, refused = [], []
    try:
        for _ in range(workers):
            stream = reflect.ServerReflectionInfo(never_half_closed(), timeout=30)
            try:
                next(stream)
                opened.append(stream)
            except grpc.RpcError as exc:
                refused.append(exc)
        assert 1 <= len(opened) <= 4 and len(opened) + len(refused) == workers
        assert {exc.code() for exc in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # type: ignore[attr-defined]
        assert "reflection streams" in refused[0].details()  # type: ignore[attr-defined]
        request = pb.GetSecretRequest(name="auth/DB_PASSWORD")
        assert server.stub("ops").GetSecret(request, timeout=5).secret.value == b"auth-db-pass"
        health = health_pb2_grpc.HealthStub(server.channel("ops"))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        opened.pop().cancel()
        replies = eventually_answered(reflect)
        assert "secrets_manager.v1.Secrets" in replies
    finally:
        done.set()
        for stream in opened:
            stream.cancel()
        server.stop()


def eventually_answered(reflect: object) -> set[str]:
    """The services a one-request reflection stream (as grpcurl's) lists, once a place is free."""
    from grpc_reflection.v1alpha import reflection_pb2

    deadline = time.monotonic() + 10
    while True:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            replies = reflect.ServerReflectionInfo(iter([request]), timeout=5)  # type: ignore[attr-defined]
            return {s.name for reply in replies for s in reply.list_services_response.service}
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise
            time.sleep(0.05)


def test_watch_sees_changes_made_by_another_process(server: Server) -> None:
    stub = server.stub("auth")
    stream = stub.Watch(pb.WatchRequest(prefix="auth/"), timeout=30)
    assert dict(stream.initial_metadata())  # live: it has read the current revision (not a sleep)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(server.dir), "MASTER_PASSWORD": PASSWORD}
    for name in ("market-connector/BINANCE_SECRET", "auth/JWT_KEY"):
        written = subprocess.run(
            [str(SCRIPT), "--store", str(server.dir / "store.db"), "store", name],
            input=b"changed elsewhere",
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert written.returncode == 0, written.stderr
    event = next(iter(stream))
    assert (event.name, event.version, event.kind) == ("auth/JWT_KEY", 2, pb.ChangeEvent.VERSION_ADDED)
    stream.cancel()


def test_a_store_file_removed_under_the_service_is_not_serving_and_refuses_writes(server: Server) -> None:
    """SQLite goes on with the file it opened: a PutSecret after `rm store.db` was answered OK and
    lost with the unlinked file, and health stayed SERVING."""
    # Once serve's start is audited, its anchor moved too (a serve that cannot record its start does
    # not serve): a change answered after the start's record was appended after it, in order.
    assert eventually(
        lambda: any(r["operation"] == "serve" and r["outcome"] == "ok" for r in server.audit_records())
    )
    stub = server.stub("ops")
    stub.PutSecret(pb.PutSecretRequest(name="auth/BEFORE", value=b"kept"), timeout=10)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{server.dir / 'store.db'}{suffix}").unlink(missing_ok=True)
    with pytest.raises(grpc.RpcError) as refused:
        stub.PutSecret(pb.PutSecretRequest(name="auth/LOST", value=b"SEEKRIT-lost"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "was removed while this process had it open" in str(refused.value.details())
    assert "restart the process" in str(refused.value.details())
    health = health_pb2_grpc.HealthStub(server.channel("auth"))
    deadline = time.monotonic() + 15  # the store probe runs every 2 s
    while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != (
        health_pb2.HealthCheckResponse.NOT_SERVING
    ):
        assert time.monotonic() < deadline, "health stayed SERVING"
        time.sleep(0.1)
    assert server.process.poll() is None  # still running, and saying why it does not serve


def test_a_policy_reload_is_recorded_in_the_audit_log_taken_or_refused(server: Server) -> None:
    """The policy decides every request, yet its reload at SIGHUP was only a line on serve's
    stderr: an auditor asking for every administrative change found no policy change in the
    tamper-evident log. Each reload is a `policy.reload` record now, `ok` or, for a file that was
    refused (the policy in force stays), `invalid_input`; the log still verifies. Each names the
    policy in force after it by its SHA-256 (as `sha256sum` prints it), as serve's start does, so
    an auditor can tell which file of its version control decided the requests in between."""
    first = hashlib.sha256((server.dir / "policy.toml").read_bytes()).hexdigest()
    edited = POLICY.replace(f'"spiffe://{TD}/auth" = ["auth-reader"]', "").encode()
    (server.dir / "policy.toml").write_bytes(edited)
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: any('"message": "policy reloaded"' in line for line in server.log_lines))
    (server.dir / "policy.toml").write_text("[identities\n")  # does not parse
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: any("policy reload rejected" in line for line in server.log_lines))

    def reloads() -> list[dict[str, object]]:
        return [r for r in server.audit_records() if r["operation"] == "policy.reload"]

    assert eventually(lambda: len(reloads()) == 2)
    assert [r["outcome"] for r in reloads()] == ["ok", "invalid_input"]
    (started,) = [r for r in server.audit_records() if (r["operation"], r["outcome"]) == ("serve", "ok")]
    assert started["policy_sha256"] == first
    second = hashlib.sha256(edited).hexdigest()
    assert second != first
    assert [r["policy_sha256"] for r in reloads()] == [second, second]  # the refused file is not in force
    assert all(
        (r["actor"], r["source"], r["decision"], r["name"]) == (local_actor(), "grpc", "allow", None)
        for r in reloads()
    )
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(server.dir),
        "MASTER_PASSWORD": PASSWORD,
    }
    verified = run_script(environ, "--store", str(server.dir / "store.db"), "audit", "verify")
    assert verified.returncode == 0, verified.stderr


def test_a_reload_that_takes_a_watchers_last_role_ends_its_stream(server: Server) -> None:
    stream = server.stub("auth").Watch(pb.WatchRequest(prefix="auth/"), timeout=30)
    assert dict(stream.initial_metadata())
    (server.dir / "policy.toml").write_text(POLICY.replace(f'"spiffe://{TD}/auth" = ["auth-reader"]', ""))
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: any('"message": "policy reloaded"' in line for line in server.log_lines))
    started = time.monotonic()
    assert code_of(lambda: next(iter(stream))) is grpc.StatusCode.PERMISSION_DENIED
    assert time.monotonic() - started < 5  # not at the stream's deadline: its slot is free again


def test_a_watch_is_counted_by_the_status_it_ended_with_and_its_whole_life(server: Server) -> None:
    """A Watch was counted code="OK" when its stream was set up, whatever it ended with later, and
    its latency was the set-up's (a stream that lived over a second showed a few milliseconds).
    Now it is counted once, at its end, by its status (PERMISSION_DENIED after a reload, CANCELLED
    by its client), its life goes to secrets_manager_watch_stream_seconds and it is not in the
    request latency histogram."""

    def scrape() -> str:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        return str(urllib.request.urlopen(url, timeout=10).read().decode())

    def sample(body: str, line_start: str) -> float | None:
        found = [line for line in body.splitlines() if line.startswith(line_start + " ")]
        return float(found[0].rpartition(" ")[2]) if found else None

    cancelled = server.stub("ops").Watch(pb.WatchRequest(), timeout=30)
    assert dict(cancelled.initial_metadata())
    cancelled.cancel()
    assert eventually(
        lambda: sample(scrape(), 'secrets_manager_requests_total{code="CANCELLED",method="Watch"}') == 1
    )
    stream = server.stub("auth").Watch(pb.WatchRequest(prefix="auth/"), timeout=30)
    assert dict(stream.initial_metadata())
    opened = time.monotonic()
    time.sleep(1.0)  # it lives over a second
    (server.dir / "policy.toml").write_text(POLICY.replace(f'"spiffe://{TD}/auth" = ["auth-reader"]', ""))
    server.process.send_signal(signal.SIGHUP)
    assert code_of(lambda: next(iter(stream))) is grpc.StatusCode.PERMISSION_DENIED
    lived = time.monotonic() - opened
    denied = 'secrets_manager_requests_total{code="PERMISSION_DENIED",method="Watch"}'
    assert eventually(lambda: sample(scrape(), denied) == 1)
    body = scrape()
    assert sample(body, 'secrets_manager_requests_total{code="OK",method="Watch"}') is None
    assert sample(body, "secrets_manager_watch_stream_seconds_count") == 2
    total = sample(body, "secrets_manager_watch_stream_seconds_sum")
    assert total is not None and 1.0 <= total <= lived + 1.0
    assert 'secrets_manager_request_seconds_count{method="Watch"}' not in body


def test_sighup_reloads_the_policy_and_a_broken_policy_is_rejected(server: Server) -> None:
    stub = server.stub("nobody")
    request = pb.GetSecretRequest(name="auth/DB_PASSWORD")
    assert code_of(lambda: stub.GetSecret(request, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
    policy = server.dir / "policy.toml"
    policy.write_text(
        POLICY.replace('"market-connector" = ["mc-reader"]', f'"spiffe://{TD}/nobody" = ["auth-reader"]')
    )
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: any('"message": "policy reloaded"' in line for line in server.log_lines))
    assert stub.GetSecret(request, timeout=10).secret.value == b"auth-db-pass"
    policy.write_text("this is [not toml")
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: any("policy reload rejected" in line for line in server.log_lines))
    assert stub.GetSecret(request, timeout=10).secret.value == b"auth-db-pass"  # the old policy stays


def test_serve_started_with_sighup_ignored_still_reloads_on_it(tmp_path: Path) -> None:
    """`nohup secrets-manager serve …` (or a supervisor, or a test run under nohup) starts serve
    with SIGHUP ignored. A reload signal is honoured all the same, as nginx, PostgreSQL and Vault
    (Go's signal.Notify) do: serve installs its handler whatever it inherited. Every SIGHUP test
    passed under nohup already; this one pins it however the suite is started."""
    import service_fixtures

    make_pki(tmp_path)
    make_store(tmp_path)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited by serve, as from nohup
    try:
        server = start_server(tmp_path)
    finally:
        signal.signal(signal.SIGHUP, previous)
    try:
        stub = server.stub("nobody")
        request = pb.GetSecretRequest(name="auth/DB_PASSWORD")
        assert code_of(lambda: stub.GetSecret(request, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
        granted = f'"spiffe://{TD}/nobody" = ["auth-reader"]\n[roles.auth-reader]'
        (tmp_path / "policy.toml").write_text(
            service_fixtures.POLICY.replace("[roles.auth-reader]", granted, 1)
        )
        server.process.send_signal(signal.SIGHUP)
        assert eventually(lambda: any('"message": "policy reloaded"' in line for line in server.log_lines))
        assert server.process.poll() is None
        assert stub.GetSecret(request, timeout=10).secret.value == service_fixtures.SEED["auth/DB_PASSWORD"]
    finally:
        server.stop()


def test_a_reloaded_policy_naming_an_identity_no_certificate_can_present_is_warned_of(
    server: Server,
) -> None:
    """`spiffe://SHRIVENQUANT.local/ops` (a trust domain in capitals) parses, and grants nothing: no
    certificate can carry it. `policy check` warned of it; serve applied it saying only "policy
    reloaded", and ops was locked out with no clue in the log."""
    policy = server.dir / "policy.toml"
    policy.write_text(POLICY.replace(f'"spiffe://{TD}/ops"', f'"spiffe://{TD.upper()}/ops"'))
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: any("no client certificate can present" in line for line in server.log_lines))
    warning = next(
        json.loads(line) for line in server.log_lines if "no client certificate can present" in line
    )
    assert warning["level"] == "warning" and warning["identity"] == f"spiffe://{TD.upper()}/ops"


def test_a_revoked_certificate_is_cut_off_on_sighup_and_its_renewal_works(server: Server) -> None:
    """`pki issue ops --force` leaves the leaked old certificate working: [revoked] ends it."""
    for suffix in (".pem", "-key.pem"):
        (server.dir / f"ops-leaked{suffix}").write_bytes((server.dir / f"ops{suffix}").read_bytes())
    ca = ((server.dir / "ca.pem").read_bytes(), (server.dir / "ca-key.pem").read_bytes())
    renewed, renewed_key = pki.issue(*ca, "ops")
    (server.dir / "ops.pem").write_bytes(renewed)
    (server.dir / "ops-key.pem").write_bytes(renewed_key)
    request = pb.GetSecretRequest(name="auth/DB_PASSWORD")
    old, new = server.stub("ops-leaked"), server.stub("ops")
    assert old.GetSecret(request, timeout=10).secret.value == new.GetSecret(request, timeout=10).secret.value
    leaked = x509.load_pem_x509_certificate((server.dir / "ops-leaked.pem").read_bytes())
    renewed_serial = x509.load_pem_x509_certificate(renewed).serial_number
    # Both reads are by ops: only the certificate's serial tells the thief's from the renewal's
    # (the service recorded it on refusals alone, so the leaked certificate's reads were not found).
    by_leaked, by_renewed = server.audit_records()[-2:]
    assert by_leaked["actor"] == by_renewed["actor"] == f"spiffe://{TD}/ops"
    assert int(str(by_leaked["certificate_serial"]), 16) == leaked.serial_number
    assert int(str(by_renewed["certificate_serial"]), 16) == renewed_serial

    (server.dir / "policy.toml").write_text(
        POLICY + f'\n[revoked]\nserials = ["{leaked.serial_number.to_bytes(20).hex(":")}"]\n'
    )
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: any('"message": "policy reloaded"' in line for line in server.log_lines))
    with pytest.raises(grpc.RpcError) as caught:
        old.GetSecret(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert "certificate revoked" in caught.value.details()  # type: ignore[attr-defined]
    last = server.audit_records()[-1]
    assert (last["actor"], last["decision"], last["outcome"]) == (
        f"spiffe://{TD}/ops",
        "deny",
        "unauthenticated",
    )
    assert int(str(last["certificate_serial"]), 16) == leaked.serial_number
    assert str(last["peer"]).startswith("ipv4:127.0.0.1:") and last["name"] == "auth/DB_PASSWORD"
    assert new.GetSecret(request, timeout=10).secret.value == b"auth-db-pass"  # the renewal works
    assert int(str(server.audit_records()[-1]["certificate_serial"]), 16) == renewed_serial

    fingerprint = x509.load_pem_x509_certificate(renewed).fingerprint(hashes.SHA256()).hex(":").upper()
    (server.dir / "policy.toml").write_text(POLICY + f'\n[revoked]\nfingerprints = ["{fingerprint}"]\n')
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: sum('"message": "policy reloaded"' in line for line in server.log_lines) == 2)
    assert code_of(lambda: new.ListSecrets(pb.ListSecretsRequest(), timeout=10)) is (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert old.GetSecret(request, timeout=10).secret.value == b"auth-db-pass"  # no longer listed


def test_a_revoked_certificates_open_watch_stream_ends_at_the_reload(server: Server) -> None:
    """A Watch opened before the revocation ends within a second of the SIGHUP (it checks the
    policy at every batch, an idle second included), and no change after it reaches the stream."""
    stream = server.stub("auth").Watch(pb.WatchRequest(prefix="auth/"), timeout=30)
    events: list[str] = []
    ended: list[grpc.StatusCode] = []

    def consume() -> None:
        try:
            events.extend(event.name for event in stream)
        except grpc.RpcError as exc:
            ended.append(exc.code())  # type: ignore[attr-defined]

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    time.sleep(0.5)  # the stream is open
    fingerprint = x509.load_pem_x509_certificate((server.dir / "auth.pem").read_bytes()).fingerprint(
        hashes.SHA256()
    )
    (server.dir / "policy.toml").write_text(POLICY + f'\n[revoked]\nfingerprints = ["{fingerprint.hex()}"]\n')
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: any('"message": "policy reloaded"' in line for line in server.log_lines))
    consumer.join(timeout=5)
    assert ended == [grpc.StatusCode.UNAUTHENTICATED]
    server.stub("ops").PutSecret(pb.PutSecretRequest(name="auth/JWT_KEY", value=b"after"), timeout=10)
    assert events == []


def test_sigterm_under_load_finishes_in_flight_calls_and_exits_0(unlimited_server: Server) -> None:
    server = unlimited_server  # four threads call in a loop: past the default rate
    store = EncryptedStore.open(SqliteStorage(server.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    for i in range(1500):
        store.put(f"load/bulk/K{i:04d}", b"bulk-%d" % i)
    store.close()
    calls: list[tuple[float, float, str]] = []  # (started, ended, outcome) of small calls
    stop = threading.Event()

    def load() -> None:
        stub = server.stub("writer")
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.GetSecret(pb.GetSecretRequest(name="load/bulk/K0001"), timeout=10)
                outcome = "ok"
            except grpc.RpcError as exc:
                outcome = exc.code().name
            calls.append((started, time.monotonic(), outcome))

    big: dict[str, object] = {}
    sending = threading.Event()
    big_stub = server.stub("writer")  # connected before: the call itself goes out at once
    big_stub.GetSecret(pb.GetSecretRequest(name="load/bulk/K0001"), timeout=10)

    def long_call() -> None:
        started = time.monotonic()
        sending.set()
        reply = big_stub.BatchGetSecrets(pb.BatchGetSecretsRequest(prefix="load/bulk/"), timeout=60)
        big.update(started=started, ended=time.monotonic(), count=len(reply.secrets))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    in_flight = threading.Thread(target=long_call)
    in_flight.start()
    assert sending.wait(10)
    time.sleep(0.05)
    terminated = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    in_flight.join(timeout=60)
    time.sleep(1.5)  # keep calling a server that has gone: those calls must be refused
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    # The long call was in flight when SIGTERM arrived, and it completed with every value.
    assert big["count"] == 1500 and float(big["ended"]) > terminated  # type: ignore[arg-type]
    # Calls finished before the signal all succeeded; calls started well after it were refused.
    assert all(outcome == "ok" for _, ended, outcome in calls if ended < terminated)
    late = [outcome for started, _, outcome in calls if started > terminated + 1.0]
    assert late and "ok" not in late
    assert any('"message": "stopped"' in line for line in server.log_lines)


# ---- the CLI against the service ----------------------------------------------------------------


def test_cli_verbs_work_remotely_with_the_same_exit_codes(server: Server) -> None:
    assert server.cli("auth", "get", "auth/DB_PASSWORD").stdout == b"auth-db-pass\n"
    assert server.cli("auth", "list").stdout.decode().split() == ["auth/DB_PASSWORD", "auth/JWT_KEY"]
    denied = server.cli("auth", "get", "market-connector/BINANCE_API_KEY")
    assert denied.returncode == 5 and denied.stderr.decode().count("\n") == 1
    assert b"Traceback" not in denied.stderr
    assert (
        server.cli("ops", "store", "auth/NEW", input=b"from the cli").stdout == b"stored auth/NEW version 1\n"
    )
    assert server.cli("ops", "get", "auth/NEW").stdout == b"from the cli\n"
    assert server.cli("ops", "metadata", "auth/NEW", "--tag", "team=db").returncode == 0
    assert server.cli("auth", "list", "--tag", "team=db").stdout == b"auth/NEW\n"  # ListSecrets has tags
    assert server.cli("auth", "list", "--tag", "team=web").stdout == b""
    assert server.cli("ops", "get", "auth/MISSING").returncode == 3
    short = server.cli("ops", "get", "DB_PASSWORD")  # the full names ending in it, from ListSecrets
    assert short.returncode == 3 and b"did you mean auth/DB_PASSWORD?" in short.stderr, short.stderr
    history = json.loads(server.cli("ops", "history", "auth/DB_PASSWORD", "--json").stdout)
    assert [v["version"] for v in history["versions"]] == [1]
    assert server.cli("ops", "delete", "auth/NEW").returncode == 0
    assert server.cli("ops", "get", "auth/NEW").returncode == 3
    conflict = server.cli("ops", "store", "auth/DB_PASSWORD", "--expect-version", "9", input=b"x")
    assert conflict.returncode == 7


def test_rollback_works_remotely_with_read_and_write(server: Server) -> None:
    for value in (b"good", b"bad"):
        assert server.cli("ops", "store", "rw/ROLLED", input=value).returncode == 0
        assert server.cli("ops", "store", "auth/ROLLED", input=value).returncode == 0
    denied = server.cli("auth", "rollback", "auth/ROLLED")  # auth may read and list, not write
    assert denied.returncode == 5, denied.stderr
    assert server.cli("ops", "get", "auth/ROLLED").stdout == b"bad\n"
    rolled = server.cli("writer", "rollback", "rw/ROLLED")  # read and write, and no list
    assert rolled.returncode == 0, rolled.stderr
    assert server.cli("ops", "get", "rw/ROLLED").stdout == b"good\n"
    history = json.loads(server.cli("ops", "history", "rw/ROLLED", "--json").stdout)
    assert history["labels"] == {"current": 3, "previous": 2}


def test_edit_works_remotely_with_read_and_write(server: Server) -> None:
    """`edit --server`: the read and the expecting write go through the service as the caller;
    one allowed to read but not write is denied at the write and nothing changes."""
    assert server.cli("ops", "store", "rw/EDITED", input=b"before").returncode == 0
    sed = {"EDITOR": "sed -i s/before/after/"}
    edited = server.cli("writer", "edit", "rw/EDITED", env=sed)
    assert edited.returncode == 0 and b"stored rw/EDITED version 2" in edited.stderr, edited.stderr
    assert server.cli("ops", "get", "rw/EDITED").stdout == b"after\n"
    denied = server.cli("auth", "edit", "auth/DB_PASSWORD", env={"EDITOR": "sed -i s/a/b/"})
    assert denied.returncode == 5 and denied.stderr.decode().count("\n") == 1, denied.stderr
    assert server.cli("ops", "get", "auth/DB_PASSWORD").stdout == b"auth-db-pass\n"
    # A new name, by a role without `list`: created, and no request of it is denied.
    created = server.cli("writer", "edit", "rw/BRAND_NEW", env={"EDITOR": "sed -i s/^$/new/"})
    assert created.returncode == 0, created.stderr
    assert not [
        r for r in server.audit_records() if r.get("name") == "rw/BRAND_NEW" and r["decision"] == "deny"
    ]
    # A deleted one is refused as deleted (the write says so), not as changed meanwhile.
    assert server.cli("ops", "delete", "rw/BRAND_NEW").returncode == 0
    deleted = server.cli("writer", "edit", "rw/BRAND_NEW", env={"EDITOR": "sed -i s/^$/again/"})
    assert deleted.returncode == 7 and b"is deleted" in deleted.stderr, deleted.stderr


def test_store_of_one_field_works_remotely_with_read_and_write(server: Server) -> None:
    """`store NAME#FIELD --server`: a read and a write that expects the version read; write
    without read (drop/*), or read without write (auth's auth/*), is denied and changes nothing."""
    value = b'{"username": "app", "password": "old-SEEKRIT"}'
    for name in ("rw/DB_CREDS", "drop/DB_CREDS", "auth/DB_CREDS"):
        assert server.cli("ops", "store", name, input=value).returncode == 0
    for identity, name in (("writer", "drop/DB_CREDS"), ("auth", "auth/DB_CREDS")):
        denied = server.cli(identity, "store", f"{name}#password", input=b"new-SEEKRIT")
        assert denied.returncode == 5 and denied.stderr.decode().count("\n") == 1, denied.stderr
        assert server.cli("ops", "get", name).stdout == value + b"\n"
    written = server.cli("writer", "store", "rw/DB_CREDS#password", input=b"new-SEEKRIT")
    assert written.returncode == 0, written.stderr
    assert written.stdout == b"stored rw/DB_CREDS version 2\n"
    assert json.loads(server.cli("ops", "get", "rw/DB_CREDS").stdout) == {
        "username": "app",
        "password": "new-SEEKRIT",
    }
    stale = server.cli("writer", "store", "rw/DB_CREDS#password", "--expect-version", "1", input=b"x")
    assert stale.returncode == 7 and b"SEEKRIT" not in stale.stderr


def test_mv_works_remotely_and_needs_list_to_read_the_description(server: Server) -> None:
    assert server.cli("ops", "store", "rw/OLD", "--description", "d", input=b"SEEKRIT-1").returncode == 0
    denied = server.cli("writer", "mv", "rw/OLD", "rw/NEW")  # read and write on rw/*, no list
    assert denied.returncode == 5 and denied.stderr.decode().count("\n") == 1, denied.stderr
    assert server.cli("ops", "get", "rw/NEW").returncode == 3  # nothing written
    moved = server.cli("ops", "mv", "rw/OLD", "auth/NEW")
    assert moved.returncode == 0, moved.stderr
    assert server.cli("auth", "get", "auth/NEW").stdout == b"SEEKRIT-1\n"
    assert server.cli("ops", "get", "rw/OLD").returncode == 3
    assert b"SEEKRIT" not in moved.stderr + moved.stdout


def test_mv_by_one_who_may_not_delete_old_writes_nothing(server: Server) -> None:
    """mv deletes OLD before it writes NEW: a caller allowed read, write and list but not delete
    is refused at the delete, before NEW is written; the one-line error says so."""
    assert server.cli("ops", "store", "load/OLD", input=b"SEEKRIT-1").returncode == 0
    moved = server.cli("writer", "mv", "load/OLD", "load/NEW")
    assert moved.returncode == 5, moved.stderr
    message = moved.stderr.decode()
    assert message.count("\n") == 1 and message.startswith("secrets-manager: error: "), message
    assert "may not delete 'load/OLD'" in message, message
    assert "nothing was renamed and load/NEW was not written" in message and "SEEKRIT" not in message, message
    assert server.cli("ops", "get", "load/NEW").returncode == 3
    assert server.cli("ops", "get", "load/OLD").stdout == b"SEEKRIT-1\n"


def cli_in_process(
    monkeypatch: pytest.MonkeyPatch,
    directory: Path,
    address: str,
    identity: str,
    *args: str,
    stdin: bytes | None = None,
) -> int:
    """The CLI in this process (so a test can patch its RemoteStore) against `address`, as
    `identity` (`stdin`, if given, its standard input); the environment set for it is undone
    afterwards."""
    import io
    import sys

    from secrets_manager.cli import run

    with monkeypatch.context() as patch:
        patch.setenv("HOME", str(directory))
        patch.setenv("SECRETS_MANAGER_ADDR", address)
        patch.setenv("SECRETS_MANAGER_CERT", str(directory / f"{identity}.pem"))
        patch.setenv("SECRETS_MANAGER_KEY", str(directory / f"{identity}-key.pem"))
        patch.setenv("SECRETS_MANAGER_CA", str(directory / "ca.pem"))
        if stdin is not None:
            patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        return run(list(args))


def _mv_with_another_client_before_its_delete(
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    another_client: Callable[[str], object],
    *args: str,
) -> int:
    """mv through the service (in this process), `another_client(OLD)` landing between mv's read
    (and any check it could make) and its delete."""
    delete = RemoteStore.delete

    def delete_after_another_client(self: RemoteStore, name: str, **kwargs: object) -> None:
        another_client(name)
        delete(self, name, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RemoteStore, "delete", delete_after_another_client)
    try:
        return cli_in_process(monkeypatch, server.dir, server.address, "ops", "mv", *args)
    finally:
        monkeypatch.undo()


def test_mv_through_the_service_leaves_old_when_a_store_lands_just_before_its_delete(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another client's store of OLD lands between mv's read (and any check it could make) and
    its delete: DeleteSecretIfUnchanged is refused (ABORTED) by the service's store, OLD keeps the
    newer value, NEW is not written, and mv's one line (exit 7) says so. The service audits it."""
    assert server.cli("ops", "store", "load/OLD", input=b"SEEKRIT-1").returncode == 0
    capsys.readouterr()
    code = _mv_with_another_client_before_its_delete(
        server,
        monkeypatch,
        lambda name: server.cli("ops", "store", name, input=b"SEEKRIT-2").returncode,
        "load/OLD",
        "load/NEW",
    )
    assert code == 7
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("secrets-manager: error: "), message
    assert "load/OLD changed since mv read it (now version 2, not 1)" in message, message
    assert "nothing was renamed and load/NEW was not written" in message and "SEEKRIT" not in message
    assert server.cli("ops", "get", "load/OLD").stdout == b"SEEKRIT-2\n"
    assert server.cli("ops", "get", "load/NEW").returncode == 3
    refused = [r for r in server.audit_records() if r["operation"] == "delete" and r["outcome"] != "pending"]
    assert [(r["name"], r["version"], r["outcome"]) for r in refused] == [("load/OLD", 1, "conflict")]


def test_mv_through_the_service_hides_no_rotation_staged_just_before_its_delete(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another client stages a rotation of OLD between mv's check for one and its delete: OLD's
    current version is unchanged, but the delete (DeleteSecretIfUnchanged) is refused while a
    version is pending, so the staged value is not deleted with OLD; NEW is as it was."""
    assert server.cli("ops", "store", "load/OLD", input=b"SEEKRIT-1").returncode == 0
    assert server.cli("ops", "store", "load/NEW", input=b"SEEKRIT-N").returncode == 0
    stage = pb.StageSecretVersionRequest(name="load/OLD", value=b"SEEKRIT-2")
    capsys.readouterr()
    code = _mv_with_another_client_before_its_delete(
        server,
        monkeypatch,
        lambda name: server.stub("ops").StageSecretVersion(stage, timeout=10),
        "load/OLD",
        "load/NEW",
        "--force",
    )
    assert code == 7
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("secrets-manager: error: "), message
    assert "load/OLD changed since mv read it (a rotation was staged: version 2 is pending" in message
    assert "nothing was renamed and load/NEW was not written" in message and "SEEKRIT" not in message
    assert server.cli("ops", "get", "load/OLD", "--label", "pending").stdout == b"SEEKRIT-2\n"
    assert server.cli("ops", "get", "load/NEW").stdout == b"SEEKRIT-N\n"
    shown = json.loads(server.cli("ops", "metadata", "load/NEW", "--json").stdout)
    assert [v["version"] for v in shown["versions"]] == [1]
    refused = [r for r in server.audit_records() if r["operation"] == "delete" and r["outcome"] != "pending"]
    assert [(r["name"], r["version"], r["outcome"]) for r in refused] == [("load/OLD", 1, "conflict")]


def test_delete_secret_if_unchanged_is_refused_while_a_rotation_is_pending(server: Server) -> None:
    ops = server.stub("ops")
    ops.PutSecret(pb.PutSecretRequest(name="load/CAS", value=b"SEEKRIT-1"), timeout=10)  # version 1
    ops.StageSecretVersion(pb.StageSecretVersionRequest(name="load/CAS", value=b"SEEKRIT-2"), timeout=10)
    for expect, code in ((1, grpc.StatusCode.ABORTED), (2, grpc.StatusCode.ABORTED)):
        request = pb.DeleteSecretIfUnchangedRequest(name="load/CAS", expect_version=expect)
        assert code_of(lambda request=request: ops.DeleteSecretIfUnchanged(request, timeout=10)) == code
    zero = pb.DeleteSecretIfUnchangedRequest(name="load/CAS", expect_version=0)
    assert code_of(lambda: ops.DeleteSecretIfUnchanged(zero, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    writer = pb.DeleteSecretIfUnchangedRequest(name="load/CAS", expect_version=1)
    denied = code_of(lambda: server.stub("writer").DeleteSecretIfUnchanged(writer, timeout=10))
    assert denied == grpc.StatusCode.PERMISSION_DENIED  # it needs delete, as DeleteSecret
    assert server.cli("ops", "get", "load/CAS").stdout == b"SEEKRIT-1\n"  # nothing deleted
    ops.DiscardPendingVersion(pb.DiscardPendingVersionRequest(name="load/CAS"), timeout=10)
    ops.DeleteSecretIfUnchanged(
        pb.DeleteSecretIfUnchangedRequest(name="load/CAS", expect_version=1), timeout=10
    )
    assert server.cli("ops", "get", "load/CAS").returncode == 3


def test_delete_secret_if_current_deletes_only_the_version_read(server: Server) -> None:
    ops = server.stub("ops")
    ops.PutSecret(pb.PutSecretRequest(name="load/CAS", value=b"SEEKRIT-2"), timeout=10)  # version 1
    ops.PutSecret(pb.PutSecretRequest(name="load/CAS", value=b"SEEKRIT-3"), timeout=10)  # version 2
    for expect, code in ((1, grpc.StatusCode.ABORTED), (0, grpc.StatusCode.INVALID_ARGUMENT)):
        request = pb.DeleteSecretIfCurrentRequest(name="load/CAS", expect_version=expect)
        assert code_of(lambda request=request: ops.DeleteSecretIfCurrent(request, timeout=10)) == code
    writer = pb.DeleteSecretIfCurrentRequest(name="load/CAS", expect_version=2)
    denied = code_of(lambda: server.stub("writer").DeleteSecretIfCurrent(writer, timeout=10))
    assert denied == grpc.StatusCode.PERMISSION_DENIED  # it needs delete, as DeleteSecret
    assert server.cli("ops", "get", "load/CAS").stdout == b"SEEKRIT-3\n"  # nothing deleted
    assert server.cli("ops", "delete", "load/CAS", "--expect-version", "1").returncode == 7
    assert server.cli("ops", "delete", "load/CAS", "--expect-version", "2").returncode == 0
    assert server.cli("ops", "get", "load/CAS").returncode == 3


def test_delete_and_undelete_need_delete_which_write_does_not_grant(server: Server) -> None:
    """writer may write rw/* but holds no delete there: DeleteSecret and UndeleteSecret are refused
    (PERMISSION_DENIED, audited as denials), and the secret is as it was each time."""
    writer, ops = server.stub("writer"), server.stub("ops")
    writer.PutSecret(pb.PutSecretRequest(name="rw/KEEP", value=b"kept-value"), timeout=10)
    delete = pb.DeleteSecretRequest(name="rw/KEEP")
    assert code_of(lambda: writer.DeleteSecret(delete, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
    last = server.audit_records()[-1]
    assert (last["operation"], last["name"], last["decision"]) == ("delete", "rw/KEEP", "deny")
    assert writer.GetSecret(pb.GetSecretRequest(name="rw/KEEP"), timeout=10).secret.value == b"kept-value"
    ops.DeleteSecret(delete, timeout=10)
    undelete = pb.UndeleteSecretRequest(name="rw/KEEP")
    assert code_of(lambda: writer.UndeleteSecret(undelete, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
    last = server.audit_records()[-1]
    assert (last["operation"], last["name"], last["decision"]) == ("undelete", "rw/KEEP", "deny")
    get = pb.GetSecretRequest(name="rw/KEEP")
    assert code_of(lambda: writer.GetSecret(get, timeout=10)) is grpc.StatusCode.NOT_FOUND


def test_a_service_from_before_conditional_deletes_is_refused_the_delete_not_asked_an_unconditional_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older `serve` would ignore an expect_version field in DeleteSecretRequest and delete
    whatever is current; DeleteSecretIfCurrent and DeleteSecretIfUnchanged are methods of their
    own, which it does not have (UNIMPLEMENTED). mv then renames nothing and says so; delete
    --expect-version deletes nothing."""
    from secrets_manager.service.server import SecretsServicer
    from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc

    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    for method in ("DeleteSecretIfCurrent", "DeleteSecretIfUnchanged"):  # the generated UNIMPLEMENTED
        monkeypatch.setattr(SecretsServicer, method, getattr(pb_grpc.SecretsServicer, method))
    try:
        with in_process_server(tmp_path, store, watch_tick=30) as (running, _stub):
            address = f"127.0.0.1:{running.port}"
            capsys.readouterr()
            cli = ("auth/JWT_KEY", "auth/MOVED")
            assert cli_in_process(monkeypatch, tmp_path, address, "ops", "mv", *cli) == 2
            message = capsys.readouterr().err
            assert message.count("\n") == 1, message
            assert "nothing was renamed and auth/MOVED was not written" in message, message
            assert "DeleteSecretIfCurrent is not supported by the service" in message, message
            code = cli_in_process(
                monkeypatch, tmp_path, address, "ops", "delete", "auth/DB_PASSWORD", "--expect-version", "1"
            )
            assert code == 2
    finally:
        store.close()
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        assert store.get("auth/JWT_KEY").value.reveal() == b"auth-jwt-key"  # not deleted
        assert store.get("auth/DB_PASSWORD").value.reveal() == b"auth-db-pass"
        with pytest.raises(NotFoundError):
            store.get("auth/MOVED")
    finally:
        store.close()


def test_mv_through_a_service_from_before_delete_if_unchanged_deletes_on_the_version_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service with DeleteSecretIfCurrent but not DeleteSecretIfUnchanged (the release before):
    mv deletes OLD on condition of the version it read, as it always asked such a service, and
    warns that a rotation staged after its own check would not be seen; the move is made."""
    from secrets_manager.service.server import SecretsServicer
    from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc

    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    older = pb_grpc.SecretsServicer.DeleteSecretIfUnchanged
    monkeypatch.setattr(SecretsServicer, "DeleteSecretIfUnchanged", older)
    try:
        with in_process_server(tmp_path, store, watch_tick=30) as (running, _stub):
            address = f"127.0.0.1:{running.port}"
            capsys.readouterr()
            assert (
                cli_in_process(monkeypatch, tmp_path, address, "ops", "mv", "auth/JWT_KEY", "auth/MOVED") == 0
            )
            message = capsys.readouterr().err
            assert "cannot delete on condition that no rotation was staged" in message, message
            assert "auth/JWT_KEY was deleted on condition that version 1 was still current" in message
            assert "moved auth/JWT_KEY (version 1) to auth/MOVED version 1" in message, message
    finally:
        store.close()
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        assert store.get("auth/MOVED").value.reveal() == b"auth-jwt-key"
        assert store.describe("auth/JWT_KEY").deleted is not None
    finally:
        store.close()


def test_the_cli_takes_several_addresses_like_the_sdk_and_uses_the_first_that_answers(
    server: Server,
) -> None:
    dead = free_address()  # nothing listens there
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(server.dir),
        "SECRETS_MANAGER_CERT": str(server.dir / "ops.pem"),
        "SECRETS_MANAGER_KEY": str(server.dir / "ops-key.pem"),
        "SECRETS_MANAGER_CA": str(server.dir / "ca.pem"),
    }

    def cli(addresses: str, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(SCRIPT), *args],
            input=input,
            capture_output=True,
            env={**env, "SECRETS_MANAGER_ADDR": addresses},
            timeout=60,
        )

    both = f"{dead}, {server.address}"
    assert cli(both, "store", "auth/FAILOVER", input=b"once").returncode == 0
    assert cli(both, "get", "auth/FAILOVER").stdout == b"once\n"
    history = json.loads(cli(both, "history", "auth/FAILOVER", "--json").stdout)
    assert [v["version"] for v in history["versions"]] == [1]  # written once, to the one that answered
    nobody = cli(f"{dead},{free_address()}", "get", "auth/FAILOVER")
    assert nobody.returncode == 1 and b"no secrets-manager service is serving at" in nobody.stderr
    assert nobody.stderr.count(b"Connection refused") == 2, nobody.stderr  # why, for each
    malformed = cli(f"{server.address},nohost", "get", "auth/FAILOVER")
    assert malformed.returncode == 2
    assert b"--server / SECRETS_MANAGER_ADDR: 'nohost' is not host:port" in malformed.stderr


def test_with_several_addresses_a_change_moves_to_another_replica_only_if_it_was_never_sent(
    tmp_path: Path,
) -> None:
    """The CLI's store for `--server A,B` (import, purge, mv … write through it for long): once A
    is gone, a change that found no connection there (never sent) is made through B; one whose
    answer was lost after A committed it is not sent again (it would be made twice). Before, the
    first failed the command with B healthy beside it."""
    from secrets_manager.errors import ConnectionClosedError, OutcomeUnknownError
    from test_sdk import AnswerDroppingProxy

    make_pki(tmp_path, ("writer",))
    make_store(tmp_path)
    first = start_server(tmp_path, "first")
    second = start_server(tmp_path, "second")
    head = SqliteStorage(tmp_path / "store.db").change_head()
    proxy = AnswerDroppingProxy(
        first.address, lambda: SqliteStorage(tmp_path / "store.db").change_head() > head
    )
    files = tls_files(tmp_path, "writer")
    dropping = RemoteStore(proxy.address, files, timeout=2, replicas=(proxy.address, second.address))
    store = RemoteStore(first.address, files, replicas=(first.address, second.address))
    try:
        assert dropping.describe("auth/JWT_KEY").current_version == 1  # connected through the proxy
        proxy.armed.set()
        with pytest.raises((ConnectionClosedError, OutcomeUnknownError)):  # the answer lost, or late
            dropping.put("auth/JWT_KEY", b"put-once-SEEKRIT")
        assert proxy.dropped.is_set() and dropping.address == proxy.address  # not sent on
        assert store.describe("auth/JWT_KEY").current_version == 2  # made once, by A
        first.kill()
        assert store.put("auth/JWT_KEY", b"through-b-SEEKRIT").version == 3
        assert store.address == second.address
        assert store.get("auth/JWT_KEY").value.reveal() == b"through-b-SEEKRIT"
    finally:
        dropping.close()
        store.close()
        proxy.close()
        first.kill()
        second.stop()


def test_with_several_addresses_a_move_to_another_replica_uses_certificate_files_renewed_meanwhile(
    tmp_path: Path,
) -> None:
    """A store held open for long (`run --restart-on-change`) whose certificate files were renewed
    on disk since it connected (a short-lived SVID, `pki issue --force`): a read that A no longer
    answers moved to B with the files read at the start, which by then may have expired, so B
    refused it while the renewed files sat on disk. The move now takes the renewed files. Here the
    renewal changes the identity (writer, then ops), so which files reached B shows in what it
    lets the client read."""
    from secrets_manager.client import TlsFiles
    from service_fixtures import SEED as SERVED

    make_pki(tmp_path, ("writer", "ops"))
    make_store(tmp_path)  # service_fixtures' secrets and policy: writer may read auth/**, ops all
    first = start_server(tmp_path, "first")
    second = start_server(tmp_path, "second")
    client = tmp_path / "client"
    client.mkdir()
    for source, target in (("writer.pem", "cert.pem"), ("writer-key.pem", "key.pem"), ("ca.pem", "ca.pem")):
        (client / target).write_bytes((tmp_path / source).read_bytes())
    files = TlsFiles(cert=client / "cert.pem", key=client / "key.pem", ca=client / "ca.pem")
    store = RemoteStore(first.address, files, replicas=(first.address, second.address))
    try:
        assert store.get("auth/JWT_KEY").version == 1  # as writer, through A
        for source, target in (("ops.pem", "cert.pem"), ("ops-key.pem", "key.pem")):  # renewed whole
            (client / f"{target}.new").write_bytes((tmp_path / source).read_bytes())
            (client / f"{target}.new").rename(client / target)
        first.kill()
        secret = store.get("market-connector/BINANCE_API_KEY")  # ops may; writer may not
        assert store.address == second.address
        assert secret.value.reveal() == SERVED["market-connector/BINANCE_API_KEY"]
    finally:
        store.close()
        first.kill()
        second.stop()


def test_a_cli_change_whose_connection_ended_before_its_answer_says_it_may_have_been_made(
    server: Server,
) -> None:
    """`store --server A,B` whose request A carried out before the connection ended (the client
    sees "Socket closed"): the command said only that the service may have refused the client
    certificate, so the operator stored again, and the secret had two versions of one value. It is
    not sent to B (made twice), and the one line now says the change may have been made."""
    from test_sdk import AnswerDroppingProxy

    class EndsTheConnection(AnswerDroppingProxy):  # the client sees the end at once
        def _end(self, sock: socket.socket) -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    from tcp_proxy import TcpProxy, Verdict

    class HeldUntilTheFirstHasEnded(TcpProxy):
        """B answers nothing until A's connection has ended: the CLI chooses among A, B by
        health checks (first_serving), and A's, through a proxy in this process, can take longer
        than its 0.25 s head start on a loaded machine, so B's check started and B was chosen
        (the put then went to B alone, never through A). Held, B cannot win; a put sent to B
        after A's end (made twice) would still reach it."""

        def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
            proxy.dropped.wait(60)
            return Verdict.PASS

    second = start_server(server.dir, "second")
    head = SqliteStorage(server.dir / "store.db").change_head()
    proxy = EndsTheConnection(
        server.address, lambda: SqliteStorage(server.dir / "store.db").change_head() > head
    )
    held = HeldUntilTheFirstHasEnded("127.0.0.1", second.port)
    try:
        proxy.armed.set()
        both = {"SECRETS_MANAGER_ADDR": f"{proxy.address},{held.address}"}
        stored = server.cli("ops", "store", "auth/ONCE", input=b"once-SEEKRIT", env=both)
        assert proxy.dropped.is_set()
        said = stored.stderr.decode()
        assert stored.returncode == 1 and said.count("\n") == 1, said
        assert f"the connection to {proxy.address} ended during PutSecret" in said
        assert "the change may have been made: check (history, describe) before trying again" in said
        assert "SEEKRIT" not in said
        history = json.loads(server.cli("ops", "history", "auth/ONCE", "--json").stdout)
        assert [v["version"] for v in history["versions"]] == [1]  # made once, by A; not sent to B
    finally:
        proxy.close()
        held.close()
        second.stop()


def test_a_read_whose_connection_ended_mid_call_names_the_replica(server: Server) -> None:
    """A read on a connection that ended under it (the replica killed as the request went out)
    failed with "Stream removed (Socket closed) (if the service is up, …)" and no address, unlike
    every other connection error: with several replicas (`run`, the SDK, --server A,B) nobody could
    tell which one it was. CI: test_run_restart's read through two killed replicas, where the kill
    raced the call, expected the second's address."""
    from secrets_manager.errors import ConnectionClosedError
    from tcp_proxy import TcpProxy, Verdict

    class EndsTheConnection(TcpProxy):  # once cutting, a request ends its connection, at once
        cutting = False
        client_sent_at = time.monotonic()

        def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
            if from_client:
                self.client_sent_at = time.monotonic()
            return Verdict.CUT if self.cutting and from_client else Verdict.PASS

        def _end(self, sock: socket.socket) -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    proxy = EndsTheConnection("127.0.0.1", server.port)
    store = RemoteStore(proxy.address, tls_files(server.dir, "auth"))
    try:
        assert store.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]  # connected
        # The first call's last frames (a window update, a ping's ack) may still be on their way:
        # cut by them, the connection would end before the read went out, and gRPC would send the
        # read on a new connection, whose TLS handshake is cut instead (HandshakeFailedError, once
        # in CI at a load of 20-40 on two cores). Cut once the client has been quiet a while.
        assert eventually(lambda: time.monotonic() - proxy.client_sent_at > 0.3, timeout=10)
        proxy.cutting = True
        with pytest.raises(ConnectionClosedError) as ended:
            store.get("auth/JWT_KEY")
    finally:
        store.close()
        proxy.close()
    said = str(ended.value)
    assert said.startswith(f"{proxy.address}: ") and "\n" not in said, said
    assert "it may have refused the client certificate" in said


def test_a_client_trusting_another_ca_gets_one_line_and_no_grpc_log(server: Server, tmp_path: Path) -> None:
    """gRPC's C core logged the failed handshake ('I1130 … ssl_transport_security.cc …') on stderr
    above our one-line error; a URL as the address failed in gRPC's resolver."""
    other = tmp_path / "another-ca"  # tmp_path is the server's own directory
    made = run_script({"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, "pki", "init", "--dir", str(other))
    assert made.returncode == 0, made.stderr
    listed = server.cli("ops", "list", env={"SECRETS_MANAGER_CA": str(other / "ca.pem")})
    assert listed.returncode == 1
    assert listed.stderr.decode().splitlines() == [
        f"secrets-manager: error: TLS handshake with {server.address} failed: check the certificate "
        f"files (is the server's certificate signed by the CA in {other / 'ca.pem'} and issued for "
        "this address?)"
    ]
    url = server.cli("ops", "list", env={"SECRETS_MANAGER_ADDR": f"https://{server.address}"})
    assert url.returncode == 2 and b"is a URL; give host:port without 'https://'" in url.stderr
    # The commands that hold a watch stream imported gRPC before its log level was set: the
    # core's line came first. Fails on the old code.
    template = tmp_path / "app.conf.tpl"
    template.write_text("x={{ sm://auth/DB_PASSWORD }}\n")
    for held in (
        ["watch", "auth/"],
        ["run", "--service", "auth", "--restart-on-change", "--", "true"],
        ["inject", "-i", str(template), "-o", str(tmp_path / "app.conf"), "--watch"],
    ):
        refused = server.cli("ops", *held, env={"SECRETS_MANAGER_CA": str(other / "ca.pem")})
        assert refused.returncode == 1
        said = refused.stderr.decode().splitlines()
        assert len(said) == 1 and said[0].startswith("secrets-manager: error: TLS handshake with"), said


def test_with_several_addresses_a_certificate_every_replica_refuses_is_said_not_try_again(
    server: Server, tmp_path: Path
) -> None:
    """`--server A,B` with a CA the servers' certificates are not from (or a client certificate
    they do not trust): with one address the handshake is named and what to check; with two the
    command said only "no secrets-manager service answered at A, B; try again", as if both were
    down, and trying again could never help."""
    second = start_server(server.dir, "second")
    other = tmp_path / "another-ca"
    try:
        made = run_script(
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, "pki", "init", "--dir", str(other)
        )
        assert made.returncode == 0, made.stderr
        both = f"{server.address},{second.address}"
        listed = server.cli(
            "ops", "list", env={"SECRETS_MANAGER_ADDR": both, "SECRETS_MANAGER_CA": str(other / "ca.pem")}
        )
        assert listed.returncode == 1
        assert listed.stderr.decode().splitlines() == [
            f"secrets-manager: error: TLS handshake with {server.address} failed: check the certificate "
            f"files (is the server's certificate signed by the CA in {other / 'ca.pem'} and issued for "
            f"this address?) (likewise at {second.address})"
        ]
        dead = free_address()  # one refused, one down: each is named with why
        mixed = server.cli(
            "ops",
            "list",
            env={
                "SECRETS_MANAGER_ADDR": f"{server.address},{dead}",
                "SECRETS_MANAGER_CA": str(other / "ca.pem"),
            },
        )
        assert mixed.returncode == 1 and mixed.stderr.decode().count("\n") == 1, mixed.stderr
        said = mixed.stderr.decode()
        assert f"no secrets-manager service is serving at {server.address}, {dead}" in said
        assert f"TLS handshake with {server.address} failed" in said and f"{dead}: failed to connect" in said
    finally:
        second.stop()


@pytest.mark.parametrize(
    "command", [["audit", "verify"], ["destroy", "auth/X", "--all"], ["passwd"], ["init"]]
)
def test_local_only_commands_refuse_a_server(server: Server, command: list[str]) -> None:
    result = server.cli("ops", *command)
    assert result.returncode == 2 and b"local store only" in result.stderr


def test_cli_store_needs_write_alone(server: Server) -> None:
    """A write-only grant (a drop box) is enough for `store --server`: the client gets the new
    version's details from PutSecret, not from a DescribeSecret that would need `list` — which
    used to report a refusal (exit 5) for a write that had happened."""
    proc = server.cli("writer", "store", "drop/TOKEN", "--json", input=b"dropped-value")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"name": "drop/TOKEN", "version": 1, "expires": None}
    assert server.cli("writer", "get", "drop/TOKEN").returncode == 5  # and no more than write
    reply = server.stub("ops").GetSecret(pb.GetSecretRequest(name="drop/TOKEN"), timeout=10)
    assert (reply.secret.value, reply.secret.version) == (b"dropped-value", 1)
    put = server.stub("writer").PutSecret(pb.PutSecretRequest(name="drop/TOKEN", value=b"v2"), timeout=10)
    described = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name="drop/TOKEN"), timeout=10)
    second = next(v for v in described.metadata.versions if v.version == 2)
    assert (put.version, put.created, put.created_by) == (2, second.created, second.created_by)
    assert put.created_by == f"spiffe://{TD}/writer"  # the caller, not the user the service runs as


def test_a_write_by_another_process_is_served_by_the_very_next_read(server: Server) -> None:
    """The service answers reads from its cache (store/read_cache.py) only while the store's change
    head stays put: a CLI writing the same file directly is seen by the next GetSecret — no TTL,
    no window — and so are its delete and undelete."""
    stub = server.stub("auth")
    request = pb.GetSecretRequest(name="auth/JWT_KEY")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(server.dir), "MASTER_PASSWORD": PASSWORD}

    def local(*args: str, data: bytes = b"") -> None:
        done = subprocess.run(
            [str(SCRIPT), "--store", str(server.dir / "store.db"), *args],
            input=data,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

    for _ in range(3):  # cached now
        assert stub.GetSecret(request, timeout=10).secret.value == b"auth-jwt-key"
    for version in range(2, 6):
        local("store", "auth/JWT_KEY", data=f"rotated-{version}".encode())
        reply = stub.GetSecret(request, timeout=10)
        assert (reply.secret.value, reply.secret.version) == (f"rotated-{version}".encode(), version)
        assert stub.GetSecret(request, timeout=10).secret.version == version  # and then from the cache
    previous = stub.GetSecret(pb.GetSecretRequest(name="auth/JWT_KEY", label="previous"), timeout=10)
    assert (previous.secret.value, previous.secret.version) == (b"rotated-4", 4)
    local("delete", "auth/JWT_KEY")
    assert code_of(lambda: stub.GetSecret(request, timeout=10)) is grpc.StatusCode.NOT_FOUND
    local("undelete", "auth/JWT_KEY")
    assert stub.GetSecret(request, timeout=10).secret.value == b"rotated-5"


def test_oversized_or_control_character_metadata_is_invalid_argument_and_list_still_works(
    server: Server,
) -> None:
    """A client with only `write` once filled the store with 1 MB descriptions (and 10,000 tags),
    and ListSecrets then failed for every client (its answer over gRPC's 4 MB limit)."""
    writer, ops = server.stub("writer"), server.stub("ops")
    huge = "evil-" + "x" * 1_000_000
    requests = [pb.PutSecretRequest(name=f"drop/BIG{i}", value=b"v", description=huge) for i in range(5)]
    requests += [
        pb.PutSecretRequest(
            name="drop/TAGS", value=b"v", tags={f"t{i}": "v" for i in range(10_000)}, replace_tags=True
        ),
        pb.PutSecretRequest(name="drop/ESC", value=b"v", description="evil\x1b]0;TITLE\x07\nforged"),
        pb.PutSecretRequest(name="drop/ESC", value=b"v", tags={"k": "evil\x1b[2J"}, replace_tags=True),
    ]
    for request in requests:
        with pytest.raises(grpc.RpcError) as caught:
            writer.PutSecret(request, timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert request.name in details and "evil" not in details and "\n" not in details
        assert server.audit_records()[-1]["outcome"] == "invalid_input"
    listed = ops.ListSecrets(pb.ListSecretsRequest(), timeout=10).secrets
    assert [m.name for m in listed] == sorted(SEED)  # nothing was written
    limit = pb.PutSecretRequest(name="drop/OK", value=b"v", description="d" * 2048)
    assert writer.PutSecret(limit, timeout=10).version == 1
    assert [
        m.description for m in ops.ListSecrets(pb.ListSecretsRequest(prefix="drop/"), timeout=10).secrets
    ] == ["d" * 2048]


# ---- paging: answers under gRPC's message limit -----------------------------------------------------


def test_batch_get_answers_in_pages_under_grpcs_message_limit(server: Server) -> None:
    """One answer used to hold every secret, and gRPC refuses messages over 4 MiB: a caller with
    many large secrets (here 80 of 60 kB) got nothing at all, not even through the SDK.

    Unpaged (page_size 0, as a client from before paging asks), such an answer reached the client
    as RESOURCE_EXHAUSTED "Received message larger than max" with no hint, and the audit log said
    it had read every value it never received; now it is INVALID_ARGUMENT saying to set page_size,
    audited as one refused batch_get and no get."""
    ops = server.stub("ops")
    big = {f"bulk/K{i:03d}": bytes([i]) * 60_000 for i in range(80)}
    for name, value in big.items():
        ops.PutSecret(pb.PutSecretRequest(name=name, value=value), timeout=10)
    for unpaged in (pb.BatchGetSecretsRequest(prefix="bulk/"), pb.BatchGetSecretsRequest(names=sorted(big))):
        before = len(server.audit_records())
        with pytest.raises(grpc.RpcError) as caught:
            ops.BatchGetSecrets(unpaged, timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "set page_size" in (caught.value.details() or "")
        records = server.audit_records()[before:]
        assert [(r["operation"], r["outcome"], r["decision"]) for r in records] == [
            ("batch_get", "invalid_input", "allow")
        ]
        assert not records[0].get("value_hmac")
    fitting = ops.BatchGetSecrets(pb.BatchGetSecretsRequest(names=sorted(big)[:60]), timeout=30)
    assert len(fitting.secrets) == 60 and not fitting.next_page_token  # under 4 MiB: one answer
    request = pb.BatchGetSecretsRequest(prefix="bulk/", page_size=100)
    pages: list[list[str]] = []
    while True:
        response = ops.BatchGetSecrets(request, timeout=30)
        assert response.ByteSize() < 4 * 1024 * 1024
        pages.append([s.name for s in response.secrets])
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    assert len(pages) >= 3 and [name for page in pages for name in page] == sorted(big)
    remote = RemoteStore(server.address, tls_files(server.dir, "ops"))
    try:
        assert {s.name: s.value.reveal() for s in remote.get_many(prefix="bulk/")} == big
        wanted = sorted(big, reverse=True)  # named: paged by position, in the order asked
        assert [s.name for s in remote.get_many(wanted)] == wanted
    finally:
        remote.close()
    reads = [r["name"] for r in server.audit_records() if r["operation"] == "get"]
    # each page audits what it returned, once: three paged reads, and the unpaged answer that
    # fitted; the refused unpaged ones none (they used to add one each to every name)
    assert all(reads.count(name) == 3 + (name in sorted(big)[:60]) for name in big)


def test_an_unpaged_list_over_grpcs_message_limit_says_to_page(tmp_path: Path) -> None:
    """ListSecrets answers metadata only, so it takes many more secrets to pass 4 MiB: here 200
    with the most tags and the longest description (about 22 kB each), written into the store
    before the service starts. Unpaged, the client used to get RESOURCE_EXHAUSTED with no hint."""
    make_pki(tmp_path)
    path = make_store(tmp_path, SEED, POLICY)
    tags = {f"k{j:02d}" + "K" * 125: "v" * 256 for j in range(50)}
    store = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        for i in range(200):
            store.put(f"meta/M{i:03d}", b"v", description="d" * 2048, tags=tags)
    finally:
        store.close()
    server = start_server(tmp_path)
    try:
        ops = server.stub("ops")
        with pytest.raises(grpc.RpcError) as caught:
            ops.ListSecrets(pb.ListSecretsRequest(prefix="meta/"), timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "set page_size" in (caught.value.details() or "")
        assert server.audit_records()[-1]["outcome"] == "invalid_input"
        few = ops.ListSecrets(pb.ListSecretsRequest(prefix="meta/M00"), timeout=30)
        assert len(few.secrets) == 10 and not few.next_page_token  # unpaged, under 4 MiB: one answer
        request = pb.ListSecretsRequest(prefix="meta/", page_size=1000)
        names: list[str] = []
        while True:
            response = ops.ListSecrets(request, timeout=30)
            assert response.ByteSize() < 4 * 1024 * 1024
            names += [m.name for m in response.secrets]
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        assert names == [f"meta/M{i:03d}" for i in range(200)]
        remote = RemoteStore(server.address, tls_files(server.dir, "ops"))
        try:
            assert len(remote.list("meta/")) == 200
        finally:
            remote.close()
    finally:
        server.stop()


def test_list_answers_in_pages_filtered_by_policy_and_refuses_a_forged_token(server: Server) -> None:
    ops = server.stub("ops")
    for i in range(150):
        ops.PutSecret(pb.PutSecretRequest(name=f"auth/M{i:03d}", value=b"v"), timeout=10)
        ops.PutSecret(pb.PutSecretRequest(name=f"other/M{i:03d}", value=b"v"), timeout=10)
    first = ops.ListSecrets(pb.ListSecretsRequest(prefix="auth/", page_size=100), timeout=10)
    assert len(first.secrets) == 100 and first.next_page_token
    second = ops.ListSecrets(
        pb.ListSecretsRequest(prefix="auth/", page_size=100, page_token=first.next_page_token), timeout=10
    )
    names = [m.name for m in [*first.secrets, *second.secrets]]
    assert not second.next_page_token and names == sorted(names) and len(names) == 152
    auth = RemoteStore(server.address, tls_files(server.dir, "auth"))
    try:
        assert [m.name for m in auth.list()] == names  # other/ is filtered out, over two pages
    finally:
        auth.close()
    for forged in ("at:3", "after:", "after:../x", "junk"):
        with pytest.raises(grpc.RpcError) as caught:
            ops.ListSecrets(pb.ListSecretsRequest(page_size=10, page_token=forged), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (caught.value.details() or "")


def test_a_page_token_works_only_with_the_request_and_caller_it_was_issued_to(server: Server) -> None:
    """A token used to name only a place (after a name, or a position), so one sent with another
    names list, prefix or caller gave an empty or shifted page with status OK."""
    ops, auth = server.stub("ops"), server.stub("auth")
    for i in range(6):
        ops.PutSecret(pb.PutSecretRequest(name=f"auth/P{i}", value=b"v"), timeout=10)
    asked = ["auth/P4", "auth/P5", "auth/P0"]
    by_names = ops.BatchGetSecrets(pb.BatchGetSecretsRequest(names=asked, page_size=1), timeout=10)
    by_prefix = ops.ListSecrets(pb.ListSecretsRequest(prefix="auth/P", page_size=2), timeout=10)
    auths = auth.ListSecrets(pb.ListSecretsRequest(page_size=1), timeout=10)
    assert by_names.next_page_token and by_prefix.next_page_token and auths.next_page_token
    assert "auth/P5" not in by_names.next_page_token  # it holds no name the caller did not get
    same = ops.BatchGetSecrets(
        pb.BatchGetSecretsRequest(names=asked, page_size=1, page_token=by_names.next_page_token), timeout=10
    )
    assert [s.name for s in same.secrets] == ["auth/P5"]  # the same request goes on
    mismatched = [
        (ops.BatchGetSecrets, pb.BatchGetSecretsRequest(names=["auth/P1"], page_size=1), by_names),
        (ops.BatchGetSecrets, pb.BatchGetSecretsRequest(prefix="auth/", page_size=1), by_prefix),
        (ops.ListSecrets, pb.ListSecretsRequest(prefix="auth/", page_size=2), by_prefix),
        (
            ops.ListSecrets,
            pb.ListSecretsRequest(prefix="auth/P", page_size=2, include_deleted=True),
            by_prefix,
        ),
        (ops.ListSecrets, pb.ListSecretsRequest(page_size=1), auths),  # auth's token, sent by ops
    ]
    for method, request, issued in mismatched:
        request.page_token = issued.next_page_token
        with pytest.raises(grpc.RpcError) as caught:
            method(request, timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "without page_token" in (caught.value.details() or "")
        assert server.audit_records()[-1]["outcome"] == "invalid_input"


def test_a_deleted_secret_is_failed_precondition_not_a_compare_and_set_conflict(server: Server) -> None:
    """A put to a deleted secret and an undelete of a live one were ABORTED, which the proto keeps
    for compare-and-set conflicts: a client retrying its read-modify-write on ABORTED looped for
    ever. They are FAILED_PRECONDITION naming SecretStateError (exit 7 through the CLI, as before);
    a delete of a deleted secret stays NOT_FOUND (exit 3), as reads find it. Fails on the previous
    commit (ABORTED)."""
    from secrets_manager.errors import RotationStepFailed, SecretStateError
    from secrets_manager.wire import ERROR_CLASS_KEY, error_for

    ops, name = server.stub("ops"), "auth/GONE"
    ops.PutSecret(pb.PutSecretRequest(name=name, value=b"1", description="kept"), timeout=10)
    ops.DeleteSecret(pb.DeleteSecretRequest(name=name), timeout=10)
    refused = [
        lambda: ops.PutSecret(pb.PutSecretRequest(name=name, value=b"2"), timeout=10),
        lambda: ops.PutSecret(pb.PutSecretRequest(name=name, value=b"2", expect_version=0), timeout=10),
        lambda: ops.PutSecret(pb.PutSecretRequest(name=name, value=b"2", expect_version=1), timeout=10),
        lambda: ops.UpdateSecretMetadata(
            pb.UpdateSecretMetadataRequest(name=name, description="x"), timeout=10
        ),
        lambda: ops.StageSecretVersion(pb.StageSecretVersionRequest(name=name, value=b"p"), timeout=10),
    ]
    for call in refused:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
        assert (ERROR_CLASS_KEY, "SecretStateError") in tuple(caught.value.trailing_metadata())
        assert "undelete" in (caught.value.details() or "")
        error = error_for(caught.value.code(), caught.value.details(), caught.value.trailing_metadata())
        assert isinstance(error, SecretStateError) and error.exit_code == 7
    assert code_of(lambda: ops.DeleteSecret(pb.DeleteSecretRequest(name=name), timeout=10)) is (
        grpc.StatusCode.NOT_FOUND
    )
    meta = ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata
    assert (meta.current_version, meta.description, bool(meta.deleted)) == (1, "kept", True)  # untouched
    assert server.cli("ops", "store", name, input=b"3").returncode == 7
    assert server.cli("ops", "delete", name).returncode == 3
    ops.UndeleteSecret(pb.UndeleteSecretRequest(name=name), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        ops.UndeleteSecret(pb.UndeleteSecretRequest(name=name), timeout=10)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (ERROR_CLASS_KEY, "SecretStateError") in tuple(caught.value.trailing_metadata())
    again = server.cli("ops", "undelete", name)
    assert again.returncode == 7 and b"is not deleted" in again.stderr
    # A lost compare-and-set is still ABORTED; FAILED_PRECONDITION without the class is a rotation's
    # failed command (RotateSecret), as before.
    stale = pb.PutSecretRequest(name=name, value=b"4", expect_version=7)
    assert code_of(lambda: ops.PutSecret(stale, timeout=10)) is grpc.StatusCode.ABORTED
    assert type(error_for(grpc.StatusCode.FAILED_PRECONDITION, "set failed", ())) is RotationStepFailed


def test_put_with_tags_but_without_replace_tags_is_refused_and_keeps_every_tag(server: Server) -> None:
    """The proto says "tags are kept unless replace_tags is set", yet PutSecret with tags and
    replace_tags unset replaced them all. Merging instead (read, then write the union) could drop
    a tag set in between; so it is refused, nothing written. Fails on the previous commit."""
    ops, name = server.stub("ops"), "auth/TAGGED"
    tags = {"owner": "team-a", "env": "prod"}
    ops.PutSecret(pb.PutSecretRequest(name=name, value=b"1", tags=tags, replace_tags=True), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        ops.PutSecret(pb.PutSecretRequest(name=name, value=b"2", tags={"cost": "42"}), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "replace_tags" in (caught.value.details() or "")
    meta = ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata
    assert (dict(meta.tags), meta.current_version) == (tags, 1)  # nothing written
    ops.PutSecret(pb.PutSecretRequest(name=name, value=b"2"), timeout=10)  # no tags: kept
    meta = ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata
    assert (dict(meta.tags), meta.current_version) == (tags, 2)
    ops.PutSecret(pb.PutSecretRequest(name=name, value=b"3", tags={"x": "1"}, replace_tags=True), timeout=10)
    assert dict(ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata.tags) == {
        "x": "1"
    }
    ops.PutSecret(pb.PutSecretRequest(name=name, value=b"4", replace_tags=True), timeout=10)  # none: cleared
    assert dict(ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata.tags) == {}
    # The CLI (RemoteStore) sends replace_tags with its --tag: `store --tag` replaces them, as locally.
    assert server.cli("ops", "store", name, "--tag", "k=v", input=b"5").returncode == 0
    assert dict(ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata.tags) == {
        "k": "v"
    }


def test_metadata_changes_remotely_with_write_alone_and_is_watched_and_audited(server: Server) -> None:
    """`metadata NAME --tag/--untag/--description --server` is UpdateSecretMetadata: it needs
    `write` (a write-only grant is enough), writes no version, is audited under the caller, and
    watchers hear it."""
    name = "drop/TOKEN"
    assert server.cli("ops", "store", name, input=b"dropped").returncode == 0
    stream = server.stub("ops").Watch(pb.WatchRequest(prefix="drop/"), timeout=30)
    assert dict(stream.initial_metadata())  # the stream is live (a sleep could end before it was)
    changed = server.cli("writer", "metadata", name, "--description", "a drop box", "--tag", "team=auth")
    assert changed.returncode == 0, changed.stderr
    assert b"no new version" in changed.stderr
    event = next(iter(stream))
    assert (event.name, event.kind) == (name, pb.ChangeEvent.METADATA_CHANGED)
    stream.cancel()
    shown = json.loads(server.cli("ops", "metadata", name, "--json").stdout)
    assert (shown["description"], shown["tags"], shown["current_version"]) == (
        "a drop box",
        {"team": "auth"},
        1,
    )
    assert [v["version"] for v in shown["versions"]] == [1]
    assert server.cli("writer", "metadata", name).returncode == 5  # showing needs list
    denied = server.cli("auth", "metadata", name, "--untag", "team")
    assert denied.returncode == 5 and denied.stderr.decode().count("\n") == 1
    assert server.cli("writer", "metadata", "drop/MISSING", "--tag", "a=b").returncode == 3
    refused = server.cli("writer", "metadata", name, "--tag", "aws:x=y")
    assert refused.returncode == 2 and b"Traceback" not in refused.stderr
    assert server.cli("writer", "metadata", name, "--untag", "team").returncode == 0
    described = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10)
    assert dict(described.metadata.tags) == {} and described.metadata.description == "a drop box"
    outcomes = [
        (r["actor"], r["outcome"], r["decision"])
        for r in server.audit_records()
        if r["operation"] == "metadata"
    ]
    writer, auth = f"spiffe://{TD}/writer", f"spiffe://{TD}/auth"
    assert (writer, "ok", "allow") in outcomes and (auth, "access_denied", "deny") in outcomes
    assert (writer, "not_found", "allow") in outcomes


def test_a_metadata_update_that_changes_nothing_is_invalid_argument_and_changes_nothing(
    server: Server,
) -> None:
    """UpdateSecretMetadata removing only a tag the secret does not have (or setting max_versions
    to its own) answered OK, moved `updated`, sent METADATA_CHANGED and audited a change, though
    the proto says INVALID_ARGUMENT. It is refused, naming NothingToChangeError, with nothing
    written; the CLI over --server still exits 0 and says what it says locally. Fails on the
    previous commit."""
    from secrets_manager.errors import NothingToChangeError
    from secrets_manager.wire import ERROR_CLASS_KEY, error_for

    ops, name = server.stub("ops"), "auth/DB_PASSWORD"
    ops.UpdateSecretMetadata(pb.UpdateSecretMetadataRequest(name=name, set_tags={"k": "v"}), timeout=10)
    before = ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata
    stream = ops.Watch(pb.WatchRequest(prefix="auth/"), timeout=30)
    stream.initial_metadata()  # live: every later change reaches it
    no_ops = [
        pb.UpdateSecretMetadataRequest(name=name, remove_tags=["no-such-tag"]),
        pb.UpdateSecretMetadataRequest(name=name, max_versions=before.max_versions),
        pb.UpdateSecretMetadataRequest(name=name, description=before.description, set_tags={"k": "v"}),
    ]
    for request in no_ops:
        with pytest.raises(grpc.RpcError) as caught:
            ops.UpdateSecretMetadata(request, timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (ERROR_CLASS_KEY, "NothingToChangeError") in tuple(caught.value.trailing_metadata())
        error = error_for(caught.value.code(), caught.value.details(), caught.value.trailing_metadata())
        assert isinstance(error, NothingToChangeError) and "nothing to change" in str(error)
    assert ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata == before
    ops.PutSecret(pb.PutSecretRequest(name="auth/MARK", value=b"m"), timeout=10)
    first = next(iter(stream))  # the refused updates sent no event before this write's
    stream.cancel()
    assert (first.name, first.kind) == ("auth/MARK", pb.ChangeEvent.VERSION_ADDED)
    outcomes = [r["outcome"] for r in server.audit_records() if r["operation"] == "metadata"]
    assert outcomes[-6:] == ["pending", "invalid_input"] * 3
    # The CLI through the service: exit 0, as locally, saying what it did not do.
    untag = server.cli("ops", "metadata", name, "--untag", "no-such-tag")
    assert untag.returncode == 0, untag.stderr
    assert b"no tag 'no-such-tag' to remove (it was not there)" in untag.stderr
    same = server.cli("ops", "metadata", name, "--max-versions", str(before.max_versions))
    assert same.returncode == 0 and b"(already so)" in same.stderr, same.stderr
    assert ops.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10).metadata == before


def test_max_versions_is_set_remotely_with_write_alone_and_shown_and_audited(server: Server) -> None:
    """`store --max-versions` is PutSecret.max_versions and `metadata --max-versions` is
    UpdateSecretMetadata.max_versions: write is enough, DescribeSecret shows it, the next write
    prunes under it, out of range is INVALID_ARGUMENT (exit 2) and changes nothing."""
    name = "drop/ROLLED"
    stored = server.cli("writer", "store", name, "--max-versions", "5", input=b"v1")
    assert stored.returncode == 0, stored.stderr
    for n in range(2, 6):
        assert server.cli("writer", "store", name, input=f"v{n}".encode()).returncode == 0
    assert json.loads(server.cli("ops", "metadata", name, "--json").stdout)["max_versions"] == 5
    changed = server.cli("writer", "metadata", name, "--max-versions", "3")
    assert changed.returncode == 0, changed.stderr
    assert b"max versions set to 3" in changed.stderr
    shown = json.loads(server.cli("ops", "metadata", name, "--json").stdout)
    assert shown["max_versions"] == 3 and [v["version"] for v in shown["versions"]] == [1, 2, 3, 4, 5]
    assert server.cli("writer", "store", name, input=b"v6").returncode == 0
    described = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10)
    assert described.metadata.max_versions == 3
    assert [v.version for v in described.metadata.versions] == [4, 5, 6]
    for bad in ("1", "101"):
        refused = server.cli("writer", "metadata", name, "--max-versions", bad)
        assert refused.returncode == 2 and b"2 to 100" in refused.stderr
    with pytest.raises(grpc.RpcError) as caught:  # a client that skips the check: the service refuses
        server.stub("writer").UpdateSecretMetadata(
            pb.UpdateSecretMetadataRequest(name=name, max_versions=1000), timeout=10
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "2 to 100" in (caught.value.details() or "")
    assert server.cli("auth", "metadata", name, "--max-versions", "4").returncode == 5
    after = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10)
    assert after.metadata.max_versions == 3
    outcomes = [(r["outcome"], r["decision"]) for r in server.audit_records() if r["operation"] == "metadata"]
    assert ("ok", "allow") in outcomes and ("invalid_input", "allow") in outcomes
    assert ("access_denied", "deny") in outcomes


def test_import_works_remotely_with_list_and_write(server: Server) -> None:
    source = server.dir / "rw.env"
    source.write_bytes(b"TOKEN=imported-remotely\nOTHER='two'\n")
    imported = server.cli("writer", "import", str(source), "--service", "load")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.decode().splitlines() == ["load/TOKEN\tversion 1", "load/OTHER\tversion 1"]
    assert server.cli("writer", "get", "load/OTHER").stdout == b"two\n"
    again = server.cli("writer", "import", str(source), "--service", "load")
    assert again.returncode == 7 and b"exist already" in again.stderr
    denied = server.cli("auth", "import", str(source), "--service", "auth")
    assert denied.returncode == 5 and denied.stderr.decode().count("\n") == 1
    writes = [r["name"] for r in server.audit_records() if r["operation"] == "store" and r["outcome"] == "ok"]
    assert {"load/TOKEN", "load/OTHER"} <= set(writes)


def test_import_by_a_write_only_caller_meets_names_it_cannot_list_at_their_write(server: Server) -> None:
    """ListSecrets shows a write-only caller nothing, so a name that exists is found only when its
    create-only write is refused: the import stops there and says how far it got; with
    --on-existing skip such names are skipped."""
    assert server.cli("ops", "store", "drop/A", input=b"kept").returncode == 0
    source = server.dir / "drop.env"
    source.write_bytes(b"B=new-b\nA=new-a\nC=new-c\n")
    stopped = server.cli("writer", "import", str(source), "--service", "drop")
    assert stopped.returncode == 7 and stopped.stderr.decode().count("\n") == 1
    assert b"1 of 3 secret(s) were imported (the last drop/B)" in stopped.stderr
    assert b"drop/A exists already, though it was not listed before the import" in stopped.stderr
    assert b"--on-existing skip" in stopped.stderr
    skipped = server.cli(
        "writer", "import", str(source), "--service", "drop", "--on-existing", "skip", "--json"
    )
    assert skipped.returncode == 0, skipped.stderr
    assert [(d["name"], d["action"]) for d in json.loads(skipped.stdout)] == [
        ("drop/B", "skipped"),
        ("drop/A", "skipped"),
        ("drop/C", "created"),
    ]
    reply = server.stub("ops").GetSecret(pb.GetSecretRequest(name="drop/A"), timeout=10)
    assert reply.secret.value == b"kept"
    overwritten = server.cli(
        "writer", "import", str(source), "--service", "drop", "--on-existing", "overwrite", "--json"
    )
    assert [(d["name"], d["action"], d["version"]) for d in json.loads(overwritten.stdout)] == [
        ("drop/B", "overwritten", 2),
        ("drop/A", "overwritten", 2),
        ("drop/C", "overwritten", 2),
    ]


def test_a_password_file_is_read_again_after_passwd_and_a_root_rotation(tmp_path: Path) -> None:
    """Another process changes the master password, then rotates the root key: the password the
    service read at start no longer opens the header. Each call is refused (ABORTED, saying what to
    do) until the new password is in its password file, which it then reads again: no restart.
    A list, which decodes keysets inside a storage snapshot, answers too (it used to hang)."""
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    password_file = tmp_path / "master-password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    server = start_server(tmp_path, settings=f'password_file = "{password_file.name}"\n')
    try:
        stub = server.stub("ops")
        get = pb.GetSecretRequest(name="auth/DB_PASSWORD")
        assert stub.GetSecret(get, timeout=10).secret.value == SEED["auth/DB_PASSWORD"]
        local = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "MASTER_PASSWORD": PASSWORD}
        (tmp_path / "new-password").write_text("the new master password")
        store = ("--store", str(tmp_path / "store.db"))
        changed = run_script(local, *store, "passwd", "--new-password-file", str(tmp_path / "new-password"))
        assert changed.returncode == 0, changed.stderr
        rotated = run_script(
            local, *store, "keys", "rotate", "--root", env={"MASTER_PASSWORD": "the new master password"}
        )
        assert rotated.returncode == 0, rotated.stderr
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetSecret(get, timeout=10)
        assert refused.value.code() is grpc.StatusCode.ABORTED
        assert "put the new password in its password file" in str(refused.value.details())
        password_file.write_text("the new master password")
        time.sleep(RENEW_RETRY_SECONDS + 0.2)  # a failed attempt is not repeated sooner
        assert stub.GetSecret(get, timeout=10).secret.value == SEED["auth/DB_PASSWORD"]
        names = [m.name for m in stub.ListSecrets(pb.ListSecretsRequest(prefix="auth/"), timeout=10).secrets]
        assert names == ["auth/DB_PASSWORD", "auth/JWT_KEY"]
        assert server.cli("ops", "store", "auth/NEW", input=b"written after").returncode == 0
    finally:
        server.stop()


def test_a_response_that_cannot_be_built_is_internal_error_without_the_exception_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A description holding a lone surrogate (what a non-UTF-8 byte on the command line became,
    before the CLI refused it) cannot go into a response: DescribeSecret failed after the audited
    part, and gRPC sent "Exception calling application: 'utf-8' codec can't encode…"."""
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        real_describe = store.describe
        monkeypatch.setattr(
            store, "describe", lambda name: replace(real_describe(name), description="SEEKRIT-\udcff")
        )
        with (
            in_process_server(tmp_path, store, watch_tick=30) as (_running, stub),
            pytest.raises(grpc.RpcError) as failure,
        ):
            stub("ops").DescribeSecret(pb.DescribeSecretRequest(name="auth/JWT_KEY"), timeout=10)
    finally:
        store.close()
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert failure.value.details() == "internal error"


def test_a_change_whose_record_cannot_be_written_is_internal_not_a_retryable_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNAVAILABLE says "the store or the audit log cannot be used right now" and gRPC retry
    policies retry it: a client doing so wrote the same value again as a new version. The change
    stands, so the status is INTERNAL, which nothing retries, with the class in the metadata; the
    bundled client still raises ChangeUnrecordedError (exit 1), and a bare INTERNAL (a bug) is not
    one. Fails on the previous commit (UNAVAILABLE)."""
    from secrets_manager.audit import AuditError
    from secrets_manager.client._replicas import _worth_another_address
    from secrets_manager.errors import ChangeUnrecordedError, SecretsManagerError
    from secrets_manager.wire import ERROR_CLASS_KEY, error_for

    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        with in_process_server(tmp_path, store, watch_tick=30) as (running, stub):
            log = running.servicer._audit
            real_append = log.append

            def disk_full_after_the_request_record(events, anchor, *, durable=True):  # type: ignore[no-untyped-def]
                if any(e.operation == "store" and e.outcome != "pending" for e in events):
                    raise AuditError("cannot write audit log x: no space left on its device")
                return real_append(events, anchor, durable=durable)

            monkeypatch.setattr(log, "append", disk_full_after_the_request_record)
            with pytest.raises(grpc.RpcError) as failure:
                stub("ops").PutSecret(pb.PutSecretRequest(name="auth/NEW", value=b"new value"), timeout=10)
            remote = RemoteStore(f"127.0.0.1:{running.port}", tls_files(tmp_path, "ops"))
            try:
                with pytest.raises(ChangeUnrecordedError) as raised:
                    remote.put("auth/OTHER", b"other value")
            finally:
                remote.close()
            monkeypatch.setattr(log, "append", real_append)
            assert store.get("auth/NEW").version == 1 and store.get("auth/OTHER").version == 1
    finally:
        store.close()
    assert failure.value.code() is grpc.StatusCode.INTERNAL
    assert (ERROR_CLASS_KEY, "ChangeUnrecordedError") in tuple(failure.value.trailing_metadata())
    details = failure.value.details()
    assert details.startswith("the change was made (store auth/NEW, version 1), but the service could not ")
    assert "do not make the change again" in details and "refused" not in details
    assert "new value" not in details
    assert raised.value.exit_code == 1 and "do not make the change again" in str(raised.value)
    assert not _worth_another_address(raised.value)  # the SDK does not make it again elsewhere
    bug = error_for(grpc.StatusCode.INTERNAL, "internal error", ())
    assert type(bug) is SecretsManagerError  # not "the change was made"
    # A service from before answered UNAVAILABLE with the metadata: still not made again.
    older = error_for(grpc.StatusCode.UNAVAILABLE, "x", ((ERROR_CLASS_KEY, "ChangeUnrecordedError"),))
    assert isinstance(older, ChangeUnrecordedError)


# ---- production guard rails at start and reload; what [tls] and numbers accept -----------------


def _production_layout(directory: Path) -> Path:
    """What a production serve needs: a store it opens (the default KDF), a 0600 password file,
    keys 0600, and a config naming a schedule; returns the config."""
    make_pki(directory, ("ops",))
    for key in directory.glob("*-key.pem"):
        key.chmod(0o600)
    (directory / "policy.toml").write_text(POLICY)
    storage = SqliteStorage(directory / "store.db", create=True)
    EncryptedStore.create(storage, PasswordUnlock(PASSWORD, kdf.DEFAULT)).close()
    (directory / "master-password").write_text(PASSWORD)
    (directory / "master-password").chmod(0o600)
    (directory / "rotation.toml").write_text('[[rotation]]\nname = "db/app"\nevery = "30d"\n')
    tls_table = "".join(f'{key} = "{value}"\n' for key, value in _TLS.items())
    config = directory / "server.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\nstore = "store.db"\npolicy = "policy.toml"\n'
        'password_file = "master-password"\nrotation_schedule = "rotation.toml"\n'
        f"[tls]\n{tls_table}"
    )
    return config


def test_production_serve_refuses_files_others_could_change_at_start(tmp_path: Path) -> None:
    """Whoever can write the policy or the client CA makes themselves admin; the schedule's
    commands and the config's choices run as the service; the key must stay secret. Each is
    refused at start in one line with the command that fixes it; MASTER_PASSWORD is refused
    even beside password_file."""
    config = _production_layout(tmp_path)
    nobody = pwd.getpwnam("nobody").pw_uid
    cases = [
        ("rotation.toml", 0o666, None, "rotation schedule"),
        ("rotation.toml", 0o600, nobody, "rotation schedule"),
        ("policy.toml", 0o666, None, "policy file"),
        ("policy.toml", 0o600, nobody, "policy file"),
        ("ca.pem", 0o666, None, "tls.client_ca"),
        ("server.toml", 0o666, None, "server config"),
        ("server-key.pem", 0o644, None, "tls.key"),
    ]
    for name, mode, owner, what in cases:
        path = tmp_path / name
        before = path.stat()
        path.chmod(mode)
        if owner is not None:
            os.chown(path, owner, -1)
        result = _serve(tmp_path, config, {"SHRIVENQUANT_ENV": "production", "MASTER_PASSWORD": None})
        os.chown(path, before.st_uid, -1)
        path.chmod(stat.S_IMODE(before.st_mode))
        stderr = result.stderr.decode()
        assert result.returncode == 2 and stderr.count("\n") == 1, (name, stderr)
        assert what in stderr and str(path) in stderr and "production refuses it" in stderr, stderr
        assert ("belongs to nobody" if owner else "chmod") in stderr, stderr
    result = _serve(tmp_path, config, {"SHRIVENQUANT_ENV": "production"})  # MASTER_PASSWORD set too
    assert result.returncode == 2 and b"MASTER_PASSWORD is refused in production" in result.stderr


def test_policy_and_client_ca_made_writable_are_rejected_on_reload_in_production(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _production_layout(tmp_path)
    policy = PolicyHolder(tmp_path / "policy.toml", Environment.PRODUCTION)
    certificates = ServerCertificates(
        tmp_path / "server.pem",
        tmp_path / "server-key.pem",
        tmp_path / "ca.pem",
        environment=Environment.PRODUCTION,
    )
    in_force = policy.current, certificates.current
    (tmp_path / "policy.toml").write_text(
        POLICY.replace('"admin"]', '"admin"]\n"spiffe://x/evil" = ["admin"]', 1)
    )
    (tmp_path / "policy.toml").chmod(0o666)
    (tmp_path / "ca.pem").chmod(0o666)
    with caplog.at_level("ERROR"):
        assert not policy.reload() and not certificates.reload()
    assert (policy.current, certificates.current) == in_force
    errors = " ".join(getattr(r, "error", "") for r in caplog.records)
    assert (
        f"chmod go-w {tmp_path / 'policy.toml'}" in errors and f"chmod go-w {tmp_path / 'ca.pem'}" in errors
    )
    # Outside production the same files are a warning, and load.
    with caplog.at_level("WARNING"):
        assert PolicyHolder(tmp_path / "policy.toml").current is not None
    assert any("policy file" in r.getMessage() and "chmod go-w" in r.getMessage() for r in caplog.records)


def test_serve_refuses_a_server_certificate_without_server_auth(tmp_path: Path) -> None:
    """`pki issue server` without --server makes a client certificate; every client would then
    fail 'unsupported certificate purpose'. Refused at start, and a reload to one keeps the old."""
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    tls_table = "".join(f'{key} = "{value}"\n' for key, value in _TLS.items()).replace("server", "ops")
    config = tmp_path / "client-cert.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nstore = "store.db"\npolicy = "policy.toml"\n[tls]\n{tls_table}'
    )
    result = _serve(tmp_path, config)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr.count("\n") == 1, stderr
    assert "serverAuth" in stderr and "pki issue ops --server" in stderr
    certificates = ServerCertificates(
        tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem"
    )
    in_force = certificates.current
    for suffix in (".pem", "-key.pem"):
        (tmp_path / f"server{suffix}").write_bytes((tmp_path / f"ops{suffix}").read_bytes())
    assert not certificates.reload() and certificates.current == in_force


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[tls]\nverify_client = false", "unknown setting 'tls.verify_client'"),
        ("max_workers = true", "max_workers must be 1..1024"),
        ("shutdown_grace_seconds = true", "shutdown_grace_seconds must be 0..600"),
        ("rotation_check_seconds = true", "rotation_check_seconds must be"),
    ],
)
def test_a_config_refuses_unknown_tls_settings_and_booleans_for_numbers(
    tmp_path: Path, line: str, problem: str
) -> None:
    tls_table = "".join(f'{key} = "{value}"\n' for key, value in _TLS.items())
    config = tmp_path / "server.toml"
    if line.startswith("[tls]"):
        config.write_text(f'policy = "policy.toml"\n[tls]\n{tls_table}{line.split(chr(10))[1]}\n')
    else:
        config.write_text(f'policy = "policy.toml"\n{line}\n[tls]\n{tls_table}')
    with pytest.raises(InvalidInputError, match=re.escape(problem)):
        load_config(config)


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ('policy = "policy\\u0000.toml"', "policy contains a NUL character"),
        ('store = "store\\u0000.db"', "store contains a NUL character"),
        ('store = "sqlite:///store\\u0000.db"', "store contains a NUL character"),
        ('audit_file = "a\\u0000"', "audit_file contains a NUL character"),
        ('rotation_schedule = "r\\u0000.toml"', "rotation_schedule contains a NUL character"),
        ('listen = "127.0.0.1\\u0000x:0"', "listen must be HOST:PORT"),
        ('listen = "127.0.0.1 x:0"', "listen must be HOST:PORT"),
        ('metrics_listen = "127.0.0.1\\u0000:9000"', "metrics_listen must be HOST:PORT"),
    ],
)
def test_a_config_refuses_a_nul_in_a_path_or_an_address(tmp_path: Path, setting: str, problem: str) -> None:
    """Found by fuzzing server.toml: a "\\u0000" in a path stopped serve with 'internal error
    (ValueError)' (embedded null byte), and one in listen was cut off by gRPC, which listened."""
    tls_table = "".join(f'{key} = "{value}"\n' for key, value in _TLS.items())
    config = tmp_path / "server.toml"
    policy = "" if setting.startswith("policy") else 'policy = "policy.toml"\n'
    config.write_text(f"{policy}{setting}\n[tls]\n{tls_table}")
    with pytest.raises(InvalidInputError, match=re.escape(problem)):
        load_config(config)


def test_serve_refuses_a_nul_in_a_tls_path_in_one_line(tmp_path: Path) -> None:
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    config = tmp_path / "server.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\nstore = "store.db"\npolicy = "policy.toml"\n'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem\\u0000"\nclient_ca = "ca.pem"\n'
    )
    result = _serve(tmp_path, config)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr.count("\n") == 1, stderr
    assert "tls.key contains a NUL character" in stderr


@pytest.mark.parametrize("by", ["prefix", "names"])
def test_a_batch_get_whose_caller_gave_up_stops_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by: str
) -> None:
    """The handler went on reading every secret of the page for a caller whose deadline had passed
    (and audited them as read, though nothing was sent): a few clients timing out on a large store
    kept every worker busy, and SIGTERM waited for them. It stops at the next secret, and the call
    is audited `cancelled` without `get` records. Fails on the commit before it (reads go on).

    A page's secrets are read a few at a time (`read_current`, at one instant each): here 5 at a
    time, a slow store taking 0.1 s a secret, and the handler stops before the next few."""
    make_pki(tmp_path)
    make_store(tmp_path, SEED, POLICY)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    names = [f"auth/BULK_{index:02d}" for index in range(30)]
    for name in names:
        store.put(name, b"bulk value")
    read: list[str] = []
    real_read = store.read_current

    def slow_read(names: Sequence[str] = (), **options: Any) -> Any:
        read.extend(names)
        time.sleep(0.1 * len(names))
        return real_read(names, **options)

    monkeypatch.setattr(store, "read_current", slow_read)
    monkeypatch.setattr(server_module, "PAGE_READ_BATCH", 5)
    request = (
        pb.BatchGetSecretsRequest(prefix="auth/BULK_", page_size=100)
        if by == "prefix"
        else pb.BatchGetSecretsRequest(names=names, page_size=100)
    )
    try:
        with in_process_server(tmp_path, store, watch_tick=30) as (_running, stub):
            ended = code_of(lambda: stub("auth").BatchGetSecrets(request, timeout=0.5))
            assert ended is grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.4)  # the read under way when the deadline passed ends
            stopped_at = len(read)
            time.sleep(1.0)
            assert len(read) == stopped_at < len(names), "reads went on for a caller that gave up"
            audit = tmp_path / "in-process.audit.jsonl"
            assert eventually(lambda: '"outcome": "cancelled"' in audit.read_text().replace('":"', '": "'))
            records = [json.loads(line) for line in audit.read_text().splitlines()]
    finally:
        store.close()
    batch = [r for r in records if r.get("operation") == "batch_get"]
    assert [r["outcome"] for r in batch] == ["cancelled"] and batch[0]["decision"] == "allow"
    assert not [r for r in records if r.get("operation") == "get"]  # nothing was sent


def test_a_refusal_says_the_same_of_a_missing_name_as_of_a_present_one(server: Server) -> None:
    """As Vault and AWS answer a denied read: every RPC on one name decides before the store is
    read, so a caller refused there cannot tell whether the name exists (auth may read and list
    auth/* only; market-connector/BINANCE_API_KEY exists, market-connector/NOPE does not)."""
    stub = server.stub("auth")

    def calls(name: str) -> list[Callable[[], object]]:
        return [
            lambda: stub.GetSecret(pb.GetSecretRequest(name=name, label="pending"), timeout=10),
            lambda: stub.BatchGetSecrets(pb.BatchGetSecretsRequest(names=["auth/JWT_KEY", name]), timeout=10),
            lambda: stub.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10),
            lambda: stub.PutSecret(pb.PutSecretRequest(name=name, value=b"x", expect_version=1), timeout=10),
            lambda: stub.UpdateSecretMetadata(
                pb.UpdateSecretMetadataRequest(name=name, description="d"), timeout=10
            ),
            lambda: stub.UpdateSecretMetadataIfCurrent(
                pb.UpdateSecretMetadataIfCurrentRequest(name=name, description="d", expect_current=1),
                timeout=10,
            ),
            lambda: stub.DeleteSecret(pb.DeleteSecretRequest(name=name), timeout=10),
            lambda: stub.DeleteSecretIfCurrent(
                pb.DeleteSecretIfCurrentRequest(name=name, expect_version=1), timeout=10
            ),
            lambda: stub.DeleteSecretIfUnchanged(
                pb.DeleteSecretIfUnchangedRequest(name=name, expect_version=1), timeout=10
            ),
            lambda: stub.UndeleteSecret(pb.UndeleteSecretRequest(name=name), timeout=10),
            lambda: stub.StageSecretVersion(pb.StageSecretVersionRequest(name=name, value=b"x"), timeout=10),
            lambda: stub.StageSecretVersionIfCurrent(
                pb.StageSecretVersionIfCurrentRequest(name=name, value=b"x", expect_current=1), timeout=10
            ),
            lambda: stub.PromoteSecretVersion(
                pb.PromoteSecretVersionRequest(name=name, version=2), timeout=10
            ),
            lambda: stub.DiscardPendingVersion(pb.DiscardPendingVersionRequest(name=name), timeout=10),
            lambda: stub.RotateSecret(pb.RotateSecretRequest(name=name), timeout=10),
        ]

    def answers(name: str) -> list[tuple[grpc.StatusCode, str]]:
        found = []
        for call in calls(name):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            error: Any = caught.value
            found.append((error.code(), error.details().replace(name, "NAME")))
        return found

    present = answers("market-connector/BINANCE_API_KEY")
    assert {code for code, _ in present} == {grpc.StatusCode.PERMISSION_DENIED}
    assert answers("market-connector/NOPE") == present
    denied = [r for r in server.audit_records() if r["actor"] == f"spiffe://{TD}/auth"]
    assert len(denied) == 2 * len(present) and {r["decision"] for r in denied} == {"deny"}


def test_a_service_address_with_nothing_behind_it_is_one_line_saying_what_to_check(tmp_path: Path) -> None:
    """--server at a port where nothing listens said gRPC's own words ("failed to connect to all
    addresses; last error: UNKNOWN: ipv4:…: Failed to connect to remote host: Connection refused")
    and a host name that does not resolve "errors resolving …: [field:hostname lookup error:…]",
    neither saying what to check. Now: the address, why, and what to check; still exit 1 and
    nothing sent. Fails on the old code."""
    make_pki(tmp_path)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_CERT": str(tmp_path / "ops.pem"),
        "SECRETS_MANAGER_KEY": str(tmp_path / "ops-key.pem"),
        "SECRETS_MANAGER_CA": str(tmp_path / "ca.pem"),
    }
    dead = free_address()
    for args, given in (
        (["list"], b""),
        (["store", "auth/X"], b"never-shown-value"),
        (["watch", "auth/"], b""),
    ):
        proc = run_script(environ, "--server", dead, *args, input=given)
        said = proc.stderr.decode()
        assert proc.returncode == 1 and said.count("\n") == 1, said
        assert said == (
            f"secrets-manager: error: {dead}: failed to connect (Connection refused): is the "
            "service running there, and is this its address?\n"
        )
    with socket.socket() as plain:  # a port that answers, but not TLS (an HTTP server's)
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        address = f"127.0.0.1:{plain.getsockname()[1]}"
        answer = threading.Thread(target=_answer_in_plain_text, args=(plain,), daemon=True)
        answer.start()
        proc = run_script(environ, "--server", address, "list")
    said = proc.stderr.decode()
    assert proc.returncode == 1 and said.count("\n") == 1, said
    assert said == (
        f"secrets-manager: error: TLS handshake with {address} failed: what answers there does not "
        "speak TLS (a plain-text port, another service?): check the address\n"
    )
    unresolved = run_script(environ, "--server", "no-such-host.invalid:7443", "get", "auth/X")
    said = unresolved.stderr.decode()
    assert unresolved.returncode == 1 and said.count("\n") == 1, said
    assert said == (
        "secrets-manager: error: no-such-host.invalid:7443: the host name 'no-such-host.invalid' "
        "could not be resolved: check the address (a typing error?) and this host's DNS\n"
    )


def _answer_in_plain_text(listener: socket.socket) -> None:
    """Answer every connection as an HTTP server would, until the listener is closed."""
    with contextlib.suppress(OSError):
        while True:
            connection, _ = listener.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
