"""Stores and backups written by earlier releases, read by this one (README "Upgrading").

tests/vectors/upgrade/ holds a SQLite store written in turn by this session's build (each version
with its `sha256` member, docs/format.md 7), by the last release (0327c92) and by the one before
(9d97724), as a rolling upgrade with replicas of both builds leaves one, and two backups the last
release made of it; tests/vectors/upgrade/README.md says how they were made. The older builds
are not installed here: their writes are fixed in the files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from secrets_manager.crypto import Purpose, seal_record
from secrets_manager.errors import IntegrityError, NotFoundError
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from service_fixtures import SCRIPT

VECTORS = Path(__file__).parent / "vectors" / "upgrade"
PASSWORD = "upgrade vectors password"
BACKUP_PASSWORD = "upgrade vectors backup password"
# Every value the store holds, by (name, version), and who wrote it.
VALUES = {
    ("a/X", 2): b"x-2 by new",
    ("a/X", 3): b"x-3 staged by new",  # pending, staged by the new build
    ("a/X", 4): b"x-4 by old",  # current, written by 0327c92
    ("b/Y", 1): b"y-1 by new",
    ("c/Z", 1): b"z-1 by old",
    ("d/GONE", 1): b"gone-1 again by older",  # erased by 9d97724 and stored again
}


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    path = tmp_path / "mixed_store.db"
    shutil.copyfile(VECTORS / "mixed_store.db", path)
    return path


def _digests(store: EncryptedStore, name: str) -> dict[int, bool]:
    _, meta = store._read_meta(name)
    assert meta is not None
    return {number: "sha256" in info for number, info in meta.versions.items()}


def test_a_store_the_older_builds_wrote_after_this_one_reads_whole_and_keeps_its_digests(mixed: Path) -> None:
    """The older builds rewrote the metadata of versions this build had written (a description, a
    version of their own, a destroy, tags): they kept each version's `sha256`, so this build still
    checks those versions; the versions they wrote have none and read unchecked (format.md 7)."""
    store = EncryptedStore.open(SqliteStorage(mixed), PasswordUnlock(PASSWORD))
    try:
        for (name, version), value in VALUES.items():
            assert store.get(name, version=version).value.reveal() == value
        assert store.get("a/X").version == 4 and store.describe("a/X").description == "edited by old 0327c92"
        with pytest.raises(NotFoundError, match="destroyed"):
            store.get("a/X", version=1)  # destroyed by 9d97724
        assert _digests(store, "a/X") == {1: True, 2: True, 3: True, 4: False}
        assert _digests(store, "b/Y") == {1: True}
        assert _digests(store, "c/Z") == {1: False} and _digests(store, "d/GONE") == {1: False}
        assert dict(store.describe("b/Y").tags) == {"by": "older"}
        # The digest the older builds carried along is still in force: another value sealed for
        # the very name, version and key (what a replay of an erased namesake puts back) is damage.
        _, keyset = store._keyset_for_write("a")
        forged = seal_record(keyset.primary, Purpose.SECRET_VALUE, "a/X", 2, b"not x-2")
        raw = SqliteStorage(mixed)
        try:
            entry = raw.get("data/a/X#2")
            assert entry is not None
            raw.put("data/a/X#2", forged, expect=entry.revision)
        finally:
            raw.close()
        with pytest.raises(IntegrityError, match="version 2 of 'a/X'"):
            store.get("a/X", version=2)
    finally:
        store.close()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MASTER_PASSWORD": PASSWORD,
        "SECRETS_MANAGER_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
    }
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, env=env, timeout=60)
    assert b"Traceback" not in done.stderr
    return done


@pytest.mark.parametrize("kind", ["copy", "password"])
def test_a_backup_the_last_release_made_restores_and_reads_here(kind: str, tmp_path: Path) -> None:
    """A store copy and a password backup written by 0327c92 verify and restore with this build,
    every kept version readable with its value."""
    (tmp_path / "bpw").write_text(BACKUP_PASSWORD + "\n")
    (tmp_path / "bpw").chmod(0o600)
    backup = VECTORS / f"old_{kind}.smbackup"
    extra = ["--backup-password-file", str(tmp_path / "bpw")] if kind == "password" else []
    checked = _cli(tmp_path, "backup", "verify", str(backup), *extra)
    assert checked.returncode == 0, checked.stderr
    assert b"4 secrets (6 versions)" in checked.stdout
    target = str(tmp_path / "restored.db")
    restored = _cli(tmp_path, "--store", target, "restore", str(backup), *extra)
    assert restored.returncode == 0, restored.stderr
    for (name, version), value in VALUES.items():
        got = _cli(tmp_path, "--store", target, "get", name, "--version", str(version))
        assert got.returncode == 0 and got.stdout == value + b"\n", got.stderr
