"""Where a Vault store's default audit log lives: one file per address, namespace and mount, as each
Vault Enterprise namespace keeps its own audit key and anchors. Two namespaces of one Vault used to
share `vault-HOST-PORT-MOUNT.audit.jsonl`, and the second failed as forged (exit 6). A log kept
under that old name is adopted by the namespace it belongs to; without a namespace the name is
as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_cli_external_stores import Cli
from vault_server import FakeVault


class NamespacedVault(FakeVault):
    """The fake Vault with one state per X-Vault-Namespace header, as Vault Enterprise keeps
    namespaces apart (the root namespace is this object itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.spaces: dict[str, FakeVault] = {"": self}

    def start(self) -> NamespacedVault:
        super().start()
        assert self._server is not None
        vault = self

        class Handler(self._server.RequestHandlerClass):  # type: ignore[name-defined,misc]
            @property
            def server_state(self) -> FakeVault:
                namespace = (self.headers.get("X-Vault-Namespace") or "").strip("/")
                return vault.spaces.setdefault(namespace, FakeVault(root_token=vault.root_token))

            @server_state.setter
            def server_state(self, _value: Any) -> None:
                pass

        self._server.RequestHandlerClass = Handler
        return self


@pytest.fixture
def vault() -> Iterator[NamespacedVault]:
    server = NamespacedVault().start()
    yield server
    server.stop()


def cli(vault: NamespacedVault, home: Path, namespace: str | None = None) -> Cli:
    url = vault.address.replace("http://", "vault+http://") + "/secret"
    return Cli(
        {
            "HOME": str(home),
            "VAULT_TOKEN": vault.root_token,
            "SECRETS_MANAGER_STORE": url + (f"?namespace={namespace}" if namespace else ""),
        }
    )


def logs(home: Path) -> list[str]:
    return sorted(p.name for p in (home / ".local/share/secrets-manager").glob("*.audit.jsonl"))


def test_two_namespaces_of_one_vault_keep_two_logs(vault: NamespacedVault, tmp_path: Path) -> None:
    team_a, team_b = cli(vault, tmp_path, "team-a"), cli(vault, tmp_path, "team-b")
    assert team_a("store", "auth/K", input=b"a").code == 0
    assert team_b("store", "auth/K", input=b"b").code == 0
    assert (team_a("get", "auth/K").out, team_b("get", "auth/K").out) == ("a\n", "b\n")
    assert (
        vault.spaces["team-a"].mounts["secret"]["auth/K"]
        is not vault.spaces["team-b"].mounts["secret"]["auth/K"]
    )
    for team in (team_a, team_b):
        assert team("audit", "verify").out.startswith("audit log verified: 3 records")
    port = vault.address.rsplit(":", 1)[1]
    names = logs(tmp_path)
    assert len(names) == 2
    assert [n.rsplit("-", 1)[0] for n in names] == [
        f"vault-127.0.0.1-{port}-team-a-secret",
        f"vault-127.0.0.1-{port}-team-b-secret",
    ]
    # VAULT_NAMESPACE names the same namespace, so the same log.
    assert cli(vault, tmp_path)("get", "auth/K", env={"VAULT_NAMESPACE": "team-a"}).out == "a\n"
    assert logs(tmp_path) == names


def test_a_log_under_the_old_name_is_adopted_by_its_own_namespace_only(
    vault: NamespacedVault, tmp_path: Path
) -> None:
    team_a, team_b = cli(vault, tmp_path, "team-a"), cli(vault, tmp_path, "team-b")
    port = vault.address.rsplit(":", 1)[1]
    old = tmp_path / ".local/share/secrets-manager" / f"vault-127.0.0.1-{port}-secret.audit.jsonl"
    assert team_a("--audit-file", str(old), "store", "svc/A", input=b"v1").code == 0  # the old default
    before = old.read_bytes()
    first = team_b("store", "svc/A", input=b"b1")
    assert first.code == 0 and "audit log" not in first.stderr
    assert old.read_bytes() == before
    moved = team_a("get", "svc/A")
    assert moved.out == "v1\n" and f"the audit log {old} of this store is now" in moved.stderr
    assert not old.exists()
    assert team_a("audit", "verify").out.startswith("audit log verified: 3 records")
    assert team_b("audit", "verify").out.startswith("audit log verified: 2 records")
