"""Vault Enterprise namespaces (developer.hashicorp.com/vault/docs/enterprise/namespaces): each one
keeps its own mounts, tokens and policies, and a request names its namespace in the
X-Vault-Namespace header (or as a prefix of its path). VAULT_NAMESPACE, or the store URL's
?namespace=, must reach every request a store makes: its reads and writes, the token's lookup and
renewal, a login, the failover retry. The test server answers a request that lost its namespace
from the root namespace, where a namespace's token is unknown (403), so a request that went astray
fails, and the root namespace's request log shows it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.errors import AccessDeniedError
from secrets_manager.store.vault import VaultStore, connect_vault, retrying_session
from test_cli_external_stores import Cli, assert_one_line_error
from vault_server import FakeVault

NO_ACTIVE_NODE = ["local node not active but active cluster node not found"]


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    server = FakeVault().start()
    yield server
    server.stop()


def team_token(vault: FakeVault, team: str, **options: Any) -> str:
    """A token of namespace `team` whose policy allows the whole `secret` mount there."""
    space = vault.namespace(team)
    space.add_policy(
        "kv", 'path "secret/*" { capabilities = ["create", "read", "update", "patch", "delete", "list"] }'
    )
    return space.add_token(f"{team}-token", policies=["kv"], **options)


def open_in(vault: FakeVault, **environ: str) -> VaultStore:
    client = connect_vault(
        vault.address, environ=environ, session=retrying_session(attempts=3, backoff=0.001)
    )
    return VaultStore(client, "secret", actor="tester")


def test_every_request_of_a_store_goes_to_its_namespace(
    vault: FakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads, writes, metadata, delete/undelete, the audit key, and a renewable token's lookup and
    renewals: all in team-a, none in the root namespace."""
    monkeypatch.setattr("secrets_manager.store.vault.TOKEN_CHECK_AFTER_SECONDS", 0.2)
    token = team_token(vault, "team-a", ttl=4)
    store = open_in(vault, VAULT_TOKEN=token, VAULT_NAMESPACE="team-a")
    store.put("svc/K", b"v1", description="d")
    store.put("svc/K", b"v2")
    deadline = time.monotonic() + 5  # over a TTL (renewed every 2 s: 2 s to spare under load)
    while time.monotonic() < deadline:
        store.probe()
        time.sleep(0.2)
    assert store.get("svc/K").value.reveal() == b"v2"
    assert [s.name for s in store.list()] == ["svc/K"]
    store.delete("svc/K")
    store.undelete("svc/K")
    store.audit_key()
    team_a = vault.namespace("team-a")
    assert team_a.mounts["secret"]["svc/K"].current_version == 2
    assert ("GET", "/v1/auth/token/lookup-self") in team_a.requests
    assert ("POST", "/v1/auth/token/renew-self") in team_a.requests
    assert vault.requests == [] and vault.mounts["secret"] == {}
    store.close()


def test_the_failover_retry_and_an_approle_login_keep_the_namespace(vault: FakeVault) -> None:
    team_a = vault.namespace("team-a")
    team_a.approles["role-1"] = "secret-1"
    store = open_in(vault, VAULT_ROLE_ID="role-1", VAULT_SECRET_ID="secret-1", VAULT_NAMESPACE="team-a")
    store.put("svc/K", b"v1")
    team_a.fail_next(500, count=3, errors=NO_ACTIVE_NODE)  # a leader election in team-a's cluster
    assert store.put("svc/K", b"v2").version == 2
    assert team_a._failures == [] and vault.requests == []
    store.close()
    assert ("POST", "/v1/auth/token/revoke-self") in team_a.requests


def test_a_token_of_one_namespace_cannot_read_another(vault: FakeVault) -> None:
    team_a_token = team_token(vault, "team-a")
    team_token(vault, "team-b")
    open_in(vault, VAULT_TOKEN=vault.root_token, VAULT_NAMESPACE="team-b").put("svc/K", b"b")
    for namespace in ("team-b", ""):
        store = open_in(vault, VAULT_TOKEN=team_a_token, VAULT_NAMESPACE=namespace)
        with pytest.raises(AccessDeniedError):
            store.get("svc/K")
        store.close()
    # The parent's root token may do everything in its children, as Vault's root token does.
    assert (
        open_in(vault, VAULT_TOKEN=vault.root_token, VAULT_NAMESPACE="team-b").get("svc/K").value.reveal()
        == b"b"
    )


def test_the_namespace_may_be_a_path_prefix_as_vault_accepts(vault: FakeVault) -> None:
    """X-Vault-Namespace "team-a" and /v1/secret/... is /v1/team-a/secret/... with no header; a
    nested namespace may be split between the two."""
    token = team_token(vault, "team-a")
    write = {"data": {"value": "v"}}
    assert vault.handle("POST", "/v1/team-a/secret/data/svc/K", token, write)[0] == 200
    assert vault.namespace("team-a").mounts["secret"]["svc/K"].current_version == 1
    assert vault.handle("POST", "/v1/secret/data/svc/K", token, write)[0] == 403  # root namespace
    vault.namespace("team-a/prod")
    nested = vault.handle("POST", "/v1/team-a/prod/secret/data/svc/K", vault.root_token, write)
    assert nested[0] == 200 and "svc/K" in vault.namespace("team-a/prod").mounts["secret"]


@pytest.mark.parametrize("how", ["VAULT_NAMESPACE", "url"])
def test_the_cli_works_under_a_namespace_with_that_namespaces_token(
    vault: FakeVault, tmp_path: Path, how: str
) -> None:
    token = team_token(vault, "team-a")
    url = vault.address.replace("http://", "vault+http://") + "/secret"
    env = {"HOME": str(tmp_path), "VAULT_TOKEN": token, "SECRETS_MANAGER_STORE": url}
    if how == "url":
        env["SECRETS_MANAGER_STORE"] += "?namespace=team-a"
    else:
        env["VAULT_NAMESPACE"] = "team-a"
    cli = Cli(env)
    assert cli("store", "svc/K", input=b"v1").code == 0
    assert cli("get", "svc/K").out == "v1\n"
    assert cli("list").out == "svc/K\n"
    assert cli("audit", "verify").out.startswith("audit log verified: 4 records")
    assert vault.requests == []
    # The same token without the namespace: the root namespace does not know it.
    outside = Cli({**env, "SECRETS_MANAGER_STORE": url, "VAULT_NAMESPACE": ""})
    assert_one_line_error(outside("get", "svc/K"), 5, "denied")
