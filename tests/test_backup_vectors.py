"""Replays the backup test vectors of docs/backup-format.md (section 12) through `read_backup`.

Each file in tests/vectors/backup/ is one vector: a whole backup file (base64), the password to open
it with, and the `expect`ed outcome. A good vector must decode to exactly the listed secrets; a bad
one must fail with exactly the documented error (and exit code), never another exception and never
a partial result. The JSON is committed and read as data: if the format changes, this test fails.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.errors import IntegrityError, UnlockError
from secrets_manager.store.backup import BackupDamagedError, BackupVersionError, NotABackupError, read_backup

VECTORS = Path(__file__).parent / "vectors" / "backup"
CORPUS = sorted(VECTORS.glob("*.json"))
ERRORS: dict[str, tuple[type[Exception], int]] = {
    "integrity_error": (BackupDamagedError, 6),
    "unlock_error": (UnlockError, 4),
    "unsupported_version": (BackupVersionError, 2),
    "not_a_backup": (NotABackupError, 2),
}


def secrets_doc(backup_secrets: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "deleted": s.deleted is not None,
            "labels": dict(s.labels),
            "versions": [
                {
                    "version": v.version,
                    "destroyed": v.destroyed,
                    "value": None if v.value is None else base64.b64encode(v.value).decode(),
                }
                | ({} if v.expires is None else {"expires": v.expires})
                | ({} if v.target is None else {"target": v.target})
                for v in s.versions
            ],
        }
        for s in backup_secrets
    ]


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_backup_vector(path: Path, tmp_path: Path) -> None:
    vector = json.loads(path.read_text(encoding="utf-8"))
    backup_file = tmp_path / "backup"
    backup_file.write_bytes(base64.b64decode(vector["file"]))
    password = vector["password"].encode("utf-8")
    if vector["expect"] == "ok":
        backup = read_backup(backup_file, password)
        summary = backup.summary
        assert {
            "kind": summary.kind,
            "secrets": summary.secrets,
            "deleted": summary.deleted,
            "versions": summary.versions,
            "entries": summary.entries,
        } == vector["summary"]
        assert secrets_doc(backup.secrets) == vector["secrets"]
        return
    error, exit_code = ERRORS[vector["expect"]]
    with pytest.raises(Exception) as caught:  # the exact type is asserted below
        read_backup(backup_file, password)
    assert type(caught.value) is error, caught.value
    assert caught.value.exit_code == exit_code  # type: ignore[attr-defined]
    assert "\n" not in str(caught.value)


def test_corpus_covers_every_outcome_and_both_kinds() -> None:
    vectors = [json.loads(p.read_text(encoding="utf-8")) for p in CORPUS]
    assert len(vectors) >= 30
    assert {v["expect"] for v in vectors} == {"ok", *ERRORS}
    assert {v["summary"]["kind"] for v in vectors if v["expect"] == "ok"} == {"store", "password"}
    assert issubclass(BackupDamagedError, IntegrityError)
