"""Where a Vault store's default audit log lives: one file per address, namespace and mount, as each
Vault Enterprise namespace keeps its own audit key and anchors. Two namespaces of one Vault used to
share `vault-HOST-PORT-MOUNT.audit.jsonl`, and the second failed as forged (exit 6). A log kept
under that old name is adopted by the namespace it belongs to; without a namespace the name is
as it was.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from secrets_manager.audit import AuditEvent, AuditLog, adopt_log
from secrets_manager.store.base import Anchor
from test_cli_external_stores import SCRIPT, Cli
from vault_server import FakeVault


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    server = FakeVault().start()
    yield server
    server.stop()


def cli(vault: FakeVault, home: Path, namespace: str | None = None) -> Cli:
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


def test_two_namespaces_of_one_vault_keep_two_logs(vault: FakeVault, tmp_path: Path) -> None:
    team_a, team_b = cli(vault, tmp_path, "team-a"), cli(vault, tmp_path, "team-b")
    assert team_a("store", "auth/K", input=b"a").code == 0
    assert team_b("store", "auth/K", input=b"b").code == 0
    assert (team_a("get", "auth/K").out, team_b("get", "auth/K").out) == ("a\n", "b\n")
    assert (
        vault.namespace("team-a").mounts["secret"]["auth/K"]
        is not vault.namespace("team-b").mounts["secret"]["auth/K"]
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
    vault: FakeVault, tmp_path: Path
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


# Kills the CLI (SIGKILL: no finally, no atexit) right after adopt_log's KILL_AT_RENAME-th rename.
_KILLED_ADOPTION = """
import os, signal
import secrets_manager.audit.adopt as audit_adopt

class _Os:
    renames = 0
    def __getattr__(self, name):
        return getattr(os, name)
    def rename(self, src, dst):
        os.rename(src, dst)
        _Os.renames += 1
        if _Os.renames == int(os.environ["KILL_AT_RENAME"]):
            os.kill(os.getpid(), signal.SIGKILL)

audit_adopt.os = _Os()
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_an_adoption_killed_after_any_rename_is_finished_by_the_next_command(
    vault: FakeVault, tmp_path: Path, kill_at: int
) -> None:
    """The old log has three rotated files and the live one, renamed oldest first. Killed between
    two renames, the log was split across both names: every later command failed as tampered
    (exit 6), and the message suggested an audit reset that throws a whole chain away."""
    team_a, team_b = cli(vault, tmp_path, "team-a"), cli(vault, tmp_path, "team-b")
    data = tmp_path / ".local/share/secrets-manager"
    port = vault.address.rsplit(":", 1)[1]
    old = data / f"vault-127.0.0.1-{port}-secret.audit.jsonl"
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "600"}  # rotates every record or two
    for i in range(4):
        assert team_a("--audit-file", str(old), "store", f"svc/K{i}", input=b"v", env=small).code == 0
    assert len(AuditLog(old).files()) == 4
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILLED_ADOPTION)
    killed = subprocess.run(
        [str(SCRIPT), "get", "svc/K0"],
        env={**team_a.env, "PYTHONPATH": str(hook), "KILL_AT_RENAME": str(kill_at)},
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9
    assert len(AuditLog(old).files()) == 4 - kill_at
    # Another namespace's command leaves this store's halves alone.
    assert team_b("get", "svc/K0").code == 3
    assert len(AuditLog(old).files()) == 4 - kill_at
    again = team_a("get", "svc/K0")
    assert again.code == 0 and again.out == "v\n", again.stderr
    assert not list(data.glob(old.name + "*"))  # the lock file too, once all the files moved
    assert team_a("audit", "verify").out.startswith("audit log verified: 9 records in 4 files")
    assert team_b("audit", "verify").out.startswith("audit log verified: 1 record")


class _Anchors:
    """A store's audit key and anchor, in memory (what adopt_log asks of a store)."""

    def __init__(self, key: bytes) -> None:
        self.key, self.anchor = key, None
        self.audit_anchor_scoped = False

    def audit_key(self) -> bytes:
        return self.key

    def audit_keys(self, *, reload: bool = False) -> tuple[bytes, ...]:
        return (self.key,)

    def audit_anchor(self) -> Anchor | None:
        return self.anchor

    def set_audit_anchor(self, anchor: Anchor, *, lock_wait: float | None = None) -> None:
        self.anchor = anchor


def _written(path: Path, anchors: _Anchors, records: int) -> AuditLog:
    log = AuditLog(path, max_bytes=1)  # every record in a file of its own
    for _ in range(records):
        log.append([AuditEvent("get", "ops", name="svc/K")], anchors)
    return log


def test_a_fifo_under_the_old_name_is_left_where_it_is_without_hanging(tmp_path: Path) -> None:
    """Reading it for its last signed record opened it by name: the adoption (every command on
    the store) hung for good."""
    key = os.urandom(32)
    old_anchors, new_anchors = _Anchors(key), _Anchors(key)
    old, new = tmp_path / "old.audit.jsonl", tmp_path / "new.audit.jsonl"
    _written(old, old_anchors, 2)
    old.unlink()  # its live file (the last record)...
    os.mkfifo(old)  # ...replaced by a FIFO
    found: list[list[Path]] = []
    adopting = threading.Thread(
        target=lambda: found.append(adopt_log(old, new, old_anchors, new_anchors)), daemon=True
    )
    adopting.start()
    adopting.join(10)
    assert found == [[]]
    assert stat.S_ISFIFO(old.lstat().st_mode) and not new.exists()


def test_only_the_rest_of_the_same_chain_is_moved_to_join_files_under_the_new_name(tmp_path: Path) -> None:
    """Rotated files under the new name and no live file is what a cut-short adoption leaves; the
    old files are moved after them only if their chain takes up where the new files' ends."""
    key = os.urandom(32)
    old_anchors, new_anchors = _Anchors(key), _Anchors(key)
    old, new = tmp_path / "old.audit.jsonl", tmp_path / "new.audit.jsonl"
    other = _written(tmp_path / "other.audit.jsonl", _Anchors(key), 2)
    _written(old, old_anchors, 3)
    new_anchors.anchor = old_anchors.anchor
    first_new = new.with_name(new.name + ".000000000001")
    # The first file of another chain under the same key is not the old log's beginning.
    other.files()[0].rename(first_new)
    assert adopt_log(old, new, old_anchors, new_anchors) == []
    assert len(AuditLog(old).files()) == 3
    # The old log's own first file is: the rest follows it.
    AuditLog(old).files()[0].rename(first_new)
    moved = adopt_log(old, new, old_anchors, new_anchors)
    assert [p.name for p in moved] == ["new.audit.jsonl.000000000002", "new.audit.jsonl"]
    assert AuditLog(new).verify(key, new_anchors.anchor) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "new.audit.jsonl",
        "new.audit.jsonl.000000000001",
        "new.audit.jsonl.000000000002",
        "new.audit.jsonl.lock",
        "other.audit.jsonl",
        "other.audit.jsonl.lock",
    ]


def test_a_long_mount_gets_a_default_log_name_the_file_system_takes(vault: FakeVault, tmp_path: Path) -> None:
    """A long mount (or namespace) made the default log's name pass NAME_MAX: every command failed
    to write its audit log. Names that fit stay as they were."""
    mount = "/".join(["m" * 60] * 5)
    vault.mounts[mount], vault.configs[mount] = {}, type(vault.configs["secret"])()
    url = vault.address.replace("http://", "vault+http://") + f"/{mount}"
    long = Cli({"HOME": str(tmp_path), "VAULT_TOKEN": vault.root_token, "SECRETS_MANAGER_STORE": url})
    stored = long("store", "auth/K", input=b"v")
    assert stored.code == 0, stored.stderr
    assert long("audit", "verify").out.startswith("audit log verified: 2 records")
    (name,) = logs(tmp_path)
    assert len(name) <= 223 and name.startswith("vault-127.0.0.1-")
    port = vault.address.rsplit(":", 1)[1]
    assert cli(vault, tmp_path)("store", "auth/K", input=b"w").code == 0
    assert f"vault-127.0.0.1-{port}-secret.audit.jsonl" in logs(tmp_path)
