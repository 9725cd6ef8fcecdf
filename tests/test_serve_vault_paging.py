"""BatchGetSecrets by prefix through `serve` on a Vault store (what the SDK's get_credentials()
does): each page listed the prefix again with a metadata GET per secret (Vault's `list`), and
nothing kept that listing between pages (no change head), so N secrets in pages of 100 cost
N/100 x N metadata reads: 1,000 secrets took 41 s (bench/bulk.py), against 3.3 s for list + get
in one process, and a page could overrun the SDK's 5 s deadline. The pages now list names alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
