"""BatchGetSecrets by prefix through `serve` on a Vault or AWS store (what the SDK's
get_credentials() does): each page listed the prefix again with the store's `list`, which reads
every secret (Vault: a metadata GET each; AWS: ListSecretVersionIds each), and nothing kept that
listing between pages (no change head), so N secrets in pages of 100 cost N/100 x N reads: on
Vault 1,000 secrets took 21 to 41 s (bench/bulk.py), against 1.2 to 3.3 s for list + get in one
process; on AWS (moto) a page of 1,000 overran the SDK's 5 s deadline and the call failed. The
pages now list names alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moto_fixtures import moto_environ
from secrets_manager.store.vault import VaultStore, connect_vault
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc
from service_fixtures import POLICY, Server, make_pki, start_server
from vault_server import FakeVault

SECRETS = 40
PAGE = 10


@pytest.fixture
def served(tmp_path: Path, fake_vault: FakeVault) -> Iterator[tuple[Server, FakeVault]]:
    env = {"VAULT_TOKEN": fake_vault.root_token}
    store = VaultStore(connect_vault(fake_vault.address, environ=env), "secret", actor="seeder")
    try:
        for i in range(SECRETS):
            store.put(f"auth/K{i:03d}", f"value {i}".encode())
        store.delete("auth/K007")
    finally:
        store.close()
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    url = fake_vault.address.replace("http://", "vault+http://") + "/secret"
    server = start_server(tmp_path, store=url, settings='audit_file = "audit.jsonl"\n', environment=env)
    try:
        yield server, fake_vault
    finally:
        server.stop()


def test_paging_through_a_vault_prefix_reads_each_secrets_metadata_about_once(
    served: tuple[Server, FakeVault],
) -> None:
    server, vault = served
    stub = pb_grpc.SecretsStub(server.channel("auth"))
    before = len(vault.requests)
    token, got, pages = "", {}, 0
    while True:
        request = pb.BatchGetSecretsRequest(prefix="auth/", page_size=PAGE, page_token=token)
        reply = stub.BatchGetSecrets(request, timeout=30)
        pages += 1
        got.update({secret.name: secret.value for secret in reply.secrets})
        token = reply.next_page_token
        if not token:
            break
    assert pages >= SECRETS // PAGE
    expected = {f"auth/K{i:03d}": f"value {i}".encode() for i in range(SECRETS) if i != 7}
    assert got == expected  # the deleted one skipped, as when the listing left it out
    metadata_reads = [
        path for method, path in vault.requests[before:] if method == "GET" and "/metadata/auth/" in path
    ]
    assert len(metadata_reads) <= 2 * SECRETS, len(metadata_reads)  # it was pages x SECRETS + SECRETS


def test_paging_through_an_aws_prefix_asks_no_secret_for_its_versions(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.secretsmanager.models import SecretsManagerBackend

    from secrets_manager.environment import Environment
    from secrets_manager.store.url import open_external_store

    env = moto_environ(moto_endpoint, "us-east-1")
    url = f"aws-secretsmanager://us-east-1/paging-{tmp_path.name[-12:]}"
    for key, text in env.items():
        monkeypatch.setenv(key, text)
    store = open_external_store(url, environment=Environment.DEVELOPMENT, actor="seeder")
    try:
        for i in range(SECRETS):
            store.put(f"auth/K{i:03d}", f"value {i}".encode())
    finally:
        store.close()
    asked: list[str] = []
    list_versions = SecretsManagerBackend.list_secret_version_ids

    def counted(self: Any, secret_id: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(secret_id)
        return list_versions(self, secret_id, *args, **kwargs)

    monkeypatch.setattr(SecretsManagerBackend, "list_secret_version_ids", counted)
    make_pki(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY)
    server = start_server(tmp_path, store=url, settings='audit_file = "audit.jsonl"\n', environment=env)
    try:
        stub = pb_grpc.SecretsStub(server.channel("auth"))
        token, got = "", {}
        while True:
            request = pb.BatchGetSecretsRequest(prefix="auth/", page_size=PAGE, page_token=token)
            reply = stub.BatchGetSecrets(request, timeout=30)
            got.update({secret.name: secret.value for secret in reply.secrets})
            token = reply.next_page_token
            if not token:
                break
    finally:
        server.stop()
    assert got == {f"auth/K{i:03d}": f"value {i}".encode() for i in range(SECRETS)}
    assert len(asked) <= SECRETS, len(asked)  # it was pages x SECRETS
